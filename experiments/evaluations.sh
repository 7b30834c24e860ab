#!/usr/bin/env bash
# The paper's §4.1 and §4.2 on the bundled photos with the real EfficientNet-Lite0, as `shapcam evaluate`
# runs; results in experiments/results/<name>/ (evaluation.md, evaluation.json, evaluation.png,
# records.jsonl, maps/).
#
#   bash experiments/evaluations.sh           # every method: hours on 2 shared CPU cores (ScoreCAM, RISE, Mask)
#   bash experiments/evaluations.sh --quick   # Grad-CAM, Grad-CAM++, Shap-CAM and the random reference (minutes)
#
# Each evaluation runs first with the quick methods and is then resumed with all of them (--resume adds
# the methods that are missing), so the cheap table exists early and an interrupted run loses little:
# run the script again and it carries on.
set -euo pipefail
cd "$(dirname "$0")/.."
results=experiments/results
quick=gradcam,gradcam++,shapcam,random
all=mask,rise,gradcam,gradcam++,scorecam,shapcam,random
shapcam() { python -m shapcam_ext "$@"; }

# a first run of an evaluation, or --resume when its folder already holds one
start() { if [ -f "$1/run.json" ]; then echo --resume; fi; }

# --design iid: committed results used i.i.d. antithetic permutations, which --resume extends (latin: drop it, --overwrite)
# §4.1: each photo for the model's top-1 class; AD/IC at three keep fractions, RISE's deletion and insertion
faithfulness=(evaluate --metrics ad-ic,deletion,insertion --keep-fractions 1,0.5,0.2 --auc-steps 56
              --rise-masks 1000 --batch-size 9 --design iid)
# §4.2: each hand-drawn object for its ImageNet class; the energy-based pointing game
pointing=(evaluate --boxes experiments/boxes.json --target label --metrics pointing --rise-masks 1000 --batch-size 10
          --design iid)

shapcam "${faithfulness[@]}" --methods "$quick" --out "$results/faithfulness" $(start "$results/faithfulness")
shapcam "${pointing[@]}" --methods "$quick" --out "$results/pointing_game" $(start "$results/pointing_game")
for seed in 1 2; do  # Shap-CAM's spread over permutation seeds at the same K
  out="$results/faithfulness_seed$seed"
  shapcam "${faithfulness[@]}" --methods shapcam --seed "$seed" --figure-rows 0 --out "$out" $(start "$out")
done
[ "${1:-}" = "--quick" ] && exit 0
shapcam "${faithfulness[@]}" --methods "$all" --out "$results/faithfulness" --resume
shapcam "${pointing[@]}" --methods "$all" --out "$results/pointing_game" --resume
