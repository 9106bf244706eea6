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

from bptt_jax import checking, precision
from bptt_jax._engine.sharding import like_batch
from bptt_jax.cells import LSTM, PARAMS_TYPES, LSTMCarry, protocol
from bptt_jax.readout import ReadoutParams


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


def _builtin(cell) -> bool:
    return type(cell) in PARAMS_TYPES


def check_cell(fn: str, cell, where: str = "cell") -> None:
    """``cell`` meets a contract of :mod:`bptt_jax.cells.protocol` and is hashable."""
    from bptt_jax.models import is_cell, not_a_cell

    if _builtin(cell):
        return
    if not is_cell(cell):
        raise TypeError(not_a_cell(f"{fn}: {where}", cell))
    name = type(cell).__name__
    missing = protocol.missing_fast_members(cell)
    if missing:
        has = [m for m in protocol.FAST_MEMBERS if hasattr(cell, m)]
        raise TypeError(
            f"{fn}: {where} {name} has some of a FastCell's members ({', '.join(has)}) but not "
            f"{', '.join(missing)}; give it all of them (bptt_jax.cells.FastCell, the fast path) "
            "or none of them (a bptt_jax.cells.Cell: init, zero_carry, step)"
        )
    try:
        hash(cell)
    except TypeError:
        raise TypeError(
            f"{fn}: {where} {name} must be hashable (a cell is a static argument of jax.jit and "
            "of the engine's custom_vjp); make it a frozen dataclass, "
            "@dataclasses.dataclass(frozen=True), or define __hash__ and __eq__"
        ) from None


def check_model(fn: str, model, where: str = "model") -> None:
    """``model`` is a cell (:func:`check_cell`), a Bidirectional or a Stack (of cells)."""
    from bptt_jax.models import Bidirectional, Stack, is_model, not_a_cell

    if not is_model(model):
        raise TypeError(
            not_a_cell(f"{fn}: {where}", model, ", a bptt_jax.Bidirectional or a bptt_jax.Stack")
        )
    if not isinstance(model, (Stack, Bidirectional)):
        check_cell(fn, model, where)
        return
    for layer in model.layers if isinstance(model, Stack) else (model,):
        for cell in layer.cells if isinstance(layer, Bidirectional) else (layer,):
            check_cell(fn, cell, f"{where}'s cell")


def check_fast_cells(fn: str, model, what: str) -> None:
    """Every cell of ``model`` is a :class:`~bptt_jax.cells.FastCell` (``what`` needs its
    recurrent kernel (H, G*H))."""
    from bptt_jax.models import Bidirectional, Stack

    check_model(fn, model)
    for layer in model.layers if isinstance(model, Stack) else (model,):
        for cell in layer.cells if isinstance(layer, Bidirectional) else (layer,):
            if not protocol.is_fast(cell):
                raise TypeError(
                    f"{fn}: {what} are defined for cells with a recurrent kernel (H, G*H) "
                    f"(bptt_jax.cells.FastCell, as the built-in cells); {type(cell).__name__} "
                    "is a cell of another form"
                )


def _path(where: str, path) -> str:
    return where + jax.tree_util.keystr(path)


def _structure_error(fn: str, where: str, got, want, what: str) -> TypeError:
    """The TypeError for ``got`` not having the tree structure of ``want``: the paths
    missing from it and those it should not have."""
    got_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(got)]
    want_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(want)]
    missing = [where + p for p in want_paths if p not in got_paths]
    extra = [where + p for p in got_paths if p not in want_paths]
    detail = ""
    if missing:
        detail += f"; missing: {', '.join(missing)}"
    if extra:
        detail += f"; not expected: {', '.join(extra)}"
    return TypeError(
        f"{fn}: {where} must have the structure of {what}, {jax.tree.structure(want)}; got "
        f"{jax.tree.structure(got)}{detail}"
    )


def check_tree(fn: str, where: str, got, want, what: str, *, dtypes: bool = True) -> None:
    """``got`` (arrays) has ``want`` 's (ShapeDtypeStructs) structure, shapes and dtypes.

    ``what`` says where ``want`` comes from (e.g. ``IndRNN.init(key, input_size=3)``).
    Raises TypeError for the structure and dtypes, ValueError for shapes, naming the leaf.
    """
    if jax.tree.structure(got) != jax.tree.structure(want):
        raise _structure_error(fn, where, got, want, what)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        if _shape(g) != tuple(w.shape):
            raise ValueError(
                f"{fn}: {_path(where, path)} must have shape {tuple(w.shape)}, as {what} "
                f"returns; got {_shape(g)}"
            )
        if dtypes and _dtype(g) != w.dtype:
            raise TypeError(
                f"{fn}: {_path(where, path)} must have dtype {w.dtype}, as {what} returns; "
                f"got {_dtype(g)}"
            )


def _noted(e: BaseException, note: str) -> BaseException:
    e.add_note(note)
    return e


def check_cell_params(fn: str, cell, params, d: int, where: str = "params", source: str = ""):
    """Params of a cell that is not built in, against ``cell.init(key, d, dtype)``'s.

    The dtype is the first leaf's; every leaf must be floating. ``source`` says where ``d``
    comes from (e.g. ``" for xs (T, B, 3)"``). Returns the params' dtype (``None`` for a
    cell without params).
    """
    name = type(cell).__name__
    leaves = jax.tree_util.tree_leaves_with_path(params)
    for path, leaf in leaves:
        if not jnp.issubdtype(_dtype(leaf), jnp.floating):
            raise TypeError(
                f"{fn}: {_path(where, path)} must be floating point (every leaf of a cell's "
                f"params); got dtype {_dtype(leaf)}"
            )
    dtype = _dtype(leaves[0][1]) if leaves else jnp.dtype(jnp.float32)
    what = f"{name}.init(key, input_size={d}, dtype={dtype.name}){source}"
    try:
        want = jax.eval_shape(lambda k: cell.init(k, d, dtype), jax.random.key(0))
    except Exception as e:
        raise _noted(e, f"{fn}: raised by {what}, called to check {where}") from None
    check_tree(fn, where, params, want, what)
    if protocol.is_fast(cell):  # the layout the fast path reads
        h, g = cell.hidden_size, cell.n_blocks * cell.hidden_size
        for part, want_shape in (
            ("input_kernel", (d, g)),
            ("recurrent_kernel", (h, g)),
            ("input_bias", (g,)),
        ):
            got = _shape(getattr(cell, part)(params))
            if got != want_shape:
                raise ValueError(
                    f"{fn}: {name}.{part}({where}) must have shape {want_shape} (n_blocks="
                    f"{cell.n_blocks}, hidden_size={h}, D={d}); got {got}"
                )
    return dtype if leaves else None


def check_truncate(fn: str, truncate) -> None:
    if truncate is None:
        return
    if isinstance(truncate, bool) or not isinstance(truncate, (int, np.integer)):
        raise TypeError(f"{fn}: truncate must be None or a positive int; got {truncate!r}")
    if truncate <= 0:
        raise ValueError(f"{fn}: truncate must be a positive int (k >= 1); got {truncate}")


def check_params(fn: str, cell, params, where: str = "params", d: int | None = None):
    """Check ``params`` against ``cell``; return (input size D, dtype).

    A built-in cell's params are read field by field; any other cell's are compared with
    what its ``init`` returns for inputs of size ``d`` (a FastCell's D is read off its input
    kernel when ``d`` is None).
    """
    if not _builtin(cell):
        if d is None:
            if not protocol.is_fast(cell):
                raise TypeError(f"{fn}: the input size of {type(cell).__name__} is unknown")
            d = _shape(cell.input_kernel(params))[0]
        return d, check_cell_params(fn, cell, params, d, where)
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


def check_xs(fn: str, xs, params_name: str, d: int | None, dtype) -> tuple[int, int]:
    """Check ``xs`` (T, B, D); return (T, B). ``d=None``: any D (a cell whose params are
    then checked against ``init`` for this D)."""
    shape = _shape(xs)
    if len(shape) != 3:
        with_d = "" if d is None else f" with D={d}"
        raise ValueError(
            f"{fn}: xs must have shape (T, B, D), time-major,{with_d}; got {shape} "
            f"(rank {len(shape)}). For one sequence use xs[:, None, :]."
        )
    if d is None:
        d = shape[2]
    dt = _dtype(xs)
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


def check_cell_carry(fn: str, cell, carry, batch: int, dtype, where: str = "carry0"):
    """A carry of a cell that is not built in, against ``cell.zero_carry(B, dtype)``'s (which
    must have floating leaves ``(B, ...)`` of ``dtype``); ``None`` becomes that carry."""
    name = type(cell).__name__
    what = f"{name}.zero_carry({batch}, dtype={jnp.dtype(dtype).name})"
    try:
        want = jax.eval_shape(lambda: cell.zero_carry(batch, dtype))
    except Exception as e:
        raise _noted(e, f"{fn}: raised by {what}, called to check {where}") from None
    leaves = jax.tree_util.tree_leaves_with_path(want)
    if not leaves:
        raise TypeError(f"{fn}: {what} returned a carry with no arrays; a carry holds the state")
    for path, w in leaves:
        if len(w.shape) < 1 or w.shape[0] != batch:
            raise ValueError(
                f"{fn}: {what} must return arrays with the batch axis first, (B, ...) with "
                f"B={batch}; its leaf carry{jax.tree_util.keystr(path)} has shape {w.shape}"
            )
        if w.dtype != jnp.dtype(dtype):
            raise TypeError(
                f"{fn}: {what} must return arrays of dtype {jnp.dtype(dtype).name}; its leaf "
                f"carry{jax.tree_util.keystr(path)} has dtype {w.dtype}"
            )
    if carry is None:
        return cell.zero_carry(batch, dtype)
    carry = jax.tree.map(lambda c: as_array(fn, where, c), carry)
    check_tree(fn, where, carry, want, what)
    return carry


def check_cell_step(fn: str, cell, params, carry, d: int, dtype, compute_dtype=None) -> None:
    """One ``step`` of a cell that is not built in, traced for shapes only
    (``jax.eval_shape``): the new carry must keep the carry's structure, shapes and dtypes;
    the hidden state must be ``(B, H)`` and pick out part of the carry (linear in it)."""
    name = type(cell).__name__
    batch = jax.tree.leaves(carry)[0].shape[0]
    cdt = jnp.dtype(dtype if compute_dtype is None else compute_dtype)
    x = jax.ShapeDtypeStruct((batch, d), jnp.dtype(dtype))  # x_t in the carry's dtype
    args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(_shape(a), _dtype(a)), (params, carry))
    policy = "" if compute_dtype is None else f" under compute_dtype={cdt.name}"
    try:
        out = jax.eval_shape(
            lambda p, c, x_t: cell.step(precision.compute_params(p, compute_dtype), c, x_t),
            *args,
            x,
        )
    except Exception as e:
        raise _noted(
            e,
            f"{fn}: raised by {name}.step(params, carry, x_t) with x_t {(batch, d)} "
            f"{jnp.dtype(dtype).name}{policy}",
        ) from None
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(
            f"{fn}: {name}.step(params, carry, x_t) must return the pair (carry, h_t); got "
            f"{type(out).__name__}" + (f" of {len(out)}" if isinstance(out, tuple) else "")
        )
    (got, h), want = out, args[1]
    if jax.tree.structure(got) != jax.tree.structure(want):
        err = _structure_error(fn, f"the carry {name}.step returns", got, want, "its carry")
        raise TypeError(f"{err}. A carry keeps its structure from step to step.")
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        leaf = f"carry{jax.tree_util.keystr(path)}"
        if g.shape != w.shape:
            raise ValueError(
                f"{fn}: {name}.step changes the shape of {leaf} from {w.shape} to {g.shape}; "
                "a carry keeps its shapes from step to step"
            )
        if g.dtype != w.dtype:
            hint = ""
            if compute_dtype is not None:
                hint = (
                    f" (under a precision policy the step gets its kernels in {cdt.name} and "
                    f"the carry and x_t in {w.dtype}: bptt_jax.cells.matmul(a, kernel) "
                    "keeps a's dtype)"
                )
            raise TypeError(
                f"{fn}: {name}.step changes the dtype of {leaf} from {w.dtype} to {g.dtype}"
                f"{policy}; a carry keeps its dtype from step to step{hint}"
            )
    try:
        hid = jax.eval_shape(lambda c: protocol.hidden(cell, c), want)
    except TypeError as e:
        raise TypeError(f"{fn}: {e}") from None
    if not hasattr(hid, "shape") or len(hid.shape) != 2 or hid.shape[0] != batch:
        raise ValueError(
            f"{fn}: the hidden state of {name} (hidden(carry)) must be one array (B, H) with "
            f"B={batch}; got {getattr(hid, 'shape', type(hid).__name__)}"
        )
    if hasattr(h, "shape") and tuple(h.shape) != tuple(hid.shape):
        raise ValueError(
            f"{fn}: {name}.step returns h_t of shape {tuple(h.shape)} but hidden(carry) has "
            f"shape {tuple(hid.shape)}; the engine's outputs are hidden(carry_t), so h_t must "
            f"be that (give {name} a method hidden(carry) that picks h_t out of the carry)"
        )
    try:
        jax.eval_shape(lambda c, dh: protocol.add_to_hidden(cell, c, dh), want, hid)
    except Exception as e:
        raise TypeError(
            f"{fn}: {name}.hidden(carry) must pick out part of the carry (a linear function of "
            f"it, e.g. carry['h']): the engine applies its transpose to put the error on the "
            f"carry, and it has none ({type(e).__name__}: {e}). Keep what you compute from "
            "the state in the carry itself."
        ) from None
    if protocol.has_step_backward(cell):
        _check_step_backward(fn, cell, args, x, compute_dtype, policy)


def _check_step_backward(fn: str, cell, args, x, compute_dtype, policy: str) -> None:
    """A :class:`~bptt_jax.cells.ManualCell`'s ``step_backward(params, carry, x_t, new,
    dnew)``, traced for shapes only: ``(dparams, dcarry, dx)`` shaped like the params, the
    carry and ``x_t`` (a wrong shape could broadcast into a wrong sum over time, silently)."""
    name = type(cell).__name__
    params, carry = args
    try:
        out = jax.eval_shape(
            lambda p, c, x_t, new, dnew: cell.step_backward(
                precision.compute_params(p, compute_dtype), c, x_t, new, dnew
            ),
            params, carry, x, carry, carry,
        )  # fmt: skip
    except Exception as e:
        raise _noted(
            e, f"{fn}: raised by {name}.step_backward(params, carry, x_t, new, dnew){policy}"
        ) from None
    call = f"{name}.step_backward(params, carry, x_t, new, dnew)"
    if not (isinstance(out, tuple) and len(out) == 3):
        raise TypeError(
            f"{fn}: {call} must return the triple (dparams, dcarry, dx); got "
            f"{type(out).__name__}" + (f" of {len(out)}" if isinstance(out, tuple) else "")
        )
    named = (("dparams", "params", out[0], params), ("dcarry", "carry", out[1], carry),
             ("dx", "x_t", out[2], x))  # fmt: skip
    for what, var, got, like in named:
        if jax.tree.structure(got) != jax.tree.structure(like):
            raise _structure_error(f"{fn}: {call}", what, got, like, var)
        for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(like)):
            leaf = f"{what}{jax.tree_util.keystr(path)}"
            if tuple(g.shape) != tuple(w.shape):
                raise ValueError(
                    f"{fn}: {call} returns {leaf} of shape {tuple(g.shape)}; it must have the "
                    f"shape of {var}{jax.tree_util.keystr(path)}, {tuple(w.shape)} (a "
                    "gradient has its variable's shape)"
                )
            if not jnp.issubdtype(g.dtype, jnp.floating):
                raise TypeError(
                    f"{fn}: {call} returns {leaf} of dtype {g.dtype}; it must be floating"
                )


def check_carry(fn: str, cell, carry, batch: int, dtype, where: str = "carry0"):
    """Check (and normalise) an initial carry; ``None`` becomes the zero carry."""
    if not _builtin(cell):
        return check_cell_carry(fn, cell, carry, batch, dtype, where)
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


def check_readout(fn: str, readout, h: int, dtype) -> int:
    """Check ReadoutParams(w_hy (H, O), b_y (O,)); return O."""
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
    if kind is int and isinstance(value, np.integer):
        value = int(value)  # a NumPy integer: its Python value (callers use what is returned)
    ok_types = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_types) or not value > 0:
        what = "a positive int" if kind is int else "a positive number"
        raise ValueError(
            f"{fn}: {name} must be {what}{' or None' if allow_none else ''}; got {value!r}"
        )
    return value


def _params_dtype(params):
    leaves = jax.tree.leaves(params)
    return _dtype(leaves[0]) if leaves else None


def check_unroll_args(fn: str, cell, params, xs, carry0, mask, truncate):
    """The shared checks of :func:`unroll` and :func:`sequence_loss`, for a cell."""
    check_cell(fn, cell)
    check_truncate(fn, truncate)
    if not _builtin(cell):
        xs = as_array(fn, "xs", xs)
        pdt = _params_dtype(params)
        t, b = check_xs(fn, xs, "the params", None, _dtype(xs) if pdt is None else pdt)
        d = xs.shape[2]
        dtype = check_cell_params(fn, cell, params, d, source=f" for xs {_shape(xs)}") or xs.dtype
        carry0 = check_cell_carry(fn, cell, carry0, b, dtype)
        check_cell_step(fn, cell, params, carry0, d, dtype)
        mask = check_mask(fn, mask, t, b)
        return padding_zeroed(xs, mask), carry0, mask, dtype
    d, dtype = check_params(fn, cell, params)
    xs = as_array(fn, "xs", xs)
    pname = f"params.{type(params)._fields[0]} {_shape(params[0])}"
    t, b = check_xs(fn, xs, pname, d, dtype)
    carry0 = check_carry(fn, cell, carry0, b, dtype)
    mask = check_mask(fn, mask, t, b)
    return padding_zeroed(xs, mask), carry0, mask, dtype


def check_tuple(fn: str, what: str, value, n: int, of: str) -> tuple:
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
        _check_steps(fn, model, params, carry0, xs.shape[2], dtype, cdt)
        xs = xs.astype(cdt)
    return xs, carry0, mask, resets, dtype


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


def _cells_with_inputs(model, params, carry0, d: int):
    """``(cell, params, carry, input size)`` of every cell of ``model``, layer by layer."""
    from bptt_jax.models import Bidirectional, Stack, output_size

    stack = isinstance(model, Stack)
    layers = model.layers if stack else (model,)
    ps, cs = (params, carry0) if stack else ((params,), (carry0,))
    for layer, p, c in zip(layers, ps, cs):
        if isinstance(layer, Bidirectional):
            yield from ((cell, q, cc, d) for cell, q, cc in zip(layer.cells, p, c))
        else:
            yield layer, p, c, d
        d = output_size(layer)


def _check_steps(fn: str, model, params, carry0, d: int, dtype, compute_dtype) -> None:
    """:func:`check_cell_step` for every cell of ``model`` that is not built in."""
    for cell, p, c, d_in in _cells_with_inputs(model, params, carry0, d):
        if not _builtin(cell):
            check_cell_step(fn, cell, p, c, d_in, dtype, compute_dtype)


def _check_model_args(fn: str, model, params, xs, carry0, mask, truncate, resets):
    from bptt_jax.models import Bidirectional, Stack, is_bidirectional, output_size

    check_model(fn, model)
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
        check_tuple(fn, "params", params, len(layers), "one params entry per layer")
        if stack
        else (params,)
    )
    dtype = None
    d_in = None  # the input size layer k expects: layer k-1's output size
    d_model = None
    xs = as_array(fn, "xs", xs)
    first_cell = layers[0].forward if isinstance(layers[0], Bidirectional) else layers[0]
    if not _builtin(first_cell):  # its params are checked against init for xs's D
        if len(_shape(xs)) != 3:
            check_xs(fn, xs, "", None, _dtype(xs))  # raises
        d_model = _shape(xs)[2]
    for k, (layer, p) in enumerate(zip(layers, ps)):
        where = f"params[{k}]" if stack else "params"
        if isinstance(layer, Bidirectional):
            pair = check_tuple(fn, where, p, 2, "the (forward, backward) params")
            dirs = [(c, q, f"{where}[{d}]") for d, (c, q) in enumerate(zip(layer.cells, pair))]
        else:
            dirs = [(layer, p, where)]
        for cell, q, name in dirs:
            if _builtin(cell):
                d, dt = check_params(fn, cell, q, name)
            else:
                d = d_model if d_in is None else d_in
                source = (
                    f" for layer {k - 1}'s output size" if k and d_in is not None else " for xs"
                )
                dt = check_cell_params(fn, cell, q, d, name, source)
                if dt is None:  # a cell without params
                    continue
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
        d_in = output_size(layer)
    if dtype is None:  # no cell has params
        dtype = _dtype(xs)
    first = ps[0][0] if isinstance(layers[0], Bidirectional) else ps[0]
    pname = ("params[0]" if stack else "params") + (
        "[0]" if isinstance(layers[0], Bidirectional) else ""
    )
    if _builtin(first_cell):
        pname = f"{pname}.{type(first)._fields[0]} {_shape(first[0])}"
    t, b = check_xs(fn, xs, pname, d_model, dtype)
    if carry0 is None:  # each cell's zero_carry (checked)
        cs = tuple((None, None) if isinstance(layer, Bidirectional) else None for layer in layers)
    elif stack:
        cs = check_tuple(fn, "carry0", carry0, len(layers), "one carry per layer")
    else:
        cs = (carry0,)
    out = []
    for k, (layer, c) in enumerate(zip(layers, cs)):
        where = f"carry0[{k}]" if stack else "carry0"
        if isinstance(layer, Bidirectional):
            pair = check_tuple(fn, where, c, 2, "the (forward, backward) carries")
            out.append(tuple(
                check_carry(fn, cell, cc, b, dtype, f"{where}[{d}]")
                for d, (cell, cc) in enumerate(zip(layer.cells, pair))
            ))  # fmt: skip
        else:
            out.append(check_carry(fn, layer, c, b, dtype, where))
    carry0 = tuple(out) if stack else out[0]
    _check_steps(fn, model, params, carry0, d_model, dtype, None)
    mask = check_mask(fn, mask, t, b)
    if is_bidirectional(model):
        check_right_padded(fn, mask)
    resets = check_mask(fn, resets, t, b, name="resets")
    return padding_zeroed(xs, mask), carry0, mask, resets, dtype


def check_right_padded(fn: str, mask) -> None:
    """A bidirectional model's mask (bool, (T, B)) has each sequence's valid steps first.

    Its reverse direction reads each sequence's first ``sum_t mask[t, b]`` steps backwards,
    so a left-padded batch, or a gap, would be read wrongly, silently. Checked when the mask
    is concrete, and under ``jit`` in checked mode (:mod:`bptt_jax.checking`).
    """
    message = (
        f"{fn}: a bidirectional model needs right-padded sequences (the mask's valid "
        "steps first, then padding); mask[:, {b}] has a padded step at t={t} and a valid "
        "one at the step after it. Move each sequence's steps to the front (left-padded "
        "batches are read wrongly by the reverse direction)."
    )
    if checking.traced(mask):
        if mask.shape[0] > 1:
            checking.check_all(~(mask[1:] & ~mask[:-1]), message)
        return
    m = concrete(mask)
    if m is None:
        return
    bad = m[1:] & ~m[:-1]  # a valid step right after a padded one
    if bad.any():
        t, b = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(message.format(t=t, b=b))
