"""Recurrent cells: Elman, LSTM and GRU, each with a hand-written step backward.

See :mod:`bptt_jax.cells._common` for the contract between a cell and the sequence engine.
"""

from typing import Union

from bptt_jax.cells.elman import Elman as Elman, ElmanParams as ElmanParams
from bptt_jax.cells.gru import GRU as GRU, GRUParams as GRUParams
from bptt_jax.cells.lstm import LSTM as LSTM, LSTMCarry as LSTMCarry, LSTMParams as LSTMParams

Cell = Union[Elman, LSTM, GRU]

PARAMS_TYPES = {Elman: ElmanParams, LSTM: LSTMParams, GRU: GRUParams}
