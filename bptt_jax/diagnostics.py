"""Gradient-flow diagnostics: how far back in time the error of BPTT reaches.

Everything here is read off the hand-written backward (no autodiff of the model):

* :func:`gradient_flow` gives, per time step, ``||delta^h_t||`` (the error that reaches each
  hidden state, ``dL/dh_t`` in total), ``||dh_T/dh_t||`` (how much the last state depends on
  state t, independent of the loss) and one number, the effective horizon;
* :func:`jacobian_norms` and :func:`effective_horizon` give the last two alone, cheap enough
  to log from a training loop;
* :func:`spectral_norms` gives the largest singular value of the recurrent kernel, whole and
  per gate block;
* :func:`truncation_bias` compares truncated-k gradients with the full gradient over a sweep
  of k (cosine similarity and norm ratio).

Each takes a cell or a model (a :class:`~bptt_jax.Stack` or :class:`~bptt_jax.Bidirectional`).
For a model the results are per layer and direction, in the model's structure (as its params:
a tuple with one entry per layer for a Stack, a ``(forward, backward)`` pair for a
Bidirectional layer), each entry what the cell version computes for that cell inside the
model: its own states and carries, the error of the model's loss on its hidden states, time
indexed forward for both directions. :func:`truncation_bias` takes a Stack of cells (per
layer); truncation is undefined for bidirectional models.

``bptt-jax diagnose`` (:mod:`bptt_jax.cli.diagnose`) runs all of it on the adding problem
and plots it.

References:
  Werbos, "Backpropagation through time: what it does and how to do it", Proc. IEEE 1990.
  Bengio, Simard & Frasconi, "Learning long-term dependencies with gradient descent is
  difficult", IEEE Trans. Neural Networks 1994.
  Pascanu, Mikolov & Bengio, "On the difficulty of training recurrent neural networks",
  ICML 2013.
  Williams & Peng, "An efficient gradient-based algorithm for on-line training of recurrent
  network trajectories", Neural Computation 1990.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bptt_jax import _engine as engine
from bptt_jax import losses, precision, validation
from bptt_jax.cells import GRU, LSTM, Elman, protocol
from bptt_jax.models import Bidirectional, Stack, is_bidirectional

#: Probes per vectorised batch of reverse scans in :func:`jacobian_norms` (memory vs speed).
PROBE_BATCH = 16

#: Gate-block names of each cell's recurrent kernel, in the kernel's column order.
BLOCK_NAMES: dict[type, tuple[str, ...]] = {
    Elman: ("h",),
    LSTM: ("i", "f", "g", "o"),
    GRU: ("r", "z", "n"),
}


# ------------------------------------------------------------------------ the horizon
#: The horizon of a curve with a NaN or an infinite norm: undefined (see
#: :func:`horizon_from_norms`). The trainer logs it as ``null``.
UNDEFINED_HORIZON = -1


def horizon_from_norms(norms, fraction: float = 0.01) -> jax.Array:
    """The effective horizon of a curve of error norms over time.

    With ``n_s = norms[T-1-s]`` the norm ``s`` steps back from the last step and
    ``peak_s = max(n_0, ..., n_s)`` its running peak, the horizon is the smallest ``s`` with
    ``n_s < fraction * peak_s``: the number of most recent steps (the last one included) that
    the error reaches before it first falls below ``fraction`` of the largest it has been.
    If it never does (the error does not vanish within the sequence, e.g. it explodes), the
    horizon is ``T``, which then means "at least T". Two curves have no such step:

    * all zeros (no error reaches any step): the horizon is ``0``, no step reached;
    * a NaN or an infinite norm anywhere (a diverged run, an overflow): the horizon is
      undefined, :data:`UNDEFINED_HORIZON` (``-1``); no number of steps would be honest.

    Args:
      norms: ``(T,)`` or ``(T, B)``, e.g. :func:`jacobian_norms` or ``||delta^h_t||``.
      fraction: in ``(0, 1)``.

    Returns:
      int32 array: ``()`` for a ``(T,)`` curve, ``(B,)`` for ``(T, B)`` (one per column);
      values in ``[1, T]``, ``0`` for an all-zero curve, ``-1`` for one with NaN or inf.

    Example:
      >>> import jax.numpy as jnp
      >>> norms = 0.5 ** jnp.arange(10.0)[::-1]    # halves with every step back from T
      >>> int(horizon_from_norms(norms, fraction=0.1))   # 0.5**4 = 0.0625 < 0.1
      4
      >>> int(horizon_from_norms(2.0 ** jnp.arange(10.0)[::-1]))   # grows going back
      10
      >>> int(horizon_from_norms(jnp.zeros(10))), int(horizon_from_norms(jnp.full(10, jnp.nan)))
      (0, -1)
    """
    fraction = _check_fraction("horizon_from_norms", fraction)
    norms = validation.as_array("horizon_from_norms", "norms", norms)
    if norms.ndim not in (1, 2) or norms.shape[0] < 1:
        raise ValueError(
            f"horizon_from_norms: norms must have shape (T,) or (T, B) with T >= 1; "
            f"got {norms.shape}"
        )
    back = norms[::-1]  # s = 0, 1, ..., T-1 steps back from the last step
    peak = lax.cummax(back, axis=0)
    below = back < fraction * peak
    first = jnp.argmax(below, axis=0)
    horizon = jnp.where(jnp.any(below, axis=0), first, norms.shape[0])
    horizon = jnp.where(jnp.any(back != 0, axis=0), horizon, 0)  # all zero: reaches no step
    finite = jnp.all(jnp.isfinite(back), axis=0)
    return jnp.where(finite, horizon, UNDEFINED_HORIZON).astype(jnp.int32)


def _check_fraction(fn: str, fraction) -> float:
    """``fraction`` in (0, 1) (a Python, NumPy or JAX real scalar), as a Python float."""
    real = isinstance(fraction, int | float | np.integer | np.floating) or (
        isinstance(fraction, jax.Array)
        and not isinstance(fraction, jax.core.Tracer)  # a static value: not traced by jit
        and fraction.ndim == 0
    )
    if isinstance(fraction, bool) or not real or not 0 < float(fraction) < 1:
        raise ValueError(f"{fn}: fraction must be a number in (0, 1), e.g. 0.01; got {fraction!r}")
    return float(fraction)


def _check_probes(fn: str, probes, key):
    """Check ``probes`` and return ``key`` as a PRNG key (an int seed is made one)."""
    validation.check_positive(fn, "probes", probes, kind=int, allow_none=True)
    if probes is not None and key is None:
        raise ValueError(
            f"{fn}: key is required with probes={probes} (random probes); pass "
            "key=jax.random.key(0), or probes=None for the exact norm"
        )
    return None if key is None else validation.check_key(fn, key)


def _probe_norms(cell, probes, params, carry0, mask, resets, states, res, key, dtype):
    """``||dh_T/d carry_t||_F`` (T, B) of one cell from its forward's states and buffers."""
    # (B, H) per carry part, in the carry's dtype (the states may be in a compute dtype)
    zeros = jax.tree.map(lambda s, c: jnp.zeros(s.shape[1:], c.dtype), states, carry0)
    h, b = protocol.output_size(cell), jax.tree.leaves(states)[0].shape[1]
    if probes is None:  # the one-hot basis: the rows of every example's Jacobian
        vs = jnp.broadcast_to(jnp.eye(h, dtype=dtype)[:, None, :], (h, b, h))
    else:
        vs = jax.random.normal(key, (probes, b, h), dtype)

    def squared_norm(dstate):  # over every part of the carry: h, and c for the LSTM
        return sum(jnp.sum(g * g, axis=tuple(range(1, g.ndim))) for g in jax.tree.leaves(dstate))

    def one_probe(v):  # v (B, H): the error on carry t is v^T dh_T/d(carry_t), by hand
        dcarry = protocol.add_to_hidden(cell, zeros, v)
        _, _, sq = engine.scans(cell).reverse_scan(
            cell, params, engine.Steps(None, mask, resets), carry0, (states, res),
            (None, dcarry), engine.Backprop(keep_deltas=squared_norm),
        )  # fmt: skip
        return sq  # (T, B)

    sq = lax.map(one_probe, vs, batch_size=min(vs.shape[0], PROBE_BATCH))  # (P, T, B)
    total = jnp.sum(sq, axis=0) if probes is None else jnp.mean(sq, axis=0)
    return jnp.sqrt(total)


def _jacobian_norms_impl(cell, probes, params, xs, carry0, mask, resets, key):
    """``||dh_T/d carry_t||_F`` per step and example from one forward and P reverse scans."""
    steps = engine.Steps(xs, mask, resets)
    states, res, _ = engine.scans(cell).forward(cell, params, steps, carry0)
    dtype = jax.tree.leaves(carry0)[0].dtype  # the params' (xs may be in a compute dtype)
    return _probe_norms(cell, probes, params, carry0, mask, resets, states, res, key, dtype)


def _model_jacobian_norms_impl(model, probes, params, xs, carry0, mask, resets, key):
    """:func:`_jacobian_norms_impl` of every cell of a model, in the model's structure.

    One forward of the whole model (full BPTT's stored states), then each cell's probes on
    its own reverse scan; the reverse direction's in its own time, then put back in forward
    time. Cell i (in :func:`engine.cells_of` order) draws its probes from ``fold_in(key, i)``.
    """
    steps = engine.Steps(xs, mask, resets)
    per_saved = engine.model_forward(model, params, steps, carry0)[2].layers
    idx = engine.reversal(mask, xs.shape[0]) if is_bidirectional(model) else None
    ps, cs = engine.per_layer(model, params), engine.per_layer(model, carry0)
    out, i = [], 0

    def norms(cell, p, c, saved, r):
        nonlocal i
        k = None if key is None else jax.random.fold_in(key, i)
        i += 1
        return _probe_norms(cell, probes, p, c, mask, r, *saved, k, jax.tree.leaves(c)[0].dtype)

    for layer, p, c, saved in zip(engine.layers_of(model), ps, cs, per_saved):
        if isinstance(layer, Bidirectional):
            sf, sb = engine.by_direction(saved)
            f = norms(layer.forward, p[0], c[0], sf, None)
            b = norms(layer.backward, p[1], c[1], sb, None)
            out.append((f, engine.reverse_time(b, idx)))
        else:
            out.append(norms(layer, p, c, saved, resets))
    return engine.from_layers(model, out)


_jacobian_norms = jax.jit(_jacobian_norms_impl, static_argnums=(0, 1))
_model_jacobian_norms = jax.jit(_model_jacobian_norms_impl, static_argnums=(0, 1))


def _is_composite(model) -> bool:
    """A :class:`~bptt_jax.Stack` or :class:`~bptt_jax.Bidirectional` (not a bare cell)."""
    return isinstance(model, (Stack, Bidirectional))


def jacobian_norms(
    model,
    params,
    xs,
    carry0=None,
    *,
    mask=None,
    resets=None,
    probes: int | None = None,
    key: jax.Array | None = None,
    compute_dtype=None,
) -> jax.Array:
    """``||dh_T/dh_t||_F`` for every step t and example: how much the last state hears of h_t.

    ``dh_T/dh_t`` is the Jacobian of the final hidden state with respect to a perturbation
    of the carry after step t: ``h_t`` for Elman and GRU (``(H, H)``), and for the LSTM both
    ``h_t`` and its memory ``c_t`` (``(H, 2H)``; the LSTM keeps what it remembers in ``c``,
    which a perturbation of ``h_t`` alone would miss). Its rows are what the hand-written
    backward carries back from a probe ``v`` on ``h_T``: the error on the carry at step t
    for the loss ``v . h_T``. It depends on the params and inputs only, not on a loss or
    readout. ``t = T-1`` gives ``||I|| = sqrt(H)`` (``h_T`` does not depend on ``c_T``).

    For a model (a :class:`~bptt_jax.Stack` or :class:`~bptt_jax.Bidirectional`), per layer
    and direction: each cell's ``||dh_T/d carry_t||_F`` for its own final state and its own
    carries, on the inputs it sees inside the model (the previous layer's outputs). A
    perturbation of a cell's carry reaches that cell's final state through its own recurrence
    only, so this is the whole derivative. For the reverse direction of a Bidirectional layer
    ``h_T`` is its final carry (its state after reading ``x_0``, PyTorch's ``h_n``) and ``t``
    the step in forward time (its state after reading ``x_t``): the norm grows from
    ``sqrt(H)`` at ``t = 0`` towards later steps. Layers take no dropout (evaluation).

    Args:
      model: a cell (:class:`~bptt_jax.Elman`, :class:`~bptt_jax.LSTM`,
        :class:`~bptt_jax.GRU`), a :class:`~bptt_jax.Stack` or a :class:`~bptt_jax.Bidirectional`.
      params, xs, carry0, mask, resets: as in :func:`bptt_jax.unroll`. With a mask, ``h_T``
        is each sequence's last valid state and padded steps pass it on unchanged (norm
        ``sqrt(H)`` there, in either direction); a reset at step t cuts every Jacobian
        across it to 0.
      probes: ``None`` (default): exact, with the ``H`` one-hot probes (``||J||_F^2`` is
        the sum of its squared rows), so H reverse scans. An int P: the Hutchinson estimate
        ``sqrt(mean_p ||v_p^T J||^2)`` with P Gaussian probes ``v_p ~ N(0, I)``, whose
        square is unbiased with relative standard deviation at most ``sqrt(2 / P)``; P
        reverse scans.
      key: PRNG key for the random probes (required when ``probes`` is an int). For a
        model, cell i (layer by layer, forward direction first) uses ``fold_in(key, i)``.
      compute_dtype: a precision policy (:mod:`bptt_jax.precision`), as in
        :func:`bptt_jax.unroll`: the Jacobians of the model as it runs under it.

    Returns:
      ``(T, B)`` in the params' dtype; for a model, one such array per cell in the model's
      structure: a tuple with one entry per layer for a Stack, a ``(forward, backward)``
      pair for a Bidirectional layer (both in forward time), like its params.

    Cost: one forward scan plus ``H`` (exact) or ``P`` reverse scans over the batch, run 16
    at a time under ``vmap`` (no weight-gradient matmuls); for a model, one forward of the
    model and each cell's reverse scans.

    Example:
      >>> import jax, bptt_jax
      >>> from bptt_jax.diagnostics import jacobian_norms
      >>> cell = bptt_jax.GRU(8)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> xs = jax.random.normal(jax.random.key(1), (20, 4, 3))
      >>> norms = jacobian_norms(cell, params, xs)
      >>> norms.shape, round(float(norms[-1, 0]) ** 2, 3)    # ||I||^2 = H at t = T-1
      ((20, 4), 8.0)
      >>> bi = bptt_jax.Bidirectional(cell)
      >>> fwd, bwd = jacobian_norms(bi, bi.init(jax.random.key(0), 3), xs)
      >>> fwd.shape, round(float(bwd[0, 0]) ** 2, 3)   # the reverse direction ends at t = 0
      ((20, 4), 8.0)
    """
    fn = "jacobian_norms"
    if _is_composite(model):
        xs, carry0, mask, resets, _ = validation.check_model_args(
            fn, model, params, xs, carry0, mask, None, resets
        )
        key = _check_probes(fn, probes, key)
        xs = _in_compute_dtype(fn, xs, compute_dtype)
        return _model_jacobian_norms(model, probes, params, xs, carry0, mask, resets, key)
    xs, carry0, mask, _ = validation.check_unroll_args(fn, model, params, xs, carry0, mask, None)
    resets = validation.check_mask(fn, resets, *xs.shape[:2], name="resets")
    key = _check_probes(fn, probes, key)
    xs = _in_compute_dtype(fn, xs, compute_dtype)
    return _jacobian_norms(model, probes, params, xs, carry0, mask, resets, key)


def _compute_name(fn: str, xs, compute_dtype) -> str | None:
    """The policy's compute dtype (by name, a static argument), checked; ``None``: none.
    ``xs`` has the params' dtype here (checked)."""
    cdt = precision.resolve(fn, compute_dtype, xs.dtype)
    return None if cdt is None else cdt.name


def _in_compute_dtype(fn: str, xs, compute_dtype):
    cdt = _compute_name(fn, xs, compute_dtype)
    return xs if cdt is None else xs.astype(cdt)


def effective_horizon(
    model,
    params,
    xs,
    carry0=None,
    *,
    mask=None,
    resets=None,
    fraction: float = 0.01,
    probes: int | None = None,
    key: jax.Array | None = None,
    compute_dtype=None,
) -> jax.Array:
    """The number of steps back from T that the recurrence carries the error.

    ``horizon_from_norms(jacobian_norms(...).mean(axis=1), fraction)``: the batch-mean
    ``||dh_T/dh_t||_F``, counted back from the last step until it first falls below
    ``fraction`` of its running peak (see :func:`horizon_from_norms`); ``T`` if it never does,
    ``0`` if the norms are all zero, ``-1`` (:data:`UNDEFINED_HORIZON`) if one is NaN or inf.
    Meant for logging from a training loop on a small sub-batch with a few random probes.
    For a model, per layer and direction: the horizon of each cell's own Jacobian norms (see
    :func:`jacobian_norms`; for a reverse direction, the steps forward from ``t = 0`` that
    its final state hears of).

    Args:
      model, params, xs, carry0, mask, resets, probes, key, compute_dtype: as in
        :func:`jacobian_norms`.
      fraction: in ``(0, 1)``; default 0.01.

    Returns:
      int32 array ``()`` in ``[1, T]`` (``0``, ``-1``: see above); for a model, one per cell
      in the model's structure (as :func:`jacobian_norms`).

    Example:
      >>> import jax, bptt_jax
      >>> from bptt_jax.diagnostics import effective_horizon
      >>> cell = bptt_jax.Elman(16)
      >>> params = cell.init(jax.random.key(0), input_size=2)
      >>> xs = jax.random.normal(jax.random.key(1), (40, 4, 2))
      >>> int(effective_horizon(cell, params, xs, probes=8, key=jax.random.key(2))) < 40
      True
    """
    fraction = _check_fraction("effective_horizon", fraction)
    norms = jacobian_norms(
        model, params, xs, carry0, mask=mask, resets=resets, probes=probes, key=key,
        compute_dtype=compute_dtype,
    )  # fmt: skip
    return jax.tree.map(lambda n: _horizon(n, fraction), norms)


def _horizon(norms, fraction):
    """The horizon of the batch mean of ``norms`` (T, B), read back from ``t = T-1``."""
    return horizon_from_norms(jnp.mean(norms, axis=1), fraction)


# ------------------------------------------------------------------- gradient flow
class GradientFlow(NamedTuple):
    """What :func:`gradient_flow` returns (T steps, B examples)."""

    value: jax.Array  # () the loss L
    delta_norms: jax.Array  # (T, B) ||delta^h_t|| = ||dL/dh_t|| per example (after delta_clip)
    delta_norm: jax.Array  # (T,) batch mean of delta_norms
    jacobian_norms: jax.Array  # (T, B) ||dh_T/dh_t||_F per example
    jacobian_norm: jax.Array  # (T,) batch mean of jacobian_norms
    horizon: jax.Array  # () int32: horizon_from_norms(jacobian_norm, fraction); -1: NaN/inf


def gradient_flow(
    model,
    params,
    readout: losses.ReadoutParams,
    xs,
    targets,
    carry0=None,
    *,
    mask=None,
    loss_mask=None,
    resets=None,
    loss: str = "xent",
    reduction: str = "mean",
    delta_clip: float | None = None,
    fraction: float = 0.01,
    probes: int | None = None,
    key: jax.Array | None = None,
    compute_dtype=None,
) -> GradientFlow:
    """How the error of BPTT travels back in time, per step, for one batch.

    * ``delta_norms[t, b] = ||delta^h_t||``, the error reaching hidden state t in total
      (``dL/dh_t`` from the readout at step t and from every later step through the
      recurrence), exactly what the hand-written reverse scan carries (after ``delta_clip``
      when set, so the effect of clipping is visible). For a loss on the last step only
      (``loss_mask``), its decay going back is the vanishing gradient itself.
    * ``jacobian_norms[t, b] = ||dh_T/dh_t||_F`` (see :func:`jacobian_norms`): the same
      question without the loss, and ``horizon``, one number from it
      (:func:`horizon_from_norms` of the batch mean).

    For a model (a :class:`~bptt_jax.Stack` or :class:`~bptt_jax.Bidirectional`), per layer
    and direction: one :class:`GradientFlow` per cell, in the model's structure (a tuple with
    one entry per layer for a Stack, a ``(forward, backward)`` pair for a Bidirectional
    layer, like its params). Each cell's ``delta_norms[t, b] = ||dL/dh_t||`` is the total
    error of the model's loss on that cell's hidden state at step t (through the layers above
    it and its own recurrence; what its reverse scan carries, after ``delta_clip``), its
    ``jacobian_norms`` and ``horizon`` those of :func:`jacobian_norms` for that cell. Both are
    in forward time for a reverse direction (its error flows from ``t = 0`` towards later
    steps, so its vanishing shows going forward). ``value`` is the model's loss in every
    entry. Layers take no dropout (evaluation).

    Args:
      model, params, readout, xs, targets, carry0, mask, loss_mask, resets, loss, reduction,
        delta_clip, compute_dtype: as in :func:`bptt_jax.sequence_loss`.
      fraction: the horizon's threshold, in ``(0, 1)``; default 0.01.
      probes, key: as in :func:`jacobian_norms` (default: exact).

    Returns:
      A :class:`GradientFlow`; for a model, one per cell in the model's structure.

    Cost: one forward and backward (as ``jax.grad`` of the loss) and one more backward that
    keeps the errors, then one forward and ``H`` (or ``probes``) reverse scans per cell for
    the Jacobian norms.

    Example:
      >>> import jax, jax.numpy as jnp, bptt_jax
      >>> from bptt_jax.diagnostics import gradient_flow
      >>> cell = bptt_jax.LSTM(8, forget_bias=1.0)
      >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
      >>> params, ro = cell.init(k1, 3), bptt_jax.init_readout(k2, 8, 4)
      >>> xs, ys = jax.random.normal(k3, (30, 2, 3)), jnp.ones((30, 2), jnp.int32)
      >>> last = jnp.arange(30)[:, None] == 29             # loss on the last step only
      >>> flow = gradient_flow(cell, params, ro, xs, ys, loss_mask=jnp.broadcast_to(last, (30, 2)))
      >>> flow.delta_norm.shape, flow.jacobian_norms.shape, flow.horizon.dtype
      ((30,), (30, 2), dtype('int32'))
      >>> bool(flow.delta_norm[0] < flow.delta_norm[-1])  # the error vanishes going back
      True
      >>> model = bptt_jax.stacked(cell, num_layers=2)
      >>> flows = gradient_flow(model, model.init(k1, 3), ro, xs, ys)
      >>> len(flows), flows[1].delta_norms.shape         # one GradientFlow per layer
      (2, (30, 2))
    """
    fn = "gradient_flow"
    fraction = _check_fraction(fn, fraction)
    key = _check_probes(fn, probes, key)
    # the loss's own checks (targets' range, delta_clip, readout) before jit: inside it the
    # targets are traced and delta_clip is a static argument
    losses.check_loss_args(
        fn, model, params, readout, xs, targets, carry0, mask, loss_mask, resets, loss,
        reduction, None, delta_clip, compute_dtype,
    )  # fmt: skip
    if _is_composite(model):
        xs, carry0, mask, resets, _ = validation.check_model_args(
            fn, model, params, xs, carry0, mask, None, resets
        )
    else:
        xs, carry0, mask, _ = validation.check_unroll_args(
            fn, model, params, xs, carry0, mask, None
        )
        resets = validation.check_mask(fn, resets, *xs.shape[:2], name="resets")
    loss_mask = validation.check_mask(fn, loss_mask, *xs.shape[:2], name="loss_mask")
    cdt = _compute_name(fn, xs, compute_dtype)
    return _gradient_flow(
        model, loss, reduction, delta_clip, probes, fraction, cdt,
        params, readout, xs, targets, carry0, mask, loss_mask, resets, key,
    )  # fmt: skip


@partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6))
def _gradient_flow(
    model, loss, reduction, delta_clip, probes, fraction, cdt,
    params, readout, xs, targets, carry0, mask, loss_mask, resets, key,
):  # fmt: skip
    out = losses.loss_and_grads(
        model, params, readout, xs, targets, carry0,
        mask=mask, loss_mask=loss_mask, resets=resets, loss=loss, reduction=reduction,
        delta_clip=delta_clip, return_deltas=True, compute_dtype=cdt,
    )  # fmt: skip
    xs = xs if cdt is None else xs.astype(cdt)
    if _is_composite(model):
        jac = _model_jacobian_norms_impl(model, probes, params, xs, carry0, mask, resets, key)
        return jax.tree.map(lambda d, j: _flow(out.value, d, j, fraction), out.deltas, jac)
    jac = _jacobian_norms_impl(model, probes, params, xs, carry0, mask, resets, key)
    return _flow(out.value, out.deltas, jac, fraction)


def _flow(value, deltas, jac, fraction) -> GradientFlow:
    """One cell's :class:`GradientFlow` from its deltas (T, B, H) and Jacobian norms."""
    delta_norms = jnp.linalg.norm(deltas, axis=-1)
    jac_mean = jnp.mean(jac, axis=1)
    return GradientFlow(
        value,
        delta_norms,
        jnp.mean(delta_norms, axis=1),
        jac,
        jac_mean,
        horizon_from_norms(jac_mean, fraction),
    )


# -------------------------------------------------------------------- spectral norms
class SpectralNorms(NamedTuple):
    """What :func:`spectral_norms` returns."""

    kernel: jax.Array  # () largest singular value of the whole recurrent kernel (H, G*H)
    blocks: dict[str, jax.Array]  # gate name -> () largest singular value of its (H, H) block


def spectral_norms(model, params) -> SpectralNorms:
    """The largest singular value of the recurrent kernel, whole and per gate block.

    For the Elman cell, ``||dh_t/dh_{t-1}|| <= sigma_max(W_hh) max|f'|``, so
    ``sigma_max < 1`` (tanh) guarantees vanishing errors; ``> 1`` is necessary, not
    sufficient, for exploding ones (Pascanu et al. 2013). For gated cells the block of the
    candidate (LSTM ``g``, GRU ``n``) plays that role, modulated by the gates.

    Args:
      model: a :class:`~bptt_jax.Elman`, :class:`~bptt_jax.LSTM` or :class:`~bptt_jax.GRU`
        cell, or a :class:`~bptt_jax.Stack` or :class:`~bptt_jax.Bidirectional` of them.
      params: its params.

    Returns:
      A :class:`SpectralNorms`; ``blocks`` keys are the gate names in column order: ``h``
      (Elman), ``i, f, g, o`` (LSTM), ``r, z, n`` (GRU). For a model, one per cell in the
      model's structure (a tuple with one entry per layer for a Stack, a ``(forward,
      backward)`` pair for a Bidirectional layer, like its params).

    Example:
      >>> import jax, bptt_jax
      >>> from bptt_jax.diagnostics import spectral_norms
      >>> cell = bptt_jax.LSTM(16, init_scheme="orthogonal")
      >>> s = spectral_norms(cell, cell.init(jax.random.key(0), input_size=4))
      >>> list(s.blocks), round(float(s.blocks["f"]), 4), round(float(s.kernel), 4)
      (['i', 'f', 'g', 'o'], 1.0, 2.0)
      >>> model = bptt_jax.stacked(cell, num_layers=2, bidirectional=True)
      >>> s = spectral_norms(model, model.init(jax.random.key(0), input_size=4))
      >>> round(float(s[1][0].blocks["f"]), 4)    # layer 1, forward direction
      1.0
    """
    fn = "spectral_norms"
    validation.check_fast_cells(fn, model, "the spectral norms of a recurrent kernel")
    if _is_composite(model):
        return _per_cell(fn, model, params, _spectral_norms)
    validation.check_cell(fn, model)
    validation.check_params(fn, model, params)
    return _spectral_norms(model, params)


def _per_cell(fn: str, model, params, f):
    """``f(cell, cell_params)`` for every cell of ``model``, in the model's structure; each
    cell's params are checked first (errors name them, e.g. ``params[1][0]``)."""
    stack = isinstance(model, Stack)
    layers = engine.layers_of(model)
    ps = (
        validation.check_tuple(fn, "params", params, len(layers), "one params entry per layer")
        if stack
        else (params,)
    )
    out = []
    for k, (layer, p) in enumerate(zip(layers, ps)):
        where = f"params[{k}]" if stack else "params"
        if isinstance(layer, Bidirectional):
            pair = validation.check_tuple(fn, where, p, 2, "the (forward, backward) params")
            entry = []
            for d, (cell, q) in enumerate(zip(layer.cells, pair)):
                validation.check_params(fn, cell, q, f"{where}[{d}]")
                entry.append(f(cell, q))
            out.append(tuple(entry))
        else:
            validation.check_params(fn, layer, p, where)
            out.append(f(layer, p))
    return engine.from_layers(model, out)


def _spectral_norms(cell, params) -> SpectralNorms:
    w = cell.recurrent_kernel(params)
    h = cell.hidden_size

    def sigma_max(a):
        return jnp.linalg.svd(a, compute_uv=False)[0]

    names = BLOCK_NAMES.get(type(cell)) or tuple(str(i) for i in range(cell.n_blocks))
    blocks = {n: sigma_max(w[:, i * h : (i + 1) * h]) for i, n in enumerate(names)}
    return SpectralNorms(sigma_max(w), blocks)


# ------------------------------------------------------------------- truncation bias
class TruncationBias(NamedTuple):
    """What :func:`truncation_bias` returns (K truncation lengths)."""

    ks: jax.Array  # (K,) int32, the truncation lengths k
    cosine: jax.Array  # (K,) cos(g_k, g): 1 means the truncated gradient points the same way
    norm_ratio: jax.Array  # (K,) ||g_k|| / ||g||
    full_norm: jax.Array  # () ||g||, the full-BPTT gradient's norm


def _flat(tree) -> jax.Array:
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


@partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _truncation_bias(cell, ks, loss, reduction, cdt, params, readout, xs, targets, carry0, mask,
                     loss_mask, resets):  # fmt: skip
    # The error arriving at each h_t from outside the recurrence (the readout): what the
    # reverse scan carries when every carry is cut, i.e. the deltas of truncate=1.
    dhs = losses.loss_and_grads(
        cell, params, readout, xs, targets, carry0,
        mask=mask, loss_mask=loss_mask, resets=resets, loss=loss, reduction=reduction,
        truncate=1, return_deltas=True, compute_dtype=cdt,
    ).deltas  # fmt: skip
    xs = xs if cdt is None else xs.astype(cdt)
    steps = engine.Steps(xs, mask, resets)
    states, res, carry_t = engine.scans(cell).forward(cell, params, steps, carry0)
    zeros = jax.tree.map(jnp.zeros_like, carry_t)
    t = np.arange(xs.shape[0])
    # One reverse scan per k, all in one program: k only changes which carries are cut.
    cuts = np.stack([(t % k == 0) & (t > 0) for k in (*ks, xs.shape[0])])  # last: full BPTT

    def grads(cut):
        g = engine.scans(cell).backward(
            cell, params, steps, carry0, (states, res), (dhs, zeros), engine.Backprop(cut)
        )
        return _flat(g[0])

    g = lax.map(grads, jnp.asarray(cuts), batch_size=min(len(cuts), PROBE_BATCH))  # (K+1, N)
    return _bias(ks, g)


def _bias(ks, g) -> TruncationBias:
    """The :class:`TruncationBias` of the gradients ``g`` (K+1, N): ``g[:-1]`` truncated at
    each k, ``g[-1]`` full BPTT."""
    g, full = g[:-1], g[-1]
    full_norm = jnp.linalg.norm(full)
    norms = jnp.linalg.norm(g, axis=1)
    denom = norms * full_norm
    cosine = jnp.where(denom > 0, (g @ full) / jnp.where(denom > 0, denom, 1), 0)
    cosine = jnp.where(jnp.isnan(denom), jnp.nan, cosine)  # a NaN gradient is no 0 cosine
    ratio = norms / jnp.where(full_norm > 0, full_norm, 1)
    return TruncationBias(jnp.asarray(ks, jnp.int32), cosine, ratio, full_norm)


@partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _model_truncation_bias(model, ks, loss, reduction, params, readout, xs, targets, carry0,
                           mask, valid, resets):  # fmt: skip
    # One forward of the stack and the readout's error on its outputs (independent of k);
    # then one backward of every layer per k, each layer's carries cut at the same steps.
    # (xs arrives in the compute dtype under a policy.)
    head = losses.LossHead(loss, reduction)
    steps, inputs = engine.Steps(xs, mask, resets), engine.HeadInputs(readout, targets, valid)
    hs, carry_t, saved = engine.model_forward(model, params, steps, carry0)
    _, dy = head.forward(inputs, hs)
    dhs, _, _ = head.backward(inputs, hs, dy, jnp.ones((), readout.b_y.dtype))
    zeros = jax.tree.map(jnp.zeros_like, carry_t)
    t = np.arange(xs.shape[0])
    cuts = np.stack([(t % k == 0) & (t > 0) for k in (*ks, xs.shape[0])])  # last: full BPTT

    def grads(cut):
        dparams, _, _, _ = engine.model_backward(
            model, params, steps, carry0, saved, (dhs, zeros), engine.Backprop(cut)
        )
        return tuple(_flat(g) for g in engine.per_layer(model, dparams))

    g = lax.map(grads, jnp.asarray(cuts), batch_size=min(len(cuts), PROBE_BATCH))
    return engine.from_layers(model, [_bias(ks, g_layer) for g_layer in g])


def truncation_bias(
    model,
    params,
    readout: losses.ReadoutParams,
    xs,
    targets,
    carry0=None,
    *,
    ks,
    mask=None,
    loss_mask=None,
    resets=None,
    loss: str = "xent",
    reduction: str = "mean",
    compute_dtype=None,
) -> TruncationBias:
    """How far truncated-k gradients are from the full-BPTT gradient, for a sweep of k.

    ``g`` is the gradient of the loss with respect to the cell's params (all leaves flattened
    into one vector; the readout's gradient does not depend on truncation and is left out),
    by full BPTT; ``g_k`` the same with ``truncate=k`` (chunks ``[0, k), [k, 2k), ...``, see
    :func:`bptt_jax.sequence_loss`). Returns ``cos(g_k, g) = <g_k, g> / (||g_k|| ||g||)``
    and ``||g_k|| / ||g||``; ``k >= T`` gives exactly 1 and 1. A cosine of 0 (not NaN) is
    returned when either gradient is zero.

    For a :class:`~bptt_jax.Stack` of cells, per layer: ``truncate=k`` cuts every layer's
    carries at the same steps (as :func:`bptt_jax.sequence_loss` does), and layer l's entry
    compares the truncated and full gradients of the loss with respect to layer l's params.
    The whole model's numbers follow from the layers': with ``n_l = full_norm_l`` and
    ``r_l, c_l`` its ``norm_ratio`` and ``cosine``, ``||g|| = sqrt(sum_l n_l^2)``,
    ``||g_k|| = sqrt(sum_l (r_l n_l)^2)`` and ``<g_k, g> = sum_l c_l r_l n_l^2``. Layers
    take no dropout (evaluation). Truncation is undefined for a bidirectional model (a
    :class:`~bptt_jax.Bidirectional`, or a Stack with one): ``ValueError``.

    Args:
      model, params, readout, xs, targets, carry0, mask, loss_mask, resets, loss, reduction,
        compute_dtype: as in :func:`bptt_jax.sequence_loss`.
      ks: a non-empty sequence of positive ints, the truncation lengths.

    Returns:
      A :class:`TruncationBias`; for a Stack, one per layer (a tuple).

    Cost: two forward scans, ``len(ks) + 2`` reverse scans and ``len(ks) + 1`` sets of
    weight-gradient matmuls, all compiled as one program (one compile per tuple of ks); for
    a Stack, one forward of the model and ``len(ks) + 1`` backwards of every layer.

    Example:
      >>> import jax, jax.numpy as jnp, bptt_jax
      >>> from bptt_jax.diagnostics import truncation_bias
      >>> cell = bptt_jax.Elman(8)
      >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
      >>> params, ro = cell.init(k1, 3), bptt_jax.init_readout(k2, 8, 4)
      >>> xs, ys = jax.random.normal(k3, (16, 2, 3)), jnp.ones((16, 2), jnp.int32)
      >>> bias = truncation_bias(cell, params, ro, xs, ys, ks=[1, 4, 16])
      >>> bias.ks.tolist(), [round(float(c), 4) for c in bias.cosine][-1]
      ([1, 4, 16], 1.0)
    """
    fn = "truncation_bias"
    if isinstance(ks, jax.Array) and not isinstance(ks, jax.core.Tracer):
        ks = np.asarray(ks)  # static values: each k is its own truncation
    if isinstance(ks, int) or not hasattr(ks, "__len__") or len(ks) == 0:
        raise ValueError(f"{fn}: ks must be a non-empty sequence of positive ints; got {ks!r}")
    ks = [
        validation.check_positive(fn, f"ks[{i}]", int(k) if isinstance(k, np.integer) else k, int)
        for i, k in enumerate(ks)
    ]
    if _is_composite(model):
        if is_bidirectional(model):
            what = (
                "Stack with a Bidirectional layer" if isinstance(model, Stack) else "Bidirectional"
            )
            raise ValueError(
                f"{fn}: model is bidirectional (a {what}); truncation is undefined for it (its "
                "reverse direction needs the whole future of every step); use a Stack of cells"
            )
        xs, targets, carry0, mask, valid, resets, _ = losses.check_loss_args(
            fn, model, params, readout, xs, targets, carry0, mask, loss_mask, resets, loss,
            reduction, None, None, compute_dtype,
        )  # fmt: skip
        return _model_truncation_bias(
            model, tuple(ks), loss, reduction,
            params, readout, xs, targets, carry0, mask, valid, resets,
        )  # fmt: skip
    losses.check_loss_args(  # the loss's own checks (targets' range) before jit
        fn, model, params, readout, xs, targets, carry0, mask, loss_mask, resets, loss,
        reduction, None, None, compute_dtype,
    )  # fmt: skip
    xs, carry0, mask, _ = validation.check_unroll_args(fn, model, params, xs, carry0, mask, None)
    resets = validation.check_mask(fn, resets, *xs.shape[:2], name="resets")
    loss_mask = validation.check_mask(fn, loss_mask, *xs.shape[:2], name="loss_mask")
    return _truncation_bias(
        model, tuple(ks), loss, reduction, _compute_name(fn, xs, compute_dtype),
        params, readout, xs, targets, carry0, mask, loss_mask, resets,
    )  # fmt: skip
