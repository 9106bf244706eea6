"""TOML configs read into dataclass schemas, with ``KEY=VALUE`` overrides from the command line.

Every command (``bptt-jax train``, ``bench``, ``diagnose``) describes its settings as nested
frozen dataclasses with defaults. :func:`load` reads a TOML file into that schema and then
applies ``KEY=VALUE`` overrides (``train.steps=500``, ``model.cell="gru"``). Nothing is
guessed: an unknown key, a value of the wrong type or a value outside its choices raises
:class:`~bptt_jax.config.ConfigError` naming the key, before any work starts; the bounds
declared on the fields (:mod:`bptt_jax.config`) are the command's to check.

A config is named by a path or by the name of one the package ships (``adding``,
``bench_tiny``: :func:`shipped`).

Example:
  >>> import dataclasses
  >>> @dataclasses.dataclass(frozen=True)
  ... class Opt:
  ...     name: str = "adam"
  ...     lr: float = 1e-3
  >>> @dataclasses.dataclass(frozen=True)
  ... class Cfg:
  ...     seed: int = 0
  ...     opt: Opt = Opt()
  >>> load(Cfg, None, ["opt.lr=0.1", "seed=3"])
  Cfg(seed=3, opt=Opt(name='adam', lr=0.1))
  >>> load(Cfg, None, ["opt.beta=0.9"])
  Traceback (most recent call last):
  ...
  bptt_jax.config.ConfigError: config: unknown key 'opt.beta'; valid keys in 'opt': lr, name
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import os
import sys
import tomllib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from bptt_jax.config import ConfigError as ConfigError

T = TypeVar("T")


def shipped(folder: str) -> Path:
    """A folder the commands read, ``"configs"`` or ``"benchmarks"``: inside the installed
    package (``bptt_jax/cli/<folder>``, where a wheel carries the repository's top-level
    folder of that name, see ``pyproject.toml``), else the repository's own (an editable
    install, or a checkout on ``sys.path``)."""
    packaged = importlib.resources.files(__package__) / folder
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / folder


#: Where the configs shipped with the package live (see :func:`shipped`).
CONFIG_DIR = shipped("configs")


def resolve(name_or_path: str | Path) -> Path:
    """A config file path: an existing path, or the name of one the package ships.

    ``"adding"`` and ``"adding.toml"`` both find the shipped ``configs/adding.toml``.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    stem = path.name.removesuffix(".toml")
    shipped = CONFIG_DIR / f"{stem}.toml"
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.toml")) if CONFIG_DIR.is_dir() else []
    raise ConfigError(
        f"config: file {str(name_or_path)!r} not found; give a path to a TOML file or one of "
        f"the shipped names: {', '.join(names) or '(none found)'}"
    )


def check_directory(key: str, value: str) -> None:
    """``value`` is, or can be made, a writable directory: checked before any work, so that
    a run does not fail at its first write (a checkpoint, a results file) after it."""
    path = Path(value).expanduser()
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(
            f"config: '{key}' {value!r} cannot be a directory: {str(ancestor)!r} is a file"
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"config: '{key}' {value!r}: {str(ancestor)!r} is not writable")


def available_memory() -> int | None:
    """Bytes of memory a run on this machine can use at most, read without starting JAX: the
    host's physical RAM, or the container's limit (cgroup v2 ``memory.max``, v1
    ``memory.limit_in_bytes``) where lower; ``None`` where neither can be read. A device's own
    memory is not asked for: that would start JAX's backend, which must wait for
    ``jax.distributed`` (see :func:`bptt_jax.cli.train_config.build`)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        total = None
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            value = int(Path(limit).read_text().strip())  # "max" (no limit): ValueError
        except (OSError, ValueError):
            continue
        if value > 0:
            total = value if total is None else min(total, value)
    return total if total and total > 0 else None


def load(schema: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Read ``path`` (TOML; ``None`` for the schema's defaults), apply overrides, check types.

    Args:
      schema: a dataclass type whose fields have defaults; nested dataclasses are TOML tables.
      path: a TOML file, a shipped config's name (see :func:`resolve`), or ``None``.
      overrides: ``"KEY=VALUE"`` strings; dotted keys reach into tables, the value is parsed
        as a TOML value (``3``, ``0.1``, ``true``, ``"gru"``, ``[16, 32]``) and otherwise
        taken as a bare string (``model.cell=gru``).

    Returns:
      An instance of ``schema``.

    Raises:
      ConfigError: unknown key, wrong type, bad choice, unreadable file or TOML syntax error.
    """
    data: dict[str, Any] = {}
    if path is not None:
        file = resolve(path)
        try:
            with open(file, "rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config: {file} is not valid TOML: {e}") from None
        except UnicodeDecodeError as e:  # TOML is UTF-8 (tomllib decodes before parsing)
            line = e.object[: e.start].count(b"\n") + 1
            raise ConfigError(
                f"config: {file} is not UTF-8 text (a TOML file must be): byte "
                f"0x{e.object[e.start]:02x} on line {line}; save the file as UTF-8"
            ) from None
        except OSError as e:
            raise ConfigError(f"config: {file} cannot be read: {e.strerror or e}") from None
    for item in overrides:
        key, value = parse_override(item)
        _set(data, key, value)
    return from_dict(schema, data)


def parse_override(item: str) -> tuple[str, Any]:
    """``"a.b=VALUE"`` -> ``("a.b", value)`` with VALUE parsed as TOML, else a string."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"config: override {item!r} must look like KEY=VALUE (e.g. seed=1)")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, value


def _set(data: dict, key: str, value):
    *tables, last = key.split(".")
    node = data
    for i, t in enumerate(tables):
        node = node.setdefault(t, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config: '{'.'.join(tables[: i + 1])}' is a value, not a table")
    node[last] = value


def from_dict(schema: type[T], data: dict, where: str = "") -> T:
    """Build ``schema`` from a nested dict, checking every key and value."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: '{where}' must be a table; got {data!r}")
    hints = _field_types(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in data:
        if key not in fields:
            full = f"{where}.{key}" if where else key
            raise ConfigError(
                f"config: unknown key '{full}'; valid keys"
                f"{f' in {where!r}' if where else ''}: {', '.join(sorted(fields))}"
            )
    kwargs = {}
    for name in fields:
        if name in data:
            full = f"{where}.{name}" if where else name
            kwargs[name] = _convert(hints[name], data[name], full)
    return schema(**kwargs)


def _field_types(schema) -> dict:
    """Field name -> type, with string annotations resolved in the schema's module."""
    try:
        return typing.get_type_hints(schema)
    except NameError:  # a schema defined in a local scope (a test, a doctest)
        out = {}
        for f in dataclasses.fields(schema):
            if isinstance(f.type, str) and dataclasses.is_dataclass(f.default):
                out[f.name] = type(f.default)
            elif isinstance(f.type, str):
                out[f.name] = eval(f.type, vars(sys.modules[schema.__module__]), dict(vars(typing)))
            else:
                out[f.name] = f.type
        return out


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _convert(tp, value, key: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, key)
            except ConfigError:
                errors.append(_type_name(a))
        raise ConfigError(
            f"config: '{key}' must be {' or '.join(errors)}"
            f"{' or none' if type(None) in args else ''}; got {value!r}"
        )
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"config: '{key}' must be one of {', '.join(repr(c) for c in choices)}; "
                f"got {value!r}"
            )
        return value
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            value = [value]  # a single value where a list is expected: ``k=64``
        elem = args[0] if args else Any
        return tuple(_convert(elem, v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not -(2**63) <= value < 2**63:  # no setting is wider than a 64-bit int
                raise ConfigError(f"config: '{key}' is out of range (a 64-bit int); got {value}")
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):  # TOML's nan and inf: no setting means either
                raise ConfigError(f"config: '{key}' must be a finite number; got {value!r}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    raise ConfigError(
        f"config: '{key}' must be {_type_name(tp)}; got {value!r} ({type(value).__name__})"
    )


def to_dict(cfg) -> dict:
    """The config as a plain nested dict (tuples as lists), e.g. for a JSON results file."""

    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def add_arguments(parser, default: str | None = None) -> None:
    """Add ``[CONFIG] [KEY=VALUE ...]`` to an argparse parser (see :func:`from_args`)."""
    parser.set_defaults(config_default=default)
    parser.add_argument(
        "config",
        nargs="?",
        default=default,
        help="a TOML file or the name of one in configs/"
        + (f" (default: {default})" if default else ""),
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="override any value of the config, by its dotted TOML key (e.g. seed=1)",
    )


def from_args(schema: type[T], args) -> T:
    """The config named by parsed ``args.config`` with ``args.overrides`` applied."""
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).is_file():
        # only overrides were given: they belong to the default config
        config, overrides = getattr(args, "config_default", None), [config, *overrides]
    return load(schema, config, overrides)
