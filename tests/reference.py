"""Independent references, written from the equations in the cells' docstrings.

Nothing here calls into bptt_jax's engine or cell step functions: the per-step formulas are
written again from the math, so a bug in a cell's forward cannot hide in a test that compares
the cell with itself. ``scan_unroll`` is the plain ``lax.scan`` a user would write;
``jax.grad``/``jax.vjp`` of it is the autodiff reference for every gradient test.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import bptt_jax

ACT = {
    "tanh": jnp.tanh,
    "relu": lambda a: jnp.maximum(a, 0),
    "identity": lambda a: a,
    "sigmoid": lambda a: 1 / (1 + jnp.exp(-a)),
}


def sigmoid(a):
    return 1 / (1 + jnp.exp(-a))


def step(cell, p, carry, x):
    """One step of ``cell`` written from its equations; returns the new carry."""
    if isinstance(cell, bptt_jax.Elman):
        return ACT[cell.activation](x @ p.w_xh + carry @ p.w_hh + p.b_h)
    h_size = cell.hidden_size
    if isinstance(cell, bptt_jax.LSTM):
        h, c = carry
        z = x @ p.w_x + h @ p.w_h + p.b
        zi, zf, zg, zo = (z[..., k * h_size : (k + 1) * h_size] for k in range(4))
        i, f, g, o = sigmoid(zi), sigmoid(zf + cell.forget_bias), jnp.tanh(zg), sigmoid(zo)
        c = f * c + i * g
        return bptt_jax.LSTMCarry(o * jnp.tanh(c), c)
    h = carry
    gx = x @ p.w_x + p.b_x
    gh = h @ p.w_h + p.b_h
    blk = lambda a, k: a[..., k * h_size : (k + 1) * h_size]  # noqa: E731
    r = sigmoid(blk(gx, 0) + blk(gh, 0))
    z = sigmoid(blk(gx, 1) + blk(gh, 1))
    n = jnp.tanh(blk(gx, 2) + r * blk(gh, 2))
    return (1 - z) * n + z * h


def hidden(carry):
    return carry.h if isinstance(carry, bptt_jax.LSTMCarry) else carry


def python_loop(cell, p, xs, carry, mask=None):
    """Forward as a per-step Python loop (no scan): the independent forward reference."""
    hs = []
    for t in range(xs.shape[0]):
        new = step(cell, p, carry, xs[t])
        if mask is not None:
            new = jax.tree.map(lambda a, b: jnp.where(mask[t][:, None], a, b), new, carry)
        carry = new
        hs.append(hidden(carry))
    return jnp.stack(hs), carry


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def clip_error(carry, threshold):
    """Identity; its VJP rescales each example's cotangent (all carry leaves together) to
    norm <= threshold: the documented per-step ``delta_clip``."""
    return carry


def _clip_error_fwd(carry, threshold):
    return carry, None


def _clip_error_bwd(threshold, _, g):
    leaves = jax.tree.leaves(g)
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(x), axis=1) for x in leaves))
    factor = jnp.minimum(1.0, threshold / jnp.maximum(norm, 1e-300))
    return (jax.tree.map(lambda x: x * factor[:, None].astype(x.dtype), g),)


clip_error.defvjp(_clip_error_fwd, _clip_error_bwd)


def scan_unroll(cell, p, xs, carry, mask=None, truncate=None, resets=None, delta_clip=None):
    """The plain ``lax.scan`` unroll; truncation is ``stop_gradient`` on the carry entering
    steps k, 2k, ... (the definition of truncated BPTT the library promises); a reset
    replaces the entering carry by zeros; ``delta_clip`` clips the error on each new carry."""
    t_len = xs.shape[0]
    ts = jnp.arange(t_len)
    m = jnp.ones((t_len, xs.shape[1]), bool) if mask is None else mask
    r = jnp.zeros((t_len, xs.shape[1]), bool) if resets is None else resets

    def body(carry, inp):
        t, x, m_t, r_t = inp
        if truncate is not None:
            cut = (t % truncate == 0) & (t > 0)
            carry = jax.tree.map(lambda c: jnp.where(cut, lax.stop_gradient(c), c), carry)
        carry = jax.tree.map(lambda c: jnp.where(r_t[:, None], 0.0, c).astype(c.dtype), carry)
        new = step(cell, p, carry, x)
        new = jax.tree.map(lambda a, b: jnp.where(m_t[:, None], a, b), new, carry)
        if delta_clip is not None:
            new = clip_error(new, delta_clip)
        return new, hidden(new)

    carry_t, hs = lax.scan(body, carry, (ts, xs, m, r))
    return hs, carry_t


def scan_loss(
    cell,
    p,
    ro,
    xs,
    targets,
    carry,
    mask=None,
    loss="xent",
    reduction="mean",
    truncate=None,
    *,
    loss_mask=None,
    resets=None,
    delta_clip=None,
):
    """The documented loss, with optax's per-token losses, on top of ``scan_unroll``;
    tokens count where ``mask`` and ``loss_mask`` are both set."""
    hs, _ = scan_unroll(cell, p, xs, carry, mask, truncate, resets, delta_clip)
    ys = hs @ ro.w_hy + ro.b_y
    if loss == "xent":
        per = optax.softmax_cross_entropy_with_integer_labels(ys, targets)
    else:
        per = jnp.mean(optax.squared_error(ys, targets), axis=-1)
    m = jnp.ones(per.shape, per.dtype) if mask is None else mask.astype(per.dtype)
    if loss_mask is not None:
        m = m * loss_mask.astype(per.dtype)
    total = jnp.sum(per * m)
    return total if reduction == "sum" else total / jnp.maximum(jnp.sum(m), 1)


def rel_err(a, b) -> float:
    """Normwise relative error max|a - b| / max|b| of one array, in float64 numpy."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.max(np.abs(b), initial=0.0)
    return float(np.max(np.abs(a - b), initial=0.0) / (scale if scale > 0 else 1.0))


#: One tolerance table, by dtype: float64 is exact to ~1e-16 per op, float32 to ~6e-8, and
#: a gradient sums O(T*B) such terms in a different order on each side.
TOL = {jnp.float64: 1e-10, jnp.float32: 1e-5}


def assert_trees_close(actual, expected, dtype):
    """Every leaf within TOL[dtype] (normwise relative), same structure, same dtype."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for path, a in jax.tree_util.tree_leaves_with_path(actual):
        e = _at(expected, path)
        assert a.shape == e.shape, (path, a.shape, e.shape)
        assert a.dtype == jnp.dtype(dtype), (path, a.dtype, dtype)
        err = rel_err(a, e)
        assert err <= TOL[dtype], f"{jax.tree_util.keystr(path)}: rel err {err:.2e}"


def _at(tree, path):
    for k in path:
        tree = tree[k.idx] if hasattr(k, "idx") else getattr(tree, k.name)
    return tree


CELLS = {
    "elman-tanh": bptt_jax.Elman(6, "tanh"),
    "elman-relu": bptt_jax.Elman(6, "relu"),
    "elman-identity": bptt_jax.Elman(6, "identity"),
    "lstm": bptt_jax.LSTM(6, forget_bias=1.0),
    "gru": bptt_jax.GRU(6),
}


def problem(cell, key, dtype, *, t=7, b=3, d=4, o=5, mask=True, random_carry=True, loss="xent"):
    """Random everything: params, readout, inputs, targets, initial carry and mask."""
    from bptt_jax.verify import random_problem

    return random_problem(
        cell,
        key,
        seq_len=t,
        batch_size=b,
        input_size=d,
        output_size=o,
        dtype=dtype,
        mask=mask,
        random_carry=random_carry,
        loss=loss,
    )
