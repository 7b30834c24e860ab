#!/usr/bin/env bash
# Device checks for a lent GPU machine: build the extension there (with its own torch), run the
# CUDA op tests, then the op benchmark. Prepared to run unattended and briefly:
#
#   bash scripts/gpu_check.sh          # from the repository root; results in $OUT (or out/gpu)
#
# That machine has torch 2.11+cu130 on Python 3.12, nvcc and ninja, and no internet: nothing is
# installed here. Each step has a time limit and a failing step does not stop the later ones;
# the exit status says whether all passed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-out/gpu}
mkdir -p "$OUT_DIR"
exec > >(tee "$OUT_DIR/gpu_check.log") 2>&1
PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # H100 / H200 only: halves nvcc's work
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
failed=()

step() {  # step NAME SECONDS COMMAND...: run, time and record one step
  local name=$1 limit=$2
  shift 2
  echo "=== $name"
  local start=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || failed+=("$name")
  return "$rc"
}

nvidia-smi | head -12
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv
"$PY" -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'

# In place rather than pip: no index to reach, and the package needs nothing else installed.
step build 420 "$PY" setup.py build_ext --inplace || { echo "build failed"; exit 1; }
step backend 60 "$PY" -c 'import shapcam_ext; i = shapcam_ext.backend_info(); print(i); assert i["cuda_kernels"] and i["cuda_available"], i'

if "$PY" -c 'import pytest, hypothesis' 2>/dev/null; then
  step tests 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_ops.py -k cuda --junitxml="$OUT_DIR/test_ops_cuda.xml"
else
  echo "=== tests: skipped, pytest or hypothesis is not installed here"
  failed+=("tests (not run)")
fi

step bench 300 "$PY" bench/bench_ops.py --device cuda --out "$OUT_DIR/ops_cuda.json"

# Hook for the scenario benchmarks (end-to-end explanations on the GPU), when present.
if [ -f bench/bench_scenarios.py ]; then
  step scenarios 300 "$PY" bench/bench_scenarios.py --device cuda --out "$OUT_DIR"
fi

echo "=== done; results in $OUT_DIR; failed: ${failed[*]:-none}"
[ "${#failed[@]}" -eq 0 ]
