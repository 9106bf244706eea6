"""Cells of your own, defined here the way a user would, on the one engine.

Each is checked against ``jax.grad`` of a plain ``lax.scan`` of its own ``step`` written in
this file (float64, within 1e-12, normwise relative), under random params, inputs, initial
carries, masks, resets and cotangents, in every schedule (full, checkpointed, truncated,
chunked truncation, per-step clipping, TBPTT), alone and inside Stack and Bidirectional
models, through the trainer, the diagnostics and ``check_gradients``. The cells:

* ``IndRNN``, tier 1 (Li et al. 2018): ``h_t = relu(x_t W + u * h_{t-1} + b)``, its recurrent
  weight a vector, not an (H, G*H) matrix; the carry is one array.
* ``GatedMemory``, tier 1: a gated unit whose carry is a dict of an ``h`` (B, H) and a
  memory ``m`` (B, S, W) of another shape and rank, with a 3-D weight; ``hidden`` picks ``h``.
* ``ManualIndRNN``, tier 2: the IndRNN with its own hand-written ``step_backward``.
* ``LeakyRNN``, tier 2 fast path: a leaky tanh RNN written against the built-in cells'
  contract (hoisted input projection, a residual block, hand-written block backward).
"""

import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import bptt_jax
from bptt_jax import diagnostics, train, truncated
from bptt_jax._engine import memory
from bptt_jax.cells import protocol
from tests import reference
from tests.reference import rel_err

F64 = jnp.float64
T, B, D, O = 7, 3, 4, 3
TOL = 1e-12


# ---------------------------------------------------------------------- the cells
@dataclasses.dataclass(frozen=True)
class IndRNN:
    """``h_t = relu(x_t W + u * h_{t-1} + b)``: params ``{"w": (D, H), "u": (H,), "b": (H,)}``."""

    hidden_size: int

    def init(self, key, input_size, dtype=jnp.float32):
        kw, ku = jax.random.split(key)
        h = self.hidden_size
        return {
            "w": jax.random.normal(kw, (input_size, h), dtype) * input_size**-0.5,
            "u": jax.random.uniform(ku, (h,), dtype, 0.5, 1.0),
            "b": jnp.zeros((h,), dtype),
        }

    def zero_carry(self, batch_size, dtype=jnp.float32):
        return jnp.zeros((batch_size, self.hidden_size), dtype)

    def step(self, params, h, x):
        h = jax.nn.relu(x @ params["w"] + params["u"] * h + params["b"])
        return h, h


@dataclasses.dataclass(frozen=True)
class ManualIndRNN(IndRNN):
    """The IndRNN with its hand-written one-step backward (tier 2)."""

    def step_backward(self, params, h, x, new, dnew):
        da = jnp.where(new > 0, dnew, 0)  # relu'(a) read off h_t = relu(a)
        dparams = {"w": x.T @ da, "u": jnp.sum(h * da, axis=0), "b": jnp.sum(da, axis=0)}
        return dparams, da * params["u"], da @ params["w"].T


@dataclasses.dataclass(frozen=True)
class GatedMemory:
    """A gated unit with a memory of another shape: carry ``{"h": (B, H), "m": (B, S, W)}``::

    f = sigmoid(x W_f + h U_f + b_f)
    n = tanh(x W_n + (f * h) U_n + <m, V_m> + b_n)
    h' = (1 - f) * h + f * n
    m' = m / 2 + tanh(<h', V_in>)
    """

    hidden_size: int
    slots: int = 2
    width: int = 3

    def init(self, key, input_size, dtype=jnp.float32):
        h, s, w = self.hidden_size, self.slots, self.width
        shapes = {
            "w_f": (input_size, h), "u_f": (h, h), "b_f": (h,), "w_n": (input_size, h),
            "u_n": (h, h), "v_m": (s, w, h), "v_in": (h, s, w), "b_n": (h,),
        }  # fmt: skip
        keys = dict(zip(shapes, jax.random.split(key, len(shapes))))
        return {
            k: jax.random.normal(keys[k], shape, dtype) * shape[0] ** -0.5
            for k, shape in shapes.items()
        }

    def zero_carry(self, batch_size, dtype=jnp.float32):
        return {
            "h": jnp.zeros((batch_size, self.hidden_size), dtype),
            "m": jnp.zeros((batch_size, self.slots, self.width), dtype),
        }

    def step(self, p, carry, x):
        h, m = carry["h"], carry["m"]
        f = jax.nn.sigmoid(x @ p["w_f"] + h @ p["u_f"] + p["b_f"])
        read = jnp.einsum("bsw,swh->bh", m, p["v_m"])
        n = jnp.tanh(x @ p["w_n"] + (f * h) @ p["u_n"] + read + p["b_n"])
        h = (1 - f) * h + f * n
        m = 0.5 * m + jnp.tanh(jnp.einsum("bh,hsw->bsw", h, p["v_in"]))
        return {"h": h, "m": m}, h

    def hidden(self, carry):
        return carry["h"]


class LeakyParams(NamedTuple):
    w_x: jax.Array  # (D, H)
    w_h: jax.Array  # (H, H)
    b: jax.Array  # (H,)


@dataclasses.dataclass(frozen=True)
class LeakyRNN:
    """``a_t = tanh(x_t W_x + h_{t-1} W_h + b)``, ``h_t = (1 - leak) h_{t-1} + leak a_t``,
    written against the fast path's contract (``bptt_jax.cells.FastCell``)."""

    hidden_size: int
    leak: float = 0.3

    n_blocks = 1
    residual_blocks = 1  # a_t
    grad_blocks = 1  # d of a_t's pre-activation
    input_grads = (0,)
    recurrent_grads = (0,)

    def init(self, key, input_size, dtype=jnp.float32):
        k1, k2 = jax.random.split(key)
        h = self.hidden_size
        return LeakyParams(
            jax.random.normal(k1, (input_size, h), dtype) * input_size**-0.5,
            jax.random.normal(k2, (h, h), dtype) * h**-0.5,
            jnp.zeros((h,), dtype),
        )

    def zero_carry(self, batch_size, dtype=jnp.float32):
        return jnp.zeros((batch_size, self.hidden_size), dtype)

    def step(self, p, h, x):
        a = jnp.tanh(x @ p.w_x + h @ p.w_h + p.b)
        h = (1 - self.leak) * h + self.leak * a
        return h, h

    def input_kernel(self, p):
        return p.w_x

    def input_bias(self, p):
        return p.b

    def recurrent_kernel(self, p):
        return p.w_h

    def forward(self, p, h, xp):
        (xa,) = xp
        a = jnp.tanh(xa + bptt_jax.cells.matmul(h, p.w_h))
        return (1 - self.leak) * h + self.leak * a, (a,)

    def backward(self, p, res, state, state_prev, dstate, w_t):
        (a,) = res
        da = dstate * self.leak * (1 - a * a)
        return (1 - self.leak) * dstate + bptt_jax.cells.matmul(da, w_t), (da,)

    def hidden(self, state):
        return state

    def add_to_hidden(self, dstate, dh):
        return dstate + dh

    def assemble_grads(self, p, dw_x, dw_h, db_x, db_h):
        return LeakyParams(dw_x, dw_h, db_x)


CELLS = {
    "indrnn": IndRNN(5),
    "gated-memory": GatedMemory(4),
    "indrnn-manual": ManualIndRNN(5),
    "leaky-fast": LeakyRNN(5),
}


def test_the_cells_meet_the_tiers_they_are_written_for():
    assert [protocol.tier(c) for c in CELLS.values()] == ["vjp", "vjp", "manual", "fast"]
    assert all(isinstance(c, bptt_jax.Cell) for c in CELLS.values())
    assert isinstance(CELLS["indrnn-manual"], bptt_jax.ManualCell)
    assert isinstance(CELLS["leaky-fast"], bptt_jax.FastCell)
    assert isinstance(bptt_jax.LSTM(3), bptt_jax.FastCell)
    assert [protocol.output_size(c) for c in CELLS.values()] == [5, 4, 5, 5]


# ---------------------------------------------------------------- the references
def _bcast(v, a):
    return v.reshape(v.shape + (1,) * (a.ndim - 1))


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def clip_error(carry, threshold):
    """Identity; its VJP scales each example's cotangent (every carry leaf, every axis but
    the batch axis, together) to norm <= threshold: the documented ``delta_clip``."""
    return carry


def _clip_fwd(carry, threshold):
    return carry, None


def _clip_bwd(threshold, _, g):
    sq = sum(jnp.sum(x * x, axis=tuple(range(1, x.ndim))) for x in jax.tree.leaves(g))
    factor = jnp.minimum(1.0, threshold / jnp.maximum(jnp.sqrt(sq), 1e-300))
    return (jax.tree.map(lambda x: x * _bcast(factor, x), g),)


clip_error.defvjp(_clip_fwd, _clip_bwd)


def hidden_of(cell, carry):
    return cell.hidden(carry) if hasattr(cell, "hidden") else carry


def scan_unroll(cell, p, xs, carry, mask=None, resets=None, truncate=None, clip=None):
    """The plain ``lax.scan`` of ``cell.step`` a user would write: a padded step passes the
    carry on, a reset zeroes the carry entering its step, truncation is ``stop_gradient`` on
    the carry entering steps k, 2k, ..., ``clip`` clips the error on each new carry."""

    def body(c, inputs):
        t, x, m, r = inputs
        if truncate is not None:
            cut = (t % truncate == 0) & (t > 0)
            c = jax.tree.map(lambda a: jnp.where(cut, lax.stop_gradient(a), a), c)
        if r is not None:
            c = jax.tree.map(lambda a: jnp.where(_bcast(r, a), 0, a), c)
        new, _ = cell.step(p, c, x)
        if m is not None:
            new = jax.tree.map(lambda a, b: jnp.where(_bcast(m, a), a, b), new, c)
        if clip is not None:
            new = clip_error(new, clip)
        return new, hidden_of(cell, new)

    c_t, hs = lax.scan(body, carry, (jnp.arange(xs.shape[0]), xs, mask, resets))
    return hs, c_t


def model_unroll(model, p, xs, carry, mask=None, resets=None, truncate=None, clip=None, drops=None):
    """A Stack runs its layers in turn (layer k's input times ``drops[k-1]``); a
    Bidirectional's reverse cell runs over each sequence's valid prefix read backwards."""
    if isinstance(model, bptt_jax.Stack):
        h, finals = xs, []
        for k, (layer, p_k, c_k) in enumerate(zip(model.layers, p, carry)):
            h = h if k == 0 or drops is None else h * drops[k - 1]
            h, c_t = model_unroll(layer, p_k, h, c_k, mask, resets, truncate, clip)
            finals.append(c_t)
        return h, tuple(finals)
    if isinstance(model, bptt_jax.Bidirectional):
        rev = lambda a: jnp.einsum(  # noqa: E731
            "stb,tbf->sbf", reference.prefix_reversal(mask, xs.shape[0], xs.dtype), a
        )
        h_f, c_f = scan_unroll(model.forward, p[0], xs, carry[0], mask, clip=clip)
        h_r, c_b = scan_unroll(model.backward, p[1], rev(xs), carry[1], mask, clip=clip)
        return reference.merge_outputs(model.merge, h_f, rev(h_r)), (c_f, c_b)
    return scan_unroll(model, p, xs, carry, mask, resets, truncate, clip)


def xent(readout, hs, targets, mask):
    """Softmax cross-entropy, mean over the valid tokens."""
    ys = hs @ readout.w_hy + readout.b_y
    per = optax.softmax_cross_entropy_with_integer_labels(ys, targets)
    m = mask.astype(per.dtype)
    return jnp.sum(per * m) / jnp.maximum(jnp.sum(m), 1)


def _dot(a, b):
    return sum(jnp.sum(x * y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ------------------------------------------------------------------- the problems
def problem(model, key, *, t=T, b=B, mask=True):
    """Random params, readout, inputs, targets, carry and mask (``reference.model_problem``;
    lengths in [0, T] with at least one full sequence), resets, and cotangents on hs and
    carry_T."""
    p, ro, xs, tg, c0, m = reference.model_problem(model, key, F64, t=t, b=b, d=D, o=O, mask=mask)
    rng = reference.numpy_rng(jax.random.fold_in(key, 1))
    if mask:  # one sequence of length 0 too: its outputs are hidden(carry0) throughout
        m = m.at[:, -1].set(False)
    resets = jnp.asarray(rng.random((t, b)) < 0.25)
    ct_h = jnp.asarray(rng.standard_normal((t, b, bptt_jax.models.output_size(model))))
    ct_c = jax.tree.map(lambda c: jnp.asarray(rng.standard_normal(c.shape)), c0)
    return p, ro, xs, tg, c0, m, resets, ct_h, ct_c


#: (name, options of unroll): the schedules run by default; SLOW_SCHEDULES adds the rest.
SCHEDULES = [
    ("full", dict()),
    ("checkpointed", dict(backward="checkpointed", segment=3)),  # T=7: a padded segment
    ("truncated+resets", dict(truncate=3, resets=True)),
    ("checkpointed+truncated+resets+clip",
     dict(backward="checkpointed", segment=2, truncate=3, resets=True, delta_clip=0.3)),
    ("clip+resets", dict(delta_clip=0.3, resets=True)),
]  # fmt: skip
SLOW_SCHEDULES = [
    ("resets", dict(resets=True)),
    ("truncated", dict(truncate=2)),
    ("checkpointed+clip", dict(backward="checkpointed", segment=3, delta_clip=0.3)),
    ("checkpointed+resets", dict(backward="checkpointed", segment=4, resets=True)),
    # the least budget for which the library picks 2-step segments (see _budget_for)
    ("memory_budget", dict(backward="checkpointed", memory_budget="segment=2")),
]
BIDIRECTIONAL_SCHEDULES = [
    (name, kw) for name, kw in SCHEDULES + SLOW_SCHEDULES
    if "truncate" not in kw and "resets" not in kw
]  # fmt: skip


def unroll_vjps(model, schedules, p, xs, c0, m, resets, ct_h, ct_c):
    """For each schedule, the gradient of ``<(hs, carry_T), cotangents>`` with respect to
    (params, xs, carry0) by the library and by ``jax.grad`` of the plain scan: one program."""
    out = {  # the forward: outputs (padded steps repeat the last valid one) and carry_T
        "forward": (
            bptt_jax.unroll(model, p, xs, c0, mask=m, resets=None if bi(model) else resets),
            model_unroll(model, p, xs, c0, m, None if bi(model) else resets),
        )
    }
    for name, kw in schedules:
        kw = _budget_for(model, dict(kw), xs)
        r = resets if kw.pop("resets", False) else None

        def lib(p, xs, c0, kw=kw, r=r):
            return _dot(bptt_jax.unroll(model, p, xs, c0, mask=m, resets=r, **kw), (ct_h, ct_c))

        def ref(p, xs, c0, kw=kw, r=r):
            hs_ct = model_unroll(model, p, xs, c0, m, r, kw.get("truncate"), kw.get("delta_clip"))
            return _dot(hs_ct, (ct_h, ct_c))

        out[name] = (
            jax.grad(lib, argnums=(0, 1, 2))(p, xs, c0),
            jax.grad(ref, argnums=(0, 1, 2))(p, xs, c0),
        )
    return out


def bi(model):
    return bptt_jax.models.is_bidirectional(model)


def _budget_for(model, kw, xs):
    """``kw`` with a ``memory_budget="segment=s"`` made the least budget (bytes) for which
    the library picks segments of s steps for this model and batch."""
    want = kw.get("memory_budget")
    if not isinstance(want, str):
        return kw
    s = int(want.split("=")[1])
    t_len, b, d = xs.shape
    for budget in range(64, 2**22, 8):
        try:
            if memory.segment_for_budget(model, t_len, b, xs.dtype, budget, input_size=d) == s:
                return {**kw, "memory_budget": budget}
        except ValueError:
            continue
    raise AssertionError(f"no budget gives segment={s}")


def max_errors(results) -> dict[str, float]:
    """Schedule -> the largest normwise relative error over every leaf of the gradient."""
    errors = {}
    for name, (got, want) in results.items():
        assert jax.tree.structure(got) == jax.tree.structure(want), name
        errors[name] = max(
            rel_err(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))
        )
    return errors


def assert_errors(errors):
    bad = {k: v for k, v in errors.items() if not v <= TOL}
    assert not bad, f"relative error above {TOL}: {bad}"


# -------------------------------------------------------------- one cell, every schedule
def _check_cell(name, schedules, key):
    cell = CELLS[name]
    p, ro, xs, tg, c0, m, resets, ct_h, ct_c = problem(cell, key)
    f = jax.jit(partial(unroll_vjps, cell, schedules))
    assert_errors(max_errors(f(p, xs, c0, m, resets, ct_h, ct_c)))


@pytest.mark.parametrize("name", CELLS)
def test_user_cell_unroll_grads_match_autodiff_in_every_schedule(name, key):
    _check_cell(name, SCHEDULES, key)


@pytest.mark.slow
@pytest.mark.parametrize("name", CELLS)
def test_user_cell_unroll_grads_match_autodiff_in_the_other_schedules(name, key):
    _check_cell(name, SLOW_SCHEDULES, key)


LOSS_SCHEDULES = [
    ("full", dict()),
    ("chunked-truncation", dict(truncate=3)),  # a loss with truncation and no clip: chunked
    ("checkpointed", dict(backward="checkpointed", segment=3)),
    ("clip+resets", dict(delta_clip=0.3, resets=True)),
]


def loss_grads(model, schedules, p, ro, xs, tg, c0, m, resets):
    """For each schedule, the gradient of the mean cross-entropy with respect to (params,
    readout, xs, carry0): ``bptt_jax.sequence_loss`` against ``jax.grad`` of the plain scan."""
    out = {}
    for name, kw in schedules:
        kw = _budget_for(model, dict(kw), xs)
        r = resets if kw.pop("resets", False) else None

        def lib(p, ro, xs, c0, kw=kw, r=r):
            return bptt_jax.sequence_loss(model, p, ro, xs, tg, c0, mask=m, resets=r, **kw)

        def ref(p, ro, xs, c0, kw=kw, r=r):
            hs, _ = model_unroll(model, p, xs, c0, m, r, kw.get("truncate"), kw.get("delta_clip"))
            return xent(ro, hs, tg, m)

        out[name] = (
            jax.grad(lib, argnums=(0, 1, 2, 3))(p, ro, xs, c0),
            jax.grad(ref, argnums=(0, 1, 2, 3))(p, ro, xs, c0),
        )
    return out


@pytest.mark.parametrize("name", ["gated-memory", pytest.param("indrnn", marks=pytest.mark.slow)])
def test_user_cell_sequence_loss_grads_match_autodiff(name, key):
    cell = CELLS[name]
    p, ro, xs, tg, c0, m, resets, _, _ = problem(cell, key)
    f = jax.jit(partial(loss_grads, cell, LOSS_SCHEDULES))
    assert_errors(max_errors(f(p, ro, xs, tg, c0, m, resets)))


# ----------------------------------------------------------------------------- models
MODELS = {
    # user cells of every tier and a built-in one, layer on layer
    "stack": bptt_jax.Stack((IndRNN(5), GatedMemory(4), LeakyRNN(3), bptt_jax.LSTM(3))),
    "bidirectional": bptt_jax.Bidirectional(GatedMemory(4), backward=ManualIndRNN(3)),
    "stack-bidirectional": bptt_jax.Stack(
        (bptt_jax.Bidirectional(IndRNN(4), merge="sum"), GatedMemory(3))
    ),
}


@pytest.mark.parametrize("name", MODELS)
def test_models_of_user_cells_match_autodiff(name, key):
    model = MODELS[name]
    p, ro, xs, tg, c0, m, resets, ct_h, ct_c = problem(model, key)
    schedules = BIDIRECTIONAL_SCHEDULES[:3] if bi(model) else SCHEDULES
    f = jax.jit(partial(unroll_vjps, model, schedules))
    assert_errors(max_errors(f(p, xs, c0, m, resets, ct_h, ct_c)))


@pytest.mark.slow
def test_stack_of_user_cells_sequence_loss_with_dropout_matches_autodiff(key):
    model = dataclasses.replace(MODELS["stack"], dropout=0.3)
    p, ro, xs, tg, c0, m, resets, _, _ = problem(model, key)
    dkey = jax.random.key(3)
    drops = model.dropout_masks(dkey, T, B, F64)

    def grads(p, ro, xs, c0):
        out = {}
        for name, kw in LOSS_SCHEDULES[:3]:

            def lib(p, ro, xs, c0, kw=kw):
                return bptt_jax.sequence_loss(
                    model, p, ro, xs, tg, c0, mask=m, resets=resets, dropout_key=dkey, **kw
                )

            def ref(p, ro, xs, c0, kw=kw):
                hs, _ = model_unroll(model, p, xs, c0, m, resets, kw.get("truncate"), drops=drops)
                return xent(ro, hs, tg, m)

            out[name] = (
                jax.grad(lib, argnums=(0, 1, 2, 3))(p, ro, xs, c0),
                jax.grad(ref, argnums=(0, 1, 2, 3))(p, ro, xs, c0),
            )
        return out

    assert_errors(max_errors(jax.jit(grads)(p, ro, xs, c0)))


# ------------------------------------------------------------- trainer and TBPTT
SGD = train.OptimConfig(name="sgd", learning_rate=0.1, momentum=0.0, clip="none")


def _train_state(t, p, ro, carry):
    s = t.init(jax.random.key(0), D, O, B, F64)
    return s._replace(params=p, readout=ro, opt_state=t.tx.init((p, ro)), carry=carry)


def _sgd(tree, grads):
    return jax.tree.map(lambda w, g: w - SGD.learning_rate * g, tree, grads)


@pytest.mark.parametrize("k1", [None, 4], ids=["full", "tbptt"])
def test_trainer_steps_a_user_cell_by_its_hand_driven_gradients(k1, key):
    """One trainer step over T=8 steps: full BPTT (one SGD update), or TBPTT(4, 4) (two
    updates, the carry passed from window to window), against jax.grad of the plain scan."""
    cell = CELLS["gated-memory"]
    p, ro, xs, tg, c0, m, resets, _, _ = problem(cell, key, t=8)
    t = train.trainer(cell, SGD, k1=k1)
    new, metrics = t.step(_train_state(t, p, ro, c0), truncated.Batch(xs, tg, m, None, resets))

    def ref_loss(p, ro, xs, tg, c, m, r):
        return xent(ro, scan_unroll(cell, p, xs, c, m, r)[0], tg, m)

    windows = [slice(0, 8)] if k1 is None else [slice(0, 4), slice(4, 8)]
    losses = []
    for w in windows:
        args = (xs[w], tg[w], c0, m[w], resets[w])
        value, (gp, gro) = jax.value_and_grad(ref_loss, argnums=(0, 1))(p, ro, *args)
        c0 = scan_unroll(cell, p, xs[w], c0, m[w], resets[w])[1]
        p, ro = _sgd(p, gp), _sgd(ro, gro)
        losses.append(value)
    got = (new.params, new.readout, new.carry, metrics["loss"])
    assert_errors(max_errors({"trainer": (got, (p, ro, c0, jnp.stack(losses)))}))


@pytest.mark.slow
def test_tbptt_with_history_on_a_user_cell_is_the_trainers(key):
    """TBPTT(k1=3, k2=5): truncated.tbptt and the trainer agree (the TBPTT driver is checked
    against its definition in test_truncated.py; this is the wiring for a user cell)."""
    cell = CELLS["indrnn"]
    p, ro, xs, tg, c0, m, resets, _, _ = problem(cell, key, t=8)
    t = train.trainer(cell, SGD, k1=3, k2=5)
    new, _ = t.step(_train_state(t, p, ro, c0), truncated.Batch(xs, tg, m, None, resets))

    def sgd(n, p, ro, lg, window):
        return n + 1, _sgd(p, lg.params), _sgd(ro, lg.readout), lg.value

    ref = truncated.tbptt(
        cell, p, ro, xs, tg, c0, k1=3, k2=5, update=sgd, update_state=0, mask=m, resets=resets
    )
    assert_errors(max_errors({"tbptt": ((new.params, new.carry), (ref.params, ref.carry))}))


# ----------------------------------------------------------------- check_gradients
@pytest.mark.parametrize(
    "name,kw",
    [
        ("gated-memory", dict()),
        ("indrnn-manual", dict(path="unroll", backward="checkpointed")),
        pytest.param("indrnn", dict(truncate=3), marks=pytest.mark.slow),
        pytest.param("leaky-fast", dict(loss="mse"), marks=pytest.mark.slow),
    ],
)
def test_check_gradients_verifies_a_user_cell(name, kw):
    report = bptt_jax.check_gradients(CELLS[name], **kw)
    assert report.passed, report
    assert report.max_error <= 1e-12


# -------------------------------------------------------------------- diagnostics
def test_gradient_flow_of_a_dict_carry_is_the_error_on_its_hidden_part(key):
    """delta_norms = ||dL/dh_t||, h the carry's "h" part, against the gradient with respect
    to a perturbation added to h_t in the plain scan; jacobian_norms = ||dh_T/d carry_t||_F
    over both parts of the carry, against jax.jacrev of the plain scan."""
    cell = CELLS["gated-memory"]
    p, ro, xs, tg, c0, m, _, _, _ = problem(cell, key)
    flow = diagnostics.gradient_flow(cell, p, ro, xs, tg, c0, mask=m)

    def perturbed(p, xs, c, eps):  # eps: added to the carry after every step
        def body(c, inputs):
            x, m_t, e = inputs
            new, _ = cell.step(p, c, x)
            new = jax.tree.map(lambda a, b: jnp.where(_bcast(m_t, a), a, b), new, c)
            new = jax.tree.map(jnp.add, new, e)
            return new, new["h"]

        return lax.scan(body, c, (xs, m, eps))

    eps0 = jax.tree.map(lambda c: jnp.zeros((T,) + c.shape, c.dtype), c0)
    d_eps = jax.grad(lambda e: xent(ro, perturbed(p, xs, c0, e)[1], tg, m))(eps0)
    delta_ref = jnp.linalg.norm(d_eps["h"], axis=-1)
    jac = jax.jacrev(lambda e: perturbed(p, xs, c0, e)[0]["h"])(eps0)  # (B, H, T, B, ...)
    own = [j[jnp.arange(B), :, :, jnp.arange(B)] for j in jax.tree.leaves(jac)]  # (B, H, T, ...)
    sq = sum(jnp.sum(j**2, axis=(1, *range(3, j.ndim))) for j in own)  # (B, T)
    got = (flow.delta_norms, flow.jacobian_norms)
    assert_errors(max_errors({"flow": (got, (delta_ref, jnp.sqrt(sq).T))}))


def test_truncation_bias_and_spectral_norms_of_user_cells(key):
    cell = CELLS["indrnn"]
    p, ro, xs, tg, c0, m, _, _, _ = problem(cell, key)
    bias = diagnostics.truncation_bias(cell, p, ro, xs, tg, c0, ks=[2, T], mask=m)
    g = jax.grad(lambda p: xent(ro, scan_unroll(cell, p, xs, c0, m)[0], tg, m))(p)
    full = jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(g)))
    assert rel_err(bias.full_norm, full) <= TOL
    np.testing.assert_allclose(bias.cosine[-1], 1.0, rtol=1e-12)
    with pytest.raises(TypeError, match="spectral_norms.*recurrent kernel.*IndRNN"):
        diagnostics.spectral_norms(cell, p)
    leaky = CELLS["leaky-fast"]  # a FastCell has one: its blocks are named by number
    s = diagnostics.spectral_norms(leaky, leaky.init(key, D, F64))
    assert list(s.blocks) == ["0"] and float(s.kernel) > 0


# ----------------------------------------------------------------- precision policy
@pytest.mark.parametrize("name", ["indrnn", "gated-memory"])
def test_a_user_cell_runs_under_a_bfloat16_policy(name, key):
    """A cell written with plain ``@`` (JAX's standard promotion) under compute_dtype:
    outputs in bfloat16, the carry and the gradients in float32, close to float32's."""
    cell = CELLS[name]
    p, ro, xs, tg, c0, m, _, ct_h, ct_c = problem(cell, key)
    p, xs, c0, ct_h = jax.tree.map(lambda a: a.astype(jnp.float32), (p, xs, c0, ct_h))

    def loss(p, policy):
        hs, c_t = bptt_jax.unroll(cell, p, xs, c0, mask=m, compute_dtype=policy)
        return jnp.vdot(hs.astype(jnp.float32), ct_h), (hs, c_t)

    with jax.numpy_dtype_promotion("standard"):
        (_, (hs, c_t)), g = jax.value_and_grad(loss, has_aux=True)(p, jnp.bfloat16)
        g32 = jax.grad(lambda p: loss(p, None)[0])(p)
    assert hs.dtype == jnp.bfloat16
    assert all(c.dtype == jnp.float32 for c in jax.tree.leaves((c_t, g)))
    errors = max_errors({"bf16": (g, g32)})
    assert errors["bf16"] < 0.05, errors


# ----------------------------------------------------------------------- bad input
def _raises(exc, *fragments):
    return pytest.raises(exc, match="(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments))


@dataclasses.dataclass(frozen=True)
class NoStep:
    def init(self, key, input_size, dtype=jnp.float32):
        return {}

    def zero_carry(self, batch_size, dtype=jnp.float32):
        return jnp.zeros((batch_size, 2), dtype)


@dataclasses.dataclass(frozen=True)
class HalfFast(IndRNN):
    n_blocks = 1  # a FastCell's member without the rest

    def input_kernel(self, params):
        return params["w"]


class Unhashable(IndRNN):
    __hash__ = None  # as a dataclass that is not frozen


@dataclasses.dataclass(frozen=True)
class Mutating(IndRNN):
    """``step`` returns a carry of another structure, dtype or shape (``how``)."""

    how: str = "structure"

    def step(self, params, h, x):
        new, _ = IndRNN.step(self, params, h, x)
        if self.how == "structure":
            new = (new, new)
        elif self.how == "dtype":
            new = new.astype(jnp.float32)
        elif self.how == "shape":
            new = new[:, :-1]
        return new, new


@dataclasses.dataclass(frozen=True)
class NoHidden(GatedMemory):
    hidden = None  # a dict carry and no hidden: which part is h?


@dataclasses.dataclass(frozen=True)
class NonlinearHidden(GatedMemory):
    def hidden(self, carry):
        return jnp.tanh(carry["h"])


@dataclasses.dataclass(frozen=True)
class BadBackward(ManualIndRNN):
    """``step_backward`` returning a wrong part (``how``): a missing params entry, a bias
    gradient summed to a scalar (it would broadcast into the sum over time, silently), a
    dcarry of another shape, or a pair instead of the triple."""

    how: str = "missing"

    def step_backward(self, params, h, x, new, dnew):
        dp, dh, dx = ManualIndRNN.step_backward(self, params, h, x, new, dnew)
        if self.how == "missing":
            dp = {"w": dp["w"]}
        elif self.how == "scalar":
            dp = {**dp, "b": jnp.sum(dp["b"])}
        elif self.how == "dcarry":
            dh = dh[:, :-1]
        elif self.how == "pair":
            return dp, dh
        return dp, dh, dx


def _inputs(cell):
    p = cell.init(jax.random.key(0), D, F64)
    return p, jnp.ones((T, B, D), F64)


@pytest.mark.parametrize(
    "cell,exc,fragments",
    [
        (NoStep(), TypeError, ("unroll", "must be a cell", "NoStep", "has no step")),
        (HalfFast(5), TypeError, ("FastCell", "n_blocks, input_kernel", "recurrent_kernel")),
        (Unhashable(5), TypeError, ("Unhashable", "hashable", "frozen")),
        (Mutating(5, "structure"), TypeError, ("Mutating.step", "structure", "step to step")),
        (Mutating(5, "dtype"), TypeError, ("Mutating.step", "dtype", "float64", "float32")),
        (Mutating(5, "shape"), ValueError, ("Mutating.step", "shape", "(3, 5)", "(3, 4)")),
        (NonlinearHidden(4), TypeError, ("NonlinearHidden.hidden", "pick out", "tanh")),
        (BadBackward(5, "missing"), TypeError,
         ("BadBackward.step_backward", "dparams must have the structure of params",
          "missing: dparams['b'], dparams['u']")),
        (BadBackward(5, "scalar"), ValueError,
         ("BadBackward.step_backward", "dparams['b'] of shape ()", "params['b'], (5,)")),
        (BadBackward(5, "dcarry"), ValueError, ("dcarry of shape (3, 4)", "carry, (3, 5)")),
        (BadBackward(5, "pair"), TypeError, ("(dparams, dcarry, dx)", "tuple of 2")),
    ],
    ids=["no-step", "half-fast", "unhashable", "structure", "dtype", "shape",
         "nonlinear-hidden", "backward-structure", "backward-scalar-bias", "backward-dcarry",
         "backward-pair"],
)  # fmt: skip
def test_a_bad_cell_is_refused_before_any_work(cell, exc, fragments):
    p, xs = _inputs(IndRNN(5) if isinstance(cell, NoStep) else cell)
    with _raises(exc, *fragments):
        bptt_jax.unroll(cell, p, xs)


def test_a_dict_carry_without_hidden_outputs_the_steps_y_as_flax_does(rng):
    """No ``hidden`` and a dict carry: the engine stacks the ``y_t`` that ``step`` returns
    (Flax's convention; once refused), here the same ``h`` that GatedMemory's ``hidden``
    picks out; with its gradients. The ``y_t`` are stored beside the carries."""
    p, xs = _inputs(GatedMemory(4))
    ct = jnp.asarray(rng.standard_normal((*xs.shape[:2], 4)), xs.dtype)

    def grads(cell):
        return jax.grad(lambda p, x: jnp.vdot(bptt_jax.unroll(cell, p, x)[0], ct), (0, 1))(p, xs)

    assert bptt_jax.cells.protocol.has_output(NoHidden(4))
    np.testing.assert_allclose(
        bptt_jax.unroll(NoHidden(4), p, xs)[0], bptt_jax.unroll(GatedMemory(4), p, xs)[0],
        rtol=1e-6, atol=1e-7,
    )  # fmt: skip
    reference.assert_trees_close(grads(NoHidden(4)), grads(GatedMemory(4)), F64)


def test_a_bad_cell_is_refused_in_a_model_and_by_the_trainer():
    with _raises(TypeError, "Stack: layers[1]", "must be a cell", "has no step"):
        bptt_jax.Stack((IndRNN(3), NoStep()))
    with _raises(TypeError, "Bidirectional: forward", "NoStep"):
        bptt_jax.Bidirectional(NoStep())
    with _raises(TypeError, "trainer", "Unhashable", "hashable"):
        train.trainer(Unhashable(3))
    model = bptt_jax.Stack((IndRNN(3), Mutating(2, "dtype")))
    p, xs = _inputs(model)
    with _raises(TypeError, "Mutating.step", "dtype"):
        bptt_jax.unroll(model, p, xs)


def test_params_and_carries_not_matching_init_and_zero_carry_name_the_leaf():
    cell = GatedMemory(4)
    p, xs = _inputs(cell)
    c0 = cell.zero_carry(B, F64)
    with _raises(TypeError, "params", "missing: params['u_n']"):
        bptt_jax.unroll(cell, {k: v for k, v in p.items() if k != "u_n"}, xs)
    with _raises(ValueError, "params['v_m']", "(2, 3, 4)", "(2, 3, 5)", "input_size=4"):
        bptt_jax.unroll(cell, {**p, "v_m": jnp.ones((2, 3, 5), F64)}, xs)
    with _raises(TypeError, "params['w_n']", "float64", "float32"):
        bptt_jax.unroll(cell, {**p, "w_n": p["w_n"].astype(jnp.float32)}, xs)
    with _raises(ValueError, "params['w_f']", "(5, 4)", "(4, 4)"):  # inputs of another size
        bptt_jax.unroll(cell, p, jnp.ones((T, B, 5), F64))
    with _raises(ValueError, "carry0['m']", "(3, 2, 3)", "(3, 3, 2)"):
        bptt_jax.unroll(cell, p, xs, {**c0, "m": jnp.ones((B, 3, 2), F64)})
    with _raises(TypeError, "carry0", "not expected: carry0['c']"):
        bptt_jax.unroll(cell, p, xs, {**c0, "c": c0["h"]})
    stack = bptt_jax.Stack((IndRNN(3), cell))  # layer 1's input size is layer 0's output size
    ps = stack.init(jax.random.key(0), D, F64)
    with _raises(ValueError, "params[1]['w_f']", "(3, 4)", "input_size=3", "layer 0"):
        bptt_jax.unroll(stack, (ps[0], p), xs)


# ------------------------------------------------------------------ sharded batches
SHARDED = """
import json, sys
import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import bptt_jax
from bptt_jax import parallel
from bptt_jax.cli import hlo
from tests.test_user_cells import CELLS, problem, _dot
from tests.reference import rel_err
model = bptt_jax.Stack((CELLS["gated-memory"], CELLS["indrnn"]))
p, ro, xs, tg, c0, m, r, ct_h, ct_c = problem(model, jax.random.key(0), b=4)
def grads(p, ro, xs, c0, tg, m, r, ct_h, ct_c):
    def f(p, ro, xs, c0):  # unroll full and checkpointed, a loss with chunked truncation
        out = _dot(bptt_jax.unroll(model, p, xs, c0, mask=m, resets=r), (ct_h, ct_c))
        out += _dot(bptt_jax.unroll(model, p, xs, c0, mask=m, backward="checkpointed",
                                    segment=3), (ct_h, ct_c))
        return out + bptt_jax.sequence_loss(model, p, ro, xs, tg, c0, mask=m, resets=r,
                                            truncate=3, reduction="sum")
    return jax.grad(f, argnums=(0, 1, 2, 3))(p, ro, xs, c0)
args = (p, ro, xs, c0, tg, m, r, ct_h, ct_c)
want = jax.jit(grads)(*args)
rows, ex = P(None, "data"), P("data")
specs = (P(), P(), rows, ex, rows, rows, rows, rows, ex)
out = {}
for mode in sys.argv[1:]:
    kind = AxisType.Auto if mode == "auto" else AxisType.Explicit
    mesh = jax.make_mesh((2,), ("data",), axis_types=(kind,))
    placed = [jax.device_put(a, jax.tree.map(lambda _: NamedSharding(mesh, s), a))
              for a, s in zip(args, specs)]
    f = grads
    if mode == "shard_map":  # the gradients of replicated inputs come back reduced
        f = jax.shard_map(f, mesh=mesh, in_specs=specs, out_specs=(P(), P(), rows, ex))
    with jax.set_mesh(mesh):
        compiled = jax.jit(f).lower(*placed).compile()
        got = compiled(*placed)
        text = compiled.as_text()
    err = max(rel_err(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    loops = sorted({c.loop_depth for c in hlo.collectives(text)})
    out[mode] = dict(err=err, loop_depths=loops)
print("RESULT " + json.dumps(out))
"""


@pytest.mark.parametrize(
    "modes", [("shard_map",), pytest.param(("explicit", "auto"), marks=pytest.mark.slow)]
)
def test_a_user_cell_on_a_batch_sharded_over_two_devices(modes):
    """2 simulated devices in a fresh interpreter: the gradients of a Stack of tier-1 cells
    (full, checkpointed, a loss with chunked truncation) equal one device's inside shard_map
    and under Explicit and Auto meshes, and the params' gradients are reduced across the
    devices outside every loop, not step by step or segment by segment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(
        XLA_FLAGS=f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        JAX_ENABLE_X64="1",
    )
    run = subprocess.run(
        [sys.executable, "-c", SHARDED, *modes], capture_output=True, text=True, timeout=300,
        cwd=pathlib.Path(__file__).resolve().parents[1], env=env,
    )  # fmt: skip
    line = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
    assert run.returncode == 0 and line, run.stdout[-3000:] + run.stderr[-3000:]
    out = json.loads(line[0][len("RESULT ") :])
    assert all(r["err"] <= TOL for r in out.values()), out
    assert all(r["loop_depths"] == [0] for r in out.values()), out  # no collective in a loop
