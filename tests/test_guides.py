"""Every fenced ``python`` block of the guides (``docs/guides/*.md``) runs.

The blocks of one page run in order in a namespace of their own, as a reader runs the page
from top to bottom, all pages in one fresh interpreter: JAX's defaults (float32, no x64,
standard dtype promotion), not the settings conftest.py turns on for the rest of the suite
(the suite's XLA flags are inherited). Each
block is compiled with its page's path and line numbers, so a traceback names the line of
the page that failed.

A block opts out only with an HTML comment on the line just above its fence (the rendered
page does not show it):

* ``<!-- test: needs torch -->`` (one or more package names): the block runs with its page
  when every package is installed; otherwise it is left out of the page's run and
  :func:`test_block_left_out` reports it as skipped, naming the block and the package. The
  blocks after it must not depend on it.
* ``<!-- test: elsewhere tests/FILE.py (why) -->``: that test file runs the block instead
  (the data-parallel example needs 8 devices: tests/parallel_script.py runs it);
  :func:`test_block_left_out` checks that the file reads the page.

Any other ``<!-- test: ... -->`` comment, one not directly above a python fence, or a python
fence that does not start its line (which this reader would miss) fails
:func:`test_opt_outs_are_well_formed`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
GUIDES = ROOT / "docs" / "guides"
PAGES = sorted(p.name for p in GUIDES.glob("*.md"))

FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
OPT_OUT = re.compile(r"<!-- test: (needs|elsewhere) (\S.*?) -->")


@dataclasses.dataclass(frozen=True)
class Block:
    path: str  # relative to the repository root
    line: int  # the page's line of the block's first line of code
    code: str
    needs: tuple[str, ...] = ()
    elsewhere: str | None = None

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


def blocks(page: str) -> list[Block]:
    """The python blocks of ``docs/guides/<page>``, in order, with their opt-outs."""
    text = (GUIDES / page).read_text()
    lines = text.splitlines()
    out = []
    for m in FENCE.finditer(text):
        fence = text.count("\n", 0, m.start())  # the fence's line, from 0
        found = OPT_OUT.fullmatch(lines[fence - 1].strip()) if fence else None
        kind, arg = found.groups() if found else (None, "")
        out.append(
            Block(
                path=f"docs/guides/{page}",
                line=fence + 2,
                code=m.group(1),
                needs=tuple(arg.split()) if kind == "needs" else (),
                elsewhere=arg.split()[0] if kind == "elsewhere" else None,
            )
        )
    return out


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


#: The driver of one fresh interpreter: runs each page's ``[path, line, code]`` blocks in order
#: in a namespace of its own, and reports per page the last block that ran and any traceback.
DRIVER = """
import json, sys, traceback
results = {}
for page, run in json.loads(sys.stdin.read()).items():
    namespace = {"__name__": "__main__"}
    last, error = None, None
    try:
        for path, line, code in run:
            exec(compile("\\n" * (line - 1) + code, path, "exec"), namespace)
            last = f"{path}:{line}"
    except BaseException:
        error = traceback.format_exc()[-5000:]
    results[page] = (last, error)
print("RESULTS " + json.dumps(results))
"""


def _runnable(page: str) -> list[Block]:
    """The page's blocks this file runs: not run elsewhere, every package they need there."""
    return [
        b for b in blocks(page) if b.elsewhere is None and all(_installed(pkg) for pkg in b.needs)
    ]


@pytest.fixture(scope="module")
def page_results():
    """``{page: (last block run, traceback or None)}``: every page's blocks run by one fresh
    interpreter, one page after the other, each page in a namespace of its own (one JAX
    start-up, not one per page; conftest.py keeps this file on one xdist worker)."""
    pages = {p: [[b.path, b.line, b.code] for b in _runnable(p)] for p in PAGES}
    out = subprocess.run(
        [sys.executable, "-c", DRIVER],
        input=json.dumps({p: run for p, run in pages.items() if run}),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )  # (the suite's XLA flags are inherited: tests/conftest.py)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULTS ")]
    assert out.returncode == 0 and line, out.stdout[-3000:] + out.stderr[-5000:]
    return json.loads(line[0][len("RESULTS ") :])


def test_there_are_guides_with_code():
    assert PAGES and any(blocks(p) for p in PAGES), f"no python block in {GUIDES}"


def test_opt_outs_are_well_formed():
    problems = []
    for page in PAGES:
        above_a_fence = {b.line - 2 for b in blocks(page)}  # the line just above each fence
        for i, line in enumerate((GUIDES / page).read_text().splitlines(), 1):
            text = line.strip()
            if text.startswith("<!-- test:"):
                if not OPT_OUT.fullmatch(text):
                    problems.append(f"{page}:{i}: not 'needs PACKAGE...' or 'elsewhere FILE'")
                elif i not in above_a_fence:
                    problems.append(f"{page}:{i}: not directly above a python fence")
            if re.match(r"\s+```python", line) or re.match(r"\s*(````|~~~)\s*python", line):
                problems.append(f"{page}:{i}: a python fence this test does not read")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", [p for p in PAGES if any(b.elsewhere is None for b in blocks(p))])
def test_guide_page_runs(page, page_results):
    """The page's blocks, in order, in a namespace of their own (those whose packages are
    missing left out: test_block_left_out reports them)."""
    run = _runnable(page)
    if not run:
        pytest.skip(f"every block of {page} needs a missing package (see test_block_left_out)")
    last, error = page_results[page]
    assert error is None, error
    assert last == str(run[-1]), f"{page}: the last block that ran is {last}, not {run[-1]}"


@pytest.mark.parametrize(
    "block",
    [b for p in PAGES for b in blocks(p) if b.needs or b.elsewhere],
    ids=str,
)
def test_block_left_out(block):
    """A block that opts out is run elsewhere, or reported as skipped when the packages it
    needs are missing (with them, it ran in test_guide_page_runs)."""
    if block.elsewhere is not None:
        runner = ROOT / block.elsewhere
        assert runner.is_file(), f"{block}: {block.elsewhere} does not exist"
        assert block.path in runner.read_text(), f"{block}: {block.elsewhere} does not read it"
        return
    missing = [pkg for pkg in block.needs if not _installed(pkg)]
    if missing:
        pytest.skip(f"{block} needs {', '.join(missing)}, not installed: not run")
