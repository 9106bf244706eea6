"""The hand-written BPTT equals autodiff of a plain lax.scan, on random everything."""

import itertools

import jax
import jax.numpy as jnp
import pytest

import bptt_jax
from bptt_jax import engine, losses
from tests import reference as ref

DTYPES = [jnp.float64, jnp.float32]
DT_IDS = ["f64", "f32"]


def _grid():
    """Every cell x dtype x mask x carry x loss x reduction x jit. The default run keeps one
    (mask, carry, jit) setting per cell x dtype x loss x reduction, rotating through all
    eight so each value meets every cell; the rest is marked slow (``pytest -m slow``)."""
    settings = list(itertools.product([True, False], [True, False], [True, False]))
    for i, (name, dtype, loss, red) in enumerate(
        itertools.product(ref.CELLS, DTYPES, ["xent", "mse"], ["sum", "mean"])
    ):
        for j, (mask, rc, jit) in enumerate(settings):
            fast = j == (i + i // len(settings)) % len(settings)
            yield pytest.param(
                name,
                dtype,
                mask,
                rc,
                loss,
                red,
                jit,
                id=f"{name}-{jnp.dtype(dtype).name}-{'mask' if mask else 'nomask'}-"
                f"{'randcarry' if rc else 'zerocarry'}-{loss}-{red}-{'jit' if jit else 'nojit'}",
                marks=() if fast else pytest.mark.slow,
            )


@pytest.mark.parametrize("name,dtype,mask,random_carry,loss,reduction,jit", list(_grid()))
def test_sequence_loss_grads_match_autodiff(
    name, dtype, mask, random_carry, loss, reduction, jit, key
):
    cell = ref.CELLS[name]
    p, ro, xs, tg, c0, m = ref.problem(
        cell, key, dtype, mask=mask, random_carry=random_carry, loss=loss
    )
    argnums = (0, 1, 2, 3, 4) if loss == "mse" else (0, 1, 2, 4)

    def manual(p, ro, xs, tg, c0):
        return bptt_jax.sequence_loss(
            cell, p, ro, xs, tg, c0, mask=m, loss=loss, reduction=reduction
        )

    def reference(p, ro, xs, tg, c0):
        return ref.scan_loss(cell, p, ro, xs, tg, c0, m, loss, reduction)

    wrap = jax.jit if jit else (lambda f: f)
    value_m, grads_m = wrap(jax.value_and_grad(manual, argnums))(p, ro, xs, tg, c0)
    value_r, grads_r = jax.value_and_grad(reference, argnums)(p, ro, xs, tg, c0)
    assert value_m.dtype == jnp.dtype(dtype)
    assert ref.rel_err(value_m, value_r) <= ref.TOL[dtype]
    ref.assert_trees_close(grads_m, grads_r, dtype)
    assert isinstance(grads_m[0], type(p))  # the params' own type: straight into optax


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("mask", [True, False], ids=["mask", "nomask"])
@pytest.mark.parametrize("truncate", [None, 3], ids=["full", "trunc3"])
@pytest.mark.parametrize("name", list(ref.CELLS))
def test_unroll_vjp_matches_autodiff_under_random_cotangents(name, truncate, mask, dtype, key):
    """jax.vjp through unroll with random cotangents on hs and on every carry_T leaf."""
    cell = ref.CELLS[name]
    p, _, xs, _, c0, m = ref.problem(cell, key, dtype, t=8, mask=mask)
    k1, k2 = jax.random.split(jax.random.fold_in(key, 1))
    f_m = lambda p, xs, c0: bptt_jax.unroll(cell, p, xs, c0, mask=m, truncate=truncate)  # noqa: E731
    f_r = lambda p, xs, c0: ref.scan_unroll(cell, p, xs, c0, m, truncate)  # noqa: E731
    out_m, vjp_m = jax.vjp(f_m, p, xs, c0)
    out_r, vjp_r = jax.vjp(f_r, p, xs, c0)
    ref.assert_trees_close(out_m, out_r, dtype)
    ct_leaves, ct_def = jax.tree.flatten(out_r)
    ks = jax.random.split(k1, len(ct_leaves))
    ct = jax.tree.unflatten(
        ct_def, [jax.random.normal(k, x.shape, dtype) for k, x in zip(ks, ct_leaves)]
    )
    ref.assert_trees_close(vjp_m(ct), vjp_r(ct), dtype)
    # A cotangent on the final carry alone (hs unused) must also flow back correctly.
    ct_carry_only = (jnp.zeros_like(ct[0]), ct[1])
    ref.assert_trees_close(vjp_m(ct_carry_only), vjp_r(ct_carry_only), dtype)


@pytest.mark.parametrize("name", list(ref.CELLS))
def test_grads_match_finite_differences_in_float64(name, key):
    """Central differences along random directions, one argument leaf at a time."""
    cell = ref.CELLS[name]
    p, ro, xs, tg, c0, m = ref.problem(cell, key, jnp.float64, loss="mse")
    f = jax.jit(
        lambda p, ro, xs, tg, c0: bptt_jax.sequence_loss(
            cell, p, ro, xs, tg, c0, mask=m, loss="mse"
        )
    )
    args = (p, ro, xs, tg, c0)
    grads = jax.grad(f, argnums=(0, 1, 2, 3, 4))(*args)
    eps = 1e-6
    for i in range(5):
        leaves, tdef = jax.tree.flatten(args[i])
        for j, (leaf, g) in enumerate(zip(leaves, jax.tree.leaves(grads[i]))):
            v = jax.random.normal(jax.random.fold_in(key, 10 * i + j), leaf.shape, leaf.dtype)

            def moved(s, leaves=leaves, j=j, v=v, i=i, tdef=tdef):
                new = list(leaves)
                new[j] = leaves[j] + s * eps * v
                a = list(args)
                a[i] = jax.tree.unflatten(tdef, new)
                return f(*a)

            fd = (moved(1.0) - moved(-1.0)) / (2 * eps)
            an = jnp.vdot(g, v)
            # O(eps^2) truncation + O(1e-16/eps) round-off: 1e-6 relative is ample.
            assert abs(fd - an) <= 1e-6 * max(abs(an), 1e-8), (i, j, float(fd), float(an))


@pytest.mark.parametrize("name", list(ref.CELLS))
@pytest.mark.parametrize("truncate", [1, 2, 3, 7, 8, 50])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_truncated_grads_match_stop_gradient_reference(name, truncate, dtype, key):
    """truncate=k equals stop_gradient on the carry entering steps k, 2k, ... (T=8)."""
    cell = ref.CELLS[name]
    p, ro, xs, tg, c0, m = ref.problem(cell, key, dtype, t=8)
    manual = jax.grad(
        lambda *a: bptt_jax.sequence_loss(cell, *a, mask=m, truncate=truncate), argnums=(0, 1, 2, 4)
    )
    reference = jax.grad(
        lambda *a: ref.scan_loss(cell, *a, mask=m, truncate=truncate), argnums=(0, 1, 2, 4)
    )
    ref.assert_trees_close(manual(p, ro, xs, tg, c0), reference(p, ro, xs, tg, c0), dtype)


@pytest.mark.parametrize("name", list(ref.CELLS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("loss", ["xent", "mse"])
@pytest.mark.parametrize("group", [1, 2, 3], ids=["group1", "group2", "group3"])
def test_truncated_loss_with_final_carry_cotangent_matches_reference(
    name, dtype, loss, group, key, monkeypatch
):
    """The chunk-by-chunk truncated path: the error on carry_T enters the last chunk only;
    T=10 with k=4 leaves a short last chunk; resets and a loss mask are random too. The 3
    chunks go through the batched reverse scan 1, 2 (the second group padded) or 3 at once."""
    monkeypatch.setattr(engine, "chunk_group", lambda *args: group)
    cell = ref.CELLS[name]
    k1, k2, k3, k4 = jax.random.split(key, 4)
    p, ro, xs, tg, c0, m = ref.problem(cell, k1, dtype, t=10, loss=loss)
    r = jax.random.bernoulli(k2, 0.15, xs.shape[:2])
    lm = jax.random.bernoulli(k3, 0.7, xs.shape[:2])
    w = jax.tree.map(lambda c: jax.random.normal(k4, c.shape, c.dtype), c0)
    argnums = (0, 1, 2, 3, 4) if loss == "mse" else (0, 1, 2, 4)

    def manual(p, ro, xs, tg, c0):
        v, c = bptt_jax.sequence_loss(
            cell, p, ro, xs, tg, c0, mask=m, loss_mask=lm, resets=r, truncate=4, loss=loss,
            return_carry=True,
        )  # fmt: skip
        return v + sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(c), jax.tree.leaves(w)))

    def reference(p, ro, xs, tg, c0):
        v = ref.scan_loss(cell, p, ro, xs, tg, c0, m, loss, "mean", 4, loss_mask=lm, resets=r)
        _, c = ref.scan_unroll(cell, p, xs, c0, m, 4, r)
        return v + sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(c), jax.tree.leaves(w)))

    v_m, g_m = jax.jit(jax.value_and_grad(manual, argnums))(p, ro, xs, tg, c0)
    v_r, g_r = jax.value_and_grad(reference, argnums)(p, ro, xs, tg, c0)
    assert ref.rel_err(v_m, v_r) <= ref.TOL[dtype]
    ref.assert_trees_close(g_m, g_r, dtype)


@pytest.mark.parametrize("name", list(ref.CELLS))
def test_truncate_at_least_T_is_full_bptt(name, key):
    cell = ref.CELLS[name]
    p, ro, xs, tg, c0, m = ref.problem(cell, key, jnp.float64, t=6)
    g = lambda tr: jax.grad(  # noqa: E731
        lambda *a: bptt_jax.sequence_loss(cell, *a, mask=m, truncate=tr), argnums=(0, 4)
    )(p, ro, xs, tg, c0)
    full = g(None)
    for tr in (6, 7, 100):
        ref.assert_trees_close(g(tr), full, jnp.float64)
    # ...and a real truncation is different (the test above can fail).
    assert ref.rel_err(g(2)[0][0], full[0][0]) > 1e-6


@pytest.mark.parametrize("name", list(ref.CELLS))
def test_backward_autodiff_flag_is_the_reference(name, key):
    """backward='autodiff' gives the same loss and (autodiff) gradients as the manual path."""
    cell = ref.CELLS[name]
    p, ro, xs, tg, c0, m = ref.problem(cell, key, jnp.float64)
    f = lambda bk: jax.value_and_grad(  # noqa: E731
        lambda *a: bptt_jax.sequence_loss(cell, *a, mask=m, backward=bk), argnums=(0, 1, 2, 4)
    )(p, ro, xs, tg, c0)
    (vm, gm), (va, ga) = f("manual"), f("autodiff")
    assert ref.rel_err(vm, va) <= 1e-12
    ref.assert_trees_close(gm, ga, jnp.float64)
    ref.assert_trees_close(
        ga,
        jax.grad(lambda *a: ref.scan_loss(cell, *a, mask=m), argnums=(0, 1, 2, 4))(
            p, ro, xs, tg, c0
        ),
        jnp.float64,
    )


@pytest.mark.parametrize("name", list(ref.CELLS))
def test_grads_under_vmap_match_per_example(name, key):
    """vmap over a leading axis of independent problems equals a Python loop over them."""
    cell = ref.CELLS[name]
    probs = [ref.problem(cell, jax.random.fold_in(key, i), jnp.float64) for i in range(3)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *[pr[:5] for pr in probs])
    m = probs[0][5]
    g = jax.grad(lambda *a: bptt_jax.sequence_loss(cell, *a, mask=m), argnums=(0, 1, 2, 4))
    batched = jax.vmap(g)(*stacked)
    for i, pr in enumerate(probs):
        ref.assert_trees_close(jax.tree.map(lambda a: a[i], batched), g(*pr[:5]), jnp.float64)


@pytest.mark.parametrize("name", list(ref.CELLS))
@pytest.mark.parametrize("t,b", [(1, 1), (1, 4), (5, 1)])
def test_tiny_shapes(name, t, b, key):
    cell = ref.CELLS[name]
    p, ro, xs, tg, c0, m = ref.problem(cell, key, jnp.float64, t=t, b=b)
    gm = jax.grad(lambda *a: bptt_jax.sequence_loss(cell, *a, mask=m), argnums=(0, 1, 2, 4))
    gr = jax.grad(lambda *a: ref.scan_loss(cell, *a, mask=m), argnums=(0, 1, 2, 4))
    ref.assert_trees_close(gm(p, ro, xs, tg, c0), gr(p, ro, xs, tg, c0), jnp.float64)


def test_grads_inside_user_jit_with_other_ops(key):
    """unroll inside a user's own jitted loss with extra ops around it."""
    cell = bptt_jax.LSTM(5)
    p, _, xs, _, c0, m = ref.problem(cell, key, jnp.float32)

    def loss(impl, p, xs):
        hs, c = impl(p, jnp.tanh(xs) * 2.0)
        return jnp.mean(jnp.cumsum(hs, axis=0) ** 2) + jnp.sum(c.c * c.h)

    manual = jax.jit(
        jax.grad(
            lambda p, xs: loss(lambda p, x: bptt_jax.unroll(cell, p, x, c0, mask=m), p, xs),
            argnums=(0, 1),
        )
    )
    refg = jax.grad(
        lambda p, xs: loss(lambda p, x: ref.scan_unroll(cell, p, x, c0, m), p, xs), argnums=(0, 1)
    )
    ref.assert_trees_close(manual(p, xs), refg(p, xs), jnp.float32)
