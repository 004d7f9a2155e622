#!/usr/bin/env bash
# The whole pipeline, one stage after another: bash run_all.sh [preset] [out]
# (defaults: tiny, out). Each stage skips what an earlier run already finished.
set -euo pipefail
cd "$(dirname "$0")"
preset=${1:-tiny}
out=${2:-out}
args="--preset $preset --out $out"
python render.py $args            # stage 0: the toy 3D world
python finetune_video.py $args    # stage 1: temporal layers on the shipped image model, + evaluation
