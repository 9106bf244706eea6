"""The Elman RNN cell, with its hand-written step backward."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bptt_jax.cells import _common


class ElmanParams(NamedTuple):
    """Parameters of :class:`Elman`. Kernels are laid out ``(in, out)``."""

    w_xh: jax.Array  # (D, H) input kernel, W_xh
    w_hh: jax.Array  # (H, H) recurrent kernel, W_hh
    b_h: jax.Array  # (H,)   bias


@dataclasses.dataclass(frozen=True)
class Elman:
    """Elman RNN cell: ``h_t = f(x_t W_xh + h_{t-1} W_hh + b_h)``.

    The carry is the hidden state itself, an array ``(B, H)``. One step, in ``lax.scan``
    order, is equivalent to::

        def step(params, h, x):          # h: (B, H), x: (B, D)
            h = f(x @ params.w_xh + h @ params.w_hh + params.b_h)
            return h, h

    Args:
      hidden_size: H, the number of hidden units.
      activation: ``f``; one of ``"tanh"`` (default), ``"relu"``, ``"identity"``,
        ``"sigmoid"``. Only activations whose derivative is a function of their output are
        offered, so the backward needs only ``h_t`` (``tanh'(a) = 1 - h^2``).
      init: ``"uniform"`` (PyTorch: all entries U(-1/sqrt(H), 1/sqrt(H))) or
        ``"orthogonal"`` (orthogonal W_hh, LeCun-normal W_xh, zero bias).

    Example:
      >>> import jax, bptt_jax
      >>> cell = bptt_jax.Elman(32)
      >>> params = cell.init(jax.random.key(0), input_size=8)
      >>> xs = jax.numpy.ones((20, 4, 8))            # (T, B, D), time-major
      >>> hs, h_T = bptt_jax.unroll(cell, params, xs)
      >>> hs.shape, h_T.shape
      ((20, 4, 32), (4, 32))

    References:
      Elman, "Finding structure in time", Cognitive Science 1990.
    """

    hidden_size: int
    activation: str = "tanh"
    init_scheme: str = "uniform"

    n_blocks = 1  # gate blocks in the kernels: (D, n_blocks * H)
    residual_blocks = 0  # nothing kept per step but h_t itself
    grad_blocks = 1  # d a_t, (B, H)
    input_grads = (0,)  # the grad blocks of the input side, in gate order
    recurrent_grads = (0,)  # ... and of the recurrent side

    def __post_init__(self):
        _common.check_hidden_size("Elman", self.hidden_size)
        if self.activation not in _common.ACTIVATIONS:
            raise ValueError(
                f"Elman: activation must be one of {tuple(_common.ACTIVATIONS)}; "
                f"got {self.activation!r}"
            )
        _common.check_init("Elman", self.init_scheme)

    # ------------------------------------------------------------------ public face
    def init(self, key: jax.Array, input_size: int, dtype=jnp.float32) -> ElmanParams:
        """Draw parameters for inputs of size ``input_size`` (D).

        Returns:
          ``ElmanParams(w_xh (D, H), w_hh (H, H), b_h (H,))`` of ``dtype``.
        """
        _common.check_input_size("Elman", input_size)
        dtype = _common.check_float_dtype("Elman.init", dtype)
        w_x, w_h, b, _ = _common.init_kernels(
            key, input_size, self.hidden_size, 1, self.init_scheme, dtype
        )
        return ElmanParams(w_x, w_h, b)

    def zero_carry(self, batch_size: int, dtype=jnp.float32) -> jax.Array:
        """The all-zero initial hidden state, ``(B, H)``."""
        dtype = _common.check_float_dtype("Elman.zero_carry", dtype)
        return jnp.zeros((batch_size, self.hidden_size), dtype)

    def step(self, params: ElmanParams, carry: jax.Array, x: jax.Array):
        """One time step: ``(h_{t-1} (B, H), x_t (B, D)) -> (h_t, h_t)``."""
        f = _common.ACTIVATIONS[self.activation].fn
        h = f(_common.matmul(x, params.w_xh) + _common.matmul(carry, params.w_hh) + params.b_h)
        return h, h

    # ------------------------------------- the fast path (bptt_jax.cells.FastCell)
    def input_kernel(self, params: ElmanParams) -> jax.Array:
        return params.w_xh

    def input_bias(self, params: ElmanParams) -> jax.Array:
        return params.b_h

    def recurrent_kernel(self, params: ElmanParams) -> jax.Array:
        return params.w_hh

    def hidden(self, state: jax.Array) -> jax.Array:
        return state

    def add_to_hidden(self, dstate: jax.Array, dh: jax.Array) -> jax.Array:
        return dstate + dh

    def forward(self, params: ElmanParams, carry: jax.Array, xp):
        f = _common.ACTIVATIONS[self.activation].fn
        (xa,) = xp
        # h_t is the state: nothing else to keep
        return f(xa + _common.matmul(carry, params.w_hh)), ()

    def backward(self, params: ElmanParams, res, state, state_prev, dstate, w_t):
        del res, state_prev
        # delta^a_t = (dL/dh_t) * f'(a_t), with f'(a_t) read off h_t.
        da = dstate * _common.ACTIVATIONS[self.activation].grad_from_output(state)
        return _common.matmul(da, w_t), (da,)

    def assemble_grads(self, params, dw_x, dw_h, db_x, db_h) -> ElmanParams:
        del params, db_h  # one bias: db_x = db_h = sum_t d a_t
        return ElmanParams(dw_x, dw_h, db_x)
