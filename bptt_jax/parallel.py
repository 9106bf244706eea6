"""Data parallelism: a mesh with a batch axis, the shardings of a train state, many processes.

The batch ``(T, B, ...)`` is split along ``B`` over the devices of one mesh axis (``"data"``);
params, readout and optimizer state are replicated on every device, and a carried stream
state ``(B, ...)`` is split like the batch, so each device keeps the carry of its own
examples from step to step. One ``jax.jit`` runs the train step over the whole mesh: each
device runs the forward and the hand-written reverse scans over its ``B / n`` examples, and
each weight gradient crosses the devices once, in one all-reduce after the loops. The same
program runs on one host or on many (``jax.distributed``): :func:`initialize` connects the
processes, :func:`data_mesh` spans every process's devices, and :func:`put_global` places
each process's rows of a global batch on its own devices.

The two config tables of ``bptt-jax train``:

* ``[parallel]`` (:class:`ParallelConfig`): how many devices the batch is split over
  (``devices = 0``: all of them) and the mesh axis's name;
* ``[distributed]`` (:class:`DistributedConfig`): the coordinator's address, the number of
  processes and this process's id, each also read from the environment
  (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``).

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

import dataclasses
import os
import re
import socket
from collections.abc import Mapping
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from bptt_jax.config import ConfigError

#: The environment variables :class:`DistributedConfig` falls back on. JAX itself reads
#: ``JAX_COORDINATOR_ADDRESS``; the count and the id are this library's (JAX finds them on a
#: SLURM, Open MPI, Kubernetes or Cloud TPU cluster by itself: ``distributed.enabled = true``).
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


# ---------------------------------------------------------------------------- configs
@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """Data parallelism (table ``[parallel]``): the batch split over devices."""

    devices: int = 0  # devices along the batch axis: 0 for all (every process's), else a count
    axis: str = "data"  # the mesh axis's name


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Several processes, one per host (table ``[distributed]``): ``jax.distributed``.

    Every value left unset is read from the environment (:data:`ENV_COORDINATOR`,
    :data:`ENV_NUM_PROCESSES`, :data:`ENV_PROCESS_ID`). With ``enabled`` unset, the processes
    are connected when any of the three is set; ``enabled = true`` also hands what is still
    missing to ``jax.distributed.initialize``'s cluster detection (SLURM, Open MPI, ...).
    """

    enabled: bool | None = None  # None: when an address, count or id is set (here or env)
    coordinator_address: str = ""  # "host:port" of process 0; "": $JAX_COORDINATOR_ADDRESS
    num_processes: int | None = None  # None: $JAX_NUM_PROCESSES (or cluster detection)
    process_id: int | None = None  # in [0, num_processes); None: $JAX_PROCESS_ID
    initialization_timeout: int = 300  # seconds to wait for every process to connect


# ---------------------------------------------------------------------------- processes
def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(
            f"config: environment variable {name} must be an int; got {raw!r}"
        ) from None


def distributed_args(cfg: DistributedConfig, environ: Mapping[str, str] | None = None):
    """The arguments of ``jax.distributed.initialize`` for ``cfg``, or ``None`` (one process).

    Each unset value comes from the environment; the result is checked before any work.

    Raises:
      ConfigError: a count below 1, an id outside ``[0, num_processes)``, an address that is
        not ``host:port``, or connecting without all three values (``enabled`` unset), each
        naming the key or the environment variable it came from.

    Example:
      >>> from bptt_jax.parallel import DistributedConfig, distributed_args
      >>> distributed_args(DistributedConfig(), environ={}) is None      # one process
      True
      >>> env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2"}
      >>> distributed_args(DistributedConfig(process_id=1), environ=env)
      {'coordinator_address': '10.0.0.1:1234', 'num_processes': 2, 'process_id': 1, \
'initialization_timeout': 300}
      >>> distributed_args(DistributedConfig(process_id=2), environ=env)
      Traceback (most recent call last):
      ...
      bptt_jax.config.ConfigError: config: 'distributed.process_id' must be in [0, \
num_processes) = [0, 2) (num_processes from JAX_NUM_PROCESSES); got 2
    """
    environ = os.environ if environ is None else environ
    src = {}
    address = cfg.coordinator_address
    src["address"] = "'distributed.coordinator_address'"
    if not address:
        address, src["address"] = environ.get(ENV_COORDINATOR, "").strip(), ENV_COORDINATOR
    n, src["n"] = cfg.num_processes, "'distributed.num_processes'"
    if n is None:
        n, src["n"] = _env_int(environ, ENV_NUM_PROCESSES), ENV_NUM_PROCESSES
    pid, src["pid"] = cfg.process_id, "'distributed.process_id'"
    if pid is None:
        pid, src["pid"] = _env_int(environ, ENV_PROCESS_ID), ENV_PROCESS_ID
    if cfg.initialization_timeout < 1:
        raise ConfigError(
            "config: 'distributed.initialization_timeout' must be >= 1 (seconds); got "
            f"{cfg.initialization_timeout!r}"
        )
    if n is not None and n < 1:
        raise ConfigError(f"config: {src['n']} must be >= 1 (processes); got {n}")
    if pid is not None and pid < 0:
        raise ConfigError(f"config: {src['pid']} must be >= 0; got {pid}")
    if pid is not None and n is not None and pid >= n:
        raise ConfigError(
            f"config: {src['pid']} must be in [0, num_processes) = [0, {n}) (num_processes "
            f"from {src['n'].strip(chr(39))}); got {pid}"
        )
    if address:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                f"config: {src['address']} must be 'host:port' (e.g. '10.0.0.1:1234', the "
                f"address of process 0); got {address!r}"
            )
    enabled = cfg.enabled
    if enabled is None:
        enabled = bool(address) or pid is not None or (n is not None and n > 1)
        missing = [
            f"{key} (or {env})"
            for key, env, value in (
                ("'distributed.coordinator_address'", ENV_COORDINATOR, address),
                ("'distributed.num_processes'", ENV_NUM_PROCESSES, n),
                ("'distributed.process_id'", ENV_PROCESS_ID, pid),
            )
            if value in (None, "")
        ]
        if enabled and missing:
            raise ConfigError(
                f"config: a multi-process run needs {', '.join(missing)} too; set them, or "
                "distributed.enabled=true to let JAX detect the cluster (SLURM, Open MPI, ...)"
            )
    if not enabled:
        return None
    return dict(
        coordinator_address=address or None,
        num_processes=n,
        process_id=pid,
        initialization_timeout=cfg.initialization_timeout,
    )


def initialize(cfg: DistributedConfig, environ: Mapping[str, str] | None = None) -> bool:
    """Connect this process to the others (``jax.distributed.initialize``) if ``cfg`` says so.

    Must run before anything touches a device. Returns whether this process is part of a
    multi-process run (``False``: one process, nothing done; ``True`` also when it was
    connected already, by an earlier call).
    Processes on CPUs turn JAX's persistent compilation cache off (a cached CPU program with
    collectives across processes hangs).

    Raises:
      ConfigError: as :func:`distributed_args`; or JAX was started before it could connect.
    """
    args = distributed_args(cfg, environ)
    if args is None:
        return False
    if jax.distributed.is_initialized():
        return True
    _check_port_free(args)
    try:
        jax.distributed.initialize(**args)
    except RuntimeError as e:
        if "before any JAX" in str(e):
            raise ConfigError(
                "config: [distributed] needs a fresh process: JAX was already started in this "
                "one (devices listed or arrays made) before it could connect to the others"
            ) from None
        raise
    except ValueError as e:  # JAX found neither the settings nor a cluster to read them from
        raise ConfigError(
            f"config: [distributed] could not start ({e}): set 'distributed.coordinator_address', "
            "'distributed.num_processes' and 'distributed.process_id' (or their environment "
            "variables), or run under a cluster JAX detects (SLURM, Open MPI, ...)"
        ) from None
    if jax.default_backend() == "cpu" and jax.process_count() > 1:
        # A CPU program with cross-process collectives read back from JAX's persistent
        # compilation cache hangs in its first all-reduce (jax 0.10.2, Gloo): such runs
        # compile afresh. (Measured: the 2-process test passes on an empty cache, then
        # hangs on the same cache.)
        jax.config.update("jax_enable_compilation_cache", False)
    return True


def _check_port_free(args: dict) -> None:
    """Process 0 serves the coordinator on its address's port: a port in use there would
    crash it inside gRPC and leave the others waiting ``initialization_timeout``."""
    address = args.get("coordinator_address")
    if args.get("process_id") != 0 or not address:
        return
    port = int(address.rpartition(":")[2])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC's server does
        try:
            sock.bind(("", port))
        except OSError as e:
            raise ConfigError(
                f"config: 'distributed.coordinator_address' {address!r}: process 0 serves the "
                f"coordinator on port {port}, which is in use here ({e.strerror}); choose "
                "another port"
            ) from None


# ---------------------------------------------------------------------------- the mesh
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
    if isinstance(devices, bool) or not isinstance(devices, int | np.integer) or devices < 0:
        raise ValueError(f"{fn}: devices must be an int >= 0 (0: all devices); got {devices!r}")
    if not isinstance(axis, str) or not axis:
        raise ValueError(f"{fn}: axis must be a non-empty string (a mesh axis name); got {axis!r}")
    everything = jax.devices()
    if devices == 0:
        chosen = everything
    else:
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
    return jax.make_mesh((len(chosen),), (axis,), axis_types=(axis_type,), devices=chosen)


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


def batch_sharding(mesh: Mesh, axis: str = "data") -> NamedSharding:
    """A time-major ``(T, B, ...)`` array split along ``B``: each device has ``B / n`` rows."""
    return NamedSharding(mesh, PartitionSpec(None, axis))


def carry_sharding(mesh: Mesh, axis: str = "data") -> NamedSharding:
    """A carry ``(B, ...)`` split along ``B`` like the batch it belongs to."""
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


# ---------------------------------------------------------------------------- the program
#: The HLO instructions that move data between devices.
COLLECTIVE_OPS = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "collective-permute",
    "all-to-all",
    "ragged-all-to-all",
    "collective-broadcast",
)
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}  # fmt: skip
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s([a-z][\w\-]*)\(")
_CALLS = re.compile(r"\b(condition|body|calls|to_apply)=%?([\w.\-]+)")
_CALL_LISTS = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")


class Collective(NamedTuple):
    """One collective instruction of a compiled program (:func:`collectives`)."""

    op: str  # "all-reduce", "all-gather", ... (an async "-start" counts as its op)
    computation: str  # the HLO computation holding it
    loop_depth: int  # how many while loops run it: 0 outside every loop, 1 inside one, ...
    bytes: int  # the size of its result on one device (for an async start: its output)


def _shape_bytes(shape: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _BYTES.get(dtype, 4)
    return total


def collectives(hlo_text: str) -> list[Collective]:
    """The collectives of a compiled program's HLO text and the loops around each.

    ``hlo_text`` is ``jax.jit(f).lower(*args).compile().as_text()``: the per-device program
    after partitioning. A computation run as the ``body`` or ``condition`` of a ``while``
    (a ``lax.scan``) is one loop deeper than its caller; fusions and other called
    computations are as deep as their caller. A data-parallel gradient should have every
    collective at depth 0: one all-reduce per gradient after the loops, never one per step.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from bptt_jax import parallel
      >>> text = jax.jit(lambda x: jnp.sin(x).sum()).lower(jnp.ones(4)).compile().as_text()
      >>> parallel.collectives(text)                    # one device: nothing crosses
      []
    """
    bodies: dict[str, list[str]] = {}
    entry, name = None, None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            head = line.split("(")[0].split()
            if not head:
                continue
            name = head[-1].lstrip("%")
            bodies[name] = []
            if head[0] == "ENTRY":
                entry = name
        elif line.startswith("}"):
            name = None
        elif name is not None:
            bodies[name].append(line)
    if entry is None:
        return []
    depth = {entry: 0}
    stack = [entry]
    while stack:  # the deepest loop nesting that reaches each computation
        comp = stack.pop()
        for line in bodies.get(comp, ()):
            callees = [
                (c, 1 if kind in ("body", "condition") and " while(" in line else 0)
                for kind, c in _CALLS.findall(line)
            ]
            for group in _CALL_LISTS.findall(line):
                callees += [(c.strip().lstrip("%"), 0) for c in group.split(",") if c.strip()]
            for callee, deeper in callees:
                d = depth[comp] + deeper
                if callee in bodies and depth.get(callee, -1) < d:
                    depth[callee] = d
                    stack.append(callee)
    found = []
    for comp, lines in bodies.items():
        if comp not in depth:
            continue
        for line in lines:
            m = _INSTRUCTION.match(line)
            if m is None:
                continue
            shape, op = m.groups()
            base = op.removesuffix("-start")
            if base not in COLLECTIVE_OPS:
                continue
            size = _shape_bytes(shape)
            if op.endswith("-start") and shape.startswith("("):  # (operands..., outputs...)
                size = _shape_bytes(shape) // 2 if base == "all-reduce" else size
            found.append(Collective(base, comp, depth[comp], size))
    return found


def flops(compiled) -> float:
    """The FLOPs XLA's cost analysis counts for one device's share of a compiled program."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older JAX: one dict per program
        cost = cost[0]
    return float(cost.get("flops", 0.0))
