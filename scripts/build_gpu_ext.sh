#!/usr/bin/env bash
# Build the extension (C++ CPU kernels + CUDA kernels for sm_90) against the GPU machine's torch
# (2.11.0, Python 3.12: the venv scripts/gpu_rehearsal.sh makes) into .gpu_prebuilt/ (git-ignored):
# albert_kernels_ext.so + manifest.json (torch, CUDA, Python, sources hash, CPU ISA, arch). The
# device call carries it, and scripts/gpu_check.sh loads it when the manifest matches that machine
# (and one CUDA op runs with it), else builds there (about 2 minutes on 16 cores):
#
#   bash scripts/build_gpu_ext.sh [PYTHON]        (default: $GPU_VENV/bin/python, /work/gpu-venv)
#   device run: command "OUT=$OUT bash scripts/gpu_check.sh", carry [".gpu_prebuilt"]
#
# Rebuild after any change under csrc/: the sources hash in the manifest must match.
# No GPU needed. About 5 minutes of compilation on 2 cores (attention.cu alone ~2 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-${GPU_VENV:-/work/gpu-venv}/bin/python}
DIR=.gpu_prebuilt
CACHE=${ALBERT_KERNELS_PREBUILT_CACHE:-$HOME/.cache/albert_kernels-gpu-prebuilt}
mkdir -p "$DIR"
rm -f "$DIR/albert_kernels_ext.so" "$DIR/manifest.json"
echo "building with $("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)')"
PYTHONPATH=. MAX_JOBS=${MAX_JOBS:-2} "$PY" scripts/gpu_check.py build-prebuilt --dir "$DIR" \
  --cache "$CACHE" --arch 9.0
size=$(du -m "$DIR/albert_kernels_ext.so" | cut -f1)
echo "$DIR/albert_kernels_ext.so: ${size} MiB (the device call carries at most 64 MiB in all)"
[ "$size" -lt 56 ] || { echo "too large to carry beside the working tree" >&2; exit 1; }
