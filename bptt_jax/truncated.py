"""TBPTT(k1, k2) (Williams & Peng 1990) and stateful streams, on the hand-written backward.

A long sequence ``xs`` (T, B, D) is trained in **updates**. Update ``j = 0, 1, ..., N-1``
(``N = ceil(T / k1)``) counts the losses of the k1 new steps ``[j*k1, (j+1)*k1)`` and
backpropagates ``k2 >= k1`` steps into the past: its **window** is the k2 steps

    ``[(j+1)*k1 - k2, (j+1)*k1)``

(the first ``k2 - k1`` of them are *history*: recomputed, backpropagated through, but their
losses are not counted). Exactly::

    saved = carry0                        # the carry entering the first step of window 0
    for j in range(N):
        lo = (j+1)*k1 - k2                # window j is steps [lo, lo + k2)
        # Forward from `saved` over the window with the CURRENT params. The loss is
        # L_j = reduce over steps t in [j*k1, (j+1)*k1) (and mask & loss_mask) of l_t, and
        # g_j = dL_j / d(params, readout) is backpropagated over the whole window, `saved`
        # being a constant (no gradient flows into the previous window).
        L_j, g_j, saved = loss_and_grads(window j from saved,
                                         carry_index=k1 - 1 if j < N - 1 else k2 - 1)
        params, readout = update(params, readout, g_j)
    return saved                          # the carry after step T - 1

``saved`` for window j+1 is the carry after step ``(j+2)*k1 - k2 - 1``, i.e. after step
``k1 - 1`` of window j, computed by window j's forward (with the params *before* update j);
the carry returned at the end is the carry after the last window's last step, ``T - 1``.
Steps outside ``[0, T)`` are padding with ``mask`` 0 (the carry passes through unchanged, no
loss): window 0 is left-padded with ``k2 - k1`` such steps so ``carry0`` enters step 0
unchanged, and when k1 does not divide T the last window is right-padded. So every window
has exactly k2 steps, the windows stack into one ``(N, k2, B, ...)`` array, and the stream
is one ``lax.scan`` over windows with the optimizer update inside (plus the last window on
its own when ``k2 > k1``). ``k1 == k2`` (disjoint windows) is the common case;
``k1 == k2 == T`` is one full-BPTT update.

A **stateful stream** (a long text read by B readers, a stream of batches) is trained chunk
by chunk: call :func:`tbptt` (or the train step of :mod:`bptt_jax.train`) on each chunk with
the carry it returned, by value. ``resets`` (T, B) marks where a new sequence starts in an
example's stream: the carry entering that step is replaced by zeros and no gradient crosses
it. Chunking does not change the result when k1 == k2 divides the chunk length (the windows
are the same); with ``k2 > k1`` each chunk starts a fresh history (its first window is
left-padded again).

References:
  Williams & Peng, "An efficient gradient-based algorithm for on-line training of recurrent
  network trajectories", Neural Computation 1990 (TBPTT(h, h')).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bptt_jax import losses, validation
from bptt_jax.models import LearnedCarry, is_bidirectional


class Batch(NamedTuple):
    """A batch of sequences, time-major ``(T, B, ...)``; from :func:`windows`, ``(N, k2, B, ...)``.

    The optional flags are ``(T, B)`` 0/1 or bool; ``None`` means all steps valid / counted /
    no reset. :func:`windows` returns them all set (padding and history steps are False).
    """

    xs: jax.Array  # (T, B, D) inputs; zeros on window padding steps
    targets: jax.Array  # (T, B) integer classes ("xent") or (T, B, O) ("mse")
    mask: jax.Array | None = None  # (T, B) right padding: 0 = carry passes, no loss
    loss_mask: jax.Array | None = None  # (T, B) 0 = the step's loss is not counted
    resets: jax.Array | None = None  # (T, B) 1 = a sequence starts: the carry entering is 0


def check_k1_k2(fn: str, k1, k2) -> tuple[int, int]:
    """``(k1, k2)`` with ``k2=None`` meaning ``k1``; ``ValueError`` naming the bad argument."""
    for name, k in (("k1", k1), ("k2", k2)):
        if k is None and name == "k2":
            continue
        if isinstance(k, bool) or not isinstance(k, int | np.integer):
            raise TypeError(f"{fn}: {name} must be a positive int; got {k!r}")
        if k <= 0:
            raise ValueError(f"{fn}: {name} must be a positive int (>= 1); got {k}")
    k2 = k1 if k2 is None else k2
    if k1 > k2:
        raise ValueError(
            f"{fn}: k1 must be <= k2 (each update backpropagates k2 >= k1 steps); got "
            f"k1={k1}, k2={k2}; use k2={k1} for disjoint windows"
        )
    return int(k1), int(k2)


def num_windows(length: int, k1: int) -> int:
    """``ceil(T / k1)``: the number of TBPTT updates over T steps."""
    return -(-length // k1)


def window_steps(length: int, k1: int, k2: int) -> np.ndarray:
    """``(N, k2)`` global step index of every window step (``< 0`` or ``>= T``: padding)."""
    n = num_windows(length, k1)
    return (np.arange(1, n + 1) * k1 - k2)[:, None] + np.arange(k2)[None, :]


def windows(
    xs, targets, *, k1: int, k2: int | None = None, mask=None, loss_mask=None, resets=None
) -> Batch:
    """Cut ``(T, B, ...)`` arrays into the TBPTT(k1, k2) windows (see the module docstring).

    Args:
      xs: inputs ``(T, B, D)``.
      targets: ``(T, B)`` integer classes or ``(T, B, O)``.
      k1: new steps per update (their losses count); a positive int.
      k2: steps per window (backpropagation depth), ``k2 >= k1``; ``None`` for ``k1``.
      mask, loss_mask, resets: optional ``(T, B)`` 0/1 or bool, as in
        :func:`bptt_jax.losses.loss_and_grads`.

    Returns:
      A :class:`Batch` of windows: every array has leading axes ``(N, k2)``, and ``mask`` and
      ``loss_mask`` are always set (``resets`` only when given).

    Example:
      >>> import jax.numpy as jnp
      >>> from bptt_jax import truncated
      >>> w = truncated.windows(jnp.ones((10, 2, 3)), jnp.zeros((10, 2), int), k1=4, k2=6)
      >>> w.xs.shape                         # ceil(10 / 4) = 3 windows of 6 steps
      (3, 6, 2, 3)
      >>> w.mask[:, :, 0].astype(int)        # padding before step 0 and after step 9
      Array([[0, 0, 1, 1, 1, 1],
             [1, 1, 1, 1, 1, 1],
             [1, 1, 1, 1, 0, 0]], dtype=int32)
      >>> w.loss_mask[:, :, 0].astype(int)   # the first k2 - k1 = 2 steps are history
      Array([[0, 0, 1, 1, 1, 1],
             [0, 0, 1, 1, 1, 1],
             [0, 0, 1, 1, 0, 0]], dtype=int32)
    """
    fn = "windows"
    k1, k2 = check_k1_k2(fn, k1, k2)
    xs = validation.as_array(fn, "xs", xs)
    targets = validation.as_array(fn, "targets", targets)
    if xs.ndim != 3:
        raise ValueError(f"{fn}: xs must have shape (T, B, D); got {xs.shape}")
    t, b, _ = xs.shape
    if t < 1 or b < 1:
        raise ValueError(f"{fn}: xs must have T >= 1 and B >= 1; got {xs.shape}")
    if targets.shape[:2] != (t, b):
        raise ValueError(
            f"{fn}: targets must have leading shape (T, B) = {(t, b)} like xs; got {targets.shape}"
        )
    steps = window_steps(t, k1, k2)
    inside = (steps >= 0) & (steps < t)  # (N, k2)
    idx = jnp.asarray(np.clip(steps, 0, t - 1))
    inside_b = jnp.broadcast_to(jnp.asarray(inside)[:, :, None], (*steps.shape, b))
    counted = inside_b & jnp.asarray(np.arange(k2) >= k2 - k1)[None, :, None]

    def flags(m, name):
        if m is None:
            return None
        m = validation.as_array(fn, name, m)
        if m.shape != (t, b):
            raise ValueError(f"{fn}: {name} must have shape (T, B) = {(t, b)}; got {m.shape}")
        return m[idx].astype(bool)

    m, lm, rs = flags(mask, "mask"), flags(loss_mask, "loss_mask"), flags(resets, "resets")
    xs_w = jnp.where(inside_b[..., None], xs[idx], jnp.zeros((), xs.dtype))
    return Batch(
        xs=xs_w,
        targets=targets[idx],
        mask=inside_b if m is None else inside_b & m,
        loss_mask=counted if lm is None else counted & lm,
        resets=None if rs is None else inside_b & rs,
    )


#: ``update(update_state, params, readout, lg, window) -> (update_state, params, readout, aux)``:
#: applies one update from the window's :class:`~bptt_jax.losses.LossAndGrads` ``lg``;
#: ``window`` is the window's :class:`Batch` (k2 steps).
UpdateFn = Callable[[Any, Any, Any, losses.LossAndGrads, Batch], tuple[Any, Any, Any, Any]]


class TBPTTResult(NamedTuple):
    """What :func:`tbptt` returns."""

    update_state: Any  # the ``update`` function's state after the last update
    params: Any  # the cell params after the last update
    readout: losses.ReadoutParams  # the readout after the last update
    carry: Any  # the carry after step T - 1: pass it to the next chunk of the stream
    aux: Any  # what ``update`` returned as aux, stacked over the N updates


def tbptt(
    cell,
    params,
    readout: losses.ReadoutParams,
    xs,
    targets,
    carry0=None,
    *,
    k1: int,
    k2: int | None = None,
    update: UpdateFn,
    update_state: Any = None,
    mask=None,
    loss_mask=None,
    resets=None,
    loss: str = "xent",
    reduction: str = "mean",
    dropout_key: jax.Array | None = None,
    compute_dtype=None,
) -> TBPTTResult:
    """Train over one sequence (or chunk of a stream) with TBPTT(k1, k2): N = ceil(T/k1) updates.

    The exact semantics are in the module docstring: update j backpropagates the losses of
    steps ``[j*k1, (j+1)*k1)`` through the k2-step window ``[(j+1)*k1 - k2, (j+1)*k1)``,
    re-run with the current params from the saved carry entering its first step. Gradients
    come from the hand-written :func:`bptt_jax.losses.loss_and_grads`; the windows run as
    one ``lax.scan`` (wrap the call in ``jax.jit``).

    Args:
      cell, params, readout, carry0, loss, reduction: as in :func:`bptt_jax.sequence_loss`
        (``reduction`` applies per window: ``"mean"`` divides by that window's counted tokens).
      xs, targets, mask, loss_mask, resets: ``(T, B, ...)``, cut by :func:`windows`.
      k1: new steps per update; k2: backpropagation depth, ``k2 >= k1`` (``None``: k1).
      update: ``update(update_state, params, readout, lg, window) -> (update_state, params,
        readout, aux)`` with ``lg`` the window's :class:`~bptt_jax.losses.LossAndGrads` and
        ``window`` its :class:`Batch`.
      update_state: the update function's initial state (e.g. an optax state).
      dropout_key: for a :class:`~bptt_jax.Stack` with dropout: window j draws its masks
        from ``fold_in(dropout_key, j)``; ``None``: no dropout.

    Returns:
      :class:`TBPTTResult` ``(update_state, params, readout, carry, aux)``; ``aux`` stacked
      over the N updates.

    Raises:
      ValueError: ``k1`` or ``k2`` not positive, or ``k1 > k2`` (naming the argument); a
        bidirectional model (TBPTT is undefined for it: the reverse direction needs the
        whole future).

    Example:
      >>> import jax, bptt_jax
      >>> from bptt_jax import truncated
      >>> cell = bptt_jax.GRU(8)
      >>> k = jax.random.split(jax.random.key(0), 4)
      >>> params, ro = cell.init(k[0], 3), bptt_jax.init_readout(k[1], 8, 5)
      >>> xs = jax.random.normal(k[2], (50, 2, 3))
      >>> ys = jax.random.randint(k[3], (50, 2), 0, 5)
      >>> def sgd(n, p, r, lg, window):    # one SGD step per window; keep the losses
      ...     p, r = jax.tree.map(lambda w, g: w - 0.1 * g, (p, r), (lg.params, lg.readout))
      ...     return n + 1, p, r, lg.value
      >>> out = truncated.tbptt(
      ...     cell, params, ro, xs, ys, k1=20, k2=30, update=sgd, update_state=0)
      >>> int(out.update_state), out.aux.shape, out.carry.shape    # ceil(50 / 20) = 3 updates
      (3, (3,), (2, 8))
    """
    fn = "tbptt"
    k1, k2 = check_k1_k2(fn, k1, k2)
    if is_bidirectional(cell):
        raise ValueError(
            f"{fn}: TBPTT(k1={k1}, k2={k2}) is undefined for a bidirectional model (its "
            "reverse direction needs the whole future of every step); train it with full BPTT"
        )
    validation.check_whole_in_time(fn, xs)  # (windows are cut from the whole sequence)
    w = windows(xs, targets, k1=k1, k2=k2, mask=mask, loss_mask=loss_mask, resets=resets)
    if carry0 is None and isinstance(cell, LearnedCarry):  # the stream starts from it
        carry0 = cell.initial_carry(params, w.xs.shape[2])
    if carry0 is None:
        dtype = validation.check_model_args(fn, cell, params, w.xs[0], None, None, None)[-1]
        carry0 = cell.zero_carry(w.xs.shape[2], dtype)
    n_windows = w.xs.shape[0]

    def body(state, win, carry_index):
        ustate, p, ro, carry, j = state
        lg = losses.loss_and_grads(
            cell,
            p,
            ro,
            win.xs,
            win.targets,
            carry,
            mask=win.mask,
            loss_mask=win.loss_mask,
            resets=win.resets,
            loss=loss,
            reduction=reduction,
            carry_index=carry_index,
            dropout_key=None if dropout_key is None else jax.random.fold_in(dropout_key, j),
            compute_dtype=compute_dtype,
        )
        ustate, p, ro, aux = update(ustate, p, ro, lg, win)
        return (ustate, p, ro, lg.carry, j + 1), aux

    state = (update_state, params, readout, carry0, jnp.zeros((), jnp.int32))
    if k1 == k2:  # the carry after step k1 - 1 = k2 - 1 of every window
        state, aux = lax.scan(partial(body, carry_index=k1 - 1), state, w)
    else:  # the last window passes on the carry after its last step, not after step k1 - 1
        head = jax.tree.map(lambda a: a[:-1], w)
        last = jax.tree.map(lambda a: a[-1], w)
        if n_windows > 1:
            state, aux_head = lax.scan(partial(body, carry_index=k1 - 1), state, head)
        state, aux_last = body(state, last, carry_index=k2 - 1)
        aux = jax.tree.map(lambda a: a[None], aux_last)
        if n_windows > 1:
            aux = jax.tree.map(lambda h, a: jnp.concatenate([h, a]), aux_head, aux)
    ustate, params, readout, carry, _ = state
    return TBPTTResult(ustate, params, readout, carry, aux)
