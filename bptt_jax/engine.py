"""The sequence engine: forward scan, hand-written reverse scan, and :func:`unroll`.

Written once for every cell. A cell contributes its step forward and its step backward (see
:mod:`bptt_jax.cells._common`); the engine does the rest:

* the input projection ``x_t W_x + b`` for all ``T`` steps is one ``(T*B, D) @ (D, G*H)``
  matmul before the forward scan, so each step only does the recurrent ``(B, H) @ (H, G*H)``;
* the forward ``lax.scan`` stacks the states (for the backward and as the output ``hs``) and
  the cell's residuals, nothing else;
* the backward is a ``lax.scan(..., reverse=True)`` carrying ``delta^h_{t+1}`` (the error on
  the state) from ``t = T`` down to ``1``; each step emits the gradient of its pre-activations;
* every shared-weight gradient, summed over all steps, and ``dxs`` are then single matmuls over
  the ``T*B`` rows: ``dW_h = H_prev^T dA``, ``dW_x = X^T dA``, ``db = sum dA``, ``dX = dA W_x^T``.

Masks (right-padded variable-length batches) and truncation are handled here, for all cells.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from bptt_jax import validation


def _select(m, a, b):
    """Per-example select over a carry pytree: ``a`` where ``m`` (B,) is set, else ``b``."""
    return jax.tree.map(lambda x, y: jnp.where(m[:, None], x, y), a, b)


def truncation_cuts(length: int, truncate: int | None):
    """Boolean (T,): step t's incoming carry is cut from the gradient (t = k, 2k, ...)."""
    if truncate is None or truncate >= length:
        return None
    t = jnp.arange(length)
    return (t % truncate == 0) & (t > 0)


def project_inputs(cell, params, xs):
    """``xs @ W_x`` for every step at once: (T, B, D) -> (T, B, G*H).

    The bias is added inside the step: adding it here would materialise a second
    (T, B, G*H) buffer next to the matmul's output on XLA:CPU.
    """
    t, b, d = xs.shape
    return (xs.reshape(t * b, d) @ cell.input_kernel(params)).reshape(t, b, -1)


def _index(x, t):
    return lax.dynamic_index_in_dim(x, t, 0, keepdims=False)


def _write(buf, row, t):
    return lax.dynamic_update_index_in_dim(buf, row, t, 0)


# In-place loops. A step reads row t of a (T, B, W) buffer and overwrites row t with its
# result. If the old buffer had any reader besides the write, XLA would copy the whole buffer
# in every iteration (O(T^2) traffic), because it fuses the row read into consumers that it
# cannot order before the write. So the row a step needs is read one iteration early, from
# the buffer *after* that iteration's write (the neighbouring row is untouched), and carried.


def forward(cell, params, xs, carry0, mask, *, keep_residuals: bool = True):
    """Run the forward scan.

    Returns:
      ``(states, residuals, carry_T)``: ``states`` is the carry after every step, stacked on
      a leading T axis (``cell.hidden(states)`` is ``hs``); ``residuals`` (T, B, R) what the
      cell's backward needs (``None`` when ``keep_residuals`` is False or the cell keeps
      nothing but its state).
    """
    xp = project_inputs(cell, params, xs)
    keep = keep_residuals and cell.residual_blocks > 0
    # Residuals of the same width as xp_t overwrite it in place: one buffer, not two.
    in_place = keep and cell.residual_blocks == cell.n_blocks

    t_last = xs.shape[0] - 1
    bias = cell.input_bias(params)

    def body(scan_carry, inputs):
        carry, buf, xp_next = scan_carry
        t, xp_t, m_t = inputs
        if in_place:
            xp_t = xp_next
        new, res = cell.forward(params, carry, xp_t + bias)
        if m_t is not None:  # padded step: the carry passes through unchanged
            new = _select(m_t, new, carry)
        if in_place:
            buf, res = _write(buf, res, t), None
            xp_next = _index(buf, jnp.minimum(t + 1, t_last))
        return (new, buf, xp_next), (new, res if keep else None)

    ts = jnp.arange(xs.shape[0])
    init = (carry0, xp, xp[0]) if in_place else (carry0, None, None)
    (carry_t, buf, _), (states, res) = lax.scan(body, init, (ts, None if in_place else xp, mask))
    return states, (buf if in_place else res), carry_t


def backward(cell, params, xs, carry0, mask, states, res, dhs, dcarry_t, truncate):
    """The hand-written BPTT: reverse scan over time, then the summed weight gradients.

    Args:
      dhs: ``dL/dh_t`` arriving from outside the recurrence (readout, user loss), (T, B, H);
        ``None`` for no such cotangent.
      dcarry_t: cotangent of the final carry.
      truncate: ``None`` (full BPTT) or k: the error on the carry entering steps k, 2k, ...
        is dropped, exactly as ``lax.stop_gradient`` on those carries would.

    Returns:
      ``(dparams, dxs, dcarry0)``.
    """
    t_len, b, d = xs.shape
    h = cell.hidden_size
    cuts = truncation_cuts(t_len, truncate)
    # Each step's pre-activation gradients overwrite its residuals in place (same width),
    # so the backward allocates no second (T, B, G*H) buffer.
    in_place = res is not None and cell.grad_blocks == cell.residual_blocks
    if in_place:
        buf = res
    else:
        buf = jnp.zeros((t_len, b, cell.grad_blocks * h), xs.dtype)

    def body(scan_carry, inputs):
        dstate, buf, res_next = scan_carry
        t, state_t, dh_t, m_t, cut_t = inputs
        res_t = res_next if in_place else (None if res is None else _index(res, t))
        # The carry entering step t: carry0 at t = 0, else the state after step t-1.
        prev_t = jax.tree.map(
            lambda c0, s: jnp.where(t == 0, c0, _index(s, jnp.maximum(t - 1, 0))),
            carry0,
            states,
        )
        if dh_t is not None:
            dstate = cell.add_to_hidden(dstate, dh_t)
        if m_t is None:
            dprev, dcols = cell.backward(params, res_t, state_t, prev_t, dstate)
        else:  # padded step: its error goes straight to the previous carry
            zeros = jax.tree.map(jnp.zeros_like, dstate)
            dprev, dcols = cell.backward(
                params, res_t, state_t, prev_t, _select(m_t, dstate, zeros)
            )
            dprev = jax.tree.map(jnp.add, dprev, _select(m_t, zeros, dstate))
        if cut_t is not None:
            dprev = jax.tree.map(lambda g: jnp.where(cut_t, jnp.zeros_like(g), g), dprev)
        buf = _write(buf, dcols, t)
        if in_place:  # the residuals of step t-1, read after this step's write
            res_next = _index(buf, jnp.maximum(t - 1, 0))
        return (dprev, buf, res_next), None

    ts = jnp.arange(t_len)
    init = (dcarry_t, buf, res[-1] if in_place else None)
    (dcarry0, dcols, _), _ = lax.scan(body, init, (ts, states, dhs, mask, cuts), reverse=True)

    # Every shared-weight gradient, summed over all steps, as one matmul over T*B rows.
    rows = t_len * b
    dcols = dcols.reshape(rows, -1)
    h_prev = jnp.concatenate([cell.hidden(carry0)[None], cell.hidden(states)[:-1]], 0)
    grads = cell.assemble_grads(
        params,
        xs.reshape(rows, d).T @ dcols,  # sum_t x_t^T dA_t
        h_prev.reshape(rows, h).T @ dcols,  # sum_t h_{t-1}^T dA_t
        dcols.sum(0),  # sum_t dA_t
    )
    dxs = (dcols @ cell.dx_kernel(params).T).reshape(t_len, b, d)
    return grads, dxs, dcarry0


# ---------------------------------------------------------------------------- unroll
@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _unroll_manual(cell, truncate, params, xs, carry0, mask):
    states, _, carry_t = forward(cell, params, xs, carry0, mask, keep_residuals=False)
    return cell.hidden(states), carry_t


def _unroll_fwd(cell, truncate, params, xs, carry0, mask):
    states, res, carry_t = forward(cell, params, xs, carry0, mask)
    return (cell.hidden(states), carry_t), (params, xs, carry0, mask, states, res)


def _unroll_bwd(cell, truncate, saved, cotangents):
    params, xs, carry0, mask, states, res = saved
    dhs, dcarry_t = cotangents
    grads, dxs, dcarry0 = backward(
        cell, params, xs, carry0, mask, states, res, dhs, dcarry_t, truncate
    )
    return grads, dxs, dcarry0, None


_unroll_manual.defvjp(_unroll_fwd, _unroll_bwd)


def unroll_autodiff(cell, params, xs, carry0, mask=None, truncate=None):
    """The reference: a plain per-step ``lax.scan`` with no custom rule.

    This is the loop a user would write; ``jax.grad`` derives its backward. Truncation is
    ``lax.stop_gradient`` on the carry entering steps k, 2k, ...
    """
    cuts = truncation_cuts(xs.shape[0], truncate)

    def body(carry, inputs):
        x_t, m_t, cut_t = inputs
        if cut_t is not None:
            carry = jax.tree.map(lambda c: jnp.where(cut_t, lax.stop_gradient(c), c), carry)
        new, _ = cell.step(params, carry, x_t)
        if m_t is not None:
            new = _select(m_t, new, carry)
        return new, cell.hidden(new)

    carry_t, hs = lax.scan(body, carry0, (xs, mask, cuts))
    return hs, carry_t


def unroll(cell, params, xs, carry0=None, *, mask=None, truncate=None, backward="manual"):
    """Run ``cell`` over a time-major sequence; ``jax.grad`` uses the hand-written BPTT.

    Equivalent to::

        def unroll(cell, params, xs, carry):
            hs = []
            for t in range(T):
                new, h = cell.step(params, carry, xs[t])
                carry = new if mask is None else where(mask[t], new, carry)
                hs.append(cell.hidden(carry))
            return stack(hs), carry

    but compiled as one ``lax.scan`` with the input projection hoisted out of the loop, and
    differentiated by a hand-written reverse scan (a ``jax.custom_vjp``) that returns real
    cotangents for ``params``, ``xs`` and ``carry0``, so any loss built on ``hs`` and
    ``carry_T`` gets the manual backward under ``jax.grad``. Forward-mode AD (``jax.jvp``,
    ``jax.jacfwd``) cannot pass a ``custom_vjp``: use ``backward="autodiff"`` for it.

    Args:
      cell: a :class:`~bptt_jax.Elman`, :class:`~bptt_jax.LSTM` or :class:`~bptt_jax.GRU`.
      params: the cell's params (``cell.init(key, D)``).
      xs: inputs, time-major ``(T, B, D)``, the params' dtype.
      carry0: initial carry (``(B, H)``, or ``LSTMCarry(h, c)``); ``None`` for zeros.
      mask: optional ``(T, B)`` 0/1 or bool. Sequences are right-padded: at a step where the
        mask is 0 the carry passes through unchanged, so ``hs[t]`` repeats the last valid
        state and ``carry_T`` is each sequence's last valid state.
      truncate: ``None`` for full BPTT, or k: truncated BPTT in chunks ``[0, k), [k, 2k),
        ...``; the forward is unchanged and the backward drops the error on the carry
        entering steps k, 2k, ... (exactly ``lax.stop_gradient`` there). ``carry0`` still
        gets the first chunk's gradient. ``truncate >= T`` is full BPTT.
      backward: ``"manual"`` (the hand-written BPTT) or ``"autodiff"`` (a plain
        ``lax.scan`` that JAX differentiates; the reference).

    Returns:
      ``(hs, carry_T)``: hidden states ``(T, B, H)`` and the final carry.

    Raises:
      ValueError / TypeError at trace time for wrong shapes, dtypes or carry structure.

    Example:
      >>> import jax, jax.numpy as jnp, bptt_jax
      >>> cell = bptt_jax.GRU(8)
      >>> params = cell.init(jax.random.key(0), input_size=4)
      >>> xs = jax.random.normal(jax.random.key(1), (12, 3, 4))
      >>> loss = lambda p: jnp.sum(bptt_jax.unroll(cell, p, xs)[0] ** 2)
      >>> grads = jax.grad(loss)(params)       # hand-written backward
      >>> type(grads).__name__
      'GRUParams'

    References:
      Werbos, "Backpropagation through time: what it does and how to do it", Proc. IEEE 1990.
    """
    validation.check_choice("unroll", "backward", backward, ("manual", "autodiff"))
    xs, carry0, mask, _ = validation.check_unroll_args(
        "unroll", cell, params, xs, carry0, mask, truncate
    )
    if backward == "autodiff":
        return unroll_autodiff(cell, params, xs, carry0, mask, truncate)
    return _unroll_manual(cell, truncate, params, xs, carry0, mask)
