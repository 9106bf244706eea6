"""Part 1: hand-written BPTT against jax.grad through the plain per-step lax.scan.

For each cell and ``[T, B, D, H]`` of ``[manual_vs_autodiff]``: every variant (by default
``manual`` and ``autodiff``, names from ``harness.VARIANTS``) is compiled, checked against
autodiff, then timed side by side. Reported per variant: median ms per gradient step and its
spread, tokens/s (T*B per second), compile time, XLA temp memory; and per row

* ``time_vs_manual[v]   = median(v) / median(manual)``: above 1, the hand-written path is
  that many times faster (for ``autodiff`` this is the speedup of bptt_jax);
* ``temp_vs_manual[v]   = temp(v) / temp(manual)``: above 1, the hand-written path needs less.

    python benchmarks/manual_vs_autodiff.py                  # configs/bench.toml, this part
    python benchmarks/manual_vs_autodiff.py bench_full manual_vs_autodiff.cells='["lstm"]'
"""

from __future__ import annotations

from typing import Any

import harness

BASELINE = "manual"


def run(session: harness.Session, cfg) -> list[dict[str, Any]]:
    part = cfg.manual_vs_autodiff
    session.print(HEADER + "\n" + "-" * len(HEADER), flush=True)
    rows = []
    for cell_name in part.cells:
        for T, B, D, H in part.sizes:
            problem = session.problem(cell_name, T, B, D, H)
            try:
                timed = {v: session.prepare(problem, v) for v in part.variants}
            except harness.EntryFailed as e:
                session.fail("manual_vs_autodiff", problem.label, e)
                continue
            variants = session.measure(problem, timed)
            row = dict(cell=cell_name, **problem.shape, tokens=problem.tokens, variants=variants)
            row.update(ratios(variants, BASELINE))
            rows.append(row)
            session.print(format_row(row), flush=True)
    return rows


def ratios(variants: dict[str, dict], baseline: str) -> dict[str, dict[str, float | None]]:
    """``time_vs_<baseline>`` and ``temp_vs_<baseline>`` of every other variant."""
    if baseline not in variants:
        return {}
    base = variants[baseline]
    time_r, temp_r = {}, {}
    for name, v in variants.items():
        if name == baseline:
            continue
        time_r[name] = v["median_s"] / base["median_s"]
        bt, vt = base["temp_bytes"], v["temp_bytes"]
        temp_r[name] = vt / bt if bt and vt is not None else None
    return {f"time_vs_{baseline}": time_r, f"temp_vs_{baseline}": temp_r}


HEADER = (
    f"{'cell':<6} {'T':>6} {'B':>4} {'D':>4} {'H':>4}  {'variant':<10} {'ms':>8} {'IQR ms':>7} "
    f"{'Mtok/s':>7} {'compile s':>9} {'temp MiB':>9} {'x manual':>9} {'temp x':>7}"
)


def format_row(row: dict) -> str:
    lines = []
    for i, (name, v) in enumerate(row["variants"].items()):
        head = (
            f"{row['cell']:<6} {row['T']:>6} {row['B']:>4} {row['D']:>4} {row['H']:>4}"
            if i == 0
            else " " * 28
        )
        tr = row.get(f"time_vs_{BASELINE}", {}).get(name)
        mr = row.get(f"temp_vs_{BASELINE}", {}).get(name)
        lines.append(
            f"{head}  {name:<10} {harness.fmt_ms(v['median_s']):>8} "
            f"{harness.fmt_ms(v['iqr_s']):>7} {v['tokens_per_s'] / 1e6:7.3f} "
            f"{v['compile_s']:9.2f} {harness.fmt_bytes(v['temp_bytes']):>9} "
            f"{'' if tr is None else f'{tr:.2f}x':>9} {'' if mr is None else f'{mr:.2f}':>7}"
        )
    return "\n".join(lines)


def table(rows: list[dict]) -> list[str]:
    return [HEADER, "-" * len(HEADER), *(format_row(r) for r in rows)]


if __name__ == "__main__":
    import run as runner

    raise SystemExit(runner.main(parts=["manual_vs_autodiff"]))
