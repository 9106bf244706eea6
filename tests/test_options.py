"""Stream resets, loss masks, per-step error clipping and ``loss_and_grads``.

Each is checked against the independent plain-scan reference in ``tests/reference.py`` on
random params, inputs, targets, initial carries, masks, resets and cotangents. (unroll with
resets and clipping: ``test_gradients.py``'s unroll grid.)
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bptt_jax
from bptt_jax._engine import bundles, options
from bptt_jax.losses import loss_and_grads
from tests import reference as ref


def _rotating(axes, fast_per_cell=1):
    """Every cell x the product of ``axes`` (dicts of id -> value); the default run keeps
    ``fast_per_cell`` combinations per cell, in turn, so every value meets several cells;
    the rest is marked slow."""
    combos = list(itertools.product(*[list(a.items()) for a in axes]))
    for i, name in enumerate(ref.CELLS):
        fast = {(i * fast_per_cell + j) % len(combos) for j in range(fast_per_cell)}
        for j, combo in enumerate(combos):
            yield pytest.param(
                name,
                *[v for _, v in combo],
                id="-".join([name, *[k for k, _ in combo]]),
                marks=() if j in fast else pytest.mark.slow,
            )


def _argnums(loss):
    return (0, 1, 2, 3, 4) if loss == "mse" else (0, 1, 2, 4)


@pytest.mark.parametrize(
    "name,dtype,masked",
    list(_rotating([{"f64": jnp.float64, "f32": jnp.float32}, {"mask": True, "nomask": False}], 1)),
)
def test_sequence_loss_with_resets_matches_autodiff(name, dtype, masked, rng):
    cell = ref.CELLS[name]
    p, ro, xs, tg, c0, m = ref.draw(cell, rng, dtype, mask=masked)
    r = ref.flags(rng, xs.shape[:2], 0.25)

    def manual(p, ro, xs, tg, c0):
        return bptt_jax.sequence_loss(cell, p, ro, xs, tg, c0, mask=m, resets=r)

    v_m, g_m = jax.jit(jax.value_and_grad(manual, (0, 1, 2, 4)))(p, ro, xs, tg, c0)
    v_r, _, g_r = ref.loss_grads(cell, p, ro, xs, tg, c0, mask=m, resets=r)
    assert ref.rel_err(v_m, v_r) <= ref.TOL[dtype]
    ref.assert_trees_close(g_m, g_r, dtype)
    _, _, g_free = ref.loss_grads(cell, p, ro, xs, tg, c0, mask=m)
    assert ref.rel_err(g_r[0][1], g_free[0][1]) > 1e-3  # the resets did act


@pytest.mark.parametrize("name", ["elman-tanh", "lstm", "gru"])
def test_reset_starts_a_fresh_sequence(name, rng):
    """After a reset at step s the states equal those of the sequence started at s from zeros."""
    cell = ref.CELLS[name]
    p, _, xs, _, c0, _ = ref.draw(cell, rng, jnp.float64, mask=False)
    s = 4
    r = jnp.zeros(xs.shape[:2], bool).at[s, 0].set(True)
    run = jax.jit(lambda xs, c0, r: bptt_jax.unroll(cell, p, xs, c0, resets=r))
    hs, _ = run(xs, c0, r)
    fresh, _ = bptt_jax.unroll(cell, p, xs[s:, :1])
    np.testing.assert_allclose(hs[s:, 0], fresh[:, 0], rtol=1e-12, atol=1e-12)
    before, _ = run(xs, c0, jnp.zeros_like(r))
    np.testing.assert_allclose(hs[:, 1:], before[:, 1:], rtol=1e-12, atol=1e-12)
    assert not np.allclose(hs[s:, 0], before[s:, 0])


@pytest.mark.parametrize(
    "name,dtype,reduction",
    list(_rotating([{"f64": jnp.float64, "f32": jnp.float32}, {"sum": "sum", "mean": "mean"}], 1)),
)
def test_loss_mask_counts_only_its_tokens(name, dtype, reduction, rng):
    cell = ref.CELLS[name]
    p, ro, xs, tg, c0, m = ref.draw(cell, rng, dtype)
    lm = ref.flags(rng, xs.shape[:2], 0.5)
    opts = dict(mask=m, loss_mask=lm, reduction=reduction)

    def manual(p, ro, xs, tg, c0):
        return bptt_jax.sequence_loss(cell, p, ro, xs, tg, c0, **opts)

    v_m, g_m = jax.jit(jax.value_and_grad(manual, (0, 1, 2, 4)))(p, ro, xs, tg, c0)
    v_r, _, g_r = ref.loss_grads(cell, p, ro, xs, tg, c0, **opts)
    assert ref.rel_err(v_m, v_r) <= ref.TOL[dtype]
    ref.assert_trees_close(g_m, g_r, dtype)


def test_loss_mask_on_the_last_step_only_is_the_last_step_loss(rng):
    cell = ref.CELLS["gru"]
    p, ro, xs, tg, c0, _ = ref.draw(cell, rng, jnp.float64, mask=False)
    lm = jnp.zeros(xs.shape[:2], bool).at[-1].set(True)
    full = bptt_jax.sequence_loss(cell, p, ro, xs, tg, c0, loss_mask=lm)
    hs, _ = bptt_jax.unroll(cell, p, xs, c0)
    import optax

    last = optax.softmax_cross_entropy_with_integer_labels(hs[-1] @ ro.w_hy + ro.b_y, tg[-1])
    np.testing.assert_allclose(full, jnp.mean(last), rtol=1e-12)


def _delta_threshold(cell, p, ro, xs, tg, c0, **opts):
    """A threshold that clips a good share of the steps (a third of the median error, from
    the reference's errors ``dL/dh_t`` under the same options)."""
    d = ref.deltas(cell, p, ro, xs, tg, c0, **opts)
    norms = np.linalg.norm(np.asarray(d), axis=-1)
    return float(np.median(norms[norms > 0])) / 3  # padded steps after the end carry none


@pytest.mark.parametrize(
    "name,dtype,truncate",
    list(_rotating([{"f64": jnp.float64, "f32": jnp.float32}, {"full": None, "trunc4": 4}], 1)),
)
def test_delta_clip_matches_autodiff_with_clipped_errors(name, dtype, truncate, rng):
    """Per-step clipping in sequence_loss, with full or truncated BPTT (truncate=4 < T with
    clipping walks the whole sequence, not chunk by chunk); loss_and_grads gives the same
    gradients and errors no larger than the threshold."""
    cell = ref.CELLS[name]
    p, ro, xs, tg, c0, m = ref.draw(cell, rng, dtype)
    opts = dict(mask=m, reduction="sum", truncate=truncate)
    thr = _delta_threshold(cell, p, ro, xs, tg, c0, **opts)

    def manual(p, ro, xs, tg, c0):
        return bptt_jax.sequence_loss(cell, p, ro, xs, tg, c0, delta_clip=thr, **opts)

    g_m = jax.jit(jax.grad(manual, (0, 1, 2, 4)))(p, ro, xs, tg, c0)
    v_r, _, g_r = ref.loss_grads(cell, p, ro, xs, tg, c0, delta_clip=thr, **opts)
    ref.assert_trees_close(g_m, g_r, dtype)
    _, _, g_free = ref.loss_grads(cell, p, ro, xs, tg, c0, **opts)
    assert ref.rel_err(g_r[0][1], g_free[0][1]) > 1e-3  # the clipping did act
    out = jax.jit(
        lambda p, ro, xs, c0: loss_and_grads(
            cell, p, ro, xs, tg, c0, delta_clip=thr, return_deltas=True, **opts
        )
    )(p, ro, xs, c0)
    assert ref.rel_err(out.value, v_r) <= ref.TOL[dtype]
    ref.assert_trees_close((out.params, out.readout), (g_r[0], g_r[1]), dtype)
    assert np.max(np.linalg.norm(np.asarray(out.deltas), axis=-1)) <= thr * (1 + 1e-5)


#: loss_and_grads' schedules: full BPTT, truncated (chunk by chunk), clipped, both.
LG_OPTIONS = {
    "plain": {},
    "trunc4": {"truncate": 4},
    "clip": {"delta_clip": True},
    "trunc4-clip": {"truncate": 4, "delta_clip": True},
}


@pytest.mark.parametrize(
    "name,dtype,options",
    list(_rotating([{"f64": jnp.float64, "f32": jnp.float32}, LG_OPTIONS], 2)),
)
def test_loss_and_grads_matches_autodiff_and_returns_the_errors_on_every_state(
    name, dtype, options, rng
):
    """``deltas[t]`` is dL/dh_t: the gradient of the loss w.r.t. a perturbation of h_t
    (after clipping, with ``delta_clip``); ``carry`` is the carry after step ``carry_index``."""
    cell = ref.CELLS[name]
    p, ro, xs, tg, c0, m = ref.draw(cell, rng, dtype)
    r = ref.flags(rng, xs.shape[:2], 0.1)
    opts = dict(mask=m, resets=r, truncate=options.get("truncate"))
    if options.get("delta_clip"):
        opts["delta_clip"] = _delta_threshold(cell, p, ro, xs, tg, c0, **opts)
    out = jax.jit(
        lambda p, ro, xs, c0: loss_and_grads(
            cell, p, ro, xs, tg, c0, carry_index=4, return_deltas=True, **opts
        )
    )(p, ro, xs, c0)
    v_r, _, g_r = ref.loss_grads(cell, p, ro, xs, tg, c0, argnums=(0, 1), **opts)
    assert ref.rel_err(out.value, v_r) <= ref.TOL[dtype]
    ref.assert_trees_close((out.params, out.readout), g_r, dtype)
    ref.assert_trees_close(out.deltas, ref.deltas(cell, p, ro, xs, tg, c0, **opts), dtype)
    head = None if m is None else m[:5]
    _, carry4 = ref.scan_unroll(cell, p, xs[:5], c0, head, resets=r[:5])
    ref.assert_trees_close(out.carry, carry4, dtype)


@pytest.mark.parametrize(
    "name,dtype,loss,clip",
    list(
        _rotating(
            [
                {"f64": jnp.float64, "f32": jnp.float32},
                {"xent": "xent", "mse": "mse"},
                {"noclip": False, "clip": True},
            ],
            2,
        )
    ),
)
def test_readout_error_formed_inside_the_reverse_scan_matches_autodiff(
    name, dtype, loss, clip, rng, monkeypatch
):
    """Large problems add ``W_hy^T dy_t`` to the error inside the reverse scan instead of
    storing it for every step (``bundles.output_error``) and lay out the weight gradients'
    transposed operands once; forced here on a small one, with a mask, resets, a loss mask,
    a random carry and (optionally) per-step clipping."""
    monkeypatch.setattr(options, "LARGE_BYTES", 0)
    cell = ref.CELLS[name]
    p, ro, xs, tg, c0, m = ref.draw(cell, rng, dtype, loss=loss)
    assert isinstance(bundles.output_error(xs[..., :1], ro.w_hy[:, :1]), bundles.OutputError)
    r = ref.flags(rng, xs.shape[:2], 0.25)
    lm = ref.flags(rng, xs.shape[:2], 0.7)
    opts = dict(mask=m, resets=r, loss_mask=lm, loss=loss, reduction="sum")
    thr = _delta_threshold(cell, p, ro, xs, tg, c0, **opts) if clip else None

    def manual(p, ro, xs, tg, c0):
        return bptt_jax.sequence_loss(cell, p, ro, xs, tg, c0, delta_clip=thr, **opts)

    argnums = _argnums(loss)
    v_m, g_m = jax.jit(jax.value_and_grad(manual, argnums))(p, ro, xs, tg, c0)
    v_r, _, g_r = ref.loss_grads(cell, p, ro, xs, tg, c0, delta_clip=thr, argnums=argnums, **opts)
    assert ref.rel_err(v_m, v_r) <= ref.TOL[dtype]
    ref.assert_trees_close(g_m, g_r, dtype)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"resets": np.zeros((3, 2), bool)}, r"resets must have shape \(T, B\)"),
        ({"loss_mask": np.zeros((7, 2, 1))}, r"loss_mask must have shape \(T, B\)"),
        ({"delta_clip": 0.0}, "delta_clip must be a positive number"),
        ({"delta_clip": -1}, "delta_clip must be a positive number"),
        ({"carry_index": 7}, r"carry_index must be an int in \[0, T\) = \[0, 7\)"),
    ],
)
def test_bad_options_name_the_argument(kwargs, match, key):
    cell = bptt_jax.Elman(4)
    p, ro, xs, tg, c0, _ = ref.problem(cell, key, jnp.float32, t=7, b=2, mask=False)
    with pytest.raises(ValueError, match=match):
        loss_and_grads(cell, p, ro, xs, tg, c0, **kwargs)


def test_resets_with_a_float_dtype_is_accepted_as_0_1_but_strings_are_not(key):
    cell = bptt_jax.Elman(4)
    p, ro, xs, tg, c0, _ = ref.problem(cell, key, jnp.float32, t=5, b=2, mask=False)
    r = np.zeros((5, 2), np.float32)
    r[2, 1] = 1
    a = bptt_jax.sequence_loss(cell, p, ro, xs, tg, c0, resets=r)
    b = bptt_jax.sequence_loss(cell, p, ro, xs, tg, c0, resets=r != 0)
    assert a == b
    with pytest.raises(TypeError, match="resets"):
        bptt_jax.sequence_loss(cell, p, ro, xs, tg, c0, resets=np.full((5, 2), "x"))
