"""Sequence parallelism: the time axis split over 8 simulated CPU devices, and 2 processes.

The suite's own processes started JAX with one device, so the multi-device checks run in a
fresh interpreter: ``tests/sequence_script.py`` (gradients against one device, collectives,
memory, the trainer, the guide's example, errors; it prints JSON) in one module-scoped
fixture whose results the tests below read; under ``-m slow`` its whole grid, and
``bptt-jax train`` as 2 processes of 4 devices with the time axis split over all 8 against
one process. The checks that need no devices run here.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import bptt_jax
from bptt_jax import parallel, train
from bptt_jax.cli import config, train_config
from bptt_jax.config import ConfigError
from tests.reference import TOL
from tests.sequence_script import grid, rel_err
from tests.test_parallel import _env, _finish, _free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "sequence_script.py"
F64 = TOL[jnp.float64]


def _run(out: Path, full: bool = False) -> dict:
    script = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), *(["--full"] if full else [])],
        env=_env(1),  # the script asks JAX for its 8 devices itself
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    results = out / "results.json"
    assert script.returncode == 0 and results.is_file(), script.stderr[-3000:]
    r = json.loads(results.read_text())
    assert r["devices"] == 8 and not r["failures"], r["failures"]
    return r


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("sequence"))


GRID = [f"{m}/{s}/{mode}" for m, s, mode in grid(full=False)]


def _check_entry(name, r):
    assert max(r["value_err"], *r["grad_err"].values()) <= F64, (name, r)
    assert set(r["grad_err"]) == {"params", "readout", "xs", "carry0"}, name
    assert r["collectives"]["in_loops"] == [], (name, r["collectives"])
    assert r["xs_grad_spec"].startswith("P('time'"), (name, r["xs_grad_spec"])
    if r["clip_effect"] is not None:  # per-step clipping changed the gradient
        assert r["clip_effect"] > 1e-3, (name, r["clip_effect"])


@pytest.mark.parametrize("entry", GRID)
def test_split_gradients_equal_one_device(runs, entry):
    """``sequence_loss`` and ``unroll`` (random cotangents on the outputs and the final carry)
    with the time axis over 8 devices: value and gradients (params, readout, inputs,
    initial carry) within 1e-12 of one device, float64, with masks or resets, initial
    carries, truncation cuts inside and at device boundaries, no collective in a loop."""
    _check_entry(entry, runs["grads"][entry])


def test_the_default_grid_meets_every_model_schedule_and_mode():
    models, schedules, modes = (set(x) for x in zip(*grid(full=False)))
    from tests.sequence_script import MODELS, MODES, SCHEDULES

    assert models == set(MODELS) and schedules == set(SCHEDULES) and modes == set(MODES)


@pytest.mark.parametrize(
    ("model", "forward", "gradient"),
    [
        ("cell", {"all-gather": 1}, {"all-gather": 2, "all-reduce": 1}),
        ("stack2", {"all-gather": 2}, {"all-gather": 4, "all-reduce": 1}),
        ("bidirectional", {"all-gather": 2}, {"all-gather": 4, "all-reduce": 1}),
    ],
)
def test_one_exchange_per_layer_and_direction_each_way(runs, model, forward, gradient):
    """The compiled programs' collectives: one all-gather of the summaries per layer and
    direction in the forward, one more in the backward, and one all-reduce of the params'
    gradient (XLA combines the leaves), none inside a loop; the exchanged bytes are the
    summaries' (n devices x 2 arrays of (B, H), float64), not the sequence's."""
    r = runs["collectives"][model]
    assert r["forward"]["counts"] == forward and r["forward"]["in_loops"] == []
    assert r["gradient"]["counts"] == gradient and r["gradient"]["in_loops"] == []
    per_gather = 8 * 2 * 4 * 8 * 8  # n x (A, h0) x (B=4, H=8) x 8 bytes
    assert r["forward"]["bytes"]["all-gather"] == forward["all-gather"] * per_gather


def test_each_device_holds_a_fraction_of_the_memory_at_a_long_sequence(runs):
    """Per-device temp memory of the split gradient at T = 65,536 (MinGRU B=16, D=128,
    H=256, float32) at most 0.2x the single-device program's (1/8 of the stored states,
    plus each device's chunk buffers)."""
    m = runs["memory"]
    assert m["t"] == 65536 and m["ratio"] <= 0.2, m


def _check_train(r):
    assert max(r["loss_err"], r["params_err"], r["carry_err"]) <= F64, r
    assert r["carry_spec"] == "P('data',)"


def test_the_trainer_splits_time_and_equals_one_device(runs):
    """The trainer's steps of a carried stream on a 2 x 4 data x time mesh: losses, params
    and the carry passed on within 1e-12 of one device; the carry is split along the data
    axis only."""
    _check_train(runs["train"]["time4"])


def _check_policy(r):
    """Under bfloat16 compute (float32 carries and sums), the split reorders the float32
    sums of the recurrence, so a stored bfloat16 output may round the other way: the split
    gradient is within 2 bfloat16 ulps (2**-7) of one device's under the same policy, and no
    further from float32 compute than one device's is (1.5x, and 2**-6)."""
    assert r["split_vs_one"] <= 2.0**-7, r
    assert r["split_vs_f32"] <= max(1.5 * r["one_vs_f32"], 2.0**-6), r


def test_the_guide_example_runs_on_8_devices(runs):
    assert runs["guide"]["printed"].strip() == "P('time', 'data') True"


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("nonlinear", r"unroll: time_axis='time': GRU is not a linear recurrence.*split the "
                      r"batch over the devices instead"),
        ("autodiff", r"backward='autodiff' is a plain sequential scan"),
        ("packed_bidirectional", r"resets of a bidirectional model"),
        ("uneven", r"the sequence's 36 steps must split evenly over the axis's 8 devices"),
        ("not_a_name", r"TypeError: unroll: time_axis must be a mesh axis name.*got 3"),
        ("return_deltas", r"loss_and_grads: time_axis='time' cannot be combined with "
                          r"return_deltas"),
        ("no_mesh", r"unroll: time_axis='time', but the inputs are split along no such axis"),
        ("tbptt", r"tbptt: xs's time axis is split over mesh axis 'time' \(sequence "
                  r"parallelism\), which tbptt does not run"),
    ],
)  # fmt: skip
def test_what_the_split_refuses_is_named(runs, name, match):
    assert runs["errors"][name] is not None and re.search(match, runs["errors"][name], re.S), runs[
        "errors"
    ][name]


@pytest.mark.slow
def test_every_model_schedule_and_mode(tmp_path):
    """The whole grid: every model x schedule x {Explicit, data x time, Auto, shard_map};
    the trainer on 1 x 8 too; a bfloat16 policy (:func:`_check_policy`)."""
    r = _run(tmp_path, full=True)
    assert len(r["grads"]) == len(grid(full=True))
    for name, entry in r["grads"].items():
        _check_entry(name, entry)
    for entry in r["train"].values():  # 2 x 4 and 1 x 8
        _check_train(entry)
    assert set(r["policy"]) == {"stack", "bidirectional"}
    for entry in r["policy"].values():  # a bfloat16 policy
        _check_policy(entry)


# ------------------------------------------------------------------- one device
def test_the_trainer_refuses_a_split_it_cannot_run():
    mesh = parallel.sequence_mesh(1, 1)
    opt = train.OptimConfig()
    with pytest.raises(ValueError, match=r"trainer: time_axis='time'.*LSTM is not a linear"):
        train.trainer(bptt_jax.LSTM(4), opt, mesh=mesh, time_axis="time")
    with pytest.raises(ValueError, match=r"time_axis='time' cannot be combined with TBPTT"):
        train.trainer(bptt_jax.MinGRU(4), opt, mesh=mesh, time_axis="time", k1=4)
    with pytest.raises(ValueError, match=r"time_axis='time' needs a mesh"):
        train.trainer(bptt_jax.MinGRU(4), opt, time_axis="time")
    with pytest.raises(ValueError, match=r"the mesh has no axis 'steps'"):
        train.trainer(bptt_jax.MinGRU(4), opt, mesh=mesh, time_axis="steps")


def test_sequence_mesh_names_bad_arguments():
    with pytest.raises(ValueError, match=r"sequence_mesh: time=3 must divide the 1 devices"):
        parallel.sequence_mesh(0, 3)
    with pytest.raises(ValueError, match=r"data_axis and time_axis must differ"):
        parallel.sequence_mesh(time_axis="data")
    mesh = parallel.sequence_mesh()
    assert mesh.axis_names == ("data", "time") and mesh.devices.shape == (1, 1)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["parallel.time_devices=2"], r"'parallel.time_devices' \(2\) splits .* model.cell is "
                                      r"'lstm'"),
        (["parallel.time_devices=2", "model.cell=mingru", "train.k1=4"],
         r"'parallel.time_devices' \(2\) runs full BPTT .* set train.k1=none"),
        (["parallel.time_devices=2", "model.cell=mingru", "parallel.time_axis=data"],
         r"'parallel.axis' and 'parallel.time_axis' must differ"),
    ],
)  # fmt: skip
def test_the_config_refuses_a_split_it_cannot_run(overrides, match):
    cfg = config.load(train_config.Config, None, overrides)
    with pytest.raises(ConfigError, match=match):
        train_config.check_config(cfg)


def test_inside_shard_map_on_one_device_the_split_is_the_plain_walk():
    """A 1-device shard_map over the time axis runs the split walk (gathers of one summary):
    its gradient equals the plain one within 1e-12 (float64), nonlinear cells are refused."""
    cell = bptt_jax.MinGRU(3)
    params = jax.tree.map(lambda x: x.astype(jnp.float64), cell.init(jax.random.key(0), 2))
    xs = jax.random.normal(jax.random.key(1), (6, 2, 2), jnp.float64)
    mesh = jax.make_mesh((1,), ("time",), axis_types=(jax.sharding.AxisType.Auto,))

    def loss(p, x, axis):
        return jnp.sum(jnp.sin(bptt_jax.unroll(cell, p, x, time_axis=axis)[0]))

    plain = jax.jit(jax.grad(loss), static_argnums=2)(params, xs, None)
    split = jax.jit(
        jax.shard_map(
            lambda p, x: jax.grad(loss)(p, x, "time"),
            mesh=mesh,
            in_specs=(jax.P(), jax.P("time")),
            out_specs=jax.P(),
        )
    )(params, xs)
    assert rel_err(split, plain) <= F64
    gru = bptt_jax.GRU(3)
    pg = gru.init(jax.random.key(0), 2)
    with pytest.raises(ValueError, match=r"GRU is not a linear recurrence"):
        jax.shard_map(
            lambda x: bptt_jax.unroll(gru, pg, x, time_axis="time")[0],
            mesh=mesh,
            in_specs=jax.P("time"),
            out_specs=jax.P("time"),
        )(xs.astype(jnp.float32))


# ------------------------------------------------------------------- 2 processes
@pytest.mark.slow
def test_two_processes_split_in_time_train_as_one_process(tmp_path):
    """`bptt-jax train` with each sequence's 16 steps split over 8 devices, as 2 processes
    of 4 (the summaries cross the processes) and as 1 process of 8: the same params."""
    args = [
        "task=recall", "recall.seq_len=16", "recall.delay=3", "recall.test_len=16",
        "recall.test_size=4", "model.cell=mingru", "model.hidden_size=8",
        "model.dtype=float64", "train.batch_size=4", "train.steps=5", "train.eval_every=0",
        "train.progress=false", "parallel.time_devices=8",
    ]  # fmt: skip
    port = _free_port()
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "bptt_jax", "train", *args, f"checkpoint.dir={tmp_path / 'two'}",
             "distributed.initialization_timeout=120"],
            env=_env(4, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                     JAX_PROCESS_ID=str(pid)),
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for pid in range(2)
    ]  # fmt: skip
    one = subprocess.run(
        [sys.executable, "-m", "bptt_jax", "train", *args, f"checkpoint.dir={tmp_path / 'one'}"],
        env=_env(8), cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    done = _finish(workers)
    assert one.returncode == 0, one.stderr[-3000:]
    for pid, (rc, out, err) in enumerate(done):
        assert rc == 0, f"process {pid}:\n{out[-2000:]}\n{err[-3000:]}"
    assert "done: 5 steps on 8 devices, 2 process(es)," in done[0][1], done[0][1]
    from bptt_jax.cli import saving

    cfg = config.load(train_config.Config, None, args[:-1])
    task, _, t = train_config.build(cfg)
    like = t.init(jax.random.key(cfg.seed), task.input_size, task.output_size, 4, jnp.float64)
    two, _ = saving.restore(tmp_path / "two", like)
    ref, _ = saving.restore(tmp_path / "one", like)
    assert int(two.step) == 5
    assert rel_err(two.params, ref.params) <= F64
    assert rel_err(two.readout, ref.readout) <= F64
