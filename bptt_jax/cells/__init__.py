"""Recurrent cells: Elman, LSTM and GRU, each with a hand-written step backward.

See :mod:`bptt_jax.cells._common` for the contract between a cell and the sequence engine.
"""

from bptt_jax.cells.elman import Elman as Elman
from bptt_jax.cells.elman import ElmanParams as ElmanParams
from bptt_jax.cells.gru import GRU as GRU
from bptt_jax.cells.gru import GRUParams as GRUParams
from bptt_jax.cells.lstm import LSTM as LSTM
from bptt_jax.cells.lstm import LSTMCarry as LSTMCarry
from bptt_jax.cells.lstm import LSTMParams as LSTMParams

PARAMS_TYPES = {Elman: ElmanParams, LSTM: LSTMParams, GRU: GRUParams}
