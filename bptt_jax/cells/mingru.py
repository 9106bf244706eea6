"""The minGRU cell (Feng et al. 2024): a GRU whose gates see the input only, a linear
recurrence walked as one scan, with its hand-written coefficient backward."""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bptt_jax.cells import _common, protocol


class MinGRUParams(NamedTuple):
    """Parameters of :class:`MinGRU` (no recurrent kernel: the gate sees ``x_t`` only)."""

    w_z: jax.Array  # (D, H) update-gate kernel
    w_h: jax.Array  # (D, H) candidate kernel
    b_z: jax.Array  # (H,)  update-gate bias
    b_h: jax.Array  # (H,)  candidate bias


@dataclasses.dataclass(frozen=True)
class MinGRU:
    """minGRU: a gated linear recurrence, trained by a hand-written parallel-scan BPTT::

        z_t   = sigmoid(x_t W_z + b_z)             # update gate
        h~_t  = x_t W_h + b_h                      # candidate
        h_t   = (1 - z_t) * h_{t-1} + z_t * h~_t

    ``h_t = a_t * h_{t-1} + b_t`` with ``a_t = 1 - z_t`` and ``b_t = z_t * h~_t``, both from
    the inputs alone, so the engine computes them for a chunk of steps with two matmuls over
    its rows and walks the chunk as one scan (:class:`~bptt_jax.cells.LinearCell`). The carry
    is the hidden state, an array ``(B, H)``.

    Args:
      hidden_size: H.
      scan: ``"auto"`` (by backend: sequential on a CPU, parallel on a GPU or TPU),
        ``"parallel"`` (an associative scan) or ``"sequential"`` (``lax.scan``); the same
        results either way, to rounding.

    Params are drawn from U(-1/sqrt(H), 1/sqrt(H)), as PyTorch's GRU draws its own.

    Example:
      >>> import jax, bptt_jax
      >>> cell = bptt_jax.MinGRU(16)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> hs, h_T = bptt_jax.unroll(cell, params, jax.numpy.ones((10, 2, 3)))
      >>> hs.shape
      (10, 2, 16)
      >>> bptt_jax.MinGRU(16, scan="parallel").scan
      'parallel'

    References:
      Feng, Tung, Ahmed, Bengio & Hajimirsadeghi, "Were RNNs all we needed?", 2024
      (arXiv:2410.01201), section 3.1: the minGRU's equations (not its log-space variant,
      whose candidate passes through a positive activation ``g``).
    """

    hidden_size: int
    scan: str = "auto"

    def __post_init__(self):
        _common.check_hidden_size("MinGRU", self.hidden_size)
        protocol.check_scan("MinGRU", self.scan)

    # ------------------------------------------------------------------ public face
    def init(self, key: jax.Array, input_size: int, dtype=jnp.float32) -> MinGRUParams:
        """Draw ``MinGRUParams(w_z (D, H), w_h (D, H), b_z (H,), b_h (H,))``."""
        _common.check_input_size("MinGRU", input_size)
        dtype = _common.check_float_dtype("MinGRU.init", dtype)
        h, bound = self.hidden_size, 1.0 / math.sqrt(self.hidden_size)
        kz, kh, kbz, kbh = jax.random.split(key, 4)
        return MinGRUParams(
            _common.uniform(kz, (input_size, h), bound, dtype),
            _common.uniform(kh, (input_size, h), bound, dtype),
            _common.uniform(kbz, (h,), bound, dtype),
            _common.uniform(kbh, (h,), bound, dtype),
        )

    def zero_carry(self, batch_size: int, dtype=jnp.float32) -> jax.Array:
        """The all-zero initial hidden state, ``(B, H)``."""
        dtype = _common.check_float_dtype("MinGRU.zero_carry", dtype)
        return jnp.zeros((batch_size, self.hidden_size), dtype)

    def step(self, params: MinGRUParams, carry: jax.Array, x: jax.Array):
        """One time step: ``(h_{t-1} (B, H), x_t (B, D)) -> (h_t, h_t)``."""
        (a, b), _ = self.coefficients(params, x)
        h = a * carry + b
        return h, h

    # ------------------------------ the linear path (bptt_jax.cells.LinearCell)
    def coefficients(self, params: MinGRUParams, xs: jax.Array):
        """``((a, b), (h~,))`` for inputs ``(..., D)``: ``a = 1 - z`` (formed as
        ``sigmoid(-pre_z)``, exact where ``z`` is near 1), ``b = z * h~``."""
        pre_z = _common.matmul(xs, params.w_z) + params.b_z
        cand = _common.matmul(xs, params.w_h) + params.b_h
        a = jax.nn.sigmoid(-pre_z)
        return (a, jax.nn.sigmoid(pre_z) * cand), (cand,)

    def coefficients_backward(self, params: MinGRUParams, xs, a, residuals, da, db):
        """``(dparams, dxs)`` for the errors ``da``, ``db`` on ``a = 1 - z`` and ``b = z h~``.

        ``dz = db h~ - da``, ``d pre_z = dz z (1 - z)``, ``d h~ = db z``; then every
        gradient is a matmul over the ``T*B`` rows.
        """
        (cand,) = residuals
        z = 1 - a
        d_pre_z = (db * cand - da) * z * a
        d_cand = db * z
        grads = MinGRUParams(
            _common.sum_over_rows(xs, d_pre_z, params.w_z),
            _common.sum_over_rows(xs, d_cand, params.w_h),
            jnp.sum(d_pre_z, axis=(0, 1)),
            jnp.sum(d_cand, axis=(0, 1)),
        )
        dxs = _common.matmul(d_pre_z, params.w_z.T) + _common.matmul(d_cand, params.w_h.T)
        return grads, dxs
