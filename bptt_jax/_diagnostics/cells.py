"""A model as a list of cells, each with its own arrays, and results in the model's structure.

Every diagnostic walks a model's layers and directions (a bare cell is a model of one layer
and one direction): one forward of the whole model (full BPTT's stored states), then each
cell's own reverse scans, and one result per cell, put back in the model's structure (a bare
cell's alone, a tuple per Stack, a ``(forward, backward)`` pair per Bidirectional layer).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bptt_jax import _engine as engine
from bptt_jax.models import Bidirectional, Stack

#: Reverse scans per vectorised batch (memory vs speed): :func:`jacobian_norms`' probes,
#: :func:`truncation_bias`' backwards.
PROBE_BATCH = 16


class CellRun(NamedTuple):
    """One cell of a model with its own arrays (a bare cell: the model itself)."""

    cell: Any
    params: Any
    carry0: Any  # leaves (B, ...), in the params' dtype
    stored: Any  # its full-BPTT forward's Stored(states, buffers)
    reverse: bool  # the second direction of a Bidirectional layer (its time reversed)


def by_cell(model, entries) -> list:
    """Per-layer ``entries`` (a pair for a Bidirectional layer) as one list, one per cell,
    in :func:`engine.cells_of` order."""
    out = []
    for layer, entry in zip(engine.layers_of(model), entries):
        out.extend(entry if isinstance(layer, Bidirectional) else (entry,))
    return out


def in_structure(model, values):
    """The inverse of :func:`by_cell`: one value per cell in the model's structure (a bare
    cell's alone, a tuple per Stack, a pair per Bidirectional layer)."""
    it = iter(values)
    entries = [
        (next(it), next(it)) if isinstance(layer, Bidirectional) else next(it)
        for layer in engine.layers_of(model)
    ]
    return engine.from_layers(model, entries)


def cell_runs(model, params, carry0, saved) -> list[CellRun]:
    """Every cell of ``model`` with its params, carry and what ``model_forward`` stored."""
    layers = engine.layers_of(model)
    bi = [isinstance(layer, Bidirectional) for layer in layers]
    stored = [engine.by_direction(s) if b else s for b, s in zip(bi, saved.layers)]
    return [
        CellRun(*run)
        for run in zip(
            engine.cells_of(model),
            by_cell(model, engine.per_layer(model, params)),
            by_cell(model, engine.per_layer(model, carry0)),
            by_cell(model, stored),
            by_cell(model, [(False, True) if b else False for b in bi]),
        )
    ]


def cell_keys(model, key, n: int) -> list:
    """The probes' key of each of the model's ``n`` cells: a bare cell's is ``key``, a
    Stack's or Bidirectional's cell i's ``fold_in(key, i)``."""
    if key is None:
        return [None] * n
    if not isinstance(model, (Stack, Bidirectional)):
        return [key]
    return [jax.random.fold_in(key, i) for i in range(n)]


class LossForward(NamedTuple):
    """A model's full-BPTT forward under a loss head."""

    value: jax.Array  # () the loss
    dhs: Any  # (T, B, F) the loss's error on the outputs, through the readout alone
    zeros: Any  # a zero error on the final carry, in the model's structure
    saved: Any  # what engine.model_forward stored


def loss_forward(model, head, params, steps, carry0, inputs) -> LossForward:
    """One forward of the model and the head's error on its outputs (as the loss's own
    full-BPTT backward starts)."""
    hs, carry_t, saved = engine.model_forward(model, params, steps, carry0)
    value, dy = head.forward(inputs, hs)
    dhs, _, _ = head.backward(inputs, hs, dy, jnp.ones((), value.dtype))
    return LossForward(value, dhs, jax.tree.map(jnp.zeros_like, carry_t), saved)
