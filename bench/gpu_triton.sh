#!/usr/bin/env bash
# Issue 5's GPU check, one command (meant to finish in under 8 minutes on an H100/H200-class GPU):
#   1. the kernel parity tests on the GPU (tests/test_kernels.py);
#   2. bench/gpu_triton.py: attention against SDPA and FlexAttention, a sweep of the kernels' tiles (matmul
#      against cuBLAS), the triton backend against transformers' T5 in float32/float16/bfloat16 and ONNX Runtime
#      CUDA, on base and large (arguments go to it);
#   3. fastinstructor bench --device cuda on the base checkpoint step 2 built: the harness's end-to-end table.
# Everything goes to $OUT when it is set (the project's device tool brings that folder back), else
# bench/results/, with the whole log in gpu-triton.log. A failing or timed-out step does not stop the later
# ones; the exit status says whether any failed.
#
# On a bare machine with torch, triton and transformers, the project is installed in place without its
# dependencies. The shared text does not travel with the device tool; from the repository root here:
#   mkdir -p .device && cp -r ../shared/data .device/      (.device/ is git-ignored)
# then run  FASTINSTRUCTOR_DATA=.device/data bash bench/gpu_triton.sh  carrying .device.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
RESULTS=${OUT:-bench/results}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
failed=()
step() {  # run a step, print how long it took (the device's time is scarce: the log says where it went)
    local start=$SECONDS
    "$@"
    local status=$?
    echo "gpu_triton.sh: $((SECONDS - start)) s, exit $status: $*"
    return $status
}
BASE=.models/gpu/instructor-base-random  # gpu_triton.py builds it; step 3 uses it
{
    if ! "$PY" -c "import fastinstructor.kernels" 2>/dev/null; then
        "$PY" -m pip install -q --no-deps --no-build-isolation -e . || exit 1
    fi
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" || exit 1
    if ! "$PY" -c "import sys; from fastinstructor.data import shared_data_dir; sys.exit(shared_data_dir() is None)"; then
        echo "gpu_triton.sh: the shared data was not found; point FASTINSTRUCTOR_DATA at its folder"
        exit 1
    fi
    # Each step has a time limit that keeps the whole under the device tool's 10 minutes per command: a step cut
    # short still leaves what it saved. Tests spread over processes when pytest-xdist is there (compiling each
    # test's kernels dominates).
    parallel=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
    step timeout 100 "$PY" -m pytest -q -p no:cacheprovider $parallel tests/test_kernels.py || failed+=("kernel tests")
    step timeout 320 "$PY" bench/gpu_triton.py --out "$RESULTS" "$@" || failed+=("gpu_triton.py")
    [ -f "$BASE/modules.json" ] || "$PY" -m fastinstructor make-test-model --preset base --out "$BASE"
    step timeout 120 "$PY" -m fastinstructor bench --model "$BASE" --device cuda \
        --backends reference,onnx,triton --texts 512 --repeat 2 --out "$RESULTS" || failed+=("bench")
    if ((${#failed[@]})); then
        echo "gpu_triton.sh: failed: ${failed[*]}"
        exit 1
    fi
    echo "gpu_triton.sh: every step passed"
} 2>&1 | tee "$RESULTS/gpu-triton.log"
