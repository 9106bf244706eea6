"""Griffin's RG-LRU (De et al. 2024): a real, gated, diagonal linear recurrence whose decay
is gated by the input, walked as one scan, with its hand-written coefficient backward."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bptt_jax.cells import _common, protocol

#: The interval ``a^c = sigmoid(Lambda)^c`` is drawn uniformly from at initialisation.
A_C_RANGE = (0.9, 0.999)


class RGLRUParams(NamedTuple):
    """Parameters of :class:`RGLRU` (no recurrent kernel: the gates see ``x_t`` only)."""

    w_in: jax.Array  # (D, H) input projection x^_t = x_t W_in + b_in
    w_a: jax.Array  # (D, H) recurrence-gate kernel
    w_x: jax.Array  # (D, H) input-gate kernel
    b_in: jax.Array  # (H,)
    b_a: jax.Array  # (H,)
    b_x: jax.Array  # (H,)
    lam: jax.Array  # (H,)  Lambda: a_t = sigmoid(Lambda)^(c r_t)


def _check_c(c) -> float:
    if isinstance(c, bool) or not isinstance(c, numbers.Real) or not math.isfinite(c) or c <= 0:
        raise ValueError(f"RGLRU: c must be a positive finite number (c > 0); got {c!r}")
    return float(c)


@dataclasses.dataclass(frozen=True)
class RGLRU:
    """RG-LRU, Griffin's Real-Gated Linear Recurrent Unit, trained by a hand-written
    parallel-scan BPTT::

        x^_t    = x_t W_in + b_in                      # the input, projected to H
        r_t     = sigmoid(x_t W_a + b_a)               # recurrence gate
        i_t     = sigmoid(x_t W_x + b_x)               # input gate
        log a_t = -c * r_t * softplus(-Lambda)         # a_t = sigmoid(Lambda)^(c r_t)
        h_t     = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * x^_t)

    ``h_t = a_t * h_{t-1} + b_t`` with ``b_t = sqrt(1 - a_t^2) i_t x^_t``, both from the
    inputs alone (:class:`~bptt_jax.cells.LinearCell`): three matmuls over a chunk's rows,
    then one scan. ``a_t`` is formed in log space and ``sqrt(1 - a_t^2)`` as
    ``sqrt(-expm1(2 log a_t))``, exact however close ``a_t`` is to 1. Its derivative
    ``-a_t^2 / sqrt(1 - a_t^2)`` (per unit of ``log a_t``) grows without bound as ``a_t -> 1``,
    but the product with ``d log a_t / d(x_t W_a + b_a)`` does not: the backward forms that
    product as ``log a_t / sqrt(1 - a_t^2)``, which goes to 0, so the gradients stay finite
    even where the gate ``r_t`` underflows to 0 (``a_t = 1``), where autodiff of the
    equations gives NaN. The carry is the hidden state, an array ``(B, H)``.

    Args:
      hidden_size: H.
      c: the constant scaling the gated decay (the paper's c = 8); a positive number.
      scan: ``"auto"``, ``"parallel"`` or ``"sequential"``, as for :class:`~bptt_jax.MinGRU`.

    Initialisation: ``Lambda`` such that ``a^c = sigmoid(Lambda)^c`` is uniform in
    ``[0.9, 0.999]`` (the paper's section 2.4); the kernels and biases from
    U(-1/sqrt(D), 1/sqrt(D)), PyTorch's ``nn.Linear`` default for a projection from D inputs.

    Raises:
      ValueError: ``c <= 0`` (or not a finite number), a bad ``hidden_size`` or ``scan``.

    Example:
      >>> import jax, jax.numpy as jnp, bptt_jax
      >>> cell = bptt_jax.RGLRU(16)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> hs, h_T = bptt_jax.unroll(cell, params, jnp.ones((10, 2, 3)))
      >>> hs.shape, h_T.shape
      ((10, 2, 16), (2, 16))
      >>> a_c = jax.nn.sigmoid(params.lam) ** cell.c      # a^c at initialisation
      >>> bool(jnp.all((a_c > 0.8999) & (a_c < 0.9991)))
      True
      >>> bptt_jax.RGLRU(16, c=-1.0)
      Traceback (most recent call last):
      ...
      ValueError: RGLRU: c must be a positive finite number (c > 0); got -1.0

    References:
      De, Smith, Fernando, Botev, Cristian-Muraru, Gu, Haroun, Berrada, Chen, Srinivasan,
      Desjardins, Doucet, Budden, Teh, Pascanu, de Freitas & Gulcehre, "Griffin: mixing
      gated linear recurrences with local attention for efficient language models", 2024
      (arXiv:2402.19427), section 2.4: the RG-LRU's equations and initialisation. Griffin
      feeds it a projection of the block's input (and a convolution), here ``x^_t``; its
      gates see the raw input ``x_t``. Google DeepMind's recurrentgemma stores
      ``-Lambda`` (``log a_t = -c r_t softplus(a_param)``) and draws ``sigmoid(Lambda)``
      itself in [0.9, 0.999].
    """

    hidden_size: int
    c: float = 8.0
    scan: str = "auto"

    def __post_init__(self):
        _common.check_hidden_size("RGLRU", self.hidden_size)
        object.__setattr__(self, "c", _check_c(self.c))
        protocol.check_scan("RGLRU", self.scan)

    # ------------------------------------------------------------------ public face
    def init(self, key: jax.Array, input_size: int, dtype=jnp.float32) -> RGLRUParams:
        """Draw ``RGLRUParams(w_in, w_a, w_x (D, H), b_in, b_a, b_x, lam (H,))``."""
        _common.check_input_size("RGLRU", input_size)
        dtype = _common.check_float_dtype("RGLRU.init", dtype)
        h, bound = self.hidden_size, 1.0 / math.sqrt(input_size)
        keys = jax.random.split(key, 7)
        shapes = [(input_size, h)] * 3 + [(h,)] * 3
        return RGLRUParams(
            *(_common.uniform(k, s, bound, dtype) for k, s in zip(keys[:6], shapes, strict=True)),
            self._init_lambda(keys[6], dtype),
        )

    def _init_lambda(self, key, dtype) -> jax.Array:
        """``Lambda`` with ``sigmoid(Lambda)^c = u ~ U(0.9, 0.999)``: ``softplus(-Lambda) =
        -log(u) / c``, so ``Lambda = -log(expm1(-log(u) / c))`` (drawn in float32 or wider)."""
        wide = dtype if dtype.itemsize >= 4 else jnp.dtype(jnp.float32)
        u = jax.random.uniform(key, (self.hidden_size,), wide, *A_C_RANGE)
        return (-jnp.log(jnp.expm1(-jnp.log(u) / self.c))).astype(dtype)

    def zero_carry(self, batch_size: int, dtype=jnp.float32) -> jax.Array:
        """The all-zero initial hidden state, ``(B, H)``."""
        dtype = _common.check_float_dtype("RGLRU.zero_carry", dtype)
        return jnp.zeros((batch_size, self.hidden_size), dtype)

    def step(self, params: RGLRUParams, carry: jax.Array, x: jax.Array):
        """One time step: ``(h_{t-1} (B, H), x_t (B, D)) -> (h_t, h_t)``."""
        (a, b), _ = self.coefficients(params, x)
        h = a * carry + b
        return h, h

    # ------------------------------ the linear path (bptt_jax.cells.LinearCell)
    def _decay(self, lam, r):
        """``(s, m)``: ``s = -log a = c r softplus(-Lambda)`` and ``m = sqrt(1 - a^2)``."""
        s = self.c * r * jax.nn.softplus(-lam)
        return s, jnp.sqrt(-jnp.expm1(-2 * s))

    def coefficients(self, params: RGLRUParams, xs: jax.Array):
        """``((a, b), (x^, i, r))`` for inputs ``(..., D)``: ``a = exp(-c r softplus(-Lambda))``,
        ``b = sqrt(1 - a^2) i x^``."""
        x_hat = _common.matmul(xs, params.w_in) + params.b_in
        r = jax.nn.sigmoid(_common.matmul(xs, params.w_a) + params.b_a)
        i = jax.nn.sigmoid(_common.matmul(xs, params.w_x) + params.b_x)
        s, m = self._decay(params.lam, r)
        return (jnp.exp(-s), m * i * x_hat), (x_hat, i, r)

    def coefficients_backward(self, params: RGLRUParams, xs, a, residuals, da, db):
        """``(dparams, dxs)`` for the errors ``da``, ``db`` on ``a`` and ``b = m i x^``
        (``m = sqrt(1 - a^2)``, ``s = -log a``).

        ``dL/ds = -da a + dm a^2 / m`` with ``dm = db i x^``; every use of it is multiplied
        by ``s`` (``ds / d pre_a = s (1 - r)``, ``ds / dLambda = -s sigmoid(-Lambda) /
        softplus(-Lambda)``), so the backward forms ``g = s dL/ds = -da a s + dm a^2 (s / m)``,
        where ``s / m`` goes to 0 with ``s`` (taken as 0 at ``s = 0``). Then
        ``d pre_a = g (1 - r)``, ``d pre_x = db m x^ i (1 - i)``, ``d x^ = db m i`` and every
        gradient is a matmul over the ``T*B`` rows.
        """
        x_hat, i, r = residuals
        s, m = self._decay(params.lam, r)
        positive = m > 0
        s_over_m = jnp.where(positive, s / jnp.where(positive, m, 1), 0)
        g = (db * i * x_hat) * (a * a * s_over_m) - da * a * s
        d_pre = (db * m * i, g * (1 - r), db * m * x_hat * i * (1 - i))  # x^, a, x
        kernels = (params.w_in, params.w_a, params.w_x)
        sp = jax.nn.softplus(-params.lam)
        ratio = jnp.where(sp > 0, jax.nn.sigmoid(-params.lam) / jnp.where(sp > 0, sp, 1), 1)
        grads = RGLRUParams(
            *(_common.sum_over_rows(xs, d, w) for d, w in zip(d_pre, kernels, strict=True)),
            *(jnp.sum(d, axis=(0, 1)) for d in d_pre),
            -ratio * jnp.sum(g, axis=(0, 1)),
        )
        dxs = sum(_common.matmul(d, w.T) for d, w in zip(d_pre, kernels, strict=True))
        return grads, dxs
