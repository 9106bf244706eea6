"""Recurrent cells: Elman, LSTM and GRU, each with a hand-written step backward; MinGRU,
MinLSTM, RGLRU and LRU, linear recurrences with a hand-written parallel-scan backward; and the
contract any cell of your own meets (:mod:`bptt_jax.cells.protocol`): :class:`Cell` (tier 1:
``init``, ``zero_carry``, ``step``), :class:`ManualCell` (tier 2: plus a hand-written
``step_backward``), :class:`FastCell` (the fast path of the built-in cells) and
:class:`LinearCell` (a diagonal linear recurrence whose coefficients come from the inputs).
"""

from bptt_jax.cells.elman import Elman as Elman
from bptt_jax.cells.elman import ElmanParams as ElmanParams
from bptt_jax.cells.gru import GRU as GRU
from bptt_jax.cells.gru import GRUParams as GRUParams
from bptt_jax.cells.lru import LRU as LRU
from bptt_jax.cells.lru import LRUParams as LRUParams
from bptt_jax.cells.lstm import LSTM as LSTM
from bptt_jax.cells.lstm import LSTMCarry as LSTMCarry
from bptt_jax.cells.lstm import LSTMParams as LSTMParams
from bptt_jax.cells.mingru import MinGRU as MinGRU
from bptt_jax.cells.mingru import MinGRUParams as MinGRUParams
from bptt_jax.cells.minlstm import MinLSTM as MinLSTM
from bptt_jax.cells.minlstm import MinLSTMParams as MinLSTMParams
from bptt_jax.cells.protocol import Cell as Cell
from bptt_jax.cells.protocol import FastCell as FastCell
from bptt_jax.cells.protocol import LinearCell as LinearCell
from bptt_jax.cells.protocol import ManualCell as ManualCell
from bptt_jax.cells.protocol import matmul as matmul
from bptt_jax.cells.rglru import RGLRU as RGLRU
from bptt_jax.cells.rglru import RGLRUParams as RGLRUParams

#: The built-in cells' params types (their params are checked field by field; any other
#: cell's against what its ``init`` returns).
PARAMS_TYPES = {Elman: ElmanParams, LSTM: LSTMParams, GRU: GRUParams}
