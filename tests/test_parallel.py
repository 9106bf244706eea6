"""Data parallelism: 8 simulated CPU devices, and 2 processes of 4 devices each.

The suite's own processes started JAX with one device, so the multi-device checks run in
fresh interpreters: ``tests/parallel_script.py`` on 8 devices (gradients, train steps,
``fit``, checkpoints, errors; it prints JSON) in one module-scoped fixture whose results the
tests below read, and (``-m slow``) ``bptt-jax train`` as 2 processes of 4 devices connected
by ``jax.distributed`` on localhost beside it. The checks that need no devices run here.
"""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bptt_jax
from bptt_jax import cli, parallel, train
from bptt_jax.cli import config, distributed, hlo, saving, train_config
from bptt_jax.config import ConfigError
from tests.parallel_script import TWO_PROCESS_RUN, grid
from tests.reference import TOL, rel_err

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "parallel_script.py"
F64 = TOL[jnp.float64]
DEVICES = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(
        # the suite's flags (tests/conftest.py), then the simulated devices
        XLA_FLAGS=f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        JAX_ENABLE_X64="1",  # the runs are float64 (model.dtype)
        **extra,
    )
    return env


def _start_two_processes(out: Path, name: str) -> list[subprocess.Popen]:
    """`bptt-jax train` (TWO_PROCESS_RUN) as 2 processes of 4 devices, writing ``out/name``
    and ``out/name.jsonl``, with their compilation cache in ``out/cache``."""
    port = _free_port()
    workers = []
    for pid in range(2):
        args = [
            *TWO_PROCESS_RUN,
            f"checkpoint.dir={out / name}",
            f"train.log_file={out / (name + '.jsonl')}",
            "distributed.initialization_timeout=120",
        ]
        env = _env(
            4,
            JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(pid),
            BPTT_JAX_CACHE_DIR=str(out / "cache"),
        )
        workers.append(
            subprocess.Popen(
                [sys.executable, "-m", "bptt_jax", "train", *args],
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return workers


def _finish(workers: list[subprocess.Popen]) -> list[tuple]:
    try:
        done = [w.communicate(timeout=300) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    return [(w.returncode, o, e) for w, (o, e) in zip(workers, done)]


def _run_all(out: Path, full: bool = False, two_process: bool = False) -> dict:
    """The 8-device script and (with ``two_process``) the 2-process run, side by side."""
    workers = _start_two_processes(out, "two") if two_process else []
    try:
        script = subprocess.run(
            [sys.executable, str(SCRIPT), str(out / "grid"), *(["--full"] if full else [])],
            env=_env(1),  # the script asks JAX for its 8 devices itself
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
        )
    finally:
        done = _finish(workers)
    results_file = out / "grid" / "results.json"
    assert script.returncode == 0 and results_file.is_file(), script.stderr[-3000:]
    return dict(grid=json.loads(results_file.read_text()), workers=done, out=out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return _run_all(tmp_path_factory.mktemp("parallel"))


def _entry(runs, name):
    r = runs["grid"]["grads"][name]
    assert "error" not in r, r["error"]
    return r


GRID = [f"{m}/{s}/{mode}" for m, s, mode in grid(full=False)]


# ------------------------------------------------------------------- gradients
@pytest.mark.parametrize("entry", GRID)
def test_sharded_gradients_equal_single_device_ones(runs, entry):
    """value_and_grad of sequence_loss over a batch split over 8 devices (jit with an
    Explicit or an Auto mesh, jit of arrays placed on an Explicit mesh without
    ``jax.set_mesh``, or inside shard_map) against one device, float64: the loss and the
    gradients of params, readout, inputs and initial carry."""
    r = _entry(runs, entry)
    assert r["value_err"] <= F64, r
    assert r["grad_err"] and max(r["grad_err"].values()) <= F64, r["grad_err"]
    assert r["out_shardings"]["xs"].startswith("P(None, 'data'"), r["out_shardings"]


@pytest.mark.parametrize("entry", GRID)
def test_no_collective_inside_a_loop_body(runs, entry):
    """The compiled per-device program reduces the weight gradients once, after the scans:
    no collective in any while-loop body (hlo.collectives), no all-gather anywhere."""
    c = _entry(runs, entry)["collectives"]
    assert c["in_loops"] == [], c["in_loops"]
    assert c["ops"] == ["all-reduce"] and c["outside"] >= 1, c


@pytest.mark.parametrize("entry", GRID)
def test_each_device_does_an_eighth_of_the_work(runs, entry):
    """XLA's cost analysis of one device's program against the one-device program's: 1/8
    (measured 0.126 to 0.132: the replicated weight-gradient sums and the loss's scalars)."""
    r = _entry(runs, entry)
    ratio = r["flops_per_device"] / r["flops_single"]
    assert 0.9 / DEVICES <= ratio <= 1.15 / DEVICES, (ratio, r["dropout"])


# ------------------------------------------------------------------- training
@pytest.mark.parametrize("schedule", ["full", "tbptt"])
def test_sharded_train_steps_equal_single_device_steps(runs, schedule):
    """Three adam steps on a carried stream, 8 devices against one: the whole
    state (params, readout, optimizer state, carry); the carry stays split along B and the
    params replicated; gradients cross devices once per update (TBPTT: inside the loop over
    windows, never in the scans over time)."""
    r = runs["grid"]["train"]
    assert "error" not in r, r["error"]
    r = r[schedule]
    assert r["init_equal"]
    assert r["state_err"] <= F64 and r["loss_err"] <= F64, r
    assert r["carry_spec"] == "P('data',)" and r["params_spec"] == "P()", r
    c = r["collectives"]
    if schedule == "full":
        assert c["in_loops"] == [] and r["updates"] == 1, c
    else:
        assert r["updates"] == 3  # ceil(12 / 4) windows
        assert {x["loop_depth"] for x in c["in_loops"]} == {1}, c["in_loops"]
        assert len({x["computation"] for x in c["in_loops"]}) == 1, c["in_loops"]
    assert c["ops"] == ["all-reduce"], c


def test_a_sharded_run_killed_and_resumed_is_bit_for_bit(runs):
    """fit on 8 devices, checkpoints every 3 of 10 steps, killed after step 8, resumed from
    step 6: the same params, optimizer state, carry (split over the devices) and step."""
    r = runs["grid"]["fit"]
    assert "error" not in r, r["error"]
    assert r["mesh_devices"] == DEVICES and r["carry_spec"] == "P('data',)"
    assert r["latest_after_kill"] == 6 and r["resumed_message"]
    assert r["resume_bit_for_bit"], r["resume_max_abs_diff"]


def test_a_checkpoint_from_8_devices_resumes_on_4(runs):
    r = runs["grid"]["fit"]
    assert "error" not in r, r["error"]
    r = r["resume_on_4_devices"]
    assert r["devices"] == 4 and r["carry_spec"] == "P('data',)"
    assert r["err"] <= F64, r


def _restore_on_one_device(directory: Path):
    cfg = config.load(train_config.Config, None, list(TWO_PROCESS_RUN))
    task, _, t = train_config.build(cfg)
    like = t.init(jax.random.key(cfg.seed), task.input_size, task.output_size, 8, jnp.float64)
    state, meta = saving.restore(directory, like)
    return state, meta


@pytest.mark.slow
def test_two_processes_train_to_the_params_of_one_process_with_8_devices(tmp_path):
    """`bptt-jax train` as 2 processes of 4 CPU devices (jax.distributed on localhost, set
    up from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID): each process draws
    the global batches and places its rows; both write the final checkpoint. Restored onto
    this process's one device, it is the checkpoint of the same run on one process with 8;
    so is a second run's. (Slow: three more JAX processes on the machine, then two; about
    45 s of CPU.)"""
    runs = _run_all(tmp_path, two_process=True)
    for pid, (rc, out, err) in enumerate(runs["workers"]):
        assert rc == 0, f"process {pid}:\n{out[-2000:]}\n{err[-3000:]}"
    out0, out1 = runs["workers"][0][1], runs["workers"][1][1]
    assert "done: 10 steps on 8 devices, 2 process(es)," in out0, out0
    assert "done:" not in out1 and "bptt-jax train:" not in out1  # only process 0 prints
    two, meta = _restore_on_one_device(runs["out"] / "two")
    one, _ = _restore_on_one_device(runs["out"] / "grid" / "ref8")
    assert int(two.step) == 10 and meta["config"]["train"]["steps"] == 10
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(two._replace(key=jax.random.key_data(two.key))),
        jax.tree.leaves(one._replace(key=jax.random.key_data(one.key))),
        strict=True,
    ):
        assert rel_err(a, b) <= F64, jax.tree_util.keystr(path)
    losses = [json.loads(line) for line in (runs["out"] / "two.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses if r["kind"] == "train"] == list(range(1, 11))
    # Run again on the compilation cache the first run filled: a CPU program with
    # cross-process collectives read back from the cache hung in its first all-reduce, so
    # multi-process CPU runs do not use the cache (distributed.initialize).
    for pid, (rc, out, err) in enumerate(_finish(_start_two_processes(runs["out"], "again"))):
        assert rc == 0, f"rerun, process {pid}:\n{out[-2000:]}\n{err[-3000:]}"
    again, _ = _restore_on_one_device(runs["out"] / "again")
    for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(two.params), strict=True):
        assert rel_err(a, b) <= F64


def test_the_devices_guide_example_runs_on_8_devices(runs):
    r = runs["grid"]["guide"]
    assert "error" not in r, r["error"]
    assert r["printed"].strip() == "P('data',) P()"


@pytest.mark.slow
def test_every_model_schedule_and_mode(tmp_path):
    """The whole grid: every model x schedule x {Explicit jit, Auto jit, placed, shard_map}."""
    results = _run_all(tmp_path, full=True)["grid"]["grads"]
    assert len(results) == len(grid(full=True))
    for name, r in results.items():
        assert "error" not in r, (name, r["error"])
        assert max(r["value_err"], *r["grad_err"].values()) <= F64, (name, r["grad_err"])
        assert r["collectives"]["in_loops"] == [], (name, r["collectives"])
        ratio = r["flops_per_device"] / r["flops_single"]
        assert 0.9 / DEVICES <= ratio <= 1.15 / DEVICES, (name, ratio)


# ------------------------------------------------------------------- bad input
@pytest.mark.parametrize("name", ["cell", "stack"])
def test_eager_calls_on_arrays_placed_on_a_mesh_equal_one_device(runs, name):
    """unroll, sequence_loss and loss_and_grads called without jit on device_put arrays,
    outside jax.set_mesh (they needed a mesh context before)."""
    r = runs["grid"]["eager"]
    assert "error" not in r, r["error"]
    e = r[name]
    assert max(e["hs_err"], e["value_err"], e["grad_err"]) < 1e-12, e
    assert "data" in e["hs_sharding"]  # the outputs stay split over the devices


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("mesh_without_axis", r"trainer: the mesh has no axis 'data' .*axes: \('batch',\)\)"),
        ("init_batch", r"trainer.init: batch_size must be divisible by the 8 devices .* got 12"),
        ("put_batch", r"put_batch: batch.xs.shape\[1\] \(B\) must be divisible by the 8 .* got 12"),
        ("step_batch", r"trainer.step: batch.xs.shape\[1\] \(B\) must be divisible by the 8"),
        ("config_batch", r"'train.batch_size' \(12\) must be divisible by the 8 devices"),
        ("config_devices", r"'parallel.devices'.* at most the 8 devices .* got devices=16"),
        ("config_divisor", r"'train.batch_size' \(8\) must be divisible by the 3 devices"),
    ],
)  # fmt: skip
def test_bad_input_on_8_devices_names_the_argument(runs, name, match):
    r = runs["grid"]["errors"]
    assert "error" not in r, r["error"]
    assert r[name] is not None and re.search(match, r[name]), r[name]


@pytest.mark.parametrize(
    ("cfg", "environ", "match"),
    [
        (dict(num_processes=0), {}, r"'distributed.num_processes' must be >= 1 .* got 0"),
        ({}, {"JAX_NUM_PROCESSES": "-2"}, r"JAX_NUM_PROCESSES must be >= 1 .* got -2"),
        ({}, {"JAX_NUM_PROCESSES": "two"}, r"variable JAX_NUM_PROCESSES must be an int"),
        (dict(num_processes=2, process_id=2, coordinator_address="h:1"), {},
         r"'distributed.process_id' must be in \[0, num_processes\) = \[0, 2\) .* got 2"),
        (dict(process_id=3), {"JAX_NUM_PROCESSES": "3", "JAX_COORDINATOR_ADDRESS": "h:1"},
         r"\[0, 3\) \(num_processes from JAX_NUM_PROCESSES\); got 3"),
        ({}, {"JAX_PROCESS_ID": "-1"}, r"JAX_PROCESS_ID must be >= 0; got -1"),
        (dict(coordinator_address="localhost"), {},
         r"'distributed.coordinator_address' must be 'host:port'"),
        (dict(num_processes=2), {}, r"needs 'distributed.coordinator_address' \(or "
         r"JAX_COORDINATOR_ADDRESS\), 'distributed.process_id' \(or JAX_PROCESS_ID\) too"),
        (dict(initialization_timeout=0), {}, r"'distributed.initialization_timeout' must be >= 1"),
    ],
)  # fmt: skip
def test_bad_distributed_settings_are_refused_naming_the_key(cfg, environ, match):
    with pytest.raises(ConfigError, match=match):
        distributed.distributed_args(distributed.DistributedConfig(**cfg), environ)


def test_a_coordinator_port_in_use_is_refused_before_connecting():
    """Process 0 would crash inside gRPC and the others wait initialization_timeout."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = distributed.DistributedConfig(
            coordinator_address=f"localhost:{port}", num_processes=2, process_id=0
        )
        with pytest.raises(ConfigError, match=rf"coordinator on port {port}, which is in use"):
            distributed.initialize(cfg, environ={})


def test_distributed_settings_come_from_the_config_or_the_environment():
    env = {
        "JAX_COORDINATOR_ADDRESS": "10.1.2.3:4567",
        "JAX_NUM_PROCESSES": "4",
        "JAX_PROCESS_ID": "3",
    }
    args = distributed.distributed_args(distributed.DistributedConfig(), env)
    assert args == dict(coordinator_address="10.1.2.3:4567", num_processes=4, process_id=3,
                        initialization_timeout=300)  # fmt: skip
    mine = distributed.DistributedConfig(coordinator_address="h:9", process_id=0)
    assert distributed.distributed_args(mine, env)["process_id"] == 0  # the config wins
    assert distributed.distributed_args(distributed.DistributedConfig(num_processes=1), {}) is None
    assert distributed.distributed_args(distributed.DistributedConfig(enabled=False), env) is None
    # enabled: what is missing is left to JAX's cluster detection (SLURM, Open MPI, ...)
    detect = distributed.distributed_args(distributed.DistributedConfig(enabled=True), {})
    assert detect["coordinator_address"] is None and detect["process_id"] is None


def test_the_cli_refuses_bad_parallel_settings_before_any_work(capsys):
    assert cli.main(["train", "adding", "distributed.process_id=2", "distributed.num_processes=2",
                     "distributed.coordinator_address=localhost:1"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "'distributed.process_id' must be in [0, num_processes) = [0, 2)" in err
    assert cli.main(["train", "adding", "parallel.devices=-1"]) == 2
    assert "'parallel.devices' must be >= 0" in capsys.readouterr().err


def test_a_mesh_without_the_data_axis_or_too_many_devices_is_refused():
    mesh = jax.make_mesh((1,), ("x",))
    with pytest.raises(ValueError, match=r"trainer: the mesh has no axis 'data'.*\('x',\)"):
        train.trainer(bptt_jax.GRU(3), mesh=mesh)
    t = train.trainer(bptt_jax.GRU(3), mesh=mesh, data_axis="x")  # named: fine
    assert t.mesh is mesh and t.state_sharding().carry.spec == jax.sharding.PartitionSpec("x")
    with pytest.raises(ValueError, match=r"data_mesh: devices must be at most the 1 devices"):
        parallel.data_mesh(devices=2)
    with pytest.raises(ConfigError, match=r"'parallel.devices'.*got devices=2"):
        train_config.make_mesh(config.load(train_config.Config, None, ["parallel.devices=2"]))


# ------------------------------------------------------------------- the HLO reader
HLO = """HloModule m, entry_computation_layout={(f32[4,8]{1,0})->f32[8]{0}}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%inner (p: (s32[], f32[2,8])) -> (s32[], f32[2,8]) {
  %p = (s32[], f32[2,8]{1,0}) parameter(0)
  %x = f32[2,8]{1,0} get-tuple-element(%p), index=1
  %ar = f32[2,8]{1,0} all-reduce(%x), replica_groups={}, to_apply=%add
  ROOT %t = (s32[], f32[2,8]{1,0}) tuple(%i, %ar)
}

%cond (p: (s32[], f32[2,8])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

%outer (p: (s32[], f32[2,8])) -> (s32[], f32[2,8]) {
  %p = (s32[], f32[2,8]{1,0}) parameter(0)
  %ag = f64[16]{0} all-gather(%y), dimensions={0}
  ROOT %w = (s32[], f32[2,8]{1,0}) while(%p), condition=%cond, body=%inner
}

%fused (q: f32[8]) -> f32[8] {
  ROOT %cp = (f32[8]{0}, s32[3]{0}) collective-permute(%q), source_target_pairs={{0,1}}
}

ENTRY %main (arg: f32[4,8]) -> f32[8] {
  %arg = f32[4,8]{1,0} parameter(0)
  %w0 = (s32[], f32[2,8]{1,0}) while(%t0), condition=%cond, body=%outer
  %f = f32[8]{0} fusion(%z), kind=kLoop, calls=%fused
  ROOT %r = f32[8]{0} all-reduce-start(%f), replica_groups={}, to_apply=%add
}
"""


def test_collectives_are_found_with_the_loops_around_them():
    found = sorted(hlo.collectives(HLO), key=lambda c: c.loop_depth)
    assert [(c.op, c.computation, c.loop_depth, c.bytes) for c in found] == [
        ("collective-permute", "fused", 0, 32 + 12),  # a fusion is as deep as its caller
        ("all-reduce", "main", 0, 32),  # an async start counts as its op
        ("all-gather", "outer", 1, 128),
        ("all-reduce", "inner", 2, 64),  # a while inside a while's body
    ]


def test_the_one_device_fit_path_is_unchanged():
    """parallel.devices = 0 (all devices) on one device builds no mesh: the plain step."""
    cfg = config.load(train_config.Config, None, [])
    assert train_config.make_mesh(cfg) is None
    assert np.asarray(parallel.local_copy(jnp.arange(3))).tolist() == [0, 1, 2]


@pytest.mark.slow
def test_the_parallel_bench_part_on_8_simulated_devices(tmp_path):
    """``benchmarks/parallel.py`` from a 1-device process: a fresh interpreter with 8
    simulated devices; every count checked, timed, one all-reduce of the gradient per step
    outside the loops, 1/n of the FLOPs per device, and the overhead-not-speedup note."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "parallel.py"), "bench_tiny",
         f"out={tmp_path}", "plots=false", "parallel.simulate=8", "parallel.size=[12, 16, 4, 8]"],
        env=_env(1), cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "parallel.json").read_text())
    rows = res["parallel"]["rows"]
    assert [r["devices"] for r in rows] == [1, 2, 4, 8] and res["parallel"]["simulated"]
    for r in rows:
        assert r["check"]["passed"] and r["collectives_in_loops"] == 0, r
        assert r["flops_vs_one_device"] == pytest.approx(1 / r["devices"], rel=0.15)
        if r["devices"] > 1:
            assert r["all_reduces"] >= 1
            assert r["gradient_bytes"] <= r["all_reduce_bytes"] <= r["gradient_bytes"] + 64
    assert any("not a speedup" in n for n in res["notes"])
