"""``bptt-jax verify``: every cell, model kind and gradient path against autodiff and finite
differences, or the grid of one cell of your own (``--cell module:name``).

Each row is one :func:`bptt_jax.check_gradients` call; the table and the verdict are printed.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from bptt_jax.cells import GRU, LRU, LSTM, RGLRU, Elman, MinGRU, MinLSTM, protocol
from bptt_jax.models import (
    Bidirectional,
    Stack,
    build_model,
    from_spec,
    is_bidirectional,
    not_a_cell,
)
from bptt_jax.verify import (
    FD_TOLERANCE,
    TOLERANCE,
    check_gradients,
    model_name,
    policy_tolerances,
)


def _cell_configs(cell) -> list[tuple[Callable, dict]]:
    """One cell's rows, in float64 and float32: a mean cross-entropy from a zero carry, a
    summed MSE and a truncated cross-entropy with padding and a random carry, and ``unroll``
    under random cotangents."""
    rows = []
    for dtype in (jnp.float64, jnp.float32):
        common = dict(dtype=dtype, mask=True, random_carry=True)
        rows += [
            (cell, dict(common, loss="xent", reduction="mean", mask=False, random_carry=False)),
            (cell, dict(common, loss="mse", reduction="sum")),
            (cell, dict(common, loss="xent", reduction="sum", truncate=4)),
            (cell, dict(common, path="unroll")),
        ]
    return rows


def cell_grid(cell) -> list[tuple[Callable, dict]]:
    """The configurations ``bptt-jax verify --cell`` checks for one cell (a user's, see
    :class:`bptt_jax.Cell`): :func:`_cell_configs`, checkpointed BPTT, the cell in a
    2-layer :class:`~bptt_jax.Stack` and a :class:`~bptt_jax.Bidirectional` layer, and
    bfloat16 compute with float32 params."""
    common = dict(mask=True, random_carry=True)
    return [
        *_cell_configs(cell),
        (cell, dict(common, dtype=jnp.float64, loss="mse", backward="checkpointed")),
        (Stack((cell, cell)), dict(common, dtype=jnp.float64, loss="xent")),
        (Bidirectional(cell), dict(common, dtype=jnp.float64, path="unroll")),
        (cell, dict(dtype=jnp.float32, compute_dtype=jnp.bfloat16, seq_len=64, loss="xent")),
    ]


def load_cell(spec: str, hidden_size: int = 6):
    """The cell ``module:name`` names (``bptt-jax verify --cell``).

    ``name`` is a cell, a cell class (called with ``hidden_size``) or a function of
    ``hidden_size`` returning one. The module is imported with the working directory on
    ``sys.path``, so a file ``my_cells.py`` there is ``my_cells:MyCell``.

    Raises:
      ValueError: ``spec`` is not ``module:name``, the module cannot be imported or has no
        ``name``, or what it names does not give a cell.
    """
    module, sep, attr = spec.partition(":")
    if not (sep and module and attr):
        raise ValueError(
            f"verify: --cell must be 'module:name' (e.g. my_cells:MyCell); got {spec!r}"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"verify: --cell {spec!r}: cannot import {module!r}: {e}") from None
    if not hasattr(mod, attr):
        raise ValueError(f"verify: --cell {spec!r}: module {module!r} has no {attr!r}")
    obj = getattr(mod, attr)
    cell = obj
    if isinstance(obj, type) or (callable(obj) and not protocol.is_cell(obj)):
        try:
            cell = obj(hidden_size)
        except Exception as e:  # noqa: BLE001 (any failure of the user's constructor)
            raise ValueError(
                f"verify: --cell {spec!r}: {attr}({hidden_size}) raised {type(e).__name__}: {e}"
            ) from None
    if not protocol.is_cell(cell):
        raise ValueError(not_a_cell(f"verify: --cell {spec!r}", cell))
    return cell


def _linear_configs(hidden_size: int) -> list[tuple[Callable, dict]]:
    """The linear recurrences' rows (:class:`~bptt_jax.LinearCell`: MinGRU, MinLSTM, RGLRU, LRU),
    fewer per cell than the others' (their scans are one engine path): each cell in float64
    with finite differences, a mean cross-entropy from a zero carry with the default scan
    and ``unroll`` under random cotangents with the parallel scan; a truncated summed MSE
    and float32 for two cells each; a Stack and a Bidirectional layer of two kinds,
    checkpointed BPTT, and bfloat16 compute."""
    h = hidden_size
    rows = []
    padded = dict(mask=True, random_carry=True)
    for cls in (MinGRU, MinLSTM, RGLRU, LRU):
        rows += [
            (cls(h), dict(dtype=jnp.float64, loss="xent", mask=False, random_carry=False)),
            (cls(h, scan="parallel"), dict(padded, dtype=jnp.float64, path="unroll")),
        ]
    trunc = dict(padded, dtype=jnp.float64, loss="mse", reduction="sum", truncate=4)
    f32 = dict(padded, dtype=jnp.float32, loss="xent", reduction="sum")
    bf16 = dict(dtype=jnp.float32, compute_dtype=jnp.bfloat16, seq_len=64, mask=True)
    stack = Stack((MinGRU(h, scan="parallel"), RGLRU(h - 1)))
    bi = Bidirectional(MinLSTM(h), backward=RGLRU(h - 1, scan="parallel"))
    return rows + [
        (MinLSTM(h, scan="parallel"), trunc),
        (RGLRU(h, scan="parallel"), trunc),
        (MinGRU(h), f32),
        (RGLRU(h), f32),
        (stack, dict(padded, dtype=jnp.float64, loss="xent", backward="checkpointed")),
        (bi, dict(padded, dtype=jnp.float64, path="unroll")),
        (RGLRU(h, scan="parallel"), dict(bf16, loss="xent")),
        (LRU(h, scan="parallel"), trunc),
        (LRU(h), f32),
        (Bidirectional(LRU(h)), dict(padded, dtype=jnp.float64, loss="xent")),
        (LRU(h), dict(bf16, loss="xent")),
    ]


def default_grid(hidden_size: int = 6) -> list[tuple[Callable, dict]]:
    """The configurations ``bptt-jax verify`` checks: every cell, model kind and gradient path
    (the linear recurrences: :func:`_linear_configs`)."""
    h = hidden_size
    cells = [
        *(build_model("elman", h, activation=f) for f in ("tanh", "relu", "identity")),
        build_model("lstm", h, forget_bias=1.0),
        build_model("gru", h),
    ]
    models = [
        build_model("lstm", h, layers=2, forget_bias=1.0),
        Stack((Elman(h, "tanh"), GRU(h - 1))),  # layers of two kinds and sizes
        from_spec("bigru", h),
        Bidirectional(Elman(h, "tanh"), backward=LSTM(h - 1), merge="concat"),
        from_spec("bilstm:2", h - 2),
    ]
    grid = [row for cell in cells for row in _cell_configs(cell)]
    for model in models:
        uni = not is_bidirectional(model)
        common = dict(mask=True, random_carry=True)
        grid += [
            (model, dict(common, dtype=jnp.float64, loss="xent", reduction="mean")),
            (model, dict(common, dtype=jnp.float64, path="unroll")),
            (model, dict(common, dtype=jnp.float64, loss="mse", backward="checkpointed")),
            (model, dict(common, dtype=jnp.float32, loss="mse", reduction="sum")),
        ]
        if uni:
            grid.append((model, dict(common, dtype=jnp.float64, loss="xent", truncate=4)))
    # The bfloat16 tier: float32 params, bfloat16 compute (bptt_jax.precision), on a longer
    # sequence; every cell kind and both model kinds, full, checkpointed and truncated.
    bf16 = dict(dtype=jnp.float32, compute_dtype=jnp.bfloat16, seq_len=64, mask=True)
    grid += [
        (cells[0], dict(bf16, loss="xent")),
        (cells[3], dict(bf16, loss="mse", backward="checkpointed")),
        (cells[4], dict(bf16, path="unroll", truncate=8)),
        (models[0], dict(bf16, loss="xent", truncate=8)),
        (models[2], dict(bf16, path="unroll")),
    ]
    return grid + _linear_configs(h)


def run_verify(seed: int = 0, print_fn=print, grid=None) -> bool:
    """Check every configuration of ``grid`` (default: :func:`default_grid`); print a table;
    return success."""
    if not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)
    start = time.perf_counter()
    key = jax.random.key(seed)
    grid = default_grid() if grid is None else grid
    print_fn(
        f"bptt-jax verify: {len(grid)} configurations, manual vs jax.grad of a plain "
        f"lax.scan (normwise relative error),\nand vs central finite differences in float64. "
        f"Tolerances: {TOLERANCE}, finite differences {FD_TOLERANCE:g}; bfloat16 compute: "
        f"{policy_tolerances(jnp.bfloat16)[1]:.2g} vs autodiff of the same policy (the "
        f"distance to float32 autodiff is shown, not judged: it is bfloat16's rounding). "
        f"Device: {jax.devices()[0].platform}.\n"
    )
    header = f"{'configuration':<84} {'worst leaf':<20} {'vs autodiff':>11} {'vs FD':>9}  ok"
    print_fn(header)
    print_fn("-" * len(header))
    all_ok, worst, worst_full = True, {"float64": 0.0, "float32": 0.0, "bfloat16": 0.0}, 0.0
    for n, (cell, kw) in enumerate(grid):
        try:
            report = check_gradients(cell, key=jax.random.fold_in(key, n), **kw)
        except Exception as e:  # noqa: BLE001 (a user cell may fail anywhere: a FAIL row)
            all_ok = False
            print_fn(f"{model_name(cell)} {kw}: FAIL, {type(e).__name__}: {e}")
            continue
        leaf = max(report.autodiff, key=report.autodiff.get)
        fd = max(report.finite_diff.values()) if report.finite_diff else float("nan")
        dt = jnp.dtype(kw.get("compute_dtype") or kw["dtype"]).name
        worst[dt] = max(worst[dt], report.max_error)
        worst_full = max(worst_full, max(report.full_precision.values(), default=0.0))
        all_ok &= report.passed
        fd_s = f"{fd:9.1e}" if report.finite_diff else f"{'-':>9}"
        print_fn(
            f"{report.config:<84} {leaf:<20} {report.max_error:11.1e} {fd_s}  "
            f"{'ok' if report.passed else 'FAIL'}"
        )
        if report.full_precision:
            full = max(report.full_precision.values())
            naive = max(report.naive.values())
            tol = report.full_precision_tolerance
            print_fn(
                f"    information: vs float32 autodiff {full:.1e} (typically within "
                f"{tol:.1e}); a naive bfloat16 run: {naive:.1e}"
            )
        if not report.passed:
            for name, e in report.autodiff.items():
                print_fn(
                    f"    {name:<20} vs autodiff {e:.2e}"
                    + (
                        f"  vs FD {report.finite_diff[name]:.2e}"
                        if name in report.finite_diff
                        else ""
                    )
                )
    print_fn(
        f"\nworst relative error vs autodiff: float64 {worst['float64']:.1e}, "
        f"float32 {worst['float32']:.1e}, bfloat16 compute {worst['bfloat16']:.1e} (vs "
        f"float32, information: {worst_full:.1e}); {time.perf_counter() - start:.1f} s"
    )
    print_fn("PASSED" if all_ok else "FAILED")
    return all_ok


# ------------------------------------------------------------------------------- CLI
def add_cli_arguments(parser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed for the random problems")
    parser.add_argument(
        "--cell",
        metavar="MODULE:NAME",
        help="check this cell instead of the built-in grid (e.g. my_cells:MyCell, a class "
        "called with --hidden-size): alone, checkpointed, stacked, bidirectional, bfloat16",
    )
    parser.add_argument(
        "--hidden-size", type=int, default=6, help="H of a --cell class (default 6)"
    )


def cli_main(args) -> int:
    grid = None
    if args.cell is not None:
        try:
            grid = cell_grid(load_cell(args.cell, args.hidden_size))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0 if run_verify(seed=args.seed, grid=grid) else 1
