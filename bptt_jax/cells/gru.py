"""The GRU cell (PyTorch/cuDNN convention), with its hand-written step backward."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bptt_jax.cells import _common


class GRUParams(NamedTuple):
    """Parameters of :class:`GRU`; gate blocks along the last axis in order r, z, n."""

    w_x: jax.Array  # (D, 3H) input kernel
    w_h: jax.Array  # (H, 3H) recurrent kernel
    b_x: jax.Array  # (3H,)  input-side bias   (PyTorch's bias_ih)
    b_h: jax.Array  # (3H,)  recurrent-side bias (PyTorch's bias_hh)


@dataclasses.dataclass(frozen=True)
class GRU:
    """Gated recurrent unit, gates in PyTorch/cuDNN order **r, z, n**.

    The reset gate multiplies the recurrent projection *after* the matmul, as in PyTorch and
    cuDNN (not before it, as in the original paper)::

        r = sigmoid(x_t W_xr + b_xr + h_{t-1} W_hr + b_hr)
        z = sigmoid(x_t W_xz + b_xz + h_{t-1} W_hz + b_hz)
        n = tanh(x_t W_xn + b_xn + r * (h_{t-1} W_hn + b_hn))
        h_t = (1 - z) * n + z * h_{t-1}

    The carry is the hidden state, an array ``(B, H)``. Weights move to PyTorch as
    ``weight_ih_l0 = w_x.T``, ``weight_hh_l0 = w_h.T``, ``bias_ih_l0 = b_x``,
    ``bias_hh_l0 = b_h``.

    Args:
      hidden_size: H.
      init: ``"uniform"`` (PyTorch: U(-1/sqrt(H), 1/sqrt(H))) or ``"orthogonal"``.

    Example:
      >>> import jax, bptt_jax
      >>> cell = bptt_jax.GRU(16)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> hs, h_T = bptt_jax.unroll(cell, params, jax.numpy.ones((10, 2, 3)))
      >>> hs.shape
      (10, 2, 16)

    References:
      Cho et al., "Learning phrase representations using RNN encoder-decoder", 2014.
    """

    hidden_size: int
    init_scheme: str = "uniform"

    n_blocks = 3
    residual_blocks = 4  # r, z, n and the recurrent n-projection h W_hn + b_hn
    grad_blocks = 4  # d r, d z, d n (pre-activations) and r * d n
    input_grads = (0, 1, 2)  # x W_x: the pre-activations r, z, n
    recurrent_grads = (0, 1, 3)  # h W_h + b_h: r, z, and n's projection (times r)

    def __post_init__(self):
        _common.check_hidden_size("GRU", self.hidden_size)
        _common.check_init("GRU", self.init_scheme)

    # ------------------------------------------------------------------ public face
    def init(self, key: jax.Array, input_size: int, dtype=jnp.float32) -> GRUParams:
        """Draw ``GRUParams(w_x (D, 3H), w_h (H, 3H), b_x (3H,), b_h (3H,))``."""
        _common.check_input_size("GRU", input_size)
        dtype = _common.check_float_dtype("GRU.init", dtype)
        return GRUParams(
            *_common.init_kernels(key, input_size, self.hidden_size, 3, self.init_scheme, dtype)
        )

    def zero_carry(self, batch_size: int, dtype=jnp.float32) -> jax.Array:
        """The all-zero initial hidden state, ``(B, H)``."""
        dtype = _common.check_float_dtype("GRU.zero_carry", dtype)
        return jnp.zeros((batch_size, self.hidden_size), dtype)

    def step(self, params: GRUParams, carry: jax.Array, x: jax.Array):
        """One time step: ``(h_{t-1} (B, H), x_t (B, D)) -> (h_t, h_t)``."""
        xp = jnp.split(_common.matmul(x, params.w_x) + params.b_x, 3, axis=-1)
        new, _ = self.forward(params, carry, xp)
        return new, new

    # ------------------------------------- the fast path (bptt_jax.cells.FastCell)
    def input_kernel(self, params: GRUParams) -> jax.Array:
        return params.w_x

    def input_bias(self, params: GRUParams) -> jax.Array:
        return params.b_x

    def recurrent_kernel(self, params: GRUParams) -> jax.Array:
        return params.w_h

    def hidden(self, state: jax.Array) -> jax.Array:
        return state

    def add_to_hidden(self, dstate: jax.Array, dh: jax.Array) -> jax.Array:
        return dstate + dh

    def forward(self, params: GRUParams, carry: jax.Array, xp):
        hp = _common.matmul(carry, params.w_h) + params.b_h
        xr, xz, xn = xp
        hr, hz, hn = jnp.split(hp, 3, axis=-1)
        r = jax.nn.sigmoid(xr + hr)
        z = jax.nn.sigmoid(xz + hz)
        n = jnp.tanh(xn + r * hn)
        h = (1 - z) * n + z * carry
        # Residual: r, z, n and the recurrent n-projection; with h_t, 5 units of B*H.
        return h, (r, z, n, hn)

    def backward(self, params: GRUParams, res, state, state_prev, dstate, w_t):
        del state
        r, z, n, hn = res
        dh = dstate
        dn = dh * (1 - z) * (1 - n * n)  # d of n's pre-activation
        dz = dh * (state_prev - n) * z * (1 - z)
        dr = dn * hn * r * (1 - r)
        dhp = jnp.concatenate([dr, dz, dn * r], axis=-1)  # d of h_{t-1} W_h + b_h
        return dh * z + _common.matmul(dhp, w_t), (dr, dz, dn, dn * r)

    def assemble_grads(self, params, dw_x, dw_h, db_x, db_h) -> GRUParams:
        del params
        return GRUParams(dw_x, dw_h, db_x, db_h)
