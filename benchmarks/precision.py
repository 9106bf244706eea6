"""Part 8: the precision policy: float32 against bfloat16 compute, in time and temp memory.

For each cell and ``[T, B, D, H]`` of ``[precision]``: every variant (by default ``manual``,
float32, and ``bf16``, ``bptt_jax.sequence_loss(..., compute_dtype=jnp.bfloat16)`` with
float32 params: bfloat16 matmul operands and stored residuals, float32 carries, errors and
sums) and every installed library (``torch``: PyTorch's module in float32; ``torch_bf16``:
the same step under ``torch.autocast(dtype=torch.bfloat16)``, what PyTorch users run) is
checked against float32 autodiff, a bfloat16 entry within
``bptt_jax.verify.policy_tolerances`` (a few bfloat16 epsilons), then all are timed side by
side. Per row:

* ``time_vs_manual[v] = median(v) / median(manual)``: below 1, ``v`` is faster than float32;
* ``temp_vs_manual[v] = temp(v) / temp(manual)`` (XLA's temp memory; none for PyTorch): the
  target is ``temp_vs_manual["bf16"] <= 0.75``.

A CPU without native bfloat16 matmuls (most x86 CPUs) computes bfloat16 more slowly than
float32: the time is reported as measured; the memory saving holds on every backend.

    python benchmarks/precision.py                       # configs/bench.toml, this part
"""

from __future__ import annotations

from typing import Any

import harness
import jax.numpy as jnp
import peers
from manual_vs_autodiff import BASELINE, ratios

from bptt_jax import verify


def run(session: harness.Session, cfg) -> list[dict[str, Any]]:
    part = cfg.precision
    tol = verify.policy_tolerances(jnp.bfloat16)[0]
    session.print(HEADER + "\n" + "-" * len(HEADER), flush=True)
    rows, noted = [], set()
    for cell_name in part.cells:
        for T, B, D, H in part.sizes:
            problem = session.problem(cell_name, T, B, D, H)
            try:
                timed = {
                    v: session.prepare(problem, v, tolerance=tol if "bf16" in v else None)
                    for v in part.variants
                }
            except harness.EntryFailed as e:
                session.fail("precision", problem.label, e)
                continue
            skipped = peers.add_peers(session, "precision", problem, part.libraries, timed, noted)
            variants = session.measure(problem, timed, settle=cfg.peers.settle)
            row = dict(
                cell=cell_name, **problem.shape, tokens=problem.tokens, variants=variants,
                skipped=skipped,
            )  # fmt: skip
            row.update(ratios(variants, BASELINE))
            rows.append(row)
            session.print(format_row(row), flush=True)
    return rows


HEADER = (
    f"{'cell':<6} {'T':>6} {'B':>4} {'D':>4} {'H':>4}  {'variant':<11} {'ms':>8} {'IQR ms':>7} "
    f"{'Mtok/s':>7} {'temp MiB':>9} {'max err':>8} {'x manual':>9} {'temp x':>7}"
)


def format_row(row: dict) -> str:
    lines = []
    for i, (name, v) in enumerate(row["variants"].items()):
        lead = (
            f"{row['cell']:<6} {row['T']:>6} {row['B']:>4} {row['D']:>4} {row['H']:>4}"
            if i == 0
            else " " * 29
        )
        speed = row.get("time_vs_manual", {}).get(name)
        temp = row.get("temp_vs_manual", {}).get(name)
        lines.append(
            f"{lead}  {name:<11} {harness.fmt_ms(v['median_s']):>8} "
            f"{harness.fmt_ms(v['iqr_s']):>7} {v['tokens_per_s'] / 1e6:>7.3f} "
            f"{harness.fmt_bytes(v['temp_bytes']):>9} {v['check']['max_rel_err']:>8.1e} "
            f"{'' if speed is None else f'{speed:.2f}x':>9} "
            f"{'' if temp is None else f'{temp:.2f}':>7}"
        )
    return "\n".join(lines)


def table(rows: list[dict]) -> list[str]:
    return [HEADER, "-" * len(HEADER), *(format_row(r) for r in rows)]


if __name__ == "__main__":
    import run as runner

    raise SystemExit(runner.main(parts=["precision"]))
