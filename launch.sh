#!/usr/bin/env bash
# Recommended SFD recipes (the paper used 4 A100 GPUs; change --batch/--batch-gpu to fit your devices).
#
#   bash launch.sh sfd        # 2-NFE SFD on cifar10
#   bash launch.sh sfdv       # SFD-v: one model for num_steps 4..7 (NFE 2..5)
#   bash launch.sh stage2     # second stage to 1 NFE (MODEL=path/to/first-stage/snapshot)
#   bash launch.sh ldm        # 2-NFE SFD on a latent-diffusion model (DATASET=lsun_bedroom_ldm or ffhq_ldm)
#   bash launch.sh bedroom    # 2-NFE SFD on lsun_bedroom (EDM teacher of Consistency Models, 256x256 pixels)
#   bash launch.sh sd         # 2-step (4-NFE under guidance) SFD on Stable Diffusion v1.5 (ms_coco)
#   bash launch.sh sample     # 50k images from experiment EXP (default 0)
#   bash launch.sh sample_sd  # 30k MS-COCO images (caption of row = seed) from SD experiment EXP; PROMPT for one prompt
#   bash launch.sh clip       # CLIP score (OpenCLIP ViT-g-14) of the sample_sd images IMAGES against their captions
#   bash launch.sh sample_v   # 50k images from an SFD-v experiment at NUM_STEPS (default 4)
#   bash launch.sh fid        # FID of IMAGES against REF
#   bash launch.sh prdc       # precision/recall/density/coverage of IMAGES against IMAGES_REF
#   bash launch.sh fmnist     # the built-in Fashion-MNIST teacher on the CPU: distil, grid, FID (= quickstart.sh)
#
# Environment: GPUS (processes; default: the visible CUDA devices, 1 without any), DATASET (default cifar10), EXP,
# MODEL, NUM_STEPS, IMAGES, REF, IMAGES_REF, PROMPT, CAPTIONS (sd, sample_sd, clip: a local copy of the MS-COCO 30k
# caption CSV instead of the download; the older SFD_COCO_CAPTIONS is read too); DRY=1 prints the command instead of
# running it.
# One process runs as plain `python`; several run under torchrun, after train.py has checked its options for that
# many ranks (--dry-run). Bad input ends in one line and exit code 2, before anything starts.
# "num_steps" counts time points (steps + 1); AFS saves the first network call, so num_steps=4 with AFS is 2 NFE.
set -euo pipefail
cd "$(dirname "$0")"

usage() { sed -n '2,/^set -euo pipefail/{/^#/p}' "$0"; }
case "${1:-help}" in
help | -h | --help) usage; exit 0 ;;
sfd | sfdv | stage2 | ldm | bedroom | sd | sample_sd | clip | sample | sample_v | fid | prdc | fmnist) ;;
*) echo "launch.sh: unknown recipe '$1'; choose one of the recipes below" >&2; usage >&2; exit 2 ;;
esac

fail() { echo "launch.sh $RECIPE: $*" >&2; exit 2; }
need() { [ -n "${!1:-}" ] || fail "set $1=$2"; }  # need VAR "what it is"
RECIPE=$1
if [ -z "${GPUS:-}" ]; then
    GPUS=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))" 2>/dev/null || echo 1)
fi
[[ "$GPUS" =~ ^[1-9][0-9]*$ ]] || fail "GPUS=$GPUS is not a positive number of processes (e.g. GPUS=4)"
[[ "${NUM_STEPS:-4}" =~ ^[0-9]+$ ]] || fail "NUM_STEPS=$NUM_STEPS is not a whole number"
[[ "${EXP:-0}" =~ ^[0-9]+$ ]] || [ -e "${EXP}" ] || fail "EXP=$EXP is neither an experiment number nor a path"
DATASET=${DATASET:-cifar10}
CAPTIONS=${CAPTIONS:-${SFD_COCO_CAPTIONS:-}}  # handed to the scripts as an option; they never read the environment
maybe() { if [ -n "${DRY:-}" ]; then echo "$@"; else "$@"; fi; }

# Our scripts end bad input with exit code 2; under torchrun they also leave it here, and launch.sh keeps it.
export SFD_EXIT_CODE_FILE
SFD_EXIT_CODE_FILE=$(mktemp)
trap 'rm -f "$SFD_EXIT_CODE_FILE"' EXIT
launch() {  # launch SCRIPT ARGS...: one process as python, several under torchrun
    local script=$1
    if [ "$GPUS" = 1 ]; then
        maybe python "$@"
        return
    fi
    if [ "$script" = train.py ] && [ -z "${DRY:-}" ]; then
        local check
        check=$(WORLD_SIZE=$GPUS python "$@" --dry-run 2>&1 >/dev/null) || { echo "$check" >&2; exit 2; }
    fi
    maybe torchrun --standalone --nproc_per_node="$GPUS" "$@" || {
        local rc=$?
        [ -s "$SFD_EXIT_CODE_FILE" ] && exit "$(cat "$SFD_EXIT_CODE_FILE")"
        exit $rc
    }
}
RUN=launch

case "$1" in
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
    need MODEL "path/to/the/first-stage/network-snapshot-*.safetensors"
    $RUN train.py \
        --model_path="$MODEL" \
        --dataset_name="$DATASET" --total_kimg=2000 --batch=128 --lr=5e-4 \
        --num_steps=3 --M=2 --afs=True --sampler_tea="euler" --is_second_stage=True
    ;;
ldm)
    # LDM backbones (./src/$DATASET/model.ckpt from the LDM zip, VQ-f4 first stage): discrete schedule, unconditional
    [[ "$DATASET" == *_ldm ]] || fail "set DATASET=lsun_bedroom_ldm or DATASET=ffhq_ldm"
    $RUN train.py \
        --dataset_name="$DATASET" --total_kimg=200 --batch=128 --lr=5e-5 \
        --num_steps=4 --M=3 --afs=True --sampler_tea="dpmpp" --max_order=3 --predict_x0=True --lower_order_final=True \
        --schedule_type="discrete" --schedule_rho=1 --guidance_type="uncond" --use_step_condition=False --is_second_stage=False
    ;;
bedroom)
    # lsun_bedroom (./src/lsun_bedroom/edm_bedroom256_ema.pt; 526M-parameter OpenAI U-Net on 256x256 pixels): an EDM
    # teacher, so the paper's EDM recipe (batch 128, lr 5e-5, 200 kimg, DPM-Solver++(3M) teacher, polynomial rho 7,
    # sigma 0.006..80). --batch-gpu=4 accumulates each GPU's share in rounds of 4 for the 256x256 activations; it
    # changes memory, not the result: raise it if your GPUs have room, lower it if they run out.
    $RUN train.py \
        --dataset_name="lsun_bedroom" --total_kimg=200 --batch=128 --batch-gpu=4 --lr=5e-5 \
        --num_steps=4 --M=3 --afs=True --sampler_tea="dpmpp" --max_order=3 --predict_x0=True --lower_order_final=True \
        --schedule_type="polynomial" --schedule_rho=7 --use_step_condition=False --is_second_stage=False
    ;;
sd)
    # Stable Diffusion v1.5: random MS-COCO captions, guidance 1 while training, 7.5 stored for sampling; NFE doubles
    # under classifier-free guidance. Only the U-Net is fine-tuned (CAPTIONS=/path/to.csv for a local caption CSV).
    $RUN train.py \
        --dataset_name="ms_coco" --total_kimg=200 --batch=128 --batch-gpu=8 --lr=5e-5 \
        --num_steps=4 --M=3 --afs=True --sampler_tea="dpmpp" --max_order=2 --predict_x0=True --lower_order_final=True \
        --schedule_type="discrete" --schedule_rho=1 --guidance_type="cfg" --guidance_rate=7.5 \
        --use_step_condition=False --is_second_stage=False ${CAPTIONS:+--captions="$CAPTIONS"}
    ;;
sample_sd)
    # MS-COCO 30k for FID/CLIP score (row = seed of the caption CSV), or PROMPT for a grid of one prompt
    if [ -n "${PROMPT:-}" ]; then
        $RUN sample.py --dataset_name=ms_coco --model_path="${EXP:-0}" --seeds='0-15' --batch=16 --grid --prompt="$PROMPT"
    else
        $RUN sample.py --dataset_name=ms_coco --model_path="${EXP:-0}" --seeds='0-29999' --batch=32 \
            ${CAPTIONS:+--captions="$CAPTIONS"}
    fi
    ;;
clip)
    # CLIP score of sample_sd's images (image SEED.png against caption row SEED; sample.py prints where they went)
    need IMAGES "path/to/the/sample_sd/images (e.g. samples/ms_coco/euler_step4_nfe4)"
    $RUN clip_score.py calc --images="$IMAGES" --model=ViT-g-14 --pretrained=laion2b_s34b_b88k \
        ${CAPTIONS:+--prompts="$CAPTIONS"}
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
    need IMAGES "path/to/generated/images"
    maybe python fid.py calc --images="$IMAGES" --ref="${REF:-https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz}"
    ;;
prdc)
    need IMAGES "path/to/generated/images"
    need IMAGES_REF "path/to/reference/images"
    maybe python prdc.py calc --images="$IMAGES" --images_ref="$IMAGES_REF"
    ;;
fmnist)
    # Offline, CPU: distil the shipped teacher to 2 NFE, sample a grid and print FID with the shipped detector.
    maybe bash quickstart.sh
    ;;
esac
