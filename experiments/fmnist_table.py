"""The paper's Table 2 on the built-in Fashion-MNIST teacher, at the paper's budget, on whatever machine runs it.

Rows: DDIM/Euler at 10 and 50 NFE, DPM-Solver++(3M) at 5 and 10 NFE, SFD at 2/3/4/5 NFE (one model each), SFD-v
(one model) at 2..5 NFE, the second stage at 1 NFE. Columns, every one measured here:
- teacher-FID: FID against the teacher's own converged samples (`assets/fmnist-teacher-ref.npz`, 10k Heun-34
  samples on seeds disjoint from the evaluation seeds; `experiments/fmnist_metric.py` shows that it ranks solvers);
- data-FID: FID against the Fashion-MNIST training set;
- PSNR to the teacher's converged ODE endpoint (Heun) from the same latents;
- the distillation budget, its wall time and the machine.
Distillation follows `launch.sh` (the paper's CIFAR-10 recipes): SFD 200 kimg, SFD-v 800 kimg, both batch 128,
lr 5e-5, DPM-Solver++(3M) teacher with M=3 and AFS; second stage from the SFD-v model, 2000 kimg, lr 5e-4, M=2
(LPIPS off: offline). `--row_kimg sfd3=50,...` gives a row a smaller budget; the table states each row's.

SFD-2 also records its distillation curve: a snapshot every `--curve_every` ticks, each scored like a row. SFD-v
records one at 2 NFE, where it trails SFD most: a snapshot every `--curve_v_every` ticks (with `--partial`, the kept
dumps of a stopped run stand in for them), each scored with the kimg the run spent on that NFE's student length
(replayed from the run's seeded draw; a quarter of the whole on average), so that it compares with SFD-2's curve.
The second stage records its 1-NFE student every `--curve_2_every` ticks likewise (a point's time leaves out the
SFD-v model the stage starts from; its table row includes it). `--stage2_from K` starts the second stage from the
SFD-v run's snapshot at K kimg instead of its finished model, in a folder and a row of its own, where machine time
for the whole first stage is short.
`--plots` writes the quality-vs-NFE plot and the curves (needs matplotlib; without it only the table is written).
Under the table the script judges the paper's orderings on its rows, on teacher-FID and PSNR (`orderings`): SFD-2
and each second stage against DPM-Solver++(3M)-5, SFD-v within 10 % of SFD at each NFE.

    python experiments/fmnist_table.py --num 10000 --workdir exps/table --out experiments/fmnist_table.md --plots

Everything is resumable: the work folder keeps the settings, the endpoint images, every finished row, every
snapshot, and the training-state dumps of the distillations (every `--dump_every` ticks), so the same command after
a crash, a kill or the end of a session continues where it stopped. `--rows` restricts a run to some rows. A work
folder made with other settings is refused. `--partial` trains nothing and scores each unfinished distillation at its
latest dump (a row "K of B kimg (stopped)", replaced by the finished model's row once the run completes); dumps made on
another machine with the same settings can be copied into `<workdir>/distil/` for that.

Beside `--out` the script writes `<out stem>-rows.json`: every row of the work folder, with its settings. Commit it
with the table: `--rows_file` reads it back (rows made with other settings are refused), so that `--table_only`
rebuilds the table and plots without the work folder, and a new run adds only the rows it lacks. A stopped model's
row and a curve point name the run they come from (`run_id`), so a distillation started again from scratch after
its work folder was lost keeps its own points beside the merged ones of the lost run.
"""

import glob
import hashlib
import json
import math
import os
import random
import re
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
from metrics.detectors import compute_features, load_detector  # noqa: E402
from metrics.frechet import FeatureStats, frechet_distance, load_ref  # noqa: E402
from metrics.images import psnr_uint8  # noqa: E402
from models import load_network  # noqa: E402
from sample import SeedGenerators, to_uint8  # noqa: E402
from torch_utils.cli import CommandError, machine_name  # noqa: E402
from training import state as train_state  # noqa: E402
from training.precision import full_fp32, maybe_compile, prepare_module  # noqa: E402
from training.sfd_loss import SFDV_NUM_STEPS  # noqa: E402
from training.training_loop import draw_sfdv_num_steps, training_loop  # noqa: E402

ASSETS = os.path.join(REPO, "assets")

# Row keys in table order; `--rows` takes a comma-separated subset.
ROW_KEYS = ("ref", "ddim10", "ddim50", "dpmpp5", "dpmpp10", "sfd2", "sfd3", "sfd4", "sfd5", "sfdv", "stage2")
DISTILLED = ("sfd2", "sfd3", "sfd4", "sfd5", "sfdv", "stage2")
# SFD-v's one model, sampled (with AFS) at every num_steps it was trained for.
SFDV_NFES = tuple(solvers.nfe_of("euler", n, afs=True) for n in range(SFDV_NUM_STEPS[0], SFDV_NUM_STEPS[1] + 1))
CURVE_KEY = "sfd2"
# SFD-v's curve: its one model scored at its hardest NFE, where it stands furthest from SFD.
CURVE_V_KEY, CURVE_V_NFE = "curve_v", SFDV_NFES[0]
SFDV_TOLERANCE = 0.10  # the paper: one SFD-v model stays within 10 % of the SFD models trained per NFE
# The second stage's curve: its 1-NFE student along its run.
CURVE_2_KEY, CURVE_2_NFE = "curve_2", 1
SFDV_SEED, STAGE2_SEED = 10, 11  # training seeds (SFD-N uses N): they fix SFD-v's sequence of student lengths


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


class Scorer:
    """Teacher-FID, data-FID and (given the endpoint images) PSNR of uint8 images, from one detector pass."""

    def __init__(self, detector, teacher_ref, data_ref, device, endpoint=None):
        """endpoint: a callable giving the endpoint images, called when the first images are scored."""
        self.detector, self.teacher_ref, self.data_ref = detector, teacher_ref, data_ref
        self.endpoint, self.device = endpoint, device

    def __call__(self, images):
        stats = FeatureStats()
        for start in range(0, len(images), 500):
            stats.add(compute_features(self.detector, images[start:start + 500], device=self.device))
        mu, sigma = stats.mean_cov()
        scores = dict(teacher_fid=float(frechet_distance(mu, sigma, *self.teacher_ref)),
                      fid=float(frechet_distance(mu, sigma, *self.data_ref)))
        if self.endpoint is not None:
            scores["psnr"] = psnr_uint8(images, self.endpoint()[:len(images)])
        return scores


def parse_rows(text):
    keys = [k.strip() for k in text.split(",") if k.strip()] if text else list(ROW_KEYS)
    unknown = [k for k in keys if k not in ROW_KEYS]
    if unknown:
        raise CommandError(f"--rows: unknown row {unknown[0]!r}; choose from {','.join(ROW_KEYS)}")
    return keys


def parse_row_kimg(text):
    """'sfd3=50,sfdv=100' -> {'sfd3': 50.0, 'sfdv': 100.0}."""
    budgets = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in DISTILLED:
            raise CommandError(f"--row_kimg: {key!r} is not a distilled row; choose from {','.join(DISTILLED)}")
        try:
            budgets[key] = float(value)
        except ValueError:
            raise CommandError(f"--row_kimg: {item!r} is not ROW=KIMG (e.g. sfd3=50)") from None
        if budgets[key] <= 0:
            raise CommandError(f"--row_kimg: {key} needs a positive budget, got {value}")
    return budgets


def run_stats(run_dir):
    """The tick entries of a distillation's stats.jsonl (its times, kimg and machine)."""
    path = os.path.join(run_dir, "stats.jsonl")
    if not os.path.isfile(path):
        raise CommandError(f"{run_dir}: no stats.jsonl beside its snapshots and dumps; copy the run's stats.jsonl "
                           "with them (it holds the run's times and machine)")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_pauses(run_dir):
    """{tick kimg: seconds} of the times a run's process stood stopped (SIGSTOP) inside a tick, from the run's
    pauses.jsonl when it has one: a line per pause, {"kimg": the kimg that tick ends at, "seconds": how long, and
    whatever says when and why}. The loop's wall clock cannot tell a stopped process from a slow one."""
    path = os.path.join(run_dir, "pauses.jsonl")
    if not os.path.isfile(path):
        return {}
    ticks = {round(entry["kimg"], 3): entry["sec_per_kimg"] for entry in run_stats(run_dir)}
    pauses = {}
    with open(path) as f:
        for line in filter(str.strip, f):
            pause = json.loads(line)
            kimg = round(float(pause["kimg"]), 3)
            if kimg not in ticks:
                raise CommandError(f"{path}: no tick of the run ends at {kimg} kimg; name the kimg of the tick that "
                                   "holds the pause, as stats.jsonl has it")
            pauses[kimg] = pauses.get(kimg, 0.0) + float(pause["seconds"])
    previous = dict(zip(sorted(ticks), [0.0] + sorted(ticks)[:-1]))
    for kimg, seconds in pauses.items():
        if not 0 < seconds < ticks[kimg] * (kimg - previous[kimg]):
            raise CommandError(f"{path}: the pauses at {kimg} kimg ({seconds:g} s) do not fit inside that tick; "
                               "fix their seconds")
    return pauses


def distillation_seconds(run_dir, until_kimg=float("inf")):
    """Wall time of a (possibly resumed) distillation up to `until_kimg`: the sum of its ticks in stats.jsonl, less
    the pauses recorded in its pauses.jsonl."""
    total, last_kimg = 0.0, 0.0
    pauses = run_pauses(run_dir)
    for entry in run_stats(run_dir):
        if entry["kimg"] > until_kimg + 1e-9:
            break
        total += entry["sec_per_kimg"] * (entry["kimg"] - last_kimg) - pauses.get(round(entry["kimg"], 3), 0.0)
        last_kimg = entry["kimg"]
    return total


def tick_kimg(run_dir, file_kimg):
    """The exact kimg of the tick that wrote a snapshot or dump named by its whole kimg (from stats.jsonl)."""
    found = file_kimg
    for entry in run_stats(run_dir):
        kimg = entry["kimg"]
        if int(kimg) == file_kimg:
            found = kimg  # a later tick with the same whole kimg overwrote the file
    return found


def nfe_share_kimg(kimg, batch, num_steps, seed=SFDV_SEED):
    """kimg of an SFD-v run's first `kimg` whose iterations drew the student length `num_steps`: the training loop's
    own draw, replayed from the run's seed (one draw per iteration of `batch` trajectories)."""
    step_rng = random.Random(seed)
    iterations = round(kimg * 1000 / batch)
    return sum(draw_sfdv_num_steps(step_rng) == num_steps for _ in range(iterations)) * batch / 1000


def curve_points(run_dir, every_ticks, scored=()):
    """[(kimg, path)]: one snapshot or training-state dump of the run per interval of `every_ticks` ticks that holds
    none of the kimg `scored` yet, oldest first. Interval k holds ticks k·every_ticks + 1 .. (k+1)·every_ticks, so
    a snapshot the loop writes every `every_ticks` ticks opens one; the first interval is left out, as the loop's
    first snapshot is. An interval's point is its snapshot where it has one, else its first dump. A finished run's
    final snapshot is a point of its own, also when its budget ends inside an interval that another opened."""
    stats = run_stats(run_dir)
    if not stats:
        return []
    final = round(stats[-1]["kimg"], 3) if os.path.exists(os.path.join(run_dir, "done.json")) else None

    def interval(kimg):
        slot = (round(kimg / stats[0]["kimg"]) - 1) // every_ticks
        return slot + 0.5 if round(kimg, 3) == final else slot

    taken = {interval(k) for k in scored}
    candidates = {}
    for name in os.listdir(run_dir):
        m = re.fullmatch(r"(training-state-|network-snapshot-)(\d+)\.(pt|safetensors)", name)
        if m:
            kimg, path = round(tick_kimg(run_dir, int(m.group(2))), 3), os.path.join(run_dir, name)
            if interval(kimg) > 0 and interval(kimg) not in taken:
                candidates.setdefault(interval(kimg), []).append((m.group(3) == "pt", kimg, path))
    return [min(c)[1:] for _, c in sorted(candidates.items())]


def distil(run_dir, teacher_path, kimg, batch, device, seed, tick, dump_every, snapshot_ticks=None, **options):
    """Run SFD into run_dir, or resume it from its latest training-state dump, or find it finished.

    Returns the final snapshot's path and the wall seconds of the whole run (all resumptions together)."""
    done_marker = os.path.join(run_dir, "done.json")
    if not os.path.exists(done_marker):
        os.makedirs(run_dir, exist_ok=True)
        dump = train_state.latest_dump(run_dir)
        print(f"distilling into {run_dir}: {kimg:g} kimg, {options}" + (f", resuming {dump}" if dump else ""),
              flush=True)
        training_loop(run_dir=run_dir, model_path=teacher_path, batch_size=batch, total_kimg=kimg, seed=seed,
                      device=str(device), progress=True, kimg_per_tick=tick, state_dump_ticks=dump_every,
                      snapshot_ticks=snapshot_ticks, resume_state=dump, **options)
        final = os.path.basename(snapshots_of(run_dir)[-1][1])
        write_atomic(done_marker, json.dumps(dict(snapshot=final)) + "\n")
        for path in glob.glob(os.path.join(run_dir, "training-state-*.pt")):
            os.remove(path)  # finished: the dumps (weights + Adam state each) are no longer needed
    return os.path.join(run_dir, json.load(open(done_marker))["snapshot"]), distillation_seconds(run_dir)


def run_id(run_dir):
    """Which distillation a row of a stopped model or a curve point comes from: the run folder's name and a digest
    of its first tick in stats.jsonl, which resuming keeps and a run started again from scratch does not."""
    first = open(os.path.join(run_dir, "stats.jsonl"), "rb").readline()
    return f"{os.path.basename(run_dir)}@{hashlib.sha1(first).hexdigest()[:8]}"


def run_machine(run_dir):
    """Where a distillation ran, from its stats.jsonl ('device'; older runs: a CUDA GPU when mixed precision was on)."""
    stats = run_stats(run_dir)
    if not stats:
        return None
    last = stats[-1]
    return last.get("device") or ("CUDA GPU" if last.get("precision", "fp32") != "fp32" else "CPU")


class Trained:
    """A distilled model to score: a finished run's snapshot, or a stopped run's latest training-state dump.

    budget: the run's kimg budget; seconds: its wall time so far; kimg: where a stopped run stands (None: finished);
    machine: where it was distilled; path: a finished run's snapshot."""

    def __init__(self, load, budget, seconds, machine, kimg=None, path=None, run=None):
        self._load, self._net = load, None
        self.budget, self.seconds, self.machine, self.kimg, self.path = budget, seconds, machine, kimg, path
        self.run = run  # a stopped model's run_id

    def net(self):
        if self._net is None:
            self._net = self._load()
        return self._net

    @classmethod
    def from_dump(cls, dump_path, model_path, conditioned, budget, device):
        """The student of an unfinished run's dump, on the network the run started from."""
        run_dir = os.path.dirname(dump_path)
        dump = train_state.load_training_state(dump_path)
        at = dump["cur_nimg"] / 1000

        def load():
            net = load_network(model_path=model_path, device=device, use_step_condition=conditioned).net
            net.load_state_dict(dump["net"])
            return net.eval().requires_grad_(False)

        return cls(load, budget, distillation_seconds(run_dir, at), run_machine(run_dir), kimg=at, run=run_id(run_dir))


def sfdv_snapshot(run_dir, kimg, budget):
    """The SFD-v model a second stage starts from with `--stage2_from`: the snapshot its run wrote at `kimg`, with
    the run's time up to it."""
    found = dict(snapshots_of(run_dir)) if os.path.isdir(run_dir) else {}
    if kimg not in found:
        have = ", ".join(str(k) for k in sorted(found)) or "none yet"
        raise CommandError(f"--stage2_from: the SFD-v run {run_dir} has no snapshot at {kimg} kimg (it has: {have}); "
                           "pass one it has, or distil SFD-v further first (--rows sfdv)")
    return Trained(None, budget, distillation_seconds(run_dir, tick_kimg(run_dir, kimg)), run_machine(run_dir),
                   path=found[kimg])


def snapshots_of(run_dir):
    """[(kimg, path)] of a run's snapshots, oldest first."""
    found = []
    for name in os.listdir(run_dir):
        m = re.fullmatch(r"network-snapshot-(\d+)\.safetensors", name)
        if m:
            found.append((int(m.group(1)), os.path.join(run_dir, name)))
    return sorted(found)


def read_rows_file(path, settings):
    """The rows of a rows file written beside another run's table, refused when they were made with other settings."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        theirs, rows = data["settings"], data["rows"]
        for row in rows:
            WorkFolder.row_id(row)
    except FileNotFoundError:
        raise CommandError(f"--rows_file: no file {path}; pass the <table>-rows.json an earlier run wrote")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CommandError(f"--rows_file: {path} is not a rows file ({type(e).__name__}: {e}); pass the "
                           "<table>-rows.json an earlier run wrote")
    changed = sorted(k for k in set(theirs) | set(settings) if theirs.get(k) != settings.get(k))
    if changed:
        k = changed[0]
        raise CommandError(f"--rows_file: {path} holds rows made with {k}={theirs.get(k)!r}, not "
                           f"{settings.get(k)!r}; merge only rows made with the same settings")
    return rows


class WorkFolder:
    """The resumable state of one table run: settings, endpoint images, finished rows, distillations."""

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

    @staticmethod
    def row_id(row):
        """A row is its method and NFE, the budget of its distillation and, for a stopped model or a curve point,
        the kimg reached and the run (two runs of one budget, one started again from scratch, stay apart)."""
        at = row.get("kimg")
        return (row["key"], row["nfe"], row.get("budget_kimg"), at, row.get("run") if at is not None else None,
                row.get("from_kimg"))

    def has(self, key, nfe, budget=None, kimg=None, run=None, from_kimg=None):
        return (key, nfe, budget, kimg, run if kimg is not None else None, from_kimg) in self.rows

    def reload_rows(self):
        """Rows in rows.jsonl (also those another process appended to the same folder since)."""
        if os.path.exists(self.rows_file):
            for line in open(self.rows_file):
                if line.strip():
                    row = json.loads(line)
                    self.rows.setdefault(self.row_id(row), row)

    def merge_rows(self, rows):
        """Count rows read from a rows file (`read_rows_file`) as finished here; this folder's own rows win where
        both hold the same row."""
        for row in rows:
            self.rows.setdefault(self.row_id(row), row)

    def add_row(self, row):
        self.rows[self.row_id(row)] = row
        with open(self.rows_file, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    def run_dir(self, key, kimg, from_kimg=None):
        """A distillation's folder; a second stage started from an SFD-v snapshot (`--stage2_from`) names it."""
        suffix = f"-from-sfdv{from_kimg}kimg" if from_kimg is not None else ""
        return os.path.join(self.path, "distil", f"{key}-{kimg:g}kimg{suffix}")

    def endpoint(self, make):
        """uint8 endpoint images, computed once and kept as reference.npy."""
        path = os.path.join(self.path, "reference.npy")
        if os.path.exists(path):
            return torch.from_numpy(np.load(path))
        images = make()
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, images.numpy())
        return images

    def table_rows(self):
        """One row per (key, NFE) in table order, and per SFD-v model a second stage started from: the model trained
        longest (a finished run's budget, a stopped one's kimg), the finished one where a stopped run has reached as
        far."""
        def rank(r):
            trained = r.get("kimg") if r.get("kimg") is not None else (r.get("budget_kimg") or 0)
            return trained, r.get("kimg") is None

        def slot(r):
            return ROW_KEYS.index(r["key"]), r["nfe"], r.get("from_kimg") or 0

        best = {}
        for r in self.rows.values():
            if r["key"] in ROW_KEYS:
                held = best.get(slot(r))
                if held is None or rank(r) > rank(held):
                    best[slot(r)] = r
        return [best[k] for k in sorted(best)]

    def curve_rows(self, key="curve"):
        """The points of a distillation curve ("curve": SFD-2's, CURVE_V_KEY: SFD-v's), by budget and kimg."""
        return sorted((r for r in self.rows.values() if r["key"] == key),
                      key=lambda r: (r.get("budget_kimg") or 0, r.get("run") or "", r["kimg"]))


def file_id(path):
    """A file's name, size and the start of its SHA-256. Name and size alone would let two teachers pass for each
    other: every snapshot of one network has the same size, and a retrained fmnist-teacher.pkl keeps its name."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"{os.path.basename(path)}:{os.path.getsize(path)}:{digest.hexdigest()[:12]}"


@click.command()
@click.option("--teacher", default=os.path.join(ASSETS, "fmnist-teacher.pkl"), show_default=True)
@click.option("--detector", default=os.path.join(ASSETS, "fmnist-detector.pt"), show_default=True)
@click.option("--ref", default=os.path.join(ASSETS, "fmnist-train-ref.npz"), show_default=True,
              help="Training-set statistics (data-FID)")
@click.option("--teacher_ref", default=os.path.join(ASSETS, "fmnist-teacher-ref.npz"), show_default=True,
              help="The teacher's converged-sample statistics (teacher-FID)")
@click.option("--num", help="Samples per row (seeds 0..num-1)", type=click.IntRange(min=2), default=10000,
              show_default=True)
@click.option("--kimg", help="Budget of each SFD row (launch.sh: 200)", type=click.FloatRange(min=0, min_open=True),
              default=200, show_default=True)
@click.option("--kimg_v", help="Budget of the SFD-v model (launch.sh: 800)", type=click.FloatRange(min=0, min_open=True),
              default=800, show_default=True)
@click.option("--kimg2", help="Budget of the second stage (launch.sh: 2000)",
              type=click.FloatRange(min=0, min_open=True), default=2000, show_default=True)
@click.option("--row_kimg", default=None,
              help="Other budgets for some rows, e.g. sfd3=50,sfdv=100 (each budget distils in its own folder; the "
                   "table shows the longest-trained model of a row)")
@click.option("--batch", help="Distillation batch (launch.sh: 128)", type=click.IntRange(min=1), default=128,
              show_default=True)
@click.option("--lr", help="First-stage learning rate (launch.sh: 5e-5)", type=float, default=5e-5, show_default=True)
@click.option("--lr2", help="Second-stage learning rate (launch.sh: 5e-4)", type=float, default=5e-4,
              show_default=True)
@click.option("--thresholding", type=bool, default=False, show_default=True,
              help="DPM-Solver++ dynamic thresholding in the baseline rows and the SFD teacher (train.py's default)")
@click.option("--sample_batch", type=click.IntRange(min=1), default=500, show_default=True)
@click.option("--reference_steps", help="Heun time points of the PSNR endpoint (NFE = 2(N-1))", type=int,
              default=18, show_default=True)
@click.option("--tick", help="Distillation tick in kimg (status line; the unit of the two options below)",
              type=click.FloatRange(min=0, min_open=True), default=1, show_default=True)
@click.option("--curve_every", help="SFD-2 snapshot (and curve point) interval in ticks", type=click.IntRange(min=1),
              default=10, show_default=True)
@click.option("--curve_v_every", type=click.IntRange(min=1), default=40, show_default=True,
              help="SFD-v snapshot interval in ticks; its curve (2 NFE) scores the first snapshot, or with --partial "
                   "the first kept dump, at or past each multiple")
@click.option("--curve_2_every", type=click.IntRange(min=1), default=50, show_default=True,
              help="Second-stage snapshot interval in ticks; its curve (1 NFE) scores each, like --curve_v_every")
@click.option("--stage2_from", type=click.IntRange(min=1), default=None,
              help="Start the second stage from the SFD-v run's snapshot at this kimg (its "
                   "network-snapshot-<kimg>.safetensors, one every --curve_v_every ticks) instead of the finished "
                   "SFD-v model: a shorter first stage where machine time is short. Its row and folder name it")
@click.option("--dump_every", help="Training-state dump interval of the distillations in ticks",
              type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--rows", "rows_text", help=f"Comma-separated rows to compute  [default: all: {','.join(ROW_KEYS)}]",
              default=None)
@click.option("--partial", is_flag=True,
              help="Distil nothing: score unfinished distillations at their latest training-state dump (the table "
                   "says 'K of B kimg'); finished ones as usual")
@click.option("--table_only", is_flag=True, help="Only write the table (and plots) of the rows already finished")
@click.option("--rows_file", "rows_files", multiple=True,
              help="Rows an earlier run wrote beside its table (<out stem>-rows.json), counted as finished here: "
                   "rebuild a table without its work folder, or merge runs made elsewhere (repeatable)")
@click.option("--plots", is_flag=True, help="Also write <out>-nfe.png and <out>-curve.png (needs matplotlib)")
@click.option("--channels_last", type=bool, default=False, show_default=True,
              help="Channels-last networks for sampling and distillation (same numbers, faster on some machines)")
@click.option("--compile", "compile_", type=bool, default=False, show_default=True,
              help="torch.compile the sampling and distillation calls (same numbers, ~1 min compile per network)")
@click.option("--workdir", default="./exps/fmnist-table", show_default=True,
              help="Resumable state of this run; rerun the same command to continue it")
@click.option("--out", help="Markdown table to write; a file <out stem>-notes.md next to it (the rows' provenance) "
                           "is appended verbatim", default=os.path.join(REPO, "experiments", "fmnist_table.md"),
              show_default=True)
@click.option("--device", default=None)
def main(teacher, detector, ref, teacher_ref, num, kimg, kimg_v, kimg2, row_kimg, batch, lr, lr2, thresholding,
         sample_batch, reference_steps, tick, curve_every, curve_v_every, curve_2_every, stage2_from, dump_every,
         rows_text,
         partial, table_only, rows_files, plots, channels_last, compile_, workdir, out, device):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    full_fp32()  # rows made on a GPU compare with rows made on a CPU
    wanted = parse_rows(rows_text)
    budgets = {k: kimg for k in ("sfd2", "sfd3", "sfd4", "sfd5")}
    budgets.update(sfdv=kimg_v, stage2=kimg2)
    budgets.update(parse_row_kimg(row_kimg))
    for path, opt in ((teacher, "--teacher"), (detector, "--detector"), (ref, "--ref"),
                      (teacher_ref, "--teacher_ref")):
        if not os.path.isfile(path):
            raise CommandError(f"{opt}: no file {path}; pass an existing file")
    settings = dict(teacher=file_id(teacher), detector=file_id(detector), teacher_ref=file_id(teacher_ref), num=num,
                    batch=batch, lr=lr, lr2=lr2, thresholding=thresholding, reference_steps=reference_steps,
                    tick=tick, curve_every=curve_every)
    merged = [read_rows_file(path, settings) for path in rows_files]  # refused before the work folder is made
    work = WorkFolder(workdir, settings)
    for rows in merged:
        work.merge_rows(rows)
    if table_only:
        finish(out, work, settings, plots)
        return
    loaded = load_network(model_path=teacher, device=device)
    s = loaded.settings
    sig = dict(sigma_min=s["sigma_min"], sigma_max=s["sigma_max"])
    seeds = list(range(num))
    machine = machine_name(device)
    speed = dict(channels_last=channels_last, compile=compile_)

    def fast(net):
        return maybe_compile(prepare_module(net, channels_last=channels_last), compile_)

    teacher_net = loaded.net
    teacher_fast = fast(teacher_net)
    ref_nfe = solvers.nfe_of("heun", reference_steps)

    def make_endpoint():
        t0 = time.time()
        images = run_sampler(teacher_net, "heun", seeds, sample_batch, device, fast=teacher_fast,
                             num_steps=reference_steps, **sig)
        print(f"endpoint: Heun {ref_nfe} NFE in {time.time() - t0:.0f}s", flush=True)
        return images

    def endpoint():  # computed on first use, so that distillations start at once
        return work.endpoint(make_endpoint)

    score = Scorer(load_detector(detector, device=device), load_ref(teacher_ref), load_ref(ref), device, endpoint)

    def add(key, name, nfe, make_images, model=None, from_kimg=None):
        """model: the row's distilled model (a Trained); a stopped one's rows are kept apart by its kimg.
        from_kimg: the SFD-v snapshot a second stage started from (`--stage2_from`)."""
        at, budget = (model.kimg, model.budget) if model is not None else (None, None)
        if work.has(key, nfe, budget, at, model.run if model is not None else None, from_kimg):
            return
        row = dict(key=key, method=name, nfe=nfe, **score(make_images()), machine=machine, num=num)
        if from_kimg is not None:
            row.update(from_kimg=from_kimg)
        if model is not None:
            row.update(budget_kimg=model.budget, distill_s=model.seconds, distill_machine=model.machine)
            if at is not None:
                row.update(kimg=at, run=model.run)
        work.add_row(row)

    def teacher_row(key, name, nfe, sampler, **kwargs):
        add(key, name, nfe, lambda: run_sampler(teacher_net, sampler, seeds, sample_batch, device, fast=teacher_fast,
                                                num_steps=nfe + 1, **kwargs, **sig))

    def student_images(student, num_steps, step_condition=None):
        return run_sampler(student, "euler", seeds, sample_batch, device, fast=fast(student), num_steps=num_steps,
                           afs=True, step_condition=step_condition, **sig)

    def curve_pending(nfe):
        """Whether the finished SFD-2 run has snapshots the curve has not scored yet."""
        run_dir = work.run_dir(CURVE_KEY, budgets[CURVE_KEY])
        return os.path.isdir(run_dir) and any(not work.has("curve", nfe, kimg=at) for at, _ in snapshots_of(run_dir))

    def trained(key, model_path, seed, conditioned=False, run_dir=None, **options):
        """The row's distilled model: its run (or resumption) to the budget, or, with --partial and an unfinished
        run, its latest training-state dump without training. None when --partial finds nothing to score."""
        run_dir = run_dir or work.run_dir(key, budgets[key])
        if partial and not os.path.exists(os.path.join(run_dir, "done.json")):
            dump = train_state.latest_dump(run_dir) if os.path.isdir(run_dir) else None
            if dump is None:
                print(f"--partial: {key} has no training-state dump in {run_dir}; row skipped", flush=True)
                return None
            return Trained.from_dump(dump, model_path, conditioned, budgets[key], device)
        snap, secs = distil(run_dir, model_path, budgets[key], batch, device, seed, tick, dump_every,
                            **(dict(use_step_condition=True) if conditioned else {}), **options)
        return Trained(lambda: load_network(model_path=snap, device=device).net, budgets[key], secs,
                       run_machine(run_dir), path=snap)

    if "ref" in wanted:
        add("ref", "Teacher, Heun (endpoint)", ref_nfe, endpoint)
    for nfe in (10, 50):
        if f"ddim{nfe}" in wanted:
            teacher_row(f"ddim{nfe}", "DDIM (Euler)", nfe, "euler")
    for nfe in (5, 10):
        if f"dpmpp{nfe}" in wanted:
            teacher_row(f"dpmpp{nfe}", "DPM-Solver++(3M)", nfe, "dpmpp", max_order=3, thresholding=thresholding)

    common = dict(M=3, afs=True, sampler_tea="dpmpp", max_order=3, lr=lr, thresholding=thresholding, **speed)
    for nfe in (2, 3, 4, 5):
        key = f"sfd{nfe}"
        done = work.has(key, nfe, budgets[key]) and not (key == CURVE_KEY and curve_pending(nfe))
        if key not in wanted or done:
            continue
        model = trained(key, teacher, nfe, num_steps=nfe + 2,
                        snapshot_ticks=curve_every if key == CURVE_KEY else None, **common)
        if model is None:
            continue
        if key == CURVE_KEY and model.kimg is None:
            run_dir = work.run_dir(key, budgets[key])
            for at, path in snapshots_of(run_dir):
                if not work.has("curve", nfe, kimg=at):
                    images = student_images(load_network(model_path=path, device=device).net, nfe + 2)
                    work.add_row(dict(key="curve", method="SFD", nfe=nfe, kimg=at, **score(images),
                                      distill_s=distillation_seconds(run_dir, tick_kimg(run_dir, at)),
                                      machine=machine, num=num))
        add(key, "SFD", nfe, lambda: student_images(model.net(), nfe + 2), model)

    def sfdv_model():
        return trained("sfdv", teacher, SFDV_SEED, conditioned=True, num_steps=4,
                       snapshot_ticks=curve_v_every, **common)

    run_dir_v = work.run_dir("sfdv", budgets["sfdv"])
    run_dir_2 = work.run_dir("stage2", budgets["stage2"], stage2_from)

    def curve_todo(curve_key, run_dir, every, budget):
        """A run's curve points (snapshots, or dumps of a stopped run) in intervals not scored yet."""
        if not os.path.isfile(os.path.join(run_dir, "stats.jsonl")):
            return []
        run = run_id(run_dir)
        scored = [r["kimg"] for r in work.curve_rows(curve_key) if r["budget_kimg"] == budget and r.get("run") == run]
        return curve_points(run_dir, every, scored)

    def sfdv_curve_todo():
        return curve_todo(CURVE_V_KEY, run_dir_v, curve_v_every, budgets["sfdv"])

    def stage2_curve_todo():
        return curve_todo(CURVE_2_KEY, run_dir_2, curve_2_every, budgets["stage2"])

    def score_curve(curve_key, method, nfe, run_dir, todo, budget, model_path, conditioned, extra=lambda at: None):
        """Score a run's curve points at `nfe` (a step-conditioned student: sampled at its own num_steps)."""
        for at, path in todo:
            if path.endswith(".pt"):
                net = Trained.from_dump(path, model_path, conditioned, budget, device).net()
            else:
                net = load_network(model_path=path, device=device).net
            num_steps = nfe + 2
            images = student_images(net, num_steps, step_condition=num_steps)
            work.add_row(dict(key=curve_key, method=method, nfe=nfe, kimg=at, **score(images), **(extra(at) or {}),
                              budget_kimg=budget, distill_s=distillation_seconds(run_dir, at), machine=machine,
                              num=num, run=run_id(run_dir)))

    def score_sfdv_curve():
        score_curve(CURVE_V_KEY, "SFD-v", CURVE_V_NFE, run_dir_v, sfdv_curve_todo(), budgets["sfdv"], teacher, True,
                    extra=lambda at: dict(nfe_kimg=nfe_share_kimg(at, batch, CURVE_V_NFE + 2)))

    if "sfdv" in wanted and (not all(work.has("sfdv", n, budgets["sfdv"]) for n in SFDV_NFES)
                             or sfdv_curve_todo()):
        model_v = sfdv_model()
        for nfe in SFDV_NFES if model_v is not None else ():
            add("sfdv", "SFD-v (one model)", nfe,
                lambda: student_images(model_v.net(), nfe + 2, step_condition=nfe + 2), model_v)
        if model_v is not None:
            score_sfdv_curve()
    if "stage2" in wanted and (not work.has("stage2", 1, budgets["stage2"], from_kimg=stage2_from)
                               or stage2_curve_todo()):
        model_v = sfdv_snapshot(run_dir_v, stage2_from, budgets["sfdv"]) if stage2_from else sfdv_model()
        if model_v is not None and model_v.kimg is not None:
            print("--partial: the second stage starts from the finished SFD-v model; row skipped", flush=True)
        elif model_v is not None:
            model_2 = trained("stage2", model_v.path, STAGE2_SEED, num_steps=3, M=2, afs=True, is_second_stage=True,
                              lpips=False, lr=lr2, snapshot_ticks=curve_2_every, run_dir=run_dir_2, **speed)
            if model_2 is not None:
                model_2.seconds += model_v.seconds  # the second stage's cost includes the model it starts from
                name = "SFD second stage (from SFD-v" + (
                    f" at {stage2_from} of {budgets['sfdv']:g} kimg)" if stage2_from else ")")
                add("stage2", name, CURVE_2_NFE, lambda: student_images(model_2.net(), 3, step_condition=3), model_2,
                    from_kimg=stage2_from)
                score_curve(CURVE_2_KEY, "SFD second stage", CURVE_2_NFE, run_dir_2, stage2_curve_todo(),
                            budgets["stage2"], model_v.path, False,
                            extra=lambda at: dict(from_kimg=stage2_from) if stage2_from else None)

    work.reload_rows()
    finish(out, work, settings, plots)


def finish(out, work, settings, plots):
    write_table(out, work, settings)
    write_rows_file(out, work, settings)
    if plots:
        write_plots(os.path.splitext(out)[0], work)


def rows_file_path(out):
    """Every row behind a table, kept beside it so that the table and its plots can be rebuilt (`--rows_file`)
    without the work folder, and merged with other runs' rows."""
    return os.path.splitext(out)[0] + "-rows.json"


def write_rows_file(out, work, settings):
    order = {k: i for i, k in enumerate(ROW_KEYS + ("curve", CURVE_V_KEY, CURVE_2_KEY))}
    rows = sorted(work.rows.values(), key=lambda r: (order.get(r["key"], len(order)), r["key"], r["nfe"],
                                                    r.get("budget_kimg") or 0, r.get("kimg") or 0))
    lines = ",\n".join("  " + json.dumps(r) for r in rows)
    text = f'{{"settings": {json.dumps(settings)},\n "rows": [\n{lines}\n]}}\n'
    write_atomic(rows_file_path(out), text)


def plotted_curve(points):
    """The points of a curve that its plot shows: those of the largest budget, from the run that got furthest."""
    points = [r for r in points if r["budget_kimg"] == max((x["budget_kimg"] for x in points), default=None)]
    furthest = max(points, key=lambda r: r["kimg"], default={}).get("run")
    return [r for r in points if r.get("run") == furthest]


def stage2_curves(work):
    """The second stage's plotted curves, one per SFD-v model the stage started from (`--stage2_from`), by start:
    [(what it started from, its points)]."""
    starts = {}
    for r in work.curve_rows(CURVE_2_KEY):
        starts.setdefault(r.get("from_kimg") or 0, []).append(r)
    return [(stage2_start(points), plotted_curve(points)) for _, points in sorted(starts.items())]


def format_minutes(seconds):
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.2f} h"


def write_table(out, work, settings):
    """Markdown table of every finished row in table order, the paper's orderings judged on those rows, then the
    SFD-2, SFD-v and second-stage curves (points of earlier runs included)."""
    st = settings
    rows = work.table_rows()
    machines = sorted({r.get("distill_machine") or r["machine"] for r in rows if r.get("distill_s") is not None})
    lines = [f"Fashion-MNIST 32×32 teacher `{st['teacher'].split(':')[0]}`, {st['num']} samples per row (seeds "
             f"0..{st['num'] - 1}). teacher-FID: against {st['teacher_ref'].split(':')[0]} (the teacher's converged "
             f"samples); data-FID: against the training set; both with `{st['detector'].split(':')[0]}`. PSNR: to "
             f"the Heun-{solvers.nfe_of('heun', st['reference_steps'])} endpoint from the same latents. "
             f"Distillation: batch {st['batch']}, lr {st['lr']:g} (second stage {st['lr2']:g}, from the SFD-v model, "
             f"M=2, LPIPS off), M=3 DPM-Solver++(3M) teacher, AFS, thresholding "
             f"{'on' if st['thresholding'] else 'off'}; distilled on: {'; '.join(machines) or '-'}.", "",
             "| method | NFE | teacher-FID | data-FID | PSNR (dB) | budget | distillation time |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        budget = budget_text(r)
        t = format_minutes(r["distill_s"]) if r.get("distill_s") is not None else ""
        if len(machines) > 1 and t:
            t += f" ({r.get('distill_machine') or r['machine']})"
        psnr = "(itself)" if r["key"] == "ref" else f"{r['psnr']:.2f}"
        lines.append(f"| {r['method']} | {r['nfe']} | {r['teacher_fid']:.2f} | {r['fid']:.2f} | {psnr} | {budget} "
                     f"| {t} |")
    if any(r.get("kimg") is not None for r in rows):
        lines += ["", "(stopped): an unfinished distillation scored at its latest training-state dump (`--partial`); "
                      "its lr drops ÷10 at half of the budget named."]
    judged = orderings(rows)
    if judged:
        within = 1 + SFDV_TOLERANCE
        lines += ["", f"The paper's orderings, judged on these rows. Beating a row: a lower teacher-FID, a higher "
                      f"PSNR. Within {SFDV_TOLERANCE:.0%} of SFD: a teacher-FID at most {within:g}× SFD's, and "
                      f"an RMSE to the endpoint at most {within:g}× SFD's (a PSNR at most "
                      f"{20 * math.log10(within):.2f} dB below it).", "",
                  "| ordering | teacher-FID | PSNR (dB) |", "|---|---|---|"]
        lines += [f"| {claim} | {fid} | {psnr} |" for claim, fid, psnr in judged]
    curve = work.curve_rows()
    if curve:
        lines += ["", "SFD-2 distillation curve (snapshots of the SFD-2 row's run; the lr drops ÷10 at half of it):",
                  "", "| kimg | teacher-FID | data-FID | PSNR (dB) | distillation time |", "|---|---|---|---|---|"]
        lines += [f"| {r['kimg']} | {r['teacher_fid']:.2f} | {r['fid']:.2f} | {r['psnr']:.2f} | "
                  f"{format_minutes(r['distill_s'])} |" for r in curve]
    curve_v = work.curve_rows(CURVE_V_KEY)
    if curve_v:
        budgets = " / ".join(f"{b:g}" for b in sorted({r["budget_kimg"] for r in curve_v}))
        lines += curve_table(curve_v, f"SFD-v distillation curve at {CURVE_V_NFE} NFE (its one model, trained at "
                                      f"{SFDV_NFES[0]}–{SFDV_NFES[-1]} NFE; the lr drops ÷10 at half of the budget, "
                                      f"{budgets} kimg; 'at {CURVE_V_NFE} NFE': the kimg of the iterations that drew "
                                      f"the {CURVE_V_NFE}-NFE student, a quarter on average):",
                             f"kimg at {CURVE_V_NFE} NFE", "nfe_kimg")
    curve_2 = sorted(work.curve_rows(CURVE_2_KEY), key=lambda r: r.get("from_kimg") or 0)  # by start, then as before
    if curve_2:
        budgets = " / ".join(f"{b:g}" for b in sorted({r["budget_kimg"] for r in curve_2}))
        lines += curve_table(curve_2, f"Second-stage distillation curve at {CURVE_2_NFE} NFE (from "
                                      f"{stage2_start(curve_2)}; "
                                      f"the lr drops ÷10 at half of the budget, {budgets} kimg; its time leaves out "
                                      "the SFD-v model's):", start=lambda r: stage2_start([r]))
    notes = notes_path(out)
    if os.path.isfile(notes):
        with open(notes, encoding="utf-8") as f:
            lines += ["", f.read().strip()]
    write_atomic(out, "\n".join(lines) + "\n")
    print("\n".join(lines))


def budget_text(r, stopped=" (stopped)"):
    """A distilled row's budget: "200 kimg", or "55.3 of 200 kimg (stopped)" for a stopped run's dump."""
    budget = f"{r['budget_kimg']:g} kimg" if r.get("budget_kimg") else ""
    if budget and r.get("kimg") is not None:
        done = f"{r['kimg']:.3g}" if r["kimg"] < 1000 else f"{r['kimg']:.0f}"  # not "1.41e+03"
        budget = f"{done} of {budget}{stopped}"
    return budget


def orderings(rows):
    """The paper's orderings judged on table rows, as (claim, teacher-FID cell, PSNR cell): SFD-2 beats
    DPM-Solver++(3M)-5; SFD-v is within SFDV_TOLERANCE of SFD at each NFE both have; each second stage at 1 NFE
    beats DPM-Solver++(3M)-5. Each cell shows both values and whether the claim holds on that metric."""
    def verdict(ok):
        return "yes" if ok else "**no**"

    def beats(r, base):
        fid_ok, psnr_ok = r["teacher_fid"] < base["teacher_fid"], r["psnr"] > base["psnr"]
        return (f"{r['teacher_fid']:.2f} vs {base['teacher_fid']:.2f}: {verdict(fid_ok)}",
                f"{r['psnr']:.2f} vs {base['psnr']:.2f}: {verdict(psnr_ok)}")

    def close(r, sfd):
        fid_ratio, rmse_ratio = r["teacher_fid"] / sfd["teacher_fid"], 10 ** ((sfd["psnr"] - r["psnr"]) / 20)
        return (f"{r['teacher_fid']:.2f} vs {sfd['teacher_fid']:.2f} ({fid_ratio - 1:+.0%}): "
                f"{verdict(fid_ratio <= 1 + SFDV_TOLERANCE)}",
                f"{r['psnr']:.2f} vs {sfd['psnr']:.2f} (RMSE {rmse_ratio - 1:+.0%}): "
                f"{verdict(rmse_ratio <= 1 + SFDV_TOLERANCE)}")

    def named(name, r):
        return f"{name} ({budget_text(r, stopped='')})"

    found = {(r["key"], r["nfe"]): r for r in rows if r["key"] != "stage2"}
    base, judged = found.get(("dpmpp5", 5)), []
    if base is not None and ("sfd2", 2) in found:
        sfd2 = found["sfd2", 2]
        judged.append((f"{named('SFD-2', sfd2)} beats DPM-Solver++(3M)-5", *beats(sfd2, base)))
    for nfe in SFDV_NFES:
        if ("sfdv", nfe) in found and (f"sfd{nfe}", nfe) in found:
            sfdv, sfd = found["sfdv", nfe], found[f"sfd{nfe}", nfe]
            judged.append((f"{named(f'SFD-v at {nfe} NFE', sfdv)} within {SFDV_TOLERANCE:.0%} of "
                           f"{named(f'SFD-{nfe}', sfd)}", *close(sfdv, sfd)))
    for r in rows:
        if r["key"] == "stage2" and base is not None:
            judged.append((f"{named(f'Second stage from {stage2_start([r])}', r)} at {r['nfe']} NFE beats "
                           "DPM-Solver++(3M)-5", *beats(r, base)))
    return judged


def curve_table(curve, title, extra_header=None, extra_key=None, start=lambda r: ""):
    """Markdown lines of a curve's points; each kimg names its budget once the points span several, what its run
    started from (`start`) once they start from several, and its run once several share a start."""
    budgets = {r["budget_kimg"] for r in curve}
    starts = {start(r) for r in curve}
    runs = {(start(r), r.get("run") or "") for r in curve}

    def at(r):
        return (f"{r['kimg']:.1f}" + (f" of {r['budget_kimg']:g}" if len(budgets) > 1 else "")
                + (f" from {start(r)}" if len(starts) > 1 else "")
                + (f" (run {r.get('run') or '-'})" if len(runs) > len(starts) else ""))

    extra = [extra_header] if extra_header else []
    lines = ["", title, "", "| " + " | ".join(["kimg"] + extra + ["teacher-FID", "data-FID", "PSNR (dB)",
                                                                   "distillation time"]) + " |",
             "|" + "---|" * (5 + len(extra))]
    for r in curve:
        cells = [at(r)] + ([f"{r[extra_key]:.1f}"] if extra_key else [])
        cells += [f"{r['teacher_fid']:.2f}", f"{r['fid']:.2f}", f"{r['psnr']:.2f}", format_minutes(r["distill_s"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def stage2_start(rows):
    """What second-stage rows started from: the finished SFD-v model, or its snapshots (`--stage2_from`)."""
    starts = sorted({r.get("from_kimg") or 0 for r in rows})
    return " / ".join(f"SFD-v's {k}-kimg snapshot" if k else "the finished SFD-v model" for k in starts)


def notes_path(out):
    """Hand-written notes kept beside the table and appended to it, so regenerating the table keeps them."""
    return os.path.splitext(out)[0] + "-notes.md"


def save_figure(plt, fig, axes, path):
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def write_plots(prefix, work):
    """<prefix>-nfe.png (quality vs NFE per method), <prefix>-curve.png (the SFD-2 and SFD-v distillation curves at
    2 NFE) and <prefix>-curve2.png (the second stage's at 1 NFE)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib is not installed: no plots written (pip install matplotlib)", flush=True)
        return []
    rows = work.table_rows()
    methods = {}
    for r in rows:
        if r["key"] != "ref":
            methods.setdefault(r["method"], []).append(r)
    written = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, rs in methods.items():
        rs = sorted(rs, key=lambda r: r["nfe"])
        nfe = [r["nfe"] for r in rs]
        style = "o-" if len(rs) > 1 else "*"
        axes[0].plot(nfe, [r["teacher_fid"] for r in rs], style, label=name, markersize=8)
        axes[1].plot(nfe, [r["psnr"] for r in rs], style, label=name, markersize=8)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("teacher-FID (lower is better)")
    axes[1].set_ylabel("PSNR to the converged endpoint (dB)")
    nfes = sorted({r["nfe"] for rs in methods.values() for r in rs})
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(nfes, [str(n) for n in nfes])  # plain NFE labels, not 2×10⁰
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("NFE")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
    axes[0].yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    axes[0].yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    written.append(save_figure(plt, fig, axes, f"{prefix}-nfe.png"))

    curve = work.curve_rows()
    curve_v = plotted_curve(work.curve_rows(CURVE_V_KEY))
    if curve or curve_v:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        if curve:
            kimg = [r["kimg"] for r in curve]
            axes[0].plot(kimg, [r["teacher_fid"] for r in curve], "o-", label="SFD, 2 NFE")
            axes[1].plot(kimg, [r["psnr"] for r in curve], "o-", label="SFD, 2 NFE")
            fig.suptitle(f"SFD-2 distillation: {curve[-1]['distill_s'] / 60:.0f} min for {kimg[-1]} kimg on "
                         f"{curve[-1]['machine']}", fontsize=10)
        for x, style, axis in (("kimg", "s-", "all kimg"), ("nfe_kimg", "s:", f"its {CURVE_V_NFE}-NFE kimg")):
            if curve_v:
                kv, label = [r[x] for r in curve_v], f"SFD-v, {CURVE_V_NFE} NFE (x: {axis})"
                axes[0].plot(kv, [r["teacher_fid"] for r in curve_v], style, color="C2", label=label)
                axes[1].plot(kv, [r["psnr"] for r in curve_v], style, color="C2", label=label)
        written.append(finish_curve_figure(plt, fig, axes, rows, f"{prefix}-curve.png"))
    curves_2 = stage2_curves(work)
    if curves_2:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for i, (start, points) in enumerate(curves_2):
            kimg, last = [r["kimg"] for r in points], points[-1]
            label = f"from {start}: {format_minutes(last['distill_s'])} for {last['kimg']:.0f} kimg"
            for ax, metric in zip(axes, ("teacher_fid", "psnr")):
                ax.plot(kimg, [r[metric] for r in points], "^-", color=f"C{4 + i}", label=label)
        fig.suptitle(f"SFD second stage at {CURVE_2_NFE} NFE on {curves_2[-1][1][-1]['machine']}", fontsize=10)
        written.append(finish_curve_figure(plt, fig, axes, rows, f"{prefix}-curve2.png"))
    for path in written:
        print(f"wrote {path}", flush=True)
    return written


def finish_curve_figure(plt, fig, axes, rows, path):
    """A distillation curve's axes (teacher-FID, PSNR against kimg) with DPM-Solver++(3M)-5 as the line to beat."""
    import matplotlib.ticker

    base = [r for r in rows if r["key"] == "dpmpp5"]
    if base:
        axes[0].axhline(base[0]["teacher_fid"], color="gray", linestyle="--", label="DPM-Solver++(3M), 5 NFE")
        axes[1].axhline(base[0]["psnr"], color="gray", linestyle="--", label="DPM-Solver++(3M), 5 NFE")
    axes[0].set_yscale("log")
    axes[0].yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    axes[0].yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    axes[0].set_ylabel("teacher-FID")
    axes[1].set_ylabel("PSNR (dB)")
    for ax in axes:
        ax.set_xlabel("distillation kimg")
        ax.grid(True, alpha=0.3)
    return save_figure(plt, fig, axes, path)


if __name__ == "__main__":
    main()
