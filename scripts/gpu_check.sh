#!/usr/bin/env bash
# GPU checks for a machine without network access, each part under its own timeout.
#
#   bash scripts/gpu_check.sh          # install, CUDA tests, ffhq-ldm bench: <= 9 min (BUDGET)
#   bash scripts/gpu_check.sh vae      # the ffhq128-f4 autoencoder on synthetic faces, ~7 min
#   GPU_CHECK_DRY=1 bash scripts/gpu_check.sh   # the same steps on a CPU, tiny sizes (~2 min)
#
# Results go to $OUT (default gpu_out/) as each part ends: machine.txt, steps.log (each part's
# wall time and exit code), install.log, tests.log, bench.log, and bench.json + bench.md,
# rewritten after every bench row, so a run cut short keeps what it measured. Wheels for what
# the machine lacks (diffusers, importlib_metadata, lpips) are installed from .whl/ when that
# folder is there: `make gpu-wheels` downloads them on a machine with PyPI. No network here.
# Variables: OUT, PYTHON, BUDGET (seconds for the whole run, 540), PRESET, BENCH_ARGS;
# for `vae`: FACES, VAE_STEPS, VAE_SECONDS, VAE_ARGS.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
export PY
DRY=${GPU_CHECK_DRY:-0}
BUDGET=${BUDGET:-540}
START=$SECONDS

# step NAME LIMIT_SECONDS COMMAND...: run under `timeout`, log its wall time and exit code
step() {
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    timeout -k 10 "$limit" "$@"
    rc=$?
    echo "$name: rc $rc, $((SECONDS - t0)) s (limit ${limit} s), at $((SECONDS - START)) s" \
        | tee -a "$OUT/steps.log"
    return $rc
}

install_wheels() {
    if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl
    else
        echo "no .whl/ folder: using what $PY has"
    fi
}

machine() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
        || echo "no nvidia-smi"
    "$PY" - <<'EOF'
import importlib, importlib.metadata, platform
import torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda",
      torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
for name in ("diffusers", "accelerate", "lpips", "safetensors", "torchvision", "pytest"):
    try:
        importlib.import_module(name)
        print(name, importlib.metadata.version(name))
    except Exception as exc:  # a missing package is reported, the run goes on
        print(name, "MISSING:", type(exc).__name__, exc)
EOF
}

# the helpers run under `timeout` through `bash -c`, which sees exported functions only
export -f install_wheels machine

use_site() {
    if [ -d /tmp/site ]; then export PYTHONPATH=/tmp/site:$PWD; else export PYTHONPATH=$PWD; fi
}

case "${1:-bench}" in
bench)
    : > "$OUT/steps.log"
    step install 60 bash -c install_wheels 2>&1 | tee "$OUT/install.log"
    use_site
    step machine 60 bash -c machine 2>&1 | tee "$OUT/machine.txt"
    # The tests that need CUDA (skipped on a CPU): tests/test_*cuda*.py.
    step cuda-tests 90 "$PY" -m pytest -q -x tests/test_*cuda*.py 2>&1 | tee "$OUT/tests.log"
    if [ "$DRY" = 1 ]; then
        SIZES=(--preset tiny --device cpu --batch-size "2,4" --vae-batch-size 2 --steps 1
               --warmup 1 --sample-steps 4 --cache-images 100)
    else
        SIZES=(--preset "${PRESET:-ffhq128-f4}" --batch-size "64,256" --vae-batch-size 32
               --steps 10 --warmup 3)
    fi
    # What is left of the budget, less 15 s to write and leave; no new row after the budget
    # less 2.5 min, the longest a compiled row has taken to build, so the last row can finish.
    left=$((BUDGET - (SECONDS - START) - 15))
    minutes=$(awk -v s="$left" 'BEGIN { m = (s - 150) / 60; printf "%.1f", m < 0.5 ? 0.5 : m }')
    # shellcheck disable=SC2086  # BENCH_ARGS: extra options, split on purpose
    step bench "$((left > 30 ? left : 30))" "$PY" -m ffhq_ldm.bench "${SIZES[@]}" \
        --max-minutes "$minutes" --json "$OUT/bench.json" ${BENCH_ARGS:-} \
        2>&1 | tee "$OUT/bench.log"
    echo "total: $((SECONDS - START)) s of a ${BUDGET} s budget" | tee -a "$OUT/steps.log"
    ;;
vae)
    [ -d /tmp/site ] || install_wheels
    use_site
    PRESET=${PRESET:-ffhq128-f4}
    # The paper's autoencoder, at most VAE_SECONDS (420) of training on 2,000
    # synthetic faces. Without network no real LPIPS trunk is there, so the perceptual term is
    # the random-trunk VGG (same cost, named so in the logs); no rFID (no Inception weights).
    "$PY" -m ffhq_ldm.cli synth --out /tmp/faces --num "${FACES:-2000}" --seed 0 --no-progress
    # SIGTERM at the time limit: the trainer saves and exits 75; the rerun (max_steps reached)
    # only evaluates and exports.
    # shellcheck disable=SC2086  # VAE_ARGS: extra options, split on purpose
    timeout -s TERM "${VAE_SECONDS:-420}" "$PY" training/train_vae.py --preset "$PRESET" \
        --data /tmp/faces --output-dir /tmp/vae_run --perceptual lpips-vgg-random-trunk \
        --max-steps "${VAE_STEPS:-100000}" --eval-every 1000000 --checkpoint-every 1000000 \
        --no-rfid --log-with none --no-progress ${VAE_ARGS:-} 2>&1 | tee "$OUT/vae.log"
    step=$(find /tmp/vae_run/checkpoints -maxdepth 1 -name 'step-*' 2>/dev/null \
        | sed -n 's/.*step-0*//p' | sort -n | tail -1)
    if [ -n "$step" ]; then
        # shellcheck disable=SC2086
        "$PY" training/train_vae.py --preset "$PRESET" --data /tmp/faces --output-dir /tmp/vae_run \
            --perceptual lpips-vgg-random-trunk --max-steps "$step" --no-rfid --log-with none \
            --no-progress ${VAE_ARGS:-} 2>&1 | tee -a "$OUT/vae.log"
    fi
    cp /tmp/vae_run/metrics.json /tmp/vae_run/log.jsonl "$OUT/" 2>/dev/null
    last=$(find /tmp/vae_run/reconstructions -name '*.png' 2>/dev/null | sort | tail -1)
    [ -n "$last" ] && cp "$last" "$OUT/reconstructions.png"
    ;;
*)
    echo "usage: $0 [bench|vae]" >&2
    exit 2
    ;;
esac
