"""The generic path: any cell that is not a :class:`~bptt_jax.cells.FastCell`, step by step.

The sequence-level BPTT of :mod:`~bptt_jax._engine.cell_scan`, one step at a time: the
forward ``lax.scan`` of ``cell.step`` stores the carries (no residuals: the backward of step
t runs at ``(params, carry_{t-1}, x_t)``, ``carry_{t-1}`` read from the stored states); the
reverse ``lax.scan`` carries the error on the carry and the params' gradient summed so far,
and emits ``dx_t``. Each step's backward is the cell's ``step_backward``
(:class:`~bptt_jax.cells.ManualCell`) or else ``jax.vjp`` of ``cell.step`` (with a linear
cell's coefficients, :mod:`~bptt_jax._engine.linear_scan`, the places the library derives a
backward by autodiff); no sequence is differentiated as a whole. Masks,
resets, truncation cuts, per-step clipping and kept deltas are the fast path's
(:mod:`~bptt_jax._engine.step_rules`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from bptt_jax import precision
from bptt_jax._engine import step_rules
from bptt_jax._engine.bundles import OutputError, WithOutputs, carries_of, reverse_per_device
from bptt_jax._engine.sharding import SUMMED, like_batch, vary_like
from bptt_jax._engine.step_rules import Row
from bptt_jax.cells import protocol


def step_backward(cell):
    """``(cparams, carry, x, new, dnew) -> (dparams, dcarry, dx)`` of one step: the cell's
    ``step_backward``, or ``jax.vjp`` of ``cell.step``'s new carry. For a cell whose outputs
    are not its carry (:func:`~bptt_jax.cells.protocol.has_output`), ``new`` and ``dnew``
    are pairs: the new carry and the output ``y_t``, and the errors on them."""
    if protocol.has_step_backward(cell):
        return cell.step_backward
    both = protocol.has_output(cell)

    def vjp(params, carry, x, new, dnew):
        # allowed autodiff (the contract's exception, "a user cell's one-step backward"): the
        # VJP of one step of a tier-1 user cell that brings no step_backward (of its whole
        # step, new carry and output, when its outputs are not its carry); the sequence
        # around it, the reverse scan and the sum over steps, stays hand-written
        del new
        step = cell.step if both else lambda p, c, x_: cell.step(p, c, x_)[0]
        _, pullback = jax.vjp(step, params, carry, x)
        return pullback(dnew)

    return vjp


def forward(cell, params, steps, carry0, keep: bool = True):
    """:func:`bptt_jax._engine.cell_scan.forward` of a cell off the fast path: a
    ``lax.scan`` of ``cell.step``. Its buffers are the inputs, ``(xs,)``."""
    xs, mask, resets = steps.xs, steps.mask, steps.resets
    cparams = precision.compute_params(params, xs.dtype)  # matrices in the compute dtype
    carry0 = like_batch(carry0, xs)
    store = xs.dtype  # the stacked states are stored in the compute dtype
    acc = jax.tree.leaves(carry0)[0].dtype  # the carry's (params') dtype

    both = protocol.has_output(cell)  # the outputs are the step's y_t, not its carry

    def body(carry, inputs):
        x_t, m_t, r_t = inputs
        carry = step_rules.reset(r_t, carry)
        # as in the autodiff path: x_t in the carry's dtype, the kernels in the compute dtype
        new, y = cell.step(cparams, carry, x_t.astype(acc))
        if m_t is not None:  # padded step: the carry passes through unchanged
            new = step_rules.select(m_t, new, carry)
        state = jax.tree.map(lambda c: c.astype(store), new)
        if both:  # the output of a padded step is zeros (PyTorch's padded outputs)
            y = y if m_t is None else jnp.where(m_t[:, None], y, 0)
            state = WithOutputs(state, y.astype(store))
        return new, state

    carry_t, states = lax.scan(body, carry0, (xs, mask, resets))
    return states, ((xs,) if keep else None), carry_t


def reverse_scan(cell, params, steps, carry0, stored, g, backprop):
    """:func:`bptt_jax._engine.cell_scan.reverse_scan` of a cell off the fast path.

    Returns ``(dcarry0, (dparams, dxs), deltas)``: ``dparams`` summed over the steps in the
    params' dtype, ``dxs`` (T, B, D).

    On a mesh it runs on each device's rows (``per_device``): the params' gradient crosses
    the devices once, after the loop, not at every step (where the VJP of a step would sum
    it over the batch).
    """
    walk = lambda *a: _reverse_scan(cell, *a)  # noqa: E731
    out_axes = (0, (SUMMED, 1), 1)
    return reverse_per_device(walk, params, steps, carry0, stored, g, backprop, out_axes)


def _reverse_scan(cell, params, steps, carry0, stored, g, backprop):
    """:func:`reverse_scan` on one device's rows (or a whole batch off a mesh)."""
    stored_states, (xs,) = stored
    states = carries_of(stored_states)
    dhs, dcarry_t = g
    both = protocol.has_output(cell)  # the error from outside is on y_t, not on the carry
    # inside shard_map: params made device-varying like the batch, so that the VJP of a step
    # gives each device's own gradient, summed over the devices once at the end
    cparams = vary_like(precision.compute_params(params, xs.dtype), xs)
    dcarry_t, carry0 = like_batch((dcarry_t, carry0), xs)
    acc = jax.tree.leaves(carry0)[0].dtype  # the carry's (params') dtype
    step_bwd = step_backward(cell)
    out_w = None
    if isinstance(dhs, OutputError):
        dhs, out_w = dhs
        out_w = out_w.astype(xs.dtype)

    def as_carry(state):  # a stored state back in the carry's dtypes
        return jax.tree.map(lambda s, c: s.astype(c.dtype), state, carry0)

    def body(scan_carry, row):
        dstate, dparams = scan_carry
        x_t, state_t = row.x.astype(acc), as_carry(carries_of(row.state))
        prev_t = step_rules.carry_entering(carry0, states, row.t, row.reset)
        if both:
            y_t = row.state.ys.astype(acc)
            dy = step_rules.outside_error(row.dh, out_w, acc)
            dy = jnp.zeros_like(y_t) if dy is None else dy
            dy = dy if row.mask is None else jnp.where(row.mask[:, None], dy, 0)
        else:
            dstate = step_rules.add_error(cell, dstate, row.dh, out_w, acc)
        dstate, kept = step_rules.clip_and_keep(cell, dstate, row.real, backprop)

        def step_back(d):  # (dparams, dcarry, dx) -> (dcarry, dparams, dx)
            if both:  # the step's backward takes the errors on its carry and on its y_t
                dp, dprev, dx = step_bwd(cparams, prev_t, x_t, (state_t, y_t), (d, dy))
            else:
                dp, dprev, dx = step_bwd(cparams, prev_t, x_t, state_t, d)
            return dprev, dp, dx

        dprev, (dp, dx) = step_rules.back_one_step(step_back, dstate, row.mask, row.cut, row.reset)
        dprev = jax.tree.map(lambda g, c: g.astype(c.dtype), dprev, carry0)
        dparams = jax.tree.map(lambda a, g: a + g.astype(a.dtype), dparams, dp)
        return (dprev, dparams), (dx.astype(xs.dtype), kept)

    ts = jnp.arange(xs.shape[0])
    init = (dcarry_t, vary_like(step_rules.zeros_like(params), xs))
    rows = Row(
        ts, x=xs, state=stored_states, dh=dhs, mask=steps.mask,
        cut=backprop.cuts, reset=steps.resets, real=backprop.real,
    )  # fmt: skip
    (dcarry0, dparams), (dxs, deltas) = lax.scan(body, init, rows, reverse=True)
    return dcarry0, (dparams, dxs), deltas


def backward(cell, params, steps, carry0, stored, g, backprop):
    """The whole sequence backward of ``cell``. Returns ``(dparams, dxs, dcarry0, deltas)``."""
    dcarry0, (grads, dxs), deltas = reverse_scan(cell, params, steps, carry0, stored, g, backprop)
    return grads, dxs, dcarry0, deltas
