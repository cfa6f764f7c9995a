#!/usr/bin/env bash
# The pictures of docs/explore.md, from a trained pipeline folder:
#   scripts/explore_pictures.sh runs/demo/unet_run/pipeline [docs/images] [STEPS]
# Faces for inversion and inpainting are drawn fresh (ffhq-ldm synth, a seed the demo's
# training faces do not use), so the model has never seen them.
set -euo pipefail
MODEL=${1:?usage: scripts/explore_pictures.sh MODEL [OUT] [STEPS]}
OUT=${2:-docs/images}
STEPS=${3:-50}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
FFHQ_LDM=${FFHQ_LDM:-ffhq-ldm}
mkdir -p "$OUT"

$FFHQ_LDM synth --out "$WORK/faces" --num 2 --size 128 --seed 777 --no-progress
FACE=$(ls "$WORK"/faces/*.png | head -n 1)
# the mask: a box over the mouth and chin (white = fill in), the image's size
python - "$FACE" "$WORK/mask.png" <<'PY'
import sys
from PIL import Image, ImageDraw
w, h = Image.open(sys.argv[1]).size
mask = Image.new("L", (w, h), 0)
ImageDraw.Draw(mask).rectangle([int(0.3 * w), int(0.58 * h), int(0.7 * w), int(0.85 * h)], 255)
mask.save(sys.argv[2])
PY

$FFHQ_LDM interpolate --model "$MODEL" --seeds 3,17 --frames 8 --steps "$STEPS" \
    --out "$WORK/interp"
$FFHQ_LDM invert --model "$MODEL" --image "$FACE" --variations 3 --eta 0.5 --steps "$STEPS" \
    --out "$WORK/inv"
$FFHQ_LDM inpaint --model "$MODEL" --image "$FACE" --mask "$WORK/mask.png" --num 2 \
    --steps "$STEPS" --out "$WORK/inp"

cp "$WORK/interp/strip.png" "$OUT/interpolation_strip.png"
cp "$WORK"/inv/*_strip.png "$OUT/inversion_strip.png"
cp "$WORK/inv/metrics.json" "$OUT/inversion_metrics.json"
cp "$WORK/inp/strip.png" "$OUT/inpainting_strip.png"
echo "pictures in $OUT"
