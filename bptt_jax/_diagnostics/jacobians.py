"""``||dh_T/d carry_t||_F`` of every cell of a model, and the effective horizon from it."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from bptt_jax import _engine as engine
from bptt_jax import validation
from bptt_jax._diagnostics.cells import PROBE_BATCH, CellRun, cell_keys, cell_runs, in_structure
from bptt_jax._diagnostics.horizon import batch_horizon, check_fraction
from bptt_jax.cells import protocol
from bptt_jax.models import is_bidirectional


def check_probes(fn: str, probes, key):
    """Check ``probes`` and return ``key`` as a PRNG key (an int seed is made one)."""
    validation.check_positive(fn, "probes", probes, kind=int, allow_none=True)
    if probes is not None and key is None:
        raise ValueError(
            f"{fn}: key is required with probes={probes} (random probes); pass "
            "key=jax.random.key(0), or probes=None for the exact norm"
        )
    return None if key is None else validation.check_key(fn, key)


def _squared_norm(dstate):
    """``sum ||g||^2`` per example over every part of a carry's error (h, and c for the LSTM)."""
    return sum(jnp.sum(g * g, axis=tuple(range(1, g.ndim))) for g in jax.tree.leaves(dstate))


def _probe_norms(run: CellRun, probes, steps, key):
    """``||dh_T/d carry_t||_F`` (T, B) of one cell, from its stored forward: one reverse scan
    per probe ``v`` on ``h_T`` (the error on carry t is ``v^T dh_T/d carry_t``, by hand)."""
    cell, (states, res) = run.cell, run.stored
    # (B, H) per carry part, in the carry's dtype (the states may be in a compute dtype)
    carries = engine.carries_of(states)
    zeros = jax.tree.map(lambda s, c: jnp.zeros(s.shape[1:], c.dtype), carries, run.carry0)
    dtype = jax.tree.leaves(run.carry0)[0].dtype  # the params'
    # the probe's size: the hidden state's, or the carry's where the outputs are not in it
    h = protocol.carry_vector(cell, jax.tree.map(lambda z: z[:1], zeros)).shape[-1]
    b = jax.tree.leaves(carries)[0].shape[1]
    if probes is None:  # the one-hot basis: the rows of every example's Jacobian
        vs = jnp.broadcast_to(jnp.eye(h, dtype=dtype)[:, None, :], (h, b, h))
    else:
        vs = jax.random.normal(key, (probes, b, h), dtype)
    flags = steps._replace(xs=None)  # the mask and resets

    def one_probe(v):  # v (B, H)
        dcarry = protocol.add_to_carry_vector(cell, zeros, v)
        _, _, sq = engine.scans(cell).reverse_scan(
            cell, run.params, flags, run.carry0, (states, res), (None, dcarry),
            engine.Backprop(keep_deltas=_squared_norm),
        )  # fmt: skip
        return sq  # (T, B)

    sq = lax.map(one_probe, vs, batch_size=min(vs.shape[0], PROBE_BATCH))  # (P, T, B)
    total = jnp.sum(sq, axis=0) if probes is None else jnp.mean(sq, axis=0)
    return jnp.sqrt(total)


def jacobians(model, probes, steps, runs, key):
    """:func:`_probe_norms` of every cell, in the model's structure; a reverse direction's,
    computed in its own time, put back in forward time."""
    idx = (
        engine.reversal(steps.mask, steps.xs.shape[0], steps.resets)
        if is_bidirectional(model)
        else None
    )
    out = []
    for run, k in zip(runs, cell_keys(model, key, len(runs))):
        norms = _probe_norms(run, probes, steps, k)
        out.append(engine.reverse_time(norms, idx) if run.reverse else norms)
    return in_structure(model, out)


@partial(jax.jit, static_argnums=(0, 1))
def _jacobian_norms(model, probes, params, steps, carry0, key):
    """One forward of the model (full BPTT's stored states), then each cell's probes."""
    saved = engine.model_forward(model, params, steps, carry0)[2]
    return jacobians(model, probes, steps, cell_runs(model, params, carry0, saved), key)


def jacobian_norms(
    model,
    params,
    xs,
    carry0=None,
    *,
    mask=None,
    resets=None,
    probes: int | None = None,
    key: jax.Array | None = None,
    compute_dtype=None,
) -> jax.Array:
    """``||dh_T/dh_t||_F`` for every step t and example: how much the last state hears of h_t.

    ``dh_T/dh_t`` is the Jacobian of the final hidden state with respect to a perturbation
    of the carry after step t: ``h_t`` for Elman and GRU (``(H, H)``), and for the LSTM both
    ``h_t`` and its memory ``c_t`` (``(H, 2H)``; the LSTM keeps what it remembers in ``c``,
    which a perturbation of ``h_t`` alone would miss). Its rows are what the hand-written
    backward carries back from a probe ``v`` on ``h_T``: the error on the carry at step t
    for the loss ``v . h_T``. It depends on the params and inputs only, not on a loss or
    readout. ``t = T-1`` gives ``||I|| = sqrt(H)`` (``h_T`` does not depend on ``c_T``).

    For a model (a :class:`~bptt_jax.Stack` or :class:`~bptt_jax.Bidirectional`), per layer
    and direction: each cell's ``||dh_T/d carry_t||_F`` for its own final state and its own
    carries, on the inputs it sees inside the model (the previous layer's outputs). A
    perturbation of a cell's carry reaches that cell's final state through its own recurrence
    only, so this is the whole derivative. For the reverse direction of a Bidirectional layer
    ``h_T`` is its final carry (its state after reading ``x_0``, PyTorch's ``h_n``) and ``t``
    the step in forward time (its state after reading ``x_t``): the norm grows from
    ``sqrt(H)`` at ``t = 0`` towards later steps. Layers take no dropout (evaluation).

    Args:
      model: a cell (:class:`~bptt_jax.Elman`, :class:`~bptt_jax.LSTM`,
        :class:`~bptt_jax.GRU`), a :class:`~bptt_jax.Stack` or a :class:`~bptt_jax.Bidirectional`.
      params, xs, carry0, mask, resets: as in :func:`bptt_jax.unroll`. With a mask, ``h_T``
        is each sequence's last valid state and padded steps pass it on unchanged (norm
        ``sqrt(H)`` there, in either direction); a reset at step t cuts every Jacobian
        across it to 0.
      probes: ``None`` (default): exact, with the ``H`` one-hot probes (``||J||_F^2`` is
        the sum of its squared rows), so H reverse scans. An int P: the Hutchinson estimate
        ``sqrt(mean_p ||v_p^T J||^2)`` with P Gaussian probes ``v_p ~ N(0, I)``, whose
        square is unbiased with relative standard deviation at most ``sqrt(2 / P)``; P
        reverse scans.
      key: PRNG key for the random probes (required when ``probes`` is an int). For a
        model, cell i (layer by layer, forward direction first) uses ``fold_in(key, i)``.
      compute_dtype: a precision policy (:mod:`bptt_jax.precision`), as in
        :func:`bptt_jax.unroll`: the Jacobians of the model as it runs under it.

    Returns:
      ``(T, B)`` in the params' dtype; for a model, one such array per cell in the model's
      structure: a tuple with one entry per layer for a Stack, a ``(forward, backward)``
      pair for a Bidirectional layer (both in forward time), like its params.

    Cost: one forward scan plus ``H`` (exact) or ``P`` reverse scans over the batch, run 16
    at a time under ``vmap`` (no weight-gradient matmuls); for a model, one forward of the
    model and each cell's reverse scans.

    Example:
      >>> import jax, bptt_jax
      >>> from bptt_jax.diagnostics import jacobian_norms
      >>> cell = bptt_jax.GRU(8)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> xs = jax.random.normal(jax.random.key(1), (20, 4, 3))
      >>> norms = jacobian_norms(cell, params, xs)
      >>> norms.shape, round(float(norms[-1, 0]) ** 2, 3)    # ||I||^2 = H at t = T-1
      ((20, 4), 8.0)
      >>> bi = bptt_jax.Bidirectional(cell)
      >>> fwd, bwd = jacobian_norms(bi, bi.init(jax.random.key(0), 3), xs)
      >>> fwd.shape, round(float(bwd[0, 0]) ** 2, 3)   # the reverse direction ends at t = 0
      ((20, 4), 8.0)
    """
    fn = "jacobian_norms"
    xs, carry0, mask, resets, _ = validation.check_model_args(
        fn, model, params, xs, carry0, mask, None, resets, compute_dtype
    )
    key = check_probes(fn, probes, key)
    return _jacobian_norms(model, probes, params, engine.Steps(xs, mask, resets), carry0, key)


def effective_horizon(
    model,
    params,
    xs,
    carry0=None,
    *,
    mask=None,
    resets=None,
    fraction: float = 0.01,
    probes: int | None = None,
    key: jax.Array | None = None,
    compute_dtype=None,
) -> jax.Array:
    """The number of steps back from T that the recurrence carries the error.

    ``horizon_from_norms(jacobian_norms(...).mean(axis=1), fraction)``: the batch-mean
    ``||dh_T/dh_t||_F``, counted back from the last step until it first falls below
    ``fraction`` of its running peak (see :func:`horizon_from_norms`); ``T`` if it never does,
    ``0`` if the norms are all zero, ``-1`` (:data:`UNDEFINED_HORIZON`) if one is NaN or inf.
    Meant for logging from a training loop on a small sub-batch with a few random probes.
    For a model, per layer and direction: the horizon of each cell's own Jacobian norms (see
    :func:`jacobian_norms`; for a reverse direction, the steps forward from ``t = 0`` that
    its final state hears of).

    Args:
      model, params, xs, carry0, mask, resets, probes, key, compute_dtype: as in
        :func:`jacobian_norms`.
      fraction: in ``(0, 1)``; default 0.01.

    Returns:
      int32 array ``()`` in ``[1, T]`` (``0``, ``-1``: see above); for a model, one per cell
      in the model's structure (as :func:`jacobian_norms`).

    Example:
      >>> import jax, bptt_jax
      >>> from bptt_jax.diagnostics import effective_horizon
      >>> cell = bptt_jax.Elman(16)
      >>> params = cell.init(jax.random.key(0), input_size=2)
      >>> xs = jax.random.normal(jax.random.key(1), (40, 4, 2))
      >>> int(effective_horizon(cell, params, xs, probes=8, key=jax.random.key(2))) < 40
      True
    """
    fraction = check_fraction("effective_horizon", fraction)
    norms = jacobian_norms(
        model, params, xs, carry0, mask=mask, resets=resets, probes=probes, key=key,
        compute_dtype=compute_dtype,
    )  # fmt: skip
    return jax.tree.map(lambda n: batch_horizon(n, fraction), norms)
