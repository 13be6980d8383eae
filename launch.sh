#!/usr/bin/env bash
# Recommended SFD recipes (the paper used 4 A100 GPUs; change --batch/--batch-gpu to fit your devices).
#
#   bash launch.sh sfd        # 2-NFE SFD on cifar10
#   bash launch.sh sfdv       # SFD-v: one model for num_steps 4..7 (NFE 2..5)
#   bash launch.sh stage2     # second stage to 1 NFE (MODEL=path/to/first-stage/snapshot)
#   bash launch.sh sample     # 50k images from experiment EXP (default 0)
#   bash launch.sh sample_v   # 50k images from an SFD-v experiment at NUM_STEPS (default 4)
#   bash launch.sh fid        # FID of IMAGES against REF
#   bash launch.sh prdc       # precision/recall/density/coverage of IMAGES against IMAGES_REF
#
# Environment: GPUS (default 4), DATASET (default cifar10), EXP, MODEL, NUM_STEPS, IMAGES, REF, IMAGES_REF.
# "num_steps" counts time points (steps + 1); AFS saves the first network call, so num_steps=4 with AFS is 2 NFE.
set -euo pipefail
cd "$(dirname "$0")"

GPUS=${GPUS:-4}
DATASET=${DATASET:-cifar10}
RUN="torchrun --standalone --nproc_per_node=${GPUS}"

case "${1:-help}" in
sfd)
    # Train a 2-NFE SFD (EDM models: cifar10, ffhq, afhqv2, imagenet64)
    $RUN train.py \
        --dataset_name="$DATASET" --total_kimg=200 --batch=128 --lr=5e-5 \
        --num_steps=4 --M=3 --afs=True --sampler_tea="dpmpp" --max_order=3 --predict_x0=True --lower_order_final=True \
        --schedule_type="polynomial" --schedule_rho=7 --use_step_condition=False --is_second_stage=False
    ;;
sfdv)
    # Train SFD-v (sampling at num_steps 4..7, i.e. NFE 2..5, with one model)
    $RUN train.py \
        --dataset_name="$DATASET" --total_kimg=800 --batch=128 --lr=5e-5 \
        --num_steps=4 --M=3 --afs=True --sampler_tea="dpmpp" --max_order=3 --predict_x0=True --lower_order_final=True \
        --schedule_type="polynomial" --schedule_rho=7 --use_step_condition=True --is_second_stage=False
    ;;
stage2)
    # Second stage for a 1-NFE model (with M=2 the teacher should be an SFD model trained with num_steps=7, or SFD-v)
    : "${MODEL:?set MODEL=path/to/the/first-stage/network-snapshot-*.safetensors}"
    $RUN train.py \
        --model_path="$MODEL" \
        --dataset_name="$DATASET" --total_kimg=2000 --batch=128 --lr=5e-4 \
        --num_steps=3 --M=2 --afs=True --sampler_tea="euler" --is_second_stage=True
    ;;
sample)
    # 50k images for FID from the latest snapshot of experiment EXP
    $RUN sample.py --dataset_name="$DATASET" --model_path="${EXP:-0}" --seeds='0-49999' --batch=256
    ;;
sample_v)
    # 50k images from an SFD-v model at a chosen num_steps
    $RUN sample.py --dataset_name="$DATASET" --model_path="${EXP:-0}" --seeds='0-49999' --batch=256 \
        --num_steps="${NUM_STEPS:-4}"
    ;;
fid)
    : "${IMAGES:?set IMAGES=path/to/generated/images}"
    python fid.py calc --images="$IMAGES" --ref="${REF:-https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz}"
    ;;
prdc)
    : "${IMAGES:?set IMAGES=path/to/generated/images}" "${IMAGES_REF:?set IMAGES_REF=path/to/reference/images}"
    python prdc.py calc --images="$IMAGES" --images_ref="$IMAGES_REF"
    ;;
*)
    sed -n '2,16p' "$0"
    ;;
esac
