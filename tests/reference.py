"""Independent references, written from the equations in the cells' docstrings.

Nothing here calls into bptt_jax's engine or cell step functions: the per-step formulas are
written again from the math, so a bug in a cell's forward cannot hide in a test that compares
the cell with itself. ``scan_unroll`` is the plain ``lax.scan`` a user would write;
``jax.grad``/``jax.vjp`` of it is the autodiff reference for every gradient test.
"""

from functools import cache, partial

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
    # sqrt of at least the dtype's tiny: a zero cotangent (padding) must not give a NaN second
    # derivative (d sqrt at 0 is inf)
    sq = sum(jnp.sum(jnp.square(x), axis=1) for x in leaves)
    norm = jnp.sqrt(jnp.maximum(sq, jnp.finfo(sq.dtype).tiny))
    factor = jnp.minimum(1.0, threshold / norm)
    return (jax.tree.map(lambda x: x * factor[:, None].astype(x.dtype), g),)


clip_error.defvjp(_clip_error_fwd, _clip_error_bwd)


@jax.custom_vjp
def clip_error_at(carry, threshold):
    """``clip_error`` with the threshold an array (traced under ``jit``): one compiled
    reference serves every threshold; ``inf`` clips nothing."""
    return carry


def _clip_error_at_fwd(carry, threshold):
    return carry, threshold


def _clip_error_at_bwd(threshold, g):
    leaves = jax.tree.leaves(g)
    # sqrt of at least the dtype's tiny: a zero cotangent (padding) must not give a NaN second
    # derivative (d sqrt at 0 is inf)
    sq = sum(jnp.sum(jnp.square(x), axis=1) for x in leaves)
    norm = jnp.sqrt(jnp.maximum(sq, jnp.finfo(sq.dtype).tiny))
    factor = jnp.minimum(1.0, threshold.astype(norm.dtype) / norm)
    clipped = jax.tree.map(lambda x: x * factor[:, None].astype(x.dtype), g)
    return clipped, jnp.zeros_like(threshold)


clip_error_at.defvjp(_clip_error_at_fwd, _clip_error_at_bwd)


def scan_unroll(
    cell, p, xs, carry, mask=None, truncate=None, resets=None, delta_clip=None, eps=None
):
    """The plain ``lax.scan`` unroll; truncation is ``stop_gradient`` on the carry entering
    steps k, 2k, ... (the definition of truncated BPTT the library promises); a reset
    replaces the entering carry by zeros; ``delta_clip`` clips the error on each new carry.
    ``truncate`` and ``delta_clip`` may be arrays (traced under ``jit``): ``truncate=T`` cuts
    nothing and ``delta_clip=inf`` clips nothing, exactly as ``None``. ``eps`` (T, B, H), if
    given, is added to h_t after the mask and before the clipping: the gradient with respect
    to ``eps[t]`` is the (clipped) error ``delta_t = dL/dh_t``."""
    t_len = xs.shape[0]
    ts = jnp.arange(t_len)
    m = jnp.ones((t_len, xs.shape[1]), bool) if mask is None else mask
    r = jnp.zeros((t_len, xs.shape[1]), bool) if resets is None else resets
    e = jnp.zeros((t_len, 0), xs.dtype) if eps is None else eps

    def body(carry, inp):
        t, x, m_t, r_t, e_t = inp
        if truncate is not None:
            cut = (t % truncate == 0) & (t > 0)
            carry = jax.tree.map(lambda c: jnp.where(cut, lax.stop_gradient(c), c), carry)
        carry = jax.tree.map(lambda c: jnp.where(r_t[:, None], 0.0, c).astype(c.dtype), carry)
        new = step(cell, p, carry, x)
        new = jax.tree.map(lambda a, b: jnp.where(m_t[:, None], a, b), new, carry)
        if eps is not None:
            new = new._replace(h=new.h + e_t) if isinstance(new, bptt_jax.LSTMCarry) else new + e_t
        if isinstance(delta_clip, int | float):
            new = clip_error(new, delta_clip)
        elif delta_clip is not None:  # an array: traced under jit
            new = clip_error_at(new, delta_clip)
        return new, hidden(new)

    carry_t, hs = lax.scan(body, carry, (ts, xs, m, r, e))
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
#: a gradient sums O(T*B) such terms in a different order on each side (the errors seen on
#: these small problems: ~1e-15 in float64, ~1e-7 in float32).
TOL = {jnp.float64: 1e-12, jnp.float32: 1e-5}


def tree_rel_err(a, b) -> float:
    """The largest :func:`rel_err` over the leaves of two pytrees of one structure."""
    return max(rel_err(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


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
        if hasattr(k, "idx"):
            tree = tree[k.idx]
        elif hasattr(k, "key"):  # a dict's entry (a user cell's params)
            tree = tree[k.key]
        else:
            tree = getattr(tree, k.name)
    return tree


CELLS = {
    "elman-tanh": bptt_jax.Elman(6, "tanh"),
    "elman-relu": bptt_jax.Elman(6, "relu"),
    "elman-identity": bptt_jax.Elman(6, "identity"),
    "elman-sigmoid": bptt_jax.Elman(6, "sigmoid"),
    "lstm": bptt_jax.LSTM(6, forget_bias=1.0),
    "gru": bptt_jax.GRU(6),
}


def problem(cell, key, dtype, *, t=7, b=3, d=4, o=5, mask=True, random_carry=True, loss="xent"):
    """Random everything: params, readout, inputs, targets, initial carry and mask, drawn
    with numpy from ``key`` (:func:`draw`: nothing compiled)."""
    return draw(
        cell, numpy_rng(key), dtype, t=t, b=b, d=d, o=o, mask=mask, random_carry=random_carry,
        loss=loss,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Models: Stack and Bidirectional, again from their definitions (bptt_jax.models), on top of
# this module's own ``scan_unroll``. Params and carries follow the models' layout: a Stack's
# are tuples with one entry per layer, a Bidirectional's the pairs (forward, backward).


def model_output_size(model) -> int:
    """Features per step of ``model``'s outputs."""
    if isinstance(model, (bptt_jax.Stack, bptt_jax.Bidirectional)):
        return model.output_size
    return model.hidden_size


def lengths_of(mask, t_len: int, batch: int):
    """Each example's number of valid steps, ``sum_t mask[t, b]`` (``T`` without a mask)."""
    if mask is None:
        return jnp.full((batch,), t_len, jnp.int32)
    return jnp.sum(jnp.asarray(mask).astype(jnp.int32), axis=0, dtype=jnp.int32)


def prefix_reversal(mask, t_len: int, dtype):
    """``P (T, T, B)``, 0/1: ``P[s, t, b] = 1`` where step s of example b's reversed sequence
    is original step t, i.e. ``t = len_b - 1 - s`` for ``s < len_b`` (the valid prefix read
    backwards) and ``t = s`` for ``s >= len_b`` (padding stays where it is, at the right).

    Built from comparisons of index grids (no gather), so it is traceable with a traced mask.
    P is symmetric and its own inverse: ``einsum('stb,tb...->sb...', P, a)`` reverses every
    example's valid prefix, and applying it twice gives ``a`` back.
    """
    b = jnp.asarray(mask).shape[1]
    lens = lengths_of(mask, t_len, b)[None, None, :]
    s = jnp.arange(t_len, dtype=jnp.int32)[:, None, None]
    t = jnp.arange(t_len, dtype=jnp.int32)[None, :, None]
    return jnp.where(s < lens, t == lens - 1 - s, t == s).astype(dtype)


def _reverse_in_time(a, p_rev):
    """Each example's valid prefix of ``a (T, B, F)`` reversed (``a[::-1]`` without a mask)."""
    if p_rev is None:
        return a[::-1]
    return jnp.einsum("stb,tbf->sbf", p_rev, a)


def merge_outputs(merge: str, h_fwd, h_bwd):
    """A Bidirectional's output from its two directions' outputs."""
    if merge == "concat":
        return jnp.concatenate([h_fwd, h_bwd], axis=-1)
    if merge == "sum":
        return h_fwd + h_bwd
    if merge == "mean":
        return (h_fwd + h_bwd) / 2
    raise ValueError(f"unknown merge {merge!r}")


def bidirectional_unroll(model, p, xs, carry, mask=None, delta_clip=None):
    """A Bidirectional layer: the forward cell is ``scan_unroll``; the reverse cell is
    ``scan_unroll`` over every example's valid prefix read backwards, ``x[len_b - 1], ...,
    x[0]``, followed by the padding (same right-padding mask, so the carry passes through the
    padded steps and ``delta_clip`` applies at them exactly as in the forward direction),
    starting from ``carry[1]``. Its outputs are put back in original time: at a valid step t
    the state after reading ``x[t]``; at a padded step its final carry (the state after
    reading ``x[0]``). Final carry: ``(forward carry_T, reverse state after x[0])``.
    """
    t_len = xs.shape[0]
    h_f, c_f = scan_unroll(model.forward, p[0], xs, carry[0], mask, delta_clip=delta_clip)
    p_rev = None if mask is None else prefix_reversal(mask, t_len, xs.dtype)
    xs_rev = _reverse_in_time(xs, p_rev)
    h_r, c_b = scan_unroll(model.backward, p[1], xs_rev, carry[1], mask, delta_clip=delta_clip)
    h_b = _reverse_in_time(h_r, p_rev)
    return merge_outputs(model.merge, h_f, h_b), (c_f, c_b)


def model_unroll(
    model,
    p,
    xs,
    carry,
    mask=None,
    truncate=None,
    resets=None,
    delta_clip=None,
    dropout_masks=None,
):
    """``(hs, carry_T)`` of a cell, a Bidirectional or a Stack.

    A cell: ``scan_unroll``. A Stack: layer k runs on layer k-1's outputs (all T steps,
    padded ones included) times ``dropout_masks[k-1]`` when given (``Stack.dropout_masks``'s
    tuple of L-1 arrays ``(T, B, F_k)``); every layer takes the same mask, resets, truncate
    (``stop_gradient`` on each layer's carry entering steps k, 2k, ...) and delta_clip (each
    layer's new carry). ``carry_T`` is the tuple of the layers' final carries. A
    Bidirectional: :func:`bidirectional_unroll`; it is undefined with ``truncate`` or
    ``resets`` (``ValueError``, as in the library).
    """
    if isinstance(model, bptt_jax.Stack):
        assert len(p) == len(carry) == len(model.layers)
        if dropout_masks is not None:
            assert len(dropout_masks) == len(model.layers) - 1
        h, finals = xs, []
        for k, (layer, p_k, c_k) in enumerate(zip(model.layers, p, carry)):
            if k > 0 and dropout_masks is not None:
                h = h * dropout_masks[k - 1]
            h, c_t = model_unroll(layer, p_k, h, c_k, mask, truncate, resets, delta_clip)
            finals.append(c_t)
        return h, tuple(finals)
    assert dropout_masks is None, "dropout masks are a Stack's"
    if isinstance(model, bptt_jax.Bidirectional):
        if truncate is not None:
            raise ValueError("truncate is undefined for a Bidirectional layer")
        if resets is not None:
            raise ValueError("resets is undefined for a Bidirectional layer")
        return bidirectional_unroll(model, p, xs, carry, mask, delta_clip)
    return scan_unroll(model, p, xs, carry, mask, truncate, resets, delta_clip)


def readout_loss(hs, ro, targets, mask=None, loss="xent", reduction="mean", loss_mask=None):
    """``scan_loss``'s readout and loss on given outputs ``hs (T, B, F)``."""
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


def model_loss(
    model,
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
    dropout_masks=None,
):
    """``scan_loss`` on ``model_unroll``'s outputs (readout ``w_hy (output_size, O)``)."""
    hs, _ = model_unroll(model, p, xs, carry, mask, truncate, resets, delta_clip, dropout_masks)
    return readout_loss(hs, ro, targets, mask, loss, reduction, loss_mask)


def numpy_rng(key) -> np.random.Generator:
    """A NumPy generator seeded by a JAX key: problems are drawn without compiling anything."""
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())


def model_problem(
    model, key, dtype, *, t=7, b=3, d=4, o=5, mask=True, random_carry=True, loss="xent"
):
    """Random params, readout, inputs, targets, initial carry and mask for any model.

    The params have ``model.init``'s structure, shapes and dtype, every leaf drawn anew as
    ``0.4 N(0, 1)`` (nothing keeps init's pattern, e.g. zero biases); every carry leaf is drawn
    on its own as ``0.5 N(0, 1)`` (an LSTM's h and c differ); the mask right-pads random
    lengths in ``[1, T]`` with at least one full-length and one shorter sequence, at random
    positions. Returns ``(params, readout, xs, targets, carry0, mask)`` like :func:`problem`.
    Drawn with NumPy from ``key`` (deterministic per key), so nothing is compiled.
    """
    rng = numpy_rng(key)
    dtype = jnp.dtype(dtype)

    def normal(shape, scale=1.0):
        return jnp.asarray((scale * rng.standard_normal(shape)).astype(dtype))

    shapes = jax.eval_shape(lambda k: model.init(k, d, dtype), key)
    params = jax.tree.map(lambda s: normal(s.shape, 0.4), shapes)
    f = model_output_size(model)
    readout = bptt_jax.ReadoutParams(normal((f, o), f**-0.5), normal((o,), 0.1))
    xs = normal((t, b, d))
    if loss == "xent":
        targets = jnp.asarray(rng.integers(0, o, (t, b)).astype(np.int32))
    else:
        targets = normal((t, b, o))
    carry0 = model.zero_carry(b, dtype)
    if random_carry:
        carry0 = jax.tree.map(lambda c: normal(c.shape, 0.5), carry0)
    m = None
    if mask:
        assert t >= 2 and b >= 2, "a full and a short sequence need T >= 2 and B >= 2"
        lengths = rng.integers(1, t + 1, b)
        lengths[0], lengths[1] = t, rng.integers(1, t)
        lengths = rng.permutation(lengths)
        m = jnp.asarray(np.arange(t)[:, None] < lengths[None, :])
    return params, readout, xs, targets, carry0, m


def random_like(key, tree):
    """A standard normal draw for every leaf of ``tree``, in its dtype (random cotangents);
    drawn with NumPy from ``key``."""
    rng = numpy_rng(key)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape).astype(x.dtype)), tree)


# --------------------------------------------------------------------------------------------
# Random problems from numpy: no JAX computation, so nothing is compiled (a JAX draw compiles
# for seconds per cell, dtype and size, more than the gradient it feeds).


def draw(cell, rng, dtype, *, t=10, b=3, d=4, o=5, mask=True, random_carry=True, loss="xent"):
    """``(params, readout, xs, targets, carry0, mask)`` drawn from the numpy Generator
    ``rng``, with ``problem``'s distributions: every params leaf and the readout kernel
    U(-1/sqrt(H), 1/sqrt(H)) plus 0.1 N(0, 1) on the params, a readout bias 0.1 N(0, 1),
    inputs N(0, 1), targets uniform classes (``"xent"``) or N(0, 1) (``"mse"``), every carry
    leaf 0.5 N(0, 1) on its own (an LSTM's h and c differ) or zero; the mask right-pads
    random lengths in [1, T] with a full-length first sequence and a shorter second one.
    The params' structure and shapes come from ``cell.init`` (traced, never run)."""
    dtype = np.dtype(dtype)
    h = cell.hidden_size
    bound = 1 / np.sqrt(h)
    shapes = jax.eval_shape(lambda: cell.init(jax.random.key(0), d, dtype))
    params = jax.tree.map(
        lambda s: jnp.asarray(
            rng.uniform(-bound, bound, s.shape) + 0.1 * rng.standard_normal(s.shape), dtype
        ),
        shapes,
    )
    readout = bptt_jax.ReadoutParams(
        jnp.asarray(rng.uniform(-bound, bound, (h, o)), dtype),
        jnp.asarray(0.1 * rng.standard_normal(o), dtype),
    )
    xs = jnp.asarray(rng.standard_normal((t, b, d)), dtype)
    if loss == "xent":
        targets = jnp.asarray(rng.integers(0, o, (t, b)), jnp.int32)
    else:
        targets = jnp.asarray(rng.standard_normal((t, b, o)), dtype)
    carry_shapes = jax.eval_shape(lambda: cell.zero_carry(b, dtype))
    scale = 0.5 if random_carry else 0.0
    carry0 = jax.tree.map(
        lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), dtype), carry_shapes
    )
    m = None
    if mask:
        lengths = rng.integers(1, t + 1, b)
        lengths[0] = t
        if b > 1 and t > 1:
            lengths[1] = rng.integers(1, t)
        m = jnp.asarray(np.arange(t)[:, None] < lengths[None, :])
    return params, readout, xs, targets, carry0, m


def normal_like(rng, tree):
    """A standard normal draw (numpy) for every leaf of ``tree``, each on its own."""
    return jax.tree.map(
        lambda x: jnp.asarray(rng.standard_normal(np.shape(x)), jnp.result_type(x)), tree
    )


def flags(rng, shape, p, at_least_one=True):
    """``(T, B)`` bool, each set with probability ``p`` (resets, loss masks); with
    ``at_least_one``, some entry after step 0 is set and some is not."""
    f = rng.random(shape) < p
    if at_least_one:
        assert shape[0] >= 2, "a set entry after step 0 needs T >= 2"
        cells = rng.permutation(f.size)  # two distinct entries: one set (after step 0), one not
        on = next(c for c in cells if c >= shape[1])  # flat index >= B: t >= 1
        off = next(c for c in cells if c != on)
        f.flat[on], f.flat[off] = True, False
    return jnp.asarray(f)


# --------------------------------------------------------------------------------------------
# Compiled references for the gradient tests: one program per cell (and loss, reduction,
# argnums), taking the mask, loss mask, resets, truncation length and clip threshold as
# arguments, so one compile serves every test with the same shapes. Absent options are passed
# as what the reference treats exactly like ``None``: an all-ones mask, no resets,
# ``truncate=T``, ``delta_clip=inf``.


def _options(xs, mask, loss_mask, resets, truncate, delta_clip):
    t_len, b = xs.shape[:2]
    ones = jnp.ones((t_len, b), bool)
    return (
        ones if mask is None else jnp.asarray(mask).astype(bool),
        ones if loss_mask is None else jnp.asarray(loss_mask).astype(bool),
        jnp.zeros((t_len, b), bool) if resets is None else jnp.asarray(resets).astype(bool),
        jnp.asarray(t_len if truncate is None else truncate, jnp.arange(1).dtype),
        jnp.asarray(np.inf if delta_clip is None else delta_clip, xs.dtype),
    )


def _vdot(tree, other):
    return sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(other)))


@cache
def _compiled_loss(cell, loss, reduction, argnums):
    def total(p, ro, xs, tg, c0, carry_ct, mask, loss_mask, resets, truncate, delta_clip):
        hs, c_t = scan_unroll(cell, p, xs, c0, mask, truncate, resets, delta_clip)
        value = readout_loss(hs, ro, tg, mask, loss, reduction, loss_mask)
        return value + _vdot(c_t, carry_ct), (value, c_t)

    return jax.jit(jax.value_and_grad(total, argnums, has_aux=True))


def loss_grads(
    cell,
    p,
    ro,
    xs,
    targets,
    carry,
    *,
    mask=None,
    loss_mask=None,
    resets=None,
    loss="xent",
    reduction="mean",
    truncate=None,
    delta_clip=None,
    carry_ct=None,
    argnums=None,
):
    """``(value, carry_T, grads)``: ``scan_loss``'s value and final carry, and ``jax.grad``
    of ``scan_loss + <carry_T, carry_ct>`` (a cotangent on the final carry; none by default)
    with respect to ``argnums`` of ``(p, ro, xs, targets, carry)`` (default: all but integer
    targets). Compiled once per cell, loss, reduction, argnums and shapes."""
    if argnums is None:
        argnums = (0, 1, 2, 3, 4) if loss == "mse" else (0, 1, 2, 4)
    if carry_ct is None:
        carry_ct = jax.tree.map(jnp.zeros_like, carry)
    opts = _options(xs, mask, loss_mask, resets, truncate, delta_clip)
    f = _compiled_loss(cell, loss, reduction, tuple(argnums))
    (_, (value, c_t)), grads = f(p, ro, xs, targets, carry, carry_ct, *opts)
    return value, c_t, grads


@cache
def _compiled_unroll_vjp(cell):
    def run(p, xs, c0, ct, mask, resets, truncate, delta_clip):
        def f(p, xs, c0):
            return scan_unroll(cell, p, xs, c0, mask, truncate, resets, delta_clip)

        out, vjp = jax.vjp(f, p, xs, c0)
        return out, vjp(ct)

    return jax.jit(run)


def unroll_vjp(cell, p, xs, carry, ct, *, mask=None, resets=None, truncate=None, delta_clip=None):
    """``((hs, carry_T), (dp, dxs, dcarry))``: ``scan_unroll`` and its VJP at the cotangent
    ``ct`` (a ``(hs, carry_T)`` tree). Compiled once per cell and shapes."""
    m, _, r, k, c = _options(xs, mask, None, resets, truncate, delta_clip)
    return _compiled_unroll_vjp(cell)(p, xs, carry, ct, m, r, k, c)


@cache
def _compiled_deltas(cell, loss, reduction):
    def total(eps, p, ro, xs, tg, c0, mask, loss_mask, resets, truncate, delta_clip):
        hs, _ = scan_unroll(cell, p, xs, c0, mask, truncate, resets, delta_clip, eps)
        return readout_loss(hs, ro, tg, mask, loss, reduction, loss_mask)

    return jax.jit(jax.grad(total))


def deltas(
    cell,
    p,
    ro,
    xs,
    targets,
    carry,
    *,
    mask=None,
    loss_mask=None,
    resets=None,
    loss="xent",
    reduction="mean",
    truncate=None,
    delta_clip=None,
):
    """``delta_t = dL/dh_t`` (T, B, H) of ``scan_loss``: the gradient with respect to a
    perturbation added to every h_t (after the mask, before the clipping, so it is the error
    after ``delta_clip``). Compiled once per cell, loss, reduction and shapes."""
    eps = jnp.zeros((*xs.shape[:2], cell.hidden_size), xs.dtype)
    opts = _options(xs, mask, loss_mask, resets, truncate, delta_clip)
    return _compiled_deltas(cell, loss, reduction)(eps, p, ro, xs, targets, carry, *opts)


# ------------------------------------------------------------------ one-array-carry cells
def diagonal_scan(step_fn, p, xs, h0, mask, resets, truncate, delta_clip):
    """The plain ``lax.scan`` of ``step_fn(p, h, x) -> h`` (a cell whose carry is one array,
    e.g. a linear recurrence written from its equations): a reset zeros the carry entering
    its step, a padded step passes it, truncation is ``stop_gradient`` on the carry entering
    steps k, 2k, ... (``truncate=T``: none), ``delta_clip`` clips the error on each new carry
    (``inf``: none). Every option is an array (:func:`scan_options`), so one compile serves
    every problem of a shape. Returns ``(hs, carry_T)``."""

    def body(h, inp):
        t, x, m_t, r_t = inp
        cut = (t % truncate == 0) & (t > 0)
        h = jnp.where(cut, lax.stop_gradient(h), h)
        h = jnp.where(r_t[:, None], 0.0, h).astype(h.dtype)
        new = jnp.where(m_t[:, None], step_fn(p, h, x), h)
        new = clip_error_at(new, delta_clip)
        return new, new

    carry_t, hs = lax.scan(body, h0, (jnp.arange(xs.shape[0]), xs, mask, resets))
    return hs, carry_t


def scan_options(xs, mask=None, resets=None, truncate=None, delta_clip=None):
    """:func:`diagonal_scan`'s options as arrays (``None``: all valid, no reset, no cut, no
    clipping)."""
    t, b = xs.shape[:2]
    return (
        jnp.ones((t, b), bool) if mask is None else mask,
        jnp.zeros((t, b), bool) if resets is None else resets,
        jnp.asarray(t if truncate is None else truncate),
        jnp.asarray(np.inf if delta_clip is None else delta_clip, xs.dtype),
    )


@cache
def _scan_vjp(scan, step_fn):
    """``scan(step_fn, ...)`` (:func:`diagonal_scan` or :func:`output_scan`) and its VJP,
    compiled once per scan, step function and shapes."""

    def run(p, xs, h0, ct, *options):
        out, vjp = jax.vjp(lambda *a: scan(step_fn, *a, *options), p, xs, h0)
        return out, vjp(ct)

    return jax.jit(run)


def diagonal_scan_vjp(step_fn, p, xs, h0, ct, mask=None, resets=None, truncate=None,
                      delta_clip=None):  # fmt: skip
    """``((hs, carry_T), (dp, dxs, dh0))`` of :func:`diagonal_scan` for cotangents ``ct``
    (``step_fn`` hashable and kept: one compile per step function and shape)."""
    options = scan_options(xs, mask, resets, truncate, delta_clip)
    return _scan_vjp(diagonal_scan, step_fn)(p, xs, h0, ct, *options)


# ------------------------------------------------------------------ cells with an output
def output_scan(step_fn, p, xs, h0, mask, resets, truncate, delta_clip):
    """:func:`diagonal_scan` of a cell whose outputs are not its carry: ``step_fn(p, carry,
    x) -> (carry, y)`` (any carry pytree); the outputs are the ``y`` of the steps, zeros at a
    padded step (PyTorch's padded outputs). ``delta_clip`` clips the error arriving at each
    new carry from the steps after it (the output's own error does not pass the clip).
    Returns ``(ys, carry_T)``."""

    def body(carry, inp):
        t, x, m_t, r_t = inp
        cut = (t % truncate == 0) & (t > 0)
        carry = jax.tree.map(lambda c: jnp.where(cut, lax.stop_gradient(c), c), carry)
        carry = jax.tree.map(lambda c: jnp.where(r_t[:, None], 0.0, c).astype(c.dtype), carry)
        new, y = step_fn(p, carry, x)
        new = jax.tree.map(lambda n, c: jnp.where(m_t[:, None], n, c), new, carry)
        new = clip_error_at(new, delta_clip)
        return new, jnp.where(m_t[:, None], y, 0.0)

    carry_t, ys = lax.scan(body, h0, (jnp.arange(xs.shape[0]), xs, mask, resets))
    return ys, carry_t


def output_scan_vjp(step_fn, p, xs, h0, ct, mask=None, resets=None, truncate=None,
                    delta_clip=None):  # fmt: skip
    """``((ys, carry_T), (dp, dxs, dh0))`` of :func:`output_scan` for cotangents ``ct``."""
    options = scan_options(xs, mask, resets, truncate, delta_clip)
    return _scan_vjp(output_scan, step_fn)(p, xs, h0, ct, *options)
