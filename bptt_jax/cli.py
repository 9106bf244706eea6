"""The ``bptt-jax`` command line (also ``python -m bptt_jax``).

Each subcommand lives in the module of its concept, which provides ``add_cli_arguments(parser)``
and ``cli_main(args) -> int`` (the exit status).
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> (module, one-line help)
COMMANDS = {
    "verify": (
        "bptt_jax.verify",
        "check the hand-written gradients against autodiff and finite differences",
    ),
    "bench": (
        "bptt_jax.bench",
        "benchmark the hand-written BPTT: vs autodiff, truncation, peers, the floor",
    ),
    "diagnose": (
        "bptt_jax.diagnostics",
        "plot gradient flow: error norms vs time, horizons, exploding vs clipped, truncation bias",
    ),
    "train": (
        "bptt_jax.train",
        "train a model on a built-in task (adding, recall, charlm) from a TOML config",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bptt-jax",
        description="Backpropagation Through Time for JAX, with hand-written backward passes.",
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
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
