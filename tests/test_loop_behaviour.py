"""What the real training loop feeds its networks and optimizer (issue 13, items 3-6, 13, 15, 16, 18, 19).

Each test runs `training_loop(...)` (or sample.py's entry point) on a tiny CPU network and records, through hooks on
the networks the loop loads, what actually reaches them: sigma, inputs, step conditions, guidance, gradients and the
lr Adam uses. Nothing here re-implements the loop.
"""

import glob
import os
import random

import pytest
import torch

import solvers
import training.training_loop as loop
from tests.conftest import run_loop as run  # the loop from Python, as train.py runs it (run_dir made first)
from training.training_loop import draw_sfdv_num_steps, training_loop


class Recorder:
    """Hooks every network `training_loop` loads. deepcopy carries the hooks (plain functions, shared, not copied) to
    the teacher; `module.training` tells the two apart (student: train mode, teacher: eval mode)."""

    def __init__(self, monkeypatch, grads=False):
        self.calls = calls = []
        real = loop.load_network

        def before(module, args, kwargs):
            x, sigma = args[0], args[1]
            step = kwargs.get("step_condition")
            calls.append(dict(
                role="student" if module.training else "teacher", x=x.detach().clone(),
                x_requires_grad=x.requires_grad, sigma=float(torch.as_tensor(sigma).reshape(-1)[0]),
                step_condition=None if step is None else sorted(set(torch.as_tensor(step).reshape(-1).tolist())),
                guidance_rate=getattr(module, "guidance_rate", None),
                unconditional=kwargs.get("unconditional_condition") is not None))

        def after(module, args, kwargs, output):
            call = calls[-1]
            call["D"] = output.detach().clone()
            if grads and output.requires_grad:
                output.register_hook(lambda g: call.__setitem__("grad_D", g.detach().clone()))

        def loading(*args, **kwargs):
            loaded = real(*args, **kwargs)
            loaded.net.register_forward_pre_hook(before, with_kwargs=True)
            loaded.net.register_forward_hook(after, with_kwargs=True)
            return loaded

        monkeypatch.setattr(loop, "load_network", loading)

    def role(self, role):
        return [c for c in self.calls if c["role"] == role]


def euler(x, t_cur, t_next, denoised):
    return x + (t_next - t_cur) * ((x - denoised) / t_cur)


def afs_euler(x, t_cur, t_next):
    return x + (t_next - t_cur) * (x / (1 + t_cur ** 2) ** 0.5)


def t_steps(num_steps):
    return solvers.get_schedule(num_steps, 0.006, 80.0, schedule_type="polynomial", schedule_rho=7.0).tolist()


def assert_close(got, expected, what, rel=1e-5):
    err, scale = float((got - expected).abs().max()), float(expected.abs().max())
    assert err <= rel * scale, f"{what}: max|got - expected| = {err:.3e} > {rel:g} * {scale:.3e}"


# ---------------------------------------------------------------------------------------------------------------------
# 3, 5: where each student step and the teacher start.


def test_each_student_step_starts_from_its_own_detached_output(tiny_teacher_pkl, monkeypatch):
    rec = Recorder(monkeypatch)
    run(tiny_teacher_pkl[0], num_steps=5, afs=True)  # one iteration: AFS step, then three network steps
    t = t_steps(5)
    teacher, student = rec.role("teacher"), rec.role("student")
    assert [c["sigma"] for c in student] == pytest.approx(t[1:4], rel=1e-6)
    # Step 0 (AFS) starts from latents * t_0, the point the teacher also starts from.
    assert_close(student[0]["x"], afs_euler(teacher[0]["x"], t[0], t[1]), "input of step 1 vs AFS step from x_0")
    for i in range(1, len(student)):
        prev = student[i - 1]
        own = euler(prev["x"], t[i], t[i + 1], prev["D"])
        assert_close(student[i]["x"], own, f"input of step {i + 1} vs the student's own step {i} output", rel=1e-6)
    assert not any(c["x_requires_grad"] for c in student), "a student step started from a non-detached output"


def test_first_stage_teacher_runs_without_afs_from_sigma_max(tiny_teacher_pkl, monkeypatch):
    rec = Recorder(monkeypatch)
    run(tiny_teacher_pkl[0], num_steps=4, M=3, afs=True)
    teacher = rec.role("teacher")
    t_teacher = t_steps(13)  # (M+1)(N-1)+1 teacher points
    # Without AFS the teacher's first call is the network at sigma_max on the latents (12 calls for 13 points).
    assert len(teacher) == 12
    assert [c["sigma"] for c in teacher] == pytest.approx(t_teacher[:12], rel=1e-6)
    assert teacher[0]["sigma"] == pytest.approx(80.0)
    # ... on the very latents the student starts from: the student's first network input is the AFS step of them.
    first_student = rec.role("student")[0]
    assert_close(first_student["x"], afs_euler(teacher[0]["x"], 80.0, t_steps(4)[1]), "teacher x_0 vs student x_0")


# ---------------------------------------------------------------------------------------------------------------------
# 4: the loss.


def test_sfd_loss_is_l1_summed_over_elements_and_averaged_over_the_batch(tiny_teacher_pkl, monkeypatch):
    """The gradient reaching the student's denoiser output is d|out - target|/dD / batch = sign(out - target) ·
    (t_cur - t_next) / (t_cur · batch): unit magnitude everywhere, which no L2 (or mean-reduced) loss gives."""
    rec = Recorder(monkeypatch, grads=True)
    trajectories = []
    real = solvers.SOLVERS["dpmpp"]
    monkeypatch.setitem(solvers.SOLVERS, "dpmpp", lambda *a, **k: trajectories.append(real(*a, **k)) or
                        trajectories[-1])
    run(tiny_teacher_pkl[0], num_steps=4, M=3, afs=True, batch_size=4)
    t = t_steps(4)
    student = rec.role("student")
    assert len(student) == 2 and len(trajectories) == 1
    for k, call in enumerate(student):
        i = k + 1  # student step index (step 0 is the AFS step)
        out = euler(call["x"], t[i], t[i + 1], call["D"])
        target = trajectories[0][4 * (i + 1)]  # teacher point (M+1)(i+1) lines up with student point i+1
        expected = torch.sign(out - target) * (t[i] - t[i + 1]) / (t[i] * 4)
        assert_close(call["grad_D"], expected, f"gradient at the denoiser output, step {i}", rel=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# 6: the learning-rate drop.


def test_lr_drops_tenfold_at_half_of_total_kimg(tiny_teacher_pkl, monkeypatch):
    used = []
    real_step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])  # the lr this very step applies
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    lr = 2e-4
    run(tiny_teacher_pkl[0], num_steps=3, afs=True, total_kimg=0.024, lr=lr)  # 6 iterations of 4, 1 step each
    # As the paper's loop: after an iteration, once cur_nimg/1000 >= total_kimg/2 (cur_nimg counted before that
    # iteration): iterations 0-3 run at lr (the check after iteration 3 sees 12 images = half), 4-5 at lr/10.
    assert used == pytest.approx([lr] * 4 + [lr / 10] * 2, rel=1e-12), used


def test_progress_bar_ends_at_the_total_when_the_last_batch_overshoots_it(tiny_teacher_pkl, monkeypatch):
    bars = []
    real_init = loop.TickLog.__init__

    def keeping(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        bars.append(self.bar)

    monkeypatch.setattr(loop.TickLog, "__init__", keeping)
    run(tiny_teacher_pkl[0], num_steps=3, afs=True, total_kimg=0.010, progress=True)  # 3 batches of 4: 12 images
    assert bars[0] is not None and bars[0].n == pytest.approx(0.010, abs=1e-12), bars[0].n  # not 0.012 of 0.010


@pytest.mark.parametrize("total_kimg, cur_nimg, shown", [(2000, 1_012_345, "1012/2000 kimg"),
                                                         (50, 12_345, "12.3/50 kimg"),
                                                         (0.01, 8, "0.008/0.01 kimg")])
def test_progress_bar_shows_the_count_in_fixed_decimals_for_its_total(total_kimg, cur_nimg, shown):
    log = loop.TickLog(3, "cpu", total_kimg, cur_nimg, None, 0.0, progress=True)
    try:
        assert shown in str(log.bar), str(log.bar)  # not "1.01e+03/2000" past 1000 kimg
    finally:
        log.bar.close()


# ---------------------------------------------------------------------------------------------------------------------
# 13, 19: SFD-v's step counts.


def recorded_step_counts(monkeypatch):
    """The num_steps each sfd_iteration call of the loop runs, and the step condition its student receives."""
    counts = []
    real = loop.sfd_iteration

    def recording(student, optimizer, teacher, latents, schedule, *args, step_condition=None, **kwargs):
        counts.append((len(schedule.t_steps), sorted(set(step_condition.tolist()))))
        return real(student, optimizer, teacher, latents, schedule, *args, step_condition=step_condition, **kwargs)

    monkeypatch.setattr(loop, "sfd_iteration", recording)
    return counts


def test_sfdv_draws_num_steps_uniformly_from_4_to_7(tiny_teacher_pkl, monkeypatch):
    seed = 11
    draws = [draw_sfdv_num_steps(rng) for rng in [random.Random(seed)] for _ in range(400)]
    counts = {n: draws.count(n) for n in sorted(set(draws))}
    assert set(counts) == {4, 5, 6, 7}, counts  # both ends reached, nothing outside
    assert all(70 <= c <= 130 for c in counts.values()), counts  # ~100 each (fixed seed: deterministic)
    # That generator is the loop's: the same seed gives the loop's per-iteration step counts and step conditions.
    seen = recorded_step_counts(monkeypatch)
    run(tiny_teacher_pkl[0], use_step_condition=True, total_kimg=0.016, seed=seed)
    assert seen == [(n, [float(n)]) for n in draws[:4]], (seen, draws[:4])


def test_resumed_sfdv_run_restores_its_step_count_generator(tiny_teacher_pkl, monkeypatch, tmp_path):
    pkl = tiny_teacher_pkl[0]
    seen = recorded_step_counts(monkeypatch)
    common = dict(use_step_condition=True, seed=5, kimg_per_tick=0.004)
    run(pkl, total_kimg=0.012, run_dir=str(tmp_path / "straight"), **common)
    straight = [n for n, _ in seen]
    seen.clear()
    run(pkl, total_kimg=0.004, run_dir=str(tmp_path / "cut"), state_dump_ticks=1, **common)
    dump = glob.glob(str(tmp_path / "cut" / "training-state-*.pt"))
    assert len(dump) == 1
    run(pkl, total_kimg=0.012, run_dir=str(tmp_path / "cut"), resume_state=dump[0], **common)
    resumed = [n for n, _ in seen]
    assert straight[1:] != straight[:2], "pick a seed whose restarted draws differ, or the test cannot fail"
    assert resumed == straight, (resumed, straight)


# ---------------------------------------------------------------------------------------------------------------------
# 15: second stage from an SFD-v model.


def test_second_stage_teacher_runs_at_step_condition_of_its_teacher_schedule(tiny_teacher_pkl, monkeypatch, tmp_path):
    run(tiny_teacher_pkl[0], use_step_condition=True, run_dir=str(tmp_path / "first"))
    snapshot = glob.glob(str(tmp_path / "first" / "network-snapshot-*.safetensors"))[0]
    rec = Recorder(monkeypatch)
    run(snapshot, is_second_stage=True, num_steps=3, M=2, lpips=False, sampler_tea="euler")
    teacher, student = rec.role("teacher"), rec.role("student")
    # Euler over (M+1)(N-1)+1 = 7 points with the first stage's AFS: 5 network calls, all at step condition 7.
    conditions = [c["step_condition"] for c in teacher]
    assert len(teacher) == 5 and all(c == [7.0] for c in conditions), conditions
    assert len(student) == 1 and student[0]["step_condition"] == [3.0]  # the student: its own num_steps


# ---------------------------------------------------------------------------------------------------------------------
# 16: Stable Diffusion trains at guidance 1.


def test_sd_trains_at_guidance_one(tmp_path, monkeypatch):
    from models import BACKBONES
    from tests.latent_tiny import (TINY_SD, compvis_state, reference_parts, tiny_row, write_captions, write_ckpt,
                                   write_tokenizer)

    row = tiny_row("tiny_sd_loop", TINY_SD, file_name="v1-5-pruned-emaonly.ckpt", sigma_min=0.1)
    monkeypatch.setitem(BACKBONES, row.dataset_name, row)
    folder = tmp_path / "src" / row.dataset_name
    write_ckpt(str(folder / row.file_name), compvis_state(TINY_SD, reference_parts(TINY_SD, seed=11)))
    write_tokenizer(str(folder / "tokenizer"))
    write_captions(str(folder / "c.csv"))

    rec = Recorder(monkeypatch)
    unet_batches = []
    real = loop.load_network

    def with_unet_hook(*args, **kwargs):
        loaded = real(*args, **kwargs)
        loaded.net.model.diffusion_model.register_forward_pre_hook(lambda m, a: unet_batches.append(len(a[0])))
        return loaded

    monkeypatch.setattr(loop, "load_network", with_unet_hook)
    res = training_loop(dataset_name=row.dataset_name, cache_root=str(tmp_path / "src"), guidance_type="cfg",
                        guidance_rate=7.5, batch_size=2, total_kimg=0.002, num_steps=3, M=1, sampler_tea="euler",
                        schedule_type="discrete", device="cpu", progress=False, precision="fp32", seed=0)
    assert rec.calls and all(c["guidance_rate"] == 1.0 for c in rec.calls), {c["guidance_rate"] for c in rec.calls}
    assert not any(c["unconditional"] for c in rec.calls)  # no unconditional branch is fed ...
    assert unet_batches == [2] * len(rec.calls)  # ... or run: one U-Net pass of the batch per network call
    assert res.settings["guidance_rate"] == 7.5  # sampling uses the stored rate


# ---------------------------------------------------------------------------------------------------------------------
# 18: sampling an SFD-v snapshot.


@pytest.mark.parametrize("num_steps", [4, 5, 6, 7])
def test_sfdv_snapshot_samples_with_step_condition_num_steps(tmp_path, monkeypatch, num_steps):
    """sample.py's real path on an SFD-v snapshot (the one the paper's loop wrote, tests/data/reference)."""
    from click.testing import CliRunner

    import models
    import sample

    seen = []
    real = models.load_network

    def loading(*args, **kwargs):
        loaded = real(*args, **kwargs)
        loaded.net.register_forward_pre_hook(
            lambda m, a, k: seen.append((float(torch.as_tensor(a[1]).reshape(-1)[0]), k.get("step_condition"))),
            with_kwargs=True)
        return loaded

    monkeypatch.setattr(models, "load_network", loading)
    snapshot = os.path.join(os.path.dirname(__file__), "data", "reference", "paper-snapshot",
                            "sfdv-network-snapshot-000001.pkl")
    r = CliRunner().invoke(sample.main, ["--model_path", snapshot, "--seeds", "0-1", "--num_steps", str(num_steps),
                                         "--outdir", str(tmp_path), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    # AFS replaces the first of the num_steps - 1 Euler steps; every network call carries num_steps.
    assert [s for s, _ in seen] == pytest.approx(t_steps(num_steps)[1:-1], rel=1e-6)
    assert [sorted(set(torch.as_tensor(c).reshape(-1).tolist())) for _, c in seen] == [[num_steps]] * (num_steps - 2)


def test_resume_with_another_rank_count_says_that_random_streams_restart(tiny_teacher_pkl, tmp_path, capsys):
    pkl = tiny_teacher_pkl[0]
    run(pkl, total_kimg=0.004, run_dir=str(tmp_path / "cut"), state_dump_ticks=1, kimg_per_tick=0.004, seed=2)
    dump = glob.glob(str(tmp_path / "cut" / "training-state-*.pt"))[0]
    state = torch.load(dump, weights_only=False)
    state["rank_rng"] = state["rank_rng"] * 2  # as if written by a 2-rank run
    torch.save(state, dump)
    capsys.readouterr()
    run(pkl, total_kimg=0.008, run_dir=str(tmp_path / "cut"), resume_state=dump, kimg_per_tick=0.004, seed=2)
    assert "written by 2 ranks and this run has 1" in capsys.readouterr().out


@pytest.mark.parametrize("teacher_batch, expected", [(None, 4), (2, 2), (8, 8)])
def test_teacher_batch_sets_the_teacher_call_size(tiny_teacher_pkl, monkeypatch, teacher_batch, expected):
    rec = Recorder(monkeypatch)
    run(tiny_teacher_pkl[0], batch_size=8, batch_gpu=4, teacher_batch=teacher_batch, total_kimg=0.008)
    sizes = {len(c["x"]) for c in rec.role("teacher")}
    assert sizes == {expected}, sizes
    assert {len(c["x"]) for c in rec.role("student")} == {4}


# ---------------------------------------------------------------------------------------------------------------------
# The optimizer the loop builds (issue 50).

# The paper's train.py: optimizer_kwargs = Adam with lr=--lr, betas=[0.9, 0.999], eps=1e-8; everything else is
# torch's default (no weight decay, no AMSGrad).
PAPER_ADAM = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, maximize=False)


def test_student_is_updated_by_adam_with_the_papers_settings(tiny_teacher_pkl, monkeypatch):
    steps = []
    real_step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        params = [p for group in self.param_groups for p in group["params"]]
        before = [p.detach().double().clone() for p in params]
        grads = [None if p.grad is None else p.grad.detach().double().clone() for p in params]
        out = real_step(self, *args, **kwargs)
        steps.append(dict(cls=type(self), groups=[{k: v for k, v in g.items() if k != "params"} for g in
                                                  self.param_groups], ids=[id(p) for p in params], before=before,
                          grads=grads, after=[p.detach().double().clone() for p in params]))
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    lr = 1e-3
    result = run(tiny_teacher_pkl[0], num_steps=4, afs=True, lr=lr)  # one iteration: two updates (AFS has none)
    assert len(steps) == 2 and all(s["cls"] is torch.optim.Adam for s in steps)
    for group in steps[0]["groups"]:
        assert {k: group[k] for k in PAPER_ADAM} == PAPER_ADAM and group["lr"] == lr, group
    assert steps[0]["ids"] == [id(p) for p in result.net.parameters()], "Adam must hold the student's parameters"

    # Both updates by hand (Kingma & Ba, Alg. 1, with bias correction), from the gradients that reached Adam.
    b1, b2 = PAPER_ADAM["betas"]
    eps = PAPER_ADAM["eps"]
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in steps[0]["before"]]
    checked = 0
    for t, step in enumerate(steps, start=1):
        for k, (p0, g, p1) in enumerate(zip(step["before"], step["grads"], step["after"])):
            if g is None:
                assert torch.equal(p0, p1)
                continue
            m, v = moments[k]
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            moments[k] = (m, v)
            expected = p0 - lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
            err = float((p1 - expected).abs().max())
            assert err <= 1e-6 * lr + 1e-7 * float(p0.abs().max()), f"update {t} of parameter {k}: error {err:.2e}"
            checked += int(g.abs().gt(0).sum())
    assert checked > 1000  # the updates exercised many non-zero gradients


# ---------------------------------------------------------------------------------------------------------------------
# The second stage's LPIPS term (issue 50).


class FakeLPIPS(torch.nn.Module):
    """Stands in for piq.LPIPS (no VGG download): a per-sample distance that depends on both images, recording how
    it was built and what it was given."""

    built = []

    def __init__(self, **kwargs):
        super().__init__()
        FakeLPIPS.built.append(kwargs)

    def forward(self, a, b):
        return ((a - b) ** 2).mean(dim=(1, 2, 3)) * 3.0


@pytest.fixture
def fake_piq(monkeypatch):
    import sys
    import types

    FakeLPIPS.built = []
    monkeypatch.setitem(sys.modules, "piq", types.SimpleNamespace(LPIPS=FakeLPIPS))
    return FakeLPIPS.built


@pytest.fixture(scope="module")
def first_stage_snapshot(tiny_teacher_pkl, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("first-stage"))
    run(tiny_teacher_pkl[0], num_steps=4, run_dir=run_dir)
    return glob.glob(os.path.join(run_dir, "network-snapshot-*.safetensors"))[0]


def test_second_stage_backpropagates_l1_plus_lpips_at_its_last_step(first_stage_snapshot, fake_piq, monkeypatch):
    rec = Recorder(monkeypatch, grads=True)
    batch = 4
    run(first_stage_snapshot, is_second_stage=True, num_steps=4, M=1, batch_size=batch, lpips=True)
    assert fake_piq == [dict(replace_pooling=True, reduction="none")]  # the paper's piq.LPIPS settings
    t, t_teacher = t_steps(4), t_steps(7)  # (M+1)(N-1)+1 teacher points
    student, teacher = rec.role("student"), rec.role("teacher")
    assert [c["sigma"] for c in student] == pytest.approx(t[1:3], rel=1e-6)  # step 0 is the AFS step
    # The teacher's last point, the target of the student's last step, from its last network call.
    last = teacher[-1]
    target = euler(last["x"], last["sigma"], t_teacher[-1], last["D"])

    # Earlier steps: L1 only, |dLoss/dD| = (t_i - t_{i+1}) / (t_i * batch) everywhere.
    first = student[0]
    assert_close(first["grad_D"].abs(), torch.full_like(first["grad_D"], (t[1] - t[2]) / (t[1] * batch)),
                 "gradient of a step before the last")
    # The last step: L1 map + the batch-mean LPIPS (of 224² bilinear resizes) added to every element, summed and
    # divided by the batch; recomputed here with autograd from the student's output.
    call = student[-1]
    out = euler(call["x"], t[2], t[3], call["D"]).requires_grad_(True)
    resize = lambda z: torch.nn.functional.interpolate(z, size=(224, 224), mode="bilinear", align_corners=False)  # noqa: E731
    lpips = FakeLPIPS()(resize(out), resize(target))
    loss = ((out - target).abs() + lpips.mean()).sum() / batch
    (grad_out,) = torch.autograd.grad(loss, out)
    assert_close(call["grad_D"], grad_out * (t[2] - t[3]) / t[2], "gradient at the last step", rel=1e-4)


@pytest.mark.parametrize("stage", ["first", "second without --lpips"])
def test_no_lpips_term_outside_a_second_stage_that_asks_for_it(tiny_teacher_pkl, first_stage_snapshot, fake_piq,
                                                               stage):
    if stage == "first":
        run(tiny_teacher_pkl[0], num_steps=4, lpips=True)
    else:
        run(first_stage_snapshot, is_second_stage=True, num_steps=4, M=1, lpips=False)
    assert fake_piq == []


# ---------------------------------------------------------------------------------------------------------------------
# Which weights the latent teacher and student start from (issue 50).


def test_latent_teacher_runs_on_the_ema_weights_and_the_student_on_the_live_ones(tmp_path, monkeypatch):
    """As the paper's code: a CompVis checkpoint with an EMA gives the teacher the EMA weights (LDM samples with
    them) and the student the live ones. Read off the networks at their first forward call in the real loop."""
    from models import BACKBONES
    from tests.latent_tiny import TINY_LDM, compvis_state, reference_parts, tiny_row, write_ckpt

    monkeypatch.setitem(BACKBONES, "tiny_ldm", tiny_row("tiny_ldm", TINY_LDM))
    live, ema = reference_parts(TINY_LDM, seed=8), reference_parts(TINY_LDM, seed=9)
    write_ckpt(str(tmp_path / "src" / "tiny_ldm" / "model.ckpt"), compvis_state(TINY_LDM, live, ema_parts=ema))
    first_call = {}
    real = loop.load_network

    def loading(*args, **kwargs):
        loaded = real(*args, **kwargs)

        def before(module, args):
            role = "student" if module.training else "teacher"
            first_call.setdefault(role, {k: v.clone() for k, v in module.state_dict().items()})

        loaded.net.model.diffusion_model.register_forward_pre_hook(before)  # deepcopy carries it to the teacher
        return loaded

    monkeypatch.setattr(loop, "load_network", loading)
    training_loop(dataset_name="tiny_ldm", batch_size=2, total_kimg=0.002, device="cpu", progress=False,
                  schedule_type="discrete", schedule_rho=1, sampler_tea="euler", M=1, guidance_type="uncond",
                  cache_root=str(tmp_path / "src"))
    for role, source in (("student", live), ("teacher", ema)):
        expected = source["unet"].state_dict()
        assert all(torch.equal(first_call[role][k], expected[k]) for k in expected), role


def test_non_finite_gradients_reach_adam_as_zero_and_plus_minus_1e5(tiny_teacher_pkl, monkeypatch):
    """design §5: gradients go through nan_to_num (nan → 0, ±inf → ±1e5) before the optimizer step."""
    real = loop.load_network

    def loading(*args, **kwargs):
        loaded = real(*args, **kwargs)

        def poison(grad):
            grad = grad.clone()
            grad.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), float("-inf")])
            return grad

        def arm(module, args):  # the student's first call: its parameters now require gradients
            first = next(module.parameters())
            if module.training and not getattr(first, "_poisoned", False):
                first.register_hook(poison)
                first._poisoned = True

        loaded.net.register_forward_pre_hook(arm)
        return loaded

    monkeypatch.setattr(loop, "load_network", loading)
    seen = []
    real_step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        grad = self.param_groups[0]["params"][0].grad
        seen.append(grad.view(-1)[:4].clone())
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    result = run(tiny_teacher_pkl[0], num_steps=3, afs=True)
    assert len(seen) == 1
    assert seen[0][:3].tolist() == [0.0, 1e5, -1e5] and torch.isfinite(seen[0][3])
    assert all(torch.isfinite(p).all() for p in result.net.parameters())
