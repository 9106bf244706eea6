"""The documentation runs: the README's tour and every docstring example (the guides'
code blocks: tests/test_guides.py).

Each runs in a fresh interpreter, as a user would run it: default float32, no x64, no strict
dtype promotion (the settings conftest.py turns on for the rest of the suite). The docstring
examples of every module run in one interpreter (one JAX start-up, not one per module), one
module after the other, each reported by its own test; conftest.py keeps this file on one
xdist worker, so that interpreter runs once.
"""

import json
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
    # (the interpreter inherits the suite's XLA flags: tests/conftest.py)
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


@pytest.fixture(scope="module")
def doctest_results():
    """``{module: (attempted, failed, report)}`` for every module in MODULES, their examples
    run by ``doctest.testmod`` in one fresh interpreter (each module's report captured)."""
    code = (
        "import contextlib, doctest, importlib, io, json\n"
        "results = {}\n"
        f"for name in {MODULES!r}:\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out):\n"
        "        m = importlib.import_module(name)\n"
        "        r = doctest.testmod(m, optionflags=doctest.ELLIPSIS)\n"
        "    results[name] = (r.attempted, r.failed, out.getvalue())\n"
        "print('RESULTS ' + json.dumps(results))\n"
    )
    out = _run(code)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULTS ")]
    assert out.returncode == 0 and line, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(line[0][len("RESULTS ") :])


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples_run(module, doctest_results):
    attempted, failed, report = doctest_results[module]
    assert attempted and not failed, report
