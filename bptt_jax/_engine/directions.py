"""A Bidirectional layer's two directions: reversed valid prefixes, merged outputs, split errors.

The reverse direction runs over each sequence's reversed valid prefix, so its inputs, outputs
and errors are reversed in time on the way in and out. Where a layer's two directions are one
cell configuration on the fast path, they may run as one scan vmapped over a leading axis of
2 (:func:`fusable`; README.md: when that pays).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bptt_jax._engine import options
from bptt_jax._engine.bundles import OutputError
from bptt_jax._engine.sharding import off_mesh
from bptt_jax.cells import protocol


def reversal(mask, length: int, resets=None):
    """Indices ``idx`` (T, B) with ``x[idx[t, b], b]`` each sequence's valid prefix reversed,
    or with ``resets`` (packed rows: a sequence starts where a reset is set) each sequence of
    the row reversed on its own.

    ``len_b = sum_t mask[t, b]``: steps ``t < len_b`` map to ``len_b - 1 - t`` and padded
    steps to themselves, so the map is its own inverse and the reversed sequence is again
    right-padded by the same mask. With resets, a step t of the sequence ``[s, e)`` holding
    it maps to ``s + e - 1 - t``: every sequence stays where it is, reversed, so the reversed
    row has its resets at the same steps. ``None`` (no mask, no resets): the whole time axis
    is flipped.
    """
    if mask is None and resets is None:
        return None
    t = jnp.arange(length, dtype=jnp.int32)[:, None]
    if mask is None:
        lengths = jnp.full((1, resets.shape[1]), length, jnp.int32)
    else:
        lengths = jnp.sum(mask, axis=0, dtype=jnp.int32)[None]
    if resets is None:
        start, end = jnp.zeros_like(t), lengths
    else:
        # the sequence holding step t: from the last start at or before t to the next after
        starts = jnp.where(resets | (t == 0), t, 0)
        start = lax.cummax(starts, axis=0)
        later = jnp.where(resets, t, length)
        after = jnp.concatenate([lax.cummin(later, axis=0, reverse=True)[1:],
                                 jnp.full_like(later[:1], length)])  # fmt: skip
        end = jnp.minimum(after, lengths)
    return jnp.where(t < lengths, start + end - 1 - t, t)


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


def split_error(layer, dhs, idx, reverse: bool = True):
    """The error on a Bidirectional layer's outputs, split into its directions' errors.

    The reverse direction's comes in its own (reversed) time, or with ``reverse=False`` in
    forward time. An :class:`OutputError` stays one: its readout kernel is split by rows, its
    ``dy`` reversed.
    """
    hf, merge = protocol.output_size(layer.forward), layer.merge
    backwards = (lambda x: reverse_time(x, idx)) if reverse else (lambda x: x)  # noqa: E731
    if isinstance(dhs, OutputError):
        dy, w = dhs
        dy_b = backwards(dy)
        if merge == "concat":
            return OutputError(dy, w[:hf]), OutputError(dy_b, w[hf:])
        if merge == "mean":
            w = w * jnp.asarray(0.5, w.dtype)
        return OutputError(dy, w), OutputError(dy_b, w)
    if merge == "concat":
        f, b = dhs[..., :hf], dhs[..., hf:]
    else:
        f = b = dhs * jnp.asarray(0.5, dhs.dtype) if merge == "mean" else dhs
    return f, backwards(b)


class Paired(NamedTuple):
    """What a fused Bidirectional layer's forward stored: leaves with a leading axis of 2
    (forward direction, reverse direction)."""

    saved: object


def fusable(layer, x) -> bool:
    """Whether Bidirectional ``layer`` may run its directions as one scan over ``x``: fusing
    is on (:func:`~bptt_jax._engine.options.fuse_directions`), both directions are one
    fast-path cell, and ``x`` is on one device (a sharded run keeps one scan each)."""
    return (
        options.fuse_directions()
        and layer.forward == layer.backward
        and protocol.is_fast(layer.forward)
        and off_mesh(x)
    )


def pair(a, b):
    """Two directions' pytrees stacked on a leading axis of 2."""
    return jax.tree.map(lambda u, v: jnp.stack([u, v]), a, b)


def unpair(tree) -> tuple:
    """The inverse of :func:`pair`."""
    return jax.tree.map(lambda u: u[0], tree), jax.tree.map(lambda u: u[1], tree)


def by_direction(saved) -> tuple:
    """A Bidirectional layer's full-BPTT saved forward as ``(forward's, reverse's)``."""
    return unpair(saved.saved) if isinstance(saved, Paired) else saved
