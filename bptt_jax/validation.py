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


def check_params(fn: str, cell, params) -> tuple[int, jnp.dtype]:
    """Check ``params`` against ``cell``; return (input size D, dtype)."""
    ptype = PARAMS_TYPES[type(cell)]
    if not isinstance(params, ptype):
        raise TypeError(
            f"{fn}: params must be a bptt_jax.{ptype.__name__} (from "
            f"{type(cell).__name__}.init) for a {type(cell).__name__} cell; "
            f"got {type(params).__name__}"
        )
    h, g = cell.hidden_size, cell.n_blocks * cell.hidden_size
    dtypes = {name: _dtype(leaf) for name, leaf in zip(ptype._fields, params)}
    first = ptype._fields[0]
    for name, dt in dtypes.items():
        if not jnp.issubdtype(dt, jnp.floating):
            raise TypeError(f"{fn}: params.{name} must be floating point; got dtype {dt}")
        if dt != dtypes[first]:
            raise TypeError(
                f"{fn}: all params must share one dtype; params.{first} is "
                f"{dtypes[first]} but params.{name} is {dt}"
            )
    kx = _shape(cell.input_kernel(params))
    if len(kx) != 2 or kx[1] != g:
        raise ValueError(
            f"{fn}: params.{first} must have shape (D, {g}) for a {type(cell).__name__} with "
            f"hidden_size={h}; got {kx}"
        )
    for name, leaf in zip(ptype._fields[1:], params[1:]):
        want = (h, g) if leaf is cell.recurrent_kernel(params) else (g,)
        if _shape(leaf) != want:
            raise ValueError(
                f"{fn}: params.{name} must have shape {want} for a {type(cell).__name__} "
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


def check_carry(fn: str, cell, carry, batch: int, dtype):
    """Check (and normalise) an initial carry; ``None`` becomes the zero carry."""
    h = cell.hidden_size
    if carry is None:
        return cell.zero_carry(batch, dtype)
    if isinstance(cell, LSTM):
        if not (isinstance(carry, tuple) and len(carry) == 2):
            raise TypeError(
                f"{fn}: carry0 for an LSTM must be a bptt_jax.LSTMCarry(h, c) of two (B, H) "
                f"arrays; got {type(carry).__name__}"
                + (f" with shape {_shape(carry)}" if hasattr(carry, "shape") else "")
            )
        carry = LSTMCarry(*(as_array(fn, "carry0", c) for c in carry))
        parts = zip(("carry0.h", "carry0.c"), carry)
    else:
        if isinstance(carry, tuple):
            raise TypeError(
                f"{fn}: carry0 for an {type(cell).__name__} must be one (B, H) array; "
                f"got a {type(carry).__name__} of {len(carry)}"
            )
        carry = as_array(fn, "carry0", carry)
        parts = (("carry0", carry),)
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
