"""Pick the built-in teacher's snapshot by FID: score every EMA snapshot of a experiments/train_teacher.py run.

Each snapshot samples the same seeds with DPM-Solver++(3M) at 20 NFE without thresholding (within ~1 gray level
of its converged ODE, at a fraction of Heun's cost) and is scored by data-FID against the training set, with every
detector given. The images are kept in --workdir (resumable, shared with experiments/fmnist_metric.py's cache).

    python experiments/fmnist_teacher_curve.py --run teacher-runs/fmnist --num 2000 --out assets/teacher_curve.md
"""

import glob
import json
import os
import re
import sys

import click
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # run as a script from anywhere

from dnnlib.util import write_atomic  # noqa: E402
from experiments.fmnist_metric import REF_SEED0, ImageCache, fid, num_steps_for, stats_of  # noqa: E402
from experiments.table.scoring import run_sampler  # noqa: E402
from torch_utils.cli import machine_name  # noqa: E402
from metrics.detectors import load_detector  # noqa: E402
from metrics.frechet import load_ref  # noqa: E402
from models import load_network  # noqa: E402
from torch_utils.cli import CommandError  # noqa: E402
from training.precision import full_fp32  # noqa: E402

SOLVER, NFE = "dpmpp", 20


@click.command()
@click.option("--run", "run_dir", required=True, help="experiments/train_teacher.py output folder (network-snapshot-*.pkl)")
@click.option("--every", type=click.IntRange(min=1), default=1, show_default=True,
              help="Score every this-many-th snapshot (the last one always)")
@click.option("--kimgs", default=None, help="Only these snapshots, e.g. 40,74,144,217  [default: all]")
@click.option("--detectors", default=os.path.join(REPO, "assets", "fmnist-detector.pt"), show_default=True)
@click.option("--data_refs", default=None, help="Training-set statistics per detector  [default: "
              "fmnist-train-ref.npz next to each detector]")
@click.option("--num", type=click.IntRange(min=2), default=2000, show_default=True)
@click.option("--sample_batch", type=click.IntRange(min=1), default=500, show_default=True)
@click.option("--workdir", default="./exps/fmnist-metric", show_default=True)
@click.option("--out", default=None, help="Markdown table to write (a .json beside it)")
@click.option("--device", default=None)
def main(run_dir, every, kimgs, detectors, data_refs, num, sample_batch, workdir, out, device):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    full_fp32()  # rows made on a GPU compare with rows made on a CPU
    wanted = None if kimgs is None else {int(k) for k in kimgs.split(",") if k.strip()}
    snaps = [p for p in sorted(glob.glob(os.path.join(run_dir, "network-snapshot-*.pkl")))
             if wanted is None or int(re.search(r"network-snapshot-(\d+)", p).group(1)) in wanted]
    if not snaps:
        raise CommandError(f"--run: no network-snapshot-*.pkl in {run_dir}")
    snaps = [s for i, s in enumerate(snaps) if i % every == 0 or i == len(snaps) - 1]
    det_paths = [p for p in detectors.split(",") if p]
    refs = (data_refs.split(",") if data_refs else
            [os.path.join(os.path.dirname(p), "fmnist-train-ref.npz") for p in det_paths])
    if len(refs) != len(det_paths) or not all(os.path.isfile(r) for r in refs):
        raise CommandError("--data_refs: give one existing statistics file per detector")
    dets = [(load_detector(p, device=device), load_ref(r)) for p, r in zip(det_paths, refs)]
    rows = []
    for path in snaps:
        kimg = int(re.search(r"network-snapshot-(\d+)", path).group(1))
        loaded = load_network(model_path=path, device=device)
        sig = dict(sigma_min=loaded.settings["sigma_min"], sigma_max=loaded.settings["sigma_max"])

        def sample(solver, nfe, seeds, net=loaded.net, sig=sig):
            return run_sampler(net, solver, seeds, sample_batch, device, num_steps=num_steps_for(solver, nfe),
                               max_order=3, thresholding=False, **sig)

        images = ImageCache(workdir, path, loaded.net, sample, sample_batch).images(SOLVER, NFE, REF_SEED0, num)
        rows.append(dict(kimg=kimg, fids=[fid(stats_of(det, images, device), ref) for det, ref in dets]))
        print(json.dumps(rows[-1]), flush=True)
    names = [os.path.relpath(p, REPO) if p.startswith(REPO) else p for p in det_paths]
    lines = [f"Teacher snapshots of `{os.path.basename(os.path.normpath(run_dir))}`: data-FID of {num} samples "
             f"(DPM-Solver++(3M), {NFE} NFE, no thresholding, seeds {REF_SEED0}..) against the training set. "
             f"Machine: {machine_name(device)}.", "",
             "| kimg | " + " | ".join(f"data-FID, `{n}`" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    lines += [f"| {r['kimg']} | " + " | ".join(f"{v:.2f}" for v in r["fids"]) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        write_atomic(out, text)
        write_atomic(os.path.splitext(out)[0] + ".json", json.dumps(dict(detectors=names, rows=rows), indent=2) + "\n")


if __name__ == "__main__":
    main()
