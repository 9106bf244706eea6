"""The sequence engine: hand-written BPTT for any model, head and schedule (private).

One module per axis, from the bottom up (none imports one above it):

* :mod:`.options`: measured constants and environment overrides;
* :mod:`.sharding`: where a batch sharded over devices enters;
* :mod:`.bundles`: the named pytrees that travel together (steps, head inputs, ...);
* :mod:`.step_rules`: masks, resets, truncation and clipping at one step;
* :mod:`.cell_scan`: the fast path, a built-in cell's forward and reverse scans;
* :mod:`.generic_scan`: any other cell, step by step;
* :mod:`.linear_scan`: a linear cell, chunk by chunk: coefficients at once, one scan;
* :mod:`.directions` and :mod:`.layers`: Bidirectional layers, Stacks, whole models;
* :mod:`.memory`: what is stored per step, segment and chunk-group sizes;
* :mod:`.time_sharded`: sequence parallelism, a linear cell's walk with time split over
  devices;
* :mod:`.schedules`: the full, checkpointed and chunked walks through time;
* :mod:`.autodiff`: the plain-scan reference (``backward="autodiff"``);
* :mod:`.vjp`: the one ``custom_vjp``; :mod:`.api`: :func:`unroll` and option resolution.

``README.md`` beside this file has the design notes and the measurements behind the
constants.
"""

from bptt_jax._engine.api import dropout_multipliers as dropout_multipliers
from bptt_jax._engine.api import plan as plan
from bptt_jax._engine.api import resolve_segment as resolve_segment
from bptt_jax._engine.api import resolve_time_axis as resolve_time_axis
from bptt_jax._engine.api import unroll as unroll
from bptt_jax._engine.autodiff import unroll_autodiff as unroll_autodiff
from bptt_jax._engine.bundles import Backprop as Backprop
from bptt_jax._engine.bundles import HeadInputs as HeadInputs
from bptt_jax._engine.bundles import OutputError as OutputError
from bptt_jax._engine.bundles import Primals as Primals
from bptt_jax._engine.bundles import Steps as Steps
from bptt_jax._engine.bundles import carries_of as carries_of
from bptt_jax._engine.bundles import output_error as output_error
from bptt_jax._engine.directions import by_direction as by_direction
from bptt_jax._engine.directions import reversal as reversal
from bptt_jax._engine.directions import reverse_time as reverse_time
from bptt_jax._engine.layers import cells_of as cells_of
from bptt_jax._engine.layers import from_layers as from_layers
from bptt_jax._engine.layers import layers_of as layers_of
from bptt_jax._engine.layers import model_backward as model_backward
from bptt_jax._engine.layers import model_forward as model_forward
from bptt_jax._engine.layers import per_layer as per_layer
from bptt_jax._engine.layers import scans as scans
from bptt_jax._engine.memory import default_segment as default_segment
from bptt_jax._engine.memory import segment_for_budget as segment_for_budget
from bptt_jax._engine.options import BACKWARDS as BACKWARDS
from bptt_jax._engine.step_rules import truncation_cuts as truncation_cuts
from bptt_jax._engine.time_sharded import check_cell as check_cell
from bptt_jax._engine.vjp import bptt as bptt
from bptt_jax._engine.vjp import bptt_bwd as bptt_bwd
from bptt_jax._engine.vjp import bptt_fwd as bptt_fwd
