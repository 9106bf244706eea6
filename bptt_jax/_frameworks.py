"""What :mod:`bptt_jax.nnx` and :mod:`bptt_jax.equinox` share: their inputs checked and laid
out for :func:`bptt_jax.unroll`, and its outputs laid back.

No framework is imported here. The wrappers follow the frameworks' conventions (batch-major
``(B, T, D)`` unless ``time_major``; ``seq_lengths`` or a ``mask``; ``(carry, outputs)`` with
``return_carry``, as ``flax.nnx.RNN`` and ``lax.scan`` return them) and the call itself is
:func:`bptt_jax.unroll`, so ``jax.grad`` of anything built on it runs the hand-written BPTT.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bptt_jax import checking
from bptt_jax._engine import unroll
from bptt_jax.cells import GRU, LRU, LSTM, RGLRU, Elman, MinGRU, MinLSTM
from bptt_jax.models import Bidirectional, Stack

#: The options of :func:`bptt_jax.unroll` a wrapper passes through, with their defaults.
UNROLL_OPTIONS = {
    "backward": "manual",
    "truncate": None,
    "segment": None,
    "memory_budget": None,
    "delta_clip": None,
    "compute_dtype": None,
}


def first_cell_params(model, params):
    """The params of the first layer's first direction (a cell's own params)."""
    if isinstance(model, Stack):
        model, params = model.layers[0], params[0]
    if isinstance(model, Bidirectional):
        model, params = model.forward, params[0]
    return model, params


def input_size_of(model, params) -> int | None:
    """D, read from a built-in cell's input kernel (its first params field, ``(D, G*H)``, or
    ``(D, H)`` for a linear cell); ``None`` when unknown."""
    cell, p = first_cell_params(model, params)
    if isinstance(cell, (Elman, LSTM, GRU, MinGRU, MinLSTM, RGLRU)):
        return int(np.shape(p[0])[0])
    if isinstance(cell, LRU):  # its input kernel B (D, N), after the eigenvalues' vectors
        return int(np.shape(p.b_re)[0])
    return None


def params_dtype(params):
    leaves = jax.tree.leaves(params)
    return jnp.result_type(leaves[0]) if leaves else None


def has_dropout(model) -> bool:
    return isinstance(model, Stack) and model.dropout > 0 and len(model.layers) > 1


def check_options(fn: str, options: dict) -> dict:
    unknown = set(options) - set(UNROLL_OPTIONS)
    if unknown:
        raise TypeError(
            f"{fn}: unknown option(s) {sorted(unknown)}; the options passed to bptt_jax.unroll "
            f"are {sorted(UNROLL_OPTIONS)}"
        )
    return {**UNROLL_OPTIONS, **options}


class Layout(NamedTuple):
    """How a call's arrays map to :func:`bptt_jax.unroll`'s time-major ones."""

    time_major: bool
    unbatched: bool  # one sequence (T, D): a batch axis of 1 is added and removed
    t: int
    b: int


def _dtype_of(x) -> np.dtype:
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def prepare(
    fn: str,
    model,
    params,
    inputs,
    *,
    time_major: bool,
    seq_lengths=None,
    mask=None,
    initial_carry=None,
    in_features: int | None = None,
    allow_unbatched: bool = False,
):
    """Check a wrapper call's arguments; return ``(xs (T, B, D), mask (T, B) or None,
    carry0 or None, layout)`` for :func:`bptt_jax.unroll`.

    Raises ``ValueError`` for shapes and ranges, ``TypeError`` for dtypes, each naming the
    wrapper's argument (``inputs``, ``seq_lengths``, ``mask``, ``initial_carry``).
    """
    lay = "(T, B, D), time-major" if time_major else "(B, T, D), batch-major"
    other = "time_major=False for (B, T, D)" if time_major else "time_major=True for (T, B, D)"
    if not hasattr(inputs, "shape") or not hasattr(inputs, "dtype"):
        raise TypeError(f"{fn}: inputs must be an array {lay}; got {type(inputs).__name__}")
    shape = tuple(inputs.shape)
    d_txt = "" if in_features is None else f" with D={in_features}"
    ranks = "rank 3, or rank 2 (T, D) for one sequence" if allow_unbatched else "rank 3"
    if len(shape) not in ((2, 3) if allow_unbatched else (3,)):
        raise ValueError(
            f"{fn}: inputs must have shape {lay}{d_txt} ({ranks}); got {shape} (rank "
            f"{len(shape)}); {other}"
        )
    if in_features is not None and shape[-1] != in_features:
        raise ValueError(
            f"{fn}: inputs must have shape {lay} with D={in_features} (in_features); got {shape}"
        )
    unbatched = len(shape) == 2
    if unbatched:  # one sequence (T, D): a batch of one
        xs = inputs[:, None, :]
    else:
        xs = inputs if time_major else jnp.swapaxes(inputs, 0, 1)
    t, b = xs.shape[:2]
    if t < 1 or b < 1:
        raise ValueError(f"{fn}: inputs must have T >= 1 and B >= 1; got {shape}")
    dtype = params_dtype(params)
    if not jnp.issubdtype(inputs.dtype, jnp.floating) or inputs.dtype != dtype:
        raise TypeError(
            f"{fn}: inputs dtype {inputs.dtype} does not match the params' dtype {dtype}; cast "
            f"them with inputs.astype({np.dtype(dtype).name!r}) (dtypes are never promoted)"
        )
    layout = Layout(time_major, unbatched, t, b)
    m = _mask(fn, seq_lengths, mask, layout)
    carry0 = _carry(fn, model, initial_carry, layout, dtype)
    return xs, m, carry0, layout


def _mask(fn: str, seq_lengths, mask, layout: Layout):
    t, b = layout.t, layout.b
    if seq_lengths is not None and mask is not None:
        raise ValueError(f"{fn}: pass seq_lengths or mask, not both")
    if seq_lengths is not None:
        want = () if layout.unbatched else (b,)
        if np.shape(seq_lengths) != want:
            raise ValueError(
                f"{fn}: seq_lengths must have shape {want} (one length per sequence); got "
                f"{np.shape(seq_lengths)}"
            )
        dt = _dtype_of(seq_lengths)
        if not jnp.issubdtype(dt, jnp.integer):
            raise TypeError(f"{fn}: seq_lengths must be integers; got dtype {dt}")
        lengths = jnp.asarray(seq_lengths)
        if _is_traced(seq_lengths):  # in checked mode (bptt_jax.checking), at run time
            flat = jnp.reshape(lengths, (-1,))
            checking.check_all(
                (flat >= 0) & (flat <= t),
                f"{fn}: seq_lengths must be in [0, T] = [0, {t}]; got {{value}} for sequence {{i}}",
                values=flat,
            )
        else:
            values = np.asarray(seq_lengths)
            if values.size and (values.min() < 0 or values.max() > t):
                raise ValueError(
                    f"{fn}: seq_lengths must be in [0, T] = [0, {t}]; got values from "
                    f"{values.min()} to {values.max()}"
                )
        lengths = lengths.reshape(b)
        # int32 steps: in a narrow dtype (uint8) arange(T) would wrap past 255, silently
        return jnp.arange(t, dtype=jnp.int32)[:, None] < lengths[None, :].astype(jnp.int32)
    if mask is None:
        return None
    if layout.unbatched:
        want, name = (t,), "(T,)"
    else:
        want, name = ((t, b), "(T, B)") if layout.time_major else ((b, t), "(B, T)")
    if np.shape(mask) != want:
        raise ValueError(
            f"{fn}: mask must have shape {name} = {want} to match inputs; got {np.shape(mask)}"
        )
    dt = _dtype_of(mask)
    if not (dt == np.bool_ or jnp.issubdtype(dt, jnp.number)):
        raise TypeError(f"{fn}: mask must be bool or 0/1 numbers; got dtype {dt}")
    mask = jnp.asarray(mask)
    mask = mask if mask.dtype == jnp.bool_ else mask != 0
    if layout.unbatched:
        return mask[:, None]
    return mask if layout.time_major else mask.T


def _fmt_tree(tree) -> str:
    return str(jax.tree.map(lambda s: tuple(s.shape), tree))


def _carry(fn: str, model, carry, layout: Layout, dtype):
    if carry is None:
        return None
    want = jax.eval_shape(lambda: model.zero_carry(layout.b, dtype))
    if layout.unbatched:
        want = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), want)
    what = "model.zero_carry(B)" + (" without its batch axis" if layout.unbatched else "")
    if jax.tree.structure(carry) != jax.tree.structure(want):
        raise TypeError(
            f"{fn}: initial_carry must have the structure of {what}: {_fmt_tree(want)}; got "
            f"{jax.tree.structure(carry)}"
        )
    for (path, leaf), w in zip(
        jax.tree_util.tree_flatten_with_path(carry)[0], jax.tree.leaves(want)
    ):
        where = "initial_carry" + jax.tree_util.keystr(path)
        if np.shape(leaf) != w.shape:
            raise ValueError(
                f"{fn}: {where} must have shape {w.shape} (as {what}); got {np.shape(leaf)}"
            )
        if jnp.result_type(leaf) != w.dtype:
            raise TypeError(
                f"{fn}: {where} dtype {jnp.result_type(leaf)} does not match the params' dtype "
                f"{w.dtype}"
            )
    if layout.unbatched:
        carry = jax.tree.map(lambda c: jnp.asarray(c)[None], carry)
    return carry


def call(model, params, xs, mask, carry0, layout: Layout, options: dict, dropout_key,
         return_carry: bool):  # fmt: skip
    """:func:`bptt_jax.unroll` and the outputs laid back: ``outputs`` or ``(carry, outputs)``."""
    hs, carry = unroll(model, params, xs, carry0, mask=mask, dropout_key=dropout_key, **options)
    if layout.unbatched:
        hs = hs[:, 0]
        carry = jax.tree.map(lambda c: c[0], carry)
    elif not layout.time_major:
        hs = jnp.swapaxes(hs, 0, 1)
    return (carry, hs) if return_carry else hs
