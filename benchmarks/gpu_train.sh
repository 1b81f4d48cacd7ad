#!/usr/bin/env bash
# The study's U-Net on one GPU (an H100 or H200): volumes per second, step time, GPU memory and the data
# path's share of a step, with bf16 autocast and with fp32.
#
#     bash benchmarks/gpu_train.sh            # on the GPU machine, from the repository root
#
# Makes a 12-patient synthetic cohort, prepares it (3 mm, the full brain grid) and splits it, then runs
# benchmarks/train_throughput.py with the study's model: 48 base features, all six input channels, PCC
# loss, Ranger, 4 epochs (the first is warm-up). Needs a CUDA build of torch 2.13.0 in $PY's environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORK=${WORK:-/tmp/ctvlab-gpu-bench}
N=${N:-12}
EPOCHS=${EPOCHS:-4}
export MLFLOW_TRACKING_URI="sqlite:///$WORK/mlflow.db"
mkdir -p "$WORK"

"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device visible to torch"; print(torch.cuda.get_device_name(0))'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

[ -f "$WORK/cohort/manifest.csv" ] || "$PY" -m ctvlab.cli synth --out "$WORK/cohort" --patients "$N" --seed 1
"$PY" -m ctvlab.cli preprocess --raw "$WORK/cohort" --out "$WORK/prep"
[ -f "$WORK/prep/splits.json" ] || "$PY" -m ctvlab.cli split --data "$WORK/prep"

for mp in bf16 off; do
  echo "=== mixed precision: $mp"
  "$PY" benchmarks/train_throughput.py --data "$WORK/prep" --epochs "$EPOCHS" --base-features 48 \
      --threads 4 --use-gpu --mixed-precision "$mp"
done
