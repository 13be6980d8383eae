#!/usr/bin/env bash
# Offline quickstart on the built-in Fashion-MNIST teacher (assets/): install, distil it to 2 NFE on the CPU,
# sample a grid, and compare the student with the teacher's own solvers. No download; about 5 minutes on 2 cores.
#
#   bash quickstart.sh        # KIMG=… BATCH=… LR=… (distillation), NUM=… (samples scored), OUT=… (experiment folder)
set -euo pipefail
cd "$(dirname "$0")"

KIMG=${KIMG:-2}
BATCH=${BATCH:-16}
LR=${LR:-6e-4}
NUM=${NUM:-1000}
OUT=${OUT:-exps/quickstart}

echo "== 1/4 install (the CPU wheel of torch 2.13 unless a torch is already installed)"
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -r requirements.txt

echo "== 2/4 distil the built-in teacher to 2 NFE (num_steps=4 with AFS): ${KIMG} kimg, batch ${BATCH}, lr ${LR}"
python train.py --dataset_name=fmnist --outdir="$OUT" --total_kimg="$KIMG" --batch="$BATCH" --lr="$LR" \
    --num_steps=4 --M=3 --afs=True --sampler_tea=dpmpp --max_order=3 --predict_x0=True --lower_order_final=True \
    --schedule_type=polynomial --schedule_rho=7 --tick=0.5 --seed=0 --channels_last=True
RUN=$(ls -d "$OUT"/*-fmnist-4-2-* | tail -n 1)

echo "== 3/4 sample a grid with the distilled model -> $RUN/grid/grid.png"
python sample.py --model_path="$RUN" --seeds=0-63 --grid --outdir="$RUN/grid"

echo "== 4/4 the student next to the teacher's solvers (${NUM} samples each)"
python experiments/quickstart_report.py --student="$RUN" --num="$NUM" --batch=100 --channels_last=True
