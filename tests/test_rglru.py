"""Griffin's RG-LRU (``bptt_jax.RGLRU``) on the engine's linear path.

The reference is ``jax.grad`` of a plain sequential ``lax.scan`` of the RG-LRU's equations,
written again here from the paper (De et al. 2024, section 2.4), never the library's
coefficient code::

    r_t = sigmoid(x_t W_a + b_a),  i_t = sigmoid(x_t W_x + b_x),  x^_t = x_t W_in + b_in
    log a_t = -c r_t softplus(-Lambda)
    h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t x^_t)

float64 within 1e-12 normwise relative (float32 within 1e-5 of the float64 reference), on
random params (``Lambda`` over the initialisation's range and below it), inputs,
right-padded masks, resets, initial carries and cotangents; both scans; full, truncated and
per-step clipped backwards; a Stack with dropout.
"""

import itertools
import re
from functools import cache, partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import bptt_jax
from bptt_jax.cells import protocol
from bptt_jax.models import build_model, from_spec, parse_spec
from tests import reference as ref

F64, F32 = jnp.float64, jnp.float32
H = 5
SCANS = ("parallel", "sequential")


def sigmoid(v):
    return 1 / (1 + jnp.exp(-v))


# ------------------------------------------------------------------ the reference
def rglru_step(c, p, h, x):
    """One RG-LRU step from the paper's equations (log space, as the paper writes it)."""
    r = sigmoid(x @ p.w_a + p.b_a)
    i = sigmoid(x @ p.w_x + p.b_x)
    log_a = -c * r * jnp.log1p(jnp.exp(-p.lam))
    return jnp.exp(log_a) * h + jnp.sqrt(-jnp.expm1(2 * log_a)) * (i * (x @ p.w_in + p.b_in))


@cache
def _step_of(c):
    """The reference step for ``c``, one object per value (the reference compiles once)."""
    return partial(rglru_step, c)


def scan_unroll(c, p, xs, h0, *options):
    return ref.diagonal_scan(_step_of(c), p, xs, h0, *options)


_options = ref.scan_options


def reference_vjp(c, p, xs, h0, ct, mask=None, resets=None, truncate=None, delta_clip=None):
    """``((hs, carry_T), (dp, dxs, dh0))`` of the reference for cotangents ``ct``."""
    return ref.diagonal_scan_vjp(_step_of(c), p, xs, h0, ct, mask, resets, truncate, delta_clip)


@cache
def _library_vjp(model, truncate=None, delta_clip=None):
    def run(p, xs, h0, ct, mask, resets, dropout_key=None):
        def f(p, xs, h0):
            return bptt_jax.unroll(
                model, p, xs, h0, mask=mask, resets=resets, truncate=truncate,
                delta_clip=delta_clip, dropout_key=dropout_key,
            )  # fmt: skip

        out, vjp = jax.vjp(f, p, xs, h0)
        return out, vjp(ct)

    return jax.jit(run)


def draw_params(cell, rng, dtype, d=4):
    """``ref.draw``'s params with ``Lambda`` U(-1, 8): from fast decays (``sigmoid(Lambda)``
    near 1/4) to the initialisation's range (``a^c`` up to ~0.997 for c = 8)."""
    p = ref.draw(cell, rng, dtype, d=d)[0]
    return p._replace(lam=jnp.asarray(rng.uniform(-1, 8, cell.hidden_size), dtype))


def problem(cell, rng, dtype, t=9, b=3):
    """``(p, xs, h0, mask, resets, ct)``: random everything, cotangents on hs and carry_T."""
    _, _, xs, _, h0, mask = ref.draw(cell, rng, dtype, t=t, b=b)
    p = draw_params(cell, rng, dtype)
    r = ref.flags(rng, xs.shape[:2], 0.15)
    ct = ref.normal_like(rng, (jnp.zeros((t, b, cell.hidden_size), dtype), h0))
    return p, xs, h0, mask, r, ct


# ------------------------------------------------------------------ the grid
OPTIONS = {
    "full": {},
    "trunc3": {"truncate": 3},
    "clip": {"delta_clip": 0.3},
    "trunc3-clip": {"truncate": 3, "delta_clip": 0.3},
}


def _grid():
    """scan x options x c; the default run gives each scan two of the options (every option
    meets a scan), the rest under ``-m slow``."""
    for i, (scan, opt) in enumerate(itertools.product(SCANS, OPTIONS)):
        c = 8.0 if i % 3 else 2.5
        fast = i % 2 == (i // len(OPTIONS)) % 2
        yield pytest.param(
            scan, opt, c, id=f"{scan}-{opt}-c{c:g}", marks=() if fast else pytest.mark.slow
        )


@pytest.mark.parametrize("scan,options,c", list(_grid()))
def test_unroll_vjp_matches_the_plain_scan_in_float64(scan, options, c, rng):
    """Random params, inputs, padding, resets, initial carry and cotangents on hs and
    carry_T; within 1e-12. The options change the gradient (the check can fail)."""
    cell = bptt_jax.RGLRU(H, c=c, scan=scan)
    kw = OPTIONS[options]
    p, xs, h0, m, r, ct = problem(cell, rng, F64)
    out, grads = _library_vjp(cell, **kw)(p, xs, h0, ct, m, r)
    out_r, grads_r = reference_vjp(c, p, xs, h0, ct, m, r, **kw)
    ref.assert_trees_close(out, out_r, F64)
    ref.assert_trees_close(grads, grads_r, F64)
    if kw:
        _, plain = reference_vjp(c, p, xs, h0, ct, m, r)
        assert max(map(ref.rel_err, jax.tree.leaves(grads), jax.tree.leaves(plain))) > 1e-3


def test_float32_is_within_1e5_of_the_float64_reference_with_both_scans(rng):
    """float32, T=40: each scan within 1e-5 of the float64 reference on the same problem,
    and the two scans within 1e-5 of each other."""
    p, xs, h0, m, r, ct = problem(bptt_jax.RGLRU(H), rng, F64, t=40)
    _, exact = reference_vjp(8.0, p, xs, h0, ct, m, r)
    as32 = jax.tree.map(lambda v: v.astype(F32) if v.dtype == F64 else v, (p, xs, h0, ct))
    grads = {}
    for scan in SCANS:
        _, grads[scan] = _library_vjp(bptt_jax.RGLRU(H, scan=scan))(*as32, m, r)
        ref.assert_trees_close(grads[scan], exact, F32)
    ref.assert_trees_close(grads["parallel"], grads["sequential"], F32)


def test_a_stack_with_dropout_matches_the_plain_scan(rng, key):
    """An RG-LRU (c = 8, parallel) over an RG-LRU (c = 4, sequential), dropout between them,
    truncation at 4 and resets."""
    model = bptt_jax.Stack(
        (bptt_jax.RGLRU(H, scan="parallel"), bptt_jax.RGLRU(4, c=4.0, scan="sequential")), 0.3
    )
    _, _, xs, _, h0, m = ref.draw(model.layers[0], rng, F64)
    p = (draw_params(model.layers[0], rng, F64), draw_params(model.layers[1], rng, F64, d=H))
    h0 = (h0, ref.normal_like(rng, model.layers[1].zero_carry(3, F64)))
    r = ref.flags(rng, xs.shape[:2], 0.15)
    ct = ref.normal_like(rng, (jnp.zeros((*xs.shape[:2], 4), F64), h0))
    drops = model.dropout_masks(key, *xs.shape[:2], F64)
    out, grads = _library_vjp(model, truncate=4)(p, xs, h0, ct, m, r, key)

    def reference(p, xs, h0):
        opts = _options(xs, m, r, 4, None)
        h1, c1 = scan_unroll(8.0, p[0], xs, h0[0], *opts)
        h2, c2 = scan_unroll(4.0, p[1], h1 * drops[0], h0[1], *opts)
        return h2, (c1, c2)

    out_r, vjp = jax.vjp(reference, p, xs, h0)
    ref.assert_trees_close(out, out_r, F64)
    ref.assert_trees_close(grads, vjp(ct), F64)


@pytest.mark.slow
def test_a_bidirectional_layer_passes_check_gradients():
    """A Bidirectional RG-LRU over right-padded sequences, float64, against autodiff and
    finite differences (``check_gradients``'s own reference)."""
    model = bptt_jax.Bidirectional(bptt_jax.RGLRU(4, scan="parallel"))
    report = bptt_jax.check_gradients(model, dtype=F64, mask=True, random_carry=True)
    assert report.passed, report.autodiff


@pytest.mark.slow
def test_check_gradients_passes_under_a_bf16_policy():
    report = bptt_jax.check_gradients(
        bptt_jax.RGLRU(16, scan="parallel"), dtype=F32, compute_dtype=jnp.bfloat16, seq_len=48
    )
    assert report.passed, (report.autodiff, report.full_precision)


# ------------------------------------------------------------------ a -> 1
def test_gradients_stay_finite_where_the_gate_closes_and_a_is_1(rng):
    """Units whose recurrence gate underflows to 0 (``a_t = 1`` exactly, ``sqrt(1 - a^2) =
    0``): autodiff of the equations gives NaN there (``0 * inf``); the hand-written backward
    gives the limit, 0 for those units' ``Lambda`` and ``b_a`` (``a`` does not depend on them
    at ``r = 0``), and the reference's gradient for every other entry."""
    cell = bptt_jax.RGLRU(H, scan="parallel")
    p, xs, h0, m, r, ct = problem(cell, rng, F64)
    p = p._replace(w_a=p.w_a.at[:, :2].set(0.0), b_a=p.b_a.at[:2].set(-800.0))
    _, grads = _library_vjp(cell)(p, xs, h0, ct, m, r)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    _, naive = reference_vjp(8.0, p, xs, h0, ct, m, r)
    assert not bool(jnp.all(jnp.isfinite(naive[0].b_a)))  # the case is the one claimed
    dp = grads[0]
    assert float(jnp.max(jnp.abs(dp.lam[:2]))) == 0.0 == float(jnp.max(jnp.abs(dp.b_a[:2])))
    # the open units and every other leaf: the reference's, where it is finite
    assert ref.rel_err(dp.lam[2:], naive[0].lam[2:]) <= ref.TOL[F64]
    assert ref.rel_err(dp.w_in, naive[0].w_in) <= ref.TOL[F64]
    assert ref.rel_err(grads[2], naive[2]) <= ref.TOL[F64]


def test_the_paper_form_of_a_gives_the_same_states():
    """``a_t = sigmoid(Lambda)^(c r_t)`` and ``h_t = a_t h_{t-1} + sqrt(1 - a_t^2) i_t x^_t``
    as the paper first writes them (powers, no log space), from a fresh initialisation:
    the same states to float64's rounding of ``1 - a^2`` near ``a = 1``."""
    cell = bptt_jax.RGLRU(H)
    p = cell.init(jax.random.key(3), 4, F64)
    xs = jax.random.normal(jax.random.key(4), (30, 2, 4), F64)

    def body(h, x):
        r, i = sigmoid(x @ p.w_a + p.b_a), sigmoid(x @ p.w_x + p.b_x)
        a = sigmoid(p.lam) ** (cell.c * r)
        h = a * h + jnp.sqrt(1 - a**2) * (i * (x @ p.w_in + p.b_in))
        return h, h

    hs_r = lax.scan(body, jnp.zeros((2, H), F64), xs)[1]
    assert ref.rel_err(bptt_jax.unroll(cell, p, xs)[0], hs_r) < 1e-9


# ------------------------------------------------------------------ init, contract, names
def test_init_draws_a_to_the_c_uniform_in_the_papers_range_and_linear_style_kernels():
    for c in (8.0, 2.0):
        cell = bptt_jax.RGLRU(512, c=c)
        p = cell.init(jax.random.key(0), 9, F64)
        a_c = np.asarray(jax.nn.sigmoid(p.lam) ** c)
        assert 0.9 - 1e-12 <= a_c.min() < 0.905 and 0.994 < a_c.max() <= 0.999 + 1e-12
        assert abs(np.mean(a_c) - (0.9 + 0.999) / 2) < 0.01  # uniform: its mean
        for w in (p.w_in, p.w_a, p.w_x, p.b_in, p.b_a, p.b_x):
            assert float(jnp.max(jnp.abs(w))) <= 1 / 3  # U(-1/sqrt(D), 1/sqrt(D)), D = 9
    p32 = bptt_jax.RGLRU(8).init(jax.random.key(0), 2)
    assert {v.dtype for v in p32} == {jnp.dtype(F32)} and p32.lam.shape == (8,)


def test_the_cell_meets_the_linear_contract_and_is_registered():
    cell = bptt_jax.RGLRU(3)
    assert isinstance(cell, bptt_jax.LinearCell) and protocol.tier(cell) == "linear"
    assert protocol.has_coefficients_backward(cell)
    assert cell == bptt_jax.RGLRU(3, c=8) and hash(cell) == hash(bptt_jax.RGLRU(3, c=8))
    assert build_model("rglru", 3) == cell
    assert parse_spec("birglru:2") == ("rglru", 2, True)
    assert from_spec("rglru:2", 3) == bptt_jax.stacked(cell, 2)


@pytest.mark.parametrize("c", [0, 0.0, -1.0, float("nan"), float("inf"), True, "8", None])
def test_a_c_that_is_not_positive_is_refused_naming_it(c):
    expected = r"RGLRU: c must be a positive finite number \(c > 0\); got " + re.escape(repr(c))
    with pytest.raises(ValueError, match=expected):
        bptt_jax.RGLRU(4, c=c)


def test_an_unknown_scan_or_size_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"RGLRU: scan must be one of .*; got 'fast'"):
        bptt_jax.RGLRU(4, scan="fast")
    with pytest.raises(ValueError, match="RGLRU: hidden_size must be a positive int; got 0"):
        bptt_jax.RGLRU(0)
