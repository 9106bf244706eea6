"""``bptt-jax train``'s config: the TOML schema, its checks, and what it builds.

:class:`Config` is every table a training config may hold (``[model]``, ``[optim]``,
``[train]``, ``[checkpoint]``, ``[parallel]``, ``[distributed]`` and one per task); the
ranges are declared on the fields (:mod:`bptt_jax.config`) and :func:`check_config` adds what
relates several of them and the sizes that cannot run (:func:`footprint`). :func:`build` turns
a checked config into ``(task, model, trainer)`` without touching a device, and
:func:`make_mesh` connects the processes and makes the data-parallel mesh. The loop itself is
:func:`bptt_jax.cli.fit.fit`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field
from pathlib import Path
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bptt_jax import parallel, tasks
from bptt_jax.cli import config as config_lib
from bptt_jax.cli.distributed import DistributedConfig, distributed_args, initialize
from bptt_jax.config import ConfigError, bounds, check_bounds
from bptt_jax.models import build_model, cells_with
from bptt_jax.train import OptimConfig, Trainer, check_optim, make_optimizer, trainer


# ---------------------------------------------------------------------------- the schema
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The recurrent cell or model (table ``[model]``).

    ``num_layers``, ``bidirectional`` and ``dropout`` build PyTorch's ``nn.LSTM(D, H,
    num_layers, bidirectional=..., dropout=...)`` (:func:`bptt_jax.stacked`); the defaults
    are one unidirectional cell.
    """

    # the linear recurrences (mingru, minlstm, rglru, lru) have no recurrent kernel: activation,
    # forget_bias and init do not apply to them
    cell: Literal["lstm", "gru", "elman", "mingru", "minlstm", "rglru", "lru"] = "lstm"
    hidden_size: int = field(default=128, metadata=bounds(gt=0))
    num_layers: int = field(default=1, metadata=bounds(gt=0))
    bidirectional: bool = False
    # between layers (num_layers >= 2), during training only
    dropout: float = field(default=0.0, metadata=bounds(ge=0, lt=1))
    activation: Literal["tanh", "relu", "identity", "sigmoid"] = "tanh"  # elman only
    forget_bias: float = 1.0  # lstm only
    init: Literal["uniform", "orthogonal"] = "uniform"  # elman, lstm, gru
    # the linear recurrences' settings, an error for another cell; none: the cell's default.
    # how their scan runs ("auto": sequential on a CPU, parallel on a GPU or TPU)
    scan: Literal["auto", "parallel", "sequential"] | None = None  # mingru, minlstm, rglru, lru
    # the RG-LRU's constant scaling its gated decay (none: 8, the paper's)
    c: float | None = field(default=None, metadata=bounds(gt=0))  # rglru
    dtype: Literal["float32", "float64"] = "float32"
    # the precision policy (bptt_jax.precision): "bfloat16" or "float16" compute with
    # params, carries and sums in `dtype`; "" (the default): compute in `dtype`
    compute_dtype: Literal["", "bfloat16", "float16", "float32", "float64"] = ""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The loop (table ``[train]``)."""

    steps: int = field(default=1000, metadata=bounds(ge=0))  # train steps (batches / chunks)
    batch_size: int = field(default=32, metadata=bounds(gt=0))
    # None: full BPTT per batch; else TBPTT(k1, k2)
    k1: int | None = field(default=None, metadata=bounds(gt=0))
    # backpropagation depth, >= k1; None: k1
    k2: int | None = field(default=None, metadata=bounds(gt=0))
    # steps between evaluations (0: only at the end)
    eval_every: int = field(default=200, metadata=bounds(ge=0))
    # steps between progress-bar updates and log records
    log_every: int = field(default=10, metadata=bounds(gt=0))
    progress: bool = True  # show a tqdm progress bar
    log_file: str = ""  # write the log records as JSON lines here ("" for none)
    # steps between logging the effective horizon (diagnostics.effective_horizon) with the
    # train record (at steps that are multiples of log_every too); 0: never
    horizon_every: int = field(default=0, metadata=bounds(ge=0))


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Saved training states (table ``[checkpoint]``; :mod:`bptt_jax.cli.saving`)."""

    dir: str = ""  # "" for no checkpoints
    # steps between checkpoints (0: only at the end)
    every: int = field(default=0, metadata=bounds(ge=0))
    keep: int = field(default=3, metadata=bounds(gt=0))  # most recent checkpoints kept
    resume: bool = True  # continue the latest checkpoint in dir; false: dir must hold none


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """Data parallelism (table ``[parallel]``): the batch split over devices
    (:mod:`bptt_jax.parallel`); with ``time_devices`` > 1, sequence parallelism too: each
    sequence's steps split over that many of them (linear cells, full BPTT)."""

    # devices in all (the batch axis's, times time_devices): 0 for all (every process's)
    devices: int = field(default=0, metadata=bounds(ge=0, note="0: all devices"))
    axis: str = "data"  # the batch axis's name
    # devices each sequence's time axis is split over (mingru, minlstm, rglru, lru): 1 for none
    time_devices: int = field(default=1, metadata=bounds(ge=1, note="1: time not split"))
    time_axis: str = "time"  # the time axis's name


#: Largest seed + 1: ``jax.random.key`` keeps 32 bits of a seed (without x64), so larger or
#: negative seeds would collide with others.
SEED_BOUND = 2**32


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything ``bptt-jax train`` reads; each task's settings are in its own table."""

    seed: int = field(
        default=0, metadata=bounds(ge=0, lt=SEED_BOUND, note="JAX keeps 32 bits of a seed")
    )
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


# ---------------------------------------------------------------------------- the checks


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


#: The cells whose steps may be split over devices in time (``parallel.time_devices``).
LINEAR_CELLS = frozenset({"mingru", "minlstm", "rglru", "lru"})


def check_config(cfg: Config) -> None:
    """The bounds declared on every field (the task's table only for the task that runs),
    then what relates several values and the sizes that cannot run; ``ConfigError`` naming
    the key."""
    t, m, c = cfg.train, cfg.model, cfg.checkpoint
    check_bounds(cfg, skip=tuple(tasks.TASKS))
    check_optim(cfg.optim)
    for key in ("scan", "c"):
        having = cells_with(key)
        if getattr(m, key) is not None and m.cell not in having:
            raise ConfigError(
                f"config: 'model.{key}' applies to model.cell {', '.join(having)}, not to "
                f"{m.cell!r}; leave model.{key} out (or none)"
            )
    fmax = float(np.finfo(np.float64 if m.dtype == "float64" else np.float32).max)
    if not abs(m.forget_bias) <= fmax:  # NaN too; beyond the params' dtype it would be inf
        raise ConfigError(
            f"config: 'model.forget_bias' must be a finite number that model.dtype "
            f"({m.dtype}) holds, |x| <= {fmax:.3g}; got {m.forget_bias}"
        )
    if m.c is not None and not m.c <= fmax:  # beyond the params' dtype it would be inf
        raise ConfigError(
            f"config: 'model.c' must be a number that model.dtype ({m.dtype}) holds, "
            f"c <= {fmax:.3g}; got {m.c}"
        )
    if m.dtype == "float64" and not jax.config.jax_enable_x64:
        raise ConfigError(
            "config: 'model.dtype' float64 needs JAX's 64-bit mode, which is off: JAX would "
            "make every array float32, silently (`bptt-jax train` turns it on for float64; "
            "in Python: jax.config.update('jax_enable_x64', True) before creating arrays)"
        )
    _check_paths(cfg)
    if t.k1 is None and t.k2 is not None:
        raise ConfigError("config: 'train.k2' needs 'train.k1' (TBPTT(k1, k2)); set train.k1")
    if t.k1 is not None and t.k2 is not None and t.k1 > t.k2:
        raise ConfigError(
            f"config: 'train.k1' ({t.k1}) must be <= 'train.k2' ({t.k2}): each update "
            "backpropagates k2 >= k1 steps"
        )
    if c.every and not c.dir:
        raise ConfigError("config: 'checkpoint.every' needs 'checkpoint.dir'")
    if m.compute_dtype and jnp.dtype(m.compute_dtype).itemsize > jnp.dtype(m.dtype).itemsize:
        raise ConfigError(
            f"config: 'model.compute_dtype' ({m.compute_dtype}) must be no wider than "
            f"'model.dtype' ({m.dtype}): the policy computes in it and keeps params in dtype"
        )
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
    pc = cfg.parallel
    for key in ("axis", "time_axis"):
        if not getattr(pc, key):
            raise ConfigError(f"config: 'parallel.{key}' must be a non-empty mesh axis name")
    if pc.time_devices > 1:
        if pc.axis == pc.time_axis:
            raise ConfigError(
                f"config: 'parallel.axis' and 'parallel.time_axis' must differ; both are "
                f"{pc.axis!r}"
            )
        if m.cell not in LINEAR_CELLS:
            raise ConfigError(
                f"config: 'parallel.time_devices' ({pc.time_devices}) splits each sequence's "
                f"steps over devices, which only a linear recurrence allows; model.cell is "
                f"{m.cell!r}: use one of {sorted(LINEAR_CELLS)} or parallel.time_devices=1"
            )
        if t.k1 is not None:
            raise ConfigError(
                f"config: 'parallel.time_devices' ({pc.time_devices}) runs full BPTT over each "
                f"batch's sequence; set train.k1=none (got {t.k1})"
            )
    distributed_args(cfg.distributed)  # every value, the environment's too
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

#: Per built-in cell: blocks of H columns in its input kernel (D, G*H) and in its recurrent
#: kernel (H, G*H) (none for a linear recurrence), vectors of H (biases, and the RG-LRU's
#: Lambda), carry parts (B, H) and the (B, H) blocks its hand-written backward stores per step
#: beside the carry (the largest of its gate, residual and gradient blocks: the engine writes
#: them in place; a linear cell's a_t and its coefficients' residuals).
_CELL_SIZES = {
    "elman": (1, 1, 1, 1, 1),
    "lstm": (4, 4, 4, 2, 4),
    "gru": (3, 3, 6, 1, 4),
    "mingru": (2, 0, 2, 1, 2),
    "minlstm": (3, 0, 3, 1, 4),
    "rglru": (3, 0, 4, 1, 4),
    # N = H: B (D, 2N) and C (N, 2H) as the two kinds of kernel; nu, theta, gamma and D; the
    # carry (B, 2N); the states (2), the outputs and u (complex: 2)
    "lru": (2, 2, 4, 2, 5),
}


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
    inputs, recurrent, vectors, carry, stored = _CELL_SIZES[m.cell]
    h, layers, dirs = m.hidden_size, m.num_layers, 1 + m.bidirectional
    b, seq = t.batch_size, tc.seq_len
    f = dirs * h  # features out of every layer (a bidirectional one concatenates both)

    def cell(d_in):
        return inputs * h * d_in + recurrent * h * h + vectors * h

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
    (:func:`bptt_jax.cli.config.available_memory`: host RAM; a device with less memory than
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


# ---------------------------------------------------------------------------- what it builds
def make_cell(cfg: ModelConfig):
    """The cell, or the model (:func:`bptt_jax.stacked`), of a :class:`ModelConfig`."""
    layers = None if cfg.num_layers == 1 and not cfg.bidirectional else cfg.num_layers
    return build_model(
        cfg.cell,
        cfg.hidden_size,
        layers=layers,
        bidirectional=cfg.bidirectional,
        dropout=cfg.dropout,
        activation=cfg.activation,
        forget_bias=cfg.forget_bias,
        init_scheme=cfg.init,
        scan=cfg.scan,
        c=cfg.c,
    )


def build(cfg: Config, mesh: jax.sharding.Mesh | None = None):
    """Check ``cfg`` and build ``(task, cell, trainer)``: every error before any work.

    Touches no device (so ``jax.distributed`` can still start after it); ``mesh`` (from
    :func:`make_mesh`) makes the trainer data-parallel.
    """
    check_config(cfg)
    task = tasks.make_task(cfg.task, getattr(cfg, cfg.task), cfg.model.dtype)
    cell = make_cell(cfg.model)
    return task, cell, trainer_of(cfg, task, cell, mesh)


def trainer_of(cfg: Config, task, cell, mesh) -> Trainer:
    """The :func:`bptt_jax.train.trainer` of ``cfg`` for ``task`` and ``cell`` (on ``mesh``)."""
    kwargs = {} if mesh is None else dict(mesh=mesh, data_axis=cfg.parallel.axis)
    if mesh is not None and cfg.parallel.time_devices > 1:
        kwargs["time_axis"] = cfg.parallel.time_axis
    kwargs["compute_dtype"] = cfg.model.compute_dtype or None
    return trainer(cell, cfg.optim, loss=task.loss, k1=cfg.train.k1, k2=cfg.train.k2, **kwargs)


def make_mesh(cfg: Config) -> jax.sharding.Mesh | None:
    """The data-parallel mesh of ``cfg.parallel`` (``None`` for a single device).

    Connects the processes of ``cfg.distributed`` first
    (:func:`bptt_jax.cli.distributed.initialize`, before any device is touched), then checks
    that ``train.batch_size`` splits over the devices.

    Raises:
      ConfigError: naming 'parallel.devices' (more devices than there are, or not a multiple
        of the processes) or 'train.batch_size' (not divisible by the devices).
    """
    check_config(cfg)
    initialize(cfg.distributed)
    pc = cfg.parallel
    try:
        if pc.time_devices > 1:
            mesh = parallel.sequence_mesh(pc.devices, pc.time_devices, data_axis=pc.axis,
                                          time_axis=pc.time_axis)  # fmt: skip
        else:
            mesh = parallel.data_mesh(pc.devices, pc.axis)
    except ValueError as e:
        raise ConfigError(f"config: 'parallel.devices' / 'parallel.time_devices': {e}") from None
    n = mesh.shape[pc.axis]
    if mesh.size == 1 and jax.process_count() == 1:
        return None  # one device: the plain step
    seq = getattr(cfg, cfg.task).seq_len
    if pc.time_devices > 1 and seq % pc.time_devices:
        raise ConfigError(
            f"config: '{cfg.task}.seq_len' ({seq}) must be divisible by "
            f"'parallel.time_devices' ({pc.time_devices}), each device taking seq_len / "
            f"{pc.time_devices} steps"
        )
    if cfg.train.batch_size % n:
        raise ConfigError(
            f"config: 'train.batch_size' ({cfg.train.batch_size}) must be divisible by the {n} "
            f"devices the batch is split over ('parallel.devices' = {pc.devices}"
            f"{': all' if pc.devices == 0 else ''}); set train.batch_size to a multiple of {n} "
            f"or parallel.devices to a divisor of {cfg.train.batch_size}"
        )
    return mesh
