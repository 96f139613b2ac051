#!/usr/bin/env bash
# GPU check, one prepared script (< 5 minutes on one H100/H200): ViT-L/14 DINOv2 SSL step throughput, model FLOP
# utilisation and peak memory at batch 32 with 2x224 + 8x98 crops, SDPA vs xformers, plus a ViT-S/14 step.
# Prints one JSON line per run; on the device machine they also land in $OUT/gpu_check.jsonl.
#
# The device image has CUDA torch but neither dinoscope's optional stack nor xformers; bench/ssl_step.py needs only
# torch, numpy and this checkout (no OmegaConf, albumentations or DeepSpeed). For the xformers run, carry a wheel
# matching the device's torch (device README: `pip download --no-deps ... -d .whl xformers==X`, carry `.whl`);
# without it that run reports "skipped".
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp}
export PYTHONUNBUFFERED=1 DINOSCOPE_NO_PROGRESS=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu_info.txt"
for attn in sdpa xformers; do
  timeout 150 $PY bench/ssl_step.py --arch vit_large --patch 14 --batch 32 --global-size 224 --local-size 98 \
    --locals 8 --attn "$attn" --precision bf16 --steps 10 --warmup 3 | tee -a "$OUT/gpu_check.jsonl"
done
timeout 60 $PY bench/ssl_step.py --arch vit_small --patch 14 --batch 64 --attn sdpa --steps 10 \
  | tee -a "$OUT/gpu_check.jsonl"
