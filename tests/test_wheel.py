"""The wheel runs its own commands: built from this checkout, installed in a fresh virtual
environment outside it, ``bptt-jax bench``, ``train`` and ``verify`` run from a directory
outside it too, reading nothing but the installed package (its configs and benchmark scripts
ride inside it, see ``pyproject.toml``).
"""

import os
import pathlib
import shutil
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: The folders the wheel carries inside the package: package name -> repository folder.
SHIPPED = {"bptt_jax.cli.configs": "configs", "bptt_jax.cli.benchmarks": "benchmarks"}


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_pyproject_lists_every_package_and_maps_the_shipped_folders():
    """``packages`` is a list (the shipped folders are mapped into the package, which a
    ``find`` cannot do), so a package missing from it would be missing from the wheel."""
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "bptt_jax").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    st = _setuptools()
    assert set(st["packages"]) == on_disk | set(SHIPPED)
    assert st["package-dir"] == SHIPPED


def _run(cmd, cwd, env, timeout=600) -> subprocess.CompletedProcess:
    out = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert out.returncode == 0, (
        f"{cmd}: exit {out.returncode}\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    )
    return out


def _source_files() -> list[str]:
    """The checkout's files as a clone would have them (tracked, and new ones not ignored)."""
    if (ROOT / ".git").exists():
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        return [f for f in listed if (ROOT / f).is_file()]
    skip = {".venv", ".git", "build", "dist", "results", "__pycache__"}
    return [
        str(p.relative_to(ROOT))
        for p in ROOT.rglob("*")
        if p.is_file() and not skip & set(p.relative_to(ROOT).parts)
    ]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``(venv, workdir, env)``: the wheel built from a copy of the checkout, installed in a
    fresh virtual environment with its dependencies (from pip's configured index; where that
    cannot be reached, the dependencies of this test's own environment are lent to it)."""
    base = tmp_path_factory.mktemp("wheel")
    src, dist, venv, work = (base / n for n in ("src", "dist", "venv", "work"))
    for f in _source_files():  # a copy: building writes build/ and *.egg-info into the tree
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(src)],
         base, env)  # fmt: skip
    (wheel,) = dist.glob("bptt_jax-*.whl")
    _run([sys.executable, "-m", "venv", str(venv)], base, env)
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    full = subprocess.run([*pip, str(wheel)], cwd=base, env=env, capture_output=True, text=True)
    if full.returncode != 0:  # no index to install the dependencies from: lend ours
        lend = [p for p in sys.path if p.endswith("site-packages")]
        purelib = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        (pathlib.Path(purelib) / "_lent_dependencies.pth").write_text("\n".join(lend) + "\n")
        _run([*pip, "--no-deps", "--ignore-installed", str(wheel)], base, env)
    return venv, work, env


@pytest.mark.slow
def test_the_installed_wheel_reads_only_itself(installed):
    venv, work, env = installed
    code = (
        "import bptt_jax, bptt_jax.cli.bench as b, bptt_jax.cli.config as c\n"
        "print(bptt_jax.__file__); print(c.CONFIG_DIR); print(b.BENCHMARKS_DIR)\n"
        "print(sorted(p.stem for p in c.CONFIG_DIR.glob('*.toml')))\n"
    )
    out = _run([str(venv / "bin" / "python"), "-c", code], work, env).stdout.splitlines()
    for path in out[:3]:
        assert pathlib.Path(path).resolve().is_relative_to(venv.resolve()), out
    assert "bench_tiny" in out[3] and "adding" in out[3]
    assert (pathlib.Path(out[2]) / "run.py").is_file()


@pytest.mark.slow
def test_the_installed_wheel_runs_bench_train_and_verify(installed):
    """The three commands of the README, from a directory outside the checkout: the tiny
    bench (every part), a few steps of ``train adding`` and ``verify`` of one cell's grid."""
    venv, work, env = installed
    cmd = [str(venv / "bin" / "bptt-jax"), "--no-compile-cache"]
    bench = _run([*cmd, "bench", "bench_tiny", f"out={work / 'bench'}", "plots=false"], work, env)
    assert (work / "bench" / "bench.json").is_file(), bench.stdout[-2000:]
    train = _run(
        [*cmd, "train", "adding", "train.steps=3", "train.progress=false", "adding.test_size=8"],
        work,
        env,
    )
    assert "done: 3 steps" in train.stdout
    verify = _run([*cmd, "verify", "--cell", "bptt_jax:GRU", "--hidden-size", "4"], work, env)
    assert "PASSED" in verify.stdout
