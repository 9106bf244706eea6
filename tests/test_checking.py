"""The value checks hold where users call the library: eagerly, in the trainer, under ``jit``.

The promises that need values (a 0/1 mask, a bidirectional model's right padding, classes
in range where counted, module ``seq_lengths`` within T) are kept eagerly and for a
trainer's host (NumPy) batches, before anything runs; under ``jax.jit`` they are tracers,
and ``bptt_jax.checked`` compiles the same checks into the program (``checkify``). Each test
shows a wrong value that a plain ``jit`` computes with, silently, and that ``checked`` (or
the trainer's host check) refuses, naming the argument and the first bad position; valid
values give the same results checked or not.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bptt_jax
from bptt_jax import train, truncated

T, B, D, H, O = 5, 3, 2, 4, 3
CELL = bptt_jax.GRU(H)
BI = bptt_jax.Bidirectional(bptt_jax.GRU(H))


def _problem(model=CELL):
    k = jax.random.split(jax.random.key(0), 3)
    params = model.init(k[0], D)
    readout = bptt_jax.init_readout(k[1], bptt_jax.models.output_size(model), O)
    xs = jax.random.normal(k[2], (T, B, D), jnp.float32)
    return params, readout, xs


def _targets():
    return jnp.asarray(np.arange(T * B).reshape(T, B) % O, jnp.int32)


def _loss(model, **fixed):
    params, readout, xs = _problem(model)

    @jax.jit
    def f(mask=None, loss_mask=None, resets=None, targets=None):
        tg = _targets() if targets is None else targets
        return bptt_jax.sequence_loss(
            model, params, readout, xs, tg, mask=mask, loss_mask=loss_mask, resets=resets,
            **fixed,
        )  # fmt: skip

    return f


def _silent_then_refused(f, message, **kwargs):
    """``f`` (jitted) computes with the bad value unchecked; checked, it raises."""
    out = f(**kwargs)
    assert out.shape == ()  # computed, nothing seen
    with pytest.raises(ValueError, match=message):
        bptt_jax.checked(f)(**kwargs)


@pytest.mark.parametrize("name", ["mask", "loss_mask", "resets"])
@pytest.mark.parametrize("bad", [2.0, -1.0, 0.5])
def test_a_mask_holding_other_values_than_0_and_1_is_refused_under_jit(name, bad):
    flags = jnp.ones((T, B), jnp.float32) if name != "resets" else jnp.zeros((T, B), jnp.float32)
    flags = flags.at[3, 2].set(bad)
    _silent_then_refused(
        _loss(CELL), rf"sequence_loss: {name} must hold only 0 and 1 .* at \(t, b\) = \(3, 2\)",
        **{name: flags},
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["left-padded", "gapped"])
def test_a_bidirectional_model_refuses_a_mask_that_is_not_right_padded_under_jit(kind):
    mask = np.ones((T, B), bool)
    if kind == "left-padded":
        mask[:2, 1] = False
    else:
        mask[2, 1] = False
    _silent_then_refused(
        _loss(BI), r"right-padded sequences .* mask\[:, 1\]", mask=jnp.asarray(mask)
    )


def test_out_of_range_classes_where_counted_are_refused_under_jit():
    targets = _targets().at[4, 0].set(O)
    _silent_then_refused(
        _loss(CELL), r"targets must lie in \[0, O\) = \[0, 3\) .* got 3 at \(t, b\) = \(4, 0\)",
        targets=targets,
    )  # fmt: skip
    # where nothing is counted, any value is fine (and reaches nothing)
    mask = jnp.ones((T, B), bool).at[4, 0].set(False)
    checked = bptt_jax.checked(_loss(CELL))(targets=targets, mask=mask)
    assert np.isfinite(checked)


def test_checked_mode_composes_with_grad_and_vmap_and_changes_no_result():
    params, readout, xs = _problem()
    mask = jnp.asarray(np.arange(T)[:, None] < np.array([T, 2, 4]), jnp.float32)

    def loss(p, m):
        return bptt_jax.sequence_loss(CELL, p, readout, xs, _targets(), mask=m)

    grad = jax.jit(jax.grad(loss))
    plain, checked = grad(params, mask), bptt_jax.checked(grad)(params, mask)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(checked)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    batched = jax.vmap(grad, in_axes=(None, 0))
    masks = jnp.stack([mask, mask.at[1, 1].set(3.0)])
    with pytest.raises(ValueError, match=r"mask must hold only 0 and 1 .*got 3.0"):
        bptt_jax.checked(batched)(params, masks)


def _trainer_and_state(model):
    t = train.trainer(model, train.OptimConfig(name="sgd", momentum=0.0))
    return t, t.init(jax.random.key(0), D, O, B)


def test_the_trainer_checks_host_batches_before_its_step_and_device_batches_when_checked():
    t, state = _trainer_and_state(CELL)
    xs = np.ones((T, B, D), np.float32)
    targets = np.asarray(_targets())
    mask = np.ones((T, B), np.float32)
    mask[2, 1] = 2.0
    with pytest.raises(ValueError, match=r"trainer.step: batch.mask must hold only 0 and 1"):
        t.step(state, truncated.Batch(xs, targets, mask=mask))
    device = truncated.Batch(jnp.asarray(xs), jnp.asarray(targets), mask=jnp.asarray(mask))
    t.step(state, device)  # device data is not read back: unseen
    with pytest.raises(ValueError, match=r"mask must hold only 0 and 1"):
        bptt_jax.checked(t.step)(state, device)


def test_the_trainer_of_a_bidirectional_model_refuses_a_left_padded_host_batch():
    t, state = _trainer_and_state(BI)
    mask = np.ones((T, B), bool)
    mask[0, 2] = False
    batch = truncated.Batch(np.ones((T, B, D), np.float32), np.asarray(_targets()), mask=mask)
    with pytest.raises(ValueError, match=r"trainer.step: a bidirectional model needs right"):
        t.step(state, batch)


@pytest.mark.parametrize("framework", ["nnx", "equinox"])
def test_module_seq_lengths_past_t_are_refused_under_jit(framework):
    if framework == "nnx":
        pytest.importorskip("flax")
        from flax import nnx

        from bptt_jax.nnx import RNN

        graph, variables = nnx.split(RNN(bptt_jax.GRU(H), D, rngs=nnx.Rngs(0)))
        call = jax.jit(lambda v, x, n: nnx.merge(graph, v)(x, seq_lengths=n))
        args = (variables,)
    else:
        pytest.importorskip("equinox")
        from bptt_jax.equinox import RNN

        rnn = RNN(bptt_jax.GRU(H), D, key=jax.random.key(0))
        call = jax.jit(lambda m, x, n: m(x, seq_lengths=n))
        args = (rnn,)
    x = jnp.ones((B, T, D), jnp.float32)
    lengths = jnp.array([T, T + 1, 2])
    call(*args, x, lengths)  # clamped, silently
    with pytest.raises(ValueError, match=rf"seq_lengths must be in \[0, T\] = \[0, {T}\]; got "
                       rf"{T + 1} for sequence 1"):  # fmt: skip
        bptt_jax.checked(call)(*args, x, lengths)
