#!/usr/bin/env bash
# Issue 8: every throughput measurement on one GPU, in priority order, within a fixed time budget.
#
#   OUT=/some/folder bash benchmarks/run_gpu.sh      # default OUT: ./bench-out
#
# Writes $OUT/bench.jsonl (one JSON line per benchmark run) and $OUT/bench.log (environment, full output).
# Sized for about 7 minutes on an H100 (device tool: timeout_s=450): each run gets at most its own cap and never
# more than what is left of BUDGET_S seconds; a run that fails or times out is logged and the next one starts.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-./bench-out}
BUDGET_S=${BUDGET_S:-420}
mkdir -p "$OUT"
JSON="$OUT/bench.jsonl"
LOG="$OUT/bench.log"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}  # the GPU image has python3 only

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv 2>&1
    $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
    git rev-parse HEAD 2>/dev/null && git status --short 2>/dev/null | head -20
} >>"$LOG" 2>&1

run() {  # run CAP_S SCRIPT ARGS...
    local cap=$1; shift
    local left=$((BUDGET_S - SECONDS))
    if [ "$left" -lt 20 ]; then
        echo "== SKIPPED (budget spent): $*" | tee -a "$LOG"
        return
    fi
    [ "$cap" -gt "$left" ] && cap=$left
    echo "== [t=${SECONDS}s, cap ${cap}s] $PY $*" | tee -a "$LOG"
    timeout --signal=INT --kill-after=10 "$cap" $PY "$@" --json "$JSON" >>"$LOG" 2>&1
    local rc=$?
    if [ $rc -ne 0 ]; then
        echo "== FAILED rc=$rc: $*" | tee -a "$LOG"
    fi
}

B=benchmarks
# The CUDA-only tests first (fp16 closeness, no host sync in the hot loop, lagged NaN fallback): a few seconds.
echo "== [t=${SECONDS}s] pytest -m gpu" | tee -a "$LOG"
timeout 90 $PY -m pytest -q -m gpu -p no:cacheprovider $(grep -l "mark.gpu" tests/*.py) >>"$LOG" 2>&1 || echo "== FAILED: pytest -m gpu" | tee -a "$LOG"
# Training: the paper's setting (batch 128, mixed precision, 2-NFE recipe), then fp32, then SFD-v.
run 75 $B/bench_train.py --batch=128 --warmup_kimg=0.5 --kimg=2
# The fast path: bf16 autocast + channels-last + torch.compile (the first iterations compile, hence the warm-up).
run 150 $B/bench_train.py --batch=128 --warmup_kimg=1.5 --kimg=2 --loop_kwarg precision=bf16 \
    --loop_kwarg channels_last=true --loop_kwarg compile=true
# Sampling: fp32 as sample.py runs, PNG writing off and on; then the fast path (fp16, channels-last, CUDA graphs).
run 45 $B/bench_sample.py --batch=256 --batches=20 --warmup=3 --png=both
run 75 $B/bench_sample.py --batch=256 --batches=20 --warmup=3 --png=both --precision=fp16 --channels_last \
    --compile=reduce-overhead
# Equivalence of the fast path: per-step losses of the first 2 kimg and sampled images vs fp32 (and fp16, the paper).
run 150 $B/check_equivalence.py --batch=128 --kimg=2 --seeds=256
# FID features: fp32 as fid.py runs.
run 35 $B/bench_fid.py --batch=256 --batches=20 --warmup=3
run 80 $B/bench_train.py --batch=128 --warmup_kimg=0.5 --kimg=1 --precision=fp32
run 30 $B/bench_sample.py --batch=256 --batches=20 --warmup=3 --png=off --precision=fp16
run 60 $B/bench_sample.py --batch=256 --batches=20 --warmup=3 --png=off --precision=bf16 --channels_last --compile=default
run 30 $B/bench_sample.py --batch=256 --batches=20 --warmup=3 --png=off --cudnn_benchmark
run 30 $B/bench_fid.py --batch=256 --batches=20 --warmup=3 --channels_last --cudnn_benchmark
run 60 $B/bench_train.py --batch=128 --warmup_kimg=0.5 --kimg=1.5 --use_step_condition
# CUDA graphs on top of the fast path (torch.compile mode reduce-overhead).
run 150 $B/bench_train.py --batch=128 --warmup_kimg=1.5 --kimg=2 --loop_kwarg precision=bf16 \
    --loop_kwarg channels_last=true --loop_kwarg compile='"reduce-overhead"'

echo "== done in ${SECONDS}s; results: $JSON" | tee -a "$LOG"
$PY - "$JSON" <<'PY' 2>&1 | tee -a "$LOG"
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    s = r["settings"]
    if r["bench"] == "train":
        fast = ",".join(f"{k}={s[k]}" for k in ("precision", "channels_last", "compile") if k in s)
        print(f"train  fp16={s['mixed_precision']!s:5} step_cond={s['use_step_condition']!s:5} {fast} "
              f"{r['s_per_kimg']:.3f} s/kimg {r['tflops']:.1f} TFLOP/s peak {r['peak_mem_gb']:.2f} GB")
    elif r["bench"] == "sample":
        print(f"sample {s.get('precision', 'fp32')} channels_last={s.get('channels_last')} compile={s.get('compile')} "
              f"cudnn_bm={s['cudnn_benchmark']!s:5} png off "
              f"{r.get('img_per_s_png_off', float('nan')):.0f} img/s, png on {r.get('img_per_s_png_on', float('nan')):.0f} img/s")
    elif r["bench"] == "equivalence":
        for name, stats in r.get("loss_rel_diff", {}).items():
            print(f"equiv  losses {name} vs fp32: " + ", ".join(f"{k} {v:.2e}" for k, v in stats.items()))
        print("equiv  PSNR vs fp32: " + ", ".join(f"{k} {v:.2f} dB" for k, v in r.get("psnr_db", {}).items()))
    else:
        print(f"fid    channels_last={s['channels_last']!s:5} {r['img_per_s']:.0f} img/s "
              f"({r['tflops'] or float('nan'):.1f} TFLOP/s) [{s['detector'][:40]}]")
PY
