"""How the SFD student on the built-in teacher improves with distillation length, against DPM-Solver++(3M).

One SFD run of `--kimg` thousand trajectories saves a snapshot every `--every` kimg (the LR drops ÷10 at half of
the run, as always); each snapshot samples the first `--num` seeds of a finished table run and is scored like the
table rows (FID with our detector, PSNR to that run's Heun reference images). The same seeds through
DPM-Solver++(3M) at `--baseline_nfe` give the line to beat. Every number is measured here.

    python experiments/fmnist_sfd_budget.py --table_workdir exps/table-10k --nfe 2 --kimg 12 --every 4 --num 2000
"""

import json
import os
import sys
import time

import click
import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # run as a script from anywhere

from experiments.fmnist_table import fid_of, machine_name, run_sampler  # noqa: E402
from metrics.detectors import load_detector  # noqa: E402
from metrics.frechet import load_ref  # noqa: E402
from metrics.images import psnr_uint8  # noqa: E402
from models import load_network  # noqa: E402
from torch_utils.cli import CommandError  # noqa: E402
from training.training_loop import training_loop  # noqa: E402


@click.command()
@click.option("--table_workdir", required=True, help="Work folder of a fmnist_table.py run (settings + reference)")
@click.option("--nfe", type=click.IntRange(min=1), default=2, show_default=True, help="Student NFE (num_steps = NFE+2)")
@click.option("--kimg", type=float, default=12, show_default=True, help="Length of the one SFD run")
@click.option("--every", type=float, default=4, show_default=True, help="Snapshot (and score) every this many kimg")
@click.option("--num", type=click.IntRange(min=2), default=2000, show_default=True, help="Seeds 0..num-1 scored")
@click.option("--afs", type=bool, default=True, show_default=True, help="Analytical first step (NFE = num_steps-2)")
@click.option("--baseline_nfe", type=int, default=5, show_default=True)
@click.option("--out", default=None, help="JSON lines of results  [default: <table_workdir>/budget-nfe<N>.jsonl]")
@click.option("--device", default="cpu", show_default=True)
def main(table_workdir, nfe, kimg, every, num, afs, baseline_nfe, out, device):
    device = torch.device(device)
    settings_path = os.path.join(table_workdir, "settings.json")
    ref_path = os.path.join(table_workdir, "reference.npy")
    if not (os.path.isfile(settings_path) and os.path.isfile(ref_path)):
        raise CommandError(f"--table_workdir: {table_workdir} has no settings.json + reference.npy; run "
                           "experiments/fmnist_table.py with that --workdir first")
    st = json.load(open(settings_path))
    reference = torch.from_numpy(np.load(ref_path))
    if len(reference) < num:
        raise CommandError(f"--num: the table run has {len(reference)} reference images; pass --num <= that")
    reference = reference[:num]
    teacher = os.path.join(REPO, "assets", "fmnist-teacher.pkl")
    loaded = load_network(model_path=teacher, device=device)
    sig = dict(sigma_min=loaded.settings["sigma_min"], sigma_max=loaded.settings["sigma_max"])
    det = load_detector(os.path.join(REPO, "assets", "fmnist-detector.pt"), device=device)
    ref_stats = load_ref(os.path.join(REPO, "assets", "fmnist-train-ref.npz"))
    seeds = list(range(num))
    out = out or os.path.join(table_workdir, f"budget-nfe{nfe}{'' if afs else '-noafs'}.jsonl")
    machine = machine_name(device)

    def record(row):
        row.update(num=num, machine=machine)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    base = run_sampler(loaded.net, "dpmpp", seeds, 500, device, num_steps=baseline_nfe + 1, max_order=3,
                       thresholding=st["thresholding"], **sig)
    record(dict(method="DPM-Solver++(3M)", nfe=baseline_nfe, fid=fid_of(base, det, ref_stats, device),
                psnr=psnr_uint8(base, reference)))

    num_steps = nfe + 2 if afs else nfe + 1
    run_dir = os.path.join(table_workdir, f"budget-run-nfe{nfe}{'' if afs else '-noafs'}-{int(time.time())}")
    os.makedirs(run_dir)
    t0 = time.time()
    training_loop(run_dir=run_dir, model_path=teacher, batch_size=st["batch"], total_kimg=kimg, seed=nfe,
                  device=str(device), progress=False, num_steps=num_steps, M=3, afs=afs, sampler_tea="dpmpp",
                  max_order=3, lr=st["lr"], thresholding=st["thresholding"], kimg_per_tick=every, snapshot_ticks=1)
    seconds = time.time() - t0
    for name in sorted(f for f in os.listdir(run_dir) if f.startswith("network-snapshot-")):
        at = int(name.split("-")[-1].split(".")[0])
        student = load_network(model_path=os.path.join(run_dir, name), device=device).net
        images = run_sampler(student, "euler", seeds, 500, device, num_steps=num_steps, afs=afs, **sig)
        record(dict(method="SFD" + ("" if afs else " (no AFS)"), nfe=nfe, kimg=at, of_kimg=kimg, lr=st["lr"],
                    batch=st["batch"], fid=fid_of(images, det, ref_stats, device),
                    psnr=psnr_uint8(images, reference), run_s=seconds))


if __name__ == "__main__":
    main()
