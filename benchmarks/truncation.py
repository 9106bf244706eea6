"""Part 3: full BPTT against truncated BPTT (``truncate=k``) on one long sequence.

One problem from ``[truncation]`` (e.g. Elman, T=4096); the entries ``full`` (no truncation)
and ``k=16``, ``k=32``, ... all use the same gradient path (``variant``, the hand-written one by
default), each checked against autodiff *with the same truncation*, then timed side by side.
The forward is the same for every k; what changes is the backward: it stops carrying the
error across every k-th step.

* ``tokens_per_s_vs_full[k] = tokens/s(k) / tokens/s(full) = median(full) / median(k)``:
  the throughput gained by truncating (the target is >= 1.4 for k >= 64 on T=4096);
* ``temp_vs_full[k] = temp(k) / temp(full)``.

    python benchmarks/truncation.py                          # configs/bench.toml, this part
    python benchmarks/truncation.py truncation.T=8192 truncation.k='[32, 128]'
"""

from __future__ import annotations

from typing import Any

import harness


def run(session: harness.Session, cfg) -> dict[str, Any] | None:
    part = cfg.truncation
    session.print(HEADER + "\n" + "-" * len(HEADER), flush=True)
    problem = session.problem(part.cell, part.T, part.B, part.D, part.H)
    entries = {"full": None, **{f"k={k}": k for k in part.k}}
    try:
        timed = {name: session.prepare(problem, part.variant, k) for name, k in entries.items()}
    except harness.EntryFailed as e:
        session.fail("truncation", problem.label, e)
        return None
    measured = session.measure(problem, timed)
    for name, k in entries.items():
        measured[name]["truncate"] = k
    full = measured["full"]
    result = dict(
        cell=part.cell,
        **problem.shape,
        tokens=problem.tokens,
        variant=part.variant,
        entries=measured,
        tokens_per_s_vs_full={
            name: v["tokens_per_s"] / full["tokens_per_s"] for name, v in measured.items()
        },
        temp_vs_full={
            name: (v["temp_bytes"] / full["temp_bytes"] if full["temp_bytes"] else None)
            for name, v in measured.items()
        },
    )
    for line in format_rows(result):
        session.print(line, flush=True)
    return result


HEADER = (
    f"{'entry':<8} {'ms':>8} {'IQR ms':>7} {'Mtok/s':>7} {'x full tok/s':>12} "
    f"{'temp MiB':>9} {'temp x full':>11} {'max rel err':>11}"
)


def format_rows(result: dict) -> list[str]:
    lines = []
    for name, v in result["entries"].items():
        mr = result["temp_vs_full"][name]
        lines.append(
            f"{name:<8} {harness.fmt_ms(v['median_s']):>8} {harness.fmt_ms(v['iqr_s']):>7} "
            f"{v['tokens_per_s'] / 1e6:7.3f} {result['tokens_per_s_vs_full'][name]:11.2f}x "
            f"{harness.fmt_bytes(v['temp_bytes']):>9} {'-' if mr is None else f'{mr:.2f}':>11} "
            f"{v['check']['max_rel_err']:11.1e}"
        )
    return lines


def title(cfg) -> str:
    p = cfg.truncation
    return f"{p.cell} T={p.T} B={p.B} D={p.D} H={p.H}, variant {p.variant}"


def table(result: dict | None) -> list[str]:
    return [HEADER, "-" * len(HEADER), *(format_rows(result) if result else [])]


if __name__ == "__main__":
    import run as runner

    raise SystemExit(runner.main(parts=["truncation"]))
