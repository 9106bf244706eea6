#!/usr/bin/env bash
# One device call (session 6, issue 13): the jax.experimental.rnn LSTM check, the scans'
# unroll factor, compile time (cold and warm persistent cache, XLA's autotuning off), then the
# precision part of bench_gpu_full (float32 and bfloat16 compute against PyTorch cuDNN in float32
# and under bfloat16 autocast).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
log=$O/log.txt
P="timeout ${TP:-60} python3 benchmarks/gpu_probe.py"
{
nvidia-smi -L
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__, 'cudnn', torch.backends.cudnn.version())"
echo "=== cudnn $(date +%T)"; $P cudnn 2>&1 | grep -v Warning | tail -8
echo "=== compile cold $(date +%T)"; BPTT_JAX_CACHE_DIR=/tmp/cc $P compile 2>&1 | tail -4
echo "=== compile warm $(date +%T)"; BPTT_JAX_CACHE_DIR=/tmp/cc $P compile 2>&1 | tail -4
echo "=== compile autotune 0 $(date +%T)"; XLA_FLAGS=--xla_gpu_autotune_level=0 $P compile 2>&1 | tail -4
echo "=== unroll $(date +%T)"; TP=150 timeout 150 python3 benchmarks/gpu_probe.py unroll 2>&1 | tail -12
echo "=== precision $(date +%T)"
timeout ${T2:-230} python3 benchmarks/precision.py bench_gpu_full out=$O plots=false timing.repeats=10 \
  'precision.cells=["lstm","gru"]' 'precision.sizes=[[100,64,128,256],[512,128,256,512]]' 2>&1 | tail -30
echo "=== done $(date +%T)"
} 2>&1 | tee -a $log
