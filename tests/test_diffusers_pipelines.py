"""Any diffusers pipeline folder as a teacher (issue 53, design §6): on tiny pipelines built with diffusers' own
classes (random weights, save_pretrained), our denoiser and our Euler / DPM-Solver++ trajectories agree with
diffusers' EulerDiscreteScheduler and DPMSolverMultistepScheduler on the same U-Net and the same sigmas, for a pixel
DDPM pipeline (epsilon) and an SD-2-style text-to-image pipeline (v_prediction); strict loading refuses what it
cannot map in one line."""

import json
import os

import pytest
import torch

import solvers
from models import load_network
from tests.diffusers_tiny import write_pixel_pipeline, write_sd_pipeline

# Agreement bound: float32 rounding through a few U-Net calls on values of order sigma_max (157 for the pixel
# DDPM schedule); relative to the largest value on the trajectory.
REL_TOL = 2e-5


@pytest.fixture(scope="module")
def pixel(tmp_path_factory):
    return write_pixel_pipeline(str(tmp_path_factory.mktemp("ddpm") / "pipe"), "epsilon", seed=3)


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    return write_sd_pipeline(str(tmp_path_factory.mktemp("sd2") / "pipe"), "v_prediction", seed=5)


def scheduler_of(folder, cls, **options):
    import diffusers

    with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
        config = json.load(f)
    return getattr(diffusers, cls).from_config(config, **options)


def diffusers_run(scheduler, unet_call, x, steps):
    """diffusers' own loop (as its pipelines run it) from x at sigmas[0]; returns (trajectory, data estimates)."""
    scheduler.set_timesteps(steps)
    xs, x0s = [x], []
    for t in scheduler.timesteps:
        out = unet_call(scheduler.scale_model_input(x, t), t)
        step = scheduler.step(out, t, x)
        x = step.prev_sample
        xs.append(x)
        if hasattr(step, "pred_original_sample"):
            x0s.append(step.pred_original_sample)
    return torch.stack(xs), x0s


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def check_agreement(net, unet_call, shape, condition=None):
    """Euler on Karras sigmas (fractional timesteps) and DPM-Solver++ orders 2 and 3 on the config's spacing (integer
    timesteps, as diffusers rounds them) against diffusers; returns the worst relative error."""
    folder = net.pipeline
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    worst = 0.0
    with torch.no_grad():
        euler = scheduler_of(folder, "EulerDiscreteScheduler", use_karras_sigmas=True, timestep_spacing="linspace")
        euler.set_timesteps(5)
        sigmas = euler.sigmas
        ref, ref_x0 = diffusers_run(euler, unet_call, latents * sigmas[0], 5)
        # The Karras sigmas are our polynomial schedule (rho 7) over the scheduler's sigma range.
        ours_t = solvers.get_schedule(5, net.sigma_min, net.sigma_max)
        assert torch.allclose(ours_t, sigmas[:-1], rtol=1e-6, atol=0)
        ours = solvers.euler_sampler(net, latents, t_steps=sigmas[:-1], condition=condition, denoise_to_zero=True,
                                     return_inters=True)
        worst = max(worst, rel_err(ours, ref))
        x0 = net(ref[2], sigmas[2], condition=condition)
        worst = max(worst, rel_err(x0, ref_x0[2]))
        for order in (2, 3):
            dpm = scheduler_of(folder, "DPMSolverMultistepScheduler", algorithm_type="dpmsolver++", solver_order=order,
                               lower_order_final=False, final_sigmas_type="zero")
            dpm.set_timesteps(6)
            sig = dpm.sigmas
            assert torch.allclose(net.timestep(sig[:-1]).float(), dpm.timesteps.float(), atol=1e-3)
            alpha = 1 / (sig ** 2 + 1).sqrt()
            ref, _ = diffusers_run(dpm, unet_call, latents * sig[0] * alpha[0], 6)
            ours = solvers.dpm_pp_sampler(net, latents, t_steps=sig[:-1], condition=condition, max_order=order,
                                          lower_order_final=False, thresholding=False, denoise_to_zero=True,
                                          return_inters=True)
            ours_vp = ours * torch.cat([alpha[:-1], torch.ones(1)]).reshape(-1, 1, 1, 1, 1)
            worst = max(worst, rel_err(ours_vp, ref))
    return worst


def test_pixel_epsilon_pipeline_agrees_with_diffusers(pixel):
    loaded = load_network(model_path=pixel)
    net = loaded.net
    assert loaded.dataset_name == "diffusers" and net.prediction_type == "epsilon" and net.guidance_type is None
    assert (net.img_resolution, net.img_channels, net.label_dim) == (8, 3, 0)
    assert net.timestep(torch.tensor([net.sigma_min, net.sigma_max])).tolist() == [0.0, 999.0]
    unet = net.unet
    worst = check_agreement(net, lambda x, t: unet(x, t).sample, (2, 3, 8, 8))
    print(f"pixel epsilon: max relative difference to diffusers {worst:.2e}")
    assert worst < REL_TOL


def test_sd2_v_prediction_pipeline_agrees_with_diffusers(sd2):
    net = load_network(model_path=sd2).net
    assert net.prediction_type == "v_prediction" and net.guidance_type == "cfg"
    assert (net.img_resolution, net.img_channels) == (8, 4)
    cond, _ = net.encode_prompts(["the cat", "a b c"])
    unet = net.unet
    worst = check_agreement(net, lambda x, t: unet(x, t, encoder_hidden_states=cond).sample, (2, 4, 8, 8), cond)
    print(f"SD-2 v_prediction: max relative difference to diffusers {worst:.2e}")
    assert worst < REL_TOL


def test_pixel_sample_prediction_pipeline_agrees_with_diffusers(tmp_path):
    """prediction_type="sample": the U-Net's output is the data estimate itself (D = F)."""
    folder = write_pixel_pipeline(str(tmp_path / "pipe"), "sample", seed=4)
    net = load_network(model_path=folder).net
    assert net.prediction_type == "sample"
    unet = net.unet
    worst = check_agreement(net, lambda x, t: unet(x, t).sample, (2, 3, 8, 8))
    print(f"pixel sample: max relative difference to diffusers {worst:.2e}")
    assert worst < REL_TOL


@pytest.mark.parametrize("kind", ["pixel", "sd2"])
def test_sfdv_teacher_is_the_pretrained_unet_and_the_step_embedding_learns(pixel, sd2, kind):
    """SFD-v on a diffusers U-Net (class_embed_type="timestep"): the split's teacher gives the pre-trained U-Net's
    output bit for bit, the student's fresh step embedding changes its output and receives gradient."""
    from training.teacher import split_teacher

    folder = pixel if kind == "pixel" else sd2
    plain = load_network(model_path=folder).net
    loaded = load_network(model_path=folder, use_step_condition=True)
    assert loaded.settings["use_step_condition"] and loaded.net.init_kwargs["use_step_condition"]
    student, teacher = split_teacher(loaded, freeze_step_layers=True)
    assert student.unet.config.class_embed_type == "timestep" and teacher.unet.class_embedding is None
    for key, value in plain.state_dict().items():  # pre-trained weights everywhere but the step embedding
        assert torch.equal(student.state_dict()[key], value), key
    shape = (2, plain.img_channels, 8, 8)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3
    sigma = torch.tensor([4.0, 0.5])
    cond = plain.encode_prompts(["the cat", "a b c"])[0] if kind == "sd2" else None
    steps = torch.full([2], 5.0)
    with torch.no_grad():
        expected = plain(x, sigma, condition=cond)
        assert torch.equal(teacher(x, sigma, condition=cond, step_condition=steps), expected)
    out = student(x, sigma, condition=cond, step_condition=steps)
    assert not torch.allclose(out, expected)
    out.square().mean().backward()
    grads = [p.grad for p in student.unet.class_embedding.parameters()]
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads)


def _edit(folder, path, **changes):
    with open(os.path.join(folder, path)) as f:
        config = json.load(f)
    config.update(changes)
    with open(os.path.join(folder, path), "w") as f:
        json.dump(config, f)


@pytest.mark.parametrize("case, words", [
    ("weights", ["diffusion_pytorch_model.safetensors", "U-Net does not match its configuration", "wrong shape"]),
    ("prediction_type", ["unknown prediction_type 'x_start'", "epsilon, v_prediction, sample"]),
    ("scheduler", ["scheduler 'FlowMatchEulerDiscreteScheduler' cannot be mapped"]),
    ("zero_snr", ["rescale_betas_zero_snr=True cannot be mapped"]),
    ("sdxl", ["SDXL-style pipelines", "not supported"]),
    ("sfdv_class", ["--use_step_condition (SFD-v) is not available", "class-conditional (num_class_embeds)"]),
])
def test_strict_loading_refuses_in_one_line(pixel, tmp_path, monkeypatch, case, words):
    import shutil

    from click.testing import CliRunner

    import train
    from tests.conftest import assert_one_line_refusal

    folder = str(tmp_path / "pipe")
    shutil.copytree(pixel, folder)
    extra = []
    if case == "weights":  # the config says 48 channels, the weights hold 32
        _edit(folder, "unet/config.json", block_out_channels=[48, 32])
    elif case == "prediction_type":
        _edit(folder, "scheduler/scheduler_config.json", prediction_type="x_start")
    elif case == "scheduler":
        _edit(folder, "scheduler/scheduler_config.json", _class_name="FlowMatchEulerDiscreteScheduler")
    elif case == "zero_snr":
        _edit(folder, "scheduler/scheduler_config.json", rescale_betas_zero_snr=True)
    elif case == "sdxl":
        _edit(folder, "model_index.json", text_encoder_2=["transformers", "CLIPTextModelWithProjection"])
    else:  # a class-conditional U-Net: its class embedding is where the step condition would go
        _edit(folder, "unet/config.json", num_class_embeds=3)
        extra = ["--use_step_condition", "True"]
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(train.main, ["--model_path", folder, "--batch", "2", "--total_kimg", "0.002",
                                             "--device", "cpu", "--num_steps", "4", "--afs", "False", *extra])
    assert_one_line_refusal(result, *words)
    assert not os.path.exists("exps")
