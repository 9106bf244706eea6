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

``bptt-jax diagnose [CONFIG] [KEY=VALUE ...]`` (default ``configs/diagnose.toml``) trains
Elman, LSTM and GRU briefly on the adding problem and writes plots of all of it, an exploding
case with and without per-step clipping of ``delta^h_t``, and a text summary.

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

import dataclasses
import json
import math
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bptt_jax import _engine as engine
from bptt_jax import config, losses, precision, validation
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
        _, _, sq = engine.reverse_scan(
            cell, params, carry0, mask, states, res, None, dcarry, None,
            resets=resets, keep_deltas=squared_norm,
        )  # fmt: skip
        return sq  # (T, B)

    sq = lax.map(one_probe, vs, batch_size=min(vs.shape[0], PROBE_BATCH))  # (P, T, B)
    total = jnp.sum(sq, axis=0) if probes is None else jnp.mean(sq, axis=0)
    return jnp.sqrt(total)


def _jacobian_norms_impl(cell, probes, params, xs, carry0, mask, resets, key):
    """``||dh_T/d carry_t||_F`` per step and example from one forward and P reverse scans."""
    states, res, _ = engine.forward(cell, params, xs, carry0, mask, resets=resets)
    dtype = jax.tree.leaves(carry0)[0].dtype  # the params' (xs may be in a compute dtype)
    return _probe_norms(cell, probes, params, carry0, mask, resets, states, res, key, dtype)


def _model_jacobian_norms_impl(model, probes, params, xs, carry0, mask, resets, key):
    """:func:`_jacobian_norms_impl` of every cell of a model, in the model's structure.

    One forward of the whole model (full BPTT's stored states), then each cell's probes on
    its own reverse scan; the reverse direction's in its own time, then put back in forward
    time. Cell i (in :func:`engine.cells_of` order) draws its probes from ``fold_in(key, i)``.
    """
    _, _, (per_saved, _) = engine.model_forward(model, params, xs, carry0, mask, resets, None)
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
            sf, sb = engine.directions(saved)
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
    losses._check_loss_args(
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
        validation._check_tuple(fn, "params", params, len(layers), "one params entry per layer")
        if stack
        else (params,)
    )
    out = []
    for k, (layer, p) in enumerate(zip(layers, ps)):
        where = f"params[{k}]" if stack else "params"
        if isinstance(layer, Bidirectional):
            pair = validation._check_tuple(fn, where, p, 2, "the (forward, backward) params")
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
    states, res, carry_t = engine.forward(cell, params, xs, carry0, mask, resets=resets)
    zeros = jax.tree.map(jnp.zeros_like, carry_t)
    t = np.arange(xs.shape[0])
    # One reverse scan per k, all in one program: k only changes which carries are cut.
    cuts = np.stack([(t % k == 0) & (t > 0) for k in (*ks, xs.shape[0])])  # last: full BPTT

    def grads(cut):
        _, dcols, _ = engine.reverse_scan(
            cell, params, carry0, mask, states, res, dhs, zeros, cut, resets=resets
        )
        return _flat(engine.weight_grads(cell, params, xs, carry0, states, dcols, resets)[0])

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
    hs, carry_t, saved = engine.model_forward(model, params, xs, carry0, mask, resets, None)
    _, dy = head.forward(readout, hs, targets, valid)
    dhs, _, _ = head.backward(readout, hs, dy, jnp.ones((), readout.b_y.dtype))
    zeros = jax.tree.map(jnp.zeros_like, carry_t)
    t = np.arange(xs.shape[0])
    cuts = np.stack([(t % k == 0) & (t > 0) for k in (*ks, xs.shape[0])])  # last: full BPTT

    def grads(cut):
        dparams, _, _, _ = engine.model_backward(
            model, params, xs, carry0, mask, resets, None, saved, dhs, zeros, cut
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
        xs, targets, carry0, mask, valid, resets, _ = losses._check_loss_args(
            fn, model, params, readout, xs, targets, carry0, mask, loss_mask, resets, loss,
            reduction, None, None, compute_dtype,
        )  # fmt: skip
        return _model_truncation_bias(
            model, tuple(ks), loss, reduction,
            params, readout, xs, targets, carry0, mask, valid, resets,
        )  # fmt: skip
    losses._check_loss_args(  # the loss's own checks (targets' range) before jit
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


# ====================================================================================
# ``bptt-jax diagnose``: plots and a summary for Elman, LSTM and GRU on the adding problem
# ====================================================================================
CellName = Literal["elman", "lstm", "gru"]


@dataclasses.dataclass(frozen=True)
class Task:
    """The adding problem (Hochreiter & Schmidhuber 1997), loss on the last step only.

    Inputs ``(T, B, 2)``: a value ``U(0, 1)`` and a marker that is 1 at one step in the first
    half and one in the second; the target at the last step is the sum of the two marked
    values (mse, readout size 1). Predicting the mean scores mse 1/6 ~ 0.167; doing better
    needs the error to reach at least T/2 steps back.
    """

    T: int = 50  # sequence length
    batch: int = 32  # examples per training step and in the diagnosed batch


@dataclasses.dataclass(frozen=True)
class Model:
    hidden: int = 32  # H, the same for the three cells
    init: Literal["uniform", "orthogonal"] = "uniform"
    forget_bias: float = 1.0  # LSTM


@dataclasses.dataclass(frozen=True)
class Train:
    """The short training run between the two diagnoses: Adam on a fresh batch per step."""

    steps: int = 300
    lr: float = 0.01
    clip: float = 1.0  # optax.clip_by_global_norm threshold
    log_every: int = 50  # print loss, pre-clip gradient norm and horizon every this many steps


@dataclasses.dataclass(frozen=True)
class Exploding:
    """An Elman (tanh) network with ``W_hh ~ N(0, gain^2 / H)`` (spectral radius ~ gain)."""

    gain: float = 3.0
    delta_clip: float = 1.0  # per-step clipping threshold for delta^h_t


@dataclasses.dataclass(frozen=True)
class Truncation:
    # With the loss on the last step only, truncate=k sees the last chunk, T - k*((T-1)//k)
    # steps: ks that divide T keep that equal to k.
    ks: tuple[int, ...] = (1, 2, 5, 10, 25, 50)


@dataclasses.dataclass(frozen=True)
class DiagnoseConfig:
    """Everything ``bptt-jax diagnose`` runs."""

    out: str = "results/diagnose"  # output folder: PNGs, summary.txt, summary.json
    seed: int = 0
    cells: tuple[CellName, ...] = ("elman", "lstm", "gru")
    fraction: float = 0.01  # the horizon threshold (see horizon_from_norms)
    probes: int | None = None  # None (leave out): exact ||dh_T/dh_t||; else random probes
    plots: bool = True
    task: Task = Task()
    model: Model = Model()
    train: Train = Train()
    exploding: Exploding = Exploding()
    truncation: Truncation = Truncation()


def _at_least(key: str, value, minimum) -> None:
    if not value >= minimum:
        raise config.ConfigError(f"config: '{key}' must be >= {minimum}; got {value!r}")


def check_config(cfg: DiagnoseConfig) -> DiagnoseConfig:
    """The checks a schema's types cannot express; each :class:`ConfigError` names its key."""
    _at_least("task.T", cfg.task.T, 2)
    _at_least("task.batch", cfg.task.batch, 1)
    _at_least("model.hidden", cfg.model.hidden, 1)
    _at_least("train.steps", cfg.train.steps, 0)
    _at_least("train.log_every", cfg.train.log_every, 1)
    for key, v in (("train.lr", cfg.train.lr), ("train.clip", cfg.train.clip),
                   ("exploding.gain", cfg.exploding.gain),
                   ("exploding.delta_clip", cfg.exploding.delta_clip)):  # fmt: skip
        if not v > 0:
            raise config.ConfigError(f"config: '{key}' must be > 0; got {v!r}")
    if not 0 < cfg.fraction < 1:
        raise config.ConfigError(f"config: 'fraction' must be in (0, 1); got {cfg.fraction!r}")
    if cfg.probes is not None:
        _at_least("probes", cfg.probes, 1)
    if not cfg.cells:
        raise config.ConfigError("config: 'cells' must name at least one of elman, lstm, gru")
    if len(set(cfg.cells)) != len(cfg.cells):
        raise config.ConfigError(f"config: 'cells' lists a cell twice: {list(cfg.cells)}")
    if not cfg.truncation.ks:
        raise config.ConfigError("config: 'truncation.ks' must list at least one k")
    for i, k in enumerate(cfg.truncation.ks):
        _at_least(f"truncation.ks[{i}]", k, 1)
    if len(set(cfg.truncation.ks)) != len(cfg.truncation.ks):
        raise config.ConfigError(
            f"config: 'truncation.ks' lists a k twice: {list(cfg.truncation.ks)}"
        )
    _at_least("seed", cfg.seed, 0)
    f32_max = float(np.finfo(np.float32).max)  # the LSTM's bias is float32 here
    if not abs(cfg.model.forget_bias) <= f32_max:  # a larger value would be inf (NaN: too)
        raise config.ConfigError(
            f"config: 'model.forget_bias' must be a finite float32 number (|x| <= 3.4e38); "
            f"got {cfg.model.forget_bias!r}"
        )
    config.check_directory("out", cfg.out)
    for name in _out_files(cfg):
        if (Path(cfg.out).expanduser() / name).is_dir():
            raise config.ConfigError(
                f"config: 'out' {cfg.out!r} holds a directory {name!r} where the diagnosis "
                f"writes a file; remove it or choose another out"
            )
    # plotted as a curve over k: in increasing order
    return dataclasses.replace(
        cfg, truncation=dataclasses.replace(cfg.truncation, ks=tuple(sorted(cfg.truncation.ks)))
    )


#: The files ``bptt-jax diagnose`` writes into ``out`` (the PNGs with ``plots = true``).
SUMMARY_FILES = ("summary.txt", "summary.json")
PLOT_FILES = ("gradient_flow.png", "exploding.png", "truncation_bias.png", "training.png")


def _out_files(cfg: DiagnoseConfig) -> tuple[str, ...]:
    return SUMMARY_FILES + (PLOT_FILES if cfg.plots else ())


def _out_error(cfg: DiagnoseConfig, e: OSError, what: str) -> config.ConfigError:
    """A write into ``out`` that failed (read-only, not permitted, disk full), naming 'out'."""
    reason = e.strerror or str(e)
    return config.ConfigError(
        f"config: 'out' {cfg.out!r}: {what} failed: {reason}"
        + (f" ({e.filename})" if e.filename else "")
        + "; give a writable out=DIR"
    )


def adding_batch(key, seq_len: int, batch: int, dtype=jnp.float32):
    """One batch of the adding problem: ``(xs (T, B, 2), targets (T, B, 1), loss_mask)``."""
    kv, k1, k2 = jax.random.split(key, 3)
    values = jax.random.uniform(kv, (seq_len, batch), dtype)
    half = seq_len // 2
    first = jax.random.randint(k1, (batch,), 0, half)
    second = jax.random.randint(k2, (batch,), half, seq_len)
    steps = jnp.arange(seq_len)[:, None]
    marks = ((steps == first) | (steps == second)).astype(dtype)
    xs = jnp.stack([values, marks], axis=-1)
    total = jnp.sum(values * marks, axis=0)
    targets = jnp.zeros((seq_len, batch, 1), dtype).at[-1, :, 0].set(total)
    loss_mask = jnp.broadcast_to(steps == seq_len - 1, (seq_len, batch))
    return xs, targets, loss_mask


def _make_cell(name: str, model: Model):
    if name == "elman":
        return Elman(model.hidden, "tanh", init_scheme=model.init)
    if name == "lstm":
        return LSTM(model.hidden, forget_bias=model.forget_bias, init_scheme=model.init)
    return GRU(model.hidden, init_scheme=model.init)


def _log(msg: str) -> None:
    print(msg, flush=True)


def _train(cell, params, readout, cfg: DiagnoseConfig, key):
    """Adam with global-norm clipping; gradients from the hand-written ``loss_and_grads``.

    Logs, every ``train.log_every`` steps, the loss, the pre-clip global gradient norm and the
    effective horizon (8 random probes on 8 examples of the current batch).
    """
    import optax

    opt = optax.chain(optax.clip_by_global_norm(cfg.train.clip), optax.adam(cfg.train.lr))
    state = opt.init((params, readout))
    t_len, batch = cfg.task.T, cfg.task.batch

    @jax.jit
    def step(params, readout, state, k):
        xs, tg, lm = adding_batch(k, t_len, batch)
        out = losses.loss_and_grads(cell, params, readout, xs, tg, loss="mse", loss_mask=lm)
        grads = (out.params, out.readout)
        updates, state = opt.update(grads, state, (params, readout))
        params, readout = optax.apply_updates((params, readout), updates)
        return params, readout, state, out.value, optax.global_norm(grads), xs

    horizon = jax.jit(
        lambda p, xs, k: effective_horizon(
            cell, p, xs[:, :8], fraction=cfg.fraction, probes=8, key=k
        )
    )
    history = []
    for i in range(cfg.train.steps):
        k = jax.random.fold_in(key, i)
        params, readout, state, value, gnorm, xs = step(params, readout, state, k)
        history.append(float(value))
        if (i + 1) % cfg.train.log_every == 0 or i + 1 == cfg.train.steps:
            h = int(horizon(params, xs, jax.random.fold_in(k, 1)))
            _log(
                f"    step {i + 1:4d}  loss {float(value):.4f}  "
                f"grad norm (pre-clip) {float(gnorm):.3g}  horizon {h}"
            )
    return params, readout, history


def _flow_numbers(flow: GradientFlow, fraction: float) -> dict:
    d, j = np.asarray(flow.delta_norm), np.asarray(flow.jacobian_norm)
    return {
        "loss": float(flow.value),
        "horizon": int(flow.horizon),
        "delta_horizon": int(horizon_from_norms(flow.delta_norm, fraction)),
        "delta_norm_first": float(d[0]),
        "delta_norm_last": float(d[-1]),
        "jacobian_norm_first": float(j[0]),
        "jacobian_norm_last": float(j[-1]),
        "delta_norm": d.tolist(),
        "jacobian_norm": j.tolist(),
    }


def run(cfg: DiagnoseConfig) -> dict:
    """Run every diagnosis of ``bptt-jax diagnose``; write the files; return the numbers."""
    cfg = check_config(cfg)
    out = Path(cfg.out).expanduser()
    try:  # before any work: the directory, and a file in it (root on a read-only mount too)
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise _out_error(cfg, e, "creating the directory and a file in it") from None
    t_len, batch, hid = cfg.task.T, cfg.task.batch, cfg.model.hidden
    key = jax.random.key(cfg.seed)
    k_eval, k_cells, k_train, k_probe, k_exp = jax.random.split(key, 5)
    xs, tg, lm = adding_batch(k_eval, t_len, batch)
    ks = tuple(cfg.truncation.ks)
    flow_kw = dict(loss="mse", loss_mask=lm, fraction=cfg.fraction, probes=cfg.probes,
                   key=None if cfg.probes is None else k_probe)  # fmt: skip
    results: dict[str, Any] = {"config": config.to_dict(cfg), "cells": {}}
    _log(f"bptt-jax diagnose: adding problem T={t_len}, B={batch}, H={hid} -> {out}")

    for i, name in enumerate(cfg.cells):
        t0 = time.perf_counter()
        cell = _make_cell(name, cfg.model)
        kp, kr = jax.random.split(jax.random.fold_in(k_cells, i))
        params, readout = cell.init(kp, 2), losses.init_readout(kr, hid, 1)
        entry: dict[str, Any] = {}
        for stage in ("init", "trained"):
            if stage == "trained":
                _log(f"  {name}: training {cfg.train.steps} steps")
                params, readout, entry["train_loss"] = _train(
                    cell, params, readout, cfg, jax.random.fold_in(k_train, i)
                )
            flow = gradient_flow(cell, params, readout, xs, tg, **flow_kw)
            bias = truncation_bias(cell, params, readout, xs, tg, ks=ks, loss="mse", loss_mask=lm)
            spec = spectral_norms(cell, params)
            entry[stage] = _flow_numbers(flow, cfg.fraction) | {
                "spectral_norm": float(spec.kernel),
                "spectral_norm_blocks": {g: float(v) for g, v in spec.blocks.items()},
                "truncation_cosine": np.asarray(bias.cosine).tolist(),
                "truncation_norm_ratio": np.asarray(bias.norm_ratio).tolist(),
            }
            e = entry[stage]
            _log(
                f"  {name} {stage:7s}: loss {e['loss']:.4f}  horizon {e['horizon']}  "
                f"|delta_0| {e['delta_norm_first']:.3g}  |delta_T| {e['delta_norm_last']:.3g}  "
                f"sigma_max(W_h) {e['spectral_norm']:.3g}"
            )
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        results["cells"][name] = entry

    _log(f"  exploding: Elman, W_hh ~ N(0, {cfg.exploding.gain}^2/H)")
    cell = Elman(hid, "tanh", init_scheme=cfg.model.init)
    kp, kw, kr = jax.random.split(k_exp, 3)
    params = cell.init(kp, 2)
    w_hh = cfg.exploding.gain * jax.random.normal(kw, (hid, hid)) / math.sqrt(hid)
    params = params._replace(w_hh=w_hh)
    readout = losses.init_readout(kr, hid, 1)
    exploding: dict[str, Any] = {"spectral_norm": float(spectral_norms(cell, params).kernel)}
    for label, clip in (("no_clip", None), ("clip", cfg.exploding.delta_clip)):
        flow = gradient_flow(cell, params, readout, xs, tg, delta_clip=clip, **flow_kw)
        exploding[label] = _flow_numbers(flow, cfg.fraction)
        e = exploding[label]
        _log(
            f"  exploding {label:7s}: |delta_0| {e['delta_norm_first']:.3g}  "
            f"|delta_T| {e['delta_norm_last']:.3g}  horizon {e['horizon']}"
        )
    results["exploding"] = exploding

    summary = _summary_text(cfg, results)
    try:
        (out / "summary.txt").write_text(summary)
        with open(out / "summary.json", "w") as f:
            json.dump(results, f, indent=1)
        files = list(SUMMARY_FILES)
        if cfg.plots:
            files += _plot(cfg, results, out)
    except OSError as e:  # e.g. the disk filled up during the run
        raise _out_error(cfg, e, "writing the results") from None
    _log("\n" + summary)
    _log("wrote " + ", ".join(str(out / f) for f in files))
    return results


def _summary_text(cfg: DiagnoseConfig, results: dict) -> str:
    t_len = cfg.task.T
    lines = [
        f"Gradient flow on the adding problem: T={t_len}, B={cfg.task.batch}, "
        f"H={cfg.model.hidden}, init={cfg.model.init}, {cfg.train.steps} training steps "
        f"(Adam lr={cfg.train.lr}); loss on the last step only (mse; predicting the mean: "
        "0.167).",
        f"horizon: steps back from T until ||dh_T/dh_t|| first falls below {cfg.fraction} "
        f"of its running peak ({t_len} = never, 0 = all zero, -1 = undefined: NaN or inf); "
        "delta horizon: the same for ||delta^h_t||.",
        "",
        f"{'cell':6s} {'stage':8s} {'loss':>7s} {'horizon':>8s} {'d-hor.':>7s} "
        f"{'|delta_0|':>10s} {'|delta_T|':>10s} {'sigma_max':>9s}",
    ]
    for name, entry in results["cells"].items():
        for stage in ("init", "trained"):
            e = entry[stage]
            lines.append(
                f"{name:6s} {stage:8s} {e['loss']:7.4f} {e['horizon']:8d} "
                f"{e['delta_horizon']:7d} {e['delta_norm_first']:10.3g} "
                f"{e['delta_norm_last']:10.3g} {e['spectral_norm']:9.3g}"
            )
    ks = cfg.truncation.ks
    lines += ["", "Truncation bias of the trained models: cosine(g_k, g) / ||g_k|| / ||g||"]
    lines.append(f"{'cell':6s} " + " ".join(f"{'k=' + str(k):>11s}" for k in ks))
    for name, entry in results["cells"].items():
        e = entry["trained"]
        lines.append(
            f"{name:6s} "
            + " ".join(
                f"{c:5.2f}/{r:5.2f}"
                for c, r in zip(e["truncation_cosine"], e["truncation_norm_ratio"])
            )
        )
    ex = results["exploding"]
    lines += [
        "",
        f"Exploding: Elman tanh, W_hh ~ N(0, {cfg.exploding.gain}^2/H), "
        f"sigma_max(W_hh) = {ex['spectral_norm']:.3g}",
    ]
    for label, text in (("no_clip", "without clipping"),
                        ("clip", f"delta_clip={cfg.exploding.delta_clip}")):  # fmt: skip
        e = ex[label]
        lines.append(
            f"  {text:18s}: |delta_0| = {e['delta_norm_first']:.3g}, "
            f"|delta_T-1| = {e['delta_norm_last']:.3g}, "
            f"ratio {e['delta_norm_first'] / max(e['delta_norm_last'], 1e-30):.3g}"
        )
    return "\n".join(lines) + "\n"


COLORS = {"elman": "tab:blue", "lstm": "tab:orange", "gru": "tab:green"}


def _plot(cfg: DiagnoseConfig, results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t_len = cfg.task.T
    steps = np.arange(t_len)
    cells = results["cells"]

    # (a) error norms and Jacobian norms per cell, at init and after training
    fig, axes = plt.subplots(2, len(cells), figsize=(4.2 * len(cells), 6.4), squeeze=False)
    for col, (name, entry) in enumerate(cells.items()):
        for stage, style in (("init", "--"), ("trained", "-")):
            e = entry[stage]
            axes[0, col].semilogy(
                steps, e["delta_norm"], style, color=COLORS[name],
                label=f"{stage} (loss {e['loss']:.3f})",
            )  # fmt: skip
            axes[1, col].semilogy(
                steps, e["jacobian_norm"], style, color=COLORS[name],
                label=f"{stage}: horizon {e['horizon']}",
            )  # fmt: skip
            if e["horizon"] >= 0:  # -1: undefined (non-finite norms), no line to draw
                axes[1, col].axvline(t_len - e["horizon"], ls=style, color="gray", lw=0.8)
        axes[0, col].set_title(f"{name.upper() if name != 'elman' else 'Elman'}")
        axes[1, col].set_xlabel("time step t")
        for row in (0, 1):
            axes[row, col].legend(fontsize=8)
            axes[row, col].grid(True, which="major", alpha=0.3)
    axes[0, 0].set_ylabel("||delta^h_t|| = ||dL/dh_t||  (batch mean)")
    axes[1, 0].set_ylabel("||dh_T/dh_t||_F  (batch mean)")
    fig.suptitle(
        f"Error flowing back in time, adding problem T={t_len} (loss at the last step): "
        f"init (dashed) vs after {cfg.train.steps} Adam steps (solid)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out / "gradient_flow.png", dpi=110)
    plt.close(fig)

    # (b) the exploding case, with and without per-step clipping
    ex = results["exploding"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.semilogy(steps, ex["no_clip"]["delta_norm"], color="tab:red", label="no clipping")
    ax.semilogy(
        steps, ex["clip"]["delta_norm"], color="tab:blue",
        label=f"delta_clip={cfg.exploding.delta_clip}",
    )  # fmt: skip
    ax.axhline(cfg.exploding.delta_clip, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("time step t")
    ax.set_ylabel("||delta^h_t||  (batch mean)")
    ax.set_title(f"Exploding: Elman tanh, sigma_max(W_hh) = {ex['spectral_norm']:.2f}", fontsize=10)
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "exploding.png", dpi=110)
    plt.close(fig)

    # (c) truncation bias vs k
    ks = cfg.truncation.ks
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, entry in cells.items():
        for stage, style in (("init", "--"), ("trained", "-")):
            e = entry[stage]
            axes[0].plot(ks, e["truncation_cosine"], style + "o", ms=3, color=COLORS[name],
                         label=f"{name} {stage}")  # fmt: skip
            axes[1].plot(ks, e["truncation_norm_ratio"], style + "o", ms=3, color=COLORS[name],
                         label=f"{name} {stage}")  # fmt: skip
    axes[0].set_ylabel("cosine(g_k, g_full)")
    axes[1].set_ylabel("||g_k|| / ||g_full||")
    for ax in axes:
        ax.set_xlabel("truncation length k")
        ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Truncation bias, adding problem T={t_len}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "truncation_bias.png", dpi=110)
    plt.close(fig)

    # training curves
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, entry in cells.items():
        if entry.get("train_loss"):
            ax.semilogy(entry["train_loss"], color=COLORS[name], label=name, lw=0.8)
    ax.axhline(1 / 6, color="gray", ls=":", lw=0.8, label="predict the mean")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mse)")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "training.png", dpi=110)
    plt.close(fig)
    return list(PLOT_FILES)


def add_cli_arguments(parser) -> None:
    config.add_arguments(parser, default="diagnose")


def cli_main(args) -> int:
    """``bptt-jax diagnose [CONFIG] [KEY=VALUE ...]``: 0 on success, 2 for a config error."""
    try:
        cfg = check_config(config.from_args(DiagnoseConfig, args))
    except config.ConfigError as e:
        print(f"bptt-jax diagnose: error: {e}", file=sys.stderr)
        return 2
    try:
        run(cfg)
    except config.ConfigError as e:  # 'out' could not be written
        print(f"bptt-jax diagnose: error: {e}", file=sys.stderr)
        return 2
    return 0
