"""What every scan does at one step, for every cell: masks, resets, truncation and clipping.

A padded step (``mask`` 0) passes the carry forward and its error back unchanged; a reset
replaces the carry entering a step by zeros, so no error flows back across it; a truncation
cut drops the error on the carry entering a step; per-step clipping scales each example's
error to a norm at most ``delta_clip`` before it travels further back.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bptt_jax.cells import protocol


class Row(NamedTuple):
    """One step of what a reverse scan reads: a ``lax.scan`` over the (T, ...) arrays yields
    it. Fields a path does not use are ``None`` (or ``()``), and drop out of the scan."""

    t: jax.Array  # () the step's index
    x: jax.Array | None = None  # (B, D) its input (the generic path)
    state: Any = None  # the stored state after it
    dh: jax.Array | None = None  # (B, H) the error on its output from outside the recurrence
    mask: jax.Array | None = None  # (B,)
    cut: jax.Array | None = None  # ()
    reset: jax.Array | None = None  # (B,)
    real: jax.Array | None = None  # ()
    res: tuple = ()  # the fast path's residual rows not carried from the step before


def per_example(v, x):
    """``v`` (B,) shaped to broadcast against ``x`` (B, ...)."""
    return v.reshape(v.shape + (1,) * (x.ndim - 1))


def select(m, a, b):
    """Per-example select over a carry pytree: ``a`` where ``m`` (B,) is set, else ``b``."""
    return jax.tree.map(lambda x, y: jnp.where(per_example(m, x), x, y), a, b)


def select_all(c, a, b):
    """``a`` if the scalar ``c`` is set, else ``b``, over a pytree."""
    return jax.tree.map(lambda x, y: jnp.where(c, x, y), a, b)


def zeros_like(tree):
    return jax.tree.map(jnp.zeros_like, tree)


def index(x, t):
    """Row ``t`` of ``x`` (T, ...)."""
    return lax.dynamic_index_in_dim(x, t, 0, keepdims=False)


def reset(r_t, carry):
    """The carry entering a step, with examples whose ``r_t`` (B,) is set reset to zeros."""
    return carry if r_t is None else select(r_t, zeros_like(carry), carry)


def clip_delta(dstate, threshold):
    """Scale each example's error ``delta_t`` (all carry parts together) to norm <= threshold.

    ``delta * min(1, threshold / ||delta||)`` per example, the norm taken over every leaf of
    the carry (``h`` and ``c`` for the LSTM).
    """
    sq = sum(jnp.sum(g * g, axis=tuple(range(1, g.ndim))) for g in jax.tree.leaves(dstate))
    # sqrt only where positive: at a zero error (a padded step) a second-order derivative
    # through the norm would be inf * 0 = NaN
    big = sq > jnp.square(threshold).astype(sq.dtype)
    norm = jnp.sqrt(jnp.where(big, sq, 1))  # (B,), used only where big
    scale = jnp.where(big, threshold / norm, 1)
    return jax.tree.map(lambda g: g * per_example(scale, g).astype(g.dtype), dstate)


def truncation_cuts(length: int, truncate: int | None):
    """Boolean (T,): step t's incoming carry is cut from the gradient (t = k, 2k, ...)."""
    if truncate is None or truncate >= length:
        return None
    t = jnp.arange(length)
    return (t % truncate == 0) & (t > 0)


def carry_entering(carry0, states, t, r_t):
    """The carry entering step t of a reverse scan, in the carry's dtypes: ``carry0`` at
    t = 0, else the stored state after step t-1; reset where ``r_t`` is set."""
    prev_t = jax.tree.map(
        lambda c0, s: jnp.where(t == 0, c0, index(s, jnp.maximum(t - 1, 0)).astype(c0.dtype)),
        carry0,
        states,
    )
    return reset(r_t, prev_t)


def outside_error(dh_t, out_w, acc):
    """The error from outside the recurrence on step t's output, ``dh_t`` (``dh_t @ out_w.T``
    for a readout's error), in the carry's dtype ``acc``; ``None`` stays ``None``."""
    if dh_t is None:
        return None
    if out_w is not None:  # dh_t is the readout's dy_t
        dh_t = protocol.matmul(dh_t, out_w.T)
    return dh_t.astype(acc)


def add_error(cell, dstate, dh_t, out_w, acc):
    """The error on step t's new carry plus ``dh_t``, the error from outside the recurrence
    (:func:`outside_error`), in the carry's dtype ``acc``."""
    dh_t = outside_error(dh_t, out_w, acc)
    return dstate if dh_t is None else protocol.add_to_hidden(cell, dstate, dh_t)


def clip_and_keep(cell, dstate, real_t, backprop):
    """``(dstate, kept)``: the error clipped by ``backprop.delta_clip`` where the step exists
    (``real_t``), and what ``backprop.keep_deltas`` keeps of it (``None`` when off)."""
    dstate = clip(dstate, real_t, backprop.delta_clip)
    if not backprop.keep_deltas:
        return dstate, None
    return dstate, keeper(cell, backprop)(dstate)


def clip(dstate, real_t, delta_clip):
    """The error clipped by ``delta_clip`` (``None``: off) where the step exists (``real_t``:
    a scalar, or (B,) per example; ``None``: everywhere)."""
    if delta_clip is None:
        return dstate
    clipped = clip_delta(dstate, delta_clip)
    if real_t is None:
        return clipped
    return (
        select(real_t, clipped, dstate) if jnp.ndim(real_t) else select_all(real_t, clipped, dstate)
    )


def keeper(cell, backprop):
    """What ``backprop.keep_deltas`` keeps of one step's error: the callable it is, or the
    hidden part of the error (``True``)."""
    keep = backprop.keep_deltas
    return keep if callable(keep) else partial(protocol.carry_vector, cell)


def back_one_step(step_back, dstate, m_t, cut_t, r_t):
    """``step_back(dstate) -> (dprev, *rest)`` with the masks, cuts and resets applied: a
    padded step passes its error straight to the previous carry, a truncation cut or a
    reset stops it. Returns ``(dprev, rest)``."""
    if m_t is None:
        dprev, *rest = step_back(dstate)
    else:
        zeros = zeros_like(dstate)
        dprev, *rest = step_back(select(m_t, dstate, zeros))
        dprev = jax.tree.map(jnp.add, dprev, select(m_t, zeros, dstate))
    if cut_t is not None:
        dprev = jax.tree.map(lambda g: jnp.where(cut_t, jnp.zeros_like(g), g), dprev)
    if r_t is not None:  # the carry was replaced by zeros: nothing flows further back
        dprev = select(r_t, zeros_like(dprev), dprev)
    return dprev, rest
