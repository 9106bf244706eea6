"""Training: the optax step on the hand-written gradients, tasks, configs, checkpoints, CLI."""

import io
import json
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bptt_jax
from bptt_jax import losses, tasks, train, truncated
from bptt_jax.cli import config, saving, train_config
from bptt_jax.cli import fit as fit_loop
from bptt_jax.config import ConfigError
from tests import reference
from tests.reference import TOL, assert_trees_close
from tests.test_truncated import LR, sgd, stream

ROOT = pathlib.Path(__file__).resolve().parents[1]
SGD = train.OptimConfig(name="sgd", learning_rate=LR, momentum=0.0, clip="none")


def batch_of(xs, ys, mask=None, loss_mask=None, resets=None):
    return truncated.Batch(xs, ys, mask, loss_mask, resets)


def state_from(t, cell, p, ro, carry, dtype=jnp.float64):
    s = t.init(jax.random.key(0), 1, 1, 1, dtype)
    return s._replace(params=p, readout=ro, opt_state=t.tx.init((p, ro)), carry=carry)


@pytest.fixture
def optax_promotion():
    """optax's adam computes ``b1 ** count`` (float ** int32), which the suite's strict dtype
    promotion rejects; users run with JAX's standard promotion, and so do these tests."""
    with jax.numpy_dtype_promotion("standard"):
        yield


def cfg_of(*overrides):
    return config.load(train_config.Config, None, ["train.progress=false", *overrides])


# ----------------------------------------------------------------- the train step
def test_full_bptt_step_applies_the_hand_written_gradient_and_passes_the_carry_on(key):
    cell, dtype = bptt_jax.LSTM(5, forget_bias=1.0), jnp.float64
    p, ro, xs, ys, carry, mask, loss_mask, resets = stream(cell, key, dtype)
    t = train.trainer(cell, SGD)
    state = state_from(t, cell, p, ro, carry)
    new, metrics = t.step(state, batch_of(xs, ys, mask, loss_mask, resets))

    # the independent reference: jax.grad of a plain lax.scan (tests/reference.py)
    value, carry_ref, (gp, gro) = reference.loss_grads(
        cell, p, ro, xs, ys, carry, mask=mask, loss_mask=loss_mask, resets=resets, argnums=(0, 1)
    )
    assert_trees_close(new.params, jax.tree.map(lambda w, g: w - LR * g, p, gp), dtype)
    assert_trees_close(new.readout, jax.tree.map(lambda w, g: w - LR * g, ro, gro), dtype)
    assert_trees_close(new.carry, carry_ref, dtype)
    assert int(new.step) == 1
    assert {k: v.shape for k, v in metrics.items()} == {
        "loss": (1,), "grad_norm": (1,), "clipped": (1,), "skipped": (1,)
    }  # fmt: skip
    np.testing.assert_allclose(metrics["loss"][0], value, rtol=TOL[dtype])
    np.testing.assert_allclose(metrics["grad_norm"][0], optax.tree.norm((gp, gro)), rtol=1e-10)
    assert not metrics["clipped"][0] and metrics["skipped"][0] == 0


def test_tbptt_step_wiring_is_the_tbptt_driver_with_an_sgd_update(key):
    """Wiring: the trainer's TBPTT step is the library's own ``truncated.tbptt`` (which is
    checked against the definition in test_truncated.py)."""
    cell, dtype = bptt_jax.GRU(5), jnp.float64
    p, ro, xs, ys, carry, mask, loss_mask, resets = stream(cell, key, dtype)
    t = train.trainer(cell, SGD, k1=4, k2=7)
    batch = batch_of(xs, ys, mask, loss_mask, resets)
    new, metrics = t.step(state_from(t, cell, p, ro, carry), batch)
    ref = jax.jit(truncated.tbptt, static_argnums=0, static_argnames=("k1", "k2", "update"))(
        cell, p, ro, xs, ys, carry, k1=4, k2=7, update=sgd, update_state=0,
        mask=mask, loss_mask=loss_mask, resets=resets,
    )  # fmt: skip
    assert metrics["loss"].shape == (3,) and int(ref.update_state) == 3
    assert_trees_close(metrics["loss"], ref.aux, dtype)
    assert_trees_close(new.params, ref.params, dtype)
    assert_trees_close(new.readout, ref.readout, dtype)
    assert_trees_close(new.carry, ref.carry, dtype)


def test_clip_by_global_norm_scales_the_update_to_max_norm_and_reports_it(key):
    cell, dtype = bptt_jax.Elman(5), jnp.float64
    p, ro, xs, ys, carry, *_ = stream(cell, key, dtype)
    lg = losses.loss_and_grads(cell, p, ro, xs, ys, carry)
    norm = float(optax.tree.norm((lg.params, lg.readout)))
    for max_norm, clipped in [(norm / 10, True), (norm * 10, False)]:
        opt = train.OptimConfig(name="sgd", learning_rate=1.0, momentum=0.0, max_norm=max_norm)
        t = train.trainer(cell, opt)
        new, m = t.step(state_from(t, cell, p, ro, carry), batch_of(xs, ys))
        step = jax.tree.map(jnp.subtract, (p, ro), (new.params, new.readout))
        assert bool(m["clipped"][0]) is clipped
        np.testing.assert_allclose(m["grad_norm"][0], norm, rtol=1e-10)
        np.testing.assert_allclose(optax.tree.norm(step), min(norm, max_norm), rtol=1e-10)


def test_elementwise_clip_clips_every_gradient_entry(key):
    cell, dtype = bptt_jax.GRU(5), jnp.float64
    p, ro, xs, ys, carry, *_ = stream(cell, key, dtype)
    lg = losses.loss_and_grads(cell, p, ro, xs, ys, carry)
    c = 0.5 * float(jnp.max(jnp.abs(lg.params.w_h)))
    opt = train.OptimConfig(name="sgd", learning_rate=1.0, momentum=0.0, clip="value", max_norm=c)
    t = train.trainer(cell, opt)
    new, m = t.step(state_from(t, cell, p, ro, carry), batch_of(xs, ys))
    expected = jax.tree.map(lambda w, g: w - jnp.clip(g, -c, c), p, lg.params)
    assert_trees_close(new.params, expected, dtype)
    assert bool(m["clipped"][0])


@pytest.mark.parametrize("name", ["adam", "sgd", "adagrad", "rmsprop", "adamw"])
@pytest.mark.usefixtures("optax_promotion")
def test_optimizers_by_name_reduce_the_loss(name, key):
    cell, dtype = bptt_jax.GRU(5), jnp.float64
    p, ro, xs, ys, carry, *_ = stream(cell, key, dtype)
    lr = {"adagrad": 0.1, "sgd": 0.1}.get(name, 0.01)
    t = train.trainer(cell, train.OptimConfig(name=name, learning_rate=lr))
    state = state_from(t, cell, p, ro, carry)
    zero = jax.tree.map(jnp.zeros_like, carry)
    losses_seen = []
    for _ in range(5):
        state, m = t.step(state._replace(carry=zero), batch_of(xs, ys))
        losses_seen.append(float(m["loss"][0]))
    assert losses_seen[-1] < losses_seen[0]


@pytest.mark.usefixtures("optax_promotion")
def test_a_nonfinite_gradient_skips_the_update_and_is_counted(key):
    cell, dtype = bptt_jax.LSTM(5), jnp.float64
    p, ro, xs, ys, carry, *_ = stream(cell, key, dtype)
    t = train.trainer(cell, train.OptimConfig(learning_rate=0.01))
    state = state_from(t, cell, p, ro, carry)
    bad = xs.at[3, 1, 0].set(jnp.nan)
    state, m = t.step(state, batch_of(bad, ys))
    assert int(m["skipped"][0]) == 1 and not np.isfinite(m["grad_norm"][0])
    assert_trees_close(state.params, p, dtype)  # untouched
    # the stream goes on: example 1's NaN carry restarts from zeros, the others carry on
    # as from a clean batch (a NaN carry made every later batch NaN, then the params)
    clean_carry = t.step(state_from(t, cell, p, ro, carry), batch_of(xs, ys))[0].carry
    for got, want in zip(state.carry, clean_carry):
        np.testing.assert_array_equal(got[1], 0)
        np.testing.assert_array_equal(np.delete(got, 1, 0), np.delete(want, 1, 0))
    _, m = t.step(state, batch_of(xs, ys))
    assert np.isfinite(m["loss"][0]) and int(m["skipped"][0]) == 1
    state, m = t.step(state._replace(carry=carry), batch_of(xs, ys))
    assert int(m["skipped"][0]) == 1
    assert all(bool(jnp.all(jnp.isfinite(w))) for w in jax.tree.leaves(state.params))
    assert not np.allclose(state.params.w_h, p.w_h)
    # without apply_if_finite the same gradient destroys the params
    t = train.trainer(cell, train.OptimConfig(learning_rate=0.01, skip_nonfinite=False))
    state, m = t.step(state_from(t, cell, p, ro, carry), batch_of(bad, ys))
    assert int(m["skipped"][0]) == 0 and not bool(jnp.all(jnp.isfinite(state.params.w_h)))


def test_metrics_fn_adds_a_metric_per_update(key):
    cell, dtype = bptt_jax.Elman(5), jnp.float64
    p, ro, xs, ys, carry, *_ = stream(cell, key, dtype)
    counted = lambda p_, ro_, window, lg: {"tokens": jnp.sum(window.loss_mask)}
    t = train.trainer(cell, SGD, k1=4, metrics_fn=counted)
    _, m = t.step(state_from(t, cell, p, ro, carry), batch_of(xs, ys))
    np.testing.assert_array_equal(m["tokens"], [4 * 3, 4 * 3, 3 * 3])


def test_bad_trainer_arguments_and_batches_raise_before_the_step_runs(key):
    cell, dtype = bptt_jax.Elman(5), jnp.float64
    with pytest.raises(ValueError, match="trainer: loss must be one of"):
        train.trainer(cell, loss="ce")
    with pytest.raises(ValueError, match="trainer: reduction must be one of"):
        train.trainer(cell, reduction="avg")
    p, ro, xs, ys, carry, *_ = stream(cell, key, dtype)
    t = train.trainer(cell, SGD)
    o = ro.w_hy.shape[1]
    # inside jit a target out of range is a silent NaN loss and a skipped update; host
    # (NumPy) targets are checked before it (device ones are not read back every step)
    bad = np.asarray(ys).copy()
    bad[2, 0] = o
    with pytest.raises(ValueError, match=rf"targets must lie in \[0, O\) = \[0, {o}\)"):
        t.step(state_from(t, cell, p, ro, carry), batch_of(xs, bad))
    masked = np.ones(ys.shape, bool)
    masked[2, 0] = False  # not counted: no error
    t.step(state_from(t, cell, p, ro, carry), batch_of(xs, bad, loss_mask=masked))
    for fn, exc, match in (
        (lambda *a: 1.0, TypeError, "metrics_fn must return a dict"),
        (lambda *a: {"loss": jnp.zeros(())}, ValueError, r"metrics_fn returns \['loss'\]"),
    ):
        t = train.trainer(cell, SGD, metrics_fn=fn)
        with pytest.raises(exc, match=match):
            t.step(state_from(t, cell, p, ro, carry), batch_of(xs, ys))


def test_bad_k1_k2_in_the_trainer_raise_naming_the_argument():
    with pytest.raises(ValueError, match="k1 must be <= k2"):
        train.trainer(bptt_jax.GRU(2), k1=5, k2=3)
    with pytest.raises(ValueError, match="k1 must be a positive int"):
        train.trainer(bptt_jax.GRU(2), k1=0)
    with pytest.raises(ValueError, match="k2 needs k1"):
        train.trainer(bptt_jax.GRU(2), k2=4)


# ----------------------------------------------------------------- tasks
def test_adding_problem_batches():
    task = tasks.AddingTask(seq_len=30)
    b = task.batch(jax.random.key(0), 7, 64)
    assert b.xs.shape == (30, 64, 2) and b.targets.shape == (30, 64, 1)
    values, marks = np.asarray(b.xs[..., 0]), np.asarray(b.xs[..., 1])
    assert (marks.sum(0) == 2).all() and (marks[:15].sum(0) == 1).all()
    np.testing.assert_allclose(b.targets[-1, :, 0], (values * marks).sum(0), rtol=1e-6)
    np.testing.assert_array_equal(
        b.loss_mask, np.broadcast_to(np.arange(30)[:, None] == 29, (30, 64))
    )
    np.testing.assert_array_equal(b.resets, np.broadcast_to(np.arange(30)[:, None] == 0, (30, 64)))
    again = task.batch(jax.random.key(0), 7, 64)
    np.testing.assert_array_equal(again.xs, b.xs)  # a function of (key, step)
    assert not np.array_equal(task.batch(jax.random.key(0), 8, 64).xs, b.xs)
    test = task.test_set()
    baseline = float(jnp.mean((test.targets[-1] - 1.0) ** 2))
    assert abs(baseline - 1 / 6) < 0.02


def test_recall_targets_are_the_inputs_delay_steps_earlier_across_chunks():
    task = tasks.RecallTask(seq_len=12, delay=5, alphabet=6)
    key = jax.random.key(3)
    b0, b1 = task.batch(key, 0, 4), task.batch(key, 1, 4)
    syms = jnp.argmax(jnp.concatenate([b0.xs, b1.xs]), -1)
    targets = jnp.concatenate([b0.targets, b1.targets])
    np.testing.assert_array_equal(targets[5:], syms[:-5])
    np.testing.assert_array_equal(
        b0.loss_mask, np.broadcast_to(np.arange(12)[:, None] >= 5, (12, 4))
    )
    assert b1.loss_mask.all()


def test_charlm_readers_stream_through_the_text_with_a_reset_at_its_start(tmp_path):
    text = "abcab\ncba"  # one document of 9 characters
    path = tmp_path / "tiny.txt"
    path.write_text(text, encoding="utf-8")
    task = tasks.CharLMTask(corpus=str(path), seq_len=5, valid_fraction=0.0, prime="a")
    assert task.vocab == "\nabc" and task.input_size == task.output_size == 4
    b = task.batch(jax.random.key(0), 2, 3)
    for col in range(3):
        x = task.decode(np.argmax(b.xs[:, col], -1))
        y = task.decode(b.targets[:, col])
        assert x[1:] == y[:-1]  # the target is the next character
        p0 = (text * 3).find(x + y[-1]) % len(text)  # the reader wraps around the text
        assert p0 >= 0
        pos = (p0 + np.arange(5)) % len(text)
        np.testing.assert_array_equal(b.resets[:, col], pos == 0)  # a document starts
        np.testing.assert_array_equal(b.loss_mask[:, col], pos != len(text) - 1)


def test_charlm_document_boundaries():
    task = tasks.CharLMTask(seq_len=64, eval_len=50, eval_streams=2, sample_len=0)
    starts = np.nonzero(task._starts[: task.n_train])[0]
    b = task.batch(jax.random.key(1), 0, 1024)
    ids = np.asarray(jnp.argmax(b.xs, -1))
    resets, lm, tg = np.asarray(b.resets), np.asarray(b.loss_mask), np.asarray(b.targets)
    first_chars = {task._ids[s] for s in starts}
    assert resets.any() and (~lm).any()
    assert set(ids[resets]) <= first_chars
    # at every step, the target is the next character of the stream
    np.testing.assert_array_equal(tg[:-1], ids[1:])
    assert not (lm[:-1] & resets[1:]).any()  # never predict a document's first character


def test_sampler_is_deterministic_per_key_and_greedy_at_temperature_zero(key):
    cell = bptt_jax.GRU(8)
    p, ro = cell.init(key, 5), bptt_jax.init_readout(jax.random.key(1), 8, 5)
    prime = jnp.array([1, 4, 2])
    a = tasks.sample(cell, p, ro, jax.random.key(2), prime, 12)
    assert a.shape == (12,) and ((0 <= a) & (a < 5)).all()
    np.testing.assert_array_equal(a, tasks.sample(cell, p, ro, jax.random.key(2), prime, 12))
    greedy = tasks.sample(cell, p, ro, jax.random.key(2), prime, 6, temperature=0.0)
    carry, tok, out = cell.zero_carry(1), prime[:1], []
    for i in range(3 + 6 - 1):  # a plain loop over cell.step, argmax after the prime
        carry, h = cell.step(p, carry, jax.nn.one_hot(tok, 5, dtype=jnp.float32))
        tok = prime[i + 1 : i + 2] if i + 1 < 3 else jnp.argmax(h @ ro.w_hy + ro.b_y, -1)
        if i + 1 >= 3:
            out.append(int(tok[0]))
    np.testing.assert_array_equal(greedy, out)


# ----------------------------------------------------------------- configs
@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["train.stepz=3"], "unknown key 'train.stepz'"),
        (["train.steps=ten"], "'train.steps' must be int"),
        (["model.cell=rnn"], "'model.cell' must be one of"),
        (["train.k1=8", "train.k2=4"], r"'train.k1' \(8\) must be <= 'train.k2' \(4\)"),
        (["train.k1=0"], "'train.k1' must be a positive int"),
        (["train.k1=4", "train.k2=-2"], "'train.k2' must be a positive int"),
        (["train.k2=4"], "'train.k2' needs 'train.k1'"),
        (["optim.name=adamz"], "'optim.name' must be one of"),
        (["optim.learning_rate=-1"], "'optim.learning_rate' must be positive"),
        (["task=charlm", "charlm.corpus=/no/such/file.txt"], "'charlm.corpus' file"),
        (["task=recall", "recall.delay=60"], "'recall.delay' .* must be < 'recall.seq_len'"),
        (["checkpoint.every=5"], "'checkpoint.every' needs 'checkpoint.dir'"),
        # NaN and inf pass every `<= 0` test: a run would end silently with NaN params
        (["optim.learning_rate=nan"], "'optim.learning_rate' must be a finite number"),
        (["optim.max_norm=inf"], "'optim.max_norm' must be a finite number"),
        (["optim.name=sgd", "optim.momentum=nan"], "'optim.momentum' must be a finite"),
        (["model.forget_bias=-inf"], "'model.forget_bias' must be a finite number"),
        # lbfgs's update needs the loss and its function, which the trainer does not pass
        (["optim.name=lbfgs"], "'optim.name' must be .* not lbfgs"),
        (["seed=-1"], r"'seed' must be in \[0, 2\*\*32\)"),
        (["seed=4294967296"], r"'seed' must be in \[0, 2\*\*32\)"),
        (
            ["task=charlm", "charlm.valid_fraction=0"],
            r"'charlm.valid_fraction' must be in \(0, 1\)",
        ),
        (["train.log_file=/no/such/dir/log.jsonl"], "'train.log_file' .* does not exist"),
        (["adding.seq_len=99999999999999999999"], "'adding.seq_len' is out of range"),
        (["train.k1=99999999999999999999"], "'train.k1' must be int or none"),
        # nonsense that the types let through
        (["optim.name=sgd", "optim.momentum=5"], r"'optim.momentum' must be in \[0, 1\)"),
        (["optim.momentum=1"], r"'optim.momentum' must be in \[0, 1\)"),
        (["model.forget_bias=1e300"], "'model.forget_bias' must be a finite number that model"),
        # a window past the sequence is padding only: refused, not silently many times slower
        (["train.k1=101"], r"'train.k1' \(101\) must be <= 'adding.seq_len' \(100\)"),
        (["train.k1=1000000000000"], r"'train.k1' \(1000000000000\) must be <= 'adding.seq_len'"),
        (["model.num_layers=100000"], "'model.num_layers' must be <= 1000"),
        # the linear cells' settings: an error for a cell without them, never ignored
        (["model.scan=parallel"],
         "'model.scan' applies to model.cell mingru, minlstm, rglru, lru, not to 'lstm'"),
        (["model.cell=mingru", "model.c=4"], "'model.c' applies to model.cell rglru, not to "
         "'mingru'"),
        (["model.cell=rglru", "model.scan=fast"],
         "'model.scan' must be 'auto' | 'parallel' | 'sequential' or none; got 'fast'"),
        (["model.cell=rglru", "model.c=0"], r"'model.c' must be positive \(or none\); got 0.0"),
        (["model.cell=rglru", "model.c=-2.5"], r"'model.c' must be positive .*; got -2.5"),
        (["model.cell=rglru", "model.c=1e300"], "'model.c' must be a number that model.dtype"),
    ],
)  # fmt: skip
def test_config_errors_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        train_config.build(cfg_of(*overrides))


@pytest.mark.parametrize(
    ("overrides", "cell"),
    [
        (["model.cell=rglru", "model.scan=parallel", "model.c=4"],
         bptt_jax.RGLRU(128, c=4.0, scan="parallel")),
        (["model.cell=mingru", "model.scan=sequential"], bptt_jax.MinGRU(128, scan="sequential")),
        (["model.cell=minlstm", "model.scan=none"], bptt_jax.MinLSTM(128)),
        (["model.cell=rglru", "model.num_layers=2", "model.c=2"],
         bptt_jax.stacked(bptt_jax.RGLRU(128, c=2.0), 2)),
    ],
)  # fmt: skip
def test_the_linear_cells_scan_and_c_are_config_settings(overrides, cell):
    """``model.scan`` and ``model.c`` reach the cell the trainer trains (every layer's)."""
    _, built, _ = train_config.build(cfg_of(*overrides))
    assert built == cell


def test_a_config_file_that_is_not_utf8_is_one_error_naming_the_file(tmp_path):
    f = tmp_path / "latin1.toml"
    f.write_bytes("seed = 1\n# caf\xe9\n".encode("latin-1"))  # was a UnicodeDecodeError
    with pytest.raises(ConfigError, match=r"latin1.toml is not UTF-8 text .* 0xe9 on line 2"):
        config.load(train_config.Config, f)


def test_a_directory_as_the_corpus_is_named_as_one(tmp_path):
    with pytest.raises(ConfigError, match=r"'charlm.corpus' '.*' is a directory; give a UTF-8"):
        train_config.build(cfg_of("task=charlm", f"charlm.corpus={tmp_path}"))


def test_a_checkpoint_dir_that_is_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "afile").write_text("x")
    for d in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(ConfigError, match="'checkpoint.dir' .* is a file"):
            train_config.build(cfg_of(f"checkpoint.dir={d}"))


def test_float64_params_need_x64_mode_instead_of_silently_becoming_float32():
    with jax.enable_x64(False):
        with pytest.raises(ConfigError, match="'model.dtype' float64 needs JAX's 64-bit mode"):
            train_config.build(cfg_of("model.dtype=float64"))
    train_config.build(cfg_of("model.dtype=float64"))  # the suite runs with x64 on


def test_optim_config_built_in_python_is_checked_like_a_file():
    with pytest.raises(ConfigError, match="'optim.clip' must be one of"):
        train.trainer(bptt_jax.GRU(4), train.OptimConfig(clip="foo"))
    with pytest.raises(ConfigError, match="'optim.max_norm' must be positive"):
        train.make_optimizer(train.OptimConfig(max_norm=0.0))


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model.hidden_size=10000000"], "model.hidden_size"),
        (["model.hidden_size=100000"], "model.hidden_size"),
        (["train.batch_size=1000000000"], "train.batch_size"),
        (["adding.seq_len=1000000000"], "adding.seq_len"),
        (["adding.test_size=1000000000000"], "adding.test_size"),
        (["task=recall", "recall.alphabet=100000000"], "recall.alphabet"),
        (["train.k1=4", "train.k2=1000000000000"], "train.k2"),
        (["model.num_layers=1000", "model.hidden_size=4096"], "model.num_layers"),
    ],
)
def test_sizes_that_cannot_fit_in_memory_are_refused_naming_the_key(overrides, key, monkeypatch):
    """Before any work (they used to hang or end in a long traceback): the estimate of the
    params, optimizer state and one batch against the memory (64 GiB here, on any machine)."""
    monkeypatch.setattr(config, "available_memory", lambda: 64 * 2**30)
    k = re.escape(key)
    match = rf"'{k}' = \d+ makes the run too big .* 64 GiB; reduce '{k}'"
    with pytest.raises(ConfigError, match=match):
        train_config.build(cfg_of(*overrides))


@pytest.mark.parametrize(
    "overrides",
    [
        (),  # adding, LSTM, adam
        ("model.cell=gru", "model.num_layers=3", "optim.name=sgd"),
        (
            "model.cell=elman",
            "model.bidirectional=true",
            "model.num_layers=2",
            "optim.name=rmsprop",
        ),  # fmt: skip
        (
            "task=recall",
            "recall.alphabet=5",
            "model.num_layers=2",
            "model.dtype=float64",
            "optim.name=adagrad",
            "train.k1=4",
        ),  # fmt: skip
        ("model.cell=mingru",),  # the linear recurrences: no recurrent kernel
        ("model.cell=minlstm", "model.num_layers=2", "train.k1=10"),
        ("model.cell=rglru", "model.bidirectional=true", "model.num_layers=2"),
    ],
)
def test_footprint_counts_the_params_and_the_optimizer_state_exactly(overrides):
    cfg = cfg_of("model.hidden_size=6", *overrides)
    task, _, t = train_config.build(cfg)
    dtype = jnp.dtype(cfg.model.dtype)
    state = jax.eval_shape(
        lambda k: t.init(k, task.input_size, task.output_size, 2, dtype), jax.random.key(0)
    )

    def nbytes(leaves):
        return sum(x.size * x.dtype.itemsize for x in leaves)

    params = nbytes(jax.tree.leaves((state.params, state.readout)))
    slots = nbytes([x for x in jax.tree.leaves(state.opt_state) if x.ndim])  # not the counts
    assert slots >= params if cfg.optim.name != "sgd" or cfg.optim.momentum else True
    assert train_config.footprint(cfg).params == 2 * params + slots  # params, gradient, state


def test_the_shipped_configs_fit_a_small_machine(monkeypatch):
    """The estimate does not refuse what runs: every shipped config within 1 GiB."""
    monkeypatch.setattr(config, "available_memory", lambda: 2**30)
    for name in ("adding", "recall", "charlm"):
        cfg = config.load(train_config.Config, name)
        train_config.check_config(cfg)
        assert train_config.footprint(cfg).total < 2**27


def test_shipped_configs_load_and_build():
    for name in ("adding", "recall", "charlm"):
        cfg = config.load(train_config.Config, name)
        assert cfg.task == name
        train_config.build(cfg)
    assert config.load(train_config.Config, "adding").adding.seq_len == 100


# ----------------------------------------------------------------- checkpoints
TINY_RECALL = (
    "task=recall",
    "recall.seq_len=12",
    "recall.delay=3",
    "recall.test_len=20",
    "recall.test_size=4",
    "model.cell=lstm",
    "model.hidden_size=8",
    "train.batch_size=4",
    "train.k1=4",
    "train.k2=6",
    "train.log_every=1",
    "train.eval_every=0",
)


class Killed(Exception):
    pass


@pytest.mark.usefixtures("optax_promotion")
def test_a_run_killed_mid_way_and_resumed_ends_with_the_same_params(tmp_path):
    """Checkpoint every 3 of 10 steps; die after step 8; a new run resumes from step 6."""
    quiet = dict(out=io.StringIO())
    whole = fit_loop.fit(cfg_of(*TINY_RECALL, "train.steps=10"), **quiet).state

    def die_at_8(step, rec):
        if rec["kind"] == "train" and step == 8:
            raise Killed

    ck = [f"checkpoint.dir={tmp_path / 'ck'}", "checkpoint.every=3"]
    cfg = cfg_of(*TINY_RECALL, "train.steps=10", *ck)
    with pytest.raises(Killed):
        fit_loop.fit(cfg, hooks=[die_at_8], **quiet)
    assert saving.latest_step(tmp_path / "ck") == 6
    out = io.StringIO()
    resumed = fit_loop.fit(cfg, out=out).state
    assert "resumed from" in out.getvalue() and "at step 6" in out.getvalue()
    assert int(resumed.step) == 10
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(whole)):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(a, b)  # bit for bit: params, opt state, carry, step


TINY_ADDING = (
    "adding.seq_len=6",
    "adding.test_size=4",
    "model.hidden_size=4",
    "train.batch_size=2",
    "train.steps=2",
    "train.progress=false",
)


@pytest.mark.usefixtures("optax_promotion")
def test_a_finished_run_run_again_resumes_at_its_end_and_saves_nothing_new(tmp_path):
    """Running the same config twice (or resuming at or past train.steps) evaluates the
    restored state and ends; it used to die saving a step that existed."""
    ck = f"checkpoint.dir={tmp_path / 'ck'}"
    first = fit_loop.fit(cfg_of(*TINY_ADDING, ck), out=io.StringIO())
    out = io.StringIO()
    again = fit_loop.fit(cfg_of(*TINY_ADDING, ck), out=out)
    assert "resumed from" in out.getvalue() and "at step 2" in out.getvalue()
    assert int(again.state.step) == 2 and saving.Checkpointer(tmp_path / "ck").all_steps() == [2]
    np.testing.assert_array_equal(again.state.params.w_h, first.state.params.w_h)
    fewer = fit_loop.fit(cfg_of(*TINY_ADDING, ck, "train.steps=1"), out=io.StringIO())
    assert int(fewer.state.step) == 2


@pytest.mark.usefixtures("optax_promotion")
def test_resuming_refuses_another_problem_and_reports_changed_optimizer_settings(tmp_path):
    ck = f"checkpoint.dir={tmp_path / 'ck'}"
    fit_loop.fit(cfg_of(*TINY_ADDING, ck, "model.cell=elman"), out=io.StringIO())
    # the same shapes, another problem: another activation, another seed
    for other, what in (("model.activation=relu", "model.activation: 'tanh' -> 'relu'"),
                        ("seed=7", "seed: 0 -> 7")):  # fmt: skip
        with pytest.raises(ConfigError, match=re.escape(what)):
            fit_loop.fit(cfg_of(*TINY_ADDING, ck, "model.cell=elman", other), out=io.StringIO())
    out = io.StringIO()
    more = cfg_of(*TINY_ADDING, ck, "model.cell=elman", "train.steps=3", "optim.learning_rate=0.01")
    assert int(fit_loop.fit(more, out=out).state.step) == 3
    assert "changed settings: optim.learning_rate: 0.001 -> 0.01" in out.getvalue()
    # resume=false would mix a new run's checkpoints with the old ones: refused, nothing lost
    with pytest.raises(ConfigError, match=r"holds checkpoints \(steps \[2, 3\]\)"):
        fit_loop.fit(cfg_of(*TINY_ADDING, ck, "checkpoint.resume=false"), out=io.StringIO())
    assert saving.latest_step(tmp_path / "ck") == 3


@pytest.mark.usefixtures("optax_promotion")
def test_checkpoint_round_trip_keeps_every_field(tmp_path):
    cell = bptt_jax.LSTM(4)
    t = train.trainer(cell, train.OptimConfig(), k1=2)
    state = t.init(jax.random.key(5), 3, 2, 2, jnp.float64)
    xs = jax.random.normal(jax.random.key(6), (6, 2, 3), jnp.float64)
    state, _ = t.step(state, batch_of(xs, jnp.ones((6, 2), jnp.int32)))
    with saving.Checkpointer(tmp_path, keep=2) as c:
        for _ in range(3):
            c.save(state, {"hello": [1, 2]})
            state = state._replace(step=state.step + 1)
        assert c.all_steps() == [2, 3]  # keep=2
        restored, meta = c.restore(state, step=3)
    assert meta == {"hello": [1, 2]}
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert isinstance(restored.carry, bptt_jax.LSTMCarry)
    assert int(restored.step) == 3
    assert_trees_close(restored.params, state.params, jnp.float64)
    np.testing.assert_array_equal(jax.random.key_data(restored.key), jax.random.key_data(state.key))
    assert not list(pathlib.Path(tmp_path).glob("*tmp*"))  # nothing half-written left
    with pytest.raises(FileExistsError, match="step 3 already exists"):
        saving.save(tmp_path, state._replace(step=state.step - 1))
    host, _ = c_restore_on_host(tmp_path, state)
    assert int(host.step) == 3 and isinstance(host.params.w_h, jax.Array)
    with pytest.raises(FileNotFoundError, match="no directory"):
        saving.restore(tmp_path / "missing", state)
    assert not (tmp_path / "missing").exists()
    other = t.init(jax.random.key(5), 3, 2, 5, jnp.float64)  # batch size 5: another carry
    with pytest.raises(saving.CheckpointMismatch, match=r"\.carry\.h: \(2, 4\)"):
        saving.restore(tmp_path, other)


def c_restore_on_host(directory, state):
    """Restore into a ``like`` fetched to the host (NumPy leaves, no shardings)."""
    return saving.restore(directory, jax.device_get(state))


# ------------------------------------------------------------------------------- CLI
def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "bptt_jax", "train", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def test_cli_trains_a_tiny_config(tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(
        'task = "adding"\n[adding]\nseq_len = 10\ntest_size = 16\n'
        "[model]\nhidden_size = 8\n[train]\nsteps = 4\nbatch_size = 4\nlog_every = 2\n"
    )
    out = _cli(str(cfg), "train.k1=5", "train.progress=false", "optim.name=rmsprop")
    assert out.returncode == 0, out.stderr
    assert "done: 4 steps" in out.stdout and "mse=" in out.stdout


def test_cli_config_errors_exit_2_before_any_work(tmp_path):
    out = _cli("adding", "train.k1=9", "train.k2=3")
    assert out.returncode == 2
    assert "'train.k1' (9) must be <= 'train.k2' (3)" in out.stderr
    assert "step" not in out.stdout
    out = _cli("charlm", f"charlm.corpus={tmp_path / 'missing.txt'}")
    assert out.returncode == 2 and "'charlm.corpus' file" in out.stderr


@pytest.mark.usefixtures("optax_promotion")
def test_the_loop_logs_the_effective_horizon_and_the_pre_clip_gradient_norm():
    cfg = cfg_of(*TINY_RECALL, "train.steps=4", "train.horizon_every=2", "train.progress=false")
    history = fit_loop.fit(cfg, out=io.StringIO()).history
    logged = [r for r in history if r["kind"] == "train"]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    assert ["horizon" in r for r in logged] == [False, True, False, True]
    for r in logged:
        assert r["grad_norm"] > 0 and np.isfinite(r["grad_norm"])
        if "horizon" in r:
            assert isinstance(r["horizon"], int) and 1 <= r["horizon"] <= 12  # recall.seq_len


@pytest.mark.usefixtures("optax_promotion")
def test_the_horizon_of_a_diverged_run_is_undefined_and_logged_as_null(tmp_path, monkeypatch):
    """NaN params (a run whose norms went NaN) give the sentinel -1 from the jitted
    _horizon, for a cell and for a model with one NaN layer; the loop logs it as null."""
    xs = jax.random.normal(jax.random.key(1), (12, 8, 3), jnp.float32)
    key = jax.random.key(2)
    for cell in (bptt_jax.LSTM(4), bptt_jax.stacked(bptt_jax.GRU(4), 2)):
        p = cell.init(jax.random.key(0), 3)
        assert 1 <= int(fit_loop._horizon(cell, p, xs, key)) <= 12
        leaves, tdef = jax.tree.flatten(p)
        leaves[0] = jnp.full_like(leaves[0], jnp.nan)  # one layer's input kernel
        assert int(fit_loop._horizon(cell, jax.tree.unflatten(tdef, leaves), xs, key)) == -1

    monkeypatch.setattr(fit_loop, "_horizon", lambda *a: jnp.int32(-1))  # as it is, diverged
    log = tmp_path / "log.jsonl"
    cfg = cfg_of(*TINY_RECALL, "train.steps=2", "train.horizon_every=2", f"train.log_file={log}")
    history = fit_loop.fit(cfg, out=io.StringIO()).history
    assert [r.get("horizon", "-") for r in history if r["kind"] == "train"] == ["-", None]
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r.get("horizon", "-") for r in logged if r["kind"] == "train"] == ["-", None]
    assert '"horizon": null' in log.read_text()


# ----------------------------------------------------------------- models
def model_stream(model, key, dtype, t_len=9, b=3, d=4, o=3):
    from tests import reference as ref

    ks = jax.random.split(key, 6)
    p = ref.random_like(ks[0], model.init(ks[0], d, dtype))
    ro = bptt_jax.init_readout(ks[1], model.output_size, o, dtype)
    ro = ro._replace(b_y=jax.random.normal(ks[2], (o,), dtype))
    xs = jax.random.normal(ks[3], (t_len, b, d), dtype)
    ys = jax.random.randint(ks[4], (t_len, b), 0, o)
    carry = ref.random_like(ks[5], model.zero_carry(b, dtype))
    mask = jnp.arange(t_len)[:, None] < jnp.array([t_len, t_len - 3, t_len - 5][:b])
    return p, ro, xs, ys, carry, mask


def test_full_bptt_step_for_a_stack_with_dropout_applies_the_reference_gradient(key):
    """The masks of batch s come from (state.key, DROPOUT_STREAM, s); the update is the
    independent reference's gradient (tests/reference.py) under those masks."""
    from tests import reference as ref

    model, dtype = bptt_jax.Stack((bptt_jax.LSTM(5), bptt_jax.GRU(4)), dropout=0.3), jnp.float64
    p, ro, xs, ys, carry, mask = model_stream(model, key, dtype)
    t = train.trainer(model, SGD)
    state = state_from(t, model, p, ro, carry)._replace(step=jnp.asarray(3, jnp.int32))
    new, metrics = t.step(state, batch_of(xs, ys, mask))
    dkey = jax.random.fold_in(jax.random.fold_in(state.key, train.DROPOUT_STREAM), 3)
    drops = model.dropout_masks(dkey, *xs.shape[:2], dtype)
    assert any(bool(jnp.any(d == 0)) for d in drops)  # dropout really drops

    def f(p_, ro_):
        return ref.model_loss(model, p_, ro_, xs, ys, carry, mask, dropout_masks=drops)

    value, (gp, gro) = jax.value_and_grad(f, argnums=(0, 1))(p, ro)
    np.testing.assert_allclose(metrics["loss"][0], value, rtol=1e-12)
    assert_trees_close(new.params, jax.tree.map(lambda w, g: w - LR * g, p, gp), dtype)
    assert_trees_close(new.readout, jax.tree.map(lambda w, g: w - LR * g, ro, gro), dtype)
    _, carry_ref = ref.model_unroll(model, p, xs, carry, mask, dropout_masks=drops)
    assert_trees_close(new.carry, carry_ref, dtype)


def test_a_bidirectional_step_starts_every_batch_from_zeros_and_tbptt_is_refused(key):
    from tests import reference as ref

    model, dtype = bptt_jax.Bidirectional(bptt_jax.GRU(4)), jnp.float64
    p, ro, xs, ys, carry, mask = model_stream(model, key, dtype)
    t = train.trainer(model, SGD)
    resets = jnp.zeros(mask.shape, bool).at[0].set(True)  # as the adding task sends
    new, _ = t.step(state_from(t, model, p, ro, carry), batch_of(xs, ys, mask, resets=resets))
    zeros = model.zero_carry(xs.shape[1], dtype)
    gp = jax.grad(lambda p_: ref.model_loss(model, p_, ro, xs, ys, zeros, mask))(p)
    assert_trees_close(new.params, jax.tree.map(lambda w, g: w - LR * g, p, gp), dtype)
    with pytest.raises(ValueError, match="TBPTT .* undefined for a bidirectional model"):
        train.trainer(model, SGD, k1=4)


def test_tbptt_step_for_a_stack_is_the_tbptt_driver(key):
    model, dtype = bptt_jax.stacked(bptt_jax.Elman(5), 2), jnp.float64
    p, ro, xs, ys, carry, mask = model_stream(model, key, dtype, t_len=10)
    t = train.trainer(model, SGD, k1=4, k2=6)
    new, metrics = t.step(state_from(t, model, p, ro, carry), batch_of(xs, ys, mask))
    out = truncated.tbptt(
        model, p, ro, xs, ys, carry, k1=4, k2=6, update=sgd, update_state=0, mask=mask
    )
    assert metrics["loss"].shape == (3,)
    assert_trees_close(metrics["loss"], out.aux, dtype)
    assert_trees_close(new.params, out.params, dtype)
    assert_trees_close(new.carry, out.carry, dtype)
    with pytest.raises(ValueError, match="TBPTT.*undefined for a bidirectional"):
        truncated.tbptt(bptt_jax.Bidirectional(bptt_jax.GRU(3)), None, ro, xs, ys, k1=4, update=sgd)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["model.num_layers=0"], "'model.num_layers' must be a positive int"),
        (["model.dropout=0.2"], "'model.dropout' .* applies between layers"),
        (["model.num_layers=2", "model.dropout=1.0"], r"'model.dropout' must be in \[0, 1\)"),
        (["model.bidirectional=true", "train.k1=10"], "'train.k1' .* undefined for a bidi"),
        (["model.bidirectional=true", "task=recall"], "'model.bidirectional' needs a task"),
    ],
)
def test_model_config_errors_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        train_config.build(cfg_of(*overrides))


def test_config_builds_pytorchs_multilayer_bidirectional_model():
    _, model, _ = train_config.build(
        cfg_of("model.num_layers=3", "model.bidirectional=true", "model.dropout=0.1")
    )
    assert model == bptt_jax.stacked(
        train_config.make_cell(train_config.ModelConfig()), 3, bidirectional=True, dropout=0.1
    )
