#!/usr/bin/env bash
# Device checks for a lent GPU machine: build the extension there (with its own torch), run every
# CUDA test that can run, then the op benchmark. Prepared to run unattended within 10 minutes:
#
#   bash scripts/gpu_check.sh                      # from the repository root; results in $OUT (or out/gpu)
#   bash scripts/gpu_check.sh --vendor-test-deps   # here, beforehand: copies pytest and hypothesis
#                                                  # (pure Python) to out/test-deps; carry that path
#
# That machine has torch 2.11+cu130 on Python 3.12, nvcc and ninja, and no internet: nothing is
# installed there. When pytest or hypothesis is missing, out/test-deps (or $SHAPCAM_TEST_DEPS) is
# put on PYTHONPATH. Each step has a time limit and a failing step does not stop the later ones;
# the exit status says whether all passed. Results: $OUT/gpu_check.log, $OUT/tests_cuda.xml,
# $OUT/ops_cuda.json (also bench/results/ops_cuda.json).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEPS=${SHAPCAM_TEST_DEPS:-out/test-deps}

if [ "${1:-}" = "--vendor-test-deps" ]; then
  # Packages and their metadata (pytest finds hypothesis's plugin through its entry point).
  "$PY" - "$DEPS" <<'EOF'
import importlib.metadata as md, os, shutil, sys

dest = sys.argv[1]
os.makedirs(dest, exist_ok=True)
skip = shutil.ignore_patterns("__pycache__")
for name in ["pytest", "pluggy", "iniconfig", "packaging", "pygments", "hypothesis", "sortedcontainers"]:
    dist = md.distribution(name)
    for top in sorted({f.parts[0] for f in dist.files} - {"..", "__pycache__"}):
        source, target = dist.locate_file(top), os.path.join(dest, top)
        if os.path.isdir(source):
            shutil.copytree(source, target, dirs_exist_ok=True, ignore=skip)
        elif os.path.isfile(source) and not top.endswith(".pyc"):
            shutil.copy2(source, target)
print(f"test dependencies in {dest}: carry this path to the GPU machine")
EOF
  exit $?
fi

OUT_DIR=${OUT:-out/gpu}
mkdir -p "$OUT_DIR"
exec > >(tee "$OUT_DIR/gpu_check.log") 2>&1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # H100 / H200 only: halves nvcc's work
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
BUDGET=${GPU_CHECK_SECONDS:-570}  # the whole script, under the machine's 10-minute command limit
failed=()

step() {  # step NAME SECONDS COMMAND...: run, time and record one step, within what is left
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - SECONDS))
  [ "$limit" -le "$left" ] || limit=$left
  if [ "$limit" -lt 20 ]; then
    echo "=== $name: skipped, ${left} s left of ${BUDGET}"
    failed+=("$name (no time)")
    return 1
  fi
  echo "=== $name (limit ${limit} s)"
  local start=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || failed+=("$name")
  return "$rc"
}

nvidia-smi --query-gpu=name,memory.total,clocks.max.memory,driver_version --format=csv || echo "nvidia-smi failed"
"$PY" -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'

# In place rather than pip: no index to reach, and the package needs nothing else installed.
step build 360 "$PY" setup.py build_ext --inplace || { echo "=== build failed; failed: ${failed[*]}"; exit 1; }
step backend 60 "$PY" -c 'import shapcam_ext; i = shapcam_ext.backend_info(); print(i); assert i["cuda_kernels"] and i["cuda_available"], i'

if ! "$PY" -c 'import pytest, hypothesis' 2>/dev/null && [ -d "$DEPS" ]; then
  export PYTHONPATH="$(cd "$DEPS" && pwd)${PYTHONPATH:+:$PYTHONPATH}"
  echo "=== pytest/hypothesis from $DEPS"
fi
if "$PY" -c 'import pytest, hypothesis' 2>/dev/null; then
  # The test modules that mention CUDA and whose top-level imports this machine has (the op
  # tests need only torch, pytest and hypothesis); the others are listed, not run.
  mapfile -t modules < <("$PY" - <<'EOF'
import ast, importlib.util, pathlib, sys

for path in sorted(pathlib.Path("tests").glob("test_*.py")):
    text = path.read_text()
    if "cuda" not in text:
        continue
    body = ast.parse(text).body
    roots = {a.name.split(".")[0] for n in body if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in body if isinstance(n, ast.ImportFrom) and n.module and not n.level}
    missing = sorted(r for r in roots if not (pathlib.Path("tests") / f"{r}.py").exists()
                     and importlib.util.find_spec(r) is None)
    if missing:
        print(f"=== {path}: not run, this machine lacks {', '.join(missing)}", file=sys.stderr)
    else:
        print(path)
EOF
  )
  # Every test with "cuda" in its name or parameters; -rs lists what was skipped and why.
  step tests 300 "$PY" -m pytest -q -rs -p no:cacheprovider "${modules[@]}" -k cuda \
    --junitxml="$OUT_DIR/tests_cuda.xml"
else
  echo "=== tests: not run, pytest or hypothesis is missing (run --vendor-test-deps here and carry $DEPS)"
  failed+=("tests (not run)")
fi

step bench 180 "$PY" bench/bench_ops.py --device cuda --min-run-time 0.2 && cp bench/results/ops_cuda.json "$OUT_DIR/"

# The end-to-end scenarios (issue 8, part D), in whatever time is left.
step scenarios 240 "$PY" bench/bench_scenarios.py --device cuda --out "$OUT_DIR"

echo "=== done in ${SECONDS} s; results in $OUT_DIR; failed: ${failed[*]:-none}"
[ "${#failed[@]}" -eq 0 ]
