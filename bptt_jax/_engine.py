"""The one engine: forward scans, hand-written reverse scans, and :func:`unroll`.

It composes three independent choices, so that every combination is composed, not written:

1. **What is differentiated**: a cell walked forward in time (its step forward and step
   backward come from the cell, see :mod:`bptt_jax.cells.protocol`), a cell walked over each
   sequence's reversed valid prefix (a :class:`~bptt_jax.Bidirectional` layer's second
   direction), and layers of those composed into a :class:`~bptt_jax.Stack`
   (:func:`model_forward`, :func:`model_backward`).
2. **What sits on top**: nothing (:func:`unroll`: the outputs ``hs`` are the result) or a
   loss head (:class:`bptt_jax.losses.LossHead`: readout and per-token loss).
3. **How time is walked** (:class:`Walk`): ``"full"`` (every step stored), ``"segmented"``
   (checkpointed BPTT: only segment carries stored, each segment re-run in the backward) or
   ``"chunked"`` (truncated BPTT: chunk groups forward, one batched k-step reverse scan each).

:func:`bptt` is the library's one ``jax.custom_vjp`` over all of them. For each cell, the
engine owns every matmul over all ``T*B`` rows:

* the input projection ``x_t W_x + b`` for all ``T`` steps is one ``(T*B, D) @ (D, G*H)``
  matmul before the forward scan, so each step only does the recurrent ``(B, H) @ (H, G*H)``;
* the forward ``lax.scan`` stacks the states (for the backward and as the output ``hs``) and
  the cell's residuals, nothing else;
* the backward is a ``lax.scan(..., reverse=True)`` carrying ``delta^h_{t+1}`` (the error on
  the state) from ``t = T`` down to ``1``; each step emits the gradient of its pre-activations;
* every shared-weight gradient, summed over all steps, and ``dxs`` are then single matmuls over
  the ``T*B`` rows: ``dW_h = H_prev^T dA``, ``dW_x = X^T dA``, ``db = sum dA``, ``dX = dA W_x^T``.

That is the fast path, for a :class:`~bptt_jax.cells.FastCell` (the built-in cells). Any
other cell (:class:`~bptt_jax.cells.Cell`: ``init``, ``zero_carry``, ``step``) takes the
generic path, the same walks and the same sequence-level BPTT one step at a time: the
forward ``lax.scan`` of ``cell.step`` stores the carries; the reverse ``lax.scan`` carries
the error on the carry back in time and sums the params' gradient over the steps in its
carry, each step's backward being the cell's ``step_backward``
(:class:`~bptt_jax.cells.ManualCell`) or else ``jax.vjp`` of ``cell.step`` at
``(params, carry_{t-1}, x_t)``. That per-step ``jax.vjp`` is the one place the library
derives a backward by autodiff; no sequence is ever differentiated as a whole.

Masks (right-padded variable-length batches), resets, truncation and per-step clipping are
handled here, for all cells and models.
"""

from __future__ import annotations

import math
import os
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bptt_jax import precision, validation
from bptt_jax._sharding import (
    SUMMED,
    batch_split,
    finish_cotangents,
    like_batch,
    off_mesh,
    per_device,
    sum_over_rows,
    time_major_sharding,
    vary_like,
)
from bptt_jax.cells import _common, protocol
from bptt_jax.models import Bidirectional, Stack, is_bidirectional, output_size

BACKWARDS = ("manual", "checkpointed", "autodiff")

#: The ``unroll`` factor of the fast path's forward and reverse scans, by (backend, cell
#: class): how many steps XLA compiles into one loop iteration; 1 where not listed. Measured
#: on an H100 (jax 0.11.2, benchmarks/README.md), gradient time with 2 against 1: Elman -47%
#: (T=100, B=64, H=256) and -10% (T=512, B=128, H=512), LSTM -4% and -7% (bfloat16 compute
#: -12%), GRU +4% and +300% (so 1). On the CPU it never helped. ``BPTT_JAX_SCAN_UNROLL``
#: overrides it for every cell (read at trace time, for measuring: JAX reuses a function's
#: earlier traces, so within one process call ``jax.clear_caches()`` after changing it).
SCAN_UNROLL = {("gpu", "Elman"): 2, ("gpu", "LSTM"): 2}


def scan_unroll(cell) -> int:
    """The scans' ``unroll`` factor for ``cell`` on the default backend (:data:`SCAN_UNROLL`)."""
    override = os.environ.get("BPTT_JAX_SCAN_UNROLL")
    if override:
        return max(1, int(override))
    return SCAN_UNROLL.get((jax.default_backend(), type(cell).__name__), 1)


class OutputError(NamedTuple):
    """The error from a linear readout, handed to the reverse scan unmultiplied.

    ``dL/dh_t = dy_t @ w.T`` with ``dy`` (T, B, O) the error on the readout's outputs and
    ``w`` (H, O) its kernel. The reverse scan forms each step's product inside the loop,
    so the (T, B, H) array of all of them is never stored.
    """

    dy: jax.Array
    w: jax.Array


#: A per-step array of this many bytes or more counts as large. XLA:CPU takes large temp
#: buffers fresh from the OS on every call, and their page faults cost more than the work
#: they save, so for them :func:`output_error` leaves the readout's product to the reverse
#: scan (Elman B=64, H=256, T=256: -6% time); small ones come from reused heap memory, where
#: one big matmul over the stored array wins (B=32, H=128: +5%).
LARGE_BYTES = 4 * 2**20


def output_error(dy, w):
    """``dL/dh_t = dy_t @ w.T`` for every step: (T, B, H), or an :class:`OutputError`.

    Args:
      dy: (T, B, O), the error on a linear readout's outputs.
      w: (H, O), the readout's kernel.
    """
    t, b, _ = dy.shape
    if t * b * w.shape[0] * dy.dtype.itemsize >= LARGE_BYTES:
        return OutputError(dy, w)
    return _common.matmul(dy, w.T)


def _per_example(v, x):
    """``v`` (B,) shaped to broadcast against ``x`` (B, ...)."""
    return v.reshape(v.shape + (1,) * (x.ndim - 1))


def _select(m, a, b):
    """Per-example select over a carry pytree: ``a`` where ``m`` (B,) is set, else ``b``."""
    return jax.tree.map(lambda x, y: jnp.where(_per_example(m, x), x, y), a, b)


def _select_all(c, a, b):
    """``a`` if the scalar ``c`` is set, else ``b``, over a pytree."""
    return jax.tree.map(lambda x, y: jnp.where(c, x, y), a, b)


def _zeros_like(tree):
    return jax.tree.map(jnp.zeros_like, tree)


def _reset(r_t, carry):
    """The carry entering a step, with examples whose ``r_t`` (B,) is set reset to zeros."""
    return carry if r_t is None else _select(r_t, _zeros_like(carry), carry)


def clip_delta(dstate, threshold):
    """Scale each example's error ``delta_t`` (all carry parts together) to norm <= threshold.

    ``delta * min(1, threshold / ||delta||)`` per example, the norm taken over every leaf of
    the carry (``h`` and ``c`` for the LSTM).
    """
    sq = sum(jnp.sum(g * g, axis=tuple(range(1, g.ndim))) for g in jax.tree.leaves(dstate))
    # sqrt only where positive: a zero error (a padded step) would make the derivative of
    # the norm inf * 0 = NaN in a second-order derivative through this backward.
    big = sq > jnp.square(threshold).astype(sq.dtype)
    norm = jnp.sqrt(jnp.where(big, sq, 1))  # (B,), used only where big
    scale = jnp.where(big, threshold / norm, 1)
    return jax.tree.map(lambda g: g * _per_example(scale, g).astype(g.dtype), dstate)


def truncation_cuts(length: int, truncate: int | None):
    """Boolean (T,): step t's incoming carry is cut from the gradient (t = k, 2k, ...)."""
    if truncate is None or truncate >= length:
        return None
    t = jnp.arange(length)
    return (t % truncate == 0) & (t > 0)


def _blocks(a, n: int) -> tuple:
    """``a`` split into ``n`` equal blocks along its last axis."""
    return tuple(jnp.split(a, n, axis=-1)) if n > 1 else (a,)


def project_inputs(cell, params, xs):
    """``xs @ W_x`` for every step at once, one matmul per gate block.

    Returns a tuple of ``cell.n_blocks`` arrays (T, B, H), one per gate, each its own buffer:
    a gate block sliced out of a joint (T, B, G*H) row makes XLA:CPU's step fusions several
    times slower (~95 vs ~40 us a GRU step at B=32, H=128). The bias is added inside the
    step: adding it here would materialise a second buffer next to each matmul's output.
    """
    return tuple(xs @ w for w in _blocks(cell.input_kernel(params), cell.n_blocks))


def _index(x, t):
    return lax.dynamic_index_in_dim(x, t, 0, keepdims=False)


def _write(buf, row, t):
    return lax.dynamic_update_index_in_dim(buf, row.astype(buf.dtype), t, 0)


def _rows(bufs, t):
    return tuple(_index(b, t) for b in bufs)


def _fresh(n: int, like):
    return tuple(jnp.zeros_like(like) for _ in range(n))


# In-place loops. The per-step buffers are (T, B, H) arrays, one per block: a step reads row
# t of some and overwrites row t with its results (the forward its residuals over its input
# projections, the backward its pre-activation gradients over its residuals), so one set of
# buffers serves the whole gradient. XLA updates a buffer in place only if every reader of
# the row is ordered before the write by data dependence; otherwise it copies the whole
# buffer in every iteration (O(T^2) traffic). In the forward, projection row i is read only
# by the fusion computing gate i, whose result is what overwrites it, so the row is read
# where it is used. In the backward, each residual row feeds several gradient blocks, so the
# rows a step needs are read one iteration early, from the buffers *after* that iteration's
# write (the neighbouring row is untouched), and carried. tests/test_memory.py checks both.


def forward(cell, params, xs, carry0, mask, *, keep_residuals: bool = True, resets=None):
    """Run the forward scan.

    ``resets`` (T, B) bool, optional: where set, the carry entering step t is zeros.

    Returns:
      ``(states, buffers, carry_T)``: ``states`` is the carry after every step, stacked on
      a leading T axis (``cell.hidden(states)`` is ``hs``); ``buffers`` a tuple of (T, B, H)
      arrays whose first ``cell.residual_blocks`` hold what the cell's backward needs per
      step and the rest are input projections no longer needed (the backward writes its
      gradients over all of them); ``None`` when ``keep_residuals`` is False. For a cell
      off the fast path (not a :class:`~bptt_jax.cells.FastCell`): ``(xs,)``.
    """
    if not protocol.is_fast(cell):
        return _generic_forward(cell, params, xs, carry0, mask, keep_residuals, resets)
    n_res = cell.residual_blocks if keep_residuals else 0
    params = precision.compute_params(params, xs.dtype)  # kernels in the compute dtype
    carry0 = like_batch(carry0, xs)
    xp = project_inputs(cell, params, xs)
    store = xp[0].dtype  # the stacked states are stored in the compute dtype
    # Residual i overwrites input projection i in place; extra residuals get fresh buffers.
    n_in = min(cell.n_blocks, n_res)
    bufs0 = xp[:n_in] + _fresh(n_res - n_in, xp[0])
    bias = _blocks(cell.input_bias(params), cell.n_blocks)

    def body(scan_carry, inputs):
        carry, bufs = scan_carry
        t, xp_rest, m_t, r_t = inputs
        # (under a policy: the stored projection up to the bias's, the params', dtype)
        xp_t = tuple(a.astype(b.dtype) + b for a, b in zip(_rows(bufs[:n_in], t) + xp_rest, bias))
        carry = _reset(r_t, carry)
        new, res = cell.forward(params, carry, xp_t)
        if m_t is not None:  # padded step: the carry passes through unchanged
            new = _select(m_t, new, carry)
        if n_res:
            bufs = tuple(_write(buf, r, t) for buf, r in zip(bufs, res))
        return (new, bufs), jax.tree.map(lambda c: c.astype(store), new)

    ts = jnp.arange(xs.shape[0])
    (carry_t, bufs), states = lax.scan(
        body, (carry0, bufs0), (ts, xp[n_in:], mask, resets), unroll=scan_unroll(cell)
    )
    if not keep_residuals:
        return states, None, carry_t
    return states, bufs + xp[n_in:], carry_t


def _error_entering(cell, carry0, states, t, r_t, dstate, dh_t, out_w, real_t, delta_clip,
                    keep_deltas, acc):  # fmt: skip
    """What step t of a reverse scan starts from, for any cell.

    Returns ``(prev_t, dstate, delta_h)``: the carry entering step t (``carry0`` at t = 0,
    else the stored state after step t-1, reset where ``r_t`` is set, in the carry's
    dtypes); the error on step t's new carry with ``dh_t`` from outside the recurrence
    added (``dh_t @ out_w.T`` for a readout's error) and clipped by ``delta_clip`` where the
    step exists; and what ``keep_deltas`` keeps of it (``None`` when off).
    """
    prev_t = jax.tree.map(
        lambda c0, s: jnp.where(t == 0, c0, _index(s, jnp.maximum(t - 1, 0)).astype(c0.dtype)),
        carry0,
        states,
    )
    prev_t = _reset(r_t, prev_t)
    if out_w is not None:  # dh_t is the readout's dy_t
        dh_t = _common.matmul(dh_t, out_w.T)
    if dh_t is not None:
        dstate = protocol.add_to_hidden(cell, dstate, dh_t.astype(acc))
    if delta_clip is not None:
        clipped = clip_delta(dstate, delta_clip)
        dstate = clipped if real_t is None else _select_all(real_t, clipped, dstate)
    delta_h = None
    if keep_deltas:
        kept = keep_deltas if callable(keep_deltas) else partial(protocol.hidden, cell)
        delta_h = kept(dstate)
    return prev_t, dstate, delta_h


def _back_one_step(step_back, dstate, m_t, cut_t, r_t):
    """``step_back(dstate) -> (dprev, *rest)`` with the engine's masks, cuts and resets:
    a padded step passes its error straight to the previous carry, a truncation cut or a
    reset stops it. Returns ``(dprev, rest)``."""
    if m_t is None:
        dprev, *rest = step_back(dstate)
    else:
        zeros = _zeros_like(dstate)
        dprev, *rest = step_back(_select(m_t, dstate, zeros))
        dprev = jax.tree.map(jnp.add, dprev, _select(m_t, zeros, dstate))
    if cut_t is not None:
        dprev = jax.tree.map(lambda g: jnp.where(cut_t, jnp.zeros_like(g), g), dprev)
    if r_t is not None:  # the carry was replaced by zeros: nothing flows further back
        dprev = _select(r_t, _zeros_like(dprev), dprev)
    return dprev, rest


def reverse_scan(
    cell,
    params,
    carry0,
    mask,
    states,
    res,
    dhs,
    dcarry_t,
    cuts,
    *,
    resets=None,
    delta_clip=None,
    keep_deltas=False,
    real=None,
):
    """The reverse ``lax.scan`` of BPTT: ``delta`` from step T-1 down to 0.

    ``res`` is the forward's ``buffers``. ``dhs``: the error arriving at each ``h_t`` from
    outside the recurrence, (T, B, H), an :class:`OutputError`, or ``None``. ``real`` (T,)
    bool, optional, marks the steps that exist (not padding added to fill the last
    checkpointed segment): ``delta_clip`` acts only there.

    Returns:
      ``(dcarry0, dcols, deltas)``: the error on ``carry0``; each step's pre-activation
      gradients ``dA_t``, a tuple of ``cell.grad_blocks`` arrays (T, B, H) written over the
      forward's buffers in place (fresh ones where there are too few); and ``delta^h_t``
      (T, B, H), the error reaching each hidden state (after clipping), when ``keep_deltas``
      is True (else ``None``); a callable ``keep_deltas(dstate)`` instead stacks what it
      returns from the error on the whole carry at each step. For a cell off the fast
      path, ``dcols`` is ``(dparams, dxs)`` (see :func:`_generic_reverse_scan`).
    """
    if not protocol.is_fast(cell):
        return _generic_reverse_scan(
            cell, params, carry0, mask, states, res, dhs, dcarry_t, cuts,
            resets=resets, delta_clip=delta_clip, keep_deltas=keep_deltas, real=real,
        )  # fmt: skip
    hs = cell.hidden(states)
    params = precision.compute_params(params, hs.dtype)
    dcarry_t, carry0 = like_batch((dcarry_t, carry0), hs)
    bufs = () if res is None else tuple(res)
    n_res, n_grad = cell.residual_blocks, cell.grad_blocks
    if len(bufs) < n_res:
        raise ValueError(f"reverse_scan: the cell needs {n_res} residual buffers; got {len(bufs)}")
    # Gradient block k is written over buffer k; residuals past the last gradient block
    # (none of the built-in cells has any) are only read.
    out0 = bufs[:n_grad] + _fresh(n_grad - len(bufs[:n_grad]), hs)
    # The recurrent kernel transposed once, row-major, for each step's delta @ W_h^T: a
    # transpose folded into the dot makes XLA:CPU's small per-step matmul 5-18% slower.
    w_t = lax.optimization_barrier(cell.recurrent_kernel(params).T)
    out_w = None
    if isinstance(dhs, OutputError):
        dhs, out_w = dhs
        out_w = out_w.astype(hs.dtype)
    n_in = min(n_res, n_grad)
    res_rest = bufs[n_in:n_res]

    acc = jax.tree.leaves(carry0)[0].dtype  # the carry's (params') dtype

    def body(scan_carry, inputs):
        dstate, out, res_next = scan_carry
        t, state_t, dh_t, m_t, cut_t, r_t, real_t, res_t_rest = inputs
        # The cell's step backward sees everything in the carry's dtype (under a policy the
        # stored rows are in the compute dtype).
        res_t = tuple(r.astype(acc) for r in res_next + res_t_rest)
        state_t = jax.tree.map(lambda s, c: s.astype(c.dtype), state_t, carry0)
        prev_t, dstate, delta_h = _error_entering(
            cell, carry0, states, t, r_t, dstate, dh_t, out_w, real_t, delta_clip,
            keep_deltas, acc,
        )  # fmt: skip
        dprev, (dcols,) = _back_one_step(
            lambda d: cell.backward(params, res_t, state_t, prev_t, d, w_t), dstate, m_t, cut_t,
            r_t,
        )  # fmt: skip
        out = tuple(_write(buf, d, t) for buf, d in zip(out, dcols))
        # The residuals of step t-1, read after this step's write.
        res_next = _rows(out[:n_in], jnp.maximum(t - 1, 0))
        return (dprev, out, res_next), delta_h

    ts = jnp.arange(hs.shape[0])
    init = (dcarry_t, out0, _rows(out0[:n_in], hs.shape[0] - 1))
    (dcarry0, dcols, _), deltas = lax.scan(
        body,
        init,
        (ts, states, dhs, mask, cuts, resets, real, res_rest),
        reverse=True,
        unroll=scan_unroll(cell),
    )
    return dcarry0, dcols, deltas


def weight_grads(cell, params, xs, carry0, states, dcols, resets=None):
    """Every shared-weight gradient, summed over all steps, as matmuls over the T*B rows.

    ``dcols`` is the reverse scan's tuple of pre-activation gradients. Returns
    ``(dparams, dxs)``: per gate, ``dW_x = X^T dA``, ``dW_h = H_prev^T dA``, ``db = sum dA``
    (assembled by the cell) and ``dX = sum_gates dA W_x^T``. Off the fast path the reverse
    scan has summed them already: ``dcols`` is ``(dparams, dxs)``.
    """
    if not protocol.is_fast(cell):
        return dcols
    acc = cell.input_kernel(params).dtype  # sums in the params' dtype
    cparams = precision.compute_params(params, xs.dtype)
    hs = cell.hidden(states)
    carry0 = like_batch(carry0, hs)
    h_prev = jnp.concatenate([cell.hidden(carry0).astype(hs.dtype)[None], hs[:-1]], 0)
    if resets is not None:
        h_prev = jnp.where(resets[..., None], jnp.zeros((), hs.dtype), h_prev)

    def side(x, blocks):
        cat = (lambda parts: jnp.concatenate(parts, -1)) if len(blocks) > 1 else (lambda p: p[0])
        da = [dcols[k].astype(x.dtype) for k in blocks]
        x_t = None
        if len(blocks) > 1:
            # Laid out once as (D, T, B), row-major, for all the gates' matmuls: XLA:CPU's
            # matmul is slower with a transpose folded in (time: LSTM B=64, H=256, T=256 -2%;
            # LSTM and GRU B=32, H=128, T=100 -3%).
            x_t = lax.optimization_barrier(jnp.transpose(x, (2, 0, 1)))
        dw = cat([sum_over_rows(x, a, acc, x_t=x_t) for a in da])
        return dw, cat([dcols[k].sum((0, 1), dtype=acc) for k in blocks])

    dw_x, db_x = side(xs, cell.input_grads)  # sum_t x_t^T dA_t, sum_t dA_t
    dw_h, db_h = side(h_prev, cell.recurrent_grads)  # sum_t h_{t-1}^T dA_t
    grads = cell.assemble_grads(params, dw_x, dw_h, db_x, db_h)
    w_x = _blocks(cell.input_kernel(cparams), cell.n_blocks)
    dxs = sum(
        jnp.matmul(dcols[k].astype(w.dtype), w.T, preferred_element_type=acc)
        for k, w in zip(cell.input_grads, w_x)
    )
    return grads, dxs


# ================================================================ the generic path
# Any cell that is not a FastCell: the sequence-level BPTT of the fast path, one step at a
# time. The forward scan stores the carries (no residuals: the backward of step t runs at
# (params, carry_{t-1}, x_t), carry_{t-1} read from the stored states); the reverse scan
# carries the error on the carry and the params' gradient summed so far, and emits dx_t.
# Masks, resets, truncation cuts, per-step clipping and kept deltas are those of
# reverse_scan, line for line.


def _step_backward(cell):
    """``(cparams, carry, x, new, dnew) -> (dparams, dcarry, dx)`` of one step: the cell's
    ``step_backward``, or ``jax.vjp`` of ``cell.step``'s new carry."""
    if protocol.has_step_backward(cell):
        return cell.step_backward

    def vjp(params, carry, x, new, dnew):
        # The one autodiff in the library's backward, allowed by issue 15: the ONE-STEP
        # backward of a user cell that brings none (tier 1). The sequence-level BPTT around
        # it (the reverse scan, the error carried back, the sums over time) stays hand-written.
        del new
        _, pullback = jax.vjp(lambda p, c, x_: cell.step(p, c, x_)[0], params, carry, x)
        return pullback(dnew)

    return vjp


def _generic_forward(cell, params, xs, carry0, mask, keep_residuals, resets):
    """:func:`forward` of a cell off the fast path: a ``lax.scan`` of ``cell.step``."""
    cparams = precision.compute_params(params, xs.dtype)  # matrices in the compute dtype
    carry0 = like_batch(carry0, xs)
    store = xs.dtype  # the stacked states are stored in the compute dtype
    acc = jax.tree.leaves(carry0)[0].dtype  # the carry's (params') dtype

    def body(carry, inputs):
        x_t, m_t, r_t = inputs
        carry = _reset(r_t, carry)
        # as in the autodiff path: x_t in the carry's dtype, the kernels in the compute dtype
        new, _ = cell.step(cparams, carry, x_t.astype(acc))
        if m_t is not None:  # padded step: the carry passes through unchanged
            new = _select(m_t, new, carry)
        return new, jax.tree.map(lambda c: c.astype(store), new)

    carry_t, states = lax.scan(body, carry0, (xs, mask, resets))
    return states, ((xs,) if keep_residuals else None), carry_t


def _generic_reverse_scan(cell, params, carry0, mask, states, res, dhs, dcarry_t, cuts, *,
                          resets, delta_clip, keep_deltas, real):  # fmt: skip
    """:func:`reverse_scan` of a cell off the fast path.

    Returns ``(dcarry0, (dparams, dxs), deltas)``: ``dparams`` summed over the steps in the
    params' dtype, ``dxs`` (T, B, D).
    """
    (xs,) = res
    split = batch_split(xs)
    if split is not None:
        return _generic_reverse_scan_per_device(
            split, cell, params, carry0, mask, states, xs, dhs, dcarry_t, cuts,
            resets=resets, delta_clip=delta_clip, keep_deltas=keep_deltas, real=real,
        )  # fmt: skip
    # Inside shard_map: the params made device-varying like the batch, so that the VJP of
    # a step gives each device's own gradient (summed over time here, over the devices once
    # at the end, by finish_cotangents), not one reduced across devices at every step.
    cparams = vary_like(precision.compute_params(params, xs.dtype), xs)
    dcarry_t, carry0 = like_batch((dcarry_t, carry0), xs)
    acc = jax.tree.leaves(carry0)[0].dtype  # the carry's (params') dtype
    step_bwd = _step_backward(cell)
    out_w = None
    if isinstance(dhs, OutputError):
        dhs, out_w = dhs
        out_w = out_w.astype(xs.dtype)

    def as_carry(state):  # a stored state back in the carry's dtypes
        return jax.tree.map(lambda s, c: s.astype(c.dtype), state, carry0)

    def body(scan_carry, inputs):
        dstate, dparams = scan_carry
        t, x_t, state_t, dh_t, m_t, cut_t, r_t, real_t = inputs
        x_t, state_t = x_t.astype(acc), as_carry(state_t)
        prev_t, dstate, delta_h = _error_entering(
            cell, carry0, states, t, r_t, dstate, dh_t, out_w, real_t, delta_clip,
            keep_deltas, acc,
        )  # fmt: skip

        def step_back(d):  # (dparams, dcarry, dx) -> (dcarry, dparams, dx)
            dp, dprev, dx = step_bwd(cparams, prev_t, x_t, state_t, d)
            return dprev, dp, dx

        dprev, (dp, dx) = _back_one_step(step_back, dstate, m_t, cut_t, r_t)
        dprev = jax.tree.map(lambda g, c: g.astype(c.dtype), dprev, carry0)
        dparams = jax.tree.map(lambda a, g: a + g.astype(a.dtype), dparams, dp)
        return (dprev, dparams), (dx.astype(xs.dtype), delta_h)

    ts = jnp.arange(xs.shape[0])
    init = (dcarry_t, vary_like(_zeros_like(params), xs))
    inputs = (ts, xs, states, dhs, mask, cuts, resets, real)
    (dcarry0, dparams), (dxs, deltas) = lax.scan(body, init, inputs, reverse=True)
    return dcarry0, (dparams, dxs), deltas


def _generic_reverse_scan_per_device(split, cell, params, carry0, mask, states, xs, dhs,
                                     dcarry_t, cuts, *, resets, real, **options):  # fmt: skip
    """:func:`_generic_reverse_scan` of a batch split over a mesh, run on each device's rows
    (:func:`bptt_jax._sharding.per_device`): the params' gradient crosses the devices once,
    after the loop. (Under ``jit``, the VJP of a step would sum its params' gradient over
    the batch, so across the devices, at every step.)"""
    out_w = None
    if isinstance(dhs, OutputError):
        dhs, out_w = dhs

    def local(params, carry0, mask, states, xs, dhs, out_w, dcarry_t, cuts, resets, real):
        d = dhs if out_w is None else OutputError(dhs, out_w)
        return _generic_reverse_scan(
            cell, params, carry0, mask, states, (xs,), d, dcarry_t, cuts,
            resets=resets, real=real, **options,
        )  # fmt: skip

    args = (params, carry0, mask, states, xs, dhs, out_w, dcarry_t, cuts, resets, real)
    in_axes = (None, 0, 1, 1, 1, 1, None, 0, None, 1, None)
    return per_device(split, local, args, in_axes, (0, (SUMMED, 1), 1))


# ====================================================================== models
# A model (bptt_jax.models) is a cell, a Bidirectional or a Stack. The engine sees a tuple of
# layers, each a cell (forward in time) or a Bidirectional (two cells, the second run over
# each sequence's reversed valid prefix); params and carries are tuples with one entry per
# layer, a Bidirectional layer's entry being the pair (forward, backward). Layers run one
# after the other over the whole sequence (a layer needs all of its input before the next
# Bidirectional one can start); a stack with no Bidirectional layer can also be walked
# through time as a whole, segment by segment or chunk by chunk, all layers at once.


def layers_of(model) -> tuple:
    """The model's layers: ``Stack.layers``, or the model alone."""
    return model.layers if isinstance(model, Stack) else (model,)


def per_layer(model, tree) -> tuple:
    """A params/carry/gradient pytree of ``model`` as a tuple with one entry per layer."""
    return tuple(tree) if isinstance(model, Stack) else (tree,)


def from_layers(model, entries):
    """The inverse of :func:`per_layer`."""
    return tuple(entries) if isinstance(model, Stack) else entries[0]


def cells_of(model) -> tuple:
    """Every cell of the model, layer by layer, forward direction first."""
    out = []
    for layer in layers_of(model):
        out.extend(layer.cells if isinstance(layer, Bidirectional) else (layer,))
    return tuple(out)


def reversal(mask, length: int):
    """Indices ``idx`` (T, B) with ``x[idx[t, b], b]`` each sequence's valid prefix reversed.

    ``len_b = sum_t mask[t, b]``: steps ``t < len_b`` map to ``len_b - 1 - t`` and padded
    steps to themselves, so the map is its own inverse and the reversed sequence is again
    right-padded by the same mask. ``None`` (no mask): the whole time axis is flipped.
    """
    if mask is None:
        return None
    lengths = jnp.sum(mask, axis=0, dtype=jnp.int32)
    t = jnp.arange(length, dtype=jnp.int32)[:, None]
    return jnp.where(t < lengths, lengths - 1 - t, t)


def reverse_time(x, idx):
    """``x`` (T, B, ...) with each sequence's valid prefix reversed (see :func:`reversal`)."""
    if idx is None:
        return jnp.flip(x, 0)
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=0)


def merge_outputs(merge: str, hf, hb):
    """A Bidirectional layer's output from its directions' (both in forward time)."""
    if merge == "concat":
        return jnp.concatenate([hf, hb], axis=-1)
    total = hf + hb
    return total * jnp.asarray(0.5, total.dtype) if merge == "mean" else total


def _split_error(layer, dhs, idx):
    """The error on a Bidirectional layer's outputs, split into its directions' errors.

    The reverse direction's comes in its own (reversed) time. An :class:`OutputError` stays
    one: its readout kernel is split by rows, its ``dy`` reversed.
    """
    hf, merge = protocol.output_size(layer.forward), layer.merge
    if isinstance(dhs, OutputError):
        dy, w = dhs
        dy_b = reverse_time(dy, idx)
        if merge == "concat":
            return OutputError(dy, w[:hf]), OutputError(dy_b, w[hf:])
        if merge == "mean":
            w = w * jnp.asarray(0.5, w.dtype)
        return OutputError(dy, w), OutputError(dy_b, w)
    if merge == "concat":
        f, b = dhs[..., :hf], dhs[..., hf:]
    else:
        f = b = dhs * jnp.asarray(0.5, dhs.dtype) if merge == "mean" else dhs
    return f, reverse_time(b, idx)


def _dense(dhs):
    return dhs.dy @ dhs.w.T if isinstance(dhs, OutputError) else dhs


class _Full:
    """How one cell walks its sequence: every state and residual stored (full BPTT)."""

    stores_inputs = False

    @staticmethod
    def forward(cell, params, xs, carry0, mask, resets, keep):
        states, bufs, carry_t = forward(
            cell, params, xs, carry0, mask, keep_residuals=keep, resets=resets
        )
        return protocol.hidden_seq(cell, states), carry_t, (states, bufs) if keep else None

    @staticmethod
    def backward(cell, params, xs, carry0, mask, resets, saved, dhs, dcarry_t, cuts, clip, real,
                 keep_deltas):  # fmt: skip
        states, bufs = saved
        dcarry0, dcols, deltas = reverse_scan(
            cell, params, carry0, mask, states, bufs, dhs, dcarry_t, cuts,
            resets=resets, delta_clip=clip, keep_deltas=keep_deltas, real=real,
        )  # fmt: skip
        grads, dxs = weight_grads(cell, params, xs, carry0, states, dcols, resets)
        return grads, dxs, dcarry0, deltas


class _Segmented(NamedTuple):
    """How one cell walks its sequence: checkpointed, storing its segment carries only.

    Used for the cells of a model with a Bidirectional layer, whose layers cannot be walked
    through time together; each layer keeps its input (T, B, F) for the backward.
    """

    segment: int
    stores_inputs = True

    def forward(self, cell, params, xs, carry0, mask, resets, keep):
        _, xs_s, mask_s, resets_s = segment_inputs(xs, mask, resets, self.segment)
        ckpt, hs_s, carry_t = checkpointed_forward(
            cell, params, xs_s, carry0, mask_s, resets_s, None, out_fn=lambda hs, *_: hs
        )
        return _unsegment(hs_s, xs.shape[0]), carry_t, ckpt if keep else None

    def backward(self, cell, params, xs, carry0, mask, resets, saved, dhs, dcarry_t, cuts, clip,
                 real, keep_deltas):  # fmt: skip
        del real
        if keep_deltas:
            raise ValueError("the deltas of checkpointed BPTT are not kept; use the full path")
        t_len = xs.shape[0]
        n, xs_s, mask_s, resets_s = segment_inputs(xs, mask, resets, self.segment)
        grads, dxs_s, dcarry0, _, _ = checkpointed_backward(
            cell, params, xs_s, mask_s, resets_s, None, saved, dcarry_t,
            _segment_cuts(cuts, n, self.segment), _segment_real(clip, n, self.segment, t_len),
            lambda hs, dh, _: (dh, (), None), _segments(_dense(dhs), n, self.segment), (),
            delta_clip=clip,
        )  # fmt: skip
        return grads, _unsegment(dxs_s, t_len), dcarry0, None


FULL = _Full()

# Fused directions. A Bidirectional layer whose two directions are one cell configuration on
# the fast path can run them as ONE scan of T steps, vmapped over a leading direction axis of
# 2 (params, inputs, carries, stored states and residuals, errors): each step's matmuls
# become one batched matmul, and the loop has T sequential steps instead of 2T. That is for
# a GPU, where a step at these sizes costs its kernel launches more than its FLOPs (the
# H100's BiGRU at (512, 128, 256, 512): 62.6 ms, PyTorch's cuDNN 45 ms, which runs the two
# directions at once). A CPU does the same FLOPs either way, and the stacked and sliced
# inputs, outputs and errors cost time and memory: on the 2-core CPU, BiGRU (256, 64, 128,
# 256) 317 against 298 ms and 242 against 201 MiB temp; BiLSTM (100, 32, 64, 128) 19.7
# against 18.8 ms; BiElman (256, 64, 128, 256) 118 against 108 ms, 145 against 96 MiB. The
# memory is in the backward (the forward's is the same): its per-direction temporaries, which
# the sequential directions reuse one after the other, are live for both directions at once.
# (Keeping each saved array on the direction axis where vmap's scan leaves it, (T, 2, B, H)
# for stacked outputs, (2, T, B, H) for carried buffers, saved no memory: XLA already does.)
# Sharded runs (a mesh, shard_map) keep one scan per direction.

#: Backends where a Bidirectional layer fuses its directions; none until measured on a GPU
#: (benchmarks/gpu_probe.py ``bidirectional``). ``BPTT_JAX_FUSE_DIRECTIONS=1`` (or ``0``)
#: overrides it on every backend (read at trace time, for measuring and testing; as with
#: ``BPTT_JAX_SCAN_UNROLL``, call ``jax.clear_caches()`` after changing it in a process).
FUSE_DIRECTIONS: frozenset[str] = frozenset()


def _fuse_directions() -> bool:
    override = os.environ.get("BPTT_JAX_FUSE_DIRECTIONS")
    if override:
        return override not in ("0", "false", "False")
    return jax.default_backend() in FUSE_DIRECTIONS


class _Paired(NamedTuple):
    """What a fused Bidirectional layer's forward stored: leaves with a leading axis of 2
    (forward direction, reverse direction)."""

    saved: object


def fuses_directions(layer, walk, x) -> bool:
    """Whether Bidirectional ``layer`` runs its directions as one scan (see above)."""
    return (
        _fuse_directions()
        and walk is FULL
        and layer.forward == layer.backward
        and protocol.is_fast(layer.forward)
        and off_mesh(x)
    )


def _pair(a, b):
    return jax.tree.map(lambda u, v: jnp.stack([u, v]), a, b)


def _unpair(tree) -> tuple:
    return jax.tree.map(lambda u: u[0], tree), jax.tree.map(lambda u: u[1], tree)


def directions(saved) -> tuple:
    """A Bidirectional layer's full-BPTT saved forward as ``(forward's, reverse's)``."""
    return _unpair(saved.saved) if isinstance(saved, _Paired) else saved


def _layer_output(layer, saved, idx):
    """A layer's outputs, from what its full-BPTT forward stored."""
    if isinstance(layer, Bidirectional):
        if isinstance(saved, _Paired):
            hf, hb = protocol.hidden_seq(layer.forward, saved.saved[0])
        else:
            (sf, _), (sb, _) = saved
            hf = protocol.hidden_seq(layer.forward, sf)
            hb = protocol.hidden_seq(layer.backward, sb)
        return merge_outputs(layer.merge, hf, reverse_time(hb, idx))
    return protocol.hidden_seq(layer, saved[0])


def model_forward(model, params, xs, carry0, mask, resets, drops, *, keep=True, walk=FULL):
    """Run every layer over the sequence (see the module's section on models).

    Args:
      drops: ``None`` or the L-1 dropout multipliers (T, B, F_k) of layers 1..L-1.
      keep: store what the backward needs.
      walk: how each cell walks time (:data:`FULL`, or :class:`_Segmented`).

    Returns:
      ``(hs, carry_T, saved)``: the last layer's outputs (T, B, F), the final carry (the
      model's structure) and, with ``keep``, ``(per-layer saved, layer inputs or None)``.
    """
    layers = layers_of(model)
    ps, cs = per_layer(model, params), per_layer(model, carry0)
    idx = reversal(mask, xs.shape[0]) if is_bidirectional(model) else None
    x, carries, saved, inputs = xs, [], [], []
    for k, layer in enumerate(layers):
        if k and drops is not None:
            x = x * drops[k - 1]
        inputs.append(x if k else None)
        if isinstance(layer, Bidirectional) and fuses_directions(layer, walk, x):
            h2, c2, s2 = jax.vmap(
                lambda p, x_, c, cell=layer.forward: walk.forward(cell, p, x_, c, mask, None, keep)
            )(_pair(*ps[k]), _pair(x, reverse_time(x, idx)), _pair(*cs[k]))
            x = merge_outputs(layer.merge, h2[0], reverse_time(h2[1], idx))
            carries.append(_unpair(c2))
            saved.append(_Paired(s2))
        elif isinstance(layer, Bidirectional):
            hf, cf, sf = walk.forward(layer.forward, ps[k][0], x, cs[k][0], mask, None, keep)
            x_b = reverse_time(x, idx)
            hb, cb, sb = walk.forward(layer.backward, ps[k][1], x_b, cs[k][1], mask, None, keep)
            x = merge_outputs(layer.merge, hf, reverse_time(hb, idx))
            carries.append((cf, cb))
            saved.append((sf, sb))
        else:
            x, c, s = walk.forward(layer, ps[k], x, cs[k], mask, resets, keep)
            carries.append(c)
            saved.append(s)
    if not keep:
        return x, from_layers(model, carries), None
    return (
        x,
        from_layers(model, carries),
        (tuple(saved), tuple(inputs) if walk.stores_inputs else None),
    )


def model_backward(model, params, xs, carry0, mask, resets, drops, saved, dhs, dcarry_t, cuts=None,
                   *, delta_clip=None, real=None, keep_deltas=False, walk=FULL):  # fmt: skip
    """The hand-written BPTT of every layer, last to first.

    Each layer's reverse scan takes the error on its outputs (from the head for the last
    layer, else the next layer's input gradient, through its dropout multiplier) and the
    error on its final carry; its input gradient goes to the layer below.

    Args:
      saved: :func:`model_forward`'s, with the same ``walk``.
      dhs: the error on the last layer's outputs: (T, B, F), an :class:`OutputError`, or
        ``None``.
      dcarry_t: the error on the final carry (the model's structure).
      cuts: (T,) bool or ``None``: truncation boundaries, the same for every layer.
      delta_clip, real, keep_deltas: as in :func:`reverse_scan`, for every cell.

    Returns:
      ``(dparams, dxs, dcarry0, deltas)``; ``deltas`` is ``None`` unless ``keep_deltas``, then
      one entry per layer (a pair for a Bidirectional layer, both in forward time).
    """
    layers = layers_of(model)
    ps, cs, dcs = per_layer(model, params), per_layer(model, carry0), per_layer(model, dcarry_t)
    per_saved, inputs = saved
    idx = reversal(mask, xs.shape[0]) if is_bidirectional(model) else None
    n = len(layers)
    grads, dcarry0, deltas = [None] * n, [None] * n, [None] * n
    for k in reversed(range(n)):
        layer = layers[k]
        if k == 0:
            x = xs
        elif inputs is not None:
            x = inputs[k]
        else:
            x = _layer_output(layers[k - 1], per_saved[k - 1], idx)
            x = x if drops is None else x * drops[k - 1]
        if isinstance(per_saved[k], _Paired):  # both directions as one scan
            g2, dx2, dc2, del2 = jax.vmap(
                lambda p, x_, c, s, dh, dc, cell=layer.forward: walk.backward(
                    cell, p, x_, c, mask, None, s, dh, dc, None, delta_clip, real,
                    keep_deltas,
                )  # fmt: skip
            )(
                _pair(*ps[k]), _pair(x, reverse_time(x, idx)), _pair(*cs[k]), per_saved[k].saved,
                _pair(*_split_error(layer, dhs, idx)), _pair(*dcs[k]),
            )  # fmt: skip
            grads[k], dcarry0[k] = _unpair(g2), _unpair(dc2)
            dx = dx2[0] + reverse_time(dx2[1], idx)
            if keep_deltas:
                del_f, del_b = _unpair(del2)
                deltas[k] = (del_f, jax.tree.map(lambda d: reverse_time(d, idx), del_b))
        elif isinstance(layer, Bidirectional):
            dh_f, dh_b = _split_error(layer, dhs, idx)
            sf, sb = per_saved[k]
            gf, dxf, dcf, del_f = walk.backward(
                layer.forward, ps[k][0], x, cs[k][0], mask, None, sf, dh_f, dcs[k][0], None,
                delta_clip, real, keep_deltas,
            )  # fmt: skip
            gb, dxb, dcb, del_b = walk.backward(
                layer.backward, ps[k][1], reverse_time(x, idx), cs[k][1], mask, None, sb, dh_b,
                dcs[k][1], None, delta_clip, real, keep_deltas,
            )  # fmt: skip
            grads[k], dcarry0[k] = (gf, gb), (dcf, dcb)
            dx = dxf + reverse_time(dxb, idx)
            if keep_deltas:
                deltas[k] = (del_f, jax.tree.map(lambda d: reverse_time(d, idx), del_b))
        else:
            grads[k], dx, dcarry0[k], deltas[k] = walk.backward(
                layer, ps[k], x, cs[k], mask, resets, per_saved[k], dhs, dcs[k], cuts,
                delta_clip, real, keep_deltas,
            )  # fmt: skip
        if k:
            dhs = dx if drops is None else dx * drops[k - 1].astype(dx.dtype)
    out_deltas = from_layers(model, deltas) if keep_deltas else None
    return from_layers(model, grads), dx, from_layers(model, dcarry0), out_deltas


# ---------------------------------------------------------------- checkpointed BPTT
# Memory-efficient BPTT (Gruslys et al. 2016, here with one level of checkpoints): the
# forward keeps only the carry entering every segment of s steps; the backward walks the
# segments in reverse, re-runs each one's forward from its checkpoint and runs the same
# hand-written reverse scan over it. Memory ~ (T/s) carries + one segment's buffers, so
# O(sqrt(T)) at s ~ sqrt(T), for one extra forward pass.


def default_segment(length: int) -> int:
    """About ``sqrt(T)``, evened out so the segments cover T with the least padding."""
    s = max(1, math.ceil(math.sqrt(length)))
    n = math.ceil(length / s)
    return math.ceil(length / n)


def _carry_units(cell) -> int:
    """Numbers per example in the cell's carry (``H`` per part for the built-in cells)."""
    leaves = jax.tree.leaves(jax.eval_shape(lambda: cell.zero_carry(1)))
    return sum(math.prod(c.shape[1:]) for c in leaves)


def stored_per_step(model, batch: int, dtype) -> int:
    """Bytes the manual backward stores per step: every cell's carry and in-place block
    buffers (input projections, then residuals, then gradients; none off the fast path),
    and the readout's error."""
    units = output_size(model)
    for cell in cells_of(model):
        units += _carry_units(cell)
        if protocol.is_fast(cell):
            units += cell.hidden_size * max(cell.n_blocks, cell.residual_blocks, cell.grad_blocks)
    return batch * units * jnp.dtype(dtype).itemsize


def segment_for_budget(model, length: int, batch: int, dtype, budget: int, *,
                       carry_dtype=None, input_size: int = 0) -> int:  # fmt: skip
    """The longest segment whose stored arrays fit ``budget`` bytes (an estimate).

    Counted: ``ceil(T/s)`` checkpoint carries (every layer's, in ``carry_dtype``, the
    params' dtype), the segment being differentiated's states and in-place block buffers
    (:func:`stored_per_step`, in ``dtype``, the compute dtype), the inputs cut into
    segments (``ceil(T/s) * s`` steps of ``input_size``) and, for each Bidirectional
    layer, its input over all T steps (the reverse direction reads it backwards). Not
    counted: the loss's own arrays and XLA's scratch (measured on XLA:CPU: the compiled
    gradient's temp memory is 1.2x to 2x this estimate). Raises ``ValueError`` when even
    the smallest fit is too big.
    """
    item = jnp.dtype(dtype).itemsize
    per_step = stored_per_step(model, batch, dtype)
    units = sum(_carry_units(c) for c in cells_of(model))
    per_carry = batch * units * jnp.dtype(carry_dtype or dtype).itemsize
    sizes = (input_size, *(output_size(layer) for layer in layers_of(model)[:-1]))
    kept = sum(
        length * batch * size * item
        for layer, size in zip(layers_of(model), sizes)
        if isinstance(layer, Bidirectional)
    )

    def need(s):
        n = math.ceil(length / s)
        return n * per_carry + s * per_step + n * s * batch * input_size * item + kept

    fits = [s for s in range(1, length + 1) if need(s) <= budget]
    if not fits:
        best = min(range(1, length + 1), key=need)
        raise ValueError(
            f"checkpointed BPTT: memory_budget={budget} bytes is too small for T={length}, "
            f"B={batch}, H={output_size(model)}; what it stores needs about {need(best)} "
            f"bytes at the least (segment={best})"
            + (f", {kept} of them the Bidirectional layers' inputs" if kept else "")
        )
    return max(fits)


def _segments(x, n: int, s: int, fill=0):
    """(T, ...) -> (n, s, ...), the tail padded with ``fill``; ``None`` stays ``None``."""
    if x is None:
        return None
    pad = n * s - x.shape[0]
    if pad:
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
    return x.reshape(n, s, *x.shape[1:])


def _unsegment(x, length: int):
    return x.reshape(-1, *x.shape[2:])[:length]


def segment_inputs(xs, mask, resets, segment: int):
    """Split ``xs``, ``mask`` and ``resets`` into ``n`` segments of ``segment`` steps.

    A T that ``segment`` does not divide is padded at the end with masked-out steps (the
    carry passes through them, they have no loss and get no gradient).
    """
    t_len, b = xs.shape[:2]
    n = math.ceil(t_len / segment)
    if mask is None and n * segment != t_len:
        mask = jnp.ones((t_len, b), bool)
    return (
        n,
        _segments(xs, n, segment),
        _segments(mask, n, segment, False),
        _segments(resets, n, segment, False),
    )


def _segment_cuts(cuts, n: int, s: int):
    return None if cuts is None else _segments(cuts, n, s, False)


def _segment_real(delta_clip, n: int, s: int, length: int):
    """(n, s) bool: the steps that exist, where padding fills the last segment and per-step
    clipping is on (padding steps must not clip the error passing through them)."""
    if delta_clip is None or n * s == length:
        return None
    return (jnp.arange(n * s) < length).reshape(n, s)


def segment_drops(drops, n: int, s: int):
    """Dropout multipliers split into segments like the inputs (padding: 1, never read)."""
    return None if drops is None else tuple(_segments(d, n, s, 1) for d in drops)


def checkpointed_forward(model, params, xs_s, carry0, mask_s, resets_s, drops_s, extras_s=None,
                         out_fn=None, outs_axis=2, consts=()):  # fmt: skip
    """The forward over segments, keeping only the carry entering each segment (every layer's).

    On a mesh the segment loop runs per device (:func:`bptt_jax._sharding.per_device`), so
    that a segment's loss is not reduced across the devices inside it.

    Args:
      xs_s, mask_s, resets_s, drops_s, extras_s: per-segment inputs, leading axes (n, s).
      out_fn: ``out_fn(hs_seg, extras_seg, consts)`` -> a per-segment output to stack (the
        outputs themselves, or the segment's loss); ``None`` for none.
      outs_axis: the batch axis of the stacked outputs (2: (n, s, B, ...)), or ``SUMMED``
        for sums over the batch (a segment's loss).
      consts: replicated arrays ``out_fn`` reads (a readout, a loss scale); functions run
        per device take them as arguments, never from a closure.

    Returns:
      ``(checkpoints, outputs, carry_T)``; ``checkpoints`` has a leading n axis.
    """
    split = batch_split(xs_s, axis=2)
    if split is not None:

        def fn(params, xs_s, carry0, mask_s, resets_s, drops_s, extras_s, consts):
            return checkpointed_forward(
                model, params, xs_s, carry0, mask_s, resets_s, drops_s, extras_s, out_fn,
                outs_axis, consts,
            )  # fmt: skip

        args = (params, xs_s, carry0, mask_s, resets_s, drops_s, extras_s, consts)
        in_axes = (None, 2, 0, 2, 2, 2, 2, None)
        return per_device(split, fn, args, in_axes, (1, outs_axis, 0))

    def body(carry, inputs):
        x, m, r, d, extra = inputs
        hs, carry_out, _ = model_forward(model, params, x, carry, m, r, d, keep=False)
        out = None if out_fn is None else out_fn(hs, extra, consts)
        return carry_out, (carry, out)

    carry_t, (checkpoints, outs) = lax.scan(
        body, like_batch(carry0, xs_s[0]), (xs_s, mask_s, resets_s, drops_s, extras_s)
    )
    return checkpoints, outs, carry_t


def checkpointed_backward(
    model, params, xs_s, mask_s, resets_s, drops_s, checkpoints, dcarry_t, cuts_s, real_s,
    cotangent_fn, extras_s, acc0, *, delta_clip=None, consts=(),
):  # fmt: skip
    """The hand-written BPTT over segments, each re-run from its checkpoint (every layer).

    Args:
      cuts_s, real_s: truncation boundaries and existing steps (see :func:`_segment_real`),
        split into segments, or ``None``.
      cotangent_fn: ``cotangent_fn(hs_seg, extras_seg, consts)`` -> ``(dhs_seg, acc_seg,
        out_seg)``:
        the error arriving at the segment's outputs from outside the recurrence, a pytree
        summed over segments (e.g. the readout's gradient) and one stacked per segment.
      acc0: zeros in the structure of ``acc_seg``.

    Returns:
      ``(dparams, dxs_s, dcarry0, acc, outs)``; ``dxs_s`` has leading axes (n, s).

    On a mesh the segment loop runs per device (:func:`bptt_jax._sharding.per_device`):
    each device sums its rows' gradients over the segments, and ``dparams`` and ``acc``
    cross the devices once, after the loop.
    """
    split = batch_split(xs_s, axis=2)
    if split is not None:

        def fn(params, xs_s, mask_s, resets_s, drops_s, checkpoints, dcarry_t, cuts_s, real_s,
               extras_s, acc0, consts):  # fmt: skip
            return checkpointed_backward(
                model, params, xs_s, mask_s, resets_s, drops_s, checkpoints, dcarry_t, cuts_s,
                real_s, cotangent_fn, extras_s, acc0, delta_clip=delta_clip, consts=consts,
            )  # fmt: skip

        args = (params, xs_s, mask_s, resets_s, drops_s, checkpoints, dcarry_t, cuts_s, real_s,
                extras_s, acc0, consts)  # fmt: skip
        in_axes = (None, 2, 2, 2, 2, 1, 0, None, None, 2, None, None)
        return per_device(split, fn, args, in_axes, (SUMMED, 2, 0, SUMMED, 2))

    def body(carry, inputs):
        dcarry, grads, acc = carry
        x, m, r, d, cut, real, ckpt, extra = inputs
        hs, _, saved = model_forward(model, params, x, ckpt, m, r, d)
        dhs, acc_seg, out = cotangent_fn(hs, extra, consts)
        g, dx, dcarry_in, _ = model_backward(
            model, params, x, ckpt, m, r, d, saved, dhs, dcarry, cut,
            delta_clip=delta_clip, real=real,
        )  # fmt: skip
        add = partial(jax.tree.map, jnp.add)
        return (dcarry_in, add(grads, g), add(acc, acc_seg)), (dx, out)

    init = vary_like((like_batch(dcarry_t, xs_s[0]), _zeros_like(params), acc0), xs_s)
    inputs = (xs_s, mask_s, resets_s, drops_s, cuts_s, real_s, checkpoints, extras_s)
    (dcarry0, grads, acc), (dxs_s, outs) = lax.scan(body, init, inputs, reverse=True)
    return grads, dxs_s, dcarry0, acc, outs


# --------------------------------------------------- truncated BPTT, chunk by chunk
# With truncate=k (and no per-step clipping) no error crosses a chunk boundary, so the
# chunks' backward passes are independent: the forward runs over a group of g chunks
# (g*k steps, sized to stay in cache), then one reverse scan of only k steps takes all g
# chunks of the group at once, as a batch of g*B rows (the step index within the chunk is
# the time axis), every layer of a stack in turn. Nothing longer than a group is ever
# stored. The head's gradient is computed during the forward for a unit cotangent and
# scaled in the backward (it is linear in it); the error on carry_T reaches only the last
# chunk, which the backward re-runs for it.

#: Bytes one group of chunks may store (states and per-step buffers): enough chunks for
#: wide batched reverse-scan steps, few enough to stay in cache and off fresh pages.
GROUP_BYTES = 2 * 2**20


def chunk_group(model, truncate: int, n_chunks: int, batch: int, dtype) -> int:
    """How many chunks of ``truncate`` steps one group holds (see :data:`GROUP_BYTES`)."""
    per_chunk = truncate * stored_per_step(model, batch, dtype)
    return max(1, min(n_chunks, GROUP_BYTES // per_chunk))


def _chunk_major(x, g: int):
    """(g*k, B, ...) -> (k, B*g, ...): chunk j's step i of example b is row i, column b*g + j.

    Example-major columns keep a batch sharded over devices sharded: each device's examples
    stay a contiguous block of columns.
    """
    if x is None:
        return None
    k = x.shape[0] // g
    x = jnp.moveaxis(x.reshape(g, k, *x.shape[1:]), 0, 2)  # (k, B, g, ...)
    return x.reshape(k, x.shape[1] * g, *x.shape[3:])


def _time_major(x, g: int):
    """The inverse of :func:`_chunk_major`: (k, B*g, ...) -> (g*k, B, ...)."""
    k, bg = x.shape[:2]
    x = jnp.moveaxis(x.reshape(k, bg // g, g, *x.shape[2:]), 2, 0)  # (g, k, B, ...)
    return x.reshape(g * k, *x.shape[2:])


def _loss_dtype(readout, xs):
    """The dtype of a loss value: the readout's (the params'), also under a policy."""
    leaves = jax.tree.leaves(readout)
    return leaves[0].dtype if leaves else xs.dtype


def _chunked_fwd(model, head, k, params, readout, xs, targets, carry0, mask, valid, resets, drops):
    t, b = xs.shape[:2]
    n_chunks = math.ceil(t / k)
    g = chunk_group(model, k, n_chunks, b, xs.dtype)
    ldt = _loss_dtype(readout, xs)
    scale = head.scale(valid, t, b, ldt)
    n, xs_s, mask_s, resets_s = segment_inputs(xs, mask, resets, g * k)
    extras = head.segment_args(targets, valid, t, b, n, g * k)
    one = jnp.ones((), ldt)
    cm = partial(_chunk_major, g=g)
    add = partial(jax.tree.map, jnp.add)

    def body(acc, inputs):
        carry, grads, d_readout, value = acc
        x, m, r, d, extra = inputs
        _, carry_out, saved = model_forward(model, params, x, carry, m, r, d)
        # The carry entering each of the g chunks, every layer: (g, B, ...) -> (B*g, ...).
        states = from_layers(model, [s[0] for s in saved[0]])
        entering = jax.tree.map(
            lambda c0, st: jnp.concatenate([c0[None], st[k - 1 :: k][: g - 1].astype(c0.dtype)]),
            carry,
            states,
        )
        flat = jax.tree.map(lambda c: jnp.moveaxis(c, 0, 1).reshape(b * g, *c.shape[2:]), entering)
        saved_c, x_c, m_c, r_c, d_c, extra_c = jax.tree.map(cm, (saved, x, m, r, d, extra))
        # The head on the chunk-major outputs: the loss and its error from one readout.
        hs_c = _layer_output(layers_of(model)[-1], saved_c[0][-1], None)
        v, dhs, d_ro, d_tg = head.segment_value_and_cotangent(readout, hs_c, *extra_c, scale, one)
        gr, dx, dcarry_in, _ = model_backward(
            model, params, x_c, flat, m_c, r_c, d_c, saved_c, dhs, _zeros_like(flat)
        )
        acc = (carry_out, add(grads, gr), add(d_readout, d_ro), value + v)
        d_tg = None if d_tg is None else _time_major(d_tg, g)
        # Chunk 0's: the error on the group's entering carry.
        dcarry_in = jax.tree.map(lambda c: c.reshape(b, g, *c.shape[1:])[:, 0], dcarry_in)
        return acc, (entering, _time_major(dx, g), d_tg, dcarry_in)

    init = (like_batch(carry0, xs), _zeros_like(params), _zeros_like(readout), jnp.zeros((), ldt))
    init = vary_like(init, xs)
    inputs = (xs_s, mask_s, resets_s, segment_drops(drops, n, g * k), extras)
    (carry_t, grads, d_readout, value), (entering, dxs_s, d_tg, dcarry_in) = lax.scan(
        body, init, inputs
    )
    # The last chunk (steps [(n_chunks - 1) k, T)), for the error on carry_T.
    last = jax.tree.map(lambda c: c.reshape(-1, *c.shape[2:])[n_chunks - 1], entering)
    nk, xs_k, mask_k, resets_k = segment_inputs(xs, mask, resets, k)
    drops_k = segment_drops(drops, nk, k)
    tail = jax.tree.map(lambda a: a[-1], (xs_k, mask_k, resets_k, drops_k))
    dcarry0 = jax.tree.map(lambda c: c[0], dcarry_in)
    d_tg = None if d_tg is None else _unsegment(d_tg, t)
    per_unit = (grads, d_readout, _unsegment(dxs_s, t), d_tg, dcarry0)
    return (value, carry_t), (per_unit, params, last, tail)


def _chunked_bwd(model, k, saved, cotangents):
    per_unit, params, last, (x, m, r, d) = saved
    g_loss, g_carry = cotangents
    grads, d_readout, dxs, d_tg, dcarry0 = jax.tree.map(lambda g: g_loss * g, per_unit)
    # The error on carry_T, back through the last chunk only.
    _, _, sv = model_forward(model, params, x, last, m, r, d)
    g, dx, _, _ = model_backward(model, params, x, last, m, r, d, sv, None, g_carry)
    grads = jax.tree.map(jnp.add, grads, g)
    t = dxs.shape[0]
    start = (math.ceil(t / k) - 1) * k  # the last chunk: steps [start, T)
    dxs = dxs.at[start:].add(dx[: t - start])
    return grads, d_readout, dxs, d_tg, dcarry0


# ------------------------------------------------------------------ the one custom_vjp
class Walk(NamedTuple):
    """How time is walked (static, hashable).

    ``kind``: ``"full"`` (one forward storing every step, one reverse scan per cell),
    ``"segmented"`` (checkpointed BPTT of the whole model, segment by segment, all layers at
    once: only the segment carries are stored) or ``"chunked"`` (truncated BPTT, chunk by
    chunk; with a head only). ``segment``: the segment length; with ``"full"`` it makes each
    cell walk its own sequence checkpointed (models with a Bidirectional layer, whose layers
    cannot be walked through time together).
    """

    kind: str = "full"
    truncate: int | None = None
    delta_clip: float | None = None
    segment: int | None = None


def _cell_walk(walk: Walk):
    return FULL if walk.segment is None else _Segmented(walk.segment)


def plan_walk(model, backward: str, truncate, delta_clip, segment, length: int, head=None) -> Walk:
    """The :class:`Walk` for a schedule (``backward``, ``truncate``, ...) of ``model``."""
    truncate = None if truncate is None or truncate >= length else truncate
    walkable = not is_bidirectional(model)
    if backward == "checkpointed":
        kind = "segmented" if walkable else "full"
        return Walk(kind, truncate, delta_clip, segment)
    if head is not None and walkable and truncate is not None and delta_clip is None:
        return Walk("chunked", truncate)
    return Walk("full", truncate, delta_clip)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def bptt(model, head, walk, params, readout, xs, targets, carry0, mask, valid, resets, drops):
    """``(outputs, carry_T)`` of ``model`` with ``head`` on top, differentiated by hand.

    The one ``jax.custom_vjp`` of the library: what is differentiated (``model``), what sits
    on top (``head``: ``None`` for the outputs ``hs`` themselves, else a loss head whose
    value is returned) and how time is walked (``walk``) are composed here.

    The head protocol (see :class:`bptt_jax.losses.LossHead`): ``value``, ``forward`` /
    ``backward`` (whole sequence), ``scale``, ``segment_args``, ``segment_value`` and
    ``segment_value_and_cotangent`` (a segment or a chunk-major group at a time).
    ``readout``/``targets``/``valid`` are the head's inputs (``None`` without one); ``drops``
    the dropout multipliers of a :class:`~bptt_jax.Stack` or ``None``.
    """
    hs, carry_t, _ = model_forward(model, params, xs, carry0, mask, resets, drops, keep=False)
    out = hs if head is None else head.value(readout, hs, targets, valid)
    return out, carry_t


def bptt_fwd(model, head, walk, params, readout, xs, targets, carry0, mask, valid, resets, drops):
    """:func:`bptt`'s forward: ``((outputs, carry_T), residuals)``."""
    out, res = _walk_fwd(
        model, head, walk, params, readout, xs, targets, carry0, mask, valid, resets, drops
    )
    # Empty slices of the differentiable inputs: their dtypes and device-variance, for
    # finish_cotangents.
    protos = jax.tree.map(lambda x: x[:0], (params, readout, xs, carry0))
    return out, (res, protos)


def bptt_bwd(model, head, walk, saved, cotangents):
    """:func:`bptt`'s hand-written backward: the cotangents of its arguments."""
    res, protos = saved
    grads, d_readout, dxs, d_tg, dcarry0 = _walk_bwd(model, head, walk, res, cotangents)
    grads, d_readout, dxs, dcarry0 = finish_cotangents((grads, d_readout, dxs, dcarry0), protos)
    return grads, d_readout, dxs, d_tg, dcarry0, None, None, None, None  # mask, valid, ...


def _walk_fwd(model, head, walk, params, readout, xs, targets, carry0, mask, valid, resets, drops):
    t, b = xs.shape[:2]
    if walk.kind == "chunked":
        return _chunked_fwd(
            model, head, walk.truncate, params, readout, xs, targets, carry0, mask, valid,
            resets, drops,
        )  # fmt: skip
    if walk.kind == "segmented":
        s = walk.segment
        n, xs_s, mask_s, resets_s = segment_inputs(xs, mask, resets, s)
        drops_s = segment_drops(drops, n, s)
        if head is None:
            extras, consts, out_fn = None, (), lambda hs, *_: hs
        else:
            scale = head.scale(valid, t, b, _loss_dtype(readout, xs))
            extras = head.segment_args(targets, valid, t, b, n, s)
            consts = (readout, scale)

            def out_fn(hs, e, consts):
                readout, scale = consts
                return head.segment_value(readout, hs, *e, scale)

        ckpt, outs, carry_t = checkpointed_forward(
            model, params, xs_s, carry0, mask_s, resets_s, drops_s, extras, out_fn,
            outs_axis=2 if head is None else SUMMED, consts=consts,
        )  # fmt: skip
        out = _unsegment(outs, t) if head is None else jnp.sum(outs)
        saved = (params, readout, xs, targets, carry0, mask, valid, resets, drops, ckpt)
        return (out, carry_t), saved
    cell_walk = _cell_walk(walk)
    hs, carry_t, saved = model_forward(
        model, params, xs, carry0, mask, resets, drops, walk=cell_walk
    )
    if head is None:
        out, head_saved, hs = hs, None, None
    else:
        out, head_saved = head.forward(readout, hs, targets, valid)
    res = (params, readout, xs, carry0, mask, resets, drops, saved, hs, head_saved)
    return (out, carry_t), res


def _walk_bwd(model, head, walk, saved, cotangents):
    if walk.kind == "chunked":
        return _chunked_bwd(model, walk.truncate, saved, cotangents)
    g_out, g_carry = cotangents
    if walk.kind == "segmented":
        params, readout, xs, targets, carry0, mask, valid, resets, drops, ckpt = saved
        t, b = xs.shape[:2]
        s = walk.segment
        n, xs_s, mask_s, resets_s = segment_inputs(xs, mask, resets, s)
        if head is None:
            extras, acc0, consts = _segments(g_out, n, s), (), ()

            def cotangent(hs, dh, _):
                return dh, (), None
        else:
            scale = head.scale(valid, t, b, _loss_dtype(readout, xs))
            extras = head.segment_args(targets, valid, t, b, n, s)
            acc0, consts = _zeros_like(readout), (readout, scale, g_out)

            def cotangent(hs, e, consts):
                readout, scale, g_out = consts
                _, dhs, d_ro, d_tg = head.segment_value_and_cotangent(readout, hs, *e, scale, g_out)
                return dhs, d_ro, d_tg

        grads, dxs_s, dcarry0, d_readout, d_tg = checkpointed_backward(
            model, params, xs_s, mask_s, resets_s, segment_drops(drops, n, s), ckpt, g_carry,
            _segment_cuts(truncation_cuts(t, walk.truncate), n, s),
            _segment_real(walk.delta_clip, n, s, t), cotangent, extras, acc0,
            delta_clip=walk.delta_clip, consts=consts,
        )  # fmt: skip
        d_tg = None if d_tg is None else _unsegment(d_tg, t)
        d_readout = None if head is None else d_readout
        return grads, d_readout, _unsegment(dxs_s, t), d_tg, dcarry0
    params, readout, xs, carry0, mask, resets, drops, fsaved, hs, head_saved = saved
    if head is None:
        dhs, d_readout, d_tg = g_out, None, None
    else:
        dhs, d_readout, d_tg = head.backward(readout, hs, head_saved, g_out)
    grads, dxs, dcarry0, _ = model_backward(
        model, params, xs, carry0, mask, resets, drops, fsaved, dhs, g_carry,
        truncation_cuts(xs.shape[0], walk.truncate), delta_clip=walk.delta_clip,
        walk=_cell_walk(walk),
    )  # fmt: skip
    return grads, d_readout, dxs, d_tg, dcarry0


bptt.defvjp(bptt_fwd, bptt_bwd)


def resolve_segment(fn: str, model, xs, dtype, segment, memory_budget, backward) -> int:
    """The segment length of ``backward="checkpointed"``, from ``segment`` or a budget.

    ``xs`` in the compute dtype (what is stored per step), ``dtype`` the params' (the
    carries')."""
    segment = validation.check_positive(fn, "segment", segment, kind=int)
    memory_budget = validation.check_positive(fn, "memory_budget", memory_budget, kind=int)
    t_len, b = xs.shape[:2]
    if segment is not None and memory_budget is not None:
        raise ValueError(f"{fn}: give segment or memory_budget, not both")
    for name, value in (("segment", segment), ("memory_budget", memory_budget)):
        if value is not None and backward != "checkpointed":  # else silently full BPTT
            raise ValueError(
                f"{fn}: {name}={value} applies to backward='checkpointed' only; got "
                f"backward={backward!r}, which stores every step. Pass "
                f"backward='checkpointed' with it, or drop {name}."
            )
    if memory_budget is not None:
        return segment_for_budget(
            model, t_len, b, xs.dtype, memory_budget, carry_dtype=dtype, input_size=xs.shape[2]
        )
    return default_segment(t_len) if segment is None else min(segment, t_len)


def dropout_multipliers(fn: str, model, key, xs):
    """The dropout multipliers of a :class:`~bptt_jax.Stack` for ``key``, or ``None``."""
    if key is None or not isinstance(model, Stack):
        return None
    if not (isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)):
        if not (isinstance(key, jax.Array) and key.dtype == jnp.uint32 and key.shape == (2,)):
            raise TypeError(
                f"{fn}: dropout_key must be a PRNG key (jax.random.key(seed)); got "
                f"{type(key).__name__}{getattr(key, 'shape', '')}"
            )
    out = time_major_sharding(xs)  # drawn per device under an Explicit mesh
    return model.dropout_masks(key, xs.shape[0], xs.shape[1], xs.dtype, out_sharding=out)


# ------------------------------------------------------------- the autodiff reference
@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _clip_cotangent(carry, threshold):
    """Identity whose VJP clips the cotangent like :func:`clip_delta` (autodiff path)."""
    return carry


def _clip_cotangent_fwd(carry, threshold):
    return carry, None


def _clip_cotangent_bwd(threshold, _, g):
    return (clip_delta(g, threshold),)


_clip_cotangent.defvjp(_clip_cotangent_fwd, _clip_cotangent_bwd)


def _scan_autodiff(cell, params, xs, carry0, mask, truncate, resets, delta_clip):
    cuts = truncation_cuts(xs.shape[0], truncate)

    def body(carry, inputs):
        x_t, m_t, cut_t, r_t = inputs
        if cut_t is not None:
            carry = jax.tree.map(lambda c: jnp.where(cut_t, lax.stop_gradient(c), c), carry)
        carry = _reset(r_t, carry)
        # under a policy x_t in the carry's dtype; the step's matmuls cast it to the kernels'
        x_t = x_t.astype(jax.tree.leaves(carry)[0].dtype)
        new, _ = cell.step(params, carry, x_t)
        if m_t is not None:
            new = _select(m_t, new, carry)
        if delta_clip is not None:
            new = _clip_cotangent(new, delta_clip)
        return new, protocol.hidden(cell, new).astype(xs.dtype)

    carry_t, hs = lax.scan(body, like_batch(carry0, xs), (xs, mask, cuts, resets))
    return hs, carry_t


def unroll_autodiff(model, params, xs, carry0, mask=None, truncate=None, resets=None,
                    delta_clip=None, drops=None):  # fmt: skip
    """``backward="autodiff"``: plain per-step ``lax.scan`` s with no custom rule.

    This is the loop a user would write, layer by layer; ``jax.grad`` derives its backward.
    Truncation is ``lax.stop_gradient`` on the carry entering steps k, 2k, ...; a reset
    replaces the carry by zeros; ``delta_clip`` wraps each new carry in an identity whose
    VJP clips the error arriving at it. Under a precision policy (``xs`` in a compute dtype
    narrower than the params'), the kernels are cast to it and each step's matmuls run as
    the policy says; autodiff differentiates the casts.
    """
    params = precision.compute_params(params, xs.dtype)
    layers = layers_of(model)
    ps, cs = per_layer(model, params), per_layer(model, carry0)
    idx = reversal(mask, xs.shape[0]) if is_bidirectional(model) else None
    x, carries = xs, []
    for k, layer in enumerate(layers):
        if k and drops is not None:
            x = x * drops[k - 1]
        if isinstance(layer, Bidirectional):
            hf, cf = _scan_autodiff(layer.forward, ps[k][0], x, cs[k][0], mask, None, None,
                                    delta_clip)  # fmt: skip
            hb, cb = _scan_autodiff(layer.backward, ps[k][1], reverse_time(x, idx), cs[k][1],
                                    mask, None, None, delta_clip)  # fmt: skip
            x = merge_outputs(layer.merge, hf, reverse_time(hb, idx))
            carries.append((cf, cb))
        else:
            x, c = _scan_autodiff(layer, ps[k], x, cs[k], mask, truncate, resets, delta_clip)
            carries.append(c)
    return x, from_layers(model, carries)


def unroll(
    model,
    params,
    xs,
    carry0=None,
    *,
    mask=None,
    resets=None,
    truncate=None,
    delta_clip=None,
    backward="manual",
    segment=None,
    memory_budget=None,
    dropout_key=None,
    compute_dtype=None,
):
    """Run a cell or model over a time-major sequence; ``jax.grad`` uses the hand-written BPTT.

    For a cell, equivalent to::

        def unroll(cell, params, xs, carry):
            hs = []
            for t in range(T):
                new, h = cell.step(params, carry, xs[t])
                carry = new if mask is None else where(mask[t], new, carry)
                hs.append(hidden(carry))  # cell.hidden(carry), or the carry itself
            return stack(hs), carry

    but compiled as one ``lax.scan`` (for the built-in cells with the input projection
    hoisted out of the loop), and differentiated by a hand-written reverse scan (a
    ``jax.custom_vjp``) that returns real cotangents for ``params``, ``xs`` and ``carry0``,
    so any loss built on ``hs`` and ``carry_T`` gets the manual backward under ``jax.grad``.
    A cell of your own (:mod:`bptt_jax.cells.protocol`) gets the same sequence-level BPTT,
    each step's backward being its ``step_backward`` or ``jax.vjp`` of its ``step``. A
    :class:`~bptt_jax.Stack` runs its layers in turn, each on the previous one's outputs; a
    :class:`~bptt_jax.Bidirectional` runs its second cell over each sequence's reversed valid
    prefix and merges the outputs. Forward-mode AD (``jax.jvp``, ``jax.jacfwd``) cannot pass
    a ``custom_vjp``: use ``backward="autodiff"`` for it.

    Args:
      model: a cell (:class:`~bptt_jax.Elman`, :class:`~bptt_jax.LSTM`,
        :class:`~bptt_jax.GRU`, or any :class:`~bptt_jax.cells.Cell`), a
        :class:`~bptt_jax.Bidirectional` or a :class:`~bptt_jax.Stack`.
      params: the model's params (``model.init(key, D)``).
      xs: inputs, time-major ``(T, B, D)``, the params' dtype.
      carry0: initial carry (a cell's: ``(B, H)`` or ``LSTMCarry(h, c)``; a model's: see
        :mod:`bptt_jax.models`); ``None`` for zeros.
      mask: optional ``(T, B)`` 0/1 or bool. Sequences are right-padded: at a step where the
        mask is 0 the carry passes through unchanged, so ``hs[t]`` repeats the last valid
        state and ``carry_T`` is each sequence's last valid state. A bidirectional layer
        reverses each sequence's first ``sum_t mask[t, b]`` steps, so a bidirectional model
        needs right-padded masks (a left-padded one is a ``ValueError`` when the mask is
        concrete, i.e. not traced by ``jit``).
      resets: optional ``(T, B)`` bool, for streams of concatenated sequences: where set, a
        new sequence starts at step t, so the carry entering step t is replaced by zeros
        (before the mask applies) and no error flows back across it. Every layer resets.
        Undefined for bidirectional models (``ValueError``).
      truncate: ``None`` for full BPTT, or k: truncated BPTT in chunks ``[0, k), [k, 2k),
        ...``; the forward is unchanged and the backward drops the error on every layer's
        carry entering steps k, 2k, ... (exactly ``lax.stop_gradient`` there). ``carry0``
        still gets the first chunk's gradient. ``truncate >= T`` is full BPTT. Undefined for
        bidirectional models (``ValueError``).
      delta_clip: optional positive threshold for per-step clipping of the error inside the
        backward: at every step t, each example's ``delta_t`` (``dL/dh_t`` from outside plus
        the error from step t+1; ``h`` and ``c`` together for the LSTM; each cell of a model
        on its own) is scaled to norm at most ``delta_clip`` before it travels further back.
        Tames exploding gradients at their source; the result is then no longer the exact
        gradient. ``None``: off.
      backward: ``"manual"`` (the hand-written BPTT, every state stored), ``"checkpointed"``
        (the same hand-written BPTT storing only the carries entering every ``segment``-th
        step, every layer's, and re-running each segment's forward during the backward:
        identical gradients, memory O(L (T/s + s)) instead of O(L T), one extra forward
        pass; Gruslys et al. 2016; a model with a bidirectional layer checkpoints each cell
        on its own and keeps each layer's input) or ``"autodiff"`` (plain ``lax.scan`` s
        that JAX differentiates).
      segment: for ``"checkpointed"``: steps per segment; ``None`` for about ``sqrt(T)``.
        With another ``backward`` a ``ValueError`` (it would be ignored).
      memory_budget: for ``"checkpointed"``, instead of ``segment``: bytes the stored
        checkpoints and one segment's buffers may take; the longest segment that fits is
        used (:func:`segment_for_budget`). With another ``backward`` a ``ValueError``.
      dropout_key: a PRNG key for a :class:`~bptt_jax.Stack` 's dropout between layers
        (:meth:`~bptt_jax.Stack.dropout_masks`); ``None``: no dropout.
      compute_dtype: ``None`` (compute in the params' dtype) or a narrower floating dtype,
        e.g. ``jnp.bfloat16``: matmul operands and stored residuals in it, carries, errors
        and sums in the params' dtype (:mod:`bptt_jax.precision`).

    Returns:
      ``(hs, carry_T)``: the (last layer's) outputs ``(T, B, F)``, in the compute dtype, and
      the final carry, in the params' dtype.

    Raises:
      ValueError / TypeError at trace time for wrong shapes, dtypes, carry structure or
      options.

    Example:
      >>> import jax, jax.numpy as jnp, bptt_jax
      >>> cell = bptt_jax.GRU(8)
      >>> params = cell.init(jax.random.key(0), input_size=4)
      >>> xs = jax.random.normal(jax.random.key(1), (12, 3, 4))
      >>> loss = lambda p: jnp.sum(bptt_jax.unroll(cell, p, xs)[0] ** 2)
      >>> grads = jax.grad(loss)(params)       # hand-written backward
      >>> type(grads).__name__
      'GRUParams'

    References:
      Werbos, "Backpropagation through time: what it does and how to do it", Proc. IEEE 1990.
    """
    fn = "unroll"
    validation.check_choice(fn, "backward", backward, BACKWARDS)
    xs, carry0, mask, resets, dtype = validation.check_model_args(
        fn, model, params, xs, carry0, mask, truncate, resets, compute_dtype
    )
    validation.check_positive(fn, "delta_clip", delta_clip)
    seg = resolve_segment(fn, model, xs, dtype, segment, memory_budget, backward)
    drops = dropout_multipliers(fn, model, dropout_key, xs)
    if backward == "autodiff":
        return unroll_autodiff(model, params, xs, carry0, mask, truncate, resets, delta_clip,
                               drops)  # fmt: skip
    walk = plan_walk(model, backward, truncate, delta_clip, seg, xs.shape[0])
    return bptt(model, None, walk, params, None, xs, None, carry0, mask, None, resets, drops)
