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
# The second file: the benchmark's plots. The constraint keeps the torch just checked (open-clip-torch brings torchvision,
# whose newest release would otherwise pull the index's newest torch, a CUDA build, over a CPU one).
python -m pip install -q -r requirements.txt -r experiments/requirements.txt \
    -c <(python -c 'import torch; print("torch==" + torch.__version__)')
# Real Fashion-MNIST images for the two tests of the shipped detector and teacher: Debian's offline package, where
# apt-get is there and this runs as root (elsewhere those two tests say skipped, and why).
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ ! -d /usr/share/datasets/fashion-mnist ]; then
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
        || echo "dataset-fashion-mnist could not be installed: its two tests will say skipped" >&2
fi

echo "== 2/4 distil the built-in teacher to 2 NFE (num_steps=4 with AFS): ${KIMG} kimg, batch ${BATCH}, lr ${LR}"
python train.py --dataset_name=fmnist --outdir="$OUT" --total_kimg="$KIMG" --batch="$BATCH" --lr="$LR" \
    --num_steps=4 --M=3 --afs=True --sampler_tea=dpmpp --max_order=3 --predict_x0=True --lower_order_final=True \
    --schedule_type=polynomial --schedule_rho=7 --tick=0.5 --seed=0 --channels_last=True
RUN=$(ls -d "$OUT"/*-fmnist-4-2-* | tail -n 1)

echo "== 3/4 sample a grid with the distilled model -> $RUN/grid/grid.png"
python sample.py --model_path="$RUN" --seeds=0-63 --grid --outdir="$RUN/grid"

echo "== 4/4 the student next to the teacher's solvers (${NUM} samples each)"
python experiments/quickstart_report.py --student="$RUN" --num="$NUM" --batch=100 --channels_last=True

echo "== next: sample and score the student yourself (the built-in detector and references, offline)"
echo "  python sample.py --model_path=$RUN --seeds=0-9999 --outdir=$RUN/samples"
echo "  python fid.py calc --images=$RUN/samples --ref=assets/fmnist-teacher-ref.npz --detector=assets/fmnist-detector.pt"
echo "  python fid.py calc --images=$RUN/samples --ref=assets/fmnist-train-ref.npz --detector=assets/fmnist-detector.pt"
echo "  (teacher-FID, then data-FID; sample.py --model_path takes the run folder, or its number with --exps_dir=$OUT)"
