"""Real data shipped with packages: scikit-learn's handwritten digits, statsmodels' sunspots.

Nothing is downloaded: both datasets are files inside the installed packages, which are the
optional ``data`` extra (``pip install 'bptt-jax[data]'``: scikit-learn and statsmodels). They
are imported only when a loader is called; without them the loader raises an
:class:`ImportError` that names the extra.

* :func:`digits`: the 1797 8x8 images of ``sklearn.datasets.load_digits`` (10 classes) as
  time-major sequences, read one row per step (T = 8 steps of 8 pixels) or one pixel per step
  (T = 64 steps of 1 pixel), split into train and test parts stratified by class.
* :func:`sunspots`: the yearly sunspot numbers 1700-2008 of ``statsmodels.datasets.sunspots``,
  split in time (the last years are the test part) and standardized with the mean and
  standard deviation of the train part only.

Arrays are NumPy arrays on the host, time-major like every array of ``bptt_jax``: a
:class:`~bptt_jax.truncated.Batch` made from them goes straight into
:func:`bptt_jax.sequence_loss`, :func:`bptt_jax.loss_and_grads`, :func:`bptt_jax.tbptt` or a
trainer's step.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import NamedTuple

import numpy as np

from bptt_jax.truncated import Batch

#: What installs the packages the loaders read their data from.
EXTRA = "pip install 'bptt-jax[data]'"

DIGIT_ORDERS = ("rows", "pixels")


def _require(fn: str, module: str, package: str):
    """``importlib.import_module(module)``, or an ImportError naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{fn}: needs {package} (the 'data' extra), which is not installed: {EXTRA}",
            name=e.name,
        ) from e


def _float_dtype(fn: str, dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if not np.issubdtype(dt, np.floating):
        raise TypeError(f"{fn}: dtype must be a floating dtype; got {dt}")
    return dt


# ---------------------------------------------------------------------------- digits
@dataclasses.dataclass(frozen=True, eq=False)
class Sequences:
    """Labelled sequences: one class per sequence.

    Attributes:
      xs: ``(T, N, D)`` inputs, time-major.
      labels: ``(N,)`` int32 classes in ``[0, num_classes)``.
      num_classes: the number of classes.
    """

    xs: np.ndarray
    labels: np.ndarray
    num_classes: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, index=None, *, every_step: bool = False) -> Batch:
        """The sequences ``index`` (all for ``None``; an int array or a slice) as a
        :class:`~bptt_jax.truncated.Batch` for ``loss="xent"``.

        ``targets`` ``(T, n)`` repeats each sequence's label at every step. By default the
        loss counts the last step only (``loss_mask`` is True at ``T - 1``): a unidirectional
        model classifies a sequence once it has read all of it. ``every_step=True`` counts
        every step (``loss_mask`` ``None``), e.g. for a bidirectional model, whose output
        at every step has seen the whole sequence.
        """
        sel = slice(None) if index is None else index
        xs, labels = self.xs[:, sel], self.labels[sel]
        t, n = xs.shape[:2]
        targets = np.broadcast_to(labels[None, :], (t, n))
        last = None if every_step else np.broadcast_to((np.arange(t) == t - 1)[:, None], (t, n))
        return Batch(xs, targets, None, last, None)


class Split(NamedTuple):
    """A train part and a test part."""

    train: Sequences
    test: Sequences


def digits(
    order: str = "rows", test_fraction: float = 0.2, seed: int = 0, dtype="float32"
) -> Split:
    """The handwritten digits of ``sklearn.datasets.load_digits``, as sequences.

    1797 grey-scale images of 8x8 pixels (values 0 to 16, scaled here to ``[0, 1]``), ten
    classes (the digits 0 to 9, about 180 images each). An image is read as a sequence:

    * ``order="rows"``: T = 8 steps, one row of 8 pixels per step, ``xs`` ``(8, N, 8)``;
    * ``order="pixels"``: T = 64 steps, one pixel per step in reading order (row by row,
      left to right), ``xs`` ``(64, N, 1)``.

    The split is scikit-learn's ``train_test_split`` stratified by class (each part keeps
    the classes' proportions), shuffled by ``seed``: the same seed gives the same split.

    Args:
      order: ``"rows"`` or ``"pixels"``.
      test_fraction: the fraction of the images in the test part, in ``(0, 1)``.
      seed: the shuffle of the split.
      dtype: the dtype of ``xs`` (a floating dtype).

    Returns:
      ``Split(train, test)`` of :class:`Sequences` (1437 and 360 images by default).

    Raises:
      ImportError: scikit-learn is not installed (the message names the ``data`` extra).
      ValueError: an unknown ``order`` or a ``test_fraction`` outside ``(0, 1)``.

    Example:
      >>> from bptt_jax import datasets
      >>> train, test = datasets.digits("rows")
      >>> train.xs.shape, train.xs.dtype, train.labels.shape, len(test)
      ((8, 1437, 8), dtype('float32'), (1437,), 360)
      >>> datasets.digits("pixels").test.xs.shape
      (64, 360, 1)
      >>> b = test.batch(slice(0, 4))       # targets at every step, loss at the last one
      >>> b.targets.shape, b.loss_mask[:, 0].astype(int).tolist()
      ((8, 4), [0, 0, 0, 0, 0, 0, 0, 1])
    """
    fn = "digits"
    if order not in DIGIT_ORDERS:
        raise ValueError(f"{fn}: order must be one of {', '.join(DIGIT_ORDERS)}; got {order!r}")
    if isinstance(test_fraction, bool) or not 0 < test_fraction < 1:
        raise ValueError(f"{fn}: test_fraction must be in (0, 1); got {test_fraction!r}")
    dt = _float_dtype(fn, dtype)
    sk_data = _require(fn, "sklearn.datasets", "scikit-learn")
    sk_split = _require(fn, "sklearn.model_selection", "scikit-learn")
    data = sk_data.load_digits()
    images = np.asarray(data.images, np.float64) / 16.0  # (N, 8, 8), in [0, 1]
    labels = np.asarray(data.target, np.int32)
    n = images.shape[0]
    if order == "rows":
        xs = images.transpose(1, 0, 2)  # (8, N, 8): step t is row t
    else:
        xs = images.reshape(n, 64).T[..., None]  # (64, N, 1): row-major pixels
    xs = np.ascontiguousarray(xs, dt)
    train_idx, test_idx = sk_split.train_test_split(
        np.arange(n), test_size=test_fraction, random_state=seed, stratify=labels
    )
    k = int(labels.max()) + 1

    def part(idx):
        idx = np.sort(idx)  # the images in the dataset's order; the split is the shuffle
        return Sequences(np.ascontiguousarray(xs[:, idx]), labels[idx], k)

    return Split(part(train_idx), part(test_idx))


# ---------------------------------------------------------------------------- sunspots
@dataclasses.dataclass(frozen=True, eq=False)
class Series:
    """A yearly series, standardized and split in time.

    Attributes:
      years: ``(T,)`` int32, consecutive.
      values: ``(T,)`` the series standardized with the train part's statistics,
        ``(raw - mean) / std``.
      n_train: the first ``n_train`` years are the train part, the rest the test part.
      mean, std: the train part's mean and standard deviation, in the original units.
    """

    years: np.ndarray
    values: np.ndarray
    n_train: int
    mean: float
    std: float

    @property
    def train(self) -> np.ndarray:
        """``(n_train,)`` the standardized train part."""
        return self.values[: self.n_train]

    @property
    def test(self) -> np.ndarray:
        """``(T - n_train,)`` the standardized test part."""
        return self.values[self.n_train :]

    @property
    def train_years(self) -> np.ndarray:
        """``(n_train,)`` the years of the train part."""
        return self.years[: self.n_train]

    @property
    def test_years(self) -> np.ndarray:
        """``(T - n_train,)`` the years of the test part."""
        return self.years[self.n_train :]

    def raw(self, scaled):
        """Standardized values back in the original units: ``scaled * std + mean``."""
        return np.asarray(scaled) * self.std + self.mean

    def one_step(self, stop: int | None = None, *, count_from: int = 1) -> Batch:
        """One-step-ahead prediction over ``values[:stop]`` as one stream (``B = 1``), for
        ``loss="mse"``.

        ``xs[t] = values[t]`` and ``targets[t] = values[t + 1]`` for ``t < stop - 1``, shaped
        ``(stop - 1, 1, 1)`` (``stop=None``: the whole series). The loss counts only the
        steps whose target is ``values[i]`` with ``i >= count_from`` (``loss_mask``; ``None``
        when every step counts); the model still reads every year before them. So
        ``one_step(n_train)`` is the train years alone, and ``one_step(count_from=n_train)``
        reads the whole series and counts the test years only.

        Raises:
          ValueError: ``stop`` not in ``[2, T]`` or ``count_from`` not in ``[1, stop - 1]``.
        """
        t = self.values.shape[0]
        stop = t if stop is None else stop
        if isinstance(stop, bool) or not isinstance(stop, int | np.integer) or not 2 <= stop <= t:
            raise ValueError(f"one_step: stop must be an int in [2, {t}] or None; got {stop!r}")
        if (
            isinstance(count_from, bool)
            or not isinstance(count_from, int | np.integer)
            or not 1 <= count_from <= stop - 1
        ):
            raise ValueError(
                f"one_step: count_from must be an int in [1, stop - 1] = [1, {stop - 1}]; "
                f"got {count_from!r}"
            )
        v = self.values[:stop]
        counted = None
        if count_from > 1:
            counted = (np.arange(1, stop) >= count_from)[:, None]
        return Batch(v[:-1, None, None], v[1:, None, None], None, counted, None)


def sunspots(test_years: int = 50, dtype="float32") -> Series:
    """The yearly mean sunspot numbers 1700-2008 (``statsmodels.datasets.sunspots``).

    309 years of the mean total sunspot number (column ``SUNACTIVITY``), an about 11-year
    cycle of varying height. The split is chronological: the last ``test_years`` years are
    the test part, the years before them the train part; nothing is shuffled. The values
    are standardized with the mean and standard deviation of the train part only, so
    nothing about the test years leaks into the inputs.

    Args:
      test_years: the number of years in the test part, at least 1, leaving at least 3
        train years.
      dtype: the dtype of ``values`` (a floating dtype).

    Returns:
      A :class:`Series`.

    Raises:
      ImportError: statsmodels is not installed (the message names the ``data`` extra).
      ValueError: ``test_years`` out of range.

    Example:
      >>> from bptt_jax import datasets
      >>> s = datasets.sunspots(test_years=50)
      >>> int(s.years[0]), int(s.years[-1]), s.n_train, int(s.test_years[0])
      (1700, 2008, 259, 1959)
      >>> print(f"train mean {s.mean:.1f}, std {s.std:.1f}")   # scaled: mean 0, std 1
      train mean 46.3, std 37.8
      >>> b = s.one_step(s.n_train)          # inputs and targets in the train years
      >>> b.xs.shape, b.targets.shape
      ((258, 1, 1), (258, 1, 1))
      >>> b = s.one_step(count_from=s.n_train)   # every year read, the test years counted
      >>> b.xs.shape, int(b.loss_mask.sum())
      ((308, 1, 1), 50)
    """
    fn = "sunspots"
    dt = _float_dtype(fn, dtype)
    sm_sunspots = _require(fn, "statsmodels.datasets.sunspots", "statsmodels")
    frame = sm_sunspots.load_pandas().data
    raw = np.asarray(frame["SUNACTIVITY"], np.float64)
    years = np.asarray(frame["YEAR"]).astype(np.int32)
    t = raw.shape[0]
    if (
        isinstance(test_years, bool)
        or not isinstance(test_years, int | np.integer)
        or not 1 <= test_years <= t - 3
    ):
        raise ValueError(
            f"{fn}: test_years must be an int in [1, {t - 3}] (the series has {t} years); "
            f"got {test_years!r}"
        )
    n_train = t - int(test_years)
    mean, std = float(raw[:n_train].mean()), float(raw[:n_train].std())
    return Series(years, ((raw - mean) / std).astype(dt), n_train, mean, std)
