"""Hand-written BPTT vs jax.grad through the plain per-step lax.scan, side by side.

For each cell and (T, B, D, H): check that the manual gradient agrees with autodiff, compile
both outside the timed region (compile time reported separately), warm up, then time them
interleaved (manual, autodiff, manual, ...) so machine drift cancels, with
``jax.block_until_ready``. Reports the median and spread of each, the ratio, tokens/s (T*B per
second) and XLA's temp memory from ``compile().memory_analysis()``.

    python benchmarks/manual_vs_autodiff.py                       # the default grid
    python benchmarks/manual_vs_autodiff.py --sizes 256,64,128,256 --repeats 20 --out results

Writes ``manual_vs_autodiff.json`` (every number) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import numpy as np

import bptt_jax

CELLS = {
    "elman": lambda h: bptt_jax.Elman(h),
    "lstm": lambda h: bptt_jax.LSTM(h),
    "gru": lambda h: bptt_jax.GRU(h),
}
OUTPUTS = 32  # readout size O


def _problem(cell, t, b, d, key):
    k = jax.random.split(key, 4)
    params = cell.init(k[0], d)
    readout = bptt_jax.init_readout(k[1], cell.hidden_size, OUTPUTS)
    xs = jax.random.normal(k[2], (t, b, d))
    targets = jax.random.randint(k[3], (t, b), 0, OUTPUTS)
    return params, readout, xs, targets


def _grad_fn(cell, targets, backward):
    def loss(params, readout, xs):
        return bptt_jax.sequence_loss(cell, params, readout, xs, targets, backward=backward)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def measure(cell_name, t, b, d, h, repeats, key):
    cell = CELLS[cell_name](h)
    args = _problem(cell, t, b, d, key)
    params, readout, xs, targets = args
    variants = {}
    for backward in ("manual", "autodiff"):
        fn = _grad_fn(cell, targets, backward)
        start = time.perf_counter()
        compiled = fn.lower(params, readout, xs).compile()
        compile_s = time.perf_counter() - start
        mem = compiled.memory_analysis()
        variants[backward] = dict(
            fn=compiled,
            compile_s=compile_s,
            temp_bytes=int(mem.temp_size_in_bytes),
            argument_bytes=int(mem.argument_size_in_bytes),
            times=[],
        )
    # Check the answer before timing it: a wrong fast path is never reported.
    out_m = variants["manual"]["fn"](params, readout, xs)
    out_a = variants["autodiff"]["fn"](params, readout, xs)
    err = max(_rel(x, y) for x, y in zip(jax.tree.leaves(out_m), jax.tree.leaves(out_a)))
    if not err <= 1e-4:
        raise SystemExit(f"{cell_name} {(t, b, d, h)}: manual disagrees with autodiff ({err:.2e})")
    for v in variants.values():  # warm-up
        jax.block_until_ready(v["fn"](params, readout, xs))
    for _ in range(repeats):  # interleaved
        for v in variants.values():
            start = time.perf_counter()
            jax.block_until_ready(v["fn"](params, readout, xs))
            v["times"].append(time.perf_counter() - start)
    row = dict(cell=cell_name, T=t, B=b, D=d, H=h, max_rel_err=err)
    for name, v in variants.items():
        med = statistics.median(v["times"])
        row[name] = dict(
            median_s=med,
            min_s=min(v["times"]),
            iqr_s=float(np.subtract(*np.percentile(v["times"], [75, 25]))),
            tokens_per_s=t * b / med,
            compile_s=v["compile_s"],
            temp_bytes=v["temp_bytes"],
            argument_bytes=v["argument_bytes"],
        )
    row["speedup"] = row["autodiff"]["median_s"] / row["manual"]["median_s"]
    row["temp_ratio"] = row["manual"]["temp_bytes"] / max(row["autodiff"]["temp_bytes"], 1)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default="elman,lstm,gru")
    parser.add_argument(
        "--sizes",
        default="100,32,64,128;256,64,128,256",
        help="semicolon-separated T,B,D,H tuples",
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    sizes = [tuple(int(v) for v in s.split(",")) for s in args.sizes.split(";")]
    key = jax.random.key(args.seed)
    dev = jax.devices()[0]
    print(
        f"jax {jax.__version__} on {dev.platform} ({dev.device_kind}), "
        f"{os.cpu_count()} CPUs, {platform.machine()}; float32; loss=xent O={OUTPUTS}; "
        f"median of {args.repeats} interleaved runs"
    )
    head = (
        f"{'cell':<6} {'T':>5} {'B':>4} {'D':>4} {'H':>4}  {'manual ms':>10} "
        f"{'autodiff ms':>11} {'speedup':>8}  {'Mtok/s':>7}  {'temp MiB man/auto':>18}"
    )
    print(head)
    print("-" * len(head))
    rows = []
    for cell_name in args.cells.split(","):
        for t, b, d, h in sizes:
            r = measure(cell_name, t, b, d, h, args.repeats, key)
            rows.append(r)
            m, a = r["manual"], r["autodiff"]
            print(
                f"{cell_name:<6} {t:>5} {b:>4} {d:>4} {h:>4}  {m['median_s'] * 1e3:10.2f} "
                f"{a['median_s'] * 1e3:11.2f} {r['speedup']:7.2f}x  "
                f"{m['tokens_per_s'] / 1e6:7.3f}  "
                f"{m['temp_bytes'] / 2**20:8.1f}/{a['temp_bytes'] / 2**20:<8.1f}",
                flush=True,
            )
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "manual_vs_autodiff.json")
    with open(path + ".tmp", "w") as f:
        json.dump(dict(jax=jax.__version__, device=dev.platform, rows=rows), f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
