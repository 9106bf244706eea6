"""Flax NNX and Equinox modules: ``bptt_jax.nnx.RNN`` and ``bptt_jax.equinox.RNN``.

Their gradients are the functional API's (``jax.grad`` of a loss on ``bptt_jax.unroll``) on
the same params, inputs and initial carry; their layout conventions agree with each other;
bad input names the argument. Each framework's tests are skipped when it is not installed.
"""

import inspect
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bptt_jax
from bptt_jax import verify

T, B, D, H = 6, 3, 2, 4
MODELS = {
    "lstm": lambda: bptt_jax.LSTM(H),
    "stacked_bilstm": lambda: bptt_jax.stacked(bptt_jax.LSTM(H), 2, bidirectional=True),
}
FRAMEWORKS = ("nnx", "equinox")


def _framework(name):
    if name == "nnx":
        pytest.importorskip("flax")
        from bptt_jax import nnx as wrapper
    else:
        pytest.importorskip("equinox")
        from bptt_jax import equinox as wrapper
    return wrapper


def draw(rng, shapes, dtype=np.float64):
    """A pytree of N(0, 1) draws (numpy) with the structure and shapes of ``shapes``."""
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape).astype(dtype)), shapes)


def problem(rng, model, dtype=np.float64):
    """Random params, batch-major inputs, lengths in [1, T] (T included) and initial carry."""
    params = draw(rng, jax.eval_shape(lambda: model.init(jax.random.key(0), D, dtype)), dtype)
    params = jax.tree.map(lambda p: 0.5 * p, params)
    x = jnp.asarray(rng.normal(size=(B, T, D)).astype(dtype))
    lengths = jnp.asarray(np.r_[T, rng.integers(1, T + 1, size=B - 1)].astype(np.int32))
    carry0 = draw(rng, jax.eval_shape(lambda: model.zero_carry(B, dtype)), dtype)
    return params, x, lengths, carry0


def make(name, model, params, **kw):
    wrapper = _framework(name)
    return wrapper.RNN(model, params=params, **kw)


def wrapper_grads(name, rnn, loss, x=None):
    """Gradients of ``loss(rnn, x)`` w.r.t. the module's params (through the framework, as
    the model's params pytree) and, when given, w.r.t. ``x``."""
    if name == "nnx":
        from flax import nnx

        g, gx = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(rnn, x)
        g = nnx.merge(nnx.graphdef(rnn), g).get_params()
    else:
        import equinox as eqx

        g, gx = eqx.filter_jit(eqx.filter_grad(lambda both: loss(*both)))((rnn, x))
        g = g.params
    return g if x is None else (g, gx)


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


# ------------------------------------------------------------------------------ gradients
def installed_frameworks():
    names = [n for n, mod in (("nnx", "flax"), ("equinox", "equinox")) if _installed(mod)]
    if not names:
        pytest.skip("neither flax nor equinox is installed")
    return names


def _installed(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _cotangent_loss(rng, model, lengths, carry0, dtype):
    """``(mask, loss_of, functional)``: the mask of ``lengths``; ``loss_of(carry, out)``, a
    loss with random cotangents on the (batch-major) outputs and the final carry; and
    ``functional(params, x)``, that loss on ``bptt_jax.unroll`` (time-major)."""
    out_shape = (B, T, bptt_jax.models.output_size(model))
    ct_out = jnp.asarray(rng.normal(size=out_shape).astype(dtype))
    ct_carry = draw(rng, carry0, dtype)
    mask = jnp.asarray(np.arange(T)[:, None] < np.asarray(lengths)[None, :])

    def loss_of(carry, out):
        dot = sum(jnp.sum(a * b) for a, b in zip(jax.tree.leaves(carry), jax.tree.leaves(ct_carry)))
        return jnp.sum(out * ct_out) + dot

    def functional(p, x):
        hs, carry = bptt_jax.unroll(model, p, jnp.swapaxes(x, 0, 1), carry0, mask=mask)
        return loss_of(carry, jnp.swapaxes(hs, 0, 1))

    return mask, loss_of, functional


@pytest.mark.parametrize("model_name", ["lstm", "stacked_bilstm"])
def test_gradients_equal_the_functional_apis(model_name, rng):
    """``nnx.grad`` / ``eqx.filter_grad`` of a loss on the module's outputs and final carry
    (random cotangents, padded batch, random initial carry) against ``jax.grad`` of the same
    loss on ``bptt_jax.unroll`` (time-major, the mask built from the lengths here), float64:
    the same hand-written backward on the same numbers, so the params' and the inputs'
    gradients agree to a few ulps (the compiled programs differ only by a transpose)."""
    model = MODELS[model_name]()
    params, x, lengths, carry0 = problem(rng, model)
    mask, loss_of, functional = _cotangent_loss(rng, model, lengths, carry0, np.float64)

    ref_p, ref_x = jax.jit(jax.grad(functional, argnums=(0, 1)))(params, x)

    for framework in installed_frameworks():
        rnn = make(framework, model, params, return_carry=True)
        got_p, got_x = wrapper_grads(
            framework,
            rnn,
            lambda m, x: loss_of(*m(x, initial_carry=carry0, seq_lengths=lengths)),
            x,
        )
        assert jax.tree.structure(got_p) == jax.tree.structure(params)
        for a, b in zip(leaves(got_p), leaves(ref_p)):
            np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-14, err_msg=framework)
        np.testing.assert_allclose(got_x, ref_x, rtol=1e-14, atol=1e-14, err_msg=framework)


LINEAR = {
    "mingru": lambda: bptt_jax.MinGRU(H),
    "rglru_parallel": lambda: bptt_jax.RGLRU(H, c=4.0, scan="parallel"),
    "stacked_biminlstm": lambda: bptt_jax.stacked(bptt_jax.MinLSTM(H), 2, bidirectional=True),
    "lru": lambda: bptt_jax.LRU(H, scan="parallel"),
}


def _linear_grid():
    """Each model in one framework by default (they share the module code), the other under
    ``-m slow``."""
    for i, name in enumerate(LINEAR):
        for j, framework in enumerate(FRAMEWORKS):
            marks = () if i % 2 == j else pytest.mark.slow
            yield pytest.param(framework, name, id=f"{name}-{framework}", marks=marks)


@pytest.mark.parametrize("framework,model_name", list(_linear_grid()))
def test_linear_cells_in_a_module_have_the_functional_apis_gradients(framework, model_name, rng):
    """The linear cells (their coefficient path, not a step loop) in either framework's
    module, its params drawn by the module's own init (in_features + rngs / key), float32:
    the outputs, final carry and gradients (params and inputs, through a padded batch and a
    random initial carry) are those of ``bptt_jax.unroll`` on the module's params."""
    wrapper = _framework(framework)
    model = LINEAR[model_name]()
    if framework == "nnx":
        from flax import nnx

        rnn = wrapper.RNN(model, D, rngs=nnx.Rngs(0), return_carry=True)
        params = rnn.get_params()
    else:
        rnn = wrapper.RNN(model, D, key=jax.random.key(0), return_carry=True)
        params = rnn.params
    assert jax.tree.structure(params) == jax.tree.structure(model.init(jax.random.key(0), D))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    _, x, lengths, carry0 = problem(rng, model, np.float32)
    mask, loss_of, functional = _cotangent_loss(rng, model, lengths, carry0, np.float32)

    ref_hs, ref_carry = bptt_jax.unroll(model, params, jnp.swapaxes(x, 0, 1), carry0, mask=mask)
    carry, y = rnn(x, initial_carry=carry0, seq_lengths=lengths)
    np.testing.assert_allclose(y, jnp.swapaxes(ref_hs, 0, 1), rtol=1e-5, atol=1e-5)
    for a, b in zip(leaves(carry), leaves(ref_carry)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

    ref_p, ref_x = jax.jit(jax.grad(functional, argnums=(0, 1)))(params, x)
    got_p, got_x = wrapper_grads(
        framework, rnn, lambda m, x: loss_of(*m(x, initial_carry=carry0, seq_lengths=lengths)), x
    )
    assert jax.tree.structure(got_p) == jax.tree.structure(params)
    assert any(np.abs(g).max() > 1e-3 for g in leaves(ref_p))  # not trivially all zeros
    for a, b in zip(leaves(got_p), leaves(ref_p)):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_x, ref_x, rtol=1e-5, atol=1e-5)
    # given params instead: D is read off them, as for the other built-in cells
    assert make(framework, model, params).in_features == D
    with pytest.raises(ValueError, match=f"in_features={D + 1} does not match the params' input"):
        make(framework, model, params, in_features=D + 1)


# ------------------------------------------------------------------------------ conventions
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_layouts_lengths_masks_and_carry_agree(framework, rng):
    """Batch-major and time-major give the same (transposed) outputs; ``seq_lengths`` and
    the equivalent mask the same outputs and carry; ``return_carry`` returns the functional
    API's final carry; a length of 0 leaves the initial carry; padded outputs repeat the
    last valid state."""
    model = bptt_jax.Bidirectional(bptt_jax.GRU(H))
    params, x, lengths, carry0 = problem(rng, model)
    lengths = lengths.at[1].set(0)
    mask_bt = np.arange(T)[None, :] < np.asarray(lengths)[:, None]
    bm = make(framework, model, params)
    tm = make(framework, model, params, time_major=True)
    ref_hs, ref_carry = bptt_jax.unroll(
        model, params, jnp.swapaxes(x, 0, 1), carry0, mask=jnp.asarray(mask_bt.T)
    )
    carry_bm, y_bm = bm(x, initial_carry=carry0, seq_lengths=lengths, return_carry=True)
    carry_tm, y_tm = tm(
        jnp.swapaxes(x, 0, 1),
        initial_carry=carry0,
        mask=mask_bt.T.astype(np.int32),
        return_carry=True,
    )
    y_mask = bm(x, initial_carry=carry0, mask=jnp.asarray(mask_bt))
    assert y_bm.shape == (B, T, 2 * H) and y_tm.shape == (T, B, 2 * H)
    np.testing.assert_array_equal(y_bm, jnp.swapaxes(ref_hs, 0, 1))
    np.testing.assert_array_equal(y_tm, ref_hs)
    np.testing.assert_array_equal(y_mask, y_bm)
    for a, b, c in zip(leaves(carry_bm), leaves(carry_tm), leaves(ref_carry)):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, c)
    # the zero-length sequence: its carry is the initial one
    for got, init in zip(jax.tree.leaves(carry_bm), jax.tree.leaves(carry0)):
        np.testing.assert_array_equal(got[1], init[1])
    # without return_carry: the outputs alone; without initial_carry: zeros
    y0 = bm(x, seq_lengths=lengths)
    ref0, _ = bptt_jax.unroll(model, params, jnp.swapaxes(x, 0, 1), mask=jnp.asarray(mask_bt.T))
    np.testing.assert_array_equal(y0, jnp.swapaxes(ref0, 0, 1))


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_narrow_integer_lengths_past_their_range_give_the_int32_mask(framework, rng):
    """uint8 seq_lengths with T = 300 > 255 steps: the step index must not wrap."""
    model = bptt_jax.GRU(H)
    params, _, _, _ = problem(rng, model)
    x = jnp.asarray(rng.normal(size=(2, 300, D)))
    rnn = make(framework, model, params)
    wide = rnn(x, seq_lengths=jnp.array([200, 100], jnp.int32))
    narrow = rnn(x, seq_lengths=jnp.array([200, 100], jnp.uint8))
    np.testing.assert_array_equal(narrow, wide)
    assert not np.array_equal(wide[0, 200:], wide[0, 150:250][:100])  # lengths matter


def test_an_nnx_module_with_dropout_and_no_dropout_stream_says_so():
    pytest.importorskip("flax")
    from flax import nnx

    from bptt_jax import nnx as wrapper

    model = bptt_jax.stacked(bptt_jax.GRU(H), 2, dropout=0.5)
    with pytest.raises(ValueError, match="rngs needs a 'dropout' stream"):
        wrapper.RNN(model, D, rngs=nnx.Rngs(params=0))
    wrapper.RNN(model, D, rngs=nnx.Rngs(0))  # one default stream serves dropout too


def test_equinox_one_sequence_and_vmap_agree_with_a_batch(rng):
    """Equinox's per-example convention: ``(T, D)`` inputs (scalar length, unbatched carry),
    ``jax.vmap`` over them, equal the batched call."""
    _framework("equinox")
    model = MODELS["lstm"]()
    params, x, lengths, carry0 = problem(rng, model)
    rnn = make("equinox", model, params, return_carry=True)
    carry, y = rnn(x, carry0, seq_lengths=lengths)
    carry_v, y_v = jax.vmap(lambda x, c, n: rnn(x, c, seq_lengths=n))(x, carry0, lengths)
    np.testing.assert_allclose(y_v, y, rtol=1e-14, atol=1e-15)
    for a, b in zip(leaves(carry_v), leaves(carry)):
        np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-15)
    c1, y1 = rnn(x[1], jax.tree.map(lambda c: c[1], carry0), mask=np.arange(T) < int(lengths[1]))
    np.testing.assert_allclose(y1, y[1], rtol=1e-14, atol=1e-15)
    assert y1.shape == (T, H) and c1.h.shape == (H,)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_dropout_follows_the_framework_and_equals_unroll_with_that_key(framework, rng):
    """A Stack with dropout: the key given at call time is ``unroll`` 's ``dropout_key``;
    ``eval()`` / ``inference_mode`` turn it off; without a key it is an error."""
    model = bptt_jax.stacked(bptt_jax.Elman(H), 2, dropout=0.5)
    params, x, lengths, _ = problem(rng, model)
    key = jax.random.key(int(rng.integers(2**31)))
    xs = jnp.swapaxes(x, 0, 1)
    with_drop, _ = bptt_jax.unroll(model, params, xs, dropout_key=key)
    without, _ = bptt_jax.unroll(model, params, xs)
    assert not np.allclose(with_drop, without)
    rnn = make(framework, model, params)
    if framework == "nnx":
        from flax import nnx

        np.testing.assert_array_equal(rnn(x, rngs=key), jnp.swapaxes(with_drop, 0, 1))
        with pytest.raises(ValueError, match="no rngs were given"):
            rnn(x)
        rnn.eval()
        np.testing.assert_array_equal(rnn(x), jnp.swapaxes(without, 0, 1))
        rnn.train()
        kept = make(framework, model, params, rngs=nnx.Rngs(0, dropout=1))
        assert not np.allclose(kept(x), kept(x))  # a fresh key from the stream every call
    else:
        import equinox as eqx

        np.testing.assert_array_equal(rnn(x, key=key), jnp.swapaxes(with_drop, 0, 1))
        with pytest.raises(ValueError, match="pass key="):
            rnn(x)
        np.testing.assert_array_equal(eqx.nn.inference_mode(rnn)(x), jnp.swapaxes(without, 0, 1))


OPTIONS = {
    "nnx": dict(backward="checkpointed", segment=2),
    "equinox": dict(truncate=2, delta_clip=0.5),
}


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_options_pass_through_to_unroll(framework, rng):
    """``unroll`` 's options given to the module (``backward``/``segment`` in one framework,
    ``truncate``/``delta_clip`` in the other: one code path serves both) give the
    functional API's gradients with the same options; an unknown option is refused."""
    model = bptt_jax.Elman(H)
    params, x, _, _ = problem(rng, model)
    options = OPTIONS[framework]

    def functional(p):
        hs, _ = bptt_jax.unroll(model, p, jnp.swapaxes(x, 0, 1), **options)
        return jnp.sum(jnp.sin(hs))

    ref = jax.jit(jax.grad(functional))(params)
    rnn = make(framework, model, params, **options)
    got = wrapper_grads(framework, rnn, lambda m, _: jnp.sum(jnp.sin(m(x))))
    for a, b in zip(leaves(got), leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-14)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['trunc'\]"):
        make(framework, model, params, trunc=2)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_compute_dtype_gives_the_precision_policys_gradients(framework, rng):
    """``compute_dtype=jnp.bfloat16`` on a float32 module: the functional API's gradients under
    the same policy, in float32 (the master weights' dtype), within the policy's tolerance of
    the float32 gradients (4 bfloat16 eps) and not equal to them (the policy is in effect)."""
    model = bptt_jax.LSTM(H)
    params, x, _, _ = problem(rng, model, np.float32)

    def functional(p, compute_dtype):
        hs, _ = bptt_jax.unroll(model, p, jnp.swapaxes(x, 0, 1), compute_dtype=compute_dtype)
        return jnp.sum(jnp.sin(hs.astype(jnp.float32)))

    ref = jax.jit(jax.grad(functional), static_argnums=1)(params, jnp.bfloat16)
    full = jax.jit(jax.grad(functional), static_argnums=1)(params, None)
    rnn = make(framework, model, params, compute_dtype=jnp.bfloat16)
    got = wrapper_grads(framework, rnn, lambda m, _: jnp.sum(jnp.sin(m(x).astype(jnp.float32))))
    tol = verify.policy_tolerances(jnp.bfloat16)[0]
    for a, b, f in zip(leaves(got), leaves(ref), leaves(full)):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(b).max())
        assert 0 < np.abs(a - f).max() <= tol * np.abs(f).max()


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_bad_inputs_name_the_argument(framework, rng):
    model = MODELS["lstm"]()
    params, x, lengths, carry0 = problem(rng, model)
    rnn = make(framework, model, params)
    name = f"bptt_jax.{framework}.RNN"
    rank = (
        r"\(rank 3, or rank 2 \(T, D\) for one sequence\); got \(2,\) \(rank 1\)"
        if framework == "equinox"
        else r"\(rank 3\); got \(2,\) \(rank 1\)"
    )
    cases = [
        (dict(inputs=x[0, 0]), ValueError, rf"{name}: inputs must have shape \(B, T, D\).*{rank}"),
        (
            dict(inputs=x[..., :1]),
            ValueError,
            r"inputs must have shape \(B, T, D\), batch-major "
            r"with D=2 \(in_features\); got \(3, 6, 1\)",
        ),  # fmt: skip
        (dict(inputs=x[None]), ValueError, r"time_major=True for \(T, B, D\)"),
        (dict(inputs=x.astype(np.float32)), TypeError, r"inputs dtype float32 does not match"),
        (dict(inputs=np.asarray(x).tolist()), TypeError, r"inputs must be an array"),
        (
            dict(seq_lengths=lengths.at[0].set(T + 1)),
            ValueError,
            r"seq_lengths must be in \[0, T\] = \[0, 6\]; got values from \d to 7",
        ),  # fmt: skip
        (dict(seq_lengths=lengths.at[2].set(-1)), ValueError, r"seq_lengths must be in \[0, T\]"),
        (dict(seq_lengths=lengths[:2]), ValueError, r"seq_lengths must have shape \(3,\)"),
        (dict(seq_lengths=lengths.astype(np.float64)), TypeError, r"seq_lengths must be integers"),
        (dict(seq_lengths=lengths, mask=np.ones((B, T))), ValueError, r"seq_lengths or mask"),
        (dict(mask=np.ones((T, B))), ValueError, r"mask must have shape \(B, T\) = \(3, 6\)"),
        (dict(mask=np.full((B, T), "x")), TypeError, r"mask must be bool or 0/1"),
        (
            dict(initial_carry=carry0.h),
            TypeError,
            r"initial_carry must have the structure of "
            r"model.zero_carry\(B\): LSTMCarry\(h=\(3, 4\), c=\(3, 4\)\)",
        ),  # fmt: skip
        (
            dict(initial_carry=carry0._replace(c=carry0.c[:2])),
            ValueError,
            r"initial_carry.c must have shape \(3, 4\).*got \(2, 4\)",
        ),  # fmt: skip
        (
            dict(initial_carry=carry0._replace(h=carry0.h.astype(np.float32))),
            TypeError,
            r"initial_carry.h dtype float32 does not match the params' dtype float64",
        ),  # fmt: skip
    ]
    for kw, err, match in cases:
        kw = {"inputs": x, **kw}
        with pytest.raises(err, match=match):
            rnn(kw.pop("inputs"), **kw)
    init = "rngs" if framework == "nnx" else "key"
    with pytest.raises(TypeError, match=f"pass in_features and {init}"):
        _framework(framework).RNN(model, D)
    with pytest.raises(ValueError, match="in_features=3 does not match the params' input size 2"):
        make(framework, model, params, in_features=3)


# ------------------------------------------------------------------------------ docs
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_docstring_example_runs(framework):
    """The class docstring's ``Example::`` block (not a doctest, so that ``tests/test_docs``
    imports no optional framework), run as written in a fresh interpreter (float32)."""
    wrapper = _framework(framework)
    doc = inspect.getdoc(wrapper.RNN)
    block = re.search(r"Example::\n\n(.*?)(?:\n\S|\Z)", doc, re.S).group(1)
    code = textwrap.dedent(block) + "\nprint('example ok')\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "example ok" in out.stdout, out.stdout + out.stderr


def test_importing_bptt_jax_imports_no_framework():
    code = (
        "import sys, bptt_jax, bptt_jax.interop\n"
        "print(sorted(m for m in ('flax', 'equinox', 'torch') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
