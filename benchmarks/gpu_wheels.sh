#!/usr/bin/env bash
# Wheels for benchmarks/gpu_check.py on a GPU machine without network (Python 3.12, x86-64,
# a CUDA 13 torch already installed there), downloaded here with pip from the registry:
#   .whl/       ours: ase, vesin, e3nn 0.6, cuequivariance(-torch), the cu13 ops' torch part
#   .whl-ops/   cuequivariance-ops-cu13 alone (45 MB: with the rest it passes a 64 MiB copy)
#   .whl-peer/  mace-torch 0.3.16, e3nn 0.4.4 and the packages it imports that such an
#               image lacks, torchmetrics too (python-hostlist has no wheel: built here)
# Usage: bash benchmarks/gpu_wheels.sh [PYTHON_VERSION (3.12)] [CUDA (cu13)]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-3.12}
CU=${2:-cu13}
PIP=(python3 -m pip)
[ -x .venv/bin/python ] && PIP=(.venv/bin/python -m pip)
get() {  # get DIR REQUIREMENT...
  local dir=$1; shift
  mkdir -p "$dir"
  "${PIP[@]}" download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dir" "$@"
}
get .whl ase vesin e3nn==0.6.0 cuequivariance==0.13.0 cuequivariance-torch==0.13.0 \
  "cuequivariance-ops-torch-$CU==0.13.0" platformdirs
get .whl-ops "cuequivariance-ops-$CU==0.13.0"
get .whl-peer mace-torch==0.3.16 e3nn==0.4.4 torch-ema prettytable wcwidth matscipy \
  configargparse GitPython gitdb smmap lmdb orjson torchmetrics lightning-utilities
"${PIP[@]}" wheel -q --no-deps python-hostlist -w .whl-peer
du -sh .whl .whl-ops .whl-peer
