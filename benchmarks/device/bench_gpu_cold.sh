#!/usr/bin/env bash
# GPU call 1 (about 8-10 minutes; run with timeout_s=600):
# `bptt-jax bench bench_gpu` on an empty compilation cache, its wall time being the "cold"
# number (goal: under 10 minutes). Every part prints as it goes; bench.json, the log and the
# cache's size come back under $OUT. If it runs out of time, the log still says how far it got.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
export BPTT_JAX_CACHE_DIR=$(mktemp -d)
{
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__, torch.backends.cudnn.version())"
start=$(date +%s)
echo "=== bench_gpu cold $(date +%T)"
timeout ${LIMIT:-570} python3 -m bptt_jax bench bench_gpu out=$O plots=false
echo "=== exit $? after $(( $(date +%s) - start )) s; cache $(du -sh $BPTT_JAX_CACHE_DIR | cut -f1)"
} 2>&1 | tee $O/bench_gpu_cold.log
