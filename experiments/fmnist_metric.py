"""Does the benchmark's distribution metric rank solvers? The sanity check of the built-in benchmark.

The teacher-relative FID compares generated images with the teacher's own converged ODE samples (Heun, 34
network calls, on reference seeds disjoint from every evaluation seed), through a detector. A metric that ranks
solvers must move monotonically toward its floor (the converged sampler on the evaluation seeds) as a solver gets
more accurate: DPM-Solver++(3M) at 5 → 10 → 20 NFE and Heun at 6 → 10 → 18 → 34 NFE. This script measures that
on two disjoint evaluation seed sets, for one or more detectors, and can write the reference statistics the table
uses (`--write_ref`).

Every image set is sampled once and kept in `--workdir` as uint8 arrays, 1 000 seeds per file, so a killed run
resumes where it stopped and several detectors are compared on the very same images.

    python experiments/fmnist_metric.py --num 10000 --ref_num 10000 \\
        --detectors assets/fmnist-detector.pt --write_ref assets/fmnist-teacher-ref.npz \\
        --out experiments/fmnist_metric.md

Seeds: reference 100000.., set A 0.. (the table's seeds), set B 50000..; DPM-Solver++ without dynamic
thresholding (the converged ODE has none).
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

import solvers  # noqa: E402
from dnnlib.util import atomic_path, write_atomic  # noqa: E402
from experiments.table.rows import file_id  # noqa: E402
from experiments.table.scoring import run_sampler  # noqa: E402
from torch_utils.cli import machine_name  # noqa: E402
from metrics.detectors import compute_features, load_detector  # noqa: E402
from metrics.frechet import FeatureStats, frechet_distance, load_ref, save_ref  # noqa: E402
from models import load_network  # noqa: E402
from torch_utils.cli import CommandError  # noqa: E402
from training.precision import full_fp32, maybe_compile, prepare_module  # noqa: E402

REF_SEED0 = 100_000
SEED_SETS = {"A": 0, "B": 50_000}
REFERENCE = ("heun", 34)
LADDERS = {"DPM-Solver++(3M)": ("dpmpp", (5, 10, 20)), "Heun": ("heun", (6, 10, 18, 34))}
CHUNK = 1000


def num_steps_for(solver, nfe):
    """Time points that give `nfe` network calls (Heun: 2 per step but the last; others: 1 per step)."""
    num_steps = nfe // 2 + 1 if solver == "heun" else nfe + 1
    assert solvers.nfe_of(solver, num_steps) == nfe, (solver, nfe)
    return num_steps


class ImageCache:
    """uint8 teacher samples per (solver, NFE, seeds), stored in chunks of CHUNK seeds."""

    def __init__(self, workdir, teacher_path, net, sample, batch):
        self.root = os.path.join(workdir, file_id(teacher_path).replace(":", "-"))
        self.net, self.sample, self.batch = net, sample, batch
        os.makedirs(self.root, exist_ok=True)

    def images(self, solver, nfe, seed0, num):
        folder = os.path.join(self.root, f"{solver}{nfe}")
        os.makedirs(folder, exist_ok=True)
        parts = []
        for start in range(seed0, seed0 + num, CHUNK):
            stop = min(start + CHUNK, seed0 + num)
            path = os.path.join(folder, f"seeds{start}-{stop - 1}.npy")
            if not os.path.exists(path):
                t0 = time.time()
                images = self.sample(solver, nfe, list(range(start, stop)))
                with atomic_path(path) as tmp, open(tmp, "wb") as f:
                    np.save(f, images.numpy())
                print(f"  {solver} {nfe} NFE, seeds {start}-{stop - 1}: {time.time() - t0:.0f}s", flush=True)
            parts.append(torch.from_numpy(np.load(path)))
        return torch.cat(parts)


def stats_of(detector, images, device, batch=500):
    stats = FeatureStats()
    for start in range(0, len(images), batch):
        stats.add(compute_features(detector, images[start:start + batch], device=device))
    return stats.mean_cov()


def fid(stats, ref):
    return float(frechet_distance(stats[0], stats[1], ref[0], ref[1]))


def shown(path):
    """A path as a report records it: relative to the repo when inside it (no machine paths in reports)."""
    return os.path.relpath(path, REPO) if path and os.path.abspath(path).startswith(REPO + os.sep) else path


def is_monotone(values):
    """Strictly decreasing with more NFE."""
    return all(a > b for a, b in zip(values, values[1:]))


@click.command()
@click.option("--teacher", default=os.path.join(REPO, "assets", "fmnist-teacher.pkl"), show_default=True)
@click.option("--detectors", default=os.path.join(REPO, "assets", "fmnist-detector.pt"), show_default=True,
              help="Comma-separated detector files to compare")
@click.option("--data_refs", default=None,
              help="Comma-separated training-set statistics, one per detector, for a data-FID column  "
                   "[default: fmnist-train-ref.npz next to each detector, when present]")
@click.option("--num", type=click.IntRange(min=2), default=10000, show_default=True, help="Samples per set and row")
@click.option("--ref_num", type=click.IntRange(min=2), default=10000, show_default=True,
              help="Converged samples behind the reference statistics")
@click.option("--sets", "sets_text", default="A,B", show_default=True, help="Evaluation seed sets")
@click.option("--write_ref", default=None, metavar="NPZ",
              help="Write the teacher's reference statistics (first detector) to this file")
@click.option("--sample_batch", type=click.IntRange(min=1), default=500, show_default=True)
@click.option("--channels_last", type=bool, default=False, show_default=True)
@click.option("--compile", "compile_", type=bool, default=False, show_default=True)
@click.option("--workdir", default="./exps/fmnist-metric", show_default=True)
@click.option("--out", default=None, help="Markdown report to write (a .json with the numbers goes beside it)")
@click.option("--device", default=None)
def main(teacher, detectors, data_refs, num, ref_num, sets_text, write_ref, sample_batch, channels_last, compile_,
         workdir, out, device):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    full_fp32()  # rows made on a GPU compare with rows made on a CPU
    det_paths = [p for p in detectors.split(",") if p]
    sets = [s.strip() for s in sets_text.split(",") if s.strip()]
    for s in sets:
        if s not in SEED_SETS:
            raise CommandError(f"--sets: unknown set {s!r}; choose from {','.join(SEED_SETS)}")
    for path, opt in [(teacher, "--teacher")] + [(p, "--detectors") for p in det_paths]:
        if not os.path.isfile(path):
            raise CommandError(f"{opt}: no file {path}; pass an existing file")
    if data_refs is None:
        refs = [os.path.join(os.path.dirname(p), "fmnist-train-ref.npz") for p in det_paths]
        refs = [r if os.path.isfile(r) else None for r in refs]
    else:
        refs = [r or None for r in data_refs.split(",")]
        if len(refs) != len(det_paths):
            raise CommandError(f"--data_refs: {len(refs)} files for {len(det_paths)} detectors; give one per detector")
    if num > SEED_SETS["B"]:
        raise CommandError(f"--num: at most {SEED_SETS['B']} so that the seed sets stay disjoint")

    loaded = load_network(model_path=teacher, device=device)
    net = loaded.net
    sigma = dict(sigma_min=loaded.settings["sigma_min"], sigma_max=loaded.settings["sigma_max"])
    fast = maybe_compile(prepare_module(net, channels_last=channels_last), compile_)

    def sample(solver, nfe, seeds):
        opts = dict(max_order=3, thresholding=False) if solver == "dpmpp" else {}
        return run_sampler(net, solver, seeds, sample_batch, device, fast=fast, num_steps=num_steps_for(solver, nfe),
                           **opts, **sigma)

    cache = ImageCache(workdir, teacher, net, sample, sample_batch)
    print(f"reference: {REFERENCE[0]} {REFERENCE[1]} NFE, seeds {REF_SEED0}..{REF_SEED0 + ref_num - 1}", flush=True)
    ref_images = cache.images(*REFERENCE, REF_SEED0, ref_num)
    if write_ref:  # written before the ladder so that a table waiting for it (gpu_table.sh TEACHER=) can start
        save_ref(write_ref, *stats_of(load_detector(det_paths[0], device=device), ref_images, device))
        print(f"wrote {write_ref}: statistics of {ref_num} Heun-34 samples through {det_paths[0]}", flush=True)
    rows = []  # (set, ladder name, solver, nfe, images)
    for s in sets:
        for name, (solver, nfes) in LADDERS.items():
            for nfe in nfes:
                print(f"set {s}: {name} {nfe} NFE", flush=True)
                rows.append((s, name, solver, nfe, cache.images(solver, nfe, SEED_SETS[s], num)))

    report = dict(teacher=os.path.basename(teacher), num=num, ref_num=ref_num, machine=machine_name(device),
                  detectors=[])
    for det_path, data_ref in zip(det_paths, refs):
        det = load_detector(det_path, device=device)
        ref = stats_of(det, ref_images, device)
        data = load_ref(data_ref) if data_ref else None
        entry = dict(detector=shown(det_path), data_ref=shown(data_ref), rows=[], monotone={})
        if data is not None:
            entry["reference_data_fid"] = fid(ref, data)
        for s, name, solver, nfe, images in rows:
            st = stats_of(det, images, device)
            entry["rows"].append(dict(set=s, ladder=name, nfe=nfe, teacher_fid=fid(st, ref),
                                      data_fid=None if data is None else fid(st, data)))
        for s in sets:
            for name in LADDERS:
                values = [r["teacher_fid"] for r in entry["rows"] if r["set"] == s and r["ladder"] == name]
                entry["monotone"][f"{s}:{name}"] = is_monotone(values)
        report["detectors"].append(entry)

    text = format_report(report, sets)
    print(text)
    if out:
        write_atomic(out, text)
        write_atomic(os.path.splitext(out)[0] + ".json", json.dumps(report, indent=2) + "\n")


def format_report(report, sets):
    lines = [f"Teacher `{report['teacher']}`: teacher-relative FID against {report['ref_num']} Heun-34 samples "
             f"(seeds {REF_SEED0}..), {report['num']} samples per row; sets "
             + ", ".join(f"{s} = seeds {SEED_SETS[s]}.." for s in sets) + f". Machine: {report['machine']}.", ""]
    for entry in report["detectors"]:
        lines.append(f"Detector `{entry['detector']}`"
                     + (f" (converged samples vs data: FID {entry['reference_data_fid']:.2f})"
                        if "reference_data_fid" in entry else "") + ":")
        lines += ["", "| set | solver | NFE | teacher-FID | data-FID |", "|---|---|---|---|---|"]
        for r in entry["rows"]:
            data = "" if r["data_fid"] is None else f"{r['data_fid']:.2f}"
            lines.append(f"| {r['set']} | {r['ladder']} | {r['nfe']} | {r['teacher_fid']:.2f} | {data} |")
        verdict = ", ".join(f"{k} {'monotone' if v else 'NOT monotone'}" for k, v in entry["monotone"].items())
        lines += ["", f"Ranking: {verdict}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
