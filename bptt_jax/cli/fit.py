"""The loop behind ``bptt-jax train``: train steps, evaluation, logs, saved states, resuming.

:func:`fit` builds everything from a checked :class:`~bptt_jax.cli.train_config.Config`,
runs the jit-compiled step of :func:`bptt_jax.train.trainer` for ``train.steps`` batches,
evaluates, writes JSON-lines records (``train.log_file``) and saves the state every
``checkpoint.every`` steps (:mod:`bptt_jax.cli.saving`); a run resumed from its newest saved
state ends with exactly the params of an uninterrupted one. :func:`divergence` says why a
finished run is not a trained model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bptt_jax import diagnostics, parallel, tasks
from bptt_jax.cli import config as config_lib
from bptt_jax.cli.train_config import (
    CheckpointConfig,
    Config,
    TrainConfig,
    build,
    make_mesh,
    trainer_of,
)
from bptt_jax.config import ConfigError
from bptt_jax.train import TrainState


class FitResult(NamedTuple):
    """What :func:`fit` returns."""

    state: TrainState  # the final state
    history: list  # the log records (dicts), as written to train.log_file (NaN there: null)
    task: Any  # the task (e.g. to sample from a char-LM)
    cell: Any  # the cell
    mesh: Any = None  # the data-parallel mesh (None: one device)


#: ``hook(step, record)`` is called with every log record (a dict of Python numbers) after
#: it is made; ``record["kind"]`` is ``"train"`` or ``"eval"``.
Hook = Callable[[int, dict], None]


#: Config keys whose change makes a checkpoint another problem: resuming is refused. The
#: active task's own table (``adding``, ``recall``, ``charlm``) is added. Other keys (the
#: optimizer's settings, TBPTT's k1 and k2, steps, logging, devices) may change on resume.
RESUME_FIXED = ("seed", "task", "model")


def resume_differences(saved: dict | None, cfg: Config) -> tuple[list[str], list[str]]:
    """``(conflicts, changed)``: the keys of ``RESUME_FIXED`` (and the task's table), then
    the optimizer's and TBPTT's, that differ between a checkpoint's saved config and ``cfg``,
    each as ``"key: saved -> now"``. Nothing when the checkpoint has no config."""
    if not isinstance(saved, dict):
        return [], []
    now = config_lib.to_dict(cfg)

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(saved), flat(now)
    fixed = (*RESUME_FIXED, cfg.task)
    reported = (*fixed, "optim", "train.k1", "train.k2")

    def differs(key):
        return key in a and a[key] != b.get(key)

    def under(key, roots):
        return any(key == r or key.startswith(r + ".") for r in roots)

    conflicts = [f"{k}: {a[k]!r} -> {b[k]!r}" for k in b if differs(k) and under(k, fixed)]
    changed = [
        f"{k}: {a[k]!r} -> {b[k]!r}"
        for k in b
        if differs(k) and under(k, reported) and not under(k, fixed)
    ]
    return conflicts, changed


def fit(
    cfg: Config,
    *,
    hooks: Sequence[Hook] = (),
    out=None,
) -> FitResult:
    """Train as ``cfg`` says: the loop behind ``bptt-jax train``.

    Deterministic given ``cfg.seed``: batch ``s`` is a function of ``(key, s)`` only, so a run
    resumed from a checkpoint (``checkpoint.dir``, ``checkpoint.resume``) ends with exactly
    the params of an uninterrupted one. Evaluates every ``train.eval_every`` steps and at the
    end; logs every ``train.log_every`` steps (progress bar, ``hooks``, ``train.log_file``).

    On several devices (``[parallel]``, all of them by default) the batch is split over them
    (:func:`bptt_jax.train.trainer` with a mesh); with several processes (``[distributed]``)
    each process runs this same loop: each draws the global batch ``s`` (the tasks' batches
    are cheap functions of ``(key, s)``) and places only its own devices' rows, so the run is
    the same whatever the number of processes. Only process 0 prints and writes the log file;
    every process calls ``hooks`` and writes its part of each checkpoint. Evaluation runs on
    each process's first device.

    The run holds ``checkpoint.dir``'s lock (:class:`bptt_jax.cli.saving.Checkpointer`) from
    start to end. Resuming skips newer steps that are corrupt or incomplete, with a warning
    line each on ``out``, restores the newest intact one (announced) and moves the skipped
    ones aside to ``<step>.corrupt-<n>``. ``train.log_file`` then holds each step once
    (:func:`_open_log`: trimmed to the resumed step, or another run's log moved aside), its
    records strict JSON (NaN and inf as ``null``).

    Raises:
      ConfigError: a bad value, naming the key, or, naming 'checkpoint.dir', a checkpoint
        to resume that does not fit the config, a directory another live run writes, or one
        whose steps are all corrupt; before any training.
      bptt_jax.cli.saving.CheckpointSaveError: (an ``OSError``) a checkpoint could not be
        written (e.g. a full disk); nothing partial of it is left.
    """
    out = sys.stdout if out is None else out
    task, cell, t = build(cfg)  # every check and the corpus read, touching no device
    mesh = make_mesh(cfg)  # connects the processes first, if there are several
    if mesh is not None:
        t = trainer_of(cfg, task, cell, mesh)
    main = parallel.is_main_process()
    tc, cc = cfg.train, cfg.checkpoint
    dtype = jnp.dtype(cfg.model.dtype)
    state = t.init(
        jax.random.key(cfg.seed), task.input_size, task.output_size, tc.batch_size, dtype
    )
    ckpt = _checkpointer(cc)
    resumed, log = False, None
    try:  # (the checkpoint directory's lock is released on any error)
        if ckpt is not None and ckpt.steps_on_disk():
            state, resumed = _resume(ckpt, state, cfg, out, main), True
        if tc.log_file and main:  # trimmed to the resumed step, or another run's set aside
            log = _open_log(tc, int(state.step) if resumed else None, out)
    except BaseException:
        if ckpt is not None:
            ckpt.close()
        raise
    start = int(state.step)
    report = _Reporter(cfg, task, cell, out, main, tuple(hooks), log)
    report.bar = _progress(tc, start, out) if main else None
    data_key = parallel.local_copy(state.key)  # the same in every process
    clock = _Clock(tc.batch_size * task.seq_len, start)
    try:
        for s in range(start, tc.steps):
            batch = _batch(task, data_key, s, tc.batch_size)  # the global batch s
            state, metrics = t.step(state, t.put_batch(batch))
            clock.window.append(metrics)
            done = s + 1
            if done % tc.log_every == 0 or done == tc.steps:
                report.train(state, batch, clock, done)
            with clock.aside():  # evaluation and checkpoints are not throughput
                if tc.eval_every and done % tc.eval_every == 0 and done != tc.steps:
                    report.evaluate(state, done)
                if ckpt is not None and cc.every and done % cc.every == 0:
                    ckpt.save(state, {"config": config_lib.to_dict(cfg)})
        report.evaluate(state, int(state.step))
        # the last state, unless saved already (by `every`, or by the run this one resumed
        # when it had nothing left to do)
        if ckpt is not None and int(state.step) not in ckpt.all_steps():
            ckpt.save(state, {"config": config_lib.to_dict(cfg)})
    finally:
        report.close()
        if ckpt is not None:
            ckpt.close()
    return FitResult(state, report.history, task, cell, mesh)


class _Clock:
    """Tokens per second of the train steps since the last record, the time set aside for
    evaluation, checkpoints and horizons left out; and the steps' metrics since then."""

    def __init__(self, tokens_per_step: int, step: int):
        self.tokens_per_step = tokens_per_step
        self.t_last, self.step_last = time.perf_counter(), step
        self.window: list[dict] = []

    @contextlib.contextmanager
    def aside(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.t_last += time.perf_counter() - t

    def lap(self, step: int) -> tuple[list[dict], float]:
        """The window's metrics (on the host) and its tokens per second; a new window."""
        host = jax.device_get(self.window)
        now = time.perf_counter()
        rate = self.tokens_per_step * (step - self.step_last) / (now - self.t_last)
        self.t_last, self.step_last, self.window = now, step, []
        return host, rate


@dataclasses.dataclass
class _Reporter:
    """Where a run's records go: the history, the log file (process 0), the hooks (every
    process), the progress bar and the lines on ``out`` (process 0)."""

    cfg: Config
    task: Any
    cell: Any
    out: Any
    main: bool
    hooks: tuple
    log: Any = None
    bar: Any = None
    history: list = dataclasses.field(default_factory=list)

    def record(self, rec: dict) -> None:
        self.history.append(rec)
        if self.log is not None:
            self.log.write(_json_line(rec) + "\n")
            self.log.flush()
        for hook in self.hooks:
            hook(rec["step"], rec)

    def train(self, state: TrainState, batch, clock: _Clock, step: int) -> None:
        """The train record of the steps since the last one (and the horizon, when due)."""
        host, rate = clock.lap(step)
        rec = _train_record(step, host, rate)
        every = self.cfg.train.horizon_every
        if every and step % every == 0:
            with clock.aside():  # not throughput either
                params, key = parallel.local_copy((state.params, state.key))
                h = int(_horizon(self.cell, params, batch.xs, key))
                rec["horizon"] = h if h >= 0 else None  # null: undefined (NaN norms)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            extra = {"horizon": rec["horizon"]} if "horizon" in rec else {}
            self.bar.set_postfix(
                loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}", **extra
            )
        self.record(rec)

    def evaluate(self, state: TrainState, step: int) -> None:
        params, readout = parallel.local_copy((state.params, state.readout))
        task = self.task
        rec = {"kind": "eval", "step": step, **task.evaluate(self.cell, params, readout)}
        if isinstance(task, tasks.CharLMTask) and task.sample_len:
            key = jax.random.fold_in(jax.random.key(self.cfg.seed + 1), step)
            rec["sample"] = task.sample(self.cell, params, readout, key)
        text = " ".join(f"{k}={v:.4g}" for k, v in rec.items() if isinstance(v, float))
        if self.main:
            _write(self.bar, self.out, f"[eval step {step}] {text}")
            if "sample" in rec:
                _write(self.bar, self.out, "sample: " + repr(rec["sample"]))
        self.record(rec)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.log is not None:
            self.log.close()


def _checkpointer(cc: CheckpointConfig):
    """The :class:`~bptt_jax.cli.saving.Checkpointer` of ``checkpoint.dir`` (``None``: no
    checkpoints), holding the directory's lock; orbax is imported only when it is asked for."""
    if not cc.dir:
        return None
    from bptt_jax.cli import saving

    try:  # the directory's lock, held until the end: one writing run at a time
        return saving.Checkpointer(cc.dir, keep=cc.keep)
    except saving.CheckpointInUse as e:
        raise ConfigError(f"config: 'checkpoint.dir': {e}") from None


def _resume(ckpt, state: TrainState, cfg: Config, out, main: bool) -> TrainState:
    """``state`` restored from the newest intact checkpoint of ``ckpt``, whose config must
    be this problem's; newer corrupt steps are moved aside, each with a warning on ``out``
    (process 0), and the resumption is announced there.

    Raises:
      ConfigError: naming 'checkpoint.dir': ``checkpoint.resume=false``, a checkpoint of
        another model or problem, or no intact step.
    """
    from bptt_jax.cli import saving

    cc, tc = cfg.checkpoint, cfg.train
    if not cc.resume:
        steps = ckpt.steps_on_disk()
        raise ConfigError(
            f"config: 'checkpoint.dir' {cc.dir!r} holds checkpoints (steps {steps}) "
            "and checkpoint.resume=false starts from step 0, whose checkpoints would be "
            "mixed with them: use another checkpoint.dir, or delete those checkpoints"
        )
    corrupt = []  # newer steps that do not restore intact: skipped, then moved aside
    try:
        state, meta = ckpt.restore(state, on_corrupt=corrupt.append)
    except saving.CheckpointMismatch as e:
        raise ConfigError(
            f"config: 'checkpoint.dir' holds a checkpoint of another model, optimizer "
            f"or batch size: {e}; use another checkpoint.dir"
        ) from None
    except saving.CheckpointCorrupt as e:
        raise ConfigError(
            f"config: 'checkpoint.dir' {cc.dir!r} holds no intact checkpoint to resume "
            f"({e}); move those step directories away, or use another checkpoint.dir"
        ) from None
    conflicts, changed = resume_differences(meta.get("config"), cfg)
    if conflicts:
        raise ConfigError(
            f"config: 'checkpoint.dir' holds a run of another problem: "
            f"{'; '.join(conflicts)} (saved -> now). Resuming it would continue that "
            "run under this config's name; use another checkpoint.dir"
        )
    for e in corrupt:  # the run continues from an older step: these are passed
        moved = ckpt.set_aside(e.step)
        if main:
            print(
                f"warning: checkpoint step {e.step} in {cc.dir} is corrupt or "
                f"incomplete ({e.reason}); skipped, moved aside to {moved.name}",
                file=out,
            )
    if main:
        newest = " (the newest intact checkpoint)" if corrupt else ""
        print(f"resumed from {cc.dir} at step {int(state.step)}{newest}", file=out)
        if changed:
            print(f"  with changed settings: {'; '.join(changed)}", file=out)
        if int(state.step) >= tc.steps:
            print(
                f"  nothing left to train: the checkpoint is at step "
                f"{int(state.step)}, train.steps is {tc.steps} (raise train.steps to "
                "train on); evaluating it",
                file=out,
            )
    return state


@partial(jax.jit, static_argnums=(0,))
def _horizon(cell, params, xs, key):
    """The effective horizon (:func:`bptt_jax.diagnostics.effective_horizon`) of the batch's
    first 8 sequences, from zero carries, with 8 random probes: about 8 backward passes
    over 8 sequences, no weight gradients. A model logs the longest of its layers' (and
    directions') horizons. ``-1`` (:data:`~bptt_jax.diagnostics.UNDEFINED_HORIZON`) when
    any is undefined (NaN or inf norms: a diverged run), which the log records as null."""
    h = diagnostics.effective_horizon(cell, params, xs[:, :8], probes=8, key=key)
    hs = jnp.stack([jnp.max(x) for x in jax.tree.leaves(h)])
    return jnp.where(jnp.any(hs < 0), diagnostics.UNDEFINED_HORIZON, jnp.max(hs))


@partial(jax.jit, static_argnums=(0, 3))
def _batch(task, key, step, batch_size):
    """``task.batch`` compiled once per (task, batch size), shared by every run in a process."""
    return task.batch(key, step, batch_size)


def _train_record(step: int, window: list[dict], tokens_per_s: float) -> dict:
    """One log record from the per-update metrics of the steps since the last record."""
    cat = {k: np.concatenate([np.ravel(m[k]) for m in window]) for k in window[0]}
    rec = {"kind": "train", "step": step}
    for k, v in cat.items():
        if k == "skipped":
            rec[k] = int(v[-1])
        elif k == "clipped":
            rec["clipped_frac"] = float(np.mean(v))
        elif k == "grad_norm":
            rec[k] = float(np.mean(v))
            rec["grad_norm_max"] = float(np.max(v))
        else:
            rec[k] = float(np.mean(v))
    rec["updates"] = int(cat["loss"].size)
    rec["tokens_per_s"] = float(tokens_per_s)
    return rec


def _json_safe(value):
    """``value`` with every non-finite float (NaN, inf) as ``None``: JSON has no NaN, and
    strict parsers reject the bare ``NaN`` that ``json.dumps`` writes by default."""
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _json_line(rec: dict) -> str:
    """One record of ``train.log_file``: strict JSON, a non-finite number as ``null``."""
    return json.dumps(_json_safe(rec), allow_nan=False)


def _open_log(tc: TrainConfig, resumed_step: int | None, out):
    """``train.log_file`` opened to append this run's records, so that it holds each step
    once and only this run's records:

    * resuming at step ``r``: the records past ``r`` (written by the run that stopped after
      its last checkpoint) are dropped, and, when there is nothing left to train
      (``r >= train.steps``), the evaluation at ``r``, which this run repeats; lines that
      do not parse (a record cut off by a kill) go too. Rewritten atomically (a temporary
      file, then ``os.replace``).
    * not resuming: a non-empty file (another run's records) is moved aside to
      ``<log_file>.<n>`` (the first free ``n``), and this run starts a new one.

    Either is announced on ``out``.

    Args:
      tc: the run's ``[train]`` table (``log_file``, ``steps``).
      resumed_step: the step the run resumed at, or ``None`` for a fresh run.
      out: where the announcement goes.

    Returns:
      The file, open for appending.
    """
    import os

    path = Path(tc.log_file).expanduser()
    if path.exists() and path.stat().st_size > 0:
        if resumed_step is None:
            n = 1
            while path.with_name(f"{path.name}.{n}").exists():
                n += 1
            old = path.with_name(f"{path.name}.{n}")
            os.rename(path, old)
            print(f"train.log_file {tc.log_file} held another run's records: moved to {old}",
                  file=out)  # fmt: skip
        else:
            kept, dropped = [], 0
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    rec = None
                if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                    dropped += bool(line.strip())
                    continue
                repeated = rec.get("kind") == "eval" and rec["step"] == resumed_step
                if rec["step"] > resumed_step or (repeated and resumed_step >= tc.steps):
                    dropped += 1
                    continue
                kept.append(line + "\n")
            if dropped:
                tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
                tmp.write_text("".join(kept), encoding="utf-8")
                os.replace(tmp, path)
                print(f"train.log_file {tc.log_file}: dropped {dropped} record(s) that this "
                      f"run, resumed at step {resumed_step}, writes again", file=out)  # fmt: skip
    return open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by fit


def divergence(result: FitResult) -> str | None:
    """Why a finished run's result is not a trained model, or ``None``: what makes
    ``bptt-jax train`` exit with status 1.

    * its final params or readout hold NaN or inf;
    * its final evaluation has a NaN or inf value (e.g. the loss);
    * with ``optim.skip_nonfinite``: every update counted in its last train record (its
      last ``train.log_every`` steps) was skipped for a non-finite gradient: the run is
      stuck, its params are the last finite ones.

    Args:
      result: what :func:`fit` returned (every process can ask: the params are replicated).

    Returns:
      One line saying which rule the run broke (naming the array or the metric), or
      ``None`` for a run whose result is finite and was still being trained at its end.
    """
    state = result.state
    params = parallel.local_copy((state.params, state.readout))
    for p, x in jax.tree_util.tree_leaves_with_path(params):
        if not np.all(np.isfinite(np.asarray(x, np.float64))):
            where = "readout" if p and getattr(p[0], "idx", None) == 1 else "params"
            return (
                f"the run diverged: the final {where} hold NaN or inf "
                f"({where}{jax.tree_util.keystr(p[1:])})"
            )
    evals = [r for r in result.history if r["kind"] == "eval"]
    if evals:
        for k, v in evals[-1].items():
            if isinstance(v, float) and not math.isfinite(v):
                return f"the run diverged: its final evaluation has {k}={v}"
    trains = [r for r in result.history if r["kind"] == "train"]
    opt = state.opt_state
    if trains and isinstance(opt, optax.ApplyIfFiniteState):
        streak = int(parallel.local_copy(opt.notfinite_count))
        if streak >= trains[-1]["updates"] > 0:
            return (
                f"the run is stuck: its last {streak} updates were all skipped for non-finite "
                "gradients (optim.skip_nonfinite); the params are the last finite ones"
            )
    return None


def _progress(tc: TrainConfig, start: int, out):
    if not tc.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=tc.steps, initial=start, file=sys.stderr, dynamic_ncols=True, unit="step")


def _write(bar, out, text: str):
    if bar is not None and out is sys.stdout:
        bar.write(text, file=out)
    else:
        print(text, file=out, flush=True)


# ---------------------------------------------------------------------------- CLI
