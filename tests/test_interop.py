"""PyTorch weights: ``bptt_jax.interop.params_from_torch`` / ``params_to_torch``.

Round trips need no torch (a state dict is a dict of numpy arrays); the output checks run
the same weights through ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` in float64 and are skipped
when torch is not installed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bptt_jax
from bptt_jax.interop import params_from_torch, params_to_torch, torch_module_spec

H, D = 5, 3

CELLS = {
    "rnn_tanh": lambda: bptt_jax.Elman(H, "tanh"),
    "rnn_relu": lambda: bptt_jax.Elman(H, "relu"),
    "lstm": lambda: bptt_jax.LSTM(H),
    "lstm_forget_bias": lambda: bptt_jax.LSTM(H, forget_bias=1.0),
    "gru": lambda: bptt_jax.GRU(H),
}
GATES = {bptt_jax.Elman: 1, bptt_jax.LSTM: 4, bptt_jax.GRU: 3}


def make_model(cell, layers: int, bidirectional: bool):
    """A bare cell or Bidirectional for one layer (as a user would write it), else stacked."""
    if layers == 1:
        return bptt_jax.Bidirectional(cell) if bidirectional else cell
    return bptt_jax.stacked(cell, layers, bidirectional=bidirectional)


def random_state_dict(rng, cell, layers, bidirectional, dtype=np.float64):
    """A state dict of PyTorch's names and shapes, every entry drawn at random."""
    g = GATES[type(cell)] * H
    dirs = 2 if bidirectional else 1
    sd = {}
    for k in range(layers):
        for d in range(dirs):
            sfx = f"_l{k}" + ("_reverse" if d else "")
            d_in = D if k == 0 else dirs * H
            for name, shape in (
                ("weight_ih", (g, d_in)),
                ("weight_hh", (g, H)),
                ("bias_ih", (g,)),
                ("bias_hh", (g,)),
            ):
                sd[name + sfx] = rng.normal(size=shape).astype(dtype)
    return sd


def random_params(rng, model, dtype):
    """The model's params with every leaf (biases too) drawn from N(0, 1) with numpy."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), D, dtype))
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape).astype(dtype)), shapes)


def leaves_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return (
        jax.tree.structure(a) == jax.tree.structure(b)
        and len(la) == len(lb)
        and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(la, lb))
    )


def forget_vector(cell, dtype):
    v = np.zeros(4 * H, dtype)
    if isinstance(cell, bptt_jax.LSTM):
        v[H : 2 * H] = cell.forget_bias
    return v


GRID = [(c, n, bi) for c in CELLS for n in (1, 2, 3) for bi in (False, True)]


# ---------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("cell_name,layers,bidirectional", GRID)
def test_params_to_torch_to_params_is_exact(cell_name, layers, bidirectional, rng):
    """``params -> state dict -> params`` returns every leaf bit for bit, in its dtype."""
    model = make_model(CELLS[cell_name](), layers, bidirectional)
    for dtype in (jnp.float32, jnp.float64):
        params = random_params(rng, model, dtype)
        sd = params_to_torch(model, params)
        for name, value in sd.items():
            assert value.dtype == dtype and value.flags.c_contiguous and value.flags.writeable
            assert name.split("_l")[0] in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        assert len(sd) == 4 * layers * (2 if bidirectional else 1)
        assert leaves_equal(params_from_torch(model, sd), params)


@pytest.mark.parametrize("cell_name,layers,bidirectional", GRID)
def test_torch_to_params_to_torch_is_exact_up_to_the_bias_folding(
    cell_name, layers, bidirectional, rng
):
    """``state dict -> params -> state dict``: every weight matrix exactly; the GRU's biases
    exactly; Elman/LSTM biases folded as documented: ``bias_hh`` becomes 0 (an LSTM's
    ``forget_bias`` on the f block) and ``bias_ih`` takes the rest, the sum kept exactly
    (to one rounding with a forget_bias)."""
    cell = CELLS[cell_name]()
    model = make_model(cell, layers, bidirectional)
    sd = random_state_dict(rng, cell, layers, bidirectional)
    back = params_to_torch(model, params_from_torch(model, sd))
    assert list(back) == list(sd)  # PyTorch's order
    for name, value in sd.items():
        assert back[name].dtype == value.dtype and back[name].shape == value.shape
        if name.startswith("weight") or isinstance(cell, bptt_jax.GRU):
            assert np.array_equal(back[name], value), name
    if isinstance(cell, bptt_jax.GRU):
        return
    fv = forget_vector(cell, np.float64)[: GATES[type(cell)] * H]
    for name in sd:
        if name.startswith("bias_hh"):
            ih = name.replace("bias_hh", "bias_ih")
            assert np.array_equal(back[name], fv)
            total, folded = sd[ih] + sd[name], back[ih] + back[name]
            if np.any(fv):
                # a few roundings, each relative to the operands (the sum may cancel)
                scale = np.abs(sd[ih]) + np.abs(sd[name]) + np.abs(fv)
                assert np.all(np.abs(folded - total) <= 4 * np.finfo(np.float64).eps * scale)
            else:
                assert np.array_equal(folded, total)


def test_one_layer_stack_maps_like_its_cell(rng):
    cell = bptt_jax.LSTM(H)
    sd = random_state_dict(rng, cell, 1, True)
    p_stack = params_from_torch(bptt_jax.stacked(cell, 1, bidirectional=True), sd)
    p_bi = params_from_torch(bptt_jax.Bidirectional(cell), sd)
    assert len(p_stack) == 1 and leaves_equal(p_stack[0], p_bi)


def test_dtype_prefix_and_bias_false(rng):
    cell = bptt_jax.GRU(H)
    model = bptt_jax.stacked(cell, 2)
    sd = random_state_dict(rng, cell, 2, False)
    # dtype= casts; the state dict's own dtype is kept without it
    p32 = params_from_torch(model, sd, dtype=jnp.float32)
    assert {x.dtype for x in jax.tree.leaves(p32)} == {np.dtype(np.float32)}
    assert {x.dtype for x in jax.tree.leaves(params_from_torch(model, sd))} == {
        np.dtype(np.float64)
    }
    assert params_to_torch(model, p32, dtype=np.float64)["weight_ih_l0"].dtype == np.float64
    # a submodule of a larger module: its prefix selects it, other keys are ignored
    big = {"rnn." + k: v for k, v in sd.items()} | {"head.weight": rng.normal(size=(2, H))}
    assert leaves_equal(params_from_torch(model, big, prefix="rnn."), params_from_torch(model, sd))
    assert list(params_to_torch(model, p32, prefix="rnn.")) == [f"rnn.{k}" for k in sd]
    # bias=False: no bias keys, zero biases, and the round trip keeps it so
    nob = {k: v for k, v in sd.items() if k.startswith("weight")}
    p = params_from_torch(model, nob, bias=False)
    assert all(not np.any(layer.b_x) and not np.any(layer.b_h) for layer in p)
    with pytest.raises(ValueError, match="no bias keys at all: .* needs bias=False"):
        params_from_torch(model, nob)  # forgot bias=False: said so
    assert {k: v.tolist() for k, v in params_to_torch(model, p, bias=False).items()} == {
        k: v.tolist() for k, v in nob.items()
    }
    with pytest.raises(ValueError, match="bias=False, but layer 0 direction 0 has nonzero"):
        params_to_torch(model, params_from_torch(model, sd), bias=False)
    # an LSTM without biases but with a forget_bias: b = -forget_bias on the f block
    lstm = bptt_jax.LSTM(H, forget_bias=1.0)
    lsd = {k: v for k, v in random_state_dict(rng, lstm, 1, False).items() if "weight" in k}
    p = params_from_torch(lstm, lsd, bias=False)
    assert np.array_equal(p.b, -forget_vector(lstm, np.float64))
    assert set(params_to_torch(lstm, p, bias=False)) == set(lsd)


def test_module_spec_names_the_torch_module():
    model = bptt_jax.stacked(bptt_jax.GRU(8), 2, bidirectional=True)
    assert torch_module_spec(model, 3) == (
        "nn.GRU(input_size=3, hidden_size=8, num_layers=2, bidirectional=True)"
    )
    assert (
        torch_module_spec(bptt_jax.Elman(4)) == "nn.RNN(input_size=D, hidden_size=4, num_layers=1)"
    )


# ---------------------------------------------------------------------------- bad input
def test_missing_misshapen_and_unexpected_keys_are_listed_before_any_work(rng):
    cell = bptt_jax.LSTM(H)
    model = bptt_jax.stacked(cell, 2, bidirectional=True)
    sd = random_state_dict(rng, cell, 2, True)
    bad = dict(sd)
    del bad["weight_hh_l1_reverse"]
    bad["weight_ih_l1"] = rng.normal(size=(4 * H, 2 * H - 1))
    bad["weight_hr_l0"] = rng.normal(size=(H, 2))
    bad["bias_ih_l0"] = "not even an array"  # never read: the shape problems come first
    with pytest.raises(ValueError) as e:
        params_from_torch(model, bad)
    msg = str(e.value)
    assert "nn.LSTM(input_size=3, hidden_size=5, num_layers=2, bidirectional=True)" in msg
    assert "missing 'weight_hh_l1_reverse' (expected shape (20, 5))" in msg
    assert "'weight_ih_l1' has shape (20, 9), expected (20, 10)" in msg
    assert "'bias_ih_l0' has shape (), expected (20,)" in msg
    assert "unexpected key 'weight_hr_l0' (LSTM projections" in msg
    # the first layer's input size comes from weight_ih_l0; without it, D is unknown
    del sd["weight_ih_l0"]
    with pytest.raises(ValueError, match=r"missing 'weight_ih_l0' \(expected shape \(20, D\)\)"):
        params_from_torch(model, sd)
    # a module with one layer too many or too few
    with pytest.raises(ValueError, match="unexpected key 'weight_ih_l2'"):
        params_from_torch(model, random_state_dict(rng, cell, 3, True))
    with pytest.raises(ValueError, match="missing 'weight_ih_l0_reverse'"):
        params_from_torch(bptt_jax.Bidirectional(cell), random_state_dict(rng, cell, 1, False))
    with pytest.raises(ValueError, match=r"unexpected key 'rnn.bias_ih_l0' \(a biased module"):
        params_from_torch(
            cell, {"rnn." + k: v for k, v in sd.items() if "l0" in k}, prefix="rnn.", bias=False
        )


def test_bad_values_and_dtypes_raise_type_errors(rng):
    cell = bptt_jax.GRU(H)
    sd = random_state_dict(rng, cell, 1, False)
    with pytest.raises(TypeError, match=r"state_dict\['bias_hh_l0'\] must be floating point"):
        params_from_torch(cell, sd | {"bias_hh_l0": np.arange(3 * H)})
    mixed = sd | {"bias_hh_l0": sd["bias_hh_l0"].astype(np.float32)}
    with pytest.raises(TypeError, match=r"several dtypes \['float32', 'float64'\]; pass dtype="):
        params_from_torch(cell, mixed)
    assert params_from_torch(cell, mixed, dtype=np.float64).b_h.dtype == np.float64
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        params_from_torch(cell, list(sd.values()))
    with jax.enable_x64(False):
        with pytest.raises(TypeError, match="float64 but JAX's float64 is off; pass dtype="):
            params_from_torch(cell, sd)
        assert params_from_torch(cell, sd, dtype=np.float32).w_x.dtype == np.float32


def test_models_pytorch_cannot_express_are_refused():
    lstm = bptt_jax.LSTM(H)
    cases = [
        (bptt_jax.Elman(H, "sigmoid"), ValueError, "activation 'sigmoid' has no PyTorch"),
        (bptt_jax.Bidirectional(lstm, merge="sum"), ValueError, "concatenate them"),
        (bptt_jax.Stack((bptt_jax.Bidirectional(lstm), lstm)), ValueError, "all bidirectional"),
        (bptt_jax.Stack((lstm, bptt_jax.LSTM(H + 1))), ValueError, "one hidden size"),
        (bptt_jax.Stack((lstm, bptt_jax.GRU(H))), ValueError, "one cell type"),
        (
            bptt_jax.Stack((bptt_jax.Elman(H), bptt_jax.Elman(H, "relu"))),
            ValueError,
            "one nonlinearity",
        ),
        ("lstm", TypeError, "model must be a bptt_jax cell"),
    ]
    for model, err, match in cases:
        with pytest.raises(err, match=match):
            params_from_torch(model, {})
        with pytest.raises(err, match=match):
            params_to_torch(model, None)


def test_params_of_the_wrong_structure_type_or_shape_name_the_path(rng):
    model = bptt_jax.stacked(bptt_jax.LSTM(H), 2, bidirectional=True)
    params = random_params(rng, model, np.float64)
    with pytest.raises(TypeError, match=r"params \(one entry per layer\) must be a tuple of 2"):
        params_to_torch(model, params[:1])
    with pytest.raises(TypeError, match=r"params\[1\] \(the forward and backward params\)"):
        params_to_torch(model, (params[0], params[1][0]))
    gru = bptt_jax.stacked(bptt_jax.GRU(H), 2, bidirectional=True)
    gru = random_params(rng, gru, np.float64)[1][0]
    with pytest.raises(TypeError, match=r"params\[1\]\[0\] must be a bptt_jax.LSTMParams"):
        params_to_torch(model, (params[0], (gru, params[1][1])))
    short = params[1][1]._replace(w_x=params[1][1].w_x[:-1])
    with pytest.raises(ValueError, match=r"params\[1\]\[1\].w_x must have shape \(10, 20\)"):
        params_to_torch(model, (params[0], (params[1][0], short)))
    with pytest.raises(ValueError, match=r"params\[0\]\[0\].b must have shape \(20,\)"):
        params_to_torch(
            model, ((params[0][0]._replace(b=params[0][0].b[:3]), params[0][1]), params[1])
        )
    with pytest.raises(TypeError, match="w_h must be floating point"):
        params_to_torch(bptt_jax.LSTM(H), params[0][0]._replace(w_h=np.ones((H, 4 * H), int)))


# ---------------------------------------------------------------------------- vs PyTorch
OUTPUT_GRID = [
    (c, layers, bi) for c in CELLS for layers, bi in ((1, False), (1, True), (2, True), (3, False))
]


@pytest.mark.parametrize("cell_name,layers,bidirectional", OUTPUT_GRID)
def test_outputs_equal_pytorch_on_the_same_weights(cell_name, layers, bidirectional, rng):
    """float64, right-padded batch with initial carries, both directions of the mapping:
    a torch module's weights imported, and bptt_jax's params exported and loaded by torch
    (``load_state_dict`` strict: every name and shape is PyTorch's). Outputs at valid steps,
    ``h_n`` and ``c_n`` within 1e-12."""
    torch = pytest.importorskip("torch")
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    cell = CELLS[cell_name]()
    model = make_model(cell, layers, bidirectional)
    dirs = 2 if bidirectional else 1
    kind = {bptt_jax.Elman: "RNN", bptt_jax.LSTM: "LSTM", bptt_jax.GRU: "GRU"}[type(cell)]
    extra = {"nonlinearity": cell.activation} if kind == "RNN" else {}
    torch.manual_seed(int(rng.integers(2**31)))
    net = getattr(torch.nn, kind)(D, H, num_layers=layers, bidirectional=bidirectional, **extra)
    net = net.double()

    t, b = 7, 4
    lengths = np.array([t, 1, 4, 6])
    xs = rng.normal(size=(t, b, D))
    mask = np.arange(t)[:, None] < lengths
    h0 = rng.normal(size=(layers * dirs, b, H))
    c0 = rng.normal(size=(layers * dirs, b, H))

    def jax_carry0():
        def one(i):
            if kind == "LSTM":
                return bptt_jax.LSTMCarry(jnp.asarray(h0[i]), jnp.asarray(c0[i]))
            return jnp.asarray(h0[i])

        per_layer = [
            tuple(one(dirs * k + d) for d in range(dirs)) if bidirectional else one(k)
            for k in range(layers)
        ]
        if layers == 1 and not isinstance(model, bptt_jax.Stack):
            return per_layer[0]
        return tuple(per_layer)

    def torch_run():
        packed = pack_padded_sequence(
            torch.from_numpy(xs), torch.from_numpy(lengths), enforce_sorted=False
        )
        with torch.no_grad():
            state = (
                (torch.from_numpy(h0), torch.from_numpy(c0))
                if kind == "LSTM"
                else (torch.from_numpy(h0))
            )
            out, state = net(packed, state)
        out, _ = pad_packed_sequence(out, total_length=t)
        h_n, c_n = state if kind == "LSTM" else (state, None)
        return out.numpy(), h_n.numpy(), None if c_n is None else c_n.numpy()

    def flat_carry(carry):
        leaves = []
        per_layer = carry if isinstance(model, bptt_jax.Stack) else (carry,)
        for layer in per_layer:
            for c in layer if bidirectional else (layer,):
                leaves.append(c)
        h = np.stack([np.asarray(c.h if kind == "LSTM" else c) for c in leaves])
        c = np.stack([np.asarray(c.c) for c in leaves]) if kind == "LSTM" else None
        return h, c

    run = jax.jit(lambda p, x, c, m: bptt_jax.unroll(model, p, x, c, mask=m))
    errors = []
    for direction in ("import", "export"):
        if direction == "import":
            params = params_from_torch(model, net.state_dict())
        else:
            params = jax.tree.map(lambda a: 0.5 * a, random_params(rng, model, np.float64))
            sd = params_to_torch(model, params)
            net.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})  # strict
        hs, carry = run(params, jnp.asarray(xs), jax_carry0(), jnp.asarray(mask))
        out, h_n, c_n = torch_run()
        h, c = flat_carry(carry)
        hs = np.asarray(hs)
        assert hs.shape == out.shape == (t, b, dirs * H)
        np.testing.assert_allclose(hs[mask], out[mask], rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(h, h_n, rtol=1e-12, atol=1e-13)
        errors.append(np.max(np.abs(hs[mask] - out[mask])))
        if kind == "LSTM":
            np.testing.assert_allclose(c, c_n, rtol=1e-12, atol=1e-13)
    print(f"max |bptt_jax - torch| {cell_name} L={layers} bi={bidirectional}: {max(errors):.2e}")


def test_bfloat16_params_export_with_a_dtype(rng):
    """torch.from_numpy has no bfloat16: exporting bfloat16 params needs ``dtype=``."""
    cell = bptt_jax.GRU(H)
    p = random_params(rng, cell, np.float32)
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), p)
    with pytest.raises(TypeError, match="got bfloat16: pass dtype=np.float32"):
        params_to_torch(cell, p16)
    sd = params_to_torch(cell, p16, dtype=np.float32)
    assert leaves_equal(
        params_from_torch(cell, sd), jax.tree.map(lambda a: a.astype(np.float32), p16)
    )
