"""`bptt-jax bench`: the smoke config runs every part and writes every number; config errors
name their key; a wrong gradient path is refused by the check, never timed.

Nothing here asserts on speed: the suite reports, the tests check what it reports is whole
and consistent.
"""

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

from bptt_jax import cli
from bptt_jax.cli import bench, config

ROOT = Path(__file__).resolve().parents[1]

STATS = ("median_s", "q25_s", "q75_s", "iqr_s", "min_s", "max_s", "tokens_per_s", "compile_s")
MEMORY = ("temp_bytes", "argument_bytes", "output_bytes")


def _bench(*args, timeout=240):
    return subprocess.run(
        [sys.executable, "-m", "bptt_jax", "bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = _bench("bench_tiny", f"out={out}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "bench.json") as f:
        return json.load(f), out, proc.stdout


def _close(a, b, rel=1e-9):
    return math.isclose(a, b, rel_tol=rel)


def _check_timed(v, tokens):
    """One timed entry: positive, ordered statistics, tokens/s from the median, checked."""
    for k in STATS:
        assert v[k] is not None and v[k] >= 0, (k, v[k])
    assert 0 < v["min_s"] <= v["q25_s"] <= v["median_s"] <= v["q75_s"] <= v["max_s"]
    assert _close(v["iqr_s"], v["q75_s"] - v["q25_s"])
    assert _close(v["tokens_per_s"], tokens / v["median_s"])
    assert len(v["samples_s"]) == v["repeats"] > 0
    assert v["check"]["passed"] and v["check"]["max_rel_err"] <= v["check"]["tolerance"]


def test_tiny_run_has_environment_config_and_no_failures(tiny_run):
    res, _, stdout = tiny_run
    assert res["schema_version"] == 1
    assert res["passed"] is True and res["failures"] == []
    env = res["environment"]
    assert env["jax"] == jax.__version__ and env["backend"] == jax.default_backend()
    assert env["device_kind"] and env["dtype"] == "float32"
    assert res["config"]["timing"]["repeats"] == 3
    assert set(res["part_seconds"]) == set(bench.PARTS)
    assert res["wall_s"] > 0
    assert "bptt-jax bench: jax" in stdout and "== summary" in stdout


def test_manual_vs_autodiff_rows_have_times_memory_and_consistent_ratios(tiny_run):
    res, _, _ = tiny_run
    rows = res["manual_vs_autodiff"]
    assert [r["cell"] for r in rows] == ["elman", "lstm", "gru"]
    for r in rows:
        assert r["tokens"] == r["T"] * r["B"]
        for v in r["variants"].values():
            _check_timed(v, r["tokens"])
            for k in MEMORY:
                assert v[k] > 0, k
        m, a = r["variants"]["manual"], r["variants"]["autodiff"]
        assert a["check"]["max_rel_err"] == 0.0  # autodiff is the reference itself
        assert _close(r["time_vs_manual"]["autodiff"], a["median_s"] / m["median_s"])
        assert _close(r["temp_vs_manual"]["autodiff"], a["temp_bytes"] / m["temp_bytes"])


def test_scaling_and_truncation_report_every_length_and_k(tiny_run):
    res, _, _ = tiny_run
    assert [r["T"] for r in res["scaling"]] == [8, 32]
    for r in res["scaling"]:
        for v in r["variants"].values():
            _check_timed(v, r["tokens"])
            assert v["temp_bytes"] > 0
    tr = res["truncation"]
    assert list(tr["entries"]) == ["full", "k=8"]
    assert tr["entries"]["k=8"]["truncate"] == 8 and tr["entries"]["full"]["truncate"] is None
    full = tr["entries"]["full"]
    for name, v in tr["entries"].items():
        _check_timed(v, tr["tokens"])
        assert _close(tr["tokens_per_s_vs_full"][name], full["median_s"] / v["median_s"])
        assert _close(tr["temp_vs_full"][name], v["temp_bytes"] / full["temp_bytes"])


def test_peers_are_checked_and_timed_or_noted_as_skipped(tiny_run):
    res, _, _ = tiny_run
    installed = {lib for lib in ("torch", "flax") if res["environment"].get(lib)}
    for lib in {"torch", "flax"} - installed:
        assert any(lib in n for n in res["notes"]), res["notes"]
    assert any("cudnn" in n for n in res["notes"]) or res["environment"]["backend"] == "gpu"
    if not installed:
        assert res["peers"] == []
        return
    (row,) = res["peers"]
    assert set(row["variants"]) == {"bptt_jax", *installed}
    base = row["variants"]["bptt_jax"]["median_s"]
    for name, v in row["variants"].items():
        _check_timed(v, row["tokens"])
        if name != "bptt_jax":
            assert _close(row["time_vs_bptt"][name], v["median_s"] / base)


def test_models_part_checks_and_times_stacked_and_bidirectional_models(tiny_run):
    """The models part: a 2-layer LSTM and a bidirectional GRU, every variant and installed
    peer checked against the per-cell plain scans composed by the bench, then timed; the
    4-layer LSTM's temp memory, checkpointed against manual."""
    res, _, stdout = tiny_run
    part = res["models"]
    installed = {lib for lib in ("torch", "flax") if res["environment"].get(lib)}
    for lib in {"torch", "flax"} - installed:
        assert any(n.startswith(f"models: {lib} skipped") for n in res["notes"]), res["notes"]
    shapes = {"lstm:2": ("lstm", 2, False, 8), "bigru": ("gru", 1, True, 16)}
    assert [r["model"] for r in part["rows"]] == list(shapes)
    for r in part["rows"]:
        cell, layers, bi, out = shapes[r["model"]]
        assert (r["cell"], r["layers"], r["bidirectional"], r["output_size"]) == (
            cell,
            layers,
            bi,
            out,
        )
        assert (r["T"], r["B"], r["D"], r["H"]) == (12, 3, 4, 8)
        assert r["reference"] == "composed_autodiff"
        assert set(r["variants"]) == {"manual", "autodiff", *installed}
        base = r["variants"]["manual"]
        for name, v in r["variants"].items():
            _check_timed(v, r["tokens"])
            assert v["check"]["reference"] == "composed_autodiff"
            if name != "manual":
                assert _close(r["time_vs_manual"][name], v["median_s"] / base["median_s"])
        assert _close(
            r["temp_vs_manual"]["autodiff"],
            r["variants"]["autodiff"]["temp_bytes"] / base["temp_bytes"],
        )
    (mem,) = part["memory"]
    assert (mem["model"], mem["layers"], mem["T"]) == ("lstm:4", 4, 64)
    assert set(mem["variants"]) == {"manual", "checkpointed"}
    for v in mem["variants"].values():
        assert v["temp_bytes"] > 0 and v["check"]["passed"]
        assert "median_s" not in v  # memory only: not timed
    m, c = (mem["variants"][v]["temp_bytes"] for v in ("manual", "checkpointed"))
    assert _close(mem["temp_vs_manual"]["checkpointed"], c / m)
    assert _close(mem["temp_saving"]["checkpointed"], m / c)
    targets = {(t["target"], t["entry"].split()[0]) for t in res["targets"]}
    assert {("model_vs_autodiff", "lstm:2"), ("model_vs_autodiff", "bigru")} <= targets
    assert ("checkpoint_saving", "lstm:4") in targets
    assert ("torch" in installed) == (("model_vs_torch", "bigru") in targets)
    assert "x manual" in stdout and "saving" in stdout


def _model_problem(spec, key, T=7, B=3, D=4, H=5):
    bench.load_runner()
    harness = sys.modules["harness"]
    return harness, harness.make_problem(spec, T, B, D, H, 6, key)


def _composed_grads(harness, p, weights):
    """hs of the composed per-cell plain scans and the gradient of ``sum(hs * weights)``."""

    def f(params):
        return harness.unroll_composed(p.cell, params, p.xs)

    hs = f(p.params)
    grads = jax.grad(lambda q: jax.numpy.sum(f(q) * weights))(p.params)
    return hs, grads


def _assert_trees_close(got, want, rtol=1e-5):
    import numpy as np

    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape
        assert np.max(np.abs(a - b)) <= rtol * max(np.max(np.abs(b)), 1e-30), (a, b)


SPECS = ["lstm:2", "bigru", "bilstm:2", "elman:3"]


@pytest.mark.parametrize("spec", SPECS)
def test_torch_weight_mapping_of_layers_and_directions(spec, key):
    """bptt_jax's params, mapped to nn.LSTM/GRU/RNN(num_layers=L, bidirectional=...)'s
    ``weight_ih_l{k}[_reverse]`` etc., give the same outputs as the per-cell plain scans
    composed layer by layer, and PyTorch's gradients mapped back equal JAX's."""
    torch = pytest.importorskip("torch")
    import numpy as np

    harness, p = _model_problem(spec, key)
    peers = sys.modules["peers"]
    kind, layers, bi, H = harness.uniform_structure(p.cell)
    weights = jax.random.normal(jax.random.fold_in(key, 1), (p.T, p.B, H * (1 + bi)), "float32")
    hs_ref, g_ref = _composed_grads(harness, p, weights)

    rnn = peers.torch_rnn(kind, p.D, H, layers, bi).double()
    shape = harness.layer_params(p.cell, p.params)
    named = dict(rnn.named_parameters())
    mapped = peers.torch_weights(kind, shape)
    assert set(mapped) == set(named)
    with torch.no_grad():
        for name, w in mapped.items():
            named[name].copy_(torch.from_numpy(w.astype(np.float64)))
    hs, _ = rnn(torch.from_numpy(np.asarray(p.xs, np.float64)))
    (hs * torch.from_numpy(np.asarray(weights, np.float64))).sum().backward()
    np.testing.assert_allclose(hs.detach().numpy(), np.asarray(hs_ref), rtol=1e-5, atol=1e-6)
    g = {n: w.grad.numpy() for n, w in rnn.named_parameters()}
    got = harness.model_params(p.cell, peers.from_torch_grads(kind, g, shape))
    _assert_trees_close(got, g_ref)


@pytest.mark.parametrize(
    "spec", [pytest.param(s, marks=() if s == "bilstm:2" else pytest.mark.slow) for s in SPECS]
)
def test_flax_mapping_of_layers_and_directions(spec, key):
    """The same for Flax: nn.RNN layers (nn.Bidirectional pairs) with the mapped variables."""
    pytest.importorskip("flax")

    harness, p = _model_problem(spec, key)
    peers = sys.modules["peers"]
    kind, layers, bi, H = harness.uniform_structure(p.cell)
    weights = jax.random.normal(jax.random.fold_in(key, 1), (p.T, p.B, H * (1 + bi)), "float32")
    hs_ref, g_ref = _composed_grads(harness, p, weights)
    module = peers.flax_model(kind, H, layers, bi)
    shape = harness.layer_params(p.cell, p.params)
    variables = peers.flax_variables(kind, shape)
    hs = module.apply(variables, p.xs)
    _assert_trees_close(hs, hs_ref)
    g = jax.grad(lambda v: jax.numpy.sum(module.apply(v, p.xs) * weights))(variables)
    got = harness.model_params(p.cell, peers.from_flax_grads(kind, g, shape))
    _assert_trees_close(got, g_ref)


def test_floor_is_positive_and_consistent(tiny_run):
    res, _, _ = tiny_run
    fl = res["floor"]
    assert fl["matmul"]["flops_per_s"] > 0 and fl["matmul"]["n"] == 64
    (row,) = fl["rows"]
    assert row["flops"]["total"] == row["flops"]["recurrent"] + row["flops"]["nonrecurrent"] > 0
    assert _close(row["floor_s"], row["flops"]["total"] / fl["matmul"]["flops_per_s"])
    assert _close(row["multiple_of_floor"], row["manual"]["median_s"] / row["floor_s"])
    assert _close(row["floor_fraction"] * row["multiple_of_floor"], 1.0)
    assert row["chain_floor_s"] > row["chain"]["median_s"] > 0


def test_parallel_part_times_the_device_counts_there_are(tiny_run):
    """bench_tiny runs the data-parallel part in-process (simulate = 0): one device here, the
    other counts noted as skipped (the 8-device run: tests/test_parallel.py, slow)."""
    res, _, _ = tiny_run
    (row,) = res["parallel"]["rows"]
    assert row["devices"] == 1 and row["all_reduces"] == 0 and row["speedup"] == 1.0
    assert row["collectives_in_loops"] == 0 and row["flops_per_device"] > 0
    _check_timed(row, row["T"] * row["B"])
    assert res["parallel"]["simulated"] is False
    assert any("[2, 4, 8] devices skipped" in n for n in res["notes"]), res["notes"]


def test_sequence_part_times_the_device_counts_there_are(tiny_run):
    """bench_tiny runs the sequence-parallel part in-process (simulate = 0): the plain
    one-device program here, no collectives, the split counts noted as skipped (the split
    runs: test_the_sequence_bench_part_on_simulated_devices, slow)."""
    res, _, _ = tiny_run
    part = res["sequence"]
    (row,) = part["rows"]
    assert row["devices"] == 1 and row["speedup"] == 1.0 and row["model"] == "mingru"
    assert row["collectives"] == {} and row["collective_bytes"] == 0
    assert row["collectives_in_loops"] == 0 and row["flops_vs_one_device"] == 1.0
    assert row["temp_vs_one_device"] == 1.0 and row["temp_bytes"] > 0
    assert row["check"]["reference"] == "1 device" and row["check"]["max_rel_err"] == 0.0
    _check_timed(row, row["T"] * row["B"])
    assert part["simulated"] is False and row["simulated"] is False
    assert any("sequence: [2] devices skipped" in n for n in res["notes"]), res["notes"]


@pytest.mark.slow
def test_the_sequence_bench_part_on_simulated_devices(tmp_path):
    """``benchmarks/sequence.py`` from a 1-device process: a fresh interpreter with 4
    simulated devices; a 2-layer bidirectional MinLSTM with its steps split over 1, 2 and 4
    of them, each checked against the 1-device program and timed; per layer and direction
    one all-gather each way and the gradient's all-reduce, none inside a loop; less temp
    memory per device; the overhead-not-speedup note and heading."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sequence.py"), "bench_tiny",
         f"out={tmp_path}", "plots=false", "sequence.simulate=4", "sequence.devices=[1, 2, 4]",
         "sequence.model='biminlstm:2'", "sequence.size=[64, 2, 3, 4]"],
        env={**env, "JAX_PLATFORMS": "cpu"}, cwd=ROOT, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "sequence.json").read_text())
    assert res["passed"] is True and res["failures"] == []
    part = res["sequence"]
    rows = part["rows"]
    assert [r["devices"] for r in rows] == [1, 2, 4] and part["simulated"] is True
    for r in rows:
        _check_timed(r, r["T"] * r["B"])
        assert r["check"]["reference"] == "1 device" and r["collectives_in_loops"] == 0, r
        assert _close(r["speedup"], rows[0]["median_s"] / r["median_s"])
        assert _close(r["temp_vs_one_device"], r["temp_bytes"] / rows[0]["temp_bytes"])
    for r in rows[1:]:
        # 2 layers x 2 directions, one all-gather of the summaries forward, one backward
        assert r["collectives"]["all-gather"] == 2 * 2 * 2, r["collectives"]
        assert set(r["collectives"]) == {"all-gather", "all-reduce"}, r["collectives"]
        assert r["collective_bytes"] >= r["gradient_bytes"]
        assert r["temp_vs_one_device"] < 1
    assert any("sequence: the devices are simulated" in n and "not a speedup" in n
               for n in res["notes"])  # fmt: skip
    assert "x 1 dev is overhead, not speedup" in proc.stdout


def test_precision_part_checks_and_compares_bf16_compute_with_float32(tiny_run):
    """bench_tiny's precision row: float32 and bfloat16 compute, each checked against float32
    autodiff (bf16 within the policy tolerance, and visibly above float32's error), timed,
    with the temp-memory ratio and its target."""
    from bptt_jax import verify

    res, _, _ = tiny_run
    (row,) = res["precision"]
    assert set(row["variants"]) == {"manual", "bf16"}
    tol = verify.policy_tolerances(jax.numpy.bfloat16)[0]
    bf16, f32 = row["variants"]["bf16"]["check"], row["variants"]["manual"]["check"]
    assert bf16["tolerance"] == tol and bf16["passed"] and bf16["max_rel_err"] <= tol
    assert f32["max_rel_err"] < bf16["max_rel_err"]
    for v in row["variants"].values():
        _check_timed(v, row["T"] * row["B"])
    temp = row["temp_vs_manual"]["bf16"]
    assert temp == row["variants"]["bf16"]["temp_bytes"] / row["variants"]["manual"]["temp_bytes"]
    (t,) = [t for t in res["targets"] if t["target"] == "bf16_temp"]
    assert t["value"] == 1 / temp


def test_linear_part_compares_the_linear_path_with_what_a_user_writes_and_the_gru(tiny_run):
    """bench_tiny's linear rows: MinGRU against autodiff of an associative scan and a tier-1
    cell, against the GRU, and the table (MinLSTM's and RG-LRU's scans beside the GRU); every
    entry checked against autodiff and timed; ratios from the medians and temps; the four
    targets."""
    res, _, _ = tiny_run
    part = res["linear"]
    assert part["auto_scan"] == ("sequential" if res["environment"]["backend"] == "cpu"
                                 else "parallel")  # fmt: skip
    (cmp,) = part["comparisons"]
    (gru,) = part["vs_gru"]
    (row,) = part["table"]
    assert list(cmp["entries"]) == ["manual", "assoc_autodiff", "tier1"]
    assert list(gru["entries"]) == ["manual", "gru"]
    # bench_tiny's linear.cells: minlstm and rglru, each with both scans, beside the gru
    assert list(row["entries"]) == ["minlstm/sequential", "minlstm/parallel",
                                    "rglru/sequential", "rglru/parallel", "gru"]  # fmt: skip
    assert set(row["time_of"]["gru"]) == set(row["entries"]) - {"gru"}
    for r in (cmp, gru, row):
        assert r["tokens"] == r["T"] * r["B"]
        for v in r["entries"].values():
            _check_timed(v, r["tokens"])
            assert v["temp_bytes"] > 0
    for r in (cmp, gru):
        base = r["entries"]["manual"]
        for name, v in r["entries"].items():
            if name != "manual":
                assert _close(r["time_vs_manual"][name], v["median_s"] / base["median_s"])
                assert _close(r["temp_vs_manual"][name], v["temp_bytes"] / base["temp_bytes"])
    for name, ratio in row["time_of"]["gru"].items():
        assert _close(ratio, row["entries"]["gru"]["median_s"] / row["entries"][name]["median_s"])
    targets = {t["target"]: t for t in res["targets"] if t["target"].startswith("linear_")}
    assert set(targets) == {"linear_vs_assoc", "linear_temp_vs_assoc", "linear_vs_tier1",
                            "linear_vs_gru"}  # fmt: skip
    assert targets["linear_temp_vs_assoc"]["value"] == cmp["temp_vs_manual"]["assoc_autodiff"]
    assert targets["linear_vs_gru"]["value"] == gru["time_vs_manual"]["gru"]


def test_targets_are_evaluated_from_the_ratios(tiny_run):
    res, _, _ = tiny_run
    assert res["targets"]
    for t in res["targets"]:
        assert t["met"] == (t["value"] >= t["threshold"])
        memory = ("temp_vs_autodiff", "checkpoint_saving", "bf16_temp", "linear_temp_vs_assoc")
        if t["target"] in memory:
            assert t["spread"] is None and not t["noisy"]
        else:
            assert t["spread"] >= 0
            assert t["noisy"] == (abs(t["value"] / t["threshold"] - 1) < t["spread"])
    names = {t["target"] for t in res["targets"]}
    assert {"never_below", "temp_vs_autodiff", "elman_vs_autodiff"} <= names
    # the spread of a time ratio is the larger IQR / median of its two timed entries
    row = res["manual_vs_autodiff"][0]
    (t,) = [
        t
        for t in res["targets"]
        if t["target"] == "never_below" and t["entry"].startswith(f"{row['cell']} T={row['T']} ")
    ]
    want = max(
        row["variants"][v]["iqr_s"] / row["variants"][v]["median_s"] for v in row["variants"]
    )
    assert t["spread"] == pytest.approx(want)


def test_plots_are_written(tiny_run):
    res, out, _ = tiny_run
    names = {"tokens_per_s_vs_T.png", "tokens_per_s_vs_k.png", "memory_vs_T.png", "ratios.png"}
    assert {p.rsplit("/", 1)[-1] for p in res["plots"]} == names
    for name in names:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


@pytest.mark.parametrize(
    "override, key",
    [
        ("timing.repeats=0", "timing.repeats"),
        ("truncation.kk=[4]", "truncation.kk"),
        ("manual_vs_autodiff.sizes=[[4, 2, 3]]", "manual_vs_autodiff.sizes[0]"),
        ("scaling.variants=['manual', 'nope']", "scaling.variants[1]"),
        ("parts=['floor', 'speed']", "parts[1]"),
        ("models.models=['lstm', 'blstm:2']", "models.models[1]"),
        ("models.memory_sizes=[[64, 2, 3]]", "models.memory_sizes[0]"),
        ("models.memory_variants=['manual', 'nope']", "models.memory_variants[1]"),
        ("models.repeats=0", "models.repeats"),
        ("parallel.devices=[1, 3]", "parallel.devices[1]"),
        ("linear.sizes=[[4, 2, 3]]", "linear.sizes[0]"),
        ("linear.cells=['gru']", "linear.cells[0]"),
        ("sequence.model='lstm'", "sequence.model"),
        ("sequence.model='mingru:0'", "sequence.model"),
        ("sequence.devices=[1, 3]", "sequence.devices[1]"),
        ("sequence.devices=[]", "sequence.devices"),
        ("sequence.size=[64, 2, 3]", "sequence.size"),
        ("sequence.repeats=0", "sequence.repeats"),
    ],
)
def test_config_error_names_the_key_and_exits_2(override, key, tmp_path, capsys):
    # in this process: the error comes before any work, so nothing of the suite's changes
    status = cli.main(["--no-compile-cache", "bench", "bench_tiny", f"out={tmp_path}", override])
    err = capsys.readouterr().err
    assert status == 2, err
    assert f"'{key}'" in err
    assert not (tmp_path / "bench.json").exists()


@pytest.mark.parametrize("spec", ["gru", "bilstm", "elman:2"])
def test_the_sequence_part_refuses_a_model_of_nonlinear_cells(spec):
    with pytest.raises(config.ConfigError) as e:
        bench.load_config("bench_tiny", [f"sequence.model='{spec}'"])
    msg = str(e.value)
    assert msg.startswith(f"config: 'sequence.model' = '{spec}': ")
    assert "is not a linear recurrence" in msg and "mingru, minlstm, rglru, lru" in msg


@pytest.mark.parametrize("spec", ["mingru", "biminlstm", "rglru:2", "bilru:3"])
def test_the_sequence_part_takes_any_model_of_linear_cells(spec):
    assert bench.load_config("bench_tiny", [f"sequence.model='{spec}'"]).sequence.model == spec


def test_the_sequence_part_refuses_a_length_the_devices_do_not_divide():
    with pytest.raises(config.ConfigError) as e:
        bench.load_config("bench_tiny", ["sequence.size=[63, 2, 3, 4]"])
    assert str(e.value) == (
        "config: 'sequence.devices[1]' = 2 does not divide the sequence length T = 63 "
        "('sequence.size'[0]); each device takes T / n steps"
    )
    # the default size divides every default count
    assert bench.Sequence().size[0] % math.lcm(*bench.Sequence().devices) == 0


def test_an_out_folder_under_a_file_exits_2_before_any_work(tmp_path):
    (tmp_path / "afile").write_text("x")
    proc = _bench("bench_tiny", f"out={tmp_path / 'afile' / 'res'}", timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "'out'" in proc.stderr and "is a file" in proc.stderr


# ------------------------------------------------------------------------- the check step
def _wrong_gradient(cell, targets, truncate=None):
    """The right loss value with a gradient 1% too large: only the check can tell."""
    import bptt_jax

    def loss(params, readout, xs):
        value = bptt_jax.sequence_loss(cell, params, readout, xs, targets, truncate=truncate)
        return value + 0.01 * (value - jax.lax.stop_gradient(value))

    return loss


@pytest.mark.parametrize(
    "overrides, part",
    [
        (
            ["manual_vs_autodiff.variants=['manual', 'wrong']", "manual_vs_autodiff.cells='gru'"],
            "manual_vs_autodiff",
        ),
        (["truncation.variant='wrong'"], "truncation"),
    ],
)
def test_a_wrong_gradient_path_is_refused_and_never_timed(
    overrides, part, monkeypatch, tmp_path, capsys
):
    runner = bench.load_runner()
    harness = sys.modules["harness"]
    monkeypatch.setitem(harness.VARIANTS, "wrong", _wrong_gradient)
    cfg = bench.load_config(
        "bench_tiny",
        [f"out={tmp_path}", f"parts=['{part}']", "plots=false", "timing.repeats=1", *overrides],
    )
    assert runner.main_with_config(cfg) == 1
    res = json.loads((tmp_path / "bench.json").read_text())
    assert res["passed"] is False
    (failure,) = res["failures"]
    assert failure["part"] == part
    assert "'wrong' disagrees with 'autodiff'" in failure["error"]
    # every leaf is named with its error: the value agrees, the gradients are 1% off
    leaves = dict(
        (name, float(err))
        for name, err in re.findall(r"(\S+) ([\d.e+-]+)[,)]", failure["error"].split("leaf: ")[1])
    )
    assert leaves.pop("value") < 1e-4
    assert leaves and all(0.005 < e < 0.02 for e in leaves.values()), leaves
    assert res[part] in ([], None)  # nothing of the failing entry was timed or reported
    assert "FAILED" in capsys.readouterr().err


def test_bench_without_its_scripts_says_how_to_get_them(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "BENCHMARKS_DIR", tmp_path / "benchmarks")
    with pytest.raises(FileNotFoundError, match=r"pip install -e \."):
        bench.load_runner()


def test_interleaved_timing_settles_short_samples_only():
    """``settle`` untimed calls precede each sample of a short call, none of a long one; every
    variant gets ``repeats`` samples, in rotating order."""
    bench.load_runner()
    harness = sys.modules["harness"]
    calls = {"short": 0, "long": 0}

    def short():
        calls["short"] += 1

    def long():
        calls["long"] += 1
        time.sleep(harness.SETTLE_BELOW_S * 1.2)

    stats = harness.time_interleaved({"short": short, "long": long}, repeats=2, warmup=1, settle=3)
    assert calls == {"short": 1 + 2 * (1 + 3), "long": 1 + 2}
    assert [v["repeats"] for v in stats.values()] == [2, 2]
    assert stats["long"]["min_s"] >= harness.SETTLE_BELOW_S


@pytest.mark.parametrize("name", sorted(p.stem for p in config.CONFIG_DIR.glob("bench*.toml")))
def test_every_shipped_bench_config_loads_and_names_known_variants(name):
    runner = bench.load_runner()
    cfg = bench.load_config(name)
    runner.check_names(cfg)
    assert cfg.parts and cfg.manual_vs_autodiff.sizes
