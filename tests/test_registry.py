"""One name-to-model registry (``bptt_jax.models``): the built-in cells by name, a model from a
name and a few settings or from a spec (``"bilstm:2"``), and the name of a cell; what the
commands and the benchmarks build comes from it."""

import pytest

import bptt_jax
from bptt_jax.cli import diagnose, train_config
from bptt_jax.models import CELLS, build_model, cell_name, from_spec, parse_spec


@pytest.mark.parametrize("name", list(CELLS))
def test_each_name_builds_its_cell_and_names_it_back(name):
    cell = build_model(name, 5)
    assert cell == CELLS[name](5) and cell_name(cell) == name


def test_settings_apply_to_the_cells_that_have_them():
    assert build_model("lstm", 4, forget_bias=1.0, activation="relu") == bptt_jax.LSTM(
        4, forget_bias=1.0
    )
    assert build_model("elman", 4, activation="relu", forget_bias=1.0) == bptt_jax.Elman(4, "relu")
    assert build_model("gru", 4, init_scheme="orthogonal") == bptt_jax.GRU(4, "orthogonal")


def test_scan_and_c_reach_the_linear_cells_and_every_layer():
    assert build_model("mingru", 4, scan="parallel").scan == "parallel"
    assert build_model("minlstm", 4, scan="sequential").scan == "sequential"
    rglru = build_model("rglru", 4, scan="sequential", c=4)
    assert rglru == bptt_jax.RGLRU(4, c=4.0, scan="sequential") and rglru.c == 4.0
    assert build_model("rglru", 4) == bptt_jax.RGLRU(4, c=8.0, scan="auto")  # None: defaults
    model = from_spec("birglru:2", 3, scan="parallel", c=2.0)
    cells = [cell for layer in model.layers for cell in layer.cells]
    assert len(cells) == 4
    assert all(cell == bptt_jax.RGLRU(3, c=2.0, scan="parallel") for cell in cells)


@pytest.mark.parametrize(
    ("cell", "setting", "having"),
    [
        ("lstm", dict(scan="parallel"), "mingru, minlstm, rglru, lru"),
        ("elman", dict(scan="auto"), "mingru, minlstm, rglru, lru"),
        ("gru", dict(c=4.0), "rglru"),
        ("mingru", dict(c=4.0), "rglru"),
        ("minlstm", dict(scan="parallel", c=4.0), "rglru"),
    ],
)
def test_scan_or_c_for_a_cell_without_it_is_an_error_naming_both(cell, setting, having):
    """Unlike activation, forget_bias and init_scheme (a config table holds them all and each
    cell takes its own), the linear cells' settings are never dropped silently."""
    name = next(k for k in ("c", "scan") if k in setting)
    message = f"build_model: {name} is a setting of {having}, not of cell '{cell}'"
    with pytest.raises(ValueError, match=f"^{message}$"):
        build_model(cell, 4, **setting)
    with pytest.raises(ValueError, match=f"^{message}$"):
        from_spec(f"bi{cell}:2", 4, **setting)


@pytest.mark.parametrize(
    ("cell", "setting", "match"),
    [
        ("mingru", dict(scan="fast"), r"MinGRU: scan must be one of \('auto', 'parallel', "
         r"'sequential'\); got 'fast'"),
        ("rglru", dict(scan="Parallel"), r"RGLRU: scan must be one of .*; got 'Parallel'"),
        ("rglru", dict(c=0), r"RGLRU: c must be a positive finite number \(c > 0\); got 0$"),
        ("rglru", dict(c=-1.5), r"RGLRU: c must be .*\(c > 0\); got -1.5$"),
    ],
)  # fmt: skip
def test_a_bad_scan_or_c_is_an_error_naming_it_what_it_must_be_and_what_it_got(
    cell, setting, match
):
    with pytest.raises(ValueError, match=match):
        build_model(cell, 4, **setting)


@pytest.mark.parametrize(
    ("spec", "parsed", "model"),
    [
        ("gru", ("gru", None, False), bptt_jax.GRU(6)),
        ("bigru", ("gru", None, True), bptt_jax.Bidirectional(bptt_jax.GRU(6))),
        ("lstm:1", ("lstm", 1, False), bptt_jax.stacked(bptt_jax.LSTM(6), 1)),
        ("bilstm:2", ("lstm", 2, True), bptt_jax.stacked(bptt_jax.LSTM(6), 2, bidirectional=True)),
    ],
)
def test_a_spec_names_a_cell_or_a_model(spec, parsed, model):
    assert parse_spec(spec) == parsed
    assert from_spec(spec, 6) == model


@pytest.mark.parametrize("spec", ["rnn", "lstm:0", "lstm:02", "bi", "lstm:", "lstm:x", "gru:²"])
def test_a_bad_spec_says_what_a_spec_is(spec):
    with pytest.raises(ValueError, match=r"is not \[bi\]<cell>\[:<layers>\]"):
        parse_spec(spec)


def test_unknown_names_and_dropout_without_layers_are_refused():
    with pytest.raises(
        ValueError,
        match="cell must be one of elman, lstm, gru, mingru, minlstm, rglru, lru; got 'rnn'",
    ):
        build_model("rnn", 4)
    with pytest.raises(ValueError, match="dropout=0.1 applies between layers"):
        build_model("lstm", 4, dropout=0.1)
    assert cell_name(bptt_jax.Stack((bptt_jax.GRU(3),))) is None


def test_the_commands_build_their_models_from_the_registry():
    m = train_config.ModelConfig(cell="elman", activation="relu", num_layers=2, dropout=0.1)
    assert train_config.make_cell(m) == bptt_jax.stacked(
        bptt_jax.Elman(128, "relu"), 2, dropout=0.1
    )
    single = train_config.ModelConfig(cell="gru", bidirectional=True)  # a Stack, as ever
    assert train_config.make_cell(single) == bptt_jax.stacked(
        bptt_jax.GRU(128), 1, bidirectional=True
    )
    assert diagnose._make_cell("lstm", diagnose.Model()) == bptt_jax.LSTM(32, forget_bias=1.0)
    assert diagnose._make_cell("rglru", diagnose.Model()) == bptt_jax.RGLRU(32)
    linear = train_config.ModelConfig(cell="minlstm", num_layers=2, init="orthogonal")
    assert train_config.make_cell(linear) == bptt_jax.stacked(bptt_jax.MinLSTM(128), 2)
    rglru = train_config.ModelConfig(cell="rglru", scan="parallel", c=4.0)
    assert train_config.make_cell(rglru) == bptt_jax.RGLRU(128, c=4.0, scan="parallel")
