"""The linear readout ``y_t = h_t W_hy + b_y`` on a model's outputs: its params and init."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bptt_jax.cells import _common


class ReadoutParams(NamedTuple):
    """The output layer ``y_t = h_t W_hy + b_y`` (logits for ``"xent"``)."""

    w_hy: jax.Array  # (H, O)
    b_y: jax.Array  # (O,)


def init_readout(key, hidden_size: int, output_size: int, dtype=jnp.float32) -> ReadoutParams:
    """``w_hy`` ~ U(-1/sqrt(H), 1/sqrt(H)) (PyTorch's ``nn.Linear``), ``b_y = 0``.

    Example:
      >>> import jax, bptt_jax
      >>> ro = bptt_jax.init_readout(jax.random.key(0), 32, 10)
      >>> ro.w_hy.shape, ro.b_y.shape
      ((32, 10), (10,))
    """
    for name, v in (("hidden_size", hidden_size), ("output_size", output_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"init_readout: {name} must be a positive int; got {v!r}")
    dtype = _common.check_float_dtype("init_readout", dtype)
    bound = 1.0 / math.sqrt(hidden_size)
    return ReadoutParams(
        _common.uniform(key, (hidden_size, output_size), bound, dtype),
        jnp.zeros((output_size,), dtype),
    )
