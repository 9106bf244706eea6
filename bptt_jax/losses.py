"""Readout and sequence losses, fused with the engine into one hand-written backward."""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

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


# ---------------------------------------------------------------- fused manual path
@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _loss_manual(cell, loss, reduction, truncate, params, readout, xs, targets, carry0, mask):
    states, _, carry_t = engine.forward(cell, params, xs, carry0, mask, keep_residuals=False)
    logits = _readout(readout, cell.hidden(states))
    l = token_losses(loss, logits, _flat_targets(loss, targets))
    return reduce_losses(l, mask, reduction), carry_t


def _loss_fwd(cell, loss, reduction, truncate, params, readout, xs, targets, carry0, mask):
    states, res, carry_t = engine.forward(cell, params, xs, carry0, mask)
    logits = _readout(readout, cell.hidden(states))
    flat = _flat_targets(loss, targets)
    l = token_losses(loss, logits, flat)
    value = reduce_losses(l, mask, reduction)
    # delta^y_t = dL/dy_t for a unit cotangent on L, kept instead of the logits.
    w = _weights(mask, reduction, l.shape[0], l.dtype)
    dy = _token_loss_grads(loss, logits, flat)
    dy = jnp.where(mask.reshape(-1, 1), dy, 0) if mask is not None else dy
    dy = (w[:, None] if jnp.ndim(w) else w) * dy
    saved = (params, readout, xs, carry0, mask, states, res, dy)
    return (value, carry_t), saved


def _loss_bwd(cell, loss, reduction, truncate, saved, cotangents):
    params, readout, xs, carry0, mask, states, res, dy = saved
    g_loss, g_carry = cotangents
    t, b, _ = xs.shape
    dy = g_loss * dy  # (T*B, O)
    hs = cell.hidden(states).reshape(t * b, -1)
    d_readout = ReadoutParams(hs.T @ dy, dy.sum(0))  # dW_hy = sum_t h_t^T delta^y_t
    dhs = (dy @ readout.w_hy.T).reshape(t, b, -1)  # W_hy^T delta^y_t, into delta^h_t
    grads, dxs, dcarry0 = engine.backward(
        cell, params, xs, carry0, mask, states, res, dhs, g_carry, truncate
    )
    d_targets = None if loss == "xent" else (-dy).reshape(t, b, -1)
    return grads, d_readout, dxs, d_targets, dcarry0, None


_loss_manual.defvjp(_loss_fwd, _loss_bwd)


def _loss_autodiff(cell, loss, reduction, truncate, params, readout, xs, targets, carry0, mask):
    hs, carry_t = engine.unroll_autodiff(cell, params, xs, carry0, mask, truncate)
    l = token_losses(loss, _readout(readout, hs), _flat_targets(loss, targets))
    return reduce_losses(l, mask, reduction), carry_t


def sequence_loss(
    cell,
    params,
    readout: ReadoutParams,
    xs,
    targets,
    carry0=None,
    *,
    mask=None,
    loss: str = "xent",
    reduction: str = "mean",
    truncate: int | None = None,
    backward: str = "manual",
    return_carry: bool = False,
):
    """Loss of a readout on every hidden state, with the whole backward written by hand.

    Forward: ``hs = unroll(cell, params, xs, carry0)``, ``y_t = h_t W_hy + b_y``, per-token
    loss ``l_{t,b}`` and ``L = sum_{t,b} w_{t,b} l_{t,b}``. Backward (``jax.grad`` of this
    function): ``delta^y_t = dL/dy_t`` (kept from the forward), ``W_hy^T delta^y_t`` into the
    reverse scan over ``delta^h_t``, and the weight sums as single matmuls over ``T*B`` rows.

    Args:
      cell, params, xs, carry0, mask, truncate: as in :func:`bptt_jax.unroll`.
      readout: :class:`ReadoutParams` ``(w_hy (H, O), b_y (O,))``.
      targets: ``loss="xent"``: integer classes ``(T, B)`` in ``[0, O)``;
        ``loss="mse"``: ``(T, B, O)`` in the params' dtype (it gets a gradient too).
      loss: ``"xent"``: softmax cross-entropy ``logsumexp(y) - y[target]`` (stable);
        ``"mse"``: ``mean_o (y_o - target_o)^2``.
      reduction: ``"sum"``: ``L = sum`` of ``l_{t,b}`` over valid tokens (mask set, or all);
        ``"mean"``: that sum divided by the number of valid tokens (``T*B`` without a mask;
        ``max(sum(mask), 1)`` with one): the mean loss per valid token.
      backward: ``"manual"`` or ``"autodiff"`` (the same loss through a plain ``lax.scan``
        with no custom rule, which ``jax.grad`` differentiates: the reference).
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
    validation.check_choice(fn, "loss", loss, LOSSES)
    validation.check_choice(fn, "reduction", reduction, REDUCTIONS)
    validation.check_choice(fn, "backward", backward, ("manual", "autodiff"))
    xs, carry0, mask, dtype = validation.check_unroll_args(
        fn, cell, params, xs, carry0, mask, truncate
    )
    t, b, _ = xs.shape
    o = validation.check_readout(fn, readout, cell.hidden_size, dtype)
    targets = validation.check_targets(fn, targets, loss, t, b, o, dtype, mask)
    impl = _loss_manual if backward == "manual" else _loss_autodiff
    value, carry_t = impl(
        cell, loss, reduction, truncate, params, readout, xs, targets, carry0, mask
    )
    return (value, carry_t) if return_carry else value
