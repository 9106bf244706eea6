"""Cells whose outputs are not their carry: Flax's convention (``step`` returns ``(carry,
y)``, no ``hidden``, a tuple carry), an output computed from an array carry (tier 1 and with
a hand-written ``step_backward``), and a user's linear cell with an output map but no
``output_backward`` (``jax.vjp`` of the map, one step's function).

The reference is ``jax.grad`` of a plain ``lax.scan`` of each cell's equations written again
here (:func:`tests.reference.output_scan`: the outputs are the steps' ``y``, zeros at a padded
step), float64 within 1e-12; random params, inputs, padding, resets, carries, cotangents;
every schedule, a Stack with dropout, a Bidirectional layer.
"""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bptt_jax
from bptt_jax import tasks, train
from bptt_jax.cells import protocol
from tests import reference as ref
from tests.test_linear import _library_vjp

F64 = jnp.float64
H, F = 5, 3


def sigmoid(a):
    return 1 / (1 + jnp.exp(-a))


# ------------------------------------------------------------------ the cells
@dataclasses.dataclass(frozen=True)
class FlaxLSTM:
    """An LSTM as Flax writes one: the carry ``(c, h)``, ``step`` returns ``((c, h), h)``,
    no ``hidden`` method."""

    hidden_size: int

    def init(self, key, input_size, dtype=jnp.float32):
        k1, k2 = jax.random.split(key)
        h = self.hidden_size
        return {
            "wi": jax.random.normal(k1, (input_size, 4 * h), dtype) / input_size**0.5,
            "wh": jax.random.normal(k2, (h, 4 * h), dtype) / h**0.5,
            "b": jnp.zeros((4 * h,), dtype),
        }

    def zero_carry(self, batch_size, dtype=jnp.float32):
        z = jnp.zeros((batch_size, self.hidden_size), dtype)
        return (z, z)

    def step(self, params, carry, x):
        c, h = carry
        gates = protocol.matmul(x, params["wi"]) + protocol.matmul(h, params["wh"]) + params["b"]
        i, f, g, o = jnp.split(gates, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (c, h), h


@dataclasses.dataclass(frozen=True)
class Emitter:
    """An array carry ``h`` (H) and an output ``y = tanh(h W_o) + x V`` (F) that is not it."""

    hidden_size: int

    def init(self, key, input_size, dtype=jnp.float32):
        k = jax.random.split(key, 3)
        h = self.hidden_size
        return {
            "w": jax.random.normal(k[0], (input_size, h), dtype) / input_size**0.5,
            "u": jax.random.normal(k[1], (h, h), dtype) / h**0.5,
            "wo": jax.random.normal(k[2], (h, F), dtype) / h**0.5,
            "v": jnp.ones((input_size, F), dtype) * 0.1,
        }

    def zero_carry(self, batch_size, dtype=jnp.float32):
        return jnp.zeros((batch_size, self.hidden_size), dtype)

    def step(self, params, h, x):
        h = jnp.tanh(protocol.matmul(x, params["w"]) + protocol.matmul(h, params["u"]))
        return h, jnp.tanh(protocol.matmul(h, params["wo"])) + protocol.matmul(x, params["v"])


@dataclasses.dataclass(frozen=True)
class ManualEmitter(Emitter):
    """:class:`Emitter` with its hand-written one-step backward: ``new`` and ``dnew`` are the
    pairs (new carry, y) and their errors."""

    def step_backward(self, params, h_prev, x, new, dnew):
        h, y = new
        dh, dy = dnew
        skip = x @ params["v"]
        dpre_y = dy * (1 - (y - skip) ** 2)  # y - skip = tanh(h W_o)
        dh = dh + dpre_y @ params["wo"].T
        dpre = dh * (1 - h**2)
        grads = {
            "w": x.T @ dpre,
            "u": h_prev.T @ dpre,
            "wo": h.T @ dpre_y,
            "v": x.T @ dy,
        }
        return grads, dpre @ params["u"].T, dpre @ params["w"].T + dy @ params["v"].T


@dataclasses.dataclass(frozen=True)
class DecayOut:
    """A user's linear cell with an output map and no ``output_backward`` (nor
    ``coefficients_backward``): ``h_t = sigmoid(lam) h_{t-1} + tanh(x_t W)``,
    ``y_t = h_t * s + x_t V``."""

    hidden_size: int
    scan: str = "auto"
    output_size: int = F

    def init(self, key, input_size, dtype=jnp.float32):
        k = jax.random.split(key, 3)
        h = self.hidden_size
        return {
            "w": jax.random.normal(k[0], (input_size, h), dtype),
            "lam": jax.random.normal(k[1], (h,), dtype),
            "s": jax.random.normal(k[2], (h, F), dtype),
            "v": jnp.ones((input_size, F), dtype),
        }

    def zero_carry(self, batch_size, dtype=jnp.float32):
        return jnp.zeros((batch_size, self.hidden_size), dtype)

    def coefficients(self, params, xs):
        b = jnp.tanh(protocol.matmul(xs, params["w"]))
        return (jnp.broadcast_to(jax.nn.sigmoid(params["lam"]), b.shape), b), ()

    def output(self, params, hs, xs):
        return protocol.matmul(hs, params["s"]) + protocol.matmul(xs, params["v"])

    def step(self, params, h, x):
        (a, b), _ = self.coefficients(params, x)
        h = a * h + b
        return h, self.output(params, h, x)


# ------------------------------------------------------------------ references
def flax_lstm_step(p, carry, x):
    c, h = carry
    n = h.shape[-1]
    gates = x @ p["wi"] + h @ p["wh"] + p["b"]
    i, f, g, o = (gates[:, k * n : (k + 1) * n] for k in range(4))
    c = sigmoid(f) * c + sigmoid(i) * jnp.tanh(g)
    h = sigmoid(o) * jnp.tanh(c)
    return (c, h), h


def emitter_step(p, h, x):
    h = jnp.tanh(x @ p["w"] + h @ p["u"])
    return h, jnp.tanh(h @ p["wo"]) + x @ p["v"]


def decay_out_step(p, h, x):
    h = sigmoid(p["lam"]) * h + jnp.tanh(x @ p["w"])
    return h, h @ p["s"] + x @ p["v"]


CELLS = {
    "flax-lstm": (FlaxLSTM(H), flax_lstm_step, H),
    "emitter": (Emitter(H), emitter_step, F),
    "manual-emitter": (ManualEmitter(H), emitter_step, F),
    "decay-out-parallel": (DecayOut(H, "parallel"), decay_out_step, F),
    "decay-out-sequential": (DecayOut(H, "sequential"), decay_out_step, F),
}
OPTIONS = {
    "full": {},
    "trunc3-clip": {"truncate": 3, "delta_clip": 0.3},
    "checkpointed": {"backward": "checkpointed", "segment": 4},
}


def problem(cell, out, rng, t=9, b=3, d=4):
    p, _, xs, _, h0, mask = ref.draw(cell, rng, F64, t=t, b=b, d=d)
    r = ref.flags(rng, xs.shape[:2], 0.15)
    return p, xs, h0, mask, r, ref.normal_like(rng, (jnp.zeros((t, b, out), F64), h0))


#: Each cell and each option at least once in the default run, the rest under ``-m slow``.
DEFAULT_RUN = {
    "full": ("flax-lstm", "emitter", "decay-out-parallel"),
    "trunc3-clip": ("flax-lstm", "manual-emitter", "decay-out-sequential"),
    "checkpointed": ("decay-out-parallel",),
}


def _grid():
    for name, opt in itertools.product(CELLS, OPTIONS):
        fast = name in DEFAULT_RUN[opt]
        yield pytest.param(name, opt, id=f"{name}-{opt}", marks=() if fast else pytest.mark.slow)


@pytest.mark.parametrize("name,options", list(_grid()))
def test_unroll_vjp_matches_the_plain_scan_in_float64(name, options, rng):
    """Outputs (the steps' y, zeros where padded), final carry and every gradient within
    1e-12; the tuple carry, padding, resets, truncation and clipping included."""
    cell, step_fn, out_size = CELLS[name]
    assert protocol.has_output(cell) and protocol.output_size(cell) == out_size
    kw = OPTIONS[options]
    p, xs, h0, m, r, ct = problem(cell, out_size, rng)
    out, grads = _library_vjp(cell, **kw)(p, xs, h0, ct, m, r)
    ref_kw = {k: v for k, v in kw.items() if k in ("truncate", "delta_clip")}
    out_r, grads_r = ref.output_scan_vjp(step_fn, p, xs, h0, ct, m, r, **ref_kw)
    ref.assert_trees_close(out, out_r, F64)
    ref.assert_trees_close(grads, grads_r, F64)
    assert float(jnp.max(jnp.abs(out[0][~m]))) == 0.0


def test_the_autodiff_path_and_a_chunked_truncated_loss_match_the_plain_scan(rng):
    """``backward="autodiff"`` (the library's plain scan) for the Flax-style cell; and
    ``sequence_loss(truncate=4)`` (chunk groups batched) with a loss mask and an error on the
    final carry for the Emitter."""
    cell = FlaxLSTM(H)
    p, xs, h0, m, r, ct = problem(cell, H, rng)
    out, grads = _library_vjp(cell, backward="autodiff")(p, xs, h0, ct, m, r)
    out_r, grads_r = ref.output_scan_vjp(flax_lstm_step, p, xs, h0, ct, m, r)
    ref.assert_trees_close((out, grads), (out_r, grads_r), F64)

    cell = Emitter(H)
    p, ro, xs, tg, h0, m = ref.draw(cell, rng, F64)
    ro = bptt_jax.ReadoutParams(jnp.asarray(rng.standard_normal((F, 5))), ro.b_y)
    r, lm = ref.flags(rng, xs.shape[:2], 0.15), ref.flags(rng, xs.shape[:2], 0.7)
    w = ref.normal_like(rng, h0)

    def lib(p, ro, xs, h0):
        v, c = bptt_jax.sequence_loss(
            cell, p, ro, xs, tg, h0, mask=m, loss_mask=lm, resets=r, truncate=4,
            return_carry=True,
        )  # fmt: skip
        return v + jnp.vdot(c, w)

    def reference(p, ro, xs, h0):
        ys, c = ref.output_scan(emitter_step, p, xs, h0, *ref.scan_options(xs, m, r, 4))
        return ref.readout_loss(ys, ro, tg, m, loss_mask=lm) + jnp.vdot(c, w)

    v, g = jax.jit(jax.value_and_grad(lib, (0, 1, 2, 3)))(p, ro, xs, h0)
    v_r, g_r = jax.jit(jax.value_and_grad(reference, (0, 1, 2, 3)))(p, ro, xs, h0)
    assert ref.rel_err(v, v_r) <= ref.TOL[F64]
    ref.assert_trees_close(g, g_r, F64)


def test_a_stack_with_dropout_and_a_bidirectional_layer_match_the_plain_scan(rng, key):
    """FlaxLSTM under an Emitter (the Emitter reads H, gives F) with dropout; and a
    Bidirectional of two Flax-style cells over right-padded sequences (each direction's
    padded outputs zeros)."""
    model = bptt_jax.Stack((FlaxLSTM(H), Emitter(4)), 0.3)
    p, xs, h0, m, _, _ = problem(model.layers[0], H, rng)
    p = (p, ref.draw(model.layers[1], rng, F64, d=H)[0])
    h0 = (h0, ref.normal_like(rng, model.layers[1].zero_carry(3, F64)))
    ct = ref.normal_like(rng, (jnp.zeros((*xs.shape[:2], F), F64), h0))
    drops = model.dropout_masks(key, *xs.shape[:2], F64)
    out, grads = _library_vjp(model)(p, xs, h0, ct, m, None, key)

    def reference(p, xs, h0):
        opts = ref.scan_options(xs, m)
        h1, c1 = ref.output_scan(flax_lstm_step, p[0], xs, h0[0], *opts)
        h2, c2 = ref.output_scan(emitter_step, p[1], h1 * drops[0], h0[1], *opts)
        return h2, (c1, c2)

    out_r, vjp = jax.vjp(reference, p, xs, h0)
    ref.assert_trees_close(out, out_r, F64)
    ref.assert_trees_close(grads, vjp(ct), F64)

    model = bptt_jax.Bidirectional(FlaxLSTM(H), Emitter(H))
    p, xs, h0, m, _, _ = problem(model.forward, H, rng)
    p = (p, ref.draw(model.backward, rng, F64)[0])
    h0 = (h0, ref.normal_like(rng, model.backward.zero_carry(3, F64)))
    ct = ref.normal_like(rng, (jnp.zeros((*xs.shape[:2], H + F), F64), h0))
    out, grads = _library_vjp(model)(p, xs, h0, ct, m, None)
    rev = ref.prefix_reversal(m, xs.shape[0], F64)

    def reversed_(a):
        return jnp.einsum("stb,tbf->sbf", rev, a)

    def bi_reference(p, xs, h0):
        opts = ref.scan_options(xs, m)
        hf, cf = ref.output_scan(flax_lstm_step, p[0], xs, h0[0], *opts)
        hb, cb = ref.output_scan(emitter_step, p[1], reversed_(xs), h0[1], *opts)
        return jnp.concatenate([hf, reversed_(hb)], -1), (cf, cb)

    out_r, vjp = jax.vjp(bi_reference, p, xs, h0)
    ref.assert_trees_close(out, out_r, F64)
    ref.assert_trees_close(grads, vjp(ct), F64)


def test_check_gradients_and_the_trainer_take_a_flax_style_cell():
    """``check_gradients`` (float64 with finite differences) passes, and a few trainer steps
    on the adding task lower the loss."""
    report = bptt_jax.check_gradients(FlaxLSTM(6), dtype=F64, finite_differences=True)
    assert report.passed, report
    task = tasks.AddingTask(seq_len=12)
    t = train.trainer(
        FlaxLSTM(16), train.OptimConfig(name="sgd", learning_rate=0.1, clip="none"), loss="mse",
        k1=4,
    )  # fmt: skip
    state = t.init(jax.random.key(0), task.input_size, task.output_size, batch_size=16)
    losses = []
    for i in range(30):
        state, metrics = t.step(state, task.batch(state.key, i, 16))
        losses.append(float(jnp.mean(metrics["loss"])))
    assert all(np.isfinite(losses)) and np.mean(losses[-5:]) < np.mean(losses[:5])


def test_a_cell_whose_step_gives_neither_an_output_nor_a_pair_is_refused_clearly():
    """A step returning only the carry, or an output of the wrong rank: a TypeError /
    ValueError naming the step and what it must return, before any work."""

    @dataclasses.dataclass(frozen=True)
    class CarryOnly(FlaxLSTM):
        def step(self, params, carry, x):
            return super().step(params, carry, x)[0]

    @dataclasses.dataclass(frozen=True)
    class FlatOutput(FlaxLSTM):
        def step(self, params, carry, x):
            new, h = super().step(params, carry, x)
            return new, h.reshape(-1)

    xs = jnp.ones((4, 2, 3), jnp.float32)
    for cls, err, match in (
        (CarryOnly, TypeError, r"CarryOnly.step returns must have the structure of its carry"),
        (FlatOutput, (TypeError, ValueError), r"y_t|outputs"),
    ):
        cell = cls(H)
        with pytest.raises(err, match=match):
            bptt_jax.unroll(cell, cell.init(jax.random.key(0), 3), xs)
