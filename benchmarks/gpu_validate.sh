#!/usr/bin/env bash
# Validate csp_kernels on a GPU machine with no network (torch + CUDA toolkit + Triton already
# installed): build the extension against the torch there, run the test suite on CUDA, run the
# CUDA tests under compute-sanitizer memcheck, measure copy bandwidth and matmul peaks, run the
# GPU benchmarks, and write everything under one folder.
#
#   benchmarks/gpu_validate.sh [--out DIR] [STEP ...]
#
# DIR defaults to $OUT, else benchmarks/out/gpu-validate-<date>. STEPs run in order (default: all):
#   build        pip install --no-build-isolation --no-deps -e . (setup.py build_ext --inplace
#                as fallback), for this GPU's architecture only unless TORCH_CUDA_ARCH_LIST is set
#   test         python -m pytest tests -q
#   sanitize     compute-sanitizer --tool memcheck python -m pytest tests -q -k cuda (if found)
#   compile      python -m benchmarks.gpu_compile: registers, spills, 16-byte accesses of the
#                Triton kernels (sm_80, sm_90) and of the built CUDA kernels, into DIR/gpu_compile.txt
#   roofline     python -m benchmarks.roofline
#   bench        bench-pdb-gpu bench-trans-gpu bench-efm-gpu, then the merged results file
#   bench-NAME   python -m benchmarks all --device cuda --config NAME  (one configuration)
#   results      merge DIR/bench/*/results.json into DIR/results/<date>-<gpu>.json and
#                benchmarks/results/<date>-<gpu>.json
# Each step runs under `timeout $STEP_TIMEOUT` (default 570 s, below a 10-minute command limit)
# and logs to DIR/logs/<step>.log; the script goes on after a failure, writes DIR/summary.txt
# and exits non-zero if any step failed. Extra benchmark flags: $BENCH_ARGS (e.g.
# "--variants eager,compile,fused" to leave out max-autotune).
set -u

cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/out/gpu-validate-$(date +%Y%m%d-%H%M%S)}"
if [ "${1:-}" = "--out" ]; then OUT_DIR="$2"; shift 2; fi
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(build test sanitize compile roofline bench)
mkdir -p "$OUT_DIR/logs"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
STEP_TIMEOUT="${STEP_TIMEOUT:-570}"
SUMMARY="$OUT_DIR/summary.txt"
FAILED=0

run_step() {  # run_step NAME COMMAND...: time it, log it, record its exit status
    local name="$1"; shift
    local start=$SECONDS
    echo "== $name: $*" | tee -a "$SUMMARY"
    timeout "$STEP_TIMEOUT" bash -c '"$@"' _ "$@" > "$OUT_DIR/logs/$name.log" 2>&1
    local rc=$?
    tail -n 5 "$OUT_DIR/logs/$name.log"
    echo "   $name: exit $rc after $((SECONDS - start)) s" | tee -a "$SUMMARY"
    [ $rc -ne 0 ] && FAILED=1
    return $rc
}

build() {
    export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
    export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$("$PYTHON" -c \
        'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}"
    "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -e . \
        || "$PYTHON" setup.py build_ext --inplace
    "$PYTHON" -c 'import csp_kernels, pprint; pprint.pprint(csp_kernels.build_info())'
}

sanitize() {
    if ! command -v compute-sanitizer > /dev/null; then
        echo "compute-sanitizer not found: skipped"
        return 0
    fi
    # the caching allocator would hide out-of-bounds accesses inside its blocks
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
        "$PYTHON" -m pytest tests -q -x -k cuda
}

bench_config() {  # bench_config NAME
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
    "$PYTHON" -m benchmarks all --device cuda --config "$1" --out "$OUT_DIR/bench/$1" \
        ${BENCH_ARGS:-}
}

merge_results() {
    local gpu
    gpu="$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "-"))')"
    local name
    name="$(date +%Y-%m-%d)-$gpu.json"
    mkdir -p "$OUT_DIR/results" benchmarks/results
    "$PYTHON" - "$OUT_DIR/results/$name" "$OUT_DIR"/bench/*/results.json <<'EOF'
import json, sys
from pathlib import Path
from benchmarks.report import merge_records, write_json
records = [json.loads(Path(p).read_text()) for p in sys.argv[2:]]
write_json(merge_records(records), Path(sys.argv[1]))
print(f"merged {len(records)} runs into {sys.argv[1]}")
EOF
    cp "$OUT_DIR/results/$name" "benchmarks/results/$name"
}

# steps run as `timeout ... bash -c`, which sees exported functions and variables only
export -f build sanitize bench_config merge_results
export PYTHON OUT_DIR BENCH_ARGS="${BENCH_ARGS:-}"

{
    echo "csp_kernels GPU validation, $(date -u +%FT%TZ), commit $(git rev-parse HEAD 2>/dev/null)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    "$PYTHON" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch",
torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)' 2>&1
    command -v nvcc > /dev/null && nvcc --version | tail -n 2
} | tee "$SUMMARY"

for step in "${STEPS[@]}"; do
    case "$step" in
        build) run_step build build ;;
        test) run_step test "$PYTHON" -m pytest tests -q ;;
        sanitize) run_step sanitize sanitize ;;
        compile)
            run_step compile bash -c '"$1" -m benchmarks.gpu_compile > "$2/gpu_compile.txt"' _ "$PYTHON" "$OUT_DIR" ;;
        roofline)
            run_step roofline "$PYTHON" -m benchmarks.roofline --out "$OUT_DIR/roofline.json" ;;
        bench)
            for config in pdb-gpu trans-gpu efm-gpu; do
                run_step "bench-$config" bench_config "$config"
            done
            run_step results merge_results ;;
        bench-*) run_step "$step" bench_config "${step#bench-}" ;;
        results) run_step results merge_results ;;
        *) echo "unknown step $step (build, test, sanitize, compile, roofline, bench, bench-NAME, results)"
           FAILED=1 ;;
    esac
done
echo "summary: $SUMMARY"
exit $FAILED
