"""The checks of one cell: its contract, its params, its carry and its step.

Each check takes any cell and differs only in what a built-in cell and a cell of your own
need: a built-in cell's params are its NamedTuple, read field by field, its carry its
``(B, H)`` array or ``LSTMCarry`` and its step the library's own; any other cell's params
and carry are compared with what its ``init`` and ``zero_carry`` return (traced for shapes
only, ``jax.eval_shape``) and one ``step`` (and ``step_backward``) is traced the same way.

Part of :mod:`bptt_jax.validation`, which walks a model's cells and applies these to each.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bptt_jax import precision
from bptt_jax._validation_arrays import as_array, dtype_of, shape_of
from bptt_jax.cells import LSTM, PARAMS_TYPES, LSTMCarry, protocol
from bptt_jax.models import is_cell, not_a_cell


def is_builtin(cell) -> bool:
    """Whether ``cell`` is a built-in cell (``Elman``, ``LSTM``, ``GRU``)."""
    return type(cell) in PARAMS_TYPES


def check_cell(fn: str, cell, where: str = "cell") -> None:
    """``cell`` meets a contract of :mod:`bptt_jax.cells.protocol` and is hashable."""
    if is_builtin(cell):
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
    if protocol.is_linear(cell):
        protocol.check_scan(f"{fn}: {where} {name}", getattr(cell, "scan", "auto"))
    try:
        hash(cell)
    except TypeError:
        raise TypeError(
            f"{fn}: {where} {name} must be hashable (a cell is a static argument of jax.jit and "
            "of the engine's custom_vjp); make it a frozen dataclass, "
            "@dataclasses.dataclass(frozen=True), or define __hash__ and __eq__"
        ) from None


# --------------------------------------------------------------------- pytrees, traced
def _path(where: str, path) -> str:
    return where + jax.tree_util.keystr(path)


def _noted(e: BaseException, note: str) -> BaseException:
    e.add_note(note)
    return e


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
        if shape_of(g) != tuple(w.shape):
            raise ValueError(
                f"{fn}: {_path(where, path)} must have shape {tuple(w.shape)}, as {what} "
                f"returns; got {shape_of(g)}"
            )
        if dtypes and dtype_of(g) != w.dtype:
            raise TypeError(
                f"{fn}: {_path(where, path)} must have dtype {w.dtype}, as {what} returns; "
                f"got {dtype_of(g)}"
            )


# ------------------------------------------------------------------------------ params
def check_params(
    fn: str, cell, params, where: str = "params", d: int | None = None, source: str = ""
):
    """Check ``params`` against ``cell``; return (input size D, dtype).

    A built-in cell's params are read field by field (D off its input kernel); any other
    cell's are compared with what its ``init`` returns for inputs of size ``d`` (a FastCell's
    D is read off its input kernel when ``d`` is None), ``source`` saying where ``d`` comes
    from (e.g. ``" for xs (T, B, 3)"``); their dtype is ``None`` for a cell without params.
    """
    if is_builtin(cell):
        return _builtin_params(fn, cell, params, where)
    if d is None:
        if not protocol.is_fast(cell):
            raise TypeError(f"{fn}: the input size of {type(cell).__name__} is unknown")
        d = shape_of(cell.input_kernel(params))[0]
    return d, _params_like_init(fn, cell, params, d, where, source)


def _builtin_params(fn: str, cell, params, where: str):
    """A built-in cell's params: its NamedTuple, one floating dtype, (D, G*H) kernels."""
    ptype = PARAMS_TYPES[type(cell)]
    if not isinstance(params, ptype):
        raise TypeError(
            f"{fn}: {where} must be a bptt_jax.{ptype.__name__} (from "
            f"{type(cell).__name__}.init) for a {type(cell).__name__} cell; "
            f"got {type(params).__name__}"
        )
    h, g = cell.hidden_size, cell.n_blocks * cell.hidden_size
    dtypes = {name: dtype_of(leaf) for name, leaf in zip(ptype._fields, params)}
    first = ptype._fields[0]
    for name, dt in dtypes.items():
        if not jnp.issubdtype(dt, jnp.floating):
            raise TypeError(f"{fn}: {where}.{name} must be floating point; got dtype {dt}")
        if dt != dtypes[first]:
            raise TypeError(
                f"{fn}: all params must share one dtype; {where}.{first} is "
                f"{dtypes[first]} but {where}.{name} is {dt}"
            )
    kx = shape_of(cell.input_kernel(params))
    if len(kx) != 2 or kx[1] != g:
        raise ValueError(
            f"{fn}: {where}.{first} must have shape (D, {g}) for a {type(cell).__name__} with "
            f"hidden_size={h}; got {kx}"
        )
    for name, leaf in zip(ptype._fields[1:], params[1:]):
        want = (h, g) if leaf is cell.recurrent_kernel(params) else (g,)
        if shape_of(leaf) != want:
            raise ValueError(
                f"{fn}: {where}.{name} must have shape {want} for a {type(cell).__name__} "
                f"with hidden_size={h}; got {shape_of(leaf)}"
            )
    return kx[0], dtypes[first]


def _params_like_init(fn: str, cell, params, d: int, where: str, source: str):
    """Params of a cell that is not built in, against ``cell.init(key, d, dtype)``'s.

    The dtype is the first leaf's; every leaf must be floating. Returns the params' dtype
    (``None`` for a cell without params).
    """
    name = type(cell).__name__
    leaves = jax.tree_util.tree_leaves_with_path(params)
    for path, leaf in leaves:
        if not jnp.issubdtype(dtype_of(leaf), jnp.floating):
            raise TypeError(
                f"{fn}: {_path(where, path)} must be floating point (every leaf of a cell's "
                f"params); got dtype {dtype_of(leaf)}"
            )
    dtype = dtype_of(leaves[0][1]) if leaves else jnp.dtype(jnp.float32)
    what = f"{name}.init(key, input_size={d}, dtype={dtype.name}){source}"
    try:
        want = jax.eval_shape(lambda k: cell.init(k, d, dtype), jax.random.key(0))
    except Exception as e:
        raise _noted(e, f"{fn}: raised by {what}, called to check {where}") from None
    check_tree(fn, where, params, want, what)
    if protocol.is_fast(cell):
        _check_fast_layout(fn, cell, params, d, where)
    return dtype if leaves else None


def _check_fast_layout(fn: str, cell, params, d: int, where: str) -> None:
    """The kernels a FastCell's fast path reads: (D, G*H), (H, G*H) and (G*H,)."""
    h, g = cell.hidden_size, cell.n_blocks * cell.hidden_size
    for part, want_shape in (
        ("input_kernel", (d, g)),
        ("recurrent_kernel", (h, g)),
        ("input_bias", (g,)),
    ):
        got = shape_of(getattr(cell, part)(params))
        if got != want_shape:
            raise ValueError(
                f"{fn}: {type(cell).__name__}.{part}({where}) must have shape {want_shape} "
                f"(n_blocks={cell.n_blocks}, hidden_size={h}, D={d}); got {got}"
            )


# ------------------------------------------------------------------------------- carry
def check_carry(fn: str, cell, carry, batch: int, dtype, where: str = "carry0"):
    """Check (and normalise) an initial carry; ``None`` becomes the zero carry.

    A built-in cell's is one ``(B, H)`` array (an ``LSTMCarry(h, c)`` of two for an LSTM) of
    the params' dtype; any other cell's must have ``cell.zero_carry(B, dtype)`` 's
    structure, shapes and dtypes.
    """
    if is_builtin(cell):
        return _builtin_carry(fn, cell, carry, batch, dtype, where)
    return _carry_like_zero_carry(fn, cell, carry, batch, dtype, where)


def _builtin_carry(fn: str, cell, carry, batch: int, dtype, where: str):
    h = cell.hidden_size
    if carry is None:
        return cell.zero_carry(batch, dtype)
    if isinstance(cell, LSTM):
        if not (isinstance(carry, tuple) and len(carry) == 2):
            raise TypeError(
                f"{fn}: {where} for an LSTM must be a bptt_jax.LSTMCarry(h, c) of two (B, H) "
                f"arrays; got {type(carry).__name__}"
                + (f" with shape {shape_of(carry)}" if hasattr(carry, "shape") else "")
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
        if shape_of(c) != (batch, h):
            raise ValueError(
                f"{fn}: {name} must have shape (B, H) = ({batch}, {h}); got {shape_of(c)}"
            )
        if dtype_of(c) != dtype:
            raise TypeError(
                f"{fn}: {name} dtype {dtype_of(c)} does not match the params' dtype {dtype}"
            )
    return carry


def _carry_like_zero_carry(fn: str, cell, carry, batch: int, dtype, where: str):
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


# -------------------------------------------------------------------------------- step
class _StepCall(NamedTuple):
    """One step of a cell as its checks trace it (shapes and dtypes only)."""

    cell: Any
    params: Any  # ShapeDtypeStructs like the params
    carry: Any  # ShapeDtypeStructs like the carry
    x: jax.ShapeDtypeStruct  # x_t (B, D), in the carry's dtype
    compute_dtype: Any  # the precision policy's, or None
    policy: str  # " under compute_dtype=bfloat16" for the messages, or ""


def check_step(fn: str, cell, params, carry, d: int, dtype, compute_dtype=None) -> None:
    """One ``step`` of a cell that is not built in, traced for shapes only
    (``jax.eval_shape``): the new carry must keep the carry's structure, shapes and dtypes;
    the hidden state must be ``(B, H)`` and pick out part of the carry (linear in it). A
    :class:`~bptt_jax.cells.ManualCell`'s ``step_backward`` is traced too. A built-in cell's
    step is the library's own: nothing to check."""
    if is_builtin(cell):
        return
    batch = jax.tree.leaves(carry)[0].shape[0]
    cdt = jnp.dtype(dtype if compute_dtype is None else compute_dtype)
    x = jax.ShapeDtypeStruct((batch, d), jnp.dtype(dtype))
    args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(shape_of(a), dtype_of(a)), (params, carry))
    policy = "" if compute_dtype is None else f" under compute_dtype={cdt.name}"
    call = _StepCall(cell, *args, x, compute_dtype, policy)
    new, h = _traced_step(fn, call)
    _check_new_carry(fn, call, new)
    if protocol.has_output(cell):
        _check_output(fn, call, h)
    else:
        _check_hidden(fn, call, h)
    if protocol.has_step_backward(cell):
        _check_step_backward(fn, call, h if protocol.has_output(cell) else None)
    if protocol.is_linear(cell):
        _check_coefficients(fn, call)


def _traced_step(fn: str, call: _StepCall):
    """``(new carry, h_t)`` of ``cell.step``, traced, with the kernels in the compute dtype."""
    name = type(call.cell).__name__
    try:
        out = jax.eval_shape(
            lambda p, c, x_t: call.cell.step(
                precision.compute_params(p, call.compute_dtype), c, x_t
            ),
            call.params,
            call.carry,
            call.x,
        )
    except Exception as e:
        raise _noted(
            e,
            f"{fn}: raised by {name}.step(params, carry, x_t) with x_t {tuple(call.x.shape)} "
            f"{call.x.dtype.name}{call.policy}",
        ) from None
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(
            f"{fn}: {name}.step(params, carry, x_t) must return the pair (carry, h_t); got "
            f"{type(out).__name__}" + (f" of {len(out)}" if isinstance(out, tuple) else "")
        )
    return out


def _check_new_carry(fn: str, call: _StepCall, got) -> None:
    """The carry a step returns keeps the carry's structure, shapes and dtypes."""
    name, want = type(call.cell).__name__, call.carry
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
            if call.compute_dtype is not None:
                hint = (
                    f" (under a precision policy the step gets its kernels in "
                    f"{jnp.dtype(call.compute_dtype).name} and the carry and x_t in {w.dtype}: "
                    "bptt_jax.cells.matmul(a, kernel) keeps a's dtype)"
                )
            raise TypeError(
                f"{fn}: {name}.step changes the dtype of {leaf} from {w.dtype} to {g.dtype}"
                f"{call.policy}; a carry keeps its dtype from step to step{hint}"
            )


def _check_hidden(fn: str, call: _StepCall, h) -> None:
    """``hidden(carry)`` is one (B, H) array, ``h_t`` is it, and it is linear in the carry."""
    cell, want = call.cell, call.carry
    name, batch = type(cell).__name__, call.x.shape[0]
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


def _check_output(fn: str, call: _StepCall, y) -> None:
    """The output ``y_t`` of a cell whose outputs are not its carry: one floating array
    ``(B, F)``, F the cell's output size."""
    cell, batch = call.cell, call.x.shape[0]
    name = type(cell).__name__
    try:
        size = protocol.output_size(cell)
    except TypeError as e:
        raise TypeError(f"{fn}: {e}") from None
    shape = getattr(y, "shape", None)
    if shape is None or tuple(shape) != (batch, size):
        raise ValueError(
            f"{fn}: {name}.step returns the output y_t of shape {shape}; its outputs are not "
            f"its carry (it has no hidden method and y_t is not the new carry), so y_t must be "
            f"one array (B, F) = {(batch, size)}"
        )
    if not jnp.issubdtype(y.dtype, jnp.floating):
        raise TypeError(f"{fn}: {name}.step returns y_t of dtype {y.dtype}; it must be floating")


def _check_step_backward(fn: str, call: _StepCall, y=None) -> None:
    """A :class:`~bptt_jax.cells.ManualCell`'s ``step_backward(params, carry, x_t, new,
    dnew)``, traced for shapes only: ``(dparams, dcarry, dx)`` shaped like the params, the
    carry and ``x_t`` (a wrong shape could broadcast into a wrong sum over time, silently).
    ``y``: the step's output where it is not the carry (``new`` and ``dnew`` are then the
    pairs ``(carry, y)``)."""
    cell, params, carry, x = call.cell, call.params, call.carry, call.x
    call_name = f"{type(cell).__name__}.step_backward(params, carry, x_t, new, dnew)"
    new = carry if y is None else (carry, y)
    try:
        out = jax.eval_shape(
            lambda p, c, x_t, new, dnew: cell.step_backward(
                precision.compute_params(p, call.compute_dtype), c, x_t, new, dnew
            ),
            params, carry, x, new, new,
        )  # fmt: skip
    except Exception as e:
        raise _noted(e, f"{fn}: raised by {call_name}{call.policy}") from None
    if not (isinstance(out, tuple) and len(out) == 3):
        raise TypeError(
            f"{fn}: {call_name} must return the triple (dparams, dcarry, dx); got "
            f"{type(out).__name__}" + (f" of {len(out)}" if isinstance(out, tuple) else "")
        )
    named = (("dparams", "params", out[0], params), ("dcarry", "carry", out[1], carry),
             ("dx", "x_t", out[2], x))  # fmt: skip
    for what, var, got, like in named:
        if jax.tree.structure(got) != jax.tree.structure(like):
            raise _structure_error(f"{fn}: {call_name}", what, got, like, var)
        for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(like)):
            leaf = f"{what}{jax.tree_util.keystr(path)}"
            if tuple(g.shape) != tuple(w.shape):
                raise ValueError(
                    f"{fn}: {call_name} returns {leaf} of shape {tuple(g.shape)}; it must have "
                    f"the shape of {var}{jax.tree_util.keystr(path)}, {tuple(w.shape)} (a "
                    "gradient has its variable's shape)"
                )
            if not jnp.issubdtype(g.dtype, jnp.floating):
                raise TypeError(
                    f"{fn}: {call_name} returns {leaf} of dtype {g.dtype}; it must be floating"
                )


def _check_coefficients(fn: str, call: _StepCall) -> None:
    """A :class:`~bptt_jax.cells.LinearCell`'s ``coefficients`` over two steps, traced: ``a``
    and ``b`` floating, shaped like the carry with a leading T axis (the carry one array),
    the residuals' leaves with leading axes (T, B)."""
    cell, carry = call.cell, call.carry
    name = type(cell).__name__
    if not hasattr(carry, "shape"):
        raise TypeError(
            f"{fn}: {name} is a linear cell (it has coefficients): its carry must be one array "
            f"(B, N), the state h_t = a_t * h_{{t-1}} + b_t; got a {type(carry).__name__}"
        )
    xs = jax.ShapeDtypeStruct((2, *call.x.shape), call.x.dtype)
    call_name = f"{name}.coefficients(params, xs) with xs {tuple(xs.shape)} {xs.dtype.name}"
    try:
        out = jax.eval_shape(
            lambda p, x: cell.coefficients(precision.compute_params(p, call.compute_dtype), x),
            call.params, xs,
        )  # fmt: skip
    except Exception as e:
        raise _noted(e, f"{fn}: raised by {call_name}{call.policy}") from None
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], tuple)
            and len(out[0]) == 2):  # fmt: skip
        raise TypeError(f"{fn}: {call_name} must return ((a, b), residuals)")
    want = (2, *carry.shape)
    a = out[0][0]
    complex_ = hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.complexfloating)
    if complex_:  # a complex state of N units, carried as its real and imaginary parts
        want = (2, *carry.shape[:-1], carry.shape[-1] // 2)
    kind = "complex" if complex_ else "floating"
    for what, c in zip("ab", out[0]):
        if not hasattr(c, "shape") or tuple(c.shape) != want or carry.shape[-1] % 2 and complex_:
            how = (
                "(T, B, N) for a complex state carried as (B, 2N), its real and imaginary parts"
                if complex_ else "(T, *carry.shape)"
            )  # fmt: skip
            raise ValueError(
                f"{fn}: {call_name} returns {what} of shape {getattr(c, 'shape', None)}; it must "
                f"be {how} = {want} (carry {tuple(carry.shape)})"
            )
        ok = jnp.complexfloating if complex_ else jnp.floating
        if not jnp.issubdtype(c.dtype, ok):
            raise TypeError(
                f"{fn}: {call_name} returns {what} of dtype {c.dtype}; a and b must both be "
                f"{kind} (as a is)"
            )
    for path, r in jax.tree_util.tree_leaves_with_path(out[1]):
        if tuple(r.shape[:2]) != want[:2]:
            raise ValueError(
                f"{fn}: {call_name} returns residuals{jax.tree_util.keystr(path)} of shape "
                f"{tuple(r.shape)}; every residual is per step, with leading axes (T, B) = "
                f"{want[:2]}"
            )
    if protocol.has_coefficients_backward(cell):
        _check_coefficients_backward(fn, call, xs, out)
    if protocol.has_output(cell):
        _check_output_map(fn, call, xs)


def _check_gradient_like(fn: str, call_name: str, named) -> None:
    """Gradients ``(what, var, got, like)`` with their variables' structures and shapes."""
    for what, var, got, like in named:
        if jax.tree.structure(got) != jax.tree.structure(like):
            raise _structure_error(f"{fn}: {call_name}", what, got, like, var)
        for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(like)):
            if tuple(g.shape) != tuple(w.shape) or not jnp.issubdtype(g.dtype, jnp.floating):
                raise ValueError(
                    f"{fn}: {call_name} returns {what}{jax.tree_util.keystr(path)} of shape "
                    f"{tuple(g.shape)} {g.dtype}; it must be floating of the shape of "
                    f"{var}{jax.tree_util.keystr(path)}, {tuple(w.shape)} (a gradient has its "
                    "variable's shape)"
                )


def _check_coefficients_backward(fn: str, call: _StepCall, xs, out) -> None:
    """A linear cell's ``coefficients_backward``, traced: ``(dparams, dxs)`` shaped like the
    params and ``xs`` (a wrong shape could broadcast into a wrong sum, silently)."""
    cell = call.cell
    call_name = f"{type(cell).__name__}.coefficients_backward(params, xs, a, residuals, da, db)"
    (a, b), res = out
    try:
        got = jax.eval_shape(
            lambda p, x, a_, r, da, db: cell.coefficients_backward(
                precision.compute_params(p, call.compute_dtype), x, a_, r, da, db
            ),
            call.params, xs, a, res, a, b,
        )  # fmt: skip
    except Exception as e:
        raise _noted(e, f"{fn}: raised by {call_name}{call.policy}") from None
    if not (isinstance(got, tuple) and len(got) == 2):
        raise TypeError(f"{fn}: {call_name} must return the pair (dparams, dxs)")
    _check_gradient_like(
        fn, call_name, (("dparams", "params", got[0], call.params), ("dxs", "xs", got[1], xs))
    )


def _check_output_map(fn: str, call: _StepCall, xs) -> None:
    """A linear cell's ``output(params, hs, xs)`` (T, B, F), and its ``output_backward``."""
    cell, carry = call.cell, call.carry
    name = type(cell).__name__
    hs = jax.ShapeDtypeStruct((2, *carry.shape), carry.dtype)
    call_name = f"{name}.output(params, hs, xs)"
    cparams = lambda p: precision.compute_params(p, call.compute_dtype)  # noqa: E731
    try:
        ys = jax.eval_shape(lambda p, h, x: cell.output(cparams(p), h, x), call.params, hs, xs)
        size = protocol.output_size(cell)
    except Exception as e:
        raise _noted(e, f"{fn}: raised by {call_name}{call.policy}") from None
    want = (*xs.shape[:2], size)
    if tuple(getattr(ys, "shape", ())) != want or not jnp.issubdtype(ys.dtype, jnp.floating):
        raise ValueError(
            f"{fn}: {call_name} returns {getattr(ys, 'shape', type(ys).__name__)}; it must "
            f"return one floating array (T, B, F) = {want}"
        )
    if not callable(getattr(cell, "output_backward", None)):
        return
    call_name = f"{name}.output_backward(params, hs, xs, dys)"
    try:
        got = jax.eval_shape(
            lambda p, h, x, dy: cell.output_backward(cparams(p), h, x, dy),
            call.params, hs, xs, ys,
        )  # fmt: skip
    except Exception as e:
        raise _noted(e, f"{fn}: raised by {call_name}{call.policy}") from None
    if not (isinstance(got, tuple) and len(got) == 3):
        raise TypeError(f"{fn}: {call_name} must return the triple (dparams, dhs, dxs)")
    named = (("dparams", "params", got[0], call.params), ("dhs", "hs", got[1], hs),
             ("dxs", "xs", got[2], xs))  # fmt: skip
    _check_gradient_like(fn, call_name, named)
