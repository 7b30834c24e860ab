#!/usr/bin/env bash
# Fresh machine -> .venv with the pinned torch build, the package with every extra (CLI, the peer
# libraries, tests) and a compiled shapcam_ext (CUDA sources included when nvcc and a CUDA build of
# torch are present).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
. .venv/bin/activate
pip_install() { pip install --quiet --disable-pip-version-check -c constraints.txt "$@"; }
# torch first: the extension compiles against the torch installed here, not an isolated copy.
pip_install torch setuptools wheel ninja
MAX_JOBS="${MAX_JOBS:-2}" pip_install --no-build-isolation -e ".[all,test]"
python -c "import shapcam_ext; print('shapcam_ext', shapcam_ext.__version__, shapcam_ext.backend_info())"
