"""Training with optax on the hand-written BPTT: the train step, the loop and ``bptt-jax train``.

The gradients come from :func:`bptt_jax.losses.loss_and_grads` (the hand-written backward),
never from ``jax.grad``. One jit-compiled train step takes a :class:`TrainState` and a
:class:`~bptt_jax.truncated.Batch` and returns the new state and metrics:

* **full BPTT** (``k1=None``): one update over the whole batch;
* **TBPTT(k1, k2)**: ``ceil(T / k1)`` updates over the batch's windows (exact semantics in
  :mod:`bptt_jax.truncated`), one ``lax.scan`` with the optimizer update inside.

Either way the step starts from ``state.carry`` and returns the carry after the batch's last
step, so a stream's state survives across steps (``resets`` zero it where sequences start).
The optimizer is ``optax.chain(clipping, optimizer)``, optionally inside
``optax.apply_if_finite`` so a non-finite gradient skips the update and is counted.

Example:
  >>> import jax, bptt_jax
  >>> from bptt_jax import tasks, train
  >>> task = tasks.AddingTask(seq_len=20)
  >>> t = train.trainer(bptt_jax.LSTM(16), train.OptimConfig(learning_rate=1e-2), loss="mse", k1=5)
  >>> state = t.init(jax.random.key(0), task.input_size, task.output_size, batch_size=8)
  >>> state, metrics = t.step(state, task.batch(state.key, 0, 8))
  >>> sorted(metrics), metrics["loss"].shape           # one entry per update: 20 / 5 = 4
  (['clipped', 'grad_norm', 'loss', 'skipped'], (4,))

References:
  Williams & Peng (1990) for TBPTT(k1, k2); Pascanu, Mikolov & Bengio, "On the difficulty of
  training recurrent neural networks", ICML 2013, for gradient clipping.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bptt_jax import config as config_lib
from bptt_jax import losses, parallel, precision, tasks, truncated, validation
from bptt_jax.cells import GRU, LSTM, Elman
from bptt_jax.config import ConfigError
from bptt_jax.models import Stack, is_bidirectional, stacked
from bptt_jax.models import output_size as output_size_of
from bptt_jax.parallel import DistributedConfig, ParallelConfig
from bptt_jax.truncated import Batch


# ---------------------------------------------------------------------------- configs
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The recurrent cell or model (table ``[model]``).

    ``num_layers``, ``bidirectional`` and ``dropout`` build PyTorch's ``nn.LSTM(D, H,
    num_layers, bidirectional=..., dropout=...)`` (:func:`bptt_jax.stacked`); the defaults
    are one unidirectional cell.
    """

    cell: Literal["lstm", "gru", "elman"] = "lstm"
    hidden_size: int = 128
    num_layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.0  # between layers (num_layers >= 2), during training only
    activation: Literal["tanh", "relu", "identity", "sigmoid"] = "tanh"  # elman only
    forget_bias: float = 1.0  # lstm only
    init: Literal["uniform", "orthogonal"] = "uniform"
    dtype: Literal["float32", "float64"] = "float32"
    # the precision policy (bptt_jax.precision): "bfloat16" or "float16" compute with
    # params, carries and sums in `dtype`; "" (the default): compute in `dtype`
    compute_dtype: Literal["", "bfloat16", "float16", "float32", "float64"] = ""


#: Optimizers with their own handling; any other optax alias taking ``learning_rate`` as its
#: first argument (``adamw``, ``lion``, ``nadam``, ...) is also accepted by name.
OPTIMIZERS = ("adam", "sgd", "adagrad", "rmsprop")
#: ``OptimConfig.clip``'s values.
CLIPS = ("global_norm", "value", "none")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Clipping and optimizer (table ``[optim]``)."""

    name: str = "adam"  # adam, sgd, adagrad, rmsprop, or another optax alias by name
    learning_rate: float = 1e-3
    momentum: float = 0.9  # sgd and rmsprop; 0 for none
    clip: Literal["global_norm", "value", "none"] = "global_norm"
    max_norm: float = 1.0  # global_norm: max global norm; value: max |g| per element
    # optax.apply_if_finite: skip (and count) non-finite updates; an example whose carry is
    # non-finite then restarts from zeros, so one bad batch does not poison the stream
    skip_nonfinite: bool = True
    max_consecutive_skips: int = 100  # after this many skips in a row, apply anyway


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The loop (table ``[train]``)."""

    steps: int = 1000  # train steps (batches / stream chunks)
    batch_size: int = 32
    k1: int | None = None  # None: full BPTT per batch; else TBPTT(k1, k2)
    k2: int | None = None  # backpropagation depth, >= k1; None: k1
    eval_every: int = 200  # steps between evaluations (0: only at the end)
    log_every: int = 10  # steps between progress-bar updates and log records
    progress: bool = True  # show a tqdm progress bar
    log_file: str = ""  # write the log records as JSON lines here ("" for none)
    # steps between logging the effective horizon (diagnostics.effective_horizon) with the
    # train record (at steps that are multiples of log_every too); 0: never
    horizon_every: int = 0


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints (table ``[checkpoint]``)."""

    dir: str = ""  # "" for no checkpoints
    every: int = 0  # steps between checkpoints (0: only at the end)
    keep: int = 3  # most recent checkpoints kept
    resume: bool = True  # continue the latest checkpoint in dir; false: dir must hold none


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything ``bptt-jax train`` reads; each task's settings are in its own table."""

    seed: int = 0
    task: Literal["adding", "recall", "charlm"] = "adding"
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    parallel: ParallelConfig = ParallelConfig()
    distributed: DistributedConfig = DistributedConfig()
    adding: tasks.AddingConfig = tasks.AddingConfig()
    recall: tasks.RecallConfig = tasks.RecallConfig()
    charlm: tasks.CharLMConfig = tasks.CharLMConfig()


def _optax_alias(name: str):
    """The optax optimizer ``name`` if it takes ``learning_rate`` first and its ``update``
    needs nothing but the gradients, state and params (the trainer passes no more; e.g.
    ``lbfgs`` needs the loss and its function, so it is not one); else ``None``."""
    fn = getattr(optax, name, None) if not name.startswith("_") else None
    if not callable(fn) or isinstance(fn, type):
        return None
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    if params[:1] != ["learning_rate"]:
        return None
    p = {"w": jax.ShapeDtypeStruct((2,), jnp.float32)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. noisy_sgd's note about its key
            opt = fn(1e-3)
            jax.eval_shape(lambda p: opt.update(p, opt.init(p), p), p)
    except Exception:  # noqa: BLE001 - any failure to trace one update: not usable here
        return None
    return fn


def check_optim(o: OptimConfig) -> None:
    """An :class:`OptimConfig`'s values; ``ConfigError`` (a ``ValueError``) naming the key.

    :func:`make_optimizer` runs it, so a config built in Python is checked as a file is."""
    for key, value in (
        ("optim.learning_rate", o.learning_rate),
        ("optim.max_norm", o.max_norm),
        ("optim.max_consecutive_skips", o.max_consecutive_skips),
    ):
        config_lib.positive(key, value)
    if not 0 <= o.momentum < 1:  # NaN too
        raise ConfigError(
            f"config: 'optim.momentum' must be in [0, 1) (0: none; a momentum of 1 or more "
            f"never forgets a gradient and diverges); got {o.momentum!r}"
        )
    for key, value in (("optim.learning_rate", o.learning_rate), ("optim.max_norm", o.max_norm)):
        if not math.isfinite(value):
            raise ConfigError(f"config: '{key}' must be a finite number; got {value!r}")
    if o.clip not in CLIPS:
        raise ConfigError(f"config: 'optim.clip' must be one of {', '.join(CLIPS)}; got {o.clip!r}")
    if o.name not in OPTIMIZERS and _optax_alias(o.name) is None:
        raise ConfigError(
            f"config: 'optim.name' must be one of {', '.join(OPTIMIZERS)} or an optax "
            f"optimizer taking learning_rate whose update needs only the gradients (e.g. "
            f"adamw, lion; not lbfgs); got {o.name!r}"
        )


def _check_paths(cfg: Config) -> None:
    """``checkpoint.dir`` can be a directory and ``train.log_file`` a file, before any work:
    otherwise the first save (at the end of training) or the log would fail after it."""
    if cfg.checkpoint.dir:
        config_lib.check_directory("checkpoint.dir", cfg.checkpoint.dir)
    f = cfg.train.log_file
    if f:
        path = Path(f).expanduser()
        if path.is_dir():
            raise ConfigError(f"config: 'train.log_file' {f!r} is a directory; give a file name")
        if not path.parent.is_dir():
            raise ConfigError(
                f"config: 'train.log_file' {f!r}: its directory {str(path.parent)!r} does not exist"
            )


#: Largest seed + 1: ``jax.random.key`` keeps 32 bits of a seed (without x64), so larger or
#: negative seeds would collide with others.
SEED_BOUND = 2**32


def check_config(cfg: Config) -> None:
    """Range and consistency checks beyond types; ``ConfigError`` naming the key."""
    t, m, o, c = cfg.train, cfg.model, cfg.optim, cfg.checkpoint
    if not 0 <= cfg.seed < SEED_BOUND:
        raise ConfigError(
            f"config: 'seed' must be in [0, 2**32) (JAX keeps 32 bits of a seed); got {cfg.seed}"
        )
    for key, value in (
        ("model.hidden_size", m.hidden_size),
        ("train.batch_size", t.batch_size),
        ("train.log_every", t.log_every),
        ("checkpoint.keep", c.keep),
    ):
        config_lib.positive(key, value)
    for key, value in (
        ("train.steps", t.steps),
        ("train.eval_every", t.eval_every),
        ("train.horizon_every", t.horizon_every),
        ("checkpoint.every", c.every),
    ):
        config_lib.positive(key, value, allow_zero=True)
    check_optim(o)
    fmax = float(np.finfo(np.float64 if m.dtype == "float64" else np.float32).max)
    if not abs(m.forget_bias) <= fmax:  # NaN too; beyond the params' dtype it would be inf
        raise ConfigError(
            f"config: 'model.forget_bias' must be a finite number that model.dtype "
            f"({m.dtype}) holds, |x| <= {fmax:.3g}; got {m.forget_bias}"
        )
    if m.dtype == "float64" and not jax.config.jax_enable_x64:
        raise ConfigError(
            "config: 'model.dtype' float64 needs JAX's 64-bit mode, which is off: JAX would "
            "make every array float32, silently (`bptt-jax train` turns it on for float64; "
            "in Python: jax.config.update('jax_enable_x64', True) before creating arrays)"
        )
    _check_paths(cfg)
    for key, k in (("train.k1", t.k1), ("train.k2", t.k2)):
        if k is not None and k <= 0:
            raise ConfigError(f"config: '{key}' must be a positive int (or none); got {k}")
    if t.k1 is None and t.k2 is not None:
        raise ConfigError("config: 'train.k2' needs 'train.k1' (TBPTT(k1, k2)); set train.k1")
    if t.k1 is not None and t.k2 is not None and t.k1 > t.k2:
        raise ConfigError(
            f"config: 'train.k1' ({t.k1}) must be <= 'train.k2' ({t.k2}): each update "
            "backpropagates k2 >= k1 steps"
        )
    if c.every and not c.dir:
        raise ConfigError("config: 'checkpoint.every' needs 'checkpoint.dir'")
    if m.num_layers < 1:
        raise ConfigError(f"config: 'model.num_layers' must be a positive int; got {m.num_layers}")
    if m.compute_dtype and jnp.dtype(m.compute_dtype).itemsize > jnp.dtype(m.dtype).itemsize:
        raise ConfigError(
            f"config: 'model.compute_dtype' ({m.compute_dtype}) must be no wider than "
            f"'model.dtype' ({m.dtype}): the policy computes in it and keeps params in dtype"
        )
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"config: 'model.dropout' must be in [0, 1); got {m.dropout!r}")
    if m.dropout and m.num_layers == 1:
        raise ConfigError(
            f"config: 'model.dropout' ({m.dropout}) applies between layers; with "
            "model.num_layers=1 it would do nothing (set model.num_layers >= 2 or dropout=0)"
        )
    if m.bidirectional and t.k1 is not None:
        raise ConfigError(
            "config: 'train.k1' (TBPTT) is undefined for a bidirectional model (its reverse "
            "direction needs the whole future); set model.bidirectional=false or train.k1=none"
        )
    if cfg.parallel.devices < 0:
        raise ConfigError(
            f"config: 'parallel.devices' must be >= 0 (0: all devices); got {cfg.parallel.devices}"
        )
    if not cfg.parallel.axis:
        raise ConfigError("config: 'parallel.axis' must be a non-empty mesh axis name")
    parallel.distributed_args(cfg.distributed)  # every value, the environment's too
    if m.bidirectional and cfg.task != "adding":
        raise ConfigError(
            f"config: 'model.bidirectional' needs a task of independent sequences (adding); "
            f"task {cfg.task!r} is a carried stream, undefined for a reverse direction"
        )
    check_sizes(cfg)


#: Most layers a config may stack. The train step is traced and compiled layer by layer (each
#: layer's scans are their own code in the program), and XLA's compile time grows faster than
#: linearly with them: 9 s at 50 layers, 116 s at 200 (LSTM, H = 4, on a 2-core CPU), so 1000
#: layers would compile for over half an hour with no output, and 100000 for days. Stacks in
#: use have tens of layers.
MAX_LAYERS = 1000

#: Per built-in cell: gate blocks (kernel columns per H), bias vectors of G*H, carry parts
#: (B, H) and the (B, H) blocks its hand-written backward stores per step beside the carry
#: (the largest of its gate, residual and gradient blocks: the engine writes them in place).
_CELL_SIZES = {"elman": (1, 1, 1, 1), "lstm": (4, 1, 2, 4), "gru": (3, 2, 1, 4)}


class Footprint(NamedTuple):
    """:func:`footprint`'s estimate in bytes, each part with the config keys it grows with."""

    params: int  # params and readout, their gradient and the optimizer's state
    step: int  # one train step: the batch (and its TBPTT windows), logits, stored states
    evaluation: int  # one evaluation: the test inputs, every layer's outputs, the logits
    keys: dict  # "params" / "step" / "evaluation" -> the keys that part grows with

    @property
    def total(self) -> int:
        """``params + max(step, evaluation)`` (a train step and an evaluation do not overlap):
        a lower bound of the run's peak memory (XLA's scratch comes on top)."""
        return self.params + max(self.step, self.evaluation)


def _optimizer_slots(o: OptimConfig) -> int:
    """Arrays the size of the params in the optimizer's state (adam: 2, sgd with momentum:
    1), read off an abstract ``init`` (no device, no memory)."""
    n = 1 << 12
    state = jax.eval_shape(make_optimizer(o).init, jax.ShapeDtypeStruct((n,), jnp.float32))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state)) // n


def footprint(cfg: Config) -> Footprint:
    """The memory a run of ``cfg`` needs at least, from its sizes alone (no task built, no
    device touched), in bytes:

    * params: the cell's or model's params and the readout (exact for the built-in cells),
      times 2 + the optimizer's slots (the gradient; adam's two moments);
    * step: one train step's batch (inputs, targets, flags; with TBPTT also cut into its
      ``ceil(T/k1)`` windows of k2 steps), the logits and their error, and what the
      hand-written backward stores per step (every cell's carry and gate blocks, T steps,
      or k2 with TBPTT), in the compute dtype;
    * evaluation: the test set's inputs, every layer's outputs and the logits.

    For ``charlm`` the vocabulary is the corpus's, unknown before it is read: counted as 2.
    :func:`check_sizes` refuses a config whose :attr:`Footprint.total` exceeds the memory.
    Call it on a config whose task table is checked (:func:`bptt_jax.tasks.check_task_config`).
    """
    m, t, name = cfg.model, cfg.train, cfg.task
    tc = getattr(cfg, name)
    item = np.dtype(m.dtype).itemsize
    citem = np.dtype(m.compute_dtype or m.dtype).itemsize
    if name == "adding":
        d, o, xent, t_eval, b_eval = 2, 1, False, tc.seq_len, tc.test_size
        io_keys, eval_keys = (), ("adding.seq_len", "adding.test_size")
    elif name == "recall":
        d, o, xent, t_eval, b_eval = tc.alphabet, tc.alphabet, True, tc.test_len, tc.test_size
        io_keys, eval_keys = ("recall.alphabet",), ("recall.test_len", "recall.test_size")
    else:  # charlm: one-hot over the corpus's characters, at least 2
        d, o, xent, t_eval, b_eval = 2, 2, True, tc.eval_len, tc.eval_streams
        io_keys, eval_keys = (), ("charlm.eval_len", "charlm.eval_streams")
    gates, biases, carry, stored = _CELL_SIZES[m.cell]
    h, layers, dirs = m.hidden_size, m.num_layers, 1 + m.bidirectional
    b, seq = t.batch_size, tc.seq_len
    f = dirs * h  # features out of every layer (a bidirectional one concatenates both)

    def cell(d_in):
        return gates * h * (d_in + h) + biases * gates * h

    n_params = dirs * (cell(d) + (layers - 1) * cell(f)) + f * o + o
    params = n_params * item * (2 + _optimizer_slots(cfg.optim))
    if t.k1 is None:
        stored_steps, cut_steps = seq, 0
    else:
        stored_steps = t.k2 or t.k1
        cut_steps = -(-seq // t.k1) * stored_steps  # the (N, k2) windows cut from the batch
    per_example_step = (d * item) + (4 if xent else o * item) + 3  # inputs, targets, 3 flags
    step = (
        (seq + cut_steps) * b * per_example_step
        + 2 * stored_steps * b * o * item  # logits and their error
        + stored_steps * b * (layers * dirs * h * (carry + stored) + o) * citem
    )
    evaluation = t_eval * b_eval * (d + o + layers * f) * item
    model_keys = ("model.hidden_size", "model.num_layers", *io_keys)
    steps_keys = (f"{name}.seq_len", *(("train.k2",) if t.k1 is not None else ()))
    keys = {
        "params": model_keys,
        "step": ("train.batch_size", *steps_keys, *model_keys),
        "evaluation": (*eval_keys, *model_keys),
    }
    return Footprint(int(params), int(step), int(evaluation), keys)


def _size_text(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if n < 1024 or unit == "EiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


def check_sizes(cfg: Config) -> None:
    """Sizes that cannot run, before any work; ``ConfigError`` naming the key.

    The task's table (:func:`bptt_jax.tasks.check_task_config`); ``train.k1`` no longer
    than the task's ``seq_len`` (each train step's sequence: a longer window is padding
    only, the same updates as ``k1 = seq_len`` at many times the cost); at most
    :data:`MAX_LAYERS` layers; and :func:`footprint`'s total within the machine's memory
    (:func:`bptt_jax.config.available_memory`: host RAM; a device with less memory than
    that is not asked, which would start JAX's backend).
    """
    if cfg.task not in tasks.TASKS or cfg.model.cell not in _CELL_SIZES:
        return  # named by make_task / the schema
    tasks.check_task_config(cfg.task, getattr(cfg, cfg.task))
    t, m = cfg.train, cfg.model
    seq = getattr(cfg, cfg.task).seq_len
    if t.k1 is not None and t.k1 > seq:
        raise ConfigError(
            f"config: 'train.k1' ({t.k1}) must be <= '{cfg.task}.seq_len' ({seq}), the steps "
            f"of each train step: a TBPTT window past them is padding only (the same updates "
            f"as train.k1={seq}, over {-(-(t.k2 or t.k1) // seq)}x the steps); set "
            f"train.k1={seq} or less, or train.k1=none for full BPTT per batch"
        )
    if m.num_layers > MAX_LAYERS:
        raise ConfigError(
            f"config: 'model.num_layers' must be <= {MAX_LAYERS}; got {m.num_layers} (the "
            f"train step is compiled layer by layer, in time that grows faster than the "
            f"layers: 116 s at 200 layers on a 2-core CPU)"
        )
    available = config_lib.available_memory()
    fp = footprint(cfg)
    if available is None or fp.total <= available:
        return
    part = max(("params", "step", "evaluation"), key=lambda k: getattr(fp, k))
    flat = _flat(config_lib.to_dict(cfg))
    default = _flat(config_lib.to_dict(Config()))
    default["train.k2"] = seq  # a window's steps, against the sequence's
    flat["train.k2"] = t.k2 or t.k1

    def excess(key):  # how many times its default the value is
        return flat[key] / max(default[key], 1)

    key = max(fp.keys[part], key=excess)
    what = {
        "params": "the params with their gradient and the optimizer's state",
        "step": "one train step's batch and the states stored for its backward",
        "evaluation": "the evaluation's test set and outputs",
    }[part]
    listing = ", ".join(f"{k}={flat[k]}" for k in fp.keys[part])
    raise ConfigError(
        f"config: '{key}' = {flat[key]} makes the run too big for this machine: it needs at "
        f"least {_size_text(fp.total)} of memory, {what} {_size_text(getattr(fp, part))} "
        f"({listing}), and the machine has {_size_text(available)}; reduce '{key}'"
    )


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ---------------------------------------------------------------------------- pieces
def make_cell(cfg: ModelConfig):
    """The cell, or the model (:func:`bptt_jax.stacked`), of a :class:`ModelConfig`."""
    if cfg.cell == "lstm":
        cell = LSTM(cfg.hidden_size, forget_bias=cfg.forget_bias, init_scheme=cfg.init)
    elif cfg.cell == "gru":
        cell = GRU(cfg.hidden_size, init_scheme=cfg.init)
    else:
        cell = Elman(cfg.hidden_size, cfg.activation, init_scheme=cfg.init)
    if cfg.num_layers == 1 and not cfg.bidirectional:
        return cell
    return stacked(cell, cfg.num_layers, bidirectional=cfg.bidirectional, dropout=cfg.dropout)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """``[apply_if_finite](chain(clip, optimizer))`` from an :class:`OptimConfig`.

    Clipping: ``"global_norm"`` rescales the whole gradient to global norm ``<= max_norm``
    (Pascanu et al. 2013); ``"value"`` clips every element to ``[-max_norm, max_norm]``;
    ``"none"``. Optimizer: ``adam``, ``sgd`` (with ``momentum``), ``adagrad``, ``rmsprop``
    (with ``momentum``), or any optax alias taking ``learning_rate`` first, by name.

    Example:
      >>> from bptt_jax.train import OptimConfig, make_optimizer
      >>> tx = make_optimizer(OptimConfig(name="sgd", learning_rate=0.1, clip="value"))
    """
    check_optim(cfg)
    lr, mom = cfg.learning_rate, (cfg.momentum or None)
    if cfg.name == "adam":
        opt = optax.adam(lr)
    elif cfg.name == "sgd":
        opt = optax.sgd(lr, momentum=mom)
    elif cfg.name == "adagrad":
        opt = optax.adagrad(lr)
    elif cfg.name == "rmsprop":
        opt = optax.rmsprop(lr, momentum=mom)
    else:
        alias = _optax_alias(cfg.name)
        if alias is None:
            raise ValueError(f"make_optimizer: unknown optimizer name {cfg.name!r}")
        opt = alias(lr)
    clip = {
        "global_norm": lambda: optax.clip_by_global_norm(cfg.max_norm),
        "value": lambda: optax.clip(cfg.max_norm),
        "none": optax.identity,
    }[cfg.clip]()
    tx = optax.chain(clip, opt)
    if cfg.skip_nonfinite:
        tx = optax.apply_if_finite(tx, cfg.max_consecutive_skips)
    return tx


class TrainState(NamedTuple):
    """Everything a run needs to continue exactly: what a checkpoint holds."""

    params: Any  # the cell's params (ElmanParams / LSTMParams / GRUParams), or a model's
    readout: losses.ReadoutParams  # the output layer (w_hy (F, O), b_y (O,))
    opt_state: Any  # optax state of the pair (params, readout)
    carry: Any  # (B, H), LSTMCarry or a model's: the carry entering the next batch
    step: jax.Array  # int32 (): train steps (batches) done
    key: jax.Array  # PRNG key of the run's data: batch s is drawn from (key, s)


def skipped_updates(opt_state) -> jax.Array:
    """Total updates skipped by ``optax.apply_if_finite`` (0 without it)."""
    if isinstance(opt_state, optax.ApplyIfFiniteState):
        return opt_state.total_notfinite
    return jnp.zeros((), jnp.int32)


#: Folded into the run's key for the dropout masks (batch s: then folded with s).
DROPOUT_STREAM = 0x0D50

#: ``metrics_fn(params, readout, window, lg) -> dict`` adds metrics computed inside the jitted
#: step, per update, from the params before the update, the update's window (a
#: :class:`~bptt_jax.truncated.Batch`) and its :class:`~bptt_jax.losses.LossAndGrads`.
MetricsFn = Callable[[Any, Any, Batch, losses.LossAndGrads], dict]


class Trainer(NamedTuple):
    """What :func:`trainer` returns."""

    tx: optax.GradientTransformation  # the optimizer (clipping included)
    init: Callable[..., TrainState]  # init(key, input_size, output_size, batch_size, dtype)
    step: Callable[[TrainState, Batch], tuple[TrainState, dict]]  # jit-compiled
    mesh: jax.sharding.Mesh | None = None  # data parallelism: the batch split along data_axis
    data_axis: str = "data"

    def put_batch(self, batch: Batch) -> Batch:
        """A global batch ``(T, B, ...)`` split along ``B`` over the mesh (unchanged without
        one); each process places only its own devices' rows (:func:`parallel.put_global`)."""
        if self.mesh is None:
            return batch
        b = np.shape(batch.xs)[1]
        parallel.check_batch_size("Trainer.put_batch", "batch.xs.shape[1] (B)", b, self.mesh,
                                  self.data_axis)  # fmt: skip
        return parallel.put_global(batch, parallel.batch_sharding(self.mesh, self.data_axis))

    def state_sharding(self) -> TrainState | None:
        """The :class:`TrainState` of shardings (a prefix of the state): every field
        replicated but ``carry``, split along its batch axis; ``None`` without a mesh."""
        return None if self.mesh is None else _state_sharding(self.mesh, self.data_axis)


def _state_sharding(mesh, axis: str) -> TrainState:
    rep = parallel.replicated(mesh)
    return TrainState(rep, rep, rep, parallel.carry_sharding(mesh, axis), rep, rep)


def trainer(
    cell,
    optim: OptimConfig = OptimConfig(),
    *,
    loss: str = "xent",
    reduction: str = "mean",
    k1: int | None = None,
    k2: int | None = None,
    metrics_fn: MetricsFn | None = None,
    mesh: jax.sharding.Mesh | None = None,
    data_axis: str = "data",
    compute_dtype=None,
) -> Trainer:
    """A jit-compiled train step for full BPTT (``k1=None``) or TBPTT(k1, k2).

    ``step(state, batch) -> (state, metrics)`` runs from ``state.carry`` over the batch
    ``(T, B, ...)``: one update (full BPTT) or ``ceil(T / k1)`` (TBPTT), each from the
    hand-written gradients of :func:`bptt_jax.losses.loss_and_grads`. ``metrics`` is a dict
    of ``(U,)`` arrays, one entry per update ``U``:

    * ``loss``: the update's loss (before the update);
    * ``grad_norm``: the global norm of its gradient, before clipping;
    * ``clipped``: whether clipping changed the gradient;
    * ``skipped``: total updates skipped so far by ``apply_if_finite`` (with
      ``optim.skip_nonfinite``; then an example whose carry came out non-finite also
      restarts from zeros, so one bad batch does not poison the rest of its stream);
    * whatever ``metrics_fn`` adds.

    A bidirectional model trains on independent sequences: every batch starts from the zero
    carry and ``batch.resets`` is not used (a carried stream is undefined for it), and TBPTT
    raises. A :class:`~bptt_jax.Stack` with dropout draws batch s's masks (window j's with
    TBPTT) from ``state.key``, ``s`` (and ``j``), so runs stay deterministic.

    **Data parallelism** (``mesh``): the batch is split along ``B`` over the devices of the
    mesh's ``data_axis`` (:mod:`bptt_jax.parallel`), params, readout and optimizer state
    are replicated, and ``state.carry`` is split like the batch, so a stream's carry stays
    on the device of its examples from step to step. ``init`` places the state so and
    ``step`` is compiled with these shardings as its inputs' and outputs'; each device runs
    the scans over its own ``B / n`` examples and each gradient is summed over the devices
    once per update. The results are the single-device step's, up to the order of that sum.
    Give the step a batch placed by :meth:`Trainer.put_batch`.

    Args:
      cell: the cell or model (:class:`~bptt_jax.Stack`, :class:`~bptt_jax.Bidirectional`).
      optim: clipping and optimizer (:func:`make_optimizer`).
      loss, reduction: as in :func:`bptt_jax.sequence_loss` (per update).
      k1, k2: ``None`` for full BPTT, else TBPTT(k1, k2) (``k2=None``: k1).
      metrics_fn: extra per-update metrics (see :data:`MetricsFn`).
      mesh: a ``jax.sharding.Mesh`` with an axis ``data_axis`` (e.g.
        :func:`bptt_jax.parallel.data_mesh`), or ``None`` for one device.
      data_axis: the mesh axis the batch is split along.
      compute_dtype: a precision policy (:mod:`bptt_jax.precision`), e.g. ``"bfloat16"``:
        the forward and backward compute in it while the params (the optimizer's master
        weights), carries and gradient sums stay in the params' dtype.

    Raises:
      ValueError: ``k1``/``k2`` not positive or ``k1 > k2`` (naming the argument); TBPTT for
        a bidirectional model; a mesh without ``data_axis``; with a mesh, a batch size (of
        ``init`` or of the step's batch) not divisible by the devices along ``data_axis``.
    """
    validation.check_model("trainer", cell, "cell")  # a cell of your own must be hashable
    validation.check_choice("trainer", "loss", loss, losses.LOSSES)
    validation.check_choice("trainer", "reduction", reduction, losses.REDUCTIONS)
    if metrics_fn is not None and not callable(metrics_fn):
        raise TypeError(f"trainer: metrics_fn must be callable or None; got {metrics_fn!r}")
    if k1 is not None:
        k1, k2 = truncated.check_k1_k2("trainer", k1, k2)
        if is_bidirectional(cell):
            raise ValueError(
                f"trainer: TBPTT (k1={k1}) is undefined for a bidirectional model (its reverse "
                "direction needs the whole future); use k1=None (full BPTT)"
            )
    elif k2 is not None:
        raise ValueError("trainer: k2 needs k1 (TBPTT(k1, k2)); got k1=None")
    if mesh is not None:
        parallel.axis_size("trainer", mesh, data_axis)
    if compute_dtype is not None:  # a floating dtype; checked against the params' at step 1
        precision.resolve("trainer", compute_dtype, jnp.float64)
        compute_dtype = jnp.dtype(compute_dtype).name
    return _trainer(
        cell, optim, loss, reduction, k1, k2, metrics_fn, mesh, data_axis, compute_dtype
    )


@lru_cache(maxsize=32)
def _trainer(
    cell, optim, loss, reduction, k1, k2, metrics_fn, mesh, data_axis, compute_dtype
) -> Trainer:
    """:func:`trainer`, cached: equal arguments share one compiled step (cells and configs
    are frozen dataclasses, so equal settings hash equal)."""
    tx = make_optimizer(optim)

    def make_state(key, input_size: int, output_size: int, batch_size: int, dtype=jnp.float32):
        k_cell, k_ro, k_data = jax.random.split(key, 3)
        params = cell.init(k_cell, input_size, dtype)
        readout = losses.init_readout(k_ro, output_size_of(cell), output_size, dtype)
        return TrainState(
            params=params,
            readout=readout,
            opt_state=tx.init((params, readout)),
            carry=cell.zero_carry(batch_size, dtype),
            step=jnp.zeros((), jnp.int32),
            key=k_data,
        )

    if mesh is None:
        init = make_state
    else:
        state_sharding = _state_sharding(mesh, data_axis)

        @partial(jax.jit, static_argnums=(1, 2, 3, 4, 5), out_shardings=state_sharding)
        def init_on_mesh(key_data, impl, input_size, output_size, batch_size, dtype):
            key = jax.random.wrap_key_data(key_data, impl=impl)
            return make_state(key, input_size, output_size, batch_size, dtype)

        def init(key, input_size: int, output_size: int, batch_size: int, dtype=jnp.float32):
            parallel.check_batch_size("trainer.init", "batch_size", batch_size, mesh, data_axis)
            # the key as host data: the same in every process, an input of the mesh program
            key_data = np.asarray(jax.random.key_data(key))
            impl = jax.random.key_impl(key)
            return init_on_mesh(
                key_data, impl, input_size, output_size, batch_size, jnp.dtype(dtype)
            )

    def update(opt_state, params, readout, lg, window):
        grads = (lg.params, lg.readout)
        norm = optax.tree.norm(grads)
        if optim.clip == "global_norm":
            clipped = norm > optim.max_norm
        elif optim.clip == "value":
            leaves = jax.tree.leaves(grads)
            clipped = jnp.any(jnp.stack([jnp.any(jnp.abs(g) > optim.max_norm) for g in leaves]))
        else:
            clipped = jnp.zeros((), bool)
        updates, opt_state = tx.update(grads, opt_state, (params, readout))
        new_params, new_readout = optax.apply_updates((params, readout), updates)
        metrics = {
            "loss": lg.value,
            "grad_norm": norm,
            "clipped": clipped,
            "skipped": skipped_updates(opt_state),
        }
        if metrics_fn is not None:
            extra = metrics_fn(params, readout, window, lg)
            if not isinstance(extra, dict):
                raise TypeError(
                    f"trainer: metrics_fn must return a dict of metrics; got {type(extra).__name__}"
                )
            taken = sorted(set(extra) & set(metrics))
            if taken:
                raise ValueError(
                    f"trainer: metrics_fn returns {taken}, the trainer's own metrics' names; "
                    "name yours otherwise"
                )
            metrics.update(extra)
        return opt_state, new_params, new_readout, metrics

    bidirectional = is_bidirectional(cell)
    dropout = isinstance(cell, Stack) and cell.dropout > 0

    def step(state: TrainState, batch: Batch):
        resets = None if bidirectional else batch.resets
        common = dict(mask=batch.mask, loss_mask=batch.loss_mask, resets=resets)
        dkey = None
        if dropout:  # its own stream, apart from the data's (key, s)
            dkey = jax.random.fold_in(jax.random.fold_in(state.key, DROPOUT_STREAM), state.step)
        if k1 is None:
            lg = losses.loss_and_grads(
                cell,
                state.params,
                state.readout,
                batch.xs,
                batch.targets,
                None if bidirectional else state.carry,
                loss=loss,
                reduction=reduction,
                dropout_key=dkey,
                compute_dtype=compute_dtype,
                **common,
            )
            opt_state, params, readout, metrics = update(
                state.opt_state, state.params, state.readout, lg, batch
            )
            carry = lg.carry
            metrics = jax.tree.map(lambda x: x[None], metrics)
        else:
            out = truncated.tbptt(
                cell,
                state.params,
                state.readout,
                batch.xs,
                batch.targets,
                state.carry,
                k1=k1,
                k2=k2,
                update=update,
                update_state=state.opt_state,
                loss=loss,
                reduction=reduction,
                dropout_key=dkey,
                compute_dtype=compute_dtype,
                **common,
            )
            opt_state, params, readout, carry, metrics = out
        if optim.skip_nonfinite:  # a skipped update's NaN carry would poison the stream
            carry = _reset_nonfinite_rows(carry)
        new = TrainState(params, readout, opt_state, carry, state.step + 1, state.key)
        return new, metrics

    if mesh is None:
        return Trainer(tx, init, _CheckedStep(jax.jit(step), None, data_axis, loss, bidirectional))
    shardings = (_state_sharding(mesh, data_axis), parallel.batch_sharding(mesh, data_axis))
    step_on_mesh = jax.jit(
        step, in_shardings=shardings, out_shardings=(shardings[0], parallel.replicated(mesh))
    )
    checked_step = _CheckedStep(step_on_mesh, mesh, data_axis, loss, bidirectional)
    return Trainer(tx, init, checked_step, mesh, data_axis)


def _reset_nonfinite_rows(carry):
    """``carry`` with every example (row) that holds a non-finite value anywhere reset to
    zeros, as a stream's reset would: the rest of the stream stays finite."""
    leaves = jax.tree.leaves(carry)
    if not leaves:
        return carry
    bad = jnp.zeros(leaves[0].shape[:1], bool)
    for x in leaves:
        bad = bad | ~jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1)
    return jax.tree.map(
        lambda x: jnp.where(bad.reshape((-1,) + (1,) * (x.ndim - 1)), jnp.zeros_like(x), x), carry
    )


class _CheckedStep(NamedTuple):
    """The jitted train step behind the checks that need the batch's values or its placement:
    with a mesh, the batch's size (else jit's placement would fail first, without naming
    it); when the batch is host (NumPy) data, the values of its masks (0/1; a bidirectional
    model's ``mask`` right-padded) and, for ``loss="xent"``, targets in ``[0, O)`` where
    counted (inside ``jit`` each is unseen: a silently wrong gradient, or a NaN loss and a
    skipped update). Device arrays are not read back (that would wait for the device at
    every step): ``bptt_jax.checked(trainer.step)`` checks them in the compiled step."""

    jitted: Any  # jax.jit(step[, in_shardings=..., out_shardings=...])
    mesh: jax.sharding.Mesh | None
    axis: str
    loss: str
    bidirectional: bool = False

    def _check(self, state: TrainState, batch: Batch) -> None:
        fn = "trainer.step"
        if self.mesh is not None:
            b = np.shape(batch.xs)[1]
            parallel.check_batch_size(fn, "batch.xs.shape[1] (B)", b, self.mesh, self.axis)
        for name in ("mask", "loss_mask", "resets"):
            m = getattr(batch, name)
            if isinstance(m, np.ndarray) and m.ndim == 2:  # (other shapes: the step says)
                if m.dtype != np.bool_:
                    validation.check_flag_values(fn, f"batch.{name}", m)
                if name == "mask" and self.bidirectional:
                    validation.check_right_padded(fn, m != 0)
        masks = [m for m in (batch.mask, batch.loss_mask) if m is not None]
        host = all(isinstance(a, np.ndarray) for a in (batch.targets, *masks))
        if self.loss == "xent" and host and np.issubdtype(batch.targets.dtype, np.integer):
            valid = np.logical_and.reduce([m != 0 for m in masks]) if masks else None
            o = np.shape(state.readout.w_hy)[-1]
            validation.check_class_range("trainer.step", "batch.targets", batch.targets, o, valid)

    def __call__(self, state: TrainState, batch: Batch):
        self._check(state, batch)
        return self.jitted(state, batch)

    def lower(self, state: TrainState, batch: Batch):
        """``jax.jit``'s ``lower`` (e.g. ``.compile().as_text()`` to read the program)."""
        self._check(state, batch)
        return self.jitted.lower(state, batch)


# ---------------------------------------------------------------------------- the loop
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


def build(cfg: Config, mesh: jax.sharding.Mesh | None = None):
    """Check ``cfg`` and build ``(task, cell, trainer)``: every error before any work.

    Touches no device (so ``jax.distributed`` can still start after it); ``mesh`` (from
    :func:`make_mesh`) makes the trainer data-parallel.
    """
    check_config(cfg)
    task = tasks.make_task(cfg.task, getattr(cfg, cfg.task), cfg.model.dtype)
    cell = make_cell(cfg.model)
    return task, cell, _trainer_of(cfg, task, cell, mesh)


def _trainer_of(cfg: Config, task, cell, mesh) -> Trainer:
    kwargs = {} if mesh is None else dict(mesh=mesh, data_axis=cfg.parallel.axis)
    kwargs["compute_dtype"] = cfg.model.compute_dtype or None
    return trainer(cell, cfg.optim, loss=task.loss, k1=cfg.train.k1, k2=cfg.train.k2, **kwargs)


def make_mesh(cfg: Config) -> jax.sharding.Mesh | None:
    """The data-parallel mesh of ``cfg.parallel`` (``None`` for a single device).

    Connects the processes of ``cfg.distributed`` first (:func:`bptt_jax.parallel.initialize`,
    before any device is touched), then checks that ``train.batch_size`` splits over the
    devices.

    Raises:
      ConfigError: naming 'parallel.devices' (more devices than there are, or not a multiple
        of the processes) or 'train.batch_size' (not divisible by the devices).
    """
    check_config(cfg)
    parallel.initialize(cfg.distributed)
    pc = cfg.parallel
    try:
        mesh = parallel.data_mesh(pc.devices, pc.axis)
    except ValueError as e:
        raise ConfigError(f"config: 'parallel.devices': {e}") from None
    n = mesh.shape[pc.axis]
    if n == 1 and jax.process_count() == 1:
        return None  # one device: the plain step
    if cfg.train.batch_size % n:
        raise ConfigError(
            f"config: 'train.batch_size' ({cfg.train.batch_size}) must be divisible by the {n} "
            f"devices the batch is split over ('parallel.devices' = {pc.devices}"
            f"{': all' if pc.devices == 0 else ''}); set train.batch_size to a multiple of {n} "
            f"or parallel.devices to a divisor of {cfg.train.batch_size}"
        )
    return mesh


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
    (:func:`trainer` with a mesh); with several processes (``[distributed]``) each process
    runs this same loop: each draws the global batch ``s`` (the tasks' batches are cheap
    functions of ``(key, s)``) and places only its own devices' rows, so the run is the same
    whatever the number of processes. Only process 0 prints and writes the log file; every
    process calls ``hooks`` and writes its part of each checkpoint. Evaluation runs on each
    process's first device.

    The run holds ``checkpoint.dir``'s lock (:class:`bptt_jax.checkpoint.Checkpointer`) from
    start to end. Resuming skips newer steps that are corrupt or incomplete, with a warning
    line each on ``out``, restores the newest intact one (announced) and moves the skipped
    ones aside to ``<step>.corrupt-<n>``. ``train.log_file`` then holds each step once
    (:func:`_open_log`: trimmed to the resumed step, or another run's log moved aside), its
    records strict JSON (NaN and inf as ``null``).

    Raises:
      ConfigError: a bad value, naming the key, or, naming 'checkpoint.dir', a checkpoint
        to resume that does not fit the config, a directory another live run writes, or one
        whose steps are all corrupt; before any training.
      bptt_jax.checkpoint.CheckpointSaveError: (an ``OSError``) a checkpoint could not be
        written (e.g. a full disk); nothing partial of it is left.
    """
    out = sys.stdout if out is None else out
    task, cell, t = build(cfg)  # every check and the corpus read, touching no device
    mesh = make_mesh(cfg)  # connects the processes first, if there are several
    if mesh is not None:
        t = _trainer_of(cfg, task, cell, mesh)
    main = parallel.is_main_process()
    tc, cc = cfg.train, cfg.checkpoint
    dtype = jnp.dtype(cfg.model.dtype)
    state = t.init(
        jax.random.key(cfg.seed), task.input_size, task.output_size, tc.batch_size, dtype
    )
    ckpt = None
    if cc.dir:  # orbax is imported only when checkpoints are asked for
        from bptt_jax import checkpoint

        try:  # the directory's lock, held until the end: one writing run at a time
            ckpt = checkpoint.Checkpointer(cc.dir, keep=cc.keep)
        except checkpoint.CheckpointInUse as e:
            raise ConfigError(f"config: 'checkpoint.dir': {e}") from None
    resumed, log = False, None
    try:  # (the checkpoint directory's lock is released on any error)
        if ckpt is not None and ckpt.steps_on_disk():
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
            except checkpoint.CheckpointMismatch as e:
                raise ConfigError(
                    f"config: 'checkpoint.dir' holds a checkpoint of another model, optimizer "
                    f"or batch size: {e}; use another checkpoint.dir"
                ) from None
            except checkpoint.CheckpointCorrupt as e:
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
            resumed = True
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
        if tc.log_file and main:  # trimmed to the resumed step, or another run's set aside
            log = _open_log(tc, int(state.step) if resumed else None, out)
    except BaseException:
        if ckpt is not None:
            ckpt.close()
        raise
    tokens_per_step = tc.batch_size * task.seq_len
    history: list[dict] = []

    def record(rec: dict):
        history.append(rec)
        if log is not None:
            log.write(_json_line(rec) + "\n")
            log.flush()
        for hook in hooks:
            hook(rec["step"], rec)

    def evaluate(step: int):
        params, readout = parallel.local_copy((state.params, state.readout))
        rec = {"kind": "eval", "step": step, **task.evaluate(cell, params, readout)}
        if isinstance(task, tasks.CharLMTask) and task.sample_len:
            key = jax.random.fold_in(jax.random.key(cfg.seed + 1), step)
            rec["sample"] = task.sample(cell, params, readout, key)
        text = " ".join(f"{k}={v:.4g}" for k, v in rec.items() if isinstance(v, float))
        if main:
            _write(bar, out, f"[eval step {step}] {text}")
            if "sample" in rec:
                _write(bar, out, "sample: " + repr(rec["sample"]))
        record(rec)

    start = int(state.step)
    bar = _progress(tc, start, out) if main else None
    data_key = parallel.local_copy(state.key)  # the same in every process
    window: list[dict] = []
    t_last, step_last = time.perf_counter(), start
    try:
        for s in range(start, tc.steps):
            batch = _batch(task, data_key, s, tc.batch_size)  # the global batch s
            state, metrics = t.step(state, t.put_batch(batch))
            window.append(metrics)
            done = s + 1
            if done % tc.log_every == 0 or done == tc.steps:
                host = jax.device_get(window)
                now = time.perf_counter()
                rate = tokens_per_step * (done - step_last) / (now - t_last)
                rec = _train_record(done, host, rate)
                if tc.horizon_every and done % tc.horizon_every == 0:
                    t_h = time.perf_counter()  # not throughput either
                    params, key = parallel.local_copy((state.params, state.key))
                    h = int(_horizon(cell, params, batch.xs, key))
                    rec["horizon"] = h if h >= 0 else None  # null: undefined (NaN norms)
                    now += time.perf_counter() - t_h
                t_last, step_last, window = now, done, []
                if bar is not None:
                    bar.update(done - bar.n)
                    extra = {"horizon": rec["horizon"]} if "horizon" in rec else {}
                    bar.set_postfix(
                        loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}", **extra
                    )
                record(rec)
            t_aside = time.perf_counter()  # evaluation and checkpoints are not throughput
            if tc.eval_every and done % tc.eval_every == 0 and done != tc.steps:
                evaluate(done)
            if ckpt is not None and cc.every and done % cc.every == 0:
                ckpt.save(state, {"config": config_lib.to_dict(cfg)})
            t_last += time.perf_counter() - t_aside
        evaluate(int(state.step))
        # the last state, unless saved already (by `every`, or by the run this one resumed
        # when it had nothing left to do)
        if ckpt is not None and int(state.step) not in ckpt.all_steps():
            ckpt.save(state, {"config": config_lib.to_dict(cfg)})
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
        if ckpt is not None:
            ckpt.close()
    return FitResult(state, history, task, cell, mesh)


@partial(jax.jit, static_argnums=(0,))
def _horizon(cell, params, xs, key):
    """The effective horizon (:func:`bptt_jax.diagnostics.effective_horizon`) of the batch's
    first 8 sequences, from zero carries, with 8 random probes: about 8 backward passes
    over 8 sequences, no weight gradients. A model logs the longest of its layers' (and
    directions') horizons. ``-1`` (:data:`~bptt_jax.diagnostics.UNDEFINED_HORIZON`) when
    any is undefined (NaN or inf norms: a diverged run), which the log records as null."""
    from bptt_jax import diagnostics

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
    if args.config is None:  # (KEY=VALUE alone: the overrides of train.Config's defaults)
        print("bptt-jax train: error: give a config (e.g. adding, charlm, recall)", file=sys.stderr)
        return 2
    try:
        cfg = config_lib.from_args(Config, args)
        if cfg.model.dtype == "float64":  # this process's arrays: float64 needs x64 mode
            jax.config.update("jax_enable_x64", True)
        build(cfg)  # every check (and the corpus read) before any work; no device touched
        procs = parallel.distributed_args(cfg.distributed)
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
