"""`torchrun train.py` for a few iterations: the process group (NCCL on CUDA, gloo on a CPU) and DDP, end to end.

Writes a teacher with random weights (the cifar10 EDM architecture, or `--tiny`) as an EDM pickle, runs
`torchrun --standalone --nproc_per_node=N train.py` on it for `--kimg`, and reports what the run's own log and
stats say: the process group's backend, whether DDP wrapped the student, whether the ranks ended with identical
weights, one snapshot written, and the s/kimg of its ticks (the first tick, which pays start-up, left out).
Under torchrun a process group is made even for one rank, so a one-GPU machine runs the NCCL path too.

Examples:

\b
python benchmarks/bench_torchrun.py                      # every visible GPU (one process per GPU)
python benchmarks/bench_torchrun.py --nproc=2 --tiny --device=cpu
"""

import glob
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

import click
import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUP_LINE = re.compile(r"\| (\w+) process group, DDP")


def measure(*, tiny, nproc, batch, kimg, tick, precision, device, timeout_s):
    with tempfile.TemporaryDirectory(prefix="bench-torchrun-") as tmp:
        from torch_utils.persistence import save_edm_pickle

        pkl = os.path.join(tmp, "teacher.pkl")
        save_edm_pickle(pkl, {"ema": common.build_edm(tiny)})
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               os.path.join(ROOT, "train.py"), "--outdir", os.path.join(tmp, "exps"), "--model_path", pkl,
               "--batch", str(batch), "--total_kimg", str(kimg), "--tick", str(tick), "--seed", "0",
               "--precision", precision, "--device", device.type]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        try:
            proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout_s)
            rc, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, output = "timeout", (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        runs = glob.glob(os.path.join(tmp, "exps", "00000-*"))
        log = stats = ""
        snapshots = []
        if runs:
            log_path, stats_path = os.path.join(runs[0], "log.txt"), os.path.join(runs[0], "stats.jsonl")
            log = open(log_path).read() if os.path.exists(log_path) else ""
            stats = open(stats_path).read() if os.path.exists(stats_path) else ""
            snapshots = glob.glob(os.path.join(runs[0], "network-snapshot-*"))
    ticks = [json.loads(line) for line in stats.splitlines() if line.strip()]
    tick_s = [(b["total_sec"] - a["total_sec"]) / (b["kimg"] - a["kimg"]) for a, b in zip(ticks, ticks[1:])]
    group = GROUP_LINE.search(log)
    result = dict(
        bench="torchrun", env=common.environment(device),
        settings=dict(network="tiny" if tiny else "cifar10", nproc=nproc, batch=batch, kimg=kimg, tick=tick,
                      precision=precision),
        command=" ".join(["torchrun"] + cmd[3:]),
        rc=rc, ok=rc == 0 and bool(group) and len(snapshots) == 1,
        backend=group.group(1) if group else None, ddp=bool(group),
        ranks_in_sync=f"{nproc} ranks hold identical weights" in log, snapshots=len(snapshots), ticks=len(ticks),
        s_per_kimg=statistics.median(tick_s) if tick_s else None,
    )
    if not result["ok"]:
        result["output_tail"] = output[-3000:]
    result["summary"] = [
        f"torchrun --nproc_per_node={nproc}: exit {rc}, process group {result['backend']}, DDP {result['ddp']}, "
        f"ranks in sync {result['ranks_in_sync']}, {len(snapshots)} snapshot(s), {len(ticks)} ticks"
        + (f", median {result['s_per_kimg']:.3f} s/kimg after the first tick" if tick_s else "")]
    return result


@click.command(help=__doc__)
@click.option("--tiny", is_flag=True, help="A very small SongUNet instead of the cifar10 architecture (CPU runs)")
@click.option("--nproc", type=click.IntRange(min=1), default=None,
              help="Processes  [default: the number of visible GPUs, 1 without any]")
@click.option("--batch", type=click.IntRange(min=1), default=128, show_default=True, help="Total batch")
@click.option("--kimg", type=click.FloatRange(min=0, min_open=True), default=1.024, show_default=True,
              help="Training length (8 iterations at batch 128)")
@click.option("--tick", type=click.FloatRange(min=0, min_open=True), default=0.256, show_default=True,
              help="train.py's --tick in kimg")
@click.option("--precision", type=click.Choice(["fp16", "bf16", "fp32"]), default="fp16", show_default=True,
              help="train.py's --precision")
@click.option("--timeout", "timeout_s", type=click.IntRange(min=1), default=300, show_default=True,
              help="Seconds before the torchrun process is stopped")
@click.option("--device", default=None, help="Device type  [default: cuda if available]")
@click.option("--json", "json_path", default=None, metavar="FILE", help="Also append the JSON line to FILE")
def main(tiny, nproc, device, json_path, **opts):
    device = common.pick_device(device)
    if nproc is None:
        nproc = max(torch.cuda.device_count(), 1) if device.type == "cuda" else 1
    result = measure(tiny=tiny, nproc=nproc, device=device, **opts)
    common.report(result, json_path)
    if not result["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
