"""Linear recurrences (``bptt_jax.cells.LinearCell``): MinGRU, MinLSTM and a cell of a user's
own, on the engine's linear path (``bptt_jax._engine.linear_scan``).

The reference is ``jax.grad`` of a plain sequential ``lax.scan`` of each cell's equations,
written again here from the papers' definitions (never the library's coefficient code):
float64 within 1e-12 normwise relative (float32 within 1e-5), on random params, inputs,
right-padded masks, resets, initial carries and cotangents, with both scans (parallel and
sequential), every schedule (full, truncated, per-step clipping, checkpointed, chunked),
inside a Stack with dropout and a Bidirectional layer. Paths whose reference is the engine's
generic path (a verified one): the same cell with its coefficients hidden, a tier-1 cell.
"""

import dataclasses
import itertools
from functools import cache, partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import bptt_jax
from bptt_jax import _engine as engine
from bptt_jax import truncated
from bptt_jax._engine import linear_scan
from bptt_jax.cells import protocol
from tests import reference as ref

F64, F32 = jnp.float64, jnp.float32
H = 5
SCANS = ("parallel", "sequential")


def _set_chunk(monkeypatch, n):
    """The linear path's chunks at most ``n`` steps long (``None``: the backend's), with
    every trace made afresh (the override is read at trace time)."""
    if n is None:
        monkeypatch.delenv("BPTT_JAX_LINEAR_CHUNK", raising=False)
    else:
        monkeypatch.setenv("BPTT_JAX_LINEAR_CHUNK", str(n))
    jax.clear_caches()


@pytest.fixture(
    params=[pytest.param(None, marks=pytest.mark.slow), 2], ids=["chunk-default", "chunk-2"]
)
def chunk(request, monkeypatch):
    """Each test twice: chunks of 2 steps (T=9: four and a tail of one), so that the state
    and its error cross chunks; and, under ``-m slow``, one chunk over its few steps (the
    backend's length, which the float64 grid above runs by default)."""
    _set_chunk(monkeypatch, request.param)
    yield request.param
    monkeypatch.delenv("BPTT_JAX_LINEAR_CHUNK", raising=False)
    jax.clear_caches()


def sigmoid(a):
    return 1 / (1 + jnp.exp(-a))


# ------------------------------------------------------------------ a user's linear cell
@dataclasses.dataclass(frozen=True)
class Decay:
    """A user's linear cell without ``coefficients_backward`` (the engine takes ``jax.vjp``
    of ``coefficients``): ``h_t = sigmoid(lam) * h_{t-1} + tanh(x_t W)``, per unit ``lam``."""

    hidden_size: int
    scan: str = "auto"

    def init(self, key, input_size, dtype=jnp.float32):
        kw, kl = jax.random.split(key)
        return {
            "w": jax.random.normal(kw, (input_size, self.hidden_size), dtype),
            "lam": jax.random.normal(kl, (self.hidden_size,), dtype),
        }

    def zero_carry(self, batch_size, dtype=jnp.float32):
        return jnp.zeros((batch_size, self.hidden_size), dtype)

    def coefficients(self, params, xs):
        b = jnp.tanh(protocol.matmul(xs, params["w"]))
        return (jnp.broadcast_to(jax.nn.sigmoid(params["lam"]), b.shape), b), ()

    def step(self, params, h, x):
        (a, b), _ = self.coefficients(params, x)
        return a * h + b, a * h + b


@dataclasses.dataclass(frozen=True)
class Tier1:
    """``cell`` with its linear face hidden: the engine's generic path, step by step."""

    cell: object

    def init(self, key, input_size, dtype=jnp.float32):
        return self.cell.init(key, input_size, dtype)

    def zero_carry(self, batch_size, dtype=jnp.float32):
        return self.cell.zero_carry(batch_size, dtype)

    def step(self, params, carry, x):
        return self.cell.step(params, carry, x)


# ------------------------------------------------------------------ the references
def step(cell, p, h, x):
    """One step of ``cell`` from its equations (Feng et al. 2024; ``Decay``'s docstring)."""
    if isinstance(cell, bptt_jax.MinGRU):
        z = sigmoid(x @ p.w_z + p.b_z)
        return (1 - z) * h + z * (x @ p.w_h + p.b_h)
    if isinstance(cell, bptt_jax.MinLSTM):
        f, i = sigmoid(x @ p.w_f + p.b_f), sigmoid(x @ p.w_i + p.b_i)
        return f / (f + i) * h + i / (f + i) * (x @ p.w_h + p.b_h)
    return sigmoid(p["lam"]) * h + jnp.tanh(x @ p["w"])


@cache
def _step_of(cell):
    """The reference step of ``cell``, one object per cell (the reference compiles once)."""
    return partial(step, cell)


def scan_unroll(cell, p, xs, h0, *options):
    return ref.diagonal_scan(_step_of(cell), p, xs, h0, *options)


_options = ref.scan_options


def reference_vjp(cell, p, xs, h0, ct, mask=None, resets=None, truncate=None, delta_clip=None):
    """``((hs, carry_T), (dp, dxs, dh0))`` of the reference for cotangents ``ct``."""
    return ref.diagonal_scan_vjp(_step_of(cell), p, xs, h0, ct, mask, resets, truncate, delta_clip)


@cache
def _library_vjp(model, truncate=None, delta_clip=None, backward="manual", segment=None):
    def run(p, xs, h0, ct, mask, resets, dropout_key=None):
        def f(p, xs, h0):
            return bptt_jax.unroll(
                model, p, xs, h0, mask=mask, resets=resets, truncate=truncate,
                delta_clip=delta_clip, backward=backward, segment=segment,
                dropout_key=dropout_key,
            )  # fmt: skip

        out, vjp = jax.vjp(f, p, xs, h0)
        return out, vjp(ct)

    return jax.jit(run)


def problem(cell, rng, dtype, t=9, b=3, resets=True):
    """``(p, xs, h0, mask, resets, ct)``: random everything, cotangents on hs and carry_T."""
    p, _, xs, _, h0, mask = ref.draw(cell, rng, dtype, t=t, b=b)
    r = ref.flags(rng, xs.shape[:2], 0.15) if resets else None
    hs_like = jnp.zeros((t, b, ref.model_output_size(cell)), dtype)
    return p, xs, h0, mask, r, ref.normal_like(rng, (hs_like, h0))


def _cell(name, scan):
    return {"mingru": bptt_jax.MinGRU, "minlstm": bptt_jax.MinLSTM, "decay": Decay}[name](
        H, scan=scan
    )


# ------------------------------------------------------------------ the grid
OPTIONS = {
    "full": {},
    "trunc3": {"truncate": 3},
    "clip": {"delta_clip": 0.3},
    "trunc3-clip": {"truncate": 3, "delta_clip": 0.3},
}


def _grid():
    """cell x scan x options; the default run gives each (cell, scan) two of the options in
    turn (every option meets both scans and every cell), the rest under ``-m slow``."""
    cells = ("mingru", "minlstm", "decay")
    for i, (name, scan) in enumerate(itertools.product(cells, SCANS)):
        for j, opt in enumerate(OPTIONS):
            fast = j % 2 == i % 2
            yield pytest.param(
                name, scan, opt, id=f"{name}-{scan}-{opt}", marks=() if fast else pytest.mark.slow
            )


@pytest.mark.parametrize("name,scan,options", list(_grid()))
def test_unroll_vjp_matches_the_plain_scan_in_float64(name, scan, options, rng):
    """Random params, inputs, padding, resets, initial carry and cotangents on hs and
    carry_T; within 1e-12. The options change the gradient (the check can fail)."""
    cell = _cell(name, scan)
    kw = OPTIONS[options]
    p, xs, h0, m, r, ct = problem(cell, rng, F64)
    out, grads = _library_vjp(cell, **kw)(p, xs, h0, ct, m, r)
    out_r, grads_r = reference_vjp(cell, p, xs, h0, ct, m, r, **kw)
    ref.assert_trees_close(out, out_r, F64)
    ref.assert_trees_close(grads, grads_r, F64)
    if kw:
        _, plain = reference_vjp(cell, p, xs, h0, ct, m, r)
        assert max(map(ref.rel_err, jax.tree.leaves(grads), jax.tree.leaves(plain))) > 1e-3


@pytest.mark.parametrize("name", ["mingru", "minlstm"])
def test_float32_within_1e5_and_both_scans_agree(name, rng):
    """float32, T=40: each scan within 1e-5 of the float64 reference's float32 run, and the
    two scans within 1e-5 of each other."""
    grads = {}
    for scan in SCANS:
        cell = _cell(name, scan)
        p, xs, h0, m, r, ct = problem(cell, np.random.default_rng(7), F32, t=40)
        out, grads[scan] = _library_vjp(cell)(p, xs, h0, ct, m, r)
        out_r, grads_r = reference_vjp(cell, p, xs, h0, ct, m, r)
        ref.assert_trees_close(out, out_r, F32)
        ref.assert_trees_close(grads[scan], grads_r, F32)
    ref.assert_trees_close(grads["parallel"], grads["sequential"], F32)


def _chunk_grid():
    """cell x scan x chunk size: each cell once, each scan and size in turn, by default."""
    for i, (name, scan, size) in enumerate(
        itertools.product(("mingru", "minlstm", "decay"), SCANS, (2, 5))
    ):
        fast = i in (0, 7, 9)  # mingru-parallel-2, minlstm-sequential-5, decay-parallel-5
        yield pytest.param(name, scan, size, id=f"{size}-{name}-{scan}",
                           marks=() if fast else pytest.mark.slow)  # fmt: skip


@pytest.mark.parametrize("name,scan,size", list(_chunk_grid()))
def test_chunks_of_any_length_match_the_plain_scan(name, scan, size, rng, monkeypatch):
    """T=13 in chunks of at most 2 (six and a tail of one) or 5 (two and a tail of three):
    the state, its error, the truncation cuts and the clipping cross the chunks' edges."""
    cell = _cell(name, scan)
    _set_chunk(monkeypatch, size)
    assert linear_scan.chunks(13, 8) == {2: (2, 6, 1), 5: (5, 2, 3)}[size]
    try:
        for kw in ({}, {"truncate": 3, "delta_clip": 0.3}):
            p, xs, h0, m, r, ct = problem(cell, rng, F64, t=13)
            out, grads = _library_vjp(cell, **kw)(p, xs, h0, ct, m, r)
            out_r, grads_r = reference_vjp(cell, p, xs, h0, ct, m, r, **kw)
            ref.assert_trees_close(out, out_r, F64)
            ref.assert_trees_close(grads, grads_r, F64)
    finally:
        _set_chunk(monkeypatch, None)


def test_chunks_are_as_even_as_the_length_allows(monkeypatch):
    """``(size, n, tail)``: chunks of about ``LINEAR_CHUNK_BYTES`` of a (T, B, N) array (one
    chunk when the whole is at most twice that), as even as T allows; the override in steps."""
    monkeypatch.delenv("BPTT_JAX_LINEAR_CHUNK", raising=False)
    monkeypatch.setattr(engine.options, "LINEAR_CHUNK_BYTES", {jax.default_backend(): 2**21})
    step = 16 * 256 * 4  # B=16, H=256 in float32: 128 steps in 2 MiB
    assert linear_scan.chunks(4096, step) == (128, 32, 0)
    assert linear_scan.chunks(1000, step) == (125, 8, 0)  # not 7 of 128 and a tail of 104
    assert linear_scan.chunks(256, step) == (256, 1, 0)  # 4 MiB: one chunk
    assert linear_scan.chunks(3, 2**30) == (1, 3, 0)  # a step over the budget: one per chunk
    monkeypatch.setattr(engine.options, "LINEAR_CHUNK_BYTES", {})
    assert linear_scan.chunks(4096, step) == (4096, 1, 0)  # unmeasured backends: one chunk
    monkeypatch.setenv("BPTT_JAX_LINEAR_CHUNK", "64")
    assert linear_scan.chunks(4096, step) == (64, 64, 0)
    assert linear_scan.chunks(4097, step) == (64, 64, 1)
    assert linear_scan.chunks(100, step) == (50, 2, 0)
    assert linear_scan.chunks(9, step) == (9, 1, 0)


def test_the_gradient_stores_a_quarter_of_an_associative_scans_autodiff():
    """The issue's memory bound: the compiled gradient's temp memory at most 0.25x that of
    ``jax.grad`` of an associative-scan forward of the same minGRU, written plainly here (only
    the states are stored; each chunk's coefficients are re-computed in the backward). At a
    length whose (T, B, H) arrays take several chunks: 16 MiB here."""
    t, b, d, h = 8192, 16, 8, 32
    cell = bptt_jax.MinGRU(h)
    p = cell.init(jax.random.key(0), d)
    xs, ct = jnp.ones((t, b, d), F32), jnp.ones((t, b, h), F32)

    def plain(p, xs, ct):
        z = sigmoid(xs @ p.w_z + p.b_z)
        a, b_ = 1 - z, z * (xs @ p.w_h + p.b_h)
        hs = lax.associative_scan(lambda e, l: (l[0] * e[0], l[0] * e[1] + l[1]), (a, b_))[1]
        return jnp.vdot(hs, ct)

    def library(p, xs, ct):
        return jnp.vdot(bptt_jax.unroll(cell, p, xs)[0], ct)

    def temp(f):
        compiled = jax.jit(jax.grad(f, (0, 1))).lower(p, xs, ct).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp(library) <= 0.25 * temp(plain), (temp(library), temp(plain))


@pytest.mark.parametrize("scan", SCANS)
def test_checkpointed_bptt_matches_the_plain_scan(scan, rng, chunk):
    """backward="checkpointed", segments of 4 over T=9 (a padded tail), truncation at 3."""
    cell = bptt_jax.MinLSTM(H, scan=scan)
    p, xs, h0, m, r, ct = problem(cell, rng, F64)
    lib = _library_vjp(cell, truncate=3, backward="checkpointed", segment=4)
    out, grads = lib(p, xs, h0, ct, m, r)
    out_r, grads_r = reference_vjp(cell, p, xs, h0, ct, m, r, truncate=3)
    ref.assert_trees_close(out, out_r, F64)
    ref.assert_trees_close(grads, grads_r, F64)


@pytest.mark.parametrize("scan", SCANS)
def test_chunked_truncated_loss_with_a_final_carry_error_matches_the_plain_scan(scan, rng, chunk):
    """sequence_loss(truncate=4) (chunk by chunk, chunk groups batched) with resets, a loss
    mask and an error on carry_T, against the reference's loss."""
    cell = bptt_jax.MinGRU(H, scan=scan)
    p, ro, xs, tg, h0, m = ref.draw(cell, rng, F64)
    r, lm = ref.flags(rng, xs.shape[:2], 0.15), ref.flags(rng, xs.shape[:2], 0.7)
    w = ref.normal_like(rng, h0)

    def lib(p, ro, xs, h0):
        v, c = bptt_jax.sequence_loss(
            cell, p, ro, xs, tg, h0, mask=m, loss_mask=lm, resets=r, truncate=4,
            return_carry=True,
        )  # fmt: skip
        return v + jnp.vdot(c, w)

    def reference(p, ro, xs, h0):
        hs, c = scan_unroll(cell, p, xs, h0, *_options(xs, m, r, 4, None))
        return ref.readout_loss(hs, ro, tg, m, loss_mask=lm) + jnp.vdot(c, w)

    v, g = jax.jit(jax.value_and_grad(lib, (0, 1, 2, 3)))(p, ro, xs, h0)
    v_r, g_r = jax.jit(jax.value_and_grad(reference, (0, 1, 2, 3)))(p, ro, xs, h0)
    assert ref.rel_err(v, v_r) <= ref.TOL[F64]
    ref.assert_trees_close(g, g_r, F64)


def test_a_stack_with_dropout_matches_the_plain_scan(rng, key, chunk):
    """A MinGRU over a MinLSTM with dropout between them, truncation and resets."""
    model = bptt_jax.Stack(
        (bptt_jax.MinGRU(H, scan="parallel"), bptt_jax.MinLSTM(4, scan="sequential")), 0.3
    )
    p, _, xs, _, h0, m = ref.draw(model.layers[0], rng, F64)
    p = (p, ref.draw(model.layers[1], rng, F64, d=H)[0])
    h0 = (h0, ref.normal_like(rng, model.layers[1].zero_carry(3, F64)))
    r = ref.flags(rng, xs.shape[:2], 0.15)
    ct = ref.normal_like(rng, (jnp.zeros((*xs.shape[:2], 4), F64), h0))
    drops = model.dropout_masks(key, *xs.shape[:2], F64)
    out, grads = _library_vjp(model, truncate=4)(p, xs, h0, ct, m, r, key)

    def reference(p, xs, h0):
        opts = _options(xs, m, r, 4, None)
        h1, c1 = scan_unroll(model.layers[0], p[0], xs, h0[0], *opts)
        h2, c2 = scan_unroll(model.layers[1], p[1], h1 * drops[0], h0[1], *opts)
        return h2, (c1, c2)

    out_r, vjp = jax.vjp(reference, p, xs, h0)
    ref.assert_trees_close(out, out_r, F64)
    ref.assert_trees_close(grads, vjp(ct), F64)


@pytest.mark.parametrize("scan", SCANS)
def test_a_bidirectional_layer_over_right_padded_sequences_matches_the_plain_scan(scan, rng, chunk):
    """The reverse cell reads each sequence's valid prefix backwards; per-step clipping."""
    model = bptt_jax.Bidirectional(bptt_jax.MinGRU(H, scan=scan), bptt_jax.MinLSTM(H, scan=scan))
    p, xs, h0, m, _, _ = problem(model.forward, rng, F64, resets=False)
    p = (p, ref.draw(model.backward, rng, F64)[0])
    h0 = (h0, ref.normal_like(rng, h0))
    ct = ref.normal_like(rng, (jnp.zeros((*xs.shape[:2], 2 * H), F64), h0))
    out, grads = _library_vjp(model, delta_clip=0.5)(p, xs, h0, ct, m, None)
    rev = ref.prefix_reversal(m, xs.shape[0], F64)

    def reversed_(a):
        return jnp.einsum("stb,tbf->sbf", rev, a)

    def reference(p, xs, h0):
        opts = _options(xs, m, None, None, 0.5)
        hf, cf = scan_unroll(model.forward, p[0], xs, h0[0], *opts)
        hb, cb = scan_unroll(model.backward, p[1], reversed_(xs), h0[1], *opts)
        return jnp.concatenate([hf, reversed_(hb)], -1), (cf, cb)

    out_r, vjp = jax.vjp(reference, p, xs, h0)
    ref.assert_trees_close(out, out_r, F64)
    ref.assert_trees_close(grads, vjp(ct), F64)


# ------------------------------------------------- against the generic path (tier 1)
def test_kept_deltas_equal_the_generic_paths(rng, chunk):
    """The errors kept per step (the diagnostics' ``keep_deltas``), with clipping, padding
    and resets, are the generic path's for the same cell walked step by step."""
    cell = bptt_jax.MinLSTM(H, scan="parallel")
    p, xs, h0, m, r, (dhs, dh_t) = problem(cell, rng, F64)
    steps = engine.Steps(xs, m, r)
    backprop = engine.Backprop(delta_clip=0.4, keep_deltas=True)

    def run(c):
        _, _, saved = engine.model_forward(c, p, steps, h0)
        return engine.model_backward(c, p, steps, h0, saved, (dhs, dh_t), backprop)

    ref.assert_trees_close(jax.jit(run, static_argnums=0)(cell), run(Tier1(cell)), F64)


def test_tbptt_streams_equal_the_generic_paths(rng, chunk):
    """TBPTT(3, 5) over a stream with resets, SGD inside: params, readout and final carry."""
    cell = bptt_jax.MinGRU(H, scan="parallel")
    p, ro, xs, tg, h0, _ = ref.draw(cell, rng, F64, t=11)
    r = ref.flags(rng, xs.shape[:2], 0.1)

    def sgd(n, p, ro, lg, window):
        p, ro = jax.tree.map(lambda a, g: a - 0.5 * g, (p, ro), (lg.params, lg.readout))
        return n, p, ro, lg.value

    def run(c):
        out = truncated.tbptt(c, p, ro, xs, tg, h0, k1=3, k2=5, update=sgd, update_state=0,
                              resets=r)  # fmt: skip
        return out.params, out.readout, out.carry, out.aux

    ref.assert_trees_close(jax.jit(run, static_argnums=0)(cell), run(Tier1(cell)), F64)


def test_jacobian_norms_equal_the_generic_paths(rng, chunk):
    """The diagnostics' reverse walk without gradients (``linear_scan.reverse_scan``, the
    inputs read from what the forward stored): ``||dh_T/dh_t||`` with padding and resets."""
    cell = bptt_jax.MinLSTM(H, scan="parallel")
    p, xs, _, m, r, _ = problem(cell, rng, F64)
    norms = bptt_jax.jacobian_norms(cell, p, xs, mask=m, resets=r)
    ref.assert_trees_close(norms, bptt_jax.jacobian_norms(Tier1(cell), p, xs, mask=m, resets=r),
                           F64)  # fmt: skip


def test_check_gradients_passes_under_a_bf16_policy():
    """``check_gradients`` of the bf16 tier: the policy's gradient against autodiff of the
    policy and of float32; the coefficients' products are formed in float32."""
    report = bptt_jax.check_gradients(
        bptt_jax.MinGRU(16, scan="parallel"), dtype=F32, compute_dtype=jnp.bfloat16, seq_len=48
    )
    assert report.passed, (report.autodiff, report.full_precision)


def test_outputs_carries_and_gradients_have_the_policys_dtypes(rng):
    cell = bptt_jax.MinLSTM(H, scan="parallel")
    p, xs, h0, m, r, _ = problem(cell, rng, F32)

    def f(p, xs, h0):
        hs, c = bptt_jax.unroll(cell, p, xs, h0, mask=m, resets=r, compute_dtype=jnp.bfloat16)
        return jnp.sum(hs.astype(F32)) + jnp.sum(c), (hs, c)

    (_, (hs, c)), grads = jax.jit(jax.value_and_grad(f, (0, 1, 2), has_aux=True))(p, xs, h0)
    assert (hs.dtype, c.dtype) == (jnp.bfloat16, F32)
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(F32)}


# ------------------------------------------------------------------ the contract
def test_the_cells_meet_the_linear_contract():
    for cell in (bptt_jax.MinGRU(3), bptt_jax.MinLSTM(3), Decay(3)):
        assert isinstance(cell, bptt_jax.LinearCell) and protocol.tier(cell) == "linear"
        assert engine.scans(cell) is engine.layers.linear_scan
    assert protocol.tier(Tier1(bptt_jax.MinGRU(3))) == "vjp"
    assert protocol.has_coefficients_backward(bptt_jax.MinGRU(3))
    assert not protocol.has_coefficients_backward(Decay(3))


@pytest.mark.parametrize("cls", [bptt_jax.MinGRU, bptt_jax.MinLSTM])
def test_an_unknown_scan_or_size_is_refused_naming_it(cls):
    with pytest.raises(ValueError, match=r"scan must be one of .*; got 'fast'"):
        cls(4, scan="fast")
    with pytest.raises(ValueError, match="hidden_size must be a positive int; got 0"):
        cls(0)


def test_a_users_linear_cell_with_an_unknown_scan_or_bad_coefficients_is_refused():
    xs = jnp.ones((4, 2, 3), F32)
    cell = Decay(5, scan="fastest")
    with pytest.raises(ValueError, match=r"Decay: scan must be one of .*; got 'fastest'"):
        bptt_jax.unroll(cell, cell.init(jax.random.key(0), 3), xs)

    @dataclasses.dataclass(frozen=True)
    class Flat(Decay):
        def coefficients(self, params, xs):
            (a, b), res = super().coefficients(params, xs)
            return (a[..., :1], b), res

    cell = Flat(5)
    with pytest.raises(ValueError, match=r"returns a of shape \(2, 2, 1\); it must be"):
        bptt_jax.unroll(cell, cell.init(jax.random.key(0), 3), xs)
