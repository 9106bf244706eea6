"""TBPTT(k1, k2) and streams: the drivers in bptt_jax.truncated against their definition.

The reference here is written from the definition in the module docstring, not from the
window layout: a Python loop over updates j that slices steps ``[max(0, (j+1)*k1 - k2),
min((j+1)*k1, T))`` out of the sequence (no padding), takes ``jax.grad`` of a plain per-step
loss from ``tests/reference.py``'s cell equations, applies SGD, and passes on the carry after
step ``(j+2)*k1 - k2 - 1`` computed with the params before the update.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bptt_jax
from bptt_jax import truncated
from tests import reference
from tests.reference import assert_trees_close

CELLS = {
    "elman": bptt_jax.Elman(5, "tanh"),
    "lstm": bptt_jax.LSTM(5, forget_bias=1.0),
    "gru": bptt_jax.GRU(5),
}
LR = 0.3


# ----------------------------------------------------------------- the reference
def ref_unroll(cell, p, xs, carry, mask, resets):
    """Per-step Python loop: reset -> step -> hold the carry where the mask is 0."""
    hs = []
    for t in range(xs.shape[0]):
        r_t, m_t = resets[t][:, None], mask[t][:, None]
        carry = jax.tree.map(lambda c: jnp.where(r_t, 0.0, c), carry)
        new = reference.step(cell, p, carry, xs[t])
        carry = jax.tree.map(lambda a, b: jnp.where(m_t, a, b), new, carry)
        hs.append(reference.hidden(carry))
    return jnp.stack(hs), carry


def ref_loss(cell, p, ro, xs, targets, carry, mask, counted, resets, loss, reduction="mean"):
    hs, _ = ref_unroll(cell, p, xs, carry, mask, resets)
    ys = hs @ ro.w_hy + ro.b_y
    if loss == "xent":
        per = optax.softmax_cross_entropy_with_integer_labels(ys, targets)
    else:
        per = jnp.mean((ys - targets) ** 2, axis=-1)
    w = (counted & mask).astype(per.dtype)
    total = jnp.sum(per * w)
    return total if reduction == "sum" else total / jnp.maximum(jnp.sum(w), 1)


def ref_tbptt(
    cell, p, ro, xs, targets, carry0, mask, loss_mask, resets, k1, k2, loss, reduction="mean"
):
    """TBPTT(k1, k2) with SGD(LR), straight from the definition; returns (p, ro, carry, L)."""
    t_len = xs.shape[0]
    saved, values = carry0, []
    for j in range(math.ceil(t_len / k1)):
        lo, hi = max((j + 1) * k1 - k2, 0), min((j + 1) * k1, t_len)
        new_steps = (jnp.arange(lo, hi) >= j * k1)[:, None] & loss_mask[lo:hi]
        sl = slice(lo, hi)

        def f(p_, ro_, sl=sl, new_steps=new_steps, saved=saved):
            return ref_loss(
                cell, p_, ro_, xs[sl], targets[sl], saved, mask[sl], new_steps, resets[sl],
                loss, reduction,
            )  # fmt: skip

        value, (gp, gro) = jax.value_and_grad(f, argnums=(0, 1))(p, ro)
        values.append(value)
        # the carry passed on: entering the next window, or after step T - 1 at the end
        nxt = min((j + 2) * k1 - k2, t_len) if hi < t_len else t_len
        if nxt > lo:
            _, saved = ref_unroll(cell, p, xs[lo:nxt], saved, mask[lo:nxt], resets[lo:nxt])
        p, ro = jax.tree.map(lambda w, g: w - LR * g, (p, ro), (gp, gro))
    return p, ro, saved, jnp.stack(values)


def sgd(n, p, ro, lg, window):
    p, ro = jax.tree.map(lambda w, g: w - LR * g, (p, ro), (lg.params, lg.readout))
    return n + 1, p, ro, lg.value


def no_update(n, p, ro, lg, window):
    return n, p, ro, lg.value


#: the driver under test, compiled (cell, k1, k2, update and loss are static)
tbptt = jax.jit(
    truncated.tbptt, static_argnums=0, static_argnames=("k1", "k2", "update", "loss", "reduction")
)


def stream(cell, key, dtype, t_len=11, b=3, d=4, o=3, loss="xent"):
    """Random params, readout, inputs, targets, carry, right-padding mask, loss mask, resets,
    drawn with numpy from ``key`` (nothing compiled); every carry leaf on its own (an LSTM's
    h and c differ, so a swap shows)."""
    rng = reference.numpy_rng(key)
    p, ro, xs, targets, carry, _ = reference.draw(cell, rng, dtype, t=t_len, b=b, d=d, o=o,
                                                  mask=False, loss=loss)  # fmt: skip
    lengths = np.array([t_len, t_len - 3, t_len - 5][:b])
    mask = jnp.asarray(np.arange(t_len)[:, None] < lengths)
    loss_mask = jnp.asarray(rng.random((t_len, b)) < 0.8)
    resets = jnp.asarray(rng.random((t_len, b)) < 0.15)
    return p, ro, xs, targets, carry, mask, loss_mask, resets


# ----------------------------------------------------------------- window layout
def test_windows_cover_k1_new_steps_after_k2_minus_k1_history_steps():
    t_len, k1, k2 = 10, 4, 6
    xs = jnp.arange(1.0, t_len + 1)[:, None, None] * jnp.ones((1, 2, 3))
    ys = jnp.broadcast_to(jnp.arange(t_len)[:, None], (t_len, 2))
    w = truncated.windows(xs, ys, k1=k1, k2=k2)
    steps = truncated.window_steps(t_len, k1, k2)
    np.testing.assert_array_equal(
        steps, [[-2, -1, 0, 1, 2, 3], [2, 3, 4, 5, 6, 7], [6, 7, 8, 9, 10, 11]]
    )
    inside = (steps >= 0) & (steps < t_len)
    assert w.xs.shape == (3, k2, 2, 3) and w.targets.shape == (3, k2, 2)
    np.testing.assert_array_equal(w.mask[..., 0], inside)
    np.testing.assert_array_equal(w.loss_mask[..., 0], inside & (np.arange(k2) >= k2 - k1))
    np.testing.assert_array_equal(w.xs[..., 0, 0], np.where(inside, steps + 1.0, 0.0))
    np.testing.assert_array_equal(w.targets[..., 0][inside], steps[inside])
    assert w.resets is None


def test_every_step_is_counted_in_exactly_one_window(key):
    t_len, b = 23, 2
    loss_mask = jax.random.bernoulli(key, 0.7, (t_len, b))
    for k1, k2 in [(1, 1), (4, 4), (4, 7), (5, 23), (23, 23), (30, 40)]:
        w = truncated.windows(
            jnp.ones((t_len, b, 1)), jnp.zeros((t_len, b), int), k1=k1, k2=k2, loss_mask=loss_mask
        )
        steps = truncated.window_steps(t_len, k1, k2)
        lm = np.asarray(w.loss_mask)
        counted = np.zeros((t_len, b), int)
        for j, i in np.ndindex(steps.shape):
            if 0 <= steps[j, i] < t_len:
                counted[steps[j, i]] += lm[j, i]
            else:
                assert not lm[j, i].any()
        np.testing.assert_array_equal(counted, loss_mask.astype(int))


@pytest.mark.parametrize(
    ("k1", "k2", "match"), [(0, 3, "k1"), (3, -1, "k2"), (5, 3, "k1 must be <= k2")]
)
def test_bad_k1_k2_raise_naming_the_argument(k1, k2, match):
    with pytest.raises(ValueError, match=match):
        truncated.windows(jnp.ones((6, 1, 1)), jnp.zeros((6, 1), int), k1=k1, k2=k2)
    cell = bptt_jax.GRU(2)
    p, ro = cell.init(jax.random.key(0), 1), bptt_jax.init_readout(jax.random.key(1), 2, 2)
    with pytest.raises(ValueError, match=match):
        truncated.tbptt(
            cell, p, ro, jnp.ones((6, 1, 1)), jnp.zeros((6, 1), int), k1=k1, k2=k2, update=sgd
        )


def test_an_empty_sequence_is_refused_naming_xs():
    cell = bptt_jax.GRU(2)
    p, ro = cell.init(jax.random.key(0), 1), bptt_jax.init_readout(jax.random.key(1), 2, 2)
    with pytest.raises(ValueError, match=r"xs must have T >= 1 and B >= 1; got \(0, 1, 1\)"):
        truncated.tbptt(cell, p, ro, jnp.ones((0, 1, 1)), jnp.zeros((0, 1), int), k1=2, update=sgd)


# ----------------------------------------------------------------- against the definition
@pytest.mark.parametrize(
    ("cell_name", "k1", "k2", "dtype", "reduction"),
    [
        ("elman", 3, 3, jnp.float64, "mean"),
        pytest.param("elman", 4, 10, jnp.float32, "sum", marks=pytest.mark.slow),
        pytest.param("lstm", 4, 4, jnp.float32, "mean", marks=pytest.mark.slow),
        ("lstm", 3, 5, jnp.float64, "sum"),
        pytest.param("gru", 3, 3, jnp.float64, "sum", marks=pytest.mark.slow),
        ("gru", 2, 7, jnp.float32, "mean"),
    ],
    ids=lambda v: jnp.dtype(v).name if isinstance(v, type) else None,
)
def test_tbptt_matches_the_definition_with_autodiff(cell_name, k1, k2, dtype, reduction, key):
    """T=11 (not a multiple of k1 = 2, 3, 4), random mask/loss_mask/resets/carry, in both
    dtypes and reductions (with ``-m slow``, each cell meets each)."""
    cell = CELLS[cell_name]
    loss = "mse" if cell_name == "gru" else "xent"
    p, ro, xs, ys, carry, mask, loss_mask, resets = stream(cell, key, dtype, loss=loss)
    opts = dict(mask=mask, loss_mask=loss_mask, resets=resets, loss=loss, reduction=reduction)
    run = jax.jit(
        lambda p, ro, carry: truncated.tbptt(
            cell, p, ro, xs, ys, carry, k1=k1, k2=k2, update=sgd, update_state=0, **opts
        )
    )
    out = run(p, ro, carry)
    p_ref, ro_ref, carry_ref, values_ref = jax.jit(ref_tbptt, static_argnums=(0, 9, 10, 11, 12))(
        cell, p, ro, xs, ys, carry, mask, loss_mask, resets, k1, k2, loss, reduction
    )  # the definition's Python loops, traced once and compiled (faster than op by op)
    assert int(out.update_state) == math.ceil(11 / k1)
    assert_trees_close(out.aux, values_ref, dtype)
    assert_trees_close(out.params, p_ref, dtype)
    assert_trees_close(out.readout, ro_ref, dtype)
    assert_trees_close(out.carry, carry_ref, dtype)


def test_tbptt_with_k1_equal_T_is_one_full_bptt_update(key):
    cell, dtype = CELLS["lstm"], jnp.float64
    p, ro, xs, ys, carry, mask, loss_mask, resets = stream(cell, key, dtype)
    out = tbptt(
        cell,
        p,
        ro,
        xs,
        ys,
        carry,
        k1=11,
        update=sgd,
        update_state=0,
        mask=mask,
        loss_mask=loss_mask,
        resets=resets,
    )
    lg = bptt_jax.losses.loss_and_grads(
        cell, p, ro, xs, ys, carry, mask=mask, loss_mask=loss_mask, resets=resets
    )
    assert int(out.update_state) == 1
    assert_trees_close(out.aux, lg.value[None], dtype)
    assert_trees_close(out.params, jax.tree.map(lambda w, g: w - LR * g, p, lg.params), dtype)
    assert_trees_close(out.carry, lg.carry, dtype)


# ----------------------------------------------------------------- streams
def test_stream_in_chunks_with_the_carry_passed_on_equals_one_pass(key):
    """k1 = k2 = 4 divides the chunk length 8; T = 23 so the last chunk is right-padded."""
    cell, dtype = CELLS["lstm"], jnp.float64
    t_len, chunk = 23, 8
    p, ro, xs, ys, carry, mask, loss_mask, resets = stream(cell, key, dtype, t_len=t_len)
    kw = dict(k1=4, k2=4, update=sgd)
    whole = tbptt(
        cell,
        p,
        ro,
        xs,
        ys,
        carry,
        update_state=0,
        mask=mask,
        loss_mask=loss_mask,
        resets=resets,
        **kw,
    )
    chunks = truncated.windows(
        xs, ys, k1=chunk, mask=mask, loss_mask=loss_mask, resets=resets
    )  # (3, 8, B, ...): the stream cut into right-padded chunks
    n, state, aux = 0, (p, ro, carry), []
    for c in range(chunks.xs.shape[0]):
        ch = jax.tree.map(lambda a, c=c: a[c], chunks)
        p_, ro_, carry_ = state
        out = tbptt(
            cell,
            p_,
            ro_,
            ch.xs,
            ch.targets,
            carry_,
            update_state=n,
            mask=ch.mask,
            loss_mask=ch.loss_mask,
            resets=ch.resets,
            **kw,
        )
        n, state = out.update_state, (out.params, out.readout, out.carry)
        aux.append(out.aux)
    assert int(n) == int(whole.update_state) == 6
    assert_trees_close(jnp.concatenate(aux), whole.aux, dtype)
    assert_trees_close(state[0], whole.params, dtype)
    assert_trees_close(state[2], whole.carry, dtype)


def test_resets_make_a_stream_of_sequences_independent_of_what_came_before(key):
    """With a reset at a window's first step, nothing before it changes that window."""
    cell, dtype = CELLS["gru"], jnp.float64
    p, ro, xs, ys, carry, mask, loss_mask, _ = stream(cell, key, dtype, t_len=12)
    resets = jnp.zeros((12, 3), bool).at[6].set(True)
    run = lambda xs, carry: tbptt(
        cell,
        p,
        ro,
        xs,
        ys,
        carry,
        k1=6,
        update=no_update,
        resets=resets,
    )
    a = run(xs, carry)
    b = run(xs.at[:6].set(-xs[:6]), jax.tree.map(jnp.zeros_like, carry))
    assert not np.allclose(a.aux[0], b.aux[0])
    np.testing.assert_array_equal(a.aux[1], b.aux[1])
    assert_trees_close(a.carry, b.carry, dtype)
