#!/usr/bin/env bash
# The mission's two commands at the FULL size of imagenet256-patch8 (1.98B parameters) on one GPU:
#   farmer train --preset imagenet256-patch8 (its micro-batch 16, bf16, activation checkpointing; accumulation 1
#   to keep the run short: it changes neither memory nor img/s) for 24 steps,
#   then farmer sample --class 207 --n 64 --cfg 4.0 from that run; prints img/s, MFU, the peak GPU memory against
#   the dry-run's prediction, and the sample command's wall time and peak memory.
# Synthetic data (bench/synthetic_folder.py): 1000 class folders of one 256x256 image each; no ImageNet needed.
# Needs ~45 GB of disk for the checkpoint (weights, EMA and AdamW state in float32).
# Usage: bash bench/gpu_full.sh [WORK_DIR [TRAIN OPTIONS...]]   (after pip install . on the GPU machine); extra
# options go to train, e.g. --batch-size 8 on a smaller GPU.
set -euo pipefail
WORK=${1:-$(mktemp -d)}
shift || true
PY=${PYTHON:-python}
HERE=$(dirname "$0")
FULL=(--preset imagenet256-patch8 --grad-accum 1 --set train.epochs=0 --set train.log_every=2 --set train.eval_batches=1
      --set train.warmup_steps=5 "$@")
mkdir -p "$WORK"
$PY "$HERE/synthetic_folder.py" "$WORK/data" 1000
rm -rf "$WORK/full"
echo "== dry-run (the preset's plan for one GPU)"
$PY -m farmer_cli train "${FULL[@]}" --dry-run --gpus 1 --json > "$WORK/plan-full.json"
echo "== train 24 steps at full size"
$PY "$HERE/run_with_peak.py" train "${FULL[@]}" --data "$WORK/data" --steps 24 --out "$WORK/full"
$PY "$HERE/gpu_report.py" "$WORK/plan-full.json" "$WORK/full/metrics.jsonl"
echo "== farmer sample --class 207 --n 64 --cfg 4.0 at full size"
$PY "$HERE/run_with_peak.py" sample --ckpt "$WORK/full" --class 207 --n 64 --cfg 4.0 --out "$WORK/full-class207.png"
