"""A Flax NNX module around any bptt_jax cell or model: :class:`RNN`.

Install with ``pip install "bptt-jax[nnx]"``. ``import bptt_jax`` never imports flax; this
module does, when it is imported.

The module holds the bptt_jax params as ``nnx.Param`` leaves and calls
:func:`bptt_jax.unroll`, so ``nnx.grad`` (or ``jax.grad``) of a loss on its outputs runs the
hand-written BPTT and gives exactly the gradients of the functional API on the same params.
It follows ``flax.nnx.RNN``: batch-major inputs ``(B, T, D)`` unless ``time_major=True``,
``seq_lengths`` (or a ``mask``) for right-padded batches, ``initial_carry``, and
``(carry, outputs)`` with ``return_carry=True``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bptt_jax import _frameworks

__all__ = ["RNN"]

_FN = "bptt_jax.nnx.RNN"


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


class RNN(nnx.Module):
    """A bptt_jax cell or model as a Flax NNX module, run by :func:`bptt_jax.unroll`.

    ``RNN(model, D, rngs=rngs)(inputs)`` is ``bptt_jax.unroll(model, params, xs)`` with the
    params held by the module (``self.params``: the model's params pytree with every leaf an
    ``nnx.Param``) and the inputs batch-major. For a cell, equivalent to::

        carry = initial_carry or model.zero_carry(B)
        for t in range(T):                          # over inputs[:, t], time-major inside
            new, _ = model.step(params, carry, inputs[:, t])
            carry = where(t < seq_lengths, new, carry)
            outputs[:, t] = hidden(carry)
        return (carry, outputs) if return_carry else outputs

    with the hand-written BPTT as its backward (``nnx.grad`` and ``jax.grad`` both use it).
    At padded steps (``t >= seq_lengths[b]``) the carry passes through unchanged, so the
    final carry is each sequence's last valid state and the outputs there repeat it; a
    bidirectional layer reverses each sequence's valid prefix (see
    :class:`bptt_jax.Bidirectional`).

    Args:
      model: a cell (``bptt_jax.Elman``, ``LSTM``, ``GRU``, the linear ``MinGRU``,
        ``MinLSTM``, ``RGLRU``, or your own), a ``bptt_jax.Bidirectional`` or a
        ``bptt_jax.Stack`` (e.g. ``bptt_jax.stacked(LSTM(64), 2, bidirectional=True)``).
      in_features: D; the params are ``model.init(rngs.params(), D, param_dtype)``.
      params: instead of ``in_features`` and ``rngs``: the model's params to hold (e.g. from
        :func:`bptt_jax.interop.params_from_torch`).
      rngs: ``nnx.Rngs`` for the init (its ``params`` stream) and, for a ``Stack`` with
        dropout, the dropout stream kept by the module (its ``dropout`` stream).
      param_dtype: the params' dtype (inputs must have it; nothing is promoted).
      time_major: inputs and outputs ``(T, B, ...)`` instead of ``(B, T, ...)``.
      return_carry: also return the final carry, as ``(carry, outputs)``.
      deterministic: turn a ``Stack`` 's dropout off (``module.eval()`` sets it; ``train()``
        clears it).
      backward, truncate, segment, memory_budget, delta_clip, compute_dtype: passed to
        :func:`bptt_jax.unroll` (e.g. ``backward="checkpointed"`` for O(sqrt T) memory;
        ``compute_dtype=jnp.bfloat16`` for bfloat16 compute with float32 params and
        gradients, the precision policy).

    Example::

        import jax, jax.numpy as jnp, optax, bptt_jax
        from flax import nnx
        from bptt_jax.nnx import RNN

        rnn = RNN(bptt_jax.LSTM(16), 3, rngs=nnx.Rngs(0))
        x = jnp.ones((4, 10, 3))                      # (B, T, D), batch-major
        carry, y = rnn(x, seq_lengths=jnp.array([10, 7, 3, 1]), return_carry=True)
        assert y.shape == (4, 10, 16) and carry.h.shape == (4, 16)

        opt = nnx.Optimizer(rnn, optax.adam(1e-3), wrt=nnx.Param)

        @nnx.jit
        def train_step(rnn, opt, x):
            loss = lambda m: jnp.mean(m(x) ** 2)
            grads = nnx.grad(loss)(rnn)                 # the hand-written BPTT
            opt.update(rnn, grads)

        train_step(rnn, opt, x)
    """

    def __init__(
        self,
        model,
        in_features: int | None = None,
        *,
        params: Any = None,
        rngs: nnx.Rngs | None = None,
        param_dtype=jnp.float32,
        time_major: bool = False,
        return_carry: bool = False,
        deterministic: bool = False,
        **unroll_options,
    ):
        self.model = model
        self.unroll_options = tuple(_frameworks.check_options(_FN, unroll_options).items())
        self.time_major = bool(time_major)
        self.return_carry = bool(return_carry)
        self.deterministic = bool(deterministic)
        if params is None:
            if in_features is None or rngs is None:
                raise TypeError(
                    f"{_FN}: pass in_features and rngs (to initialise the params), or params"
                )
            params = model.init(rngs.params(), in_features, param_dtype)
        else:
            d = _frameworks.input_size_of(model, params)
            if in_features is not None and d is not None and d != in_features:
                raise ValueError(
                    f"{_FN}: in_features={in_features} does not match the params' input size {d}"
                )
            in_features = in_features if d is None else d
        self.in_features = in_features
        self.params = nnx.data(jax.tree.map(nnx.Param, params))
        self.rngs = nnx.data(None)
        if _frameworks.has_dropout(model) and rngs is not None:
            try:
                stream = rngs["dropout"]
            except KeyError:
                raise ValueError(
                    f"{_FN}: the model has dropout, so rngs needs a 'dropout' stream (e.g. "
                    "nnx.Rngs(params=0, dropout=1), or nnx.Rngs(0) for one default stream); it "
                    "has none. Without dropout at all: build the model with dropout=0."
                ) from None
            self.rngs = stream.fork()

    def get_params(self):
        """The held params as the model's params pytree of arrays (for the functional API)."""
        return jax.tree.map(lambda v: v[...], self.params, is_leaf=_is_variable)

    def set_params(self, params) -> None:
        """Replace the held params' values (same structure, e.g. from ``params_from_torch``)."""
        old = jax.tree.structure(self.get_params())
        if jax.tree.structure(params) != old:
            raise TypeError(
                f"{_FN}.set_params: params must have the structure {old}; got "
                f"{jax.tree.structure(params)}"
            )
        for var, value in zip(
            jax.tree.leaves(self.params, is_leaf=_is_variable), jax.tree.leaves(params)
        ):
            if tuple(var.shape) != tuple(value.shape):
                raise ValueError(
                    f"{_FN}.set_params: a leaf of shape {tuple(value.shape)} replaces one of "
                    f"shape {tuple(var.shape)}"
                )
            var[...] = value

    def set_view(self, deterministic: bool | None = None):
        """For ``nnx.view(module, deterministic=...)``."""
        if deterministic is not None:
            self.deterministic = deterministic

    def __call__(
        self,
        inputs,
        *,
        initial_carry=None,
        seq_lengths=None,
        mask=None,
        return_carry: bool | None = None,
        time_major: bool | None = None,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None,
    ):
        """Run the model over ``inputs``.

        Args:
          inputs: ``(B, T, D)`` (``(T, B, D)`` with ``time_major``), the params' dtype.
          initial_carry: the model's carry (``model.zero_carry(B)`` 's structure); ``None``
            for zeros.
          seq_lengths: ``(B,)`` integers in ``[0, T]``: each sequence's length (right-padded);
            a length of 0 leaves that sequence's carry as it entered.
          mask: instead of ``seq_lengths``: ``(B, T)`` (``(T, B)`` with ``time_major``) bool
            or 0/1, a right-padding mask.
          return_carry, time_major, deterministic: override the module's.
          rngs: the dropout key source for a ``Stack`` with dropout (else the module's).

        Returns:
          ``outputs`` ``(B, T, F)`` (``(T, B, F)`` with ``time_major``), or
          ``(carry, outputs)`` with ``return_carry``.

        Raises:
          ValueError / TypeError naming the argument (``inputs``, ``seq_lengths``, ``mask``,
          ``initial_carry``) before anything runs; ``seq_lengths`` values are checked when
          known (outside ``jit``).
        """
        time_major = self.time_major if time_major is None else time_major
        return_carry = self.return_carry if return_carry is None else return_carry
        deterministic = self.deterministic if deterministic is None else deterministic
        params = self.get_params()
        xs, m, carry0, layout = _frameworks.prepare(
            _FN,
            self.model,
            params,
            inputs,
            time_major=time_major,
            seq_lengths=seq_lengths,
            mask=mask,
            initial_carry=initial_carry,
            in_features=self.in_features,
        )
        key = None
        if _frameworks.has_dropout(self.model) and not deterministic:
            source = self.rngs if rngs is None else rngs
            if source is None:
                raise ValueError(
                    f"{_FN}: the model has dropout {self.model.dropout} and deterministic is "
                    "False, but no rngs were given (pass rngs= here or to the constructor, or "
                    "call module.eval() to turn dropout off)"
                )
            if isinstance(source, nnx.Rngs):
                key = source["dropout"]()
            elif isinstance(source, nnx.RngStream):
                key = source()
            else:
                key = source
        return _frameworks.call(
            self.model, params, xs, m, carry0, layout, dict(self.unroll_options), key, return_carry
        )
