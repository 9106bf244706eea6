#!/usr/bin/env bash
# One device call: environment, then bench_gpu_full part by part (each its own JSON), then verify.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
log=$O/log.txt
{
nvidia-smi -L; nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv
python3 -c "import jax, torch, flax, optax, chex; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__, 'flax', flax.__version__, 'optax', optax.__version__)"
} 2>&1 | tee -a $log
common="out=$O plots=false timing.repeats=${REPEATS:-10}"
part() { local name=$1 secs=$2; shift 2
  echo "=== $name (limit ${secs}s) $(date +%T)" | tee -a $log
  timeout $secs python3 benchmarks/$name.py ${CONFIG:-bench_gpu_full} $common "$@" 2>&1 | tee -a $log
  echo "=== $name rc=${PIPESTATUS[0]} $(date +%T)" | tee -a $log
}
part manual_vs_autodiff ${T1:-110}
part peers ${T2:-100}
part truncation ${T3:-70} truncation.k="[16,64,256]"
part scaling ${T4:-60}
part floor ${T5:-30}
echo "=== verify $(date +%T)" | tee -a $log
timeout ${T6:-80} python3 -m bptt_jax verify 2>&1 | tail -25 | tee -a $log
echo "=== done $(date +%T)" | tee -a $log
