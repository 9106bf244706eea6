"""The timing harness every benchmark script shares: problems, variants, check, time, memory.

A *variant* is one way to compute the gradient of the benchmark loss (the xent loss of a
readout on every hidden state, ``bptt_jax.sequence_loss``) with respect to the params and the
readout. :data:`VARIANTS` maps a name to a function building that loss; adding a gradient path
to every benchmark is one entry there. Before anything is timed, :meth:`Session.prepare`
checks its value and gradients against :data:`REFERENCE` (``backward="autodiff"`` with the same
truncation): a path that disagrees raises :class:`CheckFailed` and is never timed. A model
problem (a ``bptt_jax.Stack`` or ``Bidirectional``, named by a spec such as ``"lstm:2"``) is
checked against :data:`MODEL_REFERENCE` instead: the per-cell plain scans composed here
(:func:`unroll_composed`), independent of the engine's model code.

Timing (:func:`time_interleaved`): compile outside the timed region (compile time reported on
its own), warm up, then take ``repeats`` samples of every variant in turn, rotating which goes
first, each sample ending in ``jax.block_until_ready``; report median, quartiles and min. Ratios
are taken between medians of the same run, so drift of the machine cancels.

Memory (:func:`memory_of`): XLA's own account of the compiled program,
``jax.jit(f).lower(*args).compile().memory_analysis()``: temp (scratch the program allocates),
argument and output sizes; on a GPU also the device's ``peak_bytes_in_use``.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import math
import os
import platform
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import bptt_jax
from bptt_jax.models import CELLS, from_spec
from bptt_jax.models import cell_name as kind_of
from bptt_jax.verify import relative_error

#: Gate blocks per fast-path cell (by name, :data:`bptt_jax.models.CELLS`): the recurrent matmul is
#: (B, H) @ (H, GATES * H).
GATES = {name: cls(1).n_blocks for name, cls in CELLS.items() if hasattr(cls, "n_blocks")}


def model_layers(model) -> list[tuple]:
    """The cells of ``model``, per layer and per direction: ``[(cell,), ...]`` or
    ``[(forward, backward), ...]``, in PyTorch's order (layer k, direction d)."""
    if isinstance(model, bptt_jax.Stack):
        return [cells for layer in model.layers for cells in model_layers(layer)]
    if isinstance(model, bptt_jax.Bidirectional):
        return [(model.forward, model.backward)]
    return [(model,)]


def layer_params(model, params) -> list[tuple]:
    """``params`` of ``model`` per layer and direction, as :func:`model_layers` orders them
    (a Stack's params are a tuple per layer, a Bidirectional's ``(forward, backward)``)."""
    if isinstance(model, bptt_jax.Stack):
        return [d for layer, p in zip(model.layers, params) for d in layer_params(layer, p)]
    if isinstance(model, bptt_jax.Bidirectional):
        return [tuple(params)]
    return [(params,)]


def model_params(model, layers: list[tuple]):
    """The inverse of :func:`layer_params`: ``model``'s params from per-layer direction tuples."""
    if isinstance(model, bptt_jax.Stack):
        assert len(layers) == len(model.layers), (len(layers), len(model.layers))
        return tuple(model_params(layer, [p]) for layer, p in zip(model.layers, layers))
    (directions,) = layers
    if isinstance(model, bptt_jax.Bidirectional):
        return tuple(directions)
    (p,) = directions
    return p


def uniform_structure(model) -> tuple[str, int, bool, int]:
    """``(kind, layers, bidirectional, H)`` of a model whose every layer is the same kind of
    cell, size and direction count (what ``nn.LSTM(num_layers=L, bidirectional=...)`` can
    express); ``ValueError`` for any other model."""
    layers = model_layers(model)
    cells = [c for layer in layers for c in layer]
    kinds = {kind_of(c) for c in cells}
    sizes = {c.hidden_size for c in cells}
    dirs = {len(layer) for layer in layers}
    merges = (
        {model.merge}
        if isinstance(model, bptt_jax.Bidirectional)
        else {layer.merge for layer in getattr(model, "layers", ()) if hasattr(layer, "merge")}
    )
    if len(kinds) != 1 or len(sizes) != 1 or len(dirs) != 1 or merges - {"concat"}:
        raise ValueError(
            f"not one kind, size and direction count in every layer, merged by concat: {model}"
        )
    if any(getattr(c, "forget_bias", 0.0) for c in cells):
        raise ValueError("an LSTM with forget_bias != 0 has no PyTorch/Flax equivalent here")
    if getattr(model, "dropout", 0.0):
        raise ValueError("dropout between layers is random: no like-for-like peer")
    return kinds.pop(), len(layers), dirs.pop() == 2, sizes.pop()


def unroll_composed(model, params, xs):
    """The hidden states of ``model`` from the per-cell ``unroll(..., backward="autodiff")``
    (a plain ``lax.scan`` per cell, differentiated by JAX), composed here layer by layer and
    direction by direction (the reverse direction: the cell over ``xs[::-1]``, its outputs
    flipped back; no mask). Independent of the engine's own model code: the reference that
    model rows are checked against."""
    if isinstance(model, bptt_jax.Stack):
        if model.dropout:
            raise ValueError("unroll_composed: no dropout (the benchmark has no dropout key)")
        hs = xs
        for layer, p in zip(model.layers, params):
            hs = unroll_composed(layer, p, hs)
        return hs
    if isinstance(model, bptt_jax.Bidirectional):
        fwd = bptt_jax.unroll(model.forward, params[0], xs, backward="autodiff")[0]
        bwd = bptt_jax.unroll(model.backward, params[1], xs[::-1], backward="autodiff")[0][::-1]
        if model.merge == "concat":
            return jnp.concatenate([fwd, bwd], axis=-1)
        return fwd + bwd if model.merge == "sum" else (fwd + bwd) / 2
    return bptt_jax.unroll(model, params, xs, backward="autodiff")[0]


def xent_mean(hs, readout, targets):
    """Mean softmax cross-entropy of the readout on every step: the benchmark's loss."""
    logits = hs.reshape(-1, hs.shape[-1]) @ readout.w_hy + readout.b_y
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets.reshape(-1)[:, None], axis=-1)[:, 0]
    return jnp.mean(lse - picked)


# ------------------------------------------------------------------------------- problems
@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """One benchmark problem: a cell or model, its params and readout, inputs and targets.

    For a model (``bptt_jax.Stack`` or ``Bidirectional``) ``cell`` is the model, ``cell_name``
    its spec (``"lstm:2"``, ``"bigru"``), ``H`` each cell's hidden size and the readout maps
    the model's output size to O; ``reference`` names the variant it is checked against."""

    cell_name: str
    T: int
    B: int
    D: int
    H: int
    O: int
    cell: Any
    params: Any
    readout: bptt_jax.ReadoutParams
    xs: jax.Array  # (T, B, D) float32
    targets: jax.Array  # (T, B) int32 classes in [0, O)
    reference: str = "autodiff"  # the variant every other is checked against (REFERENCE)

    @property
    def tokens(self) -> int:
        return self.T * self.B

    @property
    def shape(self) -> dict[str, int]:
        return dict(T=self.T, B=self.B, D=self.D, H=self.H, O=self.O)

    @property
    def label(self) -> str:
        return f"{self.cell_name} T={self.T} B={self.B} D={self.D} H={self.H}"


def make_problem(cell_name: str, T: int, B: int, D: int, H: int, O: int, key) -> Problem:
    """Random params (the cell's or model's default init), readout, inputs ~ N(0, 1) and
    targets. ``cell_name`` is a cell (``"lstm"``) or a model spec (``"lstm:2"``, ``"bigru"``),
    whose reference is :data:`MODEL_REFERENCE`."""
    if cell_name in CELLS:
        cell, out_size, reference = CELLS[cell_name](H), H, REFERENCE
    else:
        cell = from_spec(cell_name, H)
        out_size, reference = cell.output_size, MODEL_REFERENCE
    k = jax.random.split(key, 4)
    params = cell.init(k[0], D)
    readout = bptt_jax.init_readout(k[1], out_size, O)
    xs = jax.random.normal(k[2], (T, B, D), jnp.float32)
    targets = jax.random.randint(k[3], (T, B), 0, O, jnp.int32)
    return Problem(cell_name, T, B, D, H, O, cell, params, readout, xs, targets, reference)


# ------------------------------------------------------------------------------- variants
#: A loss builder: ``build(cell, targets, truncate) -> loss(params, readout, xs) -> scalar``.
LossBuilder = Callable[[Any, jax.Array, "int | None"], Callable[..., jax.Array]]


def sequence_loss_variant(backward: str, **options) -> LossBuilder:
    """The benchmark loss through ``bptt_jax.sequence_loss(..., backward=backward, **options)``."""

    def build(cell, targets, truncate=None):
        def loss(params, readout, xs):
            return bptt_jax.sequence_loss(
                cell, params, readout, xs, targets, truncate=truncate, backward=backward, **options
            )

        return loss

    return build


def composed_autodiff(model, targets, truncate=None) -> Callable[..., jax.Array]:
    """The benchmark loss through :func:`unroll_composed`: ``jax.grad`` of per-cell plain
    scans, composed by the benchmark (no truncation)."""
    if truncate is not None:
        raise ValueError("composed_autodiff: no truncation")

    def loss(params, readout, xs):
        return xent_mean(unroll_composed(model, params, xs), readout, targets)

    return loss


#: Every gradient path the benchmarks can time, by name; configs name them. A new path is one
#: entry, e.g. ``"checkpointed": sequence_loss_variant("checkpointed", segment=64)``. An entry
#: whose loss fails to trace (a backward the engine does not have yet) is reported unavailable
#: and skipped where a config lists it (see :func:`unavailable`).
VARIANTS: dict[str, LossBuilder] = {
    "manual": sequence_loss_variant("manual"),
    "autodiff": sequence_loss_variant("autodiff"),
    "checkpointed": sequence_loss_variant("checkpointed"),  # segment ~ sqrt(T)
    # the precision policy: bfloat16 compute, float32 params, carries and sums
    "bf16": sequence_loss_variant("manual", compute_dtype=jnp.bfloat16),
    "bf16_autodiff": sequence_loss_variant("autodiff", compute_dtype=jnp.bfloat16),
    # jax.grad of the per-cell plain scans, composed layer by layer in the benchmark
    "composed_autodiff": composed_autodiff,
}
#: The variant every other is checked against: ``jax.grad`` of the plain per-step scan.
REFERENCE = "autodiff"
#: The reference of a model problem (a Stack or Bidirectional): the per-cell plain scans,
#: composed by the benchmark itself, so the check of a model's ``backward="autodiff"`` and
#: ``"manual"`` does not rest on the engine's own model code.
MODEL_REFERENCE = "composed_autodiff"

_unavailable_cache: dict[str, str | None] = {}


def unavailable(name: str) -> str | None:
    """``None`` when variant ``name`` traces on a tiny problem; else why not (one line)."""
    if name not in _unavailable_cache:
        p = make_problem("elman", 4, 2, 3, 5, 3, jax.random.key(0))
        loss = VARIANTS[name](p.cell, p.targets, None)
        try:
            jax.eval_shape(jax.grad(loss, argnums=(0, 1)), p.params, p.readout, p.xs)
            _unavailable_cache[name] = None
        except Exception as e:  # noqa: BLE001 - any failure to trace means "not available"
            _unavailable_cache[name] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return _unavailable_cache[name]


def grad_function(problem: Problem, variant: str, truncate: int | None = None):
    """``jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))``: (params, readout, xs) ->
    ``(loss, (d params, d readout))``."""
    loss = VARIANTS[variant](problem.cell, problem.targets, truncate)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


# ------------------------------------------------------------------------------- memory
def memory_of(compiled) -> dict[str, int | None]:
    """XLA's memory account of a compiled program, in bytes (``None`` where not reported)."""
    try:
        mem = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        mem = None
    out: dict[str, int | None] = {}
    for key, attr in (
        ("temp_bytes", "temp_size_in_bytes"),
        ("argument_bytes", "argument_size_in_bytes"),
        ("output_bytes", "output_size_in_bytes"),
        ("code_bytes", "generated_code_size_in_bytes"),
    ):
        v = getattr(mem, attr, None) if mem is not None else None
        out[key] = int(v) if v is not None else None
    return out


def device_peak_bytes() -> int | None:
    """The device's ``peak_bytes_in_use`` (GPU, TPU), or ``None`` (CPU)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return int(stats["peak_bytes_in_use"])


# ------------------------------------------------------------------------------- timing
@dataclasses.dataclass
class Timed:
    """Something ready to time: ``run()`` does one gradient step and blocks until it is done.

    Built only after its check passed (``check`` records the error against the reference).
    """

    name: str
    run: Callable[[], Any]
    compile_s: float | None  # jit + compile (or, for eager peers, the first call)
    memory: dict[str, int | None]
    check: dict[str, Any]


#: Samples at least this long are not preceded by settle calls (see :func:`time_interleaved`).
SETTLE_BELOW_S = 0.1


def time_interleaved(
    runs: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    min_sample_s: float = 0.0,
    settle: int = 0,
) -> dict[str, dict[str, Any]]:
    """Median, quartiles and min seconds per call of each ``run``, sampled in turn.

    Each round takes one sample of every variant, rotating which goes first, so that drift of
    the machine and the order within a round affect all alike. A sample is ``number`` calls
    (``number`` grows until a sample lasts ``min_sample_s``); its time is per call. ``settle``
    untimed calls of a variant go right before each of its samples when a sample lasts under
    :data:`SETTLE_BELOW_S`: runtimes with their own thread pools (PyTorch's OpenMP threads
    spin for a while after each call) otherwise slow down whatever is timed next, which
    measures the neighbour, not the variant; a longer sample dwarfs that.
    """
    names = list(runs)
    number, n_settle = {}, {}
    for name in names:
        per_call = math.inf
        for _ in range(max(warmup, 1)):
            start = time.perf_counter()
            runs[name]()
            per_call = time.perf_counter() - start
        number[name] = max(1, math.ceil(min_sample_s / per_call)) if min_sample_s > 0 else 1
        n_settle[name] = settle if per_call * number[name] < SETTLE_BELOW_S else 0
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            run, n = runs[name], number[name]
            for _ in range(n_settle[name]):
                run()
            start = time.perf_counter()
            for _ in range(n):
                run()
            samples[name].append((time.perf_counter() - start) / n)
    return {name: summarize(samples[name], number[name]) for name in names}


def summarize(samples: list[float], number: int = 1) -> dict[str, Any]:
    q25, q75 = (float(q) for q in np.percentile(samples, [25, 75]))
    return dict(
        median_s=statistics.median(samples),
        q25_s=q25,
        q75_s=q75,
        iqr_s=q75 - q25,
        min_s=min(samples),
        max_s=max(samples),
        repeats=len(samples),
        calls_per_sample=number,
        samples_s=list(samples),
    )


# ------------------------------------------------------------------------------- checking
class EntryFailed(RuntimeError):
    """An entry could not be prepared (compile error, out of memory, ...): it is not timed."""


class CheckFailed(EntryFailed):
    """A gradient path disagrees with the reference: it must not be timed."""


def _leaves(out) -> list[tuple[str, Any]]:
    paths, _ = jax.tree_util.tree_flatten_with_path(out)
    return [(jax.tree_util.keystr(p), v) for p, v in paths]


def leaf_errors(out, ref) -> dict[str, float]:
    """Normwise relative error of the value and of every gradient leaf (inf where not finite)."""
    got, want = _leaves(out), _leaves(ref)
    if [k for k, _ in got] != [k for k, _ in want]:
        raise CheckFailed(f"output structure {[k for k, _ in got]} != {[k for k, _ in want]}")
    errors = {}
    for (name, a), (_, b) in zip(got, want):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            raise CheckFailed(f"{name}: shape {a.shape} != reference {b.shape}")
        err = relative_error(a, b) if np.all(np.isfinite(a)) else math.inf
        errors[name] = math.inf if math.isnan(err) else err
    return errors


def _pretty(path: str) -> str:
    """A leaf of ``(value, (d params, d readout))`` by name: ``value``, ``params.w_h``, ..."""
    for prefix, name in (("[0]", "value"), ("[1][0]", "params"), ("[1][1]", "readout")):
        if path.startswith(prefix):
            return name + path[len(prefix) :]
    return path


def check(what: str, name: str, out, ref, tol: float, reference: str = REFERENCE) -> float:
    """The max relative error of ``out`` against the reference ``ref``; raises
    :class:`CheckFailed` naming every leaf and its error when it exceeds ``tol`` (whether the
    value itself agrees tells a wrong forward from a wrong backward)."""
    errors = {_pretty(k): v for k, v in leaf_errors(out, ref).items()}
    worst = max(errors.values())
    if not worst <= tol:
        where = max(errors, key=errors.get)
        leaves = ", ".join(f"{k} {v:.2g}" for k, v in errors.items())
        raise CheckFailed(
            f"{what}: '{name}' disagrees with '{reference}': max relative error {worst:.3g} "
            f"at {where} > tolerance {tol:.3g} (value and every gradient leaf: {leaves})"
        )
    return worst


# ------------------------------------------------------------------------------- session
class Session:
    """One benchmark run: the config, problems and checked, compiled variants (cached), and
    the failures and notes collected on the way."""

    def __init__(self, cfg, print_fn: Callable[..., None] = print):
        self.cfg = cfg
        self.print = print_fn
        self.key = jax.random.key(cfg.seed)
        self.failures: list[dict[str, str]] = []
        self.notes: list[str] = []
        self._problems: dict[tuple, Problem] = {}
        self._compiled: dict[tuple, Timed] = {}
        self._reference: dict[tuple, tuple] = {}  # (output, compile_s, compiled, args)

    # -- problems and tolerance
    def problem(self, cell_name: str, T: int, B: int, D: int, H: int) -> Problem:
        k = (cell_name, T, B, D, H)
        if k not in self._problems:
            key = jax.random.fold_in(self.key, zlib.crc32(repr(k).encode()) % 2**31)
            self._problems[k] = make_problem(cell_name, T, B, D, H, self.cfg.outputs, key)
        return self._problems[k]

    def tolerance(self, T: int) -> float:
        c = self.cfg.check
        return c.rtol * math.sqrt(max(1.0, T / c.long_T))

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.print(f"  note: {text}", flush=True)

    def fail(self, part: str, entry: str, error: BaseException | str) -> None:
        msg = str(error)
        self.failures.append(dict(part=part, entry=entry, error=msg))
        bar = "!" * 78
        print(f"{bar}\nFAILED {part}: {entry}\n  {msg}\n  (not timed)\n{bar}", file=sys.stderr)
        sys.stderr.flush()

    # -- compiled, checked gradient paths
    def _compile(self, problem: Problem, variant: str, truncate: int | None):
        fn = grad_function(problem, variant, truncate)
        args = (problem.params, problem.readout, problem.xs)
        start = time.perf_counter()
        compiled = fn.lower(*args).compile()
        compile_s = time.perf_counter() - start
        return compiled, args, compile_s

    def reference(self, problem: Problem, truncate: int | None) -> tuple:
        """The reference output (``problem.reference``, same truncation), computed once per
        problem."""
        k = (id(problem), truncate)
        if k not in self._reference:
            compiled, args, compile_s = self._compile(problem, problem.reference, truncate)
            out = jax.block_until_ready(compiled(*args))
            if not all(np.all(np.isfinite(np.asarray(v))) for _, v in _leaves(out)):
                raise CheckFailed(
                    f"{problem.label}: the reference ({problem.reference}) is not finite"
                )
            self._reference[k] = (out, compile_s, compiled, args)
        return self._reference[k]

    def prepare(
        self,
        problem: Problem,
        variant: str,
        truncate: int | None = None,
        tolerance: float | None = None,
    ) -> Timed:
        """Compile ``variant`` on ``problem``, check it against the reference, return it ready
        to time (cached). Raises :class:`CheckFailed` when it disagrees, :class:`EntryFailed`
        when it cannot compile or run: either way the entry is reported, never timed.
        ``tolerance``: instead of :meth:`tolerance` (e.g. a bfloat16 variant's)."""
        k = (id(problem), variant, truncate)
        if k not in self._compiled:
            try:
                self._compiled[k] = self._prepare(problem, variant, truncate, tolerance)
            except EntryFailed:
                raise
            except Exception as e:  # noqa: BLE001 - reported as this entry's failure
                what = problem.label + (f" truncate={truncate}" if truncate else "")
                raise EntryFailed(f"{what}: '{variant}': {type(e).__name__}: {e}") from e
        return self._compiled[k]

    def _prepare(self, problem: Problem, variant: str, truncate: int | None, tolerance) -> Timed:
        ref_out, ref_compile_s, ref_compiled, ref_args = self.reference(problem, truncate)
        tol = self.tolerance(problem.T) if tolerance is None else tolerance
        what = f"{problem.label}" + (f" truncate={truncate}" if truncate else "")
        if variant == problem.reference:
            compiled, args, compile_s = ref_compiled, ref_args, ref_compile_s
            err = 0.0
        else:
            compiled, args, compile_s = self._compile(problem, variant, truncate)
            out = jax.block_until_ready(compiled(*args))
            err = check(what, variant, out, ref_out, tol, problem.reference)
        memory = memory_of(compiled)
        memory["device_peak_bytes"] = device_peak_bytes()  # after its first run (the check)
        return Timed(
            name=variant,
            run=lambda: jax.block_until_ready(compiled(*args)),
            compile_s=compile_s,
            memory=memory,
            check=dict(reference=problem.reference, max_rel_err=err, tolerance=tol, passed=True),
        )

    def measure(
        self,
        problem: Problem,
        timed: dict[str, Timed],
        settle: int = 0,
        repeats: int | None = None,
        warmup: int | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Time ``timed`` side by side (interleaved); one record per entry with every number.

        ``settle``: untimed calls of an entry before each of its samples that is shorter
        than :data:`SETTLE_BELOW_S` (see :func:`time_interleaved`). ``repeats``, ``warmup``:
        a part's own counts instead of ``timing``'s (``None``: those)."""
        t = self.cfg.timing
        stats = time_interleaved(
            {name: v.run for name, v in timed.items()},
            t.repeats if repeats is None else repeats,
            t.warmup if warmup is None else warmup,
            t.min_sample_s,
            settle,
        )
        return {name: record(problem.tokens, v, stats[name]) for name, v in timed.items()}


def record(tokens: int, timed: Timed, s: dict[str, Any]) -> dict[str, Any]:
    """One timed entry's record: ``timed`` 's compile time, memory and check with the
    statistics ``s`` of :func:`time_interleaved` and ``tokens`` (T*B) per second."""
    return dict(
        **{k: s[k] for k in ("median_s", "q25_s", "q75_s", "iqr_s", "min_s", "max_s")},
        tokens_per_s=tokens / s["median_s"],
        compile_s=timed.compile_s,
        **timed.memory,
        check=timed.check,
        repeats=s["repeats"],
        calls_per_sample=s["calls_per_sample"],
        samples_s=s["samples_s"],
    )


# ------------------------------------------------------------------------------- environment
def environment() -> dict[str, Any]:
    """The machine and versions the numbers were taken on."""
    dev = jax.devices()[0]
    env = dict(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        jax=jax.__version__,
        jaxlib=_version("jaxlib"),
        bptt_jax=bptt_jax.__version__,
        numpy=np.__version__,
        python=platform.python_version(),
        backend=jax.default_backend(),
        device_kind=dev.device_kind,
        device_count=jax.device_count(),
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
        processor=platform.processor() or None,
        dtype="float32",
        matmul_precision=str(jax.config.jax_default_matmul_precision),
        xla_python_client_preallocate=os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
    )
    for lib in ("torch", "flax"):
        mod = sys.modules.get(lib)
        env[lib] = getattr(mod, "__version__", None) if mod else None
    return env


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def fmt_ms(s: float | None) -> str:
    if s is None:
        return "-"
    ms = s * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"
