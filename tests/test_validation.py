"""Bad input gets a clear ValueError/TypeError at trace time, naming the argument and both
shapes or dtypes; never an XLA trace."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bptt_jax

F32 = jnp.float32
H, D, O, T, B = 6, 4, 5, 7, 3


def _setup(cell=None, dtype=F32):
    cell = cell or bptt_jax.Elman(H)
    k = jax.random.split(jax.random.key(0), 4)
    p = cell.init(k[0], D, dtype)
    ro = bptt_jax.init_readout(k[1], H, O, dtype)
    xs = jax.random.normal(k[2], (T, B, D), dtype)
    tg = jax.random.randint(k[3], (T, B), 0, O)
    return cell, p, ro, xs, tg


def _raises(exc, *fragments):
    """pytest.raises whose message must contain every fragment (escaped)."""
    return pytest.raises(exc, match="(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_xs_wrong_rank(jit):
    cell, p, _, xs, _ = _setup()
    f = jax.jit(bptt_jax.unroll, static_argnums=0) if jit else bptt_jax.unroll
    with _raises(ValueError, "unroll", "xs", "(T, B, D)", "(7, 4)"):
        f(cell, p, xs[:, 0])
    with _raises(ValueError, "xs", "(1, 7, 3, 4)"):
        f(cell, p, xs[None])


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_xs_wrong_input_size_names_both_shapes(jit):
    cell, p, _, xs, _ = _setup()
    f = jax.jit(bptt_jax.unroll, static_argnums=0) if jit else bptt_jax.unroll
    with _raises(ValueError, "xs", "D=4", "params.w_xh (4, 6)", "(7, 3, 9)"):
        f(cell, p, jnp.ones((T, B, 9), F32))


def test_integer_xs_is_a_type_error():
    cell, p, _, xs, _ = _setup()
    with _raises(TypeError, "xs", "floating", "int32"):
        bptt_jax.unroll(cell, p, xs.astype(jnp.int32))


def test_xs_dtype_must_match_params():
    cell, p, _, xs, _ = _setup()
    with _raises(TypeError, "xs", "float64", "float32"):
        bptt_jax.unroll(cell, p, xs.astype(jnp.float64))


def test_float64_carry_with_float32_params():
    cell, p, _, xs, _ = _setup()
    with _raises(TypeError, "carry0", "float64", "float32"):
        bptt_jax.unroll(cell, p, xs, jnp.zeros((B, H), jnp.float64))


def _complex(tree):
    return jax.tree.map(lambda a: a.astype(jnp.complex64), tree)


@pytest.mark.parametrize("fn", ["unroll", "sequence_loss", "loss_and_grads"])
@pytest.mark.parametrize(
    ("arg", "leaf", "how"),
    [
        ("params", ".w_", "as two real params"),
        ("xs", "", "jnp.concatenate([xs.real, xs.imag], axis=-1)"),
        ("carry0", "", "as one real (B, 2N) array"),
    ],
)
@pytest.mark.parametrize("make", [bptt_jax.GRU, bptt_jax.MinGRU], ids=["gru", "mingru"])
def test_complex_params_xs_or_carry_is_a_type_error_naming_the_argument(make, arg, leaf, how, fn):
    """Complex dtypes are refused before any work, by name (not as a mismatch with the
    params' dtype, nor reported on the wrong argument), with how to pass them as reals."""
    cell, p, ro, xs, tg = _setup(make(H))
    args = dict(params=p, xs=xs, carry0=cell.zero_carry(B))
    args[arg] = _complex(args[arg])
    call = {
        "unroll": lambda: bptt_jax.unroll(cell, args["params"], args["xs"], args["carry0"]),
        "sequence_loss": lambda: bptt_jax.sequence_loss(
            cell, args["params"], ro, args["xs"], tg, args["carry0"]
        ),
        "loss_and_grads": lambda: bptt_jax.loss_and_grads(
            cell, args["params"], ro, args["xs"], tg, args["carry0"]
        ),
    }[fn]
    with _raises(
        TypeError,
        f"{fn}: {arg}{leaf}",
        "has dtype complex64",
        "complex dtypes are not supported",
        "a complex number as its real and imaginary parts, real arrays",
        how,
    ):
        call()
    with _raises(TypeError, f"{fn}: {arg}{leaf}", "complex dtypes are not supported"):
        jax.jit(call)()  # at trace time


def test_a_complex_leaf_is_named_in_a_model_and_a_complex_readout_is_refused():
    model = bptt_jax.stacked(bptt_jax.MinGRU(H), 2, bidirectional=True)
    _, p, ro, xs, tg = _setup(model)
    p = (p[0], (p[1][0], p[1][1]._replace(b_h=p[1][1].b_h.astype(jnp.complex64))))
    with _raises(TypeError, "unroll: params[1][1].b_h has dtype complex64", "not supported"):
        bptt_jax.unroll(model, p, xs)
    cell, p, ro, xs, tg = _setup()
    with _raises(TypeError, "sequence_loss: readout.w_hy has dtype complex64", "real arrays"):
        bptt_jax.sequence_loss(cell, p, ro._replace(w_hy=ro.w_hy.astype(jnp.complex64)), xs, tg)
    with _raises(TypeError, "unroll: xs[0][0][0] has dtype complex128"):  # array-likes too
        bptt_jax.unroll(cell, p, [[[1j] * D] * B] * T)


@pytest.mark.parametrize("shape", [(B, H + 1), (B + 1, H), (H,)])
def test_carry_wrong_shape(shape):
    cell, p, _, xs, _ = _setup()
    with _raises(ValueError, "carry0", f"({B}, {H})", str(shape)):
        bptt_jax.unroll(cell, p, xs, jnp.zeros(shape, F32))


def test_lstm_carry_must_be_an_lstmcarry():
    cell, p, _, xs, _ = _setup(bptt_jax.LSTM(H))
    with _raises(TypeError, "carry0", "LSTMCarry", "ArrayImpl", f"({B}, {H})"):
        bptt_jax.unroll(cell, p, xs, jnp.zeros((B, H), F32))
    with _raises(ValueError, "carry0.c", f"({B}, {H})", f"({B}, 2)"):
        bptt_jax.unroll(
            cell, p, xs, bptt_jax.LSTMCarry(jnp.zeros((B, H), F32), jnp.zeros((B, 2), F32))
        )


def test_gru_carry_must_be_one_array():
    cell, p, _, xs, _ = _setup(bptt_jax.GRU(H))
    z = jnp.zeros((B, H), F32)
    with _raises(TypeError, "carry0", "GRU", "one (B, H) array", "LSTMCarry"):
        bptt_jax.unroll(cell, p, xs, bptt_jax.LSTMCarry(z, z))


def test_params_of_another_cell():
    _, p, _, xs, _ = _setup(bptt_jax.LSTM(H))
    with _raises(TypeError, "params", "ElmanParams", "LSTMParams"):
        bptt_jax.unroll(bptt_jax.Elman(H), p, xs)


def test_params_hidden_size_mismatch():
    _, p, _, xs, _ = _setup(bptt_jax.GRU(H))
    with _raises(ValueError, "params.w_x", "(D, 24)", "hidden_size=8", "(4, 18)"):
        bptt_jax.unroll(bptt_jax.GRU(8), p, xs)
    bad = p._replace(w_h=jnp.zeros((H + 1, 3 * H), F32))
    with _raises(ValueError, "params.w_h", "(6, 18)", "(7, 18)"):
        bptt_jax.unroll(bptt_jax.GRU(H), bad, xs)


def test_params_mixed_dtypes():
    cell, p, _, xs, _ = _setup()
    with _raises(TypeError, "params.b_h", "float64", "float32"):
        bptt_jax.unroll(cell, p._replace(b_h=p.b_h.astype(jnp.float64)), xs)


@pytest.mark.parametrize("shape", [(T, B + 1), (T + 1, B), (T,), (T, B, 1)])
def test_mask_wrong_shape(shape):
    cell, p, _, xs, _ = _setup()
    with _raises(ValueError, "mask", f"({T}, {B})", str(shape)):
        bptt_jax.unroll(cell, p, xs, mask=jnp.ones(shape, bool))


def test_mask_of_strings_is_a_type_error():
    cell, p, _, xs, _ = _setup()
    import numpy as np

    with _raises(TypeError, "mask"):
        bptt_jax.unroll(cell, p, xs, mask=np.full((T, B), "a"))


@pytest.mark.parametrize(
    "name, value, fn",
    [
        ("mask", 0.5, "unroll"),
        ("mask", 2, "unroll"),
        ("resets", -1, "unroll"),
        ("loss_mask", 0.25, "sequence_loss"),
    ],
)
def test_a_numeric_mask_must_hold_zeros_and_ones(name, value, fn):
    """A mask selects steps: 0.5 would silently count as 1 (and a loss_mask is not a weight)."""
    cell, p, ro, xs, tg = _setup()
    m = jnp.ones((T, B), jnp.asarray(value).dtype).at[3, 1].set(value)
    with _raises(ValueError, fn, name, "only 0 and 1", f"got {value!r} at (t, b) = (3, 1)"):
        if fn == "unroll":
            bptt_jax.unroll(cell, p, xs, **{name: m})
        else:
            bptt_jax.sequence_loss(cell, p, ro, xs, tg, **{name: m})


def test_a_numeric_zero_one_mask_equals_the_bool_one():
    cell, p, ro, xs, tg = _setup()
    m = jax.random.bernoulli(jax.random.key(5), 0.7, (T, B)).at[0].set(True)
    for name in ("mask", "loss_mask"):
        as_float = bptt_jax.sequence_loss(cell, p, ro, xs, tg, **{name: m.astype(F32)})
        as_bool = bptt_jax.sequence_loss(cell, p, ro, xs, tg, **{name: m})
        assert as_float == as_bool


def test_uint8_targets_over_more_than_256_classes_are_not_wrapped():
    """Class 261 in uint8 arithmetic would be 5: arange(O) in the targets' dtype wraps."""
    cell, p, _, xs, _ = _setup()
    ro = bptt_jax.init_readout(jax.random.key(1), H, 300, F32)
    tg = jax.random.randint(jax.random.key(2), (T, B), 0, 40)
    for backward in ("manual", "autodiff"):
        wide = bptt_jax.sequence_loss(cell, p, ro, xs, tg, backward=backward)
        narrow = bptt_jax.sequence_loss(cell, p, ro, xs, tg.astype(jnp.uint8), backward=backward)
        assert narrow == wide


def test_numpy_integers_are_ints():
    """carry_index like truncate and k1: a NumPy integer is an int."""
    from bptt_jax.losses import loss_and_grads

    cell, p, ro, xs, tg = _setup()
    a = loss_and_grads(cell, p, ro, xs, tg, carry_index=np.int64(3), truncate=np.int64(2))
    b = loss_and_grads(cell, p, ro, xs, tg, carry_index=3, truncate=2)
    np.testing.assert_array_equal(a.carry, b.carry)


def test_readout_hidden_size_mismatch():
    cell, p, _, xs, tg = _setup()
    ro = bptt_jax.init_readout(jax.random.key(1), H + 2, O, F32)
    with _raises(ValueError, "readout.w_hy", "H=6", "(8, 5)"):
        bptt_jax.sequence_loss(cell, p, ro, xs, tg)


def test_readout_bias_mismatch():
    cell, p, ro, xs, tg = _setup()
    with _raises(ValueError, "readout.b_y", "(5,)", "(3,)"):
        bptt_jax.sequence_loss(cell, p, ro._replace(b_y=jnp.zeros(3, F32)), xs, tg)


def test_xent_targets_shape_and_dtype():
    cell, p, ro, xs, tg = _setup()
    with _raises(ValueError, "targets", f"({T}, {B})", f"({T}, {B}, 1)"):
        bptt_jax.sequence_loss(cell, p, ro, xs, tg[..., None])
    with _raises(TypeError, "targets", "integer", "float32"):
        bptt_jax.sequence_loss(cell, p, ro, xs, tg.astype(F32))


@pytest.mark.parametrize("value", [-1, O])
def test_xent_targets_out_of_range(value):
    cell, p, ro, xs, tg = _setup()
    with _raises(ValueError, "targets", f"[0, {O})", str(value), "(t, b) = (3, 2)"):
        bptt_jax.sequence_loss(cell, p, ro, xs, tg.at[3, 2].set(value))


def test_mse_targets_shape_and_dtype():
    cell, p, ro, xs, _ = _setup()
    with _raises(ValueError, "targets", f"({T}, {B}, {O})", f"({T}, {B}, 4)"):
        bptt_jax.sequence_loss(cell, p, ro, xs, jnp.zeros((T, B, 4), F32), loss="mse")
    with _raises(TypeError, "targets", "float32", "float64"):
        bptt_jax.sequence_loss(cell, p, ro, xs, jnp.zeros((T, B, O), jnp.float64), loss="mse")


@pytest.mark.parametrize(
    "kw,exc,frag",
    [
        (dict(loss="l1"), ValueError, "loss"),
        (dict(reduction="max"), ValueError, "reduction"),
        (dict(backward="jvp"), ValueError, "backward"),
        (dict(truncate=0), ValueError, "truncate"),
        (dict(truncate=-3), ValueError, "truncate"),
        (dict(truncate=2.5), TypeError, "truncate"),
    ],
)
def test_bad_options(kw, exc, frag):
    cell, p, ro, xs, tg = _setup()
    with _raises(exc, "sequence_loss", frag, repr(next(iter(kw.values())))):
        bptt_jax.sequence_loss(cell, p, ro, xs, tg, **kw)


def test_not_a_cell():
    _, p, _, xs, _ = _setup()
    with _raises(TypeError, "cell", "Elman", "str"):
        bptt_jax.unroll("elman", p, xs)


@pytest.mark.parametrize(
    "make,exc,frag",
    [
        (lambda: bptt_jax.Elman(0), ValueError, "hidden_size"),
        (lambda: bptt_jax.Elman(4, "gelu"), ValueError, "activation"),
        (lambda: bptt_jax.LSTM(4, init_scheme="xavier"), ValueError, "init"),
        (lambda: bptt_jax.LSTM(4, forget_bias=float("nan")), ValueError, "forget_bias .* finite"),
        (lambda: bptt_jax.LSTM(4, forget_bias=float("-inf")), ValueError, "forget_bias .* finite"),
        (lambda: bptt_jax.GRU(2.5), ValueError, "hidden_size"),
        (lambda: bptt_jax.Elman(4).init(jax.random.key(0), 0), ValueError, "input_size"),
        (lambda: bptt_jax.LSTM(4).init(jax.random.key(0), 3, jnp.int32), TypeError, "dtype"),
        (lambda: bptt_jax.init_readout(jax.random.key(0), 4, 0), ValueError, "output_size"),
    ],
)
def test_bad_constructor_arguments(make, exc, frag):
    with pytest.raises(exc, match=frag):
        make()
