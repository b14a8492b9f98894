#!/usr/bin/env bash
# Issue 4's GPU check, one command (a few minutes on a CUDA machine with onnxruntime-gpu):
# export the large preset in float16, check parity against the float32 reference on the GPU, and time
# ONNX Runtime CUDA float16 against PyTorch float16. Results go to bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
"$PY" -c "import onnxruntime as o; assert 'CUDAExecutionProvider' in o.get_available_providers(), o.get_available_providers()"
"$PY" bench/gpu_onnx.py "$@"
