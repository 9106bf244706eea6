"""Forward semantics: cells match their equations; masks, shapes, dtypes, pytrees."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bptt_jax
from tests import reference as ref


@pytest.mark.parametrize("name", list(ref.CELLS))
@pytest.mark.parametrize("backward", ["manual", "autodiff"])
def test_forward_matches_independent_python_loop(name, backward, key):
    cell = ref.CELLS[name]
    p, _, xs, _, c0, m = ref.problem(cell, key, jnp.float64, t=9, b=4)
    hs, c_t = bptt_jax.unroll(cell, p, xs, c0, mask=m, backward=backward)
    hs_r, c_r = ref.python_loop(cell, p, xs, c0, m)
    ref.assert_trees_close((hs, c_t), (hs_r, c_r), jnp.float64)


@pytest.mark.parametrize("name", list(ref.CELLS))
def test_cell_step_is_one_step_of_unroll(name, key):
    cell = ref.CELLS[name]
    p, _, xs, _, c0, _ = ref.problem(cell, key, jnp.float64, t=1)
    new, h = cell.step(p, c0, xs[0])
    hs, c_t = bptt_jax.unroll(cell, p, xs, c0)
    ref.assert_trees_close((h, new), (hs[0], c_t), jnp.float64)


@pytest.mark.parametrize("name", list(ref.CELLS))
def test_mask_gives_each_sequences_last_valid_state(name, key):
    """A right-padded batch equals running each sequence alone on its own length."""
    cell = ref.CELLS[name]
    p, _, xs, _, c0, _ = ref.problem(cell, key, jnp.float64, t=8, b=3)
    lengths = [8, 3, 5]
    m = jnp.arange(8)[:, None] < jnp.array(lengths)[None, :]
    hs, c_t = bptt_jax.unroll(cell, p, xs, c0, mask=m)
    for b, n in enumerate(lengths):
        one = jax.tree.map(lambda c, b=b: c[b : b + 1], c0)
        hs_b, c_b = bptt_jax.unroll(cell, p, xs[:n, b : b + 1], one)
        ref.assert_trees_close(jax.tree.map(lambda c, b=b: c[b : b + 1], c_t), c_b, jnp.float64)
        np.testing.assert_allclose(hs[:n, b], hs_b[:, 0], rtol=1e-12)
        # padded steps repeat the last valid state
        np.testing.assert_array_equal(hs[n:, b], jnp.broadcast_to(hs[n - 1, b], hs[n:, b].shape))


@pytest.mark.parametrize("name", list(ref.CELLS))
def test_padded_steps_contribute_no_loss_and_no_gradient(name, key):
    """Changing inputs and targets at padded positions changes neither loss nor gradients."""
    cell = ref.CELLS[name]
    p, ro, xs, tg, c0, m = ref.problem(cell, key, jnp.float64, t=8)
    m = m.at[5:, 1].set(False)
    noise = jax.random.normal(jax.random.fold_in(key, 7), xs.shape, xs.dtype)
    xs2 = jnp.where(m[..., None], xs, noise)
    tg2 = jnp.where(m, tg, -1)  # even out-of-range targets are fine where padded
    f = jax.jit(
        jax.value_and_grad(
            lambda p, xs, tg: bptt_jax.sequence_loss(cell, p, ro, xs, tg, c0, mask=m)
        )
    )
    (v1, g1), (v2, g2) = f(p, xs, tg), f(p, xs2, tg2)
    assert v1 == v2
    ref.assert_trees_close(g2, g1, jnp.float64)


@pytest.mark.parametrize("name", list(ref.CELLS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_dtype_and_shapes_are_preserved(name, dtype, key):
    cell = ref.CELLS[name]
    p, ro, xs, tg, c0, m = ref.problem(cell, key, dtype, t=5, b=2)
    hs, c_t = bptt_jax.unroll(cell, p, xs, c0, mask=m)
    chex.assert_shape(hs, (5, 2, cell.hidden_size))
    chex.assert_trees_all_equal_shapes_and_dtypes(c_t, c0)
    chex.assert_type(hs, dtype)
    grads = jax.jit(
        jax.grad(lambda p, ro: bptt_jax.sequence_loss(cell, p, ro, xs, tg, c0, mask=m), (0, 1))
    )(p, ro)
    chex.assert_trees_all_equal_shapes_and_dtypes(grads, (p, ro))


@pytest.mark.parametrize("name", list(ref.CELLS))
def test_carry0_none_is_the_zero_carry(name, key):
    cell = ref.CELLS[name]
    p, _, xs, _, _, _ = ref.problem(cell, key, jnp.float32, b=2)
    a = bptt_jax.unroll(cell, p, xs)
    b = bptt_jax.unroll(cell, p, xs, cell.zero_carry(2, jnp.float32))
    chex.assert_trees_all_equal(a, b)


def test_cells_are_hashable_static_specs():
    assert hash(bptt_jax.LSTM(4)) == hash(bptt_jax.LSTM(4))
    assert bptt_jax.Elman(4, "relu") != bptt_jax.Elman(4, "tanh")
    jitted = jax.jit(bptt_jax.unroll, static_argnums=0)
    p = bptt_jax.GRU(3).init(jax.random.key(0), 2)
    hs, _ = jitted(bptt_jax.GRU(3), p, jnp.ones((4, 1, 2), jnp.float32))
    chex.assert_shape(hs, (4, 1, 3))


@pytest.mark.parametrize("init", ["uniform", "orthogonal"])
@pytest.mark.parametrize("cls,blocks", [(bptt_jax.Elman, 1), (bptt_jax.LSTM, 4), (bptt_jax.GRU, 3)])
def test_init_schemes(cls, blocks, init):
    h, d = 8, 5
    p = cls(h, init_scheme=init).init(jax.random.key(3), d)
    w_h = p[1]
    chex.assert_shape(p[0], (d, blocks * h))
    chex.assert_shape(w_h, (h, blocks * h))
    if init == "uniform":
        assert float(jnp.max(jnp.abs(w_h))) <= 1 / np.sqrt(h)
    else:
        for k in range(blocks):  # each recurrent block is orthogonal
            blk = w_h[:, k * h : (k + 1) * h]
            np.testing.assert_allclose(blk.T @ blk, np.eye(h), atol=1e-5)
    # deterministic given the key, different for another key
    chex.assert_trees_all_equal(p, cls(h, init_scheme=init).init(jax.random.key(3), d))
    assert not np.allclose(p[0], cls(h, init_scheme=init).init(jax.random.key(4), d)[0])


def test_lstm_forget_bias_shifts_only_the_forget_gate(key):
    p = bptt_jax.LSTM(4).init(key, 3)
    xs = jax.random.normal(key, (2, 1, 3), jnp.float32)
    _, c0 = bptt_jax.unroll(bptt_jax.LSTM(4), p, xs)
    b = p.b.at[4:8].add(1.5)
    _, c1 = bptt_jax.unroll(bptt_jax.LSTM(4, forget_bias=1.5), p, xs)
    _, c2 = bptt_jax.unroll(bptt_jax.LSTM(4), p._replace(b=b), xs)
    chex.assert_trees_all_close(c1, c2, rtol=1e-6)
    assert not np.allclose(c0.c, c1.c)


def test_sequence_loss_values_match_hand_computation(key):
    """mean = sum over valid tokens / number of valid tokens; sum = the plain sum."""
    cell = bptt_jax.Elman(4)
    p, ro, xs, tg, c0, m = ref.problem(cell, key, jnp.float64, t=6, b=3)
    hs, _ = bptt_jax.unroll(cell, p, xs, c0, mask=m)
    logits = np.asarray(hs @ ro.w_hy + ro.b_y)
    lse = np.log(np.exp(logits).sum(-1))
    per = lse - np.take_along_axis(logits, np.asarray(tg)[..., None], -1)[..., 0]
    mm = np.asarray(m, float)
    s = bptt_jax.sequence_loss(cell, p, ro, xs, tg, c0, mask=m, reduction="sum")
    mean = bptt_jax.sequence_loss(cell, p, ro, xs, tg, c0, mask=m, reduction="mean")
    np.testing.assert_allclose(s, (per * mm).sum(), rtol=1e-12)
    np.testing.assert_allclose(mean, (per * mm).sum() / mm.sum(), rtol=1e-12)


def test_xent_is_stable_for_huge_logits(key):
    cell = bptt_jax.Elman(4)
    p, ro, xs, tg, _, _ = ref.problem(cell, key, jnp.float32, t=3)
    ro = ro._replace(w_hy=ro.w_hy * 1e4)
    v, g = jax.jit(jax.value_and_grad(lambda ro: bptt_jax.sequence_loss(cell, p, ro, xs, tg)))(ro)
    assert jnp.isfinite(v) and all(jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(g))


def test_return_carry_and_its_gradient(key):
    """return_carry gives the final carry, and a cotangent on it reaches the params."""
    cell = bptt_jax.LSTM(5)
    p, ro, xs, tg, c0, m = ref.problem(cell, key, jnp.float64)

    def f(impl_loss, p):
        v, c = impl_loss(p)
        return v + jnp.sum(c.h**2) + jnp.sum(jnp.sin(c.c))

    manual = jax.jit(
        jax.grad(
            lambda p: f(
                lambda p: bptt_jax.sequence_loss(
                    cell, p, ro, xs, tg, c0, mask=m, return_carry=True
                ),
                p,
            )
        )
    )(p)

    def refl(p):
        hs, c = ref.scan_unroll(cell, p, xs, c0, m)
        return ref.scan_loss(cell, p, ro, xs, tg, c0, m), c

    ref.assert_trees_close(manual, jax.jit(jax.grad(lambda p: f(refl, p)))(p), jnp.float64)


def test_out_of_range_target_inside_jit_is_nan_not_a_number(key):
    cell = bptt_jax.Elman(4)
    p, ro, xs, tg, c0, _ = ref.problem(cell, key, jnp.float32)
    bad = tg.at[2, 1].set(99)
    v = jax.jit(lambda tg: bptt_jax.sequence_loss(cell, p, ro, xs, tg, c0))(bad)
    assert jnp.isnan(v)
    assert jnp.isfinite(jax.jit(lambda tg: bptt_jax.sequence_loss(cell, p, ro, xs, tg, c0))(tg))
