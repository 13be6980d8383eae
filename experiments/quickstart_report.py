"""The last step of quickstart.sh: the distilled 2-NFE student next to the teacher's own solvers, and one sentence.

On the same seeds, it scores the student, the teacher with Euler and with DPM-Solver++(3M) at the student's NFE, and
DPM-Solver++(3M) at 5 NFE (the baseline the paper's SFD beats at 2 NFE), each by its teacher-FID (against the
teacher's converged samples) and its data-FID (against the Fashion-MNIST training set). DPM-Solver++ runs without
dynamic thresholding, as the student's teacher did (train.py's default).

    python experiments/quickstart_report.py --student exps/quickstart/00000-fmnist-4-2-dpmpp-3-poly7.0-afs
"""

import json
import os
import sys
import time

import click
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # run as a script from anywhere

import solvers  # noqa: E402
from experiments.table.scoring import Scorer, run_sampler  # noqa: E402
from metrics.detectors import load_detector  # noqa: E402
from metrics.frechet import load_ref  # noqa: E402
from models import load_network  # noqa: E402
from sample import latest_snapshot_in  # noqa: E402
from torch_utils.cli import CommandError  # noqa: E402
from training.config import DistillConfig  # noqa: E402
from training.precision import full_fp32, prepare_module  # noqa: E402

ASSETS = os.path.join(REPO, "assets")
BASELINE_NFE = 5


def distillation_minutes(run_dir):
    """Wall time of the run from its stats.jsonl (sum over ticks), in minutes; None without one."""
    path = os.path.join(run_dir, "stats.jsonl")
    if not os.path.isfile(path):
        return None
    total, last = 0.0, 0.0
    for line in open(path):
        entry = json.loads(line)
        total += entry["sec_per_kimg"] * (entry["kimg"] - last)
        last = entry["kimg"]
    return total / 60


@click.command()
@click.option("--student", required=True, help="Experiment folder (its latest snapshot) or snapshot file")
@click.option("--teacher", default=os.path.join(ASSETS, "fmnist-teacher.pkl"), show_default=True)
@click.option("--detector", default=os.path.join(ASSETS, "fmnist-detector.pt"), show_default=True)
@click.option("--ref", default=os.path.join(ASSETS, "fmnist-train-ref.npz"), show_default=True)
@click.option("--teacher_ref", default=os.path.join(ASSETS, "fmnist-teacher-ref.npz"), show_default=True)
@click.option("--num", type=click.IntRange(min=2), default=2000, show_default=True, help="Samples per row (seeds 0..)")
@click.option("--batch", type=click.IntRange(min=1), default=500, show_default=True)
@click.option("--channels_last", type=bool, default=False, show_default=True,
              help="Channels-last networks (faster convolutions on many CPUs; the same images up to rounding)")
@click.option("--device", default=None)
def main(student, teacher, detector, ref, teacher_ref, num, batch, channels_last, device):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    full_fp32()  # rows made on a GPU compare with rows made on a CPU
    for path, opt in ((teacher, "--teacher"), (detector, "--detector"), (ref, "--ref"), (teacher_ref, "--teacher_ref")):
        if not os.path.isfile(path):
            raise CommandError(f"{opt}: no file {path}; pass an existing file")
    if not os.path.exists(student):
        raise CommandError(f"--student: no such folder or file {student}")
    run_dir = student if os.path.isdir(student) else os.path.dirname(student)
    snapshot = latest_snapshot_in(student) if os.path.isdir(student) else student
    loaded = load_network(model_path=snapshot, device=device)
    st = loaded.settings
    nfe = solvers.nfe_of("euler", st["num_steps"], afs=st["afs"])
    teacher_net = load_network(model_path=teacher, device=device).net
    sig = dict(sigma_min=st["sigma_min"], sigma_max=st["sigma_max"])
    seeds = list(range(num))
    score = Scorer(load_detector(detector, device=device), load_ref(teacher_ref), load_ref(ref), device)

    rows = []

    def row(name, net, solver, **kwargs):
        t0 = time.time()
        images = run_sampler(net, solver, seeds, batch, device, fast=prepare_module(net, channels_last=channels_last),
                             **kwargs, **sig)
        rows.append(dict(name=name, nfe=solvers.nfe_of(solver, kwargs["num_steps"], afs=kwargs.get("afs", False)),
                         seconds=time.time() - t0, **score(images)))

    row("SFD student (distilled)", loaded.net, "euler", num_steps=st["num_steps"], afs=st["afs"],
        schedule_type=st["schedule_type"], schedule_rho=st["schedule_rho"])
    row("teacher, Euler (AFS)", teacher_net, "euler", num_steps=st["num_steps"], afs=st["afs"],
        schedule_type=st["schedule_type"], schedule_rho=st["schedule_rho"])
    as_distilled = DistillConfig.thresholding  # the baselines run as the student's teacher did
    row("teacher, DPM-Solver++(3M)", teacher_net, "dpmpp", num_steps=nfe + 1, max_order=3, thresholding=as_distilled)
    row("teacher, DPM-Solver++(3M)", teacher_net, "dpmpp", num_steps=BASELINE_NFE + 1, max_order=3,
        thresholding=as_distilled)

    print(f"{num} samples each (seeds 0-{num - 1}); teacher-FID against the teacher's converged samples, data-FID "
          "against the Fashion-MNIST training set (lower is better):")
    print(f"  {'':28s} {'NFE':>3s} {'teacher-FID':>12s} {'data-FID':>10s}")
    for r in rows:
        print(f"  {r['name']:28s} {r['nfe']:3d} {r['teacher_fid']:12.2f} {r['fid']:10.2f}")
    print(sentence(rows[0], rows[-1], distillation_minutes(run_dir)))


def sentence(student, baseline, minutes):
    took = f"after {minutes:.1f} minutes of distillation, " if minutes is not None else ""
    verdict = "beats" if student["teacher_fid"] < baseline["teacher_fid"] else "does not yet beat"
    return (f"Result: {took}the {student['nfe']}-NFE SFD student {verdict} DPM-Solver++(3M) at {baseline['nfe']} NFE "
            f"on teacher-FID ({student['teacher_fid']:.2f} vs {baseline['teacher_fid']:.2f}; data-FID "
            f"{student['fid']:.2f} vs {baseline['fid']:.2f}).")


if __name__ == "__main__":
    main()
