"""The effective horizon of a curve of error norms: how many steps back the error reaches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bptt_jax import validation

#: The horizon of a curve with a NaN or an infinite norm: undefined (see
#: :func:`horizon_from_norms`). The trainer logs it as ``null``.
UNDEFINED_HORIZON = -1


def horizon_from_norms(norms, fraction: float = 0.01) -> jax.Array:
    """The effective horizon of a curve of error norms over time.

    With ``n_s = norms[T-1-s]`` the norm ``s`` steps back from the last step and
    ``peak_s = max(n_0, ..., n_s)`` its running peak, the horizon is the smallest ``s`` with
    ``n_s < fraction * peak_s``: the number of most recent steps (the last one included) that
    the error reaches before it first falls below ``fraction`` of the largest it has been.
    If it never does (the error does not vanish within the sequence, e.g. it explodes), the
    horizon is ``T``, which then means "at least T". Two curves have no such step:

    * all zeros (no error reaches any step): the horizon is ``0``, no step reached;
    * a NaN or an infinite norm anywhere (a diverged run, an overflow): the horizon is
      undefined, :data:`UNDEFINED_HORIZON` (``-1``); no number of steps would be honest.

    Args:
      norms: ``(T,)`` or ``(T, B)``, e.g. :func:`jacobian_norms` or ``||delta^h_t||``.
      fraction: in ``(0, 1)``.

    Returns:
      int32 array: ``()`` for a ``(T,)`` curve, ``(B,)`` for ``(T, B)`` (one per column);
      values in ``[1, T]``, ``0`` for an all-zero curve, ``-1`` for one with NaN or inf.

    Example:
      >>> import jax.numpy as jnp
      >>> norms = 0.5 ** jnp.arange(10.0)[::-1]    # halves with every step back from T
      >>> int(horizon_from_norms(norms, fraction=0.1))   # 0.5**4 = 0.0625 < 0.1
      4
      >>> int(horizon_from_norms(2.0 ** jnp.arange(10.0)[::-1]))   # grows going back
      10
      >>> int(horizon_from_norms(jnp.zeros(10))), int(horizon_from_norms(jnp.full(10, jnp.nan)))
      (0, -1)
    """
    fraction = check_fraction("horizon_from_norms", fraction)
    norms = validation.as_array("horizon_from_norms", "norms", norms)
    if norms.ndim not in (1, 2) or norms.shape[0] < 1:
        raise ValueError(
            f"horizon_from_norms: norms must have shape (T,) or (T, B) with T >= 1; "
            f"got {norms.shape}"
        )
    back = norms[::-1]  # s = 0, 1, ..., T-1 steps back from the last step
    peak = lax.cummax(back, axis=0)
    below = back < fraction * peak
    first = jnp.argmax(below, axis=0)
    horizon = jnp.where(jnp.any(below, axis=0), first, norms.shape[0])
    horizon = jnp.where(jnp.any(back != 0, axis=0), horizon, 0)  # all zero: reaches no step
    finite = jnp.all(jnp.isfinite(back), axis=0)
    return jnp.where(finite, horizon, UNDEFINED_HORIZON).astype(jnp.int32)


def check_fraction(fn: str, fraction) -> float:
    """``fraction`` in (0, 1) (a Python, NumPy or JAX real scalar), as a Python float."""
    real = isinstance(fraction, int | float | np.integer | np.floating) or (
        isinstance(fraction, jax.Array)
        and not isinstance(fraction, jax.core.Tracer)  # a static value: not traced by jit
        and fraction.ndim == 0
    )
    if isinstance(fraction, bool) or not real or not 0 < float(fraction) < 1:
        raise ValueError(f"{fn}: fraction must be a number in (0, 1), e.g. 0.01; got {fraction!r}")
    return float(fraction)


def batch_horizon(norms, fraction):
    """The horizon of the batch mean of ``norms`` (T, B), read back from ``t = T-1``."""
    return horizon_from_norms(jnp.mean(norms, axis=1), fraction)
