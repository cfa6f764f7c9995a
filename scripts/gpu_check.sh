#!/usr/bin/env bash
# Short GPU checks for a machine without network access, as one command each.
#
#   bash scripts/gpu_check.sh bench   # ffhq-ldm bench on ffhq128-f4: every stage vs fp32 eager
#   bash scripts/gpu_check.sh vae     # the ffhq128-f4 autoencoder on synthetic faces, ~7 min
#
# Writes everything under $OUT (default gpu_out/). Wheels for what the machine lacks
# (diffusers, importlib_metadata) are installed from .whl/ when that folder is there:
# `make gpu-wheels` downloads them on a machine with PyPI. Nothing here reaches a network.
# Variables for a smoke run on a CPU: PRESET, FACES, VAE_STEPS, VAE_SECONDS, VAE_ARGS, BENCH_ARGS.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 3
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
PRESET=${PRESET:-ffhq128-f4}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
        || echo "no nvidia-smi"
    $PY -c "import torch, diffusers, accelerate; print('torch', torch.__version__, 'diffusers',
diffusers.__version__, 'accelerate', accelerate.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/machine.txt"

case "${1:-bench}" in
bench)
    # 6-7 min expected on an H100 (docs/benchmark.md); --max-minutes keeps it under 8.
    timeout 560 $PY -m ffhq_ldm.bench --preset "$PRESET" --batch-size 64,256 \
        --json "$OUT/bench.json" --max-minutes 6 ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
    ;;
vae)
    # The paper's autoencoder, at most VAE_SECONDS (420) of training on 2,000
    # synthetic faces. Without network no real LPIPS trunk is there, so the perceptual term is
    # the random-trunk VGG (same cost, named so in the logs); no rFID (no Inception weights).
    $PY -m ffhq_ldm.cli synth --out /tmp/faces --num "${FACES:-2000}" --seed 0 --no-progress
    # SIGTERM at the time limit: the trainer saves and exits 75; the rerun (max_steps reached)
    # only evaluates and exports.
    timeout -s TERM "${VAE_SECONDS:-420}" $PY training/train_vae.py --preset "$PRESET" \
        --data /tmp/faces --output-dir /tmp/vae_run --perceptual lpips-vgg-random-trunk \
        --max-steps "${VAE_STEPS:-100000}" --eval-every 1000000 --checkpoint-every 1000000 \
        --no-rfid --log-with none --no-progress ${VAE_ARGS:-} 2>&1 | tee "$OUT/vae.log"
    step=$(ls /tmp/vae_run/checkpoints 2>/dev/null | sed -n 's/^step-0*//p' | sort -n | tail -1)
    if [ -n "$step" ]; then
        $PY training/train_vae.py --preset "$PRESET" --data /tmp/faces --output-dir /tmp/vae_run \
            --perceptual lpips-vgg-random-trunk --max-steps "$step" --no-rfid --log-with none \
            --no-progress ${VAE_ARGS:-} 2>&1 | tee -a "$OUT/vae.log"
    fi
    cp /tmp/vae_run/metrics.json /tmp/vae_run/log.jsonl "$OUT/" 2>/dev/null
    cp "$(ls /tmp/vae_run/reconstructions/*.png | tail -1)" "$OUT/reconstructions.png" 2>/dev/null
    ;;
*)
    echo "usage: $0 bench|vae" >&2
    exit 2
    ;;
esac
