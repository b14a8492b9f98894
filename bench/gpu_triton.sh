#!/usr/bin/env bash
# Issue 5's GPU check, one command (under 8 minutes on an H100/H200-class GPU): the kernel parity tests on
# the GPU, then bench/gpu_triton.py (attention vs SDPA and FlexAttention; the triton backend vs reference
# and ONNX Runtime CUDA on base and large), then fastinstructor bench on the base preset it built.
# Results go to bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
"$PY" -m pytest -q tests/test_kernels.py
"$PY" bench/gpu_triton.py "$@"
# The harness's table on the GPU: the same columns as the CPU result the README quotes.
"$PY" -m fastinstructor bench --model .models/gpu/instructor-base-random --device cuda \
    --backends reference,onnx,triton --texts 1024 --latency-batches 16
