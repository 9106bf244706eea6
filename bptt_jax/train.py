"""Training with optax on the hand-written BPTT: the optimizer and the jit-compiled train step.

The gradients come from :func:`bptt_jax.losses.loss_and_grads` (the hand-written backward),
never from ``jax.grad``. One jit-compiled train step takes a :class:`TrainState` and a
:class:`~bptt_jax.truncated.Batch` and returns the new state and metrics:

* **full BPTT** (``k1=None``): one update over the whole batch;
* **TBPTT(k1, k2)**: ``ceil(T / k1)`` updates over the batch's windows (exact semantics in
  :mod:`bptt_jax.truncated`), one ``lax.scan`` with the optimizer update inside.

Either way the step starts from ``state.carry`` and returns the carry after the batch's last
step, so a stream's state survives across steps (``resets`` zero it where sequences start).
The optimizer is ``optax.chain(clipping, optimizer)``, optionally inside
``optax.apply_if_finite`` so a non-finite gradient skips the update and is counted. The loop
around the step that ``bptt-jax train`` runs (logs, evaluation, saved states, resuming) is
:func:`bptt_jax.cli.fit.fit`.

Example:
  >>> import jax, bptt_jax
  >>> from bptt_jax import tasks, train
  >>> task = tasks.AddingTask(seq_len=20)
  >>> t = train.trainer(bptt_jax.LSTM(16), train.OptimConfig(learning_rate=1e-2), loss="mse", k1=5)
  >>> state = t.init(jax.random.key(0), task.input_size, task.output_size, batch_size=8)
  >>> state, metrics = t.step(state, task.batch(state.key, 0, 8))
  >>> sorted(metrics), metrics["loss"].shape           # one entry per update: 20 / 5 = 4
  (['clipped', 'grad_norm', 'loss', 'skipped'], (4,))

References:
  Williams & Peng (1990) for TBPTT(k1, k2); Pascanu, Mikolov & Bengio, "On the difficulty of
  training recurrent neural networks", ICML 2013, for gradient clipping.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Callable
from dataclasses import field
from functools import lru_cache, partial
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bptt_jax import _engine as engine
from bptt_jax import losses, parallel, precision, truncated, validation
from bptt_jax.config import ConfigError, bounds, check_bounds
from bptt_jax.models import LearnedCarry, Stack, is_bidirectional
from bptt_jax.models import output_size as output_size_of
from bptt_jax.truncated import Batch

# ---------------------------------------------------------------------------- the optimizer
#: Optimizers with their own handling; any other optax alias taking ``learning_rate`` as its
#: first argument (``adamw``, ``lion``, ``nadam``, ...) is also accepted by name.
OPTIMIZERS = ("adam", "sgd", "adagrad", "rmsprop")
#: ``OptimConfig.clip``'s values.
CLIPS = ("global_norm", "value", "none")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Clipping and optimizer (table ``[optim]`` of ``bptt-jax train``)."""

    name: str = "adam"  # adam, sgd, adagrad, rmsprop, or another optax alias by name
    learning_rate: float = field(default=1e-3, metadata=bounds(gt=0, finite=True))
    momentum: float = field(  # sgd and rmsprop; 0 for none
        default=0.9,
        metadata=bounds(
            ge=0,
            lt=1,
            note="0: none; a momentum of 1 or more never forgets a gradient and diverges",
        ),
    )
    clip: Literal["global_norm", "value", "none"] = "global_norm"
    # global_norm: max global norm; value: max |g| per element
    max_norm: float = field(default=1.0, metadata=bounds(gt=0, finite=True))
    # optax.apply_if_finite: skip (and count) non-finite updates; an example whose carry is
    # non-finite then restarts from zeros, so one bad batch does not poison the stream
    skip_nonfinite: bool = True
    # after this many skips in a row, apply anyway
    max_consecutive_skips: int = field(default=100, metadata=bounds(gt=0))


def _optax_alias(name: str):
    """The optax optimizer ``name`` if it takes ``learning_rate`` first and its ``update``
    needs nothing but the gradients, state and params (the trainer passes no more; e.g.
    ``lbfgs`` needs the loss and its function, so it is not one); else ``None``."""
    fn = getattr(optax, name, None) if not name.startswith("_") else None
    if not callable(fn) or isinstance(fn, type):
        return None
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    if params[:1] != ["learning_rate"]:
        return None
    p = {"w": jax.ShapeDtypeStruct((2,), jnp.float32)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. noisy_sgd's note about its key
            opt = fn(1e-3)
            jax.eval_shape(lambda p: opt.update(p, opt.init(p), p), p)
    except Exception:  # noqa: BLE001 - any failure to trace one update: not usable here
        return None
    return fn


def check_optim(o: OptimConfig) -> None:
    """An :class:`OptimConfig`'s values; ``ConfigError`` (a ``ValueError``) naming the key.

    :func:`make_optimizer` runs it, so a config built in Python is checked as a file is."""
    check_bounds(o, "optim")
    if o.clip not in CLIPS:
        raise ConfigError(f"config: 'optim.clip' must be one of {', '.join(CLIPS)}; got {o.clip!r}")
    if o.name not in OPTIMIZERS and _optax_alias(o.name) is None:
        raise ConfigError(
            f"config: 'optim.name' must be one of {', '.join(OPTIMIZERS)} or an optax "
            f"optimizer taking learning_rate whose update needs only the gradients (e.g. "
            f"adamw, lion; not lbfgs); got {o.name!r}"
        )


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """``[apply_if_finite](chain(clip, optimizer))`` from an :class:`OptimConfig`.

    Clipping: ``"global_norm"`` rescales the whole gradient to global norm ``<= max_norm``
    (Pascanu et al. 2013); ``"value"`` clips every element to ``[-max_norm, max_norm]``;
    ``"none"``. Optimizer: ``adam``, ``sgd`` (with ``momentum``), ``adagrad``, ``rmsprop``
    (with ``momentum``), or any optax alias taking ``learning_rate`` first, by name.

    Example:
      >>> from bptt_jax.train import OptimConfig, make_optimizer
      >>> tx = make_optimizer(OptimConfig(name="sgd", learning_rate=0.1, clip="value"))
    """
    check_optim(cfg)
    lr, mom = cfg.learning_rate, (cfg.momentum or None)
    if cfg.name == "adam":
        opt = optax.adam(lr)
    elif cfg.name == "sgd":
        opt = optax.sgd(lr, momentum=mom)
    elif cfg.name == "adagrad":
        opt = optax.adagrad(lr)
    elif cfg.name == "rmsprop":
        opt = optax.rmsprop(lr, momentum=mom)
    else:
        alias = _optax_alias(cfg.name)
        if alias is None:
            raise ValueError(f"make_optimizer: unknown optimizer name {cfg.name!r}")
        opt = alias(lr)
    clip = {
        "global_norm": lambda: optax.clip_by_global_norm(cfg.max_norm),
        "value": lambda: optax.clip(cfg.max_norm),
        "none": optax.identity,
    }[cfg.clip]()
    tx = optax.chain(clip, opt)
    if cfg.skip_nonfinite:
        tx = optax.apply_if_finite(tx, cfg.max_consecutive_skips)
    return tx


# ---------------------------------------------------------------------------- the step
class TrainState(NamedTuple):
    """Everything a run needs to continue exactly: what a checkpoint holds."""

    params: Any  # the cell's params (ElmanParams / LSTMParams / GRUParams), or a model's
    readout: losses.ReadoutParams  # the output layer (w_hy (F, O), b_y (O,))
    opt_state: Any  # optax state of the pair (params, readout)
    carry: Any  # (B, H), LSTMCarry or a model's: the carry entering the next batch
    step: jax.Array  # int32 (): train steps (batches) done
    key: jax.Array  # PRNG key of the run's data: batch s is drawn from (key, s)


def skipped_updates(opt_state) -> jax.Array:
    """Total updates skipped by ``optax.apply_if_finite`` (0 without it)."""
    if isinstance(opt_state, optax.ApplyIfFiniteState):
        return opt_state.total_notfinite
    return jnp.zeros((), jnp.int32)


#: Folded into the run's key for the dropout masks (batch s: then folded with s).
DROPOUT_STREAM = 0x0D50

#: ``metrics_fn(params, readout, window, lg) -> dict`` adds metrics computed inside the jitted
#: step, per update, from the params before the update, the update's window (a
#: :class:`~bptt_jax.truncated.Batch`) and its :class:`~bptt_jax.losses.LossAndGrads`.
MetricsFn = Callable[[Any, Any, Batch, losses.LossAndGrads], dict]


class Trainer(NamedTuple):
    """What :func:`trainer` returns."""

    tx: optax.GradientTransformation  # the optimizer (clipping included)
    init: Callable[..., TrainState]  # init(key, input_size, output_size, batch_size, dtype)
    step: Callable[[TrainState, Batch], tuple[TrainState, dict]]  # jit-compiled
    mesh: jax.sharding.Mesh | None = None  # data parallelism: the batch split along data_axis
    data_axis: str | None = "data"  # None: the batch not split (a time-only mesh)
    time_axis: str | None = None  # sequence parallelism: each sequence's steps split along it

    def put_batch(self, batch: Batch) -> Batch:
        """A global batch ``(T, B, ...)`` split along ``B`` over the mesh (and along ``T``
        with ``time_axis``; unchanged without a mesh); each process places only its own
        devices' rows (:func:`parallel.put_global`)."""
        if self.mesh is None:
            return batch
        _check_split("Trainer.put_batch", np.shape(batch.xs), self.mesh, self.data_axis,
                     self.time_axis)  # fmt: skip
        sharding = parallel.batch_sharding(self.mesh, self.data_axis, self.time_axis)
        return parallel.put_global(batch, sharding)

    def state_sharding(self) -> TrainState | None:
        """The :class:`TrainState` of shardings (a prefix of the state): every field
        replicated but ``carry``, split along its batch axis; ``None`` without a mesh."""
        return None if self.mesh is None else _state_sharding(self.mesh, self.data_axis)


def _check_split(fn: str, shape, mesh, data_axis, time_axis) -> None:
    """A batch of ``shape`` (T, B, ...) splits evenly over the mesh's data and time axes."""
    if data_axis is not None:
        parallel.check_batch_size(fn, "batch.xs.shape[1] (B)", shape[1], mesh, data_axis)
    if time_axis is not None and shape[0] % mesh.shape[time_axis]:
        n = mesh.shape[time_axis]
        raise ValueError(
            f"{fn}: batch.xs.shape[0] (T) must be divisible by the {n} devices along mesh "
            f"axis {time_axis!r} (each device takes T / {n} steps); got {shape[0]}; pad the "
            f"sequences (with mask) to a multiple of {n}"
        )


def _state_sharding(mesh, axis: str | None) -> TrainState:
    rep = parallel.replicated(mesh)
    return TrainState(rep, rep, rep, parallel.carry_sharding(mesh, axis), rep, rep)


def trainer(
    cell,
    optim: OptimConfig = OptimConfig(),
    *,
    loss: str = "xent",
    reduction: str = "mean",
    k1: int | None = None,
    k2: int | None = None,
    metrics_fn: MetricsFn | None = None,
    mesh: jax.sharding.Mesh | None = None,
    data_axis: str = "data",
    compute_dtype=None,
    burn_in: int | None = None,
    time_axis: str | None = None,
) -> Trainer:
    """A jit-compiled train step for full BPTT (``k1=None``) or TBPTT(k1, k2).

    ``step(state, batch) -> (state, metrics)`` runs from ``state.carry`` over the batch
    ``(T, B, ...)``: one update (full BPTT) or ``ceil(T / k1)`` (TBPTT), each from the
    hand-written gradients of :func:`bptt_jax.losses.loss_and_grads`. ``metrics`` is a dict
    of ``(U,)`` arrays, one entry per update ``U``:

    * ``loss``: the update's loss (before the update);
    * ``grad_norm``: the global norm of its gradient, before clipping;
    * ``clipped``: whether clipping changed the gradient;
    * ``skipped``: total updates skipped so far by ``apply_if_finite`` (with
      ``optim.skip_nonfinite``; then an example whose carry came out non-finite also
      restarts from zeros, so one bad batch does not poison the rest of its stream);
    * whatever ``metrics_fn`` adds.

    A bidirectional model trains on independent sequences: every batch starts from the zero
    carry and ``batch.resets`` is not used (a carried stream is undefined for it), and TBPTT
    raises. A :class:`~bptt_jax.LearnedCarry` model trains on independent sequences too:
    every batch (and TBPTT's first window) starts from its learned carry (a reset at step 0
    is that start; later resets zero the carry). A
    :class:`~bptt_jax.Stack` with dropout draws batch s's masks (window j's with
    TBPTT) from ``state.key``, ``s`` (and ``j``), so runs stay deterministic.

    **Data parallelism** (``mesh``): the batch is split along ``B`` over the devices of the
    mesh's ``data_axis`` (:mod:`bptt_jax.parallel`), params, readout and optimizer state
    are replicated, and ``state.carry`` is split like the batch, so a stream's carry stays
    on the device of its examples from step to step. ``init`` places the state so and
    ``step`` is compiled with these shardings as its inputs' and outputs'; each device runs
    the scans over its own ``B / n`` examples and each gradient is summed over the devices
    once per update. The results are the single-device step's, up to the order of that sum.
    Give the step a batch placed by :meth:`Trainer.put_batch`.

    **Sequence parallelism** (``time_axis``, a model of linear cells): each sequence's steps
    are split along the mesh's ``time_axis`` too (e.g. :func:`bptt_jax.parallel.sequence_mesh`,
    whose ``data`` axis may have one device), as :func:`bptt_jax.unroll`'s ``time_axis``
    says; the carry of a stream is the same on every device along it. Full BPTT only.

    Args:
      cell: the cell or model (:class:`~bptt_jax.Stack`, :class:`~bptt_jax.Bidirectional`).
      optim: clipping and optimizer (:func:`make_optimizer`).
      loss, reduction: as in :func:`bptt_jax.sequence_loss` (per update).
      k1, k2: ``None`` for full BPTT, else TBPTT(k1, k2) (``k2=None``: k1).
      metrics_fn: extra per-update metrics (see :data:`MetricsFn`).
      mesh: a ``jax.sharding.Mesh`` with an axis ``data_axis`` (e.g.
        :func:`bptt_jax.parallel.data_mesh`), or ``None`` for one device.
      data_axis: the mesh axis the batch is split along (with ``time_axis``, a mesh without
        it leaves the batch whole on every device along time).
      time_axis: sequence parallelism: the mesh axis each sequence's steps are split along,
        or ``None``.
      compute_dtype: a precision policy (:mod:`bptt_jax.precision`), e.g. ``"bfloat16"``:
        the forward and backward compute in it while the params (the optimizer's master
        weights), carries and gradient sums stay in the params' dtype.
      burn_in: R2D2's burn-in for full BPTT (:func:`bptt_jax.sequence_loss`): each batch's
        first ``burn_in`` steps warm the carry (``state.carry``, a stored state) with no
        loss and no gradient. Refused with TBPTT (whose windows already start from a warm
        carry) and for a bidirectional model.

    Raises:
      ValueError: ``k1``/``k2`` not positive or ``k1 > k2`` (naming the argument); TBPTT for
        a bidirectional model; a mesh without ``data_axis``; with a mesh, a batch size (of
        ``init`` or of the step's batch) not divisible by the devices along ``data_axis``.
    """
    validation.check_model("trainer", cell, "cell")  # a cell of your own must be hashable
    validation.check_choice("trainer", "loss", loss, losses.LOSSES)
    validation.check_choice("trainer", "reduction", reduction, losses.REDUCTIONS)
    if metrics_fn is not None and not callable(metrics_fn):
        raise TypeError(f"trainer: metrics_fn must be callable or None; got {metrics_fn!r}")
    if k1 is not None:
        k1, k2 = truncated.check_k1_k2("trainer", k1, k2)
        if is_bidirectional(cell):
            raise ValueError(
                f"trainer: TBPTT (k1={k1}) is undefined for a bidirectional model (its reverse "
                "direction needs the whole future); use k1=None (full BPTT)"
            )
    elif k2 is not None:
        raise ValueError("trainer: k2 needs k1 (TBPTT(k1, k2)); got k1=None")
    if burn_in is not None:
        if isinstance(burn_in, bool) or not isinstance(burn_in, int) or burn_in < 1:
            raise ValueError(f"trainer: burn_in must be a positive int or None; got {burn_in!r}")
        if k1 is not None or is_bidirectional(cell):
            what = f"TBPTT (k1={k1})" if k1 is not None else "a bidirectional model"
            raise ValueError(
                f"trainer: burn_in={burn_in} cannot be combined with {what}: TBPTT's windows "
                "already start from the carry the window before left, and a reverse direction "
                "would read the burn-in steps last; use burn_in=None"
            )
    if time_axis is not None:
        if mesh is None:
            raise ValueError(
                f"trainer: time_axis={time_axis!r} needs a mesh with that axis "
                "(bptt_jax.parallel.sequence_mesh)"
            )
        parallel.axis_size("trainer", mesh, time_axis)
        inner = cell.model if isinstance(cell, LearnedCarry) else cell
        for c in engine.cells_of(inner):
            engine.check_cell("trainer", c, time_axis)
        if k1 is not None or burn_in is not None:
            what = f"TBPTT (k1={k1})" if k1 is not None else f"burn_in={burn_in}"
            raise ValueError(
                f"trainer: time_axis={time_axis!r} cannot be combined with {what}: the split "
                "runs full BPTT over each batch's sequence"
            )
        if data_axis not in mesh.axis_names:
            data_axis = None
    if mesh is not None and data_axis is not None:
        parallel.axis_size("trainer", mesh, data_axis)
    if compute_dtype is not None:  # a floating dtype; checked against the params' at step 1
        precision.resolve("trainer", compute_dtype, jnp.float64)
        compute_dtype = jnp.dtype(compute_dtype).name
    spec = _StepSpec(cell, optim, loss, reduction, k1, k2, metrics_fn, compute_dtype, burn_in,
                     time_axis)  # fmt: skip
    return _trainer(spec, mesh, data_axis)


class _StepSpec(NamedTuple):
    """What a train step computes (hashable: cells and configs are frozen dataclasses, so
    equal settings share one compiled step)."""

    cell: Any
    optim: OptimConfig
    loss: str
    reduction: str
    k1: int | None
    k2: int | None
    metrics_fn: Any
    compute_dtype: str | None
    burn_in: int | None = None
    time_axis: str | None = None


def _make_init(cell, tx: optax.GradientTransformation, mesh, data_axis: str):
    """The trainer's ``init(key, input_size, output_size, batch_size, dtype)``: a fresh
    :class:`TrainState`, placed on ``mesh`` (params replicated, the carry split) if given."""

    def make_state(key, input_size: int, output_size: int, batch_size: int, dtype=jnp.float32):
        k_cell, k_ro, k_data = jax.random.split(key, 3)
        params = cell.init(k_cell, input_size, dtype)
        readout = losses.init_readout(k_ro, output_size_of(cell), output_size, dtype)
        return TrainState(
            params=params,
            readout=readout,
            opt_state=tx.init((params, readout)),
            carry=cell.zero_carry(batch_size, dtype),
            step=jnp.zeros((), jnp.int32),
            key=k_data,
        )

    if mesh is None:
        init = make_state
    else:
        state_sharding = _state_sharding(mesh, data_axis)

        @partial(jax.jit, static_argnums=(1, 2, 3, 4, 5), out_shardings=state_sharding)
        def init_on_mesh(key_data, impl, input_size, output_size, batch_size, dtype):
            key = jax.random.wrap_key_data(key_data, impl=impl)
            return make_state(key, input_size, output_size, batch_size, dtype)

        def init(key, input_size: int, output_size: int, batch_size: int, dtype=jnp.float32):
            if data_axis is not None:
                parallel.check_batch_size("trainer.init", "batch_size", batch_size, mesh,
                                          data_axis)  # fmt: skip
            # the key as host data: the same in every process, an input of the mesh program
            key_data = np.asarray(jax.random.key_data(key))
            impl = jax.random.key_impl(key)
            return init_on_mesh(
                key_data, impl, input_size, output_size, batch_size, jnp.dtype(dtype)
            )

    return init


def _make_update(tx: optax.GradientTransformation, optim: OptimConfig, metrics_fn):
    """One update of the optimizer from a :class:`~bptt_jax.losses.LossAndGrads`, with its
    metrics: ``update(opt_state, params, readout, lg, window) -> (opt_state, params, readout,
    metrics)``."""

    def update(opt_state, params, readout, lg, window):
        grads = (lg.params, lg.readout)
        norm = optax.tree.norm(grads)
        if optim.clip == "global_norm":
            clipped = norm > optim.max_norm
        elif optim.clip == "value":
            leaves = jax.tree.leaves(grads)
            clipped = jnp.any(jnp.stack([jnp.any(jnp.abs(g) > optim.max_norm) for g in leaves]))
        else:
            clipped = jnp.zeros((), bool)
        updates, opt_state = tx.update(grads, opt_state, (params, readout))
        new_params, new_readout = optax.apply_updates((params, readout), updates)
        metrics = {
            "loss": lg.value,
            "grad_norm": norm,
            "clipped": clipped,
            "skipped": skipped_updates(opt_state),
        }
        if metrics_fn is not None:
            extra = metrics_fn(params, readout, window, lg)
            if not isinstance(extra, dict):
                raise TypeError(
                    f"trainer: metrics_fn must return a dict of metrics; got {type(extra).__name__}"
                )
            taken = sorted(set(extra) & set(metrics))
            if taken:
                raise ValueError(
                    f"trainer: metrics_fn returns {taken}, the trainer's own metrics' names; "
                    "name yours otherwise"
                )
            metrics.update(extra)
        return opt_state, new_params, new_readout, metrics

    return update


@lru_cache(maxsize=32)
def _trainer(spec: _StepSpec, mesh, data_axis: str) -> Trainer:
    """:func:`trainer`, cached: equal arguments share one compiled step."""
    tx = make_optimizer(spec.optim)
    init = _make_init(spec.cell, tx, mesh, data_axis)
    step = _make_step(spec, _make_update(tx, spec.optim, spec.metrics_fn))
    bidirectional = is_bidirectional(spec.cell)
    if mesh is None:
        checked = _CheckedStep(jax.jit(step), None, data_axis, spec.loss, bidirectional)
        return Trainer(tx, init, checked)
    batch = parallel.batch_sharding(mesh, data_axis, spec.time_axis)
    shardings = (_state_sharding(mesh, data_axis), batch)
    step_on_mesh = jax.jit(
        step, in_shardings=shardings, out_shardings=(shardings[0], parallel.replicated(mesh))
    )
    checked = _CheckedStep(step_on_mesh, mesh, data_axis, spec.loss, bidirectional,
                           spec.time_axis)  # fmt: skip
    return Trainer(tx, init, checked, mesh, data_axis, spec.time_axis)


def _make_step(spec: _StepSpec, update):
    """The train step of ``spec``: one update over the batch (full BPTT) or ``tbptt``'s
    updates over its windows, from ``state.carry``."""
    cell = spec.cell
    bidirectional = is_bidirectional(cell)
    # a LearnedCarry starts every batch from its learned carry (independent sequences)
    fresh = bidirectional or isinstance(cell, LearnedCarry)
    dropout = isinstance(cell, Stack) and cell.dropout > 0
    options = dict(loss=spec.loss, reduction=spec.reduction, compute_dtype=spec.compute_dtype)

    learned = isinstance(cell, LearnedCarry)

    def step(state: TrainState, batch: Batch):
        resets = None if bidirectional else batch.resets
        if learned and resets is not None:  # step 0 starts from the learned carry already
            resets = resets.at[0].set(False)
        kw = dict(options, mask=batch.mask, loss_mask=batch.loss_mask, resets=resets)
        if dropout:  # its own stream, apart from the data's (key, s)
            key = jax.random.fold_in(jax.random.fold_in(state.key, DROPOUT_STREAM), state.step)
            kw["dropout_key"] = key
        p, ro = state.params, state.readout
        if spec.k1 is None:
            carry0 = None if fresh else state.carry
            lg = losses.loss_and_grads(cell, p, ro, batch.xs, batch.targets, carry0,
                                       burn_in=spec.burn_in, time_axis=spec.time_axis,
                                       **kw)  # fmt: skip
            opt_state, params, readout, metrics = update(state.opt_state, p, ro, lg, batch)
            carry = lg.carry
            metrics = jax.tree.map(lambda x: x[None], metrics)
        else:
            out = truncated.tbptt(
                cell, p, ro, batch.xs, batch.targets, None if fresh else state.carry,
                k1=spec.k1, k2=spec.k2,
                update=update, update_state=state.opt_state, **kw,
            )  # fmt: skip
            opt_state, params, readout, carry, metrics = out
        if spec.optim.skip_nonfinite:  # a skipped update's NaN carry would poison the stream
            carry = _reset_nonfinite_rows(carry)
        new = TrainState(params, readout, opt_state, carry, state.step + 1, state.key)
        return new, metrics

    return step


def _reset_nonfinite_rows(carry):
    """``carry`` with every example (row) that holds a non-finite value anywhere reset to
    zeros, as a stream's reset would: the rest of the stream stays finite."""
    leaves = jax.tree.leaves(carry)
    if not leaves:
        return carry
    bad = jnp.zeros(leaves[0].shape[:1], bool)
    for x in leaves:
        bad = bad | ~jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1)
    return jax.tree.map(
        lambda x: jnp.where(bad.reshape((-1,) + (1,) * (x.ndim - 1)), jnp.zeros_like(x), x), carry
    )


class _CheckedStep(NamedTuple):
    """The jitted train step behind the checks that need the batch's values or its placement:
    with a mesh, the batch's size (else jit's placement would fail first, without naming
    it); when the batch is host (NumPy) data, the values of its masks (0/1; a bidirectional
    model's ``mask`` right-padded) and, for ``loss="xent"``, targets in ``[0, O)`` where
    counted (inside ``jit`` each is unseen: a silently wrong gradient, or a NaN loss and a
    skipped update). Device arrays are not read back (that would wait for the device at
    every step): ``bptt_jax.checked(trainer.step)`` checks them in the compiled step."""

    jitted: Any  # jax.jit(step[, in_shardings=..., out_shardings=...])
    mesh: jax.sharding.Mesh | None
    axis: str | None
    loss: str
    bidirectional: bool = False
    time_axis: str | None = None

    def _check(self, state: TrainState, batch: Batch) -> None:
        fn = "trainer.step"
        if self.mesh is not None:
            _check_split(fn, np.shape(batch.xs), self.mesh, self.axis, self.time_axis)
        for name in ("mask", "loss_mask", "resets"):
            m = getattr(batch, name)
            if isinstance(m, np.ndarray) and m.ndim == 2:  # (other shapes: the step says)
                if m.dtype != np.bool_:
                    validation.check_flag_values(fn, f"batch.{name}", m)
                if name == "mask" and self.bidirectional:
                    validation.check_right_padded(fn, m != 0)
        masks = [m for m in (batch.mask, batch.loss_mask) if m is not None]
        host = all(isinstance(a, np.ndarray) for a in (batch.targets, *masks))
        if self.loss == "xent" and host and np.issubdtype(batch.targets.dtype, np.integer):
            valid = np.logical_and.reduce([m != 0 for m in masks]) if masks else None
            o = np.shape(state.readout.w_hy)[-1]
            validation.check_class_range("trainer.step", "batch.targets", batch.targets, o, valid)

    def __call__(self, state: TrainState, batch: Batch):
        self._check(state, batch)
        return self.jitted(state, batch)

    def lower(self, state: TrainState, batch: Batch):
        """``jax.jit``'s ``lower`` (e.g. ``.compile().as_text()`` to read the program)."""
        self._check(state, batch)
        return self.jitted.lower(state, batch)
