#!/usr/bin/env bash
# Second device call (session 6, issue 13): the cudnn peer through the bench's own check
# (weight mapping and all), and the unroll factor 2 for every cell, float32 and bfloat16.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
{
echo "=== peers cudnn $(date +%T)"
timeout 110 python3 benchmarks/peers.py bench_gpu_full out=$O plots=false timing.repeats=5 \
  'peers.cells=["lstm"]' 'peers.sizes=[[100,64,128,256]]' 'peers.libraries=["cudnn"]' 2>&1 | tail -12
echo "=== unroll $(date +%T)"
timeout 170 python3 benchmarks/gpu_probe.py unroll \
  "gru:100,64,128,256:1,2;elman:100,64,128,256:1,2;elman:512,128,256,512:1,2;gru:512,128,256,512:2;lstm:100,64,128,256:1,2:bf16" 2>&1 | grep section
echo "=== done $(date +%T)"
} 2>&1 | tee -a $O/log2.txt
