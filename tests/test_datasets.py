"""The real datasets of bptt_jax.datasets: shapes, splits, scaling, the missing-extra error,
and a few training steps on each that lower the loss.

scikit-learn and statsmodels are the ``data`` extra, part of the ``test`` extra.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bptt_jax
from bptt_jax import datasets


@pytest.fixture(scope="module")
def all_digits():
    """``(images (N, 8, 8) in [0, 1], labels (N,))`` straight from scikit-learn."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images / 16.0, d.target


@pytest.fixture(scope="module")
def rows():
    return datasets.digits("rows")


# ---------------------------------------------------------------------------- digits
def test_digits_shapes_dtypes_and_values(rows):
    train, test = rows
    assert train.xs.shape == (8, 1437, 8) and test.xs.shape == (8, 360, 8)
    assert train.xs.dtype == np.float32 and train.labels.dtype == np.int32
    assert train.labels.shape == (1437,) and len(test) == 360
    assert train.num_classes == test.num_classes == 10
    for part in rows:
        assert part.xs.min() == 0.0 and part.xs.max() == 1.0
        assert set(np.unique(part.labels)) == set(range(10))
    pixels = datasets.digits("pixels", dtype="float64")
    assert pixels.train.xs.shape == (64, 1437, 1) and pixels.train.xs.dtype == np.float64
    # the same images in the same order: pixel t is row t // 8, column t % 8
    for a, b in zip(rows, pixels):
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_allclose(b.xs[:, :, 0], a.xs.transpose(0, 2, 1).reshape(64, -1))


def test_digits_split_is_a_stratified_partition(rows, all_digits):
    images, labels = all_digits
    train, test = rows

    def keys(part):  # each image with its label, as bytes
        return [
            part.xs[:, i].astype(np.float64).tobytes() + bytes([part.labels[i]])
            for i in range(len(part))
        ]

    every = [images[i].tobytes() + bytes([labels[i]]) for i in range(len(labels))]
    assert sorted(keys(train) + keys(test)) == sorted(every)  # each image exactly once
    per_class = np.bincount(labels)
    # stratified: each class in the test part in proportion, to one image
    assert np.all(np.abs(np.bincount(test.labels) - 0.2 * per_class) <= 1)
    assert np.all(np.abs(np.bincount(train.labels) - 0.8 * per_class) <= 1)


def test_digits_split_is_seeded(rows):
    again = datasets.digits("rows", seed=0)
    other = datasets.digits("rows", seed=1, test_fraction=0.5)
    for a, b in zip(rows, again):
        np.testing.assert_array_equal(a.xs, b.xs)
        np.testing.assert_array_equal(a.labels, b.labels)
    assert len(other.test) == 899  # round up, as scikit-learn does
    assert not np.array_equal(other.test.labels, rows.test.labels[: len(other.test)])
    moved = datasets.digits("rows", seed=1)
    assert not np.array_equal(moved.test.xs, rows.test.xs)


def test_digits_batch(rows):
    b = rows.test.batch(np.array([3, 1]))
    assert b.xs.shape == (8, 2, 8) and b.targets.shape == (8, 2) and b.mask is None
    np.testing.assert_array_equal(b.targets, np.broadcast_to(rows.test.labels[[3, 1]], (8, 2)))
    np.testing.assert_array_equal(b.loss_mask[:, 0], np.arange(8) == 7)
    full = rows.train.batch(every_step=True)
    assert full.xs.shape == (8, 1437, 8) and full.loss_mask is None and full.resets is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"order": "columns"}, "order must be one of rows, pixels; got 'columns'"),
        ({"test_fraction": 0.0}, r"test_fraction must be in \(0, 1\); got 0.0"),
        ({"test_fraction": 1}, r"test_fraction must be in \(0, 1\); got 1"),
        ({"test_fraction": True}, r"test_fraction must be in \(0, 1\); got True"),
    ],
)
def test_digits_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        datasets.digits(**kwargs)
    with pytest.raises(TypeError, match="floating dtype; got int32"):
        datasets.digits(dtype="int32")


# ---------------------------------------------------------------------------- sunspots
def test_sunspots_chronological_split_scaled_on_the_train_years():
    from statsmodels.datasets import sunspots as sm_sunspots

    raw = sm_sunspots.load_pandas().data["SUNACTIVITY"].to_numpy()
    s = datasets.sunspots(test_years=40, dtype="float64")
    np.testing.assert_array_equal(s.years, np.arange(1700, 2009))
    assert s.years.dtype == np.int32 and s.values.dtype == np.float64
    assert s.n_train == 309 - 40 and s.test.shape == (40,) and s.train.shape == (269,)
    assert s.train_years[-1] + 1 == s.test_years[0] == 1969  # the test years come last
    # statistics of the train years only: the test years do not move them
    assert s.mean == pytest.approx(raw[:269].mean()) and s.std == pytest.approx(raw[:269].std())
    assert abs(s.train.mean()) < 1e-12 and s.train.std() == pytest.approx(1.0)
    np.testing.assert_allclose(s.values, (raw - s.mean) / s.std)
    np.testing.assert_allclose(s.raw(s.values), raw)
    assert datasets.sunspots().values.dtype == np.float32


def test_sunspots_one_step_streams():
    s = datasets.sunspots(test_years=50)
    train = s.one_step(s.n_train)
    assert train.xs.shape == train.targets.shape == (258, 1, 1) and train.loss_mask is None
    np.testing.assert_array_equal(train.targets[:-1], train.xs[1:])
    assert train.targets[-1, 0, 0] == s.train[-1]  # no test year in it
    test = s.one_step(count_from=s.n_train)
    assert test.xs.shape == (308, 1, 1) and test.loss_mask.shape == (308, 1)
    counted = test.targets[test.loss_mask]
    np.testing.assert_array_equal(counted[:, 0], s.test)
    with pytest.raises(ValueError, match=r"stop must be an int in \[2, 309\] or None; got 1"):
        s.one_step(1)
    with pytest.raises(ValueError, match=r"count_from must be an int in \[1, stop - 1\]"):
        s.one_step(10, count_from=10)


@pytest.mark.parametrize("bad", [0, 307, 2.5, True])
def test_sunspots_bad_test_years(bad):
    with pytest.raises(ValueError, match=r"test_years must be an int in \[1, 306\]"):
        datasets.sunspots(test_years=bad)


# ---------------------------------------------------------------------------- the extra
@pytest.mark.parametrize(
    "module, loader, package",
    [
        ("sklearn.datasets", datasets.digits, "scikit-learn"),
        ("sklearn.model_selection", datasets.digits, "scikit-learn"),
        ("statsmodels.datasets.sunspots", datasets.sunspots, "statsmodels"),
    ],
)
def test_a_missing_extra_names_it(monkeypatch, module, loader, package):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    with pytest.raises(ImportError) as e:
        loader()
    msg = str(e.value)
    assert f"needs {package}" in msg and "pip install 'bptt-jax[data]'" in msg, msg
    assert isinstance(e.value.__cause__, ImportError)


# ---------------------------------------------------------------------------- training
@pytest.fixture
def optax_promotion():
    """optax's adam computes ``b1 ** count`` (float ** int32), which the suite's strict dtype
    promotion rejects; users run with JAX's standard promotion, and so do these tests."""
    with jax.numpy_dtype_promotion("standard"):
        yield


@pytest.mark.usefixtures("optax_promotion")
def test_a_few_steps_on_the_digits_lower_the_loss(rows):
    cell = bptt_jax.GRU(8)
    k1, k2 = jax.random.split(jax.random.key(0))
    params = (cell.init(k1, 8), bptt_jax.init_readout(k2, 8, 10))
    b = rows.train.batch(slice(0, 200))
    opt = optax.adam(3e-2)

    def loss(p):
        return bptt_jax.sequence_loss(cell, *p, b.xs, b.targets, loss_mask=b.loss_mask)

    @jax.jit
    def step(p, state):
        value, g = jax.value_and_grad(loss)(p)
        updates, state = opt.update(g, state)
        return optax.apply_updates(p, updates), state, value

    state = opt.init(params)
    values = []
    for _ in range(15):
        params, state, value = step(params, state)
        values.append(float(value))
    assert values[0] == pytest.approx(np.log(10), abs=0.3)  # about chance at the start
    assert values[-1] < 0.7 * values[0], values


@pytest.mark.usefixtures("optax_promotion")
def test_a_few_tbptt_epochs_on_the_sunspots_lower_the_loss():
    s = datasets.sunspots(test_years=50)
    b = s.one_step(s.n_train)
    cell = bptt_jax.LSTM(8)
    k1, k2 = jax.random.split(jax.random.key(0))
    params, readout = cell.init(k1, 1), bptt_jax.init_readout(k2, 8, 1)
    opt = optax.adam(3e-2)

    def update(state, p, r, lg, window):
        updates, state = opt.update((lg.params, lg.readout), state)
        p, r = optax.apply_updates((p, r), updates)
        return state, p, r, lg.value

    @jax.jit
    def epoch(p, r, state):
        out = bptt_jax.tbptt(
            cell, p, r, b.xs, b.targets, k1=40, update=update, update_state=state, loss="mse"
        )
        return out.params, out.readout, out.update_state, jnp.mean(out.aux)

    state = opt.init((params, readout))
    losses = []
    for _ in range(6):
        params, readout, state, value = epoch(params, readout, state)
        losses.append(float(value))
    test = s.one_step(count_from=s.n_train)
    mse = bptt_jax.sequence_loss(
        cell, params, readout, test.xs, test.targets, loss="mse", loss_mask=test.loss_mask
    )
    assert losses[-1] < 0.5 * losses[0], losses
    assert float(mse) < 0.5  # the test years, standardized: predicting the mean gives ~1
