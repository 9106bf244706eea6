#!/usr/bin/env bash
# GPU call 2 (about 5 minutes, at most 6.5): the questions that
# bench_gpu does not answer.
# 1. jax.experimental.rnn's cuDNN LSTM against lstm_ref when another program ran first (it
#    agreed when run first in a fresh process; the bench's peer, run after others, failed).
# 2. Compile and run time of the float32 LSTM gradient at 512/128/256/512 on an empty cache:
#    XLA's defaults, Triton GEMMs off, autotune level 2 (0 compiled in 1.8 s but ran 2.5-2.9x
#    slower). A setting that compiles much faster and runs as fast would go into the CLI.
# 3. A Bidirectional layer with its directions fused into one scan against one after the
#    other (bptt_jax._engine.options.FUSE_DIRECTIONS: off until this says it helps on a GPU; the
#    H100's BiGRU 512/128/256/512 took 62.6 ms against cuDNN's 45).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
{
echo "=== cudnn after another program $(date +%T)"
timeout 90 python3 benchmarks/gpu_probe.py cudnn after
for flags in "" "--xla_gpu_enable_triton_gemm=false" "--xla_gpu_autotune_level=2"; do
  echo "=== compile [$flags] $(date +%T)"
  BPTT_JAX_CACHE_DIR=$(mktemp -d) XLA_FLAGS="$flags" timeout 60 \
    python3 benchmarks/gpu_probe.py compile lstm manual
done
echo "=== bidirectional fused or not $(date +%T)"
timeout 120 python3 benchmarks/gpu_probe.py bidirectional
echo "=== done $(date +%T)"
} 2>&1 | tee $O/gpu_probes.log
