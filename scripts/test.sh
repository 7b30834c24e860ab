#!/usr/bin/env bash
# The test suite: Python tests, then the C++ kernel tests through CMake/CTest.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate

python -m pytest -q tests "$@"

torch_prefix=$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')
cmake -S . -B build-cmake -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$torch_prefix" \
  -DPython3_EXECUTABLE="$(command -v python)" > build-cmake.log 2>&1 || { cat build-cmake.log; exit 1; }
cmake --build build-cmake -j "${MAX_JOBS:-2}" >> build-cmake.log 2>&1 || { tail -50 build-cmake.log; exit 1; }
ctest --test-dir build-cmake --output-on-failure
