"""Episodes and packed sequences: the engine's ``resets`` and ``mask`` from what users have.

Two kinds of batch rows hold more than one sequence:

* **Rollouts** of a reinforcement-learning agent, where episodes end mid-row. Environments
  return a done flag per step, ``dones[t, b]`` true when the episode *ended at* step t (the
  observation at t was the episode's last; the one at t + 1 starts a new episode). The
  recurrent state must then be fresh for step t + 1: the engine's ``resets[t + 1]`` (the
  carry entering step t + 1 is zeros), **one step after the done**. Getting this shift wrong
  by one, in either direction, is the commonest bug of recurrent agents: the state either
  leaks the old episode into the new one's first step, or is wiped one step early.
  :func:`resets_from_dones` does the shift, and carries it across windows (a done at the
  last step of one window resets the first step of the next)::

      step t        0  1  2  3  4  5 | 6  7  (next window)
      dones[t]      0  0  1  0  0  1 | 0  0
      resets[t]     0  0  0  1  0  0 | 1  0      <- resets[t] = dones[t - 1]
      episode       A  A  A  B  B  B | C  C

* **Packed** language or time-series data: several documents one after the other in a row,
  each with its segment id, ``ids[t, b]`` (1, 2, 3, ... along the row, 0 for padding after
  the last, as Flax and T5X pack). :func:`from_segment_ids` gives the resets (the carry
  entering each document's first step is zeros, so no state crosses from one document to the
  next, nor does the error on it in the backward) and the mask (the padding)::

      step t        0  1  2  3  4  5  6  7
      ids[t]        1  1  1  2  2  3  0  0
      resets[t]     0  0  0  1  0  1  0  0
      mask[t]       1  1  1  1  1  1  0  0

  Pass both to any loss or :func:`~bptt_jax.unroll`; a :class:`~bptt_jax.Bidirectional`
  model then reverses each document on its own, not the row.

Each document (episode) of a row then gets the outputs, final state and gradients it would
get alone, starting from zeros (the first from the carry given, ``carry0``): what
``tests/test_streams.py`` checks for every cell, model kind and schedule.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bptt_jax import checking
from bptt_jax._validation_arrays import as_array, concrete, shape_of


class Packing(NamedTuple):
    """What :func:`from_segment_ids` returns: pass both to a loss or :func:`~bptt_jax.unroll`."""

    resets: jax.Array  # (T, B) bool: a document starts at step t (not the row's first)
    mask: jax.Array  # (T, B) bool: the steps of a document (not padding)


def _flags(fn: str, name: str, x):
    """``x`` as a (T, B) array of bool or integers (checked)."""
    x = as_array(fn, name, x)
    if len(shape_of(x)) != 2:
        raise ValueError(f"{fn}: {name} must have shape (T, B); got shape {shape_of(x)}")
    return x


def _previous(fn: str, name: str, prev, flags, what: str):
    """``prev`` (``None``, or ``(B,)``: each row's value at the previous window's last step)
    as an array, its shape checked against ``flags`` (T, B)."""
    if prev is None:
        return None
    prev = as_array(fn, name, prev)
    b = shape_of(flags)[1]
    if shape_of(prev) != (b,):
        raise ValueError(
            f"{fn}: {name} must have shape (B,) = ({b},), {what} of each row's previous "
            f"window; got shape {shape_of(prev)}"
        )
    return prev


def resets_from_dones(dones, prev_done=None) -> tuple[jax.Array, jax.Array]:
    """The engine's resets for rollouts with episode ends: ``resets[t] = dones[t - 1]``.

    Args:
      dones: ``(T, B)`` bool (or 0/1 numbers): ``dones[t, b]`` true when row b's episode
        ended at step t, as an environment's step returns it.
      prev_done: ``(B,)``: the last done of the row's previous window (or rollout), which
        resets step 0; ``None``: no reset at step 0 (the carry given enters it).

    Returns:
      ``(resets, last_done)``: ``resets`` ``(T, B)`` bool; ``last_done = dones[-1]`` ``(B,)``,
      the ``prev_done`` of the next window.

    Raises:
      ValueError / TypeError: ``dones`` not ``(T, B)`` bool or 0/1, ``prev_done`` not
      ``(B,)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from bptt_jax import streams
      >>> dones = jnp.array([[0], [0], [1], [0], [0], [1]], bool)   # episodes end at 2 and 5
      >>> resets, last = streams.resets_from_dones(dones)
      >>> resets[:, 0].astype(int).tolist(), last.tolist()
      ([0, 0, 0, 1, 0, 0], [True])
      >>> streams.resets_from_dones(dones, prev_done=last)[0][:, 0].astype(int).tolist()
      [1, 0, 0, 1, 0, 0]
    """
    fn = "resets_from_dones"
    dones = _flags(fn, "dones", dones)
    if not (dones.dtype == jnp.bool_ or jnp.issubdtype(dones.dtype, jnp.integer)):
        raise TypeError(f"{fn}: dones must be bool or 0/1 integers; got dtype {dones.dtype}")
    if dones.dtype != jnp.bool_:
        values = concrete(dones)
        if values is not None and ((values != 0) & (values != 1)).any():
            t, b = (int(i) for i in np.argwhere((values != 0) & (values != 1))[0])
            raise ValueError(f"{fn}: dones must hold only 0 and 1; got {values[t, b]} at "
                             f"(t, b) = ({t}, {b})")  # fmt: skip
        dones = dones.astype(bool)
    prev_done = _previous(fn, "prev_done", prev_done, dones, "the last done")
    first = jnp.zeros_like(dones[:1]) if prev_done is None else prev_done.astype(bool)[None]
    return jnp.concatenate([first, dones[:-1]]), dones[-1]


def from_segment_ids(ids, prev_ids=None) -> Packing:
    """The resets and mask of rows packed with several documents, from their segment ids.

    Args:
      ids: ``(T, B)`` integers: each row's documents numbered 1, 2, 3, ... in the order
        they come, each document's steps together, 0 for padding after the last document
        (Flax's and T5X's packing).
      prev_ids: ``(B,)``: each row's last id in the previous window of a stream (a document
        that continues into this window keeps its state); ``None``: the row starts here.

    Returns:
      A :class:`Packing` ``(resets, mask)``, with a reset where a document starts after step
      0 (or at step 0, where it differs from ``prev_ids``) and the mask ``ids > 0``.


    Raises:
      ValueError / TypeError: ``ids`` not ``(T, B)`` integers, or ``prev_ids`` not
        ``(B,)``; ids that decrease along a row, or a document after padding (checked when
        the ids are concrete, and under ``jit`` in checked mode, :mod:`bptt_jax.checking`).

    Example:
      >>> import jax.numpy as jnp
      >>> from bptt_jax import streams
      >>> ids = jnp.array([[1], [1], [1], [2], [2], [3], [0], [0]])
      >>> p = streams.from_segment_ids(ids)
      >>> p.resets[:, 0].astype(int).tolist(), p.mask[:, 0].astype(int).tolist()
      ([0, 0, 0, 1, 0, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0])
    """
    fn = "from_segment_ids"
    ids = _flags(fn, "ids", ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"{fn}: ids must be integers (0 for padding); got dtype {ids.dtype}")
    _check_packed(fn, ids)
    prev_ids = _previous(fn, "prev_ids", prev_ids, ids, "the last id")
    # a document starts where the id changes (and is not padding); at step 0, where it
    # differs from the previous window's last
    before = ids[:1] if prev_ids is None else prev_ids[None]
    changes = jnp.concatenate([ids[:1] != before, ids[1:] != ids[:-1]]) & (ids > 0)
    return Packing(changes, ids > 0)


def _check_packed(fn: str, ids) -> None:
    """Ids non-decreasing along each row among the documents, and no document after padding."""
    message = (
        f"{fn}: ids[:, {{b}}] must number its documents 1, 2, ... in order with padding (0) "
        "only after the last; at step t={t} it goes from {value} to a smaller id, or from "
        "padding back to a document"
    )
    if ids.shape[0] < 2:
        return
    if checking.traced(ids):
        later = ids[1:]
        bad = (later < ids[:-1]) & (later > 0) | (ids[:-1] == 0) & (later > 0)
        checking.check_all(~bad, message.replace("t={t}", "t={t} + 1"), values=ids[:-1])
        return
    values = concrete(ids)
    if values is None:
        return
    later, earlier = values[1:], values[:-1]
    bad = ((later < earlier) & (later > 0)) | ((earlier == 0) & (later > 0))
    if bad.any():
        t, b = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(message.format(b=b, t=t + 1, value=earlier[t, b]))
