"""What a compiled program's HLO text says: its collectives and the loops around them.

For the checks and the bench's ``parallel`` part that read a data-parallel gradient step's
program: :func:`collectives` finds every instruction that moves data between devices and how
many ``while`` loops (``lax.scan``) run it; :func:`flops` is XLA's own count of the work.
"""

from __future__ import annotations

import re
from typing import NamedTuple

#: The HLO instructions that move data between devices.
COLLECTIVE_OPS = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "collective-permute",
    "all-to-all",
    "ragged-all-to-all",
    "collective-broadcast",
)
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}  # fmt: skip
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s([a-z][\w\-]*)\(")
_CALLS = re.compile(r"\b(condition|body|calls|to_apply)=%?([\w.\-]+)")
_CALL_LISTS = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")


class Collective(NamedTuple):
    """One collective instruction of a compiled program (:func:`collectives`)."""

    op: str  # "all-reduce", "all-gather", ... (an async "-start" counts as its op)
    computation: str  # the HLO computation holding it
    loop_depth: int  # how many while loops run it: 0 outside every loop, 1 inside one, ...
    bytes: int  # the size of its result on one device (for an async start: its output)


def _shape_bytes(shape: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _BYTES.get(dtype, 4)
    return total


def collectives(hlo_text: str) -> list[Collective]:
    """The collectives of a compiled program's HLO text and the loops around each.

    ``hlo_text`` is ``jax.jit(f).lower(*args).compile().as_text()``: the per-device program
    after partitioning. A computation run as the ``body`` or ``condition`` of a ``while``
    (a ``lax.scan``) is one loop deeper than its caller; fusions and other called
    computations are as deep as their caller. A data-parallel gradient should have every
    collective at depth 0: one all-reduce per gradient after the loops, never one per step.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from bptt_jax.cli import hlo
      >>> text = jax.jit(lambda x: jnp.sin(x).sum()).lower(jnp.ones(4)).compile().as_text()
      >>> hlo.collectives(text)                         # one device: nothing crosses
      []
    """
    bodies: dict[str, list[str]] = {}
    entry, name = None, None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            head = line.split("(")[0].split()
            if not head:
                continue
            name = head[-1].lstrip("%")
            bodies[name] = []
            if head[0] == "ENTRY":
                entry = name
        elif line.startswith("}"):
            name = None
        elif name is not None:
            bodies[name].append(line)
    if entry is None:
        return []
    depth = {entry: 0}
    stack = [entry]
    while stack:  # the deepest loop nesting that reaches each computation
        comp = stack.pop()
        for line in bodies.get(comp, ()):
            callees = [
                (c, 1 if kind in ("body", "condition") and " while(" in line else 0)
                for kind, c in _CALLS.findall(line)
            ]
            for group in _CALL_LISTS.findall(line):
                callees += [(c.strip().lstrip("%"), 0) for c in group.split(",") if c.strip()]
            for callee, deeper in callees:
                d = depth[comp] + deeper
                if callee in bodies and depth.get(callee, -1) < d:
                    depth[callee] = d
                    stack.append(callee)
    found = []
    for comp, lines in bodies.items():
        if comp not in depth:
            continue
        for line in lines:
            m = _INSTRUCTION.match(line)
            if m is None:
                continue
            shape, op = m.groups()
            base = op.removesuffix("-start")
            if base not in COLLECTIVE_OPS:
                continue
            size = _shape_bytes(shape)
            if op.endswith("-start") and shape.startswith("("):  # (operands..., outputs...)
                size = _shape_bytes(shape) // 2 if base == "all-reduce" else size
            found.append(Collective(base, comp, depth[comp], size))
    return found


def flops(compiled) -> float:
    """The FLOPs XLA's cost analysis counts for one device's share of a compiled program."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older JAX: one dict per program
        cost = cost[0]
    return float(cost.get("flops", 0.0))
