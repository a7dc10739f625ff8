#!/usr/bin/env bash
# One call on a lent GPU machine (the image's python3 has torch, triton, nvcc): build attnops._C
# with its CUDA kernels, run the test suite on CUDA tensors, then the GPU benchmark suite.
# Everything it writes lands in OUT_DIR/gpu_check.tar.gz (one file: the device tool returns few).
# Usage: benchmarks/gpu_check.sh OUT_DIR [TEST_SECONDS] [BENCH_SECONDS] [extra bench args...]
set -u
OUT=${1:?output directory}; TEST_S=${2:-240}; BENCH_S=${3:-300}; shift $(( $# < 3 ? $# : 3 ))
W=$(mktemp -d)/gpu_check; mkdir -p "$W" "$OUT"
trap 'tar -C "$(dirname "$W")" -czf "$OUT/gpu_check.tar.gz" gpu_check' EXIT
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$W/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$W/env.txt"
t0=$(date +%s)
TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 setup.py -q build_ext --inplace >"$W/build.log" 2>&1 \
  || { tail -40 "$W/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
python3 -c "import attnops.core.dispatch as d; print({b: d.is_available(b) for b in d.BACKENDS})"
if [ "$TEST_S" -gt 0 ]; then
  timeout "$TEST_S" python3 -m pytest tests -v -n 8 -p no:cacheprovider --timeout 200 --durations=10 \
    -k "cuda or decode or compile or mqa" >"$W/tests.log" 2>&1
  echo "tests exit $?"; grep -E "FAILED|ERROR|passed|failed|^[0-9.]+s " "$W/tests.log" | tail -40
fi
if [ -n "${PROFILE:-}" ]; then
  timeout 90 python3 "$PROFILE" >"$W/profile.log" 2>&1; echo "profile exit $?"
fi
if [ "$BENCH_S" -gt 0 ]; then
  timeout "$BENCH_S" python3 -m attnops.bench --suite gpu --device cuda --out "$W/bench" "$@" >"$W/bench.log" 2>&1
  echo "bench exit $?"; tail -70 "$W/bench.log"
fi
