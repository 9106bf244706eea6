"""Episodes and packed sequences (``bptt_jax.streams``): nothing leaks across a boundary.

For random packings of several sequences into each row, every sequence's outputs, final
carry and input gradients equal those of the sequence run alone from zeros, and the params'
gradient equals the sum of the alone runs' (any leak of state or error across a boundary
would add a term that random cotangents expose), float64 within 1e-12: every cell kind and
model kind, full, checkpointed and clipped backwards, uni- and bidirectional. Resets made
from done flags equal a loop over the episodes; the burn-in passes no gradient.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bptt_jax
from bptt_jax import streams
from tests import reference as ref

F64 = jnp.float64
T, B, D, H = 12, 3, 3, 4


def packing(rng, t=T, b=B):
    """Random segment ids: each row 1 to 4 documents of random lengths, then padding (the
    first row full)."""
    ids = np.zeros((t, b), np.int32)
    for row in range(b):
        used = t if row == 0 else int(rng.integers(3, t + 1))
        n_cuts = min(int(rng.integers(1 if row == 0 else 0, 4)), used - 1)  # row 0: two or more
        cuts = np.sort(rng.choice(np.arange(1, used), size=n_cuts, replace=False))
        bounds = [0, *cuts.tolist(), used]
        for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
            ids[s:e, row] = i + 1
    return ids


def segments(ids):
    """``[(row, start, end)]`` of every document."""
    out = []
    for row in range(ids.shape[1]):
        col = ids[:, row]
        for doc in np.unique(col[col > 0]):
            where = np.nonzero(col == doc)[0]
            out.append((row, int(where[0]), int(where[-1]) + 1))
    return out


def alone_batch(xs, segs, t=T):
    """Every document at the start of its own row, padded: ``(xs, mask)`` (T, S, D)."""
    out = np.zeros((t, len(segs), xs.shape[-1]))
    mask = np.zeros((t, len(segs)), bool)
    for i, (row, s, e) in enumerate(segs):
        out[: e - s, i] = xs[s:e, row]
        mask[: e - s, i] = True
    return jnp.asarray(out), jnp.asarray(mask)


@dataclasses.dataclass(frozen=True)
class FlaxGRU:
    """A tier-1 cell with a tuple carry, as Flax writes one (outputs not the carry)."""

    hidden_size: int

    def init(self, key, input_size, dtype=jnp.float32):
        k1, k2 = jax.random.split(key)
        h = self.hidden_size
        return {"w": jax.random.normal(k1, (input_size, 2 * h), dtype) / 2,
                "u": jax.random.normal(k2, (h, 2 * h), dtype) / 2}  # fmt: skip

    def zero_carry(self, batch_size, dtype=jnp.float32):
        z = jnp.zeros((batch_size, self.hidden_size), dtype)
        return (z, z)

    def step(self, params, carry, x):
        h, _ = carry
        z, n = jnp.split(x @ params["w"] + h @ params["u"], 2, axis=-1)
        h = (1 - jax.nn.sigmoid(z)) * h + jax.nn.sigmoid(z) * jnp.tanh(n)
        return (h, jnp.tanh(n)), h


MODELS = {
    "lstm": lambda: bptt_jax.LSTM(H),
    "gru": lambda: bptt_jax.GRU(H),
    "elman": lambda: bptt_jax.Elman(H),
    "mingru": lambda: bptt_jax.MinGRU(H, scan="parallel"),
    "lru": lambda: bptt_jax.LRU(H, 3),
    "flax-gru": lambda: FlaxGRU(H),
    "stack": lambda: bptt_jax.Stack((bptt_jax.GRU(H), bptt_jax.MinLSTM(H))),
    "bilstm": lambda: bptt_jax.Bidirectional(bptt_jax.LSTM(H)),
    "bi-mixed": lambda: bptt_jax.Bidirectional(bptt_jax.RGLRU(H), bptt_jax.GRU(H)),
    "stack-bi": lambda: bptt_jax.stacked(bptt_jax.GRU(H), 2, bidirectional=True),
}
OPTIONS = {
    "full": {},
    "checkpointed": {"backward": "checkpointed", "segment": 5},
    "clip": {"delta_clip": 0.2},
    "autodiff": {"backward": "autodiff"},
}
#: The default run: each path once (the fast path, the linear path, the generic path with
#: a tuple carry, a Bidirectional layer of a linear and a fast cell, a Stack of Bidirectional
#: layers checkpointed); the rest under ``-m slow``.
DEFAULT_RUN = {
    "full": ("lstm", "lru", "bi-mixed"),
    "checkpointed": ("stack-bi",),
    "clip": ("flax-gru",),
    "autodiff": (),
}


def _grid():
    for opt in OPTIONS:
        for name in MODELS:
            marks = () if name in DEFAULT_RUN[opt] else pytest.mark.slow
            yield pytest.param(name, opt, id=f"{name}-{opt}", marks=marks)


def _vjp(model, kw):
    @jax.jit
    def run(p, xs, mask, resets, ct):
        def f(p, xs):
            return bptt_jax.unroll(model, p, xs, mask=mask, resets=resets, **kw)

        out, pullback = jax.vjp(f, p, xs)
        return out, pullback((ct, jax.tree.map(jnp.zeros_like, out[1])))

    return run


@pytest.mark.parametrize("name,options", list(_grid()))
def test_each_packed_sequence_equals_the_sequence_run_alone(name, options, rng):
    model = MODELS[name]()
    kw = OPTIONS[options]
    p = ref.random_like(jax.random.key(int(rng.integers(1 << 30))),
                        model.init(jax.random.key(0), D, F64))  # fmt: skip
    p = jax.tree.map(lambda a: 0.7 * a, p)
    ids = packing(rng)
    segs = segments(ids)
    resets, mask = streams.from_segment_ids(ids)
    xs = jnp.asarray(rng.standard_normal((T, B, D)))
    f = bptt_jax.models.output_size(model)
    ct = jnp.where(mask[..., None], jnp.asarray(rng.standard_normal((T, B, f))), 0.0)
    (hs, carry), (dp, dxs) = _vjp(model, kw)(p, xs, mask, resets, ct)

    xs_a, mask_a = alone_batch(np.asarray(xs), segs)
    ct_a, _ = alone_batch(np.asarray(ct), segs)
    (hs_a, carry_a), (dp_a, dxs_a) = _vjp(model, kw)(p, xs_a, mask_a, None, ct_a)
    for i, (row, s, e) in enumerate(segs):
        ref.assert_trees_close(hs[s:e, row], hs_a[: e - s, i], F64)
        ref.assert_trees_close(dxs[s:e, row], dxs_a[: e - s, i], F64)
        if e == int(mask[:, row].sum()):  # the row's last document: its final carry
            ref.assert_trees_close(jax.tree.map(lambda c: c[row], carry),
                                   jax.tree.map(lambda c: c[i], carry_a), F64)  # fmt: skip
    ref.assert_trees_close(dp, dp_a, F64)
    # without the resets the documents would leak: the check can fail
    (hs_leak, _), (dp_leak, _) = _vjp(model, kw)(p, xs, mask, None, ct)
    leak = max(map(ref.rel_err, jax.tree.leaves((hs_leak, dp_leak)), jax.tree.leaves((hs, dp_a))))
    assert leak > 1e-6


def test_the_loss_and_trainer_paths_isolate_packed_documents(rng):
    """``sequence_loss`` (chunked truncation inside each document is not isolation: full
    BPTT here) and ``loss_and_grads`` on a packed batch equal the alone batch's."""
    model = bptt_jax.GRU(H)
    p = model.init(jax.random.key(1), D, F64)
    ro = bptt_jax.init_readout(jax.random.key(2), H, 5, F64)
    ids = packing(rng)
    segs = segments(ids)
    resets, mask = streams.from_segment_ids(ids)
    xs = jnp.asarray(rng.standard_normal((T, B, D)))
    tg = jnp.asarray(rng.integers(0, 5, (T, B)), jnp.int32)
    xs_a, mask_a = alone_batch(np.asarray(xs), segs)
    tg_a, _ = alone_batch(np.asarray(tg)[..., None], segs)
    tg_a = tg_a[..., 0].astype(jnp.int32)
    kw = dict(loss="xent", reduction="sum")
    lg = bptt_jax.loss_and_grads(model, p, ro, xs, tg, mask=mask, resets=resets, **kw)
    lg_a = bptt_jax.loss_and_grads(model, p, ro, xs_a, tg_a, mask=mask_a, **kw)
    assert ref.rel_err(lg.value, lg_a.value) < 1e-12
    ref.assert_trees_close((lg.params, lg.readout), (lg_a.params, lg_a.readout), F64)


def test_resets_from_done_flags_equal_a_loop_over_the_episodes(rng):
    """A rollout of T=16 steps in 4 rows, episodes ending at random steps, cut in two TBPTT
    windows of 8: the outputs of each window from the carried state (resets from
    ``resets_from_dones`` with the previous window's last done) equal a Python loop that
    runs every episode alone from zeros."""
    model = bptt_jax.LSTM(H)
    p = model.init(jax.random.key(3), D, F64)
    t, b = 16, 4
    dones = rng.random((t, b)) < 0.2
    dones[7, 0] = True  # an episode ending at the last step of the first window
    xs = jnp.asarray(rng.standard_normal((t, b, D)))
    carry, prev, outs = None, None, []
    for w in range(2):
        resets, prev = streams.resets_from_dones(dones[8 * w : 8 * w + 8], prev_done=prev)
        hs, carry = bptt_jax.unroll(model, p, xs[8 * w : 8 * w + 8], carry, resets=resets)
        outs.append(hs)
    hs = jnp.concatenate(outs)
    for row in range(b):
        ends = [i + 1 for i in np.nonzero(dones[:, row])[0]]
        for s, e in zip([0, *ends], [*ends, t]):
            if s >= e:
                continue
            alone, _ = bptt_jax.unroll(model, p, xs[s:e, row : row + 1])
            ref.assert_trees_close(hs[s:e, row], alone[:, 0], F64)
    assert bool(streams.resets_from_dones(dones[:8])[0][0].any()) is False
    assert bool(streams.resets_from_dones(dones[8:], prev_done=dones[7])[0][0, 0])


def test_the_conventions_drawn_in_the_module_docstring():
    dones = jnp.array([0, 0, 1, 0, 0, 1, 0, 0], bool)[:, None]
    first, last = streams.resets_from_dones(dones[:6])
    second, _ = streams.resets_from_dones(dones[6:], prev_done=last)
    assert jnp.concatenate([first, second])[:, 0].astype(int).tolist() == [0, 0, 0, 1, 0, 0, 1, 0]
    packed = streams.from_segment_ids(jnp.array([1, 1, 1, 2, 2, 3, 0, 0])[:, None])
    assert packed.resets[:, 0].astype(int).tolist() == [0, 0, 0, 1, 0, 1, 0, 0]
    assert packed.mask[:, 0].astype(int).tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
    cont = streams.from_segment_ids(jnp.array([[3], [3], [4]]), prev_ids=jnp.array([3]))
    assert cont.resets[:, 0].astype(int).tolist() == [0, 0, 1]  # document 3 goes on


def test_the_reversal_of_packed_rows_reverses_each_document_in_place():
    from bptt_jax._engine import directions

    ids = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]]).T
    resets, mask = streams.from_segment_ids(ids)
    idx = directions.reversal(mask, 8, resets)
    assert idx[:, 0].tolist() == [2, 1, 0, 4, 3, 5, 6, 7]
    assert idx[:, 1].tolist() == [7, 6, 5, 4, 3, 2, 1, 0]


def test_burn_in_warms_the_carry_with_no_loss_and_no_gradient(rng):
    """``sequence_loss(burn_in=k)`` is the loss over ``[k, T)`` from the carry after k steps,
    that carry a constant: the gradients to ``carry0`` and ``xs[:k]`` are zero, the params'
    are those of the loss from the (fixed) warmed carry."""
    model = bptt_jax.GRU(H)
    p = model.init(jax.random.key(4), D, F64)
    ro = bptt_jax.init_readout(jax.random.key(5), H, 5, F64)
    xs = jnp.asarray(rng.standard_normal((T, B, D)))
    tg = jnp.asarray(rng.integers(0, 5, (T, B)), jnp.int32)
    c0 = jnp.asarray(rng.standard_normal((B, H)))
    k = 4

    def burned(p, xs, c0):
        return bptt_jax.sequence_loss(model, p, ro, xs, tg, c0, burn_in=k)

    warm = bptt_jax.unroll(model, p, xs[:k], c0)[1]

    def reference(p, xs_rest):
        return bptt_jax.sequence_loss(model, p, ro, xs_rest, tg[k:], warm)

    v, (dp, dxs, dc0) = jax.value_and_grad(burned, (0, 1, 2))(p, xs, c0)
    v_r, (dp_r, dxs_r) = jax.value_and_grad(reference, (0, 1))(p, xs[k:])
    assert ref.rel_err(v, v_r) < 1e-12
    ref.assert_trees_close((dp, dxs[k:]), (dp_r, dxs_r), F64)
    assert float(jnp.abs(dxs[:k]).max()) == 0.0 and float(jnp.abs(dc0).max()) == 0.0
    lg = bptt_jax.loss_and_grads(model, p, ro, xs, tg, c0, burn_in=k)
    ref.assert_trees_close(lg.params, dp_r, F64)


def test_the_trainer_takes_a_burn_in():
    """A trainer step with burn_in: the loss counts the steps after it only."""
    from bptt_jax import tasks, train

    task = tasks.AddingTask(seq_len=10)
    t = train.trainer(bptt_jax.GRU(8), train.OptimConfig(name="sgd", learning_rate=0.1),
                      loss="mse", burn_in=3)  # fmt: skip
    state = t.init(jax.random.key(0), task.input_size, task.output_size, batch_size=4)
    state, metrics = t.step(state, task.batch(state.key, 0, 4))
    assert np.isfinite(np.asarray(metrics["loss"])).all()
    with pytest.raises(ValueError, match="burn_in=3 cannot be combined with TBPTT"):
        train.trainer(bptt_jax.GRU(8), loss="mse", k1=5, burn_in=3)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: streams.resets_from_dones(jnp.zeros((4,), bool)), ValueError,
         r"dones must have shape \(T, B\)"),
        (lambda: streams.resets_from_dones(jnp.zeros((4, 2), jnp.float32)), TypeError,
         "dones must be bool or 0/1 integers"),
        (lambda: streams.resets_from_dones(jnp.full((4, 2), 2)), ValueError,
         r"dones must hold only 0 and 1; got 2 at \(t, b\) = \(0, 0\)"),
        (lambda: streams.resets_from_dones(jnp.zeros((4, 2), bool), prev_done=jnp.zeros(3)),
         ValueError, r"prev_done must have shape \(B,\) = \(2,\)"),
        (lambda: streams.from_segment_ids(jnp.zeros((4, 2), jnp.float32)), TypeError,
         "ids must be integers"),
        (lambda: streams.from_segment_ids(jnp.array([[1], [2], [1]])), ValueError,
         r"ids\[:, 0\] must number its documents .* at step t=2 it goes from 2"),
        (lambda: streams.from_segment_ids(jnp.array([[1], [0], [2]])), ValueError,
         r"at step t=2 it goes from 0 .* padding back to a document"),
    ],
    ids=["dones-shape", "dones-dtype", "dones-values", "prev-done", "ids-dtype", "ids-order",
         "ids-after-padding"],
)  # fmt: skip
def test_bad_flags_and_ids_are_refused_naming_them(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_bad_burn_in_is_refused_naming_it(rng):
    cell = bptt_jax.GRU(H)
    p = cell.init(jax.random.key(0), D, F64)
    ro = bptt_jax.init_readout(jax.random.key(1), H, 5, F64)
    xs = jnp.asarray(rng.standard_normal((T, B, D)))
    tg = jnp.zeros((T, B), jnp.int32)
    for k in (0, T, T + 3, 2.5):
        with pytest.raises(ValueError, match=r"burn_in must be an int in \[1, T\) = \[1, 12\)"):
            bptt_jax.sequence_loss(cell, p, ro, xs, tg, burn_in=k)
    bi = bptt_jax.Bidirectional(cell)
    with pytest.raises(ValueError, match="burn_in=2 is undefined for a bidirectional model"):
        bptt_jax.sequence_loss(bi, bi.init(jax.random.key(0), D, F64),
                               bptt_jax.init_readout(jax.random.key(1), 2 * H, 5, F64), xs, tg,
                               burn_in=2)  # fmt: skip
    with pytest.raises(ValueError, match="burn_in=2 cannot be combined with carry_index"):
        bptt_jax.loss_and_grads(cell, p, ro, xs, tg, burn_in=2, carry_index=5)


# ------------------------------------------------------------------ a learned initial carry
@pytest.mark.parametrize("name", ["lstm", pytest.param("stack-bi", marks=pytest.mark.slow)])
def test_a_learned_initial_carry_gets_the_summed_error_on_carry0(name, rng):
    """``LearnedCarry(model)``: the carry is broadcast from the params where carry0 is not
    given, and ``jax.grad`` (``unroll``, ``sequence_loss``) and ``loss_and_grads`` give it
    the error on carry0 summed over the batch: against autodiff of the reference scan of
    the plain model from the broadcast carry, float64. A given carry0 gives it no gradient."""
    inner = {"lstm": bptt_jax.LSTM(H), "stack-bi": MODELS["stack-bi"]()}[name]
    model = bptt_jax.LearnedCarry(inner)
    p = model.init(jax.random.key(0), D, F64)
    p = ref.random_like(jax.random.key(int(rng.integers(1 << 30))), p)  # a non-zero carry
    xs = jnp.asarray(rng.standard_normal((T, B, D)))
    mask = jnp.asarray(np.arange(T)[:, None] < np.array([T, 7, 4])[None])
    ro = bptt_jax.init_readout(jax.random.key(1), bptt_jax.models.output_size(model), 5, F64)
    tg = jnp.asarray(rng.integers(0, 5, (T, B)), jnp.int32)

    def reference(p):
        carry = jax.tree.map(lambda c: jnp.broadcast_to(c, (B, *c.shape[1:])), p.carry)
        return ref.model_loss(inner, p.model, ro, xs, tg, carry, mask, reduction="sum")

    want = jax.grad(reference)(p)
    got = jax.grad(lambda p: bptt_jax.sequence_loss(model, p, ro, xs, tg, mask=mask,
                                                    reduction="sum"))(p)  # fmt: skip
    ref.assert_trees_close(got, want, F64)
    lg = bptt_jax.loss_and_grads(model, p, ro, xs, tg, mask=mask, reduction="sum")
    ref.assert_trees_close(lg.params, want, F64)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want.carry)) > 1e-3
    given = bptt_jax.loss_and_grads(model, p, ro, xs, tg, model.zero_carry(B, F64), mask=mask)
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(given.params.carry))


def test_a_learned_carry_trains_with_the_trainer():
    """Every batch starts from the learned carry, and the update moves it."""
    from bptt_jax import tasks, train

    task = tasks.AddingTask(seq_len=10)
    model = bptt_jax.LearnedCarry(bptt_jax.GRU(8))
    t = train.trainer(model, train.OptimConfig(name="sgd", learning_rate=0.5), loss="mse")
    state = t.init(jax.random.key(0), task.input_size, task.output_size, batch_size=4)
    before = state.params.carry
    for i in range(3):
        state, _ = t.step(state, task.batch(state.key, i, 4))
    assert float(jnp.abs(state.params.carry - before).max()) > 0
    with pytest.raises(TypeError, match="LearnedCarry: model"):
        bptt_jax.LearnedCarry(object())
