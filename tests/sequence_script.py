"""The 8-device checks of tests/test_sequence_parallel.py, in a fresh interpreter: prints JSON.

Sequence parallelism (:mod:`bptt_jax._engine.time_sharded`) on 8 simulated CPU devices, in
float64, against the same computation on one device:

* ``grads``: the gradient of ``sequence_loss`` (params, readout, inputs, initial carry) and of
  ``unroll`` under random cotangents on the outputs and the final carry, with the time axis
  split over 8 devices under ``jit`` with an Explicit mesh ("explicit"), a 2-D Explicit
  ``data x time`` mesh ("data_time"), an Auto mesh (``jax.set_mesh``, "auto") and inside
  ``jax.shard_map`` ("shard_map"), for random masks, resets, initial carries, truncation
  and a bf16 policy; each compiled program's collectives and how many loops enclose each;
* ``memory``: per-device temp memory of the split gradient at a long T against one device's;
* ``train``: the trainer's steps on ``data x time`` meshes against one device;
* ``policy`` (``--full``): a bfloat16 compute policy, split against one device;
* ``guide``: the example of docs/guides/sequence_parallel.md;
* ``errors``: the messages of what the split refuses.

    python tests/sequence_script.py OUT_DIR [--full]     # writes OUT_DIR/results.json

``--full`` runs every (model, schedule, mode) of the grid; the default a selection in which
every model, schedule and mode runs.
"""

import itertools
import json
import sys
import time
import traceback
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bptt_jax  # noqa: E402
from bptt_jax import losses  # noqa: E402
from bptt_jax.cli import hlo  # noqa: E402
from tests import reference as ref  # noqa: E402

N = 8
T, B, D, O = 48, 4, 3, 4  # 6 steps per device
DTYPE = jnp.float64

MODELS = {
    "mingru": lambda: bptt_jax.MinGRU(5),
    "lru": lambda: bptt_jax.LRU(4, state_size=3, r_min=0.5),  # complex, an output map, D != H
    "stack": lambda: bptt_jax.Stack((bptt_jax.MinLSTM(4), bptt_jax.RGLRU(4)), dropout=0.25),
    "bidirectional": lambda: bptt_jax.Bidirectional(bptt_jax.MinGRU(3), bptt_jax.LRU(3)),
    # the reverse direction without an output map: its padded steps show the final carry
    "bi_swapped": lambda: bptt_jax.Bidirectional(bptt_jax.LRU(3), bptt_jax.MinGRU(3)),
}
SCHEDULES = {
    "full": dict(backward="manual"),
    "checkpointed": dict(backward="checkpointed", segment=5),
    "truncated": dict(truncate=5),  # cuts inside devices and at a device's first step
    "clipped": dict(delta_clip=0.5),  # per-step clipping: the errors passed device by device
}
MODES = ("explicit", "data_time", "auto", "shard_map")


def grid(full: bool):
    """(model, schedule, mode) entries: all, or a rotation in which every model meets every
    schedule and every mode (a bidirectional model has no truncated schedule)."""
    if full:
        return [
            (m, s, mode) for m, s, mode in itertools.product(MODELS, SCHEDULES, MODES)
            if not (m.startswith("bi") and s == "truncated")
        ]  # fmt: skip
    return [
        ("mingru", "truncated", "shard_map"),
        ("lru", "checkpointed", "auto"),
        ("stack", "truncated", "data_time"),
        ("bidirectional", "full", "explicit"),
        ("bidirectional", "clipped", "data_time"),
        ("bi_swapped", "clipped", "shard_map"),
    ]


rel_err = ref.tree_rel_err


def collective_summary(compiled) -> dict:
    found = hlo.collectives(compiled.as_text())
    counts = {}
    for c in found:
        counts[c.op] = counts.get(c.op, 0) + 1
    return dict(
        in_loops=[c._asdict() for c in found if c.loop_depth > 0],
        counts=counts,
        bytes={op: sum(c.bytes for c in found if c.op == op) for op in counts},
    )


def mesh_for(mode: str):
    if mode == "data_time":
        return jax.make_mesh((2, N // 2), ("data", "time"), axis_types=(AxisType.Explicit,) * 2)
    axis_type = AxisType.Auto if mode == "auto" else AxisType.Explicit
    return jax.make_mesh((N,), ("time",), axis_types=(axis_type,))


def problem(model_name: str, schedule: str, seed: int):
    """Random params, readout, inputs, targets, initial carry, right-padded mask (not with
    resets), resets (not for a bidirectional model), loss mask, cotangents; dropout in the
    Stack."""
    model = MODELS[model_name]()
    key = jax.random.key(seed)
    p, ro, xs, ys, carry0, mask = ref.model_problem(model, key, DTYPE, t=T, b=B, d=D, o=O)
    rng = ref.numpy_rng(jax.random.fold_in(key, 1))
    loss_mask = jnp.asarray(ref.flags(rng, (T, B), 0.7))
    resets = None
    if model_name in ("mingru", "stack"):  # streams: resets, and a mask in the others
        resets, mask = jnp.asarray(ref.flags(rng, (T, B), 0.1)), None
    dkey = jax.random.fold_in(key, 2) if model_name == "stack" else None
    hs, carry_t = jax.eval_shape(lambda: bptt_jax.unroll(model, p, xs, carry0))
    ct = ref.random_like(jax.random.fold_in(key, 3), (hs, carry_t))
    return model, dict(p=p, ro=ro, xs=xs, ys=ys, carry0=carry0, mask=mask, resets=resets,
                       loss_mask=loss_mask), dkey, ct  # fmt: skip


def grad_entry(model_name, schedule, mode, seed) -> dict:
    model, a, dkey, (ct_hs, ct_carry) = problem(model_name, schedule, seed)
    opts = SCHEDULES[schedule]
    reduction = "sum" if mode == "shard_map" else "mean"
    # dropout masks are drawn per step: under shard_map each device would draw its own
    dkey = None if mode == "shard_map" else dkey
    time_axis = "time" if mode in ("auto", "shard_map") else None

    def objective(p, ro, xs, carry0, ys, mask, resets, loss_mask, ct_hs, axis, opts=opts):
        value = losses.sequence_loss(
            model, p, ro, xs, ys, carry0, mask=mask, loss_mask=loss_mask, resets=resets,
            reduction=reduction, dropout_key=dkey, time_axis=axis, **opts,
        )  # fmt: skip
        unroll_opts = {k: v for k, v in opts.items() if k != "segment"}
        hs, carry_t = bptt_jax.unroll(
            model, p, xs, carry0, mask=mask, resets=resets, time_axis=axis, **unroll_opts
        )
        on_carry = sum(
            jnp.sum(c * g) for c, g in zip(jax.tree.leaves(carry_t), jax.tree.leaves(ct_carry))
        )
        if axis is not None and mode == "shard_map":  # every device holds the final carry
            on_carry = jnp.where(jax.lax.axis_index(axis) == 0, on_carry, 0)
        return value, jnp.sum(hs * ct_hs) + on_carry

    def total(*args, opts=opts):
        value, extra = objective(*args, opts=opts)
        return value + extra

    names = ("p", "ro", "xs", "carry0", "ys", "mask", "resets", "loss_mask")
    args = tuple(a[n] for n in names) + (ct_hs,)
    vg = jax.value_and_grad(total, argnums=(0, 1, 2, 3))
    single = jax.jit(lambda *x: vg(*x, None)).lower(*args).compile()
    want = single(*args)
    clip_effect = None
    if "delta_clip" in opts:  # the clipping must act, or the entry would test the plain path
        plain = {k: v for k, v in opts.items() if k != "delta_clip"}
        grad = jax.grad(partial(total, opts=plain), argnums=(0, 1, 2, 3))
        clip_effect = rel_err(want[1], jax.jit(lambda *x: grad(*x, None))(*args))

    mesh = mesh_for(mode)
    batch = "data" if mode == "data_time" else None
    rows, carry_rows, rep = P("time", batch), P(batch), P()
    specs = (rep, rep, rows, carry_rows, rows, rows, rows, rows, rows)
    if mode == "shard_map":

        def local(*x):
            # each device's loss is its steps' sum, the cotangent terms too: summed over the
            # devices; the replicated params' grads come back summed (psum'd once)
            value, grads = jax.value_and_grad(total, argnums=(0, 1, 2, 3))(*x, "time")
            return jax.lax.psum(value, "time"), grads

        f = jax.shard_map(local, mesh=mesh, in_specs=specs,
                          out_specs=(rep, (rep, rep, rows, carry_rows)))  # fmt: skip
    else:

        def f(*x):
            return vg(*x, time_axis)

    placed = tuple(
        None if x is None else jax.device_put(x, NamedSharding(mesh, s))
        for x, s in zip(args, specs, strict=True)
    )
    with jax.set_mesh(mesh):
        sharded = jax.jit(f).lower(*placed).compile()
        got = sharded(*placed)
    return dict(
        value_err=rel_err(got[0], want[0]),
        grad_err={
            name: rel_err(g, w)
            for name, g, w in zip(
                ("params", "readout", "xs", "carry0"), got[1], want[1], strict=True
            )  # fmt: skip
            if g is not None
        },
        xs_grad_spec=str(got[1][2].sharding.spec),
        clip_effect=clip_effect,
        dropout=dkey is not None,
        collectives=collective_summary(sharded),
    )


def collective_entries() -> dict:
    """The collectives of one layer's forward and gradient, per direction: a MinGRU, a
    2-layer Stack and a Bidirectional layer, each with a loss and with the outputs alone."""
    out = {}
    mesh = mesh_for("explicit")
    models = {
        "cell": bptt_jax.MinGRU(8),
        "stack2": bptt_jax.Stack((bptt_jax.MinGRU(8), bptt_jax.MinGRU(8))),
        "bidirectional": bptt_jax.Bidirectional(bptt_jax.MinGRU(8)),
    }
    for name, model in models.items():
        p, ro, xs, ys, carry0, mask = ref.model_problem(model, jax.random.key(0), DTYPE,
                                                        t=64, b=B, d=D, o=O)  # fmt: skip
        xs_s = jax.device_put(xs, NamedSharding(mesh, P("time")))
        ys_s = jax.device_put(ys, NamedSharding(mesh, P("time")))

        def fwd(p, xs):
            return bptt_jax.unroll(model, p, xs)[0]

        def grad(p, ro, xs, ys):
            return jax.grad(losses.sequence_loss, argnums=(1, 2))(model, p, ro, xs, ys)

        with jax.set_mesh(mesh):
            f = jax.jit(fwd).lower(p, xs_s).compile()
            g = jax.jit(grad).lower(p, ro, xs_s, ys_s).compile()
        out[name] = dict(forward=collective_summary(f), gradient=collective_summary(g))
    return out


def memory_entries(t: int) -> dict:
    """Per-device temp memory of the split gradient at T = ``t`` against one device's (a
    MinGRU, B=16, D=128, H=256, float32, the bench's layer; compiled, not run)."""
    model = bptt_jax.MinGRU(256)
    p, ro, xs, ys, _, _ = ref.model_problem(model, jax.random.key(0), jnp.float32, t=t, b=16,
                                            d=128, o=8, mask=False)  # fmt: skip

    def grad(p, ro, xs, ys):
        return jax.grad(losses.sequence_loss, argnums=(1, 2))(model, p, ro, xs, ys)

    single = jax.jit(grad).lower(p, ro, xs, ys).compile().memory_analysis()
    mesh = mesh_for("explicit")
    xs_s = jax.device_put(xs, NamedSharding(mesh, P("time")))
    ys_s = jax.device_put(ys, NamedSharding(mesh, P("time")))
    with jax.set_mesh(mesh):
        split = jax.jit(grad).lower(p, ro, xs_s, ys_s).compile().memory_analysis()
    return dict(
        t=t,
        single_temp=int(single.temp_size_in_bytes),
        split_temp=int(split.temp_size_in_bytes),
        ratio=split.temp_size_in_bytes / single.temp_size_in_bytes,
    )


def error_entries() -> dict:
    """What the split refuses, and the messages."""
    mesh = mesh_for("explicit")
    cell = bptt_jax.MinGRU(4)
    p, ro, xs, ys, carry0, mask = ref.model_problem(cell, jax.random.key(0), DTYPE, t=T, b=B,
                                                    d=D, o=O)  # fmt: skip
    gru = bptt_jax.GRU(4)
    pg = gru.init(jax.random.key(1), D, DTYPE)
    bi = bptt_jax.Bidirectional(cell)
    pb = bi.init(jax.random.key(2), D, DTYPE)
    resets = jnp.zeros((T, B), bool).at[3].set(True)
    xs_s = jax.device_put(xs, NamedSharding(mesh, P("time")))
    xs_odd = jax.device_put(xs[:40], NamedSharding(jax.make_mesh((N,), ("time",),
                            axis_types=(AxisType.Explicit,)), P(None)))  # fmt: skip
    cases = {
        "nonlinear": lambda: bptt_jax.unroll(gru, pg, xs_s),
        "autodiff": lambda: bptt_jax.unroll(cell, p, xs_s, backward="autodiff"),
        "packed_bidirectional": lambda: bptt_jax.unroll(bi, pb, xs_s, resets=resets),
        "uneven": lambda: bptt_jax.unroll(cell, p, xs_odd[:36], time_axis="time"),
        "not_a_name": lambda: bptt_jax.unroll(cell, p, xs_s, time_axis=3),
        "tbptt": lambda: bptt_jax.tbptt(cell, p, ro, xs_s, ys, k1=6, update=lambda *a: a[:3]),
        "return_deltas": lambda: losses.loss_and_grads(
            cell, p, ro, xs_s, ys, return_deltas=True
        ),  # fmt: skip
    }
    out = {}
    for name, fn in cases.items():
        try:
            with jax.set_mesh(mesh):
                jax.eval_shape(fn)
            out[name] = None
        except (ValueError, TypeError) as e:
            out[name] = f"{type(e).__name__}: {e}"
    try:  # no mesh: the time axis is split nowhere
        jax.eval_shape(lambda: bptt_jax.unroll(cell, p, xs, time_axis="time"))
        out["no_mesh"] = None
    except (ValueError, TypeError) as e:
        out["no_mesh"] = f"{type(e).__name__}: {e}"
    return out


def policy_entries() -> dict:
    """Under a bfloat16 compute policy (float32 params, carries and sums), T = 512: the split
    gradient of ``sequence_loss`` against one device's under the same policy and against
    float32 compute on one device, for a Stack (a MinGRU and an LRU) and a Bidirectional
    MinLSTM over right-padded sequences."""
    out = {}
    models = {
        "stack": bptt_jax.Stack((bptt_jax.MinGRU(16), bptt_jax.LRU(16))),
        "bidirectional": bptt_jax.Bidirectional(bptt_jax.MinLSTM(16)),
    }
    mesh = mesh_for("explicit")
    for name, model in models.items():
        p, ro, xs, ys, _, mask = ref.model_problem(model, jax.random.key(1), jnp.float32, t=512,
                                                   b=B, d=8, o=O)  # fmt: skip

        def grad(p, ro, xs, ys, mask, dtype, model=model):
            def loss(p, ro, xs):
                return losses.sequence_loss(model, p, ro, xs, ys, mask=mask, compute_dtype=dtype)

            return jax.grad(loss, argnums=(0, 1, 2))(p, ro, xs)

        g = jax.jit(grad, static_argnums=5)
        one = g(p, ro, xs, ys, mask, jnp.bfloat16)
        f32 = g(p, ro, xs, ys, mask, None)
        split = g(*jax.device_put((p, ro), NamedSharding(mesh, P())),
                  *jax.device_put((xs, ys, mask), NamedSharding(mesh, P("time"))),
                  jnp.bfloat16)  # fmt: skip
        out[name] = dict(
            split_vs_one=rel_err(split, one),
            split_vs_f32=rel_err(split, f32),
            one_vs_f32=rel_err(one, f32),
        )
    return out


def train_entries() -> dict:
    """The trainer's full-BPTT step of a carried stream (a Stack of a MinGRU and a MinLSTM, adam
    with clipping, random masked batches) on a (2, 4) ``data x time`` mesh (and with
    ``--full`` an (1, 8) one) against one device: three steps."""
    from bptt_jax import train
    from bptt_jax.truncated import Batch

    model = bptt_jax.Stack((bptt_jax.MinGRU(6), bptt_jax.MinLSTM(5)))
    opt = train.OptimConfig(name="adam", learning_rate=0.05, clip="global_norm", max_norm=0.5)
    rng = np.random.default_rng(0)
    batches = [
        Batch(rng.standard_normal((T, B, D)), rng.integers(0, O, (T, B)).astype(np.int32),
              None, rng.random((T, B)) < 0.8, None)
        for _ in range(3)
    ]  # fmt: skip

    def run(t):
        state = t.init(jax.random.key(0), D, O, B, DTYPE)
        values = []
        for batch in batches:
            state, metrics = t.step(state, t.put_batch(batch))
            values.append(float(metrics["loss"][0]))
        return state, values

    with jax.numpy_dtype_promotion("standard"):  # optax's adam mixes Python floats and ints
        return _train_entries(model, opt, run)


def _train_entries(model, opt, run) -> dict:
    from bptt_jax import parallel, train

    one, want = run(train.trainer(model, opt))
    out = {}
    for along_time in (4,) if not FULL else (4, 8):
        mesh = parallel.sequence_mesh(0, along_time)
        state, got = run(train.trainer(model, opt, mesh=mesh, time_axis="time"))
        out[f"time{along_time}"] = dict(
            loss_err=max(abs(a - b) / abs(b) for a, b in zip(got, want, strict=True)),
            params_err=rel_err(state.params, one.params),
            carry_err=rel_err(state.carry, one.carry),
            carry_spec=str(jax.tree.leaves(state.carry)[0].sharding.spec),
        )
    return out


#: The guide page whose example runs here (tests/test_guides.py leaves it out: its fence is
#: marked ``<!-- test: elsewhere tests/sequence_script.py ... -->``).
GUIDE = "docs/guides/sequence_parallel.md"


def guide_entry() -> dict:
    """The guide's example, run here on 8 devices; what it prints."""
    import contextlib
    import io
    import re

    text = (Path(__file__).resolve().parents[1] / GUIDE).read_text()
    marked = r"<!-- test: elsewhere tests/sequence_script\.py[^>]*-->\n```python\n(.*?)^```"
    (code,) = re.findall(marked, text, re.S | re.M)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), jax.enable_x64(False):
        exec(compile(code, GUIDE, "exec"), {"__name__": "__main__"})
    return dict(printed=out.getvalue())


#: ``--full``: every entry.
FULL = "--full" in sys.argv


def main():
    out_dir = Path(sys.argv[1])
    full = FULL
    results = {"devices": jax.device_count(), "grads": {}, "failures": {}, "seconds": {}}
    for i, (m, s, mode) in enumerate(grid(full)):
        name = f"{m}/{s}/{mode}"
        start = time.perf_counter()
        try:
            results["grads"][name] = grad_entry(m, s, mode, seed=100 + i)
        except Exception:
            results["failures"][name] = traceback.format_exc()
        results["seconds"][name] = time.perf_counter() - start
    parts = (("collectives", collective_entries), ("errors", error_entries),
             ("memory", lambda: memory_entries(65536)), ("train", train_entries),
             ("policy", policy_entries if FULL else dict),
             ("guide", guide_entry))  # fmt: skip
    for name, fn in parts:
        start = time.perf_counter()
        try:
            results[name] = fn()
        except Exception:
            results["failures"][name] = traceback.format_exc()
        results["seconds"][name] = time.perf_counter() - start
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    jax.config.update("jax_num_cpu_devices", N)
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_numpy_dtype_promotion", "strict")  # as the suite (conftest.py)
    main()
