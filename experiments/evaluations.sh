#!/usr/bin/env bash
# The paper's §4.1 and §4.2 on the bundled photos with the real EfficientNet-Lite0, as `shapcam evaluate`
# runs; results in experiments/results/<name>/ (evaluation.md, evaluation.json, evaluation.png,
# records.jsonl). An interrupted run continues with the same command plus --resume.
#   bash experiments/evaluations.sh            # everything (hours on 2 shared CPU cores: ScoreCAM, RISE, Mask)
#   bash experiments/evaluations.sh --quick    # Grad-CAM, Grad-CAM++, Shap-CAM and the random reference only
set -euo pipefail
cd "$(dirname "$0")/.."
methods=mask,rise,gradcam,gradcam++,scorecam,shapcam,random
[ "${1:-}" = "--quick" ] && methods=gradcam,gradcam++,shapcam,random
results=experiments/results
shapcam() { python -m shapcam_ext "$@"; }

# §4.1: each photo for the model's top-1 class; AD/IC at three keep fractions, RISE's deletion and insertion
shapcam evaluate --methods "$methods" --metrics ad-ic,deletion,insertion --keep-fractions 1,0.5,0.2 \
  --batch-size 3 --out "$results/faithfulness" --overwrite
# §4.2: each hand-drawn object for its ImageNet class; energy-based pointing game
shapcam evaluate --boxes experiments/boxes.json --target label --methods "$methods" --metrics pointing \
  --batch-size 5 --out "$results/pointing_game" --overwrite
# Shap-CAM's spread over permutation seeds at the same K
for seed in 1 2; do
  shapcam evaluate --methods shapcam --metrics ad-ic,deletion,insertion --keep-fractions 1,0.5,0.2 --seed "$seed" \
    --figure-rows 0 --batch-size 3 --out "$results/faithfulness_seed$seed" --overwrite
done
