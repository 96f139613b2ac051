#!/usr/bin/env bash
# GPU check, one prepared script (< 8 minutes on one H100/H200, start-up and data loading included).
#
# 1. The real trainer (`python -m core.cli pretrain recipes/bench/gpu_vitl14.yaml`: ViT-L/14, drop path 0.4,
#    2 x 224 + 8 x 98 crops, 65536-prototype heads, bf16, 32 images, embedded synthetic data) for 30 iterations with
#    each strategy: single; DeepSpeed ZeRO-2 and ZeRO-3 at world size 1 (one process, no launcher).
# 2. The step bench (bench/ssl_step.py: the same step without data loading or the strategy), SDPA and xformers
#    (reported as skipped where xformers is not importable), plus a ViT-S/14 step.
#
# One JSON line per run on stdout, and in $OUT/gpu_check.jsonl when OUT is set (the device tool returns $OUT).
# Trainer lines: strategy, images_per_s (median of the per-iteration rates in metrics.jsonl after the first
# GPU_CHECK_WARMUP iterations), mfu (bench/flops.py: student 3x forward with the blocks' stochastic-depth skipping,
# teacher 1x, DINO/iBOT heads included), max_memory_mb (CUDA max allocated), iterations, wall_s, exit_status.
#
# Exit status: 0 every run succeeded; 1 a run failed (its line has exit_status != 0; 124 = hit its time limit) or
#              the trainer's imports are missing; 3 no CUDA device is visible, so nothing was measured.
#
# On the device machine (bare, offline; python3 there has CUDA torch but not omegaconf, albumentations, DeepSpeed
# and their dependencies): run `bash bench/gpu_wheels.sh` here first, then carry `.whl`; this script installs the
# wheels into /tmp/site when the trainer's imports are missing and puts it and the checkout on PYTHONPATH.
#
# Environment:
#   GPU_CHECK_CPU_SMOKE=1 (or --cpu-smoke)  the same runs on the CPU at a tiny size (vit_test, 3 iterations), to
#                                           exercise this script where there is no GPU
#   GPU_CHECK_PEAK_TFLOPS                   the device's dense bf16 peak for MFU (default 989: H100/H200 SXM)
#   GPU_CHECK_WARMUP                        logged iterations left out of the median (default 10; smoke: 1)
#   GPU_CHECK_WHEELS, GPU_CHECK_SITE        wheel folder (default .whl) and install target (default /tmp/site)
#   PYTHON                                  interpreter (default: .venv/bin/python if present, else python3)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SMOKE=${GPU_CHECK_CPU_SMOKE:-0}
[ "${1:-}" = "--cpu-smoke" ] && SMOKE=1
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
PY=${PYTHON:-python3}
PEAK=${GPU_CHECK_PEAK_TFLOPS:-989}
WHEELS=${GPU_CHECK_WHEELS:-.whl}
SITE=${GPU_CHECK_SITE:-/tmp/site}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
RESULTS=${OUT:+$OUT/gpu_check.jsonl}
RESULTS=${RESULTS:-$WORK/gpu_check.jsonl}
LOG=${OUT:+$OUT/gpu_check.log}
LOG=${LOG:-$WORK/gpu_check.log}
export PYTHONUNBUFFERED=1 DINOSCOPE_NO_PROGRESS=1 NO_ALBUMENTATIONS_UPDATE=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

emit() {  # one result line: stdout and the results file
  echo "$1" | tee -a "$RESULTS"
}

seconds_since() {  # seconds since a `date +%s%N` stamp, to the millisecond (no bc on the bare device image)
  local ms=$(( ($(date +%s%N) - $1) / 1000000 ))
  printf '%d.%03d' $((ms / 1000)) $((ms % 1000))
}

# --- 1. a GPU, or the explicit CPU smoke mode; nothing else is started before this answer ------------------------
if [ "$SMOKE" = 1 ]; then
  export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES=""
  echo "gpu_check: CPU smoke mode (GPU_CHECK_CPU_SMOKE=1): tiny runs on the CPU; figures are not GPU measurements"
else
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)" 2>>"$LOG"; then
    msg="gpu_check: no CUDA device visible (torch.cuda.is_available() is False); nothing was measured"
    "$PY" -c "import torch" 2>/dev/null || msg="gpu_check: $PY cannot import torch; nothing was measured"
    echo "$msg"
    [ -n "${OUT:-}" ] && printf '{"error": "%s"}\n' "$msg" >>"$RESULTS"
    exit 3
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
fi

# --- 2. the trainer's imports; from the carried wheels where the interpreter lacks them -------------------------
IMPORTS="import core.cli, omegaconf, albumentations, deepspeed"
if ! "$PY" -c "$IMPORTS" >/dev/null 2>&1; then
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$WHEELS"/*.whl 2>&1 | tail -5
    export PYTHONPATH="$ROOT:$SITE${PYTHONPATH#"$ROOT"}"
  fi
  if ! "$PY" -c "$IMPORTS" 2>"$WORK/imports.err"; then
    echo "gpu_check: the trainer's imports fail under $PY: $(tail -1 "$WORK/imports.err")" >&2
    echo "gpu_check: run 'bash bench/gpu_wheels.sh' where PyPI is reachable and carry .whl" >&2
    exit 1
  fi
fi

# --- 3. the trainer, one run per strategy ------------------------------------------------------------------------
RECIPE=recipes/bench/gpu_vitl14.yaml
if [ "$SMOKE" = 1 ]; then
  WARMUP=${GPU_CHECK_WARMUP:-1}
  TRAIN_CAP=240
  # vit_test at recipes/tiny/pretrain.yaml's sizes; the schedules are resized to the 3 iterations. Two DataLoader
  # workers, so the worker path of the GPU runs (14 workers there) is exercised too.
  SIZE=(model.arch=vit_test model.patch_size=8 model.img_size=32 crops.global_crops_size=32
        crops.local_crops_size=16 crops.local_crops_number=2 dino.head.n_prototypes=256 dino.head.bottleneck_dim=64
        dino.head.hidden_dim=128 ibot.head.n_prototypes=256 ibot.head.bottleneck_dim=64 ibot.head.hidden_dim=128
        data.params.size=48 data.params.n=256 train.batch_size_per_rank=8 train.num_workers=2 train.max_iters=3
        optim.epoch_length=3 train.checkpoint_every=3 train.device=cpu)
else
  WARMUP=${GPU_CHECK_WARMUP:-10}
  # Worst case, every run at its cap plus its kill grace: 3 x (90 + 10) s + 2 x (45 + 5) + (20 + 5) s = 425 s,
  # leaving ~55 s of the 8 minutes for the checks and the wheel install. Expected: ~40-60 s per trainer run.
  TRAIN_CAP=90
  SIZE=(train.device=cuda)
fi
FAILED=0

train_run() {  # train_run NAME OVERRIDE...
  local name=$1 run="$WORK/$1" t0 wall rc line
  shift
  t0=$(date +%s%N)
  # SIGTERM at the cap: the trainer checkpoints and exits (143); -k kills it if that takes more than 10 s.
  timeout -k 10 "$TRAIN_CAP" "$PY" -m core.cli pretrain "$RECIPE" "${SIZE[@]}" "$@" --output-dir "$run" \
    >"$WORK/$name.log" 2>&1
  rc=$?
  wall=$(seconds_since "$t0")
  { echo "=== $name (exit $rc)"; cat "$WORK/$name.log"; } >>"$LOG"
  # flops.py fails (and says why in the line) when the run left no usable metrics: a failure even at exit 0.
  if ! line=$("$PY" bench/flops.py "$run" --strategy "$name" --warmup "$WARMUP" --peak-tflops "$PEAK" \
                --exit-status "$rc" --wall-s "$wall"); then
    [ "$rc" = 0 ] && rc=1
  fi
  emit "$line"
  if [ "$rc" != 0 ]; then
    FAILED=1
    echo "gpu_check: $name failed (exit $rc); last lines of its log:" >&2
    tail -15 "$WORK/$name.log" >&2
  fi
  rm -rf "$run"  # a ViT-L checkpoint is several GB; the next runs need the disk
}

train_run single dist.strategy=single
train_run zero2 dist.strategy=deepspeed dist.zero_stage=2
train_run zero3 dist.strategy=deepspeed dist.zero_stage=3

# --- 4. the step bench -------------------------------------------------------------------------------------------
step_run() {  # step_run LABEL CAP ARG...
  local label=$1 cap=$2 t0 wall rc line
  shift 2
  t0=$(date +%s%N)
  timeout -k 5 "$cap" "$PY" bench/ssl_step.py "$@" >"$WORK/step.out" 2>"$WORK/step.err"
  rc=$?
  wall=$(seconds_since "$t0")
  { echo "=== $label (exit $rc)"; cat "$WORK/step.out" "$WORK/step.err"; } >>"$LOG"
  # The bench prints one JSON object; the run's label, wall time and status are added to it, and "mfu_flops_py":
  # its MFU with bench/flops.py's count (the trainer lines' count: stochastic depth's skipped work and the heads),
  # next to its own "mfu" (full student, no heads).
  line=$(tail -1 "$WORK/step.out" | "$PY" -c '
import json, sys
sys.path.insert(0, "bench")
import flops
label, wall, rc, peak = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
try:
    out = json.loads(sys.stdin.read())
except ValueError:
    out = {"error": "no JSON output"}
if "images_per_s" in out:
    out["mfu_flops_py"] = flops.ssl_step_bench_mfu(out["images_per_s"], sys.argv[5:], peak)
print(json.dumps({"bench": "ssl_step", "run": label, **out, "wall_s": round(wall, 1), "exit_status": rc}))
' "$label" "$wall" "$rc" "$PEAK" "$@") || {
    [ "$rc" = 0 ] && rc=1
    line="{\"bench\": \"ssl_step\", \"run\": \"$label\", \"error\": \"no summary\", \"exit_status\": $rc}"
  }
  emit "$line"
  if [ "$rc" != 0 ]; then
    FAILED=1
    tail -15 "$WORK/step.err" >&2
  fi
}

if [ "$SMOKE" = 1 ]; then
  TINY=(--arch vit_test --patch 8 --batch 4 --global-size 32 --local-size 16 --locals 2 --prototypes 256
        --precision fp32 --steps 2 --warmup 1)
  step_run sdpa 120 "${TINY[@]}" --attn sdpa
  step_run xformers 120 "${TINY[@]}" --attn xformers
else
  VITL=(--arch vit_large --patch 14 --batch 32 --global-size 224 --local-size 98 --locals 8 --precision bf16
        --steps 10 --warmup 3 --peak-tflops "$PEAK")
  step_run vitl14_sdpa 45 "${VITL[@]}" --attn sdpa
  step_run vitl14_xformers 45 "${VITL[@]}" --attn xformers
  step_run vits14_sdpa 20 --arch vit_small --patch 14 --batch 64 --attn sdpa --steps 10 --peak-tflops "$PEAK"
fi

[ "$FAILED" = 0 ] || echo "gpu_check: at least one run failed (see the exit_status fields above)" >&2
exit "$FAILED"
