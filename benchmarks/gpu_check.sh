#!/usr/bin/env bash
# The GPU check of issue 6, sized for one H200 in under 8 minutes (not yet run on one):
#   1. benchmarks/gpu_check.py: every GPU attention candidate (cudnn packed, cudnn single-
#      document, pallas_triton, tokamax) through the start-up numerics check (values,
#      gradients, packing isolation vs xla), then its forward+backward time at T=4096 packed
#      against the no-segment cuDNN baseline (target <= 1.5x);
#   2. benchmarks/vs_transformers.py: phi4_jax's train step (start-up resolution and numerics
#      check included) against transformers' Phi3ForCausalLM, eager and torch.compile, at
#      14b-4l 4K batch 4, 1b 4K batch 8 and 14b-4l 16K batch 1; tokens/s, MFU, peak memory,
#      the memory estimate against XLA's analysis; appended to benchmarks/RESULTS_gpu.md.
#
# From the repository root, on a machine with jax, flax, optax, orbax, torch and
# transformers (no internet needed):
#   bash benchmarks/gpu_wheels.sh     # first, where pip works: the missing packages, ./.whl
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# SHAPES=14b-4l@4k limits the comparison to some shapes (comma-separated).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-/tmp/gpu_check}}"
mkdir -p "$OUT_DIR"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/phi4_site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/phi4_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
source launch/xla_flags.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$OUT_DIR/gpu_check.log"
python3 benchmarks/gpu_check.py 2>&1 | tee -a "$OUT_DIR/gpu_check.log"
python3 benchmarks/vs_transformers.py --shapes="${SHAPES:-14b-4l@4k,1b@4k,14b-4l@16k}" \
  --timeout=150 --write benchmarks/RESULTS_gpu.md 2>&1 | tee -a "$OUT_DIR/gpu_check.log"
cp benchmarks/RESULTS_gpu.md "$OUT_DIR/"
