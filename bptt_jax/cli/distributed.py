"""Several processes, one per host: ``jax.distributed`` started from a config table.

``bptt-jax train``'s ``[distributed]`` table (:class:`DistributedConfig`): the coordinator's
address, the number of processes and this process's id, each also read from the environment
(``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``).
:func:`distributed_args` checks them before any work; :func:`initialize` connects the
processes (before anything touches a device), after checking on process 0 that the
coordinator's port is free. The mesh over every process's devices is
:func:`bptt_jax.parallel.data_mesh`.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping
from dataclasses import field

import jax

from bptt_jax.config import ConfigError, bounds, check_bounds, check_value

#: The environment variables :class:`DistributedConfig` falls back on. JAX itself reads
#: ``JAX_COORDINATOR_ADDRESS``; the count and the id are this library's (JAX finds them on a
#: SLURM, Open MPI, Kubernetes or Cloud TPU cluster by itself: ``distributed.enabled = true``).
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Several processes, one per host (table ``[distributed]``): ``jax.distributed``.

    Every value left unset is read from the environment (:data:`ENV_COORDINATOR`,
    :data:`ENV_NUM_PROCESSES`, :data:`ENV_PROCESS_ID`). With ``enabled`` unset, the processes
    are connected when any of the three is set; ``enabled = true`` also hands what is still
    missing to ``jax.distributed.initialize``'s cluster detection (SLURM, Open MPI, ...).
    The count and the id are checked by :func:`distributed_args`, wherever they come from.
    """

    enabled: bool | None = None  # None: when an address, count or id is set (here or env)
    coordinator_address: str = ""  # "host:port" of process 0; "": $JAX_COORDINATOR_ADDRESS
    num_processes: int | None = None  # None: $JAX_NUM_PROCESSES (or cluster detection)
    process_id: int | None = None  # in [0, num_processes); None: $JAX_PROCESS_ID
    # seconds to wait for every process to connect
    initialization_timeout: int = field(default=300, metadata=bounds(ge=1, note="seconds"))


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
      >>> from bptt_jax.cli.distributed import DistributedConfig, distributed_args
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
    check_bounds(cfg, "distributed")
    if n is not None:
        check_value("", n, ge=1, note="processes", label=src["n"])
    if pid is not None:
        check_value("", pid, ge=0, label=src["pid"])
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
