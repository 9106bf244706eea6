"""Every shape, dtype and option check of the public API, in one place.

All checks run at trace time (they read only shapes and dtypes), so they cost nothing inside
``jax.jit`` and fire before XLA sees a bad program. Shape problems raise ``ValueError``, dtype
and structure problems ``TypeError``; each message names the function, the argument, what was
expected and what was received.

A cell is a one-layer model: :func:`check_model_args` walks the layers of a model and the
directions of each layer (a bare cell is one layer of one direction) and applies the same
checks to every cell, :func:`check_params`, :func:`check_carry` and ``check_step``, which
differ only in what a built-in cell and a cell of your own need. Where each message is:

* here: a model's layout (a Stack's one params entry and one carry per layer, a
  Bidirectional layer's pairs, layer k's input size against layer k-1's output size, one
  dtype for all params) and what a bidirectional model refuses (truncation);
* :mod:`bptt_jax._validation_cells`: one cell: its contract, params, carry and step;
* :mod:`bptt_jax._validation_arrays`: the arrays and options around a model: xs, masks and
  resets, targets, the readout, keys, positive numbers, choices.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

from bptt_jax import precision
from bptt_jax._engine.sharding import like_batch, split_axes
from bptt_jax._validation_arrays import as_array as as_array
from bptt_jax._validation_arrays import check_choice as check_choice
from bptt_jax._validation_arrays import check_class_range as check_class_range
from bptt_jax._validation_arrays import check_flag_values as check_flag_values
from bptt_jax._validation_arrays import check_key as check_key
from bptt_jax._validation_arrays import check_mask as check_mask
from bptt_jax._validation_arrays import check_positive as check_positive
from bptt_jax._validation_arrays import check_readout as check_readout
from bptt_jax._validation_arrays import check_real as check_real
from bptt_jax._validation_arrays import check_right_padded as check_right_padded
from bptt_jax._validation_arrays import check_targets as check_targets
from bptt_jax._validation_arrays import check_truncate as check_truncate
from bptt_jax._validation_arrays import check_tuple as check_tuple
from bptt_jax._validation_arrays import check_xs as check_xs
from bptt_jax._validation_arrays import concrete as concrete
from bptt_jax._validation_arrays import dtype_of, shape_of
from bptt_jax._validation_arrays import padding_zeroed as padding_zeroed
from bptt_jax._validation_cells import check_carry as check_carry
from bptt_jax._validation_cells import check_cell as check_cell
from bptt_jax._validation_cells import check_params as check_params
from bptt_jax._validation_cells import check_step, is_builtin
from bptt_jax.cells import protocol
from bptt_jax.models import (
    Bidirectional,
    LearnedCarry,
    Stack,
    is_bidirectional,
    is_model,
    not_a_cell,
    output_size,
)


# --------------------------------------------------------------------------- the walk
class _Tree(NamedTuple):
    """A model's params or carry, as the walk reads it."""

    arg: str  # the argument, as messages name it
    per_layer: str  # what a Stack's tuple holds
    pair: str  # what a Bidirectional layer's pair holds
    sizes: bool  # read each layer's output size (the next layer's input size) as it goes


_PARAMS = _Tree("params", "one params entry per layer", "the (forward, backward) params", True)
_CARRY = _Tree("carry0", "one carry per layer", "the (forward, backward) carries", False)


class _Part(NamedTuple):
    """One cell of a model with its entry of the model's params or carry."""

    cell: Any
    entry: Any  # the cell's params or carry
    where: str  # the entry's name in messages: "params", "params[1]", "carry0[1][0]", ...
    layer: int  # k, the index of the cell's layer
    d_in: int | None  # layer k-1's output size; None in layer 0 (it reads xs) and when unread


def _layers(model) -> tuple:
    return model.layers if isinstance(model, Stack) else (model,)


def _cells(layer) -> tuple:
    return layer.cells if isinstance(layer, Bidirectional) else (layer,)


def _parts(fn: str, model, entries, tree: _Tree):
    """Every cell of ``model`` as a :class:`_Part`, layer by layer and direction by direction,
    a bare cell being one layer of one direction.

    A Stack's ``entries`` must be a tuple of one entry per layer (checked now), a
    Bidirectional layer's entry a (forward, backward) pair (checked when the walk reaches
    it), so that errors come in the order of the layers.
    """
    stack = isinstance(model, Stack)
    layers = _layers(model)
    if stack:
        entries = check_tuple(fn, tree.arg, entries, len(layers), tree.per_layer)
    # a model's walk reads the output size of every layer, its last one too (a hidden state
    # of the wrong rank is reported there); a bare cell has no next layer to size
    sizes = tree.sizes and isinstance(model, (Stack, Bidirectional))
    return _walk(fn, zip(layers, entries if stack else (entries,)), tree, stack, sizes)


def _walk(fn: str, layers, tree: _Tree, stack: bool, sizes: bool):
    """The generator behind :func:`_parts` (whose own checks run when it is called)."""
    d_in = None
    for k, (layer, entry) in enumerate(layers):
        where = f"{tree.arg}[{k}]" if stack else tree.arg
        if isinstance(layer, Bidirectional):
            pair = check_tuple(fn, where, entry, 2, tree.pair)
            for d, (cell, e) in enumerate(zip(layer.cells, pair)):
                yield _Part(cell, e, f"{where}[{d}]", k, d_in)
        else:
            yield _Part(layer, entry, where, k, d_in)
        if sizes:
            d_in = output_size(layer)


def _assemble(model, entries: list):
    """One entry per cell (in the walk's order) in the model's layout."""
    it = iter(entries)
    layers = tuple(
        tuple(next(it) for _ in layer.cells) if isinstance(layer, Bidirectional) else next(it)
        for layer in _layers(model)
    )
    return layers if isinstance(model, Stack) else layers[0]


# ------------------------------------------------------------------------------ models
def check_model(fn: str, model, where: str = "model") -> None:
    """``model`` is a cell (:func:`check_cell`), a Bidirectional or a Stack (of cells)."""
    if not is_model(model):
        raise TypeError(
            not_a_cell(f"{fn}: {where}", model, ", a bptt_jax.Bidirectional or a bptt_jax.Stack")
        )
    if isinstance(model, LearnedCarry):  # its model (checked when it was made)
        check_model(fn, model.model, where)
        return
    if not isinstance(model, (Stack, Bidirectional)):
        check_cell(fn, model, where)
        return
    for layer in _layers(model):
        for cell in _cells(layer):
            check_cell(fn, cell, f"{where}'s cell")


def check_fast_cells(fn: str, model, what: str) -> None:
    """Every cell of ``model`` is a :class:`~bptt_jax.cells.FastCell` (``what`` needs its
    recurrent kernel (H, G*H))."""
    check_model(fn, model)
    for layer in _layers(model):
        for cell in _cells(layer):
            if not protocol.is_fast(cell):
                raise TypeError(
                    f"{fn}: {what} are defined for cells with a recurrent kernel (H, G*H) "
                    f"(bptt_jax.cells.FastCell, as the built-in cells); {type(cell).__name__} "
                    "is a cell of another form"
                )


class _ModelArgs(NamedTuple):
    """The arguments every entry point takes with a model, as given."""

    params: Any
    xs: Any
    carry0: Any
    mask: Any
    resets: Any


def check_whole_in_time(fn: str, xs) -> None:
    """A ``ValueError`` for ``xs`` whose time axis is split over a mesh axis (sequence
    parallelism), for an entry point that does not run it (else XLA's own error)."""
    split = split_axes(xs, 0) if hasattr(xs, "shape") else None
    if split is not None:
        raise ValueError(
            f"{fn}: xs's time axis is split over mesh axis {split!r} (sequence parallelism), "
            f"which {fn} does not run; lay xs out whole in time (jax.device_put(xs, "
            "NamedSharding(mesh, P(None, ...)))), or use unroll, sequence_loss, "
            "loss_and_grads or the trainer, which split it (time_axis)"
        )


def check_model_args(fn: str, model, params, xs, carry0, mask, truncate, resets=None,
                     compute_dtype=None, *, time_split: bool = False):  # fmt: skip
    """The shared checks of every entry point, for a cell or a model.

    Returns ``(xs, carry0, mask, resets, dtype)`` with ``carry0`` filled in (zeros, varying
    like ``xs`` inside ``shard_map``), the masks as bool, ``dtype`` the params' and ``xs``
    cast to ``compute_dtype`` (:mod:`bptt_jax.precision`) when one is given. A
    :class:`~bptt_jax.Stack` 's params and carry are checked layer by layer
    (layer k's input size against layer k-1's output size), a
    :class:`~bptt_jax.Bidirectional` 's direction by direction. Unless ``time_split`` (the
    entry point runs sequence parallelism), an ``xs`` whose time axis is split over a mesh
    axis is a ``ValueError`` (else XLA's own error, or a silent gather).
    """
    check_model(fn, model)
    if not time_split:
        check_whole_in_time(fn, xs)
    for name, value in (("params", params), ("xs", xs), ("carry0", carry0)):
        check_real(fn, name, value)  # before any other check reads a complex dtype
    args = _ModelArgs(params, xs, carry0, mask, resets)
    xs, carry0, mask, resets, dtype = _check_args(fn, model, args, truncate)
    carry0 = like_batch(carry0, xs)
    cdt = precision.resolve(fn, compute_dtype, dtype)
    if cdt is not None:
        _check_steps(fn, model, params, carry0, xs.shape[2], dtype, cdt)
        xs = xs.astype(cdt)
    return xs, carry0, mask, resets, dtype


def _check_args(fn: str, model, args: _ModelArgs, truncate):
    """Everything :func:`check_model_args` checks after the model itself, in this order:
    options, params (and with them as much of xs as they need), xs, carries, steps, masks."""
    check_truncate(fn, truncate)
    if is_bidirectional(model):
        _check_bidirectional_options(fn, truncate, args.resets)
    parts = _parts(fn, model, args.params, _PARAMS)
    xs, d, source = _xs_for_params(fn, model, args.params, args.xs)
    first, dtype, d = _check_all_params(fn, parts, d, source)
    xs = as_array(fn, "xs", xs)
    if dtype is None:  # no cell has params
        dtype = dtype_of(xs)
    pname = first.where
    if is_builtin(first.cell):
        pname = f"{pname}.{type(first.entry)._fields[0]} {shape_of(first.entry[0])}"
    t, b = check_xs(fn, xs, pname, d, dtype)
    carry0 = _check_carries(fn, model, args.carry0, b, dtype)
    _check_steps(fn, model, args.params, carry0, d, dtype, None)
    mask = check_mask(fn, args.mask, t, b)
    if is_bidirectional(model):
        check_right_padded(fn, mask)
    resets = check_mask(fn, args.resets, t, b, name="resets")
    return padding_zeroed(xs, mask), carry0, mask, resets, dtype


def _check_bidirectional_options(fn: str, truncate, resets) -> None:
    if truncate is not None:
        raise ValueError(
            f"{fn}: truncate={truncate} is undefined for a bidirectional model (its reverse "
            "direction needs the whole future of every step); use truncate=None"
        )
    # resets mark packed sequences: each is reversed on its own (directions.reversal)
    del resets


def _xs_for_params(fn: str, model, params, xs):
    """What the params' checks need of ``xs``: ``(xs, its D or None, where that D is from)``.

    A built-in cell reads its D off its params, and xs is checked against them afterwards; a
    cell of your own is checked against its ``init`` for xs's D, so xs comes first: in full
    for a bare cell (whose messages name xs before the params), its rank for a model.
    """
    bare = not isinstance(model, (Stack, Bidirectional))
    builtin = is_builtin(_cells(_layers(model)[0])[0])
    if bare and builtin:
        return xs, None, ""
    xs = as_array(fn, "xs", xs)
    if bare:
        leaves = jax.tree.leaves(params)
        dtype = dtype_of(leaves[0]) if leaves else dtype_of(xs)
        check_xs(fn, xs, "the params", None, dtype)
        return xs, xs.shape[2], f" for xs {shape_of(xs)}"
    if builtin:
        return xs, None, " for xs"
    if len(shape_of(xs)) != 3:
        check_xs(fn, xs, "", None, dtype_of(xs))  # raises
    return xs, shape_of(xs)[2], " for xs"


def _check_all_params(fn: str, parts, d: int | None, source: str):
    """:func:`check_params` for every cell, one dtype for all, each layer's input size;
    ``d`` the model's input size (None: the first cell with params says it). Returns
    ``(the first cell's _Part, dtype (None: no cell has params), d)``."""
    first, dtype = None, None
    for part in parts:
        if first is None:
            first = part
        want = d if part.d_in is None else part.d_in
        why = source if part.d_in is None else f" for layer {part.layer - 1}'s output size"
        d_cell, dt = check_params(fn, part.cell, part.entry, part.where, want, why)
        if dt is None:  # a cell without params
            continue
        if dtype is None:
            dtype, d = dt, d_cell
        elif dt != dtype:
            raise TypeError(
                f"{fn}: all params must share one dtype; {part.where} is {dt} but the first "
                f"layer's is {dtype}"
            )
        want = d if part.d_in is None else part.d_in
        if d_cell != want:  # a built-in cell's D, read off its params
            source = (
                f"the first cell's input size {d}"
                if part.d_in is None
                else f"layer {part.layer - 1}'s output size {part.d_in}"
            )
            raise ValueError(
                f"{fn}: {part.where}.{type(part.entry)._fields[0]} must have shape ({want}, "
                f"G*H) to match {source}; got {shape_of(part.entry[0])}"
            )
    return first, dtype, d


def _check_carries(fn: str, model, carry0, batch: int, dtype):
    """:func:`check_carry` for every cell; ``None`` is each cell's zero carry."""
    if carry0 is None:
        layers = tuple(
            (None, None) if isinstance(x, Bidirectional) else None for x in _layers(model)
        )
        carry0 = layers if isinstance(model, Stack) else layers[0]
    checked = [
        check_carry(fn, part.cell, part.entry, batch, dtype, part.where)
        for part in _parts(fn, model, carry0, _CARRY)
    ]
    return _assemble(model, checked)


def _check_steps(fn: str, model, params, carry0, d: int, dtype, compute_dtype) -> None:
    """``check_step`` for every cell: one step of each cell not built in, traced."""
    for p, c in zip(_parts(fn, model, params, _PARAMS), _parts(fn, model, carry0, _CARRY)):
        d_in = d if p.d_in is None else p.d_in
        check_step(fn, p.cell, p.entry, c.entry, d_in, dtype, compute_dtype)
