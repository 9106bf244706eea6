"""Test set-up: float64 available, strict dtype promotion, a fresh random key per test."""

import zlib

import jax
import numpy as np
import pytest

# float64 is needed for the 1e-12 checks; float32 tests pass float32 arrays explicitly.
jax.config.update("jax_enable_x64", True)
# Silent upcasts (float32 params meeting a float64 constant) fail loudly instead.
jax.config.update("jax_numpy_dtype_promotion", "strict")
# True float32 matmuls on every backend: the float32 tolerances (~1e-5) are float32's, and a
# GPU's default (TF32) or a TPU's (bfloat16 passes) would be ~1e-3 off. No effect on a CPU.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def key(request):
    """A PRNG key that differs per test (seeded by the test's id), deterministic across runs."""
    return jax.random.key(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def rng(request):
    """A numpy Generator that differs per test (seeded by the test's id), deterministic across
    runs: drawing with it compiles nothing (``tests.reference.draw``)."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
