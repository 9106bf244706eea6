"""Models built from cells: :class:`Bidirectional` layers and :class:`Stack` s of layers.

A model has a cell's public face (``init``, ``zero_carry``) and goes everywhere a cell goes:
:func:`bptt_jax.unroll`, :func:`bptt_jax.sequence_loss`, ``loss_and_grads``,
:func:`bptt_jax.check_gradients`, the diagnostics and the trainer. Its backward is the same
hand-written BPTT, layer by layer and direction by direction (see :mod:`bptt_jax._engine`).

Layout, as PyTorch indexes ``nn.LSTM(num_layers=L, bidirectional=True)``:

* a :class:`Stack`'s params and carry are tuples with one entry per layer (``params[k]`` is
  layer k, PyTorch's ``_l{k}``);
* a :class:`Bidirectional` layer's params and carry are the pairs ``(forward, backward)``
  (direction 0 forward, direction 1 reverse, PyTorch's ``_reverse``);
* a cell's params and carry are its own (``LSTMParams``, ``LSTMCarry``, ...).

So ``params[1][0].w_h`` is layer 1's forward recurrent kernel, and PyTorch's ``h_n[2*k + d]``
is ``carry[k][d]`` (its ``.h`` for an LSTM).

Any cell goes into a model, the built-in ones and your own (:mod:`bptt_jax.cells.protocol`);
a layer's output size, the next layer's input size, is its cell's
:func:`~bptt_jax.cells.protocol.output_size` (``hidden_size`` for the built-in cells, else
the last axis of ``hidden(zero_carry(1))``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bptt_jax.cells import GRU, LRU, LSTM, RGLRU, Elman, MinGRU, MinLSTM, _common, protocol

MERGES = ("concat", "sum", "mean")
#: The built-in cells.
CELL_TYPES = (Elman, LSTM, GRU, MinGRU, MinLSTM, RGLRU, LRU)


def is_cell(x) -> bool:
    """A cell: anything with ``init``, ``zero_carry`` and ``step`` that is not a model."""
    return not isinstance(x, (Stack, Bidirectional)) and protocol.is_cell(x)


def not_a_cell(where: str, x, also: str = "") -> str:
    """The message for ``x`` given where a cell goes: what it is, and what it lacks."""
    name = type(x).__name__
    missing = protocol.missing_methods(x)
    lacks = ""
    if missing and not isinstance(x, (str, int, float, tuple, list, dict, type(None), type)):
        lacks = f" (it has no {', '.join(missing)})"
    return (
        f"{where} must be a cell (bptt_jax.Elman, LSTM, GRU or your own: an object with "
        f"init(key, input_size, dtype), zero_carry(batch_size, dtype) and "
        f"step(params, carry, x_t) -> (carry, h_t), see bptt_jax.cells.Cell){also}; "
        f"got {name}{lacks}"
    )


@dataclasses.dataclass(frozen=True)
class Bidirectional:
    """Two cells over the same sequence, the second in reverse time; outputs merged.

    For right-padded batches each sequence's **valid prefix** is reversed, not the padded
    array: with ``len_b = sum_t mask[t, b]`` the reverse cell reads
    ``x[len_b - 1], ..., x[0]``, its initial carry enters at step ``len_b - 1`` and its final
    carry is its state after step 0 (PyTorch's ``h_n`` for the reverse direction). Padded
    steps never reach valid outputs, final carries or gradients. At a padded step each
    direction's output repeats that direction's final carry.

    Outputs at step t: ``concat([h_fwd_t, h_bwd_t])`` (PyTorch's layout), or their ``sum`` or
    ``mean``.

    Args:
      forward: the forward-time cell (``Elman``, ``LSTM``, ``GRU`` or your own).
      backward: the reverse-time cell; ``None`` for a cell configured like ``forward`` (its
        params are still its own).
      merge: ``"concat"`` (output size 2H), ``"sum"`` or ``"mean"`` (output size H; both cells
        must then have the same hidden size).

    Params are ``(forward_params, backward_params)``, the carry ``(forward_carry,
    backward_carry)``. Truncated BPTT, TBPTT and carried streams (``resets``) are undefined
    for it (the reverse direction needs the whole future) and raise ``ValueError``.

    Example:
      >>> import jax, jax.numpy as jnp, bptt_jax
      >>> model = bptt_jax.Bidirectional(bptt_jax.GRU(8))
      >>> params = model.init(jax.random.key(0), input_size=3)
      >>> mask = jnp.arange(10)[:, None] < jnp.array([10, 6])   # lengths 10 and 6
      >>> hs, (c_fwd, c_bwd) = bptt_jax.unroll(model, params, jnp.ones((10, 2, 3)), mask=mask)
      >>> hs.shape, c_bwd.shape
      ((10, 2, 16), (2, 8))
    """

    forward: Any
    backward: Any = None
    merge: str = "concat"

    def __post_init__(self):
        if not is_cell(self.forward):
            raise TypeError(not_a_cell("Bidirectional: forward", self.forward))
        if self.backward is None:
            object.__setattr__(self, "backward", self.forward)
        if not is_cell(self.backward):
            raise TypeError(not_a_cell("Bidirectional: backward", self.backward, " or None"))
        if self.merge not in MERGES:
            raise ValueError(f"Bidirectional: merge must be one of {MERGES}; got {self.merge!r}")
        hf, hb = protocol.output_size(self.forward), protocol.output_size(self.backward)
        if self.merge != "concat" and hf != hb:
            raise ValueError(
                f"Bidirectional: merge={self.merge!r} needs equal hidden sizes; got forward "
                f"hidden_size={hf} and backward hidden_size={hb} (use merge='concat')"
            )

    @property
    def cells(self) -> tuple:
        """``(forward, backward)``."""
        return (self.forward, self.backward)

    @property
    def output_size(self) -> int:
        """Features per step of the merged output."""
        hf = protocol.output_size(self.forward)
        return hf + protocol.output_size(self.backward) if self.merge == "concat" else hf

    def init(self, key: jax.Array, input_size: int, dtype=jnp.float32) -> tuple:
        """``(forward.init(k0, D), backward.init(k1, D))`` with ``k0, k1 = split(key)``."""
        k0, k1 = jax.random.split(key)
        return (self.forward.init(k0, input_size, dtype), self.backward.init(k1, input_size, dtype))

    def zero_carry(self, batch_size: int, dtype=jnp.float32) -> tuple:
        """``(forward.zero_carry(B), backward.zero_carry(B))``."""
        return (
            self.forward.zero_carry(batch_size, dtype),
            self.backward.zero_carry(batch_size, dtype),
        )


def _output_size(layer) -> int:
    return layer.output_size if isinstance(layer, Bidirectional) else protocol.output_size(layer)


@dataclasses.dataclass(frozen=True)
class Stack:
    """Layers run in order, each on the previous layer's outputs (a multi-layer RNN).

    Each layer is a cell or a :class:`Bidirectional`; layer k's input size is layer k-1's
    output size. With ``dropout=p`` each layer's input but the first is multiplied by an
    independent Bernoulli(1 - p) mask scaled by ``1 / (1 - p)`` (PyTorch's ``dropout``: between
    layers, not after the last), drawn from the ``dropout_key`` given at call time (see
    :meth:`dropout_masks`); without a key dropout is off (evaluation).

    Params and carry are tuples with one entry per layer (see :mod:`bptt_jax.models`).

    Args:
      layers: a sequence of cells and :class:`Bidirectional` layers (at least one).
      dropout: probability in ``[0, 1)`` of zeroing a layer input.

    Example:
      >>> import jax, jax.numpy as jnp, bptt_jax
      >>> model = bptt_jax.stacked(bptt_jax.LSTM(16), num_layers=2, bidirectional=True)
      >>> params = model.init(jax.random.key(0), input_size=5)
      >>> params[1][0].w_x.shape          # layer 1, forward direction: input 2*16
      (32, 64)
      >>> hs, carry = bptt_jax.unroll(model, params, jnp.ones((7, 3, 5)))
      >>> hs.shape, len(carry), carry[1][1].c.shape
      ((7, 3, 32), 2, (3, 16))
    """

    layers: tuple
    dropout: float = 0.0

    def __post_init__(self):
        layers = tuple(self.layers) if isinstance(self.layers, (list, tuple)) else None
        if not layers:
            raise ValueError(
                "Stack: layers must be a non-empty sequence of cells or Bidirectional layers; "
                f"got {self.layers!r}"
            )
        for k, layer in enumerate(layers):
            if not (is_cell(layer) or isinstance(layer, Bidirectional)):
                raise TypeError(not_a_cell(f"Stack: layers[{k}]", layer, " or a Bidirectional"))
        object.__setattr__(self, "layers", layers)
        p = self.dropout
        if isinstance(p, np.floating | np.integer) and not isinstance(p, np.bool_):
            p = float(p)  # a NumPy scalar: a float field (hashable, the same as the Python one)
            object.__setattr__(self, "dropout", p)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"Stack: dropout must be a probability in [0, 1); got {p!r}")

    @property
    def output_size(self) -> int:
        """Features per step of the last layer's output."""
        return _output_size(self.layers[-1])

    @property
    def bidirectional(self) -> bool:
        """Whether any layer runs in reverse time."""
        return any(isinstance(layer, Bidirectional) for layer in self.layers)

    def input_sizes(self, input_size: int) -> tuple[int, ...]:
        """Each layer's input size, from the model's input size D."""
        sizes = [input_size]
        for layer in self.layers[:-1]:
            sizes.append(_output_size(layer))
        return tuple(sizes)

    def init(self, key: jax.Array, input_size: int, dtype=jnp.float32) -> tuple:
        """One params entry per layer, each drawn with its own key from ``split(key, L)``."""
        _common.check_input_size("Stack", input_size)
        keys = jax.random.split(key, len(self.layers))
        return tuple(
            layer.init(k, d, dtype)
            for layer, k, d in zip(self.layers, keys, self.input_sizes(input_size))
        )

    def zero_carry(self, batch_size: int, dtype=jnp.float32) -> tuple:
        """One zero carry per layer."""
        return tuple(layer.zero_carry(batch_size, dtype) for layer in self.layers)

    def step(self, params: tuple, carry: tuple, x: jax.Array):
        """One time step of every layer in turn, ``(carry, x_t) -> (carry, out_t)``, without
        dropout (as at evaluation, e.g. to sample from a language model).

        Raises:
          ValueError: the stack has a :class:`Bidirectional` layer (it needs the whole
            sequence, not one step at a time).
        """
        if self.bidirectional:
            raise ValueError(
                "Stack.step: a Bidirectional layer has no single step (its reverse direction "
                "needs the whole sequence); use bptt_jax.unroll"
            )
        new = []
        for layer, p, c in zip(self.layers, params, carry):
            c, x = layer.step(p, c, x)
            new.append(c)
        return tuple(new), x

    def dropout_masks(
        self, key, seq_len: int, batch_size: int, dtype=jnp.float32, out_sharding=None
    ) -> tuple:
        """The inverted-dropout multipliers of layers 1..L-1, drawn from ``key``.

        Returns a tuple of L-1 arrays ``(T, B, F_k)`` (``F_k`` layer k's input size), each
        entry ``0`` or ``1 / (1 - dropout)``; layer k's input is ``outputs_{k-1} * masks[k-1]``.
        ``key=None`` or ``dropout=0``: ``None`` (no dropout). ``out_sharding``: as in
        ``jax.random.bernoulli`` (the engine draws them sharded like a sharded batch; the
        values do not depend on it).
        """
        if key is None or self.dropout == 0.0 or len(self.layers) == 1:
            return None
        keep = 1.0 - self.dropout
        keys = jax.random.split(key, len(self.layers) - 1)
        return tuple(
            jax.random.bernoulli(
                k, keep, (seq_len, batch_size, _output_size(layer)), out_sharding=out_sharding
            ).astype(dtype)
            * jnp.asarray(1.0 / keep, dtype)
            for k, layer in zip(keys, self.layers[:-1])
        )


def stacked(cell, num_layers: int = 1, *, bidirectional: bool = False, dropout: float = 0.0):
    """PyTorch's ``nn.LSTM(D, H, num_layers, bidirectional=..., dropout=...)`` in one call.

    ``stacked(bptt_jax.LSTM(H), num_layers=L, bidirectional=True, dropout=p)`` is the
    equivalent of ``nn.LSTM(D, H, num_layers=L, bidirectional=True, dropout=p)`` (and likewise
    with ``GRU`` for ``nn.GRU`` and ``Elman`` for ``nn.RNN``): L layers of ``cell``, each a
    :class:`Bidirectional` with ``merge="concat"`` when ``bidirectional``.

    Args:
      cell: the cell every layer (and direction) is configured like (a built-in one or your
        own); each has its own params.
      num_layers: L >= 1.
      bidirectional: make every layer bidirectional.
      dropout: between layers (see :class:`Stack`).

    Returns:
      A :class:`Stack`.
    """
    if isinstance(num_layers, np.integer):
        num_layers = int(num_layers)
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"stacked: num_layers must be a positive int; got {num_layers!r}")
    if not isinstance(bidirectional, bool | np.bool_):
        raise TypeError(f"stacked: bidirectional must be True or False; got {bidirectional!r}")
    if not is_cell(cell):
        raise TypeError(not_a_cell("stacked: cell", cell))
    layer = Bidirectional(cell) if bidirectional else cell
    return Stack((layer,) * num_layers, dropout=dropout)


class LearnedCarryParams(NamedTuple):
    """Params of a :class:`LearnedCarry`: the model's, and its initial carry for one example."""

    model: Any  # the wrapped model's params
    carry: Any  # the initial carry, the model's carry structure with a batch axis of 1


@dataclasses.dataclass(frozen=True)
class LearnedCarry:
    """A model whose initial carry is a trained parameter (per layer and direction).

    Wherever the carry entering step 0 is not given (``carry0=None``), the model starts from
    its learned carry, broadcast over the batch, and the gradient reaches it: the sum over the
    batch of the error on ``carry0`` that the hand-written BPTT returns. A given ``carry0``
    (a stream carried from the batch before) is used as given, and its learned carry gets no
    gradient from that call. Resets still zero the carry (:mod:`bptt_jax.streams`).

    Args:
      model: a cell, a :class:`Bidirectional` or a :class:`Stack`.

    Example:
      >>> import jax, jax.numpy as jnp, bptt_jax
      >>> model = bptt_jax.LearnedCarry(bptt_jax.LSTM(4))
      >>> params = model.init(jax.random.key(0), input_size=3)
      >>> params.carry.h.shape                      # one example's carry, starting at zeros
      (1, 4)
      >>> xs = jnp.ones((5, 2, 3))
      >>> g = jax.grad(lambda p: bptt_jax.unroll(model, p, xs)[0].sum())(params)
      >>> bool(jnp.abs(g.carry.c).sum() > 0)        # the gradient reaches the initial carry
      True
    """

    model: Any

    def __post_init__(self):
        if not is_model(self.model) or isinstance(self.model, LearnedCarry):
            also = ", a bptt_jax.Bidirectional or a bptt_jax.Stack"
            raise TypeError(not_a_cell("LearnedCarry: model", self.model, also))

    def init(self, key, input_size: int, dtype=jnp.float32) -> LearnedCarryParams:
        """The model's params and a zero initial carry (one example)."""
        return LearnedCarryParams(
            self.model.init(key, input_size, dtype), self.model.zero_carry(1, dtype)
        )

    def zero_carry(self, batch_size: int, dtype=jnp.float32):
        """The model's zero carry (the structure of the carry; a stream's start is
        :meth:`initial_carry`)."""
        return self.model.zero_carry(batch_size, dtype)

    def initial_carry(self, params: LearnedCarryParams, batch_size: int):
        """The learned carry broadcast over ``batch_size`` examples."""
        return jax.tree.map(lambda c: jnp.broadcast_to(c, (batch_size, *c.shape[1:])), params.carry)

    @property
    def output_size(self) -> int:
        return output_size(self.model)


def unwrap(model, params, carry0, xs):
    """``(model, params, carry0)`` for the engine: a :class:`LearnedCarry`'s model and params,
    and its learned carry where ``carry0`` is ``None``; anything else as it is."""
    if not isinstance(model, LearnedCarry):
        return model, params, carry0
    if not isinstance(params, LearnedCarryParams):
        raise TypeError(
            f"LearnedCarry: params must be the LearnedCarryParams(model, carry) its init "
            f"returns; got {type(params).__name__}"
        )
    if carry0 is None:
        carry0 = model.initial_carry(params, int(np.shape(xs)[1]))
    return model.model, params.model, carry0


def is_model(x) -> bool:
    """A cell, a :class:`Bidirectional`, a :class:`Stack` or a :class:`LearnedCarry`."""
    return is_cell(x) or isinstance(x, (Bidirectional, Stack, LearnedCarry))


def output_size(model) -> int:
    """Features per step of a model's output ``hs``."""
    if isinstance(model, (Bidirectional, Stack, LearnedCarry)):
        return model.output_size
    return protocol.output_size(model)


def is_bidirectional(model) -> bool:
    """Whether any part of ``model`` runs in reverse time."""
    if isinstance(model, LearnedCarry):
        return is_bidirectional(model.model)
    if isinstance(model, Stack):
        return model.bidirectional
    return isinstance(model, Bidirectional)


# ----------------------------------------------------------------------------- by name
#: The built-in cells by the names configs and model specs use.
CELLS = {
    "elman": Elman,
    "lstm": LSTM,
    "gru": GRU,
    "mingru": MinGRU,
    "minlstm": MinLSTM,
    "rglru": RGLRU,
    "lru": LRU,
}


def cell_name(cell) -> str | None:
    """The name of a built-in cell (``"lstm"`` for an :class:`~bptt_jax.LSTM`), else ``None``."""
    return next((name for name, cls in CELLS.items() if type(cell) is cls), None)


def cells_with(setting: str) -> tuple[str, ...]:
    """The names of the built-in cells that have ``setting`` (a field of theirs).

    Example:
      >>> cells_with("scan"), cells_with("c")
      (('mingru', 'minlstm', 'rglru', 'lru'), ('rglru',))
    """
    return tuple(
        name for name, cls in CELLS.items() if setting in {f.name for f in dataclasses.fields(cls)}
    )


def build_model(
    cell: str,
    hidden_size: int,
    *,
    layers: int | None = None,
    bidirectional: bool = False,
    dropout: float = 0.0,
    activation: str | None = None,
    forget_bias: float | None = None,
    init_scheme: str | None = None,
    scan: str | None = None,
    c: float | None = None,
):
    """The cell or model a name and a few settings describe: the one registry of the
    ``bptt-jax`` commands and the benchmarks.

    Args:
      cell: a name of :data:`CELLS` (``"elman"``, ``"lstm"``, ``"gru"``, ``"mingru"``,
        ``"minlstm"``, ``"rglru"``).
      hidden_size: H of every cell.
      layers: ``None``: the cell itself, or ``Bidirectional(cell)``; an int L:
        ``stacked(cell, L, bidirectional=..., dropout=...)`` (a :class:`Stack`, also for L = 1).
      bidirectional, dropout: as in :func:`stacked` (``dropout`` needs ``layers``).
      activation, forget_bias, init_scheme: the cell's settings; each applies to the cells
        that have it (``activation``: Elman, ``forget_bias``: LSTM, ``init_scheme``: Elman,
        LSTM, GRU) and is ignored by the others, as a config table holds them all; ``None``:
        the default.
      scan, c: the linear cells' settings (``scan``: MinGRU, MinLSTM, RGLRU, ``"auto"``,
        ``"parallel"`` or ``"sequential"``; ``c``: RGLRU, a positive number); ``None``: the
        default. Unlike the three above, one given for a cell that lacks it is an error.

    Raises:
      ValueError: an unknown ``cell``; ``dropout`` without ``layers``; ``scan`` or ``c``
        given for a cell that has no such setting; a value the cell refuses (an unknown
        ``scan``, ``c <= 0``: the cell's own message).

    Example:
      >>> build_model("lstm", 8, forget_bias=1.0)
      LSTM(hidden_size=8, forget_bias=1.0, init_scheme='uniform')
      >>> model = build_model("gru", 8, layers=2, bidirectional=True)
      >>> model == stacked(GRU(8), 2, bidirectional=True)
      True
      >>> build_model("rglru", 8, scan="parallel", c=4)
      RGLRU(hidden_size=8, c=4.0, scan='parallel')
      >>> build_model("lstm", 8, scan="parallel")
      Traceback (most recent call last):
      ...
      ValueError: build_model: scan is a setting of mingru, minlstm, rglru, lru, not of cell 'lstm'
    """
    if cell not in CELLS:
        raise ValueError(f"build_model: cell must be one of {', '.join(CELLS)}; got {cell!r}")
    cls = CELLS[cell]
    own = {f.name for f in dataclasses.fields(cls)}
    strict = dict(scan=scan, c=c)  # settings only some cells have: an error for the others
    for name, value in strict.items():
        if value is not None and name not in own:
            raise ValueError(
                f"build_model: {name} is a setting of {', '.join(cells_with(name))}, "
                f"not of cell {cell!r}"
            )
    given = dict(activation=activation, forget_bias=forget_bias, init_scheme=init_scheme)
    given = {k: v for k, v in given.items() if k in own} | strict
    made = cls(hidden_size, **{k: v for k, v in given.items() if v is not None})
    if layers is not None:
        return stacked(made, layers, bidirectional=bidirectional, dropout=dropout)
    if dropout:
        raise ValueError(f"build_model: dropout={dropout} applies between layers; give layers")
    return Bidirectional(made) if bidirectional else made


def parse_spec(spec: str) -> tuple[str, int | None, bool]:
    """``(cell, layers, bidirectional)`` of a model spec ``[bi]<cell>[:<layers>]``.

    ``"gru"`` is the cell, ``"bigru"`` ``Bidirectional(GRU(H))``, ``"lstm:2"``
    ``stacked(LSTM(H), 2)`` (``"lstm:1"``: a one-layer Stack), ``"bilstm:2"``
    ``stacked(LSTM(H), 2, bidirectional=True)``.

    Example:
      >>> parse_spec("lstm:2"), parse_spec("bigru"), parse_spec("gru")
      (('lstm', 2, False), ('gru', None, True), ('gru', None, False))
    """
    name, sep, layers = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    bidirectional = name.startswith("bi")
    cell = name[2:] if bidirectional else name
    counted = layers.isascii() and layers.isdigit() and not layers.startswith("0")
    if cell not in CELLS or (sep and not counted):
        raise ValueError(
            f"model spec {spec!r} is not [bi]<cell>[:<layers>] with cell one of "
            f"{', '.join(CELLS)} (e.g. 'lstm:2', 'bigru', 'bilstm:2')"
        )
    return cell, int(layers) if sep else None, bidirectional


def from_spec(spec: str, hidden_size: int, **cell_settings):
    """The model a spec names (:func:`parse_spec`), every cell of size ``hidden_size``;
    ``cell_settings`` as in :func:`build_model`.

    Example:
      >>> from_spec("bilstm:2", 16) == stacked(LSTM(16), 2, bidirectional=True)
      True
    """
    cell, layers, bidirectional = parse_spec(spec)
    return build_model(
        cell, hidden_size, layers=layers, bidirectional=bidirectional, **cell_settings
    )
