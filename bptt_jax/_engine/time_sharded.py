"""Sequence parallelism: a linear cell's BPTT with the time axis split over devices.

A linear recurrence ``h_t = a_t h_{t-1} + b_t`` over a device's steps is an affine map of
the carry entering them, ``h -> A h + h0`` (:func:`~bptt_jax._engine.linear_scan.summary`:
``A`` the product of their ``a_t``, ``h0`` their final state from zero). So each device
summarises its steps, the devices exchange their ``(A, h0)`` (one all-gather of two (B, N)
arrays per device), every device composes the summaries of the devices before it into the
carry entering its own steps, and runs the ordinary chunked scan
(:func:`~bptt_jax._engine.linear_scan.forward`) from it. The backward is the same in
reverse time: the error recursion ``delta_t = dh_t + a_{t+1} delta_{t+1}`` is linear too,
each device summarises its steps as ``g -> P g + d0`` for the error ``g`` arriving from the
right (:func:`~bptt_jax._engine.linear_scan.back_summary`), one all-gather, and each runs
the hand-written backward (:func:`~bptt_jax._engine.linear_scan.backward`) with its exact
incoming error. The params' gradient crosses the devices once, at the end. Per layer and
direction: one collective in the forward, one in the backward plus the params' sum, none
inside a loop; each device stores only its own steps. Per-step clipping is not linear: with
it the incoming errors are passed from device to device, right to left (``_passed_left``).

A Bidirectional layer's reverse direction runs as a recurrence in reverse time: each device
flips its own steps (no data moves) and the summaries are composed in reverse device order.
With right padding (``mask``), the padded steps at the end are then walked first, passing
the entering carry, and afterwards show the direction's final carry, as the engine's
reversal of each valid prefix does; their error joins the error on the final carry (under
per-step clipping step by step from the end, clipped at each, ``_padded_back``, and the
error on the initial carry is not clipped while it passes them: both as on one device).

The walk (:class:`TimeSharded`) runs inside ``shard_map`` over the time axis (and the batch
axes, under a 2-D mesh): a user's own (the arrays are then already local), or one it opens
on the mesh the inputs are laid out on (Explicit) or set (Auto).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from bptt_jax._engine import linear_scan, step_rules
from bptt_jax._engine.bundles import OutputError, Steps, Stored, dense, outputs_of
from bptt_jax._engine.sharding import mesh_of, reshard, split_axes, vary_like, varying_axes
from bptt_jax.cells import protocol

try:  # an all-gather whose result every device holds alike (an invariant value)
    from jax._src.lax.parallel import all_gather_invariant as _all_gather_invariant
except ImportError:  # pragma: no cover - older or newer JAX without it
    _all_gather_invariant = None


def gather(x, axis: str):
    """``x`` of every device along mesh ``axis``, stacked (n, ...), the same on each."""
    if _all_gather_invariant is not None:
        return _all_gather_invariant(x, axis)
    n, k = lax.axis_size(axis), lax.axis_index(axis)
    return lax.psum(jnp.zeros((n,) + x.shape, x.dtype).at[k].set(x), axis)


def _device(axis: str, reverse: bool):
    """``(k, n)``: this device's place along ``axis`` in the walk's order, and their number."""
    n, k = lax.axis_size(axis), lax.axis_index(axis)
    return (n - 1 - k if reverse else k), n


def _exchange(parts, axis: str, reverse: bool):
    """Every device's ``parts`` (arrays of one shape and dtype), one all-gather: (n, ...)
    each, in the walk's device order."""
    stacked = gather(jnp.stack(parts), axis)  # (n, len(parts), ...)
    if reverse:
        stacked = jnp.flip(stacked, 0)
    return tuple(stacked[:, i] for i in range(len(parts)))


def entering_carries(prod, h0, carry0, axis: str, reverse: bool):
    """The carry entering this device's steps and the carry leaving the last device's (the
    final carry), from each device's ``(A, h0)`` (:func:`linear_scan.summary`)."""
    field = linear_scan.field_of(prod)
    prods, finals = _exchange((prod, h0.astype(prod.dtype)), axis, reverse)
    c0 = field.enter(carry0).astype(prod.dtype)
    after = linear_scan.recurrence(prods, finals, c0, "sequential")  # the carry after device j
    k, _ = _device(axis, reverse)
    entering = jnp.concatenate([c0[None], after[:-1]])[k]
    return field.leave(entering), field.leave(after[-1])


def incoming_errors(prod, d0, dcarry_t, axis: str, reverse: bool, extra=None):
    """The error arriving at this device's last carry from the right and the error on the
    carry entering the first device (``dcarry0``), from each device's ``(P, d0)``
    (:func:`linear_scan.back_summary`) and the error on the final carry; ``extra``: each
    device's share of the final carry's error, summed in the same exchange."""
    field = linear_scan.field_of(prod)
    parts = (prod, d0.astype(prod.dtype))
    if extra is not None:
        parts += (field.enter(extra).astype(prod.dtype),)
    gathered = _exchange(parts, axis, reverse)
    d_t = field.enter(dcarry_t).astype(prod.dtype)
    if extra is not None:
        d_t = d_t + jnp.sum(gathered[2], axis=0)
    out = linear_scan.recurrence(gathered[0], gathered[1], d_t, "sequential", reverse=True)
    k, _ = _device(axis, reverse)
    g = jnp.concatenate([out[1:], d_t[None]])[k]  # out[j]: the error entering device j
    return field.leave(g), field.leave(out[0])


def _on_error(dhs, fn):
    """``fn`` applied to an error on the outputs, per step: to an :class:`OutputError`'s
    ``dy``; ``None`` stays ``None``."""
    if dhs is None:
        return None
    return dhs._replace(dy=fn(dhs.dy)) if isinstance(dhs, OutputError) else fn(dhs)


def _passed_left(walk, d_t, axis: str, reverse: bool, like):
    """The error arriving at this device's last carry from the right, and ``dcarry0``, when
    no summary composes them (per-step clipping): the last device walks its steps back from
    the final carry's error ``d_t`` and passes the error on its entering carry to the device
    before (a collective-permute), which walks its own, and so on: ``n - 1`` walks one after
    the other (as long as one device's walk of the whole sequence) and permutes, none inside
    a loop; device 0's result, summed over the devices (an all-reduce), is ``dcarry0``.
    ``like``: this device's steps (what the walk's result varies with over the devices)."""
    k, n = _device(axis, reverse)
    step = 1 if reverse else -1  # the device before, in the walk's order, in mesh positions
    pairs = [(i, i + step) for i in range(n) if 0 <= i + step < n]
    skip = lambda g: vary_like(jnp.zeros_like(g), like)  # noqa: E731
    walk_here = lambda g: vary_like(walk(g), like)  # noqa: E731
    g = d_t
    for src in range(n - 1, 0, -1):  # src's error on its entering carry reaches src - 1
        left = lax.cond(k == src, walk_here, skip, g)
        g = jnp.where(k == src - 1, lax.ppermute(left, axis, pairs), g)
    dcarry0 = lax.psum(lax.cond(k == 0, walk_here, skip, g), axis)
    return g, dcarry0


def _padded_back(errors, mask, delta_clip, d):
    """The error ``d`` on the final carry walked back through this device's steps, in time
    order, gathering the errors of the padded ones (which show the final carry) and clipped
    at each of them, as the reverse direction's walk on one device does there; valid steps
    pass it unchanged."""

    def body(d, row):
        e, m = row
        return jnp.where(m[:, None], d, step_rules.clip(e + d, None, delta_clip)), None

    return lax.scan(body, vary_like(d, errors), (errors, mask), reverse=True)[0]


def _flip(tree):
    return jax.tree.map(lambda x: None if x is None else jnp.flip(x, 0), tree)


def _local_cuts(axis: str, length: int, truncate):
    """The truncation cuts (:func:`~bptt_jax._engine.step_rules.truncation_cuts`) of this
    device's ``length`` steps, counted in the whole sequence's time."""
    if truncate is None:
        return None
    k, _ = _device(axis, False)
    t = k * length + jnp.arange(length, dtype=jnp.int32)
    return (t % truncate == 0) & (t > 0)


class ShardSaved(NamedTuple):
    """What a time-sharded cell walk stores for its backward."""

    states: Any  # the state after every step (the reverse direction's in its own order)
    buffers: Any  # the linear path's stored inputs
    entering: jax.Array  # the carry entering each device's steps, (n, B, N)


def _forward_local(cell, axis, keep, reverse, params, steps, carry0, opened):
    """The walk on this device's steps (see the module docstring)."""
    local = _flip(steps) if reverse else steps
    prod, h0 = linear_scan.summary(cell, params, local, carry0)
    entering, final = entering_carries(prod, h0, carry0, axis, reverse)
    states, bufs, _ = linear_scan.forward(cell, params, local, entering, keep)
    hs = None
    if reverse or not keep:  # (else the stored states are read as the outputs: no copy)
        hs = outputs_of(cell, states)
    if reverse:
        hs = jnp.flip(hs, 0)
        if steps.mask is not None and not protocol.has_output(cell):  # padded: the final carry
            hs = jnp.where(steps.mask[..., None], hs, final[None].astype(hs.dtype))
    saved = ShardSaved(states, bufs, entering[None]) if keep else None
    return hs, final.astype(carry0.dtype), saved


def _backward_local(cell, axis, truncate, reverse, params, steps, carry0, saved, g, backprop,
                    opened):  # fmt: skip
    """The hand-written backward on this device's steps (see the module docstring).

    Inside a user's shard_map (not ``opened``), the final carry is each device's copy of one
    value: a cotangent on it that differs between devices is summed over them (in the
    exchange), and the error on ``carry0``, which every device computes whole, is given on
    the first device alone, for :func:`~bptt_jax._engine.sharding.finish_cotangents` to sum
    over the devices as for any replicated input."""
    states, bufs, entering = saved
    entering = entering[0]
    dhs, dcarry_t = g
    padded = chain = None
    if not opened and axis in varying_axes(dcarry_t):  # each device's share of the final error
        padded, dcarry_t = dcarry_t, jnp.zeros_like(dcarry_t)
    if reverse:
        if dhs is not None and steps.mask is not None and not protocol.has_output(cell):
            # a padded step shows the final carry: its error joins the final carry's (step by
            # step from the end, clipped at each, under per-step clipping, as on one device)
            m = steps.mask[..., None]
            if backprop.delta_clip is not None:
                chain = (jnp.where(m, 0, dense(dhs)).astype(dcarry_t.dtype), steps.mask)
            else:
                dy = dhs.dy if isinstance(dhs, OutputError) else dhs
                share = jnp.sum(jnp.where(m, 0, dy), axis=0)
                if isinstance(dhs, OutputError):
                    share = share @ dhs.w.T
                padded = share.astype(dcarry_t.dtype) + (0 if padded is None else padded)
            dhs = _on_error(dhs, lambda d: jnp.where(m, d, 0))
        steps, dhs = _flip(steps), _on_error(dhs, lambda d: jnp.flip(d, 0))
    cuts = None if reverse else _local_cuts(axis, steps.xs.shape[0], truncate)
    # the reverse direction's padded steps come first here, last on one device: no clipping
    # there of the error on its initial carry (their own errors are walked apart, above)
    real = steps.mask if reverse and backprop.delta_clip is not None else None
    backprop = dataclasses.replace(backprop, cuts=cuts, real=real)
    stored = Stored(states, bufs)
    if backprop.delta_clip is None:
        prod, d0 = linear_scan.back_summary(cell, params, steps, entering, stored, dhs, backprop)
        g_in, dcarry0 = incoming_errors(prod, d0, dcarry_t, axis, reverse, padded)
    else:  # clipping is not linear: the incoming errors device by device, right to left
        d_t = dcarry_t if padded is None else dcarry_t + lax.psum(padded, axis)
        if chain is not None:  # the padded steps' errors, from the end, device by device
            back = partial(_padded_back, *chain, backprop.delta_clip)
            _, d_t = _passed_left(back, d_t, axis, False, steps.xs)
        walk = partial(linear_scan.reverse_scan, cell, params, steps, entering, stored)
        g_in, dcarry0 = _passed_left(lambda g: walk((dhs, g), backprop)[0], d_t, axis, reverse,
                                     steps.xs)  # fmt: skip
    dparams, dxs, _, kept = linear_scan.backward(
        cell, params, steps, entering, stored, (dhs, g_in.astype(dcarry_t.dtype)), backprop
    )
    if reverse:
        dxs, kept = _flip(dxs), _flip(kept)
    if not opened:
        dcarry0 = jnp.where(lax.axis_index(axis) == 0, dcarry0, 0)
    return dparams, dxs, dcarry0.astype(carry0.dtype), kept


# ------------------------------------------------------------------ entering shard_map
#: Leaf kinds of the walk's arguments and results, for their shard_map specs.
TIME, CARRY, PARAMS, SUMMED = "time", "carry", "params", "summed"


def _layout(xs, axis: str):
    """``(mesh, batch)`` of the shard_map the walk opens over ``xs`` (T, B, ...), or
    ``None`` inside a user's shard_map over ``axis`` (the arrays are already local)."""
    if axis in varying_axes(xs):
        return None
    sharding = getattr(jax.typeof(xs), "sharding", None)
    if sharding is not None and not sharding.mesh.empty and axis in sharding.mesh.axis_names:
        return mesh_of(xs), split_axes(xs, 1)  # an Explicit mesh: laid out as its type
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or axis not in mesh.axis_names:
        raise ValueError(
            f"time_axis={axis!r}: the inputs are not split along it: no shard_map over it "
            f"is running, the inputs' time axis is not laid out over it, and no mesh with "
            f"it is set (jax.set_mesh); mesh axes: {tuple(mesh.axis_names) or None}"
        )
    others = tuple(n for n in mesh.axis_names if n != axis)
    size = 1
    for n in others:
        size *= mesh.shape[n]
    auto = all(mesh.axis_types[mesh.axis_names.index(n)] == AxisType.Auto for n in others)
    if not others or not auto or xs.shape[1] % size:
        return mesh, None
    return mesh, others[0] if len(others) == 1 else others


def run_sharded(axis: str, xs, fn, args, kinds_in, kinds_out):
    """``fn(*args, opened=...)`` on each device's steps: directly inside a user's shard_map
    over ``axis`` (``opened=False``), else inside one opened here (time along ``axis``, the
    batch along the axes it is split over). ``kinds_in``/``kinds_out``: prefixes of
    ``args``/the result, each leaf a kind (:data:`TIME` (T, B, ...), :data:`CARRY`
    (B, ...), :data:`PARAMS` replicated, :data:`SUMMED` each device's part summed over all
    of them) or ``None`` (no array)."""
    layout = _layout(xs, axis)
    if layout is None:
        return fn(*args, opened=False)
    mesh, batch = layout
    names = (axis,) + (() if batch is None else batch if isinstance(batch, tuple) else (batch,))

    def spec(kind):
        if kind == TIME:
            return P(axis, batch)
        return P(batch) if kind == CARRY else P()

    is_kind = lambda x: x is None or isinstance(x, str)  # noqa: E731
    in_specs = jax.tree.map(spec, kinds_in, is_leaf=is_kind)
    out_specs = jax.tree.map(spec, kinds_out, is_leaf=is_kind)
    if all(t == AxisType.Explicit for t in mesh.axis_types):
        args = jax.tree.map(
            lambda s, a: jax.tree.map(lambda x: reshard(x, s, mesh), a), in_specs, args,
            is_leaf=lambda x: isinstance(x, P),
        )  # fmt: skip

    def local(args):
        out = fn(*args, opened=True)

        def finish(kind, o):
            if kind != SUMMED:
                return o
            return jax.tree.map(
                lambda x: lax.psum(x, tuple(sorted(varying_axes(x) & set(names)))), o
            )

        return jax.tree.map(finish, kinds_out, out, is_leaf=is_kind)

    return jax.shard_map(local, mesh=mesh, in_specs=(in_specs,), out_specs=out_specs)(args)


def _error_kinds(dhs):
    if dhs is None:
        return None
    return OutputError(TIME, PARAMS) if isinstance(dhs, OutputError) else TIME


def _steps_kinds(steps):
    return Steps(TIME, TIME if steps.mask is not None else None,
                 TIME if steps.resets is not None else None, None)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class TimeSharded:
    """The cell walk of sequence parallelism (see the module docstring): the time axis of
    every layer's inputs split over mesh ``axis``; ``truncate``: the truncation cuts'
    period, counted in the whole sequence's time."""

    axis: str
    truncate: int | None = None
    stores_inputs = True  # each layer's input is the linear path's stored input: no copy
    time_sharded = True

    def forward(self, cell, params, steps, carry0, keep, reverse=False):
        """``(hs, carry_T, saved)``, as :data:`~bptt_jax._engine.layers.FULL`'s."""
        steps = steps._replace(drops=None)
        fn = partial(_forward_local, cell, self.axis, keep, reverse)
        outputs = TIME if reverse or not keep else None
        kinds_out = (outputs, CARRY, ShardSaved(TIME, TIME, TIME) if keep else None)
        args, kinds_in = (params, steps, carry0), (PARAMS, _steps_kinds(steps), CARRY)
        hs, carry_t, saved = run_sharded(self.axis, steps.xs, fn, args, kinds_in, kinds_out)
        return (outputs_of(cell, saved.states) if hs is None else hs), carry_t, saved

    def backward(self, cell, params, steps, carry0, saved, g, backprop, reverse=False):
        """``(dparams, dxs, dcarry0, deltas)``, as :data:`~bptt_jax._engine.layers.FULL`'s."""
        steps = steps._replace(drops=None)
        dhs, dcarry_t = g
        backprop = dataclasses.replace(backprop, cuts=None, real=None)
        fn = partial(_backward_local, cell, self.axis, self.truncate, reverse)
        args = (params, steps, carry0, saved, (dhs, dcarry_t), backprop)
        kinds_in = (PARAMS, _steps_kinds(steps), CARRY, ShardSaved(TIME, TIME, TIME),
                    (_error_kinds(dhs), CARRY), None)  # fmt: skip
        kept = TIME if backprop.keep_deltas else None
        return run_sharded(self.axis, steps.xs, fn, args, kinds_in, (SUMMED, TIME, CARRY, kept))


def check_cell(fn: str, cell, axis: str):
    """A ``ValueError`` for a cell that is not a linear recurrence on a time-split input."""
    if protocol.is_linear(cell):
        return
    raise ValueError(
        f"{fn}: time_axis={axis!r}: {type(cell).__name__} is not a linear recurrence, so its steps "
        "cannot be split over devices: each step needs the state after the one before, and "
        "the devices would run one after the other. Sequence parallelism needs linear cells "
        "(MinGRU, MinLSTM, RGLRU, LRU, or a LinearCell of your own); for this model, split "
        "the batch over the devices instead (data parallelism)."
    )
