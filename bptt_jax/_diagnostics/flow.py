"""How the error of BPTT travels back in time, per step: :func:`gradient_flow`."""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bptt_jax import _engine as engine
from bptt_jax import losses
from bptt_jax._diagnostics.cells import cell_runs, loss_forward
from bptt_jax._diagnostics.horizon import check_fraction, horizon_from_norms
from bptt_jax._diagnostics.jacobians import check_probes, jacobians


class GradientFlow(NamedTuple):
    """What :func:`gradient_flow` returns (T steps, B examples)."""

    value: jax.Array  # () the loss L
    delta_norms: jax.Array  # (T, B) ||delta^h_t|| = ||dL/dh_t|| per example (after delta_clip)
    delta_norm: jax.Array  # (T,) batch mean of delta_norms
    jacobian_norms: jax.Array  # (T, B) ||dh_T/dh_t||_F per example
    jacobian_norm: jax.Array  # (T,) batch mean of jacobian_norms
    horizon: jax.Array  # () int32: horizon_from_norms(jacobian_norm, fraction); -1: NaN/inf


def gradient_flow(
    model,
    params,
    readout: losses.ReadoutParams,
    xs,
    targets,
    carry0=None,
    *,
    mask=None,
    loss_mask=None,
    resets=None,
    loss: str = "xent",
    reduction: str = "mean",
    delta_clip: float | None = None,
    fraction: float = 0.01,
    probes: int | None = None,
    key: jax.Array | None = None,
    compute_dtype=None,
) -> GradientFlow:
    """How the error of BPTT travels back in time, per step, for one batch.

    * ``delta_norms[t, b] = ||delta^h_t||``, the error reaching hidden state t in total
      (``dL/dh_t`` from the readout at step t and from every later step through the
      recurrence), exactly what the hand-written reverse scan carries (after ``delta_clip``
      when set, so the effect of clipping is visible). For a loss on the last step only
      (``loss_mask``), its decay going back is the vanishing gradient itself.
    * ``jacobian_norms[t, b] = ||dh_T/dh_t||_F`` (see :func:`jacobian_norms`): the same
      question without the loss, and ``horizon``, one number from it
      (:func:`horizon_from_norms` of the batch mean).

    For a model (a :class:`~bptt_jax.Stack` or :class:`~bptt_jax.Bidirectional`), per layer
    and direction: one :class:`GradientFlow` per cell, in the model's structure (a tuple with
    one entry per layer for a Stack, a ``(forward, backward)`` pair for a Bidirectional
    layer, like its params). Each cell's ``delta_norms[t, b] = ||dL/dh_t||`` is the total
    error of the model's loss on that cell's hidden state at step t (through the layers above
    it and its own recurrence; what its reverse scan carries, after ``delta_clip``), its
    ``jacobian_norms`` and ``horizon`` those of :func:`jacobian_norms` for that cell. Both are
    in forward time for a reverse direction (its error flows from ``t = 0`` towards later
    steps, so its vanishing shows going forward). ``value`` is the model's loss in every
    entry. Layers take no dropout (evaluation).

    Args:
      model, params, readout, xs, targets, carry0, mask, loss_mask, resets, loss, reduction,
        delta_clip, compute_dtype: as in :func:`bptt_jax.sequence_loss`.
      fraction: the horizon's threshold, in ``(0, 1)``; default 0.01.
      probes, key: as in :func:`jacobian_norms` (default: exact).

    Returns:
      A :class:`GradientFlow`; for a model, one per cell in the model's structure.

    Cost: one forward of the model and one backward that keeps the errors (the weight
    gradients' matmuls left out), then ``H`` (or ``probes``) reverse scans per cell for the
    Jacobian norms, from the same forward's stored states.

    Example:
      >>> import jax, jax.numpy as jnp, bptt_jax
      >>> from bptt_jax.diagnostics import gradient_flow
      >>> cell = bptt_jax.LSTM(8, forget_bias=1.0)
      >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
      >>> params, ro = cell.init(k1, 3), bptt_jax.init_readout(k2, 8, 4)
      >>> xs, ys = jax.random.normal(k3, (30, 2, 3)), jnp.ones((30, 2), jnp.int32)
      >>> last = jnp.arange(30)[:, None] == 29             # loss on the last step only
      >>> flow = gradient_flow(cell, params, ro, xs, ys, loss_mask=jnp.broadcast_to(last, (30, 2)))
      >>> flow.delta_norm.shape, flow.jacobian_norms.shape, flow.horizon.dtype
      ((30,), (30, 2), dtype('int32'))
      >>> bool(flow.delta_norm[0] < flow.delta_norm[-1])  # the error vanishes going back
      True
      >>> model = bptt_jax.stacked(cell, num_layers=2)
      >>> flows = gradient_flow(model, model.init(k1, 3), ro, xs, ys)
      >>> len(flows), flows[1].delta_norms.shape         # one GradientFlow per layer
      (2, (30, 2))
    """
    fn = "gradient_flow"
    fraction = check_fraction(fn, fraction)
    key = check_probes(fn, probes, key)
    # before jit: the targets' range needs their values, delta_clip is a static argument
    xs, targets, carry0, mask, valid, resets, _ = losses.check_loss_args(
        fn, model, params, readout, xs, targets, carry0, mask, loss_mask, resets, loss,
        reduction, None, delta_clip, compute_dtype,
    )  # fmt: skip
    options = _FlowOptions(losses.LossHead(loss, reduction), delta_clip, probes, fraction)
    steps, inputs = engine.Steps(xs, mask, resets), engine.HeadInputs(readout, targets, valid)
    return _gradient_flow(model, options, params, steps, carry0, inputs, key)


class _FlowOptions(NamedTuple):
    """The static options of :func:`_gradient_flow`."""

    head: losses.LossHead
    delta_clip: float | None
    probes: int | None
    fraction: float


@partial(jax.jit, static_argnums=(0, 1))
def _gradient_flow(model, options, params, steps, carry0, inputs, key):
    """The error reaching every cell's hidden states (``loss_and_grads``' deltas) and every
    cell's Jacobian norms, from one forward of the model."""
    fwd = loss_forward(model, options.head, params, steps, carry0, inputs)
    backprop = engine.Backprop(delta_clip=options.delta_clip, keep_deltas=True)
    *_, deltas = engine.model_backward(
        model, params, steps, carry0, fwd.saved, (fwd.dhs, fwd.zeros), backprop
    )
    runs = cell_runs(model, params, carry0, fwd.saved)
    jac = jacobians(model, options.probes, steps, runs, key)
    return jax.tree.map(lambda d, j: _flow(fwd.value, d, j, options.fraction), deltas, jac)


def _flow(value, deltas, jac, fraction) -> GradientFlow:
    """One cell's :class:`GradientFlow` from its deltas (T, B, H) and Jacobian norms."""
    delta_norms = jnp.linalg.norm(deltas, axis=-1)
    jac_mean = jnp.mean(jac, axis=1)
    return GradientFlow(
        value,
        delta_norms,
        jnp.mean(delta_norms, axis=1),
        jac,
        jac_mean,
        horizon_from_norms(jac_mean, fraction),
    )
