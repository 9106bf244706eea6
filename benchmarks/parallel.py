"""Part 7: data parallelism: the gradient step with the batch split over 1, 2, 4 and 8 devices.

One problem (``parallel.model`` at ``parallel.size`` = [T, B, D, H]); for each device count
n of ``parallel.devices``, the gradient step ``jax.jit(jax.value_and_grad(sequence_loss))``
with the batch (inputs and targets) split along B over a one-axis Explicit mesh of n devices
(``bptt_jax.parallel``) and the params and readout replicated. Each is checked against the
autodiff reference of the whole batch on one device before it is timed; then all are timed
side by side (interleaved, as every part). Per device count:

* the time per step, tokens/s and ``x 1 device`` = time(1 device) / time(n): the speedup;
* the compiled program's communication per step: the all-reduces in its HLO
  (``bptt_jax.cli.hlo.collectives``), their number and the bytes each device sends into
  them, and how many sit inside a loop (0: one reduction per gradient, after the scans);
* the FLOPs of one device's program over the 1-device program's (XLA's cost analysis; 1/n
  when each device does its share).

**Simulated devices.** On a CPU with fewer devices than the counts ask for, the part runs in
a fresh interpreter with ``parallel.simulate`` simulated CPU devices (``jax_num_cpu_devices``;
the runner's own process has started JAX already). Simulated devices share the machine's
cores, so there this measures the overhead of splitting the batch (partitioned program,
all-reduces, smaller matmuls), not a speedup; the JSON and the table say which it was. On a
machine with several GPUs or TPUs the counts up to what exists are run in-process.

    python benchmarks/parallel.py                      # configs/bench.toml, this part
    python benchmarks/parallel.py bench_full parallel.size='[256, 64, 64, 256]'
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import harness
import jax
import simulated
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import bptt_jax
from bptt_jax.cli import hlo


def run(session: harness.Session, cfg) -> dict[str, Any]:
    return simulated.run(session, cfg, "parallel", measure)


def _program(problem: harness.Problem, backward: str, n: int):
    """The gradient step on n devices: ``(compiled, args, compile_s)``."""
    mesh = jax.make_mesh(
        (n,), ("data",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:n]
    )
    cell = problem.cell

    def loss(params, readout, xs, targets):
        return bptt_jax.sequence_loss(cell, params, readout, xs, targets, backward=backward)

    rows, rep = NamedSharding(mesh, P(None, "data")), NamedSharding(mesh, P())
    args = (
        jax.device_put(problem.params, rep),
        jax.device_put(problem.readout, rep),
        jax.device_put(problem.xs, rows),
        jax.device_put(problem.targets, rows),
    )
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
    return compiled, args, time.perf_counter() - start


def measure(session: harness.Session, cfg, simulated: bool) -> dict[str, Any]:
    part = cfg.parallel
    T, B, D, H = part.size
    counts = [n for n in part.devices if n <= jax.device_count()]
    skipped = [n for n in part.devices if n > jax.device_count()]
    if skipped:
        session.note(
            f"parallel: {skipped} devices skipped: JAX sees {jax.device_count()} "
            f"{jax.default_backend()} device(s)"
        )
    problem = session.problem(part.model, T, B, D, H)
    ref_out, *_ = session.reference(problem, None)
    tol = session.tolerance(T)
    grad_bytes = sum(
        x.size * x.dtype.itemsize for x in jax.tree.leaves((problem.params, problem.readout))
    )
    kind = "simulated CPU devices" if simulated else f"{jax.default_backend()} devices"
    session.print(
        f"{part.model} T={T} B={B} D={D} H={H}, backward={part.backward}, on {kind} "
        f"({jax.devices()[0].device_kind}); gradient {grad_bytes / 1024:.1f} KiB",
        flush=True,
    )
    if simulated:
        session.note(
            "parallel: the devices are simulated CPU devices sharing this machine's "
            f"{os.cpu_count()} cores: the times measure the overhead of splitting the batch "
            "(partitioned program, all-reduces, smaller matmuls), not a speedup"
        )
    timed, info = {}, {}
    for n in counts:
        name = f"{n} device" + ("s" if n > 1 else "")
        what = f"{problem.label} on {name}"
        try:
            if B % n:
                raise harness.EntryFailed(f"{what}: B={B} is not divisible by {n} devices")
            compiled, args, compile_s = _program(problem, part.backward, n)
            out = jax.block_until_ready(compiled(*args))
            err = harness.check(what, part.backward, out, ref_out, tol, problem.reference)
        except Exception as e:  # noqa: BLE001 - reported, never timed
            session.fail("parallel", what, e)
            continue
        found = hlo.collectives(compiled.as_text())
        reduces = [c for c in found if c.op == "all-reduce"]
        info[name] = dict(
            devices=n,
            all_reduces=len(reduces),
            all_reduce_bytes=sum(c.bytes for c in reduces),
            collectives_in_loops=len([c for c in found if c.loop_depth > 0]),
            other_collectives=sorted({c.op for c in found} - {"all-reduce"}),
            flops_per_device=hlo.flops(compiled),
        )
        timed[name] = harness.Timed(
            name=name,
            run=lambda c=compiled, a=args: jax.block_until_ready(c(*a)),
            compile_s=compile_s,
            memory=harness.memory_of(compiled),
            check=dict(reference=problem.reference, max_rel_err=err, tolerance=tol, passed=True),
        )
    if not timed:
        return dict(rows=[], simulated=simulated)
    measured = session.measure(problem, timed, repeats=part.repeats, warmup=part.warmup)
    base = measured.get("1 device")
    base_flops = info.get("1 device", {}).get("flops_per_device")
    rows = []
    session.print(HEADER + "\n" + "-" * len(HEADER), flush=True)
    for name, v in measured.items():
        row = dict(
            model=part.model, T=T, B=B, D=D, H=H, backward=part.backward, **info[name],
            gradient_bytes=grad_bytes, simulated=simulated, **v,
            speedup=None if base is None else base["median_s"] / v["median_s"],
            flops_vs_one_device=(
                None if not base_flops else info[name]["flops_per_device"] / base_flops
            ),
        )  # fmt: skip
        rows.append(row)
        session.print(format_row(row), flush=True)
    return dict(rows=rows, simulated=simulated, device_kind=jax.devices()[0].device_kind)


HEADER = (
    f"{'devices':>7} {'ms':>8} {'IQR ms':>7} {'Mtok/s':>7} {'x 1 dev':>8} {'compile s':>9} "
    f"{'all-reduces':>11} {'KiB/step':>9} {'in loops':>8} {'flops/dev':>9}"
)


def format_row(row: dict) -> str:
    speed = "" if row["speedup"] is None else f"{row['speedup']:.2f}x"
    flops = "" if row["flops_vs_one_device"] is None else f"{row['flops_vs_one_device']:.3f}"
    return (
        f"{row['devices']:>7} {harness.fmt_ms(row['median_s']):>8} "
        f"{harness.fmt_ms(row['iqr_s']):>7} {row['tokens_per_s'] / 1e6:7.3f} {speed:>8} "
        f"{row['compile_s']:9.2f} {row['all_reduces']:>11} "
        f"{row['all_reduce_bytes'] / 1024:9.1f} {row['collectives_in_loops']:>8} {flops:>9}"
    )


def table(result: dict | None) -> list[str]:
    rows = (result or {}).get("rows", [])
    return [HEADER, "-" * len(HEADER), *(format_row(r) for r in rows)]


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        raise SystemExit(simulated.worker("parallel", measure, sys.argv[2], sys.argv[3]))
    import run as runner

    raise SystemExit(runner.main(parts=["parallel"]))
