"""The ``bptt-jax`` command line (also ``python -m bptt_jax``): the applications over the library.

Each subcommand is a module of this package (``train``, ``verify``, ``diagnose``, ``bench``),
which provides ``add_cli_arguments(parser)`` and ``cli_main(args) -> int`` (the exit status).
The package uses the library (``bptt_jax``) and is never imported by it; what its commands
read, the shipped configs and the benchmark scripts, comes with it (:func:`config.shipped`).

**Compilation cache.** Every command turns on JAX's persistent compilation cache, so a
program compiled once (XLA:GPU takes 10 to 18 s for some gradient programs) is read from disk
the next time: in ``$BPTT_JAX_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/bptt_jax/xla``
(``~/.cache/bptt_jax/xla``). ``--cache-dir DIR`` overrides it for one run and
``--no-compile-cache`` turns it off. Programs that compile in under
:data:`CACHE_MIN_COMPILE_S` seconds are not written. A multi-process run on CPUs turns it off
(:func:`bptt_jax.cli.distributed.initialize`: a cached CPU program with collectives across
processes hangs).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

#: Programs compiling faster than this are not cached (JAX's own default is 1 s).
CACHE_MIN_COMPILE_S = 0.25


def default_cache_dir() -> Path:
    """``$BPTT_JAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/bptt_jax/xla`` (``~/.cache/...``)."""
    if os.environ.get("BPTT_JAX_CACHE_DIR"):
        return Path(os.environ["BPTT_JAX_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "bptt_jax" / "xla"


def enable_compile_cache(directory: str | Path | None = None) -> Path | None:
    """Turn on JAX's persistent compilation cache in ``directory`` (default:
    :func:`default_cache_dir`); returns the directory, or ``None`` (with a warning on
    stderr) when it cannot be created: the cache only saves compile time, so the command
    runs without it."""
    import jax

    path = Path(directory).expanduser() if directory else default_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(
            f"bptt-jax: warning: no compilation cache: cannot create {str(path)!r} "
            f"({e.strerror}; set --cache-dir or BPTT_JAX_CACHE_DIR); compiling afresh",
            file=sys.stderr,
        )
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_S)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


#: subcommand -> (module, one-line help)
COMMANDS = {
    "verify": (
        "bptt_jax.cli.verify",
        "check the hand-written gradients against autodiff and finite differences",
    ),
    "bench": (
        "bptt_jax.cli.bench",
        "benchmark the hand-written BPTT: vs autodiff, truncation, peers, the floor",
    ),
    "diagnose": (
        "bptt_jax.cli.diagnose",
        "plot gradient flow: error norms vs time, horizons, exploding vs clipped, truncation bias",
    ),
    "train": (
        "bptt_jax.cli.train",
        "train a model on a built-in task (adding, recall, charlm) from a TOML config",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bptt-jax",
        description="Backpropagation Through Time for JAX, with hand-written backward passes.",
    )
    parser.add_argument(
        "--no-compile-cache",
        action="store_true",
        help="do not use JAX's persistent compilation cache",
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="the compilation cache's directory (default: $BPTT_JAX_CACHE_DIR, else "
        "~/.cache/bptt_jax/xla)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_cli_arguments(p)
        p.set_defaults(run=mod.cli_main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.no_compile_cache:
        enable_compile_cache(args.cache_dir)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
