"""Every shape, dtype and option check of the public API, in one place.

All checks run at trace time (they read only shapes and dtypes), so they cost nothing inside
``jax.jit`` and fire before XLA sees a bad program. Shape problems raise ``ValueError``, dtype
and structure problems ``TypeError``; each message names the function, the argument, what was
expected and what was received.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bptt_jax import precision
from bptt_jax._sharding import like_batch
from bptt_jax.cells import LSTM, PARAMS_TYPES, LSTMCarry


def _shape(x) -> tuple[int, ...]:
    return tuple(np.shape(x))


def _dtype(x):
    return jnp.result_type(x) if hasattr(x, "dtype") else jnp.asarray(x).dtype


def as_array(fn: str, name: str, x) -> jax.Array:
    """Turn an array-like into a jax array, with a clear error for anything else."""
    if isinstance(x, jax.Array):
        return x
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{fn}: {name} must be an array; got {type(x).__name__}") from e


def check_choice(fn: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{fn}: {name} must be one of {choices}; got {value!r}")


def check_cell(fn: str, cell) -> None:
    if type(cell) not in PARAMS_TYPES:
        raise TypeError(
            f"{fn}: cell must be a bptt_jax.Elman, bptt_jax.LSTM or bptt_jax.GRU; "
            f"got {type(cell).__name__}"
        )


def check_truncate(fn: str, truncate) -> None:
    if truncate is None:
        return
    if isinstance(truncate, bool) or not isinstance(truncate, (int, np.integer)):
        raise TypeError(f"{fn}: truncate must be None or a positive int; got {truncate!r}")
    if truncate <= 0:
        raise ValueError(f"{fn}: truncate must be a positive int (k >= 1); got {truncate}")


def check_params(fn: str, cell, params, where: str = "params") -> tuple[int, jnp.dtype]:
    """Check ``params`` against ``cell``; return (input size D, dtype)."""
    ptype = PARAMS_TYPES[type(cell)]
    if not isinstance(params, ptype):
        raise TypeError(
            f"{fn}: {where} must be a bptt_jax.{ptype.__name__} (from "
            f"{type(cell).__name__}.init) for a {type(cell).__name__} cell; "
            f"got {type(params).__name__}"
        )
    h, g = cell.hidden_size, cell.n_blocks * cell.hidden_size
    dtypes = {name: _dtype(leaf) for name, leaf in zip(ptype._fields, params)}
    first = ptype._fields[0]
    for name, dt in dtypes.items():
        if not jnp.issubdtype(dt, jnp.floating):
            raise TypeError(f"{fn}: {where}.{name} must be floating point; got dtype {dt}")
        if dt != dtypes[first]:
            raise TypeError(
                f"{fn}: all params must share one dtype; {where}.{first} is "
                f"{dtypes[first]} but {where}.{name} is {dt}"
            )
    kx = _shape(cell.input_kernel(params))
    if len(kx) != 2 or kx[1] != g:
        raise ValueError(
            f"{fn}: {where}.{first} must have shape (D, {g}) for a {type(cell).__name__} with "
            f"hidden_size={h}; got {kx}"
        )
    for name, leaf in zip(ptype._fields[1:], params[1:]):
        want = (h, g) if leaf is cell.recurrent_kernel(params) else (g,)
        if _shape(leaf) != want:
            raise ValueError(
                f"{fn}: {where}.{name} must have shape {want} for a {type(cell).__name__} "
                f"with hidden_size={h}; got {_shape(leaf)}"
            )
    return kx[0], dtypes[first]


def check_xs(fn: str, xs, params_name: str, d: int, dtype) -> tuple[int, int]:
    """Check ``xs`` (T, B, D); return (T, B)."""
    shape = _shape(xs)
    if len(shape) != 3:
        raise ValueError(
            f"{fn}: xs must have shape (T, B, D), time-major, with D={d}; got {shape} "
            f"(rank {len(shape)}). For one sequence use xs[:, None, :]."
        )
    dt = _dtype(xs)
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(
            f"{fn}: xs must be floating point with the params' dtype {dtype}; got dtype {dt}. "
            f"Cast it with xs.astype({dtype.name!r})."
        )
    if dt != dtype:
        raise TypeError(
            f"{fn}: xs dtype {dt} does not match the params' dtype {dtype}; cast one of them."
        )
    if shape[2] != d:
        raise ValueError(
            f"{fn}: xs must have shape (T, B, D) with D={d} to match {params_name}; got {shape}"
        )
    if shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"{fn}: xs must have T >= 1 and B >= 1; got {shape}")
    return shape[0], shape[1]


def check_carry(fn: str, cell, carry, batch: int, dtype, where: str = "carry0"):
    """Check (and normalise) an initial carry; ``None`` becomes the zero carry."""
    h = cell.hidden_size
    if carry is None:
        return cell.zero_carry(batch, dtype)
    if isinstance(cell, LSTM):
        if not (isinstance(carry, tuple) and len(carry) == 2):
            raise TypeError(
                f"{fn}: {where} for an LSTM must be a bptt_jax.LSTMCarry(h, c) of two (B, H) "
                f"arrays; got {type(carry).__name__}"
                + (f" with shape {_shape(carry)}" if hasattr(carry, "shape") else "")
            )
        carry = LSTMCarry(*(as_array(fn, where, c) for c in carry))
        parts = zip((f"{where}.h", f"{where}.c"), carry)
    else:
        if isinstance(carry, tuple):
            raise TypeError(
                f"{fn}: {where} for an {type(cell).__name__} must be one (B, H) array; "
                f"got a {type(carry).__name__} of {len(carry)}"
            )
        carry = as_array(fn, where, carry)
        parts = ((where, carry),)
    for name, c in parts:
        if _shape(c) != (batch, h):
            raise ValueError(
                f"{fn}: {name} must have shape (B, H) = ({batch}, {h}); got {_shape(c)}"
            )
        if _dtype(c) != dtype:
            raise TypeError(
                f"{fn}: {name} dtype {_dtype(c)} does not match the params' dtype {dtype}"
            )
    return carry


def check_mask(fn: str, mask, t: int, b: int, name: str = "mask"):
    """Check a (T, B) 0/1 mask (``mask``, ``loss_mask``, ``resets``); return it as bool."""
    if mask is None:
        return None
    mask = as_array(fn, name, mask)
    if _shape(mask) != (t, b):
        raise ValueError(
            f"{fn}: {name} must have shape (T, B) = ({t}, {b}) to match xs; got {_shape(mask)}"
        )
    dt = mask.dtype
    if not (dt == jnp.bool_ or jnp.issubdtype(dt, jnp.number)):
        raise TypeError(f"{fn}: {name} must be bool or 0/1 numbers; got dtype {dt}")
    return mask if dt == jnp.bool_ else mask != 0


def check_readout(fn: str, readout, h: int, dtype) -> int:
    """Check ReadoutParams(w_hy (H, O), b_y (O,)); return O."""
    from bptt_jax.losses import ReadoutParams

    if not isinstance(readout, ReadoutParams):
        raise TypeError(
            f"{fn}: readout must be a bptt_jax.ReadoutParams(w_hy, b_y); "
            f"got {type(readout).__name__}"
        )
    w, b = _shape(readout.w_hy), _shape(readout.b_y)
    if len(w) != 2 or w[0] != h:
        raise ValueError(
            f"{fn}: readout.w_hy must have shape (H, O) with H={h} to match the cell; got {w}"
        )
    if b != (w[1],):
        raise ValueError(
            f"{fn}: readout.b_y must have shape (O,) = ({w[1]},) to match readout.w_hy {w}; got {b}"
        )
    for name, leaf in zip(ReadoutParams._fields, readout):
        if _dtype(leaf) != dtype:
            raise TypeError(
                f"{fn}: readout.{name} dtype {_dtype(leaf)} does not match the params' "
                f"dtype {dtype}"
            )
    return w[1]


def check_targets(fn: str, targets, loss: str, t: int, b: int, o: int, dtype, mask):
    targets = as_array(fn, "targets", targets)
    dt = targets.dtype
    if loss == "xent":
        if _shape(targets) != (t, b):
            raise ValueError(
                f"{fn}: targets for loss='xent' must be integer classes of shape (T, B) = "
                f"({t}, {b}); got {_shape(targets)}"
            )
        if not jnp.issubdtype(dt, jnp.integer):
            raise TypeError(f"{fn}: targets for loss='xent' must have an integer dtype; got {dt}")
        if not isinstance(targets, jax.core.Tracer) and (
            mask is None or not isinstance(mask, jax.core.Tracer)
        ):
            values = np.asarray(targets)
            valid = np.ones(values.shape, bool) if mask is None else np.asarray(mask)
            bad = valid & ((values < 0) | (values >= o))
            if bad.any():
                tb = tuple(int(i) for i in np.argwhere(bad)[0])
                raise ValueError(
                    f"{fn}: targets must lie in [0, O) = [0, {o}) where mask is set; "
                    f"got {int(values[tb])} at (t, b) = {tb}"
                )
    else:
        if _shape(targets) != (t, b, o):
            raise ValueError(
                f"{fn}: targets for loss='mse' must have shape (T, B, O) = ({t}, {b}, {o}); "
                f"got {_shape(targets)}"
            )
        if dt != dtype:
            raise TypeError(
                f"{fn}: targets for loss='mse' must have the params' dtype {dtype}; got {dt}"
            )
    return targets


def check_positive(fn: str, name: str, value, kind=float, allow_none: bool = True):
    """``value`` is a positive ``kind`` (int or float), or None when allowed."""
    if value is None and allow_none:
        return None
    ok_types = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_types) or not value > 0:
        what = "a positive int" if kind is int else "a positive number"
        raise ValueError(
            f"{fn}: {name} must be {what}{' or None' if allow_none else ''}; got {value!r}"
        )
    return value


def check_unroll_args(fn: str, cell, params, xs, carry0, mask, truncate):
    """The shared checks of :func:`unroll` and :func:`sequence_loss`."""
    check_cell(fn, cell)
    check_truncate(fn, truncate)
    d, dtype = check_params(fn, cell, params)
    xs = as_array(fn, "xs", xs)
    pname = f"params.{type(params)._fields[0]} {_shape(params[0])}"
    t, b = check_xs(fn, xs, pname, d, dtype)
    carry0 = check_carry(fn, cell, carry0, b, dtype)
    mask = check_mask(fn, mask, t, b)
    return xs, carry0, mask, dtype


def _check_tuple(fn: str, what: str, value, n: int, of: str) -> tuple:
    if not isinstance(value, (tuple, list)) or len(value) != n:
        got = f"a {type(value).__name__}" + (
            f" of {len(value)}" if isinstance(value, (tuple, list)) else ""
        )
        raise TypeError(f"{fn}: {what} must be a tuple of {n} ({of}); got {got}")
    return tuple(value)


def check_model_args(fn: str, model, params, xs, carry0, mask, truncate, resets=None,
                     compute_dtype=None):  # fmt: skip
    """The shared checks of every entry point, for a cell or a model.

    Returns ``(xs, carry0, mask, resets, dtype)`` with ``carry0`` filled in (zeros, varying
    like ``xs`` inside ``shard_map``), the masks as bool, ``dtype`` the params' and ``xs``
    cast to ``compute_dtype`` (:mod:`bptt_jax.precision`) when one is given. A
    :class:`~bptt_jax.Stack` 's params and carry are checked layer by layer
    (layer k's input size against layer k-1's output size), a
    :class:`~bptt_jax.Bidirectional` 's direction by direction.
    """
    xs, carry0, mask, resets, dtype = _check_model_args(
        fn, model, params, xs, carry0, mask, truncate, resets
    )
    carry0 = like_batch(carry0, xs)
    cdt = precision.resolve(fn, compute_dtype, dtype)
    if cdt is not None:
        xs = xs.astype(cdt)
    return xs, carry0, mask, resets, dtype


def _check_model_args(fn: str, model, params, xs, carry0, mask, truncate, resets):
    from bptt_jax.models import Bidirectional, Stack, is_bidirectional, is_model

    if not is_model(model):
        raise TypeError(
            f"{fn}: model must be a cell (bptt_jax.Elman, bptt_jax.LSTM, bptt_jax.GRU), a "
            f"bptt_jax.Bidirectional or a bptt_jax.Stack; got {type(model).__name__}"
        )
    if not isinstance(model, (Stack, Bidirectional)):
        xs, carry0, mask, dtype = check_unroll_args(fn, model, params, xs, carry0, mask, truncate)
        resets = check_mask(fn, resets, *xs.shape[:2], name="resets")
        return xs, carry0, mask, resets, dtype
    check_truncate(fn, truncate)
    if is_bidirectional(model):
        if truncate is not None:
            raise ValueError(
                f"{fn}: truncate={truncate} is undefined for a bidirectional model (its reverse "
                "direction needs the whole future of every step); use truncate=None"
            )
        if resets is not None:
            raise ValueError(
                f"{fn}: resets are undefined for a bidirectional model (a carried stream: the "
                "reverse direction needs the whole future of every step); use resets=None"
            )
    stack = isinstance(model, Stack)
    layers = model.layers if stack else (model,)
    ps = (
        _check_tuple(fn, "params", params, len(layers), "one params entry per layer")
        if stack
        else (params,)
    )
    dtype = None
    d_in = None  # the input size layer k expects: layer k-1's output size
    d_model = None
    for k, (layer, p) in enumerate(zip(layers, ps)):
        where = f"params[{k}]" if stack else "params"
        if isinstance(layer, Bidirectional):
            pair = _check_tuple(fn, where, p, 2, "the (forward, backward) params")
            dirs = [(c, q, f"{where}[{d}]") for d, (c, q) in enumerate(zip(layer.cells, pair))]
        else:
            dirs = [(layer, p, where)]
        for cell, q, name in dirs:
            d, dt = check_params(fn, cell, q, name)
            if dtype is None:
                dtype, d_model = dt, d
            elif dt != dtype:
                raise TypeError(
                    f"{fn}: all params must share one dtype; {name} is {dt} but the first "
                    f"layer's is {dtype}"
                )
            want = d_model if d_in is None else d_in
            if d != want:
                first = type(q)._fields[0]
                source = (
                    f"layer {k - 1}'s output size {d_in}"
                    if k and d_in is not None
                    else f"the first cell's input size {d_model}"
                )
                raise ValueError(
                    f"{fn}: {name}.{first} must have shape ({want}, G*H) to match {source}; "
                    f"got {_shape(q[0])}"
                )
        d_in = layer.output_size if isinstance(layer, Bidirectional) else layer.hidden_size
    xs = as_array(fn, "xs", xs)
    first = ps[0][0] if isinstance(layers[0], Bidirectional) else ps[0]
    pname = ("params[0]" if stack else "params") + (
        "[0]" if isinstance(layers[0], Bidirectional) else ""
    )
    t, b = check_xs(fn, xs, f"{pname}.{type(first)._fields[0]} {_shape(first[0])}", d_model, dtype)
    if carry0 is None:
        carry0 = model.zero_carry(b, dtype)
    else:
        cs = (
            _check_tuple(fn, "carry0", carry0, len(layers), "one carry per layer")
            if stack else (carry0,)
        )  # fmt: skip
        out = []
        for k, (layer, c) in enumerate(zip(layers, cs)):
            where = f"carry0[{k}]" if stack else "carry0"
            if isinstance(layer, Bidirectional):
                pair = _check_tuple(fn, where, c, 2, "the (forward, backward) carries")
                out.append(tuple(
                    check_carry(fn, cell, cc, b, dtype, f"{where}[{d}]")
                    for d, (cell, cc) in enumerate(zip(layer.cells, pair))
                ))  # fmt: skip
            else:
                out.append(check_carry(fn, layer, c, b, dtype, where))
        carry0 = tuple(out) if stack else out[0]
    mask = check_mask(fn, mask, t, b)
    resets = check_mask(fn, resets, t, b, name="resets")
    return xs, carry0, mask, resets, dtype
