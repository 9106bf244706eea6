"""Verification users can run: hand-written gradients against autodiff and finite differences.

Autodiff (``jax.grad`` / ``jax.vjp``) appears here only as the *reference*. The grid of
checks that ``bptt-jax verify`` runs is :mod:`bptt_jax.cli.verify`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bptt_jax import _engine as engine
from bptt_jax import losses, precision, validation
from bptt_jax.cells import LSTM, Elman, protocol
from bptt_jax.models import Bidirectional, Stack
from bptt_jax.models import output_size as output_size_of

#: Max normwise relative error allowed between manual and autodiff gradients, by dtype.
#: float64: both sides are exact to ~1e-15 per operation; 1e-10 leaves room for T*H sums.
#: float32: unit round-off 6e-8 times the growth of summation error over T*B rows.
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}
#: Max relative error of a central finite difference in float64, along a random direction v
#: and relative to ``max(|v.g|, ||g||)``. The step ``FD_EPS = 1e-5`` is near a central
#: difference's optimum (3 u / |f3|)^(1/3) ~ 7e-6 (f3: the third derivative, u = 1.1e-16):
#: truncation error eps^2 |f3| / 6 ~ 2e-11, round-off ~ u |loss| / eps ~ 1e-11 |loss|.
#: (At eps = 1e-6 the round-off alone reached 6e-6 of a leaf's small directional derivative.)
FD_TOLERANCE = 1e-6
FD_EPS = 1e-5
#: Under a precision policy (``compute_dtype``), tolerances in units of the compute dtype's
#: machine epsilon (bfloat16: 2^-7 = 7.8e-3 with its 8-bit significand). The verdict compares
#: the manual gradient with autodiff of the *same* policy: both differentiate the same
#: rounded forward (inputs and kernels cast once, stored states and gate residuals in the
#: compute dtype), so what separates them is each backward's own rounding: every term of a
#: gradient sum has a few factors rounded once to the compute dtype (the per-step errors and
#: pre-activation gradients that meet a kernel), each off by at most eps/2, so each side is
#: within ``POLICY_ULPS * eps`` of the exact derivative of that forward and the two within
#: ``2 * POLICY_ULPS * eps`` (bfloat16: 6.25e-2) of each other. A backward that is wrong by
#: more than that (e.g. one bias gradient 10% off) fails; a smaller error is below what
#: bfloat16 can resolve and is the float32 and float64 rows' to catch.
#: The distance to autodiff in the params' dtype (``full_precision``) measures the policy's
#: rounding of the forward, bfloat16's and not the cell's backward: at T = 64 it reaches 0.1
#: for a correct cell on some keys. It is reported beside the verdict, not part of it;
#: ``POLICY_ULPS * eps`` is its typical size (``full_precision_tolerance``).
POLICY_ULPS = 4


def policy_tolerances(compute_dtype) -> tuple[float, float]:
    """``(vs the params' dtype, vs autodiff of the same policy)`` for a compute dtype: the
    second is the verdict's tolerance, the first the typical distance to full precision
    (reported, not judged; see :data:`POLICY_ULPS`)."""
    eps = float(jnp.finfo(compute_dtype).eps)
    return POLICY_ULPS * eps, 2 * POLICY_ULPS * eps


def relative_error(a, b) -> float:
    """Normwise relative error ``max|a - b| / max|b|`` (0 when both are 0)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.max(np.abs(b), initial=0.0)
    diff = np.max(np.abs(a - b), initial=0.0)
    if scale == 0.0:
        return float(diff)
    return float(diff / scale)


@dataclasses.dataclass(frozen=True)
class GradientReport:
    """The result of :func:`check_gradients`.

    Attributes:
      config: a one-line description of what was checked.
      autodiff: leaf name -> max relative error of the manual gradient vs autodiff.
      finite_diff: leaf name -> relative error of the manual directional derivative vs a
        central finite difference (float64 only; empty otherwise).
      tolerance: the autodiff tolerance used (by dtype; under a policy, vs autodiff of the
        same policy).
      full_precision: under a precision policy (``compute_dtype``), leaf name -> max
        relative error of the manual gradient vs autodiff in the params' dtype (no policy);
        empty otherwise. Information, not part of ``passed``: it measures the compute
        dtype's rounding of the forward, not the cell's backward (see :data:`POLICY_ULPS`).
      naive: under a policy, leaf name -> the same error of a naive run (params and inputs
        cast to the compute dtype, no policy), for comparison; not part of ``passed``.
      full_precision_tolerance: the typical size of ``full_precision`` (``POLICY_ULPS``
        eps of the compute dtype), for reading it; not a pass/fail bound.
    """

    config: str
    autodiff: dict[str, float]
    finite_diff: dict[str, float]
    tolerance: float
    full_precision: dict[str, float] = dataclasses.field(default_factory=dict)
    naive: dict[str, float] = dataclasses.field(default_factory=dict)
    full_precision_tolerance: float = 0.0

    @property
    def passed(self) -> bool:
        """Every leaf within ``tolerance`` of autodiff (of the same policy, under one) and,
        in float64, of finite differences; ``full_precision`` and ``naive`` are not judged."""
        ok = all(np.isfinite(e) and e <= self.tolerance for e in self.autodiff.values())
        return ok and all(np.isfinite(e) and e <= FD_TOLERANCE for e in self.finite_diff.values())

    @property
    def max_error(self) -> float:
        return max(self.autodiff.values())


def _named_leaves(tree, prefix: str) -> dict[str, jax.Array]:
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        name = prefix + "." + jax.tree_util.keystr(path, simple=True, separator=".")
        out[name.rstrip(".")] = leaf
    return out


def random_problem(
    model, key, *, seq_len, batch_size, input_size, output_size, dtype, mask, random_carry, loss
):
    """Random params, readout, inputs, targets, initial carry and mask (never zeros).

    ``model`` is a cell, a :class:`~bptt_jax.Bidirectional` or a :class:`~bptt_jax.Stack`;
    every leaf of its params and carry is drawn with its own key.
    """
    k = jax.random.split(key, 8)
    params = model.init(k[0], input_size, dtype)
    # Nudge every parameter off its initial distribution (e.g. non-zero orthogonal biases).
    leaves, tdef = jax.tree.flatten(params)
    params = jax.tree.unflatten(
        tdef,
        [
            p + 0.1 * jax.random.normal(kk, p.shape, dtype)
            for p, kk in zip(leaves, jax.random.split(k[1], len(leaves)))
        ],
    )
    readout = losses.init_readout(k[2], output_size_of(model), output_size, dtype)
    readout = losses.ReadoutParams(
        readout.w_hy, 0.1 * jax.random.normal(k[3], (output_size,), dtype)
    )
    xs = jax.random.normal(k[4], (seq_len, batch_size, input_size), dtype)
    if loss == "xent":
        targets = jax.random.randint(k[5], (seq_len, batch_size), 0, output_size)
    else:
        targets = jax.random.normal(k[5], (seq_len, batch_size, output_size), dtype)
    carry0 = model.zero_carry(batch_size, dtype)
    if random_carry:
        leaves, tdef = jax.tree.flatten(carry0)
        ks = jax.random.split(k[6], len(leaves))
        carry0 = jax.tree.unflatten(
            tdef, [0.5 * jax.random.normal(kk, c.shape, dtype) for kk, c in zip(ks, leaves)]
        )
    m = None
    if mask:  # right-padded random lengths in [1, T]; at least one full-length sequence
        lengths = jax.random.randint(k[7], (batch_size,), 1, seq_len + 1)
        lengths = lengths.at[0].set(seq_len)
        m = jnp.arange(seq_len)[:, None] < lengths[None, :]
    return params, readout, xs, targets, carry0, m


def check_gradients(
    model,
    *,
    path: str = "loss",
    backward: str = "manual",
    seq_len: int = 9,
    batch_size: int = 3,
    input_size: int = 4,
    output_size: int = 5,
    dtype=jnp.float64,
    mask: bool = True,
    random_carry: bool = True,
    loss: str = "xent",
    reduction: str = "mean",
    truncate: int | None = None,
    finite_differences: bool | None = None,
    key: jax.Array | None = None,
    compute_dtype=None,
) -> GradientReport:
    """Compare the hand-written gradients with autodiff (and finite differences) on random data.

    Draws random params, readout, inputs, targets, initial carry, mask (and, for
    ``path="unroll"``, random cotangents on ``hs`` and ``carry_T``), computes the gradient of
    every argument with the manual backward and with ``jax.grad`` / ``jax.vjp`` of the plain
    ``lax.scan`` reference, and reports the max normwise relative error per leaf.

    Args:
      model: the cell or model (:class:`~bptt_jax.Bidirectional`, :class:`~bptt_jax.Stack`)
        to check.
      path: ``"loss"`` checks :func:`bptt_jax.sequence_loss`; ``"unroll"`` checks
        :func:`bptt_jax.unroll` under a random output cotangent.
      backward: the hand-written path to check: ``"manual"`` or ``"checkpointed"``.
      seq_len, batch_size, input_size, output_size: T, B, D, O.
      dtype: ``jnp.float64`` (needs ``jax_enable_x64``) or ``jnp.float32``.
      mask: draw a random right-padding mask.
      random_carry: draw a random initial carry (else zeros).
      loss, reduction, truncate: passed to :func:`bptt_jax.sequence_loss`.
      finite_differences: also check a central finite difference of a random directional
        derivative per leaf; default: on for float64 without truncation (a truncated
        gradient is by design not the derivative of the loss; its reference is autodiff
        with ``lax.stop_gradient`` at the chunk boundaries).
      key: PRNG key; default ``jax.random.key(0)``.
      compute_dtype: a precision policy to check (:mod:`bptt_jax.precision`), e.g.
        ``jnp.bfloat16`` with ``dtype=jnp.float32``: the manual gradient under the policy
        is judged against autodiff of the same policy (``autodiff``, within
        ``policy_tolerances(compute_dtype)[1]``); its distance to autodiff in ``dtype``
        (``full_precision``) and a naive run in the compute dtype (``naive``) are reported
        beside, not judged (they measure the compute dtype's rounding, not the backward).

    Both gradients are computed with ``jax.default_matmul_precision("highest")``, so that
    on GPUs and TPUs too the matmuls are true float32 and the dtype's tolerance applies.

    Returns:
      A :class:`GradientReport`; ``report.passed`` says whether every error is within
      :data:`TOLERANCE` (under a policy, :func:`policy_tolerances`) and :data:`FD_TOLERANCE`.

    Example:
      >>> import jax, jax.numpy as jnp, bptt_jax
      >>> r = bptt_jax.check_gradients(bptt_jax.LSTM(8), dtype=jnp.float32)
      >>> r.passed
      True
    """
    fn = "check_gradients"
    dtype, cdt = _check_options(
        fn, path, backward, loss, dtype, compute_dtype, truncate, finite_differences,
        (seq_len, batch_size, input_size, output_size),
    )  # fmt: skip
    key = validation.check_key(fn, key)
    kp, kc, kv = jax.random.split(key, 3)
    problem = random_problem(
        model,
        kp,
        seq_len=seq_len,
        batch_size=batch_size,
        input_size=input_size,
        output_size=output_size,
        dtype=dtype,
        mask=mask,
        random_carry=random_carry,
        loss=loss,
    )
    if path == "loss":
        check = _loss_check(model, problem, loss, reduction, truncate)
    else:
        check = _unroll_check(model, problem, truncate, kc)
    # True float32 (or float64) matmuls on every backend: the tolerances are the dtype's,
    # and a GPU's default float32 matmul (TF32, ~1e-3 relative) would swamp them.
    with jax.default_matmul_precision("highest"):
        g_manual = check.grad(backward, cdt)(*check.args)
        g_auto = check.grad("autodiff", cdt)(*check.args)
    errors, fd_errors, full, naive = check.errors(g_manual, g_auto), {}, {}, {}
    tolerance, full_tolerance = TOLERANCE[dtype.name], 0.0
    if cdt is not None:
        full_tolerance, tolerance = policy_tolerances(cdt)
        with jax.default_matmul_precision("highest"):
            g_full = check.grad("autodiff", None)(*check.args)
            low = jax.tree.map(
                lambda a: a.astype(cdt) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                check.args,
            )
            g_naive = check.grad(backward, None)(*low)
        full, naive = check.errors(g_manual, g_full), check.errors(g_naive, g_full)
    if finite_differences is None:
        finite_differences = dtype == jnp.float64 and truncate is None and cdt is None
    if finite_differences:
        with jax.default_matmul_precision("highest"):
            fd_errors = _finite_difference_errors(
                check.make(backward, cdt), check.args, check.argnums, g_manual, check.names, kv
            )
    desc = (
        f"{model_name(model)} {path}{'' if backward == 'manual' else ' ' + backward} "
        f"{dtype.name} T={seq_len} B={batch_size} "
        f"mask={mask} carry0={'random' if random_carry else 'zero'}"
        + (f" loss={loss}/{reduction}" if path == "loss" else "")
        + (f" truncate={truncate}" if truncate else "")
        + (f" compute={cdt.name}" if cdt is not None else "")
    )
    return GradientReport(desc, errors, fd_errors, tolerance, full, naive, full_tolerance)


def _check_options(fn, path, backward, loss, dtype, compute_dtype, truncate, fd, sizes):
    """:func:`check_gradients`' arguments, checked: ``(dtype, compute dtype or None)``."""
    validation.check_choice(fn, "path", path, ("loss", "unroll"))
    validation.check_choice(fn, "backward", backward, ("manual", "checkpointed"))
    validation.check_choice(fn, "loss", loss, losses.LOSSES)
    for name, v in zip(("seq_len", "batch_size", "input_size", "output_size"), sizes):
        validation.check_positive(fn, name, v, kind=int, allow_none=False)
    output_size = sizes[3]
    if loss == "xent" and output_size < 2:
        raise ValueError(
            f"{fn}: output_size must be >= 2 for loss='xent'; got {output_size} (a softmax "
            "over one class is constant: every gradient would be 0 and any backward would pass)"
        )
    dtype = jnp.dtype(dtype)
    if dtype.name not in TOLERANCE:
        raise ValueError(
            f"{fn}: dtype must be one of {tuple(TOLERANCE)} (the params' dtype); got "
            f"{dtype.name}. For a bfloat16 or float16 check, give dtype=jnp.float32 and "
            f"compute_dtype={dtype.name!r} (the precision policy)"
        )
    cdt = precision.resolve(fn, compute_dtype, dtype)
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError(f"{fn}: dtype float64 needs jax.config.update('jax_enable_x64', True)")
    if fd and truncate is not None:
        raise ValueError(
            f"{fn}: finite_differences is undefined with truncate={truncate}: a truncated "
            "gradient is by design not the derivative of the loss (its reference is autodiff "
            "with stop_gradient at the cuts, which check_gradients runs)"
        )
    if fd and (dtype != jnp.float64 or cdt is not None):
        raise ValueError(
            f"{fn}: finite_differences needs dtype float64 and no compute_dtype (a central "
            f"difference in {(cdt or dtype).name} is all round-off at FD_TOLERANCE = "
            f"{FD_TOLERANCE}); got dtype {dtype.name}"
            + (f", compute_dtype {cdt.name}" if cdt is not None else "")
        )
    return dtype, cdt


class _Check(NamedTuple):
    """One checked function: ``make(gradient_path, compute_dtype)`` builds the scalar whose
    gradient with respect to ``args[argnums]`` (named ``names``) is compared."""

    make: Callable
    args: tuple
    argnums: tuple[int, ...]
    names: tuple[str, ...]

    def grad(self, gradient_path, compute_dtype):
        return jax.jit(jax.grad(self.make(gradient_path, compute_dtype), argnums=self.argnums))

    def errors(self, g, reference) -> dict[str, float]:
        """Leaf name -> relative error of ``g`` against ``reference``."""
        out = {}
        for i, gm, ga in zip(self.argnums, g, reference):
            lm, la = _named_leaves(gm, self.names[i]), _named_leaves(ga, self.names[i])
            out.update({name: relative_error(lm[name], la[name]) for name in lm})
        return out


def _loss_check(model, problem, loss, reduction, truncate) -> _Check:
    """:func:`bptt_jax.sequence_loss`, every differentiable argument."""
    params, readout, xs, targets, carry0, m = problem

    def make(gradient_path, compute_dtype):
        def f(p, ro, x, tg, c0):
            return losses.sequence_loss(
                model, p, ro, x, tg, c0, mask=m, loss=loss, reduction=reduction,
                truncate=truncate, backward=gradient_path, compute_dtype=compute_dtype,
            )  # fmt: skip

        return f

    argnums = (0, 1, 2, 3, 4) if loss == "mse" else (0, 1, 2, 4)
    names = ("params", "readout", "xs", "targets", "carry0")
    return _Check(make, (params, readout, xs, targets, carry0), argnums, names)


def _unroll_check(model, problem, truncate, key) -> _Check:
    """:func:`bptt_jax.unroll` under a random cotangent on ``(hs, carry_T)``: the gradient
    of ``<(hs, carry_T), cotangent>`` is the VJP."""
    params, _, xs, _, carry0, m = problem
    seq_len, batch_size = xs.shape[:2]
    k1, k2 = jax.random.split(key)
    ct_hs = jax.random.normal(k1, (seq_len, batch_size, output_size_of(model)), xs.dtype)
    ct_leaves, ct_def = jax.tree.flatten(carry0)
    ks = jax.random.split(k2, len(ct_leaves))
    ct_carry = jax.tree.unflatten(
        ct_def, [jax.random.normal(kk, c.shape, xs.dtype) for kk, c in zip(ks, ct_leaves)]
    )

    def make(gradient_path, compute_dtype):
        def f(p, x, c0):
            hs, c_t = engine.unroll(
                model, p, x, c0, mask=m, truncate=truncate, backward=gradient_path,
                compute_dtype=compute_dtype,
            )  # fmt: skip
            out, cts = jax.tree.leaves((hs, c_t)), jax.tree.leaves((ct_hs, ct_carry))
            return sum(jnp.vdot(a.astype(b.dtype), b) for a, b in zip(out, cts))

        return f

    return _Check(make, (params, xs, carry0), (0, 1, 2), ("params", "xs", "carry0"))


def _finite_difference_errors(f, args, argnums, grads, names, key) -> dict[str, float]:
    """Central differences of ``f`` along a random direction, one leaf at a time."""
    f = jax.jit(f)
    out = {}
    for j, (i, g) in enumerate(zip(argnums, grads)):
        leaves, tdef = jax.tree.flatten(args[i])
        g_leaves = jax.tree.leaves(g)
        for li, (leaf, gl) in enumerate(zip(leaves, g_leaves)):
            v = jax.random.normal(jax.random.fold_in(key, 100 * j + li), leaf.shape, leaf.dtype)

            def at(sign, leaves=leaves, li=li, v=v, i=i, tdef=tdef):
                moved = list(leaves)
                moved[li] = leaves[li] + sign * FD_EPS * v
                a = list(args)
                a[i] = jax.tree.unflatten(tdef, moved)
                return float(f(*a))

            fd = (at(1.0) - at(-1.0)) / (2 * FD_EPS)
            analytic = float(jnp.vdot(gl, v))
            name = list(_named_leaves(args[i], names[i]))[li]
            # v ~ N(0, I), so v.g ~ N(0, ||g||^2) and an error e in g shows as v.e ~ ||e||:
            # relative to ||g|| (a normwise error, like the autodiff check's), a direction
            # nearly orthogonal to g cannot pass off the loss's round-off as an error.
            scale = max(abs(analytic), float(jnp.linalg.norm(gl)), 1e-8)
            out[name] = abs(fd - analytic) / scale
    return out


def _cell_name(cell) -> str:
    if isinstance(cell, Elman):
        return f"Elman({cell.activation})"
    if isinstance(cell, LSTM):
        return "LSTM" + (f"(forget_bias={cell.forget_bias})" if cell.forget_bias else "")
    # a linear cell's scan when it is not the default (the rows of both scans differ by it)
    scan = getattr(cell, "scan", "auto") if protocol.is_linear(cell) else "auto"
    return type(cell).__name__ + ("" if scan == "auto" else f"({scan})")


def model_name(model) -> str:
    """A short description: ``LSTM``, ``Bi(GRU)``, ``Stack[LSTM, LSTM]``."""
    if isinstance(model, Stack):
        drop = f" dropout={model.dropout}" if model.dropout else ""
        return "Stack[" + ", ".join(model_name(layer) for layer in model.layers) + "]" + drop
    if isinstance(model, Bidirectional):
        f, b = model.forward, model.backward
        inner = _cell_name(f) if f == b else f"{_cell_name(f)}, {_cell_name(b)}"
        return f"Bi({inner}{'' if model.merge == 'concat' else ', ' + model.merge})"
    return _cell_name(model)
