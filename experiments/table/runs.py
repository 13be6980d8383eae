"""The distillation runs behind the table's rows: what their folders hold (stats.jsonl's times, kimg and machine;
snapshots; training-state dumps), running or resuming them, and the models they give to score."""

import glob
import hashlib
import json
import os
import random
import re

from dnnlib.util import write_atomic
from models import load_network
from torch_utils.cli import CommandError
from training import state as train_state
from training.training_loop import draw_sfdv_num_steps, training_loop

SFDV_SEED, STAGE2_SEED = 10, 11  # training seeds (SFD-N uses N): they fix SFD-v's sequence of student lengths


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
    pauses.jsonl when it has one: a line per pause, written by hand by whoever stopped the process, {"kimg": the kimg
    that tick ends at, "seconds": how long, and whatever says when and why}. The loop's wall clock cannot tell a
    stopped process from a slow one; the committed table's notes name the pauses its times leave out."""
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


def curve_interval(kimg, first_tick, every_ticks, final):
    """The interval of `every_ticks` ticks that holds the tick ending at `kimg` (`curve_points`); a finished run's
    final snapshot (`final`: its kimg) has one of its own."""
    slot = (round(kimg / first_tick) - 1) // every_ticks
    return slot + 0.5 if round(kimg, 3) == final else slot


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
    first = stats[0]["kimg"]
    taken = {curve_interval(k, first, every_ticks, final) for k in scored}
    candidates = {}
    for name in os.listdir(run_dir):
        m = re.fullmatch(r"(training-state-|network-snapshot-)(\d+)\.(pt|safetensors)", name)
        if m:
            kimg, path = round(tick_kimg(run_dir, int(m.group(2))), 3), os.path.join(run_dir, name)
            interval = curve_interval(kimg, first, every_ticks, final)
            if interval > 0 and interval not in taken:
                candidates.setdefault(interval, []).append((m.group(3) == "pt", kimg, path))
    return [min(c)[1:] for _, c in sorted(candidates.items())]


def snapshots_of(run_dir):
    """[(kimg, path)] of a run's snapshots, oldest first."""
    found = []
    for name in os.listdir(run_dir):
        m = re.fullmatch(r"network-snapshot-(\d+)\.safetensors", name)
        if m:
            found.append((int(m.group(1)), os.path.join(run_dir, name)))
    return sorted(found)


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
    """A distilled model to score: a finished run's snapshot (`path`), or a stopped run's latest training-state dump
    (`dump`, loaded onto `base`: the network the run started from and whether it is step-conditioned).

    budget: the run's kimg budget; seconds: its wall time so far; kimg: where a stopped run stands (None: finished);
    machine: where it was distilled; run: a stopped model's run_id."""

    def __init__(self, budget, seconds, machine, device, path=None, kimg=None, run=None, dump=None, base=None):
        self.budget, self.seconds, self.machine, self.kimg, self.path = budget, seconds, machine, kimg, path
        self.run, self.device, self.dump, self.base, self._net = run, device, dump, base, None

    def net(self):
        if self._net is None and self.dump is None:
            self._net = load_network(model_path=self.path, device=self.device).net
        elif self._net is None:
            model_path, conditioned = self.base
            net = load_network(model_path=model_path, device=self.device, use_step_condition=conditioned).net
            net.load_state_dict(self.dump["net"])
            self._net = net.eval().requires_grad_(False)
        return self._net

    @classmethod
    def from_dump(cls, dump_path, model_path, conditioned, budget, device):
        """The student of an unfinished run's dump, on the network the run started from."""
        run_dir = os.path.dirname(dump_path)
        dump = train_state.load_training_state(dump_path)
        at = dump["cur_nimg"] / 1000
        return cls(budget, distillation_seconds(run_dir, at), run_machine(run_dir), device, kimg=at,
                   run=run_id(run_dir), dump=dump, base=(model_path, conditioned))


def sfdv_snapshot(run_dir, kimg, budget, device):
    """The SFD-v model a second stage starts from with `--stage2_from`: the snapshot its run wrote at `kimg`, with
    the run's time up to it."""
    found = dict(snapshots_of(run_dir)) if os.path.isdir(run_dir) else {}
    if kimg not in found:
        have = ", ".join(str(k) for k in sorted(found)) or "none yet"
        raise CommandError(f"--stage2_from: the SFD-v run {run_dir} has no snapshot at {kimg} kimg (it has: {have}); "
                           "pass one it has, or distil SFD-v further first (--rows sfdv)")
    return Trained(budget, distillation_seconds(run_dir, tick_kimg(run_dir, kimg)), run_machine(run_dir), device,
                   path=found[kimg])


class Distillations:
    """The table's distillations in a work folder, each to its row's budget (`budgets`), with the settings they all
    share (batch, tick, dump interval, device, `speed`: channels-last and compile). With `partial` they train
    nothing: an unfinished run gives its latest training-state dump."""

    def __init__(self, work, budgets, batch, tick, dump_every, partial, device, speed):
        self.work, self.budgets, self.batch, self.tick, self.dump_every = work, budgets, batch, tick, dump_every
        self.partial, self.device, self.speed = partial, device, speed

    def run_dir(self, key, from_kimg=None):
        return self.work.run_dir(key, self.budgets[key], from_kimg)

    def trained(self, key, model_path, seed, conditioned=False, run_dir=None, **options):
        """The row's distilled model: its run (or resumption) to the budget, or, with `partial` and an unfinished
        run, its latest training-state dump without training. None when `partial` finds nothing to score."""
        run_dir, budget = run_dir or self.run_dir(key), self.budgets[key]
        if self.partial and not os.path.exists(os.path.join(run_dir, "done.json")):
            dump = train_state.latest_dump(run_dir) if os.path.isdir(run_dir) else None
            if dump is None:
                print(f"--partial: {key} has no training-state dump in {run_dir}; row skipped", flush=True)
                return None
            return Trained.from_dump(dump, model_path, conditioned, budget, self.device)
        snap, secs = distil(run_dir, model_path, budget, self.batch, self.device, seed, self.tick, self.dump_every,
                            **(dict(use_step_condition=True) if conditioned else {}), **options, **self.speed)
        return Trained(budget, secs, run_machine(run_dir), self.device, path=snap)
