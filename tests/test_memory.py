"""The manual backward stores no more than autodiff (XLA's own memory_analysis, not time)."""

import jax
import jax.numpy as jnp
import pytest

import bptt_jax


def _compiled(cell, backward, t=64, b=8, d=16, o=10):
    k = jax.random.split(jax.random.key(0), 4)
    p = cell.init(k[0], d, jnp.float32)
    ro = bptt_jax.init_readout(k[1], cell.hidden_size, o, jnp.float32)
    xs = jax.random.normal(k[2], (t, b, d), jnp.float32)
    tg = jax.random.randint(k[3], (t, b), 0, o)
    f = jax.jit(
        jax.grad(
            lambda p, ro, xs: bptt_jax.sequence_loss(cell, p, ro, xs, tg, backward=backward),
            argnums=(0, 1, 2),
        )
    )
    return f.lower(p, ro, xs).compile()


def _temp_bytes(cell, backward):
    return _compiled(cell, backward).memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize(
    "cell", [bptt_jax.Elman(64), bptt_jax.LSTM(64), bptt_jax.GRU(64)], ids=["elman", "lstm", "gru"]
)
def test_manual_backward_uses_less_temp_memory_than_autodiff(cell):
    manual, auto = _temp_bytes(cell, "manual"), _temp_bytes(cell, "autodiff")
    unit = 64 * 8 * 64 * 4  # one (T, B, H) float32 array
    # Measured: Elman 4 vs 5 units, LSTM 8 vs 14, GRU 8 vs 11 (T=64, B=8, H=64).
    assert manual < auto, (manual / unit, auto / unit)


def _copies_in_loops(text: str, shape: str) -> list[str]:
    """The ``copy`` instructions of ``shape`` outside the entry computation (in loops)."""
    found, where = [], None
    for line in text.splitlines():
        if line and not line.startswith(" ") and "{" in line:
            where = line.split("(")[0]
        elif shape in line and " copy(" in line and not where.startswith("ENTRY"):
            found.append(f"{where}: {line.strip()[:120]}")
    return found


@pytest.mark.parametrize(
    "cell", [bptt_jax.Elman(64), bptt_jax.LSTM(64), bptt_jax.GRU(64)], ids=["elman", "lstm", "gru"]
)
def test_per_step_buffers_are_updated_in_place(cell):
    """The (T, B, H) block buffers (input projections, residuals, gradients, states) are
    written row by row in place: XLA emits no copy of one inside a loop (it would cost
    O(T^2) memory traffic)."""
    text = _compiled(cell, "manual").as_text()
    assert "while" in text
    assert not _copies_in_loops(text, "f32[64,8,64]"), _copies_in_loops(text, "f32[64,8,64]")
