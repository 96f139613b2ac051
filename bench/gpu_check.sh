#!/usr/bin/env bash
# GPU check, one prepared script (< 5 minutes on one H100/H200): ViT-L/14 DINOv2 SSL step throughput, model FLOP
# utilisation and peak memory at batch 32 with 2x224 + 8x98 crops, SDPA vs xformers, plus the backbone bench.
# Prints JSON lines; on the device machine they also land in $OUT/gpu_check.jsonl.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp}
export PYTHONUNBUFFERED=1 DINOSCOPE_NO_PROGRESS=1
PY=${PYTHON:-python3}
# The device image has its own CUDA torch; install only our pure-Python package on top, without dependencies.
$PY -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu_info.txt"
for attn in sdpa xformers; do
  timeout 120 $PY bench/ssl_step.py --arch vit_large --patch 14 --batch 32 --global-size 224 --local-size 98 \
    --locals 8 --attn "$attn" --precision bf16 --steps 10 --warmup 3 | tee -a "$OUT/gpu_check.jsonl"
done
timeout 60 $PY bench/ssl_step.py --arch vit_small --patch 14 --batch 64 --attn sdpa --steps 10 | tee -a "$OUT/gpu_check.jsonl"
