"""Second-order derivatives through the hand-written backward.

``jax.grad`` of a bptt_jax loss runs a ``jax.custom_vjp`` whose backward is itself plain JAX
(reverse scans, matmuls), so it can be differentiated again: a Hessian-vector product
(forward over reverse, ``jax.jvp`` of ``jax.grad``), a gradient penalty or a meta-gradient
(reverse over reverse, ``jax.grad`` of a function of ``jax.grad``). A first-order ``jax.jvp``
of the loss itself cannot pass the ``custom_vjp`` (``backward="autodiff"`` is for that).

Untruncated, both must equal the same derivatives of the independent reference (autodiff of
the plain scans in ``tests/reference.py``) in float64 to ~1e-12. Truncated, the hand-written
backward differentiates to the exact derivative of the truncated gradient ``g_k(p)``: its
stored forward states depend on ``p`` through the cut, as they do. The reference's
``stop_gradient`` at the cut also cuts that dependence from the second derivative, so there
the check is a central difference of the reference's (first-order) ``g_k``.
"""

import jax
import jax.numpy as jnp
import pytest

import bptt_jax
from tests import reference as ref

F64 = jnp.float64
T, B, D, O = 6, 3, 4, 5

MODELS = {
    "elman": bptt_jax.Elman(5),
    "lstm": bptt_jax.LSTM(5, forget_bias=1.0),
    "gru": bptt_jax.GRU(5),
    "stack-lstm-gru": bptt_jax.Stack((bptt_jax.LSTM(5), bptt_jax.GRU(4))),
    "bi-gru": bptt_jax.Bidirectional(bptt_jax.GRU(5)),
}
#: (model, unroll options): every model kind, the checkpointed walk and clipping; the Elman
#: and GRU cells alone under ``-m slow`` (the stack and the bidirectional layer hold them).
SLOW_ALONE = ("elman", "gru")
CASES = [
    *[
        pytest.param(name, {}, marks=pytest.mark.slow if name in SLOW_ALONE else ())
        for name in MODELS
    ],
    ("lstm", {"backward": "checkpointed", "segment": 4}),
    ("lstm", {"delta_clip": 0.3}),  # padded steps' zero errors: a NaN before the safe norm
    pytest.param("stack-lstm-gru", {"delta_clip": 0.3}, marks=pytest.mark.slow),
]


def _vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _losses(model, ro, xs, tg, c0, mask, options):
    """The library's loss and the reference's, as functions of the params alone."""
    truncate, delta_clip = options.get("truncate"), options.get("delta_clip")

    def lib(p):
        return bptt_jax.sequence_loss(
            model, p, ro, xs, tg, c0, mask=mask, reduction="sum", **options
        )

    def reference(p):
        return ref.model_loss(
            model, p, ro, xs, tg, c0, mask, reduction="sum", truncate=truncate,
            delta_clip=delta_clip,
        )  # fmt: skip

    return lib, reference


def _id(case):
    name, options = case.values if hasattr(case, "values") else case
    return f"{name}-{'-'.join(options) or 'manual'}"


@pytest.mark.parametrize("name,options", CASES, ids=[_id(c) for c in CASES])
def test_hessian_vector_products_and_gradient_penalties_match_autodiff(name, options, key):
    model = MODELS[name]
    p, ro, xs, tg, c0, mask = ref.model_problem(model, key, F64, t=T, b=B, d=D, o=O)
    v = ref.random_like(jax.random.fold_in(key, 1), p)
    lib, reference = _losses(model, ro, xs, tg, c0, mask, options)

    @jax.jit
    def derivatives(p, v):
        out = {}
        for which, f in (("lib", lib), ("ref", reference)):
            hvp = jax.jvp(jax.grad(f), (p,), (v,))[1]  # forward over reverse
            penalty = jax.grad(lambda q: _vdot(jax.grad(f)(q), v) ** 2)(p)  # reverse over reverse
            out[which] = (hvp, penalty)
        return out

    out = derivatives(p, v)
    ref.assert_trees_close(out["lib"], out["ref"], F64)


@pytest.mark.parametrize("name", ["lstm", pytest.param("stack-lstm-gru", marks=pytest.mark.slow)])
def test_second_order_of_a_truncated_gradient_is_its_exact_derivative(name, key):
    """d/dp <g_3(p), v> (the truncated gradient g_3, k = 3 cuts T = 6 once) against a central
    difference of the reference's g_3 along a random direction u; the reference's own
    second derivative differs (its stop_gradient drops the cut's dependence on p)."""
    model = MODELS[name]
    p, ro, xs, tg, c0, mask = ref.model_problem(model, key, F64, t=T, b=B, d=D, o=O)
    v = ref.random_like(jax.random.fold_in(key, 1), p)
    u = ref.random_like(jax.random.fold_in(key, 2), p)
    lib, reference = _losses(model, ro, xs, tg, c0, mask, {"truncate": 3})

    @jax.jit
    def run(p):
        along_v = lambda f: lambda q: _vdot(jax.grad(f)(q), v)  # noqa: E731
        eps = 1e-5
        shifted = lambda s: jax.tree.map(lambda a, b: a + s * eps * b, p, u)  # noqa: E731
        fd = (along_v(reference)(shifted(1.0)) - along_v(reference)(shifted(-1.0))) / (2 * eps)
        return (
            _vdot(jax.grad(along_v(lib))(p), u),
            fd,
            _vdot(jax.grad(along_v(reference))(p), u),
            along_v(lib)(p),
            along_v(reference)(p),
        )

    exact, fd, stop_gradient_second, first_lib, first_ref = run(p)
    assert abs(first_lib - first_ref) <= 1e-12 * abs(first_ref)  # the same g_3
    # A central difference with eps = 1e-5: truncation error ~eps^2 |f'''| ~ 1e-10, round-off
    # ~1e-16 |<g, v>| / eps ~ 1e-11, relative to an O(1)-O(10) derivative.
    assert abs(exact - fd) <= 1e-7 * max(abs(fd), 1.0), (exact, fd)
    assert abs(stop_gradient_second - fd) > 1e-3 * abs(fd), "the cut should matter here"


@pytest.mark.parametrize("tier", ["step-vjp", "step_backward"])
def test_hessian_vector_products_of_a_users_cell_match_autodiff(tier, key):
    """A user's cell: its one-step backward (jax.vjp of its step, or its own step_backward)
    inside the sequence-level BPTT is differentiated again, against tests/test_user_cells'
    plain scan of the cell's step."""
    from tests import test_user_cells as uc

    cell = uc.GatedMemory(4) if tier == "step-vjp" else uc.ManualIndRNN(4)
    p, ro, xs, tg, c0, mask = ref.model_problem(cell, key, F64, t=T, b=B, d=D, o=O)
    v = ref.random_like(jax.random.fold_in(key, 1), p)

    def lib(p):
        return bptt_jax.sequence_loss(cell, p, ro, xs, tg, c0, mask=mask)

    def reference(p):
        return uc.xent(ro, uc.model_unroll(cell, p, xs, c0, mask)[0], tg, mask)

    @jax.jit
    def hvps(p, v):
        return [jax.jvp(jax.grad(f), (p,), (v,))[1] for f in (lib, reference)]

    got, expected = hvps(p, v)
    ref.assert_trees_close(got, expected, F64)
