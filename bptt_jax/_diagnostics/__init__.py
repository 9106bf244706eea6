"""The diagnostics' implementation (private): :mod:`bptt_jax.diagnostics` re-exports it.

One module per concern, from the bottom up (none imports one above it):

* :mod:`.horizon`: the effective horizon of a curve of norms;
* :mod:`.cells`: a model as a list of cells (a bare cell: one layer, one direction), its one
  forward under a loss head, results put back in the model's structure;
* :mod:`.jacobians`: each cell's ``||dh_T/d carry_t||_F`` from probes on its reverse scan;
* :mod:`.flow`: the error reaching each cell's hidden states, with its Jacobian norms;
* :mod:`.spectral`: the recurrent kernels' largest singular values;
* :mod:`.truncation`: truncated-k gradients against the full one.
"""
