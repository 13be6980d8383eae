"""SFD distillation on a tiny EDM-format teacher (CPU): outputs, loss definition, updates, SFD-v, second stage."""

import copy
import glob
import json
import os

import pytest
import torch
from click.testing import CliRunner

import dnnlib
import train
from tests.conftest import DEVICES, run_loop, torchrun
from training import sfd_loss
from training.training_loop import sfd_iteration

TINY_RUN = ["--batch", "4", "--total_kimg", "0.008", "--seed", "1", "--device", "cpu"]


def run_train(outdir, pkl, *args):
    result = CliRunner().invoke(train.main, ["--outdir", str(outdir), "--model_path", pkl, *TINY_RUN, *args])
    return result


def only_dir(pattern):
    dirs = sorted(glob.glob(pattern))
    assert len(dirs) == 1, dirs
    return dirs[0]


def test_short_run_writes_experiment_folder_and_numbers_increase(tmp_path, tiny_teacher_pkl):
    pkl, _ = tiny_teacher_pkl
    r1 = run_train(tmp_path, pkl)
    assert r1.exit_code == 0, r1.output
    run = only_dir(str(tmp_path / "00000-*"))
    # Name: {dataset}-{num_steps}-{nfe}-{sampler_tea}-{M}-{schedule}[-afs]
    assert os.path.basename(run) == "00000-tiny-edm-4-2-dpmpp-3-poly7.0-afs"
    for name in ("training_options.json", "log.txt", "stats.jsonl"):
        assert os.path.getsize(os.path.join(run, name)) > 0, name
    snaps = glob.glob(os.path.join(run, "network-snapshot-*.safetensors"))
    assert [os.path.basename(s) for s in snaps] == ["network-snapshot-000000.safetensors"]
    stats = [json.loads(line) for line in open(os.path.join(run, "stats.jsonl"))]
    assert stats[-1]["kimg"] == pytest.approx(0.008)
    assert set(stats[-1]["loss"]) == {"step0", "step1", "step2"}
    assert all(v >= 0 for v in stats[-1]["loss"].values())
    assert "sec_per_kimg" in stats[-1] and "peak_mem_gb" in stats[-1]
    opts = json.load(open(os.path.join(run, "training_options.json")))
    assert opts["num_steps"] == 4 and opts["M"] == 3 and opts["afs"] is True
    assert "fp16" not in opts and opts["precision"] == "fp32"  # what runs on the CPU, whatever --precision says

    from models import load_snapshot

    _, settings = load_snapshot(snaps[0])
    for key in ("dataset_name", "model_source", "num_steps", "M", "afs", "schedule_type", "schedule_rho",
                "sigma_min", "sigma_max", "use_step_condition", "sampler_tea", "max_order", "predict_x0",
                "lower_order_final", "is_second_stage", "guidance_type", "guidance_rate"):
        assert key in settings, key
    assert settings["num_steps"] == 4 and settings["afs"] is True and settings["sampler_tea"] == "dpmpp"

    r2 = run_train(tmp_path, pkl, "--desc", "again")
    assert r2.exit_code == 0, r2.output
    assert os.path.basename(only_dir(str(tmp_path / "00001-*"))) == "00001-tiny-edm-4-2-dpmpp-3-poly7.0-afs-again"


def test_dry_run_writes_nothing(tmp_path, tiny_teacher_pkl):
    pkl, _ = tiny_teacher_pkl
    r = run_train(tmp_path / "exps", pkl, "--dry-run")
    assert r.exit_code == 0, r.output
    assert '"num_steps": 4' in r.output and "Dry run" in r.output
    assert not os.path.exists(tmp_path / "exps")


@pytest.mark.parametrize("args, message", [
    (["--num_steps", "2"], "no network call"),
    (["--num_steps", "1", "--afs", "False"], "at least 2"),
    (["--max_order", "4"], "max_order must be an int in 1..3 for the dpmpp solver, got 4"),
    (["--sampler_tea", "ipndm", "--max_order", "5"], "max_order must be an int in 1..4 for the ipndm solver, got 5"),
    (["--sampler_tea", "rk45"], "rk45"),
    (["--schedule_type", "cosine"], "cosine"),
    (["--M", "-1"], "-1"),
    (["--batch", "6", "--batch-gpu", "4"], "divisible"),
    (["--model_path", "https://example.org/network.pkl"], "is a URL; download the file"),
])
def test_bad_options_fail_with_one_line(tmp_path, tiny_teacher_pkl, args, message):
    pkl, _ = tiny_teacher_pkl
    r = CliRunner().invoke(train.main, ["--outdir", str(tmp_path), "--model_path", pkl, "--device", "cpu", *args])
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert "Traceback" not in r.output
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("args, message", [
    # bad paths
    (["--outdir", "{tmp}/a-file"], "a-file is a file, not a folder"),
    (["--outdir", "{tmp}/a-file/runs"], "a-file is a file, so"),
    (["--model_path", "{tmp}/missing.pkl"], "no such file"),
    (["--captions", "{tmp}/missing.csv"], "no such file"),
    (["--resume", "{tmp}/missing.pt"], "no such file"),
    (["--resume", "7"], "no experiment folder"),
    # bad devices
    (["--device", "gpu"], "'gpu' is not a device"),
    (["--device", "mps"], "only cpu and cuda"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "--device"),
    # bad ranges
    (["--M", "-1"], "-1"),
    (["--batch", "0"], "0"),
    (["--total_kimg", "0"], "0"),
    # contradictory options
    (["--dataset_name", "fmnist", "--guidance_type", "cfg", "--guidance_rate", "7.5"], "fmnist has no guidance"),
    (["--guidance_rate", "7.5"], "needs --guidance_type=cfg"),
])
def test_bad_input_is_refused_before_any_work(tmp_path, tiny_teacher_pkl, monkeypatch, args, message):
    """One line, exit code 2, before the network loads, and nothing written."""
    from training import training_loop as loop_module

    pkl, _ = tiny_teacher_pkl
    (tmp_path / "a-file").write_text("x")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loop_module, "load_teacher", lambda *a, **k: pytest.fail("the network was loaded"))
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    base = ["--model_path", pkl, "--device", "cpu", "--batch", "4", "--total_kimg", "0.008"]
    r = CliRunner().invoke(train.main, base + args if "--resume" not in args else args)
    assert r.exit_code == 2, r.output
    error = [line for line in r.output.splitlines() if line.startswith("Error")]
    assert len(error) == 1 and message in error[0], r.output
    assert "Traceback" not in r.output and "Training options" not in r.output
    assert sorted(os.listdir(tmp_path)) == ["a-file"]


def test_guidance_on_a_network_without_it_is_refused_after_loading_without_a_folder(tmp_path, tiny_teacher_pkl):
    """An EDM pickle's kind is known once it loads: --guidance_type is refused then, before a folder or an options
    dump exists."""
    pkl, _ = tiny_teacher_pkl
    r = CliRunner().invoke(train.main, ["--outdir", str(tmp_path), "--model_path", pkl, *TINY_RUN,
                                        "--guidance_type", "uncond"])
    assert r.exit_code == 2 and "has no guidance; drop --guidance_type" in r.output, r.output
    assert "Training options" not in r.output and not os.listdir(tmp_path)


def test_resume_takes_the_same_options_and_refuses_other_ones(tmp_path, tiny_teacher_pkl, monkeypatch):
    """The run's own command with --resume added resumes it; an option that would change the run, or that a run does
    not keep, is refused in one line before anything loads."""
    from training import training_loop as loop_module

    pkl, _ = tiny_teacher_pkl
    options = ["--model_path", pkl, "--batch", "4", "--total_kimg", "0.016", "--seed", "1", "--device", "cpu"]
    first = CliRunner().invoke(train.main, ["--outdir", str(tmp_path), *options, "--total_kimg", "0.008", "--dump", "1"])
    assert first.exit_code == 0, first.output
    run = only_dir(str(tmp_path / "00000-*"))
    with open(os.path.join(run, "training_options.json")) as f:
        recorded = json.load(f)
    recorded["total_kimg"] = 0.016  # as if the run had been stopped half way
    with open(os.path.join(run, "training_options.json"), "w") as f:
        json.dump(recorded, f)
    monkeypatch.setattr(loop_module, "load_teacher", lambda *a, **k: pytest.fail("the network was loaded"))
    for extra, message in ((["--total_kimg", "5"], "--total_kimg=5.0 (the run has 0.016)"),
                           (["--desc", "x"], "--desc (a run does not keep it)"),
                           (["--lr", "1e-3"], "--lr=0.001 (the run has 5e-05)")):
        r = CliRunner().invoke(train.main, ["--outdir", str(tmp_path), *options, *extra, "--resume", "0"])
        assert r.exit_code == 2 and message in r.output, r.output
    monkeypatch.undo()
    same = CliRunner().invoke(train.main, ["--outdir", str(tmp_path), *options, "--resume", "0"])
    assert same.exit_code == 0 and "Resuming from" in same.output, same.output


def test_a_finished_run_is_not_resumed(tmp_path, tiny_teacher_pkl):
    pkl, _ = tiny_teacher_pkl
    r = run_train(tmp_path, pkl, "--dump", "1")
    assert r.exit_code == 0, r.output
    run = only_dir(str(tmp_path / "00000-*"))
    before = {name: os.path.getmtime(os.path.join(run, name)) for name in os.listdir(run)}
    again = CliRunner().invoke(train.main, ["--outdir", str(tmp_path), "--resume", "0"])
    assert again.exit_code == 2 and "is finished (0.008 of 0.008 kimg): nothing to resume" in again.output, again.output
    assert {name: os.path.getmtime(os.path.join(run, name)) for name in os.listdir(run)} == before


def test_m_zero_says_what_the_teacher_does(tmp_path, tiny_teacher_pkl):
    pkl, _ = tiny_teacher_pkl
    r = run_train(tmp_path, pkl, "--M", "0", "--dry-run")
    assert r.exit_code == 0 and "the teacher takes the student's own 3 steps" in r.output, r.output


def test_second_stage_needs_model_path(tmp_path):
    r = CliRunner().invoke(train.main, ["--outdir", str(tmp_path), "--dataset_name", "cifar10",
                                        "--is_second_stage", "True"])
    assert r.exit_code == 2 and "--model_path" in r.output


def test_unknown_dataset_is_refused(tmp_path):
    r = CliRunner().invoke(train.main, ["--outdir", str(tmp_path), "--dataset_name", "cifar100"])
    assert r.exit_code == 2 and "cifar100" in r.output


def test_missing_download_fails_fast_without_a_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(train.main, ["--dataset_name", "cifar10", *TINY_RUN])
    assert r.exit_code == 2
    assert "edm-cifar10-32x32-uncond-vp.pkl" in r.output and "src" in r.output
    assert not os.path.exists(tmp_path / "exps")


def fixed_batch_losses(student, teacher, latents, schedule, cfg, afs):
    """Mean L1 per student step of one real SFD iteration (`sfd_iteration`) on `latents`, run on a copy of the
    student with an optimizer that moves nothing."""
    student = copy.deepcopy(student).requires_grad_(True)
    res = sfd_iteration(student, torch.optim.SGD(student.parameters(), lr=0.0), teacher, [latents], schedule, cfg, afs)
    return [float(step[0].mean()) for step in res.losses]


def test_loss_is_zero_when_student_equals_euler_teacher_with_M0(tiny_teacher_pkl):
    _, net = tiny_teacher_pkl
    net = net.eval()
    schedule = sfd_loss.make_distill_schedule(5, 0, 0.006, 80.0, "polynomial", 7, net=net)
    cfg = sfd_loss.TeacherConfig(solver="euler", sigma_min=0.006, sigma_max=80.0)
    latents = torch.randn([3, 1, 8, 8], generator=torch.Generator().manual_seed(0))
    losses = fixed_batch_losses(net, net, latents, schedule, cfg, afs=False)
    assert len(losses) == 4
    assert max(losses) < 1e-5
    # With M > 0 the teacher is more accurate than one Euler step: the loss is not zero.
    schedule3 = sfd_loss.make_distill_schedule(5, 3, 0.006, 80.0, "polynomial", 7, net=net)
    assert max(fixed_batch_losses(net, net, latents, schedule3, cfg, afs=False)) > 1e-3


def test_training_lowers_fixed_batch_loss_and_leaves_teacher_unchanged(tiny_teacher_pkl):
    pkl, original = tiny_teacher_pkl
    latents = torch.randn([16, 1, 8, 8], generator=torch.Generator().manual_seed(123))
    schedule = sfd_loss.make_distill_schedule(4, 3, 0.006, 80.0, "polynomial", 7, net=original)
    cfg = sfd_loss.TeacherConfig(solver="dpmpp", sigma_min=0.006, sigma_max=80.0,
                                 solver_options=dict(max_order=3, predict_x0=True, lower_order_final=True))
    before = sum(fixed_batch_losses(original.eval(), original.eval(), latents, schedule, cfg, afs=True))
    res = run_loop(pkl, total_kimg=0.128, batch_size=8, lr=2e-3, max_order=3)
    after = sum(fixed_batch_losses(res.net.eval(), res.teacher, latents, schedule, cfg, afs=True))
    assert after < 0.8 * before, (before, after)
    for (k, a), b in zip(original.state_dict().items(), res.teacher.state_dict().values()):
        assert torch.equal(a, b), k
    assert not any(p.requires_grad for p in res.teacher.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(original.state_dict().values(), res.net.state_dict().values()))


@pytest.mark.parametrize("afs, expected_per_iteration", [(True, 2), (False, 3)])
def test_no_optimizer_step_for_the_afs_step(tiny_teacher_pkl, monkeypatch, afs, expected_per_iteration):
    pkl, _ = tiny_teacher_pkl
    calls = []
    original_step = torch.optim.Adam.step

    def counting_step(self, *a, **k):
        calls.append(1)
        return original_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", counting_step)
    run_loop(pkl, num_steps=4, afs=afs, total_kimg=0.012)  # 3 iterations of batch 4
    assert len(calls) == 3 * expected_per_iteration


def sample_sfdv(snap, n, outdir, monkeypatch, feed=None):
    """sample.py at --num_steps n (seeds 0-2): the PNG bytes and the step condition of every network call.
    feed: the step condition the network gets instead of the one sample.py passes."""
    import sample
    from models.precond import _Precond

    received = []
    real = _Precond.forward

    def recording(self, x, sigma, *args, step_condition=None, **kwargs):
        received.append(step_condition)
        return real(self, x, sigma, *args, step_condition=step_condition if feed is None else feed, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(_Precond, "forward", recording)
        r = CliRunner().invoke(sample.main, ["--model_path", snap, "--seeds", "0-2", "--num_steps", str(n),
                                             "--outdir", str(outdir), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert f"NFE {n - 2}" in r.output
    return [open(f, "rb").read() for f in sorted(glob.glob(str(outdir / "*" / "*.png")))], received


def test_sfdv_snapshot_samples_at_every_num_steps_and_second_stage_runs(tmp_path, tiny_teacher_pkl, monkeypatch):
    pkl, _ = tiny_teacher_pkl
    r = run_train(tmp_path, pkl, "--use_step_condition", "True", "--total_kimg", "0.016")
    assert r.exit_code == 0, r.output
    snap = glob.glob(str(tmp_path / "00000-*" / "network-snapshot-*.safetensors"))[0]

    import sample

    # sample.py passes num_steps as the step condition of every call (all of 4..7 on the paper's SFD-v snapshot:
    # tests/test_loop_behaviour.py), and the network acts on it. A few kimg of training leave the step path's effect
    # below one uint8 level, so this samples a copy of our snapshot with every weight jittered (same settings).
    from models import load_snapshot, save_snapshot

    net, settings = load_snapshot(snap)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    jittered = str(tmp_path / "jittered.safetensors")
    save_snapshot(jittered, net, settings)
    for n in (4, 7):
        own, received = sample_sfdv(jittered, n, tmp_path / f"j{n}", monkeypatch)
        assert len(own) == 3 and len(received) == n - 2  # one batch; Euler with AFS: n - 2 network calls
        assert all(torch.equal(torch.as_tensor(c, dtype=torch.float32).reshape(-1), torch.full([1], float(n)))
                   for c in received), (n, received)
        other, _ = sample_sfdv(jittered, n, tmp_path / f"j{n}-fed", monkeypatch, feed=11 - n)
        assert own != other, n  # the same schedule under another step condition gives other images
    bad = CliRunner().invoke(sample.main, ["--model_path", snap, "--num_steps", "8", "--device", "cpu",
                                           "--outdir", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "4..7" in bad.output

    # Second stage from the SFD-v snapshot, perceptual term off (no LPIPS weights offline).
    r2 = CliRunner().invoke(train.main, ["--outdir", str(tmp_path / "stage2"), "--model_path", snap,
                                         "--is_second_stage", "True", "--num_steps", "3", "--M", "2",
                                         "--sampler_tea", "dpmpp", "--schedule_type", "logsnr", "--lr", "5e-4",
                                         "--lpips", "False", *TINY_RUN])
    assert r2.exit_code == 0, r2.output
    from models import load_snapshot

    # The folder names the teacher that ran: the first-stage model under Euler with its own schedule.
    assert only_dir(str(tmp_path / "stage2" / "00000-*")).endswith("-3-1-euler-2-poly7.0-afs")
    snap2 = glob.glob(str(tmp_path / "stage2" / "00000-*" / "network-snapshot-*.safetensors"))[0]
    net2, settings2 = load_snapshot(snap2)
    assert settings2["is_second_stage"] is True and settings2["num_steps"] == 3 and settings2["afs"] is True
    assert settings2["use_step_condition"] is True  # inherited from the SFD-v teacher
    rs = CliRunner().invoke(sample.main, ["--model_path", snap2, "--seeds", "0-1", "--outdir",
                                          str(tmp_path / "s1"), "--device", "cpu"])
    assert rs.exit_code == 0 and "NFE 1" in rs.output, rs.output


def test_second_stage_with_lpips_offline_fails_clearly(tmp_path, tiny_teacher_pkl):
    pkl, _ = tiny_teacher_pkl
    assert run_train(tmp_path / "a", pkl).exit_code == 0
    snap = glob.glob(str(tmp_path / "a" / "00000-*" / "network-snapshot-*.safetensors"))[0]
    r2 = CliRunner().invoke(train.main, ["--outdir", str(tmp_path / "b"), "--model_path", snap,
                                         "--is_second_stage", "True", "--num_steps", "3", "--M", "2", *TINY_RUN])
    try:
        import piq  # noqa: F401
        pytest.skip("piq is installed here; the offline error path is not reachable")
    except ImportError:
        pass
    assert r2.exit_code == 2, r2.output
    assert "--lpips False" in r2.output and "Traceback" not in r2.output


def test_class_conditional_teacher_trains(tmp_path, tiny_cond_teacher_pkl):
    pkl, _ = tiny_cond_teacher_pkl
    res = run_loop(pkl, sampler_tea="heun", num_steps=3, M=1, afs=False, total_kimg=0.008)
    assert res.settings["sampler_tea"] == "heun"
    assert all(torch.isfinite(p).all() for p in res.net.parameters())


@pytest.mark.slow
def test_torchrun_two_processes_cpu(tmp_path, tiny_teacher_pkl):
    pkl, _ = tiny_teacher_pkl
    p = torchrun("train.py", "--outdir", str(tmp_path), "--model_path", pkl, "--batch", "4", "--total_kimg", "0.008",
                 "--seed", "5", "--device", "cpu")
    assert p.returncode == 0, p.stdout + p.stderr
    run = only_dir(str(tmp_path / "00000-*"))
    assert len(glob.glob(os.path.join(run, "network-snapshot-*.safetensors"))) == 1
    assert "2 ranks hold identical weights" in open(os.path.join(run, "log.txt")).read()


class RecordingSGD(torch.optim.SGD):
    """Stands in for the loop's Adam: a plain SGD step, and a copy of every gradient it is handed."""

    def __init__(self, params, lr, betas=None, eps=None):
        super().__init__(params, lr=lr)
        self.grads = []  # per optimizer step: one gradient per parameter

    def step(self, closure=None):
        self.grads.append([p.grad.clone() for group in self.param_groups for p in group["params"]])
        return super().step(closure)


def test_gradient_accumulation_rounds_match_one_big_batch(tiny_teacher_pkl, monkeypatch):
    """--batch-gpu splits the per-rank batch into rounds whose gradients add up to the full batch's.

    The rounds see the same 8 trajectories as the big batch; a plain SGD step replaces Adam (whose normalisation
    turns float32 noise on near-zero gradients into visible weight differences). Then every gradient handed to the
    optimizer differs only by how float32 sums were grouped (8 samples in one kernel vs 4 rounds of 2 added up):
    observed up to ~1.2e-6 of the tensor's largest entry, i.e. ~10 ulps (float32 eps 1.19e-7). The tolerance,
    1e-4 of that entry, leaves ~100x headroom; losing, double-counting or mis-scaling one round of four moves
    gradients by >= 25%."""
    pkl, _ = tiny_teacher_pkl
    import training.training_loop as loop

    real_randn = torch.randn
    fixed = real_randn([8, 1, 8, 8], generator=torch.Generator().manual_seed(0))
    served = []

    def fixed_latents(shape, *a, **k):
        # Hand out the same 8 trajectories whatever the round size.
        if list(shape[1:]) == [1, 8, 8]:
            start = sum(served) % 8
            served.append(shape[0])
            return fixed[start:start + shape[0]].clone()
        return real_randn(shape, *a, **k)

    optimizers = []
    monkeypatch.setattr(loop.torch, "randn", fixed_latents)
    monkeypatch.setattr(torch.optim, "Adam", lambda *a, **k: optimizers.append(RecordingSGD(*a, **k)) or optimizers[-1])
    one = run_loop(pkl, batch_size=8, total_kimg=0.016, lr=1e-3)
    served.clear()
    four = run_loop(pkl, batch_size=8, batch_gpu=2, total_kimg=0.016, lr=1e-3)
    big, rounds = optimizers
    assert len(big.grads) == len(rounds.grads) == 4  # 2 iterations × 2 student steps with a network call
    names = [name for name, _ in one.net.named_parameters()]
    worst = []
    for step, (ga, gb) in enumerate(zip(big.grads, rounds.grads)):
        for name, a, b in zip(names, ga, gb):
            scale = a.abs().max().item()
            diff = (a - b).abs().max().item()
            worst.append((diff / max(scale, 1e-30), diff, scale, step, name))
    ratio, diff, scale, step, name = max(worst)
    assert ratio <= 1e-4, (f"optimizer step {step}, {name}: max |g_big - g_rounds| = {diff:.3g} against max |g| = "
                           f"{scale:.3g} (ratio {ratio:.3g} > 1e-4)")
    for (k, a), b in zip(one.net.state_dict().items(), four.net.state_dict().values()):
        # SGD weights: the gradient gap times lr over 4 steps, far below float32 resolution of the weights.
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8, msg=k)


def test_teacher_batching_across_rounds_gives_the_same_targets(tiny_teacher_pkl):
    from training.training_loop import batched_teacher

    _, net = tiny_teacher_pkl
    net = net.eval()
    schedule = sfd_loss.make_distill_schedule(4, 3, 0.006, 80.0, "polynomial", 7, net=net)
    cfg = sfd_loss.TeacherConfig(solver="dpmpp", sigma_min=0.006, sigma_max=80.0,
                                 solver_options=dict(max_order=3, predict_x0=True, lower_order_final=True))
    g = torch.Generator().manual_seed(0)
    latents = [torch.randn([3, 1, 8, 8], generator=g) for _ in range(3)]
    per_round = batched_teacher(net, latents, [None] * 3, [(None, None)] * 3, schedule, cfg, teacher_batch=3)
    grouped = batched_teacher(net, latents, [None] * 3, [(None, None)] * 3, schedule, cfg, teacher_batch=9)
    split = batched_teacher(net, latents, [None] * 3, [(None, None)] * 3, schedule, cfg, teacher_batch=2)
    assert [t.shape for t in grouped] == [(3, 3, 1, 8, 8)] * 3
    assert [t.shape for t in split] == [(3, 3, 1, 8, 8)] * 3
    for a, b, c in zip(per_round, grouped, split):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)


def test_bf16_and_channels_last_paths_track_fp32(tiny_teacher_pkl):
    """The speed switches change how, not what: first-tick losses stay close to the fp32 reference."""
    pkl, _ = tiny_teacher_pkl
    ref = run_loop(pkl, total_kimg=0.004, precision="fp32")
    cl = run_loop(pkl, total_kimg=0.004, precision="fp32", channels_last=True)
    bf = run_loop(pkl, total_kimg=0.004, mixed_on_cpu=True, precision="bf16")
    for (k, a), b, c in zip(ref.net.state_dict().items(), cl.net.state_dict().values(), bf.net.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=k)
        # One Adam step of lr 5e-5 moves a weight by ≤ ~1e-4 whatever the gradient: compare the update direction.
    moved_ref = torch.cat([(a - b).flatten() for a, b in zip(ref.net.state_dict().values(),
                                                              ref.teacher.state_dict().values())])
    moved_bf = torch.cat([(a - b).flatten() for a, b in zip(bf.net.state_dict().values(),
                                                             bf.teacher.state_dict().values())])
    cos = torch.nn.functional.cosine_similarity(moved_ref, moved_bf, dim=0)
    assert cos > 0.9, float(cos)


COMPILED_GRAPHS = []  # what torch.compile handed to the counting backend below


def _counting_backend(graph_module, example_inputs):
    """A torch.compile backend (the custom-backend interface): note each graph it is given, then run it through
    'aot_eager' (AOTAutograd traces forward and backward as inductor's input would be, without C++ codegen, which
    keeps the CPU test fast)."""
    COMPILED_GRAPHS.append(graph_module)
    return torch._dynamo.lookup_backend("aot_eager")(graph_module, example_inputs)


if "sfd_test_counting" not in torch._dynamo.list_backends(exclude_tags=()):
    torch._dynamo.register_backend(_counting_backend, name="sfd_test_counting")


@pytest.mark.slow
def test_compiled_sfdv_student_is_one_graph_for_every_step_count(tiny_teacher_pkl, monkeypatch):
    """torch.compile traces the teacher and the (DDP-less) student, and the compiled run trains exactly as the eager
    one. SFD-v draws num_steps from 4..7 each iteration; the step condition reaches the compiled student as a tensor,
    so torch.compile builds two graphs (teacher without grad, student with it) for the whole run, not one per step
    count."""
    pkl, _ = tiny_teacher_pkl
    drawn = []
    real = sfd_loss.student_step

    def recording(*args, step_condition=None, **kwargs):
        drawn.append(int(torch.as_tensor(step_condition).reshape(-1)[0]))
        return real(*args, step_condition=step_condition, **kwargs)

    monkeypatch.setattr(sfd_loss, "student_step", recording)
    torch.compiler.reset()
    COMPILED_GRAPHS.clear()
    compiled = run_loop(pkl, precision="fp32", compile="sfd_test_counting", use_step_condition=True, total_kimg=0.032)
    assert len(set(drawn)) >= 3, drawn  # several step counts were trained
    assert len(COMPILED_GRAPHS) == 2, [g.code for g in COMPILED_GRAPHS]
    eager = run_loop(pkl, precision="fp32", use_step_condition=True, total_kimg=0.032)
    for (k, a), b in zip(eager.net.state_dict().items(), compiled.net.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_step_condition", [False, True])
def test_teacher_and_student_calls_never_wait_for_the_gpu(device, use_step_condition):
    """The loop's hot path (`sfd_iteration`: teacher trajectory with DPM-Solver++ thresholding under the fp16 mode,
    student steps, backward, gradient clean-up, Adam, the NaN watch) makes no host-device synchronisation once its
    schedule exists: on CUDA, torch's sync debug mode raises on one. The CPU run makes the same calls."""
    from tests.conftest import build_tiny_edm
    from training.precision import NonFiniteWatch, RunMode
    from training.training_loop import make_optimizer, solver_options, split_teacher

    device = torch.device(device)
    loaded = dnnlib.EasyDict(net=build_tiny_edm(use_step_condition=use_step_condition).to(device), student_unet=None)
    net, teacher = split_teacher(loaded, freeze_step_layers=use_step_condition)
    mode = RunMode("fp16", device, (net, teacher), armed_on_cpu=True)
    nonfinite = NonFiniteWatch(device)
    optimizer = make_optimizer(net.parameters(), lr=1e-3)
    cfg = sfd_loss.TeacherConfig(solver_options=solver_options("dpmpp", 3, True, True, thresholding=True))
    schedule = sfd_loss.make_distill_schedule(4, 3, cfg.sigma_min, cfg.sigma_max, cfg.schedule_type,
                                              cfg.schedule_rho, net=teacher, device=device)
    step_condition = torch.full([4], 4.0, device=device) if use_step_condition else None
    before = copy.deepcopy(net.state_dict())

    def iteration():
        latents = [torch.randn(4, 1, 8, 8, device=device)]
        out = sfd_iteration(net, optimizer, teacher, latents, schedule, cfg, afs=True, step_condition=step_condition,
                            mode=mode, nonfinite=nonfinite)
        nonfinite.publish()
        return out

    iteration()  # the first call builds the solver's tables and checks the schedule
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        results = [iteration() for _ in range(2)]  # the second one reads the lagged NaN flag of the first
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert mode.precision == "fp16" and net.use_fp16 and teacher.use_fp16
    assert not nonfinite.seen(now=True)
    for result in results:
        assert result.targets[0].shape == (3, 4, 1, 8, 8) and torch.isfinite(result.targets[0]).all()
        assert all(torch.isfinite(loss[0]).all() for loss in result.losses)
    assert any(not torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_eta_leaves_out_the_first_iterations_one_time_cost(monkeypatch, capsys):
    """The ETA after a tick uses the rate of the iterations after the run's first one: a slow first iteration
    (kernel selection, allocations, compilation) does not stretch the estimate for the whole run."""
    import types

    from training import ticks

    clock = [1000.0]
    monkeypatch.setattr(ticks, "time", types.SimpleNamespace(time=lambda: clock[0]))
    log = ticks.TickLog(4, torch.device("cpu"), total_kimg=0.1, cur_nimg=0, stats_file=None,
                              start_time=1000.0, progress=False)
    for i, seconds in enumerate([30.0, 1.0, 1.0, 1.0]):  # batch 10: the first iteration takes 30 s, then 1 s each
        clock[0] += seconds
        log.add([[torch.ones(2)] for _ in range(3)])
        log.advance(10 * (i + 1))
    log.write(0, 40, 1e-3, types.SimpleNamespace(mixed=False, precision="fp32"))
    line = capsys.readouterr().out
    # 60 images left at 1 s per 10; the tick's own rate (33 s per 40 images) would say 49s
    assert "sec/kimg 825.00" in line and "eta 6s" in line, line


def test_cpu_threads_follow_the_free_cores(monkeypatch):
    """A CPU run uses the cores that other work leaves free (at least one); OMP_NUM_THREADS is the user's choice;
    nothing changes where /proc/stat sees other CPUs than this process may use."""
    from torch_utils import threads

    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    set_to = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    assert threads.pick_cpu_threads(lambda: (0.2, 4)) == (4, 4, 0.2)
    assert threads.pick_cpu_threads(lambda: (2.6, 4)) == (1, 4, 2.6)
    assert threads.pick_cpu_threads(lambda: (7.9, 4)) == (1, 4, 7.9)
    assert threads.pick_cpu_threads(lambda: (1.0, 64)) is None and threads.pick_cpu_threads(lambda: (None, None)) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.pick_cpu_threads(lambda: (3.0, 4)) is None
    assert set_to == [4, 1, 1]
    # busy cores from two reads of /proc/stat-like counters: 150 of 200 jiffies busy on 2 CPUs
    reads = iter([(100, 1000, 2), (250, 1200, 2)])
    assert threads.busy_cores(read=lambda: next(reads), sleep=lambda s: None) == (1.5, 2)


def test_train_py_on_a_busy_cpu_uses_the_free_cores_and_says_so(tmp_path, tiny_teacher_pkl, monkeypatch):
    from torch_utils import threads

    pkl, _ = tiny_teacher_pkl
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "busy_cores", lambda: (1.7, 2))
    before = torch.get_num_threads()
    try:
        r = run_train(tmp_path, pkl)
        assert r.exit_code == 0, r.output
        assert "CPU threads: 1 of 2 cores; 1.7 were busy with other work at the start" in r.output
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------------------------
# Every train.py option reaches the loop as the setting it names, and --help's defaults are the ones that run
# (issue 50). The loop and the network load are replaced by recorders: what is checked is what train.py hands them.

# Options that are not settings of the run: where it goes, how it is named, what to resume, a dry run, captions
# (handed to the loaded network, tests/test_sd.py).
NOT_SETTINGS = {"outdir", "desc", "nosubdir", "resume", "dry_run", "captions"}

WIRING = [
    (["--total_kimg", "3"], dict(total_kimg=3.0)),
    (["--batch", "8", "--batch-gpu", "2"], dict(batch_size=8, batch_gpu=2)),
    (["--lr", "1e-3"], dict(lr=1e-3)),
    (["--num_steps", "5", "--M", "2", "--afs", "False"], dict(num_steps=5, M=2, afs=False)),
    (["--sampler_tea", "ipndm", "--max_order", "2"], dict(sampler_tea="ipndm", max_order=2)),
    (["--predict_x0", "False"], dict(predict_x0=False)),
    (["--lower_order_final", "False"], dict(lower_order_final=False)),
    (["--thresholding", "True"], dict(thresholding=True)),
    (["--schedule_type", "logsnr", "--schedule_rho", "3"], dict(schedule_type="logsnr", schedule_rho=3.0)),
    (["--use_step_condition", "True"], dict(use_step_condition=True)),
    (["--is_second_stage", "True", "--lpips", "False"], dict(is_second_stage=True, lpips=False)),
    (["--guidance_type", "cfg", "--guidance_rate", "2.5"], dict(guidance_type="cfg", guidance_rate=2.5)),
    (["--precision", "bf16"], dict(precision="fp32")),  # mixed precision on CUDA only: the run says what runs
    (["--channels_last", "True", "--compile", "True", "--teacher_batch", "2", "--bench", "False"],
     dict(channels_last=True, compile=True, teacher_batch=2, cudnn_benchmark=False)),
    (["--seed", "7", "--tick", "0.5", "--snap", "3", "--dump", "2"],
     dict(seed=7, kimg_per_tick=0.5, snapshot_ticks=3, state_dump_ticks=2)),
    (["--device", "cpu", "--model_path", "{other}"], dict(device="cpu", model_path="{other}")),
]


@pytest.fixture
def handed_to_the_loop(tmp_path, tiny_teacher_pkl, monkeypatch):
    """Run train.py with the given options; return the settings the loop received."""
    import training.training_loop as loop

    received = []
    monkeypatch.setattr(loop, "load_teacher", lambda cfg, device: (dnnlib.EasyDict(net=torch.nn.Identity()),))
    monkeypatch.setattr(loop, "training_loop", lambda **kwargs: received.append(kwargs))
    other = tmp_path / "other.pkl"
    other.write_bytes(open(tiny_teacher_pkl[0], "rb").read())

    def run(args):
        args = [a.replace("{other}", str(other)) for a in args]
        r = CliRunner().invoke(train.main, ["--outdir", str(tmp_path / "exps"), "--model_path", tiny_teacher_pkl[0],
                                            "--nosubdir", *args])
        assert r.exit_code == 0, r.output
        (kwargs,) = received[-1:]
        return {k: v for k, v in kwargs.items() if k not in ("run_dir", "resume_state", "loaded", "progress")}

    run.other = str(other)
    return run


@pytest.mark.parametrize("args, expected", WIRING, ids=[" ".join(a[::2]) for a, _ in WIRING])
def test_each_option_reaches_the_loop_as_its_setting(handed_to_the_loop, args, expected):
    expected = {k: (handed_to_the_loop.other if v == "{other}" else v) for k, v in expected.items()}
    received = handed_to_the_loop(args)
    defaults = handed_to_the_loop([])
    assert {k: received[k] for k in expected} == expected
    changed = {k for k in received if received[k] != defaults[k] and k != "seed"}
    assert changed <= set(expected), f"{args} also changed {changed - set(expected)}"


def test_every_option_is_in_the_wiring_table():
    named = {train.CONFIG_KEYS.get(p.name, p.name) for p in train.main.params} - NOT_SETTINGS
    tested = set().union(*(e.keys() for _, e in WIRING)) | {"dataset_name"}  # dataset_name: test_sample/test_sd
    assert named - tested == set(), "add these train.py options to WIRING"


# The paper's train.py defaults for the settings our train.py keeps as the paper has them (its --tick 10, --snap 10
# and --dump 50 are ours 1, the end and never; thresholding: tests/test_defaults.py).
PAPER_TRAIN_DEFAULTS = dict(total_kimg=200, use_step_condition=False, is_second_stage=False, num_steps=4,
                            sampler_tea="dpmpp", M=3, guidance_rate=0, schedule_type="polynomial", schedule_rho=7,
                            afs=True, predict_x0=True, lower_order_final=True, batch_size=128, lr=5e-5,
                            cudnn_benchmark=True)


def test_documented_defaults_are_the_ones_that_run(handed_to_the_loop):
    import dataclasses

    from tests.conftest import documented_defaults
    from training.config import DistillConfig

    own_defaults = {f.name: f.default for f in dataclasses.fields(DistillConfig)}
    received = handed_to_the_loop([])
    assert {k: received[k] for k in PAPER_TRAIN_DEFAULTS} == PAPER_TRAIN_DEFAULTS
    documented = documented_defaults(train.main)
    # Rules rather than values: what the loop receives says the same.
    assert documented.pop("--outdir") == "./exps"
    assert documented.pop("--batch-gpu") == "batch/ranks" and received["batch_gpu"] is None
    assert documented.pop("--teacher_batch") == "batch-gpu" and received["teacher_batch"] is None
    assert documented.pop("--max_order") == "4 / 3" and received["max_order"] is None
    assert [solvers_default("ipndm"), solvers_default("dpmpp")] == [4, 3]
    assert documented.pop("--seed") == "random" and isinstance(received["seed"], int)
    assert documented.pop("--snap") == "only at the end" and received["snapshot_ticks"] is None
    assert documented.pop("--dump") == "never" and received["state_dump_ticks"] is None
    assert documented.pop("--device") == "cuda if available, else cpu" and received["device"] == "cpu"
    assert documented.pop("--precision") == "fp16" and own_defaults["precision"] == "fp16"
    assert received["precision"] == "fp32"  # on this CPU machine
    for flag, text in documented.items():
        field = train.CONFIG_KEYS.get(flag.lstrip("-").replace("-", "_"), flag.lstrip("-"))
        value = received[field]
        read = float(text) if isinstance(value, (int, float)) and not isinstance(value, bool) else text
        assert read == (value if read is not text else str(value)), (flag, text, value)
        assert value == own_defaults[field], (flag, value)  # train.py and training_loop() from Python agree


def solvers_default(name):
    import solvers

    return solvers.TABLE[name].options["max_order"]
