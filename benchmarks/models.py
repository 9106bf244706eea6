"""Part 6: stacked and bidirectional models: hand-written BPTT against autodiff and the peers,
and the temp memory of a checkpointed deep stack.

Models are named by spec (``bptt_jax.models.parse_spec``): ``"lstm:2"`` is
``bptt_jax.stacked(LSTM(H), 2)``, ``"bigru"`` is ``bptt_jax.Bidirectional(GRU(H))``,
``"bilstm:2"`` ``stacked(LSTM(H), 2, bidirectional=True)``; ``H`` is each cell's hidden size,
the readout maps the model's output (``2H`` for a bidirectional one) to O classes.

**The reference.** A model problem is checked against ``composed_autodiff``: ``jax.grad``
through the per-cell ``unroll(..., backward="autodiff")`` (one plain ``lax.scan`` per cell),
composed layer by layer and direction by direction by the benchmark itself
(``harness.unroll_composed``), so neither the engine's hand-written model backward nor its
own ``backward="autodiff"`` for models is checked against itself.

**Timed rows** (``models.models`` x ``models.sizes``): each of ``models.variants`` (by default
``manual`` and ``autodiff``, ``bptt_jax.sequence_loss(model, ..., backward=...)``) and each
installed library of ``models.libraries`` (PyTorch ``nn.LSTM(D, H, num_layers=L,
bidirectional=...)`` and ``nn.GRU``/``nn.RNN`` with bptt_jax's weights mapped layer by layer
and direction by direction; Flax ``nn.RNN`` layers, each an ``nn.Bidirectional`` pair when
bidirectional) is checked against the reference, then all are timed side by side
(``models.repeats`` / ``models.warmup`` samples, default ``timing``'s; ``peers.settle`` as in
the peers part). A variant or peer that fails is reported and the others still run. Per row:

* ``time_vs_manual[v] = median(v) / median(manual)``: above 1 the hand-written path is that
  many times faster than ``v`` (``autodiff``, ``torch``, ``flax``);
* ``temp_vs_manual[v] = temp(v) / temp(manual)`` (XLA's temp memory; none for PyTorch).

**Memory rows** (``models.memory_models`` x ``models.memory_sizes``, e.g. a 4-layer LSTM at
T = 4096): each of ``models.memory_variants`` is compiled and checked, not timed; per row
``temp_vs_manual[v]`` and its inverse ``temp_saving[v] = temp(manual) / temp(v)`` (the
checkpointing target: ``temp_saving["checkpointed"] >= 10``).

    python benchmarks/models.py                          # configs/bench.toml, this part
    python benchmarks/models.py bench_tiny models.libraries='["torch"]'
"""

from __future__ import annotations

from typing import Any

import harness
import peers
from manual_vs_autodiff import BASELINE, ratios


def _describe(problem: harness.Problem) -> dict[str, Any]:
    layers = harness.model_layers(problem.cell)
    return dict(
        model=problem.cell_name,
        cell=type(layers[0][0]).__name__.lower(),
        layers=len(layers),
        bidirectional=any(len(d) == 2 for d in layers),
        **problem.shape,
        output_size=problem.readout.w_hy.shape[0],
        tokens=problem.tokens,
        reference=problem.reference,
    )


def _prepare_each(session, part_name: str, problem, variants, truncate=None) -> dict:
    """Each variant prepared (compiled and checked) on its own: one that fails is reported as
    a failure of ``part_name`` and left out, the others go on."""
    timed = {}
    for v in variants:
        try:
            timed[v] = session.prepare(problem, v, truncate)
        except harness.EntryFailed as e:
            session.fail(part_name, f"{problem.label} {v}", e)
    return timed


def run(session: harness.Session, cfg) -> dict[str, list[dict[str, Any]]]:
    part = cfg.models
    noted: set = set()
    rows: list[dict[str, Any]] = []
    session.print(HEADER + "\n" + "-" * len(HEADER), flush=True)
    for spec in part.models:
        for T, B, D, H in part.sizes:
            problem = session.problem(spec, T, B, D, H)
            timed = _prepare_each(session, "models", problem, part.variants)
            skipped = peers.add_peers(session, "models", problem, part.libraries, timed, noted)
            if not timed:
                continue
            measured = session.measure(
                problem, timed, settle=cfg.peers.settle, repeats=part.repeats, warmup=part.warmup
            )
            row = dict(**_describe(problem), variants=measured, skipped=skipped)
            row.update(ratios(measured, BASELINE))
            rows.append(row)
            session.print(format_row(row), flush=True)

    memory: list[dict[str, Any]] = []
    if part.memory_models and part.memory_sizes:
        session.print("\n" + MEMORY_HEADER + "\n" + "-" * len(MEMORY_HEADER), flush=True)
    for spec in part.memory_models:
        for T, B, D, H in part.memory_sizes:
            problem = session.problem(spec, T, B, D, H)
            timed = _prepare_each(session, "models", problem, part.memory_variants)
            if not timed:
                continue
            entries = {
                name: dict(compile_s=t.compile_s, **t.memory, check=t.check)
                for name, t in timed.items()
            }
            row = dict(**_describe(problem), variants=entries, **memory_ratios(entries))
            memory.append(row)
            session.print(format_memory_row(row), flush=True)
    return dict(rows=rows, memory=memory)


def memory_ratios(entries: dict[str, dict]) -> dict[str, dict[str, float | None]]:
    """``temp_vs_manual[v] = temp(v) / temp(manual)`` and ``temp_saving[v]``, its inverse."""
    base = entries.get(BASELINE)
    if base is None or not base.get("temp_bytes"):
        return {}
    vs, saving = {}, {}
    for name, v in entries.items():
        if name == BASELINE:
            continue
        t = v.get("temp_bytes")
        vs[name] = t / base["temp_bytes"] if t is not None else None
        saving[name] = base["temp_bytes"] / t if t else None
    return {f"temp_vs_{BASELINE}": vs, "temp_saving": saving}


HEADER = (
    f"{'model':<9} {'T':>6} {'B':>4} {'D':>4} {'H':>4}  {'variant':<10} {'ms':>8} {'IQR ms':>7} "
    f"{'Mtok/s':>7} {'compile s':>9} {'temp MiB':>9} {'x manual':>9} {'temp x':>7}"
)


def _head(row: dict, i: int) -> str:
    if i:
        return " " * 31
    return f"{row['model']:<9} {row['T']:>6} {row['B']:>4} {row['D']:>4} {row['H']:>4}"


def format_row(row: dict) -> str:
    lines = []
    for i, (name, v) in enumerate(row["variants"].items()):
        tr = row.get(f"time_vs_{BASELINE}", {}).get(name)
        mr = row.get(f"temp_vs_{BASELINE}", {}).get(name)
        compile_s = "-" if v["compile_s"] is None else f"{v['compile_s']:.2f}"
        lines.append(
            f"{_head(row, i)}  {name:<10} {harness.fmt_ms(v['median_s']):>8} "
            f"{harness.fmt_ms(v['iqr_s']):>7} {v['tokens_per_s'] / 1e6:7.3f} "
            f"{compile_s:>9} {harness.fmt_bytes(v['temp_bytes']):>9} "
            f"{'' if tr is None else f'{tr:.2f}x':>9} {'' if mr is None else f'{mr:.2f}':>7}"
        )
    return "\n".join(lines)


MEMORY_HEADER = (
    f"{'model':<9} {'T':>6} {'B':>4} {'D':>4} {'H':>4}  {'variant':<12} {'compile s':>9} "
    f"{'temp MiB':>9} {'temp x':>7} {'saving':>8}   (memory only: compiled and checked)"
)


def format_memory_row(row: dict) -> str:
    lines = []
    for i, (name, v) in enumerate(row["variants"].items()):
        mr = row.get(f"temp_vs_{BASELINE}", {}).get(name)
        sv = row.get("temp_saving", {}).get(name)
        lines.append(
            f"{_head(row, i)}  {name:<12} {v['compile_s']:9.2f} "
            f"{harness.fmt_bytes(v['temp_bytes']):>9} {'' if mr is None else f'{mr:.3f}':>7} "
            f"{'' if sv is None else f'{sv:.1f}x':>8}"
        )
    return "\n".join(lines)


def table(result: dict | None) -> list[str]:
    result = result or {}
    return [
        HEADER,
        "-" * len(HEADER),
        *(format_row(r) for r in result.get("rows", [])),
        MEMORY_HEADER,
        "-" * len(MEMORY_HEADER),
        *(format_memory_row(r) for r in result.get("memory", [])),
    ]


if __name__ == "__main__":
    import run as runner

    raise SystemExit(runner.main(parts=["models"]))
