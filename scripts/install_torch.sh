#!/usr/bin/env bash
# Installs torch and torchvision into a virtual environment before the package does, so that
# a Linux machine without an NVIDIA GPU gets the CPU builds (about 1 GB) instead of PyPI's
# CUDA builds and their nvidia-* wheels (about 6 GB, useless without a GPU).
#
#   scripts/install_torch.sh VENV_PYTHON [auto|cpu|pypi]
#
# auto (the default): cpu on Linux when `nvidia-smi` is absent, else pypi.
# cpu: the PyTorch CPU index (TORCH_CPU_INDEX), when it answers; if it does not (a machine
#      that reaches PyPI only), a one-line note and PyPI's default build, which works on a CPU
#      too. A local CPU torch wheel alone is no way around this: PyPI's torchvision is built
#      against CUDA torch and fails to import next to a CPU torch ("operator torchvision::nms
#      does not exist"), and lpips imports torchvision.
# pypi: nothing here; `pip install -e .` then takes torch from PyPI (CUDA builds on Linux).
set -euo pipefail

py=${1:?usage: install_torch.sh VENV_PYTHON [auto|cpu|pypi]}
mode=${2:-auto}
index=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

if [ "$mode" = auto ]; then
    if [ "$(uname -s)" = Linux ] && ! command -v nvidia-smi >/dev/null 2>&1; then
        mode=cpu
    else
        mode=pypi
    fi
fi
case $mode in
    pypi) exit 0 ;;
    cpu) ;;
    *) echo "error: TORCH must be auto, cpu or pypi, not '$mode'" >&2; exit 2 ;;
esac

if "$py" - "$index" <<'EOF'
import sys
import urllib.request

try:
    urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=10).close()
except Exception:
    sys.exit(1)
EOF
then
    echo "no NVIDIA GPU: installing the CPU builds of torch and torchvision from $index"
    if "$py" -m pip install --quiet --index-url "$index" torch torchvision; then
        exit 0
    fi
    echo "note: installing from $index failed; falling back to PyPI's torch" >&2
else
    echo "note: no NVIDIA GPU, but $index does not answer: torch comes from PyPI (its CUDA" \
         "build, several GB larger; it runs on a CPU as well)" >&2
fi
