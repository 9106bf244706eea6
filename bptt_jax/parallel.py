"""Data parallelism: a mesh with a batch axis, the shardings of a train state, many processes.

The batch ``(T, B, ...)`` is split along ``B`` over the devices of one mesh axis (``"data"``);
params, readout and optimizer state are replicated on every device, and a carried stream
state ``(B, ...)`` is split like the batch, so each device keeps the carry of its own
examples from step to step. One ``jax.jit`` runs the train step over the whole mesh: each
device runs the forward and the hand-written reverse scans over its ``B / n`` examples, and
each weight gradient crosses the devices once, in one all-reduce after the loops. The same
program runs on one host or on many (``jax.distributed``, connected before any device is
touched; ``bptt-jax train`` does it from its ``[distributed]`` table,
:mod:`bptt_jax.cli.distributed`): :func:`data_mesh` spans every process's devices, and
:func:`put_global` places each process's rows of a global batch on its own devices.

On a CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (or
``jax.config.update("jax_num_cpu_devices", 8)`` before JAX starts) gives 8 devices to try
all of this on one machine; they share its cores, so it measures overhead, not speedup.

Example:
  >>> import jax
  >>> from bptt_jax import parallel
  >>> mesh = parallel.data_mesh(devices=1)          # all devices: data_mesh()
  >>> mesh.axis_names, parallel.axis_size("example", mesh, "data")
  (('data',), 1)
  >>> parallel.batch_sharding(mesh).spec            # (T, B, ...): B along "data"
  P(None, 'data')
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec


# ---------------------------------------------------------------------------- the mesh
def _chosen_devices(fn: str, devices: int) -> list:
    """``devices`` devices (0: all), each process giving ``devices / processes`` of its own
    (its first ones), in process order; ``ValueError`` naming ``devices`` if that cannot be."""
    if isinstance(devices, bool) or not isinstance(devices, int | np.integer) or devices < 0:
        raise ValueError(f"{fn}: devices must be an int >= 0 (0: all devices); got {devices!r}")
    everything = jax.devices()
    if devices == 0:
        return everything
    procs = jax.process_count()
    if devices > len(everything) or devices % procs:
        raise ValueError(
            f"{fn}: devices must be at most the {len(everything)} devices there are and a "
            f"multiple of the {procs} process(es) (each gives devices / processes of its "
            f"own); got devices={devices}"
        )
    per = devices // procs
    chosen = []
    for p in range(procs):
        own = sorted((d for d in everything if d.process_index == p), key=lambda d: d.id)
        if len(own) < per:
            raise ValueError(
                f"{fn}: devices={devices} over {procs} processes needs {per} devices of "
                f"each process; process {p} has {len(own)} (use devices=0 for all of "
                f"them, or at most {procs * min(len(own), per)})"
            )
        chosen += own[:per]
    return chosen


def data_mesh(
    devices: int = 0, axis: str = "data", *, axis_type: AxisType = AxisType.Explicit
) -> Mesh:
    """A one-axis mesh for data parallelism over ``devices`` devices (0: all of them).

    With several processes, ``devices`` must be a multiple of their number and each gives
    ``devices / processes`` of its own devices (its first ones). ``axis_type`` is JAX's
    default, ``Explicit``: the shardings are part of the arrays' types, so an operation that
    would gather the batch fails to trace instead of running silently on every device.

    Raises:
      ValueError: ``devices`` negative, more than there are, or not a multiple of the
        number of processes (naming ``devices``).
    """
    fn = "data_mesh"
    if not isinstance(axis, str) or not axis:
        raise ValueError(f"{fn}: axis must be a non-empty string (a mesh axis name); got {axis!r}")
    chosen = _chosen_devices(fn, devices)
    return jax.make_mesh((len(chosen),), (axis,), axis_types=(axis_type,), devices=chosen)


def sequence_mesh(
    devices: int = 0,
    time: int = 0,
    *,
    data_axis: str = "data",
    time_axis: str = "time",
    axis_type: AxisType = AxisType.Explicit,
) -> Mesh:
    """A ``(data, time)`` mesh for sequence parallelism: each sequence's time axis split over
    ``time`` devices, the batch over the other ``devices / time`` (``time=0``: all of
    ``devices`` along time, a data axis of 1). ``devices`` is :func:`data_mesh`'s (0: all).

    Neighbouring devices along ``time`` hold neighbouring steps; the only traffic along it
    is one small exchange per layer and direction (:doc:`/guides/sequence_parallel`).

    Raises:
      ValueError: ``devices`` as in :func:`data_mesh`; ``time`` negative or not dividing the
        devices; equal or empty axis names.
    """
    fn = "sequence_mesh"
    for name, value in (("data_axis", data_axis), ("time_axis", time_axis)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{fn}: {name} must be a non-empty mesh axis name; got {value!r}")
    if data_axis == time_axis:
        raise ValueError(f"{fn}: data_axis and time_axis must differ; both are {time_axis!r}")
    chosen = _chosen_devices(fn, devices)
    if isinstance(time, bool) or not isinstance(time, int | np.integer) or time < 0:
        raise ValueError(f"{fn}: time must be an int >= 0 (0: every device); got {time!r}")
    time = time or len(chosen)
    if len(chosen) % time:
        raise ValueError(
            f"{fn}: time={time} must divide the {len(chosen)} devices (the rest split the batch)"
        )
    shape = (len(chosen) // time, time)
    return jax.make_mesh(shape, (data_axis, time_axis), axis_types=(axis_type,) * 2,
                         devices=chosen)  # fmt: skip


def axis_size(fn: str, mesh: Mesh, axis: str) -> int:
    """The number of devices along ``mesh``'s ``axis``; ``ValueError`` if it has no such axis."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"{fn}: mesh must be a jax.sharding.Mesh; got {type(mesh).__name__}")
    if axis not in mesh.axis_names:
        raise ValueError(
            f"{fn}: the mesh has no axis {axis!r} to split the batch along (its axes: "
            f"{tuple(mesh.axis_names)}); pass data_axis= one of them, or a mesh with an "
            f"axis {axis!r} (parallel.data_mesh(axis={axis!r}))"
        )
    return int(mesh.shape[axis])


def check_batch_size(fn: str, name: str, batch_size: int, mesh: Mesh, axis: str) -> None:
    """``ValueError`` unless ``batch_size`` splits evenly over the devices along ``axis``."""
    n = axis_size(fn, mesh, axis)
    if batch_size % n:
        raise ValueError(
            f"{fn}: {name} must be divisible by the {n} devices along mesh axis {axis!r} "
            f"(each device takes B / {n} examples); got {batch_size}; use a multiple of {n} "
            f"such as {max(n, batch_size - batch_size % n)}, or fewer devices"
        )


# ---------------------------------------------------------------------------- shardings
def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (params, readout, optimizer state, scalars)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, axis: str | None = "data", time_axis: str | None = None):
    """A time-major ``(T, B, ...)`` array split along ``B``: each device has ``B / n`` rows;
    with ``time_axis`` (sequence parallelism) its steps split along that axis too (``axis``
    ``None``: the batch not split)."""
    return NamedSharding(mesh, PartitionSpec(time_axis, axis))


def carry_sharding(mesh: Mesh, axis: str | None = "data") -> NamedSharding:
    """A carry ``(B, ...)`` split along ``B`` like the batch it belongs to (``None``: whole
    on every device)."""
    return NamedSharding(mesh, PartitionSpec(axis))


def put_global(tree, sharding: NamedSharding):
    """Place the arrays of a global ``tree`` (the same in every process) with ``sharding``.

    Each process transfers only the rows of its own devices (``make_array_from_callback``),
    so every process may hold the whole global value in host or local device memory; with
    one process this is ``jax.device_put``. ``None`` leaves stay ``None``.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(x):
        return jax.make_array_from_callback(np.shape(x), sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def local_copy(tree):
    """A single-device copy (this process's first) of each fully replicated array in ``tree``.

    For the work every process does alike on its own, outside the train step: evaluation,
    sampling, the batch's data key. PRNG key arrays stay key arrays.
    """

    def one(x):
        if not isinstance(x, jax.Array) or len(x.sharding.device_set) == 1:
            return x
        if not x.is_fully_replicated:
            raise ValueError(
                f"local_copy: an array of shape {x.shape} split over devices "
                f"({x.sharding}) has no whole copy on one device; gather it first"
            )
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            impl = jax.random.key_impl(x)
            return jax.random.wrap_key_data(jax.random.key_data(x).addressable_data(0), impl=impl)
        return x.addressable_data(0)

    return jax.tree.map(one, tree)


def is_main_process() -> bool:
    """Whether this is process 0, the one that prints and writes logs."""
    return jax.process_index() == 0
