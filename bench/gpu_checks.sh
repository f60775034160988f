#!/usr/bin/env bash
# Every outstanding GPU check of the project in one device call (about 6 minutes), most important
# first, each under its own time limit so that one slow part cannot starve the rest. Logs and
# result tables land in $OUT. Meant for the device tool (no network there: nothing is
# downloaded; its image has torch, triton, pytest, pytest-benchmark, numpy, tqdm, matplotlib):
#
#     bash bench/gpu_checks.sh            # OUT defaults to /tmp/gpu_checks
#
# Then commit the tables under bench/results/*/<gpu>/ and, if every cuda test passed, set
# AUTO_USES_TRITON = True in ekfac_triton/backend.py (backend="auto" then picks the Triton kernels on CUDA).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

python3 -m pip install -q --no-deps --no-build-isolation --no-index . || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

worst=0
run() {  # run NAME SECONDS COMMAND...: the command's output in $OUT/NAME.log, its status after it
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "=== $name rc=$rc"
    [ "$rc" -gt "$worst" ] && worst=$rc
}

# 1. kernels, MAC's fused update (attention included) and the compiled/graphed step vs references
run cuda_tests 120 python3 -m pytest -q -m cuda -p no:cacheprovider \
    tests/kernels/test_triton.py tests/kernels/test_mac_update.py tests/optimizer/test_compiled_step.py
# 2. kernel microbenchmarks against torch's own ops (TFLOP/s and GB/s columns)
run kernel_bench 60 python3 -m pytest -q -p no:cacheprovider -s bench/kernels/test_bench_kernels.py
# 3. per-step time and memory of SGD/AdamW/EKFAC/K-FAC/MAC on the autoencoder, VGG11 and the MLP stack
run step_time 100 python3 -m bench.step_time --no-progress --warmup 10 --steps 30 --out "$OUT/step_time"
# 4. eager vs compiled model vs compiled step vs CUDA graphs, launches per step
run compile_step 90 python3 -m bench.compile_step --out "$OUT/compile_step"
exit "$worst"   # non-zero when any part failed or ran out of time
