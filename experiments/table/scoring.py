"""Scoring the table's rows: images sampled from the teacher or a student on the table's seeds, scored by
teacher-FID, data-FID and PSNR to the endpoint, and each missing row of a work folder made (distilling with runs.py
where a row needs a model) and kept."""

import os
import time

import torch

import solvers
from metrics.detectors import compute_features, load_detector
from metrics.frechet import FeatureStats, frechet_distance, load_ref
from metrics.images import psnr_uint8
from models import load_network
from sample import SeedGenerators, to_uint8
from torch_utils.cli import machine_name
from training.precision import maybe_compile, prepare_module

from .rows import CURVE_2_KEY, CURVE_2_NFE, CURVE_KEY, CURVE_V_KEY, CURVE_V_NFE, SFDV_NFES
from .runs import (SFDV_SEED, STAGE2_SEED, Trained, curve_points, distillation_seconds, nfe_share_kimg, run_id,
                   sfdv_snapshot, snapshots_of, tick_kimg)

# The first stage's distillation (launch.sh's CIFAR-10 recipe): an M=3 DPM-Solver++(3M) teacher, AFS.
FIRST_STAGE = dict(M=3, afs=True, sampler_tea="dpmpp", max_order=3)
# The second stage, from the SFD-v model: M=2, LPIPS off (offline).
SECOND_STAGE = dict(M=2, afs=True, is_second_stage=True, lpips=False)


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


class Sampling:
    """The table's images: seeds 0..num-1 in batches of `batch`, from the teacher or a student (channels-last and
    torch.compile on request: the same numbers)."""

    def __init__(self, teacher_path, num, batch, device, channels_last, compile_):
        loaded = load_network(model_path=teacher_path, device=device)
        self.sig = dict(sigma_min=loaded.settings["sigma_min"], sigma_max=loaded.settings["sigma_max"])
        self.seeds, self.batch, self.device = list(range(num)), batch, device
        self.channels_last, self.compile = channels_last, compile_
        self.teacher, self.teacher_fast = loaded.net, self.fast(loaded.net)

    def fast(self, net):
        return maybe_compile(prepare_module(net, channels_last=self.channels_last), self.compile)

    def teacher_images(self, sampler, num_steps, **kwargs):
        return run_sampler(self.teacher, sampler, self.seeds, self.batch, self.device, fast=self.teacher_fast,
                           num_steps=num_steps, **kwargs, **self.sig)

    def student_images(self, student, num_steps, step_condition=None):
        return run_sampler(student, "euler", self.seeds, self.batch, self.device, fast=self.fast(student),
                           num_steps=num_steps, afs=True, step_condition=step_condition, **self.sig)


class RowMaker:
    """Makes the rows a work folder lacks: samples (`Sampling`), distils (`runs.Distillations`), scores with the
    detector and the two reference statistics, and adds each row to the folder as it is done."""

    def __init__(self, work, sampling, runs, detector, teacher_ref, data_ref, reference_steps):
        self.work, self.sampling, self.runs, self.reference_steps = work, sampling, runs, reference_steps
        # The endpoint is made on first use, so that distillations start at once.
        self.score = Scorer(load_detector(detector, device=runs.device), load_ref(teacher_ref), load_ref(data_ref),
                            runs.device, self.endpoint)
        self.machine, self.num = machine_name(runs.device), len(sampling.seeds)

    def make_endpoint(self):
        t0 = time.time()
        images = self.sampling.teacher_images("heun", self.reference_steps)
        print(f"endpoint: Heun {solvers.nfe_of('heun', self.reference_steps)} NFE in {time.time() - t0:.0f}s",
              flush=True)
        return images

    def endpoint(self):
        return self.work.endpoint(self.make_endpoint)

    def has(self, key, nfe, model=None, from_kimg=None):
        """Whether the folder holds the row (for a distilled model: at its budget, and where it stopped)."""
        if model is None:
            return self.work.has(key, nfe, from_kimg=from_kimg)
        return self.work.has(key, nfe, model.budget, model.kimg, model.run, from_kimg)

    def add(self, key, name, nfe, images, model=None, from_kimg=None):
        """Score the images into a row. model: the row's distilled model (a runs.Trained); a stopped one's rows are
        kept apart by its kimg. from_kimg: the SFD-v snapshot a second stage started from (`--stage2_from`)."""
        row = dict(key=key, method=name, nfe=nfe, **self.score(images), machine=self.machine, num=self.num)
        if from_kimg is not None:
            row.update(from_kimg=from_kimg)
        if model is not None:
            row.update(budget_kimg=model.budget, distill_s=model.seconds, distill_machine=model.machine)
            if model.kimg is not None:
                row.update(kimg=model.kimg, run=model.run)
        self.work.add_row(row)

    def teacher_rows(self, wanted, thresholding):
        """The endpoint, DDIM (Euler) at 10 and 50 NFE, DPM-Solver++(3M) at 5 and 10 NFE."""
        ref_nfe = solvers.nfe_of("heun", self.reference_steps)
        if "ref" in wanted and not self.has("ref", ref_nfe):
            self.add("ref", "Teacher, Heun (endpoint)", ref_nfe, self.endpoint())
        for key, name, nfe, sampler, kwargs in (
                ("ddim10", "DDIM (Euler)", 10, "euler", {}), ("ddim50", "DDIM (Euler)", 50, "euler", {}),
                ("dpmpp5", "DPM-Solver++(3M)", 5, "dpmpp", dict(max_order=3, thresholding=thresholding)),
                ("dpmpp10", "DPM-Solver++(3M)", 10, "dpmpp", dict(max_order=3, thresholding=thresholding))):
            if key in wanted and not self.has(key, nfe):
                self.add(key, name, nfe, self.sampling.teacher_images(sampler, nfe + 1, **kwargs))

    def student_row(self, key, name, nfe, model, num_steps, step_condition=None, from_kimg=None):
        if not self.has(key, nfe, model, from_kimg):
            self.add(key, name, nfe, self.sampling.student_images(model.net(), num_steps, step_condition), model,
                     from_kimg)

    def sfd_curve_pending(self, nfe):
        """Whether the finished SFD-2 run has snapshots its curve has not scored yet."""
        run_dir = self.runs.run_dir(CURVE_KEY)
        return os.path.isdir(run_dir) and any(not self.work.has("curve", nfe, kimg=at)
                                              for at, _ in snapshots_of(run_dir))

    def sfd_rows(self, wanted, teacher_path, first_stage, curve_every):
        """SFD at 2..5 NFE, a model each; SFD-2's run snapshots every `curve_every` ticks, each a curve point."""
        for nfe in (2, 3, 4, 5):
            key = f"sfd{nfe}"
            done = self.work.has(key, nfe, self.runs.budgets[key])
            if key not in wanted or (done and not (key == CURVE_KEY and self.sfd_curve_pending(nfe))):
                continue
            model = self.runs.trained(key, teacher_path, nfe, num_steps=nfe + 2,
                                      snapshot_ticks=curve_every if key == CURVE_KEY else None, **first_stage)
            if model is None:
                continue
            if key == CURVE_KEY and model.kimg is None:
                self.score_sfd_curve(nfe)
            self.student_row(key, "SFD", nfe, model, nfe + 2)

    def score_sfd_curve(self, nfe):
        run_dir = self.runs.run_dir(CURVE_KEY)
        for at, path in snapshots_of(run_dir):
            if not self.work.has("curve", nfe, kimg=at):
                images = self.sampling.student_images(load_network(model_path=path, device=self.runs.device).net,
                                                      nfe + 2)
                self.work.add_row(dict(key="curve", method="SFD", nfe=nfe, kimg=at, **self.score(images),
                                       distill_s=distillation_seconds(run_dir, tick_kimg(run_dir, at)),
                                       machine=self.machine, num=self.num))

    def curve_todo(self, curve_key, run_dir, every, budget):
        """A run's curve points (snapshots, or dumps of a stopped run) in intervals not scored yet."""
        if not os.path.isfile(os.path.join(run_dir, "stats.jsonl")):
            return []
        run = run_id(run_dir)
        scored = [r["kimg"] for r in self.work.curve_rows(curve_key)
                  if r["budget_kimg"] == budget and r.get("run") == run]
        return curve_points(run_dir, every, scored)

    def sfdv_model(self, teacher_path, first_stage, curve_v_every):
        return self.runs.trained("sfdv", teacher_path, SFDV_SEED, conditioned=True, num_steps=4,
                                 snapshot_ticks=curve_v_every, **first_stage)

    def sfdv_rows(self, teacher_path, first_stage, curve_v_every):
        """SFD-v's one model at each NFE it was trained for; its run snapshots every `curve_v_every` ticks, each a
        point of its curve at CURVE_V_NFE."""
        run_dir, budget = self.runs.run_dir("sfdv"), self.runs.budgets["sfdv"]
        if (all(self.work.has("sfdv", n, budget) for n in SFDV_NFES)
                and not self.curve_todo(CURVE_V_KEY, run_dir, curve_v_every, budget)):
            return
        model = self.sfdv_model(teacher_path, first_stage, curve_v_every)
        if model is None:
            return
        for nfe in SFDV_NFES:
            self.student_row("sfdv", "SFD-v (one model)", nfe, model, nfe + 2, step_condition=nfe + 2)
        self.score_curve(CURVE_V_KEY, run_dir, curve_v_every, budget, teacher_path, True)

    def stage2_rows(self, teacher_path, first_stage, curve_v_every, lr2, curve_2_every, stage2_from):
        """The second stage at 1 NFE, from the finished SFD-v model or (`stage2_from`) its snapshot at that kimg; its
        run snapshots every `curve_2_every` ticks, each a point of its curve."""
        run_dir, budget = self.runs.run_dir("stage2", stage2_from), self.runs.budgets["stage2"]
        if (self.work.has("stage2", 1, budget, from_kimg=stage2_from)
                and not self.curve_todo(CURVE_2_KEY, run_dir, curve_2_every, budget)):
            return
        if stage2_from:
            model_v = sfdv_snapshot(self.runs.run_dir("sfdv"), stage2_from, self.runs.budgets["sfdv"], self.runs.device)
        else:
            model_v = self.sfdv_model(teacher_path, first_stage, curve_v_every)
        if model_v is None:
            return
        if model_v.kimg is not None:
            print("--partial: the second stage starts from the finished SFD-v model; row skipped", flush=True)
            return
        model = self.runs.trained("stage2", model_v.path, STAGE2_SEED, num_steps=3, **SECOND_STAGE, lr=lr2,
                                  snapshot_ticks=curve_2_every, run_dir=run_dir)
        if model is None:
            return
        model.seconds += model_v.seconds  # the second stage's cost includes the model it starts from
        name = "SFD second stage (from SFD-v" + (
            f" at {stage2_from} of {self.runs.budgets['sfdv']:g} kimg)" if stage2_from else ")")
        self.student_row("stage2", name, CURVE_2_NFE, model, 3, step_condition=3, from_kimg=stage2_from)
        self.score_curve(CURVE_2_KEY, run_dir, curve_2_every, budget, model_v.path, False, from_kimg=stage2_from)

    def score_curve(self, curve_key, run_dir, every, budget, model_path, conditioned, from_kimg=None):
        """Score a run's curve points not scored yet: SFD-v's (CURVE_V_KEY) at CURVE_V_NFE, with the kimg its run
        spent on that NFE's student length, or the second stage's (CURVE_2_KEY) at 1 NFE. A step-conditioned student
        is sampled at its own num_steps."""
        method, nfe = ("SFD-v", CURVE_V_NFE) if curve_key == CURVE_V_KEY else ("SFD second stage", CURVE_2_NFE)
        for at, path in self.curve_todo(curve_key, run_dir, every, budget):
            if path.endswith(".pt"):
                net = Trained.from_dump(path, model_path, conditioned, budget, self.runs.device).net()
            else:
                net = load_network(model_path=path, device=self.runs.device).net
            images = self.sampling.student_images(net, nfe + 2, step_condition=nfe + 2)
            if curve_key == CURVE_V_KEY:
                extra = dict(nfe_kimg=nfe_share_kimg(at, self.runs.batch, nfe + 2))
            else:
                extra = dict(from_kimg=from_kimg) if from_kimg else {}
            self.work.add_row(dict(key=curve_key, method=method, nfe=nfe, kimg=at, **self.score(images), **extra,
                                   budget_kimg=budget, distill_s=distillation_seconds(run_dir, at),
                                   machine=self.machine, num=self.num, run=run_id(run_dir)))
