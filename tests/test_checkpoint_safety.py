"""Checkpoints and logs that survive what users do: two runs in one directory, bit
flips, kills and resumes, broken newest steps, a full disk, a diverged run."""

import errno
import io
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bptt_jax
from bptt_jax import cli, train
from bptt_jax.cli import config, saving, train_config
from bptt_jax.cli import fit as fit_loop
from bptt_jax.config import ConfigError


@pytest.fixture(autouse=True)
def standard_promotion():
    """optax's adam computes ``b1 ** count`` (float ** int32), which the suite's strict dtype
    promotion rejects; users run with JAX's standard promotion, and so do these tests."""
    with jax.numpy_dtype_promotion("standard"):
        yield


#: A run of about a second: adding problem, LSTM H=4, T=6, B=2.
TINY = (
    "adding.seq_len=6",
    "adding.test_size=4",
    "model.hidden_size=4",
    "train.batch_size=2",
    "train.eval_every=0",
    "train.log_every=1",
    "train.progress=false",
)


def cfg_of(*overrides):
    return config.load(train_config.Config, None, list(overrides))


def fit(*overrides, **kwargs):
    out = kwargs.pop("out", None) or io.StringIO()
    return fit_loop.fit(cfg_of(*TINY, *overrides), out=out, **kwargs)


def cli_run(*overrides) -> int:
    """``bptt-jax train adding TINY overrides`` in this process (no compilation-cache set-up)."""
    args = cli.build_parser().parse_args(["train", "adding", *TINY, *overrides])
    return args.run(args)


def like_of(cfg):
    task, _, t = train_config.build(cfg)
    return t.init(jax.random.key(cfg.seed), task.input_size, task.output_size, 2, jnp.float32)


def step_names(directory):
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def assert_same_state(a, b):
    a, b = saving._to_disk(a), saving._to_disk(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


class Killed(Exception):
    pass


# ------------------------------------------------------------------ 1. one writer per dir
def test_a_second_live_writer_of_a_checkpoint_dir_is_refused(tmp_path):
    """Two runs in one checkpoint.dir overwrote each other's steps, both exiting 0."""
    ck = tmp_path / "ck"
    holder = saving.Checkpointer(ck)
    try:
        with pytest.raises(saving.CheckpointInUse, match=r"in use by another run \(pid"):
            saving.Checkpointer(ck)
        with pytest.raises(ConfigError, match=r"'checkpoint.dir'.* in use by another run"):
            fit("train.steps=2", f"checkpoint.dir={ck}")
        assert saving.latest_step(ck) is None  # reading is not writing: allowed
    finally:
        holder.close()
    fit("train.steps=2", f"checkpoint.dir={ck}")  # released: the run goes ahead
    assert saving.latest_step(ck) == 2


def test_the_lock_dies_with_the_process_holding_it(tmp_path):
    """flock belongs to the open file of a live process: SIGKILL leaves no stale lock."""
    ck = tmp_path / "ck"
    ck.mkdir()
    code = (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
        "print('held', flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(ck / saving.LOCK_FILE)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(saving.CheckpointInUse):
            saving.Checkpointer(ck)
    finally:
        holder.kill()
        holder.wait()
    saving.Checkpointer(ck).close()


def test_a_save_reads_the_steps_on_the_disk_not_a_cached_list(tmp_path):
    """A step that appeared on the disk after the Checkpointer listed the steps (a writer on
    a file system without locks) is not overwritten."""
    state = train.trainer(bptt_jax.GRU(4)).init(jax.random.key(0), 3, 2, 2)
    saving.save(tmp_path / "other", state._replace(step=state.step + 1))
    with saving.Checkpointer(tmp_path / "ck") as c:
        c.save(state)
        shutil.copytree(tmp_path / "other" / "1", tmp_path / "ck" / "1")
        with pytest.raises(FileExistsError, match="step 1 already exists"):
            c.save(state._replace(step=state.step + 1))
        assert c.all_steps() == [0, 1]


def test_a_finished_run_run_again_with_another_learning_rate_says_what_it_does(tmp_path):
    """Run B (another learning rate) on run A's finished directory: it is A's run, resumed,
    with the change listed, and nothing trained: never silently B's result."""
    ck = f"checkpoint.dir={tmp_path / 'ck'}"
    first = fit("train.steps=2", ck)
    out = io.StringIO()
    again = fit("train.steps=2", ck, "optim.learning_rate=0.01", out=out)
    text = out.getvalue()
    assert "resumed from" in text and "at step 2" in text
    assert "changed settings: optim.learning_rate: 0.001 -> 0.01" in text
    assert "nothing left to train: the checkpoint is at step 2, train.steps is 2" in text
    assert_same_state(again.state, first.state)


# ------------------------------------------------------------------ 4. checksums
def test_every_array_is_checksummed_and_a_bit_flip_is_caught_naming_the_array(tmp_path):
    """orbax checksums only its index nodes: a flipped bit in an array stored outside them
    (GRU(16)'s w_h, 3 KiB) restored silently."""
    state = train.trainer(bptt_jax.GRU(16)).init(jax.random.key(0), 3, 2, 2)
    later = state._replace(step=state.step + 1)
    with saving.Checkpointer(tmp_path) as c:
        c.save(state, {"n": 0})
        c.save(later, {"n": 1})
    saved = json.loads((tmp_path / "1" / "checksums" / "metadata").read_text())
    assert saved == saving.checksums(later) and len(saved) == len(jax.tree.leaves(state))
    data = max((tmp_path / "1" / "state" / "ocdbt.process_0" / "d").iterdir(),
               key=lambda p: p.stat().st_size)  # fmt: skip
    flipped = bytearray(data.read_bytes())
    flipped[len(flipped) // 2] ^= 0x10
    data.write_bytes(bytes(flipped))
    flipped_w_h = r"step 1 .*array \.params\.w_h does not match its saved checksum"
    with pytest.raises(saving.CheckpointCorrupt, match=flipped_w_h):
        saving.restore(tmp_path, state, step=1)
    with pytest.warns(UserWarning, match="step 1 .* corrupt"):
        restored, meta = saving.restore(tmp_path, state)  # the newest intact one
    assert int(restored.step) == 0 and meta == {"n": 0}
    assert_same_state(restored, state)


# ------------------------------------------------------------------ 5. the log
def test_a_resumed_run_logs_each_step_once_and_a_fresh_run_sets_an_old_log_aside(tmp_path):
    """The kill's records past the last checkpoint (and a line cut off by it) are dropped on
    resume; a fresh run moves another run's log to <log>.1 instead of appending to it."""
    log = tmp_path / "log.jsonl"
    run = ("train.steps=8", "train.eval_every=4", "checkpoint.every=3", f"train.log_file={log}")
    ck = f"checkpoint.dir={tmp_path / 'ck'}"

    def die_at_5(step, rec):
        if rec["kind"] == "train" and step == 5:
            raise Killed

    with pytest.raises(Killed):
        fit(*run, ck, hooks=[die_at_5])
    with log.open("a") as f:
        f.write('{"kind": "train", "st')  # a record cut off by the kill
    out = io.StringIO()
    fit(*run, ck, out=out)
    assert "dropped 4 record(s) that this run, resumed at step 3, writes again" in out.getvalue()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    want = [("train", s) for s in range(1, 5)] + [("eval", 4)]
    want += [("train", s) for s in range(5, 9)] + [("eval", 8)]
    assert [(r["kind"], r["step"]) for r in records] == want
    before = log.read_text()
    out = io.StringIO()
    fit("train.steps=2", f"train.log_file={log}", out=out)  # a fresh run, no checkpoints
    assert f"moved to {log}.1" in out.getvalue()
    assert (tmp_path / "log.jsonl.1").read_text() == before
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [("train", 1), ("train", 2), ("eval", 2)]


# ------------------------------------------------------------------ 7. broken newest step
def _truncate_data(step_dir):
    for f in (step_dir / "state" / "d").iterdir():
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _empty(step_dir):
    shutil.rmtree(step_dir)
    step_dir.mkdir()


BREAKS = {
    "truncated data file": (_truncate_data, "its data does not read"),
    "emptied metadata": (
        lambda d: (d / "metadata" / "metadata").write_text(""),
        "its data does not read",
    ),  # fmt: skip
    "missing item": (lambda d: shutil.rmtree(d / "signature"), "item 'signature' is missing"),
    "empty step directory": (_empty, "an empty directory"),
    "no commit marker": (lambda d: (d / "commit_success.txt").unlink(), "no commit marker"),
}
RUN = ("checkpoint.every=3",)


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
    """A run's checkpoints 3 and 6 (of 6), and the state of the same run at step 9."""
    with jax.numpy_dtype_promotion("standard"):
        base = tmp_path_factory.mktemp("six") / "ck"
        fit("train.steps=6", *RUN, f"checkpoint.dir={base}")
        whole = fit("train.steps=9").state
    return base, whole


@pytest.mark.parametrize("kind", list(BREAKS))
def test_a_broken_newest_step_is_named_skipped_and_passed(kind, six_steps, tmp_path):
    """Resume from the newest intact step (3), announced, with a warning naming step 6; the
    run then saves its own step 6 (the broken one moved aside) and ends as an uninterrupted
    run. It was a 17- to 201-line orbax traceback, or step 6 restored without its marker."""
    base, whole = six_steps
    ck = tmp_path / "ck"
    shutil.copytree(base, ck)
    breaks, reason = BREAKS[kind]
    breaks(ck / "6")
    out = io.StringIO()
    resumed = fit("train.steps=9", *RUN, f"checkpoint.dir={ck}", out=out).state
    text = out.getvalue()
    assert f"warning: checkpoint step 6 in {ck} is corrupt or incomplete ({reason}" in text
    assert "skipped, moved aside to 6.corrupt-1" in text
    assert "at step 3 (the newest intact checkpoint)" in text
    assert step_names(ck) == ["3", "6", "6.corrupt-1", "9"]
    assert_same_state(resumed, whole)


def test_a_broken_step_restored_by_number_is_named_and_no_intact_step_is_refused(
    six_steps, tmp_path
):
    base, _ = six_steps
    ck = tmp_path / "ck"
    shutil.copytree(base, ck)
    _empty(ck / "6")
    like = like_of(cfg_of(*TINY))
    with pytest.raises(saving.CheckpointCorrupt,
                       match="step 6 .* is corrupt or incomplete: an empty directory"):  # fmt: skip
        saving.restore(ck, like, step=6)
    (ck / "3" / "commit_success.txt").unlink()
    with pytest.raises(ConfigError, match="'checkpoint.dir' .* holds no intact checkpoint"):
        fit("train.steps=9", *RUN, f"checkpoint.dir={ck}")
    assert step_names(ck) == ["3", "6"]  # refused: nothing moved


# ------------------------------------------------------------------ 9. a full disk
def test_a_full_disk_during_a_save_is_one_line_and_leaves_no_partial_step(
    tmp_path, monkeypatch, capsys
):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as jch

    real = jch.JsonCheckpointHandler._save_fn

    async def full_disk(self, item, directory):
        if f"{os.sep}6." in str(directory):  # step 6's temporary directory
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return await real(self, item, directory)

    monkeypatch.setattr(jch.JsonCheckpointHandler, "_save_fn", full_disk)
    ck = tmp_path / "ck"
    assert cli_run("train.steps=6", *RUN, f"checkpoint.dir={ck}") == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if "error" in x.lower()]
    assert line.startswith("bptt-jax train: error: checkpoint: saving step 6 into ")
    assert "No space left on device" in line and "the intact checkpoints are steps [3]" in line
    assert step_names(ck) == ["3"]  # no step 6, no temporary directory
    monkeypatch.undo()
    out = io.StringIO()
    assert int(fit("train.steps=6", *RUN, f"checkpoint.dir={ck}", out=out).state.step) == 6
    assert "at step 3" in out.getvalue() and step_names(ck) == ["3", "6"]


# ------------------------------------------------------------------ 11. divergence
def test_a_diverged_run_exits_1_counts_its_skipped_updates_and_logs_strict_json(tmp_path, capsys):
    """learning_rate=1e30: step 1's update makes the outputs overflow, every later gradient
    is non-finite and skipped. It exited 0, never said so, and logged bare NaN."""
    log = tmp_path / "log.jsonl"
    blow_up = ("optim.name=sgd", "optim.learning_rate=1e30", "optim.clip=none", "optim.momentum=0")
    assert cli_run("train.steps=4", *blow_up, f"train.log_file={log}") == 1
    out, err = capsys.readouterr()
    assert "; 3 updates skipped (non-finite gradients)" in out
    assert "bptt-jax train: error: the run diverged: its final evaluation has mse=inf" in err

    def strict(constant):
        raise ValueError(f"not JSON: {constant}")

    records = [json.loads(line, parse_constant=strict) for line in log.read_text().splitlines()]
    assert records[0]["loss"] is not None and records[1]["loss"] is None
    assert records[-1]["kind"] == "eval" and records[-1]["mse"] is None
    assert cli_run("train.steps=2") == 0  # a healthy run
    assert "; 0 updates skipped" in capsys.readouterr().out


def test_divergence_names_nonfinite_params_and_a_run_stuck_skipping():
    state = train.trainer(bptt_jax.GRU(4)).init(jax.random.key(0), 3, 2, 2)
    logged = [{"kind": "train", "step": 4, "updates": 2}, {"kind": "eval", "step": 4, "mse": 0.1}]

    def result(s):
        return fit_loop.FitResult(s, logged, None, None)

    assert fit_loop.divergence(result(state)) is None
    streak = state.opt_state._replace(notfinite_count=jnp.asarray(2, jnp.int32))
    assert "stuck: its last 2 updates were all skipped" in fit_loop.divergence(
        result(state._replace(opt_state=streak))
    )
    one = state.opt_state._replace(notfinite_count=jnp.asarray(1, jnp.int32))
    assert fit_loop.divergence(result(state._replace(opt_state=one))) is None  # 1 of 2: going on
    bad = state.readout._replace(b_y=state.readout.b_y.at[0].set(jnp.nan))
    assert "final readout hold NaN or inf (readout.b_y)" in fit_loop.divergence(
        result(state._replace(readout=bad))
    )
