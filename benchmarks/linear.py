"""Part 9: linear recurrences (``MinGRU``, ``MinLSTM``): the linear path against what a user
could write instead, and against the library's nonlinear cells.

Every entry is the gradient of the benchmark loss (the xent readout on every hidden state),
checked against ``autodiff`` (``jax.grad`` of the plain per-step ``lax.scan`` of the cell's
``step``) before it is timed; the entries of a row are timed side by side (interleaved).

**Comparisons** (``linear.sizes``, the issue's (4096, 16, 128, 256)): a ``MinGRU`` layer with
its default ``scan`` (``manual``) against

* ``assoc_autodiff``: ``jax.grad`` of an associative-scan forward of the same equations,
  written plainly here (:func:`assoc_autodiff`; ``jax.lax.associative_scan`` over
  ``(1 - z_t, z_t * h~_t)``), what a JAX user gets without the library;
* ``tier1``: the same cell written as a user's tier-1 cell (``init``/``zero_carry``/``step``
  only, :class:`UserMinGRU`), through the library's generic path.

Per row, as in the other parts, ``time_vs_manual[v] = median(v) / median(manual)`` and
``temp_vs_manual[v] = temp(v) / temp(manual)`` (XLA's temp memory of the compiled gradient).
Targets: ``time_vs_manual`` at least 4 for ``assoc_autodiff`` and 2 for ``tier1``;
``temp_vs_manual["assoc_autodiff"]`` at least 4 (the MinGRU's temp at most 0.25x).

**Against the GRU** (``linear.gru_sizes``, the issue's (1024, 32, 128, 256)): ``MinGRU``
(``manual``) against the library's ``GRU`` at the same size, ``time_vs_manual["gru"]``;
target at least 3.

**The table** (``linear.T`` at ``linear.B, D, H``): each of ``linear.cells`` with
``scan="sequential"`` and ``scan="parallel"`` and each of ``linear.peers`` (the GRU and
LSTM), side by side per length: ms per gradient step, tokens/s, temp MiB, and each peer's
time over each entry's (``time_of[peer][entry]``, printed ``x gru``, ``x lstm``).
``auto_scan`` records what ``scan="auto"`` is on this backend, ``chunk_bytes`` the linear
path's chunk size.

    python benchmarks/linear.py                          # configs/bench.toml, this part
    python benchmarks/linear.py bench_full linear.T='[4096]'
"""

from __future__ import annotations

import dataclasses
from typing import Any

import harness
import jax
import jax.numpy as jnp
from jax import lax
from manual_vs_autodiff import BASELINE, ratios

import bptt_jax
from bptt_jax._engine import options


# ------------------------------------------------------------ what a user writes instead
def _coefficients(params, xs):
    """``(a, b)`` of ``h_t = a_t * h_{t-1} + b_t`` from the papers' equations (Feng et al.
    2024), written here again: the minGRU's or the minLSTM's, by its params."""
    if hasattr(params, "w_z"):
        z = jax.nn.sigmoid(xs @ params.w_z + params.b_z)
        return 1 - z, z * (xs @ params.w_h + params.b_h)
    f = jax.nn.sigmoid(xs @ params.w_f + params.b_f)
    i = jax.nn.sigmoid(xs @ params.w_i + params.b_i)
    return f / (f + i), i / (f + i) * (xs @ params.w_h + params.b_h)


def _compose(earlier, later):
    return later[0] * earlier[0], later[0] * earlier[1] + later[1]


def assoc_autodiff(cell, targets, truncate=None):
    """The benchmark loss of ``jax.lax.associative_scan`` over the cell's coefficients (from
    a zero carry), differentiated by JAX."""
    if truncate is not None:
        raise ValueError("assoc_autodiff: no truncation")

    def loss(params, readout, xs):
        hs = lax.associative_scan(_compose, _coefficients(params, xs))[1]
        return harness.xent_mean(hs, readout, targets)

    return loss


@dataclasses.dataclass(frozen=True)
class UserMinGRU:
    """The minGRU as a user writes it for the library's tier 1: ``init``, ``zero_carry`` and
    ``step``; the engine walks it step by step (``jax.vjp`` of each step)."""

    hidden_size: int

    def init(self, key, input_size, dtype=jnp.float32):
        return bptt_jax.MinGRU(self.hidden_size).init(key, input_size, dtype)

    def zero_carry(self, batch_size, dtype=jnp.float32):
        return jnp.zeros((batch_size, self.hidden_size), dtype)

    def step(self, params, h, x):
        z = jax.nn.sigmoid(x @ params.w_z + params.b_z)
        h = (1 - z) * h + z * (x @ params.w_h + params.b_h)
        return h, h


def tier1(cell, targets, truncate=None):
    """The benchmark loss of the cell as a :class:`UserMinGRU` (the minGRU only)."""
    if not isinstance(cell, bptt_jax.MinGRU):
        raise ValueError(f"tier1: written for the MinGRU only; got {type(cell).__name__}")
    return harness.sequence_loss_variant("manual")(UserMinGRU(cell.hidden_size), targets, truncate)


def with_scan(scan: str) -> harness.LossBuilder:
    """The benchmark loss of the library's linear cell with ``scan`` (hand-written BPTT)."""

    def build(cell, targets, truncate=None):
        return harness.sequence_loss_variant("manual")(
            dataclasses.replace(cell, scan=scan), targets, truncate
        )

    return build


#: This part's gradient paths, added to ``harness.VARIANTS`` (the check and the compile cache
#: go by name there).
VARIANTS = {
    "assoc_autodiff": assoc_autodiff,
    "tier1": tier1,
    "sequential": with_scan("sequential"),
    "parallel": with_scan("parallel"),
}
harness.VARIANTS.update(VARIANTS)
SCANS = ("sequential", "parallel")


# ------------------------------------------------------------------------------ the part
def _prepare(session, entries) -> dict[str, tuple]:
    """``{name: (problem, Timed)}`` of ``entries`` ``{name: (problem, variant)}`` that compile
    and pass their check; the others are reported as failures of this part."""
    ready = {}
    for name, (problem, variant) in entries.items():
        try:
            ready[name] = (problem, session.prepare(problem, variant))
        except harness.EntryFailed as e:
            session.fail("linear", f"{problem.label} {name}", e)
    return ready


def _measure(session, part, ready) -> dict[str, dict[str, Any]]:
    """The entries of ``ready`` timed side by side, one record each (``Session.measure``'s)."""
    t = session.cfg.timing
    stats = harness.time_interleaved(
        {name: timed.run for name, (_, timed) in ready.items()},
        t.repeats if part.repeats is None else part.repeats,
        t.warmup if part.warmup is None else part.warmup,
        t.min_sample_s,
    )
    return {
        name: harness.record(problem.tokens, timed, stats[name])
        for name, (problem, timed) in ready.items()
    }


def _over(entries: dict, peer: str) -> dict[str, float]:
    """``time(peer) / time(v)`` of every other entry: above 1, ``v`` is that many times faster."""
    if peer not in entries:
        return {}
    t = entries[peer]["median_s"]
    return {name: t / v["median_s"] for name, v in entries.items() if name != peer}


def run(session: harness.Session, cfg) -> dict[str, Any]:
    part = cfg.linear
    out: dict[str, Any] = dict(
        auto_scan=options.linear_scan(bptt_jax.MinGRU(1)),
        chunk_bytes=options.LINEAR_CHUNK_BYTES.get(jax.default_backend()),
        comparisons=[],
        vs_gru=[],
        table=[],
    )
    chunk = out["chunk_bytes"]
    session.print(
        f"scan='auto' is {out['auto_scan']!r} on {jax.default_backend()}; chunks of "
        + ("the whole sequence" if chunk is None else f"{chunk / 2**20:g} MiB of (T, B, H)"),
        flush=True,
    )
    session.print(HEADER + "\n" + "-" * len(HEADER), flush=True)
    for T, B, D, H in part.sizes:
        problem = session.problem("mingru", T, B, D, H)
        names = (BASELINE, "assoc_autodiff", "tier1")
        ready = _prepare(session, {v: (problem, v) for v in names})
        if not ready:
            continue
        entries = _measure(session, part, ready)
        row = dict(kind="comparison", cell="mingru", **problem.shape, tokens=problem.tokens,
                   entries=entries, **ratios(entries, BASELINE))  # fmt: skip
        out["comparisons"].append(row)
        session.print(format_row(row), flush=True)
    for T, B, D, H in part.gru_sizes:
        linear, gru = session.problem("mingru", T, B, D, H), session.problem("gru", T, B, D, H)
        ready = _prepare(session, {BASELINE: (linear, "manual"), "gru": (gru, "manual")})
        if not ready:
            continue
        entries = _measure(session, part, ready)
        row = dict(kind="vs_gru", cell="mingru", **linear.shape, tokens=linear.tokens,
                   entries=entries, **ratios(entries, BASELINE))  # fmt: skip
        out["vs_gru"].append(row)
        session.print(format_row(row), flush=True)
    for T in part.T:
        wanted = {}
        for name in part.cells:
            problem = session.problem(name, T, part.B, part.D, part.H)
            wanted.update({f"{name}/{scan}": (problem, scan) for scan in SCANS})
        for name in part.peers:
            wanted[name] = (session.problem(name, T, part.B, part.D, part.H), "manual")
        ready = _prepare(session, wanted)
        if not ready:
            continue
        entries = _measure(session, part, ready)
        problem = next(iter(ready.values()))[0]
        row = dict(kind="table", **problem.shape, tokens=problem.tokens, entries=entries,
                   time_of={p: _over(entries, p) for p in part.peers if p in entries})  # fmt: skip
        out["table"].append(row)
        session.print(format_row(row), flush=True)
    return out


# ----------------------------------------------------------------------------- printing
HEADER = (
    f"{'T':>6} {'B':>4} {'D':>4} {'H':>4}  {'entry':<20} {'ms':>8} {'IQR ms':>7} {'Mtok/s':>7} "
    f"{'compile s':>9} {'temp MiB':>9}  ratios"
)


def format_row(row: dict) -> str:
    lines = []
    for i, (name, v) in enumerate(row["entries"].items()):
        head = f"{row['T']:>6} {row['B']:>4} {row['D']:>4} {row['H']:>4}" if i == 0 else " " * 21
        if row["kind"] == "table":
            label = name
            tail = "  ".join(f"x {p} {r[name]:.2f}" for p, r in row["time_of"].items() if name in r)
        else:
            label = f"mingru {name}" if name == BASELINE else name
            tr = row.get(f"time_vs_{BASELINE}", {}).get(name)
            mr = row.get(f"temp_vs_{BASELINE}", {}).get(name)
            tail = "" if tr is None else f"x manual {tr:.2f}"
            tail += "" if mr is None else f"  temp x {mr:.2f}"
        compile_s = "-" if v["compile_s"] is None else f"{v['compile_s']:.2f}"
        lines.append(
            f"{head}  {label:<20} {harness.fmt_ms(v['median_s']):>8} "
            f"{harness.fmt_ms(v['iqr_s']):>7} {v['tokens_per_s'] / 1e6:7.3f} {compile_s:>9} "
            f"{harness.fmt_bytes(v['temp_bytes']):>9}  {tail}"
        )
    return "\n".join(lines)


def table(result: dict | None) -> list[str]:
    result = result or {}
    rows = [*result.get("comparisons", []), *result.get("vs_gru", []), *result.get("table", [])]
    return [HEADER, "-" * len(HEADER), *(format_row(r) for r in rows)]


if __name__ == "__main__":
    import run as runner

    raise SystemExit(runner.main(parts=["linear"]))
