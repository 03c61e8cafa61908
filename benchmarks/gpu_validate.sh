#!/usr/bin/env bash
# Validate csp_kernels on the GPU machine in one command of at most ~9 minutes (no network, no
# package registry: its own python3, torch, Triton and CUDA toolkit). Steps, in order, each
# under its own timeout and within one overall deadline, each logging as it goes:
#   probe      GPU, driver, python3 / torch / Triton / nvcc versions, which tools are present
#   build      the extension for this GPU's architecture only (MAX_JOBS=16)
#   smoke      benchmarks.gpu_smoke: every CUDA and Triton kernel once in bf16/fp32/fp64
#              against float64 on the CPU
#   memcheck   the smoke run under compute-sanitizer memcheck (where compute-sanitizer works)
#   racecheck  the reductions' smoke run (float32) under compute-sanitizer racecheck
#   tests      python3 -m pytest tests -k cuda (with pytest-xdist where installed), but for
#              tests/test_distributed.py, which the next step runs
#   distributed  tests/test_distributed.py -k cuda: synchronized BatchNorm over 2 gloo ranks,
#              both on cuda:0 (NCCL refuses two ranks on one device), against the reference
#   kernels    benchmarks.gpu_kernels: GB/s of each kernel against a measured copy
#   bench      the standard GPU configurations (pdb-gpu, trans-gpu, efm-gpu; then c2f-gpu, cross-gpu) with eager,
#              fused and fused-cuda, few rounds, merged into results/<date>-<gpu>.json
# torch.compile, max-autotune and the ahead-of-time compile (benchmarks.gpu_compile) stay off
# the GPU: CI runs the last, and the others take minutes the lease does not have.
#
#   bash benchmarks/gpu_validate.sh [STEP ...]      (default: all, in the order above)
#
# Everything lands in $WORK (benchmarks/out/gpu-validate-<time>) and, after every step, in
# $OUT/gpu_validate.tar.gz plus $OUT/summary.txt (2 files, under the device tool's 8), so a
# run cut short still returns what it did. DEADLINE (seconds, default 530) bounds the whole
# run; the exit status is non-zero if any step failed or was skipped for lack of time.
set -u

cd "$(dirname "$0")/.."
START=$SECONDS
DEADLINE="${DEADLINE:-530}"
STAMP="$(date +%Y%m%d-%H%M%S)"
WORK="${WORK:-benchmarks/out/gpu-validate-$STAMP}"
mkdir -p "$WORK/logs"
WORK="$(cd "$WORK" && pwd)"
OUT="${OUT:-$WORK}"
mkdir -p "$OUT"
SUMMARY="$WORK/summary.txt"
PYTHON=python3
FAILED=0
export PYTHONUNBUFFERED=1

pack() {  # the results so far, into $OUT
    [ "$OUT" = "$WORK" ] && return 0
    tar czf "$OUT/gpu_validate.tar.gz" -C "$(dirname "$WORK")" "$(basename "$WORK")" 2>/dev/null
    cp "$SUMMARY" "$OUT/summary.txt"
}

run_step() {  # run_step NAME BUDGET COMMAND...: at most BUDGET seconds, and never past the deadline
    local name="$1" budget="$2"; shift 2
    local left=$((DEADLINE - (SECONDS - START) - 10))
    [ "$left" -lt "$budget" ] && budget=$left
    if [ "$budget" -lt 10 ]; then
        echo "-- $name: skipped, ${left}s left before the deadline" | tee -a "$SUMMARY"
        FAILED=1
        pack
        return 1
    fi
    local t0=$SECONDS
    echo "== $name (timeout ${budget}s)" | tee -a "$SUMMARY"
    timeout -k 5 "$budget" "$@" > "$WORK/logs/$name.log" 2>&1
    local rc=$?
    tail -n 15 "$WORK/logs/$name.log" | sed 's/^/   /'
    echo "   $name: exit $rc after $((SECONDS - t0)) s$([ $rc -eq 124 ] && echo ' (timed out)')" | tee -a "$SUMMARY"
    [ $rc -ne 0 ] && FAILED=1
    pack
    return $rc
}

probe() {
    echo "csp_kernels GPU validation, $(date -u +%FT%TZ), commit $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader
    "$PYTHON" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "triton", triton.__version__, "gpu", torch.cuda.get_device_name(),
"capability", torch.cuda.get_device_capability())'
    command -v nvcc > /dev/null && nvcc --version | tail -n 2
    for tool in compute-sanitizer ncu; do echo "$tool: $(command -v $tool || echo absent)"; done
    "$PYTHON" -c 'import xdist' 2> /dev/null && echo "pytest-xdist: present" || echo "pytest-xdist: absent"
}

build() {
    local arch
    arch="$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')" || return 1
    rm -rf build csp_kernels/_C*.so
    MAX_JOBS=16 TORCH_CUDA_ARCH_LIST="$arch" "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -e . \
        || MAX_JOBS=16 TORCH_CUDA_ARCH_LIST="$arch" "$PYTHON" setup.py build_ext --inplace || return 1
    "$PYTHON" -c 'import csp_kernels, json, sys; info = csp_kernels.build_info(); print(json.dumps(info, indent=1))
sys.exit(0 if info["cuda"] else 1)'
}

sanitizer() {  # sanitizer TOOL SMOKE-ARGS...: the smoke run under compute-sanitizer, where it works
    local tool="$1"; shift
    if ! command -v compute-sanitizer > /dev/null; then
        echo "compute-sanitizer absent: skipped"
        return 0
    fi
    # The caching allocator would hide out-of-bounds accesses inside its blocks.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 3 \
        "$PYTHON" -m benchmarks.gpu_smoke "$@"
}

cuda_tests() {
    local parallel=()
    "$PYTHON" -c 'import xdist' 2> /dev/null && parallel=(-n 8)
    "$PYTHON" -m pytest tests -q -p no:cacheprovider -k cuda --ignore=tests/test_distributed.py "${parallel[@]}" \
        --junitxml="$WORK/cuda_tests.xml"
}

distributed_tests() {  # one spawn of 2 gloo processes serves every case; xdist would spawn one per worker
    "$PYTHON" -m pytest tests/test_distributed.py -q -p no:cacheprovider -k cuda --junitxml="$WORK/distributed.xml"
}

bench() {
    local config rc=0 gpu
    for config in pdb-gpu trans-gpu efm-gpu; do
        echo "-- $config"
        "$PYTHON" -m benchmarks all --device cuda --config "$config" --variants eager,fused,fused-cuda \
            --rounds 3 --warmup 1 --out "$WORK/bench/$config" || rc=1
    done
    for config in c2f-gpu cross-gpu; do  # last: the step's timeout may cut them, not the block configurations
        echo "-- $config"
        "$PYTHON" -m benchmarks all --device cuda --config "$config" --variants eager,fused \
            --rounds 3 --warmup 1 --out "$WORK/bench/$config" || rc=1
    done
    gpu="$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "-"))')"
    mkdir -p "$WORK/results"
    "$PYTHON" - "$WORK/results/$(date +%Y-%m-%d)-$gpu.json" "$WORK"/bench/*/results.json <<'PY' || rc=1
import json, sys
from pathlib import Path
from benchmarks.report import merge_records, write_json
records = [json.loads(Path(p).read_text()) for p in sys.argv[2:] if Path(p).exists()]
write_json(merge_records(records), Path(sys.argv[1]))
print(f"merged {len(records)} runs into {sys.argv[1]} (commit it under benchmarks/results/)")
PY
    return $rc
}

STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(probe build smoke memcheck racecheck tests distributed kernels bench)
: > "$SUMMARY"
for step in "${STEPS[@]}"; do
    case "$step" in
        probe) run_step probe 30 bash -c "$(declare -f probe); PYTHON=$PYTHON probe" ;;
        build) run_step build 200 bash -c "$(declare -f build); PYTHON=$PYTHON build" ;;
        smoke) run_step smoke 60 "$PYTHON" -m benchmarks.gpu_smoke ;;
        memcheck) run_step memcheck 75 bash -c "$(declare -f sanitizer); PYTHON=$PYTHON sanitizer memcheck" ;;
        racecheck) run_step racecheck 45 bash -c \
            "$(declare -f sanitizer); PYTHON=$PYTHON sanitizer racecheck --only reductions --dtypes fp32" ;;
        tests) run_step tests 120 bash -c "$(declare -f cuda_tests); PYTHON=$PYTHON WORK=$WORK cuda_tests" ;;
        distributed) run_step distributed 60 bash -c \
            "$(declare -f distributed_tests); PYTHON=$PYTHON WORK=$WORK distributed_tests" ;;
        kernels) run_step kernels 45 "$PYTHON" -m benchmarks.gpu_kernels --out "$WORK/gpu_kernels.json" ;;
        bench) run_step bench 240 bash -c "$(declare -f bench); PYTHON=$PYTHON WORK=$WORK bench" ;;
        *) echo "unknown step $step (probe build smoke memcheck racecheck tests distributed kernels bench)" \
               | tee -a "$SUMMARY"
           FAILED=1 ;;
    esac
done
echo "total $((SECONDS - START)) s; results in $WORK$([ "$OUT" != "$WORK" ] && echo " and $OUT/gpu_validate.tar.gz")" \
    | tee -a "$SUMMARY"
pack
exit $FAILED
