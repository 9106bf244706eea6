"""The documentation runs: the README's tour and every docstring example.

Each runs in a fresh interpreter, as a user would run it: default float32, no x64, no strict
dtype promotion (the settings conftest.py turns on for the rest of the suite).
"""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Every library module with a docstring example.
MODULES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts)
    for p in (ROOT / "bptt_jax").rglob("*.py")
    if ">>> " in p.read_text()
)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT
    )


def _readme_blocks():
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_tour_runs():
    blocks = _readme_blocks()
    assert blocks, "README has no python example"
    out = _run(blocks[0] + "\nprint('tour ok')\n")
    assert out.returncode == 0 and "tour ok" in out.stdout, out.stderr


def test_readme_models_example_runs():
    """The stacked bidirectional example on a padded batch (it asserts padding-freedom)."""
    (block,) = [b for b in _readme_blocks() if "bptt_jax.stacked(" in b]
    out = _run(block + "\nprint('models ok')\n")
    assert out.returncode == 0 and "models ok" in out.stdout, out.stderr


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples_run(module):
    code = (
        "import doctest, importlib, sys\n"
        f"m = importlib.import_module({module!r})\n"
        "r = doctest.testmod(m, optionflags=doctest.ELLIPSIS)\n"
        "print(r.attempted, r.failed)\n"
        "sys.exit(1 if r.failed or not r.attempted else 0)\n"
    )
    out = _run(code)
    assert out.returncode == 0, out.stdout + out.stderr
