"""The contract between a cell and the sequence engine, in two tiers.

The engine (:mod:`bptt_jax._engine`) runs every schedule (full, checkpointed, truncated and
TBPTT), masks and resets, :class:`~bptt_jax.Stack` s and :class:`~bptt_jax.Bidirectional`
layers, the trainer, the diagnostics and :func:`~bptt_jax.check_gradients` for any object
that meets one of these contracts:

* **Tier 1,** :class:`Cell`: ``init``, ``zero_carry`` and ``step``, nothing else. The
  engine owns the sequence-level BPTT (the forward ``lax.scan`` storing the carries, the
  reverse ``lax.scan`` carrying the error back in time, the weight gradients summed over
  the steps, masks, resets, truncation cuts, per-step clipping); the backward of **one
  step** is ``jax.vjp`` of ``cell.step`` at ``(params, carry_{t-1}, x_t)``, inside the
  reverse scan. This (and a :class:`LinearCell`'s coefficients without their own
  backward, which are parallel in time) is where the library derives a backward by
  autodiff; the sequence is never differentiated as a whole.
* **Tier 2,** :class:`ManualCell`: a tier-1 cell that also has ``step_backward``, its
  hand-written one-step backward, used by the engine instead of ``jax.vjp``.
* **Tier 2, fast path,** :class:`FastCell`: the contract of the built-in cells
  (:class:`~bptt_jax.Elman`, :class:`~bptt_jax.LSTM`, :class:`~bptt_jax.GRU`). The input
  projection ``x_t W_x`` of all steps is one hoisted matmul, the step works on gate blocks
  ``(B, H)``, and every weight gradient is a single matmul over all ``T*B`` rows after the
  reverse scan.
* **Tier 2, linear,** :class:`LinearCell`: a diagonal linear recurrence
  ``h_t = a_t * h_{t-1} + b_t`` whose coefficients come from the inputs alone
  (:class:`~bptt_jax.MinGRU`, :class:`~bptt_jax.MinLSTM`, your own): the coefficients of
  many steps at once (a chunk of the sequence), time walked as (parallel or sequential)
  scans, and a hand-written reverse scan for the backward.

**The outputs** the engine stacks as ``hs`` (T, B, H), what a readout or the next layer
reads, are one of two things (:func:`has_output` tells which):

* the hidden state ``hidden(carry_t)``, when the cell has a ``hidden`` method, or its carry
  is one array and ``step`` returns that very array as its output (``return h, h``).
  ``hidden`` must *pick out* part of the carry (``carry["h"]``, ``carry.h``, ``carry[0]``; a
  linear function of it): the engine also applies its transpose to put the error ``dL/dh_t``
  on the carry. At a padded step, where the carry passes through, the output repeats the
  last valid one.
* the ``y_t`` that ``step`` returns, when the cell has no ``hidden`` and ``y_t`` is not its
  new carry (Flax's convention, ``(carry, x) -> (carry, y)`` with a tuple carry; an output
  computed from the state), and a :class:`LinearCell`'s ``output`` map. The engine stores
  the ``y_t`` beside the carries, and a step's backward takes the errors on both. At a padded
  step the output is zeros (as PyTorch pads the outputs of a packed sequence).

**Carries** are pytrees of floating arrays, each with the batch axis first: ``(B, ...)``.
**Params** are pytrees of floating arrays, one dtype. Cells are static arguments of
``jax.jit`` and of the engine's ``jax.custom_vjp``: they must be hashable (a frozen
dataclass is the easy way).

Example: an IndRNN (Li et al. 2018), ``h_t = relu(x_t W + u * h_{t-1} + b)``, whose
recurrent weight ``u`` is a vector, as a tier-1 cell:

  >>> import dataclasses, jax, jax.numpy as jnp, bptt_jax
  >>> @dataclasses.dataclass(frozen=True)
  ... class IndRNN:
  ...     hidden_size: int
  ...     def init(self, key, input_size, dtype=jnp.float32):
  ...         kw, ku = jax.random.split(key)
  ...         w = jax.random.normal(kw, (input_size, self.hidden_size), dtype) / input_size**0.5
  ...         u = jax.random.uniform(ku, (self.hidden_size,), dtype, 0.5, 1.0)
  ...         return {"w": w, "u": u, "b": jnp.zeros((self.hidden_size,), dtype)}
  ...     def zero_carry(self, batch_size, dtype=jnp.float32):
  ...         return jnp.zeros((batch_size, self.hidden_size), dtype)
  ...     def step(self, params, h, x):
  ...         h = jax.nn.relu(x @ params["w"] + params["u"] * h + params["b"])
  ...         return h, h
  >>> cell = IndRNN(8)
  >>> params = cell.init(jax.random.key(0), input_size=3)
  >>> xs = jax.random.normal(jax.random.key(1), (20, 4, 3))
  >>> hs, h_T = bptt_jax.unroll(cell, params, xs)
  >>> hs.shape, sorted(jax.grad(lambda p: bptt_jax.unroll(cell, p, xs)[0].sum())(params))
  ((20, 4, 8), ['b', 'u', 'w'])
  >>> bptt_jax.check_gradients(cell, dtype=jnp.float32).passed
  True

References:
  Li, Li, Cook, Zhu & Gao, "Independently recurrent neural network (IndRNN): building a
  longer and deeper RNN", CVPR 2018.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from bptt_jax.cells._common import matmul as matmul

Params = Any  # a pytree of floating arrays
Carry = Any  # a pytree of floating arrays, each (B, ...)


@runtime_checkable
class Cell(Protocol):
    """Tier 1: a cell with only its public face; the engine derives each step's backward.

    ``step`` is one time step in ``lax.scan`` order. The engine runs, for the forward::

        carry = carry0
        for t in range(T):
            new, _ = cell.step(params, carry, xs[t])
            carry = where(mask[t], new, carry)     # a padded step passes the carry on
            states.append(carry); hs.append(hidden(carry))

    and for the backward a reverse ``lax.scan`` carrying ``delta_t``, the error on the carry
    after step t, from ``t = T - 1`` down to 0; at each step it adds the error arriving at
    ``hidden(carry_t)`` from outside (the readout, the next layer), then::

        _, vjp = jax.vjp(lambda p, c, x: cell.step(p, c, x)[0], params, carry_{t-1}, xs[t])
        dparams_t, delta_{t-1}, dxs[t] = vjp(delta_t)
        dparams += dparams_t                       # summed over time in the scan carry

    Optional: ``hidden(carry) -> (B, H)``, the part of the carry that is the hidden state
    (see :mod:`bptt_jax.cells.protocol`); without it the outputs are the carry (one array,
    returned by ``step`` as its output) or else the ``y_t`` that ``step`` returns, and the
    per-step backward is ``jax.vjp`` of the whole ``step`` for the errors on both.

    Under a precision policy (``compute_dtype``, :mod:`bptt_jax.precision`) ``step`` gets
    the params with every matrix cast to the compute dtype and the carry and ``x_t`` in the
    params' dtype; it must return the carry in the params' dtype.
    ``bptt_jax.cells.matmul(a, kernel)`` multiplies in the kernel's dtype, accumulating into
    ``a`` 's, as the built-in cells do (a plain ``a @ kernel`` computes in float32 under
    JAX's standard dtype promotion, and is refused under strict promotion).
    """

    def init(self, key: jax.Array, input_size: int, dtype=jnp.float32) -> Params:
        """Draw params for inputs of size ``input_size`` (D), every leaf of ``dtype``."""
        ...

    def zero_carry(self, batch_size: int, dtype=jnp.float32) -> Carry:
        """The initial carry of ``batch_size`` (B) sequences: leaves ``(B, ...)``."""
        ...

    def step(self, params: Params, carry: Carry, x: jax.Array) -> tuple[Carry, jax.Array]:
        """One step: ``(carry_{t-1}, x_t (B, D)) -> (carry_t, h_t (B, H))``; the new carry
        has the structure, shapes and dtypes of the old one."""
        ...


@runtime_checkable
class ManualCell(Cell, Protocol):
    """Tier 2: a :class:`Cell` with its own hand-written one-step backward.

    The engine calls ``step_backward`` where a tier-1 cell gets ``jax.vjp`` of ``step``;
    everything else (the sequence-level BPTT) is the same.
    """

    def step_backward(
        self, params: Params, carry: Carry, x: jax.Array, new_carry: Carry, dnew: Carry
    ) -> tuple[Params, Carry, jax.Array]:
        """The VJP of ``step``'s new carry: one cotangent per argument of ``step``.

        Args:
          params, carry, x: ``step``'s arguments at step t (``carry`` is ``carry_{t-1}``,
            after a reset).
          new_carry: ``step(params, carry, x)[0]``, as the forward stored it (rounded to
            the compute dtype under a precision policy).
          dnew: the error on ``new_carry`` (its structure), the output's error included.
            For a cell whose outputs are not its carry (:func:`has_output`), ``new_carry`` and
            ``dnew`` are the pairs ``(carry_t, y_t)`` and ``(dcarry_t, dy_t)``: the VJP of
            the whole ``step``.

        Returns:
          ``(dparams, dcarry, dx)``: the params' structure (this step's contribution),
          the carry's, and ``(B, D)``.
        """
        ...


@runtime_checkable
class FastCell(Protocol):
    """Tier 2, the fast path: the built-in cells' contract with the engine.

    ``G`` gate blocks of ``H`` units; every block is ``(B, H)``. The engine hoists the input
    projection out of the time loop (``x W_x`` for all steps, one matmul per block), stores
    the states and the cell's per-step residuals in ``(T, B, H)`` buffers it reuses in place,
    and after the reverse scan turns the per-step pre-activation gradients ``dA_t`` into
    every weight gradient with matmuls over all ``T*B`` rows: ``dW_x = X^T dA``,
    ``dW_h = H_prev^T dA``, ``db = sum dA`` (gate by gate), ``dX = dA W_x^T``.

    Attributes:
      hidden_size: H.
      n_blocks: G, the gate blocks of the kernels ``(D, G*H)`` and ``(H, G*H)``.
      residual_blocks: how many ``(B, H)`` blocks ``forward`` keeps per step.
      grad_blocks: how many ``(B, H)`` pre-activation gradient blocks ``backward`` emits.
      input_grads: the indices into those of the G blocks of the input side
        (``x_t @ input_kernel + input_bias``), in gate order.
      recurrent_grads: the indices of the G blocks of the recurrent side
        (``h_{t-1} @ recurrent_kernel``, plus a recurrent bias if the cell has one).

    Besides ``init``, ``zero_carry`` and ``step`` (as :class:`Cell`; ``step`` is what
    ``backward="autodiff"`` differentiates), the methods below. ``hidden`` and
    ``add_to_hidden`` must also work on states stacked over time (leading axes
    ``(T, B)``). The block buffers are shared in place: residual block i is written over
    input projection i, gradient block k over residual block k.
    """

    hidden_size: int
    n_blocks: int
    residual_blocks: int
    grad_blocks: int
    input_grads: tuple[int, ...]
    recurrent_grads: tuple[int, ...]

    def init(self, key: jax.Array, input_size: int, dtype=jnp.float32) -> Params: ...

    def zero_carry(self, batch_size: int, dtype=jnp.float32) -> Carry: ...

    def step(self, params: Params, carry: Carry, x: jax.Array) -> tuple[Carry, jax.Array]: ...

    def input_kernel(self, params: Params) -> jax.Array:
        """``W_x`` (D, G*H)."""
        ...

    def input_bias(self, params: Params) -> jax.Array:
        """The bias added to the input projection, (G*H,)."""
        ...

    def recurrent_kernel(self, params: Params) -> jax.Array:
        """``W_h`` (H, G*H)."""
        ...

    def forward(self, params: Params, carry: Carry, xp: tuple) -> tuple[Carry, tuple]:
        """One step on the projected input ``xp`` (G blocks ``x_t W_x + b``, gate by gate):
        ``(carry_t, residuals_t)``, ``residual_blocks`` blocks kept for ``backward``."""
        ...

    def backward(
        self, params: Params, res: tuple, state: Carry, state_prev: Carry, dstate: Carry, w_t
    ) -> tuple[Carry, tuple]:
        """The step's hand-written backward: ``(dstate_prev, dcols_t)``.

        ``dstate`` is the error on ``state`` (= carry_t), ``w_t`` the recurrent kernel
        transposed (G*H, H), laid out once by the engine; ``dcols_t`` the ``grad_blocks``
        pre-activation gradients of the step.
        """
        ...

    def hidden(self, state: Carry) -> jax.Array:
        """The hidden state h of a carry (also of states stacked over time)."""
        ...

    def add_to_hidden(self, dstate: Carry, dh: jax.Array) -> Carry:
        """``dstate`` with ``dh`` added to its ``h`` part."""
        ...

    def assemble_grads(self, params: Params, dw_x, dw_h, db_x, db_h) -> Params:
        """The params-typed gradient from ``dW_x`` (D, G*H) and ``dW_h`` (H, G*H) (blocks
        in ``input_grads`` / ``recurrent_grads`` order) and the sums of the input-side and
        recurrent-side blocks ``db_x``, ``db_h`` (G*H,)."""
        ...


@runtime_checkable
class LinearCell(Protocol):
    """Tier 2, linear recurrences: a diagonal ``h_t = a_t * h_{t-1} + b_t`` whose coefficients
    ``a_t`` and ``b_t`` depend on the inputs only (minGRU, minLSTM, the LRU, Griffin's RG-LRU,
    S5-style layers), so time can be walked as a parallel (associative) scan.

    The engine (:mod:`bptt_jax._engine.linear_scan`) asks the cell for the coefficients of
    many steps at once (``xs`` of one chunk of the sequence, ``(T', B, D)``: the whole
    sequence, or as many steps as keep a chunk's arrays in cache), applies the masks (a
    padded step passes the carry: ``a = 1, b = 0``) and resets (the carry entering the step
    is zeros: ``a = 0``), then scans::

        h_t = a_t * h_{t-1} + b_t                      # elementwise, h_{-1} = carry0

    Its backward is the same recurrence run in reverse, written by hand: with ``dh_t`` the
    error arriving at ``h_t`` from outside (a readout, the next layer)::

        delta_t = dh_t + a_{t+1} * delta_{t+1}         # the error on h_t
        dL/da_t = delta_t * h_{t-1},  dL/db_t = delta_t,  dL/dcarry0 = a_0 * delta_0

    then ``coefficients_backward`` turns ``(dL/da, dL/db)`` into the params' and the inputs'
    gradients, one pass over the chunk's ``T'*B`` rows (the engine adds the chunks' params
    gradients, walking the chunks in reverse and recomputing each chunk's coefficients: only
    the states and the inputs are stored). Truncation cuts zero ``a_t`` in the backward
    recursion only; per-step clipping (``delta_clip``) is not linear, so with it the reverse
    recursion runs as a sequential ``lax.scan`` whatever ``scan`` says.

    **Complex states** (the LRU, S5): ``coefficients`` may return complex ``a`` and ``b``
    ``(T, B, N)`` for a carry ``(B, 2N)`` holding the state's real parts, then its imaginary
    parts. The engine scans in complex arithmetic and carries errors as ``dL/dRe + i dL/dIm``,
    so the backward above holds with ``a`` conjugated (``delta_t = dh_t + conj(a_{t+1})
    delta_{t+1}``, ``dL/da_t = delta_t conj(h_{t-1})``); ``coefficients_backward`` gets
    ``da`` and ``db`` in that form.

    Besides ``init``, ``zero_carry`` and ``step`` (as :class:`Cell`: the one-step form, for
    loops written by hand and for ``backward="autodiff"``; it must compute the same
    recurrence), a linear cell has ``coefficients``. The carry is one array ``(B, N)``, and
    it is the cell's output unless the cell has an output map. Optional:

    * ``scan``, an attribute: ``"parallel"`` (``jax.lax.associative_scan``, depth
      O(log T)), ``"sequential"`` (``lax.scan``) or ``"auto"`` (the default: by backend,
      parallel on a GPU or TPU, sequential on a CPU, where the parallel scan's extra work
      costs more than its depth saves);
    * ``output(params, hs, xs) -> ys``: an output map, the outputs ``(T, B, F)`` from the
      states ``hs`` ``(T, B, N)`` (as carried) and the inputs of the same steps, for a cell
      whose outputs are not its carry (``step`` then returns ``(h_t, y_t)``; an int attribute
      ``output_size`` gives F); with ``output_backward(params, hs, xs, dys) -> (dparams, dhs,
      dxs)``, else ``jax.vjp`` of ``output`` (one step's function, parallel in time);
    * ``coefficients_backward(params, xs, a, residuals, da, db) -> (dparams, dxs)``: the VJP
      of ``coefficients`` for the errors ``da``, ``db`` (T, B, N) on ``a`` and ``b``, ``a``
      and ``residuals`` as ``coefficients`` returned them for the same chunk (``a`` before
      masks and resets), the params' gradient summed over the chunk's rows. Without it the
      engine takes ``jax.vjp`` of ``coefficients``, which is parallel in time (each step's
      inputs alone), re-running ``coefficients`` in the backward. Never a ``jax.vjp`` of the
      sequence.

    Under a precision policy (:mod:`bptt_jax.precision`) both methods get the params with
    every matrix in the compute dtype and ``xs`` in the params' dtype, as ``step`` does; the
    engine scans ``a`` and ``b`` in the params' dtype (float32 under a bfloat16 policy:
    products of many ``a_t`` are never formed in bfloat16).

    Example: an exponential moving average of projected inputs with a learned decay per
    unit, ``h_t = sigmoid(lam) * h_{t-1} + x_t W``, whose backward comes from ``jax.vjp`` of
    its coefficients:

      >>> import dataclasses, jax, jax.numpy as jnp, bptt_jax
      >>> @dataclasses.dataclass(frozen=True)
      ... class EMA:
      ...     hidden_size: int
      ...     scan: str = "parallel"
      ...     def init(self, key, input_size, dtype=jnp.float32):
      ...         w = jax.random.normal(key, (input_size, self.hidden_size), dtype)
      ...         return {"w": w, "lam": jnp.zeros((self.hidden_size,), dtype)}
      ...     def zero_carry(self, batch_size, dtype=jnp.float32):
      ...         return jnp.zeros((batch_size, self.hidden_size), dtype)
      ...     def coefficients(self, params, xs):  # xs (T, B, D) or one step's (B, D)
      ...         b = bptt_jax.cells.matmul(xs, params["w"])
      ...         return (jnp.broadcast_to(jax.nn.sigmoid(params["lam"]), b.shape), b), ()
      ...     def step(self, params, h, x):
      ...         (a, b), _ = self.coefficients(params, x)
      ...         return a * h + b, a * h + b
      >>> cell = EMA(8)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> hs, h_T = bptt_jax.unroll(cell, params, jnp.ones((20, 4, 3)))
      >>> bptt_jax.cells.protocol.tier(cell), hs.shape
      ('linear', (20, 4, 8))
      >>> bptt_jax.check_gradients(cell, dtype=jnp.float32).passed
      True
    """

    def init(self, key: jax.Array, input_size: int, dtype=jnp.float32) -> Params: ...

    def zero_carry(self, batch_size: int, dtype=jnp.float32) -> jax.Array: ...

    def step(self, params: Params, carry: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(h_{t-1} (B, N), x_t (B, D)) -> (h_t, h_t)`` with ``h_t = a_t * h_{t-1} + b_t``."""
        ...

    def coefficients(
        self, params: Params, xs: jax.Array
    ) -> tuple[tuple[jax.Array, jax.Array], Any]:
        """``((a, b), residuals)`` of every step of ``xs`` (T, B, D): ``a`` and ``b``
        ``(T, B, N)`` in the params' dtype; ``residuals`` a pytree of arrays, each with
        leading axes ``(T, B)`` (the engine cuts and regroups them in time with the steps),
        what ``coefficients_backward`` needs besides ``a``; ``()`` for none."""
        ...


#: The ``scan`` values of a :class:`LinearCell`.
SCANS = ("auto", "parallel", "sequential")

#: What every cell has.
CELL_METHODS = ("init", "zero_carry", "step")
#: What a :class:`FastCell` has besides; these names (but ``hidden_size``, ``forward``,
#: ``backward`` and ``hidden``, which other cells may have for their own reasons) mark a
#: cell that means to be one.
FAST_MEMBERS = (
    "n_blocks",
    "residual_blocks",
    "grad_blocks",
    "input_grads",
    "recurrent_grads",
    "input_kernel",
    "input_bias",
    "recurrent_kernel",
    "add_to_hidden",
    "assemble_grads",
    "hidden_size",
    "forward",
    "backward",
    "hidden",
)
FAST_MARKERS = FAST_MEMBERS[:-4]


def missing_methods(x) -> tuple[str, ...]:
    """The tier-1 methods (``init``, ``zero_carry``, ``step``) that ``x`` lacks."""
    return tuple(m for m in CELL_METHODS if not callable(getattr(x, m, None)))


def is_cell(x) -> bool:
    """Whether ``x`` has a cell's public face (``init``, ``zero_carry``, ``step``)."""
    return not isinstance(x, type) and not missing_methods(x)


def missing_fast_members(cell) -> tuple[str, ...]:
    """For a cell that has some :class:`FastCell` member, those it lacks (else ``()``)."""
    if not any(hasattr(cell, m) for m in FAST_MARKERS):
        return ()
    return tuple(m for m in FAST_MEMBERS if not hasattr(cell, m))


def is_fast(cell) -> bool:
    """Whether the engine takes the fast path (:class:`FastCell`) for ``cell``."""
    return all(hasattr(cell, m) for m in FAST_MEMBERS)


def is_linear(cell) -> bool:
    """Whether the engine walks ``cell`` as a linear recurrence (:class:`LinearCell`: it has
    ``coefficients``, and is not a :class:`FastCell`)."""
    return callable(getattr(cell, "coefficients", None)) and not is_fast(cell)


def has_coefficients_backward(cell) -> bool:
    """Whether a :class:`LinearCell` brings its own ``coefficients_backward``."""
    return callable(getattr(cell, "coefficients_backward", None))


def check_scan(where: str, scan) -> str:
    """``scan`` if it is one of :data:`SCANS`, else a ValueError naming it."""
    if not isinstance(scan, str) or scan not in SCANS:
        raise ValueError(f"{where}: scan must be one of {SCANS}; got {scan!r}")
    return scan


def has_step_backward(cell) -> bool:
    """Whether ``cell`` is a :class:`ManualCell` (its own ``step_backward``)."""
    return callable(getattr(cell, "step_backward", None))


def tier(cell) -> str:
    """``"fast"`` (:class:`FastCell`), ``"linear"`` (:class:`LinearCell`), ``"manual"``
    (:class:`ManualCell`) or ``"vjp"`` (a tier-1 :class:`Cell`, each step's backward by
    ``jax.vjp``)."""
    if is_fast(cell):
        return "fast"
    if is_linear(cell):
        return "linear"
    return "manual" if has_step_backward(cell) else "vjp"


def _probe_input_size(cell) -> int:
    """The input size the shape probes of a cell use: its ``input_size`` if it has one, else 1
    (a cell works for any D)."""
    size = getattr(cell, "input_size", None)
    return size if isinstance(size, int) and size > 0 else 1


def _probe_step(cell):
    """``(y is the new carry, y's shape)`` of ``cell.step`` traced once for shapes (params
    from ``init(key, D)`` with D from :func:`_probe_input_size`, B = 1); ``None`` if the
    trace fails (validation says why, with the real sizes)."""
    d = _probe_input_size(cell)
    try:
        params = jax.eval_shape(lambda: cell.init(jax.random.key(0), d, jnp.float32))
        carry = jax.eval_shape(lambda: cell.zero_carry(1, jnp.float32))
        x = jax.ShapeDtypeStruct((1, d), jnp.float32)
        closed = jax.make_jaxpr(cell.step)(params, carry, x)
    except Exception:  # noqa: BLE001 -- reported by validation with the real sizes
        return None
    n = len(jax.tree.leaves(carry))
    outs, avals = closed.jaxpr.outvars, closed.out_avals
    same = n == 1 and len(outs) == 2 and outs[0] is outs[1]
    return same, tuple(avals[-1].shape) if len(avals) == n + 1 else None


_PROBES: dict = {}


def _probed(cell):
    """:func:`_probe_step`, once per (hashable) cell."""
    try:
        return _PROBES[cell] if cell in _PROBES else _PROBES.setdefault(cell, _probe_step(cell))
    except TypeError:  # an unhashable cell: validation refuses it; probe without the cache
        return _probe_step(cell)


def has_output(cell) -> bool:
    """Whether a cell's outputs are not (a part of) its carry: a :class:`LinearCell` with an
    ``output`` map, or a tier-1 cell without ``hidden`` whose ``step`` returns, as Flax's
    cells do, an output ``y_t`` that is not its new carry itself (a tuple carry; or an array
    carry and an output computed from it). The engine then stacks the ``y_t`` of the steps as
    the outputs (zeros at a padded step), and the step's backward takes the errors on both.
    A cell with ``hidden``, or whose ``step`` returns ``(h, h)``, outputs its hidden state."""
    if is_fast(cell):
        return False
    if is_linear(cell):
        return callable(getattr(cell, "output", None))
    if callable(getattr(cell, "hidden", None)):
        return False
    probed = _probed(cell)
    if probed is None:  # the step cannot be traced: as before, outputs from the carry
        return not _array_carry(cell)
    return not probed[0]


def _array_carry(cell) -> bool:
    """Whether the cell's carry is one array."""
    try:
        carry = jax.eval_shape(lambda: cell.zero_carry(1, jnp.float32))
    except Exception:  # noqa: BLE001 -- validation reports it
        return True
    return hasattr(carry, "shape") and hasattr(carry, "dtype")


def carry_vector(cell, carry) -> jax.Array:
    """One array per step of an error or state on the carry (leading axes kept): the hidden
    part (:func:`hidden`) where a cell outputs its hidden state, else the carry's leaves
    joined on their last axis (what diagnostics keep of a step's error)."""
    if not has_output(cell) or callable(getattr(cell, "hidden", None)):
        return hidden(cell, carry)
    leaves = jax.tree.leaves(carry)
    return leaves[0] if len(leaves) == 1 else jnp.concatenate(leaves, axis=-1)


def add_to_carry_vector(cell, dcarry, v):
    """``dcarry`` with ``v`` added through the transpose of :func:`carry_vector`."""
    fn = lambda c: carry_vector(cell, c)  # noqa: E731
    out = jax.eval_shape(fn, dcarry)
    (ct,) = jax.linear_transpose(fn, dcarry)(v.astype(out.dtype))
    return jax.tree.map(lambda d, c: d + c.astype(d.dtype), dcarry, ct)


def hidden(cell, carry) -> jax.Array:
    """The hidden state of one step's ``carry``: ``cell.hidden(carry)``, or the carry itself
    when it is one array and the cell has no ``hidden``.

    Raises:
      TypeError: the carry is not one array and the cell has no ``hidden``.
    """
    fn = getattr(cell, "hidden", None)
    if fn is not None:
        return fn(carry)
    if hasattr(carry, "shape") and hasattr(carry, "dtype"):
        return carry
    name = type(cell).__name__
    raise TypeError(
        f"{name}: its carry is a {type(carry).__name__}, not one array, so the engine cannot "
        f"tell which part is the hidden state; give the cell a method "
        f"hidden(self, carry) -> (B, H) that picks it out (e.g. return carry['h'])"
    )


def hidden_seq(cell, states) -> jax.Array:
    """The hidden states of carries stacked over time (leading axes (T, B)): (T, B, H)."""
    if is_fast(cell) or getattr(cell, "hidden", None) is None:
        return hidden(cell, states)
    return jax.vmap(cell.hidden)(states)


def add_to_hidden(cell, dcarry, dh):
    """``dcarry`` (an error on one step's carry) with ``dh`` (B, H) added to its hidden part:
    the transpose of :func:`hidden` applied to ``dh``."""
    if is_fast(cell):
        return cell.add_to_hidden(dcarry, dh)
    if getattr(cell, "hidden", None) is None:
        return jax.tree.map(lambda d: d + dh.astype(d.dtype), dcarry)
    out = jax.eval_shape(cell.hidden, dcarry)
    (ct,) = jax.linear_transpose(cell.hidden, dcarry)(dh.astype(out.dtype))
    return jax.tree.map(lambda d, c: d + c.astype(d.dtype), dcarry, ct)


def output_size(cell) -> int:
    """H, the features per step of a cell's outputs: ``hidden_size`` for a
    :class:`FastCell`; for a cell whose outputs are not its carry (:func:`has_output`), its
    ``output_size`` attribute, else the size of the ``y_t`` its ``step`` returns; else the
    last axis of ``hidden(zero_carry(1))``."""
    if is_fast(cell):
        return cell.hidden_size
    if has_output(cell):
        size = getattr(cell, "output_size", None)
        if isinstance(size, int):
            return size
        probed = _probed(cell)
        if probed is None or probed[1] is None or len(probed[1]) != 2:
            raise TypeError(
                f"{type(cell).__name__}: the size of its outputs cannot be read from "
                f"step(params, carry, x_t) traced with D={_probe_input_size(cell)} (got "
                f"{None if probed is None else probed[1]}); step must return (carry, y_t) "
                "with y_t (B, H), or give the cell an int attribute output_size"
            )
        return probed[1][-1]
    shape = jax.eval_shape(lambda: hidden(cell, cell.zero_carry(1, jnp.float32))).shape
    if len(shape) != 2:
        raise TypeError(
            f"{type(cell).__name__}: the hidden state must have shape (B, H); "
            f"hidden(zero_carry(1)) has shape {shape}"
        )
    return shape[-1]
