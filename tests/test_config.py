"""Config bounds are declared on the fields and checked by one checker, whose message names
the key and says the bound, for every schema: the library's (``OptimConfig``, the tasks')
and the commands' (``bptt-jax train``, ``bench``, ``diagnose``)."""

import dataclasses
import math

import pytest

from bptt_jax import config, tasks, train
from bptt_jax.cli import bench, diagnose, train_config
from bptt_jax.cli import config as cli_config
from bptt_jax.config import ConfigError, bounds, check_bounds, check_value


@dataclasses.dataclass(frozen=True)
class Inner:
    rate: float = dataclasses.field(default=0.5, metadata=bounds(gt=0, lt=1))
    sizes: tuple[int, ...] = dataclasses.field(default=(1, 2), metadata=bounds(ge=1))


@dataclasses.dataclass(frozen=True)
class Outer:
    count: int = dataclasses.field(default=1, metadata=bounds(gt=0))
    scale: float = dataclasses.field(default=1.0, metadata=bounds(gt=0, finite=True))
    depth: int | None = dataclasses.field(default=None, metadata=bounds(gt=0))
    seed: int = dataclasses.field(default=0, metadata=bounds(ge=0, lt=2**32, note="32 bits"))
    inner: Inner = Inner()
    skipped: Inner = Inner()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (dict(count=0), "config: 'count' must be a positive int; got 0"),
        (dict(scale=0.0), "config: 'scale' must be positive; got 0.0"),
        (dict(scale=math.nan), "config: 'scale' must be positive; got nan"),
        (dict(scale=math.inf), "config: 'scale' must be a finite number; got inf"),
        (dict(depth=-1), "config: 'depth' must be a positive int (or none); got -1"),
        (dict(seed=2**32), "config: 'seed' must be in [0, 2**32) (32 bits); got 4294967296"),
        (dict(inner=Inner(rate=1.0)), "config: 'inner.rate' must be in (0, 1); got 1.0"),
        (dict(inner=Inner(sizes=(3, 0))), "config: 'inner.sizes[1]' must be >= 1; got 0"),
    ],
)
def test_the_checker_names_the_key_and_says_the_bound(value, message):
    with pytest.raises(ConfigError) as e:
        check_bounds(Outer(**value), skip=("skipped",))
    assert str(e.value) == message


def test_a_value_within_its_bounds_or_left_out_passes_and_skipped_tables_are_left_alone():
    check_bounds(Outer(depth=None, skipped=Inner(rate=5.0)), skip=("skipped",))
    with pytest.raises(ConfigError, match="'skipped.rate'"):
        check_bounds(Outer(skipped=Inner(rate=5.0)))


def test_a_value_without_a_field_is_checked_by_the_same_rule():
    check_value("n", 3, ge=1)
    with pytest.raises(ConfigError, match=r"^config: JAX_N must be >= 1 \(processes\); got 0$"):
        check_value("n", 0, ge=1, note="processes", label="JAX_N")


def test_config_error_is_a_value_error_importable_where_it_was():
    assert issubclass(ConfigError, ValueError)
    for module in (config, cli_config, train, tasks):
        assert module.ConfigError is ConfigError


@pytest.mark.parametrize(
    ("schema", "overrides", "check", "match"),
    [
        (train_config.Config, ["train.batch_size=0"], train_config.check_config,
         r"'train.batch_size' must be a positive int; got 0"),
        (train_config.Config, ["parallel.devices=-1"], train_config.check_config,
         r"'parallel.devices' must be >= 0 \(0: all devices\); got -1"),
        (train_config.Config, ["task=recall", "recall.alphabet=1"], train_config.check_config,
         r"'recall.alphabet' must be >= 2; got 1"),
        (bench.BenchConfig, ["timing.warmup=-1"], bench.check_config,
         r"'timing.warmup' must be >= 0; got -1"),
        (bench.BenchConfig, ["scaling.T=[8, 0]"], bench.check_config,
         r"'scaling.T\[1\]' must be >= 1; got 0"),
        (diagnose.DiagnoseConfig, ["fraction=1.5"], diagnose.check_config,
         r"'fraction' must be in \(0, 1\); got 1.5"),
        (diagnose.DiagnoseConfig, ["train.lr=0"], diagnose.check_config,
         r"'train.lr' must be positive; got 0.0"),
    ],
)  # fmt: skip
def test_every_commands_schema_declares_its_bounds(schema, overrides, check, match, tmp_path):
    cfg = cli_config.load(schema, None, overrides)
    if hasattr(cfg, "out"):
        cfg = dataclasses.replace(cfg, out=str(tmp_path))
    with pytest.raises(ConfigError, match=match):
        check(cfg)


def test_the_library_checks_a_config_built_in_python_as_the_commands_do():
    with pytest.raises(ConfigError, match=r"'optim.momentum' must be in \[0, 1\)"):
        train.make_optimizer(train.OptimConfig(momentum=1.0))
    with pytest.raises(ConfigError, match="'adding.seq_len' must be >= 2; got 1"):
        tasks.make_task("adding", tasks.AddingConfig(seq_len=1))
