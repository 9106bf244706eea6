"""Part 5: the floor: what a gradient step cannot go below on this machine, and bptt_jax against it.

A BPTT gradient step must at least do its matmuls. With G gate blocks (Elman 1, GRU 3, LSTM 4)
and readout size O, for a sequence (T, B, D, H) they are, in FLOPs (2 per multiply-add):

* recurrent, sequential: T steps of ``(B, H) @ (H, G*H)`` forward and T of
  ``(B, G*H) @ (G*H, H)`` back: ``2 * T * 2*B*H*G*H``;
* non-recurrent, one big matmul each: the input projection ``X W_x`` and its weight gradient
  ``X^T dA`` (``2 * 2*T*B*D*G*H``), the recurrent weight gradient ``H_prev^T dA``
  (``2*T*B*H*G*H``), the readout ``H W_hy``, its gradient and ``dY W_hy^T`` (``3 * 2*T*B*H*O``).

The machine's matmul rate is measured on one ``n x n @ n x n`` matmul (``floor.matmul_size``).
Two floors are reported:

* ``floor_s``: all of those FLOPs at that rate (the throughput floor);
* ``chain_floor_s``: the recurrent part measured instead, as the time of a ``lax.scan`` of T
  sequential ``(B, H) @ (H, H)`` matmuls (timed side by side with bptt_jax) counted ``2*G``
  times, plus the non-recurrent FLOPs at the rate: small sequential matmuls run far below the
  big-matmul rate, and this floor includes that.

``multiple_of_floor = median(bptt_jax) / floor_s`` (and ``multiple_of_chain_floor``): how many
times the floor bptt_jax takes; 1 would be perfect. ``floor_fraction`` is its inverse.

    python benchmarks/floor.py                               # configs/bench.toml, this part
"""

from __future__ import annotations

from typing import Any

import harness
import jax
import jax.numpy as jnp
from jax import lax


def flops(p: harness.Problem) -> dict[str, int]:
    G = harness.GATES[p.cell_name]
    T, B, D, H, O = p.T, p.B, p.D, p.H, p.O
    recurrent = 2 * T * 2 * B * H * G * H
    nonrecurrent = 2 * (2 * T * B * D * G * H) + 2 * T * B * H * G * H + 3 * (2 * T * B * H * O)
    return dict(recurrent=recurrent, nonrecurrent=nonrecurrent, total=recurrent + nonrecurrent)


def matmul_rate(session: harness.Session, n: int) -> dict[str, Any]:
    """FLOP/s of one jitted ``(n, n) @ (n, n)`` float32 matmul (measured once per session)."""
    cached = getattr(session, "_matmul_rate", None)
    if cached is not None and cached["n"] == n:
        return cached
    ka, kb = jax.random.split(jax.random.key(1))
    a = jax.random.normal(ka, (n, n), jnp.float32)
    b = jax.random.normal(kb, (n, n), jnp.float32)
    f = jax.jit(jnp.matmul).lower(a, b).compile()
    t = session.cfg.timing
    stats = harness.time_interleaved(
        {"matmul": lambda: jax.block_until_ready(f(a, b))}, t.repeats, t.warmup, t.min_sample_s
    )["matmul"]
    result = dict(n=n, median_s=stats["median_s"], iqr_s=stats["iqr_s"])
    result["flops_per_s"] = 2 * n**3 / stats["median_s"]
    session._matmul_rate = result
    return result


def chain_timed(p: harness.Problem) -> harness.Timed:
    """T sequential ``(B, H) @ (H, H)`` matmuls in a ``lax.scan``; W orthogonal, so the state
    neither blows up nor decays into denormals."""
    kw, kh = jax.random.split(jax.random.key(2))
    w, _ = jnp.linalg.qr(jax.random.normal(kw, (p.H, p.H), jnp.float32))
    h0 = jax.random.normal(kh, (p.B, p.H), jnp.float32)

    def chain(h, w):
        return lax.scan(lambda h, _: (h @ w, None), h, None, length=p.T)[0]

    f = jax.jit(chain).lower(h0, w).compile()
    return harness.Timed(
        name="chain",
        run=lambda: jax.block_until_ready(f(h0, w)),
        compile_s=None,
        memory=harness.memory_of(f),
        check=dict(reference=None, passed=True),
    )


def run(session: harness.Session, cfg) -> dict[str, Any]:
    part = cfg.floor
    rate = matmul_rate(session, part.matmul_size)
    session.print(
        f"matmul rate: {rate['flops_per_s'] / 1e9:.1f} GFLOP/s "
        f"({part.matmul_size}^3 float32 matmul, median {harness.fmt_ms(rate['median_s'])} ms)",
        flush=True,
    )
    session.print(HEADER + "\n" + "-" * len(HEADER), flush=True)
    rows = []
    for cell_name in part.cells:
        for T, B, D, H in part.sizes:
            problem = session.problem(cell_name, T, B, D, H)
            try:
                manual = session.prepare(problem, "manual")
            except harness.EntryFailed as e:
                session.fail("floor", problem.label, e)
                continue
            measured = session.measure(problem, {"manual": manual, "chain": chain_timed(problem)})
            f = flops(problem)
            G = harness.GATES[cell_name]
            floor_s = f["total"] / rate["flops_per_s"]
            chain_s = measured["chain"]["median_s"]
            chain_floor_s = 2 * G * chain_s + f["nonrecurrent"] / rate["flops_per_s"]
            t = measured["manual"]["median_s"]
            row = dict(
                cell=cell_name,
                **problem.shape,
                tokens=problem.tokens,
                flops=f,
                manual=measured["manual"],
                chain=measured["chain"],
                floor_s=floor_s,
                chain_floor_s=chain_floor_s,
                multiple_of_floor=t / floor_s,
                multiple_of_chain_floor=t / chain_floor_s,
                floor_fraction=floor_s / t,
                achieved_flops_per_s=f["total"] / t,
            )
            rows.append(row)
            session.print(format_row(row), flush=True)
    return dict(matmul=rate, rows=rows)


HEADER = (
    f"{'cell':<6} {'T':>6} {'B':>4} {'D':>4} {'H':>4}  {'bptt ms':>8} {'floor ms':>9} "
    f"{'x floor':>8} {'chain ms':>9} {'chain floor':>11} {'x chain fl':>10} {'GFLOP/s':>8}"
)


def format_row(row: dict) -> str:
    return (
        f"{row['cell']:<6} {row['T']:>6} {row['B']:>4} {row['D']:>4} {row['H']:>4}  "
        f"{harness.fmt_ms(row['manual']['median_s']):>8} {harness.fmt_ms(row['floor_s']):>9} "
        f"{row['multiple_of_floor']:7.1f}x {harness.fmt_ms(row['chain']['median_s']):>9} "
        f"{harness.fmt_ms(row['chain_floor_s']):>11} {row['multiple_of_chain_floor']:9.2f}x "
        f"{row['achieved_flops_per_s'] / 1e9:8.1f}"
    )


def table(result: dict | None) -> list[str]:
    rows = result["rows"] if result else []
    return [HEADER, "-" * len(HEADER), *(format_row(r) for r in rows)]


if __name__ == "__main__":
    import run as runner

    raise SystemExit(runner.main(parts=["floor"]))
