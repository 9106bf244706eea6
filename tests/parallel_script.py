"""The 8-device checks of tests/test_parallel.py, in a fresh interpreter: prints JSON.

The test suite's processes have started JAX with one CPU device; this script starts it with 8
(``jax_num_cpu_devices``) and runs every multi-device check in one process, so JAX starts and
compiles once:

* ``grads``: the gradient of ``sequence_loss`` for a batch split over 8 devices, under
  ``jit`` with an Explicit and an Auto mesh (``jax.set_mesh``), with arrays only placed on
  an Explicit mesh (``device_put``, no ``set_mesh``: "placed") and inside
  ``jax.shard_map``, against the same
  gradient on one device (float64), with each compiled program's collectives (and how many
  loops enclose each) and its FLOPs per device against the one-device program's;
* ``train``: the trainer's full-BPTT and TBPTT steps on 8 devices against one device;
* ``fit``: ``fit_loop.fit`` on 8 devices against 1, a run killed and resumed, a resume onto 4
  devices, and the final checkpoint the 2-process run is compared with;
* ``errors``: the messages of bad input that needs devices to be found.

    python tests/parallel_script.py OUT_DIR [--full]     # writes OUT_DIR/results.json

``--full`` runs every (model, schedule, mode) of the gradient grid; the default a selection
in which every model and schedule runs under Explicit ``jit`` and each mode meets each model.
"""

import contextlib
import dataclasses
import itertools
import json
import shutil
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
from bptt_jax import losses, parallel, train  # noqa: E402
from bptt_jax.cli import config, hlo, train_config  # noqa: E402
from bptt_jax.cli import fit as fit_loop  # noqa: E402
from tests import reference as ref  # noqa: E402

N = 8
T, B, D, O = 9, 16, 3, 4  # B = 2 examples per device
DTYPE = jnp.float64

MODELS = {
    "cell": lambda: bptt_jax.LSTM(5),
    "stack": lambda: bptt_jax.Stack((bptt_jax.GRU(4), bptt_jax.Elman(3)), dropout=0.25),
    "bidirectional": lambda: bptt_jax.Bidirectional(bptt_jax.GRU(4)),
}
SCHEDULES = {
    "full": dict(backward="manual"),
    "checkpointed": dict(backward="checkpointed", segment=3),
    "truncated": dict(truncate=4),
}
MODES = ("explicit", "auto", "shard_map", "placed")


def grid(full: bool):
    """(model, schedule, mode) entries: all of them, or a rotation in which every model
    meets every schedule and every mode (a bidirectional model has no truncated schedule)."""
    if full:
        return [
            (m, s, mode) for m, s, mode in itertools.product(MODELS, SCHEDULES, MODES)
            if not (m == "bidirectional" and s == "truncated")  # undefined for it
        ]  # fmt: skip
    return [
        ("cell", "full", "explicit"),
        ("cell", "checkpointed", "shard_map"),
        ("cell", "truncated", "auto"),
        ("stack", "full", "shard_map"),
        ("stack", "checkpointed", "auto"),
        ("stack", "truncated", "explicit"),
        ("bidirectional", "full", "auto"),
        ("bidirectional", "full", "shard_map"),
        ("bidirectional", "checkpointed", "explicit"),
        ("stack", "checkpointed", "placed"),
        ("bidirectional", "full", "placed"),
    ]


rel_err = ref.tree_rel_err


def collective_summary(compiled) -> dict:
    found = hlo.collectives(compiled.as_text())
    return dict(
        in_loops=[c._asdict() for c in found if c.loop_depth > 0],
        outside=len([c for c in found if c.loop_depth == 0]),
        ops=sorted({c.op for c in found}),
        all_reduce_bytes=sum(c.bytes for c in found if c.op == "all-reduce"),
    )


def problem(model_name: str, mode: str, seed: int):
    """Random params, readout, inputs, targets, mask and loss mask; a random initial carry
    for a cell, none (zeros made by the engine) for a Stack and, under shard_map, a
    Bidirectional model; dropout in the Stack but under shard_map, where each device would
    draw its own examples' masks from the same key (shard_map's per-device view)."""
    model = MODELS[model_name]()
    if mode == "shard_map" and isinstance(model, bptt_jax.Stack):
        model = dataclasses.replace(model, dropout=0.0)
    key = jax.random.key(seed)
    p, ro, xs, ys, carry0, mask = ref.model_problem(model, key, DTYPE, t=T, b=B, d=D, o=O)
    if model_name == "stack" or (model_name == "bidirectional" and mode == "shard_map"):
        carry0 = None
    loss_mask = ref.flags(ref.numpy_rng(jax.random.fold_in(key, 1)), (T, B), 0.7)
    dropout = isinstance(model, bptt_jax.Stack) and model.dropout > 0
    dkey = jax.random.fold_in(key, 2) if dropout else None
    return model, p, ro, xs, ys, carry0, mask, loss_mask, dkey


def grad_entry(model_name, schedule, mode, seed) -> dict:
    model, p, ro, xs, ys, carry0, mask, loss_mask, dkey = problem(model_name, mode, seed)
    opts = SCHEDULES[schedule]
    reduction = "sum" if mode == "shard_map" else "mean"

    def loss(p, ro, xs, carry0, ys, mask, loss_mask):
        return losses.sequence_loss(
            model, p, ro, xs, ys, carry0, mask=mask, loss_mask=loss_mask, loss="xent",
            reduction=reduction, dropout_key=dkey, **opts,
        )  # fmt: skip

    vg = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))
    args = (p, ro, xs, carry0, ys, mask, loss_mask)
    single = jax.jit(vg).lower(*args).compile()
    want = single(*args)

    rep, rows, carry_rows = P(), P(None, "data"), P("data")
    specs = (rep, rep, rows, carry_rows, rows, rows, rows)
    if mode == "shard_map":
        mesh = jax.make_mesh((N,), ("data",), axis_types=(AxisType.Explicit,))

        def local(p, ro, xs, carry0, ys, mask, loss_mask):
            # each device's loss is its examples' sum; the grads of the replicated params
            # come back summed over the devices (their cotangents are psum'd once)
            value, grads = vg(p, ro, xs, carry0, ys, mask, loss_mask)
            return jax.lax.psum(value, "data"), grads

        f = jax.shard_map(
            local, mesh=mesh, in_specs=specs, out_specs=(rep, (rep, rep, rows, carry_rows))
        )
    else:
        axis_type = AxisType.Auto if mode == "auto" else AxisType.Explicit
        mesh = jax.make_mesh((N,), ("data",), axis_types=(axis_type,))
        f = vg
    placed = tuple(
        jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs, strict=True)
    )
    # "placed": the mesh only in the arrays' types, as a user who device_puts and jits has it
    with contextlib.nullcontext() if mode == "placed" else jax.set_mesh(mesh):
        sharded = jax.jit(f).lower(*placed).compile()
        got = sharded(*placed)
    out_shardings = {
        "params": str(jax.tree.leaves(got[1][0])[0].sharding.spec),
        "xs": str(got[1][2].sharding.spec),
    }
    return dict(
        value_err=rel_err(got[0], want[0]),
        grad_err={
            name: rel_err(g, w)
            for name, g, w in zip(
                ("params", "readout", "xs", "carry0"), got[1], want[1], strict=True
            )
            if g is not None
        },  # fmt: skip
        dropout=dkey is not None,
        zero_carry=carry0 is None,
        flops_single=hlo.flops(single),
        flops_per_device=hlo.flops(sharded),
        collectives=collective_summary(sharded),
        out_shardings=out_shardings,
    )


# ------------------------------------------------------------------------------ trainer
def train_entries() -> dict:
    """Full BPTT (an LSTM with adam and clipping on random masked batches) and TBPTT(4, 6)
    (the recall task of the fit runs below, whose compiled 8-device step it shares): three
    steps of a carried stream on 8 devices against one."""
    out = {}
    mesh = parallel.data_mesh(N)
    key = jax.random.key(11)
    opt = train.OptimConfig(name="adam", learning_rate=0.05, clip="global_norm", max_norm=0.5)
    full_cell = bptt_jax.LSTM(5)
    task, recall_cell, _ = train_config.build(cfg_of())

    def random_batch(step):
        _, _, xs, ys, _, mask = ref.model_problem(
            full_cell, jax.random.fold_in(key, step), DTYPE, t=T, b=B, d=D, o=O
        )
        return bptt_jax.Batch(xs, ys, mask, None, None)

    cases = {
        "full": (full_cell, opt, None, None, (D, O, B), random_batch),
        "tbptt": (recall_cell, train.OptimConfig(), 4, 6,
                  (task.input_size, task.output_size, 8),
                  lambda step: task.batch(key, step, 8)),
    }  # fmt: skip
    for name, (cell, optim, k1, k2, sizes, batch_of) in cases.items():
        t1 = train.trainer(cell, optim, loss="xent", k1=k1, k2=k2)
        t8 = train.trainer(cell, optim, loss="xent", k1=k1, k2=k2, mesh=mesh)
        s1 = t1.init(key, *sizes, DTYPE)
        s8 = t8.init(key, *sizes, DTYPE)
        init_equal = all(
            np.array_equal(a, b) for a, b in zip(jax.tree.leaves(train_np(s1)),
                                                 jax.tree.leaves(train_np(s8)), strict=True)
        )  # fmt: skip
        errs, metric_errs = [], []
        for step in range(3):  # the carry runs on from batch to batch
            batch = batch_of(step)
            s1, m1 = t1.step(s1, batch)
            s8, m8 = t8.step(s8, t8.put_batch(batch))
            errs.append(rel_err(train_np(s8), train_np(s1)))
            metric_errs.append(rel_err(m8["loss"], m1["loss"]))
        compiled = t8.step.lower(s8, t8.put_batch(batch)).compile()  # jit's cached program
        out[name] = dict(
            init_equal=init_equal,
            state_err=max(errs),
            loss_err=max(metric_errs),
            carry_spec=str(s8.carry.h.sharding.spec),
            params_spec=str(s8.params.w_h.sharding.spec),
            updates=int(m8["loss"].shape[0]),
            collectives=collective_summary(compiled),
        )
    return out


def train_np(state):
    """A state's arrays as numpy (keys as their data)."""
    state = state._replace(key=jax.random.key_data(state.key))
    return jax.tree.map(np.asarray, state)


# ------------------------------------------------------------------------------ fit
TINY_RECALL = (
    "task=recall",
    "recall.seq_len=12",
    "recall.delay=3",
    "recall.test_len=20",
    "recall.test_size=4",
    "model.cell=lstm",
    "model.hidden_size=8",
    "model.dtype=float64",
    "train.batch_size=8",
    "train.k1=4",
    "train.k2=6",
    "train.log_every=1",
    "train.eval_every=0",
    "train.progress=false",
)


#: The run of the 2-process test (each process: `bptt-jax train` with these overrides), also
#: run here on 8 devices in one process (fit_entries' first run, the kill-and-resume's whole).
TWO_PROCESS_RUN = (*TINY_RECALL, "train.steps=10")


def cfg_of(*overrides):
    return config.load(train_config.Config, None, [*TINY_RECALL, *overrides])


class Killed(Exception):
    pass


def fit_entries(out_dir: Path) -> dict:
    import io

    from bptt_jax.cli import saving

    quiet = dict(out=io.StringIO())
    steps = "train.steps=10"
    # the run the 2-process one is compared with (TWO_PROCESS_RUN): 8 devices, final
    # checkpoint in ref8/
    r8 = fit_loop.fit(cfg_of(steps, f"checkpoint.dir={out_dir / 'ref8'}"), **quiet)
    whole = train_np(r8.state)
    res = dict(
        mesh_devices=int(r8.mesh.devices.size),
        carry_spec=str(r8.state.carry.h.sharding.spec),
    )

    def die_at_8(step, rec):
        if rec["kind"] == "train" and step == 8:
            raise Killed

    ck = out_dir / "ck"
    cfg = cfg_of(steps, f"checkpoint.dir={ck}", "checkpoint.every=3")
    try:
        fit_loop.fit(cfg, hooks=[die_at_8], **quiet)
    except Killed:
        pass
    res["latest_after_kill"] = saving.latest_step(ck)
    shutil.copytree(ck, out_dir / "ck_copy")
    log = io.StringIO()
    resumed = fit_loop.fit(cfg, out=log).state
    res["resumed_message"] = "resumed from" in log.getvalue() and "at step 6" in log.getvalue()
    res["resume_bit_for_bit"] = all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(train_np(resumed)), jax.tree.leaves(whole), strict=True)
    )
    res["resume_max_abs_diff"] = max(
        float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0))
        for a, b in zip(jax.tree.leaves(train_np(resumed)), jax.tree.leaves(whole), strict=True)
    )
    # the step-6 checkpoint of the 8-device run, resumed on 4 devices
    cfg4 = cfg_of(steps, f"checkpoint.dir={out_dir / 'ck_copy'}", "checkpoint.every=3",
                  "parallel.devices=4")  # fmt: skip
    r4 = fit_loop.fit(cfg4, **quiet)
    res["resume_on_4_devices"] = dict(
        devices=int(r4.mesh.devices.size),
        carry_spec=str(r4.state.carry.h.sharding.spec),
        err=rel_err(train_np(r4.state), whole),
    )
    return res


# ------------------------------------------------------------------------------ errors
def eager_entries() -> dict:
    """Eager (un-jitted) calls on arrays placed on an Explicit mesh, outside jax.set_mesh:
    ``unroll``, ``sequence_loss`` and ``loss_and_grads`` against one device (float64)."""
    out = {}
    mesh = parallel.data_mesh(N)
    for name in ("cell", "stack"):
        model, p, ro, xs, ys, carry0, mask, loss_mask, _ = problem(name, "placed", 7)
        if isinstance(model, bptt_jax.Stack):
            model = dataclasses.replace(model, dropout=0.0)
        rows = NamedSharding(mesh, P(None, "data"))
        put = lambda a, s=rows: None if a is None else jax.device_put(a, s)  # noqa: E731
        c0 = None if carry0 is None else jax.device_put(carry0, NamedSharding(mesh, P("data")))
        kw = dict(mask=mask, loss_mask=loss_mask)
        placed_kw = {k: put(v) for k, v in kw.items()}
        hs, _ = bptt_jax.unroll(model, p, put(xs), c0, mask=put(mask))
        hs1, _ = bptt_jax.unroll(model, p, xs, carry0, mask=mask)
        lg = losses.loss_and_grads(model, p, ro, put(xs), put(ys), c0, **placed_kw)
        lg1 = losses.loss_and_grads(model, p, ro, xs, ys, carry0, **kw)
        value = losses.sequence_loss(model, p, ro, put(xs), put(ys), c0, **placed_kw)
        out[name] = dict(
            hs_err=rel_err(hs, hs1),
            value_err=rel_err(value, lg1.value),
            grad_err=max(
                rel_err(a, b)
                for a, b in zip(
                    jax.tree.leaves((lg.params, lg.readout)),
                    jax.tree.leaves((lg1.params, lg1.readout)),
                )
            ),  # fmt: skip
            hs_sharding=str(hs.sharding.spec),
        )
    return out


def error_entries() -> dict:
    def message(f):
        try:
            f()
        except (ValueError, TypeError) as e:
            return f"{type(e).__name__}: {e}"
        return None

    mesh = parallel.data_mesh(N)
    cell = bptt_jax.GRU(3)
    t8 = train.trainer(cell, mesh=mesh)
    xs = jnp.ones((5, 12, 2), DTYPE)
    batch12 = bptt_jax.Batch(xs, jnp.zeros((5, 12), jnp.int32))
    state = t8.init(jax.random.key(0), 2, 3, 16, DTYPE)
    other = jax.make_mesh((N,), ("batch",))
    return dict(
        mesh_without_axis=message(lambda: train.trainer(cell, mesh=other)),
        init_batch=message(lambda: t8.init(jax.random.key(0), 2, 3, 12)),
        put_batch=message(lambda: t8.put_batch(batch12)),
        step_batch=message(lambda: t8.step(state, batch12)),
        config_batch=message(lambda: train_config.make_mesh(cfg_of("train.batch_size=12"))),
        config_devices=message(lambda: train_config.make_mesh(cfg_of("parallel.devices=16"))),
        config_divisor=message(lambda: train_config.make_mesh(cfg_of("parallel.devices=3"))),
    )


#: The guide page whose data-parallel example runs here (tests/test_guides.py leaves it out:
#: its fence is marked ``<!-- test: elsewhere tests/parallel_script.py ... -->``).
GUIDE = "docs/guides/devices.md"


def guide_entry() -> dict:
    """The devices guide's data-parallel example, run here on 8 devices; what it prints."""
    import contextlib
    import io
    import re

    text = (Path(__file__).resolve().parents[1] / GUIDE).read_text()
    marked = r"<!-- test: elsewhere tests/parallel_script\.py[^>]*-->\n```python\n(.*?)^```"
    (code,) = re.findall(marked, text, re.S | re.M)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, GUIDE, "exec"), {"__name__": "__main__"})
    return dict(printed=out.getvalue())


def main():
    # before anything starts JAX's backend (importing bptt_jax does not)
    jax.config.update("jax_num_cpu_devices", N)
    jax.config.update("jax_enable_x64", True)
    out_dir = Path(sys.argv[1])
    full = "--full" in sys.argv[2:]
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"devices": jax.device_count(), "grads": {}, "seconds": {}}

    def timed(name, f):
        t0 = time.perf_counter()
        try:
            return f()
        except Exception:  # noqa: BLE001 - recorded; the test names the failing check
            return {"error": traceback.format_exc(limit=6)[-3000:]}
        finally:
            results["seconds"][name] = round(time.perf_counter() - t0, 2)

    for i, (m, s, mode) in enumerate(grid(full)):
        key = f"{m}/{s}/{mode}"
        results["grads"][key] = timed(key, partial(grad_entry, m, s, mode, 100 + i))
    results["train"] = timed("train", train_entries)
    if not full:
        results["fit"] = timed("fit", lambda: fit_entries(out_dir))
        results["errors"] = timed("errors", error_entries)
        results["eager"] = timed("eager", eager_entries)
        results["guide"] = timed("guide", guide_entry)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
