"""Part 10: sequence parallelism: the gradient step with the time axis split over n devices.

One problem (``sequence.model``, a model of linear cells, at ``sequence.size`` = [T, B, D, H]);
for each device count n of ``sequence.devices``, the gradient step
``jax.jit(jax.value_and_grad(sequence_loss))`` with the sequence (inputs and targets) split
along T over a one-axis Explicit mesh ``("time",)`` of n devices (``time_axis="time"``: each
device scans its own T / n steps, the devices exchange small (B, N) summaries) and the params
and readout replicated; 1 device is the plain one-device program, no mesh. Each split program
is checked against the 1-device program (the value and every gradient leaf within
``check.rtol``, scaled as every part's for long T) before it is timed; then all are timed side
by side (interleaved, as every part). Per device count:

* the time per step, tokens/s and ``x 1 device`` = time(1 device) / time(n): the speedup;
* the compiled program's communication per step: the collectives in its HLO
  (``bptt_jax.cli.hlo.collectives``), their number per op (per layer and direction one
  all-gather in the forward and one in the backward, one all-reduce of the gradient), the
  bytes they exchange per device (the sum of their results' sizes), and how many sit inside a
  loop (0: none per step);
* XLA's temp memory per device (``memory_analysis().temp_size_in_bytes``) and its ratio to
  the 1-device program's (about 1/n when the stored states split with the steps).

**Simulated devices.** On a CPU with fewer devices than the counts ask for, the part runs in
a fresh interpreter with ``sequence.simulate`` simulated CPU devices (``jax_num_cpu_devices``;
the runner's own process has started JAX already). Simulated devices share the machine's
cores, so there this measures the overhead of splitting the sequence (partitioned program,
summary exchanges, the second pass over each device's steps), not a speedup; the JSON and the
table say which it was. On a machine with several GPUs or TPUs the counts up to what exists
are run in-process.

    python benchmarks/sequence.py                      # configs/bench.toml, this part
    python benchmarks/sequence.py bench_full sequence.size='[8192, 8, 64, 128]'
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from typing import Any

import harness
import jax
import simulated
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import bptt_jax
from bptt_jax.cli import hlo

#: The name of the mesh axis the time axis is split over.
AXIS = "time"


def run(session: harness.Session, cfg) -> dict[str, Any]:
    return simulated.run(session, cfg, "sequence", measure)


def _program(problem: harness.Problem, backward: str, n: int):
    """The gradient step with the steps split over n devices: ``(compiled, args, compile_s)``;
    n = 1: the plain one-device program (no mesh, no ``time_axis``)."""
    model = problem.cell
    time_axis = AXIS if n > 1 else None

    def loss(params, readout, xs, targets):
        return bptt_jax.sequence_loss(
            model, params, readout, xs, targets, backward=backward, time_axis=time_axis
        )

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    if n == 1:
        args = (problem.params, problem.readout, problem.xs, problem.targets)
        start = time.perf_counter()
        compiled = grad.lower(*args).compile()
        return compiled, args, time.perf_counter() - start
    mesh = jax.make_mesh((n,), (AXIS,), axis_types=(AxisType.Explicit,), devices=jax.devices()[:n])
    steps, rep = NamedSharding(mesh, P(AXIS)), NamedSharding(mesh, P())
    args = (
        jax.device_put(problem.params, rep),
        jax.device_put(problem.readout, rep),
        jax.device_put(problem.xs, steps),
        jax.device_put(problem.targets, steps),
    )
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = grad.lower(*args).compile()
    return compiled, args, time.perf_counter() - start


def _name(n: int) -> str:
    return f"{n} device" + ("s" if n > 1 else "")


def measure(session: harness.Session, cfg, simulated: bool) -> dict[str, Any]:
    part = cfg.sequence
    T, B, D, H = part.size
    counts = [n for n in part.devices if n <= jax.device_count()]
    skipped = [n for n in part.devices if n > jax.device_count()]
    if skipped:
        session.note(
            f"sequence: {skipped} devices skipped: JAX sees {jax.device_count()} "
            f"{jax.default_backend()} device(s)"
        )
    problem = session.problem(part.model, T, B, D, H)
    tol = session.tolerance(T)
    grad_bytes = sum(
        x.size * x.dtype.itemsize for x in jax.tree.leaves((problem.params, problem.readout))
    )
    kind = "simulated CPU devices" if simulated else f"{jax.default_backend()} devices"
    session.print(
        f"{part.model} T={T} B={B} D={D} H={H}, backward={part.backward}, steps split over "
        f"mesh axis {AXIS!r} on {kind} ({jax.devices()[0].device_kind}); gradient "
        f"{grad_bytes / 1024:.1f} KiB",
        flush=True,
    )
    if simulated:
        session.note(
            "sequence: the devices are simulated CPU devices sharing this machine's "
            f"{os.cpu_count()} cores: the times measure the overhead of splitting the sequence "
            "(partitioned program, summary exchanges, the second pass over each device's "
            "steps), not a speedup"
        )
    # the reference: the plain one-device program (timed too when devices lists 1)
    base_what = f"{problem.label} on 1 device"
    try:
        base_compiled, base_args, base_compile_s = _program(problem, part.backward, 1)
        ref_out = jax.block_until_ready(base_compiled(*base_args))
    except Exception as e:  # noqa: BLE001 - nothing to check the splits against
        session.fail("sequence", f"{base_what} (the reference)", f"{type(e).__name__}: {e}")
        return dict(rows=[], simulated=simulated)
    base_temp = harness.memory_of(base_compiled)["temp_bytes"]
    timed, info = {}, {}
    for n in counts:
        name = _name(n)
        what = f"{problem.label} on {name}"
        try:
            if T % n:
                raise harness.EntryFailed(f"{what}: T={T} is not divisible by {n} devices")
            if n == 1:
                compiled, args, compile_s = base_compiled, base_args, base_compile_s
                err = 0.0
            else:
                compiled, args, compile_s = _program(problem, part.backward, n)
                out = jax.block_until_ready(compiled(*args))
                err = harness.check(what, part.backward, out, ref_out, tol, "1 device")
        except Exception as e:  # noqa: BLE001 - reported, never timed
            session.fail("sequence", what, e)
            continue
        found = hlo.collectives(compiled.as_text())
        memory = harness.memory_of(compiled)
        temp = memory["temp_bytes"]
        info[name] = dict(
            devices=n,
            collectives=dict(sorted(Counter(c.op for c in found).items())),
            collective_bytes=sum(c.bytes for c in found),
            collectives_in_loops=len([c for c in found if c.loop_depth > 0]),
            temp_vs_one_device=None if not base_temp or temp is None else temp / base_temp,
            flops_per_device=hlo.flops(compiled),
        )
        timed[name] = harness.Timed(
            name=name,
            run=lambda c=compiled, a=args: jax.block_until_ready(c(*a)),
            compile_s=compile_s,
            memory=memory,
            check=dict(reference="1 device", max_rel_err=err, tolerance=tol, passed=True),
        )
    if not timed:
        return dict(rows=[], simulated=simulated)
    measured = session.measure(problem, timed, repeats=part.repeats, warmup=part.warmup)
    base = measured.get(_name(1))
    base_flops = hlo.flops(base_compiled)
    rows = []
    session.print(header(simulated), flush=True)
    for name, v in measured.items():
        row = dict(
            model=part.model, T=T, B=B, D=D, H=H, backward=part.backward, axis=AXIS,
            **info[name], gradient_bytes=grad_bytes, simulated=simulated, **v,
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
    f"{'collectives':<16} {'KiB/step':>9} {'in loops':>8} {'temp MiB':>9} {'temp x':>7}"
)


def header(simulated: bool) -> str:
    """The table's heading: which devices, and whether ``x 1 dev`` is a speedup."""
    what = (
        "simulated CPU devices sharing the cores: x 1 dev is overhead, not speedup"
        if simulated
        else f"{jax.default_backend()} devices"
    )
    return f"({what})\n{HEADER}\n{'-' * len(HEADER)}"


def _ops(counts: dict[str, int]) -> str:
    """``{"all-gather": 2, "all-reduce": 1}`` as ``"2 ag, 1 ar"`` (``-`` for none)."""
    short = {"all-gather": "ag", "all-reduce": "ar", "reduce-scatter": "rs"}
    return ", ".join(f"{k} {short.get(op, op)}" for op, k in counts.items()) or "-"


def format_row(row: dict) -> str:
    speed = "" if row["speedup"] is None else f"{row['speedup']:.2f}x"
    temp = row.get("temp_bytes")
    ratio = "" if row["temp_vs_one_device"] is None else f"{row['temp_vs_one_device']:.3f}"
    return (
        f"{row['devices']:>7} {harness.fmt_ms(row['median_s']):>8} "
        f"{harness.fmt_ms(row['iqr_s']):>7} {row['tokens_per_s'] / 1e6:7.3f} {speed:>8} "
        f"{row['compile_s']:9.2f} {_ops(row['collectives']):<16} "
        f"{row['collective_bytes'] / 1024:9.1f} {row['collectives_in_loops']:>8} "
        f"{'' if temp is None else f'{temp / 2**20:9.1f}':>9} {ratio:>7}"
    )


def table(result: dict | None) -> list[str]:
    result = result or {}
    rows = result.get("rows", [])
    return [*header(bool(result.get("simulated"))).splitlines(), *(format_row(r) for r in rows)]


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        raise SystemExit(simulated.worker("sequence", measure, sys.argv[2], sys.argv[3]))
    import run as runner

    raise SystemExit(runner.main(parts=["sequence"]))
