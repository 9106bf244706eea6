"""An Equinox module around any bptt_jax cell or model: :class:`RNN`.

Install with ``pip install "bptt-jax[equinox]"``. ``import bptt_jax`` never imports equinox;
this module does, when it is imported.

The module's ``params`` field is the bptt_jax params pytree itself, so
``eqx.filter_grad`` of a loss returns an ``RNN`` whose ``params`` are exactly the gradients
:func:`bptt_jax.unroll` gives under ``jax.grad`` (its hand-written BPTT), in the params'
own type, ready for optax.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from bptt_jax import _frameworks

__all__ = ["RNN"]

_FN = "bptt_jax.equinox.RNN"


class RNN(eqx.Module):
    """A bptt_jax cell or model as an Equinox module, run by :func:`bptt_jax.unroll`.

    ``RNN(model, D, key=key)(inputs)`` is ``bptt_jax.unroll(model, rnn.params, xs)`` with
    batch-major inputs. For a cell, equivalent to::

        carry = initial_carry or model.zero_carry(B)
        for t in range(T):                          # over inputs[:, t], time-major inside
            new, _ = model.step(params, carry, inputs[:, t])
            carry = where(t < seq_lengths, new, carry)
            outputs[:, t] = hidden(carry)
        return (carry, outputs) if return_carry else outputs

    with the hand-written BPTT as its backward. Padded steps (``t >= seq_lengths[b]``) leave
    the carry unchanged; a bidirectional layer reverses each sequence's valid prefix.

    Equinox layers take one example and are ``jax.vmap`` -ed over a batch; this one takes a
    batch ``(B, T, D)`` (one ``unroll`` with its matmuls over ``B`` rows: faster than a
    ``vmap``), or one sequence ``(T, D)`` (``seq_lengths`` a scalar, ``mask`` ``(T,)``, the
    carry without its batch axis), which can be ``jax.vmap`` -ed like any Equinox layer.

    Args:
      model: a cell (``bptt_jax.Elman``, ``LSTM``, ``GRU``, the linear ``MinGRU``,
        ``MinLSTM``, ``RGLRU``, or your own), a ``bptt_jax.Bidirectional`` or a
        ``bptt_jax.Stack``.
      in_features: D; the params are ``model.init(key, D, dtype)``.
      key: the PRNG key for the init.
      params: instead of ``in_features`` and ``key``: the model's params to hold (e.g. from
        :func:`bptt_jax.interop.params_from_torch`).
      dtype: the params' dtype (inputs must have it; nothing is promoted).
      time_major: inputs and outputs ``(T, B, ...)`` instead of ``(B, T, ...)``.
      return_carry: also return the final carry, as ``(carry, outputs)``.
      inference: turn a ``Stack`` 's dropout off (``eqx.nn.inference_mode`` sets it).
      backward, truncate, segment, memory_budget, delta_clip, compute_dtype: passed to
        :func:`bptt_jax.unroll` (``compute_dtype=jnp.bfloat16``: bfloat16 compute with float32
        params and gradients, the precision policy).

    Example::

        import equinox as eqx, jax, jax.numpy as jnp, bptt_jax
        from bptt_jax.equinox import RNN

        model = bptt_jax.stacked(bptt_jax.GRU(8), 2, bidirectional=True)
        rnn = RNN(model, 3, key=jax.random.key(0))
        x = jnp.ones((4, 10, 3))                      # (B, T, D), batch-major
        y = rnn(x, seq_lengths=jnp.array([10, 7, 3, 1]))
        assert y.shape == (4, 10, 16)

        loss = lambda m, x: jnp.mean(m(x) ** 2)
        grads = eqx.filter_jit(eqx.filter_grad(loss))(rnn, x)   # the hand-written BPTT
        assert type(grads.params[1][0]) is bptt_jax.GRUParams
    """

    params: Any
    inference: bool
    model: Any = eqx.field(static=True)
    in_features: int | None = eqx.field(static=True)
    time_major: bool = eqx.field(static=True)
    return_carry: bool = eqx.field(static=True)
    unroll_options: tuple = eqx.field(static=True)

    def __init__(
        self,
        model,
        in_features: int | None = None,
        *,
        key: jax.Array | None = None,
        params: Any = None,
        dtype=jnp.float32,
        time_major: bool = False,
        return_carry: bool = False,
        inference: bool = False,
        **unroll_options,
    ):
        self.model = model
        self.unroll_options = tuple(_frameworks.check_options(_FN, unroll_options).items())
        self.time_major = bool(time_major)
        self.return_carry = bool(return_carry)
        self.inference = inference
        if params is None:
            if in_features is None or key is None:
                raise TypeError(
                    f"{_FN}: pass in_features and key (to initialise the params), or params"
                )
            params = model.init(key, in_features, dtype)
        else:
            d = _frameworks.input_size_of(model, params)
            if in_features is not None and d is not None and d != in_features:
                raise ValueError(
                    f"{_FN}: in_features={in_features} does not match the params' input size {d}"
                )
            in_features = in_features if d is None else d
        self.in_features = in_features
        self.params = params

    def __call__(
        self,
        inputs,
        initial_carry=None,
        *,
        seq_lengths=None,
        mask=None,
        return_carry: bool | None = None,
        key: jax.Array | None = None,
        inference: bool | None = None,
    ):
        """Run the model over ``inputs``.

        Args:
          inputs: ``(B, T, D)`` (``(T, B, D)`` with ``time_major``), or one sequence
            ``(T, D)``; the params' dtype.
          initial_carry: the model's carry (``model.zero_carry(B)`` 's structure, without
            the batch axis for one sequence); ``None`` for zeros.
          seq_lengths: ``(B,)`` integers in ``[0, T]`` (a scalar for one sequence): each
            sequence's length (right-padded); a length of 0 leaves the carry as it entered.
          mask: instead of ``seq_lengths``: ``(B, T)`` (``(T, B)`` with ``time_major``;
            ``(T,)`` for one sequence) bool or 0/1, a right-padding mask.
          return_carry: override the module's.
          key: the dropout key for a ``Stack`` with dropout (required unless ``inference``).
          inference: override the module's (``True``: no dropout).

        Returns:
          ``outputs`` ``(B, T, F)`` (``(T, B, F)`` with ``time_major``, ``(T, F)`` for one
          sequence), or ``(carry, outputs)`` with ``return_carry``.

        Raises:
          ValueError / TypeError naming the argument (``inputs``, ``seq_lengths``, ``mask``,
          ``initial_carry``, ``key``) before anything runs; ``seq_lengths`` values are
          checked when known (outside ``jit``).
        """
        return_carry = self.return_carry if return_carry is None else return_carry
        inference = self.inference if inference is None else inference
        xs, m, carry0, layout = _frameworks.prepare(
            _FN,
            self.model,
            self.params,
            inputs,
            time_major=self.time_major,
            seq_lengths=seq_lengths,
            mask=mask,
            initial_carry=initial_carry,
            in_features=self.in_features,
            allow_unbatched=True,
        )
        dropout_key = None
        if _frameworks.has_dropout(self.model) and not inference:
            if key is None:
                raise ValueError(
                    f"{_FN}: the model has dropout {self.model.dropout}; pass key= (a PRNG key) "
                    "or inference=True (eqx.nn.inference_mode) to turn dropout off"
                )
            dropout_key = key
        return _frameworks.call(
            self.model,
            self.params,
            xs,
            m,
            carry0,
            layout,
            dict(self.unroll_options),
            dropout_key,
            return_carry,
        )
