#!/usr/bin/env bash
# CPU rehearsal of the mission's second command at the real widths, token counts, mixture sizes and channel split
# of imagenet256-patch8 with the depth cut (AF 2 blocks x 1 layer, AR 1 layer): a run trained 2 steps on a
# synthetic folder of 208 classes (class 207 must exist), then
#   farmer sample --class 207 --n 64 --cfg 4.0      and the same with --n 256,
# each under /usr/bin/time -v: peak RSS must stay under 6 GB and not grow with --n (micro-batches of 64).
# Usage: bash bench/sample_rehearsal.sh [WORK_DIR]
set -euo pipefail
WORK=${1:-$(mktemp -d)}
PY=${PYTHON:-python}
export FARMER_NO_PROGRESS=1
mkdir -p "$WORK"
$PY "$(dirname "$0")/synthetic_folder.py" "$WORK/data" 208
RUN="$WORK/run"
if [ ! -f "$RUN/model.safetensors" ]; then
  $PY -m farmer_cli train --preset imagenet256-patch8 --set model.af_blocks=2 --set model.af_layers=1 \
      --set model.ar_layers=1 --set train.epochs=0 --set train.eval_batches=1 --set data.num_workers=0 \
      --data "$WORK/data" --steps 2 --batch-size 2 --grad-accum 1 --mixed-precision fp32 --out "$RUN"
fi
for n in 64 256; do
  /usr/bin/time -v $PY -m farmer_cli sample --ckpt "$RUN" --class 207 --n $n --cfg 4.0 --device cpu \
      --out "$WORK/class207-n$n.png" 2> "$WORK/time-n$n.txt" || { cat "$WORK/time-n$n.txt"; exit 1; }
  grep -E "samples of|Maximum resident|Elapsed" "$WORK/time-n$n.txt"
done
