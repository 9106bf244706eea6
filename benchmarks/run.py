"""The benchmark runner: read a config, run its parts, print tables, write JSON and plots.

    python benchmarks/run.py                        # configs/bench.toml (= `bptt-jax bench`)
    python benchmarks/run.py bench_gpu out=results/gpu timing.repeats=20

Parts, in the order ``parts`` lists them (each is a script here, also runnable alone):
``manual_vs_autodiff``, ``scaling`` (tokens/s and memory vs T), ``truncation``, ``peers``,
``floor``, ``models`` (stacked and bidirectional), ``parallel`` (the batch split over
devices), ``precision`` (bfloat16 compute), ``linear`` (MinGRU and MinLSTM), ``sequence``
(the time axis of a linear recurrence split over devices). Every timed gradient path is
checked against autodiff first (the sequence part's splits: against the 1-device program); an
entry that fails its check is reported loudly and never timed, and the run exits 1.

Writes to the config's ``out`` folder: ``bench.json`` (every number: environment, config,
each part's rows with all samples, the suite's targets and whether they were met,
failures, notes) and the PNG plots of ``plots.py``. A single part run as a script writes
``<part>.json`` instead, so it does not overwrite a whole run's results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import floor
import harness
import jax
import linear
import manual_vs_autodiff
import models
import parallel
import peers
import plots
import precision
import scaling
import sequence
import truncation

from bptt_jax.cli import bench, config

PARTS = {
    "manual_vs_autodiff": (manual_vs_autodiff, "hand-written BPTT vs jax.grad of the plain scan"),
    "scaling": (scaling, "tokens/s and memory against sequence length T"),
    "truncation": (truncation, "full BPTT vs truncated BPTT (truncate=k)"),
    "peers": (peers, "other implementations of the same loss and gradient"),
    "floor": (floor, "bptt_jax against the matmuls it cannot avoid"),
    "models": (models, "stacked and bidirectional models: vs autodiff, the peers; memory"),
    "parallel": (parallel, "data parallelism: the gradient step on 1, 2, 4, 8 devices"),
    "precision": (precision, "the precision policy: float32 against bfloat16 compute"),
    "linear": (linear, "linear recurrences: vs what a user writes, the GRU and the LSTM"),
    "sequence": (sequence, "sequence parallelism: the time axis split over 1, 2, 4, 8 devices"),
}
SCHEMA_VERSION = 1


def check_names(cfg) -> None:
    """Every variant a config names exists in ``harness.VARIANTS`` (else a ConfigError)."""
    known = ", ".join(harness.VARIANTS)
    named = [
        (f"{part}.{key}[{i}]", v)
        for part, key in (
            ("manual_vs_autodiff", "variants"),
            ("scaling", "variants"),
            ("models", "variants"),
            ("models", "memory_variants"),
            ("precision", "variants"),
        )
        for i, v in enumerate(getattr(getattr(cfg, part), key))
    ]
    named.append(("truncation.variant", cfg.truncation.variant))
    for key, v in named:
        if v not in harness.VARIANTS:
            raise config.ConfigError(f"config: '{key}' = {v!r} is not a variant; known: {known}")


# ----------------------------------------------------------------------------- targets
#: The suite's targets, as (name, threshold, kind): each is checked where the results have it.
TARGETS = {
    "elman_vs_autodiff": 1.3,  # autodiff/manual time, Elman, H <= 256
    "gated_vs_autodiff": 1.1,  # LSTM and GRU, H <= 256
    "never_below": 0.95,  # autodiff/manual at any size
    "temp_vs_autodiff": 1.0,  # temp(autodiff)/temp(manual) >= 1: never more memory
    "truncation_k64": 1.4,  # tokens/s(k)/tokens/s(full) for k >= 64
    "torch_small": 1.4,  # torch/bptt_jax, Elman and GRU, small B*H (per-step cost dominates)
    "torch_large": 0.8,  # torch/bptt_jax, Elman and GRU, large B*H
    "torch_lstm": 1 / 1.3,  # torch/bptt_jax for LSTM: bptt_jax within 1.3x of oneDNN's LSTM
    # stacked and bidirectional models (the models part)
    "model_vs_autodiff": 1.2,  # autodiff/manual time of a Stack or Bidirectional model
    "model_vs_torch": 0.9,  # torch/manual time: nn.LSTM(num_layers=2), nn.GRU(bidirectional)
    "checkpoint_saving": 10.0,  # temp(manual)/temp(checkpointed) of a deep stack: <= 1/10
    # the precision policy (the precision part)
    "bf16_temp": 1 / 0.75,  # temp(float32)/temp(bf16 compute): bf16 at most 0.75x
    "bf16_vs_torch_bf16": 1.0,  # torch autocast bf16 time / bptt_jax bf16 time (on GPUs)
    # linear recurrences (the linear part): a MinGRU layer's gradient with its default scan
    "linear_vs_assoc": 4.0,  # time(jax.grad of an associative-scan forward) / time(MinGRU)
    "linear_temp_vs_assoc": 4.0,  # temp(that) / temp(MinGRU): the MinGRU's at most 0.25x
    "linear_vs_tier1": 2.0,  # time(the same cell as a tier-1 user cell) / time(MinGRU)
    "linear_vs_gru": 3.0,  # time(GRU) / time(MinGRU), same size
}
#: B*H at or below which a size counts as "small" (per-step cost dominates) for the torch
#: targets; an assumption of this suite, stated in docs/guides/performance.md.
SMALL_BH = 32 * 128


def spread(*timed: dict) -> float:
    """The largest relative spread, IQR / median, among the timed entries of a ratio."""
    return max(v["iqr_s"] / v["median_s"] for v in timed)


def targets(results: dict) -> list[dict[str, Any]]:
    """Each target of :data:`TARGETS` that the results have, with its value, whether it was
    met, and for a time ratio the ``spread`` of its samples (see :func:`spread`): a value
    within that fraction of its threshold is ``noisy``, decided by the machine's noise more
    than by the code."""
    out = []

    def add(target, entry, value, threshold, timed=()):
        if value is not None:
            noise = spread(*timed) if timed else None
            out.append(
                dict(
                    target=target,
                    entry=entry,
                    value=value,
                    threshold=threshold,
                    met=bool(value >= threshold),
                    spread=noise,
                    noisy=bool(noise is not None and abs(value / threshold - 1) < noise),
                )
            )

    for r in results.get("manual_vs_autodiff") or []:
        entry = f"{r['cell']} T={r['T']} B={r['B']} D={r['D']} H={r['H']}"
        speed = r.get("time_vs_manual", {}).get("autodiff")
        temp = r.get("temp_vs_manual", {}).get("autodiff")
        timed = [r["variants"][v] for v in ("manual", "autodiff") if v in r["variants"]]
        if r["H"] <= 256:
            key = "elman_vs_autodiff" if r["cell"] == "elman" else "gated_vs_autodiff"
            add(key, entry, speed, TARGETS[key], timed)
        add("never_below", entry, speed, TARGETS["never_below"], timed)
        add("temp_vs_autodiff", entry, temp, TARGETS["temp_vs_autodiff"])
    tr = results.get("truncation")
    if tr:
        full = tr["entries"].get("full")
        for name, v in tr["entries"].items():
            # k >= 64 that truncates (k < T; k >= T is full BPTT), each against full BPTT
            ratio = (tr.get("tokens_per_s_vs_full") or {}).get(name)
            if v["truncate"] and 64 <= v["truncate"] < tr["T"] and full and ratio is not None:
                entry = f"{tr['cell']} T={tr['T']} B={tr['B']} H={tr['H']} {name}"
                add("truncation_k64", entry, ratio, 1.4, [v, full])
    for r in results.get("peers") or []:
        ratio = r["time_vs_bptt"].get("torch")
        entry = f"{r['cell']} T={r['T']} B={r['B']} D={r['D']} H={r['H']}"
        timed = [r["variants"][v] for v in ("bptt_jax", "torch") if v in r["variants"]]
        if r["cell"] == "lstm":
            key = "torch_lstm"
        elif r["B"] * r["H"] <= SMALL_BH:
            key = "torch_small"
        else:
            key = "torch_large"
        add(key, entry, ratio, TARGETS[key], timed)
    part = results.get("models") or {}
    for r in part.get("rows", []):
        entry = f"{r['model']} T={r['T']} B={r['B']} D={r['D']} H={r['H']}"
        speed = r.get("time_vs_manual", {})
        for key, peer in (("model_vs_autodiff", "autodiff"), ("model_vs_torch", "torch")):
            timed = [r["variants"][v] for v in ("manual", peer) if v in r["variants"]]
            add(key, entry, speed.get(peer), TARGETS[key], timed)
    for r in part.get("memory", []):
        entry = f"{r['model']} T={r['T']} B={r['B']} D={r['D']} H={r['H']}"
        saving = r.get("temp_saving", {}).get("checkpointed")
        add("checkpoint_saving", entry, saving, TARGETS["checkpoint_saving"])
    for r in results.get("precision") or []:
        entry = f"{r['cell']} T={r['T']} B={r['B']} D={r['D']} H={r['H']}"
        temp = r.get("temp_vs_manual", {}).get("bf16")
        add("bf16_temp", entry, None if not temp else 1 / temp, TARGETS["bf16_temp"])
        v = r["variants"]
        if "bf16" in v and "torch_bf16" in v and jax.default_backend() == "gpu":
            ratio = v["torch_bf16"]["median_s"] / v["bf16"]["median_s"]
            add("bf16_vs_torch_bf16", entry, ratio, 1.0, [v["bf16"], v["torch_bf16"]])
    part = results.get("linear") or {}
    for r in [*part.get("comparisons", []), *part.get("vs_gru", [])]:
        entry = f"mingru T={r['T']} B={r['B']} D={r['D']} H={r['H']}"
        speed, temp = r.get("time_vs_manual", {}), r.get("temp_vs_manual", {})
        for key, other, ratio in (
            ("linear_vs_assoc", "assoc_autodiff", speed),
            ("linear_temp_vs_assoc", "assoc_autodiff", temp),
            ("linear_vs_tier1", "tier1", speed),
            ("linear_vs_gru", "gru", speed),
        ):
            if other in r["entries"]:
                timed = [r["entries"][v] for v in ("manual", other)] if ratio is speed else ()
                add(key, entry, ratio.get(other), TARGETS[key], timed)
    return out


# ----------------------------------------------------------------------------- running
def run(cfg, config_file: str | None = None, print_fn=print) -> dict[str, Any]:
    """Run the parts of ``cfg``; return the results dict (also what goes to JSON)."""
    start = time.perf_counter()
    libraries = {
        *(cfg.peers.libraries if "peers" in cfg.parts else ()),
        *(cfg.models.libraries if "models" in cfg.parts else ()),
        *(cfg.precision.libraries if "precision" in cfg.parts else ()),
    }
    if "torch_bf16" in libraries:
        libraries.add("torch")
    if "torch" in libraries:
        # on a GPU, JAX would otherwise take 75% of its memory up front and leave PyTorch
        # little (no effect once JAX's backend has started, nor on a CPU)
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    precision = None if cfg.matmul_precision == "default" else cfg.matmul_precision
    jax.config.update("jax_default_matmul_precision", precision)
    session = harness.Session(cfg, print_fn)
    env = harness.environment()
    for lib in ("torch", "flax"):  # versions of the peers, when installed
        if lib in libraries and env.get(lib) is None:
            try:
                env[lib] = __import__(lib).__version__
            except ImportError:
                pass
    if env.get("torch"):
        import torch

        if cfg.peers.torch_threads:
            torch.set_num_threads(cfg.peers.torch_threads)
        if cfg.matmul_precision == "highest":
            # like for like with JAX's true float32: cuDNN's RNNs use TF32 by default on GPUs
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        env["torch_tf32"] = bool(torch.backends.cudnn.allow_tf32)
        env["torch_threads"] = torch.get_num_threads()
    print_fn(
        f"bptt-jax bench: jax {env['jax']} on {env['backend']} ({env['device_kind']}), "
        f"{env['cpu_count']} CPUs, {env['machine']}; float32, loss xent O={cfg.outputs}, "
        f"matmul precision {cfg.matmul_precision}\n"
        f"config {config_file or '(defaults)'}: parts {', '.join(cfg.parts)}; median of "
        f"{cfg.timing.repeats} interleaved runs after {cfg.timing.warmup} warm-up; gradients "
        f"checked against '{harness.REFERENCE}' (models: '{harness.MODEL_REFERENCE}', rtol "
        f"{cfg.check.rtol:g}) before timing",
        flush=True,
    )
    if env["backend"] != "cpu" and cfg.matmul_precision != "highest":
        session.note(
            f"matmul_precision={cfg.matmul_precision!r} on {env['backend']}: float32 matmuls "
            f"run in TF32 or bfloat16 passes, ~1e-3 off; check.rtol={cfg.check.rtol:g} is sized "
            "for true float32 (matmul_precision='highest')"
        )
    results: dict[str, Any] = dict(
        schema_version=SCHEMA_VERSION,
        config_file=None if config_file is None else str(config_file),
        config=config.to_dict(cfg),
        environment=env,
        part_seconds={},
    )
    for name in cfg.parts:
        module, what = PARTS[name]
        print_fn(f"\n== {name}: {what}", flush=True)
        t0 = time.perf_counter()
        try:
            results[name] = module.run(session, cfg)
        except Exception as e:  # noqa: BLE001 - a crashed part is a failure, the rest runs
            session.fail(name, "(the whole part)", f"{type(e).__name__}: {e}")
            results[name] = None
        results["part_seconds"][name] = time.perf_counter() - t0
    results["targets"] = targets(results)
    results["failures"] = session.failures
    results["notes"] = session.notes
    results["passed"] = not session.failures
    results["wall_s"] = time.perf_counter() - start
    return results


def summary(results: dict) -> list[str]:
    lines = ["", "== summary"]
    if results["targets"]:
        lines.append("targets (ratio >= threshold; times are medians of this run):")
        for t in results["targets"]:
            noise = "" if t["spread"] is None else f"  spread {t['spread']:4.0%}"
            lines.append(
                f"  {'met ' if t['met'] else 'MISS'} {t['target']:<18} {t['entry']:<40} "
                f"{t['value']:6.2f} >= {t['threshold']:.2f}{noise}{'  noisy' if t['noisy'] else ''}"
            )
        noisy = [t for t in results["targets"] if t["noisy"]]
        if noisy:
            lines.append(
                f"{len(noisy)} of these lie within their samples' spread (IQR / median) of the "
                "threshold: the machine's noise decides them; rerun on a quiet machine "
                "(benchmarks/README.md, 'On a loaded machine')"
            )
    for n in results["notes"]:
        lines.append(f"note: {n}")
    for f in results["failures"]:
        lines.append(f"FAILED {f['part']}: {f['entry']}: {f['error']}")
    secs = ", ".join(f"{k} {v:.0f}s" for k, v in results["part_seconds"].items())
    lines.append(f"wall time {results['wall_s']:.0f} s ({secs})")
    return lines


def write_json(results: dict, path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, default=float)
    os.replace(tmp, path)


def main_with_config(cfg, config_file: str | None = None, name: str = "bench") -> int:
    """Run ``cfg``, write ``<out>/<name>.json`` and the plots, print a summary; exit status."""
    check_names(cfg)
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise config.ConfigError(f"config: 'out' {cfg.out!r} cannot be created: {e}") from None
    results = run(cfg, config_file)
    path = out / f"{name}.json"
    results["plots"] = []
    write_json(results, path)  # the numbers first: a failing plot loses none of them
    if cfg.plots:
        results["plots"] = plots.make(results, out)
        write_json(results, path)
    for line in summary(results):
        print(line)
    print(f"wrote {path}" + "".join(f", {Path(p).name}" for p in results["plots"]))
    if not results["passed"]:
        print(f"{len(results['failures'])} entries FAILED (not timed): see above", file=sys.stderr)
    return 0 if results["passed"] else 1


def main(argv: list[str] | None = None, parts: list[str] | None = None) -> int:
    """Command line of the runner and of each part's script (``parts`` fixes which run)."""
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0]
        + (f" Runs only: {', '.join(parts)}." if parts else "")
    )
    config.add_arguments(parser, default="bench")
    args = parser.parse_args(argv)
    try:
        cfg = bench.check_config(config.from_args(bench.BenchConfig, args))
        if parts:
            cfg = dataclasses.replace(cfg, parts=tuple(parts))
        return main_with_config(cfg, bench.config_name(args), name=parts[0] if parts else "bench")
    except config.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
