"""Part 2: one cell over a sweep of sequence lengths T: tokens/s and memory against T.

For each T of ``[scaling]`` (cell, B, D, H fixed): every variant is compiled, checked against
autodiff and, with ``time = true``, timed side by side. The memory numbers (XLA temp, and on a
GPU the device's peak) come from the compiled program, so ``time = false`` still gives memory
against T for lengths too long to time on a small machine; ``memory_T`` adds lengths measured
that way after the timed ones.

A variant the engine does not provide yet (say ``checkpointed`` before it lands) is noted and
skipped, so a config may list it ahead of time. Ratios per row are as in
``manual_vs_autodiff``: ``time_vs_manual[v] = median(v) / median(manual)`` and
``temp_vs_manual[v] = temp(v) / temp(manual)``.

    python benchmarks/scaling.py                       # configs/bench.toml, this part
    python benchmarks/scaling.py bench_full scaling.T='[1024, 4096, 16384]' scaling.time=false
"""

from __future__ import annotations

from typing import Any

import harness
from manual_vs_autodiff import BASELINE, ratios


def run(session: harness.Session, cfg) -> list[dict[str, Any]]:
    part = cfg.scaling
    variants = []
    for v in part.variants:
        why = harness.unavailable(v)
        if why is None:
            variants.append(v)
        else:
            session.note(f"scaling: variant '{v}' is not available, skipped ({why})")
    session.print(HEADER + "\n" + "-" * len(HEADER), flush=True)
    rows = []
    lengths = [(T, part.time) for T in part.T] + [(T, False) for T in part.memory_T]
    for T, time_it in lengths:
        problem = session.problem(part.cell, T, part.B, part.D, part.H)
        try:
            timed = {v: session.prepare(problem, v) for v in variants}
        except harness.EntryFailed as e:
            session.fail("scaling", problem.label, e)
            continue
        if time_it:
            measured = session.measure(problem, timed)
        else:
            measured = {
                name: dict(compile_s=t.compile_s, **t.memory, check=t.check)
                for name, t in timed.items()
            }
        row = dict(cell=part.cell, **problem.shape, tokens=problem.tokens, variants=measured)
        if time_it:
            row.update(ratios(measured, BASELINE))
        else:
            row.update({k: v for k, v in _memory_ratios(measured).items()})
        rows.append(row)
        session.print(format_row(row), flush=True)
    return rows


def _memory_ratios(variants):
    base = variants.get(BASELINE)
    if base is None or not base.get("temp_bytes"):
        return {}
    return {
        f"temp_vs_{BASELINE}": {
            n: (v["temp_bytes"] / base["temp_bytes"] if v["temp_bytes"] is not None else None)
            for n, v in variants.items()
            if n != BASELINE
        }
    }


HEADER = (
    f"{'cell':<6} {'T':>6} {'B':>4} {'H':>4}  {'variant':<12} {'ms':>8} {'Mtok/s':>7} "
    f"{'temp MiB':>9} {'peak MiB':>9} {'x manual':>9} {'temp x':>7}"
)


def format_row(row: dict) -> str:
    lines = []
    for i, (name, v) in enumerate(row["variants"].items()):
        head = f"{row['cell']:<6} {row['T']:>6} {row['B']:>4} {row['H']:>4}" if i == 0 else " " * 22
        tr = row.get(f"time_vs_{BASELINE}", {}).get(name)
        mr = row.get(f"temp_vs_{BASELINE}", {}).get(name)
        tps = v.get("tokens_per_s")
        lines.append(
            f"{head}  {name:<12} {harness.fmt_ms(v.get('median_s')):>8} "
            f"{'-' if tps is None else f'{tps / 1e6:.3f}':>7} "
            f"{harness.fmt_bytes(v['temp_bytes']):>9} "
            f"{harness.fmt_bytes(v['device_peak_bytes']):>9} "
            f"{'' if tr is None else f'{tr:.2f}x':>9} {'' if mr is None else f'{mr:.2f}':>7}"
        )
    return "\n".join(lines)


def table(rows: list[dict]) -> list[str]:
    return [HEADER, "-" * len(HEADER), *(format_row(r) for r in rows)]


if __name__ == "__main__":
    import run as runner

    raise SystemExit(runner.main(parts=["scaling"]))
