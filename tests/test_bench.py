"""`bptt-jax bench`: the smoke config runs every part and writes every number; config errors
name their key; a wrong gradient path is refused by the check, never timed.

Nothing here asserts on speed: the suite reports, the tests check what it reports is whole
and consistent.
"""

import json
import math
import re
import subprocess
import sys
import time

import jax
import pytest

from bptt_jax import bench

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


def test_targets_are_evaluated_from_the_ratios(tiny_run):
    res, _, _ = tiny_run
    assert res["targets"]
    for t in res["targets"]:
        assert t["met"] == (t["value"] >= t["threshold"])
        if t["target"] == "temp_vs_autodiff":  # memory: no samples, no noise
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
    ],
)
def test_config_error_names_the_key_and_exits_2(override, key, tmp_path):
    proc = _bench("bench_tiny", f"out={tmp_path}", override, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"'{key}'" in proc.stderr
    assert not (tmp_path / "bench.json").exists()


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


def test_bench_without_the_repository_says_how_to_get_it(monkeypatch, tmp_path):
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
