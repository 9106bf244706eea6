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
    """``xs @ W_x + b`` for every step at once: (T, B, D) -> (T, B, G*H)."""
    t, b, d = xs.shape
    xp = xs.reshape(t * b, d) @ cell.input_kernel(params) + cell.input_bias(params)
    return xp.reshape(t, b, -1)


def forward(cell, params, xs, carry0, mask, *, keep_residuals: bool = True):
    """Run the forward scan.

    Returns:
      ``(states, residuals, carry_T)``: ``states`` is the carry after every step, stacked on
      a leading T axis (``cell.hidden(states)`` is ``hs``); ``residuals`` what the cell's
      backward needs (``None`` when ``keep_residuals`` is False).
    """
    xp = project_inputs(cell, params, xs)

    def body(carry, inputs):
        xp_t, m_t = inputs
        new, res = cell.forward(params, carry, xp_t)
        if m_t is not None:  # padded step: the carry passes through unchanged
            new = _select(m_t, new, carry)
        return new, (new, res if keep_residuals else None)

    carry_t, (states, res) = lax.scan(body, carry0, (xp, mask))
    return states, res, carry_t


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
    # The carry entering each step: carry0, then the states of steps 0..T-2.
    prev = jax.tree.map(lambda c0, s: jnp.concatenate([c0[None], s[:-1]], 0), carry0, states)
    cuts = truncation_cuts(t_len, truncate)

    def body(dstate, inputs):
        res_t, state_t, prev_t, dh_t, m_t, cut_t = inputs
        if dh_t is not None:
            dstate = cell.add_to_hidden(dstate, dh_t)
        if m_t is None:
            dprev, dxp, dhp = cell.backward(params, res_t, state_t, prev_t, dstate)
        else:  # padded step: its error goes straight to the previous carry
            zeros = jax.tree.map(jnp.zeros_like, dstate)
            dnew = _select(m_t, dstate, zeros)
            dprev, dxp, dhp = cell.backward(params, res_t, state_t, prev_t, dnew)
            dprev = jax.tree.map(jnp.add, dprev, _select(m_t, zeros, dstate))
        if cut_t is not None:
            dprev = jax.tree.map(lambda g: jnp.where(cut_t, jnp.zeros_like(g), g), dprev)
        return dprev, (dxp, dhp)

    dcarry0, (dxp, dhp) = lax.scan(
        body, dcarry_t, (res, states, prev, dhs, mask, cuts), reverse=True
    )

    rows = t_len * b
    w_x = cell.input_kernel(params)
    dxp2 = dxp.reshape(rows, -1)
    dhp2 = dxp2 if dhp is None else dhp.reshape(rows, -1)
    h_prev = cell.hidden(prev).reshape(rows, -1)
    grads = cell.assemble_grads(
        xs.reshape(rows, d).T @ dxp2,  # dW_x = sum_t x_t^T dA_t
        dxp2.sum(0),  # db   = sum_t dA_t
        h_prev.T @ dhp2,  # dW_h = sum_t h_{t-1}^T dA_t
        None if dhp is None else dhp2.sum(0),
    )
    dxs = (dxp2 @ w_x.T).reshape(t_len, b, d)
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
