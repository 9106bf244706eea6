"""Test set-up: float64 available, strict dtype promotion, a fresh random key per test."""

import os
import tempfile
import zlib

import jax
import numpy as np
import pytest

from bptt_jax import cli

# float64 is needed for the 1e-12 checks; float32 tests pass float32 arrays explicitly.
jax.config.update("jax_enable_x64", True)
# Silent upcasts (float32 params meeting a float64 constant) fail loudly instead.
jax.config.update("jax_numpy_dtype_promotion", "strict")
# True float32 matmuls on every backend: the float32 tolerances (~1e-5) are float32's, and a
# GPU's default (TF32) or a TPU's (bfloat16 passes) would be ~1e-3 off. No effect on a CPU.
jax.config.update("jax_default_matmul_precision", "highest")
# JAX's persistent compilation cache, as the CLI uses it (bptt_jax.cli), for the whole run:
# many tests compile the same program again (a fresh jit of the same computation), which
# the cache then reads back instead (the suite on 2 cores, from an empty cache: 9:02 without
# it). One directory per run, shared by the xdist workers (they inherit the controller's
# environment) and the `bptt-jax` subprocesses (BPTT_JAX_CACHE_DIR); never ~/.cache, so no
# run reads what an earlier one left. tests/test_cli.py and the 2-process run of
# tests/test_parallel.py test the cache in directories of their own.
CACHE_DIR = os.environ.setdefault(
    "BPTT_JAX_TEST_CACHE_DIR", tempfile.mkdtemp(prefix="bptt_jax_test_xla_")
)
os.environ["BPTT_JAX_CACHE_DIR"] = CACHE_DIR
cli.enable_compile_cache(CACHE_DIR)


@pytest.fixture
def key(request):
    """A PRNG key that differs per test (seeded by the test's id), deterministic across runs."""
    return jax.random.key(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def rng(request):
    """A numpy Generator that differs per test (seeded by the test's id), deterministic across
    runs: drawing with it compiles nothing (``tests.reference.draw``)."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


# ---------------------------------------------------------------------------------- xdist
#: Test files whose tests share one expensive module-scoped fixture: each file runs on one
#: xdist worker (else every worker builds the fixture): test_bench's smoke run of
#: ``bptt-jax bench``, test_docs' interpreter running every docstring example,
#: test_parallel's 8-device interpreter and 2-process run. (``--dist
#: loadgroup`` cannot do it: xdist 3.8 marks a group in the test ids, which pytest 9.2 no
#: longer lets it change.)
ONE_WORKER_FILES = ("tests/test_bench.py", "tests/test_docs.py", "tests/test_parallel.py")


@pytest.hookimpl(optionalhook=True, tryfirst=True)  # an xdist hook, on the controller
def pytest_xdist_make_scheduler(config, log):
    """``-n N``'s "load" distribution, with each of ONE_WORKER_FILES as one unit of work."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Scheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            path = nodeid.split("::", 1)[0]
            return path if path in ONE_WORKER_FILES else nodeid

    return Scheduling(config, log)
