"""The sequence engine: forward scan, hand-written reverse scan, and :func:`unroll`.

Written once for every cell. A cell contributes its step forward and its step backward (see
:mod:`bptt_jax.cells._common`); the engine does the rest:

* the input projection ``x_t W_x + b`` for all ``T`` steps is one ``(T*B, D) @ (D, G*H)``
  matmul before the forward scan, so each step only does the recurrent ``(B, H) @ (H, G*H)``;
* the forward ``lax.scan`` stacks the states (for the backward and as the output ``hs``) and
  the cell's residuals, nothing else;
* the backward is a ``lax.scan(..., reverse=True)`` carrying ``delta^h_{t+1}`` (the error on
  the state) from ``t = T`` down to ``1``; each step emits the gradient of its pre-activations;
* every shared-weight gradient, summed over all steps, and ``dxs`` are then single matmuls over
  the ``T*B`` rows: ``dW_h = H_prev^T dA``, ``dW_x = X^T dA``, ``db = sum dA``, ``dX = dA W_x^T``.

Masks (right-padded variable-length batches) and truncation are handled here, for all cells.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bptt_jax import validation

BACKWARDS = ("manual", "checkpointed", "autodiff")


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
    return dy @ w.T


def _select(m, a, b):
    """Per-example select over a carry pytree: ``a`` where ``m`` (B,) is set, else ``b``."""
    return jax.tree.map(lambda x, y: jnp.where(m[:, None], x, y), a, b)


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
    sq = sum(jnp.sum(g * g, axis=-1) for g in jax.tree.leaves(dstate))  # (B,)
    norm = jnp.sqrt(sq)
    scale = jnp.where(norm > threshold, threshold / jnp.where(norm > 0, norm, 1), 1)
    return jax.tree.map(lambda g: g * scale[:, None].astype(g.dtype), dstate)


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
    t, b, d = xs.shape
    x2d = xs.reshape(t * b, d)
    return tuple(
        (x2d @ w).reshape(t, b, -1) for w in _blocks(cell.input_kernel(params), cell.n_blocks)
    )


def _index(x, t):
    return lax.dynamic_index_in_dim(x, t, 0, keepdims=False)


def _write(buf, row, t):
    return lax.dynamic_update_index_in_dim(buf, row, t, 0)


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
      gradients over all of them); ``None`` when ``keep_residuals`` is False.
    """
    n_res = cell.residual_blocks if keep_residuals else 0
    xp = project_inputs(cell, params, xs)
    # Residual i overwrites input projection i in place; extra residuals get fresh buffers.
    n_in = min(cell.n_blocks, n_res)
    bufs0 = xp[:n_in] + _fresh(n_res - n_in, xp[0])
    bias = _blocks(cell.input_bias(params), cell.n_blocks)

    def body(scan_carry, inputs):
        carry, bufs = scan_carry
        t, xp_rest, m_t, r_t = inputs
        xp_t = tuple(a + b for a, b in zip(_rows(bufs[:n_in], t) + xp_rest, bias))
        carry = _reset(r_t, carry)
        new, res = cell.forward(params, carry, xp_t)
        if m_t is not None:  # padded step: the carry passes through unchanged
            new = _select(m_t, new, carry)
        if n_res:
            bufs = tuple(_write(buf, r, t) for buf, r in zip(bufs, res))
        return (new, bufs), new

    ts = jnp.arange(xs.shape[0])
    (carry_t, bufs), states = lax.scan(body, (carry0, bufs0), (ts, xp[n_in:], mask, resets))
    if not keep_residuals:
        return states, None, carry_t
    return states, bufs + xp[n_in:], carry_t


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
      returns from the error on the whole carry at each step.
    """
    hs = cell.hidden(states)
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
    n_in = min(n_res, n_grad)
    res_rest = bufs[n_in:n_res]

    def body(scan_carry, inputs):
        dstate, out, res_next = scan_carry
        t, state_t, dh_t, m_t, cut_t, r_t, real_t, res_t_rest = inputs
        res_t = res_next + res_t_rest
        # The carry entering step t: carry0 at t = 0, else the state after step t-1.
        prev_t = jax.tree.map(
            lambda c0, s: jnp.where(t == 0, c0, _index(s, jnp.maximum(t - 1, 0))),
            carry0,
            states,
        )
        prev_t = _reset(r_t, prev_t)
        if out_w is not None:  # dh_t is the readout's dy_t
            dh_t = dh_t @ out_w.T
        if dh_t is not None:
            dstate = cell.add_to_hidden(dstate, dh_t)
        if delta_clip is not None:
            clipped = clip_delta(dstate, delta_clip)
            dstate = clipped if real_t is None else _select_all(real_t, clipped, dstate)
        delta_h = None
        if keep_deltas:
            delta_h = keep_deltas(dstate) if callable(keep_deltas) else cell.hidden(dstate)
        if m_t is None:
            dprev, dcols = cell.backward(params, res_t, state_t, prev_t, dstate, w_t)
        else:  # padded step: its error goes straight to the previous carry
            zeros = _zeros_like(dstate)
            dprev, dcols = cell.backward(
                params, res_t, state_t, prev_t, _select(m_t, dstate, zeros), w_t
            )
            dprev = jax.tree.map(jnp.add, dprev, _select(m_t, zeros, dstate))
        if cut_t is not None:
            dprev = jax.tree.map(lambda g: jnp.where(cut_t, jnp.zeros_like(g), g), dprev)
        if r_t is not None:  # the carry was replaced by zeros: nothing flows further back
            dprev = _select(r_t, _zeros_like(dprev), dprev)
        out = tuple(_write(buf, d, t) for buf, d in zip(out, dcols))
        # The residuals of step t-1, read after this step's write.
        res_next = _rows(out[:n_in], jnp.maximum(t - 1, 0))
        return (dprev, out, res_next), delta_h

    ts = jnp.arange(hs.shape[0])
    init = (dcarry_t, out0, _rows(out0[:n_in], hs.shape[0] - 1))
    (dcarry0, dcols, _), deltas = lax.scan(
        body, init, (ts, states, dhs, mask, cuts, resets, real, res_rest), reverse=True
    )
    return dcarry0, dcols, deltas


def weight_grads(cell, params, xs, carry0, states, dcols, resets=None):
    """Every shared-weight gradient, summed over all steps, as matmuls over the T*B rows.

    ``dcols`` is the reverse scan's tuple of pre-activation gradients. Returns
    ``(dparams, dxs)``: per gate, ``dW_x = X^T dA``, ``dW_h = H_prev^T dA``, ``db = sum dA``
    (assembled by the cell) and ``dX = sum_gates dA W_x^T``.
    """
    t_len, b, d = xs.shape
    h = cell.hidden_size
    rows = t_len * b
    da = [g.reshape(rows, h) for g in dcols]
    h_prev = jnp.concatenate([cell.hidden(carry0)[None], cell.hidden(states)[:-1]], 0)
    if resets is not None:
        h_prev = jnp.where(resets[..., None], 0, h_prev)
    x2d, h2d = xs.reshape(rows, d), h_prev.reshape(rows, h)

    def side(a2d, blocks):
        cat = (lambda parts: jnp.concatenate(parts, -1)) if len(blocks) > 1 else (lambda p: p[0])
        a_t = a2d.T
        if len(blocks) > 1:
            # Transposed once, row-major, for all the gates' matmuls: XLA:CPU's matmul is
            # slower with a transpose folded in (time: LSTM B=64, H=256, T=256 -2%; LSTM
            # and GRU B=32, H=128, T=100 -3%).
            a_t = lax.optimization_barrier(a_t)
        return cat([a_t @ da[k] for k in blocks]), cat([da[k].sum(0) for k in blocks])

    dw_x, db_x = side(x2d, cell.input_grads)  # sum_t x_t^T dA_t, sum_t dA_t
    dw_h, db_h = side(h2d, cell.recurrent_grads)  # sum_t h_{t-1}^T dA_t
    grads = cell.assemble_grads(params, dw_x, dw_h, db_x, db_h)
    w_x = _blocks(cell.input_kernel(params), cell.n_blocks)
    dxs = sum(da[k] @ w.T for k, w in zip(cell.input_grads, w_x))
    return grads, dxs.reshape(t_len, b, d)


def backward(
    cell,
    params,
    xs,
    carry0,
    mask,
    states,
    res,
    dhs,
    dcarry_t,
    truncate,
    *,
    resets=None,
    delta_clip=None,
    return_deltas=False,
):
    """The hand-written BPTT: reverse scan over time, then the summed weight gradients.

    Args:
      dhs: ``dL/dh_t`` arriving from outside the recurrence (readout, user loss), (T, B, H);
        ``None`` for no such cotangent.
      dcarry_t: cotangent of the final carry.
      truncate: ``None`` (full BPTT) or k: the error on the carry entering steps k, 2k, ...
        is dropped, exactly as ``lax.stop_gradient`` on those carries would.
      resets: optional (T, B) bool; the carry entering a reset step was zeros, so no error
        flows back across it.
      delta_clip: optional threshold: each example's error on the carry, ``delta_t`` (the
        external ``dL/dh_t`` plus the error from step t+1), is scaled to norm at most this
        before it enters step t's backward (see :func:`clip_delta`).
      return_deltas: also return ``delta^h_t`` (T, B, H).

    Returns:
      ``(dparams, dxs, dcarry0)``, plus ``deltas`` when ``return_deltas``.
    """
    cuts = truncation_cuts(xs.shape[0], truncate)
    dcarry0, dcols, deltas = reverse_scan(
        cell,
        params,
        carry0,
        mask,
        states,
        res,
        dhs,
        dcarry_t,
        cuts,
        resets=resets,
        delta_clip=delta_clip,
        keep_deltas=return_deltas,
    )
    grads, dxs = weight_grads(cell, params, xs, carry0, states, dcols, resets)
    if return_deltas:
        return grads, dxs, dcarry0, deltas
    return grads, dxs, dcarry0


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


def stored_per_step(cell, batch: int, dtype) -> int:
    """Bytes the manual backward stores per step: the carry parts, the in-place block
    buffers (input projections, then residuals, then gradients) and the readout's error."""
    carry_parts = len(jax.tree.leaves(jax.eval_shape(lambda: cell.zero_carry(1))))
    blocks = max(cell.n_blocks, cell.residual_blocks, cell.grad_blocks)
    return batch * cell.hidden_size * (carry_parts + blocks + 1) * jnp.dtype(dtype).itemsize


def segment_for_budget(cell, length: int, batch: int, dtype, budget: int) -> int:
    """The longest segment whose stored buffers fit ``budget`` bytes (estimate).

    Stored: ``ceil(T/s)`` checkpoint carries, plus for the segment being differentiated its
    states and its in-place block buffers: ``s * B * H * (carry parts + max(gate, residual,
    grad blocks) + 1)`` numbers. Raises ``ValueError`` when even the smallest fit is too big.
    """
    carry_parts = len(jax.tree.leaves(jax.eval_shape(lambda: cell.zero_carry(1))))
    per_step = stored_per_step(cell, batch, dtype)
    per_carry = batch * cell.hidden_size * carry_parts * jnp.dtype(dtype).itemsize

    def need(s):
        return math.ceil(length / s) * per_carry + s * per_step

    fits = [s for s in range(1, length + 1) if need(s) <= budget]
    if not fits:
        best = min(range(1, length + 1), key=need)
        raise ValueError(
            f"checkpointed BPTT: memory_budget={budget} bytes is too small for T={length}, "
            f"B={batch}, H={cell.hidden_size}; the least it can use is about {need(best)} "
            f"bytes (segment={best})"
        )
    return max(fits)


def _segments(x, n: int, s: int, fill=0):
    """(T, ...) -> (n, s, ...), the tail padded with ``fill``; ``None`` stays ``None``."""
    if x is None:
        return None
    pad = n * s - x.shape[0]
    if pad:
        x = jnp.concatenate([x, jnp.full((pad, *x.shape[1:]), fill, x.dtype)])
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


def checkpointed_forward(cell, params, xs_s, carry0, mask_s, resets_s, extras_s=None, out_fn=None):
    """The forward over segments, keeping only each segment's entering carry.

    Args:
      xs_s, mask_s, resets_s, extras_s: per-segment inputs, leading axes (n, s).
      out_fn: ``out_fn(states_seg, extras_seg)`` -> a per-segment output to stack (e.g. the
        hidden states, or the segment's loss); ``None`` for none.

    Returns:
      ``(checkpoints, outputs, carry_T)``; ``checkpoints`` has a leading n axis.
    """

    def body(carry, inputs):
        x, m, r, extra = inputs
        states, _, carry_out = forward(cell, params, x, carry, m, keep_residuals=False, resets=r)
        out = None if out_fn is None else out_fn(states, extra)
        return carry_out, (carry, out)

    carry_t, (checkpoints, outs) = lax.scan(body, carry0, (xs_s, mask_s, resets_s, extras_s))
    return checkpoints, outs, carry_t


def checkpointed_backward(
    cell,
    params,
    xs_s,
    mask_s,
    resets_s,
    checkpoints,
    dcarry_t,
    truncate,
    cotangent_fn,
    extras_s,
    acc0,
    *,
    length: int,
    delta_clip=None,
):
    """The hand-written BPTT over segments, each re-run from its checkpoint.

    Args:
      cotangent_fn: ``cotangent_fn(states_seg, extras_seg)`` -> ``(dhs_seg, acc_seg, out_seg)``:
        the error arriving at the segment's hidden states from outside the recurrence, a
        pytree summed over segments (e.g. the readout's gradient) and one stacked per segment.
      acc0: zeros in the structure of ``acc_seg``.
      length: the unpadded T (for the truncation boundaries).

    Returns:
      ``(dparams, dxs_s, dcarry0, acc, outs)``; ``dxs_s`` has leading axes (n, s).
    """
    n, s = xs_s.shape[:2]
    cuts = truncation_cuts(length, truncate)
    cuts_s = None if cuts is None else _segments(cuts, n, s, False)
    # Steps added to fill the last segment must not clip the error passing through them.
    real_s = None
    if delta_clip is not None and n * s != length:
        real_s = (jnp.arange(n * s) < length).reshape(n, s)

    def body(carry, inputs):
        dcarry, grads, acc = carry
        x, m, r, cut, real, ckpt, extra = inputs
        states, res, _ = forward(cell, params, x, ckpt, m, resets=r)
        dhs, acc_seg, out = cotangent_fn(states, extra)
        dcarry_in, dcols, _ = reverse_scan(
            cell,
            params,
            ckpt,
            m,
            states,
            res,
            dhs,
            dcarry,
            cut,
            resets=r,
            delta_clip=delta_clip,
            real=real,
        )
        g, dx = weight_grads(cell, params, x, ckpt, states, dcols, r)
        return (dcarry_in, jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, acc, acc_seg)), (
            dx,
            out,
        )

    init = (dcarry_t, _zeros_like(params), acc0)
    inputs = (xs_s, mask_s, resets_s, cuts_s, real_s, checkpoints, extras_s)
    (dcarry0, grads, acc), (dxs_s, outs) = lax.scan(body, init, inputs, reverse=True)
    return grads, dxs_s, dcarry0, acc, outs


# ---------------------------------------------------------------------------- unroll
@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _unroll_manual(cell, truncate, delta_clip, params, xs, carry0, mask, resets):
    states, _, carry_t = forward(
        cell, params, xs, carry0, mask, keep_residuals=False, resets=resets
    )
    return cell.hidden(states), carry_t


def _unroll_fwd(cell, truncate, delta_clip, params, xs, carry0, mask, resets):
    states, res, carry_t = forward(cell, params, xs, carry0, mask, resets=resets)
    return (cell.hidden(states), carry_t), (params, xs, carry0, mask, resets, states, res)


def _unroll_bwd(cell, truncate, delta_clip, saved, cotangents):
    params, xs, carry0, mask, resets, states, res = saved
    dhs, dcarry_t = cotangents
    grads, dxs, dcarry0 = backward(
        cell,
        params,
        xs,
        carry0,
        mask,
        states,
        res,
        dhs,
        dcarry_t,
        truncate,
        resets=resets,
        delta_clip=delta_clip,
    )
    return grads, dxs, dcarry0, None, None


_unroll_manual.defvjp(_unroll_fwd, _unroll_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _unroll_checkpointed(cell, truncate, delta_clip, segment, params, xs, carry0, mask, resets):
    out, _ = _unroll_checkpointed_fwd(
        cell, truncate, delta_clip, segment, params, xs, carry0, mask, resets
    )
    return out


def _unroll_checkpointed_fwd(cell, truncate, delta_clip, segment, params, xs, carry0, mask, resets):
    _, xs_s, mask_s, resets_s = segment_inputs(xs, mask, resets, segment)
    checkpoints, hs_s, carry_t = checkpointed_forward(
        cell, params, xs_s, carry0, mask_s, resets_s, out_fn=lambda st, _: cell.hidden(st)
    )
    out = (_unsegment(hs_s, xs.shape[0]), carry_t)
    return out, (params, xs, carry0, mask, resets, checkpoints)


def _unroll_checkpointed_bwd(cell, truncate, delta_clip, segment, saved, cotangents):
    params, xs, carry0, mask, resets, checkpoints = saved
    dhs, dcarry_t = cotangents
    n, xs_s, mask_s, resets_s = segment_inputs(xs, mask, resets, segment)
    grads, dxs_s, dcarry0, _, _ = checkpointed_backward(
        cell,
        params,
        xs_s,
        mask_s,
        resets_s,
        checkpoints,
        dcarry_t,
        truncate,
        lambda states, dh: (dh, (), None),
        _segments(dhs, n, segment),
        (),
        length=xs.shape[0],
        delta_clip=delta_clip,
    )
    return grads, _unsegment(dxs_s, xs.shape[0]), dcarry0, None, None


_unroll_checkpointed.defvjp(_unroll_checkpointed_fwd, _unroll_checkpointed_bwd)


def resolve_segment(fn: str, cell, xs, dtype, segment, memory_budget) -> int:
    """The segment length of ``backward="checkpointed"``, from ``segment`` or a budget."""
    validation.check_positive(fn, "segment", segment, kind=int)
    validation.check_positive(fn, "memory_budget", memory_budget, kind=int)
    t_len, b = xs.shape[:2]
    if segment is not None and memory_budget is not None:
        raise ValueError(f"{fn}: give segment or memory_budget, not both")
    if memory_budget is not None:
        return segment_for_budget(cell, t_len, b, dtype, memory_budget)
    return default_segment(t_len) if segment is None else min(segment, t_len)


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _clip_cotangent(carry, threshold):
    """Identity whose VJP clips the cotangent like :func:`clip_delta` (autodiff reference)."""
    return carry


def _clip_cotangent_fwd(carry, threshold):
    return carry, None


def _clip_cotangent_bwd(threshold, _, g):
    return (clip_delta(g, threshold),)


_clip_cotangent.defvjp(_clip_cotangent_fwd, _clip_cotangent_bwd)


def unroll_autodiff(
    cell, params, xs, carry0, mask=None, truncate=None, resets=None, delta_clip=None
):
    """The reference: a plain per-step ``lax.scan`` with no custom rule.

    This is the loop a user would write; ``jax.grad`` derives its backward. Truncation is
    ``lax.stop_gradient`` on the carry entering steps k, 2k, ...; a reset replaces the
    carry by zeros; ``delta_clip`` wraps each new carry in an identity whose VJP clips the
    error arriving at it.
    """
    cuts = truncation_cuts(xs.shape[0], truncate)

    def body(carry, inputs):
        x_t, m_t, cut_t, r_t = inputs
        if cut_t is not None:
            carry = jax.tree.map(lambda c: jnp.where(cut_t, lax.stop_gradient(c), c), carry)
        carry = _reset(r_t, carry)
        new, _ = cell.step(params, carry, x_t)
        if m_t is not None:
            new = _select(m_t, new, carry)
        if delta_clip is not None:
            new = _clip_cotangent(new, delta_clip)
        return new, cell.hidden(new)

    carry_t, hs = lax.scan(body, carry0, (xs, mask, cuts, resets))
    return hs, carry_t


def unroll(
    cell,
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
):
    """Run ``cell`` over a time-major sequence; ``jax.grad`` uses the hand-written BPTT.

    Equivalent to::

        def unroll(cell, params, xs, carry):
            hs = []
            for t in range(T):
                new, h = cell.step(params, carry, xs[t])
                carry = new if mask is None else where(mask[t], new, carry)
                hs.append(cell.hidden(carry))
            return stack(hs), carry

    but compiled as one ``lax.scan`` with the input projection hoisted out of the loop, and
    differentiated by a hand-written reverse scan (a ``jax.custom_vjp``) that returns real
    cotangents for ``params``, ``xs`` and ``carry0``, so any loss built on ``hs`` and
    ``carry_T`` gets the manual backward under ``jax.grad``. Forward-mode AD (``jax.jvp``,
    ``jax.jacfwd``) cannot pass a ``custom_vjp``: use ``backward="autodiff"`` for it.

    Args:
      cell: a :class:`~bptt_jax.Elman`, :class:`~bptt_jax.LSTM` or :class:`~bptt_jax.GRU`.
      params: the cell's params (``cell.init(key, D)``).
      xs: inputs, time-major ``(T, B, D)``, the params' dtype.
      carry0: initial carry (``(B, H)``, or ``LSTMCarry(h, c)``); ``None`` for zeros.
      mask: optional ``(T, B)`` 0/1 or bool. Sequences are right-padded: at a step where the
        mask is 0 the carry passes through unchanged, so ``hs[t]`` repeats the last valid
        state and ``carry_T`` is each sequence's last valid state.
      resets: optional ``(T, B)`` bool, for streams of concatenated sequences: where set, a
        new sequence starts at step t, so the carry entering step t is replaced by zeros
        (before the mask applies) and no error flows back across it.
      truncate: ``None`` for full BPTT, or k: truncated BPTT in chunks ``[0, k), [k, 2k),
        ...``; the forward is unchanged and the backward drops the error on the carry
        entering steps k, 2k, ... (exactly ``lax.stop_gradient`` there). ``carry0`` still
        gets the first chunk's gradient. ``truncate >= T`` is full BPTT.
      delta_clip: optional positive threshold for per-step clipping of the error inside the
        backward: at every step t, each example's ``delta_t`` (``dL/dh_t`` from outside plus
        the error from step t+1; ``h`` and ``c`` together for the LSTM) is scaled to norm at
        most ``delta_clip`` before it travels further back. Tames exploding gradients at
        their source; the result is then no longer the exact gradient. ``None``: off.
      backward: ``"manual"`` (the hand-written BPTT, every state stored), ``"checkpointed"``
        (the same hand-written BPTT storing only the carry entering every ``segment``-th
        step and re-running each segment's forward during the backward: identical
        gradients, memory O(T/s + s) instead of O(T), one extra forward pass; Gruslys et
        al. 2016) or ``"autodiff"`` (a plain ``lax.scan`` that JAX differentiates; the
        reference).
      segment: for ``"checkpointed"``: steps per segment; ``None`` for about ``sqrt(T)``.
      memory_budget: for ``"checkpointed"``, instead of ``segment``: bytes the stored
        checkpoints and one segment's buffers may take; the longest segment that fits is
        used (:func:`segment_for_budget`).

    Returns:
      ``(hs, carry_T)``: hidden states ``(T, B, H)`` and the final carry.

    Raises:
      ValueError / TypeError at trace time for wrong shapes, dtypes or carry structure.

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
    xs, carry0, mask, dtype = validation.check_unroll_args(
        fn, cell, params, xs, carry0, mask, truncate
    )
    resets = validation.check_mask(fn, resets, *xs.shape[:2], name="resets")
    validation.check_positive(fn, "delta_clip", delta_clip)
    seg = resolve_segment(fn, cell, xs, dtype, segment, memory_budget)
    if backward == "autodiff":
        return unroll_autodiff(cell, params, xs, carry0, mask, truncate, resets, delta_clip)
    if backward == "checkpointed":
        return _unroll_checkpointed(
            cell, truncate, delta_clip, seg, params, xs, carry0, mask, resets
        )
    return _unroll_manual(cell, truncate, delta_clip, params, xs, carry0, mask, resets)
