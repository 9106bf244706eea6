"""The linear path: a :class:`~bptt_jax.cells.LinearCell` over a sequence, as one scan.

A linear cell's recurrence is ``h_t = a_t * h_{t-1} + b_t`` (elementwise), with ``a`` and
``b`` of all steps computed from the inputs at once (``cell.coefficients``: its matmuls over
all ``T*B`` rows). Masks and resets act on the coefficients: a padded step passes the carry
(``a = 1, b = 0``), a reset zeros the carry entering its step (``a = 0``). The recurrence is
then one scan: ``jax.lax.associative_scan`` (``"parallel"``, depth O(log T)) or ``lax.scan``
(``"sequential"``), as the cell's ``scan`` says (``"auto"``:
:func:`~bptt_jax._engine.options.linear_scan`).

The backward is written by hand. The error on ``h_t`` is again a linear recurrence, in
reverse time::

    delta_t = dh_t + a_{t+1} * delta_{t+1},   delta_{T-1} = dh_{T-1} + dcarry_T

run as the same kind of scan; a truncation cut at step t zeros ``a_t`` in it (the carry
entering step t gets no error). Then ``dL/da_t = delta_t * h_{t-1}``, ``dL/db_t = delta_t``
(through the masks and resets), ``dcarry0 = a_0 * delta_0``, and the cell's
``coefficients_backward`` (or ``jax.vjp`` of ``coefficients``, time-parallel) gives the
params' and inputs' gradients. Per-step clipping (``delta_clip``) is not linear: with it the
reverse recursion is a sequential ``lax.scan`` whatever ``scan`` says. Only ``a``, the
states and the cell's residuals are stored; autodiff of an associative scan would keep every
level of its tree.

The three functions have :mod:`~bptt_jax._engine.cell_scan`'s arguments and results; the
stored buffers are ``(a, residuals)``, every leaf with leading axes (T, B).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from bptt_jax import precision
from bptt_jax._engine import options, step_rules
from bptt_jax._engine.bundles import dense
from bptt_jax._engine.sharding import like_batch
from bptt_jax.cells import protocol


def _compose(earlier, later):
    """Two steps of ``h -> a * h + b``, ``earlier`` then ``later``, as one."""
    a1, b1 = earlier
    a2, b2 = later
    return a2 * a1, a2 * b1 + b2


def recurrence(a, b, h0, mode: str, reverse: bool = False):
    """``h_t = a_t * h_{t-1} + b_t`` over the leading axis from ``h_{-1} = h0`` (with
    ``reverse``: ``h_t = a_t * h_{t+1} + b_t`` from ``h_T = h0``), every ``h_t`` stacked.

    ``mode``: ``"parallel"`` (an associative scan; ``h0`` folded into the first step) or
    ``"sequential"`` (``lax.scan``).
    """
    first = -1 if reverse else 0
    if mode == "parallel":
        b = b.at[first].add(a[first] * h0)
        return lax.associative_scan(_compose, (a, b), reverse=reverse)[1]

    def body(h, ab):
        h = ab[0] * h + ab[1]
        return h, h

    return lax.scan(body, h0, (a, b), reverse=reverse)[1]


def _coefficients(cell, params, xs, acc):
    """``((a, b), residuals)`` of every step, ``a`` and ``b`` in the carry's dtype ``acc``;
    the params' matrices in the compute dtype (``xs``'s), ``xs`` in ``acc``."""
    cparams = precision.compute_params(params, xs.dtype)
    (a, b), res = cell.coefficients(cparams, xs.astype(acc))
    return (a.astype(acc), b.astype(acc)), res


def passing(a, mask, resets):
    """``a`` as the scan multiplies it: 1 at a padded step (the carry passes), 0 where the
    carry entering the step is reset."""
    if mask is not None:
        a = jnp.where(mask[..., None], a, 1)
    if resets is not None:
        a = jnp.where(resets[..., None], 0, a)
    return a


def forward(cell, params, steps, carry0, keep: bool = True):
    """The coefficients, then one scan over ``steps`` (its ``drops`` are not read).

    Returns:
      ``(states, buffers, carry_T)``: the state after every step (T, B, N), in the compute
      dtype; ``(a, residuals)`` (``a`` before masks and resets, in the carry's dtype; the
      residuals in the compute dtype), ``None`` unless ``keep``; the final carry.
    """
    xs, mask, resets = steps.xs, steps.mask, steps.resets
    carry0 = like_batch(carry0, xs)
    acc, store = carry0.dtype, xs.dtype
    (a, b), res = _coefficients(cell, params, xs, acc)
    if mask is not None:
        b = jnp.where(mask[..., None], b, 0)
    hs = recurrence(passing(a, mask, resets), b, carry0, options.linear_scan(cell))
    states = hs.astype(store)
    if not keep:
        return states, None, hs[-1]
    res = jax.tree.map(lambda r: r.astype(store) if _wider(r, store) else r, res)
    return states, (a, res), hs[-1]


def _floating(r) -> bool:
    return jnp.issubdtype(r.dtype, jnp.floating)


def _wider(r, store) -> bool:
    return _floating(r) and r.dtype.itemsize > jnp.dtype(store).itemsize


def reverse_scan(cell, params, steps, carry0, stored, g, backprop):
    """The reverse recursion of the error, from step T-1 down to 0.

    Args: as :func:`bptt_jax._engine.cell_scan.reverse_scan` (``steps.xs`` is not read).

    Returns:
      ``(dcarry0, deltas, kept)``: the error on ``carry0``; ``delta_t``, the error on every
      ``h_t`` (T, B, N), in the carry's dtype; what ``backprop.keep_deltas`` keeps of each
      (else ``None``).
    """
    del params
    states, (a, _) = stored
    dhs, dcarry_t = g
    dcarry_t, carry0 = like_batch((dcarry_t, carry0), states)
    acc = carry0.dtype
    a = passing(a.astype(acc), steps.mask, steps.resets)
    if backprop.cuts is not None:  # no error crosses into the carry entering a cut step
        a = jnp.where(backprop.cuts[:, None, None], 0, a)
    e = jnp.zeros_like(a) if dhs is None else dense(dhs).astype(acc)
    e = e.at[-1].add(dcarry_t.astype(acc))
    # the error on h_t reaches h_{t-1} through a_t: delta_t = e_t + a_{t+1} * delta_{t+1}
    a_next = jnp.concatenate([a[1:], jnp.zeros_like(a[:1])])
    if backprop.delta_clip is None:
        deltas = recurrence(a_next, e, jnp.zeros_like(e[0]), options.linear_scan(cell), True)
    else:
        deltas = _clipped(a_next, e, backprop)
    kept = None
    if backprop.keep_deltas:
        kept = jax.vmap(step_rules.keeper(cell, backprop))(deltas)
    return a[0] * deltas[0], deltas, kept


def _clipped(a_next, e, backprop):
    """The reverse recursion with each ``delta_t`` clipped before it travels on: a
    ``lax.scan``, clipping not being linear."""

    def body(d_next, row):  # d_next = delta_{t+1}, a_t = a_{t+1}
        a_t, e_t, real_t = row
        d = step_rules.clip(e_t + a_t * d_next, real_t, backprop.delta_clip)
        return d, d

    rows = (a_next, e, backprop.real)
    return lax.scan(body, jnp.zeros_like(e[0]), rows, reverse=True)[1]


def coefficient_grads(cell, params, steps, carry0, stored, deltas):
    """``(dparams, dxs)`` from the errors on the states: ``dL/da_t = delta_t * h_{t-1}``
    and ``dL/db_t = delta_t`` where the step counts, then the coefficients' backward."""
    xs, mask, resets = steps.xs, steps.mask, steps.resets
    states, (a, res) = stored
    carry0 = like_batch(carry0, states)
    acc = carry0.dtype
    h_prev = jnp.concatenate([carry0[None], states[:-1].astype(acc)])
    da, db = deltas * h_prev, deltas
    if mask is not None:
        da = jnp.where(mask[..., None], da, 0)
        db = jnp.where(mask[..., None], db, 0)
    if resets is not None:
        da = jnp.where(resets[..., None], 0, da)
    cparams = precision.compute_params(params, xs.dtype)
    x = xs.astype(acc)
    if protocol.has_coefficients_backward(cell):
        # the stored residuals back in the carry's dtype, as the fast path's step sees them
        res = jax.tree.map(lambda r: r.astype(acc) if _floating(r) else r, res)
        dparams, dxs = cell.coefficients_backward(cparams, x, a.astype(acc), res, da, db)
    else:
        # the one autodiff of this path: the coefficients are a function of each step's own
        # input, so their VJP is parallel in time (re-run here, nothing of it stored)
        def coefficients(p, x_):
            return cell.coefficients(precision.compute_params(p, xs.dtype), x_)[0]

        out, pullback = jax.vjp(coefficients, params, x)
        dparams, dxs = pullback((da.astype(out[0].dtype), db.astype(out[1].dtype)))
    dparams = jax.tree.map(lambda d, p: d.astype(p.dtype), dparams, params)
    return dparams, dxs.astype(xs.dtype)


def backward(cell, params, steps, carry0, stored, g, backprop):
    """The whole sequence backward of ``cell``: :func:`reverse_scan`, then
    :func:`coefficient_grads`. Returns ``(dparams, dxs, dcarry0, deltas)``."""
    dcarry0, deltas, kept = reverse_scan(cell, params, steps, carry0, stored, g, backprop)
    grads, dxs = coefficient_grads(cell, params, steps, carry0, stored, deltas)
    return grads, dxs, dcarry0.astype(carry0.dtype), kept
