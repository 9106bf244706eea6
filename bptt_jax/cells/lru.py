"""The Linear Recurrent Unit (Orvieto et al. 2023): a complex diagonal linear recurrence with
an output map, walked as one scan, with its hand-written coefficient and output backward."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bptt_jax.cells import _common, protocol


class LRUParams(NamedTuple):
    """Parameters of :class:`LRU`: real arrays, a complex matrix as its real and imaginary
    parts."""

    nu_log: jax.Array  # (N,)  |lambda| = exp(-exp(nu_log))
    theta_log: jax.Array  # (N,)  arg lambda = exp(theta_log)
    gamma_log: jax.Array  # (N,)  the input normalisation exp(gamma_log)
    b_re: jax.Array  # (D, N) B, real part (the input kernel, x_t B)
    b_im: jax.Array  # (D, N) B, imaginary part
    c_re: jax.Array  # (N, H) C, real part (the output kernel, h_t C)
    c_im: jax.Array  # (N, H) C, imaginary part
    d: jax.Array  # (H,) the skip D * x_t (D == H), else a (D, H) kernel x_t D


def _wide(dtype):
    """``dtype``, or float32 if narrower: complex numbers need float32 parts or wider."""
    return jnp.dtype(dtype) if jnp.dtype(dtype).itemsize >= 4 else jnp.dtype(jnp.float32)


def _check_unit(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
        raise ValueError(f"LRU: {name} must be a number in [0, 1]; got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class LRU:
    """The LRU, the Linear Recurrent Unit, trained by a hand-written parallel-scan BPTT::

        lambda = exp(-exp(nu_log) + i exp(theta_log))            # (N,) complex, |lambda| < 1
        h_t    = lambda * h_{t-1} + exp(gamma_log) * (x_t B)     # complex state (B, N)
        y_t    = Re(h_t C) + D * x_t                             # the output (B, H)

    ``h_t = a_t * h_{t-1} + b_t`` with ``a_t = lambda`` and ``b_t = exp(gamma_log) x_t B``:
    a :class:`~bptt_jax.cells.LinearCell` with complex coefficients and an output map. The
    carry is the complex state as one real array ``(B, 2N)``, its real parts then its
    imaginary parts; the params are real arrays (:class:`LRUParams`). The outputs ``y_t`` are
    not the carry: at a padded step they are zeros. The skip ``D * x_t`` is the paper's
    elementwise one when the input size is ``hidden_size``; for another input size ``D`` is a
    ``(D, H)`` kernel.

    Args:
      hidden_size: H, the size of the outputs.
      state_size: N, the complex units of the state (the carry holds 2N reals); ``None``:
        ``hidden_size``.
      r_min, r_max: the ring ``r_min <= |lambda| <= r_max`` the eigenvalues are drawn on,
        ``0 <= r_min < r_max <= 1``.
      max_phase: the largest phase ``arg lambda`` drawn, ``> 0``.
      scan: ``"auto"``, ``"parallel"`` or ``"sequential"``, as for :class:`~bptt_jax.MinGRU`.

    Initialisation (the paper's): ``|lambda|^2`` uniform in ``[r_min^2, r_max^2]``, the
    phase uniform in ``[0, max_phase]``; ``gamma = sqrt(1 - |lambda|^2)`` (so a state fed
    white noise keeps unit variance); ``B`` complex normal with variance ``1/D`` (each part
    ``1/(2D)``), ``C`` with variance ``1/N`` per part, ``D`` standard normal.

    Raises:
      ValueError: ``r_min >= r_max`` or either outside [0, 1], ``max_phase <= 0``, a bad
        size or ``scan``.

    Example:
      >>> import jax, jax.numpy as jnp, bptt_jax
      >>> cell = bptt_jax.LRU(8, state_size=16)
      >>> params = cell.init(jax.random.key(0), input_size=8)
      >>> hs, h_T = bptt_jax.unroll(cell, params, jnp.ones((10, 2, 8)))
      >>> hs.shape, h_T.shape                   # outputs (T, B, H); the carry (B, 2N)
      ((10, 2, 8), (2, 32))
      >>> modulus = jnp.exp(-jnp.exp(params.nu_log))
      >>> bool(jnp.all((modulus >= 0.0) & (modulus < 1.0)))
      True
      >>> bptt_jax.LRU(8, 16, r_min=0.9, r_max=0.5)
      Traceback (most recent call last):
      ...
      ValueError: LRU: r_min must be < r_max; got r_min=0.9, r_max=0.5

    References:
      Orvieto, Smith, Gu, Fernando, Gulcehre, Pascanu & De, "Resurrecting recurrent neural
      networks for long sequences", ICML 2023 (arXiv:2303.06349), section 3 and appendix A:
      the LRU's equations, its ring initialisation and the gamma normalisation.
    """

    hidden_size: int
    state_size: int | None = None
    r_min: float = 0.0
    r_max: float = 1.0
    max_phase: float = 2 * math.pi
    scan: str = "auto"

    def __post_init__(self):
        _common.check_hidden_size("LRU", self.hidden_size)
        if self.state_size is None:
            object.__setattr__(self, "state_size", self.hidden_size)
        if (
            isinstance(self.state_size, bool)
            or not isinstance(self.state_size, int)
            or (self.state_size <= 0)
        ):
            raise ValueError(f"LRU: state_size must be a positive int; got {self.state_size!r}")
        r_min, r_max = _check_unit("r_min", self.r_min), _check_unit("r_max", self.r_max)
        if r_min >= r_max:
            raise ValueError(f"LRU: r_min must be < r_max; got r_min={r_min}, r_max={r_max}")
        phase = self.max_phase
        if (
            isinstance(phase, bool)
            or not isinstance(phase, numbers.Real)
            or not (math.isfinite(phase) and phase > 0)
        ):
            raise ValueError(f"LRU: max_phase must be a positive finite number; got {phase!r}")
        object.__setattr__(self, "r_min", r_min)
        object.__setattr__(self, "r_max", r_max)
        object.__setattr__(self, "max_phase", float(phase))
        protocol.check_scan("LRU", self.scan)

    @property
    def output_size(self) -> int:
        """H, the features of the outputs ``y_t`` (the carry has 2N)."""
        return self.hidden_size

    # ------------------------------------------------------------------ public face
    def init(self, key: jax.Array, input_size: int, dtype=jnp.float32) -> LRUParams:
        """Draw :class:`LRUParams` for inputs of size D (``d`` is ``(H,)`` if D = H, else
        ``(D, H)``)."""
        _common.check_input_size("LRU", input_size)
        dtype = _common.check_float_dtype("LRU.init", dtype)
        n, h, d_in = self.state_size, self.hidden_size, input_size
        wide = dtype if dtype.itemsize >= 4 else jnp.dtype(jnp.float32)
        k = jax.random.split(key, 7)
        u1, u2 = jax.random.uniform(k[0], (n,), wide), jax.random.uniform(k[1], (n,), wide)
        r2 = u1 * (self.r_max**2 - self.r_min**2) + self.r_min**2  # |lambda|^2
        r2 = jnp.maximum(r2, jnp.finfo(wide).tiny)  # |lambda| = 0 has no log
        nu_log = jnp.log(-0.5 * jnp.log(r2))
        theta_log = jnp.log(jnp.maximum(self.max_phase * u2, jnp.finfo(wide).tiny))
        gamma_log = 0.5 * jnp.log1p(-r2)
        normal = lambda key_, shape, scale: scale * jax.random.normal(key_, shape, wide)  # noqa: E731
        skip = (h,) if d_in == h else (d_in, h)
        return LRUParams(
            *(v.astype(dtype) for v in (nu_log, theta_log, gamma_log)),
            normal(k[2], (d_in, n), 1 / math.sqrt(2 * d_in)).astype(dtype),
            normal(k[3], (d_in, n), 1 / math.sqrt(2 * d_in)).astype(dtype),
            normal(k[4], (n, h), 1 / math.sqrt(n)).astype(dtype),
            normal(k[5], (n, h), 1 / math.sqrt(n)).astype(dtype),
            normal(k[6], skip, 1.0).astype(dtype),
        )

    def zero_carry(self, batch_size: int, dtype=jnp.float32) -> jax.Array:
        """The all-zero initial state, ``(B, 2N)``: real parts, then imaginary parts."""
        dtype = _common.check_float_dtype("LRU.zero_carry", dtype)
        return jnp.zeros((batch_size, 2 * self.state_size), dtype)

    def step(self, params: LRUParams, carry: jax.Array, x: jax.Array):
        """One time step: ``(h_{t-1} (B, 2N), x_t (B, D)) -> (h_t, y_t (B, H))``."""
        (a, b), _ = self.coefficients(params, x)
        n, real = self.state_size, _wide(carry.dtype)
        h = a * lax.complex(carry[..., :n].astype(real), carry[..., n:].astype(real)) + b
        new = jnp.concatenate([jnp.real(h), jnp.imag(h)], axis=-1).astype(carry.dtype)
        return new, self.output(params, new, x)

    # ------------------------------ the linear path (bptt_jax.cells.LinearCell)
    @staticmethod
    def _lambda(params: LRUParams, dtype):
        """``lambda`` (N,) complex: ``exp(-exp(nu_log) + i exp(theta_log))``."""
        modulus = -jnp.exp(params.nu_log.astype(dtype))
        return jnp.exp(lax.complex(modulus, jnp.exp(params.theta_log.astype(dtype))))

    def coefficients(self, params: LRUParams, xs: jax.Array):
        """``((a, b), (u,))`` for inputs ``(..., D)``, complex ``(..., N)``: ``a = lambda``
        (the same at every step), ``b = exp(gamma_log) u``, ``u = x B``."""
        re, im = _common.matmul(xs, params.b_re), _common.matmul(xs, params.b_im)
        real = _wide(re.dtype)
        u = lax.complex(re.astype(real), im.astype(real))
        a = jnp.broadcast_to(self._lambda(params, real), u.shape)
        gamma = jnp.exp(params.gamma_log.astype(real)).astype(u.dtype)
        return (a, gamma * u), (u,)

    def coefficients_backward(self, params: LRUParams, xs, a, residuals, da, db):
        """``(dparams, dxs)`` for the errors ``da``, ``db`` on ``a`` and ``b``, each given as
        ``dL/dRe + i dL/dIm`` (the engine's convention for complex coefficients).

        ``lambda = exp(z)``, ``z = -exp(nu_log) + i exp(theta_log)``: the error on ``z`` is
        ``conj(lambda) sum(da)``, its real part times ``-exp(nu_log)`` is ``d nu_log``, its
        imaginary part times ``exp(theta_log)`` is ``d theta_log``. ``b = gamma u``:
        ``d gamma_log = gamma sum Re(db conj(u))``, ``du = gamma db``, then ``d B_re``,
        ``d B_im`` and ``dxs`` are matmuls over the ``T*B`` rows.
        """
        (u,) = residuals
        real = _wide(xs.dtype)
        g_z = jnp.conj(self._lambda(params, real)) * jnp.sum(da, axis=(0, 1))
        gamma = jnp.exp(params.gamma_log.astype(real))
        du = gamma.astype(db.dtype) * db
        du_re, du_im = jnp.real(du), jnp.imag(du)
        zeros = jnp.zeros_like
        grads = LRUParams(
            -jnp.real(g_z) * jnp.exp(params.nu_log.astype(real)),
            jnp.imag(g_z) * jnp.exp(params.theta_log.astype(real)),
            gamma * jnp.sum(jnp.real(db * jnp.conj(u)), axis=(0, 1)),
            _common.sum_over_rows(xs, du_re, params.b_re),
            _common.sum_over_rows(xs, du_im, params.b_im),
            zeros(params.c_re, dtype=real),
            zeros(params.c_im, dtype=real),
            zeros(params.d, dtype=real),
        )
        dxs = _common.matmul(du_re, params.b_re.T) + _common.matmul(du_im, params.b_im.T)
        return grads, dxs

    def output(self, params: LRUParams, hs: jax.Array, xs: jax.Array) -> jax.Array:
        """``y = Re(h C) + D * x`` for states ``(..., 2N)`` and inputs ``(..., D)``."""
        n = self.state_size
        y = _common.matmul(hs[..., :n], params.c_re) - _common.matmul(hs[..., n:], params.c_im)
        if params.d.ndim == 1:
            return y + (xs * params.d.astype(xs.dtype)).astype(y.dtype)
        return y + _common.matmul(xs, params.d).astype(y.dtype)

    def output_backward(self, params: LRUParams, hs, xs, dys):
        """``(dparams, dhs, dxs)`` of :meth:`output` for the error ``dys`` (T, B, H):
        ``d C_re = Re(h)^T dy``, ``d C_im = -Im(h)^T dy``, ``dh = (dy C_re^T, -dy C_im^T)``,
        ``d D = sum(dy * x)`` (or ``x^T dy``), ``dx = dy * D`` (or ``dy D^T``)."""
        n, real = self.state_size, xs.dtype
        h_re, h_im = hs[..., :n], hs[..., n:]
        dhs = jnp.concatenate(
            [_common.matmul(dys, params.c_re.T), -_common.matmul(dys, params.c_im.T)], axis=-1
        )
        if params.d.ndim == 1:
            d_skip = jnp.sum(dys * xs, axis=(0, 1))
            dxs = dys * params.d.astype(real)
        else:
            d_skip = _common.sum_over_rows(xs, dys, params.d)
            dxs = _common.matmul(dys, params.d.T)
        zeros = lambda p: jnp.zeros(p.shape, real)  # noqa: E731
        grads = LRUParams(
            zeros(params.nu_log), zeros(params.theta_log), zeros(params.gamma_log),
            zeros(params.b_re), zeros(params.b_im),
            _common.sum_over_rows(h_re, dys, params.c_re),
            -_common.sum_over_rows(h_im, dys, params.c_im),
            d_skip,
        )  # fmt: skip
        return grads, dhs, dxs
