"""Checkpointed (memory-efficient) BPTT: the same gradients as full BPTT, in O(sqrt(T)) memory.

``backward="checkpointed"`` stores only the carry entering every segment and re-runs each
segment's forward inside the hand-written backward. Its gradients must equal autodiff of the
plain-scan reference for every cell, dtype, mask, reset, truncation and segment length.
"""

import itertools

import jax
import jax.numpy as jnp
import pytest

import bptt_jax
from bptt_jax import engine
from tests import reference as ref


def _grid():
    for name, dtype, (t, segment), (masked, loss) in itertools.product(
        ref.CELLS,
        [jnp.float64, jnp.float32],
        [(9, None), (10, 3), (9, 1)],  # sqrt(T) with padding; padding; one step per segment
        [(True, "xent"), (False, "mse")],
    ):
        yield pytest.param(
            name,
            dtype,
            t,
            segment,
            masked,
            loss,
            id=f"{name}-{jnp.dtype(dtype).name}-T{t}-s{segment}-"
            f"{'mask' if masked else 'nomask'}-{loss}",
        )


@pytest.mark.parametrize("name,dtype,t,segment,masked,loss", list(_grid()))
def test_checkpointed_loss_grads_match_autodiff(name, dtype, t, segment, masked, loss, key):
    cell = ref.CELLS[name]
    k1, k2, k3 = jax.random.split(key, 3)
    p, ro, xs, tg, c0, m = ref.problem(cell, k1, dtype, t=t, mask=masked, loss=loss)
    resets = jax.random.bernoulli(k2, 0.15, xs.shape[:2])
    loss_mask = jax.random.bernoulli(k3, 0.7, xs.shape[:2])
    argnums = (0, 1, 2, 3, 4) if loss == "mse" else (0, 1, 2, 4)
    # Half the grid also clips the error per step (with "sum", so the errors are large).
    clip = 0.3 if masked else None
    opts = dict(loss=loss, reduction="sum" if masked else "mean", truncate=4)

    def checkpointed(p, ro, xs, tg, c0):
        return bptt_jax.sequence_loss(
            cell, p, ro, xs, tg, c0, mask=m, loss_mask=loss_mask, resets=resets,
            backward="checkpointed", segment=segment, delta_clip=clip, **opts,
        )  # fmt: skip

    def reference(p, ro, xs, tg, c0):
        return ref.scan_loss(
            cell, p, ro, xs, tg, c0, m, opts["loss"], opts["reduction"], opts["truncate"],
            loss_mask=loss_mask, resets=resets, delta_clip=clip,
        )  # fmt: skip

    v_c, g_c = jax.jit(jax.value_and_grad(checkpointed, argnums))(p, ro, xs, tg, c0)
    v_r, g_r = jax.value_and_grad(reference, argnums)(p, ro, xs, tg, c0)
    assert ref.rel_err(v_c, v_r) <= ref.TOL[dtype]
    ref.assert_trees_close(g_c, g_r, dtype)


@pytest.mark.parametrize("name", list(ref.CELLS))
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("segment", [None, 4, 20])  # 20 > T: a single segment
def test_checkpointed_unroll_vjp_matches_autodiff(name, dtype, segment, key):
    cell = ref.CELLS[name]
    k1, k2, k3 = jax.random.split(key, 3)
    p, _, xs, _, c0, m = ref.problem(cell, k1, dtype, t=11)
    resets = jax.random.bernoulli(k2, 0.15, xs.shape[:2])

    def checkpointed(p, xs, c0):
        return bptt_jax.unroll(
            cell, p, xs, c0, mask=m, resets=resets, truncate=5, delta_clip=0.5,
            backward="checkpointed", segment=segment,
        )  # fmt: skip

    out_c, vjp_c = jax.vjp(checkpointed, p, xs, c0)
    out_r, vjp_r = jax.vjp(
        lambda *a: ref.scan_unroll(cell, *a, m, 5, resets, delta_clip=0.5), p, xs, c0
    )
    ref.assert_trees_close(out_c, out_r, dtype)
    leaves, treedef = jax.tree.flatten(out_r)
    keys = jax.random.split(k3, len(leaves))
    ct = treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
    ref.assert_trees_close(vjp_c(ct), vjp_r(ct), dtype)


def _temp_mib(backward, t, **kw):
    b, d, h, o = 8, 8, 32, 8
    cell = bptt_jax.Elman(h)
    k = jax.random.split(jax.random.key(0), 4)
    p, ro = cell.init(k[0], d), bptt_jax.init_readout(k[1], h, o)
    xs = jax.random.normal(k[2], (t, b, d), jnp.float32)
    tg = jax.random.randint(k[3], (t, b), 0, o)

    def loss(p, ro):
        return bptt_jax.sequence_loss(cell, p, ro, xs, tg, backward=backward, **kw)

    compiled = jax.jit(jax.grad(loss, (0, 1))).lower(p, ro).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


def test_checkpointed_memory_grows_like_sqrt_t_while_autodiff_grows_like_t():
    small = {bw: _temp_mib(bw, 1024) for bw in ("checkpointed", "manual", "autodiff")}
    large = {bw: _temp_mib(bw, 4096) for bw in ("checkpointed", "manual", "autodiff")}
    assert small["checkpointed"] * 8 < small["autodiff"]
    assert large["checkpointed"] * 25 < large["autodiff"]
    assert large["checkpointed"] * 20 < large["manual"]
    # 4x the steps: about 2x (sqrt) for checkpointed, about 4x (linear) for the others.
    assert large["checkpointed"] / small["checkpointed"] < 2.6
    assert large["autodiff"] / small["autodiff"] > 3.5


def test_memory_budget_picks_a_segment_that_fits():
    cell = bptt_jax.LSTM(32)
    seg = engine.segment_for_budget(cell, 4096, 8, jnp.float32, 2**20)
    assert 1 <= seg < 4096
    # Per step: h and c, the four in-place gate buffers, the readout's error; B=8, H=32.
    per_step = 8 * 32 * (2 + 4 + 1) * 4
    checkpoints = -(-4096 // seg) * 8 * 32 * 2 * 4
    assert seg * per_step + checkpoints <= 2**20
    # More memory never gives a shorter segment.
    assert engine.segment_for_budget(cell, 4096, 8, jnp.float32, 2**22) >= seg
    with pytest.raises(ValueError, match="memory_budget=100 bytes is too small"):
        engine.segment_for_budget(cell, 4096, 8, jnp.float32, 100)


def test_default_segment_is_about_sqrt_t_and_covers_t():
    for t in [1, 2, 7, 100, 1000, 4096, 10007]:
        s = engine.default_segment(t)
        n = -(-t // s)
        assert abs(s - t**0.5) <= t**0.5 / 2 + 1
        assert (n - 1) * s < t <= n * s


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        ({"segment": 0}, ValueError, "segment must be a positive int"),
        ({"segment": 2.5}, ValueError, "segment must be a positive int"),
        ({"memory_budget": -5}, ValueError, "memory_budget must be a positive int"),
        ({"segment": 3, "memory_budget": 10**6}, ValueError, "not both"),
        ({"backward": "recompute"}, ValueError, "backward"),
    ],
)
def test_bad_checkpoint_options_name_the_argument(kwargs, err, match, key):
    cell = bptt_jax.GRU(4)
    p, ro, xs, tg, c0, _ = ref.problem(cell, key, jnp.float32, t=6, b=2, mask=False)
    kwargs = {"backward": "checkpointed", **kwargs}
    with pytest.raises(err, match=match):
        bptt_jax.sequence_loss(cell, p, ro, xs, tg, c0, **kwargs)
