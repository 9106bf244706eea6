"""The public entry point :func:`unroll`, and the resolution of the options every entry
point shares (segment length, dropout multipliers, the schedule)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bptt_jax import validation
from bptt_jax._engine.autodiff import unroll_autodiff
from bptt_jax._engine.bundles import Primals, Steps
from bptt_jax._engine.layers import cells_of
from bptt_jax._engine.memory import default_segment, segment_for_budget
from bptt_jax._engine.options import BACKWARDS
from bptt_jax._engine.schedules import Checkpointed, Chunked, Full
from bptt_jax._engine.sharding import split_axes, time_major_sharding, varying_axes
from bptt_jax._engine.time_sharded import check_cell
from bptt_jax._engine.vjp import bptt
from bptt_jax.models import Stack, is_bidirectional, unwrap


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


def resolve_time_axis(fn: str, model, xs, time_axis, *, backward, resets):
    """The mesh axis the time axis of ``xs`` is split over (sequence parallelism), or
    ``None``: ``time_axis`` as given, else the one that splits time in ``xs``'s type under an
    Explicit mesh. A model or option the split cannot run is a ``ValueError`` saying why."""
    if time_axis is not None and (not isinstance(time_axis, str) or not time_axis):
        raise TypeError(
            f"{fn}: time_axis must be a mesh axis name (a non-empty str) or None; got {time_axis!r}"
        )
    split = split_axes(xs, 0)  # the axes the inputs' time axis is laid out over
    if split is not None and not isinstance(split, str):
        raise ValueError(
            f"{fn}: the time axis of xs is split over the mesh axes {split}; sequence "
            "parallelism splits it over one mesh axis"
        )
    if time_axis is not None and split is not None and split != time_axis:
        raise ValueError(
            f"{fn}: time_axis={time_axis!r}, but xs's time axis is laid out over mesh axis "
            f"{split!r}"
        )
    time_axis = time_axis if time_axis is not None else split
    if time_axis is None:
        return None
    for cell in cells_of(model):
        check_cell(fn, cell, time_axis)
    refusals = (
        (backward == "autodiff", f"backward={backward!r} is a plain sequential scan",
         "use backward='manual'"),
        (resets is not None and is_bidirectional(model), "resets of a bidirectional model "
         "(packed sequences, each reversed on its own) would move every sequence's steps "
         "between devices", "split the batch instead"),
    )  # fmt: skip
    for refused, why, instead in refusals:
        if refused:
            raise ValueError(f"{fn}: time_axis={time_axis!r}: {why}; {instead}")
    size = _axis_size(fn, xs, time_axis)
    if size is not None and xs.shape[0] % size:
        raise ValueError(
            f"{fn}: time_axis={time_axis!r}: the sequence's {xs.shape[0]} steps must split "
            f"evenly over the axis's {size} devices; pad it (with mask) to a multiple of {size}"
        )
    return time_axis


def _axis_size(fn: str, xs, axis: str):
    """The size of mesh ``axis`` that xs's global time axis is split over (``None`` inside a
    shard_map over it, where ``xs`` holds one device's steps); a ``ValueError`` when no
    mesh has the axis."""
    if axis in varying_axes(xs):
        return None
    sharding = getattr(jax.typeof(xs), "sharding", None)
    mesh = sharding.mesh if sharding is not None and not sharding.mesh.empty else None
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    if mesh.empty or axis not in mesh.axis_names:
        raise ValueError(
            f"{fn}: time_axis={axis!r}, but the inputs are split along no such axis: no "
            "shard_map over it is running, xs is not laid out on a mesh with it, and no mesh "
            f"with it is set (jax.set_mesh); mesh axes: {tuple(mesh.axis_names) or None}"
        )
    return mesh.shape[axis]


def plan(model, backward: str, truncate, delta_clip, segment, length: int, head=None,
         time_axis=None):  # fmt: skip
    """The schedule (:mod:`~bptt_jax._engine.schedules`) for ``backward`` and its options.

    With ``time_axis`` (sequence parallelism) it is :class:`Full` over the split time axis
    whatever ``backward`` asks: each device stores only its own steps, so checkpointing
    would save little, and the chunked truncation's cuts are full BPTT's (the same
    gradient)."""
    if time_axis is not None:  # (the length may be one device's steps: cuts count globally)
        return Full(truncate, delta_clip, time_axis=time_axis)
    truncate = None if truncate is None or truncate >= length else truncate
    walkable = not is_bidirectional(model)  # its layers can walk through time together
    if backward == "checkpointed":
        if walkable:
            return Checkpointed(segment, truncate, delta_clip)
        return Full(truncate, delta_clip, segment)
    if head is not None and walkable and truncate is not None and delta_clip is None:
        return Chunked(truncate)
    return Full(truncate, delta_clip)


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
    time_axis=None,
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
        (before the mask applies) and no error flows back across it. Every layer resets. For
        a bidirectional model the resets mark packed sequences, each reversed on its own
        (:mod:`bptt_jax.streams`: resets from done flags and segment ids).
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
      time_axis: sequence parallelism (:doc:`/guides/sequence_parallel`): the mesh axis
        ``xs``'s time axis is split over, each device walking its own steps; found from
        ``xs``'s type under an Explicit mesh, to be given under an Auto mesh
        (``jax.set_mesh``) and inside ``jax.shard_map`` (where ``xs`` holds one device's
        steps). Linear cells only; not with ``backward="autodiff"``;
        ``backward="checkpointed"`` runs as full BPTT (each device stores its own steps).

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
    model, params, carry0 = unwrap(model, params, carry0, xs)  # a LearnedCarry's carry
    validation.check_choice(fn, "backward", backward, BACKWARDS)
    xs, carry0, mask, resets, dtype = validation.check_model_args(
        fn, model, params, xs, carry0, mask, truncate, resets, compute_dtype, time_split=True
    )
    validation.check_positive(fn, "delta_clip", delta_clip)
    time_axis = resolve_time_axis(fn, model, xs, time_axis, backward=backward, resets=resets)
    seg = resolve_segment(fn, model, xs, dtype, segment, memory_budget, backward)
    drops = dropout_multipliers(fn, model, dropout_key, xs)
    steps = Steps(xs, mask, resets, drops)
    if backward == "autodiff":
        return unroll_autodiff(model, params, steps, carry0, truncate, delta_clip)
    schedule = plan(model, backward, truncate, delta_clip, seg, xs.shape[0], None, time_axis)
    return bptt(model, None, schedule, Primals(params, steps, carry0))
