#!/usr/bin/env bash
# Fresh machine -> .venv with the pinned torch build, every dependency, and a compiled
# shapcam_ext (CUDA sources included when nvcc and a CUDA build of torch are present).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
. .venv/bin/activate
# constraints.txt pins torch/torchvision, so no dependency can pull in another torch build.
pip install --quiet --disable-pip-version-check -c constraints.txt -r requirements.txt
MAX_JOBS="${MAX_JOBS:-2}" pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .
python -c "import shapcam_ext; print('shapcam_ext', shapcam_ext.__version__, shapcam_ext.backend_info())"
