"""The fast path: one built-in cell (a :class:`~bptt_jax.cells.FastCell`) over a sequence.

The engine owns every matmul over all ``T*B`` rows:

* the input projection ``x_t W_x`` for all ``T`` steps is one matmul per gate block before
  the forward scan, so each step only does the recurrent ``(B, H) @ (H, G*H)``;
* the forward ``lax.scan`` stacks the states (for the backward and as the outputs ``hs``)
  and the cell's residuals, nothing else;
* the backward is a ``lax.scan(..., reverse=True)`` carrying ``delta^h_{t+1}`` (the error on
  the state) from ``t = T`` down to ``1``; each step emits its pre-activations' gradient;
* every shared-weight gradient, summed over all steps, and ``dxs`` are then single matmuls
  over the ``T*B`` rows: ``dW_h = H_prev^T dA``, ``dW_x = X^T dA``, ``db = sum dA``,
  ``dX = dA W_x^T``.

The per-step buffers are updated in place, one set for the whole gradient (README.md: how
the loops keep XLA from copying them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from bptt_jax import precision
from bptt_jax._engine import options, step_rules
from bptt_jax._engine.bundles import OutputError
from bptt_jax._engine.sharding import like_batch, sum_over_rows
from bptt_jax._engine.step_rules import Row


def _blocks(a, n: int) -> tuple:
    """``a`` split into ``n`` equal blocks along its last axis."""
    return tuple(jnp.split(a, n, axis=-1)) if n > 1 else (a,)


def project_inputs(cell, params, xs):
    """``xs @ W_x`` for every step at once, one matmul per gate block.

    Returns a tuple of ``cell.n_blocks`` arrays (T, B, H), one per gate, each its own buffer
    (a block sliced out of a joint (T, B, G*H) row slows XLA:CPU's step fusions several
    times). The bias is added inside the step, so that no second buffer sits next to each
    matmul's output.
    """
    return tuple(xs @ w for w in _blocks(cell.input_kernel(params), cell.n_blocks))


def _write(buf, row, t):
    return lax.dynamic_update_index_in_dim(buf, row.astype(buf.dtype), t, 0)


def _rows(bufs, t):
    return tuple(step_rules.index(b, t) for b in bufs)


def _fresh(n: int, like):
    return tuple(jnp.zeros_like(like) for _ in range(n))


def forward(cell, params, steps, carry0, keep: bool = True):
    """Run the forward scan over ``steps`` (:class:`~bptt_jax._engine.bundles.Steps`; its
    ``drops`` are not read).

    Returns:
      ``(states, buffers, carry_T)``: ``states`` is the carry after every step, stacked on
      a leading T axis (``cell.hidden(states)`` is ``hs``); ``buffers`` a tuple of (T, B, H)
      arrays whose first ``cell.residual_blocks`` hold what the cell's backward needs per
      step and the rest are input projections no longer needed (the backward writes its
      gradients over all of them); ``None`` unless ``keep``.
    """
    xs, mask, resets = steps.xs, steps.mask, steps.resets
    n_res = cell.residual_blocks if keep else 0
    params = precision.compute_params(params, xs.dtype)  # kernels in the compute dtype
    carry0 = like_batch(carry0, xs)
    xp = project_inputs(cell, params, xs)
    store = xp[0].dtype  # the stacked states are stored in the compute dtype
    # residual i overwrites input projection i in place; extra residuals get fresh buffers
    n_in = min(cell.n_blocks, n_res)
    bufs0 = xp[:n_in] + _fresh(n_res - n_in, xp[0])
    bias = _blocks(cell.input_bias(params), cell.n_blocks)

    def body(scan_carry, inputs):
        carry, bufs = scan_carry
        t, xp_rest, m_t, r_t = inputs
        # (under a policy: the stored projection up to the bias's, the params', dtype)
        xp_t = tuple(a.astype(b.dtype) + b for a, b in zip(_rows(bufs[:n_in], t) + xp_rest, bias))
        carry = step_rules.reset(r_t, carry)
        new, res = cell.forward(params, carry, xp_t)
        if m_t is not None:  # padded step: the carry passes through unchanged
            new = step_rules.select(m_t, new, carry)
        if n_res:
            bufs = tuple(_write(buf, r, t) for buf, r in zip(bufs, res))
        return (new, bufs), jax.tree.map(lambda c: c.astype(store), new)

    ts = jnp.arange(xs.shape[0])
    (carry_t, bufs), states = lax.scan(
        body, (carry0, bufs0), (ts, xp[n_in:], mask, resets), unroll=options.scan_unroll(cell)
    )
    if not keep:
        return states, None, carry_t
    return states, bufs + xp[n_in:], carry_t


def reverse_scan(cell, params, steps, carry0, stored, g, backprop):
    """The reverse ``lax.scan`` of BPTT: ``delta`` from step T-1 down to 0.

    Args:
      steps: the forward's :class:`~bptt_jax._engine.bundles.Steps` (its mask and resets).
      stored: the forward's :class:`~bptt_jax._engine.bundles.Stored` ``(states, buffers)``.
      g: ``(dhs, dcarry_T)``, the cotangent of the forward's ``(hs, carry_T)``: ``dhs`` the
        error arriving at each ``h_t`` from outside the recurrence, (T, B, H), an
        :class:`~bptt_jax._engine.bundles.OutputError`, or ``None``.
      backprop: a :class:`~bptt_jax._engine.bundles.Backprop` (cuts, clipping, kept deltas).

    Returns:
      ``(dcarry0, dcols, deltas)``: the error on ``carry0``; each step's pre-activation
      gradients ``dA_t``, a tuple of ``cell.grad_blocks`` arrays (T, B, H) written over the
      forward's buffers in place (fresh ones where there are too few); and what
      ``backprop.keep_deltas`` keeps at each step, stacked (else ``None``).
    """
    states, res = stored
    dhs, dcarry_t = g
    hs = cell.hidden(states)
    params = precision.compute_params(params, hs.dtype)
    dcarry_t, carry0 = like_batch((dcarry_t, carry0), hs)
    bufs = () if res is None else tuple(res)
    n_res, n_grad = cell.residual_blocks, cell.grad_blocks
    if len(bufs) < n_res:
        raise ValueError(f"reverse_scan: the cell needs {n_res} residual buffers; got {len(bufs)}")
    # gradient block k is written over buffer k; residuals past the last one are only read
    out0 = bufs[:n_grad] + _fresh(n_grad - len(bufs[:n_grad]), hs)
    # W_h^T laid out once, row-major: a transpose folded into the per-step dot is slower
    w_t = lax.optimization_barrier(cell.recurrent_kernel(params).T)
    out_w = None
    if isinstance(dhs, OutputError):
        dhs, out_w = dhs
        out_w = out_w.astype(hs.dtype)
    n_in = min(n_res, n_grad)
    acc = jax.tree.leaves(carry0)[0].dtype  # the carry's (params') dtype

    def body(scan_carry, row):
        dstate, out, res_next = scan_carry
        # the step's backward sees everything in the carry's dtype
        res_t = tuple(r.astype(acc) for r in res_next + row.res)
        state_t = jax.tree.map(lambda s, c: s.astype(c.dtype), row.state, carry0)
        prev_t = step_rules.carry_entering(carry0, states, row.t, row.reset)
        dstate = step_rules.add_error(cell, dstate, row.dh, out_w, acc)
        dstate, kept = step_rules.clip_and_keep(cell, dstate, row.real, backprop)
        dprev, (dcols,) = step_rules.back_one_step(
            lambda d: cell.backward(params, res_t, state_t, prev_t, d, w_t),
            dstate, row.mask, row.cut, row.reset,
        )  # fmt: skip
        out = tuple(_write(buf, d, row.t) for buf, d in zip(out, dcols))
        # the residuals of step t-1, read after this step's write
        res_next = _rows(out[:n_in], jnp.maximum(row.t - 1, 0))
        return (dprev, out, res_next), kept

    ts = jnp.arange(hs.shape[0])
    init = (dcarry_t, out0, _rows(out0[:n_in], hs.shape[0] - 1))
    rows = Row(
        ts, state=states, dh=dhs, mask=steps.mask, cut=backprop.cuts, reset=steps.resets,
        real=backprop.real, res=bufs[n_in:n_res],
    )  # fmt: skip
    (dcarry0, dcols, _), deltas = lax.scan(
        body, init, rows, reverse=True, unroll=options.scan_unroll(cell)
    )
    return dcarry0, dcols, deltas


def weight_grads(cell, params, steps, carry0, states, dcols):
    """Every shared-weight gradient, summed over all steps, as matmuls over the T*B rows.

    ``dcols`` is the reverse scan's tuple of pre-activation gradients. Returns
    ``(dparams, dxs)``: per gate, ``dW_x = X^T dA``, ``dW_h = H_prev^T dA``, ``db = sum dA``
    (assembled by the cell) and ``dX = sum_gates dA W_x^T``.
    """
    xs, resets = steps.xs, steps.resets
    acc = cell.input_kernel(params).dtype  # sums in the params' dtype
    cparams = precision.compute_params(params, xs.dtype)
    hs = cell.hidden(states)
    carry0 = like_batch(carry0, hs)
    h_prev = jnp.concatenate([cell.hidden(carry0).astype(hs.dtype)[None], hs[:-1]], 0)
    if resets is not None:
        h_prev = jnp.where(resets[..., None], jnp.zeros((), hs.dtype), h_prev)

    def side(x, blocks):
        cat = (lambda parts: jnp.concatenate(parts, -1)) if len(blocks) > 1 else (lambda p: p[0])
        da = [dcols[k].astype(x.dtype) for k in blocks]
        x_t = None
        if len(blocks) > 1:
            # laid out once as (D, T, B), row-major, for every gate's matmul (README.md)
            x_t = lax.optimization_barrier(jnp.transpose(x, (2, 0, 1)))
        dw = cat([sum_over_rows(x, a, acc, x_t=x_t) for a in da])
        return dw, cat([dcols[k].sum((0, 1), dtype=acc) for k in blocks])

    dw_x, db_x = side(xs, cell.input_grads)  # sum_t x_t^T dA_t, sum_t dA_t
    dw_h, db_h = side(h_prev, cell.recurrent_grads)  # sum_t h_{t-1}^T dA_t
    grads = cell.assemble_grads(params, dw_x, dw_h, db_x, db_h)
    w_x = _blocks(cell.input_kernel(cparams), cell.n_blocks)
    dxs = sum(
        jnp.matmul(dcols[k].astype(w.dtype), w.T, preferred_element_type=acc)
        for k, w in zip(cell.input_grads, w_x)
    )
    return grads, dxs


def backward(cell, params, steps, carry0, stored, g, backprop):
    """The whole sequence backward of ``cell``: :func:`reverse_scan`, then
    :func:`weight_grads`. Returns ``(dparams, dxs, dcarry0, deltas)``."""
    dcarry0, dcols, deltas = reverse_scan(cell, params, steps, carry0, stored, g, backprop)
    grads, dxs = weight_grads(cell, params, steps, carry0, stored[0], dcols)
    return grads, dxs, dcarry0, deltas
