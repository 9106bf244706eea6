"""The library's one ``jax.custom_vjp``: a model, a head and a schedule, composed.

What is differentiated (a model: :mod:`~bptt_jax._engine.layers`), what sits on top
(nothing, or a loss head) and how time is walked (a schedule:
:mod:`~bptt_jax._engine.schedules`) are independent choices; :func:`bptt` composes any three.
Its backward is written by hand end to end: no sequence is differentiated by autodiff.
"""

from __future__ import annotations

from functools import partial

import jax

from bptt_jax._engine.bundles import HeadInputs, Primals, Steps
from bptt_jax._engine.layers import FULL, model_forward
from bptt_jax._engine.sharding import finish_cotangents


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def bptt(model, head, schedule, primals):
    """``(out, carry_T)`` of ``model`` with ``head`` on top, differentiated by hand.

    Args:
      model: a cell, a Bidirectional or a Stack.
      head: ``None`` (``out`` is the outputs ``hs`` (T, B, F)) or a loss head
        (:class:`bptt_jax.losses.LossHead`: ``out`` is the loss), hashable.
      schedule: how time is walked (:mod:`~bptt_jax._engine.schedules`), hashable.
      primals: a :class:`~bptt_jax._engine.bundles.Primals` ``(params, steps, carry0,
        head)``; its cotangent has the same structure (``None`` where nothing is
        differentiable: masks, resets, dropout multipliers, class targets).
    """
    params, steps, carry0, head_in = primals
    # a time-split sequence has its own walk (Full's); any other primal runs unsegmented
    walk = schedule.walk if getattr(schedule, "time_axis", None) is not None else FULL
    hs, carry_t, _ = model_forward(model, params, steps, carry0, keep=False, walk=walk)
    out = hs if head is None else head.value(head_in, hs)
    return out, carry_t


def bptt_fwd(model, head, schedule, primals):
    """:func:`bptt`'s forward: ``((out, carry_T), residuals)``."""
    out, res = schedule.forward(model, head, primals)
    # empty slices of the differentiable inputs: their dtypes and device-variance
    protos = jax.tree.map(lambda x: x[:0], _differentiable(primals))
    return out, (res, protos)


def bptt_bwd(model, head, schedule, saved, g):
    """:func:`bptt`'s hand-written backward: the cotangent of ``primals``."""
    res, protos = saved
    cotangent = schedule.backward(model, head, res, g)
    return (finish_cotangents(cotangent, protos),)


def _differentiable(primals):
    """The inputs whose cotangents :func:`finish_cotangents` puts in their dtype and sums
    over the devices (the class targets' and the dropout multipliers' are never formed)."""
    params, steps, carry0, head_in = primals
    head = None if head_in is None else HeadInputs(head_in.readout, None)
    return Primals(params, Steps(steps.xs), carry0, head)


bptt.defvjp(bptt_fwd, bptt_bwd)
