"""Readout and sequence losses, fused with the engine into one hand-written backward."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bptt_jax import _engine as engine
from bptt_jax import validation
from bptt_jax._engine.sharding import eager_mesh, sum_over_rows
from bptt_jax.cells import _common
from bptt_jax.models import (
    LearnedCarry,
    LearnedCarryParams,
    is_bidirectional,
    output_size,
    unwrap,
)
from bptt_jax.readout import ReadoutParams as ReadoutParams
from bptt_jax.readout import init_readout as init_readout

LOSSES = ("xent", "mse")
REDUCTIONS = ("mean", "sum")


# ---------------------------------------------------------------- per-token losses
def _one_hot(targets, n):
    # int32 classes: in the targets' own dtype (uint8) arange(O) would wrap past 255
    return targets[..., None].astype(jnp.int32) == jnp.arange(n, dtype=jnp.int32)


def token_losses(loss: str, logits, targets):
    """Per-token loss ``l_{t,b}`` for ``logits`` (..., O).

    ``"xent"``: ``logsumexp(y) - y[target]`` (targets (...) integers); a target outside
    ``[0, O)`` gives NaN, never a plausible number. ``"mse"``: ``mean_o (y - target)^2``.
    """
    if loss == "xent":
        o = logits.shape[-1]
        hot = _one_hot(targets, o)
        picked = jnp.sum(jnp.where(hot, logits, 0), axis=-1)
        lse = jax.nn.logsumexp(logits, axis=-1)
        in_range = (targets >= 0) & (targets < o)
        return jnp.where(in_range, lse - picked, jnp.nan)
    return jnp.mean((logits - targets) ** 2, axis=-1)


def _token_loss_grads(loss: str, logits, targets):
    """Hand-written ``dl_{t,b}/dy_{t,b}``, (..., O)."""
    o = logits.shape[-1]
    if loss == "xent":
        hot = _one_hot(targets, o)
        g = jax.nn.softmax(logits, axis=-1) - hot.astype(logits.dtype)
        in_range = (targets >= 0) & (targets < o)
        return jnp.where(in_range[..., None], g, jnp.nan)
    return (2.0 / o) * (logits - targets)


def _weights(mask, reduction: str, n: int, dtype):
    """Per-token weights ``w`` with ``L = sum w * l``; the mask's shape or a scalar."""
    if mask is None:
        return jnp.asarray(1.0 / n if reduction == "mean" else 1.0, dtype)
    m = mask.astype(dtype)
    if reduction == "sum":
        return m
    return m / jnp.maximum(jnp.sum(m), 1)


def reduce_losses(l, mask, reduction: str):
    """``L = sum_{t,b} w_{t,b} l_{t,b}`` (masked-out tokens contribute exactly 0)."""
    w = _weights(mask, reduction, l.size, l.dtype)
    if mask is not None:
        l = jnp.where(mask, l, 0)
    return jnp.sum(w * l)


def _readout(readout, hs):
    """The logits ``hs @ W_hy + b_y`` (T, B, O), in the readout's dtype; under a precision
    policy the product runs on ``hs``'s compute dtype and accumulates in the readout's."""
    w = readout.w_hy.astype(hs.dtype)
    return jnp.matmul(hs, w, preferred_element_type=readout.b_y.dtype) + readout.b_y


def _readout_grads(readout, hs, dy):
    """``(dW_hy = sum_{t,b} h^T dy, db_y = sum_{t,b} dy)``, in the readout's dtype."""
    acc = readout.b_y.dtype
    return ReadoutParams(sum_over_rows(hs, dy.astype(hs.dtype), acc), dy.sum((0, 1), dtype=acc))


def _valid(mask, loss_mask):
    """Tokens that count in the loss: ``mask & loss_mask`` (either may be ``None``)."""
    if loss_mask is None:
        return mask
    return loss_mask if mask is None else mask & loss_mask


# ---------------------------------------------------------------- the loss head
def _scale(valid, reduction, t, b, dtype):
    """``L = scale * sum of counted token losses``."""
    if reduction == "sum":
        return jnp.ones((), dtype)
    count = t * b if valid is None else jnp.maximum(jnp.sum(valid), 1)
    return (1.0 / jnp.asarray(count, dtype)).astype(dtype)


def _segment_losses(loss, readout, hs, targets, valid, scale):
    """One segment's logits, per-token losses and weights (``valid * scale``)."""
    logits = _readout(readout, hs)
    l = token_losses(loss, logits, targets)
    if valid is None:
        return logits, l, scale
    return logits, jnp.where(valid, l, 0), jnp.where(valid, scale, 0)


@dataclasses.dataclass(frozen=True)
class LossHead:
    """A readout and a per-token loss on top of a model's outputs: the engine's loss head.

    ``y_t = h_t W_hy + b_y``, ``L = sum_{t,b} w_{t,b} l(y_{t,b}, target_{t,b})``. The engine
    (:func:`bptt_jax._engine.vjp.bptt`) calls it on the whole sequence (``value``,
    ``forward``, ``backward``) or a segment at a time (``scale``, ``segment_value``,
    ``segment_value_and_cotangent``), with its inputs ``inputs``, a
    :class:`bptt_jax._engine.HeadInputs` ``(readout, targets, valid)`` (a segment's, cut in
    time). Its hand-written backward is ``delta^y_t = dL/dy_t``,
    ``dW_hy = sum_t h_t^T delta^y_t`` and the error ``W_hy^T delta^y_t`` on each output.
    Arrays keep their (T, B, ...) axes (never merged, so a batch sharded over devices stays
    sharded); logits, losses and sums are in the readout's dtype.
    """

    loss: str
    reduction: str

    def value(self, inputs, hs):
        """The loss ``L`` of outputs ``hs`` (T, B, F)."""
        readout, targets, valid = inputs
        l = token_losses(self.loss, _readout(readout, hs), targets)
        return reduce_losses(l, valid, self.reduction)

    def forward(self, inputs, hs):
        """``(L, delta^y)``: the value and ``dL/dy`` (T, B, O) for a unit cotangent, kept
        instead of the logits."""
        readout, targets, valid = inputs
        logits = _readout(readout, hs)
        l = token_losses(self.loss, logits, targets)
        value = reduce_losses(l, valid, self.reduction)
        w = _weights(valid, self.reduction, l.size, l.dtype)
        dy = _token_loss_grads(self.loss, logits, targets)
        dy = jnp.where(valid[..., None], dy, 0) if valid is not None else dy
        return value, (w[..., None] if jnp.ndim(w) else w) * dy

    def backward(self, inputs, hs, dy, g):
        """``(dL/dhs, dL/dreadout, dL/dtargets)`` for the cotangent ``g`` of ``L``."""
        readout = inputs.readout
        dy = g * dy  # (T, B, O)
        d_readout = _readout_grads(readout, hs, dy)  # dW_hy = sum_t h_t^T delta^y_t
        # W_hy^T delta^y_t, on the compute dtype's operands
        dhs = engine.output_error(dy, readout.w_hy.astype(hs.dtype))
        d_targets = None if self.loss == "xent" else -dy
        return dhs, d_readout, d_targets

    def scale(self, valid, t, b, dtype):
        """``L = scale * sum of counted token losses``, the same for every segment."""
        return _scale(valid, self.reduction, t, b, dtype)

    def segment_value(self, inputs, hs, scale):
        """A segment's part of the loss."""
        readout, targets, valid = inputs
        _, l, w = _segment_losses(self.loss, readout, hs, targets, valid, scale)
        return jnp.sum(w * l)  # tokens not counted have l = 0 and w = 0

    def segment_value_and_cotangent(self, inputs, hs, scale, g):
        """A segment's loss and its error pushed through the readout, from one readout.

        Returns ``(value, dhs (s, B, F), d_readout, d_targets (s, B, O) or None)``.
        """
        readout, targets, valid = inputs
        logits, l, w = _segment_losses(self.loss, readout, hs, targets, valid, scale)
        dy = _token_loss_grads(self.loss, logits, targets)
        if valid is not None:  # tokens not counted: exactly 0, even a NaN from a bad target
            dy = jnp.where(valid[..., None], dy, 0)
        dy = g * (w[..., None] if jnp.ndim(w) else w) * dy
        d_readout = _readout_grads(readout, hs, dy)
        dhs = _common.matmul(dy, readout.w_hy.astype(hs.dtype).T)
        d_targets = None if self.loss == "xent" else -dy
        return jnp.sum(w * l), dhs, d_readout, d_targets


def check_loss_args(fn, model, params, readout, xs, targets, carry0, mask, loss_mask, resets,
                     loss, reduction, truncate, delta_clip, compute_dtype=None, *,
                     time_split=False):  # fmt: skip
    validation.check_choice(fn, "loss", loss, LOSSES)
    validation.check_choice(fn, "reduction", reduction, REDUCTIONS)
    xs, carry0, mask, resets, dtype = validation.check_model_args(
        fn,
        model,
        params,
        xs,
        carry0,
        mask,
        truncate,
        resets,
        compute_dtype,
        time_split=time_split,
    )
    t, b, _ = xs.shape
    loss_mask = validation.check_mask(fn, loss_mask, t, b, name="loss_mask")
    validation.check_positive(fn, "delta_clip", delta_clip)
    valid = _valid(mask, loss_mask)
    o = validation.check_readout(fn, readout, output_size(model), dtype)
    targets = validation.check_targets(fn, targets, loss, t, b, o, dtype, valid)
    if valid is not None:  # like padded inputs: a NaN target where nothing counts reaches nothing
        v = valid if jnp.ndim(targets) == 2 else valid[..., None]
        targets = jnp.where(v, targets, jnp.zeros((), targets.dtype))
    return xs, targets, carry0, mask, valid, resets, dtype


def burn(fn: str, model, params, burn_in, xs, targets, carry0, mask, valid, resets):
    """R2D2's burn-in: the first ``burn_in`` steps run forward from ``carry0`` to warm the
    state, with no loss and no gradient (to the params, the inputs or ``carry0``); the rest
    of every per-step array, and the carry after the burn-in, go on to the loss.

    Returns ``(xs, targets, carry, mask, valid, resets)`` from step ``burn_in`` on.
    """
    if burn_in is None:
        return xs, targets, carry0, mask, valid, resets
    t = xs.shape[0]
    if isinstance(burn_in, np.integer):
        burn_in = int(burn_in)
    if isinstance(burn_in, bool) or not isinstance(burn_in, int) or not 0 < burn_in < t:
        raise ValueError(
            f"{fn}: burn_in must be an int in [1, T) = [1, {t}): the steps before the loss "
            f"starts, fewer than the sequence's; got {burn_in!r}"
        )
    if is_bidirectional(model):
        raise ValueError(
            f"{fn}: burn_in={burn_in} is undefined for a bidirectional model (its reverse "
            "direction reads the burn-in steps after the ones that count); use burn_in=None"
        )
    warm = jax.tree.map(lambda a: None if a is None else a[:burn_in], (xs, mask, resets))
    still = lax.stop_gradient
    _, carry, _ = engine.model_forward(
        model, still(params), engine.Steps(still(warm[0]), warm[1], warm[2]), still(carry0),
        keep=False,
    )  # fmt: skip
    rest = jax.tree.map(lambda a: a[burn_in:], (xs, targets, mask, valid, resets))
    xs, targets, mask, valid, resets = rest
    return xs, targets, still(carry), mask, valid, resets


def _time_axis(fn, model, xs, time_axis, backward, resets, burn_in):
    """:func:`bptt_jax._engine.api.resolve_time_axis`, burn-in refused with a split."""
    time_axis = engine.resolve_time_axis(fn, model, xs, time_axis, backward=backward,
                                         resets=resets)  # fmt: skip
    if time_axis is not None and burn_in is not None:
        raise ValueError(
            f"{fn}: time_axis={time_axis!r} cannot be combined with burn_in={burn_in} (the "
            "burn-in steps would run on the first device alone); warm the carry first"
        )
    return time_axis


def sequence_loss(
    model,
    params,
    readout: ReadoutParams,
    xs,
    targets,
    carry0=None,
    *,
    mask=None,
    loss_mask=None,
    resets=None,
    loss: str = "xent",
    reduction: str = "mean",
    truncate: int | None = None,
    delta_clip: float | None = None,
    backward: str = "manual",
    segment: int | None = None,
    memory_budget: int | None = None,
    return_carry: bool = False,
    dropout_key: jax.Array | None = None,
    compute_dtype=None,
    burn_in: int | None = None,
    time_axis: str | None = None,
):
    """Loss of a readout on every hidden state, with the whole backward written by hand.

    Forward: ``hs = unroll(model, params, xs, carry0)``, ``y_t = h_t W_hy + b_y``, per-token
    loss ``l_{t,b}`` and ``L = sum_{t,b} w_{t,b} l_{t,b}``. Backward (``jax.grad`` of this
    function): ``delta^y_t = dL/dy_t`` (kept from the forward), ``W_hy^T delta^y_t`` into the
    reverse scan over ``delta^h_t``, and the weight sums as single matmuls over ``T*B`` rows.

    Args:
      model, params, xs, carry0, mask, resets, truncate, delta_clip, dropout_key,
        compute_dtype: as in :func:`bptt_jax.unroll` (a cell, a Bidirectional or a Stack;
        under a precision policy the logits, the loss and every gradient stay in the
        params' dtype, :mod:`bptt_jax.precision`).
      loss_mask: optional ``(T, B)`` 0/1 or bool: tokens where it is 0 have no loss, but the
        carry runs through them as usual (unlike ``mask``). The counted tokens are
        ``mask & loss_mask``. E.g. only the last step of the adding problem, or the last k1
        steps of a TBPTT(k1, k2) window.
      readout: :class:`ReadoutParams` ``(w_hy (F, O), b_y (O,))``, F the model's output size
        (H for a cell, 2H for a concatenating Bidirectional layer).
      targets: ``loss="xent"``: integer classes ``(T, B)`` in ``[0, O)``;
        ``loss="mse"``: ``(T, B, O)`` in the params' dtype (it gets a gradient too).
      loss: ``"xent"``: softmax cross-entropy ``logsumexp(y) - y[target]`` (stable);
        ``"mse"``: ``mean_o (y_o - target_o)^2``.
      reduction: ``"sum"``: ``L = sum`` of ``l_{t,b}`` over counted tokens (``mask`` and
        ``loss_mask`` set, or all); ``"mean"``: that sum divided by the number of counted
        tokens (``T*B`` without masks, else at least 1): the mean loss per counted token.
      backward: ``"manual"``, ``"checkpointed"`` (memory-efficient: the readout and loss are
        recomputed segment by segment with the states; see :func:`bptt_jax.unroll`) or
        ``"autodiff"`` (the same loss through a plain ``lax.scan`` with no custom rule,
        which ``jax.grad`` differentiates: the reference).
      segment, memory_budget: for ``"checkpointed"``, as in :func:`bptt_jax.unroll`.
      return_carry: also return the final carry (for streams carried across chunks).
      burn_in: ``None``, or k: R2D2's burn-in (Kapturowski et al. 2019). The first k steps
        run forward from ``carry0`` (no dropout) to warm the state from a stored one: they
        have no loss and pass no gradient to the params, the inputs or ``carry0``; the loss
        and its BPTT cover steps ``[k, T)`` from the warmed carry (a ``truncate`` counts its
        chunks from step k). ``1 <= k < T``; undefined for a bidirectional model.
      time_axis: sequence parallelism, as in :func:`bptt_jax.unroll` (not with
        ``burn_in``). Inside ``jax.shard_map`` the loss is the local steps' (with
        ``reduction="mean"`` over the local tokens): sum it over the time axis yourself.

    Returns:
      The scalar loss, or ``(loss, carry_T)`` with ``return_carry=True``.

    Raises:
      ValueError / TypeError at trace time for wrong shapes, dtypes, carry structure or
      options; ``ValueError`` for out-of-range targets when their values are known (outside
      ``jit``). Inside ``jit`` an out-of-range target at a valid position makes the loss and
      gradients NaN (never a plausible wrong number); ``optax.apply_if_finite`` skips it.

    Example:
      >>> import jax, jax.numpy as jnp, bptt_jax
      >>> cell = bptt_jax.Elman(16)
      >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
      >>> params, ro = cell.init(k1, 5), bptt_jax.init_readout(k2, 16, 7)
      >>> xs = jax.random.normal(k3, (30, 4, 5))
      >>> ys = jnp.zeros((30, 4), jnp.int32)
      >>> g, g_ro = jax.grad(bptt_jax.sequence_loss, argnums=(1, 2))(cell, params, ro, xs, ys)
      >>> g.w_hh.shape, g_ro.w_hy.shape
      ((16, 16), (16, 7))
    """
    fn = "sequence_loss"
    model, params, carry0 = unwrap(model, params, carry0, xs)  # a LearnedCarry's carry
    validation.check_choice(fn, "backward", backward, engine.BACKWARDS)
    xs, targets, carry0, mask, valid, resets, dtype = check_loss_args(
        fn, model, params, readout, xs, targets, carry0, mask, loss_mask, resets, loss,
        reduction, truncate, delta_clip, compute_dtype, time_split=True,
    )  # fmt: skip
    time_axis = _time_axis(fn, model, xs, time_axis, backward, resets, burn_in)
    xs, targets, carry0, mask, valid, resets = burn(
        fn, model, params, burn_in, xs, targets, carry0, mask, valid, resets
    )
    seg = engine.resolve_segment(fn, model, xs, dtype, segment, memory_budget, backward)
    drops = engine.dropout_multipliers(fn, model, dropout_key, xs)
    head = LossHead(loss, reduction)
    steps = engine.Steps(xs, mask, resets, drops)
    inputs = engine.HeadInputs(readout, targets, valid)
    if backward == "autodiff":
        hs, carry_t = engine.unroll_autodiff(model, params, steps, carry0, truncate, delta_clip)
        value = head.value(inputs, hs)
    else:
        schedule = engine.plan(model, backward, truncate, delta_clip, seg, xs.shape[0], head,
                               time_axis)  # fmt: skip
        primals = engine.Primals(params, steps, carry0, inputs)
        value, carry_t = engine.bptt(model, head, schedule, primals)
    return (value, carry_t) if return_carry else value


class LossAndGrads(NamedTuple):
    """What :func:`loss_and_grads` returns."""

    value: jax.Array  # () the loss L
    params: Any  # dL/dparams, the cell params' own type
    readout: ReadoutParams  # dL/dreadout
    carry: Any  # the carry after step ``carry_index`` (forward only, no gradient)
    deltas: jax.Array | None  # (T, B, H) delta^h_t = dL/dh_t, when ``return_deltas``


def loss_and_grads(
    model,
    params,
    readout: ReadoutParams,
    xs,
    targets,
    carry0=None,
    *,
    mask=None,
    loss_mask=None,
    resets=None,
    loss: str = "xent",
    reduction: str = "mean",
    truncate: int | None = None,
    delta_clip: float | None = None,
    carry_index: int | None = None,
    return_deltas: bool = False,
    dropout_key: jax.Array | None = None,
    compute_dtype=None,
    burn_in: int | None = None,
    time_axis: str | None = None,
) -> LossAndGrads:
    """The loss of :func:`sequence_loss` and its hand-written gradients, in one call.

    Its value and gradients are ``jax.value_and_grad(sequence_loss, argnums=(1, 2))``'s: the
    same hand-written forward and backward (those of :func:`bptt_jax._engine.vjp.bptt`), called
    directly,
    plus what a truncated or diagnostic loop needs besides: the carry after any step (a
    TBPTT(k1, k2) window passes on the carry after its k1-th step; a forward-only run of the
    first ``carry_index + 1`` steps) and the error ``delta^h_t`` reaching every hidden state
    (from one more hand-written backward that keeps it).

    Args:
      model, params, readout, xs, targets, carry0, mask, loss_mask, resets, loss, reduction,
        truncate, delta_clip, dropout_key, compute_dtype, burn_in, time_axis: as in
        :func:`sequence_loss` (with ``burn_in``, ``carry_index`` and ``return_deltas`` are
        refused: they would count steps from a place the caller cannot see; so are they
        with ``time_axis``).
      carry_index: the step whose resulting carry to return, in ``[0, T)``; ``None`` for the
        last (``carry_T``).
      return_deltas: also return ``delta^h_t`` (T, B, H): ``dL/dh_t`` in total, from the
        readout at step t and from every later step through the recurrence (after
        ``delta_clip``; what the reverse scan carries back in time). For a model, one entry
        per layer (a ``(forward, backward)`` pair for a Bidirectional layer, both in forward
        time).

    Returns:
      A :class:`LossAndGrads` ``(value, params, readout, carry, deltas)``.

    Example:
      >>> import jax, jax.numpy as jnp, bptt_jax
      >>> from bptt_jax.losses import loss_and_grads
      >>> cell = bptt_jax.GRU(8)
      >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
      >>> params, ro = cell.init(k1, 3), bptt_jax.init_readout(k2, 8, 5)
      >>> xs, ys = jax.random.normal(k3, (10, 2, 3)), jnp.ones((10, 2), jnp.int32)
      >>> out = loss_and_grads(cell, params, ro, xs, ys, carry_index=3, return_deltas=True)
      >>> out.params.w_h.shape, out.carry.shape, out.deltas.shape
      ((8, 24), (2, 8), (10, 2, 8))
    """
    fn = "loss_and_grads"
    learned = model if isinstance(model, LearnedCarry) else None
    from_learned = learned is not None and carry0 is None and burn_in is None
    model, params, carry0 = unwrap(model, params, carry0, xs)
    xs, targets, carry0, mask, valid, resets, _ = check_loss_args(
        fn, model, params, readout, xs, targets, carry0, mask, loss_mask, resets, loss,
        reduction, truncate, delta_clip, compute_dtype, time_split=True,
    )  # fmt: skip
    time_axis = _time_axis(fn, model, xs, time_axis, "manual", resets, burn_in)
    if time_axis is not None and (carry_index is not None or return_deltas):
        what = "carry_index" if carry_index is not None else "return_deltas"
        raise ValueError(
            f"{fn}: time_axis={time_axis!r} cannot be combined with {what} (a prefix of the "
            "steps, or every step's error, gathered from every device); call without time_axis "
            "for diagnostics"
        )
    if burn_in is not None and (carry_index is not None or return_deltas):
        what = "carry_index" if carry_index is not None else "return_deltas"
        raise ValueError(
            f"{fn}: burn_in={burn_in} cannot be combined with {what} (the burn-in steps have "
            f"no loss and no gradient); compute the warmed carry first, then call without "
            "burn_in"
        )
    xs, targets, carry0, mask, valid, resets = burn(
        fn, model, params, burn_in, xs, targets, carry0, mask, valid, resets
    )
    t = xs.shape[0]
    if not isinstance(return_deltas, bool):
        raise TypeError(f"{fn}: return_deltas must be True or False; got {return_deltas!r}")
    if isinstance(carry_index, np.integer):
        carry_index = int(carry_index)
    if carry_index is not None and (
        isinstance(carry_index, bool)
        or not isinstance(carry_index, int)
        or not 0 <= carry_index < t
    ):
        raise ValueError(
            f"{fn}: carry_index must be an int in [0, T) = [0, {t}) or None; got {carry_index!r}"
        )
    if carry_index is not None and is_bidirectional(model):
        raise ValueError(
            f"{fn}: carry_index={carry_index} (a carried stream) is undefined for a "
            "bidirectional model; use carry_index=None"
        )
    # (an eager call on a batch placed on an Explicit mesh runs in that mesh's context)
    with eager_mesh(xs):
        drops = engine.dropout_multipliers(fn, model, dropout_key, xs)
        head = LossHead(loss, reduction)
        schedule = engine.plan(model, "manual", truncate, delta_clip, None, t, head, time_axis)
        steps = engine.Steps(xs, mask, resets, drops)
        inputs = engine.HeadInputs(readout, targets, valid)

        # the forward and hand-written backward of engine.bptt, the custom_vjp that
        # jax.grad(sequence_loss) runs, called directly with a unit cotangent on the loss
        primals = engine.Primals(params, steps, carry0, inputs)
        (value, carry), res = engine.bptt_fwd(model, head, schedule, primals)
        g = (jnp.ones((), value.dtype), jax.tree.map(jnp.zeros_like, carry))
        (cotangent,) = engine.bptt_bwd(model, head, schedule, res, g)
        grads, d_readout = cotangent.params, cotangent.head.readout
        if carry_index is not None and carry_index != t - 1:
            first = jax.tree.map(lambda a: a[: carry_index + 1], steps)
            _, carry, _ = engine.model_forward(model, params, first, carry0, keep=False)
        deltas = None
        if return_deltas:
            hs, carry_t, saved = engine.model_forward(model, params, steps, carry0)
            _, dy = head.forward(inputs, hs)
            dhs, _, _ = head.backward(inputs, hs, dy, jnp.ones((), value.dtype))
            g = (dhs, jax.tree.map(jnp.zeros_like, carry_t))
            backprop = engine.Backprop(
                engine.truncation_cuts(t, truncate), delta_clip=delta_clip, keep_deltas=True
            )
            *_, deltas = engine.model_backward(model, params, steps, carry0, saved, g, backprop)
        if learned is not None:  # the learned carry's gradient: summed over the batch
            d_carry = jax.tree.map(lambda d: jnp.sum(d, axis=0, keepdims=True), cotangent.carry0)
            if not from_learned:  # a given carry0 (or a burn-in's warmed one): not learned
                d_carry = jax.tree.map(jnp.zeros_like, d_carry)
            grads = LearnedCarryParams(grads, d_carry)
    return LossAndGrads(value, grads, d_readout, carry, deltas)
