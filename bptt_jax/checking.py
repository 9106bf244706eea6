"""Value checks under ``jax.jit``: the opt-in checked mode, on ``jax.experimental.checkify``.

Every entry point (:func:`~bptt_jax.unroll`, :func:`~bptt_jax.sequence_loss`,
:func:`~bptt_jax.losses.loss_and_grads`, :func:`~bptt_jax.truncated.tbptt`, the diagnostics,
the NNX and Equinox modules) checks the shapes and dtypes of what it is given at trace time,
always. Some promises need the *values* of arrays:

* a numeric ``mask``, ``loss_mask`` or ``resets`` holds only 0 and 1;
* a bidirectional model's ``mask`` is right-padded (each sequence's valid steps first);
* ``loss="xent"`` targets lie in ``[0, O)`` wherever they are counted;
* a module's ``seq_lengths`` lie in ``[0, T]``.

Those are checked wherever the values are known when the call is traced: arrays passed
outside ``jax.jit`` (NumPy or JAX arrays), and the batches of a trainer's step
(:func:`bptt_jax.train.trainer`) that are host (NumPy) data, checked on the host before the
compiled step runs. Under ``jax.jit`` (or ``vmap``, ``grad``, ``scan``) the arrays are
tracers, whose values exist only when the program runs: a wrong value there is not caught
unless the call is wrapped in :func:`checked`, which compiles each of these checks into
the program (``checkify.check``) and raises a ``ValueError`` naming the function, the
argument and the first bad position when one fails. The checks cost a reduction over each
checked array and a read of the error flag per call: a mode for debugging and for data
pipelines one does not trust, off by default.

Example:
  >>> import jax, jax.numpy as jnp, bptt_jax
  >>> cell = bptt_jax.GRU(4)
  >>> params = cell.init(jax.random.key(0), 3)
  >>> xs = jnp.ones((5, 2, 3))
  >>> f = jax.jit(lambda p, m: bptt_jax.unroll(cell, p, xs, mask=m)[0].sum())
  >>> m = jnp.ones((5, 2)).at[0, 1].set(2.0)          # not a 0/1 mask
  >>> _ = f(params, m)                                 # traced: not seen
  >>> bptt_jax.checked(f)(params, m)
  Traceback (most recent call last):
  ...
  jax._src.checkify.JaxRuntimeError: unroll: mask must hold only 0 and 1 (or be bool); got 2.0...
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import checkify

#: Whether the value checks of traced arrays are compiled in. A context of JAX's trace and
#: compilation caches (``jax.make_user_context``): a function traced in one mode is traced
#: again in the other, never reused from a cache across them.
_MODE = jax.make_user_context(False)


def enabled() -> bool:
    """``True`` while :func:`checked` traces its function."""
    return bool(_MODE.value)


def checked(fn, errors=checkify.user_checks):
    """``fn`` with bptt_jax's value checks of traced arrays compiled in; raises on failure.

    ``fn`` may be jitted, and may call the library under ``jax.grad``, ``vmap`` or ``scan``;
    it is traced with the checks on (:mod:`bptt_jax.checking` lists them) and functionalized
    by ``checkify.checkify``. After each call the error is read back: a failed check raises
    ``checkify.JaxRuntimeError`` (a ``ValueError``) with the library's message.

    Args:
      fn: the function, e.g. ``jax.jit(jax.value_and_grad(loss))`` or a trainer's ``step``.
      errors: the checkify error sets to functionalize (``checkify.user_checks`` by
        default; add ``checkify.float_checks`` to catch NaNs, ``checkify.index_checks``...).

    Returns:
      A function with ``fn``'s signature and return value.
    """
    functionalized = checkify.checkify(fn, errors=errors)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with _MODE(True):
            err, out = functionalized(*args, **kwargs)
        err.throw()
        return out

    return run


def traced(x) -> bool:
    """Whether ``x``'s values are unknown at trace time (a tracer)."""
    return isinstance(x, jax.core.Tracer)


def check_all(ok, message: str, values=None) -> None:
    """In checked mode, compile in a check that the bool array ``ok`` is true everywhere.

    ``message`` may name the first failing position, ``{t}`` and ``{b}`` for a ``(T, B)``
    array or ``{i}`` for a vector, and ``{value}``: ``values`` (``ok``'s shape) there.
    Outside checked mode, nothing."""
    if not enabled():
        return
    bad = jnp.ravel(~ok)
    first = jnp.argmax(bad)  # the first failure, row-major (0 when none: the check passes)
    idx = jnp.unravel_index(first, ok.shape)
    kwargs = {"t": idx[0], "b": idx[1]} if ok.ndim == 2 else {"i": idx[0]}
    if values is not None:
        kwargs["value"] = jnp.ravel(values)[first]
    checkify.check(~jnp.any(bad), message, **kwargs)
