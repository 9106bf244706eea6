"""Gradient-flow diagnostics: how far back in time the error of BPTT reaches.

Everything here is read off the hand-written backward (no autodiff of the model):

* :func:`gradient_flow` gives, per time step, ``||delta^h_t||`` (the error that reaches each
  hidden state, ``dL/dh_t`` in total), ``||dh_T/dh_t||`` (how much the last state depends on
  state t, independent of the loss) and one number, the effective horizon;
* :func:`jacobian_norms` and :func:`effective_horizon` give the last two alone, cheap enough
  to log from a training loop;
* :func:`spectral_norms` gives the largest singular value of the recurrent kernel, whole and
  per gate block;
* :func:`truncation_bias` compares truncated-k gradients with the full gradient over a sweep
  of k (cosine similarity and norm ratio).

Each takes a cell or a model (a :class:`~bptt_jax.Stack` or :class:`~bptt_jax.Bidirectional`).
For a model the results are per layer and direction, in the model's structure (as its params:
a tuple with one entry per layer for a Stack, a ``(forward, backward)`` pair for a
Bidirectional layer), each entry what the cell version computes for that cell inside the
model: its own states and carries, the error of the model's loss on its hidden states, time
indexed forward for both directions. :func:`truncation_bias` takes a Stack of cells (per
layer); truncation is undefined for bidirectional models. One implementation serves both: a
bare cell is a model of one layer and one direction, whose one result is returned as is.

``bptt-jax diagnose`` (:mod:`bptt_jax.cli.diagnose`) runs all of it on the adding problem
and plots it. The implementation is in the private package :mod:`bptt_jax._diagnostics`, one
module per concern.

References:
  Werbos, "Backpropagation through time: what it does and how to do it", Proc. IEEE 1990.
  Bengio, Simard & Frasconi, "Learning long-term dependencies with gradient descent is
  difficult", IEEE Trans. Neural Networks 1994.
  Pascanu, Mikolov & Bengio, "On the difficulty of training recurrent neural networks",
  ICML 2013.
  Williams & Peng, "An efficient gradient-based algorithm for on-line training of recurrent
  network trajectories", Neural Computation 1990.
"""

from bptt_jax._diagnostics.cells import PROBE_BATCH as PROBE_BATCH
from bptt_jax._diagnostics.flow import GradientFlow as GradientFlow
from bptt_jax._diagnostics.flow import gradient_flow as gradient_flow
from bptt_jax._diagnostics.horizon import UNDEFINED_HORIZON as UNDEFINED_HORIZON
from bptt_jax._diagnostics.horizon import horizon_from_norms as horizon_from_norms
from bptt_jax._diagnostics.jacobians import effective_horizon as effective_horizon
from bptt_jax._diagnostics.jacobians import jacobian_norms as jacobian_norms
from bptt_jax._diagnostics.spectral import BLOCK_NAMES as BLOCK_NAMES
from bptt_jax._diagnostics.spectral import SpectralNorms as SpectralNorms
from bptt_jax._diagnostics.spectral import spectral_norms as spectral_norms
from bptt_jax._diagnostics.truncation import TruncationBias as TruncationBias
from bptt_jax._diagnostics.truncation import truncation_bias as truncation_bias

__all__ = [
    "BLOCK_NAMES",
    "PROBE_BATCH",
    "UNDEFINED_HORIZON",
    "GradientFlow",
    "SpectralNorms",
    "TruncationBias",
    "effective_horizon",
    "gradient_flow",
    "horizon_from_norms",
    "jacobian_norms",
    "spectral_norms",
    "truncation_bias",
]
