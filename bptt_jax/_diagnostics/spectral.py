"""The largest singular value of each cell's recurrent kernel, whole and per gate block."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from bptt_jax import _engine as engine
from bptt_jax import validation
from bptt_jax._diagnostics.cells import in_structure
from bptt_jax.cells import GRU, LSTM, Elman
from bptt_jax.models import Bidirectional, Stack

#: Gate-block names of each cell's recurrent kernel, in the kernel's column order.
BLOCK_NAMES: dict[type, tuple[str, ...]] = {
    Elman: ("h",),
    LSTM: ("i", "f", "g", "o"),
    GRU: ("r", "z", "n"),
}


class SpectralNorms(NamedTuple):
    """What :func:`spectral_norms` returns."""

    kernel: jax.Array  # () largest singular value of the whole recurrent kernel (H, G*H)
    blocks: dict[str, jax.Array]  # gate name -> () largest singular value of its (H, H) block


def spectral_norms(model, params) -> SpectralNorms:
    """The largest singular value of the recurrent kernel, whole and per gate block.

    For the Elman cell, ``||dh_t/dh_{t-1}|| <= sigma_max(W_hh) max|f'|``, so
    ``sigma_max < 1`` (tanh) guarantees vanishing errors; ``> 1`` is necessary, not
    sufficient, for exploding ones (Pascanu et al. 2013). For gated cells the block of the
    candidate (LSTM ``g``, GRU ``n``) plays that role, modulated by the gates.

    Args:
      model: a :class:`~bptt_jax.Elman`, :class:`~bptt_jax.LSTM` or :class:`~bptt_jax.GRU`
        cell, or a :class:`~bptt_jax.Stack` or :class:`~bptt_jax.Bidirectional` of them.
      params: its params.

    Returns:
      A :class:`SpectralNorms`; ``blocks`` keys are the gate names in column order: ``h``
      (Elman), ``i, f, g, o`` (LSTM), ``r, z, n`` (GRU). For a model, one per cell in the
      model's structure (a tuple with one entry per layer for a Stack, a ``(forward,
      backward)`` pair for a Bidirectional layer, like its params).

    Example:
      >>> import jax, bptt_jax
      >>> from bptt_jax.diagnostics import spectral_norms
      >>> cell = bptt_jax.LSTM(16, init_scheme="orthogonal")
      >>> s = spectral_norms(cell, cell.init(jax.random.key(0), input_size=4))
      >>> list(s.blocks), round(float(s.blocks["f"]), 4), round(float(s.kernel), 4)
      (['i', 'f', 'g', 'o'], 1.0, 2.0)
      >>> model = bptt_jax.stacked(cell, num_layers=2, bidirectional=True)
      >>> s = spectral_norms(model, model.init(jax.random.key(0), input_size=4))
      >>> round(float(s[1][0].blocks["f"]), 4)    # layer 1, forward direction
      1.0
    """
    fn = "spectral_norms"
    validation.check_fast_cells(fn, model, "the spectral norms of a recurrent kernel")
    cells = engine.cells_of(model)
    return in_structure(model, map(_spectral_norms, cells, _cell_params(fn, model, params)))


def _cell_params(fn: str, model, params) -> list:
    """Every cell's params, in :func:`engine.cells_of` order, each checked (errors name
    them, e.g. ``params[1][0]``)."""
    stack = isinstance(model, Stack)
    layers = engine.layers_of(model)
    if stack:
        params = validation.check_tuple(
            fn, "params", params, len(layers), "one params entry per layer"
        )
    out = []
    for k, (layer, p) in enumerate(zip(layers, engine.per_layer(model, params))):
        where = f"params[{k}]" if stack else "params"
        if isinstance(layer, Bidirectional):
            pair = validation.check_tuple(fn, where, p, 2, "the (forward, backward) params")
            named = [(c, q, f"{where}[{d}]") for d, (c, q) in enumerate(zip(layer.cells, pair))]
        else:
            named = [(layer, p, where)]
        for cell, q, name in named:
            validation.check_params(fn, cell, q, name)
            out.append(q)
    return out


def _spectral_norms(cell, params) -> SpectralNorms:
    """One cell's :class:`SpectralNorms`."""
    w = cell.recurrent_kernel(params)
    h = cell.hidden_size

    def sigma_max(a):
        return jnp.linalg.svd(a, compute_uv=False)[0]

    names = BLOCK_NAMES.get(type(cell)) or tuple(str(i) for i in range(cell.n_blocks))
    blocks = {n: sigma_max(w[:, i * h : (i + 1) * h]) for i, n in enumerate(names)}
    return SpectralNorms(sigma_max(w), blocks)
