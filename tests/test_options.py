"""Stream resets, loss masks, per-step error clipping and ``loss_and_grads``.

Each is checked against the independent plain-scan reference in ``tests/reference.py`` on
random params, inputs, targets, initial carries, masks, resets and cotangents.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bptt_jax
from bptt_jax import engine
from bptt_jax.losses import loss_and_grads
from tests import reference as ref

DTYPES = [pytest.param(jnp.float64, id="f64"), pytest.param(jnp.float32, id="f32")]
CELLS = pytest.mark.parametrize("name", list(ref.CELLS))


def _resets(key, t, b, p=0.25):
    return jax.random.bernoulli(key, p, (t, b))


@CELLS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "nomask"])
def test_sequence_loss_with_resets_matches_autodiff(name, dtype, masked, key):
    cell = ref.CELLS[name]
    k1, k2 = jax.random.split(key)
    p, ro, xs, tg, c0, m = ref.problem(cell, k1, dtype, t=9, mask=masked)
    r = _resets(k2, *xs.shape[:2])
    assert r.any() and not r.all()

    def manual(p, ro, xs, c0):
        return bptt_jax.sequence_loss(cell, p, ro, xs, tg, c0, mask=m, resets=r)

    def reference(p, ro, xs, c0):
        return ref.scan_loss(cell, p, ro, xs, tg, c0, m, resets=r)

    v_m, g_m = jax.jit(jax.value_and_grad(manual, (0, 1, 2, 3)))(p, ro, xs, c0)
    v_r, g_r = jax.value_and_grad(reference, (0, 1, 2, 3))(p, ro, xs, c0)
    assert ref.rel_err(v_m, v_r) <= ref.TOL[dtype]
    ref.assert_trees_close(g_m, g_r, dtype)


@CELLS
@pytest.mark.parametrize("dtype", DTYPES)
def test_unroll_with_resets_matches_autodiff_under_random_cotangents(name, dtype, key):
    cell = ref.CELLS[name]
    k1, k2, k3 = jax.random.split(key, 3)
    p, _, xs, _, c0, m = ref.problem(cell, k1, dtype, t=9)
    r = _resets(k2, *xs.shape[:2])
    out_m, vjp_m = jax.vjp(lambda *a: bptt_jax.unroll(cell, *a, mask=m, resets=r), p, xs, c0)
    out_r, vjp_r = jax.vjp(lambda *a: ref.scan_unroll(cell, *a, m, resets=r), p, xs, c0)
    ref.assert_trees_close(out_m, out_r, dtype)
    leaves, treedef = jax.tree.flatten(out_r)
    keys = jax.random.split(k3, len(leaves))
    ct = treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
    ref.assert_trees_close(vjp_m(ct), vjp_r(ct), dtype)


@pytest.mark.parametrize("name", ["elman-tanh", "lstm", "gru"])
def test_reset_starts_a_fresh_sequence(name, key):
    """After a reset at step s the states equal those of the sequence started at s from zeros."""
    cell = ref.CELLS[name]
    p, _, xs, _, c0, _ = ref.problem(cell, key, jnp.float64, t=10, mask=False)
    s = 4
    r = jnp.zeros(xs.shape[:2], bool).at[s, 0].set(True)
    hs, _ = bptt_jax.unroll(cell, p, xs, c0, resets=r)
    fresh, _ = bptt_jax.unroll(cell, p, xs[s:, :1])
    np.testing.assert_allclose(hs[s:, 0], fresh[:, 0], rtol=1e-12, atol=1e-12)
    before, _ = bptt_jax.unroll(cell, p, xs, c0)
    np.testing.assert_allclose(hs[:, 1:], before[:, 1:], rtol=1e-12, atol=1e-12)
    assert not np.allclose(hs[s:, 0], before[s:, 0])


@CELLS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_loss_mask_counts_only_its_tokens(name, dtype, reduction, key):
    cell = ref.CELLS[name]
    k1, k2 = jax.random.split(key)
    p, ro, xs, tg, c0, m = ref.problem(cell, k1, dtype, t=8)
    lm = jax.random.bernoulli(k2, 0.5, xs.shape[:2])

    def manual(p, ro, xs, c0):
        return bptt_jax.sequence_loss(
            cell, p, ro, xs, tg, c0, mask=m, loss_mask=lm, reduction=reduction
        )

    def reference(p, ro, xs, c0):
        return ref.scan_loss(cell, p, ro, xs, tg, c0, m, reduction=reduction, loss_mask=lm)

    v_m, g_m = jax.value_and_grad(manual, (0, 1, 2, 3))(p, ro, xs, c0)
    v_r, g_r = jax.value_and_grad(reference, (0, 1, 2, 3))(p, ro, xs, c0)
    assert ref.rel_err(v_m, v_r) <= ref.TOL[dtype]
    ref.assert_trees_close(g_m, g_r, dtype)


def test_loss_mask_on_the_last_step_only_is_the_last_step_loss(key):
    cell = ref.CELLS["gru"]
    p, ro, xs, tg, c0, _ = ref.problem(cell, key, jnp.float64, t=6, mask=False)
    lm = jnp.zeros(xs.shape[:2], bool).at[-1].set(True)
    full = bptt_jax.sequence_loss(cell, p, ro, xs, tg, c0, loss_mask=lm)
    hs, _ = bptt_jax.unroll(cell, p, xs, c0)
    import optax

    last = optax.softmax_cross_entropy_with_integer_labels(hs[-1] @ ro.w_hy + ro.b_y, tg[-1])
    np.testing.assert_allclose(full, jnp.mean(last), rtol=1e-12)


def _delta_threshold(cell, p, ro, xs, tg, c0, m, loss="xent"):
    """A threshold that clips a good share of the steps (a third of the median error)."""
    out = loss_and_grads(
        cell, p, ro, xs, tg, c0, mask=m, loss=loss, reduction="sum", return_deltas=True
    )
    norms = np.linalg.norm(np.asarray(out.deltas), axis=-1)
    return float(np.median(norms[norms > 0])) / 3  # padded steps after the end carry none


@CELLS
@pytest.mark.parametrize("dtype", DTYPES)
def test_delta_clip_matches_autodiff_with_clipped_errors(name, dtype, key):
    cell = ref.CELLS[name]
    p, ro, xs, tg, c0, m = ref.problem(cell, key, dtype, t=9)
    thr = _delta_threshold(cell, p, ro, xs, tg, c0, m)

    def manual(p, ro, xs, c0, clip):
        return bptt_jax.sequence_loss(
            cell, p, ro, xs, tg, c0, mask=m, reduction="sum", delta_clip=clip
        )

    def reference(p, ro, xs, c0):
        return ref.scan_loss(cell, p, ro, xs, tg, c0, m, reduction="sum", delta_clip=thr)

    g_m = jax.grad(manual, (0, 1, 2, 3))(p, ro, xs, c0, thr)
    g_r = jax.grad(reference, (0, 1, 2, 3))(p, ro, xs, c0)
    ref.assert_trees_close(g_m, g_r, dtype)
    g_full = jax.grad(manual, (0, 1, 2, 3))(p, ro, xs, c0, None)
    assert ref.rel_err(g_m[0][1], g_full[0][1]) > 1e-3  # the clipping did act
    out = loss_and_grads(
        cell, p, ro, xs, tg, c0, mask=m, reduction="sum", delta_clip=thr, return_deltas=True
    )
    assert np.max(np.linalg.norm(np.asarray(out.deltas), axis=-1)) <= thr * (1 + 1e-5)


@pytest.mark.parametrize("name", ["elman-tanh", "lstm"])
def test_delta_clip_in_unroll_matches_autodiff(name, key):
    cell = ref.CELLS[name]
    k1, k2 = jax.random.split(key)
    p, _, xs, _, c0, m = ref.problem(cell, k1, jnp.float64, t=9)
    out, vjp_r = jax.vjp(lambda *a: ref.scan_unroll(cell, *a, m, delta_clip=0.05), p, xs, c0)
    _, vjp_m = jax.vjp(lambda *a: bptt_jax.unroll(cell, *a, mask=m, delta_clip=0.05), p, xs, c0)
    _, vjp_a = jax.vjp(
        lambda *a: bptt_jax.unroll(cell, *a, mask=m, delta_clip=0.05, backward="autodiff"),
        p,
        xs,
        c0,
    )
    leaves, treedef = jax.tree.flatten(out)
    keys = jax.random.split(k2, len(leaves))
    ct = treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
    ref.assert_trees_close(vjp_m(ct), vjp_r(ct), jnp.float64)
    ref.assert_trees_close(vjp_a(ct), vjp_r(ct), jnp.float64)


@CELLS
@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_and_grads_matches_autodiff_and_returns_the_errors_on_every_state(name, dtype, key):
    """``deltas[t]`` is dL/dh_t: the gradient of the loss w.r.t. a perturbation of h_t."""
    cell = ref.CELLS[name]
    k1, k2 = jax.random.split(key)
    p, ro, xs, tg, c0, m = ref.problem(cell, k1, dtype, t=9)
    r = _resets(k2, *xs.shape[:2], p=0.1)
    out = jax.jit(
        lambda p, ro, xs, c0: loss_and_grads(
            cell, p, ro, xs, tg, c0, mask=m, resets=r, carry_index=4, return_deltas=True
        )
    )(p, ro, xs, c0)
    v_r, g_r = jax.value_and_grad(
        lambda p, ro: ref.scan_loss(cell, p, ro, xs, tg, c0, m, resets=r), (0, 1)
    )(p, ro)
    assert ref.rel_err(out.value, v_r) <= ref.TOL[dtype]
    ref.assert_trees_close((out.params, out.readout), g_r, dtype)

    def perturbed_loss(eps):  # eps (T, B, H) added to h_t after every step
        t_len = xs.shape[0]
        m_ = jnp.ones(xs.shape[:2], bool) if m is None else m
        carry, hs, carries = c0, [], []
        for t in range(t_len):
            carry = jax.tree.map(lambda c: jnp.where(r[t][:, None], 0.0, c).astype(c.dtype), carry)
            new = ref.step(cell, p, carry, xs[t])
            new = jax.tree.map(lambda a, b: jnp.where(m_[t][:, None], a, b), new, carry)
            if isinstance(new, bptt_jax.LSTMCarry):
                new = new._replace(h=new.h + eps[t])
            else:
                new = new + eps[t]
            carry = new
            carries.append(carry)
            hs.append(ref.hidden(carry))
        ys = jnp.stack(hs) @ ro.w_hy + ro.b_y
        import optax

        w = m_.astype(dtype)
        per = optax.softmax_cross_entropy_with_integer_labels(ys, tg) * w
        return jnp.sum(per) / jnp.maximum(jnp.sum(w), 1), carries[4]

    eps = jnp.zeros(xs.shape[:2] + (cell.hidden_size,), dtype)
    deltas_r, carry4 = jax.grad(perturbed_loss, has_aux=True)(eps)
    ref.assert_trees_close(out.deltas, deltas_r, dtype)
    ref.assert_trees_close(out.carry, carry4, dtype)


@CELLS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss", ["xent", "mse"])
@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
def test_readout_error_formed_inside_the_reverse_scan_matches_autodiff(
    name, dtype, loss, clip, key, monkeypatch
):
    """Large problems add ``W_hy^T dy_t`` to the error inside the reverse scan instead of
    storing it for every step (``engine.output_error``) and lay out the weight gradients'
    transposed operands once; forced here on a small one, with a mask, resets, a loss mask,
    a random carry and (optionally) per-step clipping."""
    monkeypatch.setattr(engine, "LARGE_BYTES", 0)
    cell = ref.CELLS[name]
    k1, k2, k3 = jax.random.split(key, 3)
    p, ro, xs, tg, c0, m = ref.problem(cell, k1, dtype, t=9, loss=loss)
    assert isinstance(engine.output_error(xs[..., :1], ro.w_hy[:, :1]), engine.OutputError)
    r = _resets(k2, *xs.shape[:2])
    lm = jax.random.bernoulli(k3, 0.7, xs.shape[:2])
    thr = _delta_threshold(cell, p, ro, xs, tg, c0, m, loss) if clip else None
    opts = dict(mask=m, resets=r, loss_mask=lm, loss=loss, reduction="sum")

    def manual(p, ro, xs, c0):
        return bptt_jax.sequence_loss(cell, p, ro, xs, tg, c0, delta_clip=thr, **opts)

    def reference(p, ro, xs, c0):
        return ref.scan_loss(cell, p, ro, xs, tg, c0, delta_clip=thr, **opts)

    v_m, g_m = jax.jit(jax.value_and_grad(manual, (0, 1, 2, 3)))(p, ro, xs, c0)
    v_r, g_r = jax.value_and_grad(reference, (0, 1, 2, 3))(p, ro, xs, c0)
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
