#!/usr/bin/env bash
# Offline quickstart on the built-in Fashion-MNIST teacher (assets/): install, distil it to 2 NFE on the CPU,
# sample a grid, and print FID — no download. Under 10 minutes on 2 CPU cores.
#
#   bash quickstart.sh                 # KIMG=… (distillation length), OUT=… (experiment folder) to change
set -euo pipefail
cd "$(dirname "$0")"

KIMG=${KIMG:-4}
OUT=${OUT:-exps/quickstart}
REF="--fid_ref=assets/fmnist-train-ref.npz --detector=assets/fmnist-detector.pt"

echo "== 1/4 install"
python -m pip install -q -r requirements.txt

echo "== 2/4 distil the built-in teacher to 2 NFE (num_steps=4 with AFS), ${KIMG} kimg"
python train.py --dataset_name=fmnist --outdir="$OUT" --total_kimg="$KIMG" --batch=16 --lr=3e-4 \
    --num_steps=4 --M=3 --afs=True --sampler_tea=dpmpp --max_order=3 --predict_x0=True --lower_order_final=True \
    --schedule_type=polynomial --schedule_rho=7 --tick=1 --seed=0
RUN=$(ls -d "$OUT"/*-fmnist-4-2-* | tail -n 1)

echo "== 3/4 sample a grid with the distilled model -> $RUN/grid/grid.png"
python sample.py --model_path="$RUN" --seeds=0-63 --grid --outdir="$RUN/grid"

echo "== 4/4 FID (5000 samples, our Fashion-MNIST detector against the training set)"
echo "-- distilled SFD student, 2 NFE:"
python sample.py --model_path="$RUN" --seeds=0-4999 --batch=250 --no-save $REF | grep -E "^FID"
echo "-- the teacher with the same 2-NFE Euler sampler, not distilled:"
python sample.py --dataset_name=fmnist --solver=euler --num_steps=4 --afs=True --seeds=0-4999 --batch=250 \
    --no-save $REF | grep -E "^FID"
