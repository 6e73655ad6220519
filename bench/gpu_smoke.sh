#!/usr/bin/env bash
# GPU smoke test of the mission's two commands at the real widths of imagenet256-patch8 with the depth cut
# (AF 4 blocks x 2 layers, AR 2 layers), on one GPU, in a few minutes:
#   train (bf16, activation checkpointing, accumulation 2) -> stop -> resume -> sample --class 207 --n 64 --cfg 4.0
#   -> distil a few steps -> sample with the student; then prints img/s, the peak GPU memory against the
#   dry-run's prediction, and the model FLOP utilisation (MFU) against the GPU's dense bf16 peak.
# Synthetic data: 1000 class folders of one smooth random 256x256 image each (no ImageNet needed).
# Usage: bash bench/gpu_smoke.sh [WORK_DIR]      (after pip install . on the GPU machine)
set -euo pipefail
WORK=${1:-$(mktemp -d)}
PY=${PYTHON:-python}
export FARMER_NO_PROGRESS=0
CUT=(--preset imagenet256-patch8 --set model.af_blocks=4 --set model.af_layers=2 --set model.ar_layers=2
     --set train.epochs=0 --set train.log_every=5 --set train.ckpt_every=20 --set train.eval_batches=1
     --set train.warmup_steps=10 --batch-size 8 --grad-accum 2 --mixed-precision bf16)
mkdir -p "$WORK"
$PY "$(dirname "$0")/synthetic_folder.py" "$WORK/data" 1000
RUN="$WORK/run"
rm -rf "$RUN"
echo "== dry-run (plan for this GPU: micro-batch 8, 1 process)"
$PY -m farmer_cli train "${CUT[@]}" --dry-run --gpus 1 --json > "$WORK/plan.json"
$PY -m farmer_cli train "${CUT[@]}" --dry-run --gpus 1
echo "== train 40 steps, stop after 20, resume"
$PY -m farmer_cli train "${CUT[@]}" --data "$WORK/data" --steps 40 --stop-after 20 --out "$RUN"
$PY -m farmer_cli train --out "$RUN" --resume
echo "== sample --class 207 --n 64 --cfg 4.0"
$PY "$(dirname "$0")/run_with_peak.py" sample --ckpt "$RUN" --class 207 --n 64 --cfg 4.0 --out "$WORK/class207.png"
echo "== distil 20 steps, sample with the student"
$PY -m farmer_cli distill --ckpt "$RUN" --steps 20 --batch-size 8
$PY "$(dirname "$0")/run_with_peak.py" sample --ckpt "$RUN" --class 207 --n 64 --cfg 4.0 --decoder student \
    --out "$WORK/class207-student.png"
echo "== report"
$PY "$(dirname "$0")/gpu_report.py" "$WORK/plan.json" "$RUN/metrics.jsonl"
