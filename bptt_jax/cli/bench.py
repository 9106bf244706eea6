"""``bptt-jax bench``: the benchmark suite's config schema and command-line entry point.

The suite itself is the plain scripts of the repository's ``benchmarks/`` folder (a timing
harness, one script per measurement, one runner); this module only describes what a config may
say, checks it, and hands it to ``benchmarks/run.py``. The scripts stay outside the library so
that they read as what they are, programs that time it from the outside, and so that each
still runs on its own (``python benchmarks/truncation.py``). A wheel carries them inside the
package (:func:`bptt_jax.cli.config.shipped`), as it carries ``configs/``, so an installed
package runs ``bptt-jax bench`` as a clone does.

    bptt-jax bench                                  # configs/bench.toml
    bptt-jax bench bench_gpu                        # configs/bench_gpu.toml
    bptt-jax bench bench_tiny out=/tmp/b timing.repeats=3 parts='["floor"]'

Exit status: 0 when every entry was checked and timed, 1 when a gradient check failed or an
entry could not run (it is reported, never timed), 2 for a config error (the message names the
key).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from dataclasses import field
from pathlib import Path
from typing import Literal, get_args

from bptt_jax.cells import LinearCell
from bptt_jax.cli import config
from bptt_jax.config import ConfigError, bounds, check_bounds
from bptt_jax.models import CELLS, parse_spec

Cell = Literal["elman", "lstm", "gru"]
Part = Literal[
    "manual_vs_autodiff",
    "scaling",
    "truncation",
    "peers",
    "floor",
    "models",
    "parallel",
    "precision",
    "linear",
    "sequence",
]
Library = Literal["torch", "flax", "cudnn", "torch_bf16"]
PARTS: tuple[str, ...] = get_args(Part)  # every part, in the order they run

#: A model spec, ``[bi]<cell>[:<layers>]``, names a cell or model by
#: :func:`bptt_jax.models.parse_spec`: ``"gru"`` is the cell itself, ``"bigru"``
#: ``Bidirectional(GRU(H))``, ``"lstm:2"`` ``stacked(LSTM(H), 2)``, ``"bilstm:2"``
#: ``stacked(LSTM(H), 2, bidirectional=True)``.

#: Where the benchmark scripts live (see :func:`bptt_jax.cli.config.shipped`).
BENCHMARKS_DIR = config.shipped("benchmarks")

#: Sizes are ``[T, B, D, H]``: sequence length, batch, input size, hidden size.
Size = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Timing:
    """How every timed entry is measured (the same for all parts)."""

    # timed samples per variant, interleaved round-robin across variants
    repeats: int = field(default=10, metadata=bounds(ge=1))
    # untimed calls per variant after compiling, before timing
    warmup: int = field(default=2, metadata=bounds(ge=0))
    # calls per sample are batched until a sample lasts this long
    min_sample_s: float = field(default=0.0, metadata=bounds(ge=0))


@dataclasses.dataclass(frozen=True)
class Check:
    """The check that runs before any timing: each gradient path against autodiff."""

    # max normwise relative error of value and every gradient leaf...
    rtol: float = field(default=1e-4, metadata=bounds(gt=0))
    # ...times sqrt(T / long_T) for T above this (float32 sums grow with T)
    long_T: int = field(default=1024, metadata=bounds(ge=1))


@dataclasses.dataclass(frozen=True)
class ManualVsAutodiff:
    """Part 1: the hand-written BPTT against ``jax.grad`` of the plain per-step scan."""

    cells: tuple[Cell, ...] = ("elman", "lstm", "gru")
    sizes: tuple[Size, ...] = ((100, 32, 64, 128),)  # [T, B, D, H] each
    variants: tuple[str, ...] = ("manual", "autodiff")  # names in harness.VARIANTS


@dataclasses.dataclass(frozen=True)
class Scaling:
    """Part 2: one cell over a sweep of sequence lengths: tokens/s and memory vs T."""

    cell: Cell = "elman"
    T: tuple[int, ...] = field(default=(128, 512, 2048), metadata=bounds(ge=1))
    B: int = field(default=32, metadata=bounds(ge=1))
    D: int = field(default=32, metadata=bounds(ge=1))
    H: int = field(default=128, metadata=bounds(ge=1))
    variants: tuple[str, ...] = ("manual", "checkpointed", "autodiff")  # unavailable: skipped
    time: bool = True  # false: compile, check and memory only (large T on a small machine)
    # more lengths, for memory only (compiled and checked)
    memory_T: tuple[int, ...] = field(default=(), metadata=bounds(ge=1))


@dataclasses.dataclass(frozen=True)
class Truncation:
    """Part 3: full BPTT against ``truncate=k`` on one long sequence."""

    cell: Cell = "elman"
    T: int = field(default=4096, metadata=bounds(ge=1))
    B: int = field(default=8, metadata=bounds(ge=1))
    D: int = field(default=32, metadata=bounds(ge=1))
    H: int = field(default=64, metadata=bounds(ge=1))
    k: tuple[int, ...] = field(default=(16, 32, 64, 128, 256), metadata=bounds(ge=1))
    variant: str = "manual"


@dataclasses.dataclass(frozen=True)
class Peers:
    """Part 4: other implementations of the same loss and gradient, when installed."""

    cells: tuple[Cell, ...] = ("elman", "lstm", "gru")
    sizes: tuple[Size, ...] = ((100, 32, 64, 128),)
    libraries: tuple[Library, ...] = ("torch", "flax", "cudnn")  # cudnn: GPU and LSTM only
    # torch.set_num_threads on the CPU; 0 keeps torch's default
    torch_threads: int = field(default=0, metadata=bounds(ge=0))
    # untimed calls of a library right before each of its samples under 0.1 s
    settle: int = field(default=1, metadata=bounds(ge=0))


@dataclasses.dataclass(frozen=True)
class Floor:
    """Part 5: bptt_jax against the matmuls it cannot avoid, at the machine's matmul rate."""

    cells: tuple[Cell, ...] = ("elman", "lstm", "gru")
    sizes: tuple[Size, ...] = ((100, 32, 64, 128),)
    # n of the n x n @ n x n matmul that measures the rate
    matmul_size: int = field(default=1024, metadata=bounds(ge=1))


@dataclasses.dataclass(frozen=True)
class Models:
    """Part 6: stacked and bidirectional models (``bptt_jax.Stack``, ``Bidirectional``).

    Timed rows: each model of ``models`` at each size, every variant (checked against the
    per-cell plain scans composed by the benchmark) and each peer library (PyTorch's
    ``nn.LSTM(num_layers=L, bidirectional=...)``, Flax ``nn.RNN``/``nn.Bidirectional``) side by
    side. Memory rows: each of ``memory_models`` at each of ``memory_sizes``, compiled and
    checked, not timed: XLA temp memory of each of ``memory_variants``.
    """

    models: tuple[str, ...] = ("lstm:2", "bigru")  # specs: [bi]<cell>[:<layers>]
    sizes: tuple[Size, ...] = ((256, 64, 128, 256),)  # [T, B, D, H]; H per cell
    variants: tuple[str, ...] = ("manual", "autodiff")  # names in harness.VARIANTS
    libraries: tuple[Library, ...] = ("torch", "flax")  # peers, when installed (no cudnn)
    # timed samples per entry; none: timing.repeats
    repeats: int | None = field(default=None, metadata=bounds(ge=1))
    # untimed calls per entry; none: timing.warmup
    warmup: int | None = field(default=None, metadata=bounds(ge=0))
    memory_models: tuple[str, ...] = ("lstm:4",)
    memory_sizes: tuple[Size, ...] = ((4096, 16, 32, 64),)
    memory_variants: tuple[str, ...] = ("manual", "checkpointed")


@dataclasses.dataclass(frozen=True)
class Parallel:
    """Part 7: data parallelism: the gradient step with the batch split over n devices.

    For each n of ``devices`` (up to the devices there are), the gradient step with the
    batch split along B over an n-device mesh, checked against the 1-device autodiff
    reference and timed side by side; with the all-reduce bytes per step and the FLOPs per
    device of each compiled program. On a CPU with fewer devices, in a fresh interpreter with
    ``simulate`` simulated CPU devices (they share the cores: overhead, not speedup).
    """

    model: str = "lstm"  # a model spec: [bi]<cell>[:<layers>]
    size: Size = (100, 64, 32, 128)  # [T, B, D, H]; B divisible by every device count
    devices: tuple[int, ...] = field(default=(1, 2, 4, 8), metadata=bounds(ge=1))
    backward: Literal["manual", "checkpointed"] = "manual"
    # CPU devices of the fresh interpreter on a CPU; 0: only those there are
    simulate: int = field(default=8, metadata=bounds(ge=0))
    # timed samples per entry; none: timing.repeats
    repeats: int | None = field(default=None, metadata=bounds(ge=1))
    # untimed calls per entry; none: timing.warmup
    warmup: int | None = field(default=None, metadata=bounds(ge=0))


@dataclasses.dataclass(frozen=True)
class Precision:
    """Part 8: the precision policy: float32 against bfloat16 compute, time and temp memory.

    Each variant (``manual``: float32; ``bf16``: ``compute_dtype=bfloat16``, float32 params,
    carries and sums) and each library (``torch``: PyTorch in float32; ``torch_bf16``: the
    same under ``torch.autocast(dtype=torch.bfloat16)``) is checked against float32
    autodiff (a bfloat16 entry within ``bptt_jax.verify.policy_tolerances``), then timed
    side by side.
    """

    cells: tuple[Cell, ...] = ("lstm", "gru")
    sizes: tuple[Size, ...] = ((256, 64, 128, 256),)
    variants: tuple[str, ...] = ("manual", "bf16")  # names in harness.VARIANTS
    libraries: tuple[Library, ...] = ("torch", "torch_bf16")


@dataclasses.dataclass(frozen=True)
class Linear:
    """Part 9: linear recurrences (``MinGRU``, ``MinLSTM``, ``RGLRU``, ``LRU``): the linear path
    against what a user could write instead and against the library's GRU and LSTM.

    ``sizes``: a ``MinGRU`` layer against ``jax.grad`` of an associative-scan forward of its
    equations and against the same cell as a tier-1 user cell; ``gru_sizes``: against the
    ``GRU``; the table: each of ``cells`` with both scans and each of ``peers``, at each
    ``T`` of (``B``, ``D``, ``H``). Every entry checked against autodiff, then timed.
    """

    sizes: tuple[Size, ...] = ((4096, 16, 128, 256),)  # [T, B, D, H] each
    gru_sizes: tuple[Size, ...] = ((1024, 32, 128, 256),)
    cells: tuple[Literal["mingru", "minlstm", "rglru", "lru"], ...] = (
        "mingru", "minlstm", "rglru", "lru",
    )  # fmt: skip
    peers: tuple[Cell, ...] = ("gru", "lstm")
    T: tuple[int, ...] = field(default=(256, 1024, 4096), metadata=bounds(ge=1))
    B: int = field(default=16, metadata=bounds(ge=1))
    D: int = field(default=128, metadata=bounds(ge=1))
    H: int = field(default=256, metadata=bounds(ge=1))
    # timed samples per entry; none: timing.repeats
    repeats: int | None = field(default=None, metadata=bounds(ge=1))
    # untimed calls per entry; none: timing.warmup
    warmup: int | None = field(default=None, metadata=bounds(ge=0))


@dataclasses.dataclass(frozen=True)
class Sequence:
    """Part 10: sequence parallelism: the gradient step with the time axis split over n devices.

    For each n of ``devices`` (up to the devices there are), the gradient step of a linear
    recurrence with the sequence (inputs and targets) split along T over an n-device mesh
    (``time_axis``; 1 device: the plain program), checked against the 1-device program and
    timed side by side; with the collectives of each compiled program, the bytes they
    exchange per step and the temp memory per device. On a CPU with fewer devices, in a fresh
    interpreter with ``simulate`` simulated CPU devices (they share the cores: overhead, not
    speedup).
    """

    # a model spec, [bi]<cell>[:<layers>], of linear cells: mingru, minlstm, rglru, lru
    model: str = "mingru"
    size: Size = (65536, 16, 128, 256)  # [T, B, D, H]; T divisible by every device count
    devices: tuple[int, ...] = field(default=(1, 2, 4, 8), metadata=bounds(ge=1))
    backward: Literal["manual", "checkpointed"] = "manual"
    # CPU devices of the fresh interpreter on a CPU; 0: only those there are
    simulate: int = field(default=8, metadata=bounds(ge=0))
    # timed samples per entry; none: timing.repeats
    repeats: int | None = field(default=None, metadata=bounds(ge=1))
    # untimed calls per entry; none: timing.warmup
    warmup: int | None = field(default=None, metadata=bounds(ge=0))


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Everything ``bptt-jax bench`` runs; each table is one part (see ``benchmarks/``)."""

    out: str = "results/bench"  # output folder: bench.json and the PNG plots
    parts: tuple[Part, ...] = PARTS  # which parts run, in this order
    seed: int = 0
    # O, the readout size (classes of the cross-entropy loss)
    outputs: int = field(default=32, metadata=bounds(ge=1))
    # "highest": true float32 matmuls on every backend (no effect on a CPU), as PyTorch's
    # default, and what check.rtol is sized for; "default" lets a GPU use TF32 (raise
    # check.rtol to ~2e-2 with it) and a TPU bfloat16 passes.
    matmul_precision: Literal["default", "high", "highest"] = "highest"
    plots: bool = True
    timing: Timing = Timing()
    check: Check = Check()
    manual_vs_autodiff: ManualVsAutodiff = ManualVsAutodiff()
    scaling: Scaling = Scaling()
    truncation: Truncation = Truncation()
    peers: Peers = Peers()
    floor: Floor = Floor()
    models: Models = Models()
    parallel: Parallel = Parallel()
    precision: Precision = Precision()
    linear: Linear = Linear()
    sequence: Sequence = Sequence()


def _check_spec(key: str, spec: str) -> str:
    """The cell a model spec names (a ConfigError naming ``key`` when it is no spec)."""
    try:
        return parse_spec(spec)[0]
    except ValueError as e:
        raise ConfigError(f"config: '{key}': {e}") from None


def _check_devices(part: str, size: Size, devices: tuple[int, ...], axis: int) -> None:
    """``<part>.size`` is [T, B, D, H] and each of ``<part>.devices`` divides its ``axis``."""
    if len(size) != 4 or min(size) < 1:
        raise ConfigError(
            f"config: '{part}.size' must be [T, B, D, H], four positive ints; got {list(size)}"
        )
    if not devices:
        raise ConfigError(f"config: '{part}.devices' must list at least one count")
    what = ("the sequence length T", "steps") if axis == 0 else ("the batch B", "examples")
    for i, n in enumerate(devices):
        if size[axis] % n:
            raise ConfigError(
                f"config: '{part}.devices[{i}]' = {n} does not divide {what[0]} = "
                f"{size[axis]} ('{part}.size'[{axis}]); each device takes "
                f"{'TB'[axis]} / n {what[1]}"
            )


def check_config(cfg: BenchConfig) -> BenchConfig:
    """The bounds on the fields, then what they cannot express; each :class:`ConfigError`
    names its key."""
    check_bounds(cfg)
    for part, key in (
        ("manual_vs_autodiff", "sizes"),
        ("peers", "sizes"),
        ("floor", "sizes"),
        ("models", "sizes"),
        ("models", "memory_sizes"),
        ("precision", "sizes"),
        ("linear", "sizes"),
        ("linear", "gru_sizes"),
    ):
        for i, size in enumerate(getattr(getattr(cfg, part), key)):
            if len(size) != 4 or min(size) < 1:
                raise ConfigError(
                    f"config: '{part}.{key}[{i}]' must be [T, B, D, H], four positive ints; "
                    f"got {list(size)}"
                )
    for key in ("models", "memory_models"):
        for i, spec in enumerate(getattr(cfg.models, key)):
            _check_spec(f"models.{key}[{i}]", spec)
    _check_spec("parallel.model", cfg.parallel.model)
    _check_devices("parallel", cfg.parallel.size, cfg.parallel.devices, axis=1)
    sc = cfg.sequence
    cell = _check_spec("sequence.model", sc.model)
    if not issubclass(CELLS[cell], LinearCell):
        linear = ", ".join(k for k, v in CELLS.items() if issubclass(v, LinearCell))
        raise ConfigError(
            f"config: 'sequence.model' = {sc.model!r}: {cell} is not a linear recurrence, so "
            f"its steps cannot be split over devices; sequence parallelism needs a model of "
            f"linear cells: {linear} (e.g. 'mingru', 'biminlstm', 'lru:2')"
        )
    _check_devices("sequence", sc.size, sc.devices, axis=0)
    if len(set(cfg.parts)) != len(cfg.parts):
        raise ConfigError(f"config: 'parts' lists a part twice: {list(cfg.parts)}")
    config.check_directory("out", cfg.out)
    return cfg


def load_config(name_or_path=None, overrides=()) -> BenchConfig:
    """A checked :class:`BenchConfig` from a TOML file (or defaults) and overrides."""
    return check_config(config.load(BenchConfig, name_or_path, overrides))


def load_runner():
    """Import ``benchmarks/run.py`` (:data:`BENCHMARKS_DIR`; its folder goes on ``sys.path``)."""
    run_py = BENCHMARKS_DIR / "run.py"
    if not run_py.is_file():
        raise FileNotFoundError(
            f"bptt-jax bench: the benchmark scripts were not found at {BENCHMARKS_DIR}: this "
            "installation lacks them; reinstall the package (a wheel carries them) or run from "
            "a clone installed with `pip install -e .`"
        )
    if str(BENCHMARKS_DIR) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS_DIR))
    if "run" in sys.modules and Path(sys.modules["run"].__file__ or "") == run_py:
        return sys.modules["run"]
    spec = importlib.util.spec_from_file_location("run", run_py)
    module = importlib.util.module_from_spec(spec)
    sys.modules["run"] = module
    spec.loader.exec_module(module)
    return module


def add_cli_arguments(parser) -> None:
    config.add_arguments(parser, default="bench")


def config_name(args) -> str | None:
    """The config file parsed ``args`` name (the default when only overrides were given)."""
    if args.config is not None and "=" in args.config and not Path(args.config).is_file():
        return getattr(args, "config_default", None)
    return args.config


def cli_main(args) -> int:
    try:
        cfg = check_config(config.from_args(BenchConfig, args))
    except ConfigError as e:
        print(f"bptt-jax bench: error: {e}", file=sys.stderr)
        return 2
    try:
        runner = load_runner()
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 2
    try:
        return runner.main_with_config(cfg, config_file=config_name(args))
    except ConfigError as e:  # a variant name the harness does not know
        print(f"bptt-jax bench: error: {e}", file=sys.stderr)
        return 2
