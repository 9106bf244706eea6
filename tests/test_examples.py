"""The scripts in ``examples/`` run, at their ``--tiny`` size, as a user runs them.

Each runs in a fresh interpreter (default float32, no x64, no strict dtype promotion), must
exit 0 and end with its final metric (``final NAME VALUE``, a finite number). A script that
needs an optional package says it skips and exits 0 when the package is missing; its test
then checks that message.
"""

import importlib.util
import math
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

#: script -> (the package it needs, or None; the metric it ends with)
EXAMPLES = {
    "classify_bilstm.py": (None, "accuracy"),
    "charlm_tbptt.py": (None, "bpc"),
    "torch_finetune.py": ("torch", "test_mse"),
    "nnx_train.py": ("flax", "test_mse"),
    "equinox_train.py": ("equinox", "test_mse"),
    "custom_cell.py": (None, "test_mse"),
    "data_parallel.py": (None, "train_mse"),
    "long_sequence.py": (None, "bpc"),
    "recurrent_ppo.py": ("gymnax", "return"),
}


def test_every_example_is_tested():
    scripts = sorted(p.name for p in (ROOT / "examples").glob("*.py"))
    assert set(EXAMPLES) <= set(scripts), scripts


#: The examples the default run executes (a classifier and the multi-device one); the other
#: scripts run under ``-m slow``: each is a fresh interpreter compiling its own programs.
DEFAULT_EXAMPLES = ("classify_bilstm.py", "data_parallel.py")


@pytest.mark.parametrize(
    "script",
    [
        pytest.param(s, marks=() if s in DEFAULT_EXAMPLES else pytest.mark.slow)
        for s in sorted(EXAMPLES)
    ],
)
def test_example_runs_at_tiny_size_and_prints_its_final_metric(script):
    needs, metric = EXAMPLES[script]
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--tiny"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )  # (the suite's XLA flags are inherited: tests/conftest.py)
    log = out.stdout[-3000:] + out.stderr[-3000:]
    assert out.returncode == 0, log
    if needs is not None and importlib.util.find_spec(needs) is None:
        assert f"{needs} is not installed: skipping" in out.stdout, log
        return
    last = out.stdout.strip().splitlines()[-1]
    found = re.fullmatch(rf"final {metric} (\S+)", last)
    assert found and math.isfinite(float(found.group(1))), log
