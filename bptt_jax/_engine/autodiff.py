"""``backward="autodiff"``: the plain per-step ``lax.scan`` s a user would write, no custom rule.

The reference the hand-written backward is checked against, and the path for forward-mode
AD (which cannot pass a ``custom_vjp``): ``jax.grad`` derives its backward.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from bptt_jax import precision
from bptt_jax._engine import step_rules
from bptt_jax._engine.bundles import Steps
from bptt_jax._engine.directions import merge_outputs, reversal, reverse_time
from bptt_jax._engine.layers import from_layers, layers_of, per_layer
from bptt_jax._engine.sharding import like_batch
from bptt_jax.cells import protocol
from bptt_jax.models import Bidirectional, is_bidirectional


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _clip_cotangent(carry, threshold):
    """Identity whose VJP clips the cotangent like :func:`step_rules.clip_delta`."""
    return carry


def _clip_cotangent_fwd(carry, threshold):
    return carry, None


def _clip_cotangent_bwd(threshold, _, g):
    return (step_rules.clip_delta(g, threshold),)


_clip_cotangent.defvjp(_clip_cotangent_fwd, _clip_cotangent_bwd)


def _scan(cell, params, steps, carry0, truncate, delta_clip):
    """One cell over ``steps`` (xs, mask, resets): ``(hs, carry_T)``."""
    xs = steps.xs
    cuts = step_rules.truncation_cuts(xs.shape[0], truncate)
    both = protocol.has_output(cell)

    def body(carry, inputs):
        x_t, m_t, cut_t, r_t = inputs
        if cut_t is not None:
            carry = jax.tree.map(lambda c: jnp.where(cut_t, lax.stop_gradient(c), c), carry)
        carry = step_rules.reset(r_t, carry)
        # under a policy x_t in the carry's dtype; the step's matmuls cast it to the kernels'
        x_t = x_t.astype(jax.tree.leaves(carry)[0].dtype)
        new, y = cell.step(params, carry, x_t)
        if m_t is not None:
            new = step_rules.select(m_t, new, carry)
        if delta_clip is not None:
            new = _clip_cotangent(new, delta_clip)
        if not both:
            return new, protocol.hidden(cell, new).astype(xs.dtype)
        # a cell whose outputs are not its carry: y_t, zeros at a padded step
        return new, (y if m_t is None else jnp.where(m_t[:, None], y, 0)).astype(xs.dtype)

    inputs = (xs, steps.mask, cuts, steps.resets)
    carry_t, hs = lax.scan(body, like_batch(carry0, xs), inputs)
    return hs, carry_t


def unroll_autodiff(model, params, steps, carry0, truncate=None, delta_clip=None):
    """The model over ``steps`` (:class:`~bptt_jax._engine.bundles.Steps`), layer by
    layer, as plain ``lax.scan`` s: ``(hs, carry_T)``.

    Truncation is ``lax.stop_gradient`` on the carry entering steps k, 2k, ...; a reset
    replaces the carry by zeros; ``delta_clip`` wraps each new carry in an identity whose
    VJP clips the error arriving at it. Under a precision policy (``xs`` in a compute dtype
    narrower than the params'), the kernels are cast to it and each step's matmuls run as
    the policy says; autodiff differentiates the casts.
    """
    xs, mask, drops = steps.xs, steps.mask, steps.drops
    params = precision.compute_params(params, xs.dtype)
    layers = layers_of(model)
    ps, cs = per_layer(model, params), per_layer(model, carry0)
    idx = reversal(mask, xs.shape[0], steps.resets) if is_bidirectional(model) else None
    x, carries = xs, []
    for k, layer in enumerate(layers):
        if k and drops is not None:
            x = x * drops[k - 1]
        if isinstance(layer, Bidirectional):
            hf, cf = _scan(layer.forward, ps[k][0], Steps(x, mask, steps.resets), cs[k][0], None,
                           delta_clip)  # fmt: skip
            x_b = Steps(reverse_time(x, idx), mask, steps.resets)
            hb, cb = _scan(layer.backward, ps[k][1], x_b, cs[k][1], None, delta_clip)
            x = merge_outputs(layer.merge, hf, reverse_time(hb, idx))
            carries.append((cf, cb))
        else:
            layer_steps = Steps(x, mask, steps.resets)
            x, c = _scan(layer, ps[k], layer_steps, cs[k], truncate, delta_clip)
            carries.append(c)
    return x, from_layers(model, carries)
