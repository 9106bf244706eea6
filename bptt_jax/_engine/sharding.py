"""Data parallelism inside the engine: a batch sharded over devices, with no change of code.

The engine runs unchanged on a batch sharded over devices: under ``jit`` with an Explicit or
Auto mesh, and inside ``shard_map``. No array ever merges the time axis with the (sharded)
batch axis: the matmuls over all ``T*B`` rows are ``dot_general`` s over (T, B, ...) arrays.
Inside ``shard_map``, values the engine creates (zero carries, gradient accumulators) are
made device-varying like the inputs, and the hand-written backward reduces each gradient of
a replicated input once, at its end (never inside a loop), as autodiff's transpose of the
implicit broadcast would. Under ``jit`` on a mesh, a loop whose body sums over the batch
(checkpointed BPTT's segments, a user cell's steps) would be reduced across the devices at
every iteration; :func:`per_device` runs such a loop inside ``shard_map`` instead, over the
split :func:`batch_split` reads from the inputs (Explicit) or the mesh (Auto).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def varying_axes(x) -> frozenset:
    """The mesh axes along which ``x`` varies inside ``shard_map`` (empty elsewhere)."""
    mat = getattr(jax.typeof(x), "manual_axis_type", None)
    return frozenset(getattr(mat, "varying", ()) or ())


def vary_like(tree, like):
    """``tree`` made device-varying along every axis some leaf of ``like`` varies along."""
    axes = frozenset().union(*(varying_axes(x) for x in jax.tree.leaves(like)))
    if not axes:
        return tree

    def cast(x):
        missing = tuple(sorted(axes - varying_axes(x)))
        return lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(cast, tree)


def split_axes(xs, axis: int = 1):
    """The mesh axes splitting ``xs``'s ``axis`` (1: the batch, 0: time), if they are
    Explicit; else None."""
    sharding = getattr(jax.typeof(xs), "sharding", None)
    if sharding is None or sharding.mesh.empty or len(sharding.spec) <= axis:
        return None
    batch = sharding.spec[axis]
    if batch is None:
        return None
    names = batch if isinstance(batch, tuple) else (batch,)
    mesh = sharding.mesh
    if any(mesh.axis_types[mesh.axis_names.index(n)] != AxisType.Explicit for n in names):
        return None
    return batch


class Split(NamedTuple):
    """How a per-device loop splits the batch: the mesh and the axes (a name or a tuple of
    names) its batch axis is split over."""

    mesh: jax.sharding.AbstractMesh
    axes: str | tuple


#: ``out_axes`` entry of :func:`per_device`: an output summed over the devices.
SUMMED = "summed"


def batch_split(xs, axis: int = 1) -> Split | None:
    """The split of ``xs``'s batch ``axis`` for :func:`per_device`, or ``None`` (one device,
    inside ``shard_map``, or a batch the mesh does not divide).

    Under an Explicit mesh, the axes that shard the batch in ``xs``'s type. Under an Auto
    mesh (``jax.set_mesh``) the layout is not in the type: the batch is taken to be split
    over every axis of the mesh (data parallelism over all its devices), the layout
    ``shard_map`` then moves it to if it was not already.
    """
    batch = split_axes(xs, axis)
    if batch is not None:
        return Split(jax.typeof(xs).sharding.mesh, batch)
    if varying_axes(xs):
        return None
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or any(t != AxisType.Auto for t in mesh.axis_types):
        return None
    if xs.shape[axis] % mesh.size:
        return None
    names = tuple(mesh.axis_names)
    return Split(mesh, names[0] if len(names) == 1 else names)


def per_device(split: Split, fn, args, in_axes, out_axes):
    """``fn(*args)`` run by every device on its share of the batch (``jax.shard_map``).

    A loop over time whose body sums over the batch (a segment's weight gradients, its
    loss) reduces across the devices at every iteration when the partitioner sees it whole;
    run per device, each device sums its own rows and the sums cross devices once, at the
    end.

    Args:
      split: from :func:`batch_split`.
      fn: a function of ``args``; values it closes over must be replicated.
      args: a NamedTuple of its arguments.
      in_axes: a NamedTuple of the same type, each field a prefix of its argument: the batch
        axis of every leaf below, or ``None`` (replicated).
      out_axes: a prefix of ``fn``'s output: the batch axis of the leaves below, or
        :data:`SUMMED` (each device's part, summed over the devices).
    """
    mesh, batch = split
    names = batch if isinstance(batch, tuple) else (batch,)

    def spec(axis):
        return P() if axis in (None, SUMMED) else P(*([None] * axis), batch)

    def local(args):
        out = fn(*args)
        return jax.tree.map(
            lambda a, o: lax.psum(o, names) if a == SUMMED and o is not None else o,
            out_axes, out, is_leaf=lambda x: x is None,
        )  # fmt: skip

    in_specs = jax.tree.map(spec, in_axes, is_leaf=lambda x: x is None)
    if all(t == AxisType.Explicit for t in mesh.axis_types):
        # every input laid out as its spec says (e.g. a mask made on one device is split too)
        args = jax.tree.map(
            lambda s, a: jax.tree.map(lambda x: reshard(x, s, mesh), a), in_specs, args,
            is_leaf=lambda x: isinstance(x, P),
        )  # fmt: skip
    out_specs = jax.tree.map(spec, out_axes)
    return jax.shard_map(local, mesh=mesh, in_specs=(in_specs,), out_specs=out_specs)(args)


def reshard(x, spec, mesh):
    """``x`` laid out as ``spec`` on ``mesh`` (an Explicit mesh's, from an array's type: a
    bare spec would need ``jax.set_mesh``, which arrays placed on a mesh by ``device_put``
    and passed to ``jit`` do not have)."""
    have = tuple(jax.typeof(x).sharding.spec)
    have += (None,) * (x.ndim - len(have))
    want = tuple(spec) + (None,) * (x.ndim - len(spec))
    if have == want:
        return x
    if isinstance(mesh, Mesh) and not isinstance(x, jax.core.Tracer):
        # an eager call outside jax.set_mesh: place the array itself on the batch's mesh
        return jax.device_put(x, NamedSharding(mesh, spec))
    return jax.sharding.reshard(x, NamedSharding(mesh, spec))


def time_major_sharding(xs):
    """``out_sharding`` for a new (T, B, ...) array laid out like ``xs`` under an Explicit
    mesh (e.g. dropout masks drawn per example, or per step of a split time axis);
    ``None`` otherwise."""
    time, batch = split_axes(xs, 0), split_axes(xs)
    if time is None and batch is None:
        return None
    return NamedSharding(jax.typeof(xs).sharding.mesh, P(time, batch))


def like_batch(tree, xs):
    """Carries ``tree`` (leaves ``(B, ...)``) laid out like the batch axis of ``xs`` (T, B, ...).

    Inside ``shard_map``: varying like ``xs``. Under an Explicit mesh: sharded over the mesh
    axes that shard ``xs``'s batch axis (a zero carry is created replicated, and a scan
    carry must keep one type from step to step).
    """
    tree = vary_like(tree, xs)
    batch = split_axes(xs)
    if batch is None:
        return tree

    mesh = mesh_of(xs)
    return jax.tree.map(lambda x: reshard(x, P(batch), mesh), tree)


def eager_mesh(xs):
    """``jax.set_mesh`` of the batch's mesh for an eager (un-jitted) call on ``xs`` placed on
    an Explicit mesh outside any mesh context: JAX's eager operations on such arrays need
    one (under ``jit`` the arrays' types carry it). Else a context that does nothing."""
    if isinstance(xs, jax.core.Tracer) or split_axes(xs) is None:
        return contextlib.nullcontext()
    if not jax.sharding.get_abstract_mesh().empty:
        return contextlib.nullcontext()
    mesh = mesh_of(xs)
    return jax.set_mesh(mesh) if isinstance(mesh, Mesh) else contextlib.nullcontext()


def mesh_of(xs):
    """The mesh ``xs`` is laid out on: the concrete :class:`Mesh` of a placed array (what an
    eager call needs to place others beside it), else its type's (abstract) mesh."""
    sharding = None if isinstance(xs, jax.core.Tracer) else getattr(xs, "sharding", None)
    if isinstance(sharding, NamedSharding) and isinstance(sharding.mesh, Mesh):
        return sharding.mesh
    return jax.typeof(xs).sharding.mesh


def finish_cotangents(cotangents, primals):
    """Each cotangent in its primal's dtype, summed over the devices its primal is shared by
    (one whose primal in ``primals`` is ``None`` is left as it is).

    The second half is the data-parallel reduction: a replicated input (the params) used by
    device-varying work has the sum of every device's cotangent as its own, one ``psum`` per
    leaf, here at the end of the backward.
    """

    def finish(g, p):
        if g is None or p is None:  # no cotangent, or one left as it is
            return g
        g = g.astype(p.dtype) if g.dtype != p.dtype else g
        extra = tuple(sorted(varying_axes(g) - varying_axes(p)))
        return lax.psum(g, extra) if extra else g

    return jax.tree.map(finish, cotangents, primals, is_leaf=lambda x: x is None)


def _summed_out(x):
    """``out_sharding`` of a sum over the rows of ``x`` (T, B, ...) when ``x`` is sharded
    over an Explicit mesh axis (the sum is then replicated); ``None`` otherwise."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    if sharding is None or sharding.mesh.empty or all(a is None for a in sharding.spec):
        return None
    return NamedSharding(sharding.mesh, P())


def off_mesh(x) -> bool:
    """``x`` is not laid out over any mesh (no Explicit or Auto mesh in its type, not inside
    ``shard_map``): a single-device run (or a plain ``jit`` whose layout comes only from its
    inputs' shardings, which XLA's propagation carries through)."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    return (sharding is None or sharding.mesh.empty) and not varying_axes(x)


def _time_split_only(x) -> bool:
    """``x`` (T, B, ...) is laid out on an Explicit mesh with its time axis split and
    nothing else (sequence parallelism): merging (T, B) keeps each device's rows its own."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    if sharding is None or sharding.mesh.empty or varying_axes(x):
        return False
    spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
    return split_axes(x, 0) is not None and all(s is None for s in spec[1:])


def sum_over_rows(x, a, dtype, *, x_t=None):
    """``sum_{t,b} x[t, b]^T a[t, b]``: (T, B, D), (T, B, N) -> (D, N), accumulated in ``dtype``.

    ``x_t``: ``x`` already laid out as (D, T, B) (see
    :func:`bptt_jax._engine.cell_scan.weight_grads`). On a single device without a precision
    policy the rows are merged (T*B, D) and the matmul takes ``x`` transposed; on a mesh, or
    for a compute-dtype sum, it is one ``dot_general`` over both (T, B) axes, which keeps a
    sharded B apart (README.md: why each form).
    """
    out = _summed_out(x)
    if x.dtype == dtype and (off_mesh(x) or _time_split_only(x)):
        rows = x.shape[0] * x.shape[1]
        lhs = x.reshape(rows, x.shape[-1]).T if x_t is None else x_t.reshape(x_t.shape[0], rows)
        a = a.reshape(rows, a.shape[-1])
        return jnp.matmul(lhs, a, preferred_element_type=dtype, out_sharding=out)
    # contracting axes in (t, b) order: jnp.einsum sorts them to (b, t), and XLA copies both
    if x_t is None:
        dims = (((0, 1), (0, 1)), ((), ()))
        return lax.dot_general(x, a, dims, preferred_element_type=dtype, out_sharding=out)
    dims = (((1, 2), (0, 1)), ((), ()))
    return lax.dot_general(x_t, a, dims, preferred_element_type=dtype, out_sharding=out)
