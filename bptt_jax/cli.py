"""The ``bptt-jax`` command line (also ``python -m bptt_jax``)."""

from __future__ import annotations

import argparse
import sys


def _verify(args) -> int:
    from bptt_jax.verify import run_verify

    return 0 if run_verify(seed=args.seed) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bptt-jax",
        description="Backpropagation Through Time for JAX, with hand-written backward passes.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "verify",
        help="check the hand-written gradients against autodiff and finite differences",
    )
    p.add_argument("--seed", type=int, default=0, help="PRNG seed for the random problems")
    p.set_defaults(run=_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
