"""PNG plots of a results dict (matplotlib, no display needed).

* ``tokens_per_s_vs_T.png``: the ``scaling`` part, tokens/s of each variant against T;
* ``memory_vs_T.png``: the ``scaling`` part, XLA temp memory (and the device's peak, on a GPU)
  of each variant against T;
* ``tokens_per_s_vs_k.png``: the ``truncation`` part, tokens/s against k, full BPTT as a line;
* ``ratios.png``: the speedups of the hand-written path: autodiff/manual per cell and size,
  each peer's time over bptt_jax's, each model row's (stacked, bidirectional) times over
  manual's, and the linear part's times over the MinGRU's.

A plot whose part did not run (or has no timings) is not drawn.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _title(results: dict, what: str) -> str:
    env = results["environment"]
    return f"{what}\n{env['device_kind']} ({env['backend']}), jax {env['jax']}, float32"


def _save(fig, path: Path) -> str:
    """Write ``fig`` to ``path`` atomically (a temporary file renamed into place)."""
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    os.replace(tmp, path)
    return str(path)


def _t_axis(ax, rows) -> None:
    ts = sorted({r["T"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ts, [str(t) for t in ts])
    ax.minorticks_off()
    ax.set_xlabel("sequence length T")


def tokens_vs_T(results: dict, out: Path) -> str | None:
    rows = [
        r
        for r in results.get("scaling") or []
        if "median_s" in next(iter(r["variants"].values()))  # memory-only rows have no time
    ]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in rows[0]["variants"]:
        pts = [(r["T"], r["variants"][name]["tokens_per_s"]) for r in rows if name in r["variants"]]
        ax.plot(*zip(*pts), marker="o", label=name)
    r0 = rows[0]
    _t_axis(ax, rows)
    ax.set(yscale="log", ylabel="tokens/s (T*B / s)")
    ax.set_title(_title(results, f"{r0['cell']} B={r0['B']} D={r0['D']} H={r0['H']}"), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(fig, out / "tokens_per_s_vs_T.png")


def memory_vs_T(results: dict, out: Path) -> str | None:
    rows = results.get("scaling") or []
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in rows[0]["variants"]:
        for key, style, label in (
            ("temp_bytes", "-", "XLA temp"),
            ("device_peak_bytes", "--", "device peak"),
        ):
            pts = [
                (r["T"], r["variants"][name][key] / 2**20)
                for r in rows
                if name in r["variants"] and r["variants"][name].get(key)
            ]
            if pts:
                ax.plot(*zip(*pts), style, marker="o", label=f"{name} ({label})")
    r0 = rows[0]
    _t_axis(ax, rows)
    ax.set(yscale="log", ylabel="MiB")
    ax.set_title(_title(results, f"memory, {r0['cell']} B={r0['B']} H={r0['H']}"), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out / "memory_vs_T.png")


def tokens_vs_k(results: dict, out: Path) -> str | None:
    res = results.get("truncation")
    if not res:
        return None
    entries = res["entries"]
    ks = [(v["truncate"], v["tokens_per_s"]) for v in entries.values() if v["truncate"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if ks:
        ax.plot(*zip(*sorted(ks)), marker="o", label=f"truncate=k ({res['variant']})")
    ax.axhline(entries["full"]["tokens_per_s"], color="k", ls="--", label="full BPTT")
    ax.set_xscale("log", base=2)
    if ks:
        ax.set_xticks([k for k, _ in sorted(ks)], [str(k) for k, _ in sorted(ks)])
        ax.minorticks_off()
    ax.set(xlabel="truncation length k", ylabel="tokens/s (T*B / s)")
    ax.set_ylim(bottom=0)
    ax.set_title(
        _title(results, f"{res['cell']} T={res['T']} B={res['B']} D={res['D']} H={res['H']}"),
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(fig, out / "tokens_per_s_vs_k.png")


def ratios(results: dict, out: Path) -> str | None:
    bars: list[tuple[str, float]] = []
    for r in results.get("manual_vs_autodiff") or []:
        for name, v in r.get("time_vs_manual", {}).items():
            bars.append((f"{r['cell']} {r['T']},{r['B']},{r['D']},{r['H']}\n{name}/manual", v))
    for r in results.get("peers") or []:
        for name, v in r["time_vs_bptt"].items():
            bars.append((f"{r['cell']} {r['T']},{r['B']},{r['D']},{r['H']}\n{name}/bptt_jax", v))
    for r in (results.get("models") or {}).get("rows", []):
        for name, v in r.get("time_vs_manual", {}).items():
            bars.append((f"{r['model']} {r['T']},{r['B']},{r['D']},{r['H']}\n{name}/manual", v))
    linear = results.get("linear") or {}
    for r in [*linear.get("comparisons", []), *linear.get("vs_gru", [])]:
        for name, v in r.get("time_vs_manual", {}).items():
            bars.append((f"mingru {r['T']},{r['B']},{r['D']},{r['H']}\n{name}/mingru", v))
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(max(6.4, 0.55 * len(bars)), 4.6))
    labels, values = zip(*bars)
    colors = ["tab:green" if v >= 1 else "tab:red" for v in values]
    ax.bar(range(len(values)), [v - 1 for v in values], bottom=1, color=colors)  # bars from 1
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(values)), labels, rotation=90, fontsize=7)
    ax.set_ylabel("time(other) / time(bptt_jax)")
    ax.set_title(
        _title(results, "speedup of the hand-written BPTT (above 1: bptt_jax faster)"), fontsize=9
    )
    return _save(fig, out / "ratios.png")


def make(results: dict[str, Any], out: Path) -> list[str]:
    """Draw every plot the results have data for; return the paths written."""
    paths = [f(results, out) for f in (tokens_vs_T, tokens_vs_k, memory_vs_T, ratios)]
    return [p for p in paths if p]


def main(argv: list[str] | None = None) -> list[str]:
    """``python benchmarks/plots.py OUT RESULTS.json [RESULTS.json ...]``: the plots of
    recorded results, written to the folder OUT. The parts of several files are merged (rows
    of a part appended in order; the first file's environment names the machine), so give
    files of one machine only."""
    import json
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        raise SystemExit(main.__doc__)
    out = Path(args[0])
    merged: dict[str, Any] = {}
    for name in args[1:]:
        for key, value in json.loads(Path(name).read_text()).items():
            if isinstance(value, list) and isinstance(merged.get(key), list):
                merged[key] = merged[key] + value
            else:
                merged.setdefault(key, value)
    out.mkdir(parents=True, exist_ok=True)
    paths = make(merged, out)
    print("\n".join(paths))
    return paths


if __name__ == "__main__":
    main()
