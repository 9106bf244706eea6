"""``bptt-jax diagnose``: gradient flow of Elman, LSTM and GRU (by default; any built-in cell by
name, the linear recurrences MinGRU, MinLSTM and RGLRU too) on the adding problem, plotted.

Each cell is diagnosed at initialisation and after a short Adam run (gradients from the
hand-written :func:`bptt_jax.loss_and_grads`) on the adding problem
(:class:`bptt_jax.tasks.AddingTask`, loss on the last step only): error and Jacobian norms
against time, the effective horizon, the spectral norms of the recurrent kernel (for a linear
recurrence, which has none, the largest ``a_t``: its step Jacobian is ``diag(a_t)``) and the
truncation bias over a sweep of k (:mod:`bptt_jax.diagnostics`); then an exploding Elman
network with and without per-step clipping of ``delta^h_t``. Writes PNG plots,
``summary.txt`` and ``summary.json`` into ``out``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import tempfile
import time
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np

from bptt_jax import losses
from bptt_jax.cells import protocol
from bptt_jax.cli import config
from bptt_jax.config import ConfigError, bounds, check_bounds
from bptt_jax.diagnostics import (
    GradientFlow,
    effective_horizon,
    gradient_flow,
    horizon_from_norms,
    spectral_norms,
    truncation_bias,
)
from bptt_jax.models import build_model
from bptt_jax.tasks import AddingTask

CellName = Literal["elman", "lstm", "gru", "mingru", "minlstm", "rglru", "lru"]
#: How the summary and the plots name each cell.
TITLES = {"elman": "Elman", "lstm": "LSTM", "gru": "GRU", "mingru": "MinGRU",
          "minlstm": "MinLSTM", "rglru": "RG-LRU", "lru": "LRU"}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Task:
    """The adding problem (:class:`bptt_jax.tasks.AddingTask`), loss on the last step only.

    Predicting the mean scores mse 1/6 ~ 0.167; doing better needs the error to reach at
    least T/2 steps back.
    """

    T: int = field(default=50, metadata=bounds(ge=2))  # sequence length
    # examples per training step and in the diagnosed batch
    batch: int = field(default=32, metadata=bounds(ge=1))


@dataclasses.dataclass(frozen=True)
class Model:
    hidden: int = field(default=32, metadata=bounds(ge=1))  # H, the same for every cell
    init: Literal["uniform", "orthogonal"] = "uniform"  # Elman, LSTM, GRU
    forget_bias: float = 1.0  # LSTM


@dataclasses.dataclass(frozen=True)
class Train:
    """The short training run between the two diagnoses: Adam on a fresh batch per step."""

    steps: int = field(default=300, metadata=bounds(ge=0))
    lr: float = field(default=0.01, metadata=bounds(gt=0))
    clip: float = field(default=1.0, metadata=bounds(gt=0))  # optax.clip_by_global_norm's
    # print loss, pre-clip gradient norm and horizon every this many steps
    log_every: int = field(default=50, metadata=bounds(ge=1))


@dataclasses.dataclass(frozen=True)
class Exploding:
    """An Elman (tanh) network with ``W_hh ~ N(0, gain^2 / H)`` (spectral radius ~ gain)."""

    gain: float = field(default=3.0, metadata=bounds(gt=0))
    # per-step clipping threshold for delta^h_t
    delta_clip: float = field(default=1.0, metadata=bounds(gt=0))


@dataclasses.dataclass(frozen=True)
class Truncation:
    # With the loss on the last step only, truncate=k sees the last chunk, T - k*((T-1)//k)
    # steps: ks that divide T keep that equal to k.
    ks: tuple[int, ...] = field(default=(1, 2, 5, 10, 25, 50), metadata=bounds(ge=1))


@dataclasses.dataclass(frozen=True)
class DiagnoseConfig:
    """Everything ``bptt-jax diagnose`` runs."""

    out: str = "results/diagnose"  # output folder: PNGs, summary.txt, summary.json
    seed: int = field(default=0, metadata=bounds(ge=0))
    cells: tuple[CellName, ...] = ("elman", "lstm", "gru")
    # the horizon threshold (see horizon_from_norms)
    fraction: float = field(default=0.01, metadata=bounds(gt=0, lt=1))
    # None (leave out): exact ||dh_T/dh_t||; else random probes
    probes: int | None = field(default=None, metadata=bounds(ge=1))
    plots: bool = True
    task: Task = Task()
    model: Model = Model()
    train: Train = Train()
    exploding: Exploding = Exploding()
    truncation: Truncation = Truncation()


def check_config(cfg: DiagnoseConfig) -> DiagnoseConfig:
    """The bounds on the fields, then what they cannot express; each :class:`ConfigError`
    names its key."""
    check_bounds(cfg)
    if not cfg.cells:
        raise ConfigError(
            f"config: 'cells' must name at least one of {', '.join(get_args(CellName))}"
        )
    if len(set(cfg.cells)) != len(cfg.cells):
        raise ConfigError(f"config: 'cells' lists a cell twice: {list(cfg.cells)}")
    if not cfg.truncation.ks:
        raise ConfigError("config: 'truncation.ks' must list at least one k")
    if len(set(cfg.truncation.ks)) != len(cfg.truncation.ks):
        raise ConfigError(f"config: 'truncation.ks' lists a k twice: {list(cfg.truncation.ks)}")
    f32_max = float(np.finfo(np.float32).max)  # the LSTM's bias is float32 here
    if not abs(cfg.model.forget_bias) <= f32_max:  # a larger value would be inf (NaN: too)
        raise ConfigError(
            f"config: 'model.forget_bias' must be a finite float32 number (|x| <= 3.4e38); "
            f"got {cfg.model.forget_bias!r}"
        )
    config.check_directory("out", cfg.out)
    for name in _out_files(cfg):
        if (Path(cfg.out).expanduser() / name).is_dir():
            raise ConfigError(
                f"config: 'out' {cfg.out!r} holds a directory {name!r} where the diagnosis "
                f"writes a file; remove it or choose another out"
            )
    # plotted as a curve over k: in increasing order
    return dataclasses.replace(
        cfg, truncation=dataclasses.replace(cfg.truncation, ks=tuple(sorted(cfg.truncation.ks)))
    )


#: The files ``bptt-jax diagnose`` writes into ``out`` (the PNGs with ``plots = true``).
SUMMARY_FILES = ("summary.txt", "summary.json")
PLOT_FILES = ("gradient_flow.png", "exploding.png", "truncation_bias.png", "training.png")


def _out_files(cfg: DiagnoseConfig) -> tuple[str, ...]:
    return SUMMARY_FILES + (PLOT_FILES if cfg.plots else ())


def _out_error(cfg: DiagnoseConfig, e: OSError, what: str) -> ConfigError:
    """A write into ``out`` that failed (read-only, not permitted, disk full), naming 'out'."""
    reason = e.strerror or str(e)
    return ConfigError(
        f"config: 'out' {cfg.out!r}: {what} failed: {reason}"
        + (f" ({e.filename})" if e.filename else "")
        + "; give a writable out=DIR"
    )


def _make_cell(name: str, model: Model):
    return build_model(name, model.hidden, forget_bias=model.forget_bias, init_scheme=model.init)


def _log(msg: str) -> None:
    print(msg, flush=True)


def _train(cell, params, readout, cfg: DiagnoseConfig, key):
    """Adam with global-norm clipping; gradients from the hand-written ``loss_and_grads``.

    Logs, every ``train.log_every`` steps, the loss, the pre-clip global gradient norm and the
    effective horizon (8 random probes on 8 examples of the current batch).
    """
    import optax

    opt = optax.chain(optax.clip_by_global_norm(cfg.train.clip), optax.adam(cfg.train.lr))
    state = opt.init((params, readout))
    task, batch = AddingTask(seq_len=cfg.task.T), cfg.task.batch

    @jax.jit
    def step(params, readout, state, k):
        b = task.sequences(k, batch)
        xs = b.xs
        out = losses.loss_and_grads(
            cell, params, readout, xs, b.targets, loss="mse", loss_mask=b.loss_mask
        )
        grads = (out.params, out.readout)
        updates, state = opt.update(grads, state, (params, readout))
        params, readout = optax.apply_updates((params, readout), updates)
        return params, readout, state, out.value, optax.global_norm(grads), xs

    horizon = jax.jit(
        lambda p, xs, k: effective_horizon(
            cell, p, xs[:, :8], fraction=cfg.fraction, probes=8, key=k
        )
    )
    history = []
    for i in range(cfg.train.steps):
        k = jax.random.fold_in(key, i)
        params, readout, state, value, gnorm, xs = step(params, readout, state, k)
        history.append(float(value))
        if (i + 1) % cfg.train.log_every == 0 or i + 1 == cfg.train.steps:
            h = int(horizon(params, xs, jax.random.fold_in(k, 1)))
            _log(
                f"    step {i + 1:4d}  loss {float(value):.4f}  "
                f"grad norm (pre-clip) {float(gnorm):.3g}  horizon {h}"
            )
    return params, readout, history


def _flow_numbers(flow: GradientFlow, fraction: float) -> dict:
    d, j = np.asarray(flow.delta_norm), np.asarray(flow.jacobian_norm)
    return {
        "loss": float(flow.value),
        "horizon": int(flow.horizon),
        "delta_horizon": int(horizon_from_norms(flow.delta_norm, fraction)),
        "delta_norm_first": float(d[0]),
        "delta_norm_last": float(d[-1]),
        "jacobian_norm_first": float(j[0]),
        "jacobian_norm_last": float(j[-1]),
        "delta_norm": d.tolist(),
        "jacobian_norm": j.tolist(),
    }


def run(cfg: DiagnoseConfig) -> dict:
    """Run every diagnosis of ``bptt-jax diagnose``; write the files; return the numbers."""
    cfg = check_config(cfg)
    out = Path(cfg.out).expanduser()
    try:  # before any work: the directory, and a file in it (root on a read-only mount too)
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise _out_error(cfg, e, "creating the directory and a file in it") from None
    key = jax.random.key(cfg.seed)
    k_eval, k_cells, k_train, k_probe, k_exp = jax.random.split(key, 5)
    batch = AddingTask(seq_len=cfg.task.T).sequences(k_eval, cfg.task.batch)
    flow_kw = dict(loss="mse", loss_mask=batch.loss_mask, fraction=cfg.fraction,
                   probes=cfg.probes, key=None if cfg.probes is None else k_probe)  # fmt: skip
    results: dict[str, Any] = {"config": config.to_dict(cfg), "cells": {}}
    _log(
        f"bptt-jax diagnose: adding problem T={cfg.task.T}, B={cfg.task.batch}, "
        f"H={cfg.model.hidden} -> {out}"
    )
    for i, name in enumerate(cfg.cells):
        keys = (jax.random.fold_in(k_cells, i), jax.random.fold_in(k_train, i))
        results["cells"][name] = _diagnose_cell(name, cfg, batch, flow_kw, keys)
    results["exploding"] = _exploding(cfg, batch, flow_kw, k_exp)

    summary = _summary_text(cfg, results)
    try:
        (out / "summary.txt").write_text(summary)
        with open(out / "summary.json", "w") as f:
            json.dump(results, f, indent=1)
        files = list(SUMMARY_FILES)
        if cfg.plots:
            files += _plot(cfg, results, out)
    except OSError as e:  # e.g. the disk filled up during the run
        raise _out_error(cfg, e, "writing the results") from None
    _log("\n" + summary)
    _log("wrote " + ", ".join(str(out / f) for f in files))
    return results


def _diagnose_cell(name: str, cfg: DiagnoseConfig, batch, flow_kw: dict, keys) -> dict:
    """One cell's numbers at initialisation and after training (``keys``: its init's and its
    training's)."""
    t0 = time.perf_counter()
    cell = _make_cell(name, cfg.model)
    kp, kr = jax.random.split(keys[0])
    params, readout = cell.init(kp, 2), losses.init_readout(kr, cfg.model.hidden, 1)
    entry: dict[str, Any] = {}
    for stage in ("init", "trained"):
        if stage == "trained":
            _log(f"  {name}: training {cfg.train.steps} steps")
            params, readout, entry["train_loss"] = _train(cell, params, readout, cfg, keys[1])
        xs, tg, lm = batch.xs, batch.targets, batch.loss_mask
        flow = gradient_flow(cell, params, readout, xs, tg, **flow_kw)
        ks = tuple(cfg.truncation.ks)
        bias = truncation_bias(cell, params, readout, xs, tg, ks=ks, loss="mse", loss_mask=lm)
        entry[stage] = e = (
            _flow_numbers(flow, cfg.fraction)
            | _recurrence_norms(cell, params, xs)
            | {
                "truncation_cosine": np.asarray(bias.cosine).tolist(),
                "truncation_norm_ratio": np.asarray(bias.norm_ratio).tolist(),
            }
        )
        norm = (
            f"max a_t {e['max_a']:.3g}"
            if e["spectral_norm"] is None
            else f"sigma_max(W_h) {e['spectral_norm']:.3g}"
        )
        _log(
            f"  {name} {stage:7s}: loss {e['loss']:.4f}  horizon {e['horizon']}  "
            f"|delta_0| {e['delta_norm_first']:.3g}  |delta_T| {e['delta_norm_last']:.3g}  "
            f"{norm}"
        )
    entry["seconds"] = round(time.perf_counter() - t0, 1)
    return entry


def _recurrence_norms(cell, params, xs) -> dict:
    """What bounds the error's flow through one step: the recurrent kernel's spectral norms
    (:func:`bptt_jax.spectral_norms`), or, for a linear recurrence (no recurrent kernel),
    ``max_a``, the largest ``a_t`` over the batch ``xs``: the spectral norm of its step
    Jacobian ``dh_t/dh_{t-1} = diag(a_t)`` (``spectral_norm`` is then ``None``)."""
    if protocol.is_linear(cell):
        (a, _), _ = cell.coefficients(params, xs)
        return {"spectral_norm": None, "spectral_norm_blocks": {}, "max_a": float(jnp.max(a))}
    spec = spectral_norms(cell, params)
    return {
        "spectral_norm": float(spec.kernel),
        "spectral_norm_blocks": {g: float(v) for g, v in spec.blocks.items()},
    }


def _exploding(cfg: DiagnoseConfig, batch, flow_kw: dict, key) -> dict:
    """The exploding Elman network's numbers, without and with per-step clipping."""
    _log(f"  exploding: Elman, W_hh ~ N(0, {cfg.exploding.gain}^2/H)")
    hid = cfg.model.hidden
    cell = build_model("elman", hid, init_scheme=cfg.model.init)
    kp, kw, kr = jax.random.split(key, 3)
    params = cell.init(kp, 2)
    w_hh = cfg.exploding.gain * jax.random.normal(kw, (hid, hid)) / math.sqrt(hid)
    params = params._replace(w_hh=w_hh)
    readout = losses.init_readout(kr, hid, 1)
    exploding: dict[str, Any] = {"spectral_norm": float(spectral_norms(cell, params).kernel)}
    for label, clip in (("no_clip", None), ("clip", cfg.exploding.delta_clip)):
        flow = gradient_flow(
            cell, params, readout, batch.xs, batch.targets, delta_clip=clip, **flow_kw
        )
        exploding[label] = e = _flow_numbers(flow, cfg.fraction)
        _log(
            f"  exploding {label:7s}: |delta_0| {e['delta_norm_first']:.3g}  "
            f"|delta_T| {e['delta_norm_last']:.3g}  horizon {e['horizon']}"
        )
    return exploding


def _summary_text(cfg: DiagnoseConfig, results: dict) -> str:
    t_len = cfg.task.T
    lines = [
        f"Gradient flow on the adding problem: T={t_len}, B={cfg.task.batch}, "
        f"H={cfg.model.hidden}, init={cfg.model.init}, {cfg.train.steps} training steps "
        f"(Adam lr={cfg.train.lr}); loss on the last step only (mse; predicting the mean: "
        "0.167).",
        f"horizon: steps back from T until ||dh_T/dh_t|| first falls below {cfg.fraction} "
        f"of its running peak ({t_len} = never, 0 = all zero, -1 = undefined: NaN or inf); "
        "delta horizon: the same for ||delta^h_t||.",
        "",
        f"{'cell':7s} {'stage':8s} {'loss':>7s} {'horizon':>8s} {'d-hor.':>7s} "
        f"{'|delta_0|':>10s} {'|delta_T|':>10s} {'sigma_max':>9s}",
    ]
    linear = []
    for name, entry in results["cells"].items():
        for stage in ("init", "trained"):
            e = entry[stage]
            norm = e["spectral_norm"]
            if norm is None:  # a linear recurrence: max a_t
                norm = e["max_a"]
                linear += [name] if stage == "init" else []
            lines.append(
                f"{name:7s} {stage:8s} {e['loss']:7.4f} {e['horizon']:8d} "
                f"{e['delta_horizon']:7d} {e['delta_norm_first']:10.3g} "
                f"{e['delta_norm_last']:10.3g} {norm:9.3g}"
            )
    lines.append("sigma_max: of the recurrent kernel W_h")
    if linear:
        lines[-1] += f"; of {', '.join(linear)} (linear recurrences, no W_h): max a_t over"
        lines.append("  the batch, the largest singular value of the step Jacobian diag(a_t)")
    ks = cfg.truncation.ks
    lines += ["", "Truncation bias of the trained models: cosine(g_k, g) / ||g_k|| / ||g||"]
    lines.append(f"{'cell':7s} " + " ".join(f"{'k=' + str(k):>11s}" for k in ks))
    for name, entry in results["cells"].items():
        e = entry["trained"]
        lines.append(
            f"{name:7s} "
            + " ".join(
                f"{c:5.2f}/{r:5.2f}"
                for c, r in zip(e["truncation_cosine"], e["truncation_norm_ratio"])
            )
        )
    ex = results["exploding"]
    lines += [
        "",
        f"Exploding: Elman tanh, W_hh ~ N(0, {cfg.exploding.gain}^2/H), "
        f"sigma_max(W_hh) = {ex['spectral_norm']:.3g}",
    ]
    for label, text in (("no_clip", "without clipping"),
                        ("clip", f"delta_clip={cfg.exploding.delta_clip}")):  # fmt: skip
        e = ex[label]
        lines.append(
            f"  {text:18s}: |delta_0| = {e['delta_norm_first']:.3g}, "
            f"|delta_T-1| = {e['delta_norm_last']:.3g}, "
            f"ratio {e['delta_norm_first'] / max(e['delta_norm_last'], 1e-30):.3g}"
        )
    return "\n".join(lines) + "\n"


COLORS = {"elman": "tab:blue", "lstm": "tab:orange", "gru": "tab:green", "mingru": "tab:red",
          "minlstm": "tab:purple", "rglru": "tab:brown", "lru": "tab:pink"}  # fmt: skip


def _plot(cfg: DiagnoseConfig, results: dict, out: Path) -> list[str]:
    """The four figures of :data:`PLOT_FILES`, written into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for draw, name in zip((_plot_flow, _plot_exploding, _plot_truncation, _plot_training),
                          PLOT_FILES):  # fmt: skip
        fig = draw(plt, cfg, results)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
    return list(PLOT_FILES)


def _plot_flow(plt, cfg: DiagnoseConfig, results: dict):
    """Error norms and Jacobian norms per cell, at init and after training."""
    t_len = cfg.task.T
    steps = np.arange(t_len)
    cells = results["cells"]
    fig, axes = plt.subplots(2, len(cells), figsize=(4.2 * len(cells), 6.4), squeeze=False)
    for col, (name, entry) in enumerate(cells.items()):
        for stage, style in (("init", "--"), ("trained", "-")):
            e = entry[stage]
            axes[0, col].semilogy(
                steps, e["delta_norm"], style, color=COLORS[name],
                label=f"{stage} (loss {e['loss']:.3f})",
            )  # fmt: skip
            axes[1, col].semilogy(
                steps, e["jacobian_norm"], style, color=COLORS[name],
                label=f"{stage}: horizon {e['horizon']}",
            )  # fmt: skip
            if e["horizon"] >= 0:  # -1: undefined (non-finite norms), no line to draw
                axes[1, col].axvline(t_len - e["horizon"], ls=style, color="gray", lw=0.8)
        axes[0, col].set_title(TITLES[name])
        axes[1, col].set_xlabel("time step t")
        for row in (0, 1):
            axes[row, col].legend(fontsize=8)
            axes[row, col].grid(True, which="major", alpha=0.3)
    axes[0, 0].set_ylabel("||delta^h_t|| = ||dL/dh_t||  (batch mean)")
    axes[1, 0].set_ylabel("||dh_T/dh_t||_F  (batch mean)")
    fig.suptitle(
        f"Error flowing back in time, adding problem T={t_len} (loss at the last step): "
        f"init (dashed) vs after {cfg.train.steps} Adam steps (solid)",
        fontsize=10,
    )
    return fig


def _plot_exploding(plt, cfg: DiagnoseConfig, results: dict):
    """The exploding case, with and without per-step clipping."""
    steps = np.arange(cfg.task.T)
    ex = results["exploding"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.semilogy(steps, ex["no_clip"]["delta_norm"], color="tab:red", label="no clipping")
    ax.semilogy(
        steps, ex["clip"]["delta_norm"], color="tab:blue",
        label=f"delta_clip={cfg.exploding.delta_clip}",
    )  # fmt: skip
    ax.axhline(cfg.exploding.delta_clip, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("time step t")
    ax.set_ylabel("||delta^h_t||  (batch mean)")
    ax.set_title(f"Exploding: Elman tanh, sigma_max(W_hh) = {ex['spectral_norm']:.2f}", fontsize=10)
    ax.legend()
    ax.grid(True, alpha=0.3)
    return fig


def _plot_truncation(plt, cfg: DiagnoseConfig, results: dict):
    """Truncation bias against k."""
    cells = results["cells"]
    ks = cfg.truncation.ks
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, entry in cells.items():
        for stage, style in (("init", "--"), ("trained", "-")):
            e = entry[stage]
            axes[0].plot(ks, e["truncation_cosine"], style + "o", ms=3, color=COLORS[name],
                         label=f"{name} {stage}")  # fmt: skip
            axes[1].plot(ks, e["truncation_norm_ratio"], style + "o", ms=3, color=COLORS[name],
                         label=f"{name} {stage}")  # fmt: skip
    axes[0].set_ylabel("cosine(g_k, g_full)")
    axes[1].set_ylabel("||g_k|| / ||g_full||")
    for ax in axes:
        ax.set_xlabel("truncation length k")
        ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Truncation bias, adding problem T={cfg.task.T}", fontsize=10)
    return fig


def _plot_training(plt, cfg: DiagnoseConfig, results: dict):
    """The training curves."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, entry in results["cells"].items():
        if entry.get("train_loss"):
            ax.semilogy(entry["train_loss"], color=COLORS[name], label=name, lw=0.8)
    ax.axhline(1 / 6, color="gray", ls=":", lw=0.8, label="predict the mean")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mse)")
    ax.legend()
    ax.grid(True, alpha=0.3)
    return fig


def add_cli_arguments(parser) -> None:
    config.add_arguments(parser, default="diagnose")


def cli_main(args) -> int:
    """``bptt-jax diagnose [CONFIG] [KEY=VALUE ...]``: 0 on success, 2 for a config error."""
    try:
        cfg = check_config(config.from_args(DiagnoseConfig, args))
    except ConfigError as e:
        print(f"bptt-jax diagnose: error: {e}", file=sys.stderr)
        return 2
    try:
        run(cfg)
    except ConfigError as e:  # 'out' could not be written
        print(f"bptt-jax diagnose: error: {e}", file=sys.stderr)
        return 2
    return 0
