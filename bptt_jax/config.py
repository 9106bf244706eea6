"""Config dataclasses: bounds declared on their fields, one checker, and :class:`ConfigError`.

A setting's range is part of its declaration, beside its type and default::

    @dataclasses.dataclass(frozen=True)
    class OptimConfig:
        learning_rate: float = field(default=1e-3, metadata=bounds(gt=0, finite=True))
        momentum: float = field(default=0.9, metadata=bounds(ge=0, lt=1))

and :func:`check_bounds` checks every such field of a config (nested tables too), naming the
key: ``config: 'optim.momentum' must be in [0, 1); got 5``. What depends on several fields
(``train.k1 <= train.k2``) is checked by the config's owner after its bounds. The library
raises :class:`ConfigError` for a config it is given (:func:`bptt_jax.train.make_optimizer`,
:func:`bptt_jax.tasks.make_task`); the ``bptt-jax`` commands read TOML files into the same
dataclasses (:mod:`bptt_jax.cli.config`).

Example:
  >>> import dataclasses
  >>> @dataclasses.dataclass(frozen=True)
  ... class Opt:
  ...     lr: float = dataclasses.field(default=1e-3, metadata=bounds(gt=0))
  ...     steps: tuple[int, ...] = dataclasses.field(default=(10,), metadata=bounds(ge=1))
  >>> check_bounds(Opt(lr=0.1), "opt")
  >>> check_bounds(Opt(steps=(5, 0)), "opt")
  Traceback (most recent call last):
  ...
  bptt_jax.config.ConfigError: config: 'opt.steps[1]' must be >= 1; got 0
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple


class ConfigError(ValueError):
    """A config (a file, an override or a dataclass built in Python) that does not fit its
    schema: unknown key, wrong type, value out of bounds; the message names the key."""


class Bounds(NamedTuple):
    """A field's allowed range (``None``: unbounded on that side); ``finite`` also refuses
    ``inf``; ``note`` says why, in the message."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    finite: bool = False
    note: str = ""


def bounds(*, gt=None, ge=None, lt=None, le=None, finite: bool = False, note: str = "") -> dict:
    """Field metadata declaring a range: ``dataclasses.field(default=..., metadata=bounds(gt=0))``.

    On a tuple field the bounds hold for every element; a ``None`` value (an optional
    setting left out) is not checked.
    """
    return {"bounds": Bounds(gt, ge, lt, le, finite, note)}


def _number(x) -> str:
    """``x`` as the message shows it: a large power of two as ``2**n``."""
    if isinstance(x, int) and x >= 2**16 and x & (x - 1) == 0:
        return f"2**{x.bit_length() - 1}"
    return f"{x:g}" if isinstance(x, float) else str(x)


def _requirement(b: Bounds, integer: bool) -> str:
    """What ``b`` asks, in words: ``positive``, ``>= 1``, ``in [0, 1)``."""
    low = ("(", b.gt) if b.gt is not None else ("[", b.ge) if b.ge is not None else None
    high = (")", b.lt) if b.lt is not None else ("]", b.le) if b.le is not None else None
    if low and high:
        return f"in {low[0]}{_number(low[1])}, {_number(high[1])}{high[0]}"
    if b.gt == 0 and not high:
        return "a positive int" if integer else "positive"
    if low:
        return f"{'>' if low[0] == '(' else '>='} {_number(low[1])}"
    if high:
        return f"{'<' if high[0] == ')' else '<='} {_number(high[1])}"
    return "a finite number"


def check_value(key: str, value, *, optional: bool = False, integer: bool | None = None,
                label: str | None = None, **limits) -> None:  # fmt: skip
    """``value`` within ``bounds(**limits)``, else a :class:`ConfigError` naming ``key``.

    The one range check of every config: :func:`check_bounds` calls it per field, and a
    config's owner for a value that has no field of its own (an environment variable's).
    NaN is in no range.

    Args:
      key: the dotted config key, quoted in the message (``label``: shown as it is instead).
      value: a number.
      optional: the setting may also be ``none`` (said in the message).
      integer: the setting is an int (default: whether ``value`` is one).
      label: how the message names the setting, instead of ``'key'``.
      **limits: ``gt``, ``ge``, ``lt``, ``le``, ``finite``, ``note`` (see :func:`bounds`).
    """
    b = Bounds(**limits)
    if integer is None:
        integer = isinstance(value, int) and not isinstance(value, bool)
    ok = (
        (b.gt is None or value > b.gt)
        and (b.ge is None or value >= b.ge)
        and (b.lt is None or value < b.lt)
        and (b.le is None or value <= b.le)
        and value == value  # NaN
    )
    name = label or f"'{key}'"
    note = f" ({b.note})" if b.note else ""
    if not ok:
        also = " (or none)" if optional else ""
        raise ConfigError(
            f"config: {name} must be {_requirement(b, integer)}{also}{note}; got {value!r}"
        )
    if b.finite and not math.isfinite(value):
        raise ConfigError(f"config: {name} must be a finite number{note}; got {value!r}")


def check_bounds(cfg, where: str = "", *, skip: tuple[str, ...] = ()) -> None:
    """Every field of the dataclass ``cfg`` declared with :func:`bounds`, and every nested
    dataclass's (a TOML table), in declaration order; ``skip`` names top-level tables left
    to their owner (e.g. a task's table, checked when that task is the one run).

    Raises:
      ConfigError: the first value out of its bounds, naming its key (``where.field``).
    """
    for f in dataclasses.fields(cfg):
        if f.name in skip:
            continue
        key = f"{where}.{f.name}" if where else f.name
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_bounds(value, key)
            continue
        b = f.metadata.get("bounds")
        if b is None or value is None:
            continue
        kind = str(f.type)
        integer = "int" in kind and "float" not in kind
        if isinstance(value, tuple):
            for i, v in enumerate(value):
                check_value(f"{key}[{i}]", v, integer=integer, **b._asdict())
        else:
            check_value(key, value, optional="None" in kind, integer=integer, **b._asdict())
