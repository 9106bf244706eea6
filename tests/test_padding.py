"""Padding never reaches an output or a gradient, whatever its values.

Padding buffers are often filled with NaN sentinels or left as ``np.empty``. The padded steps
(``mask`` 0) of ``xs``, and the targets where nothing is counted (``mask & loss_mask`` 0),
must not reach the loss, the outputs or any gradient: each call below runs twice, once with
the problem's random padding and once with the same problem padded with NaN, inf or -inf,
and both must give exactly the same (finite) results, with an exact 0 in the
gradient of every padded input. Before the fix the weight-gradient matmuls (``X^T dA``)
multiplied the padded rows' NaN by a zero error: a finite loss and NaN gradients, for
every cell, model kind and schedule. The results are checked against independent references
with clean padding by the gradient tests (tests/test_gradients.py, tests/test_models.py);
here the point is that the padding's values do not matter.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bptt_jax
from bptt_jax import train, truncated
from bptt_jax.losses import loss_and_grads
from tests import reference as ref
from tests.test_user_cells import IndRNN, ManualIndRNN

T, B, D, O = 7, 3, 4, 5
F64 = jnp.float64

MODELS = {
    "elman": bptt_jax.Elman(5),
    "lstm": bptt_jax.LSTM(5),
    "gru": bptt_jax.GRU(5),
    "user-vjp": IndRNN(5),  # the generic path, jax.vjp of one step
    "user-manual": ManualIndRNN(5),  # the generic path, a hand-written step_backward
    "stack": bptt_jax.Stack((bptt_jax.LSTM(5), bptt_jax.GRU(4))),
    "bidirectional": bptt_jax.Bidirectional(bptt_jax.GRU(5)),
}

#: sequence_loss options; each model takes one, rotating, so every schedule and fill is met
#: (the default run; ``-m slow`` adds a second schedule per model).
SCHEDULES = [
    dict(),
    dict(backward="checkpointed", segment=3),
    dict(truncate=3),
    dict(delta_clip=0.3),
    dict(backward="autodiff"),
]
UNI_SCHEDULES = SCHEDULES
BI_SCHEDULES = [s for s in SCHEDULES if "truncate" not in s]

FILLS = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}


def _cases():
    fills = list(FILLS)
    out, i = [], 0
    for name in MODELS:
        schedules = BI_SCHEDULES if name == "bidirectional" else UNI_SCHEDULES
        for j in range(2):  # two schedules per model, rotating through them
            opts = schedules[(i + j) % len(schedules)]
            tag = "-".join(f"{k}={v}" for k, v in opts.items()) or "manual"
            marks = () if j == 0 else pytest.mark.slow
            out.append(pytest.param(name, opts, fills[i % 3], id=f"{name}-{tag}", marks=marks))
            i += 1
    return out


def _padded(x, keep, fill):
    """``x`` with the entries where ``keep`` (T, B) is False set to ``fill``."""
    keep = keep if x.ndim == 2 else keep[..., None]
    return jnp.where(keep, x, jnp.asarray(fill, x.dtype))


def _finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(tree))


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name, opts, fill", _cases())
def test_padding_values_reach_no_loss_and_no_gradient(name, opts, fill, key):
    model = MODELS[name]
    p, ro, xs, tg, c0, mask = ref.model_problem(model, key, F64, t=T, b=B, d=D, o=O, loss="mse")
    rng = ref.numpy_rng(jax.random.fold_in(key, 1))
    loss_mask = jnp.asarray(rng.random((T, B)) < 0.7)
    valid = mask & loss_mask

    @jax.jit
    def run(p, ro, xs, tg, c0):
        def f(p, ro, xs, tg, c0):
            return bptt_jax.sequence_loss(
                model, p, ro, xs, tg, c0, mask=mask, loss_mask=loss_mask, loss="mse", **opts
            )

        return jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4))(p, ro, xs, tg, c0)

    clean = run(p, ro, xs, tg, c0)
    dirty = run(p, ro, _padded(xs, mask, FILLS[fill]), _padded(tg, valid, FILLS[fill]), c0)
    assert _finite(dirty), f"{fill} padding reached the loss or a gradient"
    _assert_same(dirty, clean)
    _, (_, _, dxs, dtg, _) = dirty
    assert not np.any(np.asarray(dxs)[~np.asarray(mask)]), "a padded step's input gradient"
    assert not np.any(np.asarray(dtg)[~np.asarray(valid)]), "an uncounted target's gradient"


@pytest.mark.parametrize("name", ["lstm", "user-manual", "bidirectional"])
def test_nan_padding_reaches_no_output_of_unroll_and_no_gradient(name, key):
    """``unroll`` under a random cotangent on ``hs`` and ``carry_T``: outputs and every
    cotangent the same with NaN padding."""
    model = MODELS[name]
    p, _, xs, _, c0, mask = ref.model_problem(model, key, F64, t=T, b=B, d=D)
    hs, c_t = bptt_jax.unroll(model, p, xs, c0, mask=mask)
    ct = ref.random_like(jax.random.fold_in(key, 2), (hs, c_t))

    @jax.jit
    def run(p, xs, c0):
        def f(p, xs, c0):
            return bptt_jax.unroll(model, p, xs, c0, mask=mask)

        out, vjp = jax.vjp(f, p, xs, c0)
        return out, vjp(ct)

    clean = run(p, xs, c0)
    dirty = run(p, _padded(xs, mask, np.nan), c0)
    assert _finite(dirty)
    _assert_same(dirty, clean)


def test_nan_padding_reaches_no_gradient_of_loss_and_grads_or_tbptt(key):
    cell = bptt_jax.GRU(5)
    p, ro, xs, tg, c0, mask = ref.model_problem(cell, key, F64, t=T, b=B, d=D, o=O)
    nan_xs = _padded(xs, mask, np.nan)
    kw = dict(truncate=3, return_deltas=True)
    clean = loss_and_grads(cell, p, ro, xs, tg, c0, mask=mask, **kw)
    dirty = loss_and_grads(cell, p, ro, nan_xs, tg, c0, mask=mask, **kw)
    assert _finite(dirty)
    _assert_same(dirty, clean)

    def sgd(n, p, r, lg, window):
        p, r = jax.tree.map(lambda w, g: w - 0.1 * g, (p, r), (lg.params, lg.readout))
        return n + 1, p, r, lg.value

    def run(xs):
        return truncated.tbptt(
            cell, p, ro, xs, tg, c0, k1=3, k2=5, update=sgd, update_state=0, mask=mask
        )

    clean, dirty = run(xs), run(nan_xs)
    assert _finite(dirty)
    _assert_same(dirty, clean)


def test_the_trainer_takes_nan_padded_batches_without_skipping(key):
    """In the trainer, NaN padding showed as a normal-looking loss while every update was
    skipped (non-finite gradients): each update is applied, and equals a clean batch's."""
    t = train.trainer(bptt_jax.LSTM(6), train.OptimConfig(name="sgd", momentum=0.0), loss="xent")
    state = t.init(key, D, O, B)
    rng = ref.numpy_rng(key)
    xs = jnp.asarray(rng.standard_normal((T, B, D)), jnp.float32)
    mask = jnp.asarray(np.arange(T)[:, None] < np.array([T, 2, 5]))
    tg = jnp.asarray(rng.integers(0, O, (T, B)), jnp.int32)
    clean_state, clean = t.step(state, truncated.Batch(xs, tg, mask=mask))
    dirty_state, dirty = t.step(state, truncated.Batch(_padded(xs, mask, np.nan), tg, mask=mask))
    assert not np.any(np.asarray(dirty["skipped"]))
    assert _finite(dirty_state.params)
    _assert_same((dirty_state.params, dirty["loss"]), (clean_state.params, clean["loss"]))
