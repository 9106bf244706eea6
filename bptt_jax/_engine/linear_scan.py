"""The linear path: a :class:`~bptt_jax.cells.LinearCell` over a sequence, chunk by chunk.

A linear cell's recurrence is ``h_t = a_t * h_{t-1} + b_t`` (elementwise), with ``a`` and
``b`` computed from the inputs alone (``cell.coefficients``: its matmuls over many rows at
once). Masks and resets act on the coefficients: a padded step passes the carry
(``a = 1, b = 0``), a reset zeros the carry entering its step (``a = 0``).

Time is walked in chunks of :func:`~bptt_jax._engine.options.linear_chunk` steps (about 2 MiB
of a (T, B, N) array on the CPU), a ``lax.scan`` over the chunks carrying the state: each
chunk's coefficients come from one call of ``cell.coefficients`` on its ``C*B`` rows, and its
recurrence is one scan of ``C`` steps,
``jax.lax.associative_scan`` (``"parallel"``) or ``lax.scan`` (``"sequential"``), as the
cell's ``scan`` says (``"auto"``: :func:`~bptt_jax._engine.options.linear_scan`). A chunk's
arrays stay in cache; whole-sequence (T, B, H) coefficient arrays would not (README.md: the
measurements).

Only the states are stored (and the inputs, by reference): the backward re-computes each
chunk's coefficients and the cell's residuals from its inputs, one more pass of the cell's
input matmuls instead of three (T, B, H) arrays per cell written and read back. The backward
walks the chunks in reverse; in each, the error on ``h_t`` is again a linear recurrence, in
reverse time::

    delta_t = dh_t + a_{t+1} * delta_{t+1},   delta_{T-1} = dh_{T-1} + dcarry_T

run as the same kind of scan, ``a_{t+1} delta_{t+1}`` of a chunk's first step carried to the
chunk before; a truncation cut at step t zeros ``a_t`` in it (the carry entering step t gets
no error). Then ``dL/da_t = delta_t * h_{t-1}``, ``dL/db_t = delta_t`` (through the masks
and resets) and the cell's ``coefficients_backward`` (or ``jax.vjp`` of ``coefficients``,
parallel in time) give the chunk's inputs' gradient and its share of the params', summed
over the chunks in the loop's carry. Per-step clipping (``delta_clip``) is not linear: with
it the reverse recursion is a sequential ``lax.scan`` whatever ``scan`` says. Autodiff of an
associative scan would keep every level of its tree over the whole sequence.

The three functions have :mod:`~bptt_jax._engine.cell_scan`'s arguments and results; the
stored buffers are ``(xs,)``, as on the generic path.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from bptt_jax import precision
from bptt_jax._engine import options, step_rules
from bptt_jax._engine.bundles import OutputError, WithOutputs, carries_of, reverse_per_device
from bptt_jax._engine.sharding import SUMMED, like_batch, vary_like
from bptt_jax.cells import protocol


def _compose(earlier, later):
    """Two steps of ``h -> a * h + b``, ``earlier`` then ``later``, as one."""
    a1, b1 = earlier
    a2, b2 = later
    return a2 * a1, a2 * b1 + b2


def recurrence(a, b, h0, mode: str, reverse: bool = False):
    """``h_t = a_t * h_{t-1} + b_t`` over the leading axis from ``h_{-1} = h0`` (with
    ``reverse``: ``h_t = a_t * h_{t+1} + b_t`` from ``h_T = h0``), every ``h_t`` stacked.

    ``mode``: ``"parallel"`` (an associative scan; ``h0`` folded into the first step) or
    ``"sequential"`` (``lax.scan``).
    """
    first = -1 if reverse else 0
    if mode == "parallel":
        b = b.at[first].add(a[first] * h0)
        return lax.associative_scan(_compose, (a, b), reverse=reverse)[1]

    def body(h, ab):
        h = ab[0] * h + ab[1]
        return h, h

    return lax.scan(body, h0, (a, b), reverse=reverse)[1]


def passing(a, mask, resets):
    """``a`` as the scan multiplies it: 1 at a padded step (the carry passes), 0 where the
    carry entering the step is reset."""
    if mask is not None:
        a = jnp.where(mask[..., None], a, 1)
    if resets is not None:
        a = jnp.where(resets[..., None], 0, a)
    return a


# ------------------------------------------------------------------ chunks of time
def chunks(length: int, step_bytes: int) -> tuple[int, int, int]:
    """``(size, n, tail)``: ``length`` steps of ``step_bytes`` each (one (B, N) array) as
    ``n`` chunks of ``size`` and one of ``tail`` (0: none), ``size`` at most
    :func:`~bptt_jax._engine.options.linear_chunk` and as even as ``length`` allows (T = 100
    with 64: two chunks of 50)."""
    n = math.ceil(length / options.linear_chunk(length, step_bytes))
    size = math.ceil(length / n)
    return size, length // size, length % size


def _step_bytes(carry) -> int:
    """Bytes of one step of a (T, B, N) array like the carry (B, N)."""
    return carry.size * carry.dtype.itemsize


def _rows(x, t0, size: int):
    """Steps ``[t0, t0 + size)`` of ``x`` (T, ...); ``None`` stays ``None``."""
    return None if x is None else lax.dynamic_slice_in_dim(x, t0, size, axis=0)


def _over_chunks(body, init, length: int, step_bytes: int, reverse: bool = False):
    """``body(carry, t0, size) -> (carry, out)`` over the chunks of ``length`` steps
    (:func:`chunks`), in time order or ``reverse``; ``out``'s leaves (``size``, ...) are
    joined into (``length``, ...). Returns ``(carry, outs)``."""
    size, n, tail = chunks(length, step_bytes)

    def main(carry):
        if n == 1:
            return body(carry, 0, size)
        carry, out = lax.scan(lambda c, i: body(c, i * size, size), carry, jnp.arange(n),
                              reverse=reverse)  # fmt: skip
        return carry, jax.tree.map(lambda o: o.reshape(n * size, *o.shape[2:]), out)

    if not tail:
        return main(init)
    if reverse:
        carry, last = body(init, n * size, tail)
        carry, out = main(carry)
    else:
        carry, out = main(init)
        carry, last = body(carry, n * size, tail)
    return carry, jax.tree.map(lambda o, t: jnp.concatenate([o, t]), out, last)


def _coefficients(cell, cparams, x, acc):
    """``((a, b), residuals)`` of the steps of ``x`` (in the carry's dtype ``acc``), ``a``
    and ``b`` in ``acc`` (complex ones in the complex dtype of ``acc``'s precision);
    ``cparams``: the params with their matrices in the compute dtype."""
    (a, b), res = cell.coefficients(cparams, x)
    acc = _complex_of(acc) if jnp.iscomplexobj(a) else acc
    return (a.astype(acc), b.astype(acc)), res


def _complex_of(dtype):
    """The complex dtype of a real dtype's precision (float32 -> complex64)."""
    return jnp.dtype(jnp.complex128 if jnp.dtype(dtype).itemsize >= 8 else jnp.complex64)


class _Real:
    """How a real state is carried: as itself."""

    @staticmethod
    def enter(h):
        return h

    leave = conj = enter


class _Complex:
    """How a complex state of N units is carried: as an array (..., 2N) of its real and
    imaginary parts. An error ``g`` on it is ``dL/dRe + i dL/dIm``, so that the backward of
    ``h_t = a_t h_{t-1} + b_t`` reads as the real one with ``a`` conjugated:
    ``dL/dh_{t-1} = conj(a_t) g_t``, ``dL/da_t = g_t conj(h_{t-1})``, ``dL/db_t = g_t``."""

    @staticmethod
    def enter(h):
        n, part = h.shape[-1] // 2, _complex_of(h.dtype).type(0).real.dtype
        return lax.complex(h[..., :n].astype(part), h[..., n:].astype(part))

    @staticmethod
    def leave(z):
        return jnp.concatenate([jnp.real(z), jnp.imag(z)], axis=-1)

    conj = staticmethod(jnp.conj)


def field_of(a):
    """:class:`_Complex` for complex coefficients, else :class:`_Real`."""
    return _Complex if jnp.iscomplexobj(a) else _Real


def _masked(m, y):
    """``y`` (T', B, F) with zeros at the padded steps (``m`` (T', B); ``None``: none)."""
    return y if m is None else jnp.where(m[..., None], y, 0)


def _passing_coefficients(cell, cparams, steps, x, t0, size, acc):
    """``(field, a, b)`` of the steps ``[t0, t0 + size)`` as the scan multiplies and adds
    them (:func:`passing`; ``b`` zero at a padded step); ``x`` their inputs in ``acc``."""
    (a, b), _ = _coefficients(cell, cparams, x, acc)
    m, r = _rows(steps.mask, t0, size), _rows(steps.resets, t0, size)
    return field_of(a), passing(a, m, r), _masked(m, b)


# ------------------------------------------------------------------ forward
def summary(cell, params, steps, carry0):
    """What the steps do to any carry entering them, ``h -> A * h + h0``: the product ``A``
    of their ``a_t`` (masks and resets included) and the state ``h0`` they leave from a zero
    carry, both (B, N) in the field the scan runs in (complex for complex coefficients).
    ``carry0`` gives the carry's shape and dtype only. Sequence parallelism
    (:mod:`~bptt_jax._engine.time_sharded`) exchanges one such summary per device."""
    xs = steps.xs
    acc = carry0.dtype
    cparams = precision.compute_params(params, xs.dtype)
    mode = options.linear_scan(cell)
    field = _field_of_carry(cell, cparams, xs, acc)
    h = field.enter(like_batch(jnp.zeros_like(carry0), xs))

    def chunk(carry, t0, size):
        prod, h = carry
        x = _rows(xs, t0, size).astype(acc)
        _, a, b = _passing_coefficients(cell, cparams, steps, x, t0, size, acc)
        return (prod * jnp.prod(a, axis=0), recurrence(a, b, h, mode)[-1]), None

    (prod, h), _ = _over_chunks(chunk, (jnp.ones_like(h), h), xs.shape[0], _step_bytes(carry0))
    return prod, h


def forward(cell, params, steps, carry0, keep: bool = True):
    """The scan over ``steps`` (its ``drops`` are not read), chunk by chunk.

    Returns:
      ``(states, buffers, carry_T)``: the state after every step (T, B, N), in the compute
      dtype; ``(xs,)`` (the backward re-computes the coefficients), ``None`` unless
      ``keep``; the final carry, in the carry's dtype.
    """
    xs, mask = steps.xs, steps.mask
    carry0 = like_batch(carry0, xs)
    acc, store = carry0.dtype, xs.dtype
    cparams = precision.compute_params(params, xs.dtype)  # matrices in the compute dtype
    mode = options.linear_scan(cell)

    both = protocol.has_output(cell)  # an output map: y_t = output(h_t, x_t)

    def chunk(h, t0, size):
        x = _rows(xs, t0, size).astype(acc)
        field, a, b = _passing_coefficients(cell, cparams, steps, x, t0, size, acc)
        hs = field.leave(recurrence(a, b, field.enter(h), mode)).astype(acc)
        if not both:
            return hs[-1], hs.astype(store)
        ys = _masked(_rows(mask, t0, size), cell.output(cparams, hs, x))  # zeros if padded
        return hs[-1], WithOutputs(hs.astype(store), ys.astype(store))

    carry_t, states = _over_chunks(chunk, carry0, xs.shape[0], _step_bytes(carry0))
    return states, ((xs,) if keep else None), carry_t


# ------------------------------------------------------------------ backward
def _walk_back(cell, params, steps, carry0, stored, g, backprop, grads: bool, product=False):
    """The chunks in reverse: ``(dcarry0, (dparams, dxs), kept)``; ``(dparams, dxs)`` is
    ``None`` unless ``grads``. On a mesh it runs on each device's rows (``per_device``):
    the params' gradient crosses the devices once, after the loop, not at every chunk.
    With ``product``, also the product of the steps' ``a_t`` as the error travels back
    through them (conjugated, cuts included), in the field the scan runs in."""
    walk = lambda *a: _walk_back_local(cell, grads, product, *a)  # noqa: E731
    out_axes = (0, (SUMMED, 1) if grads else None, 1) + ((0,) if product else ())
    return reverse_per_device(walk, params, steps, carry0, stored, g, backprop, out_axes)


def _walk_back_local(cell, grads, product, params, steps, carry0, stored, g, backprop):
    """:func:`_walk_back` on one device's rows (or a whole batch off a mesh)."""
    states, (xs,) = stored
    states = carries_of(states)
    dhs, dcarry_t = g
    dcarry_t, carry0 = like_batch((dcarry_t, carry0), xs)
    both = protocol.has_output(cell)
    acc = carry0.dtype
    # inside shard_map: the params made device-varying like the batch, so that each chunk's
    # gradient is the device's own, summed over the devices once at the end
    cparams = vary_like(precision.compute_params(params, xs.dtype), xs)
    mode = options.linear_scan(cell)
    out_w = None
    if isinstance(dhs, OutputError):  # the readout's product formed chunk by chunk
        dhs, out_w = dhs
        out_w = out_w.astype(xs.dtype)

    def coefficients_vjp(x):
        """``(a, residuals)`` of the steps of ``x`` and ``(da, db) -> (dparams, dx)``."""
        if protocol.has_coefficients_backward(cell):
            (a, _), res = _coefficients(cell, cparams, x, acc)
            return a, lambda da, db: cell.coefficients_backward(cparams, x, a, res, da, db)

        # allowed autodiff (the linear contract's exception): a user linear cell without
        # coefficients_backward gets the VJP of its coefficient function, which is parallel
        # in time (each step's coefficients depend on its own input only; re-run here,
        # nothing of it stored); never a VJP of the sequence
        def coefficients(p, x_):
            return cell.coefficients(precision.compute_params(p, xs.dtype), x_)[0]

        (a, b), pullback = jax.vjp(coefficients, vary_like(params, xs), x)
        field = field_of(a)  # JAX's cotangent of a complex output is conj(dL/dRe + i dL/dIm)
        back = lambda da, db: pullback(  # noqa: E731
            (field.conj(da).astype(a.dtype), field.conj(db).astype(b.dtype))
        )
        return a.astype(_complex_of(acc) if field is _Complex else acc), back

    def output_vjp(x, hs):
        """``dys -> (dparams, dhs, dx)`` of the output map at the chunk's states ``hs``."""
        if callable(getattr(cell, "output_backward", None)):
            return lambda dy: cell.output_backward(cparams, hs, x, dy)

        # allowed autodiff (the contract's exception, "a user cell's one-step backward"): a
        # user linear cell without output_backward gets the VJP of its output map, a function
        # of one step's h_t and x_t (parallel in time); never a VJP of the sequence
        def output(p, h, x_):
            return cell.output(precision.compute_params(p, xs.dtype), h, x_)

        return jax.vjp(output, vary_like(params, xs), hs, x)[1]

    def chunk(carry, t0, size):
        d_next, dparams, prod = carry  # a_{t+1} delta_{t+1} of the chunk after; the sums
        x = _rows(xs, t0, size).astype(acc)
        m, r = _rows(steps.mask, t0, size), _rows(steps.resets, t0, size)
        cut, real = _rows(backprop.cuts, t0, size), _rows(backprop.real, t0, size)
        a, pullback = coefficients_vjp(x)
        field = field_of(a)
        a_back = field.conj(passing(a, m, r))  # the error travels back through conj(a)
        if cut is not None:  # no error crosses into the carry entering a cut step
            a_back = jnp.where(cut[:, None, None], 0, a_back)
        hs = _rows(states, t0, size).astype(acc)
        dy = None if dhs is None else _rows(dhs, t0, size)
        dy = None if dy is None else (dy if out_w is None else protocol.matmul(dy, out_w.T))
        if both:  # the error on y_t reaches h_t (and x_t, and the params) through the map
            dy = jnp.zeros(hs.shape[:2] + (protocol.output_size(cell),), acc) if dy is None else dy
            dp_out, e, dx_out = output_vjp(x, hs)(_masked(m, dy.astype(acc)))
        else:
            e = jnp.zeros_like(hs) if dy is None else dy.astype(acc)
        e = field.enter(e)
        # the error on h_t reaches h_{t-1} through a_t: delta_t = e_t + a_{t+1} * delta_{t+1}
        a_next = jnp.concatenate([a_back[1:], jnp.zeros_like(a_back[:1])])
        if backprop.delta_clip is None:
            deltas = recurrence(a_next, e.at[-1].add(d_next), jnp.zeros_like(e[0]), mode, True)
        else:  # per-step clipping of the error arriving at each carry (as the autodiff path)
            incoming = a_next if both else None
            deltas = _clipped(field, a_next, e, d_next, real, backprop.delta_clip, incoming)
        kept = None
        if backprop.keep_deltas:
            kept = jax.vmap(step_rules.keeper(cell, backprop))(field.leave(deltas))
        d_prev = a_back[0] * deltas[0]
        prod = None if prod is None else prod * jnp.prod(a_back, axis=0)
        if not grads:
            return (d_prev, dparams, prod), (None, kept)
        h_in = step_rules.carry_entering(carry0, states, t0, None)
        h_prev = field.enter(jnp.concatenate([h_in[None], hs[:-1]]))
        da, db = deltas * field.conj(h_prev), deltas
        if m is not None:
            da = jnp.where(m[..., None], da, 0)
            db = jnp.where(m[..., None], db, 0)
        if r is not None:
            da = jnp.where(r[..., None], 0, da)
        dp, dx = pullback(da, db)
        if both:
            dp = jax.tree.map(lambda u, v: u + v.astype(u.dtype), dp, dp_out)
            dx = dx + dx_out.astype(dx.dtype)
        dparams = jax.tree.map(lambda s, d: s + d.astype(s.dtype), dparams, dp)
        return (d_prev, dparams, prod), (dx.astype(xs.dtype), kept)

    field = _field_of_carry(cell, cparams, xs, acc)  # how the carry holds the state
    d_carry = field.enter(dcarry_t.astype(acc))
    prod = jnp.ones_like(d_carry) if product else None
    init = (d_carry, vary_like(step_rules.zeros_like(params), xs) if grads else None, prod)
    (dcarry0, dparams, prod), (dxs, kept) = _over_chunks(
        chunk, init, xs.shape[0], _step_bytes(carry0), reverse=True
    )
    dcarry0 = field.leave(dcarry0)
    out = dcarry0, ((dparams, dxs) if grads else None), kept
    return out + (prod,) if product else out


def _field_of_carry(cell, cparams, xs, acc):
    """:func:`field_of` of the cell's coefficients (traced for their dtype only)."""
    a = jax.eval_shape(lambda: cell.coefficients(cparams, xs[:1].astype(acc))[0][0])
    return _Complex if jnp.issubdtype(a.dtype, jnp.complexfloating) else _Real


def _clipped(field, a_next, e, d_last, real, delta_clip, incoming=None):
    """The reverse recursion with the error clipped at each step before it travels on: a
    ``lax.scan``, clipping not being linear. ``d_last``: ``a delta`` from the chunk after.
    What is clipped is the error on the carry after step t: ``delta_t`` itself, or, for a
    cell with an output map (``incoming``), the part of it arriving from step t+1 (the
    output's error joins after the clip, as in a step of the autodiff path)."""

    def clip(d, real_t):  # on the real view: a complex error's norm is its parts'
        return field.enter(step_rules.clip(field.leave(d), real_t, delta_clip))

    def body(d_next, row):  # d_next = delta_{t+1} (the chunk after's a delta for t = C-1)
        a_t, e_t, real_t, last = row
        arriving = jnp.where(last, d_next, a_t * d_next)
        if incoming is None:
            d = clip(e_t + arriving, real_t)
        else:
            d = e_t + clip(arriving, real_t)
        return d, d

    last = jnp.arange(e.shape[0]) == e.shape[0] - 1
    init = d_last
    return lax.scan(body, init, (a_next, e, real, last), reverse=True)[1]


def back_summary(cell, params, steps, carry0, stored, dhs, backprop):
    """What the steps do to an error ``g`` arriving at their last carry from the right,
    ``g -> P * g + d0``: the product ``P`` of their ``a_t`` as the error travels back
    (conjugated, cuts included) and the error ``d0`` on the carry entering them for the
    errors ``dhs`` on their outputs alone (a zero ``g``), both (B, N) in the scan's field.
    Sequence parallelism (:mod:`~bptt_jax._engine.time_sharded`) exchanges one such summary
    per device."""
    zero = jnp.zeros_like(carry0)
    out = _walk_back(cell, params, steps, carry0, stored, (dhs, zero), backprop, grads=False,
                     product=True)  # fmt: skip
    d0, prod = out[0], out[3]
    return prod, field_of(prod).enter(d0.astype(carry0.dtype))


def reverse_scan(cell, params, steps, carry0, stored, g, backprop):
    """The reverse recursion of the error, from step T-1 down to 0, without the gradients.

    Args: as :func:`bptt_jax._engine.cell_scan.reverse_scan` (``steps.xs`` is not read:
    the stored inputs are).

    Returns:
      ``(dcarry0, None, kept)``: the error on ``carry0``; what ``backprop.keep_deltas``
      keeps of each step's error (else ``None``).
    """
    return _walk_back(cell, params, steps, carry0, stored, g, backprop, grads=False)


def backward(cell, params, steps, carry0, stored, g, backprop):
    """The whole sequence backward of ``cell``, chunk by chunk.

    Returns ``(dparams, dxs, dcarry0, deltas)``."""
    dcarry0, (grads, dxs), kept = _walk_back(cell, params, steps, carry0, stored, g, backprop,
                                             grads=True)  # fmt: skip
    return grads, dxs, dcarry0.astype(carry0.dtype), kept
