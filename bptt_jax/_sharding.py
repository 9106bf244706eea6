"""Data parallelism inside the engine: a batch sharded over devices, with no change of code.

The engine runs unchanged on a batch sharded over devices: under ``jit`` with an Explicit or
Auto mesh, and inside ``shard_map``. No array ever merges the time axis with the (sharded)
batch axis: the matmuls over all ``T*B`` rows are ``dot_general`` s over (T, B, ...) arrays.
Inside ``shard_map``, values the engine creates (zero carries, gradient accumulators) are
made device-varying like the inputs, and the hand-written backward reduces each gradient of
a replicated input once, at its end (never inside a loop), as autodiff's transpose of the
implicit broadcast would.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P


def _varying(x) -> frozenset:
    """The mesh axes along which ``x`` varies inside ``shard_map`` (empty elsewhere)."""
    mat = getattr(jax.typeof(x), "manual_axis_type", None)
    return frozenset(getattr(mat, "varying", ()) or ())


def vary_like(tree, like):
    """``tree`` made device-varying along every axis some leaf of ``like`` varies along."""
    axes = frozenset().union(*(_varying(x) for x in jax.tree.leaves(like)))
    if not axes:
        return tree

    def cast(x):
        missing = tuple(sorted(axes - _varying(x)))
        return lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(cast, tree)


def _explicit_batch(xs):
    """The mesh axes sharding ``xs``'s batch axis (axis 1), if they are Explicit; else None."""
    sharding = getattr(jax.typeof(xs), "sharding", None)
    if sharding is None or sharding.mesh.empty or len(sharding.spec) < 2:
        return None
    batch = sharding.spec[1]
    if batch is None:
        return None
    names = batch if isinstance(batch, tuple) else (batch,)
    mesh = sharding.mesh
    if any(mesh.axis_types[mesh.axis_names.index(n)] != AxisType.Explicit for n in names):
        return None
    return batch


def time_major_sharding(xs):
    """``out_sharding`` for a new (T, B, ...) array laid out like ``xs`` under an Explicit
    mesh (e.g. dropout masks drawn per example); ``None`` otherwise."""
    batch = _explicit_batch(xs)
    return None if batch is None else P(None, batch)


def like_batch(tree, xs):
    """Carries ``tree`` (leaves ``(B, ...)``) laid out like the batch axis of ``xs`` (T, B, ...).

    Inside ``shard_map``: varying like ``xs``. Under an Explicit mesh: sharded over the mesh
    axes that shard ``xs``'s batch axis (a zero carry is created replicated, and a scan
    carry must keep one type from step to step).
    """
    tree = vary_like(tree, xs)
    batch = _explicit_batch(xs)
    if batch is None:
        return tree

    def put(x):
        want = P(batch, *([None] * (x.ndim - 1)))
        spec = jax.typeof(x).sharding.spec
        have = tuple(spec) + (None,) * (x.ndim - len(spec))
        return x if have == tuple(want) else jax.sharding.reshard(x, want)

    return jax.tree.map(put, tree)


def finish_cotangents(cotangents, primals):
    """Each cotangent in its primal's dtype, summed over the devices its primal is shared by.

    The second half is the data-parallel reduction: a replicated input (the params) used by
    device-varying work has the sum of every device's cotangent as its own, one ``psum`` per
    leaf, here at the end of the backward.
    """

    def finish(g, p):
        if g is None:
            return None
        g = g.astype(p.dtype) if g.dtype != p.dtype else g
        extra = tuple(sorted(_varying(g) - _varying(p)))
        return lax.psum(g, extra) if extra else g

    return jax.tree.map(finish, cotangents, primals, is_leaf=lambda x: x is None)


def _summed_out(x):
    """``out_sharding`` of a sum over the rows of ``x`` (T, B, ...) when ``x`` is sharded
    over an Explicit mesh axis (the sum is then replicated); ``None`` otherwise."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    if sharding is None or sharding.mesh.empty or all(a is None for a in sharding.spec):
        return None
    return NamedSharding(sharding.mesh, P())


def _off_mesh(x) -> bool:
    """``x`` is not laid out over any mesh (no Explicit or Auto mesh in its type, not inside
    ``shard_map``): a single-device run."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    return (sharding is None or sharding.mesh.empty) and not _varying(x)


def sum_over_rows(x, a, dtype, *, x_t=None):
    """``sum_{t,b} x[t, b]^T a[t, b]``: (T, B, D), (T, B, N) -> (D, N), accumulated in ``dtype``.

    ``x_t``: ``x`` already laid out as (D, T, B) (see :func:`bptt_jax._engine.weight_grads`).
    On a single device without a precision policy the rows are merged (T*B, D), free for
    row-major arrays, and the matmul takes ``x`` transposed, as XLA:CPU's GEMM does without
    a copy (the (T, B)-contracting form copies both operands there: Elman T=256, B=64,
    H=256 temp 74 against 50 MiB). On a mesh the (T, B) axes stay apart (B may be sharded)
    and the sum is one ``dot_general`` over both, replicated under an Explicit mesh; so is a
    compute-dtype sum, whose merged form XLA:CPU widens to float32 copies.
    """
    if _off_mesh(x) and x.dtype == dtype:
        rows = x.shape[0] * x.shape[1]
        lhs = x.reshape(rows, x.shape[-1]).T if x_t is None else x_t.reshape(x_t.shape[0], rows)
        return jnp.matmul(lhs, a.reshape(rows, a.shape[-1]), preferred_element_type=dtype)
    out = _summed_out(x)
    # lax.dot_general with the contracting axes in (t, b) order: jnp.einsum sorts them to
    # (b, t) and XLA then copies both operands into that order.
    if x_t is None:
        dims = (((0, 1), (0, 1)), ((), ()))
        return lax.dot_general(x, a, dims, preferred_element_type=dtype, out_sharding=out)
    dims = (((1, 2), (0, 1)), ((), ()))
    return lax.dot_general(x_t, a, dims, preferred_element_type=dtype, out_sharding=out)
