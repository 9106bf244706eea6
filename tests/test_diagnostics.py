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
from bptt_jax import diagnostics
from bptt_jax.cli import config, diagnose
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
    """A random problem (numpy, from ``key``) with a loss mask that counts the last step and
    resets with at least one after step 0."""
    cell = ref.CELLS[name]
    rng = ref.numpy_rng(key)
    p, ro, xs, tg, c0, m = ref.draw(cell, rng, dtype, t=t)
    lm = ref.flags(rng, xs.shape[:2], 0.6, at_least_one=False).at[-1].set(True)
    r = ref.flags(rng, xs.shape[:2], 0.1)
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
    b_ = xs.shape[1]
    expected = _jacobian_reference(cell, p, xs, c0, m, r)
    got = diagnostics.jacobian_norms(cell, p, xs, c0, mask=m, resets=r)
    assert got.shape == xs.shape[:2] and got.dtype == dtype
    assert ref.rel_err(got, expected) <= ref.TOL[dtype]
    # a reset at step s >= 1 cuts every Jacobian across it: dh_T/dh_t = 0 for every t < s
    resets, norms = np.asarray(r), np.asarray(got)
    last = {b: 1 + np.nonzero(resets[1:, b])[0].max() for b in range(b_) if resets[1:, b].any()}
    assert last  # _problem draws at least one
    for b, s in last.items():
        assert np.all(norms[:s, b] == 0) and norms[s:, b].any(), (b, s, norms[:, b])


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


def test_horizon_of_a_curve_without_error_is_0_and_of_a_non_finite_one_undefined():
    """An all-zero curve (no error reaches any step) has horizon 0, not T; a curve with a
    NaN or inf anywhere (a diverged run) has none: -1, per column of a (T, B) batch."""
    t = 16
    steps = np.arange(t)
    decaying = 0.5 ** steps[::-1]  # horizon 7 at fraction 0.01 (0.5**7 < 0.01 < 0.5**6)
    nan_late, inf_first = decaying.copy(), decaying.copy()
    nan_late[2], inf_first[-1] = np.nan, np.inf
    # no error on the last 4 steps, then the decaying curve: 4 + 7 steps
    zeros_then = np.where(steps < t - 4, 0.5 ** (t - 5.0 - steps), 0.0)
    curves = np.stack([decaying, np.zeros(t), np.full(t, np.nan), nan_late, inf_first,
                       zeros_then], axis=1)  # fmt: skip
    got = np.asarray(diagnostics.horizon_from_norms(curves))
    assert got.dtype == np.int32
    assert got.tolist() == [7, 0, -1, -1, -1, 4 + 7]
    assert diagnostics.UNDEFINED_HORIZON == -1
    assert int(diagnostics.horizon_from_norms(np.zeros(t))) == 0
    assert int(jax.jit(diagnostics.horizon_from_norms)(np.full(t, np.nan))) == -1  # under jit


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
        # the loss's checks run before jit: traced, out-of-range targets gave NaN or cosine 0
        ("flow", {"targets": 7}, r"gradient_flow: targets must lie in \[0, O\)"),
        ("bias", {"targets": 7}, r"truncation_bias: targets must lie in \[0, O\)"),
        # a static argument of the jitted flow: checked before its hash is taken
        ("flow", {"delta_clip": np.float32(1.0)}, "gradient_flow: delta_clip must be a positive"),
    ],
)
def test_bad_arguments_are_named(fn, kwargs, match, key):
    cell = bptt_jax.Elman(4)
    p, ro, xs, tg, c0, _ = ref.problem(cell, key, jnp.float32, t=5, b=2, mask=False)
    if "targets" in kwargs:  # targets out of [0, O): at one token
        tg = tg.at[2, 1].set(kwargs.pop("targets"))
        if fn == "bias":
            kwargs["ks"] = [1, 5]
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


def test_truncation_bias_of_a_nan_gradient_is_nan_not_a_zero_cosine(key):
    cell = bptt_jax.Elman(4)
    p, ro, xs, tg, c0, _ = ref.problem(cell, key, jnp.float32, t=5, b=2, mask=False)
    bias = diagnostics.truncation_bias(cell, p, ro, xs.at[1, 0, 0].set(jnp.nan), tg, c0, ks=[1, 5])
    assert np.isnan(bias.cosine).all() and np.isnan(bias.full_norm)


def test_scalars_of_numpy_and_jax_and_int_seeds_are_taken(key):
    """fraction as a NumPy or JAX scalar, ks as a JAX array, key as an int seed: each the
    same as its Python form."""
    cell = bptt_jax.Elman(4)
    p, ro, xs, tg, c0, _ = ref.problem(cell, key, jnp.float32, t=5, b=2, mask=False)
    norms = jnp.asarray([1.0, 0.5, 0.1, 1.0, 2.0])
    assert diagnostics.horizon_from_norms(norms, np.float32(0.3)) == diagnostics.horizon_from_norms(
        norms, 0.3
    )
    a = diagnostics.truncation_bias(cell, p, ro, xs, tg, c0, ks=jnp.array([1, 5]))
    b = diagnostics.truncation_bias(cell, p, ro, xs, tg, c0, ks=[1, 5])
    np.testing.assert_array_equal(a.cosine, b.cosine)
    by_seed = diagnostics.jacobian_norms(cell, p, xs, c0, probes=2, key=3)
    by_key = diagnostics.jacobian_norms(cell, p, xs, c0, probes=2, key=jax.random.key(3))
    np.testing.assert_array_equal(by_seed, by_key)
    with pytest.raises(TypeError, match="key must be a PRNG key"):
        diagnostics.jacobian_norms(cell, p, xs, c0, probes=2, key="k")


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
    cells = "cells=['gru', 'rglru']"  # a cell with a recurrent kernel, a linear one
    proc = subprocess.run(  # and the Elman
        [sys.executable, "-m", "bptt_jax", "diagnose", f"out={out}", cells, *TINY],
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
    assert "of rglru (linear recurrences, no W_h): max a_t" in summary
    res = json.loads((out / "summary.json").read_text())
    assert set(res["cells"]) == {"gru", "rglru"}
    assert res["cells"]["gru"]["init"]["spectral_norm"] > 0
    rg = res["cells"]["rglru"]["init"]
    assert rg["spectral_norm"] is None and 0.9 < rg["max_a"] < 1  # a^c >= 0.9 at init, r < 1
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
    assert "rglru init   : " in proc.stdout and "max a_t" in proc.stdout


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
        ("truncation.ks=[3, 1, 3]", "truncation.ks"),
        ("seed=-1", "seed"),
        ("out=/dev/null/x", "out"),
        ("model.forget_bias=1e300", "model.forget_bias"),  # finite, but inf in float32
    ],
)
def test_diagnose_config_errors_name_the_key(override, key, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    diagnose.add_cli_arguments(parser)
    assert diagnose.cli_main(parser.parse_args([override])) == 2
    assert f"'{key}'" in capsys.readouterr().err


def test_diagnose_out_that_cannot_be_written_is_one_line_naming_out(tmp_path, monkeypatch, capsys):
    """Before any work: a directory where a result file goes, and an out directory that
    refuses files (as a read-only mount does; root writes into a chmod-ed one, so the
    refusal is simulated) exit 2 with one line naming 'out', not a traceback."""
    import argparse

    parser = argparse.ArgumentParser()
    diagnose.add_cli_arguments(parser)
    (tmp_path / "a" / "summary.json").mkdir(parents=True)
    assert diagnose.cli_main(parser.parse_args([f"out={tmp_path / 'a'}", *TINY])) == 2
    err = capsys.readouterr().err
    assert "'out'" in err and "'summary.json'" in err and "Traceback" not in err

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "b"))

    monkeypatch.setattr(diagnose.tempfile, "TemporaryFile", refuse)
    monkeypatch.setattr(diagnose, "_train", None)  # no work may start before the check
    assert diagnose.cli_main(parser.parse_args([f"out={tmp_path / 'b'}", *TINY])) == 2
    captured = capsys.readouterr()
    assert "'out'" in captured.err and "Permission denied" in captured.err
    assert len(captured.err.strip().splitlines()) == 1


def test_diagnose_config_sorts_ks_for_its_curve():
    cfg = diagnose.check_config(
        config.load(diagnose.DiagnoseConfig, None, ["truncation.ks=[6, 1, 3]"])
    )
    assert cfg.truncation.ks == (1, 3, 6)


def test_shipped_config_is_the_schema_default():
    assert config.load(diagnose.DiagnoseConfig, "diagnose") == diagnose.DiagnoseConfig()


# ------------------------------------------------------- models: per layer and direction
# Stacks and Bidirectional layers against a plain lax.scan of the reference step, written
# here: every cell's hidden state (and the LSTM's memory) gets a perturbation after every
# step, indexed in forward time for both directions (the reverse cell reads each sequence's
# valid prefix backwards, the padding after it). The library's per-cell results are compared
# leaf by leaf, in the order of jax.tree.leaves: layer by layer, forward direction first.
MODELS = {
    "stack": bptt_jax.Stack((bptt_jax.LSTM(4, forget_bias=1.0), bptt_jax.GRU(3))),
    "bidirectional": bptt_jax.Bidirectional(bptt_jax.Elman(3, "tanh"), bptt_jax.LSTM(4)),
    "stack-bi": bptt_jax.Stack(
        (bptt_jax.Bidirectional(bptt_jax.GRU(3), merge="mean"), bptt_jax.LSTM(2))
    ),
}
MODEL_NAMES = pytest.mark.parametrize("name", list(MODELS))


def _layers(model):
    return model.layers if isinstance(model, bptt_jax.Stack) else (model,)


def _model_cells(model):
    """Every cell, layer by layer, forward direction first."""
    out = []
    for layer in _layers(model):
        bi = isinstance(layer, bptt_jax.Bidirectional)
        out.extend((layer.forward, layer.backward) if bi else (layer,))
    return out


def _cell_structure(model):
    """The tree structure of one array per cell in the model's layout (as its params)."""
    entries = [(0, 0) if isinstance(la, bptt_jax.Bidirectional) else 0 for la in _layers(model)]
    return jax.tree.structure(tuple(entries) if isinstance(model, bptt_jax.Stack) else entries[0])


def _reversal_index(mask):
    """``idx (T, B)``: step s of example b's reversed sequence reads original step idx[s, b]
    (the valid prefix backwards, then the padding in place)."""
    m = np.asarray(mask)
    lens, s = m.sum(0), np.arange(m.shape[0])[:, None]
    return np.where(s < lens, lens - 1 - s, s)


def _reversed(a, idx):
    return a[idx, np.arange(a.shape[1])[None, :]]


def _cell_scan(cell, p, xs, c0, eps, eps_c, mask, resets, cuts, clip):
    """A plain scan of ``ref.step``: reset, (truncation: no gradient into the entering carry
    at a cut), step, mask pass-through, then ``eps[t]`` added to h_t and ``eps_c[t]`` to the
    LSTM's c_t, then per-step error clipping. Returns ``(hs, carry_T)``."""

    def body(carry, inp):
        x, e, ec, m_t, r_t, cut_t = inp
        carry = jax.tree.map(lambda c: jnp.where(r_t[:, None], 0.0, c).astype(c.dtype), carry)
        carry = jax.tree.map(lambda c: jnp.where(cut_t, jax.lax.stop_gradient(c), c), carry)
        new = ref.step(cell, p, carry, x)
        new = jax.tree.map(lambda a, b: jnp.where(m_t[:, None], a, b), new, carry)
        if isinstance(new, bptt_jax.LSTMCarry):
            new = new._replace(h=new.h + e, c=new.c + ec)
        else:
            new = new + e
        if clip is not None:
            new = ref.clip_error(new, clip)
        return new, ref.hidden(new)

    carry_t, hs = jax.lax.scan(body, c0, (xs, eps, eps_c, mask, resets, cuts))
    return hs, carry_t


def _model_scan(model, params, xs, c0, eps, eps_c, mask, resets=None, cuts=None, clip=None):
    """``(hs, final hidden state per cell)``; ``eps``, ``eps_c``: lists, one (T, B, H) per
    cell, in forward time."""
    t_len, b = xs.shape[:2]
    no_resets = jnp.zeros((t_len, b), bool)
    resets = no_resets if resets is None else resets
    cuts = jnp.zeros((t_len,), bool) if cuts is None else cuts
    stack = isinstance(model, bptt_jax.Stack)
    ps, cs = (params, c0) if stack else ((params,), (c0,))
    x, finals, i = xs, [], 0
    for layer, p, c in zip(_layers(model), ps, cs):
        if isinstance(layer, bptt_jax.Bidirectional):
            idx = _reversal_index(mask)
            hf, cf = _cell_scan(
                layer.forward, p[0], x, c[0], eps[i], eps_c[i], mask, no_resets, cuts, clip
            )
            rev = lambda a: _reversed(a, idx)  # noqa: E731
            hr, cb = _cell_scan(
                layer.backward, p[1], rev(x), c[1], rev(eps[i + 1]), rev(eps_c[i + 1]), mask,
                no_resets, cuts, clip,
            )  # fmt: skip
            x = ref.merge_outputs(layer.merge, hf, rev(hr))
            finals += [ref.hidden(cf), ref.hidden(cb)]
            i += 2
        else:
            x, c_t = _cell_scan(layer, p, x, c, eps[i], eps_c[i], mask, resets, cuts, clip)
            finals.append(ref.hidden(c_t))
            i += 1
    return x, finals


def _model_problem(name, key, t=6, b=3, d=2, o=3):
    """Float64 params, readout, inputs, integer targets, random carry, a mask (lengths t,
    t-2, t-4), a loss mask and, for unidirectional models only, resets."""
    model = MODELS[name]
    ks = jax.random.split(key, 7)
    params = model.init(ks[0], d, jnp.float64)
    hs_size = model.output_size
    ro = bptt_jax.init_readout(ks[1], hs_size, o, jnp.float64)
    xs = jax.random.normal(ks[2], (t, b, d), jnp.float64)
    tg = jax.random.randint(ks[3], (t, b), 0, o)
    c0 = ref.random_like(ks[4], model.zero_carry(b, jnp.float64))
    m = jnp.arange(t)[:, None] < jnp.array([t, t - 2, t - 4][:b])
    lm = jax.random.bernoulli(ks[5], 0.6, (t, b)).at[0].set(True)
    bi = isinstance(model, bptt_jax.Bidirectional) or model.bidirectional
    r = None if bi else jax.random.bernoulli(ks[6], 0.15, (t, b)).at[0].set(False)
    return model, params, ro, xs, tg, c0, m, lm, r


def _zeros_per_cell(model, xs):
    return [jnp.zeros(xs.shape[:2] + (c.hidden_size,), xs.dtype) for c in _model_cells(model)]


def _model_jacobian_reference(model, p, xs, c0, m, r):
    """``||dh_T/d carry_t||_F`` (T, B) per cell: ``jax.jacrev`` of each cell's final hidden
    state w.r.t. the perturbations of its own h_t (and c_t)."""
    eps = _zeros_per_cell(model, xs)
    finals = lambda e, ec: _model_scan(model, p, xs, c0, e, ec, m, r)[1]  # noqa: E731
    jacs = jax.jit(jax.jacrev(finals, argnums=(0, 1)))(eps, eps)  # [output i](d eps, d eps_c)
    b = xs.shape[1]
    out = []
    for i in range(len(eps)):
        total = 0
        for jac in (jacs[i][0][i], jacs[i][1][i]):  # (B, H, T, B, H); w.r.t. c: 0 but LSTMs
            own = jnp.stack([jac[j, :, :, j, :] for j in range(b)], axis=-1)  # (H, T, H, B)
            total = total + jnp.sum(own**2, axis=(0, 2))
        out.append(jnp.sqrt(total))
    return out


@pytest.mark.parametrize(
    "name,clipped,fused",
    [
        pytest.param("stack", False, False, id="stack", marks=pytest.mark.slow),
        pytest.param("stack-bi", False, False, id="stack-bi"),
        pytest.param("stack-bi", False, True, id="stack-bi-fused-directions"),
        pytest.param("bidirectional", True, False, id="bidirectional-delta_clip"),
    ],
)
def test_model_flow_jacobians_and_horizons_per_layer_and_direction_match_autodiff(
    name, clipped, fused, key, trace_env
):
    """gradient_flow, jacobian_norms and effective_horizon of a model, cell by cell (with
    ``fused``: its Bidirectional GRU layer runs both directions as one scan)."""
    with trace_env("BPTT_JAX_FUSE_DIRECTIONS", "1" if fused else "0"):
        _check_model_flow(name, clipped, key)


def _check_model_flow(name, clipped, key):
    model, p, ro, xs, tg, c0, m, lm, r = _model_problem(name, key)
    clip = 0.05 if clipped else None

    def loss(eps):
        hs, _ = _model_scan(model, p, xs, c0, eps, _zeros_per_cell(model, xs), m, r, clip=clip)
        per = optax.softmax_cross_entropy_with_integer_labels(hs @ ro.w_hy + ro.b_y, tg)
        w = (m & lm).astype(xs.dtype)
        return jnp.sum(per * w) / jnp.sum(w)

    value, grads = jax.jit(jax.value_and_grad(loss))(_zeros_per_cell(model, xs))
    deltas = [jnp.linalg.norm(g, axis=-1) for g in grads]
    jacs = _model_jacobian_reference(model, p, xs, c0, m, r)
    cells = _model_cells(model)

    flow = diagnostics.gradient_flow(
        model, p, ro, xs, tg, c0, mask=m, loss_mask=lm, resets=r, delta_clip=clip, fraction=0.2
    )
    is_flow = lambda x: isinstance(x, diagnostics.GradientFlow)  # noqa: E731
    assert jax.tree.structure(flow, is_leaf=is_flow) == _cell_structure(model)
    flows = jax.tree.leaves(flow, is_leaf=is_flow)
    assert len(flows) == len(deltas) == len(jacs) == len(cells)
    for i, (f, d, j) in enumerate(zip(flows, deltas, jacs)):
        assert f.delta_norms.shape == f.jacobian_norms.shape == xs.shape[:2], i
        assert f.delta_norms.dtype == f.jacobian_norms.dtype == jnp.float64
        assert ref.rel_err(f.value, value) <= 1e-12
        assert ref.rel_err(f.delta_norms, d) <= 1e-12, i
        assert ref.rel_err(f.delta_norm, d.mean(1)) <= 1e-12, i
        assert ref.rel_err(f.jacobian_norms, j) <= 1e-12, i
        assert ref.rel_err(f.jacobian_norm, j.mean(1)) <= 1e-12, i
        assert f.horizon.dtype == jnp.int32
        assert int(f.horizon) == _horizon_by_definition(np.asarray(j).mean(1), 0.2), i
        assert float(jnp.max(d)) > 0, i  # every cell gets some error
        if clipped:
            assert float(jnp.max(f.delta_norms)) <= clip * (1 + 1e-9), i
    if clipped:  # clipped somewhere (an unclipped norm would not land on the threshold)
        top = max(float(jnp.max(f.delta_norms)) for f in flows)
        np.testing.assert_allclose(top, clip, rtol=1e-9)

    # a reverse cell's final state is its state after reading x_0: ||I|| = sqrt(H) there,
    # and at padded steps, which pass it on
    per_layer = flow if isinstance(model, bptt_jax.Stack) else (flow,)
    for layer, f in zip(_layers(model), per_layer):
        if isinstance(layer, bptt_jax.Bidirectional):
            identity = np.sqrt(layer.backward.hidden_size)
            jb = np.asarray(f[1].jacobian_norms)
            np.testing.assert_allclose(jb[0], identity, rtol=1e-12)
            np.testing.assert_allclose(jb[~np.asarray(m)], identity, rtol=1e-12)
            assert np.all(jb[-1][np.asarray(m)[-1]] < identity)  # and it reaches later steps

    if name != "stack-bi":  # the standalone entry points once (each case is a compile)
        return
    got = diagnostics.jacobian_norms(model, p, xs, c0, mask=m, resets=r)
    assert jax.tree.structure(got) == _cell_structure(model)
    for i, (g, j) in enumerate(zip(jax.tree.leaves(got), jacs)):
        assert g.shape == xs.shape[:2] and g.dtype == jnp.float64, i
        assert ref.rel_err(g, j) <= 1e-12, i
    hor = diagnostics.effective_horizon(model, p, xs, c0, mask=m, resets=r, fraction=0.2)
    assert jax.tree.structure(hor) == _cell_structure(model)
    for i, (h, j) in enumerate(zip(jax.tree.leaves(hor), jacs)):
        assert h.dtype == jnp.int32 and h.shape == ()
        assert int(h) == _horizon_by_definition(np.asarray(j).mean(1), 0.2), i


def test_model_jacobian_norms_with_random_probes(key):
    """Each cell's Hutchinson estimate lands near its exact norm, deterministically."""
    model, p, _, xs, _, c0, m, _, _ = _model_problem("stack-bi", key)
    exact = jax.tree.leaves(diagnostics.jacobian_norms(model, p, xs, c0, mask=m))
    k = jax.random.fold_in(key, 1)
    est = diagnostics.jacobian_norms(model, p, xs, c0, mask=m, probes=300, key=k)
    assert jax.tree.structure(est) == _cell_structure(model)
    again = diagnostics.jacobian_norms(model, p, xs, c0, mask=m, probes=300, key=k)
    for a, b, e in zip(jax.tree.leaves(est), jax.tree.leaves(again), exact):
        np.testing.assert_array_equal(a, b)
        # sqrt(2/300) = 8% relative std on the squared norm: 30% is > 6 sigma on the norm
        assert 0 < np.max(np.abs(np.asarray(a) / np.asarray(e) - 1)) < 0.3


@MODEL_NAMES
def test_model_spectral_norms_per_cell_match_numpy_svd(name, key):
    model, p, *_ = _model_problem(name, key)
    got = diagnostics.spectral_norms(model, p)
    is_spec = lambda x: isinstance(x, diagnostics.SpectralNorms)  # noqa: E731
    assert jax.tree.structure(got, is_leaf=is_spec) == _cell_structure(model)
    cells = _model_cells(model)
    cell_params = jax.tree.leaves(p, is_leaf=lambda x: hasattr(x, "_fields"))
    specs = jax.tree.leaves(got, is_leaf=is_spec)
    assert len(specs) == len(cells) == len(cell_params)
    for cell, q, s in zip(cells, cell_params, specs):
        w = np.asarray(cell.recurrent_kernel(q))
        h = cell.hidden_size
        assert list(s.blocks) == list(diagnostics.BLOCK_NAMES[type(cell)])
        assert ref.rel_err(s.kernel, np.linalg.svd(w, compute_uv=False)[0]) <= 1e-12
        for i, gate in enumerate(s.blocks):
            sv = np.linalg.svd(w[:, i * h : (i + 1) * h], compute_uv=False)[0]
            assert ref.rel_err(s.blocks[gate], sv) <= 1e-12, gate


def test_model_truncation_bias_per_layer_matches_autodiff_of_the_truncated_scan(key):
    model, p, ro, xs, tg, c0, m, lm, r = _model_problem("stack", key, t=7)
    ks = [1, 3, 7, 9]

    @jax.jit
    def grads(k):  # per layer, flattened; k traced: the cuts are data
        t = jnp.arange(xs.shape[0])
        cuts = (t % k == 0) & (t > 0)

        def loss(p):
            eps = _zeros_per_cell(model, xs)
            hs, _ = _model_scan(model, p, xs, c0, eps, eps, m, r, cuts)
            per = optax.softmax_cross_entropy_with_integer_labels(hs @ ro.w_hy + ro.b_y, tg)
            w = (m & lm).astype(xs.dtype)
            return jnp.sum(per * w) / jnp.sum(w)

        g = jax.grad(loss)(p)
        return [jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(gl)]) for gl in g]

    full = [np.asarray(g) for g in grads(xs.shape[0])]
    bias = diagnostics.truncation_bias(
        model, p, ro, xs, tg, c0, ks=ks, mask=m, loss_mask=lm, resets=r
    )
    is_bias = lambda x: isinstance(x, diagnostics.TruncationBias)  # noqa: E731
    assert jax.tree.structure(bias, is_leaf=is_bias) == _cell_structure(model)
    assert len(bias) == 2
    for layer, b in enumerate(bias):
        assert b.ks.tolist() == ks
        assert ref.rel_err(b.full_norm, np.linalg.norm(full[layer])) <= 1e-12
    for i, k in enumerate(ks):
        g = [np.asarray(x) for x in grads(k)]
        for layer, b in enumerate(bias):
            f, gk = full[layer], g[layer]
            cos = gk @ f / (np.linalg.norm(gk) * np.linalg.norm(f))
            assert abs(float(b.cosine[i]) - cos) <= 1e-11, (k, layer)
            assert ref.rel_err(b.norm_ratio[i], np.linalg.norm(gk) / np.linalg.norm(f)) <= 1e-11
        # the whole model's numbers, from the layers' as the docstring says
        n = np.array([float(b.full_norm) for b in bias])
        rr = np.array([float(b.norm_ratio[i]) for b in bias])
        cc = np.array([float(b.cosine[i]) for b in bias])
        gk, f = np.concatenate(g), np.concatenate(full)
        whole = np.sum(cc * rr * n**2) / (np.sqrt(np.sum((rr * n) ** 2)) * np.sqrt(np.sum(n**2)))
        assert abs(whole - gk @ f / (np.linalg.norm(gk) * np.linalg.norm(f))) <= 1e-11, k
    assert all(float(b.cosine[0]) < 1 - 1e-3 for b in bias)  # k = 1 is biased in every layer
    for b in bias:
        np.testing.assert_allclose(b.cosine[-2:], 1, rtol=1e-11)  # k >= T


@pytest.mark.parametrize("name", ["bidirectional", "stack-bi"])
def test_truncation_bias_of_a_bidirectional_model_is_an_error(name, key):
    model, p, ro, xs, tg, c0, m, lm, _ = _model_problem(name, key)
    with pytest.raises(ValueError, match="truncation_bias: model is bidirectional"):
        diagnostics.truncation_bias(model, p, ro, xs, tg, c0, ks=[2], mask=m)


def test_model_params_errors_name_the_layer_and_direction(key):
    model = MODELS["stack-bi"]
    p = model.init(key, 2, jnp.float64)
    wrong = (p[0], (p[0][0],) * 2)  # layer 1 is an LSTM, not a pair of GRUs
    with pytest.raises(TypeError, match=r"spectral_norms: params\[1\] must be"):
        diagnostics.spectral_norms(model, wrong)
    with pytest.raises(TypeError, match=r"spectral_norms: params\[0\] must be a tuple of 2"):
        diagnostics.spectral_norms(model, (p[0][0], p[1]))
    xs = jnp.ones((4, 2, 2))
    with pytest.raises(TypeError, match=r"jacobian_norms: params\[1\] must be"):
        diagnostics.jacobian_norms(model, wrong, xs)
