"""Checkpointed (memory-efficient) BPTT: the same gradients as full BPTT, in O(sqrt(T)) memory.

``backward="checkpointed"`` stores only the carry entering every segment and re-runs each
segment's forward inside the hand-written backward. Its gradients must equal autodiff of the
plain-scan reference for every cell, dtype, mask, loss mask, reset, truncation (or none),
clipping, final-carry cotangent and segment length (or memory budget).
"""

import itertools

import jax
import jax.numpy as jnp
import pytest

import bptt_jax
from bptt_jax._engine import memory
from tests import reference as ref

T = 10  # ref.draw's sequence length


def _vdot(tree, other):
    return sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(other)))


def _budget_for_segment(cell, dtype, b, segment, d):
    """The smallest ``memory_budget`` (bytes) for which the library picks ``segment`` (inputs
    of ``d`` features)."""
    for budget in range(64, 2**20, 8):
        try:
            if memory.segment_for_budget(cell, T, b, dtype, budget, input_size=d) == segment:
                return budget
        except ValueError:
            continue
    raise AssertionError("no budget gives that segment")


#: sequence_loss schedules, each on every cell: segment (None: about sqrt(T); 1; 3 with a
#: padded last segment; 20 > T: one segment; a memory budget that picks 2), masks, resets,
#: truncation, clipping, reduction, loss and a cotangent on the final carry (return_carry).
LOSS_OPTIONS = {
    "s1-mask-lmask-resets-trunc4-clip-sum-xent": dict(
        segment=1, mask=True, loss_mask=True, resets=True, truncate=4, delta_clip=0.3,
        reduction="sum", loss="xent",
    ),
    "sNone-nomask-lmask-resets-trunc4-mean-mse": dict(
        segment=None, mask=False, loss_mask=True, resets=True, truncate=4, reduction="mean",
        loss="mse",
    ),
    "s3-nomask-full-carry-mean-mse": dict(
        segment=3, mask=False, carry=True, reduction="mean", loss="mse"
    ),
    "budget-mask-resets-full-clip-carry-sum-xent": dict(
        budget=2, mask=True, resets=True, delta_clip=0.3, carry=True, reduction="sum",
        loss="xent",
    ),
    "s20-mask-lmask-trunc3-mean-xent": dict(
        segment=20, mask=True, loss_mask=True, truncate=3, reduction="mean", loss="xent"
    ),
}  # fmt: skip


def _loss_grid():
    """Every cell x schedule x dtype; the default run keeps half of cell x schedule (each
    schedule with three cells, alternating) in one dtype, alternating over the kept ones."""
    n = 0  # kept so far
    for c, name in enumerate(ref.CELLS):
        for o, opt in enumerate(LOSS_OPTIONS):
            keep = (c + o) % 2 == 0
            for j, dtype in enumerate([jnp.float64, jnp.float32]):
                yield pytest.param(
                    name,
                    opt,
                    dtype,
                    id=f"{name}-{opt}-{jnp.dtype(dtype).name}",
                    marks=() if keep and j == n % 2 else pytest.mark.slow,
                )
            n += keep


@pytest.mark.parametrize("name,options,dtype", list(_loss_grid()))
def test_checkpointed_loss_grads_match_autodiff(name, options, dtype, rng):
    cell = ref.CELLS[name]
    o = LOSS_OPTIONS[options]
    loss = o["loss"]
    p, ro, xs, tg, c0, m = ref.draw(cell, rng, dtype, mask=o["mask"], loss=loss)
    opts = dict(
        mask=m,
        loss_mask=ref.flags(rng, xs.shape[:2], 0.7) if o.get("loss_mask") else None,
        resets=ref.flags(rng, xs.shape[:2], 0.15) if o.get("resets") else None,
        truncate=o.get("truncate"),
        delta_clip=o.get("delta_clip"),
        loss=loss,
        reduction=o["reduction"],
    )
    if "budget" in o:
        seg = dict(
            memory_budget=_budget_for_segment(cell, dtype, xs.shape[1], o["budget"], xs.shape[2])
        )
    else:
        seg = dict(segment=o["segment"])
    w = ref.normal_like(rng, c0) if o.get("carry") else None  # h and c each on their own
    argnums = (0, 1, 2, 3, 4) if loss == "mse" else (0, 1, 2, 4)

    def checkpointed(p, ro, xs, tg, c0):
        v, c = bptt_jax.sequence_loss(
            cell, p, ro, xs, tg, c0, backward="checkpointed", return_carry=True, **seg, **opts
        )
        return v if w is None else v + _vdot(c, w), c

    (v_c, c_c), g_c = jax.jit(jax.value_and_grad(checkpointed, argnums, has_aux=True))(
        p, ro, xs, tg, c0
    )
    v_r, c_r, g_r = ref.loss_grads(cell, p, ro, xs, tg, c0, carry_ct=w, argnums=argnums, **opts)
    if w is not None:
        v_r = v_r + _vdot(c_r, w)
    assert ref.rel_err(v_c, v_r) <= ref.TOL[dtype]
    ref.assert_trees_close(c_c, c_r, dtype)
    ref.assert_trees_close(g_c, g_r, dtype)


#: unroll schedules: segment (None, 4, 20 > T, a memory budget that picks 3), masks, resets,
#: truncation and clipping.
UNROLL_OPTIONS = {
    "sNone-mask-resets-trunc5-clip": dict(segment=None, mask=True, resets=True, truncate=5,
                                          delta_clip=0.5),
    "s4-nomask-full": dict(segment=4, mask=False),
    "s20-mask-trunc5": dict(segment=20, mask=True, truncate=5),
    "budget-nomask-resets-clip": dict(budget=3, mask=False, resets=True, delta_clip=0.5),
}  # fmt: skip


def _unroll_grid():
    """Every cell x schedule x dtype; the default run keeps two schedules per cell, in turn,
    in alternating dtypes (each schedule meets three cells)."""
    opts = list(UNROLL_OPTIONS)
    for i, name in enumerate(ref.CELLS):
        for j, opt in enumerate(opts):
            for k, dtype in enumerate([jnp.float64, jnp.float32]):
                fast = j in {(2 * i) % 4, (2 * i + 1) % 4} and k == (i + j) % 2
                yield pytest.param(
                    name,
                    opt,
                    dtype,
                    id=f"{name}-{opt}-{jnp.dtype(dtype).name}",
                    marks=() if fast else pytest.mark.slow,
                )


@pytest.mark.parametrize("name,options,dtype", list(_unroll_grid()))
def test_checkpointed_unroll_vjp_matches_autodiff(name, options, dtype, rng):
    cell = ref.CELLS[name]
    o = UNROLL_OPTIONS[options]
    p, _, xs, _, c0, m = ref.draw(cell, rng, dtype, mask=o["mask"])
    r = ref.flags(rng, xs.shape[:2], 0.15) if o.get("resets") else None
    kw = dict(truncate=o.get("truncate"), delta_clip=o.get("delta_clip"))
    if "budget" in o:
        seg = dict(
            memory_budget=_budget_for_segment(cell, dtype, xs.shape[1], o["budget"], xs.shape[2])
        )
    else:
        seg = dict(segment=o["segment"])

    def checkpointed(p, xs, c0, ct):
        f = lambda p, xs, c0: bptt_jax.unroll(  # noqa: E731
            cell, p, xs, c0, mask=m, resets=r, backward="checkpointed", **seg, **kw
        )
        out, vjp = jax.vjp(f, p, xs, c0)
        return out, vjp(ct)

    ct = ref.normal_like(rng, (jnp.zeros((*xs.shape[:2], cell.hidden_size), dtype), c0))
    out_c, g_c = jax.jit(checkpointed)(p, xs, c0, ct)
    out_r, g_r = ref.unroll_vjp(cell, p, xs, c0, ct, mask=m, resets=r, **kw)
    ref.assert_trees_close(out_c, out_r, dtype)
    ref.assert_trees_close(g_c, g_r, dtype)


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
    seg = memory.segment_for_budget(cell, 4096, 8, jnp.float32, 2**20)
    assert 1 <= seg < 4096
    # Per step: h and c, the four in-place gate buffers, the readout's error; B=8, H=32.
    per_step = 8 * 32 * (2 + 4 + 1) * 4
    checkpoints = -(-4096 // seg) * 8 * 32 * 2 * 4
    assert seg * per_step + checkpoints <= 2**20
    # More memory never gives a shorter segment.
    assert memory.segment_for_budget(cell, 4096, 8, jnp.float32, 2**22) >= seg
    with pytest.raises(ValueError, match="memory_budget=100 bytes is too small"):
        memory.segment_for_budget(cell, 4096, 8, jnp.float32, 100)
    # The inputs cut into segments count too; a Bidirectional layer keeps its input (T steps)
    with_inputs = memory.segment_for_budget(cell, 4096, 8, jnp.float32, 2**20, input_size=2)
    assert with_inputs < seg
    bi = bptt_jax.Bidirectional(cell)
    with pytest.raises(ValueError, match=r"262144 of them the Bidirectional layers' inputs"):
        memory.segment_for_budget(bi, 4096, 8, jnp.float32, 2**18, input_size=2)


def test_memory_budget_bounds_the_compiled_gradients_temp_memory():
    """What the budget promises, measured: XLA's temp memory of a float32 sequence_loss
    gradient at T=2048 within 1.5x of the budget (what the estimate leaves out: the loss's
    per-step arrays and XLA's scratch), and the segment shorter for a smaller budget."""
    xs, tg = jnp.ones((2048, 8, 8), jnp.float32), jnp.zeros((2048, 8), jnp.int32)
    # (measured: 1.30x and 1.42x for the Elman, 0.86x and 1.20x for the LSTM; before the
    # inputs and the carries' own dtype were counted, 2.14x and 1.82x at 1 MiB)
    for cell, budget in itertools.product([bptt_jax.Elman(32), bptt_jax.LSTM(32)], (2**20, 2**22)):
        p, ro = cell.init(jax.random.key(0), 8), bptt_jax.init_readout(jax.random.key(1), 32, 4)

        def loss(p, ro, budget=budget, cell=cell):
            return bptt_jax.sequence_loss(
                cell, p, ro, xs, tg, backward="checkpointed", memory_budget=budget
            )

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(p, ro).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        assert temp <= 1.5 * budget, (budget, temp)


def test_default_segment_is_about_sqrt_t_and_covers_t():
    for t in [1, 2, 7, 100, 1000, 4096, 10007]:
        s = memory.default_segment(t)
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
        # a segment or a budget with full BPTT would be ignored: refused instead
        ({"backward": "manual", "segment": 3}, ValueError, "segment=3 applies to backward="),
        ({"backward": "autodiff", "memory_budget": 10**6}, ValueError, "memory_budget=1000000"),
    ],
)
def test_bad_checkpoint_options_name_the_argument(kwargs, err, match, rng):
    cell = bptt_jax.GRU(4)
    p, ro, xs, tg, c0, _ = ref.draw(cell, rng, jnp.float32, t=6, b=2, mask=False)
    kwargs = {"backward": "checkpointed", **kwargs}
    with pytest.raises(err, match=match):
        bptt_jax.sequence_loss(cell, p, ro, xs, tg, c0, **kwargs)
