"""Reproduce the shape of the paper's Table 2 on the built-in Fashion-MNIST teacher, on whatever machine runs it.

Rows: DDIM/Euler at 10 and 50 NFE, DPM-Solver++(3M) at 5 and 10 NFE, SFD at 2/3/4/5 NFE (one model each),
SFD-v (one model) at 2..5 NFE, second stage at 1 NFE. Columns: NFE, FID (our Fashion-MNIST detector against the
training-set statistics), mean PSNR to the teacher's converged ODE endpoint from the same latents, distillation
wall time, machine. Every number is measured by this script; nothing is tuned per row.

    python experiments/fmnist_table.py --num 10000 --kimg 10 --out experiments/fmnist_table.md
"""

import json
import os
import platform
import sys
import tempfile
import time

import click
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # run as a script from anywhere

import solvers  # noqa: E402
from metrics.detectors import load_detector  # noqa: E402
from metrics.frechet import StreamingFID, load_ref  # noqa: E402
from models import load_network  # noqa: E402
from sample import SeedGenerators, to_uint8  # noqa: E402
from training.training_loop import training_loop  # noqa: E402


def machine_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def latents_for(seeds, net, device):
    return SeedGenerators(device, seeds).randn([len(seeds), net.img_channels, net.img_resolution,
                                                net.img_resolution], device=device)


@torch.no_grad()
def run_sampler(net, sampler, seeds, batch, device, **kwargs):
    """uint8 images for the seeds, batch by batch."""
    out = []
    for start in range(0, len(seeds), batch):
        chunk = seeds[start:start + batch]
        x = solvers.SOLVERS[sampler](net, latents_for(chunk, net, device), **kwargs)
        out.append(to_uint8(x).cpu())
    return torch.cat(out)


def psnr(images, reference):
    """Mean per-image PSNR (dB) of uint8 images against uint8 references."""
    mse = (images.double() - reference.double()).square().flatten(1).mean(1)
    return float((10 * torch.log10(255.0 ** 2 / mse.clamp(min=1e-10))).mean())


def fid_of(images, detector, ref, device):
    fid = StreamingFID(detector, ref[0], ref[1], device=device)
    for start in range(0, len(images), 500):
        fid.add_images(images[start:start + 500].to(device))
    return float(fid.compute())


def distil(teacher_path, outdir, kimg, batch, device, seed, **options):
    """Run SFD and return (snapshot path, wall seconds)."""
    run_dir = tempfile.mkdtemp(dir=outdir, prefix="run-")
    t0 = time.time()
    training_loop(run_dir=run_dir, model_path=teacher_path, batch_size=batch, total_kimg=kimg, seed=seed,
                  device=str(device), progress=True, **options)
    seconds = time.time() - t0
    snap = [f for f in os.listdir(run_dir) if f.startswith("network-snapshot-")][0]
    return os.path.join(run_dir, snap), seconds


@click.command()
@click.option("--teacher", default=os.path.join(REPO, "assets", "fmnist-teacher.pkl"), show_default=True)
@click.option("--detector", default=os.path.join(REPO, "assets", "fmnist-detector.pt"), show_default=True)
@click.option("--ref", default=os.path.join(REPO, "assets", "fmnist-train-ref.npz"), show_default=True)
@click.option("--num", help="Samples per row", type=int, default=10000, show_default=True)
@click.option("--kimg", help="Distillation length of each SFD model (SFD-v: 2×, second stage: 1×)", type=float,
              default=10, show_default=True)
@click.option("--batch", help="Distillation batch", type=int, default=64, show_default=True)
@click.option("--lr", help="First-stage learning rate, the same for every SFD row", type=float, default=5e-4,
              show_default=True)
@click.option("--lr2", help="Second-stage learning rate  [default: --lr; the paper uses 10x its first-stage lr]",
              type=float, default=None)
@click.option("--thresholding", type=bool, default=True, show_default=True,
              help="DPM-Solver++ dynamic thresholding in the baseline rows and the SFD teacher (the paper: on)")
@click.option("--sample_batch", type=int, default=500, show_default=True)
@click.option("--reference_steps", help="Heun time points of the converged reference (NFE = 2(N-1))", type=int,
              default=51, show_default=True)
@click.option("--workdir", default="./exps/fmnist-table", show_default=True)
@click.option("--out", help="Markdown table to write", default=os.path.join(REPO, "experiments", "fmnist_table.md"),
              show_default=True)
@click.option("--device", default=None)
def main(teacher, detector, ref, num, kimg, batch, lr, lr2, thresholding, sample_batch, reference_steps, workdir, out, device):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    os.makedirs(workdir, exist_ok=True)
    loaded = load_network(model_path=teacher, device=device)
    net, s = loaded.net, loaded.settings
    sig = dict(sigma_min=s["sigma_min"], sigma_max=s["sigma_max"])
    det = load_detector(detector, device=device)
    ref_stats = load_ref(ref)
    seeds = list(range(num))
    rows = []
    machine = machine_name(device)
    log = open(os.path.join(workdir, "rows.jsonl"), "a")

    def add(name, nfe, images, seconds=None):
        row = dict(method=name, nfe=nfe, fid=fid_of(images, det, ref_stats, device), psnr=psnr(images, endpoint),
                   distill_s=seconds, machine=machine, num=num)
        rows.append(row)
        log.write(json.dumps(row) + "\n")
        log.flush()
        print(json.dumps(row), flush=True)

    t0 = time.time()
    endpoint = run_sampler(net, "heun", seeds, sample_batch, device, num_steps=reference_steps, **sig)
    ref_nfe = solvers.nfe_of("heun", reference_steps)
    print(f"reference: Heun {ref_nfe} NFE in {time.time() - t0:.0f}s", flush=True)
    add("Teacher, Heun (reference)", ref_nfe, endpoint)

    for nfe in (10, 50):
        add("DDIM (Euler)", nfe, run_sampler(net, "euler", seeds, sample_batch, device, num_steps=nfe + 1, **sig))
    for nfe in (5, 10):
        add("DPM-Solver++(3M)", nfe, run_sampler(net, "dpmpp", seeds, sample_batch, device, num_steps=nfe + 1,
                                                  max_order=3, thresholding=thresholding, **sig))

    common = dict(M=3, afs=True, sampler_tea="dpmpp", max_order=3, lr=lr, thresholding=thresholding)
    for nfe in (2, 3, 4, 5):
        snap, secs = distil(teacher, workdir, kimg, batch, device, seed=nfe, num_steps=nfe + 2, **common)
        student = load_network(model_path=snap, device=device).net
        add("SFD", nfe, run_sampler(student, "euler", seeds, sample_batch, device, num_steps=nfe + 2, afs=True,
                                    **sig), secs)
    snap_v, secs_v = distil(teacher, workdir, 2 * kimg, batch, device, seed=10, num_steps=4,
                            use_step_condition=True, **common)
    student_v = load_network(model_path=snap_v, device=device).net
    for nfe in (2, 3, 4, 5):
        add("SFD-v (one model)", nfe, run_sampler(student_v, "euler", seeds, sample_batch, device, num_steps=nfe + 2,
                                                  afs=True, step_condition=nfe + 2, **sig), secs_v)
    snap_2, secs_2 = distil(snap_v, workdir, kimg, batch, device, seed=11, num_steps=3, M=2, afs=True,
                            is_second_stage=True, lpips=False, lr=lr2 or lr)
    student_2 = load_network(model_path=snap_2, device=device).net
    add("SFD second stage", 1, run_sampler(student_2, "euler", seeds, sample_batch, device, num_steps=3, afs=True,
                                           step_condition=3, **sig), secs_2 + secs_v)

    lines = [f"Fashion-MNIST 32×32 teacher, {num} samples per row, FID with our detector against the training set, "
             f"PSNR to the Heun-{solvers.nfe_of('heun', reference_steps)} endpoint from the same latents. Machine: {machine}. "
             f"Distillation: {kimg:g} kimg per SFD model (SFD-v {2 * kimg:g}), batch {batch}, lr {lr:g} "
             f"(second stage {lr2 or lr:g}, from the SFD-v model, LPIPS off), M=3, DPM-Solver++(3M) teacher, AFS, "
             f"thresholding {'on' if thresholding else 'off'}.", "",
             "| method | NFE | FID | PSNR (dB) | distillation time |", "|---|---|---|---|---|"]
    for r in rows:
        t = "" if r["distill_s"] is None else f"{r['distill_s'] / 60:.1f} min"
        lines.append(f"| {r['method']} | {r['nfe']} | {r['fid']:.2f} | {r['psnr']:.2f} | {t} |")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
