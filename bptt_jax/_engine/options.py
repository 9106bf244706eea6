"""What the engine is tuned by: its measured constants and the environment's overrides.

The bottom of the engine's modules: any of them may read these, and this one imports none of
them (only the cells' contract, :mod:`bptt_jax.cells.protocol`, from below the engine). What
each value was measured on is in ``README.md`` beside this file.
"""

from __future__ import annotations

import os

import jax

from bptt_jax.cells import protocol

#: The ``backward=`` choices of the public entry points.
BACKWARDS = ("manual", "checkpointed", "autodiff")

#: The ``unroll`` factor of the fast path's forward and reverse scans, by (backend, cell
#: class): how many steps XLA compiles into one loop iteration; 1 where not listed.
SCAN_UNROLL = {("gpu", "Elman"): 2, ("gpu", "LSTM"): 2}

#: A per-step array of this many bytes or more counts as large: the readout's error on it is
#: formed inside the reverse scan, not stored (:func:`~bptt_jax._engine.bundles.output_error`).
LARGE_BYTES = 4 * 2**20

#: Bytes one group of truncated-BPTT chunks may store (states and per-step buffers): enough
#: chunks for wide batched reverse-scan steps, few enough to stay in cache.
GROUP_BYTES = 2 * 2**20

#: Backends where a Bidirectional layer runs its two directions as one scan; none until
#: measured on a GPU (``benchmarks/gpu_probe.py bidirectional``).
FUSE_DIRECTIONS: frozenset[str] = frozenset()

#: Backends where a linear cell's ``scan="auto"`` is ``"parallel"`` (an associative scan);
#: elsewhere (the CPU) it is ``"sequential"`` (README.md: the measurements).
PARALLEL_SCAN: frozenset[str] = frozenset({"gpu", "tpu"})


#: Bytes of one chunk of a linear cell's (T, B, N) arrays (coefficients, states, errors), by
#: backend: a chunk's coefficients are one call of the cell's ``coefficients`` over its rows
#: and its arrays stay in cache (README.md: the measurements). A sequence whose arrays are at
#: most twice this is one chunk. Not listed: the whole sequence as one chunk (unmeasured).
LINEAR_CHUNK_BYTES = {"cpu": 2 * 2**20}


def linear_chunk(length: int, step_bytes: int) -> int:
    """The most steps per chunk of a linear cell's scans over ``length`` steps whose (B, N)
    arrays take ``step_bytes`` per step, on the default backend (:data:`LINEAR_CHUNK_BYTES`).

    ``BPTT_JAX_LINEAR_CHUNK`` (a number of steps) overrides it on every backend, read at
    trace time as ``BPTT_JAX_SCAN_UNROLL`` is (:func:`scan_unroll`).
    """
    override = os.environ.get("BPTT_JAX_LINEAR_CHUNK")
    if override:
        return max(1, min(int(override), length))
    budget = LINEAR_CHUNK_BYTES.get(jax.default_backend())
    if budget is None or length * step_bytes <= 2 * budget:
        return length
    return max(1, budget // max(1, step_bytes))


def linear_scan(cell) -> str:
    """``"parallel"`` or ``"sequential"``: how a linear cell's recurrence is scanned, its
    ``scan`` with ``"auto"`` resolved for the default backend (:data:`PARALLEL_SCAN`)."""
    scan = protocol.check_scan(type(cell).__name__, getattr(cell, "scan", "auto"))
    if scan == "auto":
        return "parallel" if jax.default_backend() in PARALLEL_SCAN else "sequential"
    return scan


def scan_unroll(cell) -> int:
    """The scans' ``unroll`` factor for ``cell`` on the default backend (:data:`SCAN_UNROLL`).

    ``BPTT_JAX_SCAN_UNROLL`` overrides it for every cell. It is read at trace time, and JAX
    reuses a function's earlier traces: within one process call ``jax.clear_caches()`` after
    changing it.
    """
    override = os.environ.get("BPTT_JAX_SCAN_UNROLL")
    if override:
        return max(1, int(override))
    return SCAN_UNROLL.get((jax.default_backend(), type(cell).__name__), 1)


def fuse_directions() -> bool:
    """Whether Bidirectional layers may fuse their directions (:data:`FUSE_DIRECTIONS`).

    ``BPTT_JAX_FUSE_DIRECTIONS=1`` (or ``0``) overrides it on every backend, read at trace
    time as ``BPTT_JAX_SCAN_UNROLL`` is.
    """
    override = os.environ.get("BPTT_JAX_FUSE_DIRECTIONS")
    if override:
        return override not in ("0", "false", "False")
    return jax.default_backend() in FUSE_DIRECTIONS
