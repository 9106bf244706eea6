"""A model's layers over a whole sequence: :func:`model_forward` and :func:`model_backward`.

A model (:mod:`bptt_jax.models`) is a cell, a Bidirectional or a Stack. The engine sees a
tuple of layers, each a cell (forward in time) or a Bidirectional (two cells, the second run
over each sequence's reversed valid prefix); params and carries are tuples with one entry
per layer, a Bidirectional layer's entry being the pair (forward, backward). Layers run one
after the other over the whole sequence (a layer needs all of its input before the next
Bidirectional one can start); each cell walks its sequence as a *cell walk* says:
:data:`FULL` (every step stored) or, for a model with a Bidirectional layer under
checkpointed BPTT, checkpointed on its own
(:class:`~bptt_jax._engine.schedules.CheckpointedCell`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax

from bptt_jax._engine import cell_scan, directions, generic_scan, linear_scan
from bptt_jax._engine.bundles import Backprop, Stored, outputs_of
from bptt_jax._engine.directions import Paired, pair, reverse_time, unpair
from bptt_jax.cells import protocol
from bptt_jax.models import Bidirectional, Stack, is_bidirectional


def layers_of(model) -> tuple:
    """The model's layers: ``Stack.layers``, or the model alone."""
    return model.layers if isinstance(model, Stack) else (model,)


def per_layer(model, tree) -> tuple:
    """A params/carry/gradient pytree of ``model`` as a tuple with one entry per layer."""
    return tuple(tree) if isinstance(model, Stack) else (tree,)


def from_layers(model, entries):
    """The inverse of :func:`per_layer`."""
    return tuple(entries) if isinstance(model, Stack) else entries[0]


def cells_of(model) -> tuple:
    """Every cell of the model, layer by layer, forward direction first."""
    out = []
    for layer in layers_of(model):
        out.extend(layer.cells if isinstance(layer, Bidirectional) else (layer,))
    return tuple(out)


def scans(cell):
    """The module that walks ``cell`` over a sequence: :mod:`~bptt_jax._engine.cell_scan`
    for a :class:`~bptt_jax.cells.FastCell`, :mod:`~bptt_jax._engine.linear_scan` for a
    :class:`~bptt_jax.cells.LinearCell`, else :mod:`~bptt_jax._engine.generic_scan`. Each
    offers ``forward``, ``reverse_scan`` and ``backward`` with the same arguments."""
    if protocol.is_fast(cell):
        return cell_scan
    return linear_scan if protocol.is_linear(cell) else generic_scan


class _Full:
    """The cell walk of full BPTT: every state and residual stored."""

    stores_inputs = False  # model_forward need not keep each layer's input

    @staticmethod
    def forward(cell, params, steps, carry0, keep):
        """``(hs, carry_T, saved)``; ``saved`` a :class:`Stored`, or ``None`` unless ``keep``."""
        states, bufs, carry_t = scans(cell).forward(cell, params, steps, carry0, keep)
        return outputs_of(cell, states), carry_t, Stored(states, bufs) if keep else None

    @staticmethod
    def backward(cell, params, steps, carry0, saved, g, backprop):
        """``(dparams, dxs, dcarry0, deltas)`` for ``g = (dhs, dcarry_T)``."""
        return scans(cell).backward(cell, params, steps, carry0, saved, g, backprop)


FULL = _Full()


@dataclasses.dataclass(frozen=True)
class ModelSaved:
    """What :func:`model_forward` keeps for :func:`model_backward`, which walks as it did."""

    layers: tuple  # per layer, what its cell walk saved (a pair for a Bidirectional layer)
    inputs: tuple | None  # each layer's input (None for the first), if the walk needs them
    walk: Any = FULL  # static: the cell walk of the forward


jax.tree_util.register_dataclass(ModelSaved, data_fields=["layers", "inputs"], meta_fields=["walk"])


def layer_output(layer, saved, idx):
    """A layer's outputs, from what its full-BPTT forward stored."""
    if isinstance(layer, Bidirectional):
        if isinstance(saved, Paired):
            hf, hb = outputs_of(layer.forward, saved.saved[0])
        else:
            (sf, _), (sb, _) = saved
            hf, hb = outputs_of(layer.forward, sf), outputs_of(layer.backward, sb)
        return directions.merge_outputs(layer.merge, hf, reverse_time(hb, idx))
    return outputs_of(layer, saved[0])


def _reversal(model, steps, walk):
    """The Bidirectional layers' time reversal (:func:`~bptt_jax._engine.directions.reversal`:
    each sequence's valid prefix, or each packed sequence between resets), or ``None`` (a
    time-sharded walk runs the reverse direction in reverse time instead)."""
    if not is_bidirectional(model) or _in_reverse_time(walk):
        return None
    return directions.reversal(steps.mask, steps.xs.shape[0], steps.resets)


def model_forward(model, params, steps, carry0, *, keep=True, walk=FULL):
    """Run every layer over the sequence.

    Args:
      steps: a :class:`~bptt_jax._engine.bundles.Steps`; its ``drops`` multiply the inputs
        of layers 1..L-1.
      keep: store what the backward needs.
      walk: how each cell walks time (:data:`FULL`, or a
        :class:`~bptt_jax._engine.schedules.CheckpointedCell`).

    Returns:
      ``(hs, carry_T, saved)``: the last layer's outputs (T, B, F), the final carry (the
      model's structure) and, with ``keep``, a :class:`ModelSaved`.
    """
    layers = layers_of(model)
    ps, cs = per_layer(model, params), per_layer(model, carry0)
    idx = _reversal(model, steps, walk)
    x, carries, saved, inputs = steps.xs, [], [], []
    for k, layer in enumerate(layers):
        if k and steps.drops is not None:
            x = x * steps.drops[k - 1]
        inputs.append(x if k else None)
        if isinstance(layer, Bidirectional):
            x, c, s = _bidirectional_forward(layer, ps[k], steps._replace(xs=x, drops=None), cs[k],
                                             walk, keep, idx)  # fmt: skip
        else:
            x, c, s = walk.forward(layer, ps[k], steps._replace(xs=x, drops=None), cs[k], keep)
        carries.append(c)
        saved.append(s)
    if not keep:
        return x, from_layers(model, carries), None
    kept_inputs = tuple(inputs) if walk.stores_inputs else None
    return x, from_layers(model, carries), ModelSaved(tuple(saved), kept_inputs, walk)


def _in_reverse_time(walk) -> bool:
    """Whether ``walk`` runs a reverse direction itself, as a recurrence in reverse time
    (``walk.forward``/``walk.backward`` with ``reverse=True``, forward-time arrays in and
    out), instead of over reversed inputs."""
    return getattr(walk, "time_sharded", False)


def _bidirectional_forward(layer, params, steps, carry0, walk, keep, idx):
    """One Bidirectional layer's forward: ``(outputs, (carry_f, carry_b), saved)``."""
    x = steps.xs
    if _in_reverse_time(walk):
        hf, cf, sf = walk.forward(layer.forward, params[0], steps, carry0[0], keep)
        hb, cb, sb = walk.forward(layer.backward, params[1], steps, carry0[1], keep, reverse=True)
        return directions.merge_outputs(layer.merge, hf, hb), (cf, cb), (sf, sb)
    if walk is FULL and directions.fusable(layer, x):  # both directions as one scan
        h2, c2, s2 = jax.vmap(
            lambda p, x_, c: walk.forward(layer.forward, p, steps._replace(xs=x_), c, keep)
        )(pair(*params), pair(x, reverse_time(x, idx)), pair(*carry0))
        h = directions.merge_outputs(layer.merge, h2[0], reverse_time(h2[1], idx))
        return h, unpair(c2), Paired(s2)
    hf, cf, sf = walk.forward(layer.forward, params[0], steps, carry0[0], keep)
    x_b = reverse_time(x, idx)
    hb, cb, sb = walk.forward(layer.backward, params[1], steps._replace(xs=x_b), carry0[1], keep)
    return directions.merge_outputs(layer.merge, hf, reverse_time(hb, idx)), (cf, cb), (sf, sb)


class _Pass(NamedTuple):
    """What every layer of one backward pass shares."""

    walk: Any
    backprop: Backprop
    idx: jax.Array | None  # the Bidirectional layers' time reversal


#: Exact BPTT: no truncation cuts, no clipping, nothing kept.
EXACT = Backprop()


def model_backward(model, params, steps, carry0, saved, g, backprop=EXACT):
    """The hand-written BPTT of every layer, last to first.

    Each layer's backward takes the error on its outputs (from outside for the last layer,
    else the next layer's input gradient, through its dropout multiplier) and the error on
    its final carry; its input gradient goes to the layer below.

    Args:
      steps, carry0: :func:`model_forward`'s.
      saved: what :func:`model_forward` kept (its cell walk too).
      g: ``(dhs, dcarry_T)``: the error on the last layer's outputs ((T, B, F), an
        :class:`~bptt_jax._engine.bundles.OutputError`, or ``None``) and on the final carry
        (the model's structure).
      backprop: a :class:`~bptt_jax._engine.bundles.Backprop`, the same for every cell (a
        Bidirectional layer's directions are never cut).

    Returns:
      ``(dparams, dxs, dcarry0, deltas)``; ``deltas`` is ``None`` unless
      ``backprop.keep_deltas``, then one entry per layer (a pair for a Bidirectional layer,
      both in forward time).
    """
    layers, walk = layers_of(model), saved.walk
    dhs, dcarry_t = g
    ps, cs, dcs = per_layer(model, params), per_layer(model, carry0), per_layer(model, dcarry_t)
    idx = _reversal(model, steps, walk)
    n = len(layers)
    grads, dcarry0, deltas = [None] * n, [None] * n, [None] * n
    for k in reversed(range(n)):
        layer, x = layers[k], _layer_input(layers, k, steps, saved, idx)
        if isinstance(layer, Bidirectional):
            grads[k], dx, dcarry0[k], deltas[k] = _bidirectional_backward(
                layer, ps[k], steps._replace(xs=x, drops=None), cs[k], saved.layers[k],
                (dhs, dcs[k]), _Pass(walk, backprop, idx),
            )  # fmt: skip
        else:
            grads[k], dx, dcarry0[k], deltas[k] = walk.backward(
                layer, ps[k], steps._replace(xs=x, drops=None), cs[k], saved.layers[k],
                (dhs, dcs[k]), backprop,
            )  # fmt: skip
        if k:
            dhs = dx if steps.drops is None else dx * steps.drops[k - 1].astype(dx.dtype)
    out_deltas = from_layers(model, deltas) if backprop.keep_deltas else None
    return from_layers(model, grads), dx, from_layers(model, dcarry0), out_deltas


def _layer_input(layers, k, steps, saved, idx):
    """Layer k's input: the model's, a stored one, or the layer below's outputs re-read."""
    if k == 0:
        return steps.xs
    if saved.inputs is not None:
        return saved.inputs[k]
    x = layer_output(layers[k - 1], saved.layers[k - 1], idx)
    return x if steps.drops is None else x * steps.drops[k - 1]


def _bidirectional_backward(layer, params, steps, carry0, saved, g, bpass):
    """One Bidirectional layer's backward: ``(dparams, dxs, dcarry0, deltas)``, all pairs
    (forward, reverse) but ``dxs``."""
    if isinstance(saved, Paired):
        return _fused_backward(layer, params, steps, carry0, saved, g, bpass)
    walk, idx = bpass.walk, bpass.idx
    backprop = dataclasses.replace(bpass.backprop, cuts=None)
    dhs, dcarry_t = g
    if _in_reverse_time(walk):
        dh_f, dh_b = directions.split_error(layer, dhs, idx, reverse=False)
        sf, sb = saved
        gf, dxf, dcf, del_f = walk.backward(
            layer.forward, params[0], steps, carry0[0], sf, (dh_f, dcarry_t[0]), backprop
        )
        gb, dxb, dcb, del_b = walk.backward(
            layer.backward, params[1], steps, carry0[1], sb, (dh_b, dcarry_t[1]), backprop,
            reverse=True,
        )  # fmt: skip
        deltas = (del_f, del_b) if backprop.keep_deltas else None
        return (gf, gb), dxf + dxb, (dcf, dcb), deltas
    dh_f, dh_b = directions.split_error(layer, dhs, idx)
    sf, sb = saved
    gf, dxf, dcf, del_f = walk.backward(
        layer.forward, params[0], steps, carry0[0], sf, (dh_f, dcarry_t[0]), backprop
    )
    gb, dxb, dcb, del_b = walk.backward(
        layer.backward, params[1], steps._replace(xs=reverse_time(steps.xs, idx)), carry0[1],
        sb, (dh_b, dcarry_t[1]), backprop,
    )  # fmt: skip
    dx = dxf + reverse_time(dxb, idx)
    deltas = None
    if backprop.keep_deltas:
        deltas = (del_f, jax.tree.map(lambda d: reverse_time(d, idx), del_b))
    return (gf, gb), dx, (dcf, dcb), deltas


def _fused_backward(layer, params, steps, carry0, saved, g, bpass):
    """:func:`_bidirectional_backward` of a fused layer: both directions as one scan."""
    walk, idx = bpass.walk, bpass.idx
    backprop = dataclasses.replace(bpass.backprop, cuts=None)
    x = steps.xs
    dhs, dcarry_t = g
    g2, dx2, dc2, del2 = jax.vmap(
        lambda p, x_, c, s, dh, dc: walk.backward(
            layer.forward, p, steps._replace(xs=x_), c, s, (dh, dc), backprop
        )
    )(
        pair(*params), pair(x, reverse_time(x, idx)), pair(*carry0), saved.saved,
        pair(*directions.split_error(layer, dhs, idx)), pair(*dcarry_t),
    )  # fmt: skip
    grads, dcarry0 = unpair(g2), unpair(dc2)
    dx = dx2[0] + reverse_time(dx2[1], idx)
    deltas = None
    if backprop.keep_deltas:
        del_f, del_b = unpair(del2)
        deltas = (del_f, jax.tree.map(lambda d: reverse_time(d, idx), del_b))
    return grads, dx, dcarry0, deltas
