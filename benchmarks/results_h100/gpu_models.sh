#!/usr/bin/env bash
# One device call (session 5, issue 12): environment, bptt-jax verify (cells and models on the
# GPU), then the models part of bench_gpu_full (stacked and bidirectional rows vs cuDNN and Flax).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
log=$O/log.txt
{
nvidia-smi -L
python3 -c "import jax, torch, flax; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__, 'flax', flax.__version__)"
echo "=== verify $(date +%T)"
timeout ${T1:-170} python3 -m bptt_jax verify 2>&1 | grep -v "^Elman\|^LSTM\|^GRU" | tail -40
echo "=== models $(date +%T)"
timeout ${T2:-300} python3 benchmarks/models.py bench_gpu_full out=$O plots=false timing.repeats=10 2>&1 | tail -60
echo "=== done $(date +%T)"
} 2>&1 | tee -a $log
