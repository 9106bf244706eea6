"""The minLSTM cell (Feng et al. 2024): normalised forget and input gates that see the input
only, a linear recurrence walked as one scan, with its hand-written coefficient backward."""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bptt_jax.cells import _common, protocol


class MinLSTMParams(NamedTuple):
    """Parameters of :class:`MinLSTM` (no recurrent kernel: the gates see ``x_t`` only)."""

    w_f: jax.Array  # (D, H) forget-gate kernel
    w_i: jax.Array  # (D, H) input-gate kernel
    w_h: jax.Array  # (D, H) candidate kernel
    b_f: jax.Array  # (H,)
    b_i: jax.Array  # (H,)
    b_h: jax.Array  # (H,)


@dataclasses.dataclass(frozen=True)
class MinLSTM:
    """minLSTM: an LSTM reduced to a gated linear recurrence, trained by a hand-written
    parallel-scan BPTT::

        f_t  = sigmoid(x_t W_f + b_f),  i_t = sigmoid(x_t W_i + b_i)
        f'_t = f_t / (f_t + i_t),       i'_t = i_t / (f_t + i_t)      # normalised
        h~_t = x_t W_h + b_h                                          # candidate
        h_t  = f'_t * h_{t-1} + i'_t * h~_t

    ``h_t = a_t * h_{t-1} + b_t`` with ``a_t = f'_t`` and ``b_t = i'_t * h~_t``, from the
    inputs alone (:class:`~bptt_jax.cells.LinearCell`). ``f'_t`` is formed in log space,
    ``sigmoid(log f_t - log i_t)``, finite however small both gates are. The carry is the
    hidden state, an array ``(B, H)`` (no separate cell state: ``c_t`` is ``h_t``).

    Args:
      hidden_size: H.
      scan: ``"auto"``, ``"parallel"`` or ``"sequential"``, as for :class:`~bptt_jax.MinGRU`.

    Params are drawn from U(-1/sqrt(H), 1/sqrt(H)), as PyTorch's LSTM draws its own.

    Example:
      >>> import jax, bptt_jax
      >>> cell = bptt_jax.MinLSTM(16)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> hs, h_T = bptt_jax.unroll(cell, params, jax.numpy.ones((10, 2, 3)))
      >>> hs.shape, h_T.shape
      ((10, 2, 16), (2, 16))

    References:
      Feng, Tung, Ahmed, Bengio & Hajimirsadeghi, "Were RNNs all we needed?", 2024
      (arXiv:2410.01201), section 3.2: the minLSTM's equations (not its log-space variant,
      whose candidate passes through a positive activation ``g``).
    """

    hidden_size: int
    scan: str = "auto"

    def __post_init__(self):
        _common.check_hidden_size("MinLSTM", self.hidden_size)
        protocol.check_scan("MinLSTM", self.scan)

    # ------------------------------------------------------------------ public face
    def init(self, key: jax.Array, input_size: int, dtype=jnp.float32) -> MinLSTMParams:
        """Draw ``MinLSTMParams(w_f, w_i, w_h (D, H), b_f, b_i, b_h (H,))``."""
        _common.check_input_size("MinLSTM", input_size)
        dtype = _common.check_float_dtype("MinLSTM.init", dtype)
        h, bound = self.hidden_size, 1.0 / math.sqrt(self.hidden_size)
        keys = jax.random.split(key, 6)
        shapes = [(input_size, h)] * 3 + [(h,)] * 3
        return MinLSTMParams(
            *(_common.uniform(k, s, bound, dtype) for k, s in zip(keys, shapes, strict=True))
        )

    def zero_carry(self, batch_size: int, dtype=jnp.float32) -> jax.Array:
        """The all-zero initial hidden state, ``(B, H)``."""
        dtype = _common.check_float_dtype("MinLSTM.zero_carry", dtype)
        return jnp.zeros((batch_size, self.hidden_size), dtype)

    def step(self, params: MinLSTMParams, carry: jax.Array, x: jax.Array):
        """One time step: ``(h_{t-1} (B, H), x_t (B, D)) -> (h_t, h_t)``."""
        (a, b), _ = self.coefficients(params, x)
        h = a * carry + b
        return h, h

    # ------------------------------ the linear path (bptt_jax.cells.LinearCell)
    def coefficients(self, params: MinLSTMParams, xs: jax.Array):
        """``((a, b), (h~, 1 - f, 1 - i))`` for inputs ``(..., D)``: ``a = f'``,
        ``b = i' h~``."""
        pre_f = _common.matmul(xs, params.w_f) + params.b_f
        pre_i = _common.matmul(xs, params.w_i) + params.b_i
        cand = _common.matmul(xs, params.w_h) + params.b_h
        # log f - log i = softplus(-pre_i) - softplus(-pre_f); f' = sigmoid of it
        logit = jax.nn.softplus(-pre_i) - jax.nn.softplus(-pre_f)
        a = jax.nn.sigmoid(logit)
        b = jax.nn.sigmoid(-logit) * cand
        return (a, b), (cand, jax.nn.sigmoid(-pre_f), jax.nn.sigmoid(-pre_i))

    def coefficients_backward(self, params: MinLSTMParams, xs, a, residuals, da, db):
        """``(dparams, dxs)`` for the errors ``da``, ``db`` on ``a = f'`` and ``b = i' h~``.

        With ``g = (da - db h~) f' i'``: ``d pre_f = g (1 - f)``, ``d pre_i = -g (1 - i)``
        and ``d h~ = db i'``; then every gradient is a matmul over the ``T*B`` rows.
        """
        cand, not_f, not_i = residuals
        i_norm = 1 - a
        g = (da - db * cand) * a * i_norm
        d_pre = (g * not_f, -g * not_i, db * i_norm)  # f, i, h~
        kernels = (params.w_f, params.w_i, params.w_h)
        grads = MinLSTMParams(
            *(_common.sum_over_rows(xs, d, w) for d, w in zip(d_pre, kernels, strict=True)),
            *(jnp.sum(d, axis=(0, 1)) for d in d_pre),
        )
        dxs = sum(_common.matmul(d, w.T) for d, w in zip(d_pre, kernels, strict=True))
        return grads, dxs
