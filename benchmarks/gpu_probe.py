"""GPU measurements that are not a bench part: one section per call.

    python benchmarks/gpu_probe.py cudnn [after]   # jax.experimental.rnn's LSTM vs lstm_ref
    python benchmarks/gpu_probe.py unroll [SPEC]   # the scans' unroll factor: time per factor
    python benchmarks/gpu_probe.py compile [CELLS] [VARIANTS]   # compile and run time
    python benchmarks/gpu_probe.py bidirectional [SPEC]   # directions fused or one by one
    python benchmarks/gpu_probe.py linear [SPEC]   # a linear cell's chunk length and scan

Each prints one JSON line per measurement (``{"section": ..., ...}``) and runs on any backend;
the numbers mean something on a GPU. ``compile`` honours ``BPTT_JAX_CACHE_DIR`` (cold or warm
persistent cache) and ``XLA_FLAGS`` (e.g. ``--xla_gpu_autotune_level=0``), so it is run once
per setting, each in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import bptt_jax
from bptt_jax.models import CELLS, build_model


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def cudnn(order: str = "first") -> None:
    """jax.experimental.rnn.lstm (cuDNN) against its own pure-JAX ``lstm_ref`` on identical
    weights, gate block by gate block; and the cuDNN gradient called twice (a backward that
    accumulates into an uncleared buffer gives two different answers).

    ``order="after"``: first compile and run bptt_jax's LSTM gradient (100/64/128/256), as
    the bench's peers part does before its cuDNN peer (the peer fails there, not here when
    cuDNN runs first in a fresh process)."""
    if order == "after":
        f, args = _grad_fn(bptt_jax.LSTM(256), 100, 64, 128, 256)
        jax.block_until_ready(f(*args))
        emit(section="cudnn", ran_before="bptt_jax LSTM gradient 100/64/128/256")
    for T, B, D, H in [(5, 3, 4, 6), (100, 64, 128, 256)]:
        _cudnn_case(T, B, D, H)


def _cudnn_case(T, B, D, H) -> None:
    from jax.experimental import rnn as jrnn

    k = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(k[0], (B, T, D), jnp.float32)
    h0 = jax.random.normal(k[1], (1, B, H), jnp.float32)
    c0 = jax.random.normal(k[2], (1, B, H), jnp.float32)
    n = jrnn.get_num_params_in_lstm(D, H, 1, False)
    w = jax.random.uniform(k[3], (n,), jnp.float32, -1 / H**0.5, 1 / H**0.5)
    lengths = jnp.full((B,), T, jnp.int32)
    cy = jax.random.normal(k[4], (B, T, H), jnp.float32)
    ch = jax.random.normal(k[5], (2, 1, B, H), jnp.float32)

    def loss(fn, w, x, h0, c0):
        y, hn, cn = fn(w, x, h0, c0)
        return jnp.vdot(y, cy) + jnp.vdot(hn, ch[0]) + jnp.vdot(cn, ch[1])

    def cudnn_fn(w, x, h0, c0):
        return jrnn.lstm(x, h0, c0, w, lengths, D, H, 1, 0.0, False)

    def ref_fn(w, x, h0, c0):
        wih, whh, bih, bhh = jrnn.unpack_lstm_weights(w, D, H, 1, False)
        return jrnn.lstm_ref(x, h0, c0, wih, whh, bih, bhh, lengths, D, H, 1, 0.0, False)

    with jax.default_matmul_precision("highest"):
        g_c = jax.jit(jax.value_and_grad(lambda *a: loss(cudnn_fn, *a), argnums=(0, 1, 2, 3)))
        g_r = jax.jit(jax.value_and_grad(lambda *a: loss(ref_fn, *a), argnums=(0, 1, 2, 3)))
        (vc, gc), (_, gc2), (vr, gr) = g_c(w, x, h0, c0), g_c(w, x, h0, c0), g_r(w, x, h0, c0)
    blocks = {}
    parts_c = jrnn.unpack_lstm_weights(gc[0], D, H, 1, False)
    parts_r = jrnn.unpack_lstm_weights(gr[0], D, H, 1, False)
    for name, pc, pr in zip(("W_ih", "W_hh", "b_ih", "b_hh"), parts_c, parts_r):
        for gate, bc, br in zip("ifgo", jnp.split(pc[0], 4, 0), jnp.split(pr[0], 4, 0)):
            blocks[f"{name}.{gate}"] = _rel(bc, br)
    emit(
        section="cudnn",
        size=[T, B, D, H],
        value_rel_err=abs(float(vc) - float(vr)) / abs(float(vr)),
        x_rel_err=_rel(gc[1], gr[1]),
        h0_rel_err=_rel(gc[2], gr[2]),
        c0_rel_err=_rel(gc[3], gr[3]),
        weights_rel_err=blocks,
        repeat_call_max_diff=float(jnp.max(jnp.abs(gc2[0] - gc[0]))),
    )


def _grad_fn(model, T, B, D, H, O=128, **options):
    k = jax.random.split(jax.random.key(1), 4)
    params = model.init(k[0], D)
    readout = bptt_jax.init_readout(k[1], bptt_jax.models.output_size(model), O)
    xs = jax.random.normal(k[2], (T, B, D), jnp.float32)
    ys = jax.random.randint(k[3], (T, B), 0, O)
    f = jax.jit(
        jax.value_and_grad(
            lambda p, r, x: bptt_jax.sequence_loss(model, p, r, x, ys, **options), argnums=(0, 1)
        )
    )
    return f, (params, readout, xs)


def _time(call, repeats=20) -> float:
    jax.block_until_ready(call())
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(call())
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def unroll(spec: str | None = None) -> None:
    """Time the manual gradient with the scans unrolled 1, 2, 4, 8 steps per iteration.

    ``spec``: cases ``cell:T,B,D,H:u1,u2[:bf16]`` separated by ``;`` instead of the default."""
    spec = (
        spec or "lstm:512,128,256,512:1,2,4,8;lstm:100,64,128,256:1,2,4,8;gru:512,128,256,512:1,4"
    )
    cases = []
    for case in spec.split(";"):
        name, size, factors, *rest = case.split(":")
        T, B, D, H = map(int, size.split(","))
        cases.append((name, build_model(name, H), (T, B, D, H), tuple(map(int, factors.split(","))),
                      jnp.bfloat16 if rest == ["bf16"] else None))  # fmt: skip
    with jax.default_matmul_precision("highest"):
        for name, model, (T, B, D, H), factors, cd in cases:
            for u in factors:
                os.environ["BPTT_JAX_SCAN_UNROLL"] = str(u)  # read when the scan is traced
                jax.clear_caches()
                f, args = _grad_fn(model, T, B, D, H, compute_dtype=cd)
                start = time.perf_counter()
                compiled = f.lower(*args).compile()
                compile_s = time.perf_counter() - start
                ms = 1e3 * _time(lambda c=compiled, a=args: c(*a))
                emit(section="unroll", cell=name, size=[T, B, D, H], unroll=u, ms=ms,
                     compile_s=compile_s, bf16=cd is not None)  # fmt: skip
    os.environ.pop("BPTT_JAX_SCAN_UNROLL", None)


def compile_(cells: str = "lstm,gru", variants: str = "manual,bf16") -> None:
    """Compile and run time of the manual gradients (T, B, D, H) = (512, 128, 256, 512) of
    ``cells`` in ``variants`` (comma-separated), under this interpreter's cache directory
    and XLA flags (e.g. ``--xla_gpu_enable_triton_gemm=false``)."""
    from bptt_jax import cli  # the command line's compilation cache

    cache = os.environ.get("BPTT_JAX_CACHE_DIR")
    if cache:
        cli.enable_compile_cache(cache)
    with jax.default_matmul_precision("highest"):
        for name in cells.split(","):
            model = build_model(name, 512)
            for variant in variants.split(","):
                cd = jnp.bfloat16 if variant == "bf16" else None
                f, args = _grad_fn(model, 512, 128, 256, 512, compute_dtype=cd)
                start = time.perf_counter()
                compiled = f.lower(*args).compile()
                compile_s = time.perf_counter() - start
                ms = 1e3 * _time(lambda c=compiled, a=args: c(*a), repeats=10)
                emit(section="compile", cell=name, variant=variant, cache=cache or None,
                     xla_flags=os.environ.get("XLA_FLAGS"), compile_s=compile_s, ms=ms)  # fmt: skip


def bidirectional(spec: str | None = None) -> None:
    """A Bidirectional layer's gradient with its directions one after the other and fused
    into one scan (``BPTT_JAX_FUSE_DIRECTIONS``, off by default): time, temp memory, and the
    two gradients' agreement. ``spec``: cases ``cell:T,B,D,H[:bf16]`` separated by ``;``."""
    spec = spec or "gru:512,128,256,512;gru:100,64,128,256"
    with jax.default_matmul_precision("highest"):
        for case in spec.split(";"):
            name, size, *rest = case.split(":")
            T, B, D, H = map(int, size.split(","))
            cd = jnp.bfloat16 if rest == ["bf16"] else None
            model = build_model(name, H, bidirectional=True)
            runs = {}
            for fuse in ("0", "1"):
                os.environ["BPTT_JAX_FUSE_DIRECTIONS"] = fuse  # read when traced
                jax.clear_caches()
                f, args = _grad_fn(model, T, B, D, H, compute_dtype=cd)
                start = time.perf_counter()
                compiled = f.lower(*args).compile()
                compile_s = time.perf_counter() - start
                temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
                runs[fuse] = (compiled, args, compile_s, temp)
            # interleaved, so both see the same machine
            ms = {fuse: [] for fuse in runs}
            for _ in range(3):
                for fuse, (compiled, args, _, _) in runs.items():
                    ms[fuse].append(1e3 * _time(lambda c=compiled, a=args: c(*a), repeats=7))
            grads = {fuse: c(*a)[1] for fuse, (c, a, _, _) in runs.items()}
            err = max(_rel(x, y) for x, y in zip(*(jax.tree.leaves(grads[k]) for k in "10")))
            for fuse, (_, _, compile_s, temp) in runs.items():
                emit(section="bidirectional", cell=name, size=[T, B, D, H], fused=fuse == "1",
                     bf16=cd is not None, ms=statistics.median(ms[fuse]), temp_mib=temp,
                     compile_s=compile_s, fused_vs_sequential_rel_err=err)  # fmt: skip
    os.environ.pop("BPTT_JAX_FUSE_DIRECTIONS", None)


def linear(spec: str | None = None) -> None:
    """A linear cell's gradient for each chunk length (``BPTT_JAX_LINEAR_CHUNK``; the length
    T itself: one chunk, the whole sequence; 0: the backend's own rule) and each scan,
    interleaved: time, temp memory and the agreement with the first. ``spec``: cases
    ``cell:T,B,D,H:chunks:scans`` separated by ``;`` (what ``options.LINEAR_CHUNK_BYTES`` and
    ``PARALLEL_SCAN`` are set from)."""
    spec = spec or (
        "mingru:4096,16,128,256:0,32,64,256,1024,4096:sequential,parallel;"
        "mingru:4096,128,256,512:0,64,256,1024,4096:sequential,parallel"
    )
    with jax.default_matmul_precision("highest"):
        for case in spec.split(";"):
            name, size, chunks, scans = case.split(":")
            T, B, D, H = map(int, size.split(","))
            runs = {}
            for scan in scans.split(","):
                for c in chunks.split(","):
                    if c == "0":  # the backend's own (options.LINEAR_CHUNK_BYTES)
                        os.environ.pop("BPTT_JAX_LINEAR_CHUNK", None)
                    else:
                        os.environ["BPTT_JAX_LINEAR_CHUNK"] = c  # read when traced
                    jax.clear_caches()
                    f, args = _grad_fn(CELLS[name](H, scan=scan), T, B, D, H)
                    start = time.perf_counter()
                    compiled = f.lower(*args).compile()
                    compile_s = time.perf_counter() - start
                    temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
                    runs[scan, int(c)] = (compiled, args, compile_s, temp)
            ms = {k: [] for k in runs}
            for _ in range(3):  # interleaved, so all see the same machine
                for k, (compiled, args, _, _) in runs.items():
                    ms[k].append(1e3 * _time(lambda c=compiled, a=args: c(*a), repeats=5))
            grads = {k: c(*a)[1] for k, (c, a, _, _) in runs.items()}
            first = jax.tree.leaves(next(iter(grads.values())))
            for (scan, c), (_, _, compile_s, temp) in runs.items():
                err = max(_rel(x, y) for x, y in zip(jax.tree.leaves(grads[scan, c]), first))
                emit(section="linear", cell=name, size=[T, B, D, H], scan=scan, chunk=c,
                     ms=min(ms[scan, c]), temp_mib=temp, compile_s=compile_s,
                     rel_err_vs_first=err)  # fmt: skip
    os.environ.pop("BPTT_JAX_LINEAR_CHUNK", None)


if __name__ == "__main__":
    sections = {"cudnn": cudnn, "unroll": unroll, "compile": compile_}
    sections["bidirectional"] = bidirectional
    sections["linear"] = linear
    sections[sys.argv[1]](*sys.argv[2:])
