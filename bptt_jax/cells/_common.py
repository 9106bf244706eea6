"""What the built-in cells share: activations, initialisers and the policy-aware matmul.

A built-in cell is a frozen, hashable dataclass holding hyper-parameters only (sizes come
from the params' shapes). It offers two faces, both documented in
:mod:`bptt_jax.cells.protocol`: the public one (:class:`~bptt_jax.cells.Cell`: ``init``,
``zero_carry`` and ``step``, one time step in ``lax.scan`` order
``(carry, x_t) -> (carry, h_t)``) and the fast path's
(:class:`~bptt_jax.cells.FastCell`: the input projection for all steps at once, a forward
step on the projected input that also returns what the backward needs, and the
hand-written backward of that step, in ``(B, H)`` gate blocks).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Activation(NamedTuple):
    """An activation whose derivative can be computed from its output.

    Storing only ``h_t = f(a_t)`` (not ``a_t``) is what keeps the hand-written backward's
    memory below autodiff's, so only such activations are offered.
    """

    fn: Callable[[jax.Array], jax.Array]
    # f'(a) written as a function of y = f(a).
    grad_from_output: Callable[[jax.Array], jax.Array]


ACTIVATIONS: dict[str, Activation] = {
    "tanh": Activation(jnp.tanh, lambda y: 1 - y * y),
    "relu": Activation(jax.nn.relu, lambda y: (y > 0).astype(y.dtype)),
    "identity": Activation(lambda a: a, lambda y: jnp.ones_like(y)),
    "sigmoid": Activation(jax.nn.sigmoid, lambda y: y * (1 - y)),
}

INITS = ("uniform", "orthogonal")


def matmul(a: jax.Array, w: jax.Array) -> jax.Array:
    """``a @ w`` with the operands in ``w``'s dtype and the result in ``a``'s.

    The one matmul of a cell's step. Under a precision policy (see :mod:`bptt_jax.precision`)
    the engine hands the cell its kernels in the compute dtype (e.g. bfloat16) while the
    carry and the error ``delta`` stay in the params' dtype (float32): the product then runs
    on bfloat16 operands and accumulates into float32 (``preferred_element_type``). Without
    a policy both dtypes agree and this is ``a @ w``.
    """
    if a.dtype == w.dtype:
        return a @ w
    return jnp.matmul(a.astype(w.dtype), w, preferred_element_type=a.dtype)


def sum_over_rows(x: jax.Array, d: jax.Array, kernel: jax.Array) -> jax.Array:
    """``sum_{t,b} x[t, b]^T d[t, b]``: (T, B, D), (T, B, N) -> (D, N), the gradient of a
    kernel applied to every row of ``x``; operands in ``kernel``'s dtype, accumulated in
    ``d``'s (as :func:`matmul`).

    As the engine's own weight gradients (``bptt_jax._engine.sharding.sum_over_rows``): off
    any mesh, without a precision policy, the rows merged (T*B, D), which XLA:CPU multiplies
    without copying; else one ``dot_general`` over both (T, B) axes, which keeps a sharded
    batch axis apart, its sum replicated under an Explicit mesh.
    """
    lhs, rhs = x.astype(kernel.dtype), d.astype(kernel.dtype)
    sharding = getattr(jax.typeof(x), "sharding", None)
    on_mesh = sharding is not None and not sharding.mesh.empty
    if not on_mesh and kernel.dtype == d.dtype:
        rows = x.shape[0] * x.shape[1]
        return lhs.reshape(rows, x.shape[-1]).T @ rhs.reshape(rows, d.shape[-1])
    out = None
    if on_mesh and any(a is not None for a in sharding.spec):
        out = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    dims = (((0, 1), (0, 1)), ((), ()))
    return jax.lax.dot_general(lhs, rhs, dims, preferred_element_type=d.dtype, out_sharding=out)


def check_hidden_size(cls_name: str, hidden_size) -> None:
    if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size <= 0:
        raise ValueError(f"{cls_name}: hidden_size must be a positive int; got {hidden_size!r}")


def check_init(cls_name: str, init: str) -> None:
    if init not in INITS:
        raise ValueError(f"{cls_name}: init must be one of {INITS}; got {init!r}")


def check_input_size(cls_name: str, input_size) -> None:
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size <= 0:
        raise ValueError(f"{cls_name}.init: input_size must be a positive int; got {input_size!r}")


def check_float_dtype(where: str, dtype) -> jnp.dtype:
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{where}: dtype must be a floating dtype; got {dtype}")
    return dtype


def uniform(key, shape, bound: float, dtype) -> jax.Array:
    """U(-bound, bound): PyTorch's default for RNN/LSTM/GRU weights with bound=1/sqrt(H)."""
    return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)


def orthogonal_blocks(key, hidden_size: int, n_blocks: int, dtype) -> jax.Array:
    """``n_blocks`` independent orthogonal (H, H) matrices side by side: (H, n_blocks*H)."""
    init = jax.nn.initializers.orthogonal()
    keys = jax.random.split(key, n_blocks)
    return jnp.concatenate([init(k, (hidden_size, hidden_size), dtype) for k in keys], axis=1)


def init_kernels(
    key, input_size: int, hidden_size: int, n_blocks: int, init: str, dtype
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Input kernel, recurrent kernel and two biases for a cell with ``n_blocks`` gates.

    ``"uniform"``: every entry U(-1/sqrt(H), 1/sqrt(H)), as PyTorch does.
    ``"orthogonal"``: recurrent blocks orthogonal, input kernel LeCun-normal, biases zero.
    """
    kx, kh, kb1, kb2 = jax.random.split(key, 4)
    g = n_blocks * hidden_size
    if init == "uniform":
        bound = 1.0 / math.sqrt(hidden_size)
        return (
            uniform(kx, (input_size, g), bound, dtype),
            uniform(kh, (hidden_size, g), bound, dtype),
            uniform(kb1, (g,), bound, dtype),
            uniform(kb2, (g,), bound, dtype),
        )
    w_x = jax.nn.initializers.lecun_normal()(kx, (input_size, g), dtype)
    w_h = orthogonal_blocks(kh, hidden_size, n_blocks, dtype)
    return w_x, w_h, jnp.zeros((g,), dtype), jnp.zeros((g,), dtype)
