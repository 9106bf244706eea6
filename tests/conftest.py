"""Test set-up: float64 available, strict dtype promotion, a fresh random key per test."""

import contextlib
import os
import zlib

#: XLA flags for the whole run, set before JAX starts a backend and inherited by the
#: interpreters tests start: on a CPU, no LLVM optimization, the classic elemental emitters
#: and each program's code generated in one piece. The test programs are tiny, so the run
#: is mostly compilation, and these flags cut it by about half with the same semantics.
#: The library as XLA compiles it by default is what ``bptt-jax verify`` and the
#: benchmarks' gradient checks run (and tests/test_verify.py's slow default-flags test); a
#: user's own ``XLA_FLAGS`` come after these and win, e.g.
#: ``XLA_FLAGS="--xla_backend_optimization_level=3 --xla_cpu_use_fusion_emitters=true"``.
TEST_XLA_FLAGS = (
    "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false "
    "--xla_cpu_parallel_codegen_split_count=1"
)
os.environ["XLA_FLAGS"] = f"{TEST_XLA_FLAGS} {os.environ.get('XLA_FLAGS', '')}".strip()

import jax  # noqa: E402 (after XLA_FLAGS)
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# float64 is needed for the 1e-12 checks; float32 tests pass float32 arrays explicitly.
jax.config.update("jax_enable_x64", True)
# Silent upcasts (float32 params meeting a float64 constant) fail loudly instead.
jax.config.update("jax_numpy_dtype_promotion", "strict")
# True float32 matmuls on every backend: the float32 tolerances (~1e-5) are float32's, and a
# GPU's default (TF32) or a TPU's (bfloat16 passes) would be ~1e-3 off. No effect on a CPU.
jax.config.update("jax_default_matmul_precision", "highest")
# No persistent compilation cache in the suite's own process: on a fresh machine it holds
# nothing to read, and writing every program costs time (the CLI's cache is tested by
# tests/test_cli.py and the 2-process run of tests/test_parallel.py in directories of their
# own).


#: A context of JAX's trace and compilation caches: a test that changes an environment
#: variable the library reads at trace time (``BPTT_JAX_FUSE_DIRECTIONS``) sets it through
#: :func:`trace_env`, so nothing traced under one value is reused under another, and the
#: worker's other cached programs stay (``jax.clear_caches`` would drop them all).
TRACE_ENV = jax.make_user_context(None)


@pytest.fixture
def trace_env(monkeypatch):
    """``with trace_env(name, value):`` the environment variable ``name`` is ``value`` and
    JAX traces anew (cached traces of other values are not reused)."""

    @contextlib.contextmanager
    def setenv(name: str, value: str):
        monkeypatch.setenv(name, value)
        with TRACE_ENV((name, value)):
            yield

    return setenv


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
#: test_parallel's and test_sequence_parallel's 8-device interpreters and 2-process runs,
#: test_wheel's installed wheel.
#: (``--dist loadgroup`` cannot do it: xdist 3.8 marks a group in the test ids, which pytest
#: 9.2 no longer lets it change.)
ONE_WORKER_FILES = (
    "tests/test_bench.py",
    "tests/test_docs.py",
    "tests/test_guides.py",
    "tests/test_parallel.py",
    "tests/test_sequence_parallel.py",
    "tests/test_wheel.py",
)


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
