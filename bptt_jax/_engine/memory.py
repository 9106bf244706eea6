"""What the engine stores per step, and the segment and chunk-group sizes that fit a budget."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from bptt_jax._engine import options
from bptt_jax._engine.layers import cells_of, layers_of
from bptt_jax.cells import protocol
from bptt_jax.models import Bidirectional, output_size


def default_segment(length: int) -> int:
    """About ``sqrt(T)``, evened out so the segments cover T with the least padding."""
    s = max(1, math.ceil(math.sqrt(length)))
    n = math.ceil(length / s)
    return math.ceil(length / n)


def _carry_units(cell) -> int:
    """Numbers per example in the cell's carry (``H`` per part for the built-in cells)."""
    leaves = jax.tree.leaves(jax.eval_shape(lambda: cell.zero_carry(1)))
    return sum(math.prod(c.shape[1:]) for c in leaves)


def stored_per_step(model, batch: int, dtype) -> int:
    """Bytes the manual backward stores per step: every cell's carry, its outputs where they
    are not its carry (:func:`~bptt_jax.cells.protocol.has_output`), its in-place block
    buffers (input projections, then residuals, then gradients; none off the fast path, a
    linear cell's backward re-computing its coefficients chunk by chunk), and the readout's
    error."""
    units = output_size(model)
    for cell in cells_of(model):
        units += _carry_units(cell)
        if protocol.has_output(cell):
            units += protocol.output_size(cell)
        if protocol.is_fast(cell):
            units += cell.hidden_size * max(cell.n_blocks, cell.residual_blocks, cell.grad_blocks)
    return batch * units * jnp.dtype(dtype).itemsize


def segment_for_budget(model, length: int, batch: int, dtype, budget: int, *,
                       carry_dtype=None, input_size: int = 0) -> int:  # fmt: skip
    """The longest segment whose stored arrays fit ``budget`` bytes (an estimate).

    Counted: ``ceil(T/s)`` checkpoint carries (every layer's, in ``carry_dtype``, the
    params' dtype), the segment being differentiated's states and in-place block buffers
    (:func:`stored_per_step`, in ``dtype``, the compute dtype), the inputs cut into
    segments (``ceil(T/s) * s`` steps of ``input_size``) and, for each Bidirectional
    layer, its input over all T steps (the reverse direction reads it backwards). Not
    counted: the loss's own arrays and XLA's scratch (README.md: how far off that is).
    Raises ``ValueError`` when even the smallest fit is too big.
    """
    item = jnp.dtype(dtype).itemsize
    per_step = stored_per_step(model, batch, dtype)
    units = sum(_carry_units(c) for c in cells_of(model))
    per_carry = batch * units * jnp.dtype(carry_dtype or dtype).itemsize
    sizes = (input_size, *(output_size(layer) for layer in layers_of(model)[:-1]))
    kept = sum(
        length * batch * size * item
        for layer, size in zip(layers_of(model), sizes)
        if isinstance(layer, Bidirectional)
    )

    def need(s):
        n = math.ceil(length / s)
        return n * per_carry + s * per_step + n * s * batch * input_size * item + kept

    fits = [s for s in range(1, length + 1) if need(s) <= budget]
    if not fits:
        best = min(range(1, length + 1), key=need)
        raise ValueError(
            f"checkpointed BPTT: memory_budget={budget} bytes is too small for T={length}, "
            f"B={batch}, H={output_size(model)}; what it stores needs about {need(best)} "
            f"bytes at the least (segment={best})"
            + (f", {kept} of them the Bidirectional layers' inputs" if kept else "")
        )
    return max(fits)


def chunk_group(model, truncate: int, n_chunks: int, batch: int, dtype) -> int:
    """How many chunks of ``truncate`` steps one group holds
    (:data:`~bptt_jax._engine.options.GROUP_BYTES`)."""
    per_chunk = truncate * stored_per_step(model, batch, dtype)
    return max(1, min(n_chunks, options.GROUP_BYTES // per_chunk))
