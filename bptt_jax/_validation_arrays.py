"""The checks of the arrays and options around a model: xs, masks and resets, targets, the
readout, PRNG keys, positive numbers, choices and tuples; and the checks of host values
(a mask's 0/1, right padding, targets' class range) that run when the values are known.

Part of :mod:`bptt_jax.validation`, which re-exports these; the checks of a cell (its
contract, params, carry and step) are in :mod:`bptt_jax._validation_cells`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bptt_jax import checking
from bptt_jax.readout import ReadoutParams


def shape_of(x) -> tuple[int, ...]:
    """``x``'s shape, for an array or anything array-like."""
    return tuple(np.shape(x))


def dtype_of(x):
    """``x``'s dtype, for an array or anything array-like."""
    return jnp.result_type(x) if hasattr(x, "dtype") else jnp.asarray(x).dtype


def as_array(fn: str, name: str, x) -> jax.Array:
    """Turn an array-like into a jax array, with a clear error for anything else."""
    if isinstance(x, jax.Array):
        return x
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{fn}: {name} must be an array; got {type(x).__name__}") from e


def concrete(x) -> np.ndarray | None:
    """``x``'s values on the host, or ``None`` when they are not known at trace time (a
    tracer under ``jit``) or not all on this process (a multi-host global array). The
    value checks (targets' range, a mask's 0/1, right padding) run only on what this gives.
    """
    if x is None or isinstance(x, jax.core.Tracer):
        return None
    if not getattr(x, "is_fully_addressable", True):
        return None
    return np.asarray(x)


# ----------------------------------------------------------------------- real numbers
#: Per argument, how its complex numbers go in as real arrays (:func:`check_real`).
_AS_REAL = {
    "xs": "xs as jnp.concatenate([xs.real, xs.imag], axis=-1), 2*D real features",
    "params": "a complex kernel as two real params (w_re, w_im), combined inside the step",
    "carry0": "a complex state (B, N) as one real (B, 2N) array, its real parts then its "
    "imaginary parts",
    "readout": "a readout of the real features the model outputs",
}


def check_real(fn: str, name: str, tree) -> None:
    """No complex array (nor Python complex number) anywhere in ``tree``, the argument
    ``name``: the cells, the losses and the hand-written backward are real; a complex state
    or parameter goes in as its real and imaginary parts. Reads dtypes only (free under
    ``jit``).

    Raises:
      TypeError: naming the argument and the leaf (``params[1].w_x``), its dtype, and how to
        pass it as real arrays.
    """
    if not any(map(_is_complex, jax.tree.leaves(tree))):
        return  # the common case, without the paths (xs may be a long nested list)
    path, leaf = next(
        (path, leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        if _is_complex(leaf)
    )
    dt = np.dtype(complex) if isinstance(leaf, complex) else leaf.dtype
    how = _AS_REAL.get(name)
    raise TypeError(
        f"{fn}: {name}{jax.tree_util.keystr(path)} has dtype {dt}; complex dtypes are not "
        f"supported: pass a complex number as its real and imaginary parts, real arrays"
        + (f" (e.g. {how})" if how else "")
    )


def _is_complex(leaf) -> bool:
    if isinstance(leaf, complex):
        return True
    dt = getattr(leaf, "dtype", None)
    return dt is not None and jnp.issubdtype(dt, jnp.complexfloating)


# ----------------------------------------------------------------------------- options
def check_key(fn: str, key, name: str = "key") -> jax.Array:
    """A PRNG key: a typed key (``jax.random.key``), a raw ``uint32`` key
    (``jax.random.PRNGKey``) or an int seed (made a key); ``None`` is seed 0."""
    if key is None:
        return jax.random.key(0)
    if isinstance(key, int | np.integer) and not isinstance(key, bool):
        return jax.random.key(int(key))
    if isinstance(key, jax.Array | np.ndarray) and (
        jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
        or (key.dtype == jnp.uint32 and key.shape[-1:] == (2,))
    ):
        return key
    raise TypeError(
        f"{fn}: {name} must be a PRNG key (jax.random.key(0)) or an int seed; got "
        f"{type(key).__name__}" + (f" of dtype {key.dtype}" if hasattr(key, "dtype") else "")
    )


def check_choice(fn: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{fn}: {name} must be one of {choices}; got {value!r}")


def check_positive(fn: str, name: str, value, kind=float, allow_none: bool = True):
    """``value`` is a positive ``kind`` (int or float), or None when allowed."""
    if value is None and allow_none:
        return None
    if kind is int and isinstance(value, np.integer):
        value = int(value)  # a NumPy integer: its Python value (callers use what is returned)
    ok_types = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_types) or not value > 0:
        what = "a positive int" if kind is int else "a positive number"
        raise ValueError(
            f"{fn}: {name} must be {what}{' or None' if allow_none else ''}; got {value!r}"
        )
    return value


def check_tuple(fn: str, what: str, value, n: int, of: str) -> tuple:
    if not isinstance(value, (tuple, list)) or len(value) != n:
        got = f"a {type(value).__name__}" + (
            f" of {len(value)}" if isinstance(value, (tuple, list)) else ""
        )
        raise TypeError(f"{fn}: {what} must be a tuple of {n} ({of}); got {got}")
    return tuple(value)


def check_truncate(fn: str, truncate) -> None:
    if truncate is None:
        return
    if isinstance(truncate, bool) or not isinstance(truncate, (int, np.integer)):
        raise TypeError(f"{fn}: truncate must be None or a positive int; got {truncate!r}")
    if truncate <= 0:
        raise ValueError(f"{fn}: truncate must be a positive int (k >= 1); got {truncate}")


# ---------------------------------------------------------------------------------- xs
def check_xs(fn: str, xs, params_name: str, d: int | None, dtype) -> tuple[int, int]:
    """Check ``xs`` (T, B, D); return (T, B). ``d=None``: any D (a cell whose params are
    then checked against ``init`` for this D)."""
    shape = shape_of(xs)
    if len(shape) != 3:
        with_d = "" if d is None else f" with D={d}"
        raise ValueError(
            f"{fn}: xs must have shape (T, B, D), time-major,{with_d}; got {shape} "
            f"(rank {len(shape)}). For one sequence use xs[:, None, :]."
        )
    if d is None:
        d = shape[2]
    dt = dtype_of(xs)
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(
            f"{fn}: xs must be floating point with the params' dtype {dtype}; got dtype {dt}. "
            f"Cast it with xs.astype({dtype.name!r})."
        )
    if dt != dtype:
        hint = ""
        if jnp.finfo(dt).bits < jnp.finfo(dtype).bits:  # e.g. bfloat16 inputs, float32 params
            hint = (
                f" For {dt.name} compute with {dtype.name} params, pass {dtype.name} xs and "
                f"compute_dtype={dt.name!r} (the precision policy)."
            )
        raise TypeError(
            f"{fn}: xs dtype {dt} does not match the params' dtype {dtype}; cast one of them."
            + hint
        )
    if shape[2] != d:
        raise ValueError(
            f"{fn}: xs must have shape (T, B, D) with D={d} to match {params_name}; got {shape}"
        )
    if shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"{fn}: xs must have T >= 1 and B >= 1; got {shape}")
    return shape[0], shape[1]


def padding_zeroed(xs, mask):
    """``xs`` with every padded step (``mask`` 0) replaced by zeros.

    Padded steps never reach a valid output, but their values would still meet a zero error
    in the weight-gradient matmuls (``X^T dA``): a NaN or inf there (a NaN-filled or
    ``np.empty`` padding buffer) times 0 is NaN in every weight gradient. Zeroed here, at
    every entry point, padding cannot reach any output or gradient whatever its values; the
    gradient of ``xs`` at padded steps is exactly 0.
    """
    if mask is None:
        return xs
    return jnp.where(mask[..., None], xs, jnp.zeros((), xs.dtype))


# ------------------------------------------------------------------------------- masks
def check_mask(fn: str, mask, t: int, b: int, name: str = "mask"):
    """Check a (T, B) 0/1 mask (``mask``, ``loss_mask``, ``resets``); return it as bool."""
    if mask is None:
        return None
    mask = as_array(fn, name, mask)
    if shape_of(mask) != (t, b):
        raise ValueError(
            f"{fn}: {name} must have shape (T, B) = ({t}, {b}) to match xs; got {shape_of(mask)}"
        )
    dt = mask.dtype
    if not (dt == jnp.bool_ or jnp.issubdtype(dt, jnp.number)):
        raise TypeError(f"{fn}: {name} must be bool or 0/1 numbers; got dtype {dt}")
    if dt == jnp.bool_:
        return mask
    if checking.traced(mask):
        checking.check_all((mask == 0) | (mask == 1), _flags_message(fn, name), values=mask)
        return mask != 0
    values = concrete(mask)
    if values is not None:
        check_flag_values(fn, name, values)
    return mask != 0


def check_flag_values(fn: str, name: str, values: np.ndarray) -> None:
    """Host values of a numeric (T, B) mask, loss mask or resets: only 0 and 1."""
    bad = (values != 0) & (values != 1)
    if bad.any():
        t, b = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(_flags_message(fn, name).format(value=repr(values[t, b].item()), t=t, b=b))


def _flags_message(fn: str, name: str) -> str:
    return (
        f"{fn}: {name} must hold only 0 and 1 (or be bool); got {{value}} at "
        "(t, b) = ({t}, {b}). It selects steps, it does not weight them"
        + (
            ": for per-token weights, write the weighted loss on unroll's outputs "
            "(its gradient is hand-written too)"
            if name == "loss_mask"
            else ""
        )
        + "."
    )


def check_right_padded(fn: str, mask) -> None:
    """A bidirectional model's mask (bool, (T, B)) has each sequence's valid steps first.

    Its reverse direction reads each sequence's first ``sum_t mask[t, b]`` steps backwards,
    so a left-padded batch, or a gap, would be read wrongly, silently. Checked when the mask
    is concrete, and under ``jit`` in checked mode (:mod:`bptt_jax.checking`).
    """
    message = (
        f"{fn}: a bidirectional model needs right-padded sequences (the mask's valid "
        "steps first, then padding); mask[:, {b}] has a padded step at t={t} and a valid "
        "one after it. Move each sequence's steps to the front (left-padded "
        "batches are read wrongly by the reverse direction)."
    )
    if checking.traced(mask):
        # valid exactly before each length (no slicing in time: the mask may be split over
        # devices in time, sequence parallelism), so its first failure is a padded step
        # with a valid one after it
        lengths = jnp.sum(mask, axis=0, dtype=jnp.int32)
        steps = jnp.arange(mask.shape[0], dtype=jnp.int32)[:, None]
        checking.check_all(mask == (steps < lengths), message)
        return
    m = concrete(mask)
    if m is None:
        return
    bad = m[1:] & ~m[:-1]  # a valid step right after a padded one
    if bad.any():
        t, b = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(message.format(t=t, b=b))


# --------------------------------------------------------------------------- loss head
def check_readout(fn: str, readout, h: int, dtype) -> int:
    """Check ReadoutParams(w_hy (H, O), b_y (O,)); return O."""
    check_real(fn, "readout", readout)
    if not isinstance(readout, ReadoutParams):
        raise TypeError(
            f"{fn}: readout must be a bptt_jax.ReadoutParams(w_hy, b_y); "
            f"got {type(readout).__name__}"
        )
    w, b = shape_of(readout.w_hy), shape_of(readout.b_y)
    if len(w) != 2 or w[0] != h:
        raise ValueError(
            f"{fn}: readout.w_hy must have shape (H, O) with H={h} to match the cell; got {w}"
        )
    if b != (w[1],):
        raise ValueError(
            f"{fn}: readout.b_y must have shape (O,) = ({w[1]},) to match readout.w_hy {w}; got {b}"
        )
    for name, leaf in zip(ReadoutParams._fields, readout):
        if dtype_of(leaf) != dtype:
            raise TypeError(
                f"{fn}: readout.{name} dtype {dtype_of(leaf)} does not match the params' "
                f"dtype {dtype}"
            )
    return w[1]


def check_targets(fn: str, targets, loss: str, t: int, b: int, o: int, dtype, mask):
    targets = as_array(fn, "targets", targets)
    dt = targets.dtype
    if loss == "xent":
        if shape_of(targets) != (t, b):
            raise ValueError(
                f"{fn}: targets for loss='xent' must be integer classes of shape (T, B) = "
                f"({t}, {b}); got {shape_of(targets)}"
            )
        if not jnp.issubdtype(dt, jnp.integer):
            raise TypeError(f"{fn}: targets for loss='xent' must have an integer dtype; got {dt}")
        if checking.traced(targets) or checking.traced(mask):
            ok = (jnp.asarray(targets) >= 0) & (jnp.asarray(targets) < o)
            if mask is not None:
                ok = ok | ~mask
            checking.check_all(ok, _class_range_message(fn, "targets", o), values=targets)
            return targets
        values, valid = concrete(targets), concrete(mask)
        if values is not None and (mask is None or valid is not None):
            check_class_range(fn, "targets", values, o, valid)
    else:
        if shape_of(targets) != (t, b, o):
            raise ValueError(
                f"{fn}: targets for loss='mse' must have shape (T, B, O) = ({t}, {b}, {o}); "
                f"got {shape_of(targets)}"
            )
        if dt != dtype:
            raise TypeError(
                f"{fn}: targets for loss='mse' must have the params' dtype {dtype}; got {dt}"
            )
    return targets


def check_class_range(fn: str, name: str, values: np.ndarray, o: int, valid=None) -> None:
    """Host class indices ``values`` (T, B) in ``[0, O)`` wherever ``valid`` (T, B; ``None``:
    everywhere) is set: out of range, a softmax cross-entropy is a silent NaN."""
    bad = (values < 0) | (values >= o)
    if valid is not None:
        bad &= np.asarray(valid, bool)
    if bad.any():
        t, b = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(_class_range_message(fn, name, o).format(value=values[t, b], t=t, b=b))


def _class_range_message(fn: str, name: str, o: int) -> str:
    return (
        f"{fn}: {name} must lie in [0, O) = [0, {o}) where mask is set; "
        "got {value} at (t, b) = ({t}, {b})"
    )
