#!/usr/bin/env bash
# The built-in table, the SFD-2 curve and the metric's sanity ladder on one GPU, within a fixed wall-clock budget.
#
#   OUT=/some/folder bash experiments/gpu_table.sh        # default OUT: ./gpu-table-out
#
# Every distillation is its own process (the Fashion-MNIST network is small, so one process leaves the GPU mostly
# idle), each with its own work folder under $WORK; the baselines and the ladder run beside them. At DEADLINE_S the
# processes still running are stopped; their training-state dumps stay resumable with the same fmnist_table.py
# command. What comes back in $OUT:
#   results.tar.gz   every work folder's rows.jsonl, table-rows.json, settings.json, stats.jsonl and done.json, the ladder's report,
#                    the logs;
#   <row>.safetensors the final snapshot of every finished distillation (for grids and re-scoring);
#   <row>-state.pt   the latest dump of a distillation that did not finish (resume it elsewhere).
# Merge the rows into one table with `fmnist_table.py --table_only --rows_file <each work folder's table-rows.json>`.
# To continue an earlier call, put its dumps back under $WORK/<row>/distil/<row>-<kimg>kimg/ (with its stats.jsonl
# and settings.json) and name $WORK in the device call's carry: each distillation resumes from its latest dump.
# PROCS picks the processes (e.g. PROCS="sfd3 sfd4 sfd5 sfdv" KIMG_V=800 KIMG2=2000 to finish the first-stage rows
# and continue a CPU run of SFD-v at the paper's budget); fewer processes leave each more of the GPU.
# TEACHER=assets/<other>.pkl runs all of it on another teacher: the ladder process first writes that teacher's
# reference statistics to TEACHER_REF (default $WORK/teacher-ref.npz; 10k Heun-34 samples, seeds 100000..), and
# the table processes wait for that file before they start (e.g. PROCS="sfd2 base" TEACHER=... for the rows
# that decide the orderings). Without TEACHER the shipped teacher and assets/fmnist-teacher-ref.npz are used.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu-table-out}
WORK=${WORK:-./exps/gpu-table}
METRIC_WORK=${METRIC_WORK:-$WORK/metric}  # the ladder's image cache (carry the reference images to skip them)
DEADLINE_S=${DEADLINE_S:-480}
NUM=${NUM:-10000}          # samples per row
KIMG=${KIMG:-200}          # SFD rows (launch.sh's CIFAR-10 recipe)
KIMG_V=${KIMG_V:-200}      # SFD-v (launch.sh: 800; smaller to fit the budget)
KIMG2=${KIMG2:-200}        # second stage (launch.sh: 2000)
TICK=${TICK:-2}
CURVE_EVERY=${CURVE_EVERY:-5}     # SFD-2 curve points, in ticks
CURVE_V_EVERY=${CURVE_V_EVERY:-20}  # SFD-v curve points (2 NFE), in ticks
CURVE_2_EVERY=${CURVE_2_EVERY:-50}  # second-stage curve points (1 NFE), in ticks
PY=${PYTHON:-python3}
EXTRA=${EXTRA:-}           # more fmnist_table.py options, e.g. --device cpu for a dry run
PROCS=${PROCS:-"sfd2 sfd3 sfd4 sfd5 sfdv base"}  # the table processes to start (fewer share the GPU better)
TEACHER=${TEACHER:-}
TEACHER_REF=${TEACHER_REF:-$WORK/teacher-ref.npz}
TABLE_TEACHER=()   # fmnist_table.py's teacher options
METRIC_TEACHER=()  # fmnist_metric.py's
if [ -n "$TEACHER" ]; then
    [ -f "$TEACHER" ] || { echo "TEACHER: no file $TEACHER; give an EDM pickle of the Fashion-MNIST teacher" >&2; exit 2; }
    if [ -n "${NO_METRIC:-}" ] && [ ! -f "$TEACHER_REF" ]; then
        echo "TEACHER_REF: no file $TEACHER_REF and NO_METRIC is set; drop NO_METRIC so the ladder writes it" >&2
        exit 2
    fi
    TABLE_TEACHER=(--teacher "$TEACHER" --teacher_ref "$TEACHER_REF")
    METRIC_TEACHER=(--teacher "$TEACHER" --write_ref "$TEACHER_REF")
fi
for name in $PROCS; do
    case $name in sfd2|sfd3|sfd4|sfd5|sfdv|base) ;;
        *) echo "PROCS: unknown process '$name'; choose from: sfd2 sfd3 sfd4 sfd5 sfdv base" >&2; exit 2 ;;
    esac
done
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$OUT" "$WORK/logs"
LOGS="$WORK/logs"

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    git rev-parse HEAD 2>/dev/null
    nproc
} >"$LOGS/env.log" 2>&1

table() {  # table NAME ROWS [options...]: one fmnist_table.py process in its own work folder
    local name=$1 rows=$2; shift 2
    while [ -n "$TEACHER" ] && [ ! -f "$TEACHER_REF" ]; do  # the ladder process writes it first
        if ! kill -0 "${metric_pid:-0}" 2>/dev/null; then
            echo "$name not started: the ladder process ended without writing $TEACHER_REF" >>"$LOGS/driver.log"
            return
        fi
        sleep 2
    done
    $PY experiments/fmnist_table.py --num "$NUM" --kimg "$KIMG" --row_kimg "sfdv=$KIMG_V,stage2=$KIMG2" \
        --tick "$TICK" --curve_every "$CURVE_EVERY" \
        --curve_v_every "$CURVE_V_EVERY" --curve_2_every "$CURVE_2_EVERY" --dump_every 3 --rows "$rows" --workdir "$WORK/$name" \
        --out "$WORK/$name/table.md" "${TABLE_TEACHER[@]}" $EXTRA "$@" >"$LOGS/$name.log" 2>&1
    echo "$name exit $? at ${SECONDS}s" >>"$LOGS/driver.log"
}

# One endpoint (10k Heun images, seeds 0..NUM-1) for all: the baselines' process makes it first, the others read
# it when they score (a link that does not resolve yet makes a process compute its own, the same images).
for name in sfd2 sfd3 sfd4 sfd5 sfdv; do
    mkdir -p "$WORK/$name"
    [ -e "$WORK/$name/reference.npy" ] || ln -sfn ../base/reference.npy "$WORK/$name/reference.npy"
done

pids=()
others=()
if [ -z "${NO_METRIC:-}" ]; then  # NO_METRIC=1: the ladder is done (experiments/fmnist_metric.md)
    ( $PY experiments/fmnist_metric.py --num "$NUM" --ref_num "$NUM" --sets A,B --workdir "$METRIC_WORK" \
        --out "$WORK/metric.md" "${METRIC_TEACHER[@]}" ${EXTRA} >"$LOGS/metric.log" 2>&1
      echo "metric exit $? at ${SECONDS}s" >>"$LOGS/driver.log" ) & pids+=($!)
    metric_pid=$!
fi
for name in $PROCS; do
    case $name in
        sfd2|sfd3|sfd4|sfd5) table "$name" "$name" & pids+=($!) ;;
        sfdv) table sfdv sfdv,stage2 & pids+=($!) ;;
        base) table base ref,ddim10,ddim50,dpmpp5,dpmpp10 & pids+=($!) ;;
    esac
done
if [ -z "${NO_GPU_TESTS:-}" ]; then
    ( timeout 150 $PY -m pytest -q -m gpu -p no:cacheprovider $(grep -l "mark.gpu" tests/*.py) >"$LOGS/pytest-gpu.log" 2>&1
      echo "pytest-gpu exit $? at ${SECONDS}s" >>"$LOGS/driver.log" ) & others=($!)
fi
( while sleep 20; do echo "t=${SECONDS}s"; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null; done ) \
    >"$LOGS/gpu-util.log" 2>&1 &
monitor=$!

while [ $SECONDS -lt "$DEADLINE_S" ]; do
    running=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && running=1; done
    [ $running -eq 0 ] && break
    sleep 5
done
echo "stopping at ${SECONDS}s" >>"$LOGS/driver.log"
stop() {  # stop SIGNAL: the python processes this script started (never others of the same name)
    for p in "${pids[@]}" "${others[@]}"; do pkill "-$1" -P "$p" 2>/dev/null; done
}
stop INT
sleep 8
stop KILL
kill "$monitor" 2>/dev/null
wait 2>/dev/null

# What comes back: the small files in one archive, then snapshots and dumps while the limits allow (8 files).
find "$WORK" \( -name rows.jsonl -o -name settings.json -o -name stats.jsonl -o -name done.json -o -name '*.md' \
    -o -name '*.json' -o -name '*.log' -o -name teacher-ref.npz \) -print0 | tar -czf "$OUT/results.tar.gz" --null -T -
n=1
room() {  # room FILE: whether FILE still fits in what comes back (60 MB together)
    local used; used=$(du -cb "$OUT" | tail -1 | cut -f1)
    [ $((used + $(stat -c %s "$1"))) -lt 60000000 ]
}
for run in "$WORK"/*/distil/*; do
    [ -d "$run" ] || continue
    row=$(basename "$run")
    if [ -f "$run/done.json" ]; then
        snap=$(ls "$run"/network-snapshot-*.safetensors 2>/dev/null | tail -1)
        [ -n "$snap" ] && [ $n -lt 8 ] && room "$snap" && cp "$snap" "$OUT/$row.safetensors" && n=$((n + 1))
    fi
done
for run in "$WORK"/*/distil/*; do
    [ -d "$run" ] || continue
    row=$(basename "$run")
    if [ ! -f "$run/done.json" ]; then
        dump=$(ls "$run"/training-state-*.pt 2>/dev/null | tail -1)
        [ -n "$dump" ] && [ $n -lt 8 ] && room "$dump" && cp "$dump" "$OUT/$row-state.pt" && n=$((n + 1))
    fi
done
cat "$LOGS/driver.log"
tail -n 3 "$LOGS"/*.log
ls -la "$OUT"
