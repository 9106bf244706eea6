"""bptt_jax: Backpropagation Through Time for JAX, with the backward written by hand.

Cells (:class:`Elman`, :class:`LSTM`, :class:`GRU`, and the linear recurrences
:class:`MinGRU`, :class:`MinLSTM`, :class:`RGLRU` and :class:`LRU`) and models of them
(:class:`Stack`, :class:`Bidirectional`, :func:`stacked`) run over time-major sequences
with :func:`unroll` and :func:`sequence_loss`; ``jax.grad`` of either uses a hand-written
reverse ``lax.scan`` (the BPTT of Werbos 1990), verified against autodiff by
:func:`check_gradients`. Any cell of your own that meets :class:`Cell` (``init``,
``zero_carry``, ``step``) goes wherever a built-in one goes (:mod:`bptt_jax.cells.protocol`).

The names below are the public API. ``bptt_jax._engine`` (the sequence engine) and
``bptt_jax.validation`` are internals: their functions may change without notice.
"""

__version__ = "0.1.0"

from bptt_jax._engine import unroll as unroll
from bptt_jax.cells import GRU as GRU
from bptt_jax.cells import LRU as LRU
from bptt_jax.cells import LSTM as LSTM
from bptt_jax.cells import RGLRU as RGLRU
from bptt_jax.cells import Cell as Cell
from bptt_jax.cells import Elman as Elman
from bptt_jax.cells import ElmanParams as ElmanParams
from bptt_jax.cells import FastCell as FastCell
from bptt_jax.cells import GRUParams as GRUParams
from bptt_jax.cells import LinearCell as LinearCell
from bptt_jax.cells import LRUParams as LRUParams
from bptt_jax.cells import LSTMCarry as LSTMCarry
from bptt_jax.cells import LSTMParams as LSTMParams
from bptt_jax.cells import ManualCell as ManualCell
from bptt_jax.cells import MinGRU as MinGRU
from bptt_jax.cells import MinGRUParams as MinGRUParams
from bptt_jax.cells import MinLSTM as MinLSTM
from bptt_jax.cells import MinLSTMParams as MinLSTMParams
from bptt_jax.cells import RGLRUParams as RGLRUParams
from bptt_jax.checking import checked as checked
from bptt_jax.diagnostics import GradientFlow as GradientFlow
from bptt_jax.diagnostics import SpectralNorms as SpectralNorms
from bptt_jax.diagnostics import TruncationBias as TruncationBias
from bptt_jax.diagnostics import effective_horizon as effective_horizon
from bptt_jax.diagnostics import gradient_flow as gradient_flow
from bptt_jax.diagnostics import horizon_from_norms as horizon_from_norms
from bptt_jax.diagnostics import jacobian_norms as jacobian_norms
from bptt_jax.diagnostics import spectral_norms as spectral_norms
from bptt_jax.diagnostics import truncation_bias as truncation_bias
from bptt_jax.losses import LossAndGrads as LossAndGrads
from bptt_jax.losses import ReadoutParams as ReadoutParams
from bptt_jax.losses import init_readout as init_readout
from bptt_jax.losses import loss_and_grads as loss_and_grads
from bptt_jax.losses import sequence_loss as sequence_loss
from bptt_jax.models import Bidirectional as Bidirectional
from bptt_jax.models import LearnedCarry as LearnedCarry
from bptt_jax.models import LearnedCarryParams as LearnedCarryParams
from bptt_jax.models import Stack as Stack
from bptt_jax.models import stacked as stacked
from bptt_jax.train import TrainState as TrainState
from bptt_jax.train import trainer as trainer
from bptt_jax.truncated import Batch as Batch
from bptt_jax.truncated import tbptt as tbptt
from bptt_jax.verify import GradientReport as GradientReport
from bptt_jax.verify import check_gradients as check_gradients

__all__ = [
    "__version__",
    "Batch",
    "Bidirectional",
    "LearnedCarry",
    "LearnedCarryParams",
    "Cell",
    "check_gradients",
    "checked",
    "effective_horizon",
    "Elman",
    "ElmanParams",
    "FastCell",
    "gradient_flow",
    "GradientFlow",
    "GradientReport",
    "GRU",
    "GRUParams",
    "horizon_from_norms",
    "init_readout",
    "jacobian_norms",
    "LinearCell",
    "loss_and_grads",
    "LossAndGrads",
    "LSTM",
    "LSTMCarry",
    "LSTMParams",
    "ManualCell",
    "MinGRU",
    "MinGRUParams",
    "MinLSTM",
    "MinLSTMParams",
    "ReadoutParams",
    "RGLRU",
    "RGLRUParams",
    "LRU",
    "LRUParams",
    "sequence_loss",
    "spectral_norms",
    "SpectralNorms",
    "Stack",
    "stacked",
    "tbptt",
    "trainer",
    "TrainState",
    "truncation_bias",
    "TruncationBias",
    "unroll",
]
