"""The precision policy: compute in bfloat16 (or float16), keep carries and sums in float32.

Every entry point (:func:`bptt_jax.unroll`, :func:`bptt_jax.sequence_loss`,
:func:`bptt_jax.losses.loss_and_grads`, the trainer, :func:`bptt_jax.check_gradients`, the
diagnostics) takes ``compute_dtype``. ``None`` (the default) computes in the params' dtype,
as before. With float32 params and ``compute_dtype=jnp.bfloat16``:

* **in the compute dtype**: the operands of every matmul (the inputs ``xs`` and the
  kernels, cast once per call; each step's ``h_{t-1}`` and ``delta_t`` where they meet a
  kernel) and what the forward stores for the backward (the states ``h_t``/``c_t`` stacked
  over time, the cells' per-step residuals and the pre-activation gradients ``dA_t``), so
  the stored sequence is half the size. A model's outputs ``hs`` (and a stacked layer's
  input to the next) are in the compute dtype.
* **in float32** (the params' dtype): the carries inside the scans (``h``, and the LSTM's
  ``c``), so rounding never accumulates through time; the error ``delta_t`` carried back;
  every matmul's accumulation (``preferred_element_type``); every sum over time (the weight
  and bias gradients); biases; the readout's logits and the loss; the final carry.
* **gradients** come back in the params' dtype (float32 master weights for optax); the
  gradient with respect to ``xs`` in ``xs``'s dtype.

float16 has more mantissa than bfloat16 but a range that ends at 65504, and the policy does
no loss scaling: values beyond it (large inputs or projections, exploding per-step errors)
become inf, then NaN, where float32 and bfloat16 stay finite. Prefer bfloat16.

A "naive" bfloat16 run, params and inputs all cast to bfloat16 with no policy, carries its
state and sums its gradients in bfloat16 too; over long sequences its errors grow with T.
``bptt-jax verify`` and ``tests/test_precision.py`` measure both against float32.

Example:
  >>> import jax, jax.numpy as jnp, bptt_jax
  >>> cell = bptt_jax.LSTM(8)
  >>> params = cell.init(jax.random.key(0), input_size=3)          # float32
  >>> xs = jnp.ones((20, 2, 3))
  >>> hs, carry = bptt_jax.unroll(cell, params, xs, compute_dtype=jnp.bfloat16)
  >>> hs.dtype, carry.c.dtype
  (dtype(bfloat16), dtype('float32'))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

#: The compute dtypes a policy may use (narrower than or equal to the params' dtype).
COMPUTE_DTYPES = ("bfloat16", "float16", "float32", "float64")


def resolve(fn: str, compute_dtype, param_dtype) -> jnp.dtype | None:
    """The compute dtype of a call, checked; ``None`` when it is the params' own.

    Raises:
      TypeError: ``compute_dtype`` is not a floating dtype (an integer dtype, an unknown
        name, a non-dtype object).
      ValueError: it is wider than the params' dtype (float64 compute on float32 params).
    """
    if compute_dtype is None:
        return None
    try:
        dt = jnp.dtype(compute_dtype)
    except TypeError:
        raise TypeError(
            f"{fn}: compute_dtype must be None or one of {COMPUTE_DTYPES}; got {compute_dtype!r}"
        ) from None
    if dt.name not in COMPUTE_DTYPES:
        raise TypeError(
            f"{fn}: compute_dtype must be None or a floating dtype, one of {COMPUTE_DTYPES}; "
            f"got {dt.name}"
        )
    param_dtype = jnp.dtype(param_dtype)
    if dt.itemsize > param_dtype.itemsize:
        raise ValueError(
            f"{fn}: compute_dtype {dt.name} is wider than the params' dtype {param_dtype.name}; "
            "a policy computes in a dtype no wider than the params' (cast the params instead)"
        )
    if dt == jnp.float16 and param_dtype == jnp.bfloat16:
        raise ValueError(
            f"{fn}: compute_dtype float16 with bfloat16 params: float16's range (to 65504) is "
            "far narrower than bfloat16's, so values the params' dtype holds would overflow; "
            "use compute_dtype=None (bfloat16) or float32 params"
        )
    return None if dt == param_dtype else dt


def compute_params(params, dtype):
    """``params`` with every matrix (a leaf of 2 or more dims) cast to ``dtype``.

    Vectors (biases) keep their dtype: they are added after the float32 accumulation.
    """
    if dtype is None:
        return params

    def cast(p):
        return p.astype(dtype) if jnp.ndim(p) >= 2 and p.dtype != dtype else p

    return jax.tree.map(cast, params)
