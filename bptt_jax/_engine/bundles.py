"""What travels together through the engine, as named pytrees, and how they are cut in time.

Every per-step array has a leading time axis; cut into ``n`` segments of ``s`` steps it has
``(n, s)`` instead (:meth:`Steps.segments`, :meth:`HeadInputs.segments`, one tree map each).
A tail that ``s`` does not divide is padded with steps that are masked out: the carry passes
through them, they have no loss and get no gradient.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bptt_jax._engine import options
from bptt_jax._engine.sharding import batch_split, per_device
from bptt_jax.cells import protocol


class Steps(NamedTuple):
    """What a model reads at each step (a scan over it yields one step's rows)."""

    xs: jax.Array | None  # (T, B, D) inputs, in the compute dtype (None: only flags read)
    mask: jax.Array | None = None  # (T, B) bool, right padding: 0 = the carry passes through
    resets: jax.Array | None = None  # (T, B) bool: 1 = the carry entering the step is zeros
    drops: tuple | None = None  # a Stack's dropout multipliers (T, B, F_k), layers 1..L-1

    def segments(self, s: int) -> Steps:
        """Cut into ``ceil(T/s)`` segments of ``s`` steps, a padded tail masked out."""
        t, b = self.xs.shape[:2]
        n = math.ceil(t / s)
        mask = self.mask
        if mask is None and n * s != t:
            mask = jnp.ones((t, b), bool)
        return cut(self._replace(mask=mask), Steps(0, False, False, 1), n, s)


class HeadInputs(NamedTuple):
    """What a loss head reads besides the model's outputs."""

    readout: Any  # the readout's params (never cut: the same at every step)
    targets: jax.Array  # (T, B) classes or (T, B, O)
    valid: jax.Array | None = None  # (T, B) bool: the tokens that count

    def segments(self, s: int) -> HeadInputs:
        """Cut like :meth:`Steps.segments`; padded tokens do not count."""
        t, b = self.targets.shape[:2]
        n = math.ceil(t / s)
        valid = self.valid
        if valid is None and n * s != t:
            valid = jnp.ones((t, b), bool)
        return cut(self._replace(valid=valid), HeadInputs(None, 0, False), n, s)


@dataclasses.dataclass(frozen=True)
class Backprop:
    """How the error flows back through the steps, for every cell of a model.

    ``cuts`` and ``real`` are arrays (cut into segments with the steps); ``delta_clip`` and
    ``keep_deltas`` are static.
    """

    cuts: jax.Array | None = None  # (T,) bool: the carry entering step t gets no error
    real: jax.Array | None = None  # (T,) or (T, B) bool: the steps where clipping acts
    delta_clip: float | None = None  # each example's error clipped to this norm per step
    # True: keep the error reaching each hidden state; a callable: keep what it returns
    # from the error on the whole carry
    keep_deltas: bool | Callable = False

    def segments(self, s: int, length: int) -> Backprop:
        """Cut into segments of ``s`` steps; ``real`` set where padding fills the last one
        and clipping is on (the padding must not clip the error passing through it)."""
        n = math.ceil(length / s)
        cuts = None if self.cuts is None else segments(self.cuts, n, s, False)
        real = None
        if self.delta_clip is not None and n * s != length:
            real = (jnp.arange(n * s) < length).reshape(n, s)
        return dataclasses.replace(self, cuts=cuts, real=real)


jax.tree_util.register_dataclass(
    Backprop, data_fields=["cuts", "real"], meta_fields=["delta_clip", "keep_deltas"]
)


class Primals(NamedTuple):
    """What the engine's ``custom_vjp`` differentiates; its cotangent has the same shape."""

    params: Any  # the model's
    steps: Steps
    carry0: Any  # the model's carry entering step 0
    head: HeadInputs | None = None  # None: no head, the outputs are the result


class Stored(NamedTuple):
    """What one cell's forward over a whole sequence keeps for its reverse scan."""

    states: Any  # the carry after every step, leaves (T, B, ...) in the compute dtype
    # per-step buffers: the fast path's (T, B, H) residual and spent projection blocks (the
    # reverse scan writes its gradients over them); the generic path's inputs ``(xs,)``
    buffers: tuple | None


class WithOutputs(NamedTuple):
    """The stored states of a cell whose outputs are not its carry
    (:func:`~bptt_jax.cells.protocol.has_output`): the carries and the outputs, zeros at a
    padded step."""

    carries: Any  # leaves (T, B, ...)
    ys: jax.Array  # (T, B, F)


def carries_of(states):
    """The stored carries of :class:`Stored` ``states`` (a :class:`WithOutputs`' own)."""
    return states.carries if isinstance(states, WithOutputs) else states


def outputs_of(cell, states):
    """A cell's outputs (T, B, F) from its stored states: the stored ``y_t`` of a
    :class:`WithOutputs`, else the hidden part of every carry."""
    if isinstance(states, WithOutputs):
        return states.ys
    return protocol.hidden_seq(cell, states)


class OutputError(NamedTuple):
    """The error from a linear readout, handed to the reverse scan unmultiplied.

    ``dL/dh_t = dy_t @ w.T``, formed step by step inside the loop, so the (T, B, H) array of
    all of them is never stored.
    """

    dy: jax.Array  # (T, B, O) the error on the readout's outputs
    w: jax.Array  # (H, O) its kernel


class ReverseArgs(NamedTuple):
    """A step-by-step reverse walk's arguments (the generic and the linear path's), as
    :func:`~bptt_jax._engine.sharding.per_device` splits them."""

    params: Any
    steps: Steps
    carry0: Any
    stored: Stored
    g: tuple
    backprop: Backprop


def reverse_per_device(walk, params, steps, carry0, stored, g, backprop, out_axes):
    """``walk(*ReverseArgs)``, on each device's rows when the batch (the stored inputs
    ``stored.buffers[0]``) is sharded over a mesh, so that a gradient summed inside the walk
    crosses the devices once, after it (``out_axes``: :func:`per_device`'s), else once."""
    args = ReverseArgs(params, Steps(None, steps.mask, steps.resets), carry0, stored, g, backprop)
    split = batch_split(stored[1][0])
    if split is None:
        return walk(*args)
    axes = ReverseArgs(
        params=None, steps=1, carry0=0, stored=1, backprop=None,
        g=(OutputError(1, None) if isinstance(g[0], OutputError) else 1, 0),
    )  # fmt: skip
    return per_device(split, walk, args, axes, out_axes)


def output_error(dy, w):
    """``dL/dh_t = dy_t @ w.T`` for every step: (T, B, H), or an :class:`OutputError` for a
    large one (:data:`~bptt_jax._engine.options.LARGE_BYTES`)."""
    t, b, _ = dy.shape
    if t * b * w.shape[0] * dy.dtype.itemsize >= options.LARGE_BYTES:
        return OutputError(dy, w)
    return protocol.matmul(dy, w.T)


def dense(dhs):
    """An error on the outputs as one array (an :class:`OutputError` multiplied out)."""
    return dhs.dy @ dhs.w.T if isinstance(dhs, OutputError) else dhs


def segments(x, n: int, s: int, fill=0):
    """(T, ...) -> (n, s, ...), the tail padded with ``fill``; ``None`` stays ``None``."""
    if x is None:
        return None
    pad = n * s - x.shape[0]
    if pad:
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
    return x.reshape(n, s, *x.shape[1:])


def unsegment(x, length: int):
    """The inverse of :func:`segments`: (n, s, ...) -> (length, ...)."""
    return x.reshape(-1, *x.shape[2:])[:length]


def cut(bundle, fills, n: int, s: int):
    """Every per-step array of ``bundle`` cut into segments, padded with its field's fill in
    ``fills`` (a bundle of the same type; a ``None`` fill: not per step, kept whole)."""
    return jax.tree.map(
        lambda fill, part: (
            part if fill is None else jax.tree.map(lambda x: segments(x, n, s, fill), part)
        ),
        fills,
        bundle,
        is_leaf=lambda x: x is None,
    )
