"""The LRU (Orvieto et al. 2023): a complex diagonal linear recurrence with an output map, on
the engine's linear path with complex coefficients.

The reference is ``jax.grad`` of a plain sequential ``lax.scan`` of the paper's equations in
complex arithmetic, written here (never the library's coefficient or output code): float64
within 1e-12 normwise relative, float32 within 1e-5; random params, inputs, right-padded
masks, resets, initial carries and cotangents, both scans, chunks crossing, every schedule,
inside a Stack with dropout and a Bidirectional layer.
"""

import itertools
import math
from functools import cache

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import bptt_jax
from tests import reference as ref
from tests.test_linear import _library_vjp, _set_chunk

F64, F32 = jnp.float64, jnp.float32
H, N = 5, 4
SCANS = ("parallel", "sequential")


def lru_step(p, carry, x):
    """One step from the paper's equations, in complex arithmetic: ``(carry, y)``."""
    lam = jnp.exp(lax.complex(-jnp.exp(p.nu_log), jnp.exp(p.theta_log)))
    h = lax.complex(carry[:, :N], carry[:, N:])
    gamma = lax.complex(jnp.exp(p.gamma_log), jnp.zeros_like(p.gamma_log))
    h = lam * h + gamma * (x.astype(h.dtype) @ lax.complex(p.b_re, p.b_im))
    y = jnp.real(h @ lax.complex(p.c_re, p.c_im))
    y = y + (x * p.d if p.d.ndim == 1 else x @ p.d)
    return jnp.concatenate([jnp.real(h), jnp.imag(h)], axis=1), y


class UserLRU(bptt_jax.LRU):
    """The LRU without its hand-written ``coefficients_backward`` and ``output_backward``: a
    user's complex linear cell, whose coefficients and output map the engine differentiates by
    ``jax.vjp`` (one step's functions; complex cotangents conjugated)."""

    coefficients_backward = None
    output_backward = None


def reference_vjp(p, xs, h0, ct, mask=None, resets=None, truncate=None, delta_clip=None):
    return ref.output_scan_vjp(lru_step, p, xs, h0, ct, mask, resets, truncate, delta_clip)


def problem(cell, rng, dtype, t=9, b=3, d=4, resets=True):
    """``(p, xs, h0, mask, resets, ct)``, random; ``d = H`` gives the paper's skip."""
    p, _, xs, _, h0, mask = ref.draw(cell, rng, dtype, t=t, b=b, d=d)
    r = ref.flags(rng, xs.shape[:2], 0.15) if resets else None
    return p, xs, h0, mask, r, ref.normal_like(rng, (jnp.zeros((t, b, H), dtype), h0))


OPTIONS = {
    "full": {},
    "trunc3": {"truncate": 3},
    "clip": {"delta_clip": 0.3},
    "trunc3-clip": {"truncate": 3, "delta_clip": 0.3},
}


#: The default run: each option once, each scan, skip and backward (hand-written or the
#: user's vjp) twice; the rest of the grid under ``-m slow``.
DEFAULT_RUN = {
    ("parallel", "full", H, False),
    ("sequential", "trunc3-clip", 3, False),
    ("parallel", "clip", 3, True),
    ("sequential", "trunc3", H, True),
}


def _grid():
    for scan, opt, d, user in itertools.product(SCANS, OPTIONS, (H, 3), (False, True)):
        marks = () if (scan, opt, d, user) in DEFAULT_RUN else pytest.mark.slow
        name = f"{'user-' if user else ''}{scan}-{opt}-d{d}"
        yield pytest.param(scan, opt, d, user, id=name, marks=marks)


@pytest.mark.parametrize("scan,options,d,user", list(_grid()))
def test_unroll_vjp_matches_the_complex_plain_scan_in_float64(scan, options, d, user, rng):
    """Outputs, final carry and every gradient within 1e-12, for the LRU and for it as a user's
    cell without its backward methods; the options change the gradient (the check can fail)."""
    cell = (UserLRU if user else bptt_jax.LRU)(H, N, scan=scan)
    kw = OPTIONS[options]
    p, xs, h0, m, r, ct = problem(cell, rng, F64, d=d)
    out, grads = _library_vjp(cell, **kw)(p, xs, h0, ct, m, r)
    out_r, grads_r = reference_vjp(p, xs, h0, ct, m, r, **kw)
    ref.assert_trees_close(out, out_r, F64)
    ref.assert_trees_close(grads, grads_r, F64)
    assert float(jnp.max(jnp.abs(out[0][~m]))) == 0.0  # a padded step's output is zeros
    if kw:
        _, plain = reference_vjp(p, xs, h0, ct, m, r)
        assert max(map(ref.rel_err, jax.tree.leaves(grads), jax.tree.leaves(plain))) > 1e-3


def test_float32_is_within_1e5_with_both_scans_and_the_autodiff_path(rng):
    """float32, T=40, the paper's ring (|lambda| up to 0.999): each scan and the library's
    autodiff path (``cell.step`` scanned) within 1e-5 of the reference's float32 run."""
    for scan in SCANS:
        cell = bptt_jax.LRU(H, N, r_min=0.9, r_max=0.999, scan=scan)
        p, xs, h0, m, r, ct = problem(cell, np.random.default_rng(3), F32, t=40)
        p = cell.init(jax.random.key(1), 4, F32)
        out_r, grads_r = reference_vjp(p, xs, h0, ct, m, r)
        for backward in ("manual", "autodiff"):
            out, grads = _library_vjp(cell, backward=backward)(p, xs, h0, ct, m, r)
            ref.assert_trees_close(out, out_r, F32)
            ref.assert_trees_close(grads, grads_r, F32)


@pytest.mark.parametrize("scan", ["parallel", pytest.param("sequential", marks=pytest.mark.slow)])
def test_chunks_crossing_and_checkpointed_bptt_match_the_plain_scan(scan, rng, monkeypatch):
    """T=13 in chunks of at most 2 steps (the complex state and its error cross the chunks'
    edges), with truncation and clipping; and checkpointed BPTT (segments of 4)."""
    cell = bptt_jax.LRU(H, N, scan=scan)
    _set_chunk(monkeypatch, 2)
    try:
        for kw in ({}, {"truncate": 3, "delta_clip": 0.3}):
            p, xs, h0, m, r, ct = problem(cell, rng, F64, t=13)
            out, grads = _library_vjp(cell, **kw)(p, xs, h0, ct, m, r)
            out_r, grads_r = reference_vjp(p, xs, h0, ct, m, r, **kw)
            ref.assert_trees_close(out, out_r, F64)
            ref.assert_trees_close(grads, grads_r, F64)
    finally:
        _set_chunk(monkeypatch, None)
    p, xs, h0, m, r, ct = problem(cell, rng, F64, t=13)
    out, grads = _library_vjp(cell, backward="checkpointed", segment=4)(p, xs, h0, ct, m, r)
    out_r, grads_r = reference_vjp(p, xs, h0, ct, m, r)
    ref.assert_trees_close(out, out_r, F64)
    ref.assert_trees_close(grads, grads_r, F64)


@cache
def _stack_reference():
    def run(ps, xs, carries, ct, mask, drops):
        def f(ps, xs, carries):
            opts = ref.scan_options(xs, mask)
            h1, c1 = ref.output_scan(lru_step, ps[0], xs, carries[0], *opts)
            h2, c2 = ref.output_scan(lru_step, ps[1], h1 * drops, carries[1], *opts)
            return h2, (c1, c2)

        out, vjp = jax.vjp(f, ps, xs, carries)
        return out, vjp(ct)

    return jax.jit(run)


def test_a_stack_with_dropout_and_a_bidirectional_layer_match_the_plain_scan(rng, key):
    """Two LRU layers (the second on the first's outputs, H -> H: the paper's skip) with
    dropout between them; and a Bidirectional LRU over right-padded sequences, against
    check_gradients' independent float64 finite differences."""
    model = bptt_jax.stacked(bptt_jax.LRU(H, N), 2, dropout=0.3)
    t, b, d = 9, 3, 4
    ps = model.init(jax.random.key(2), d, F64)
    xs = jnp.asarray(rng.standard_normal((t, b, d)))
    carries = ref.normal_like(rng, model.zero_carry(b, F64))
    m = jnp.asarray(np.arange(t)[:, None] < np.array([t, 5, 7])[None])
    ct = ref.normal_like(rng, (jnp.zeros((t, b, H)), carries))
    drop_key = jax.random.key(11)
    drops = model.dropout_masks(drop_key, t, b, F64)[0]
    out, grads = _library_vjp(model)(ps, xs, carries, ct, m, None, drop_key)
    out_r, grads_r = _stack_reference()(ps, xs, carries, ct, m, drops)
    ref.assert_trees_close(out, out_r, F64)
    ref.assert_trees_close(grads, grads_r, F64)
    report = bptt_jax.check_gradients(bptt_jax.Bidirectional(bptt_jax.LRU(H, N)), seq_len=7)
    assert report.passed, report


def test_check_gradients_passes_under_a_bf16_policy():
    """The products of many lambda_t are formed in complex64 (float32 parts) under bfloat16."""
    report = bptt_jax.check_gradients(bptt_jax.LRU(8, 8), dtype=F32, compute_dtype=jnp.bfloat16)
    assert report.passed, report


def test_init_draws_lambda_on_the_ring_and_normalises_the_input():
    """``r_min <= |lambda| <= r_max``, ``0 <= arg lambda <= max_phase``, ``gamma = sqrt(1 -
    |lambda|^2)``; ``|lambda|^2`` spread over the ring (uniform: its mean near the middle);
    B's and C's scales; ``d`` a vector for D = H and a kernel otherwise."""
    cell = bptt_jax.LRU(16, 4096, r_min=0.4, r_max=0.9, max_phase=math.pi / 10)
    p = cell.init(jax.random.key(0), 16, F64)
    modulus = jnp.exp(-jnp.exp(p.nu_log))
    phase = jnp.exp(p.theta_log)
    assert 0.4 - 1e-12 <= float(modulus.min()) and float(modulus.max()) <= 0.9 + 1e-12
    assert 0 <= float(phase.min()) and float(phase.max()) <= math.pi / 10 + 1e-12
    assert abs(float(jnp.mean(modulus**2)) - (0.16 + 0.81) / 2) < 0.02
    np.testing.assert_allclose(jnp.exp(p.gamma_log), jnp.sqrt(1 - modulus**2), rtol=1e-12)
    assert abs(float(jnp.std(p.b_re)) - 1 / math.sqrt(32)) < 0.01
    assert abs(float(jnp.std(p.c_im)) - 1 / math.sqrt(4096)) < 0.001
    assert p.d.shape == (16,)
    assert cell.init(jax.random.key(0), 3, F64).d.shape == (3, 16)


def test_the_cell_meets_the_linear_contract_with_an_output_map_and_is_registered():
    cell = bptt_jax.LRU(H, N)
    assert bptt_jax.cells.protocol.tier(cell) == "linear"
    assert bptt_jax.cells.protocol.has_output(cell)
    assert bptt_jax.cells.protocol.output_size(cell) == H
    assert bptt_jax.models.CELLS["lru"] is bptt_jax.LRU
    assert cell.zero_carry(2).shape == (2, 2 * N)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"r_min": 0.9, "r_max": 0.5}, "r_min must be < r_max; got r_min=0.9, r_max=0.5"),
        ({"r_min": 0.5, "r_max": 0.5}, "r_min must be < r_max"),
        ({"r_max": 1.5}, r"r_max must be a number in \[0, 1\]; got 1.5"),
        ({"r_min": -0.1}, r"r_min must be a number in \[0, 1\]; got -0.1"),
        ({"max_phase": 0.0}, "max_phase must be a positive finite number; got 0.0"),
        ({"max_phase": -1}, "max_phase must be a positive finite number; got -1"),
        ({"state_size": 0}, "state_size must be a positive int; got 0"),
        ({"scan": "tree"}, "scan must be one of"),
    ],
)
def test_bad_settings_are_refused_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bptt_jax.LRU(H, **{"state_size": N, **kwargs})


def test_a_carry_that_cannot_hold_the_complex_state_is_refused():
    """A user's complex linear cell whose carry cannot hold N complex units as 2N reals."""

    class Odd(bptt_jax.LRU):
        def zero_carry(self, batch_size, dtype=jnp.float32):
            return jnp.zeros((batch_size, 2 * self.state_size + 1), dtype)

    cell = Odd(H, N)
    p = cell.init(jax.random.key(0), 3)
    with pytest.raises((ValueError, TypeError), match="carry"):
        bptt_jax.unroll(cell, p, jnp.ones((4, 2, 3), jnp.float32))
