"""Built-in training tasks: the adding problem, delayed recall, a character-level LM.

Every task is a frozen dataclass built from its config table (see :func:`make_task`) that
offers the same face to the trainer in :mod:`bptt_jax.train`:

* ``input_size``, ``output_size``, ``loss`` (``"xent"`` or ``"mse"``), ``seq_len``;
* ``batch(key, step, batch_size) -> Batch``: the time-major batch for one train step, a pure
  (jit-able) function of ``(key, step)``, so a run is deterministic given its seed and a
  resumed run sees exactly the data an uninterrupted one would;
* ``evaluate(cell, params, readout) -> dict``: metrics on held-out data (fixed per task).

Stateless tasks (adding) set ``resets`` on step 0 of every batch, so the carry the train step
passes on is zeroed; stream tasks (recall, charlm) continue each example's stream from the
carry of the previous step and reset it only where a new document starts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bptt_jax import _engine as engine
from bptt_jax import losses
from bptt_jax.config import ConfigError, bounds, check_bounds
from bptt_jax.truncated import Batch


# ---------------------------------------------------------------------------- configs
@dataclasses.dataclass(frozen=True)
class AddingConfig:
    """The adding problem (table ``[adding]``)."""

    seq_len: int = field(default=100, metadata=bounds(ge=2))  # T
    test_size: int = field(default=1000, metadata=bounds(gt=0))  # sequences in the test set


@dataclasses.dataclass(frozen=True)
class RecallConfig:
    """Delayed recall on a stream (table ``[recall]``)."""

    seq_len: int = field(default=50, metadata=bounds(gt=0))  # steps per train step
    # d: the target at step t is the symbol seen at step t - d
    delay: int = field(default=10, metadata=bounds(gt=0))
    alphabet: int = field(default=8, metadata=bounds(ge=2))  # K symbols
    test_len: int = 400  # steps of the fixed test stream (> delay)
    test_size: int = field(default=128, metadata=bounds(gt=0))  # streams in the test set


@dataclasses.dataclass(frozen=True)
class CharLMConfig:
    """Character-level language model on a UTF-8 corpus (table ``[charlm]``)."""

    corpus: str = ""  # path to a UTF-8 text file; "" for the prose of pydoc_data.topics
    seq_len: int = field(default=100, metadata=bounds(gt=0))  # characters per train step
    # the corpus's tail held out for evaluation
    valid_fraction: float = field(
        default=0.05, metadata=bounds(gt=0, lt=1, note="the held-out tail the evaluations read")
    )
    eval_len: int = field(default=500, metadata=bounds(gt=0))  # characters per evaluation stream
    eval_streams: int = field(default=16, metadata=bounds(gt=0))  # evaluation streams
    sample_len: int = field(default=300, metadata=bounds(ge=0))  # generated at each evaluation
    prime: str = "The "  # text the sampler starts from
    temperature: float = field(default=0.8, metadata=bounds(ge=0))  # sampling temperature


def _one_hot(ids, n: int, dtype):
    return (ids[..., None].astype(jnp.int32) == jnp.arange(n, dtype=jnp.int32)).astype(dtype)


# ---------------------------------------------------------------------------- adding
@dataclasses.dataclass(frozen=True)
class AddingTask:
    """The adding problem (Hochreiter & Schmidhuber 1997; Le, Jaitly & Hinton 2015).

    Input ``(T, B, 2)``: channel 0 holds values ``U(0, 1)``, channel 1 marks two positions
    (one in the first half, one in the second half of the sequence) with 1. The target, read
    at the last step only (``loss_mask``), is the sum of the two marked values; the loss is
    MSE. Predicting the mean sum 1.0 gives MSE ``2 * Var(U(0,1)) = 1/6 ~ 0.167``.

    References:
      Hochreiter & Schmidhuber, "Long short-term memory", 1997;
      Le, Jaitly & Hinton, "A simple way to initialize recurrent networks of rectified linear
      units", 2015.
    """

    seq_len: int = 100
    test_size: int = 1000
    dtype: str = "float32"

    input_size = 2
    output_size = 1
    loss = "mse"
    baseline = 1.0 / 6.0

    def sequences(self, key, batch_size: int) -> Batch:
        """``batch_size`` fresh sequences from ``key``."""
        t, dt = self.seq_len, jnp.dtype(self.dtype)
        k_val, k1, k2 = jax.random.split(key, 3)
        values = jax.random.uniform(k_val, (t, batch_size), dt)
        half = t // 2
        i1 = jax.random.randint(k1, (batch_size,), 0, half)
        i2 = jax.random.randint(k2, (batch_size,), half, t)
        steps = jnp.arange(t)[:, None]
        marks = (steps == i1) | (steps == i2)
        xs = jnp.stack([values, marks.astype(dt)], axis=-1)
        total = jnp.sum(jnp.where(marks, values, 0), axis=0)  # (B,)
        targets = jnp.broadcast_to(total[None, :, None], (t, batch_size, 1))
        last = jnp.broadcast_to(steps == t - 1, (t, batch_size))
        first = jnp.broadcast_to(steps == 0, (t, batch_size))
        return Batch(xs, targets, None, last, first)

    def batch(self, key, step, batch_size: int) -> Batch:
        return self.sequences(jax.random.fold_in(key, step), batch_size)

    def test_set(self) -> Batch:
        return self.sequences(jax.random.key(2**31 - 1), self.test_size)

    def evaluate(self, cell, params, readout) -> dict:
        b = self.test_set()
        mse = losses.sequence_loss(
            cell, params, readout, b.xs, b.targets, loss="mse", loss_mask=b.loss_mask
        )
        return {"mse": float(mse), "baseline_mse": self.baseline}


# ---------------------------------------------------------------------------- recall
@dataclasses.dataclass(frozen=True)
class RecallTask:
    """Delayed recall: at every step, output the symbol that came in ``delay`` steps ago.

    A stream of symbols drawn uniformly from ``alphabet`` K, one-hot ``(T, B, K)``; the target
    at stream position p is the symbol at position ``p - d`` (no loss for ``p < d``). The
    stream runs on across train steps (the carry is passed on). Solving it needs a gradient
    path of d steps from each loss to its input, so TBPTT(k1, k2) with ``k2 <= d`` stays at
    chance (loss ``ln K``, accuracy ``1/K``) while ``k2 > d`` learns it: the truncation
    length visibly matters.
    """

    seq_len: int = 50
    delay: int = 10
    alphabet: int = 8
    test_len: int = 400
    test_size: int = 128
    dtype: str = "float32"

    loss = "xent"

    @property
    def input_size(self) -> int:
        return self.alphabet

    @property
    def output_size(self) -> int:
        return self.alphabet

    def _symbols(self, key, chunk, batch_size):
        return jax.random.randint(
            jax.random.fold_in(key, chunk), (self.seq_len, batch_size), 0, self.alphabet
        )

    def batch(self, key, step, batch_size: int) -> Batch:
        t, d = self.seq_len, self.delay
        prev = self._symbols(key, step, batch_size)  # chunk `step - 1`, shifted by one
        cur = self._symbols(key, step + 1, batch_size)
        targets = jnp.concatenate([prev[t - d :], cur[: t - d]], axis=0)
        pos = step * t + jnp.arange(t)[:, None]
        counted = jnp.broadcast_to(pos >= d, (t, batch_size))
        xs = _one_hot(cur, self.alphabet, jnp.dtype(self.dtype))
        return Batch(xs, targets.astype(jnp.int32), None, counted, None)

    def evaluate(self, cell, params, readout) -> dict:
        key = jax.random.key(2**31 - 1)
        syms = jax.random.randint(key, (self.test_len, self.test_size), 0, self.alphabet)
        xs = _one_hot(syms, self.alphabet, jnp.dtype(self.dtype))
        d = self.delay
        targets = jnp.concatenate([syms[:d], syms[:-d]], axis=0).astype(jnp.int32)
        counted = jnp.broadcast_to(jnp.arange(self.test_len)[:, None] >= d, syms.shape)
        hs, _ = engine.unroll(cell, params, xs)
        logits = hs @ readout.w_hy + readout.b_y
        xent = losses.sequence_loss(cell, params, readout, xs, targets, loss_mask=counted)
        acc = jnp.sum((jnp.argmax(logits, -1) == targets) & counted) / jnp.sum(counted)
        return {"xent": float(xent), "accuracy": float(acc), "chance": 1.0 / self.alphabet}


# ---------------------------------------------------------------------------- charlm
def read_corpus(path: str | Path | None = None) -> list[str]:
    """The documents of a corpus: a UTF-8 file (one document) or, for ``None``/``""``, the
    prose of Python's own documentation topics (``pydoc_data.topics``, no download).

    Raises:
      ConfigError: the file is missing, a directory, unreadable, not UTF-8 or empty (naming
        ``charlm.corpus``).
    """
    if not path:
        from pydoc_data.topics import topics

        return [topics[k] for k in sorted(topics)]
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(
            f"config: 'charlm.corpus' {str(path)!r} is a directory; give a UTF-8 text file"
        )
    if not p.exists():
        raise ConfigError(f"config: 'charlm.corpus' file {str(path)!r} does not exist")
    if not p.is_file():
        raise ConfigError(
            f"config: 'charlm.corpus' {str(path)!r} is not a regular file; give a UTF-8 text file"
        )
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config: 'charlm.corpus' file {str(path)!r} is not UTF-8: {e}") from None
    except OSError as e:
        raise ConfigError(f"config: 'charlm.corpus' file {str(path)!r} unreadable: {e}") from None
    if len(text) < 2:
        raise ConfigError(f"config: 'charlm.corpus' file {str(path)!r} has < 2 characters")
    return [text]


@dataclasses.dataclass(frozen=True, eq=False)
class CharLMTask:
    """Next-character prediction on a corpus read by ``B`` parallel streams.

    The corpus (documents concatenated) is split into a training part and a held-out tail
    (``valid_fraction``). Reader b starts at a random offset (from the run's key) and reads on
    by ``seq_len`` characters per train step, wrapping around at the end; the carry is passed
    on from step to step. ``resets`` zeroes the carry where a document starts, and the
    prediction of a document's first character from the previous document's last is not
    counted (``loss_mask``). Inputs are one-hot ``(T, B, V)`` over the corpus's characters.
    """

    corpus: str = ""
    seq_len: int = 100
    valid_fraction: float = 0.05
    eval_len: int = 500
    eval_streams: int = 16
    sample_len: int = 300
    prime: str = "The "
    temperature: float = 0.8
    dtype: str = "float32"

    loss = "xent"

    def __post_init__(self):
        docs = read_corpus(self.corpus)
        text = "".join(docs)
        vocab = sorted(set(text))
        index = {c: i for i, c in enumerate(vocab)}
        ids = np.fromiter((index[c] for c in text), np.int32, len(text))
        starts = np.zeros(len(text), bool)
        np.put(starts, np.cumsum([0] + [len(d) for d in docs[:-1]]), True)
        n_valid = int(len(text) * self.valid_fraction)
        n_train = len(text) - n_valid
        if n_train < self.seq_len + 1 or (self.valid_fraction > 0 and n_valid < 2):
            raise ConfigError(
                f"config: 'charlm.corpus' has {len(text)} characters: too few for "
                f"seq_len={self.seq_len} and valid_fraction={self.valid_fraction}"
            )
        bad = [c for c in self.prime if c not in index]
        if bad:
            raise ConfigError(f"config: 'charlm.prime' has characters not in the corpus: {bad}")
        object.__setattr__(self, "vocab", "".join(vocab))
        object.__setattr__(self, "_ids", ids)
        object.__setattr__(self, "_starts", starts)
        object.__setattr__(self, "n_train", n_train)

    @property
    def input_size(self) -> int:
        return len(self.vocab)

    @property
    def output_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> np.ndarray:
        return np.array([self.vocab.index(c) for c in text], np.int32)

    def decode(self, ids) -> str:
        return "".join(self.vocab[int(i)] for i in np.asarray(ids))

    def _read(self, ids, starts, pos, n):
        """Inputs, targets, resets and loss mask at positions ``pos`` of a text of length n."""
        nxt = (pos + 1) % n
        xs = _one_hot(ids[pos], self.input_size, jnp.dtype(self.dtype))
        counted = ~starts[nxt]  # no loss for predicting a document's first character
        return xs, ids[nxt], counted, starts[pos]

    def batch(self, key, step, batch_size: int) -> Batch:
        n = self.n_train
        ids, starts = jnp.asarray(self._ids[:n]), jnp.asarray(self._starts[:n])
        offsets = jax.random.randint(jax.random.fold_in(key, 0), (batch_size,), 0, n)
        pos = (offsets[None, :] + step * self.seq_len + jnp.arange(self.seq_len)[:, None]) % n
        xs, targets, counted, resets = self._read(ids, starts, pos, n)
        return Batch(xs, targets, None, counted, resets)

    def evaluate(self, cell, params, readout) -> dict:
        """Mean cross-entropy (nats and bits per character) on the held-out tail."""
        if len(self._ids) - self.n_train < 2:
            raise ValueError(
                f"CharLMTask.evaluate: no held-out text to evaluate on (valid_fraction="
                f"{self.valid_fraction}); build the task with valid_fraction > 0"
            )
        ids = jnp.asarray(self._ids[self.n_train :])
        starts = jnp.asarray(self._starts[self.n_train :])
        n = ids.shape[0]
        length = min(self.eval_len, n - 1)
        offsets = jnp.asarray(np.linspace(0, n - 1 - length, self.eval_streams).astype(np.int32))
        pos = offsets[None, :] + jnp.arange(length)[:, None]
        xs, targets, counted, resets = self._read(ids, starts, pos, n)
        xent = losses.sequence_loss(
            cell, params, readout, xs, targets, loss_mask=counted, resets=resets
        )
        return {"xent": float(xent), "bpc": float(xent) / math.log(2)}

    def sample(self, cell, params, readout, key, length=None, prime=None, temperature=None):
        """Generate text from the model: read ``prime``, then sample ``length`` characters."""
        prime = self.prime if prime is None else prime
        ids = sample(
            cell,
            params,
            readout,
            key,
            self.encode(prime),
            self.sample_len if length is None else length,
            self.temperature if temperature is None else temperature,
        )
        return prime + self.decode(ids)


def sample(cell, params, readout, key, prime_ids, length: int, temperature: float = 1.0):
    """Sample ``length`` tokens from a model over one-hot inputs, forward only.

    The prime (``(P,)`` token ids, ``P >= 1``) is read with :func:`bptt_jax.unroll`; then each
    step draws ``token ~ softmax(y_t / temperature)`` and feeds it back with ``cell.step``
    (``temperature=0``: argmax). Returns the ``(length,)`` sampled ids.

    Example:
      >>> import jax, jax.numpy as jnp, bptt_jax
      >>> from bptt_jax.tasks import sample
      >>> cell = bptt_jax.GRU(16)
      >>> params = cell.init(jax.random.key(0), 5)
      >>> ro = bptt_jax.init_readout(jax.random.key(1), 16, 5)
      >>> sample(cell, params, ro, jax.random.key(2), jnp.array([0, 3]), 7).shape
      (7,)
    """
    dtype = readout.w_hy.dtype
    v = readout.w_hy.shape[1]
    prime_ids = jnp.asarray(prime_ids, jnp.int32)
    if prime_ids.shape[0] > 1:  # read all but the last prime token; that one is fed below
        _, carry = engine.unroll(cell, params, _one_hot(prime_ids[:-1, None], v, dtype))
    else:
        carry = cell.zero_carry(1, dtype)

    def step(state, k):
        carry, tok = state
        carry, h = cell.step(params, carry, _one_hot(tok, v, dtype))
        logits = (h @ readout.w_hy + readout.b_y)[0]
        if temperature > 0:
            nxt = jax.random.categorical(k, logits / jnp.asarray(temperature, dtype))
        else:
            nxt = jnp.argmax(logits)
        return (carry, nxt[None].astype(jnp.int32)), nxt

    keys = jax.random.split(key, length)
    _, out = lax.scan(step, (carry, prime_ids[-1:]), keys)
    return out


# ---------------------------------------------------------------------------- registry
TASKS = {"adding": AddingTask, "recall": RecallTask, "charlm": CharLMTask}


def check_task_config(name: str, cfg) -> None:
    """A task's config table: the bounds on its fields, then what relates two of them;
    ``ConfigError`` naming the key."""
    check_bounds(cfg, name)
    if name == "recall":
        if cfg.delay >= cfg.seq_len:
            raise ConfigError(
                f"config: 'recall.delay' ({cfg.delay}) must be < 'recall.seq_len' ({cfg.seq_len})"
            )
        if cfg.test_len <= cfg.delay:
            raise ConfigError(
                f"config: 'recall.test_len' ({cfg.test_len}) must be > 'recall.delay' ({cfg.delay})"
            )
    elif name == "charlm" and not cfg.prime:
        raise ConfigError("config: 'charlm.prime' must not be empty")


def make_task(name: str, cfg, dtype: str = "float32"):
    """The task ``name`` (``"adding"``, ``"recall"``, ``"charlm"``) from its config table.

    Raises:
      ConfigError: a value out of range or a missing corpus file, naming the key.
    """
    if name not in TASKS:
        raise ConfigError(f"config: 'task' must be one of {', '.join(TASKS)}; got {name!r}")
    check_task_config(name, cfg)
    return TASKS[name](**dataclasses.asdict(cfg), dtype=dtype)
