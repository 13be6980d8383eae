#!/usr/bin/env bash
# One device call: the GPU tests, the paper's own code and ours on the same card, in priority order, each run capped.
#
#   OUT=$OUT bash benchmarks/run_gpu.sh                 # on one GPU, about 8 minutes (device tool: timeout_s=560)
#   TINY=1 OUT=/tmp/dry bash benchmarks/run_gpu.sh      # CPU dry run of the same steps at tiny sizes (the tests run it)
#
# Environment: OUT (default ./bench-out); PAPER, the paper-code timer (default .anchors/bench_paper.py: copy
# ../shared/anchors to .anchors and name it in the device call's carry); BUDGET_S (default 470 s; a step starts only
# with 20 s left and never runs past the budget); PYTHON (default python3); TINY=1 for the CPU dry run.
#
# Writes under $OUT: bench.jsonl (a JSON line per measurement: ours carry "bench", the paper code's carry "what"; a
# "call" line first and a "step" line per step with its exit code and seconds), bench.log (every command and all
# output), pytest-gpu.xml (the GPU tests), report.md (benchmarks/report.py: the README's performance table).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-./bench-out}
PAPER=${PAPER:-.anchors/bench_paper.py}
BUDGET_S=${BUDGET_S:-470}
TINY=${TINY:-0}
PY=${PYTHON:-python3}  # the GPU image has python3 only
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
JSON="$OUT/bench.jsonl"
LOG="$OUT/bench.log"
export PYTHONUNBUFFERED=1
B=benchmarks

if [ "$TINY" = 1 ]; then
    ON="--tiny --device=cpu"
    TRAIN="--batch=4 --warmup_kimg=0.004 --kimg=0.008"
    FAST_WARMUP="--warmup_kimg=0.004"
    NOGEN='--loop_kwarg compile="aot_eager"'  # the CPU traces the fast path's graphs without generating kernels
    SAMPLE="--batch=8 --batches=2 --warmup=1"  # the paper timer's --tiny sampler batch
    FID="--channels=1 --batch=2 --batches=1 --warmup=1"
    EQUIV='--batch=4 --kimg=0.012 --seeds=6 --fast precision="bf16" --fast channels_last=true
           --fast compile="aot_eager" --sample_fast precision="fp16" --sample_fast channels_last=true
           --sample_fast compile="aot_eager"'
    DDP="--batch=4 --kimg=0.012 --tick=0.004"
    PAPER_ARGS="--tiny --device cpu"
else
    ON=""
    TRAIN="--batch=128 --warmup_kimg=0.5 --kimg=2"
    FAST_WARMUP="--warmup_kimg=1.5"  # the first iterations compile
    NOGEN=""
    SAMPLE="--batch=256 --batches=20 --warmup=3"
    FID="--batch=256 --batches=20 --warmup=3"
    EQUIV="--batch=128 --kimg=2 --seeds=256"
    DDP="--batch=128 --kimg=1.024 --tick=0.256"
    PAPER_ARGS="--kimg 2 --warmup_kimg 0.5"
fi

{
    date -u
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
    $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
    git rev-parse HEAD 2>/dev/null && git status --short 2>/dev/null | head -20
} >>"$LOG" 2>&1
record() {  # record KIND NAME_OR_EMPTY RC SECONDS CAP COMMAND...: one JSON line of this script's own
    $PY - "$JSON" "$@" <<'PY'
import datetime, json, subprocess, sys
path, kind, name, rc, seconds, cap, command = sys.argv[1:7] + [" ".join(sys.argv[7:])]
if kind == "call":
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    line = dict(bench="call", date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                commit=commit or None, tiny=name == "1", budget_s=int(cap), command=command)
else:
    line = dict(bench="step", name=name, rc=rc, seconds=int(seconds), cap_s=int(cap), command=command)
with open(path, "a") as f:
    f.write(json.dumps(line) + "\n")
PY
}
record call "$TINY" "" 0 "$BUDGET_S" "OUT=\$OUT PAPER=$PAPER BUDGET_S=$BUDGET_S$([ "$TINY" = 1 ] && echo " TINY=1") bash benchmarks/run_gpu.sh"

step() {  # step NAME CAP_S COMMAND...: run COMMAND within CAP_S and what is left of the budget; record how it ended
    local name=$1 cap=$2; shift 2
    local left=$((BUDGET_S - SECONDS))
    local rc start=$SECONDS
    if [ "$left" -lt 20 ]; then
        echo "== [$name] SKIPPED: budget spent" | tee -a "$LOG"
        rc=skipped
    else
        [ "$cap" -gt "$left" ] && cap=$left
        echo "== [$name] [t=${SECONDS}s, cap ${cap}s] $*" | tee -a "$LOG"
        timeout --signal=INT --kill-after=10 "$cap" "$@" >>"$LOG" 2>&1
        rc=$?
        [ $rc -ne 0 ] && echo "== [$name] FAILED rc=$rc" | tee -a "$LOG"
    fi
    record step "$name" "$rc" $((SECONDS - start)) "$cap" "$@"
}

# 1. The GPU tests (their CPU twins run in CI): sync-free hot loop, lagged NaN fallback, half-precision convolutions.
step pytest_gpu 100 $PY -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/pytest-gpu.xml" tests
# 2. The paper's own code on this card: its training iteration and its NFE-2 sampler.
if [ -f "$PAPER" ]; then
    step paper 120 $PY "$PAPER" $PAPER_ARGS --json "$JSON"
else
    echo "== [paper] SKIPPED: no $PAPER (cp -r ../shared/anchors .anchors, and carry it)" | tee -a "$LOG"
    record step paper missing 0 0 "$PAPER"
fi
# 3. Our training in the paper's setting (fp16, batch 128, num_steps 4, M 3, DPM-Solver++(3M), AFS), then on the fast
#    path; each profiles one more iteration after the timed ones.
step train_paper 75 $PY $B/bench_train.py $ON $TRAIN --profile --json "$JSON"
step train_fast 150 $PY $B/bench_train.py $ON $TRAIN $FAST_WARMUP --fast $NOGEN --profile --json "$JSON"
# 4. NFE-2 sampling as sample.py runs it, PNG writing off and on: fp32 (the default), then the fast path.
step sample_fp32 45 $PY $B/bench_sample.py $ON $SAMPLE --png=both --json "$JSON"
if [ "$TINY" = 1 ]; then SAMPLE_FAST="--fast --compile=aot_eager"; else SAMPLE_FAST="--fast"; fi
step sample_fast 80 $PY $B/bench_sample.py $ON $SAMPLE --png=both $SAMPLE_FAST --json "$JSON"
# 5. The fast path computes what fp32 computes: per-step losses of the first 2 kimg, sampled images (PSNR).
step equivalence 150 $PY $B/check_equivalence.py $ON $EQUIV --json "$JSON"
# 6. FID feature extraction (fid.py's path).
step fid 40 $PY $B/bench_fid.py $ON $FID --json "$JSON"
# 7. torchrun train.py: the process group (NCCL on a GPU) and DDP, a few iterations, one process per GPU.
step torchrun 60 $PY $B/bench_torchrun.py $ON $DDP --json "$JSON"

echo "== done in ${SECONDS}s; results: $JSON" | tee -a "$LOG"
$PY $B/report.py "$OUT" --out "$OUT/report.md" 2>&1 | tee -a "$LOG"
