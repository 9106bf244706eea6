"""How far truncated-k gradients are from the full-BPTT gradient: :func:`truncation_bias`."""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bptt_jax import _engine as engine
from bptt_jax import losses, validation
from bptt_jax._diagnostics.cells import PROBE_BATCH, loss_forward
from bptt_jax.models import Stack, is_bidirectional


class TruncationBias(NamedTuple):
    """What :func:`truncation_bias` returns (K truncation lengths)."""

    ks: jax.Array  # (K,) int32, the truncation lengths k
    cosine: jax.Array  # (K,) cos(g_k, g): 1 means the truncated gradient points the same way
    norm_ratio: jax.Array  # (K,) ||g_k|| / ||g||
    full_norm: jax.Array  # () ||g||, the full-BPTT gradient's norm


def _flat(tree) -> jax.Array:
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


@partial(jax.jit, static_argnums=(0, 1, 2))
def _truncation_bias(model, ks, head, params, steps, carry0, inputs):
    """One forward of the model and the readout's error on its outputs (independent of k),
    then one backward of every layer per k, each layer's carries cut at the same steps."""
    fwd = loss_forward(model, head, params, steps, carry0, inputs)
    t = np.arange(steps.xs.shape[0])
    # one backward per k, all in one program: k only changes which carries are cut
    cuts = np.stack([(t % k == 0) & (t > 0) for k in (*ks, len(t))])  # last: full BPTT

    def grads(cut):
        dparams, _, _, _ = engine.model_backward(
            model, params, steps, carry0, fwd.saved, (fwd.dhs, fwd.zeros), engine.Backprop(cut)
        )
        return tuple(_flat(g) for g in engine.per_layer(model, dparams))

    g = lax.map(grads, jnp.asarray(cuts), batch_size=min(len(cuts), PROBE_BATCH))  # (K+1, N)
    return engine.from_layers(model, [_bias(ks, g_layer) for g_layer in g])


def _bias(ks, g) -> TruncationBias:
    """The :class:`TruncationBias` of the gradients ``g`` (K+1, N): ``g[:-1]`` truncated at
    each k, ``g[-1]`` full BPTT."""
    g, full = g[:-1], g[-1]
    full_norm = jnp.linalg.norm(full)
    norms = jnp.linalg.norm(g, axis=1)
    denom = norms * full_norm
    cosine = jnp.where(denom > 0, (g @ full) / jnp.where(denom > 0, denom, 1), 0)
    cosine = jnp.where(jnp.isnan(denom), jnp.nan, cosine)  # a NaN gradient is no 0 cosine
    ratio = norms / jnp.where(full_norm > 0, full_norm, 1)
    return TruncationBias(jnp.asarray(ks, jnp.int32), cosine, ratio, full_norm)


def truncation_bias(
    model,
    params,
    readout: losses.ReadoutParams,
    xs,
    targets,
    carry0=None,
    *,
    ks,
    mask=None,
    loss_mask=None,
    resets=None,
    loss: str = "xent",
    reduction: str = "mean",
    compute_dtype=None,
) -> TruncationBias:
    """How far truncated-k gradients are from the full-BPTT gradient, for a sweep of k.

    ``g`` is the gradient of the loss with respect to the cell's params (all leaves flattened
    into one vector; the readout's gradient does not depend on truncation and is left out),
    by full BPTT; ``g_k`` the same with ``truncate=k`` (chunks ``[0, k), [k, 2k), ...``, see
    :func:`bptt_jax.sequence_loss`). Returns ``cos(g_k, g) = <g_k, g> / (||g_k|| ||g||)``
    and ``||g_k|| / ||g||``; ``k >= T`` gives exactly 1 and 1. A cosine of 0 (not NaN) is
    returned when either gradient is zero.

    For a :class:`~bptt_jax.Stack` of cells, per layer: ``truncate=k`` cuts every layer's
    carries at the same steps (as :func:`bptt_jax.sequence_loss` does), and layer l's entry
    compares the truncated and full gradients of the loss with respect to layer l's params.
    The whole model's numbers follow from the layers': with ``n_l = full_norm_l`` and
    ``r_l, c_l`` its ``norm_ratio`` and ``cosine``, ``||g|| = sqrt(sum_l n_l^2)``,
    ``||g_k|| = sqrt(sum_l (r_l n_l)^2)`` and ``<g_k, g> = sum_l c_l r_l n_l^2``. Layers
    take no dropout (evaluation). Truncation is undefined for a bidirectional model (a
    :class:`~bptt_jax.Bidirectional`, or a Stack with one): ``ValueError``.

    Args:
      model, params, readout, xs, targets, carry0, mask, loss_mask, resets, loss, reduction,
        compute_dtype: as in :func:`bptt_jax.sequence_loss`.
      ks: a non-empty sequence of positive ints, the truncation lengths.

    Returns:
      A :class:`TruncationBias`; for a Stack, one per layer (a tuple).

    Cost: one forward of the model and ``len(ks) + 1`` backwards of every layer (for a cell,
    one forward scan and ``len(ks) + 1`` reverse scans with their weight-gradient matmuls),
    all compiled as one program (one compile per tuple of ks).

    Example:
      >>> import jax, jax.numpy as jnp, bptt_jax
      >>> from bptt_jax.diagnostics import truncation_bias
      >>> cell = bptt_jax.Elman(8)
      >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
      >>> params, ro = cell.init(k1, 3), bptt_jax.init_readout(k2, 8, 4)
      >>> xs, ys = jax.random.normal(k3, (16, 2, 3)), jnp.ones((16, 2), jnp.int32)
      >>> bias = truncation_bias(cell, params, ro, xs, ys, ks=[1, 4, 16])
      >>> bias.ks.tolist(), [round(float(c), 4) for c in bias.cosine][-1]
      ([1, 4, 16], 1.0)
    """
    fn = "truncation_bias"
    ks = _check_ks(fn, ks)
    if is_bidirectional(model):
        what = "Stack with a Bidirectional layer" if isinstance(model, Stack) else "Bidirectional"
        raise ValueError(
            f"{fn}: model is bidirectional (a {what}); truncation is undefined for it (its "
            "reverse direction needs the whole future of every step); use a Stack of cells"
        )
    xs, targets, carry0, mask, valid, resets, _ = losses.check_loss_args(
        fn, model, params, readout, xs, targets, carry0, mask, loss_mask, resets, loss,
        reduction, None, None, compute_dtype,
    )  # fmt: skip
    steps, inputs = engine.Steps(xs, mask, resets), engine.HeadInputs(readout, targets, valid)
    head = losses.LossHead(loss, reduction)
    return _truncation_bias(model, ks, head, params, steps, carry0, inputs)


def _check_ks(fn: str, ks) -> tuple[int, ...]:
    """``ks``, a non-empty sequence of positive ints, as a tuple of Python ints."""
    if isinstance(ks, jax.Array) and not isinstance(ks, jax.core.Tracer):
        ks = np.asarray(ks)  # static values: each k is its own truncation
    if isinstance(ks, int) or not hasattr(ks, "__len__") or len(ks) == 0:
        raise ValueError(f"{fn}: ks must be a non-empty sequence of positive ints; got {ks!r}")
    return tuple(
        validation.check_positive(fn, f"ks[{i}]", int(k) if isinstance(k, np.integer) else k, int)
        for i, k in enumerate(ks)
    )
