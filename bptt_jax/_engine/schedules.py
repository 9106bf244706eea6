"""How time is walked: the full, checkpointed and chunked (truncated) schedules.

A schedule is a static, hashable object with two methods, called by the engine's
``custom_vjp`` (:mod:`~bptt_jax._engine.vjp`):

* ``forward(model, head, primals) -> ((out, carry_T), residuals)``
* ``backward(model, head, residuals, g) -> cotangent``: ``g`` the cotangent of
  ``(out, carry_T)``, the result a :class:`~bptt_jax._engine.bundles.Primals`.

``head`` is ``None`` (``out`` is the outputs ``hs``) or a loss head
(:class:`bptt_jax.losses.LossHead`: ``out`` is the loss). The schedules:

* :class:`Full`: every layer over the whole sequence, every step stored (or, for a model
  with a Bidirectional layer under checkpointed BPTT, each cell checkpointed on its own,
  :class:`CheckpointedCell`);
* :class:`Checkpointed`: memory-efficient BPTT (Gruslys et al. 2016, one level of
  checkpoints): the forward keeps only the carry entering each segment of ``s`` steps
  (every layer's); the backward walks the segments in reverse, re-runs each one's forward
  from its checkpoint and runs the same hand-written backward over it. Memory ~ ``T/s``
  carries + one segment's buffers, for one extra forward;
* :class:`Chunked`: truncated BPTT with a loss head, chunk by chunk. No error crosses a
  chunk boundary, so the chunks' backward passes are independent: the forward runs over a
  group of ``g`` chunks (sized to stay in cache), then one reverse scan of only ``k`` steps
  takes the group's chunks at once, as a batch of ``g*B`` rows. The head's gradient is
  computed during the forward for a unit cotangent and scaled in the backward; the error
  on ``carry_T`` reaches only the last chunk, which the backward re-runs for it.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bptt_jax._engine import memory
from bptt_jax._engine.bundles import (
    Backprop,
    HeadInputs,
    Primals,
    Steps,
    carries_of,
    dense,
    segments,
    unsegment,
)
from bptt_jax._engine.layers import (
    FULL,
    from_layers,
    layer_output,
    layers_of,
    model_backward,
    model_forward,
)
from bptt_jax._engine.sharding import SUMMED, batch_split, like_batch, per_device, vary_like
from bptt_jax._engine.step_rules import truncation_cuts, zeros_like
from bptt_jax._engine.time_sharded import TimeSharded


# ------------------------------------------------------------------ the segment loop
class Segments(NamedTuple):
    """What the segment loop reads per segment: leaves with leading axes (n, s)."""

    steps: Steps
    backprop: Backprop = Backprop()  # cuts and real steps (the backward)
    checkpoints: Any = None  # the carry entering each segment, leaves (n, B, ...)
    top: Any = None  # what the top of each segment reads per step


class _Args(NamedTuple):
    """The segment loop's arguments, as :func:`~bptt_jax._engine.sharding.per_device`
    splits them."""

    params: Any
    segs: Segments
    carry: Any  # the carry entering the first segment, or the error on the last one's
    consts: Any  # arrays the top reads, the same for every segment


#: Batch axes of the segment loop's arguments.
_AXES = _Args(
    params=None, segs=Segments(steps=2, backprop=None, checkpoints=1, top=2), carry=0, consts=None
)


class _Outputs:
    """The top of a segment with no head: its outputs; their error comes cut in segments."""

    out_axis = 2  # the batch axis of the stacked outputs (n, s, B, ...)

    @staticmethod
    def value(hs, per_step, consts):
        return hs

    @staticmethod
    def cotangent(hs, dhs, consts):
        return dhs, (), None

    @staticmethod
    def zeros(consts):
        return ()


OUTPUTS = _Outputs()


class LossConsts(NamedTuple):
    """What a loss head reads the same for every segment."""

    readout: Any
    scale: jax.Array  # () the loss's weight per counted token (:meth:`LossHead.scale`)
    g: jax.Array | None = None  # () the cotangent of the loss (the backward)


@dataclasses.dataclass(frozen=True)
class SegmentLoss:
    """The top of a segment under a loss head: the segment's loss, its error and the
    readout's gradient. Its per-step inputs are a :class:`HeadInputs` without readout."""

    head: Any
    out_axis = SUMMED  # the losses are summed over the devices

    def value(self, hs, per_step, consts):
        return self.head.segment_value(per_step._replace(readout=consts.readout), hs, consts.scale)

    def cotangent(self, hs, per_step, consts):
        _, dhs, d_ro, d_tg = self.head.segment_value_and_cotangent(
            per_step._replace(readout=consts.readout), hs, consts.scale, consts.g
        )
        return dhs, d_ro, d_tg

    @staticmethod
    def zeros(consts):
        return zeros_like(consts.readout)


def segment_forward(model, params, segs, carry0, top, consts=()):
    """The forward over segments, keeping only the carry entering each (every layer's).

    ``top.value(hs_seg, per_step_seg, consts)`` is stacked per segment. On a mesh the loop
    runs per device, so that a segment's loss is not reduced across the devices inside it.

    Returns:
      ``(checkpoints, outputs, carry_T)``; ``checkpoints`` has a leading n axis.
    """
    args = _Args(params, segs, carry0, consts)
    split = batch_split(segs.steps.xs, axis=2)
    if split is None:
        return _segment_forward(model, top, *args)
    fn = partial(_segment_forward, model, top)
    return per_device(split, fn, args, _AXES, (1, top.out_axis, 0))


def _segment_forward(model, top, params, segs, carry0, consts):
    def body(carry, seg):
        hs, carry_out, _ = model_forward(model, params, seg.steps, carry, keep=False)
        return carry_out, (carry, top.value(hs, seg.top, consts))

    carry_t, (checkpoints, outs) = lax.scan(body, like_batch(carry0, segs.steps.xs[0]), segs)
    return checkpoints, outs, carry_t


def segment_backward(model, params, segs, dcarry_t, top, consts=()):
    """The hand-written BPTT over segments, each re-run from its checkpoint (every layer).

    ``top.cotangent(hs_seg, per_step_seg, consts) -> (dhs_seg, acc_seg, out_seg)``: the
    error arriving at the segment's outputs from outside the recurrence, a pytree summed
    over the segments (the readout's gradient) and one stacked per segment.

    Returns:
      ``(dparams, dxs_s, dcarry0, acc, outs)``; ``dxs_s`` has leading axes (n, s). On a mesh
      each device sums its rows' gradients over the segments, and ``dparams`` and ``acc``
      cross the devices once, after the loop.
    """
    args = _Args(params, segs, dcarry_t, consts)
    split = batch_split(segs.steps.xs, axis=2)
    if split is None:
        return _segment_backward(model, top, *args)
    fn = partial(_segment_backward, model, top)
    return per_device(split, fn, args, _AXES, (SUMMED, 2, 0, SUMMED, 2))


def _segment_backward(model, top, params, segs, dcarry_t, consts):
    def body(carry, seg):
        dcarry, grads, acc = carry
        hs, _, saved = model_forward(model, params, seg.steps, seg.checkpoints)
        dhs, acc_seg, out = top.cotangent(hs, seg.top, consts)
        g, dx, dcarry_in, _ = model_backward(
            model, params, seg.steps, seg.checkpoints, saved, (dhs, dcarry), seg.backprop
        )
        add = partial(jax.tree.map, jnp.add)
        return (dcarry_in, add(grads, g), add(acc, acc_seg)), (dx, out)

    xs_s = segs.steps.xs
    init = vary_like((like_batch(dcarry_t, xs_s[0]), zeros_like(params), top.zeros(consts)), xs_s)
    (dcarry0, grads, acc), (dxs_s, outs) = lax.scan(body, init, segs, reverse=True)
    return grads, dxs_s, dcarry0, acc, outs


@dataclasses.dataclass(frozen=True)
class CheckpointedCell:
    """The cell walk of checkpointed BPTT for one cell on its own (see
    :mod:`~bptt_jax._engine.layers`): for a model with a Bidirectional layer, whose layers
    cannot be walked through time together; each layer keeps its input (T, B, F)."""

    segment: int
    stores_inputs = True

    def forward(self, cell, params, steps, carry0, keep):
        segs = Segments(steps.segments(self.segment))
        ckpt, hs_s, carry_t = segment_forward(cell, params, segs, carry0, OUTPUTS)
        return unsegment(hs_s, steps.xs.shape[0]), carry_t, ckpt if keep else None

    def backward(self, cell, params, steps, carry0, saved, g, backprop):
        if backprop.keep_deltas:
            raise ValueError("the deltas of checkpointed BPTT are not kept; use the full path")
        t, s = steps.xs.shape[0], self.segment
        dhs, dcarry_t = g
        steps_s = steps.segments(s)
        backprop_s = backprop.segments(s, t)
        per_step = segments(dense(dhs), math.ceil(t / s), s)
        segs = Segments(steps_s, backprop_s, saved, per_step)
        grads, dxs_s, dcarry0, _, _ = segment_backward(cell, params, segs, dcarry_t, OUTPUTS)
        return grads, unsegment(dxs_s, t), dcarry0, None


# ------------------------------------------------------------------------ schedules
def _loss_dtype(readout, xs):
    """The dtype of a loss value: the readout's (the params'), also under a policy."""
    leaves = jax.tree.leaves(readout)
    return leaves[0].dtype if leaves else xs.dtype


def _loss_scale(head, head_in, xs):
    t, b = xs.shape[:2]
    return head.scale(head_in.valid, t, b, _loss_dtype(head_in.readout, xs))


def _per_step(head_in, s):
    """The head's per-step inputs cut into segments of ``s`` steps, readout left out."""
    return head_in.segments(s)._replace(readout=None)


class FullResiduals(NamedTuple):
    primals: Primals
    saved: Any  # model_forward's
    hs: jax.Array | None  # the outputs, under a head
    dy: Any  # the head's error for a unit cotangent (LossHead.forward)


@dataclasses.dataclass(frozen=True)
class Full:
    """Full BPTT: each layer over the whole sequence, every step stored; with ``segment``,
    each cell checkpointed on its own instead (:class:`CheckpointedCell`); with
    ``time_axis``, the time axis split over that mesh axis
    (:class:`~bptt_jax._engine.time_sharded.TimeSharded`)."""

    truncate: int | None = None
    delta_clip: float | None = None
    segment: int | None = None
    time_axis: str | None = None

    @property
    def walk(self):
        if self.time_axis is not None:
            return TimeSharded(self.time_axis, self.truncate)
        return FULL if self.segment is None else CheckpointedCell(self.segment)

    def forward(self, model, head, primals):
        params, steps, carry0, head_in = primals
        hs, carry_t, saved = model_forward(model, params, steps, carry0, walk=self.walk)
        if head is None:
            out, dy, hs = hs, None, None
        else:
            out, dy = head.forward(head_in, hs)
        return (out, carry_t), FullResiduals(primals, saved, hs, dy)

    def backward(self, model, head, res, g):
        (params, steps, carry0, head_in), saved, hs, dy = res
        g_out, g_carry = g
        head_ct = None
        if head is None:
            dhs = g_out
        else:
            dhs, d_readout, d_tg = head.backward(head_in, hs, dy, g_out)
            head_ct = HeadInputs(d_readout, d_tg)
        cuts = truncation_cuts(steps.xs.shape[0], self.truncate)
        grads, dxs, dcarry0, _ = model_backward(
            model, params, steps, carry0, saved, (dhs, g_carry),
            Backprop(cuts, delta_clip=self.delta_clip),
        )  # fmt: skip
        return Primals(grads, Steps(dxs), dcarry0, head_ct)


class CheckpointedResiduals(NamedTuple):
    primals: Primals
    checkpoints: Any  # the carry entering each segment, every layer's, leaves (n, B, ...)


@dataclasses.dataclass(frozen=True)
class Checkpointed:
    """Checkpointed BPTT of the whole model, segment by segment, all layers at once."""

    segment: int
    truncate: int | None = None
    delta_clip: float | None = None

    def forward(self, model, head, primals):
        params, steps, carry0, head_in = primals
        segs, top, consts = Segments(steps.segments(self.segment)), OUTPUTS, ()
        if head is not None:
            scale = _loss_scale(head, head_in, steps.xs)
            segs = segs._replace(top=_per_step(head_in, self.segment))
            top, consts = SegmentLoss(head), LossConsts(head_in.readout, scale)
        ckpt, outs, carry_t = segment_forward(model, params, segs, carry0, top, consts)
        out = unsegment(outs, steps.xs.shape[0]) if head is None else jnp.sum(outs)
        return (out, carry_t), CheckpointedResiduals(primals, ckpt)

    def backward(self, model, head, res, g):
        (params, steps, carry0, head_in), ckpt = res
        g_out, g_carry = g
        t, s = steps.xs.shape[0], self.segment
        steps_s = steps.segments(s)
        if head is None:
            top, consts, per_step = OUTPUTS, (), segments(g_out, math.ceil(t / s), s)
        else:
            scale = _loss_scale(head, head_in, steps.xs)
            per_step = _per_step(head_in, s)
            top, consts = SegmentLoss(head), LossConsts(head_in.readout, scale, g_out)
        backprop = Backprop(truncation_cuts(t, self.truncate), delta_clip=self.delta_clip)
        segs = Segments(steps_s, backprop.segments(s, t), ckpt, per_step)
        grads, dxs_s, dcarry0, d_readout, d_tg = segment_backward(
            model, params, segs, g_carry, top, consts
        )
        head_ct = None
        if head is not None:
            head_ct = HeadInputs(d_readout, None if d_tg is None else unsegment(d_tg, t))
        return Primals(grads, Steps(unsegment(dxs_s, t)), dcarry0, head_ct)


# -------------------------------------------------------------------- chunk by chunk
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


class _UnitGrads(NamedTuple):
    """The chunked forward's gradients, for a unit cotangent on the loss."""

    params: Any
    readout: Any
    xs: jax.Array
    targets: jax.Array | None
    carry0: Any


class ChunkedResiduals(NamedTuple):
    unit: _UnitGrads
    params: Any
    last: Any  # the carry entering the last chunk
    tail: Steps  # the last chunk's steps (k of them, the steps past T padded)


@dataclasses.dataclass(frozen=True)
class Chunked:
    """Truncated BPTT chunk by chunk (with a loss head and no per-step clipping)."""

    truncate: int

    def forward(self, model, head, primals):
        params, steps, carry0, head_in = primals
        k = self.truncate
        xs = steps.xs
        t, b = xs.shape[:2]
        n_chunks = math.ceil(t / k)
        g = memory.chunk_group(model, k, n_chunks, b, xs.dtype)
        ldt = _loss_dtype(head_in.readout, xs)
        scale = head.scale(head_in.valid, t, b, ldt)
        inputs = (steps.segments(g * k), _per_step(head_in, g * k))
        consts = LossConsts(head_in.readout, scale, jnp.ones((), ldt))
        group = _Group(model, head, params, consts, k, g)
        init = (like_batch(carry0, xs), zeros_like(params), zeros_like(head_in.readout),
                jnp.zeros((), ldt))  # fmt: skip
        (carry_t, grads, d_readout, value), (entering, dxs_s, d_tg, dcarry_in) = lax.scan(
            group.body, vary_like(init, xs), inputs
        )
        # the last chunk (steps [(n_chunks - 1) k, T)), for the error on carry_T
        last = jax.tree.map(lambda c: c.reshape(-1, *c.shape[2:])[n_chunks - 1], entering)
        tail = jax.tree.map(lambda a: a[-1], steps.segments(k))
        dcarry0 = jax.tree.map(lambda c: c[0], dcarry_in)
        d_tg = None if d_tg is None else unsegment(d_tg, t)
        unit = _UnitGrads(grads, d_readout, unsegment(dxs_s, t), d_tg, dcarry0)
        return (value, carry_t), ChunkedResiduals(unit, params, last, tail)

    def backward(self, model, head, res, g):
        unit, params, last, tail = res
        g_loss, g_carry = g
        grads, d_readout, dxs, d_tg, dcarry0 = jax.tree.map(lambda u: g_loss * u, unit)
        # the error on carry_T, back through the last chunk only
        _, _, saved = model_forward(model, params, tail, last)
        dparams, dx, _, _ = model_backward(model, params, tail, last, saved, (None, g_carry))
        grads = jax.tree.map(jnp.add, grads, dparams)
        t = dxs.shape[0]
        start = (math.ceil(t / self.truncate) - 1) * self.truncate  # the last chunk: [start, T)
        dxs = dxs.at[start:].add(dx[: t - start])
        return Primals(grads, Steps(dxs), dcarry0, HeadInputs(d_readout, d_tg))


class _Group(NamedTuple):
    """The chunked forward's loop over groups of ``g`` chunks of ``k`` steps: what its body
    reads besides each group's inputs."""

    model: Any
    head: Any
    params: Any
    consts: LossConsts  # the readout, the loss scale and a unit cotangent
    k: int
    g: int

    def body(self, acc, inputs):
        """Forward over the group; then every chunk's backward at once, chunk-major."""
        model, params, g = self.model, self.params, self.g
        carry, grads, d_readout, value = acc
        steps, per_step = inputs
        _, carry_out, saved = model_forward(model, params, steps, carry)
        entering, flat = self.entering(carry, saved)
        saved_c, steps_c, per_step_c = jax.tree.map(
            partial(_chunk_major, g=g), (saved, steps, per_step)
        )
        # the head on the chunk-major outputs: the loss and its error from one readout
        hs_c = layer_output(layers_of(model)[-1], saved_c.layers[-1], None)
        v, dhs, d_ro, d_tg = self.head.segment_value_and_cotangent(
            per_step_c._replace(readout=self.consts.readout), hs_c, self.consts.scale,
            self.consts.g,
        )  # fmt: skip
        gr, dx, dcarry_in, _ = model_backward(
            model, params, steps_c, flat, saved_c, (dhs, zeros_like(flat))
        )
        add = partial(jax.tree.map, jnp.add)
        acc = (carry_out, add(grads, gr), add(d_readout, d_ro), value + v)
        d_tg = None if d_tg is None else _time_major(d_tg, g)
        # chunk 0's: the error on the group's entering carry
        b = steps.xs.shape[1]
        dcarry_in = jax.tree.map(lambda c: c.reshape(b, g, *c.shape[1:])[:, 0], dcarry_in)
        return acc, (entering, _time_major(dx, g), d_tg, dcarry_in)

    def entering(self, carry, saved):
        """The carry entering each of the g chunks, every layer's: (g, B, ...), and as the
        chunk-major batch (B*g, ...)."""
        k, g = self.k, self.g
        states = from_layers(self.model, [carries_of(s.states) for s in saved.layers])
        entering = jax.tree.map(
            lambda c0, st: jnp.concatenate([c0[None], st[k - 1 :: k][: g - 1].astype(c0.dtype)]),
            carry,
            states,
        )
        b = jax.tree.leaves(carry)[0].shape[0]
        flat = jax.tree.map(lambda c: jnp.moveaxis(c, 0, 1).reshape(b * g, *c.shape[2:]), entering)
        return entering, flat
