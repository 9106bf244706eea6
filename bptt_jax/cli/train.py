"""``bptt-jax train CONFIG [KEY=VALUE ...]``: a model trained on a built-in task.

The config is :class:`~bptt_jax.cli.train_config.Config` (a TOML file of ``configs/`` or
any path, values overridden on the command line); the loop is :func:`bptt_jax.cli.fit.fit`.
"""

from __future__ import annotations

import sys
import time

import jax
import optax

from bptt_jax import parallel
from bptt_jax.cli import config as config_lib
from bptt_jax.cli.distributed import distributed_args
from bptt_jax.cli.fit import divergence, fit
from bptt_jax.cli.train_config import Config, build
from bptt_jax.config import ConfigError

#: ``bptt-jax train``'s exit statuses (also its ``--help``).
EXIT_STATUS = (
    "exit status: 0 a trained model; 1 the run diverged (its final params or evaluation are "
    "NaN or inf, or every update of its last train.log_every steps was skipped for a "
    "non-finite gradient) or a checkpoint could not be written (e.g. a full disk); 2 a bad "
    "config, found before any training."
)


def add_cli_arguments(parser) -> None:
    config_lib.add_arguments(parser)
    parser.epilog = EXIT_STATUS


def cli_main(args) -> int:
    """``bptt-jax train CONFIG [KEY=VALUE ...]``: the exit status of :data:`EXIT_STATUS`.

    Ends with the number of updates skipped for non-finite gradients (the whole run's,
    resumed parts included); a run that diverged (:func:`divergence`) prints why and
    returns 1. A failed save is one line (``bptt-jax train: error: ...``), status 1."""
    if args.config is None:  # (KEY=VALUE alone: the overrides of Config's defaults)
        print("bptt-jax train: error: give a config (e.g. adding, charlm, recall)", file=sys.stderr)
        return 2
    try:
        cfg = config_lib.from_args(Config, args)
        if cfg.model.dtype == "float64":  # this process's arrays: float64 needs x64 mode
            jax.config.update("jax_enable_x64", True)
        build(cfg)  # every check (and the corpus read) before any work; no device touched
        procs = distributed_args(cfg.distributed)
    except ConfigError as e:
        print(f"bptt-jax train: error: {e}", file=sys.stderr)
        return 2
    main = procs is None or not procs["process_id"]  # jax.process_index() would start JAX
    if main:
        print(
            f"bptt-jax train: task={cfg.task} cell={cfg.model.cell} H={cfg.model.hidden_size} "
            f"layers={cfg.model.num_layers}{' bidirectional' if cfg.model.bidirectional else ''}"
            f"{f' dropout={cfg.model.dropout}' if cfg.model.dropout else ''} "
            f"k1={cfg.train.k1} k2={cfg.train.k2} optim={cfg.optim.name} seed={cfg.seed}",
            flush=True,
        )
    t0 = time.perf_counter()
    try:
        result = fit(cfg)
    except ConfigError as e:  # devices, batch size or checkpoint, found before any training
        print(f"bptt-jax train: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a checkpoint that could not be saved (a full disk), the log file
        print(f"bptt-jax train: error: {e}", file=sys.stderr)
        return 1
    problem = divergence(result)
    if parallel.is_main_process():
        last = [r for r in result.history if r["kind"] == "eval"][-1]
        text = " ".join(f"{k}={v:.4g}" for k, v in last.items() if isinstance(v, float))
        where = ""
        if result.mesh is not None:
            where = f" on {result.mesh.devices.size} devices, {jax.process_count()} process(es),"
        opt = result.state.opt_state
        skipped = ""
        if isinstance(opt, optax.ApplyIfFiniteState):
            n = int(parallel.local_copy(opt.total_notfinite))
            skipped = f"; {n} update{'' if n == 1 else 's'} skipped (non-finite gradients)"
        print(
            f"done: {int(result.state.step)} steps{where} in "
            f"{time.perf_counter() - t0:.1f} s; {text}{skipped}"
        )
        if problem:
            print(f"bptt-jax train: error: {problem}", file=sys.stderr)
    return 1 if problem else 0
