"""The hand-written BPTT equals autodiff of a plain lax.scan, on random everything.

Problems are drawn with numpy (``ref.draw``: nothing to compile) and the references are the
compiled ones of ``tests/reference.py`` (``ref.loss_grads``, ``ref.unroll_vjp``): one compile
per cell, loss and reduction serves every test of that shape, whatever its mask, resets,
truncation or clipping. The default run meets every cell on every path; ``-m slow`` adds the
rest of each grid.
"""

import itertools
from functools import cache

import jax
import jax.numpy as jnp
import pytest

import bptt_jax
from bptt_jax import verify
from bptt_jax._engine import memory
from tests import reference as ref

DTYPES = [jnp.float64, jnp.float32]
DT_IDS = ["f64", "f32"]


def _dt(dtype):
    return jnp.dtype(dtype).name


def _grid():
    """Every cell x dtype x mask x carry x loss x reduction x jit. The default run keeps one
    dtype per cell x loss x reduction (alternating, so each cell meets both dtypes and each
    loss x reduction both dtypes across the cells) and one (mask, carry, jit) setting each,
    rotating through all eight so each value meets every cell; the rest is marked slow
    (``pytest -m slow``)."""
    settings = list(itertools.product([True, False], [True, False], [True, False]))
    for i, (name, dtype, loss, red) in enumerate(
        itertools.product(ref.CELLS, DTYPES, ["xent", "mse"], ["sum", "mean"])
    ):
        cell, dt, li, ri = i // 8, (i // 4) % 2, (i // 2) % 2, i % 2
        for j, (mask, rc, jit) in enumerate(settings):
            fast = j == (i + i // len(settings)) % len(settings) and dt == (cell + li + ri) % 2
            yield pytest.param(
                name,
                dtype,
                mask,
                rc,
                loss,
                red,
                jit,
                id=f"{name}-{_dt(dtype)}-{'mask' if mask else 'nomask'}-"
                f"{'randcarry' if rc else 'zerocarry'}-{loss}-{red}-{'jit' if jit else 'nojit'}",
                marks=() if fast else pytest.mark.slow,
            )


def _argnums(loss):
    return (0, 1, 2, 3, 4) if loss == "mse" else (0, 1, 2, 4)


@pytest.mark.parametrize("name,dtype,mask,random_carry,loss,reduction,jit", list(_grid()))
def test_sequence_loss_grads_match_autodiff(
    name, dtype, mask, random_carry, loss, reduction, jit, rng
):
    cell = ref.CELLS[name]
    p, ro, xs, tg, c0, m = ref.draw(
        cell, rng, dtype, mask=mask, random_carry=random_carry, loss=loss
    )
    argnums = _argnums(loss)

    def manual(p, ro, xs, tg, c0):
        return bptt_jax.sequence_loss(
            cell, p, ro, xs, tg, c0, mask=m, loss=loss, reduction=reduction
        )

    wrap = jax.jit if jit else (lambda f: f)
    value_m, grads_m = wrap(jax.value_and_grad(manual, argnums))(p, ro, xs, tg, c0)
    value_r, _, grads_r = ref.loss_grads(
        cell, p, ro, xs, tg, c0, mask=m, loss=loss, reduction=reduction, argnums=argnums
    )
    assert value_m.dtype == jnp.dtype(dtype)
    assert ref.rel_err(value_m, value_r) <= ref.TOL[dtype]
    ref.assert_trees_close(grads_m, grads_r, dtype)
    assert isinstance(grads_m[0], type(p))  # the params' own type: straight into optax


# ------------------------------------------------------------------------------ unroll
#: unroll's options: truncation (k=3 at T=10: a short last chunk), resets, per-step clipping
#: (a threshold far below the errors of N(0, 1) cotangents: every step clips), and together.
UNROLL_OPTIONS = {
    "full": {},
    "trunc3": {"truncate": 3},
    "resets": {"resets": 0.2},
    "clip": {"delta_clip": 0.3},
    "trunc3-resets": {"truncate": 3, "resets": 0.2},
    "trunc3-clip": {"truncate": 3, "delta_clip": 0.3},
    "trunc3-resets-clip": {"truncate": 3, "resets": 0.2, "delta_clip": 0.3},
}


def _unroll_grid():
    """Every cell x options x mask x dtype; the default run keeps one (mask, dtype) per cell
    x options, rotating so every cell meets both masks and both dtypes."""
    settings = list(itertools.product([True, False], DTYPES))
    for c, name in enumerate(ref.CELLS):
        for o, opt in enumerate(UNROLL_OPTIONS):
            for j, (mask, dtype) in enumerate(settings):
                fast = j == (c + o) % len(settings)
                yield pytest.param(
                    name,
                    opt,
                    mask,
                    dtype,
                    id=f"{name}-{opt}-{'mask' if mask else 'nomask'}-{_dt(dtype)}",
                    marks=() if fast else pytest.mark.slow,
                )


@cache
def _unroll_vjp(cell, truncate, delta_clip, backward="manual", segment=None):
    """The library's unroll and its VJP, compiled once per cell and static options (the
    mask and resets are arguments)."""

    def run(p, xs, c0, ct, mask, resets):
        f = lambda p, xs, c0: bptt_jax.unroll(  # noqa: E731
            cell, p, xs, c0, mask=mask, resets=resets, truncate=truncate,
            delta_clip=delta_clip, backward=backward, segment=segment,
        )  # fmt: skip
        out, vjp = jax.vjp(f, p, xs, c0)
        return out, vjp(ct)

    return jax.jit(run)


def unroll_case(cell, rng, dtype, mask, options):
    """A random problem for unroll with ``options`` drawn: ``(p, xs, c0, m, r, kw)``."""
    p, _, xs, _, c0, m = ref.draw(cell, rng, dtype, mask=mask)
    r = ref.flags(rng, xs.shape[:2], options["resets"]) if "resets" in options else None
    kw = {k: options[k] for k in ("truncate", "delta_clip") if k in options}
    return p, xs, c0, m, r, kw


@pytest.mark.parametrize("name,options,mask,dtype", list(_unroll_grid()))
def test_unroll_vjp_matches_autodiff_under_random_cotangents(name, options, mask, dtype, rng):
    """jax.vjp through unroll with random cotangents on hs and on every carry_T leaf (each
    drawn on its own), then on carry_T alone (hs unused)."""
    cell = ref.CELLS[name]
    p, xs, c0, m, r, kw = unroll_case(cell, rng, dtype, mask, UNROLL_OPTIONS[options])
    lib = _unroll_vjp(cell, kw.get("truncate"), kw.get("delta_clip"))
    ct = ref.normal_like(rng, (jnp.zeros((*xs.shape[:2], cell.hidden_size), dtype), c0))
    ct_carry_only = (jnp.zeros_like(ct[0]), ct[1])
    for cot in (ct, ct_carry_only):
        out_r, grads_r = ref.unroll_vjp(cell, p, xs, c0, cot, mask=m, resets=r, **kw)
        out_m, grads_m = lib(p, xs, c0, cot, m, r)
        ref.assert_trees_close(out_m, out_r, dtype)
        ref.assert_trees_close(grads_m, grads_r, dtype)
    if r is not None or kw:  # the options change the gradients: the check above can fail
        _, plain = ref.unroll_vjp(cell, p, xs, c0, ct, mask=m)
        _, with_options = ref.unroll_vjp(cell, p, xs, c0, ct, mask=m, resets=r, **kw)
        assert max_rel_err(with_options, plain) > 1e-3


def max_rel_err(a, b):
    return max(ref.rel_err(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("name", list(ref.CELLS))
def test_unroll_backward_autodiff_flag_matches_the_reference(name, rng):
    """unroll(backward="autodiff") (the library's plain lax.scan, its clipping a custom rule
    of its own) with truncation, resets and clipping together, against the reference."""
    cell = ref.CELLS[name]
    options = UNROLL_OPTIONS["trunc3-resets-clip"]
    p, xs, c0, m, r, kw = unroll_case(cell, rng, jnp.float64, True, options)
    lib = _unroll_vjp(cell, kw["truncate"], kw["delta_clip"], backward="autodiff")
    ct = ref.normal_like(rng, (jnp.zeros((*xs.shape[:2], cell.hidden_size)), c0))
    out_a, grads_a = lib(p, xs, c0, ct, m, r)
    out_r, grads_r = ref.unroll_vjp(cell, p, xs, c0, ct, mask=m, resets=r, **kw)
    ref.assert_trees_close(out_a, out_r, jnp.float64)
    ref.assert_trees_close(grads_a, grads_r, jnp.float64)


@pytest.mark.parametrize("name", list(ref.CELLS))
def test_grads_match_finite_differences_in_float64(name, rng):
    """Central differences along random directions, one argument leaf at a time."""
    cell = ref.CELLS[name]
    p, ro, xs, tg, c0, m = ref.draw(cell, rng, jnp.float64, loss="mse")
    f = jax.jit(
        lambda p, ro, xs, tg, c0: bptt_jax.sequence_loss(
            cell, p, ro, xs, tg, c0, mask=m, loss="mse"
        )
    )
    args = (p, ro, xs, tg, c0)
    grads = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4)))(*args)
    eps = verify.FD_EPS
    for i in range(5):
        leaves, tdef = jax.tree.flatten(args[i])
        for j, (leaf, g) in enumerate(zip(leaves, jax.tree.leaves(grads[i]))):
            v = jnp.asarray(rng.standard_normal(leaf.shape), leaf.dtype)

            def moved(s, leaves=leaves, j=j, v=v, i=i, tdef=tdef):
                new = list(leaves)
                new[j] = leaves[j] + s * eps * v
                a = list(args)
                a[i] = jax.tree.unflatten(tdef, new)
                return f(*a)

            fd = (moved(1.0) - moved(-1.0)) / (2 * eps)
            an = jnp.vdot(g, v)
            # O(eps^2) truncation + O(1e-16/eps) round-off (verify.FD_TOLERANCE's note),
            # relative to the directional derivative's scale ||g||, as check_gradients does.
            scale = max(abs(an), jnp.linalg.norm(g), 1e-8)
            assert abs(fd - an) <= verify.FD_TOLERANCE * scale, (i, j, float(fd), float(an))


# ------------------------------------------------------------------------------ truncation
T = 10  # ref.draw's sequence length


def _truncate_grid():
    """truncate=k < T: every step cut (1), chunks of 2, a short last chunk (3, 4), a one-step
    last chunk (9). The default run keeps half of cell x k (each k with three cells, each
    cell with two or three k, alternating), in one dtype, rotating dtype, mask and
    reduction over the kept ones; the rest is slow."""
    ks = [1, 2, 3, 4, 9]
    n = 0  # kept so far
    for i, (name, k) in enumerate(itertools.product(ref.CELLS, ks)):
        keep = (i // len(ks) + i % len(ks)) % 2 == 0
        mask, red = (n // 2) % 2 == 0, ("mean", "sum")[(n // 4) % 2]
        for j, dtype in enumerate(DTYPES):
            yield pytest.param(
                name,
                k,
                dtype,
                mask,
                red,
                id=f"{name}-k{k}-{_dt(dtype)}-{'mask' if mask else 'nomask'}-{red}",
                marks=() if keep and j == n % 2 else pytest.mark.slow,
            )
        n += keep


@pytest.mark.parametrize("name,truncate,dtype,mask,reduction", list(_truncate_grid()))
def test_truncated_grads_match_stop_gradient_reference(name, truncate, dtype, mask, reduction, rng):
    """truncate=k < T equals stop_gradient on the carry entering steps k, 2k, ... (T=10):
    the chunked path, with and without a mask, summed or averaged."""
    cell = ref.CELLS[name]
    p, ro, xs, tg, c0, m = ref.draw(cell, rng, dtype, mask=mask)
    opts = dict(mask=m, reduction=reduction)
    manual = jax.jit(
        jax.value_and_grad(
            lambda *a: bptt_jax.sequence_loss(cell, *a, truncate=truncate, **opts),
            argnums=(0, 1, 2, 4),
        )
    )
    v_m, g_m = manual(p, ro, xs, tg, c0)
    v_r, _, g_r = ref.loss_grads(cell, p, ro, xs, tg, c0, truncate=truncate, **opts)
    assert ref.rel_err(v_m, v_r) <= ref.TOL[dtype]
    ref.assert_trees_close(g_m, g_r, dtype)
    _, _, g_full = ref.loss_grads(cell, p, ro, xs, tg, c0, **opts)
    assert ref.rel_err(g_r[0][1], g_full[0][1]) > 1e-6  # the truncation did cut


def _final_carry_grid():
    """Every cell x dtype x loss x chunk group; the default run keeps half of cell x group
    (the chunked path's batched reverse scan; each group with three cells) in one dtype and
    loss, rotating dtype, loss, mask and reduction over the kept ones."""
    settings = list(itertools.product(DTYPES, ["xent", "mse"]))
    n = 0  # kept so far
    for i, (name, group) in enumerate(itertools.product(ref.CELLS, [1, 2, 3])):
        keep = (i // 3 + group) % 2 == 0
        mask, red = [(True, "mean"), (False, "sum"), (True, "sum"), (False, "mean")][n % 4]
        for j, (dtype, loss) in enumerate(settings):
            yield pytest.param(
                name,
                dtype,
                loss,
                group,
                mask,
                red,
                id=f"{name}-{_dt(dtype)}-{loss}-group{group}-{'mask' if mask else 'nomask'}-{red}",
                marks=() if keep and j == (n + n // 4) % len(settings) else pytest.mark.slow,
            )
        n += keep


@pytest.mark.parametrize("name,dtype,loss,group,mask,reduction", list(_final_carry_grid()))
def test_truncated_loss_with_final_carry_cotangent_matches_reference(
    name, dtype, loss, group, mask, reduction, rng, monkeypatch
):
    """The chunk-by-chunk truncated path: the error on carry_T enters the last chunk only;
    T=10 with k=4 leaves a short last chunk; resets and a loss mask are random too. The 3
    chunks go through the batched reverse scan 1, 2 (the second group padded) or 3 at once."""
    monkeypatch.setattr(memory, "chunk_group", lambda *args: group)
    cell = ref.CELLS[name]
    p, ro, xs, tg, c0, m = ref.draw(cell, rng, dtype, loss=loss, mask=mask)
    r = ref.flags(rng, xs.shape[:2], 0.15)
    lm = ref.flags(rng, xs.shape[:2], 0.7)
    w = ref.normal_like(rng, c0)  # h and c drawn on their own: a swap shows
    argnums = _argnums(loss)
    opts = dict(mask=m, loss_mask=lm, resets=r, truncate=4, loss=loss, reduction=reduction)

    def manual(p, ro, xs, tg, c0):
        v, c = bptt_jax.sequence_loss(cell, p, ro, xs, tg, c0, return_carry=True, **opts)
        return v + sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(c), jax.tree.leaves(w)))

    v_m, g_m = jax.jit(jax.value_and_grad(manual, argnums))(p, ro, xs, tg, c0)
    v_r, c_r, g_r = ref.loss_grads(cell, p, ro, xs, tg, c0, carry_ct=w, argnums=argnums, **opts)
    v_r = v_r + sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(c_r), jax.tree.leaves(w)))
    assert ref.rel_err(v_m, v_r) <= ref.TOL[dtype]
    ref.assert_trees_close(g_m, g_r, dtype)


@pytest.mark.parametrize("name", list(ref.CELLS))
def test_truncate_at_least_T_is_full_bptt(name, rng):
    """truncate=T and truncate > T (no chunk boundary inside the sequence) give the full
    BPTT gradients of the reference."""
    cell = ref.CELLS[name]
    p, ro, xs, tg, c0, m = ref.draw(cell, rng, jnp.float64)
    _, _, full = ref.loss_grads(cell, p, ro, xs, tg, c0, mask=m)
    for tr in (T, 100):
        g = jax.jit(
            jax.grad(
                lambda *a: bptt_jax.sequence_loss(cell, *a, mask=m, truncate=tr),
                argnums=(0, 1, 2, 4),
            )
        )(p, ro, xs, tg, c0)
        ref.assert_trees_close(g, full, jnp.float64)
    # ...and a real truncation is different (the test above can fail).
    _, _, cut = ref.loss_grads(cell, p, ro, xs, tg, c0, mask=m, truncate=2)
    assert ref.rel_err(cut[0][0], full[0][0]) > 1e-6


@pytest.mark.parametrize("name", list(ref.CELLS))
def test_backward_autodiff_flag_matches_the_reference(name, rng):
    """backward='autodiff' (the library's plain lax.scan, differentiated by JAX) gives the
    reference's loss and gradients."""
    cell = ref.CELLS[name]
    p, ro, xs, tg, c0, m = ref.draw(cell, rng, jnp.float64)
    va, ga = jax.jit(
        jax.value_and_grad(
            lambda *a: bptt_jax.sequence_loss(cell, *a, mask=m, backward="autodiff"),
            argnums=(0, 1, 2, 4),
        )
    )(p, ro, xs, tg, c0)
    vr, _, gr = ref.loss_grads(cell, p, ro, xs, tg, c0, mask=m)
    assert ref.rel_err(va, vr) <= ref.TOL[jnp.float64]
    ref.assert_trees_close(ga, gr, jnp.float64)


@pytest.mark.parametrize("name", list(ref.CELLS))
def test_grads_under_vmap_match_the_reference_per_example(name, rng):
    """vmap over a leading axis of independent problems equals the reference on each."""
    cell = ref.CELLS[name]
    probs = [ref.draw(cell, rng, jnp.float64) for _ in range(3)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *[pr[:5] for pr in probs])
    m = probs[0][5]
    g = jax.grad(lambda *a: bptt_jax.sequence_loss(cell, *a, mask=m), argnums=(0, 1, 2, 4))
    batched = jax.jit(jax.vmap(g))(*stacked)
    for i, pr in enumerate(probs):
        _, _, g_r = ref.loss_grads(cell, *pr[:5], mask=m)
        ref.assert_trees_close(jax.tree.map(lambda a: a[i], batched), g_r, jnp.float64)


@pytest.mark.parametrize(
    "name,t,b",
    [
        pytest.param(name, t, b, id=f"{name}-{t}-{b}", marks=() if i % 3 == j else pytest.mark.slow)
        for i, name in enumerate(ref.CELLS)
        for j, (t, b) in enumerate([(1, 1), (1, 4), (5, 1)])
    ],
)
def test_tiny_shapes(name, t, b, rng):
    """T=1 and B=1; the default run gives each cell one of the shapes, in turn."""
    cell = ref.CELLS[name]
    p, ro, xs, tg, c0, m = ref.draw(cell, rng, jnp.float64, t=t, b=b)
    gm = jax.jit(
        jax.grad(lambda *a: bptt_jax.sequence_loss(cell, *a, mask=m), argnums=(0, 1, 2, 4))
    )
    _, _, gr = ref.loss_grads(cell, p, ro, xs, tg, c0, mask=m)
    ref.assert_trees_close(gm(p, ro, xs, tg, c0), gr, jnp.float64)


def test_grads_inside_user_jit_with_other_ops(rng):
    """unroll inside a user's own jitted loss with extra ops around it."""
    cell = bptt_jax.LSTM(5)
    p, _, xs, _, c0, m = ref.draw(cell, rng, jnp.float32)

    def loss(impl, p, xs):
        hs, c = impl(p, jnp.tanh(xs) * 2.0)
        return jnp.mean(jnp.cumsum(hs, axis=0) ** 2) + jnp.sum(c.c * c.h)

    manual = jax.jit(
        jax.grad(
            lambda p, xs: loss(lambda p, x: bptt_jax.unroll(cell, p, x, c0, mask=m), p, xs),
            argnums=(0, 1),
        )
    )
    refg = jax.jit(
        jax.grad(
            lambda p, xs: loss(lambda p, x: ref.scan_unroll(cell, p, x, c0, m), p, xs),
            argnums=(0, 1),
        )
    )
    ref.assert_trees_close(manual(p, xs), refg(p, xs), jnp.float32)
