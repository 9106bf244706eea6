"""The command line's persistent compilation cache: where it lives, that a second
run reads what the first compiled, and the two flags that move it and turn it off."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bptt_jax import cli

ROOT = Path(__file__).resolve().parents[1]
#: A train run of a few seconds whose step compiles for longer than CACHE_MIN_COMPILE_S.
TINY_TRAIN = (
    "train",
    "adding",
    "adding.seq_len=20",
    "model.hidden_size=8",
    "train.batch_size=4",
    "train.steps=2",
    "train.eval_every=0",
    "train.progress=false",
)


def test_the_default_cache_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BPTT_JAX_CACHE_DIR", str(tmp_path / "mine"))
    assert cli.default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("BPTT_JAX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cli.default_cache_dir() == tmp_path / "xdg" / "bptt_jax" / "xla"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cli.default_cache_dir() == tmp_path / "home" / ".cache" / "bptt_jax" / "xla"


def _bptt_jax(*args, cache: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    # JAX_LOG_COMPILES: JAX logs each persistent-cache hit ("... cache hit for 'jit_step'")
    env.update(BPTT_JAX_CACHE_DIR=str(cache), JAX_PLATFORMS="cpu", JAX_LOG_COMPILES="1")
    run = subprocess.run(
        [sys.executable, "-m", "bptt_jax", *args], env=env, cwd=ROOT, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return run


def _cached_steps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("jit_step-*")) if directory.is_dir() else []


@pytest.mark.slow  # two fresh interpreters training a model
def test_a_second_run_reads_the_programs_the_first_compiled(tmp_path):
    """Run 1 (``--cache-dir``) writes its train step there, not to $BPTT_JAX_CACHE_DIR; run 2
    with $BPTT_JAX_CACHE_DIR set to that directory reads it back; ``--no-compile-cache``
    does not read it."""
    hit = "Persistent compilation cache hit for 'jit_step'"
    flag, env = tmp_path / "flag", tmp_path / "env"
    first = _bptt_jax("--cache-dir", str(flag), *TINY_TRAIN, cache=env)
    assert len(_cached_steps(flag)) == 1 and not env.exists() and hit not in first.stderr
    second = _bptt_jax(*TINY_TRAIN, cache=flag)
    assert hit in second.stderr
    off = _bptt_jax("--no-compile-cache", *TINY_TRAIN, cache=flag)
    assert hit not in off.stderr


def test_a_cache_directory_that_cannot_be_made_is_a_warning_not_a_crash(tmp_path):
    """The cache only saves compile time: under a file, the command warns and goes on (here
    to its own config error, exit 2, which the cache used to mask with a traceback)."""
    (tmp_path / "afile").write_text("x")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(BPTT_JAX_CACHE_DIR=str(tmp_path / "afile" / "cache"), JAX_PLATFORMS="cpu")
    run = subprocess.run(
        [sys.executable, "-m", "bptt_jax", "train", "adding", "adding.seq_len=1"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr[-2000:]
    assert "warning: no compilation cache" in run.stderr and "'adding.seq_len'" in run.stderr
