#!/usr/bin/env bash
# The source distribution is complete and installs as a user would: build the sdist, build a
# CPU-only wheel from it, install that wheel with the `cli` and `torchcam` extras in a fresh venv holding only
# torch, then run the package there (import, `shapcam info`, the torchcam adapter, one `shapcam explain`).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python -m build --sdist --no-isolation --outdir "$work/dist" . > "$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
sdist=$(ls "$work"/dist/shapcam_ext-*.tar.gz)
# A wheel of the sdist alone (another directory, so nothing of this checkout can leak in).
SHAPCAM_NO_CUDA=1 MAX_JOBS="${MAX_JOBS:-2}" pip wheel --quiet --disable-pip-version-check --no-build-isolation \
  --no-deps -w "$work/dist" "$sdist" > "$work/wheel.log" 2>&1 || { cat "$work/wheel.log"; exit 1; }
wheel=$(ls "$work"/dist/shapcam_ext-*+cpu-*.whl)
echo "sdist $(basename "$sdist") -> wheel $(basename "$wheel")"

python -m venv "$work/venv"
fresh() { "$work/venv/bin/$1" "${@:2}"; }
fresh pip install --quiet --disable-pip-version-check -c constraints.txt torch
fresh pip install --quiet --disable-pip-version-check -c constraints.txt "${wheel}[cli,torchcam]"
cd "$work"  # outside the checkout: the installed package must be the one imported
fresh python -c "import shapcam_ext, json; info = shapcam_ext.backend_info(); print(json.dumps(info)); \
assert info['backend'] == 'compiled' and info['build']['version'].endswith('+cpu'), info"
fresh shapcam info
fresh python -c "from shapcam_ext.adapters.torchcam import ShapCAM; import torchvision; \
ShapCAM(torchvision.models.resnet18().eval(), n_permutations=2)"  # torchcam's default layer lookup
chelsea=$(fresh python -c "from shapcam_ext.cli.images import bundled_photos; print(bundled_photos()['chelsea'])")
fresh shapcam explain "$chelsea" --permutations 64 --out "$work/out"
ls "$work"/out/chelsea_shapcam.png "$work"/out/chelsea_shapcam.npz > /dev/null
echo "sdist check passed"
