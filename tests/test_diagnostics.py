"""Gradient-flow diagnostics, each checked against an independent autodiff computation.

``delta^h_t`` is the gradient of the loss with respect to a perturbation added to h_t;
``||dh_T/dh_t||`` is the norm of ``jax.jacrev`` of a plain per-step loop with those
perturbations; spectral norms come from ``numpy.linalg.svd``; truncation bias from
``jax.grad`` of ``ref.scan_loss(truncate=k)``. Everything is drawn at random.
"""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bptt_jax
from bptt_jax import config, diagnostics
from tests import reference as ref

DTYPES = [pytest.param(jnp.float64, id="f64"), pytest.param(jnp.float32, id="f32")]
CELLS = pytest.mark.parametrize("name", ["elman-tanh", "lstm", "gru"])


def _perturbed_unroll(cell, p, xs, c0, eps, mask, resets, clip=None, eps_c=None):
    """A plain ``lax.scan`` of the reference step with ``eps[t]`` added to h_t (after the
    mask, before the per-step error clipping, so the gradient w.r.t. ``eps[t]`` is the
    clipped delta_t), and ``eps_c[t]`` to the LSTM's c_t. Returns ``(hs (T, B, H), carry_T)``."""
    eps_c = jnp.zeros_like(eps) if eps_c is None else eps_c

    def body(carry, inp):
        x, e, ec, m_t, r_t = inp
        carry = jax.tree.map(lambda c: jnp.where(r_t[:, None], 0.0, c).astype(c.dtype), carry)
        new = ref.step(cell, p, carry, x)
        new = jax.tree.map(lambda a, b: jnp.where(m_t[:, None], a, b), new, carry)
        if isinstance(new, bptt_jax.LSTMCarry):
            new = new._replace(h=new.h + e, c=new.c + ec)
        else:
            new = new + e
        if clip is not None:
            new = ref.clip_error(new, clip)
        return new, ref.hidden(new)

    carry_t, hs = jax.lax.scan(body, c0, (xs, eps, eps_c, mask, resets))
    return hs, carry_t


def _problem(name, key, dtype, t=6):
    cell = ref.CELLS[name]
    k1, k2, k3 = jax.random.split(key, 3)
    p, ro, xs, tg, c0, m = ref.problem(cell, k1, dtype, t=t)
    lm = jax.random.bernoulli(k2, 0.6, xs.shape[:2]).at[-1].set(True)
    r = jax.random.bernoulli(k3, 0.1, xs.shape[:2])
    return cell, p, ro, xs, tg, c0, m, lm, r


@CELLS
@pytest.mark.parametrize(
    "dtype,clipped",
    [
        pytest.param(jnp.float64, False, id="f64"),
        pytest.param(jnp.float32, False, id="f32"),
        pytest.param(jnp.float64, True, id="f64-delta_clip"),
    ],
)
def test_delta_norms_are_the_gradient_wrt_a_perturbation_of_each_state(name, dtype, clipped, key):
    cell, p, ro, xs, tg, c0, m, lm, r = _problem(name, key, dtype)
    clip = None
    if clipped:  # a threshold that clips a good share of the steps
        free = diagnostics.gradient_flow(cell, p, ro, xs, tg, c0, mask=m, loss_mask=lm, resets=r)
        norms = np.asarray(free.delta_norms)
        clip = float(np.median(norms[norms > 0])) / 3

    def loss(eps):
        hs, _ = _perturbed_unroll(cell, p, xs, c0, eps, m, r, clip)
        per = optax.softmax_cross_entropy_with_integer_labels(hs @ ro.w_hy + ro.b_y, tg)
        w = (m & lm).astype(dtype)
        return jnp.sum(per * w) / jnp.sum(w)

    eps = jnp.zeros(xs.shape[:2] + (cell.hidden_size,), dtype)
    expected = jnp.linalg.norm(jax.jit(jax.grad(loss))(eps), axis=-1)
    flow = diagnostics.gradient_flow(
        cell, p, ro, xs, tg, c0, mask=m, loss_mask=lm, resets=r, delta_clip=clip
    )
    assert flow.delta_norms.dtype == dtype
    assert ref.rel_err(flow.delta_norms, expected) <= ref.TOL[dtype]
    assert ref.rel_err(flow.delta_norm, expected.mean(1)) <= ref.TOL[dtype]
    assert ref.rel_err(flow.value, loss(eps)) <= ref.TOL[dtype]
    if clipped:
        assert np.max(flow.delta_norms) <= clip * (1 + 1e-5)
        assert np.max(free.delta_norms) > 2 * clip  # the clipping did act


def _jacobian_reference(cell, p, xs, c0, m, r):
    """``||dh_T/d carry_t||_F`` per (t, b) from ``jax.jacrev`` of the perturbed per-step
    loop: with respect to h_t, and for the LSTM to c_t as well."""
    eps = jnp.zeros(xs.shape[:2] + (cell.hidden_size,), xs.dtype)
    lstm = isinstance(cell, bptt_jax.LSTM)
    h_last = lambda e, ec: ref.hidden(_perturbed_unroll(cell, p, xs, c0, e, m, r, eps_c=ec)[1])
    jacs = jax.jit(jax.jacrev(h_last, argnums=(0, 1) if lstm else 0))(eps, eps)
    b = xs.shape[1]
    total = 0
    for jac in jacs if lstm else (jacs,):  # each (B, H, T, B, H)
        own = jnp.stack([jac[i, :, :, i, :] for i in range(b)], axis=-1)  # (H, T, H, B)
        total = total + jnp.sum(own**2, axis=(0, 2))
    return jnp.sqrt(total)  # (T, B)


@CELLS
@pytest.mark.parametrize("dtype", DTYPES)
def test_jacobian_norms_match_jacrev_of_the_reference_loop(name, dtype, key):
    cell, p, _, xs, _, c0, m, _, r = _problem(name, key, dtype)
    expected = _jacobian_reference(cell, p, xs, c0, m, r)
    got = diagnostics.jacobian_norms(cell, p, xs, c0, mask=m, resets=r)
    assert got.shape == xs.shape[:2] and got.dtype == dtype
    assert ref.rel_err(got, expected) <= ref.TOL[dtype]
    # a step whose carry was reset cuts every Jacobian across it
    t, b = np.nonzero(np.asarray(r)[1:])
    assert np.all(np.asarray(got)[: t.min(), b[t == t.min()]] == 0) if t.size else True


def test_jacobian_norms_with_more_probes_than_the_hidden_size_use_the_key(key):
    """Random probes: the Hutchinson estimate lands near the exact norm, deterministically."""
    cell, p, _, xs, _, c0, _, _, _ = _problem("gru", key, jnp.float64, t=10)
    exact = np.asarray(diagnostics.jacobian_norms(cell, p, xs, c0))
    k = jax.random.fold_in(key, 1)
    est = np.asarray(diagnostics.jacobian_norms(cell, p, xs, c0, probes=400, key=k))
    again = np.asarray(diagnostics.jacobian_norms(cell, p, xs, c0, probes=400, key=k))
    np.testing.assert_array_equal(est, again)
    # sqrt(2/400) = 7% relative std on the squared norm: 25% is > 5 sigma on the norm
    assert np.max(np.abs(est / exact - 1)) < 0.25
    assert np.max(np.abs(est / exact - 1)) > 0  # it is an estimate


def _horizon_by_definition(norms, fraction):
    """Straight from the docstring: steps back until n_s < fraction * max(n_0..n_s)."""
    back = np.asarray(norms)[::-1]
    peak = -np.inf
    for s, n in enumerate(back):
        peak = max(peak, n)
        if n < fraction * peak:
            return s
    return len(back)


@pytest.mark.parametrize("fraction", [0.5, 0.01])
def test_horizon_from_norms_follows_its_definition(fraction, key):
    t, b = 30, 6
    steps = jax.random.normal(key, (t, b)) * 0.8 + 0.3  # log-space random walk, decaying back
    norms = np.exp(np.cumsum(np.asarray(steps), axis=0))
    got = np.asarray(diagnostics.horizon_from_norms(norms, fraction))
    want = [_horizon_by_definition(norms[:, j], fraction) for j in range(b)]
    assert got.dtype == np.int32 and got.tolist() == want
    assert len(set(want)) > 1  # the curves differ
    assert int(diagnostics.horizon_from_norms(norms[:, 0], fraction)) == want[0]


def test_horizon_of_geometric_curves():
    t = 40
    s = np.arange(t)[::-1].astype(float)  # s steps back from T at index T-1-s
    for r in (0.3, 0.7, 0.9):
        want = int(np.floor(np.log(0.01) / np.log(r))) + 1
        assert int(diagnostics.horizon_from_norms(r**s)) == min(want, t)
    assert int(diagnostics.horizon_from_norms(1.5**s)) == t  # exploding: never falls
    assert int(diagnostics.horizon_from_norms(np.full(t, np.nan))) == t


@pytest.mark.parametrize("name", ["elman-tanh", "lstm"])
def test_effective_horizon_is_the_horizon_of_the_batch_mean_jacobian_norm(name, key):
    cell, p, ro, xs, tg, c0, m, lm, r = _problem(name, key, jnp.float64, t=12)
    jac = diagnostics.jacobian_norms(cell, p, xs, c0, mask=m, resets=r)
    want = _horizon_by_definition(np.asarray(jac).mean(1), 0.2)
    got = diagnostics.effective_horizon(cell, p, xs, c0, mask=m, resets=r, fraction=0.2)
    assert int(got) == want
    flow = diagnostics.gradient_flow(cell, p, ro, xs, tg, c0, mask=m, resets=r, fraction=0.2)
    assert int(flow.horizon) == want
    assert ref.rel_err(flow.jacobian_norms, jac) <= 1e-12


@pytest.mark.parametrize("name", list(ref.CELLS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_spectral_norms_match_numpy_svd(name, dtype, key):
    cell = ref.CELLS[name]
    p, *_ = ref.problem(cell, key, dtype)
    got = diagnostics.spectral_norms(cell, p)
    w = np.asarray(cell.recurrent_kernel(p), np.float64)
    h = cell.hidden_size
    assert list(got.blocks) == list(diagnostics.BLOCK_NAMES[type(cell)])
    assert w.shape == (h, h * len(got.blocks))
    assert ref.rel_err(got.kernel, np.linalg.svd(w, compute_uv=False)[0]) <= ref.TOL[dtype]
    for i, g in enumerate(got.blocks):
        sv = np.linalg.svd(w[:, i * h : (i + 1) * h], compute_uv=False)[0]
        assert ref.rel_err(got.blocks[g], sv) <= ref.TOL[dtype], g


@pytest.mark.parametrize(
    "name,dtype",
    [
        pytest.param("elman-tanh", jnp.float64, id="elman-tanh-f64"),
        pytest.param("lstm", jnp.float64, id="lstm-f64"),
        pytest.param("gru", jnp.float64, id="gru-f64"),
        pytest.param("lstm", jnp.float32, id="lstm-f32"),  # float32 once: the same program
    ],
)
def test_truncation_bias_matches_autodiff_of_the_truncated_reference(name, dtype, key):
    cell, p, ro, xs, tg, c0, m, lm, r = _problem(name, key, dtype, t=7)
    ks = [1, 3, 7, 9]

    @jax.jit
    def grad(k):  # k traced: one compile for every k (the reference's cut is a jnp.where)
        g = jax.grad(
            lambda p: ref.scan_loss(cell, p, ro, xs, tg, c0, m, truncate=k, loss_mask=lm, resets=r)
        )(p)
        return jnp.concatenate([jnp.ravel(x) for x in g])

    full = np.asarray(grad(xs.shape[0]), np.float64)  # k = T: full BPTT
    bias = diagnostics.truncation_bias(
        cell, p, ro, xs, tg, c0, ks=ks, mask=m, loss_mask=lm, resets=r
    )
    assert bias.ks.tolist() == ks
    assert ref.rel_err(bias.full_norm, np.linalg.norm(full)) <= ref.TOL[dtype]
    for i, k in enumerate(ks):
        g = np.asarray(grad(k), np.float64)
        cos = g @ full / (np.linalg.norm(g) * np.linalg.norm(full))
        ratio = np.linalg.norm(g) / np.linalg.norm(full)
        assert abs(float(bias.cosine[i]) - cos) <= 10 * ref.TOL[dtype], k
        assert ref.rel_err(bias.norm_ratio[i], ratio) <= 10 * ref.TOL[dtype], k
    assert float(bias.cosine[0]) < 1 - 1e-3  # k = 1 is biased
    np.testing.assert_allclose(bias.cosine[-2:], 1, rtol=10 * ref.TOL[dtype])  # k >= T


@pytest.mark.parametrize(
    "fn,kwargs,match",
    [
        ("horizon", {"fraction": 0.0}, "horizon_from_norms: fraction must be a number in"),
        ("horizon", {"fraction": 1}, "fraction must be a number in"),
        ("jacobian", {"probes": 0}, "jacobian_norms: probes must be a positive int"),
        ("jacobian", {"probes": 4}, "jacobian_norms: key is required with probes=4"),
        ("jacobian", {"resets": np.zeros((2, 2), bool)}, r"resets must have shape \(T, B\)"),
        ("horizon_model", {"fraction": -1.0}, "effective_horizon: fraction"),
        ("flow", {"fraction": 1.5}, "gradient_flow: fraction"),
        ("flow", {"probes": 2}, "gradient_flow: key is required"),
        ("flow", {"loss_mask": np.zeros((3,))}, r"gradient_flow: loss_mask must have shape"),
        ("bias", {"ks": []}, "truncation_bias: ks must be a non-empty sequence"),
        ("bias", {"ks": 3}, "truncation_bias: ks must be a non-empty sequence"),
        ("bias", {"ks": [2, 0]}, r"truncation_bias: ks\[1\] must be a positive int"),
    ],
)
def test_bad_arguments_are_named(fn, kwargs, match, key):
    cell = bptt_jax.Elman(4)
    p, ro, xs, tg, c0, _ = ref.problem(cell, key, jnp.float32, t=5, b=2, mask=False)
    with pytest.raises(ValueError, match=match):
        if fn == "horizon":
            diagnostics.horizon_from_norms(jnp.ones(5), **kwargs)
        elif fn == "jacobian":
            diagnostics.jacobian_norms(cell, p, xs, c0, **kwargs)
        elif fn == "horizon_model":
            diagnostics.effective_horizon(cell, p, xs, c0, **kwargs)
        elif fn == "flow":
            diagnostics.gradient_flow(cell, p, ro, xs, tg, c0, **kwargs)
        else:
            diagnostics.truncation_bias(cell, p, ro, xs, tg, c0, **kwargs)


def test_wrong_params_name_the_function(key):
    p = bptt_jax.GRU(4).init(key, 3)
    with pytest.raises(TypeError, match="spectral_norms: params must be a bptt_jax.ElmanParams"):
        diagnostics.spectral_norms(bptt_jax.Elman(4), p)


# ------------------------------------------------------------------- bptt-jax diagnose
TINY = [
    "task.T=6",
    "task.batch=3",
    "model.hidden=4",
    "train.steps=3",
    "train.log_every=2",
    "truncation.ks=[1, 3, 6]",
    "exploding.delta_clip=0.5",
]


def test_diagnose_cli_writes_plots_and_summary(tmp_path):
    out = tmp_path / "diag"
    proc = subprocess.run(  # one cell (the loop over cells is the same code) and the Elman
        [sys.executable, "-m", "bptt_jax", "diagnose", f"out={out}", "cells=['gru']", *TINY],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for f in ("gradient_flow.png", "exploding.png", "truncation_bias.png", "training.png"):
        data = (out / f).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, f
    summary = (out / "summary.txt").read_text()
    assert "horizon" in summary and "Exploding" in summary and "delta_clip=0.5" in summary
    res = json.loads((out / "summary.json").read_text())
    assert set(res["cells"]) == {"gru"}
    for entry in res["cells"].values():
        assert len(entry["train_loss"]) == 3
        for stage in ("init", "trained"):
            e = entry[stage]
            assert 1 <= e["horizon"] <= 6 and len(e["delta_norm"]) == 6
            assert len(e["truncation_cosine"]) == 3 and e["truncation_cosine"][-1] == pytest.approx(
                1
            )
    assert max(res["exploding"]["clip"]["delta_norm"]) <= 0.5 * (1 + 1e-5)
    assert "step    2" in proc.stdout and "gru trained" in proc.stdout  # progress is printed


@pytest.mark.parametrize(
    "override,key",
    [
        ("train.stepz=3", "train.stepz"),
        ("task.T=1", "task.T"),
        ("fraction=1.0", "fraction"),
        ("probes=0", "probes"),
        ("cells=['elman', 'elman']", "cells"),
        ("cells=['rnn']", "cells[0]"),
        ("truncation.ks=[0]", "truncation.ks[0]"),
        ("exploding.delta_clip=0", "exploding.delta_clip"),
        ("model.init=zeros", "model.init"),
    ],
)
def test_diagnose_config_errors_name_the_key(override, key, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    diagnostics.add_cli_arguments(parser)
    assert diagnostics.cli_main(parser.parse_args([override])) == 2
    assert f"'{key}'" in capsys.readouterr().err


def test_shipped_config_is_the_schema_default():
    assert config.load(diagnostics.DiagnoseConfig, "diagnose") == diagnostics.DiagnoseConfig()
