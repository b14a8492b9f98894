#!/usr/bin/env bash
# Issue 15's GPU check, one command that reports every target and finishes in under 8 minutes on an H200:
#   1. the kernel parity tests on the GPU (tests/test_kernels.py), at most 60 s;
#   2. bench/gpu_triton.py (arguments go to it), at most 200 s: attention against SDPA and FlexAttention, the
#      forward pass of the triton backend (bf16, fp16, int8, float8) against transformers' T5 (fp32, bf16, fp16) and
#      ONNX Runtime CUDA on base and large, with the fraction of the bf16 matmul peak, and a sweep of the tiles;
#   3. bench/gpu_e2e.py, at most 180 s: load time and batch-1 latency (p50/p99), encode end to end (tokenization
#      included) against sentence-transformers float16 at its best batch size, int8/float8 end to end, and the host
#      pipeline alone beside the GPU forward pass. It replaces the former last step, `fastinstructor bench --device
#      cuda` (end-to-end and latency tables on base only, and its batch-1 latency came after a warm-up on the same
#      shapes): gpu_e2e.py measures both on base and large against the baseline the targets name;
#   4. bench/gpu_targets.py, at most 20 s (it imports torch): each target of issue 15 from the two result
#      files, met, not met or not measured.
# Everything goes to $OUT when it is set (the project's device tool brings that folder back), else bench/results/
# (a smoke run: a new temporary folder), with the whole log in gpu-triton.log (each step's seconds). A failing or
# timed-out step does not stop the later ones (each saves what it measured as it goes); the exit status says
# whether any failed. The limits add up to 460 s, plus installing the project.
#
#   bash bench/gpu_triton.sh --smoke    every step in smoke mode on the CPU (the Triton interpreter, the tiny preset,
#                                       toy sizes): checks the scripts, not the speed; the kernel tests are skipped
#                                       (they run on the CPU in the ordinary test suite). E2E_ARGS adds gpu_e2e.py's
#                                       options in either mode.
#
# On a bare machine with torch, triton, transformers and sentence-transformers, the project is installed in place
# without its dependencies. The shared text does not travel with the device tool; from the repository root here:
#   mkdir -p .device && cp -r ../shared/data .device/      (.device/ is git-ignored)
# then run  FASTINSTRUCTOR_DATA=.device/data bash bench/gpu_triton.sh  carrying .device.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
smoke=()
for arg in "$@"; do
    [ "$arg" = "--smoke" ] && smoke=(--smoke)
done
if ((${#smoke[@]})); then  # a smoke run's figures mean nothing: never into bench/results unless OUT says so
    RESULTS=${OUT:-$(mktemp -d -t gpu-triton-smoke.XXXXXX)}
else
    RESULTS=${OUT:-bench/results}
fi
mkdir -p "$RESULTS"
# gpu_triton.py's toy sizes in a smoke run (arguments given after them win)
triton_smoke=(--presets tiny --texts 4 --lengths 16,24 --attention-tokens 48 --tile-rows 40 --repeat 1)
failed=()
step() {  # run a step, print how long it took (the device's time is scarce: the log says where it went)
    local start=$SECONDS
    "$@"
    local status=$?
    echo "gpu_triton.sh: $((SECONDS - start)) s, exit $status: $*"
    return $status
}
{
    echo "gpu_triton.sh: results go to $RESULTS"
    if ! "$PY" -c "import fastinstructor.kernels" 2>/dev/null; then
        "$PY" -m pip install -q --no-deps --no-build-isolation -e . || exit 1
    fi
    if ((${#smoke[@]})); then
        echo "gpu_triton.sh: smoke run on the CPU; kernel tests skipped (the ordinary test suite runs them on the CPU)"
        "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" || exit 1
    else
        "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" || exit 1
        if ! "$PY" -c "import sys; from fastinstructor.data import shared_data_dir; sys.exit(shared_data_dir() is None)"; then
            echo "gpu_triton.sh: the shared data was not found; point FASTINSTRUCTOR_DATA at its folder"
            exit 1
        fi
        # Tests spread over processes when pytest-xdist is there (compiling each test's kernels dominates).
        parallel=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
        step timeout 60 "$PY" -m pytest -q -p no:cacheprovider $parallel tests/test_kernels.py || failed+=("kernel tests")
    fi
    step timeout 200 "$PY" bench/gpu_triton.py --out "$RESULTS" ${smoke[@]+"${triton_smoke[@]}"} "$@" \
        || failed+=("gpu_triton.py")
    # shellcheck disable=SC2086  # E2E_ARGS: words
    step timeout 180 "$PY" bench/gpu_e2e.py --out "$RESULTS" ${smoke[@]+"${smoke[@]}"} ${E2E_ARGS:-} \
        || failed+=("gpu_e2e.py")
    step timeout 20 "$PY" bench/gpu_targets.py --results "$RESULTS" ${smoke[@]+--presets tiny} \
        || failed+=("gpu_targets.py")
    if ((${#failed[@]})); then
        echo "gpu_triton.sh: failed: ${failed[*]}"
        exit 1
    fi
    echo "gpu_triton.sh: every step passed"
} 2>&1 | tee "$RESULTS/gpu-triton.log"
