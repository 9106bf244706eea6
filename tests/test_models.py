"""Models (``Stack``, ``Bidirectional``, ``stacked``) go everywhere a cell goes.

The specification of the model API: ``bptt_jax.unroll``, ``bptt_jax.sequence_loss`` and
``losses.loss_and_grads`` take a model where they take a cell, and their hand-written
gradients equal ``jax.vjp`` / ``jax.grad`` of the independent references ``model_unroll`` and
``model_loss`` in ``tests/reference.py`` (written from the models' definitions on top of the
plain-scan cell reference), for every model kind and schedule: full BPTT (``manual``),
``checkpointed`` with a segment that does not divide T, truncation (with and without per-step
clipping), ``delta_clip``, ``resets`` and dropout between layers.

The first tests check the references themselves: a padded bidirectional batch equals each
sequence run alone, a Stack of one cell is the cell, a Stack is layered per-step Python loops,
and (when PyTorch is installed) ``stacked(..., bidirectional=True)`` equals ``nn.RNN`` /
``nn.LSTM`` / ``nn.GRU`` on packed padded sequences.

Cost: every compared function is compiled once, with arrays as arguments; the references are
shared between schedules that define the same function (manual, checkpointed, resets and
dropout pass zero resets / all-ones dropout multipliers when they have none), and the loss's
reference gradient is the VJP of the unroll reference with the readout loss's gradient as
the cotangent (the chain rule; the same reference program serves the unroll test). Every
program compiles with the suite's XLA flags (tests/conftest.py: no backend optimization,
about a fifth of the compile time of these small programs); the library as XLA compiles it
by default is checked by tests/test_verify.py's default-flags test and ``bptt-jax verify``. The
default run has each model kind x schedule x {unroll, sequence_loss} once, in one dtype
(rotating); ``-m slow`` adds the other dtype and further combinations.
"""

import dataclasses
import functools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bptt_jax
from bptt_jax.losses import loss_and_grads
from tests import reference as ref

T, B, D, O = 8, 3, 4, 5
SEGMENT = 3  # checkpointed: 3 + 3 + 2, does not divide T
TRUNCATE = 3  # chunks [0, 3), [3, 6), [6, 8): a short last chunk, and k < T
CLIP_UNROLL = 0.5  # random N(0, 1) cotangents on H = 5-7 features: norms ~2, so it bites
CLIP_LOSS = 0.3  # with reduction="sum" the errors reaching the states are O(1): it bites
DROPOUT = 0.3
TOL = {jnp.float64: 1e-12, jnp.float32: 1e-5}
DTYPES = [jnp.float64, jnp.float32]

MODELS = {
    "stack-lstm2": bptt_jax.Stack((bptt_jax.LSTM(5, forget_bias=1.0), bptt_jax.LSTM(6))),
    "stack-elman-gru": bptt_jax.Stack((bptt_jax.Elman(5, "tanh"), bptt_jax.GRU(6))),
    "bi-lstm-concat": bptt_jax.Bidirectional(bptt_jax.LSTM(5, forget_bias=1.0)),
    "bi-gru-sum": bptt_jax.Bidirectional(bptt_jax.GRU(5), merge="sum"),
    "bi-gru-mean": bptt_jax.Bidirectional(bptt_jax.GRU(5), merge="mean"),
    "bi-elman-mixed": bptt_jax.Bidirectional(bptt_jax.Elman(5), backward=bptt_jax.Elman(7, "relu")),
    "stacked-bigru2": bptt_jax.stacked(bptt_jax.GRU(5), 2, bidirectional=True),
    "stack-bilstm-lstm": bptt_jax.Stack(
        (bptt_jax.Bidirectional(bptt_jax.LSTM(5)), bptt_jax.LSTM(6))
    ),
}


#: Bidirectional layers that differ from another model only in their merge.
MERGES = ("bi-gru-sum", "bi-gru-mean")


def _has_bidirectional(model) -> bool:
    if isinstance(model, bptt_jax.Stack):
        return any(isinstance(layer, bptt_jax.Bidirectional) for layer in model.layers)
    return isinstance(model, bptt_jax.Bidirectional)


def _is_deep_stack(model) -> bool:
    return isinstance(model, bptt_jax.Stack) and len(model.layers) > 1


BIDIRECTIONAL = [n for n, m in MODELS.items() if _has_bidirectional(m)]

#: name: (options, which models). Options are unroll's / sequence_loss's keyword arguments,
#: except ``resets`` / ``dropout``: True draws random resets / a dropout key for the call, and
#: ``delta_clip``: True takes CLIP_UNROLL or CLIP_LOSS. Models: "all"; "uni": without a
#: reverse direction (truncation is undefined for one; resets pack sequences, test_streams);
#: "stack": several layers.
SCHEDULES = {
    "manual": ({}, "all"),
    "checkpointed": ({"backward": "checkpointed", "segment": SEGMENT}, "all"),
    "truncate": ({"truncate": TRUNCATE}, "uni"),
    "truncate-clip": ({"truncate": TRUNCATE, "delta_clip": True}, "uni"),
    "clip": ({"delta_clip": True}, "all"),
    "resets": ({"resets": True}, "uni"),
    "dropout": ({"dropout": True}, "stack"),
}
#: Further combinations, only with ``-m slow``.
SLOW_SCHEDULES = {
    "autodiff": ({"backward": "autodiff"}, "all"),
    "checkpointed-clip": (
        {"backward": "checkpointed", "segment": SEGMENT, "delta_clip": True},
        "all",
    ),
    "checkpointed-dropout": (
        {"backward": "checkpointed", "segment": SEGMENT, "dropout": True},
        "stack",
    ),
    "checkpointed-truncate-resets-clip": (
        {
            "backward": "checkpointed",
            "segment": SEGMENT,
            "truncate": TRUNCATE,
            "resets": True,
            "delta_clip": True,
        },
        "uni",
    ),
    "truncate-resets-dropout": (
        {"truncate": TRUNCATE, "resets": True, "dropout": True},
        "uni",  # both unidirectional models are Stacks
    ),
}
ALL_SCHEDULES = {**SCHEDULES, **SLOW_SCHEDULES}


def _applies(which: str, model) -> bool:
    if which == "uni":
        return not _has_bidirectional(model)
    if which == "stack":
        return _is_deep_stack(model)
    return True


def _grid(kind: str):
    """model x schedule; in the default run each once, in the dtype given by the model and
    the schedule's reference (truncate? clip?), so the schedules that share a reference share
    its compilation; the loss and reduction rotate. The merge variants (``MERGES``: a
    Bidirectional layer that differs from another only in how it merges) meet the full
    schedule in the default run, and each model x schedule is checked through one of
    unroll and sequence_loss (alternating). The other dtype and path and SLOW_SCHEDULES are
    slow."""
    for si, (sched_name, (opts, which)) in enumerate(ALL_SCHEDULES.items()):
        group = 2 * ("truncate" in opts) + ("delta_clip" in opts)
        for mi, (model_name, model) in enumerate(MODELS.items()):
            if not _applies(which, model):
                continue
            loss = ("xent", "mse")[(mi + si) % 2]
            reduction = "sum" if "delta_clip" in opts else ("mean", "sum")[(mi + si // 2) % 2]
            for j, dtype in enumerate(DTYPES):
                fast = sched_name in SCHEDULES and j == (mi + group) % 2
                fast = fast and (model_name not in MERGES or sched_name == "manual")
                # one of unroll and sequence_loss per model x schedule, alternating: each
                # model meets both, and so does each schedule
                fast = fast and (kind == "unroll") == ((mi + si) % 2 == 0)
                ident = f"{model_name}-{sched_name}-{jnp.dtype(dtype).name}"
                extra = (loss, reduction) if kind == "loss" else ()
                yield pytest.param(
                    model_name,
                    sched_name,
                    dtype,
                    *extra,
                    id=f"{ident}-{loss}-{reduction}" if kind == "loss" else ident,
                    marks=() if fast else pytest.mark.slow,
                )


def assert_close(actual, expected, dtype, what=""):
    """Same pytree structure (types included), shapes and dtype; every leaf within TOL."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected), (
        f"{what}: structure {jax.tree.structure(actual)} != {jax.tree.structure(expected)}"
    )
    for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
        name = f"{what}{jax.tree_util.keystr(path)}"
        assert a.shape == e.shape, (name, a.shape, e.shape)
        assert a.dtype == jnp.dtype(dtype), (name, a.dtype, dtype)
        err = ref.rel_err(a, e)
        assert err <= TOL[dtype], f"{name}: rel err {err:.2e} > {TOL[dtype]:.0e}"


# ----------------------------------------------------------------------------------------
# Random draws (NumPy, nothing compiled) and compiled functions.


def _with_dropout(model):
    return dataclasses.replace(model, dropout=DROPOUT)


def _without_dropout(model):
    return dataclasses.replace(model, dropout=0.0) if isinstance(model, bptt_jax.Stack) else model


def _random_resets(key, p=0.2):
    r = ref.numpy_rng(key).random((T, B)) < p
    r[3, 1] = True  # at least one reset
    return jnp.asarray(r)


@functools.cache
def _dropout_sampler(model, dtype):
    return jax.jit(lambda key: model.dropout_masks(key, T, B, dtype))


def _dropout_masks(model, key, dtype):
    """``model.dropout_masks(key, T, B, dtype)`` (the library's multipliers for that key)."""
    return _dropout_sampler(model, jnp.dtype(dtype))(key)


def _reference_extras(model, dtype, resets, dropout_masks):
    """The reference's resets and dropout multipliers: zeros / ones when the call has none
    (the same function), so one compiled reference serves all those schedules."""
    if resets is None and not _has_bidirectional(model):
        resets = jnp.zeros((T, B), bool)
    if dropout_masks is None and _is_deep_stack(model):
        sizes = [ref.model_output_size(layer) for layer in model.layers[:-1]]
        dropout_masks = tuple(jnp.ones((T, B, f), dtype) for f in sizes)
    return resets, dropout_masks


@functools.cache
def _ref_unroll(model, truncate, delta_clip):
    """``(out, vjp(ct))`` of model_unroll w.r.t. (params, xs, carry0)."""

    def f(p, xs, c0, mask, resets, dropout_masks, ct):
        def run(p, xs, c0):
            return ref.model_unroll(
                model, p, xs, c0, mask, truncate, resets, delta_clip, dropout_masks
            )

        out, vjp = jax.vjp(run, p, xs, c0)
        return out, vjp(ct)

    return jax.jit(f)


@functools.cache
def _ref_readout(loss, reduction, with_targets):
    """Value and gradient of the reference readout loss w.r.t. (hs, readout[, targets])."""

    def f(hs, ro, tg, mask):
        return ref.readout_loss(hs, ro, tg, mask, loss, reduction)

    return jax.jit(jax.value_and_grad(f, (0, 1, 2) if with_targets else (0, 1)))


def reference_unroll_vjp(model, p, xs, c0, mask, ct, *, truncate=None, delta_clip=None,
                         resets=None, dropout_masks=None):  # fmt: skip
    """jax.vjp of ref.model_unroll: ``(hs, carry_T), (d params, d xs, d carry0)``."""
    resets, dropout_masks = _reference_extras(model, xs.dtype, resets, dropout_masks)
    run = _ref_unroll(_without_dropout(model), truncate, delta_clip)
    return run(p, xs, c0, mask, resets, dropout_masks, ct)


def reference_loss_grads(model, p, ro, xs, tg, c0, mask, loss, reduction, *, truncate=None,
                         delta_clip=None, resets=None, dropout_masks=None):  # fmt: skip
    """Value and jax.grad of ref.model_loss w.r.t. (params, readout, xs, [targets,] carry0):
    the readout loss's gradient on hs pulled back through model_unroll's VJP (chain rule)."""
    kw = dict(truncate=truncate, delta_clip=delta_clip, resets=resets, dropout_masks=dropout_masks)
    zeros = (
        jnp.zeros((*xs.shape[:2], ref.model_output_size(model)), xs.dtype),
        model.zero_carry(xs.shape[1], xs.dtype),
    )
    (hs, carry_t), _ = reference_unroll_vjp(model, p, xs, c0, mask, zeros, **kw)
    value, g_head = _ref_readout(loss, reduction, loss == "mse")(hs, ro, tg, mask)
    ct = (g_head[0], jax.tree.map(jnp.zeros_like, carry_t))
    _, (g_p, g_xs, g_c0) = reference_unroll_vjp(model, p, xs, c0, mask, ct, **kw)
    if loss == "mse":
        return value, (g_p, g_head[1], g_xs, g_head[2], g_c0)
    return value, (g_p, g_head[1], g_xs, g_c0)


@functools.cache
def _lib_unroll(model, opts_items):
    opts = dict(opts_items)

    def f(p, xs, c0, mask, resets, dropout_key, ct):
        def run(p, xs, c0):
            return bptt_jax.unroll(
                model, p, xs, c0, mask=mask, resets=resets, dropout_key=dropout_key, **opts
            )

        out, vjp = jax.vjp(run, p, xs, c0)
        return out, vjp(ct)

    return jax.jit(f)


@functools.cache
def _lib_loss(model, loss, reduction, opts_items):
    opts = dict(opts_items)
    argnums = (0, 1, 2, 3, 4) if loss == "mse" else (0, 1, 2, 4)

    def f(p, ro, xs, tg, c0, mask, resets, dropout_key):
        return bptt_jax.sequence_loss(
            model, p, ro, xs, tg, c0, mask=mask, resets=resets, loss=loss,
            reduction=reduction, dropout_key=dropout_key, **opts,
        )  # fmt: skip

    return jax.jit(jax.value_and_grad(f, argnums))


def _setup(model_name, sched_name, dtype, key, clip, loss="xent"):
    """The model (with dropout when the schedule has it), a random problem, the library's
    options, and the schedule's resets, dropout key and dropout multipliers."""
    opts = dict(ALL_SCHEDULES[sched_name][0])
    model = MODELS[model_name]
    k1, k2, k3 = jax.random.split(key, 3)
    dropout_key = resets = dropout_masks = None
    if opts.pop("dropout", False):
        model = _with_dropout(model)
        dropout_key = k3
        dropout_masks = _dropout_masks(model, k3, dtype)
    if opts.pop("resets", False):
        resets = _random_resets(k2)
    if opts.get("delta_clip"):
        opts["delta_clip"] = clip
    problem = ref.model_problem(model, k1, dtype, t=T, b=B, d=D, o=O, loss=loss)
    return model, problem, opts, resets, dropout_key, dropout_masks


def _one(tree, b):
    return jax.tree.map(lambda a: a[b : b + 1], tree)


# ----------------------------------------------------------------------------------------
# The references themselves.


@pytest.mark.parametrize(
    "cell_name,clip",
    [
        pytest.param("elman-tanh", None, marks=pytest.mark.slow),
        pytest.param("lstm", None, marks=pytest.mark.slow),
        ("gru", None),
        ("lstm", CLIP_LOSS),
        pytest.param("elman-tanh", CLIP_LOSS, marks=pytest.mark.slow),
        pytest.param("gru", CLIP_LOSS, marks=pytest.mark.slow),
    ],
    ids=["elman-tanh", "lstm", "gru", "lstm-clip", "elman-tanh-clip", "gru-clip"],
)
def test_reference_padded_bidirectional_batch_equals_per_sequence_runs(cell_name, clip, key):
    """model_unroll's masked reverse direction (a prefix-reversal permutation) against each
    sequence run alone, unpadded (reversed with ``[::-1]``): outputs at valid steps, final
    carries, padded outputs = the final carries, and the gradients of a summed loss (with
    ``delta_clip`` too: padding changes no clipped error)."""
    model = bptt_jax.Bidirectional(ref.CELLS[cell_name])
    h = model.forward.hidden_size
    p, ro, xs, tg, c0, m = ref.model_problem(model, key, jnp.float64, t=T, b=B, d=D, o=O)
    lens = np.asarray(ref.lengths_of(m, T, B))
    assert lens.max() == T and lens.min() < T

    @jax.jit
    def run(p, ro, xs, tg, c0, mask):
        def loss(p, ro, xs, c0):
            return ref.model_loss(model, p, ro, xs, tg, c0, mask, reduction="sum", delta_clip=clip)

        out = ref.model_unroll(model, p, xs, c0, mask)
        return out, jax.value_and_grad(loss, (0, 1, 2, 3))(p, ro, xs, c0)

    (hs, (c_f, c_b)), (value, (g_p, g_ro, g_xs, g_c0)) = run(p, ro, xs, tg, c0, m)
    total, sum_p, sum_ro = 0.0, jax.tree.map(jnp.zeros_like, p), jax.tree.map(jnp.zeros_like, ro)
    for b, n in enumerate(lens):
        xs_b, c0_b = xs[:n, b : b + 1], _one(c0, b)
        (hs_b, (cf_b, cb_b)), (v_b, (gp_b, gro_b, gxs_b, gc0_b)) = run(
            p, ro, xs_b, tg[:n, b : b + 1], c0_b, None
        )
        np.testing.assert_allclose(hs[:n, b : b + 1], hs_b, rtol=1e-13, atol=1e-13)
        for a, e in zip(
            jax.tree.leaves((_one(c_f, b), _one(c_b, b))), jax.tree.leaves((cf_b, cb_b))
        ):
            np.testing.assert_allclose(a, e, rtol=1e-13, atol=1e-13)
        both = np.concatenate([ref.hidden(cf_b)[0], ref.hidden(cb_b)[0]])
        padded = hs[n:, b]
        np.testing.assert_allclose(padded, np.broadcast_to(both, padded.shape), rtol=1e-13)
        total = total + v_b
        sum_p = jax.tree.map(jnp.add, sum_p, gp_b)
        sum_ro = jax.tree.map(jnp.add, sum_ro, gro_b)
        np.testing.assert_allclose(g_xs[:n, b : b + 1], gxs_b, rtol=1e-12, atol=1e-14)
        assert np.all(np.asarray(g_xs[n:, b]) == 0.0)
        for a, e in zip(jax.tree.leaves(_one(g_c0, b)), jax.tree.leaves(gc0_b)):
            np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-14)
    assert ref.rel_err(value, total) <= 1e-13
    assert_close(g_p, sum_p, jnp.float64, "params")
    assert_close(g_ro, sum_ro, jnp.float64, "readout")
    assert (hs[:, :, :h] != hs[:, :, h:]).any()


@pytest.mark.parametrize("cell_name", ["elman-relu", "lstm", "gru"])
def test_reference_stack_of_one_cell_is_the_cell(cell_name, key):
    """Outputs, carries, the loss and its gradients, with truncation, resets and clipping;
    and model_loss of the cell itself is scan_loss."""
    cell = ref.CELLS[cell_name]
    k1, k2 = jax.random.split(key)
    p, ro, xs, tg, c0, m = ref.model_problem(cell, k1, jnp.float64, t=T, b=B, d=D, o=O)
    stack = bptt_jax.Stack((cell,))

    @jax.jit
    def both(p, ro, xs, tg, c0, m, r):
        opts = dict(truncate=TRUNCATE, resets=r, delta_clip=CLIP_LOSS)

        def cell_loss(p, ro, xs, c0):
            return ref.scan_loss(cell, p, ro, xs, tg, c0, m, reduction="sum", **opts)

        def stack_loss(p, ro, xs, c0):
            return ref.model_loss(stack, (p,), ro, xs, tg, (c0,), m, reduction="sum", **opts)

        def model_loss(p, ro, xs, c0):
            return ref.model_loss(cell, p, ro, xs, tg, c0, m, reduction="sum", **opts)

        hs_c, c_c = ref.scan_unroll(cell, p, xs, c0, m, **opts)
        grads = [jax.value_and_grad(f, (0, 1, 2, 3)) for f in (cell_loss, stack_loss, model_loss)]
        return (
            ((hs_c, (c_c,)), ref.model_unroll(stack, (p,), xs, (c0,), m, **opts)),
            [g(p, ro, xs, c0) for g in grads],
        )

    (cell_out, stack_out), (g_cell, g_stack, g_model) = both(
        p, ro, xs, tg, c0, m, _random_resets(k2)
    )
    assert_close(stack_out, cell_out, jnp.float64)
    assert_close(g_stack, g_cell, jnp.float64)
    assert_close(g_model, g_cell, jnp.float64)


def test_reference_stack_is_layered_python_loops(key):
    """A Stack with a mask and dropout masks, against per-step Python loops (no scan)."""
    model = _with_dropout(MODELS["stack-elman-gru"])
    p, _, xs, _, c0, m = ref.model_problem(model, key, jnp.float64, t=T, b=B, d=D, o=O)
    masks = _dropout_masks(model, jax.random.fold_in(key, 1), jnp.float64)
    assert len(masks) == 1 and masks[0].shape == (T, B, 5)
    assert (masks[0] == 0).any() and (masks[0] != 0).any()

    @jax.jit
    def both(p, xs, c0, m, masks):
        h1, c1 = ref.python_loop(model.layers[0], p[0], xs, c0[0], m)
        h2, c2 = ref.python_loop(model.layers[1], p[1], h1 * masks[0], c0[1], m)
        return ref.model_unroll(model, p, xs, c0, m, dropout_masks=masks), (h2, (c1, c2))

    actual, expected = both(p, xs, c0, m, masks)
    assert_close(actual, expected, jnp.float64)


@pytest.mark.parametrize("merge", ["sum", "mean"])
def test_reference_merges_are_the_concat_halves(merge, key):
    cat = bptt_jax.Bidirectional(bptt_jax.GRU(5))
    other = bptt_jax.Bidirectional(bptt_jax.GRU(5), merge=merge)
    p, _, xs, _, c0, m = ref.model_problem(cat, key, jnp.float64, t=T, b=B, d=D, o=O)
    (hs, carry), (hs_m, carry_m) = jax.jit(
        lambda *a: (ref.model_unroll(cat, *a), ref.model_unroll(other, *a))
    )(p, xs, c0, m)
    expected = hs[..., :5] + hs[..., 5:]
    expected = expected if merge == "sum" else expected / 2
    assert_close((hs_m, carry_m), (expected, carry), jnp.float64)


def test_reference_model_problem_draws_independent_carries_and_mixed_lengths(key):
    model = MODELS["stack-bilstm-lstm"]
    p, ro, xs, tg, c0, m = ref.model_problem(model, key, jnp.float32, t=T, b=B, d=D, o=O)
    assert ro.w_hy.shape == (model.output_size, O) and xs.dtype == jnp.float32
    leaves = jax.tree.leaves(c0)
    assert len(leaves) == 6
    for i, a in enumerate(leaves):
        for b in leaves[i + 1 :]:
            assert a.shape != b.shape or not np.allclose(a, b)
    lens = np.asarray(ref.lengths_of(m, T, B))
    assert lens.max() == T and 1 <= lens.min() < T
    assert jax.tree.structure(p) == jax.tree.structure(
        jax.eval_shape(lambda k: model.init(k, D), key)
    )
    again = ref.model_problem(model, key, jnp.float32, t=T, b=B, d=D, o=O)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(again), jax.tree.leaves((p, ro, xs, tg, c0, m)))
    )


@pytest.mark.parametrize(
    "model_name", ["stack-elman-gru", pytest.param("stack-lstm2", marks=pytest.mark.slow)]
)
def test_reference_options_change_the_gradients(model_name, key):
    """Truncation, clipping (at the thresholds used here), resets and dropout each change
    the reference's gradients: the schedule tests cannot pass by ignoring an option."""
    model = _with_dropout(MODELS[model_name])
    k1, k2, k3, k4 = jax.random.split(key, 4)
    p, ro, xs, tg, c0, m = ref.model_problem(model, k1, jnp.float64, t=T, b=B, d=D, o=O)
    masks = _dropout_masks(model, k3, jnp.float64)
    ct = ref.random_like(k4, (jnp.zeros((T, B, model.output_size)), model.zero_carry(B)))
    ct = jax.tree.map(lambda a: a.astype(jnp.float64), ct)
    r = _random_resets(k2)

    def diff(a, b):
        return max(ref.rel_err(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    def loss_grads(**kw):
        return reference_loss_grads(model, p, ro, xs, tg, c0, m, "xent", "sum", **kw)[1]

    full = loss_grads()
    for kw in [
        dict(truncate=TRUNCATE),
        dict(delta_clip=CLIP_LOSS),
        dict(resets=r),
        dict(dropout_masks=masks),
    ]:
        assert diff(loss_grads(**kw), full) > 1e-4, kw
    _, u_full = reference_unroll_vjp(model, p, xs, c0, m, ct)
    _, u_clip = reference_unroll_vjp(model, p, xs, c0, m, ct, delta_clip=CLIP_UNROLL)
    assert diff(u_clip, u_full) > 1e-4


def _torch_weights(cell, p):
    """PyTorch's (weight_ih, weight_hh, bias_ih, bias_hh) of one direction of one layer."""
    if isinstance(cell, bptt_jax.Elman):
        return p.w_xh.T, p.w_hh.T, p.b_h, np.zeros_like(p.b_h)
    if isinstance(cell, bptt_jax.LSTM):
        assert cell.forget_bias == 0.0
        return p.w_x.T, p.w_h.T, p.b, np.zeros_like(p.b)
    return p.w_x.T, p.w_h.T, p.b_x, p.b_h


@pytest.mark.parametrize("cell_name", ["elman", "lstm", "gru"])
def test_reference_matches_pytorch_stacked_bidirectional(cell_name, key):
    """``stacked(cell, 2, bidirectional=True)`` against ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``
    (num_layers=2, bidirectional=True) on packed padded sequences, float64: outputs at valid
    steps and ``h_n`` / ``c_n``, with PyTorch's layout ``h_n[2k + d] = carry[k][d]``."""
    torch = pytest.importorskip("torch")
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    h = 5
    cells = {"elman": bptt_jax.Elman(h), "lstm": bptt_jax.LSTM(h), "gru": bptt_jax.GRU(h)}
    cell = cells[cell_name]
    model = bptt_jax.stacked(cell, 2, bidirectional=True)
    p, _, xs, _, c0, m = ref.model_problem(model, key, jnp.float64, t=T, b=4, d=D, o=O)
    hs, carry = jax.jit(partial(ref.model_unroll, model))(p, xs, c0, m)

    kind = {"elman": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell_name]
    net = kind(D, h, num_layers=2, bidirectional=True).double()
    names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    with torch.no_grad():
        for k in range(2):
            for d, suffix in enumerate(["", "_reverse"]):
                for name, value in zip(names, _torch_weights(cell, p[k][d])):
                    getattr(net, f"{name}_l{k}{suffix}").copy_(torch.tensor(np.asarray(value)))

    def stacked_state(f):
        return torch.stack(
            [torch.tensor(np.asarray(f(c0[k][d]))) for k in range(2) for d in (0, 1)]
        )

    lens = np.asarray(ref.lengths_of(m, T, 4))
    packed = pack_padded_sequence(
        torch.tensor(np.asarray(xs)), torch.tensor(lens), enforce_sorted=False
    )
    with torch.no_grad():
        if cell_name == "lstm":
            out, (h_n, c_n) = net(packed, (stacked_state(ref.hidden), stacked_state(lambda c: c.c)))
        else:
            out, h_n = net(packed, stacked_state(ref.hidden))
    out, _ = pad_packed_sequence(out, total_length=T)
    valid = np.asarray(m)
    np.testing.assert_allclose(np.asarray(hs)[valid], out.numpy()[valid], rtol=1e-12, atol=1e-13)
    for k in range(2):
        for d in range(2):
            np.testing.assert_allclose(
                ref.hidden(carry[k][d]), h_n[2 * k + d].numpy(), rtol=1e-12, atol=1e-13
            )
            if cell_name == "lstm":
                np.testing.assert_allclose(
                    carry[k][d].c, c_n[2 * k + d].numpy(), rtol=1e-12, atol=1e-13
                )


# ----------------------------------------------------------------------------------------
# The library against the references.


@pytest.mark.parametrize("model_name,sched_name,dtype", list(_grid("unroll")))
def test_unroll_vjp_matches_reference_under_random_cotangents(model_name, sched_name, dtype, key):
    """Outputs, final carries and jax.vjp (params, xs, carry0) under random cotangents on hs
    and on every carry_T leaf."""
    model, problem, opts, resets, dkey, dmasks = _setup(
        model_name, sched_name, dtype, key, CLIP_UNROLL
    )
    p, _, xs, _, c0, m = problem
    zeros = (jnp.zeros((T, B, model.output_size), dtype), model.zero_carry(B, dtype))
    ct = ref.random_like(jax.random.fold_in(key, 7), zeros)
    out_r, grads_r = reference_unroll_vjp(
        model, p, xs, c0, m, ct, truncate=opts.get("truncate"),
        delta_clip=opts.get("delta_clip"), resets=resets, dropout_masks=dmasks,
    )  # fmt: skip
    out_m, grads_m = _lib_unroll(model, tuple(sorted(opts.items())))(p, xs, c0, m, resets, dkey, ct)
    assert out_m[0].shape == (T, B, model.output_size)
    assert_close(out_m, out_r, dtype, "out")
    assert_close(grads_m, grads_r, dtype, "grads")


@pytest.mark.parametrize("model_name,sched_name,dtype,loss,reduction", list(_grid("loss")))
def test_sequence_loss_grads_match_reference(model_name, sched_name, dtype, loss, reduction, key):
    """Value and jax.grad (params, readout, xs, carry0, and the targets for mse)."""
    model, problem, opts, resets, dkey, dmasks = _setup(
        model_name, sched_name, dtype, key, CLIP_LOSS, loss
    )
    p, ro, xs, tg, c0, m = problem
    v_r, g_r = reference_loss_grads(
        model, p, ro, xs, tg, c0, m, loss, reduction, truncate=opts.get("truncate"),
        delta_clip=opts.get("delta_clip"), resets=resets, dropout_masks=dmasks,
    )  # fmt: skip
    v_m, g_m = _lib_loss(model, loss, reduction, tuple(sorted(opts.items())))(
        p, ro, xs, tg, c0, m, resets, dkey
    )
    assert v_m.shape == () and v_m.dtype == jnp.dtype(dtype)
    assert ref.rel_err(v_m, v_r) <= TOL[dtype]
    assert_close(g_m, g_r, dtype, "grads")


@pytest.mark.parametrize(
    "model_name,opts",
    [
        ("stack-lstm2", {"truncate": TRUNCATE}),
        ("stack-elman-gru", {"truncate": TRUNCATE, "delta_clip": CLIP_LOSS}),
        ("bi-lstm-concat", {}),
        ("bi-elman-mixed", {"delta_clip": CLIP_LOSS}),
        ("stack-bilstm-lstm", {}),
    ],
    ids=["stack-lstm2-truncate", "stack-elman-gru-truncate-clip", "bi-lstm-concat",
         "bi-elman-mixed-clip", "stack-bilstm-lstm"],
)  # fmt: skip
def test_loss_and_grads_of_a_model_matches_reference(model_name, opts, key):
    """The loss, params and readout gradients, and the final carry (carry_index=None)."""
    model = MODELS[model_name]
    p, ro, xs, tg, c0, m = ref.model_problem(model, key, jnp.float64, t=T, b=B, d=D, o=O)
    out = jax.jit(
        lambda p, ro, xs, tg, c0, m: loss_and_grads(
            model, p, ro, xs, tg, c0, mask=m, reduction="sum", **opts
        )
    )(p, ro, xs, tg, c0, m)
    v_r, g_r = reference_loss_grads(model, p, ro, xs, tg, c0, m, "xent", "sum", **opts)
    zeros = (jnp.zeros((T, B, model.output_size)), model.zero_carry(B, jnp.float64))
    (_, carry_r), _ = reference_unroll_vjp(model, p, xs, c0, m, zeros, **opts)
    assert ref.rel_err(out.value, v_r) <= TOL[jnp.float64]
    assert_close((out.params, out.readout), g_r[:2], jnp.float64, "grads")
    assert_close(out.carry, carry_r, jnp.float64, "carry")


@pytest.mark.parametrize(
    "model_name,fusable",
    [("bi-lstm-concat", 1), ("bi-gru-sum", 1), ("stacked-bigru2", 2), ("bi-elman-mixed", 0)],
)
def test_fused_directions_match_reference(model_name, fusable, trace_env, key):
    """With ``BPTT_JAX_FUSE_DIRECTIONS=1`` (off by default until measured on a GPU) every
    Bidirectional layer of one cell configuration runs its two directions as one scan each
    way: 2 scans fewer per such layer in the gradient's jaxpr (none for two different cells).
    Its outputs, carries and gradients still equal the references': unroll under random
    cotangents with delta_clip (its errors kept per direction), and sequence_loss, whose
    readout error the fused reverse scan takes as an OutputError."""
    model, problem, opts, *_ = _setup(model_name, "clip", jnp.float64, key, CLIP_UNROLL)
    p, ro, xs, tg, c0, m = problem
    clip = opts["delta_clip"]
    zeros = (jnp.zeros((T, B, model.output_size)), model.zero_carry(B, jnp.float64))
    ct = ref.random_like(jax.random.fold_in(key, 7), zeros)

    def unroll_vjp(p, xs, c0, m, ct):
        run = lambda p, xs, c0: bptt_jax.unroll(model, p, xs, c0, mask=m, delta_clip=clip)  # noqa: E731
        out, vjp = jax.vjp(run, p, xs, c0)
        return out, vjp(ct)

    def loss(p, ro, xs, c0, m):
        return bptt_jax.sequence_loss(model, p, ro, xs, tg, c0, mask=m, reduction="sum")

    def n_scans(fuse):  # (read when traced)
        with trace_env("BPTT_JAX_FUSE_DIRECTIONS", fuse):
            return str(jax.make_jaxpr(unroll_vjp)(p, xs, c0, m, ct)).count("scan[")

    assert n_scans("0") - n_scans("1") == 2 * fusable
    with trace_env("BPTT_JAX_FUSE_DIRECTIONS", "1"):
        out_m, grads_m = jax.jit(unroll_vjp)(p, xs, c0, m, ct)
        v_m, g_m = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3)))(p, ro, xs, c0, m)
    out_r, grads_r = reference_unroll_vjp(model, p, xs, c0, m, ct, delta_clip=clip)
    assert_close(out_m, out_r, jnp.float64, "out")
    assert_close(grads_m, grads_r, jnp.float64, "grads")
    v_r, g_r = reference_loss_grads(model, p, ro, xs, tg, c0, m, "xent", "sum")
    assert ref.rel_err(v_m, v_r) <= TOL[jnp.float64]
    assert_close(g_m, g_r, jnp.float64, "loss grads")


def _padded_output(layer, carry):
    """What a padded step's output repeats: the layer's final carries, merged."""
    if isinstance(layer, bptt_jax.Bidirectional):
        return ref.merge_outputs(layer.merge, ref.hidden(carry[0]), ref.hidden(carry[1]))
    return ref.hidden(carry)


def _padded_grid():
    for name in BIDIRECTIONAL:
        for backward in ["manual", "checkpointed"]:
            # each bidirectional model once, the schedule alternating
            fast = (backward == "manual") == (BIDIRECTIONAL.index(name) % 2 == 0)
            yield pytest.param(
                name, backward, id=f"{name}-{backward}", marks=() if fast else pytest.mark.slow
            )


@pytest.mark.parametrize("model_name,backward", list(_padded_grid()))
def test_padded_bidirectional_batch_equals_per_sequence_runs(model_name, backward, key):
    """Padding never reaches a valid output, a final carry or a gradient: the padded batch's
    outputs at valid steps and its final carries equal each sequence run alone, unpadded;
    its padded outputs repeat the final carries; and under random cotangents on every output
    and carry the gradient w.r.t. xs is exactly zero at padded steps (and nonzero at valid
    ones)."""
    model = MODELS[model_name]
    p, _, xs, _, c0, m = ref.model_problem(model, key, jnp.float64, t=T, b=B, d=D, o=O)
    opts = {"backward": backward}
    if backward == "checkpointed":
        opts["segment"] = SEGMENT
    zeros = (jnp.zeros((T, B, model.output_size)), model.zero_carry(B, jnp.float64))
    ct = ref.random_like(jax.random.fold_in(key, 1), zeros)
    (hs, carry), (_, g_xs, _) = _lib_unroll(model, tuple(sorted(opts.items())))(
        p, xs, c0, m, None, None, ct
    )
    run_one = jax.jit(lambda p, xs, c0: bptt_jax.unroll(model, p, xs, c0, **opts))
    last = model.layers[-1] if isinstance(model, bptt_jax.Stack) else model

    def top(c):
        return c[-1] if isinstance(model, bptt_jax.Stack) else c

    lens = np.asarray(ref.lengths_of(m, T, B))
    assert lens.min() < T
    for b, n in enumerate(lens):
        hs_b, carry_b = run_one(p, xs[:n, b : b + 1], _one(c0, b))
        np.testing.assert_allclose(hs[:n, b : b + 1], hs_b, rtol=1e-12, atol=1e-14)
        assert jax.tree.structure(carry_b) == jax.tree.structure(carry)
        for a, e in zip(jax.tree.leaves(_one(carry, b)), jax.tree.leaves(carry_b)):
            np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-14)
        padded = hs[n:, b]
        expected = _padded_output(last, top(carry_b))[0]
        np.testing.assert_allclose(
            padded, np.broadcast_to(expected, padded.shape), rtol=1e-12, atol=1e-14
        )
    pad = ~np.asarray(m)
    assert np.all(np.asarray(g_xs)[pad] == 0.0)
    assert np.all(np.any(np.asarray(g_xs)[~pad] != 0.0, axis=-1))


@pytest.mark.parametrize("model_name", ["stack-lstm2", "bi-elman-mixed", "stacked-bigru2"])
def test_grads_have_the_params_pytree_structure(model_name, key):
    """jax.grad of sequence_loss gives the params' own pytree: tuples per layer, pairs per
    Bidirectional, the cells' NamedTuples (straight into optax)."""
    model = MODELS[model_name]
    p, ro, xs, tg, c0, m = ref.model_problem(model, key, jnp.float32, t=T, b=B, d=D, o=O)
    g = jax.jit(jax.grad(partial(bptt_jax.sequence_loss, model)))(p, ro, xs, tg, c0)
    assert jax.tree.structure(g) == jax.tree.structure(p)
    for a, e in zip(jax.tree.leaves(g), jax.tree.leaves(p)):
        assert a.shape == e.shape and a.dtype == e.dtype


@pytest.mark.parametrize("model_name", ["stack-elman-gru", "stacked-bigru2"])
def test_default_carry_is_zeros_and_outputs_have_the_model_output_size(model_name, key):
    model = MODELS[model_name]
    p, _, xs, _, _, m = ref.model_problem(model, key, jnp.float64, t=T, b=B, d=D, o=O)
    hs, carry = jax.jit(lambda p, xs, m: bptt_jax.unroll(model, p, xs, mask=m))(p, xs, m)
    assert hs.shape == (T, B, model.output_size)
    zeros = (jnp.zeros((T, B, model.output_size)), model.zero_carry(B, jnp.float64))
    expected, _ = reference_unroll_vjp(model, p, xs, model.zero_carry(B, jnp.float64), m, zeros)
    assert_close((hs, carry), expected, jnp.float64)


def test_stack_without_a_dropout_key_has_no_dropout(key):
    """Dropout is on only when a dropout_key is given (evaluation: no key)."""
    model = MODELS["stack-lstm2"]
    with_p = _with_dropout(model)
    p, ro, xs, tg, c0, m = ref.model_problem(model, key, jnp.float64, t=T, b=B, d=D, o=O)

    @jax.jit
    def losses(p, ro, xs, tg, c0, m, k):
        def f(model, **kw):
            return bptt_jax.sequence_loss(model, p, ro, xs, tg, c0, mask=m, **kw)

        return f(with_p), f(model), f(with_p, dropout_key=k)

    no_key, no_dropout, with_key = losses(p, ro, xs, tg, c0, m, jax.random.fold_in(key, 1))
    assert no_key == no_dropout
    assert with_key != no_key


# ----------------------------------------------------------------------------------------
# Bad input.


def _call(fn, model, p, ro, xs, tg, c0, m, **kw):
    if fn == "unroll":
        return bptt_jax.unroll(model, p, xs, c0, mask=m, **kw)
    if fn == "sequence_loss":
        return bptt_jax.sequence_loss(model, p, ro, xs, tg, c0, mask=m, **kw)
    return loss_and_grads(model, p, ro, xs, tg, c0, mask=m, **kw)


@pytest.mark.parametrize("fn", ["unroll", "sequence_loss", "loss_and_grads"])
@pytest.mark.parametrize("model_name", ["bi-lstm-concat", "stack-bilstm-lstm"])
def test_bidirectional_rejects_truncate_naming_the_argument(model_name, fn, key):
    """(Resets are packed sequences for a bidirectional model: tests/test_streams.py.)"""
    model = MODELS[model_name]
    p, ro, xs, tg, c0, m = ref.model_problem(model, key, jnp.float32, t=T, b=B, d=D, o=O)
    with pytest.raises(ValueError, match="truncate"):
        _call(fn, model, p, ro, xs, tg, c0, m, truncate=TRUNCATE)


@pytest.mark.parametrize("fn", ["unroll", "sequence_loss", "loss_and_grads"])
def test_bidirectional_refuses_a_left_padded_mask_and_a_unidirectional_stack_takes_it(fn, key):
    """A bidirectional model's reverse direction reads each sequence's first sum(mask) steps
    backwards, so a left-padded mask would be read wrongly: ValueError naming the mask and
    where its padding comes before a valid step. A unidirectional model takes such a mask
    (its carry passes the padded steps)."""
    model = MODELS["stack-bilstm-lstm"]
    p, ro, xs, tg, c0, _ = ref.model_problem(model, key, jnp.float32, t=T, b=B, d=D, o=O)
    left_padded = (jnp.arange(T)[:, None] >= jnp.array([0, 3, 5])[None, :B]).astype(bool)
    with pytest.raises(ValueError, match=r"right-padded.*mask\[:, 1\] has a padded step at t=2"):
        _call(fn, model, p, ro, xs, tg, c0, left_padded)
    uni = MODELS["stack-lstm2"]
    p, ro, xs, tg, c0, _ = ref.model_problem(uni, key, jnp.float32, t=T, b=B, d=D, o=O)
    out = _call(fn, uni, p, ro, xs, tg, c0, left_padded)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))


@pytest.mark.parametrize(
    "other",
    [
        bptt_jax.Stack((bptt_jax.LSTM(6), bptt_jax.LSTM(6))),  # layer 0 hidden size 6, not 5
        bptt_jax.stacked(bptt_jax.LSTM(5), 2),  # layer 1 hidden size 5, not 6
        bptt_jax.Stack((bptt_jax.LSTM(5, forget_bias=1.0),)),  # one layer, not two
        bptt_jax.Stack((bptt_jax.LSTM(5), bptt_jax.LSTM(6), bptt_jax.LSTM(6))),  # three
        bptt_jax.Stack((bptt_jax.LSTM(5), bptt_jax.GRU(6))),  # layer 1 is a GRU's
    ],
    ids=["hidden0", "hidden1", "fewer-layers", "more-layers", "other-cell"],
)
@pytest.mark.parametrize("fn", ["unroll", "sequence_loss"])
def test_stack_params_of_another_stack_are_rejected(other, fn, key):
    model = MODELS["stack-lstm2"]
    _, ro, xs, tg, c0, m = ref.model_problem(model, key, jnp.float32, t=T, b=B, d=D, o=O)
    wrong = ref.model_problem(other, key, jnp.float32, t=T, b=B, d=D, o=O)[0]
    with pytest.raises((ValueError, TypeError)):
        _call(fn, model, wrong, ro, xs, tg, c0, m)


def test_bidirectional_params_of_another_size_are_rejected(key):
    model = MODELS["bi-elman-mixed"]
    p, _, xs, _, c0, m = ref.model_problem(model, key, jnp.float32, t=T, b=B, d=D, o=O)
    wider = ref.model_problem(model, key, jnp.float32, t=T, b=B, d=D + 1, o=O)[0]
    with pytest.raises(ValueError):  # input size D + 1
        bptt_jax.unroll(model, wider, xs, c0, mask=m)
    swapped = tuple(reversed(p))  # (Elman(7), Elman(5)) params
    with pytest.raises((ValueError, TypeError)):
        bptt_jax.unroll(model, swapped, xs, c0, mask=m)


def _wrong_carries():
    lstm = bptt_jax.LSTMCarry(jnp.zeros((B, 5)), jnp.zeros((B, 5)))
    return [
        ("stack-lstm2", lambda c: c[:1]),  # a layer missing
        ("stack-lstm2", lambda c: c[0]),  # one layer's carry, not a tuple of them
        ("stack-lstm2", lambda c: (c[0], c[1].h)),  # an array where an LSTMCarry goes
        ("stack-elman-gru", lambda c: (c[0], (c[1],))),  # a tuple where an array goes
        ("bi-lstm-concat", lambda c: c[0]),  # one direction's carry, not the pair
        ("bi-lstm-concat", lambda c: (c[0], c[1], lstm)),  # three directions
        ("stack-bilstm-lstm", lambda c: (c[0][0], c[1])),  # a direction where the pair goes
    ]


@pytest.mark.parametrize(
    "model_name,wrong",
    _wrong_carries(),
    ids=["stack-missing", "stack-not-tuple", "stack-array-for-lstm", "stack-tuple-for-array",
         "bi-one", "bi-three", "stack-bi-one"],
)  # fmt: skip
@pytest.mark.parametrize("fn", ["unroll", "sequence_loss"])
def test_carry_of_the_wrong_structure_is_a_type_error(model_name, wrong, fn, key):
    model = MODELS[model_name]
    p, ro, xs, tg, c0, m = ref.model_problem(model, key, jnp.float32, t=T, b=B, d=D, o=O)
    with pytest.raises(TypeError, match="carry"):
        _call(fn, model, p, ro, xs, tg, wrong(c0), m)


def test_bidirectional_merge_max_is_a_value_error():
    with pytest.raises(ValueError, match="merge"):
        bptt_jax.Bidirectional(bptt_jax.LSTM(5), merge="max")
    with pytest.raises(ValueError, match="merge"):  # sum of different hidden sizes
        bptt_jax.Bidirectional(bptt_jax.Elman(5), backward=bptt_jax.Elman(7), merge="sum")


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5])
def test_stack_dropout_outside_0_1_is_a_value_error(p):
    with pytest.raises(ValueError, match="dropout"):
        bptt_jax.Stack((bptt_jax.LSTM(5), bptt_jax.LSTM(5)), dropout=p)
    with pytest.raises(ValueError, match="dropout"):
        bptt_jax.stacked(bptt_jax.GRU(5), 2, dropout=p)
