"""Reproduce the shape of the paper's Table 2 on the built-in Fashion-MNIST teacher, on whatever machine runs it.

Rows: DDIM/Euler at 10 and 50 NFE, DPM-Solver++(3M) at 5 and 10 NFE, SFD at 2/3/4/5 NFE (one model each),
SFD-v (one model) at 2..5 NFE, second stage at 1 NFE. Columns: NFE, FID (our Fashion-MNIST detector against the
training-set statistics), mean PSNR to the teacher's converged ODE endpoint from the same latents, distillation
wall time, machine. Every number is measured by this script; nothing is tuned per row.

    python experiments/fmnist_table.py --num 10000 --kimg 10 --out experiments/fmnist_table.md

The run is resumable: the work folder keeps the settings, the reference endpoint, every finished row and every
distilled snapshot, so running the same command again (after a crash or on another day) only computes what is
missing; `--rows` restricts a run to some rows. A work folder made with other settings is refused.
"""

import json
import os
import platform
import sys
import tempfile
import time

import click
import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # run as a script from anywhere

import solvers  # noqa: E402
from metrics.detectors import load_detector  # noqa: E402
from metrics.frechet import StreamingFID, load_ref  # noqa: E402
from metrics.images import psnr_uint8  # noqa: E402
from models import load_network  # noqa: E402
from sample import SeedGenerators, to_uint8  # noqa: E402
from dnnlib.util import atomic_path, write_atomic  # noqa: E402
from torch_utils.cli import CommandError  # noqa: E402
from training.precision import maybe_compile, prepare_module  # noqa: E402
from training.training_loop import training_loop  # noqa: E402


def machine_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def latents_for(seeds, net, device):
    return SeedGenerators(device, seeds).randn([len(seeds), net.img_channels, net.img_resolution,
                                                net.img_resolution], device=device)


@torch.no_grad()
def run_sampler(net, sampler, seeds, batch, device, fast=None, **kwargs):
    """uint8 images for the seeds, batch by batch (`fast`: the callable to run in place of `net`)."""
    out = []
    for start in range(0, len(seeds), batch):
        chunk = seeds[start:start + batch]
        x = solvers.SOLVERS[sampler](net if fast is None else fast, latents_for(chunk, net, device), **kwargs)
        out.append(to_uint8(x).cpu())
    return torch.cat(out)


def fid_of(images, detector, ref, device):
    fid = StreamingFID(detector, ref[0], ref[1], device=device)
    for start in range(0, len(images), 500):
        fid.add_images(images[start:start + 500].to(device))
    return float(fid.compute())


def distil(teacher_path, outdir, kimg, batch, device, seed, **options):
    """Run SFD and return (snapshot path, wall seconds)."""
    run_dir = tempfile.mkdtemp(dir=outdir, prefix="run-")
    print(f"distilling into {run_dir}: {kimg:g} kimg, {options}", flush=True)
    t0 = time.time()
    training_loop(run_dir=run_dir, model_path=teacher_path, batch_size=batch, total_kimg=kimg, seed=seed,
                  device=str(device), progress=True, **options)
    seconds = time.time() - t0
    snap = [f for f in os.listdir(run_dir) if f.startswith("network-snapshot-")][0]
    return os.path.join(run_dir, snap), seconds


# Row keys in table order; `--rows` takes a comma-separated subset.
ROW_KEYS = ("ref", "ddim10", "ddim50", "dpmpp5", "dpmpp10", "sfd2", "sfd3", "sfd4", "sfd5", "sfdv", "stage2")
SFDV_NFES = (2, 3, 4, 5)


def parse_rows(text):
    keys = [k.strip() for k in text.split(",") if k.strip()] if text else list(ROW_KEYS)
    unknown = [k for k in keys if k not in ROW_KEYS]
    if unknown:
        raise CommandError(f"--rows: unknown row {unknown[0]!r}; choose from {','.join(ROW_KEYS)}")
    return keys


class WorkFolder:
    """The resumable state of one table run: settings, reference endpoint, finished rows, distilled snapshots."""

    def __init__(self, path, settings):
        self.path = path
        os.makedirs(path, exist_ok=True)
        settings_file = os.path.join(path, "settings.json")
        if os.path.exists(settings_file):
            with open(settings_file) as f:
                old = json.load(f)
            changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            if changed:
                k = changed[0]
                raise CommandError(f"--workdir: {path} holds a run with {k}={old.get(k)!r}, not {settings.get(k)!r}; "
                                   "rerun with the same settings to resume it, or pass a new --workdir")
        else:
            write_atomic(settings_file, json.dumps(settings, indent=2) + "\n")
        self.rows_file = os.path.join(path, "rows.jsonl")
        self.rows = {}
        self.reload_rows()
        self.snaps_file = os.path.join(path, "snapshots.json")
        self.snaps = json.load(open(self.snaps_file)) if os.path.exists(self.snaps_file) else {}

    def has(self, key, nfe):
        return (key, nfe) in self.rows

    def reload_rows(self):
        """Rows in rows.jsonl (also those another process appended to the same folder since)."""
        if os.path.exists(self.rows_file):
            for line in open(self.rows_file):
                if line.strip():
                    row = json.loads(line)
                    self.rows.setdefault((row["key"], row["nfe"]), row)

    def add_row(self, row):
        self.rows[(row["key"], row["nfe"])] = row
        with open(self.rows_file, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    def snapshot(self, key, make):
        """(path, seconds) of the snapshot distilled for `key`, made by `make()` the first time."""
        if key not in self.snaps or not os.path.exists(self.snaps[key][0]):
            made = list(make())
            # Re-read first: another process may be filling other rows of the same folder.
            if os.path.exists(self.snaps_file):
                self.snaps.update(json.load(open(self.snaps_file)))
            self.snaps[key] = made
            write_atomic(self.snaps_file, json.dumps(self.snaps, indent=2) + "\n")
        return self.snaps[key]

    def reference(self, make):
        """uint8 endpoint images, computed once and kept as reference.npy."""
        path = os.path.join(self.path, "reference.npy")
        if os.path.exists(path):
            return torch.from_numpy(np.load(path))
        images = make()
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, images.numpy())
        return images


def teacher_id(path):
    return f"{os.path.basename(path)}:{os.path.getsize(path)}"


@click.command()
@click.option("--teacher", default=os.path.join(REPO, "assets", "fmnist-teacher.pkl"), show_default=True)
@click.option("--detector", default=os.path.join(REPO, "assets", "fmnist-detector.pt"), show_default=True)
@click.option("--ref", default=os.path.join(REPO, "assets", "fmnist-train-ref.npz"), show_default=True)
@click.option("--num", help="Samples per row", type=click.IntRange(min=2), default=10000, show_default=True)
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
@click.option("--rows", "rows_text", help=f"Comma-separated rows to compute  [default: all: {','.join(ROW_KEYS)}]",
              default=None)
@click.option("--table_only", is_flag=True, help="Only write the table of the rows already finished in --workdir")
@click.option("--channels_last", type=bool, default=False, show_default=True,
              help="Channels-last networks for sampling and distillation (same numbers, faster on some machines)")
@click.option("--compile", "compile_", type=bool, default=False, show_default=True,
              help="torch.compile the sampling and distillation calls (same numbers, ~1 min compile per network)")
@click.option("--workdir", default="./exps/fmnist-table", show_default=True,
              help="Resumable state of this run; rerun the same command to continue it")
@click.option("--out", help="Markdown table to write", default=os.path.join(REPO, "experiments", "fmnist_table.md"),
              show_default=True)
@click.option("--device", default=None)
def main(teacher, detector, ref, num, kimg, batch, lr, lr2, thresholding, sample_batch, reference_steps, rows_text,
         table_only, channels_last, compile_, workdir, out, device):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    wanted = parse_rows(rows_text)
    for path, opt in ((teacher, "--teacher"), (detector, "--detector"), (ref, "--ref")):
        if not os.path.isfile(path):
            raise CommandError(f"{opt}: no file {path}; pass an existing file")
    settings = dict(teacher=teacher_id(teacher), num=num, kimg=kimg, batch=batch, lr=lr, lr2=lr2 or lr,
                    thresholding=thresholding, reference_steps=reference_steps)
    work = WorkFolder(workdir, settings)
    if table_only:
        machine = work.rows[next(iter(work.rows))]["machine"] if work.rows else machine_name(device)
        write_table(out, work, settings, machine)
        return
    loaded = load_network(model_path=teacher, device=device)
    s = loaded.settings
    sig = dict(sigma_min=s["sigma_min"], sigma_max=s["sigma_max"])
    det = load_detector(detector, device=device)
    ref_stats = load_ref(ref)
    seeds = list(range(num))
    machine = machine_name(device)
    speed = dict(channels_last=channels_last, compile=compile_)

    def fast(net):
        return maybe_compile(prepare_module(net, channels_last=channels_last), compile_)

    def sampled(net, sampler, **kwargs):
        return run_sampler(net, sampler, seeds, sample_batch, device, fast=fast(net), **kwargs)

    teacher_net = loaded.net
    teacher_fast = fast(teacher_net)
    ref_nfe = solvers.nfe_of("heun", reference_steps)

    def make_reference():
        t0 = time.time()
        images = run_sampler(teacher_net, "heun", seeds, sample_batch, device, fast=teacher_fast,
                             num_steps=reference_steps, **sig)
        print(f"reference: Heun {ref_nfe} NFE in {time.time() - t0:.0f}s", flush=True)
        return images

    endpoint = work.reference(make_reference)

    def add(key, name, nfe, make_images, seconds=None):
        if work.has(key, nfe):
            return
        images = make_images()
        secs = seconds() if callable(seconds) else seconds
        work.add_row(dict(key=key, method=name, nfe=nfe, fid=fid_of(images, det, ref_stats, device),
                          psnr=psnr_uint8(images, endpoint), distill_s=secs, machine=machine, num=num))

    def teacher_rows(key, name, nfe, sampler, **kwargs):
        add(key, name, nfe, lambda: run_sampler(teacher_net, sampler, seeds, sample_batch, device, fast=teacher_fast,
                                                num_steps=nfe + 1, **kwargs, **sig))

    if "ref" in wanted:
        add("ref", "Teacher, Heun (reference)", ref_nfe, lambda: endpoint)
    for nfe in (10, 50):
        if f"ddim{nfe}" in wanted:
            teacher_rows(f"ddim{nfe}", "DDIM (Euler)", nfe, "euler")
    for nfe in (5, 10):
        if f"dpmpp{nfe}" in wanted:
            teacher_rows(f"dpmpp{nfe}", "DPM-Solver++(3M)", nfe, "dpmpp", max_order=3, thresholding=thresholding)

    common = dict(M=3, afs=True, sampler_tea="dpmpp", max_order=3, lr=lr, thresholding=thresholding, **speed)
    for nfe in (2, 3, 4, 5):
        key = f"sfd{nfe}"
        if key in wanted and not work.has(key, nfe):
            snap, secs = work.snapshot(key, lambda: distil(teacher, workdir, kimg, batch, device, seed=nfe,
                                                           num_steps=nfe + 2, **common))
            student = load_network(model_path=snap, device=device).net
            add(key, "SFD", nfe, lambda: sampled(student, "euler", num_steps=nfe + 2, afs=True, **sig), secs)

    def sfdv_snapshot():
        return work.snapshot("sfdv", lambda: distil(teacher, workdir, 2 * kimg, batch, device, seed=10, num_steps=4,
                                                    use_step_condition=True, **common))

    if "sfdv" in wanted and not all(work.has("sfdv", n) for n in SFDV_NFES):
        snap_v, secs_v = sfdv_snapshot()
        student_v = load_network(model_path=snap_v, device=device).net
        for nfe in SFDV_NFES:
            add("sfdv", "SFD-v (one model)", nfe, lambda: sampled(student_v, "euler", num_steps=nfe + 2, afs=True,
                                                                   step_condition=nfe + 2, **sig), secs_v)
    if "stage2" in wanted and not work.has("stage2", 1):
        snap_v, secs_v = sfdv_snapshot()
        snap_2, secs_2 = work.snapshot("stage2", lambda: distil(snap_v, workdir, kimg, batch, device, seed=11,
                                                                num_steps=3, M=2, afs=True, is_second_stage=True,
                                                                lpips=False, lr=lr2 or lr, **speed))
        student_2 = load_network(model_path=snap_2, device=device).net
        add("stage2", "SFD second stage", 1, lambda: sampled(student_2, "euler", num_steps=3, afs=True,
                                                             step_condition=3, **sig), secs_2 + secs_v)

    work.reload_rows()
    write_table(out, work, settings, machine)


def write_table(out, work, settings, machine):
    """Markdown table of every finished row in table order (rows from earlier runs of the same folder included)."""
    st = settings
    lines = [f"Fashion-MNIST 32×32 teacher, {st['num']} samples per row, FID with our detector against the training "
             f"set, PSNR to the Heun-{solvers.nfe_of('heun', st['reference_steps'])} endpoint from the same latents. "
             f"Machine: {machine}{' (each distillation time names its own)' if len({r['machine'] for r in work.rows.values()}) > 1 else ''}. Distillation: {st['kimg']:g} kimg per SFD model (SFD-v {2 * st['kimg']:g}), batch "
             f"{st['batch']}, lr {st['lr']:g} (second stage {st['lr2']:g}, from the SFD-v model, LPIPS off), M=3, "
             f"DPM-Solver++(3M) teacher, AFS, thresholding {'on' if st['thresholding'] else 'off'}.", "",
             "| method | NFE | FID | PSNR (dB) | distillation time |", "|---|---|---|---|---|"]
    ordered = sorted(work.rows.values(), key=lambda r: (ROW_KEYS.index(r["key"]), r["nfe"]))
    mixed = len({r["machine"] for r in ordered}) > 1  # rows filled by runs with other thread counts
    for r in ordered:
        t = "" if r["distill_s"] is None else f"{r['distill_s'] / 60:.1f} min"
        if mixed and t:
            t += f" ({r['machine']})"
        lines.append(f"| {r['method']} | {r['nfe']} | {r['fid']:.2f} | {r['psnr']:.2f} | {t} |")
    write_atomic(out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
