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
/usr/bin/time -f "sample wall %e s" $PY -m farmer_cli sample --ckpt "$RUN" --class 207 --n 64 --cfg 4.0 \
    --out "$WORK/class207.png"
echo "== distil 20 steps, sample with the student"
$PY -m farmer_cli distill --ckpt "$RUN" --steps 20 --batch-size 8
/usr/bin/time -f "student sample wall %e s" $PY -m farmer_cli sample --ckpt "$RUN" --class 207 --n 64 --cfg 4.0 \
    --student --out "$WORK/class207-student.png"
echo "== report"
$PY - "$WORK/plan.json" "$RUN/metrics.jsonl" <<'PYEOF'
import json, sys
import torch
from farmer_cli.plan import gpu_tflops
plan = json.load(open(sys.argv[1]))
records = [json.loads(line) for line in open(sys.argv[2])]
steady = [r for r in records if r["step"] > 10]
ips = sorted(r["images_per_s"] for r in steady)[len(steady) // 2]
peak = max(r.get("gpu_peak_gib", 0.0) for r in records)
name = torch.cuda.get_device_name()
mfu = ips * plan["train_flops_per_image"] / (gpu_tflops(name) * 1e12)
print(f"GPU: {name}")
print(f"training: {ips:.1f} img/s (median of logged steps after step 10), MFU {100 * mfu:.1f}% of the dense bf16 peak")
print(f"peak GPU memory (torch.cuda.max_memory_allocated): {peak:.2f} GiB; "
      f"dry-run prediction at micro-batch {plan['micro_batch']}: {plan['predicted_peak_bytes'] / 2**30:.2f} GiB "
      f"(measured/predicted {peak * 2**30 / plan['predicted_peak_bytes']:.2f})")
PYEOF
