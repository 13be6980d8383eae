"""What exporting an AFS student to diffusers costs, measured on the built-in benchmark.

export.py writes an SFD student as a stock diffusers pipeline. A stock scheduler has no analytical first step
(AFS), so an AFS student is exported with AFS off: its first step calls the network like the others (one NFE more,
and a first step the student was not trained to take that way). This script samples the same student on the same
seeds both ways, at its own time points, and scores each by teacher-FID and data-FID with the built-in detector.
The maths is the sampler's, not the backbone's, so the quickstart's EDM student measures the cost for any backbone.

    python experiments/afs_export_cost.py --student exps/quickstart/00000-fmnist-4-2-dpmpp-3-poly7.0-afs
"""

import os
import sys

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
from torch_utils.cli import CommandError  # noqa: E402
from torch_utils.run_folders import latest_snapshot_in  # noqa: E402
from training.precision import full_fp32  # noqa: E402

ASSETS = os.path.join(REPO, "assets")


def score_both_ways(net, settings, seeds, batch, device, score):
    """[(label, NFE, scores)] of the student as distilled (its own AFS setting) and as exported (AFS off)."""
    rows = []
    for label, afs in (("as distilled", bool(settings["afs"])), ("as exported (AFS off)", False)):
        images = run_sampler(net, "euler", seeds, batch, device, num_steps=settings["num_steps"], afs=afs,
                             schedule_type=settings["schedule_type"], schedule_rho=settings["schedule_rho"],
                             sigma_min=settings["sigma_min"], sigma_max=settings["sigma_max"])
        rows.append((label, solvers.nfe_of("euler", settings["num_steps"], afs=afs), score(images)))
    return rows


@click.command()
@click.option("--student", required=True, help="Experiment folder (its latest snapshot) or snapshot file")
@click.option("--detector", default=os.path.join(ASSETS, "fmnist-detector.pt"), show_default=True)
@click.option("--ref", default=os.path.join(ASSETS, "fmnist-train-ref.npz"), show_default=True)
@click.option("--teacher_ref", default=os.path.join(ASSETS, "fmnist-teacher-ref.npz"), show_default=True)
@click.option("--num", type=click.IntRange(min=2), default=1000, show_default=True, help="Samples per row (seeds 0..)")
@click.option("--batch", type=click.IntRange(min=1), default=500, show_default=True)
@click.option("--device", default=None, help="Device  [default: cuda if available, else cpu]")
def main(student, detector, ref, teacher_ref, num, batch, device):
    for path, opt in ((detector, "--detector"), (ref, "--ref"), (teacher_ref, "--teacher_ref")):
        if not os.path.isfile(path):
            raise CommandError(f"{opt}: no file {path}; pass an existing file")
    if not os.path.exists(student):
        raise CommandError(f"--student: no such folder or file {student}; pass a distilled run or snapshot")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    full_fp32()
    snapshot = latest_snapshot_in(student) if os.path.isdir(student) else student
    loaded = load_network(model_path=snapshot, device=device)
    if "num_steps" not in loaded.settings or loaded.settings.get("use_step_condition"):
        raise CommandError(f"--student: {snapshot} is not an SFD student (export.py exports SFD, not SFD-v)")
    score = Scorer(load_detector(detector, device=device), load_ref(teacher_ref), load_ref(ref), device)
    rows = score_both_ways(loaded.net, loaded.settings, list(range(num)), batch, device, score)
    print(f"{snapshot}: {num} samples each (seeds 0-{num - 1})")
    print(f"  {'':24}{'NFE':>4}{'teacher-FID':>13}{'data-FID':>10}")
    for label, nfe, s in rows:
        print(f"  {label:24}{nfe:>4}{s['teacher_fid']:>13.2f}{s['fid']:>10.2f}")


if __name__ == "__main__":
    from torch_utils import cli

    cli.run(main)
