"""The LSTM cell (PyTorch/cuDNN gate order), with its hand-written step backward."""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bptt_jax.cells import _common


class LSTMParams(NamedTuple):
    """Parameters of :class:`LSTM`; gate blocks along the last axis in order i, f, g, o."""

    w_x: jax.Array  # (D, 4H) input kernel
    w_h: jax.Array  # (H, 4H) recurrent kernel
    b: jax.Array  # (4H,)  bias (PyTorch's b_ih + b_hh)


class LSTMCarry(NamedTuple):
    """The LSTM state: hidden ``h`` and cell ``c``, each ``(B, H)``, in that order."""

    h: jax.Array
    c: jax.Array


@dataclasses.dataclass(frozen=True)
class LSTM:
    """Long short-term memory cell, gates in PyTorch/cuDNN order **i, f, g, o**.

    With ``z = x_t W_x + h_{t-1} W_h + b`` split into four ``(B, H)`` blocks::

        i = sigmoid(z_i)          # input gate
        f = sigmoid(z_f + forget_bias)
        g = tanh(z_g)             # candidate
        o = sigmoid(z_o)          # output gate
        c_t = f * c_{t-1} + i * g
        h_t = o * tanh(c_t)

    The carry is ``LSTMCarry(h, c)``. Weights move to PyTorch as
    ``weight_ih_l0 = w_x.T``, ``weight_hh_l0 = w_h.T``, ``bias_ih_l0 + bias_hh_l0 = b``.

    Args:
      hidden_size: H.
      forget_bias: added to the forget gate's pre-activation (0.0 by default, as PyTorch;
        1.0 is the common choice for long-range tasks).
      init: ``"uniform"`` (PyTorch: U(-1/sqrt(H), 1/sqrt(H))) or ``"orthogonal"``
        (orthogonal recurrent blocks, LeCun-normal input kernel, zero bias).

    Example:
      >>> import jax, bptt_jax
      >>> cell = bptt_jax.LSTM(16)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> hs, carry = bptt_jax.unroll(cell, params, jax.numpy.ones((10, 2, 3)))
      >>> hs.shape, carry.c.shape
      ((10, 2, 16), (2, 16))

    References:
      Hochreiter & Schmidhuber, "Long short-term memory", Neural Computation 1997;
      Gers, Schmidhuber & Cummins, "Learning to forget", 2000.
    """

    hidden_size: int
    forget_bias: float = 0.0
    init_scheme: str = "uniform"

    n_blocks = 4
    residual_blocks = 4  # i, f, g, o after their nonlinearities
    grad_blocks = 4  # d z_i, d z_f, d z_g, d z_o
    input_grads = (0, 1, 2, 3)  # the grad blocks of the input side, in gate order
    recurrent_grads = (0, 1, 2, 3)  # ... and of the recurrent side

    def __post_init__(self):
        _common.check_hidden_size("LSTM", self.hidden_size)
        _common.check_init("LSTM", self.init_scheme)
        if not isinstance(self.forget_bias, (int, float)) or isinstance(self.forget_bias, bool):
            raise TypeError(f"LSTM: forget_bias must be a float; got {self.forget_bias!r}")
        if not math.isfinite(self.forget_bias):  # NaN or inf: every forget gate NaN or 0/1
            raise ValueError(
                f"LSTM: forget_bias must be a finite number (e.g. 1.0); got {self.forget_bias!r}"
            )

    # ------------------------------------------------------------------ public face
    def init(self, key: jax.Array, input_size: int, dtype=jnp.float32) -> LSTMParams:
        """Draw ``LSTMParams(w_x (D, 4H), w_h (H, 4H), b (4H,))`` of ``dtype``."""
        _common.check_input_size("LSTM", input_size)
        dtype = _common.check_float_dtype("LSTM.init", dtype)
        w_x, w_h, b1, b2 = _common.init_kernels(
            key, input_size, self.hidden_size, 4, self.init_scheme, dtype
        )
        return LSTMParams(w_x, w_h, b1 + b2 if self.init_scheme == "uniform" else b1)

    def zero_carry(self, batch_size: int, dtype=jnp.float32) -> LSTMCarry:
        """``LSTMCarry(h=0, c=0)``, each ``(B, H)``."""
        dtype = _common.check_float_dtype("LSTM.zero_carry", dtype)
        z = jnp.zeros((batch_size, self.hidden_size), dtype)
        return LSTMCarry(z, z)

    def step(self, params: LSTMParams, carry: LSTMCarry, x: jax.Array):
        """One time step: ``(LSTMCarry, x_t (B, D)) -> (LSTMCarry, h_t)``."""
        xp = _common.matmul(x, params.w_x) + self._bias(params)
        new, _ = self.forward(params, carry, jnp.split(xp, 4, axis=-1))
        return new, new.h

    # ------------------------------------- the fast path (bptt_jax.cells.FastCell)
    def _bias(self, params: LSTMParams) -> jax.Array:
        if self.forget_bias == 0.0:
            return params.b
        h = self.hidden_size
        return params.b.at[h : 2 * h].add(jnp.asarray(self.forget_bias, params.b.dtype))

    def input_kernel(self, params: LSTMParams) -> jax.Array:
        return params.w_x

    def input_bias(self, params: LSTMParams) -> jax.Array:
        return self._bias(params)

    def recurrent_kernel(self, params: LSTMParams) -> jax.Array:
        return params.w_h

    def hidden(self, state: LSTMCarry) -> jax.Array:
        return state.h

    def add_to_hidden(self, dstate: LSTMCarry, dh: jax.Array) -> LSTMCarry:
        return LSTMCarry(dstate.h + dh, dstate.c)

    def forward(self, params: LSTMParams, carry: LSTMCarry, xp):
        hz = jnp.split(_common.matmul(carry.h, params.w_h), 4, axis=-1)
        zi, zf, zg, zo = (a + b for a, b in zip(xp, hz))
        i, f, o = jax.nn.sigmoid(zi), jax.nn.sigmoid(zf), jax.nn.sigmoid(zo)
        g = jnp.tanh(zg)
        c = f * carry.c + i * g
        h = o * jnp.tanh(c)
        # Residual: the four activated gates. With the state (h_t, c_t) that the engine
        # stacks anyway, that is 6 units of B*H per step.
        return LSTMCarry(h, c), (i, f, g, o)

    def backward(
        self, params: LSTMParams, res, state: LSTMCarry, state_prev: LSTMCarry, dstate, w_t
    ):
        i, f, g, o = res
        tc = jnp.tanh(state.c)
        dh, dc = dstate.h, dstate.c
        dc = dc + dh * o * (1 - tc * tc)  # total error reaching c_t
        dz = (
            dc * g * i * (1 - i),  # d z_i
            dc * state_prev.c * f * (1 - f),  # d z_f
            dc * i * (1 - g * g),  # d z_g
            dh * tc * o * (1 - o),  # d z_o
        )
        return LSTMCarry(_common.matmul(jnp.concatenate(dz, axis=-1), w_t), dc * f), dz

    def assemble_grads(self, params, dw_x, dw_h, db_x, db_h) -> LSTMParams:
        del params, db_h  # one bias: db_x = db_h = sum_t d z_t
        return LSTMParams(dw_x, dw_h, db_x)
