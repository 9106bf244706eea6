"""Readout and sequence losses, fused with the engine into one hand-written backward."""

from __future__ import annotations

import math
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bptt_jax import engine, validation
from bptt_jax.cells import _common

LOSSES = ("xent", "mse")
REDUCTIONS = ("mean", "sum")


class ReadoutParams(NamedTuple):
    """The output layer ``y_t = h_t W_hy + b_y`` (logits for ``"xent"``)."""

    w_hy: jax.Array  # (H, O)
    b_y: jax.Array  # (O,)


def init_readout(key, hidden_size: int, output_size: int, dtype=jnp.float32) -> ReadoutParams:
    """``w_hy`` ~ U(-1/sqrt(H), 1/sqrt(H)) (PyTorch's ``nn.Linear``), ``b_y = 0``.

    Example:
      >>> import jax, bptt_jax
      >>> ro = bptt_jax.init_readout(jax.random.key(0), 32, 10)
      >>> ro.w_hy.shape, ro.b_y.shape
      ((32, 10), (10,))
    """
    for name, v in (("hidden_size", hidden_size), ("output_size", output_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"init_readout: {name} must be a positive int; got {v!r}")
    dtype = _common.check_float_dtype("init_readout", dtype)
    bound = 1.0 / math.sqrt(hidden_size)
    return ReadoutParams(
        _common.uniform(key, (hidden_size, output_size), bound, dtype),
        jnp.zeros((output_size,), dtype),
    )


# ---------------------------------------------------------------- per-token losses
def _one_hot(targets, n):
    return targets[..., None] == jnp.arange(n, dtype=targets.dtype)


def token_losses(loss: str, logits, targets):
    """Per-token loss ``l_{t,b}`` for ``logits`` (N, O).

    ``"xent"``: ``logsumexp(y) - y[target]`` (targets (N,) integers); a target outside
    ``[0, O)`` gives NaN, never a plausible number. ``"mse"``: ``mean_o (y - target)^2``.
    """
    if loss == "xent":
        o = logits.shape[-1]
        hot = _one_hot(targets, o)
        picked = jnp.sum(jnp.where(hot, logits, 0), axis=-1)
        lse = jax.nn.logsumexp(logits, axis=-1)
        in_range = (targets >= 0) & (targets < o)
        return jnp.where(in_range, lse - picked, jnp.nan)
    return jnp.mean((logits - targets) ** 2, axis=-1)


def _token_loss_grads(loss: str, logits, targets):
    """Hand-written ``dl_{t,b}/dy_{t,b}``, (N, O)."""
    o = logits.shape[-1]
    if loss == "xent":
        hot = _one_hot(targets, o)
        g = jax.nn.softmax(logits, axis=-1) - hot.astype(logits.dtype)
        in_range = (targets >= 0) & (targets < o)
        return jnp.where(in_range[:, None], g, jnp.nan)
    return (2.0 / o) * (logits - targets)


def _weights(mask, reduction: str, n: int, dtype):
    """Per-token weights ``w`` with ``L = sum w * l``; (N,) or a scalar."""
    if mask is None:
        return jnp.asarray(1.0 / n if reduction == "mean" else 1.0, dtype)
    m = mask.reshape(-1).astype(dtype)
    if reduction == "sum":
        return m
    return m / jnp.maximum(jnp.sum(m), 1)


def reduce_losses(l, mask, reduction: str):
    """``L = sum_{t,b} w_{t,b} l_{t,b}`` (masked-out tokens contribute exactly 0)."""
    w = _weights(mask, reduction, l.shape[0], l.dtype)
    if mask is not None:
        l = jnp.where(mask.reshape(-1), l, 0)
    return jnp.sum(w * l)


def _readout(readout, hs):
    t, b, h = hs.shape
    return hs.reshape(t * b, h) @ readout.w_hy + readout.b_y


def _flat_targets(loss, targets):
    return targets.reshape(-1) if loss == "xent" else targets.reshape(-1, targets.shape[-1])


def _valid(mask, loss_mask):
    """Tokens that count in the loss: ``mask & loss_mask`` (either may be ``None``)."""
    if loss_mask is None:
        return mask
    return loss_mask if mask is None else mask & loss_mask


# ---------------------------------------------------------------- fused manual path
def _forward(cell, loss, reduction, params, readout, xs, targets, carry0, mask, valid, resets):
    """Forward scan, readout and loss; keeps ``delta^y_t = dL/dy_t`` instead of the logits.

    Returns ``(value, carry_T, (states, res, dy))``.
    """
    states, res, carry_t = engine.forward(cell, params, xs, carry0, mask, resets=resets)
    logits = _readout(readout, cell.hidden(states))
    flat = _flat_targets(loss, targets)
    l = token_losses(loss, logits, flat)
    value = reduce_losses(l, valid, reduction)
    w = _weights(valid, reduction, l.shape[0], l.dtype)
    dy = _token_loss_grads(loss, logits, flat)
    dy = jnp.where(valid.reshape(-1, 1), dy, 0) if valid is not None else dy
    dy = (w[:, None] if jnp.ndim(w) else w) * dy
    return value, carry_t, (states, res, dy)


def _backward(
    cell,
    truncate,
    delta_clip,
    params,
    readout,
    xs,
    carry0,
    mask,
    resets,
    saved,
    g_loss,
    g_carry,
    return_deltas=False,
):
    """The hand-written backward from ``dL/dy_t`` down to every parameter."""
    states, res, dy = saved
    t, b, _ = xs.shape
    dy = g_loss * dy  # (T*B, O)
    hs = cell.hidden(states).reshape(t * b, -1)
    d_readout = ReadoutParams(hs.T @ dy, dy.sum(0))  # dW_hy = sum_t h_t^T delta^y_t
    dhs = engine.output_error(dy.reshape(t, b, -1), readout.w_hy)  # W_hy^T delta^y_t
    out = engine.backward(
        cell,
        params,
        xs,
        carry0,
        mask,
        states,
        res,
        dhs,
        g_carry,
        truncate,
        resets=resets,
        delta_clip=delta_clip,
        return_deltas=return_deltas,
    )
    return (d_readout, dy, *out)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _loss_manual(
    cell,
    loss,
    reduction,
    truncate,
    delta_clip,
    params,
    readout,
    xs,
    targets,
    carry0,
    mask,
    valid,
    resets,
):
    states, _, carry_t = engine.forward(
        cell, params, xs, carry0, mask, keep_residuals=False, resets=resets
    )
    logits = _readout(readout, cell.hidden(states))
    l = token_losses(loss, logits, _flat_targets(loss, targets))
    return reduce_losses(l, valid, reduction), carry_t


def _loss_fwd(
    cell,
    loss,
    reduction,
    truncate,
    delta_clip,
    params,
    readout,
    xs,
    targets,
    carry0,
    mask,
    valid,
    resets,
):
    value, carry_t, saved = _forward(
        cell, loss, reduction, params, readout, xs, targets, carry0, mask, valid, resets
    )
    return (value, carry_t), (params, readout, xs, carry0, mask, resets, saved)


def _loss_bwd(cell, loss, reduction, truncate, delta_clip, residuals, cotangents):
    params, readout, xs, carry0, mask, resets, saved = residuals
    g_loss, g_carry = cotangents
    d_readout, dy, grads, dxs, dcarry0 = _backward(
        cell,
        truncate,
        delta_clip,
        params,
        readout,
        xs,
        carry0,
        mask,
        resets,
        saved,
        g_loss,
        g_carry,
    )
    d_targets = None if loss == "xent" else (-dy).reshape(*xs.shape[:2], -1)
    return grads, d_readout, dxs, d_targets, dcarry0, None, None, None


_loss_manual.defvjp(_loss_fwd, _loss_bwd)


# ---------------------------------------------------------- checkpointed manual path
def _segment_loss_args(xs, targets, mask, valid, resets, segment):
    t, b = xs.shape[:2]
    n, xs_s, mask_s, resets_s = engine.segment_inputs(xs, mask, resets, segment)
    if valid is None and n * segment != t:
        valid = jnp.ones((t, b), bool)
    targets_s = engine._segments(targets, n, segment)
    valid_s = engine._segments(valid, n, segment, False)
    return xs_s, mask_s, resets_s, (targets_s, valid_s)


def _scale(valid, reduction, t, b, dtype):
    """``L = scale * sum of counted token losses``."""
    if reduction == "sum":
        return jnp.ones((), dtype)
    count = t * b if valid is None else jnp.maximum(jnp.sum(valid), 1)
    return (1.0 / jnp.asarray(count, dtype)).astype(dtype)


def _segment_losses(cell, loss, readout, states, targets, valid, scale):
    """One segment's logits, per-token losses and weights (``valid * scale``)."""
    s, b = cell.hidden(states).shape[:2]
    hs = cell.hidden(states).reshape(s * b, -1)
    logits = hs @ readout.w_hy + readout.b_y
    flat = _flat_targets(loss, targets)
    l = token_losses(loss, logits, flat)
    if valid is None:
        return hs, logits, flat, l, scale
    valid = valid.reshape(-1)
    return hs, logits, flat, jnp.where(valid, l, 0), jnp.where(valid, scale, 0)


def _segment_cotangent(cell, loss, readout, states, targets, valid, scale, g_loss):
    """A segment's ``delta^y`` pushed through the readout.

    Returns ``(dhs (s, B, H), d_readout, d_targets (s, B, O) or None)``.
    """
    s, b = cell.hidden(states).shape[:2]
    hs, logits, flat, _, w = _segment_losses(cell, loss, readout, states, targets, valid, scale)
    dy = _token_loss_grads(loss, logits, flat)
    if valid is not None:  # tokens not counted: exactly 0, even a NaN from a bad target
        dy = jnp.where(valid.reshape(-1, 1), dy, 0)
    dy = g_loss * (w[:, None] if jnp.ndim(w) else w) * dy
    d_readout = ReadoutParams(hs.T @ dy, dy.sum(0))
    dhs = (dy @ readout.w_hy.T).reshape(s, b, -1)
    d_targets = None if loss == "xent" else (-dy).reshape(s, b, -1)
    return dhs, d_readout, d_targets


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4, 5))
def _loss_checkpointed(
    cell,
    loss,
    reduction,
    truncate,
    delta_clip,
    segment,
    params,
    readout,
    xs,
    targets,
    carry0,
    mask,
    valid,
    resets,
):
    out, _ = _loss_checkpointed_fwd(
        cell,
        loss,
        reduction,
        truncate,
        delta_clip,
        segment,
        params,
        readout,
        xs,
        targets,
        carry0,
        mask,
        valid,
        resets,
    )
    return out


def _loss_checkpointed_fwd(
    cell,
    loss,
    reduction,
    truncate,
    delta_clip,
    segment,
    params,
    readout,
    xs,
    targets,
    carry0,
    mask,
    valid,
    resets,
):
    t, b = xs.shape[:2]
    scale = _scale(valid, reduction, t, b, xs.dtype)
    xs_s, mask_s, resets_s, extras = _segment_loss_args(xs, targets, mask, valid, resets, segment)

    def segment_loss(states, extra):
        _, _, _, l, w = _segment_losses(cell, loss, readout, states, *extra, scale)
        return jnp.sum(w * l)  # tokens not counted have l = 0 and w = 0

    checkpoints, seg_losses, carry_t = engine.checkpointed_forward(
        cell, params, xs_s, carry0, mask_s, resets_s, extras, segment_loss
    )
    saved = (params, readout, xs, targets, carry0, mask, valid, resets, checkpoints)
    return (jnp.sum(seg_losses), carry_t), saved


def _loss_checkpointed_bwd(cell, loss, reduction, truncate, delta_clip, segment, saved, cotangents):
    params, readout, xs, targets, carry0, mask, valid, resets, checkpoints = saved
    g_loss, g_carry = cotangents
    t, b = xs.shape[:2]
    scale = _scale(valid, reduction, t, b, xs.dtype)
    xs_s, mask_s, resets_s, extras = _segment_loss_args(xs, targets, mask, valid, resets, segment)

    def cotangent(states, extra):
        return _segment_cotangent(cell, loss, readout, states, *extra, scale, g_loss)

    grads, dxs_s, dcarry0, d_readout, d_targets = engine.checkpointed_backward(
        cell,
        params,
        xs_s,
        mask_s,
        resets_s,
        checkpoints,
        g_carry,
        truncate,
        cotangent,
        extras,
        jax.tree.map(jnp.zeros_like, readout),
        length=t,
        delta_clip=delta_clip,
    )
    if d_targets is not None:
        d_targets = engine._unsegment(d_targets, t)
    return (grads, d_readout, engine._unsegment(dxs_s, t), d_targets, dcarry0, None, None, None)


_loss_checkpointed.defvjp(_loss_checkpointed_fwd, _loss_checkpointed_bwd)


# --------------------------------------------------- truncated BPTT, chunk by chunk
# With truncate=k (and no per-step clipping) no error crosses a chunk boundary, so the
# chunks' backward passes are independent: the forward runs over a group of g chunks
# (g*k steps, sized to stay in cache), then one reverse scan of only k steps takes all g
# chunks of the group at once, as a batch of g*B rows (the step index within the chunk is
# the time axis). Nothing longer than a group is ever stored. The loss's gradient is
# computed during the forward for a unit cotangent and scaled in the backward (it is
# linear in it); the error on carry_T reaches only the last chunk, which the backward
# re-runs for it.

#: Bytes one group of chunks may store (states and per-step buffers): enough chunks for
#: wide batched reverse-scan steps, few enough to stay in cache and off fresh pages.
GROUP_BYTES = 2 * 2**20


def chunk_group(cell, truncate: int, n_chunks: int, batch: int, dtype) -> int:
    """How many chunks of ``truncate`` steps one group holds (see :data:`GROUP_BYTES`)."""
    per_chunk = truncate * engine.stored_per_step(cell, batch, dtype)
    return max(1, min(n_chunks, GROUP_BYTES // per_chunk))


def _chunk_major(x, g: int):
    """(g*k, B, ...) -> (k, g*B, ...): chunk j's step i is row i, examples j*B..(j+1)*B-1."""
    if x is None:
        return None
    k = x.shape[0] // g
    x = x.reshape(g, k, *x.shape[1:]).swapaxes(0, 1)
    return x.reshape(k, g * x.shape[2], *x.shape[3:])


def _time_major(x, g: int):
    """The inverse of :func:`_chunk_major`: (k, g*B, ...) -> (g*k, B, ...)."""
    k, gb = x.shape[:2]
    x = x.reshape(k, g, gb // g, *x.shape[2:]).swapaxes(0, 1)
    return x.reshape(g * k, *x.shape[2:])


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _loss_chunked(
    cell, loss, reduction, truncate, params, readout, xs, targets, carry0, mask, valid, resets
):
    return _loss_manual(
        cell,
        loss,
        reduction,
        truncate,
        None,
        params,
        readout,
        xs,
        targets,
        carry0,
        mask,
        valid,
        resets,
    )


def _loss_chunked_fwd(
    cell, loss, reduction, truncate, params, readout, xs, targets, carry0, mask, valid, resets
):
    t, b = xs.shape[:2]
    k = truncate
    n_chunks = math.ceil(t / k)
    g = chunk_group(cell, k, n_chunks, b, xs.dtype)
    scale = _scale(valid, reduction, t, b, xs.dtype)
    xs_s, mask_s, resets_s, extras = _segment_loss_args(xs, targets, mask, valid, resets, g * k)
    one = jnp.ones((), xs.dtype)
    _zeros_like = partial(jax.tree.map, jnp.zeros_like)

    def body(acc, inputs):
        carry, grads, d_readout, value = acc
        x, m, r, (tg, vd) = inputs
        states, res, carry_out = engine.forward(cell, params, x, carry, m, resets=r)
        # The carry entering each of the g chunks: (g, B, ...).
        entering = jax.tree.map(
            lambda c0, st: jnp.concatenate([c0[None], st[k - 1 :: k][: g - 1]]), carry, states
        )
        flat = jax.tree.map(lambda c: c.reshape(g * b, *c.shape[2:]), entering)
        cm = partial(_chunk_major, g=g)
        states_c, res_c, x_c, m_c, r_c = jax.tree.map(cm, (states, res, x, m, r))
        tg_c, vd_c = cm(tg), cm(vd)
        # Loss and its error from the same (chunk-major) logits: one readout matmul.
        _, _, _, l, w = _segment_losses(cell, loss, readout, states_c, tg_c, vd_c, scale)
        dhs, d_ro, d_tg = _segment_cotangent(cell, loss, readout, states_c, tg_c, vd_c, scale, one)
        dcarry_in, dcols, _ = engine.reverse_scan(
            cell, params, flat, m_c, states_c, res_c, dhs, _zeros_like(flat), None, resets=r_c
        )
        gr, dx = engine.weight_grads(cell, params, x_c, flat, states_c, dcols, r_c)
        add = partial(jax.tree.map, jnp.add)
        acc = (carry_out, add(grads, gr), add(d_readout, d_ro), value + jnp.sum(w * l))
        d_tg = None if d_tg is None else _time_major(d_tg, g)
        dcarry_in = jax.tree.map(lambda c: c[:b], dcarry_in)  # chunk 0's: the group's carry
        return acc, (entering, _time_major(dx, g), d_tg, dcarry_in)

    init = (carry0, _zeros_like(params), _zeros_like(readout), jnp.zeros((), xs.dtype))
    (carry_t, grads, d_readout, value), (entering, dxs_s, d_tg, dcarry_in) = lax.scan(
        body, init, (xs_s, mask_s, resets_s, extras)
    )
    # The last chunk (steps [(n_chunks - 1) k, T)), for the error on carry_T.
    last = jax.tree.map(lambda c: c.reshape(-1, *c.shape[2:])[n_chunks - 1], entering)
    _, xs_k, mask_k, resets_k = engine.segment_inputs(xs, mask, resets, k)
    dcarry0 = jax.tree.map(lambda c: c[0], dcarry_in)
    d_tg = None if d_tg is None else engine._unsegment(d_tg, t)
    per_unit = (grads, d_readout, engine._unsegment(dxs_s, t), d_tg, dcarry0)
    saved = (
        per_unit,
        params,
        last,
        xs_k[-1],
        None if mask_k is None else mask_k[-1],
        None if resets_k is None else resets_k[-1],
    )
    return (value, carry_t), saved


def _loss_chunked_bwd(cell, loss, reduction, truncate, saved, cotangents):
    per_unit, params, last, x, m, r = saved
    g_loss, g_carry = cotangents
    grads, d_readout, dxs, d_tg, dcarry0 = jax.tree.map(lambda g: g_loss * g, per_unit)
    # The error on carry_T, back through the last chunk only.
    states, res, _ = engine.forward(cell, params, x, last, m, resets=r)
    _, dcols, _ = engine.reverse_scan(
        cell, params, last, m, states, res, None, g_carry, None, resets=r
    )
    g, dx = engine.weight_grads(cell, params, x, last, states, dcols, r)
    grads = jax.tree.map(jnp.add, grads, g)
    t = dxs.shape[0]
    start = (math.ceil(t / truncate) - 1) * truncate  # the last chunk: steps [start, T)
    dxs = dxs.at[start:].add(dx[: t - start])
    return grads, d_readout, dxs, d_tg, dcarry0, None, None, None


_loss_chunked.defvjp(_loss_chunked_fwd, _loss_chunked_bwd)


def _loss_autodiff(
    cell,
    loss,
    reduction,
    truncate,
    delta_clip,
    params,
    readout,
    xs,
    targets,
    carry0,
    mask,
    valid,
    resets,
):
    hs, carry_t = engine.unroll_autodiff(
        cell, params, xs, carry0, mask, truncate, resets, delta_clip
    )
    l = token_losses(loss, _readout(readout, hs), _flat_targets(loss, targets))
    return reduce_losses(l, valid, reduction), carry_t


def _check_loss_args(
    fn,
    cell,
    params,
    readout,
    xs,
    targets,
    carry0,
    mask,
    loss_mask,
    resets,
    loss,
    reduction,
    truncate,
    delta_clip,
):
    validation.check_choice(fn, "loss", loss, LOSSES)
    validation.check_choice(fn, "reduction", reduction, REDUCTIONS)
    xs, carry0, mask, dtype = validation.check_unroll_args(
        fn, cell, params, xs, carry0, mask, truncate
    )
    t, b, _ = xs.shape
    loss_mask = validation.check_mask(fn, loss_mask, t, b, name="loss_mask")
    resets = validation.check_mask(fn, resets, t, b, name="resets")
    validation.check_positive(fn, "delta_clip", delta_clip)
    valid = _valid(mask, loss_mask)
    o = validation.check_readout(fn, readout, cell.hidden_size, dtype)
    targets = validation.check_targets(fn, targets, loss, t, b, o, dtype, valid)
    return xs, targets, carry0, mask, valid, resets


def sequence_loss(
    cell,
    params,
    readout: ReadoutParams,
    xs,
    targets,
    carry0=None,
    *,
    mask=None,
    loss_mask=None,
    resets=None,
    loss: str = "xent",
    reduction: str = "mean",
    truncate: int | None = None,
    delta_clip: float | None = None,
    backward: str = "manual",
    segment: int | None = None,
    memory_budget: int | None = None,
    return_carry: bool = False,
):
    """Loss of a readout on every hidden state, with the whole backward written by hand.

    Forward: ``hs = unroll(cell, params, xs, carry0)``, ``y_t = h_t W_hy + b_y``, per-token
    loss ``l_{t,b}`` and ``L = sum_{t,b} w_{t,b} l_{t,b}``. Backward (``jax.grad`` of this
    function): ``delta^y_t = dL/dy_t`` (kept from the forward), ``W_hy^T delta^y_t`` into the
    reverse scan over ``delta^h_t``, and the weight sums as single matmuls over ``T*B`` rows.

    Args:
      cell, params, xs, carry0, mask, resets, truncate, delta_clip: as in
        :func:`bptt_jax.unroll`.
      loss_mask: optional ``(T, B)`` 0/1 or bool: tokens where it is 0 have no loss, but the
        carry runs through them as usual (unlike ``mask``). The counted tokens are
        ``mask & loss_mask``. E.g. only the last step of the adding problem, or the last k1
        steps of a TBPTT(k1, k2) window.
      readout: :class:`ReadoutParams` ``(w_hy (H, O), b_y (O,))``.
      targets: ``loss="xent"``: integer classes ``(T, B)`` in ``[0, O)``;
        ``loss="mse"``: ``(T, B, O)`` in the params' dtype (it gets a gradient too).
      loss: ``"xent"``: softmax cross-entropy ``logsumexp(y) - y[target]`` (stable);
        ``"mse"``: ``mean_o (y_o - target_o)^2``.
      reduction: ``"sum"``: ``L = sum`` of ``l_{t,b}`` over counted tokens (``mask`` and
        ``loss_mask`` set, or all); ``"mean"``: that sum divided by the number of counted
        tokens (``T*B`` without masks, else at least 1): the mean loss per counted token.
      backward: ``"manual"``, ``"checkpointed"`` (memory-efficient: the readout and loss are
        recomputed segment by segment with the states; see :func:`bptt_jax.unroll`) or
        ``"autodiff"`` (the same loss through a plain ``lax.scan`` with no custom rule,
        which ``jax.grad`` differentiates: the reference).
      segment, memory_budget: for ``"checkpointed"``, as in :func:`bptt_jax.unroll`.
      return_carry: also return the final carry (for streams carried across chunks).

    Returns:
      The scalar loss, or ``(loss, carry_T)`` with ``return_carry=True``.

    Raises:
      ValueError / TypeError at trace time for wrong shapes, dtypes, carry structure or
      options; ``ValueError`` for out-of-range targets when their values are known (outside
      ``jit``). Inside ``jit`` an out-of-range target at a valid position makes the loss and
      gradients NaN (never a plausible wrong number); ``optax.apply_if_finite`` skips it.

    Example:
      >>> import jax, jax.numpy as jnp, bptt_jax
      >>> cell = bptt_jax.Elman(16)
      >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
      >>> params, ro = cell.init(k1, 5), bptt_jax.init_readout(k2, 16, 7)
      >>> xs = jax.random.normal(k3, (30, 4, 5))
      >>> ys = jnp.zeros((30, 4), jnp.int32)
      >>> g, g_ro = jax.grad(bptt_jax.sequence_loss, argnums=(1, 2))(cell, params, ro, xs, ys)
      >>> g.w_hh.shape, g_ro.w_hy.shape
      ((16, 16), (16, 7))
    """
    fn = "sequence_loss"
    validation.check_choice(fn, "backward", backward, engine.BACKWARDS)
    xs, targets, carry0, mask, valid, resets = _check_loss_args(
        fn,
        cell,
        params,
        readout,
        xs,
        targets,
        carry0,
        mask,
        loss_mask,
        resets,
        loss,
        reduction,
        truncate,
        delta_clip,
    )
    args = (params, readout, xs, targets, carry0, mask, valid, resets)
    chunked = truncate is not None and truncate < xs.shape[0] and delta_clip is None
    if backward == "manual" and chunked:
        value, carry_t = _loss_chunked(cell, loss, reduction, truncate, *args)
    elif backward == "checkpointed":
        seg = engine.resolve_segment(fn, cell, xs, xs.dtype, segment, memory_budget)
        value, carry_t = _loss_checkpointed(cell, loss, reduction, truncate, delta_clip, seg, *args)
    else:
        impl = _loss_manual if backward == "manual" else _loss_autodiff
        value, carry_t = impl(cell, loss, reduction, truncate, delta_clip, *args)
    return (value, carry_t) if return_carry else value


class LossAndGrads(NamedTuple):
    """What :func:`loss_and_grads` returns."""

    value: jax.Array  # () the loss L
    params: Any  # dL/dparams, the cell params' own type
    readout: ReadoutParams  # dL/dreadout
    carry: Any  # the carry after step ``carry_index`` (forward only, no gradient)
    deltas: jax.Array | None  # (T, B, H) delta^h_t = dL/dh_t, when ``return_deltas``


def loss_and_grads(
    cell,
    params,
    readout: ReadoutParams,
    xs,
    targets,
    carry0=None,
    *,
    mask=None,
    loss_mask=None,
    resets=None,
    loss: str = "xent",
    reduction: str = "mean",
    truncate: int | None = None,
    delta_clip: float | None = None,
    carry_index: int | None = None,
    return_deltas: bool = False,
) -> LossAndGrads:
    """The loss of :func:`sequence_loss` and its hand-written gradients, in one call.

    The same forward and backward as ``jax.value_and_grad(sequence_loss, argnums=(1, 2))``,
    called directly rather than through ``jax.grad``, so it can also hand back what the
    backward sees on the way: the carry after any step (a TBPTT(k1, k2) window passes on the
    carry after its k1-th step) and the error ``delta^h_t`` reaching every hidden state.

    Args:
      cell, params, readout, xs, targets, carry0, mask, loss_mask, resets, loss, reduction,
        truncate, delta_clip: as in :func:`sequence_loss`.
      carry_index: the step whose resulting carry to return, in ``[0, T)``; ``None`` for the
        last (``carry_T``).
      return_deltas: also return ``delta^h_t`` (T, B, H): ``dL/dh_t`` in total, from the
        readout at step t and from every later step through the recurrence (after
        ``delta_clip``; what the reverse scan carries back in time).

    Returns:
      A :class:`LossAndGrads` ``(value, params, readout, carry, deltas)``.

    Example:
      >>> import jax, jax.numpy as jnp, bptt_jax
      >>> from bptt_jax.losses import loss_and_grads
      >>> cell = bptt_jax.GRU(8)
      >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
      >>> params, ro = cell.init(k1, 3), bptt_jax.init_readout(k2, 8, 5)
      >>> xs, ys = jax.random.normal(k3, (10, 2, 3)), jnp.ones((10, 2), jnp.int32)
      >>> out = loss_and_grads(cell, params, ro, xs, ys, carry_index=3, return_deltas=True)
      >>> out.params.w_h.shape, out.carry.shape, out.deltas.shape
      ((8, 24), (2, 8), (10, 2, 8))
    """
    fn = "loss_and_grads"
    xs, targets, carry0, mask, valid, resets = _check_loss_args(
        fn,
        cell,
        params,
        readout,
        xs,
        targets,
        carry0,
        mask,
        loss_mask,
        resets,
        loss,
        reduction,
        truncate,
        delta_clip,
    )
    t = xs.shape[0]
    if carry_index is not None and (
        isinstance(carry_index, bool)
        or not isinstance(carry_index, int)
        or not 0 <= carry_index < t
    ):
        raise ValueError(
            f"{fn}: carry_index must be an int in [0, T) = [0, {t}) or None; got {carry_index!r}"
        )
    value, carry_t, saved = _forward(
        cell, loss, reduction, params, readout, xs, targets, carry0, mask, valid, resets
    )
    g_carry = jax.tree.map(jnp.zeros_like, carry_t)
    d_readout, _, grads, _, _, *deltas = _backward(
        cell,
        truncate,
        delta_clip,
        params,
        readout,
        xs,
        carry0,
        mask,
        resets,
        saved,
        jnp.ones((), value.dtype),
        g_carry,
        return_deltas=return_deltas,
    )
    if carry_index is not None and carry_index != t - 1:
        carry_t = jax.tree.map(lambda s: s[carry_index], saved[0])
    return LossAndGrads(value, grads, d_readout, carry_t, deltas[0] if deltas else None)
