"""PyTorch ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` weights to and from bptt_jax params.

Numpy only: this module never imports torch. A state dict's values are read with
``np.asarray`` (a CPU tensor from ``module.state_dict()``; a tensor that needs it is
``detach()`` -ed and moved to the CPU first), and :func:`params_to_torch` returns numpy arrays
that ``module.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})`` accepts.

The model decides the PyTorch module it stands for:

============================================  ===============================================
bptt_jax model                                PyTorch module
============================================  ===============================================
``Elman(H, "tanh")`` / ``Elman(H, "relu")``   ``nn.RNN(D, H, nonlinearity="tanh" / "relu")``
``LSTM(H)``                                   ``nn.LSTM(D, H)``
``GRU(H)``                                    ``nn.GRU(D, H)``
``Bidirectional(cell)``                       ``bidirectional=True``
``stacked(cell, L, bidirectional=b)``         ``num_layers=L, bidirectional=b``
============================================  ===============================================

Layer k, direction d (``params[k][d]``, see :mod:`bptt_jax.models`) is PyTorch's
``*_l{k}`` (d = 0) or ``*_l{k}_reverse`` (d = 1). Per cell, kernels are transposed
(PyTorch stores ``(G*H, in)``, bptt_jax ``(in, G*H)``; both keep the gate order, i f g o
for the LSTM, r z n for the GRU)::

    weight_ih = w_x.T        weight_hh = w_h.T        (Elman: w_xh.T, w_hh.T)

Biases: the GRU keeps PyTorch's two (``bias_ih = b_x``, ``bias_hh = b_h``; ``b_hn`` sits
inside the reset gate's product, so they cannot be folded). The Elman cell and the LSTM fold
them into one, ``b = bias_ih + bias_hh``; :func:`params_to_torch` splits it back as
``bias_ih = b`` and ``bias_hh = 0``, except that an ``LSTM(forget_bias=f)`` exports
``bias_hh = f`` on the forget-gate block (PyTorch has no forget bias; this puts it where the
torch module adds it), and :func:`params_from_torch` computes
``b = bias_ih + (bias_hh - f on the f block)``. Hence:

* ``params -> torch -> params`` is exact, bit for bit, for every cell;
* ``torch -> params -> torch`` is exact for the GRU and for every weight matrix; for Elman
  and LSTM biases it is exact up to the folding: the sum ``bias_ih + bias_hh`` is kept up to
  one rounding, with all of it moved into ``bias_ih``.

Example:
  >>> import jax, numpy as np, bptt_jax
  >>> from bptt_jax.interop import params_from_torch, params_to_torch
  >>> model = bptt_jax.stacked(bptt_jax.LSTM(8), num_layers=2, bidirectional=True)
  >>> params = model.init(jax.random.key(0), input_size=3)
  >>> sd = params_to_torch(model, params)  # what nn.LSTM(3, 8, 2, bidirectional=True) loads
  >>> for name, value in list(sd.items())[:5]:
  ...     print(name, value.shape)
  weight_ih_l0 (32, 3)
  weight_hh_l0 (32, 8)
  bias_ih_l0 (32,)
  bias_hh_l0 (32,)
  weight_ih_l0_reverse (32, 3)
  >>> back = params_from_torch(model, sd)
  >>> all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)))
  True
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bptt_jax.cells import GRU, LSTM, PARAMS_TYPES, Elman, ElmanParams, GRUParams, LSTMParams
from bptt_jax.models import Bidirectional, Stack, cell_name

__all__ = ["params_from_torch", "params_to_torch", "torch_module_spec"]

#: The PyTorch module of each built-in cell, by its name (:data:`bptt_jax.models.CELLS`);
#: its kernels are ``(G*H, in)`` with G the cell's ``n_blocks``.
_TORCH = {"elman": "nn.RNN", "lstm": "nn.LSTM", "gru": "nn.GRU"}
_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
#: Elman activations PyTorch's nn.RNN has (its ``nonlinearity``).
_NONLINEARITIES = ("tanh", "relu")


# ------------------------------------------------------------------------------ layout
def _layers(fn: str, model) -> tuple[list[tuple], bool]:
    """``(cells, bidirectional)``: ``cells[k]`` the cells of layer k, one per direction.

    Raises unless the model is one PyTorch module: every cell of one type and hidden size
    (and, for Elman, one of PyTorch's nonlinearities), every layer bidirectional or none,
    bidirectional outputs concatenated.
    """
    if isinstance(model, Stack):
        layers = model.layers
    elif isinstance(model, Bidirectional) or cell_name(model):
        layers = (model,)
    else:
        raise TypeError(
            f"{fn}: model must be a bptt_jax cell (Elman, LSTM, GRU), a Bidirectional or a "
            f"Stack of them; got {type(model).__name__}"
        )
    cells = []
    for k, layer in enumerate(layers):
        if isinstance(layer, Bidirectional):
            if layer.merge != "concat":
                raise ValueError(
                    f"{fn}: layer {k} merges its directions with {layer.merge!r}; PyTorch's "
                    "bidirectional modules concatenate them (use merge='concat')"
                )
            cells.append(layer.cells)
        else:
            cells.append((layer,))
    first = cells[0][0]
    bidirectional = len(cells[0]) == 2
    if cell_name(first) not in _TORCH:
        raise TypeError(
            f"{fn}: cells must be bptt_jax.Elman, LSTM or GRU to map to PyTorch; "
            f"got {type(first).__name__}"
        )
    for k, layer in enumerate(cells):
        if (len(layer) == 2) != bidirectional:
            raise ValueError(
                f"{fn}: layer {k} is {'' if len(layer) == 2 else 'not '}bidirectional but layer "
                f"0 is {'' if bidirectional else 'not '}; a PyTorch module's layers are all "
                "bidirectional or none"
            )
        for d, cell in enumerate(layer):
            if type(cell) is not type(first) or cell.hidden_size != first.hidden_size:
                raise ValueError(
                    f"{fn}: layer {k} direction {d} is {type(cell).__name__}"
                    f"(hidden_size={cell.hidden_size}) but layer 0 is {type(first).__name__}"
                    f"(hidden_size={first.hidden_size}); a PyTorch module has one cell type "
                    "and one hidden size"
                )
            if isinstance(cell, Elman):
                if cell.activation not in _NONLINEARITIES:
                    raise ValueError(
                        f"{fn}: Elman activation {cell.activation!r} has no PyTorch nn.RNN "
                        f"equivalent (nonlinearity is one of {_NONLINEARITIES})"
                    )
                if cell.activation != first.activation:
                    raise ValueError(
                        f"{fn}: layer {k} direction {d} has activation {cell.activation!r} but "
                        f"layer 0 has {first.activation!r}; nn.RNN has one nonlinearity"
                    )
    return cells, bidirectional


def torch_module_spec(model, input_size: int | str = "D") -> str:
    """The PyTorch module a bptt_jax model stands for, as a string.

    Args:
      model: a cell, a Bidirectional or a Stack (as in :func:`params_to_torch`).
      input_size: D, shown in the string.

    Returns:
      E.g. ``"nn.LSTM(input_size=3, hidden_size=8, num_layers=2, bidirectional=True)"``.

    Example:
      >>> import bptt_jax
      >>> from bptt_jax.interop import torch_module_spec
      >>> torch_module_spec(bptt_jax.stacked(bptt_jax.Elman(4, "relu"), 3), input_size=2)
      "nn.RNN(input_size=2, hidden_size=4, num_layers=3, nonlinearity='relu')"
    """
    cells, bi = _layers("torch_module_spec", model)
    return _spec(cells, bi, input_size)


def _spec(cells, bidirectional: bool, input_size) -> str:
    cell = cells[0][0]
    name = _TORCH[cell_name(cell)]
    args = f"input_size={input_size}, hidden_size={cell.hidden_size}, num_layers={len(cells)}"
    if isinstance(cell, Elman) and cell.activation != "tanh":
        args += f", nonlinearity={cell.activation!r}"
    if bidirectional:
        args += ", bidirectional=True"
    return f"{name}({args})"


def _suffix(k: int, d: int) -> str:
    return f"_l{k}" + ("_reverse" if d else "")


def _expected_shapes(cells, input_size: int | None, bias: bool) -> dict[str, tuple]:
    """Every key of the state dict and its shape, in PyTorch's order (layer, direction,
    weight_ih, weight_hh, bias_ih, bias_hh); ``None`` for D when it is unknown."""
    h = cells[0][0].hidden_size
    g = cells[0][0].n_blocks * h
    out = {}
    for k, layer in enumerate(cells):
        d_in = input_size if k == 0 else h * len(layer)
        for d in range(len(layer)):
            sfx = _suffix(k, d)
            out["weight_ih" + sfx] = (g, d_in)
            out["weight_hh" + sfx] = (g, h)
            if bias:
                out["bias_ih" + sfx] = (g,)
                out["bias_hh" + sfx] = (g,)
    return out


def _fmt(shape) -> str:
    return (
        "("
        + ", ".join("D" if s is None else str(s) for s in shape)
        + (",)" if len(shape) == 1 else ")")
    )


# ------------------------------------------------------------------------------ arrays
def _to_numpy(fn: str, key: str, value) -> np.ndarray:
    """A state-dict value as a numpy array (a torch tensor is detached and moved to the CPU
    first; no torch import)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch.Tensor, duck-typed
        value = value.detach().cpu()
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(
            f"{fn}: state_dict[{key!r}] must be an array (a CPU tensor or a numpy array); "
            f"got {type(value).__name__} ({e})"
        ) from e
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(
            f"{fn}: state_dict[{key!r}] must be floating point; got dtype {arr.dtype} (a "
            "bfloat16 tensor must be cast first, e.g. tensor.float())"
        )
    return arr


def _forget_vector(cell, dtype) -> np.ndarray:
    """The LSTM's forget_bias as a bias vector: ``f`` on the f block (i f g o), 0 elsewhere."""
    h = cell.hidden_size
    v = np.zeros((4 * h,), dtype)
    v[h : 2 * h] = cell.forget_bias
    return v


def _check_jax_dtype(fn: str, dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{fn}: dtype must be a floating-point dtype; got {dtype}")
    if dtype.itemsize == 8 and not jax.config.jax_enable_x64:
        raise TypeError(
            f"{fn}: the weights are float64 but JAX's float64 is off; pass dtype=jnp.float32 "
            "(or turn it on: jax.config.update('jax_enable_x64', True))"
        )
    return dtype


# ------------------------------------------------------------------------------ per cell
def _cell_from_torch(cell, w_ih, w_hh, b_ih, b_hh):
    """One cell's params from PyTorch's four arrays (already in the target dtype)."""
    w_x, w_h = w_ih.T, w_hh.T
    if isinstance(cell, GRU):
        return GRUParams(w_x, w_h, b_ih, b_hh)
    if isinstance(cell, LSTM):
        return LSTMParams(w_x, w_h, b_ih + (b_hh - _forget_vector(cell, b_hh.dtype)))
    return ElmanParams(w_x, w_h, b_ih + b_hh)


def _cell_to_torch(cell, p, dtype) -> tuple:
    """PyTorch's ``(weight_ih, weight_hh, bias_ih, bias_hh)`` of one cell's params."""
    w_x, w_h = np.asarray(p[0], dtype), np.asarray(p[1], dtype)
    if isinstance(cell, GRU):
        b_ih, b_hh = np.asarray(p.b_x, dtype), np.asarray(p.b_h, dtype)
    elif isinstance(cell, LSTM):
        b_ih, b_hh = np.asarray(p.b, dtype), _forget_vector(cell, dtype)
    else:
        b_ih = np.asarray(p.b_h, dtype)
        b_hh = np.zeros_like(b_ih)
    # Contiguous, writable copies: torch.from_numpy warns on read-only arrays.
    return tuple(np.array(a, dtype, order="C", copy=True) for a in (w_x.T, w_h.T, b_ih, b_hh))


def _params_type(cell):
    return PARAMS_TYPES[type(cell)]


def _assemble(model, cells, per_cell):
    """The model's params pytree from ``per_cell[k][d]``."""
    if isinstance(model, Stack):
        return tuple(
            tuple(ps) if isinstance(layer, Bidirectional) else ps[0]
            for layer, ps in zip(model.layers, per_cell)
        )
    if isinstance(model, Bidirectional):
        return tuple(per_cell[0])
    return per_cell[0][0]


def _split(fn: str, model, cells, params) -> list[list[tuple[str, Any]]]:
    """``[(path, cell_params)]`` per layer and direction, structure checked."""

    def check_tuple(value, n, where):
        if not isinstance(value, (tuple, list)) or len(value) != n or hasattr(value, "_fields"):
            got = type(value).__name__ + (
                f" of {len(value)}" if isinstance(value, (tuple, list)) else ""
            )
            raise TypeError(f"{fn}: {where} must be a tuple of {n}; got a {got}")
        return value

    if isinstance(model, Stack):
        layers = check_tuple(params, len(cells), "params (one entry per layer)")
        paths = [f"params[{k}]" for k in range(len(cells))]
    else:
        layers, paths = [params], ["params"]
    out = []
    for layer_cells, p, where in zip(cells, layers, paths):
        if len(layer_cells) == 2:
            pair = check_tuple(p, 2, f"{where} (the forward and backward params)")
            out.append([(f"{where}[{d}]", q) for d, q in enumerate(pair)])
        else:
            out.append([(where, p)])
    return out


# ------------------------------------------------------------------------------ public
def params_from_torch(
    model,
    state_dict,
    *,
    dtype=None,
    prefix: str = "",
    bias: bool = True,
):
    """bptt_jax params from the state dict of a PyTorch ``nn.RNN``, ``nn.LSTM`` or ``nn.GRU``.

    Every key and shape is checked before anything is converted. Per layer k and direction
    (``_reverse`` for d = 1): ``w_x = weight_ih.T``, ``w_h = weight_hh.T``; the GRU keeps both
    biases (``b_x = bias_ih``, ``b_h = bias_hh``), the Elman cell and the LSTM fold them,
    ``b = bias_ih + bias_hh`` (minus an LSTM's ``forget_bias`` on the f block, so that the
    model computes what the torch module computes). See :mod:`bptt_jax.interop`.

    Args:
      model: the bptt_jax model standing for the torch module: a cell (``num_layers=1``), a
        ``Bidirectional(cell)`` or a ``Stack`` (``stacked(cell, L, bidirectional=...)``).
        ``nn.RNN(nonlinearity="relu")`` is ``Elman(H, "relu")``.
      state_dict: a mapping from PyTorch's names (``weight_ih_l{k}[_reverse]``,
        ``weight_hh_...``, ``bias_ih_...``, ``bias_hh_...``) to tensors or numpy arrays,
        e.g. ``module.state_dict()``.
      dtype: the params' dtype; ``None`` keeps the state dict's (float64 needs JAX's x64).
      prefix: only keys starting with it are read, with it removed (``"rnn."`` for the
        ``rnn`` submodule of a larger module's state dict); other keys are ignored.
      bias: ``False`` for a module built with ``bias=False`` (no bias keys; biases are 0).

    Returns:
      The model's params (a cell's ``ElmanParams`` / ``LSTMParams`` / ``GRUParams``; tuples
      per layer and direction for models), as jax arrays.

    Raises:
      ValueError: a key is missing, misshapen or unexpected (every problem is listed, each
        with the expected and received shape), or the model is not one PyTorch module.
      TypeError: a value is not a floating-point array, the values' dtypes differ (pass
        ``dtype``), or they are float64 while JAX's x64 is off.

    Example:
      >>> import numpy as np, bptt_jax
      >>> from bptt_jax.interop import params_from_torch
      >>> rng = np.random.default_rng(0)
      >>> sd = {"weight_ih_l0": rng.normal(size=(12, 2)), "weight_hh_l0": rng.normal(size=(12, 4)),
      ...       "bias_ih_l0": rng.normal(size=12), "bias_hh_l0": rng.normal(size=12)}
      >>> p = params_from_torch(bptt_jax.GRU(4), sd, dtype=np.float32)
      >>> p.w_x.shape, p.b_h.dtype
      ((2, 12), dtype('float32'))
      >>> del sd["bias_hh_l0"]
      >>> params_from_torch(bptt_jax.GRU(4), sd)
      Traceback (most recent call last):
      ...
      ValueError: params_from_torch: ... nn.GRU(...): missing 'bias_hh_l0' (expected shape (12,))
    """
    fn = "params_from_torch"
    cells, bi = _layers(fn, model)
    if not hasattr(state_dict, "items"):
        raise TypeError(
            f"{fn}: state_dict must be a mapping of names to tensors (module.state_dict()); "
            f"got {type(state_dict).__name__}"
        )
    sd = {
        k[len(prefix) :]: v
        for k, v in state_dict.items()
        if isinstance(k, str) and k.startswith(prefix)
    }
    # D from weight_ih_l0 when it is there and 2-d; every shape is then checked against it.
    w0 = sd.get("weight_ih_l0")
    d = np.shape(w0)[1] if w0 is not None and len(np.shape(w0)) == 2 else None
    expected = _expected_shapes(cells, d, bias)
    problems = []
    for key, shape in expected.items():
        if key not in sd:
            problems.append(f"missing {prefix + key!r} (expected shape {_fmt(shape)})")
        elif tuple(np.shape(sd[key])) != shape:
            problems.append(
                f"{prefix + key!r} has shape {tuple(np.shape(sd[key]))}, expected {_fmt(shape)}"
            )
    for key in sd:
        if key not in expected:
            hint = ""
            if key.startswith("weight_hr"):
                hint = " (LSTM projections, proj_size > 0, are not supported)"
            elif key.startswith("bias_") and not bias:
                hint = " (a biased module: use bias=True)"
            problems.append(f"unexpected key {prefix + key!r}{hint}")
    if bias and problems and not any(key.startswith("bias_") for key in sd):
        problems.append("no bias keys at all: a module built with bias=False needs bias=False")
    if problems:
        raise ValueError(
            f"{fn}: state_dict does not match {_spec(cells, bi, 'D' if d is None else d)}: "
            + "; ".join(problems)
        )
    arrays = {key: _to_numpy(fn, prefix + key, sd[key]) for key in expected}
    if dtype is None:
        dtypes = sorted({str(a.dtype) for a in arrays.values()})
        if len(dtypes) > 1:
            raise TypeError(
                f"{fn}: the state dict's tensors have several dtypes {dtypes}; pass dtype= to "
                "choose the params' dtype"
            )
        dtype = next(iter(arrays.values())).dtype
    dtype = _check_jax_dtype(fn, dtype)
    arrays = {key: a.astype(dtype, copy=False) for key, a in arrays.items()}
    per_cell = []
    for k, layer in enumerate(cells):
        ps = []
        for dd, cell in enumerate(layer):
            sfx = _suffix(k, dd)
            w_ih, w_hh = arrays["weight_ih" + sfx], arrays["weight_hh" + sfx]
            if bias:
                b_ih, b_hh = arrays["bias_ih" + sfx], arrays["bias_hh" + sfx]
            else:
                b_ih = b_hh = np.zeros((w_ih.shape[0],), dtype)
            p = _cell_from_torch(cell, w_ih, w_hh, b_ih, b_hh)
            ps.append(type(p)(*(jnp.asarray(a) for a in p)))
        per_cell.append(ps)
    return _assemble(model, cells, per_cell)


def params_to_torch(
    model, params, *, dtype=None, prefix: str = "", bias: bool = True
) -> dict[str, np.ndarray]:
    """The state dict of the PyTorch ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` a model stands for.

    The inverse of :func:`params_from_torch`: ``weight_ih = w_x.T``, ``weight_hh = w_h.T``;
    the GRU's two biases as they are; an Elman or LSTM bias ``b`` all in ``bias_ih``, with
    ``bias_hh = 0`` (an LSTM's ``forget_bias`` on the f block of ``bias_hh``), so that
    ``params_from_torch(model, params_to_torch(model, params))`` is ``params`` exactly.

    Args:
      model: a cell, a ``Bidirectional`` or a ``Stack`` (see :func:`params_from_torch`).
      params: the model's params.
      dtype: the arrays' dtype; ``None`` keeps the params'.
      prefix: prepended to every key (``"rnn."`` to load into a submodule ``rnn``).
      bias: ``False`` for a module built with ``bias=False``: no bias keys; the biases must
        then be 0 (else ``ValueError``, as they would be lost).

    Returns:
      A dict from PyTorch's names to C-contiguous, writable numpy arrays, in PyTorch's order;
      ``torch_module.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})``
      loads it.

    Raises:
      TypeError / ValueError: params of the wrong structure, type or shape (naming the
        path, e.g. ``params[1][0].w_x``), or a model that is not one PyTorch module.

    Example:
      >>> import jax, bptt_jax
      >>> from bptt_jax.interop import params_to_torch
      >>> cell = bptt_jax.LSTM(4, forget_bias=1.0)
      >>> sd = params_to_torch(cell, cell.init(jax.random.key(0), 2))
      >>> sd["bias_hh_l0"].reshape(4, 4)[:, 0]      # blocks i f g o; forget_bias on f
      array([0., 1., 0., 0.], dtype=float32)
    """
    fn = "params_to_torch"
    cells, _ = _layers(fn, model)
    parts = _split(fn, model, cells, params)
    h = cells[0][0].hidden_size
    g = cells[0][0].n_blocks * h
    out: dict[str, np.ndarray] = {}
    d_model = None
    pdtype = None
    checked = []
    for k, (layer, ps) in enumerate(zip(cells, parts)):
        for cell, (where, p) in zip(layer, ps):
            ptype = _params_type(cell)
            if not isinstance(p, ptype):
                raise TypeError(
                    f"{fn}: {where} must be a bptt_jax.{ptype.__name__} for a "
                    f"{type(cell).__name__} cell; got {type(p).__name__}"
                )
            for name, leaf in zip(ptype._fields, p):
                dt = np.dtype(getattr(leaf, "dtype", np.asarray(leaf).dtype))
                if not jnp.issubdtype(dt, jnp.floating):
                    raise TypeError(f"{fn}: {where}.{name} must be floating point; got {dt}")
                pdtype = pdtype or dt
            d_in = np.shape(p[0])[0] if np.ndim(p[0]) == 2 else None
            if k == 0 and d_model is None:
                d_model = d_in
            want_d = d_model if k == 0 else h * len(cells[k - 1])
            want = [(want_d, g), (h, g)] + [(g,)] * (len(p) - 2)
            for name, leaf, shape in zip(ptype._fields, p, want):
                if tuple(np.shape(leaf)) != shape:
                    raise ValueError(
                        f"{fn}: {where}.{name} must have shape {shape} for "
                        f"{_spec(cells, len(layer) == 2, d_model)}; got {tuple(np.shape(leaf))}"
                    )
            checked.append((k, cell, p))
    dtype = np.dtype(pdtype) if dtype is None else np.dtype(dtype)
    if not np.issubdtype(dtype, np.floating):  # numpy's: float16, float32, float64
        raise TypeError(
            f"{fn}: the state dict's dtype must be float16, float32 or float64 (what "
            f"torch.from_numpy takes); got {dtype}: pass dtype=np.float32"
        )
    direction = {}
    for k, cell, p in checked:
        dd = direction.get(k, 0)
        direction[k] = dd + 1
        arrays = _cell_to_torch(cell, p, dtype)
        if not bias:
            # what the cell adds: b_ih + b_hh (Elman, LSTM), each of the GRU's two biases
            lost = np.concatenate(arrays[2:] if isinstance(cell, GRU) else [sum(arrays[2:])])
            if np.any(lost != 0):
                raise ValueError(
                    f"{fn}: bias=False, but layer {k} direction {dd} has nonzero biases (max "
                    f"|b| = {np.max(np.abs(lost)):.3g}), which a module without biases cannot "
                    "hold; use bias=True"
                )
            arrays = arrays[:2]
        for name, a in zip(_NAMES, arrays):
            out[prefix + name + _suffix(k, dd)] = a
    return out
