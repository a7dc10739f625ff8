#!/usr/bin/env bash
# One call on a lent GPU machine (the image's python3 has torch, triton, nvcc): build attnops._C
# with its CUDA kernels, run the test suite on CUDA tensors, context parallelism on NCCL, then a GPU
# benchmark suite. Logs go to OUT_DIR as they are written (a call cut short still returns them); the
# benchmark's results to OUT_DIR/bench.tar.gz (one file: the device tool returns few).
# Usage: benchmarks/gpu_check.sh OUT_DIR [TEST_SECONDS] [BENCH_SECONDS] [extra bench args...]
# Environment: BUILD=0 skips the extension (the Triton kernels need none; CPU tensors then run the
# pure-PyTorch fallback); TESTS="pytest arguments" (default: every CUDA test of the suite); CP_SECONDS
# (default 120; 0 skips benchmarks/cp_cuda_smoke.py); SUITE (default gpu); TEST_WORKERS (default 16:
# compiling the kernels, not running them, is what the tests spend their time on); PROFILE=script.py (90 s).
set -u
OUT=${1:?output directory}; TEST_S=${2:-240}; BENCH_S=${3:-300}; shift $(( $# < 3 ? $# : 3 ))
mkdir -p "$OUT"; BENCH_DIR=$(mktemp -d)/bench
trap '[ -d "$BENCH_DIR" ] && tar -C "$(dirname "$BENCH_DIR")" -czf "$OUT/bench.tar.gz" bench' EXIT
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/env.txt"
python3 -c "import flash_attn; print('flash_attn', flash_attn.__version__)" 2>/dev/null | tee -a "$OUT/env.txt"
if [ "${BUILD:-1}" != 0 ]; then
  t0=$(date +%s)
  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1 \
    || { tail -40 "$OUT/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - t0 )) s"
fi
python3 -W ignore -c "import attnops.core.dispatch as d; print({b: d.is_available(b) for b in d.BACKENDS})"
if [ "$TEST_S" -gt 0 ]; then
  t0=$(date +%s)
  # shellcheck disable=SC2086
  timeout "$TEST_S" python3 -m pytest ${TESTS:-tests -k "cuda or decode or compile or mqa"} -v -n "${TEST_WORKERS:-16}" \
    -p no:cacheprovider --timeout 200 --durations=10 >"$OUT/tests.log" 2>&1
  echo "tests exit $? in $(( $(date +%s) - t0 )) s"; grep -E "FAILED|ERROR|passed|failed|^[0-9.]+s " "$OUT/tests.log" | tail -40
fi
if [ "${CP_SECONDS:-120}" -gt 0 ]; then
  timeout "${CP_SECONDS:-120}" python3 -W ignore benchmarks/cp_cuda_smoke.py >"$OUT/cp.log" 2>&1
  echo "context parallel exit $?"; tail -12 "$OUT/cp.log"
fi
if [ -n "${PROFILE:-}" ]; then
  timeout 90 python3 "$PROFILE" >"$OUT/profile.log" 2>&1; echo "profile exit $?"
fi
if [ "$BENCH_S" -gt 0 ]; then
  timeout "$BENCH_S" python3 -m attnops.bench --suite "${SUITE:-gpu}" --device cuda --out "$BENCH_DIR" "$@" \
    >"$OUT/bench.log" 2>&1
  echo "bench exit $?"; tail -45 "$OUT/bench.log"
fi
