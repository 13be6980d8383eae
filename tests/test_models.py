"""EDM backbones and preconditioning: EDM parameter names, the denoiser call, SFD-v step layers."""

import json
import math

import numpy as np
import pytest
import torch

from models import DhariwalUNet, EDMPrecond, SongUNet, VEPrecond, VPPrecond, iDDPMPrecond
from models.edm import UNetBlock, is_step_layer_key
from tests.conftest import ADM_16, DEVICES, SONG_16, convolution_dtypes, perturbed, tiny_net


def share_weights(dst, src):
    """Copy every tensor of src into dst (dst may have extra step layers)."""
    dst.load_state_dict({**dst.state_dict(), **src.state_dict()}, strict=True)
    return dst


def test_song_unet_shapes_and_edm_names():
    net = tiny_net(**SONG_16)
    x = torch.randn(2, 3, 16, 16)
    out = net(x, 1.5)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    keys = net.state_dict()
    for name in ["model.map_augment.weight", "model.map_layer0.weight", "model.map_layer1.bias",
                 "model.enc.16x16_conv.weight", "model.enc.16x16_block0.conv0.weight", "model.enc.16x16_block0.affine.weight",
                 "model.enc.8x8_down.conv0.resample_filter", "model.enc.8x8_down.skip.weight", "model.enc.8x8_block0.qkv.weight",
                 "model.dec.8x8_in0.proj.weight", "model.dec.16x16_up.conv0.weight", "model.dec.16x16_aux_norm.weight",
                 "model.dec.16x16_aux_conv.weight"]:
        assert name in keys, name
    assert "model.map_augment.bias" not in keys and "model.map_label.weight" not in keys
    assert keys["model.enc.8x8_block0.qkv.weight"].shape == (96, 32, 1, 1)
    assert keys["model.enc.8x8_down.conv0.resample_filter"].shape == (1, 1, 2, 2)
    assert not any(is_step_layer_key(k) for k in keys)
    assert isinstance(net.model, SongUNet)


def test_conditional_song_unet_uses_labels():
    net = tiny_net(**dict(SONG_16, label_dim=10))
    assert "model.map_label.weight" in net.state_dict() and "model.map_label.bias" in net.state_dict()
    x = torch.randn(2, 3, 16, 16)
    a = net(x, 1.0, class_labels=torch.eye(10)[[0, 1]])
    b = net(x, 1.0, class_labels=torch.eye(10)[[2, 3]])
    assert (a - b).abs().max() > 1e-4


def test_dhariwal_unet_shapes_names_and_labels():
    net = tiny_net(**ADM_16)
    keys = net.state_dict()
    for name in ["model.map_label.weight", "model.map_layer0.weight", "model.enc.16x16_conv.weight",
                 "model.enc.8x8_down.affine.weight", "model.enc.8x8_block0.qkv.weight", "model.dec.8x8_in0.norm2.weight",
                 "model.out_norm.weight", "model.out_conv.weight"]:
        assert name in keys, name
    assert "model.map_label.bias" not in keys  # ADM's label embedding has no bias
    assert keys["model.enc.16x16_block0.affine.weight"].shape == (64, 128)  # adaptive scale: 2 x out_channels
    x = torch.randn(2, 3, 16, 16)
    a = net(x, 0.7, class_labels=torch.eye(10)[[0, 1]])
    b = net(x, 0.7, class_labels=torch.eye(10)[[5, 6]])
    assert a.shape == x.shape and a.dtype == torch.float32
    assert (a - b).abs().max() > 1e-4
    assert isinstance(net.model, DhariwalUNet)


def test_edm_preconditioning_formula():
    net = tiny_net(**SONG_16)
    x = torch.randn(3, 3, 16, 16)
    sigma = torch.tensor([0.02, 1.0, 60.0])
    s = sigma.reshape(-1, 1, 1, 1)
    sd = net.sigma_data
    with torch.no_grad():
        F_x = net.model(x / (s ** 2 + sd ** 2).sqrt(), sigma.log() / 4)
        expected = sd ** 2 / (s ** 2 + sd ** 2) * x + s * sd / (s ** 2 + sd ** 2).sqrt() * F_x
        got = net(x, sigma)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(net.round_sigma(0.3), torch.as_tensor(0.3))


def test_sigma_forms_broadcast_over_batch():
    net = tiny_net(**SONG_16)
    x = torch.randn(3, 3, 16, 16)
    ref = net(x, torch.full([3], 2.5))
    torch.testing.assert_close(net(x, 2.5), ref)
    torch.testing.assert_close(net(x, torch.tensor(2.5)), ref)
    mixed = net(x, torch.tensor([0.1, 2.5, 9.0]))
    torch.testing.assert_close(mixed[1:2], net(x[1:2], 2.5), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="sigma"):
        net(x, torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("arch", [SONG_16, ADM_16], ids=["song", "adm"])
def test_zeroed_step_layers_reproduce_the_plain_network(arch):
    plain = tiny_net(**arch)
    step = share_weights(EDMPrecond(**arch, use_step_condition=True), plain).eval()
    with torch.no_grad():  # affine_step = 0 makes the step path a no-op in both block kinds
        for name, p in step.named_parameters():
            if "affine_step" in name:
                p.zero_()
    x = torch.randn(2, 3, 16, 16)
    labels = torch.eye(10)[[3, 4]] if arch.get("label_dim") else None
    torch.testing.assert_close(step(x, 0.8, labels, step_condition=5), plain(x, 0.8, labels), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", [SONG_16, ADM_16], ids=["song", "adm"])
def test_step_condition_changes_output_only_through_new_layers(arch):
    net = tiny_net(**arch, use_step_condition=True)
    new = {k for k in net.state_dict() if is_step_layer_key(k)}
    assert {"model.map_step_layer0.weight", "model.map_step_layer1.weight", "model.enc.16x16_block0.affine_step.weight"} <= new
    x = torch.randn(2, 3, 16, 16)
    out4, out5 = net(x, 1.0, step_condition=4), net(x, 1.0, step_condition=5)
    assert (out4 - out5).abs().max() > 1e-4
    torch.testing.assert_close(net(x, 1.0, step_condition=torch.tensor(4)), out4)
    with pytest.raises(ValueError, match="step_condition"):
        net(x, 1.0)


@pytest.mark.parametrize("arch", [SONG_16, ADM_16], ids=["song", "adm"])
def test_step_condition_reaches_every_encoder_and_decoder_block(arch):
    net = tiny_net(**arch, use_step_condition=True)
    unet = net.model
    blocks = {f"{part}.{name}": block for part in ("enc", "dec") for name, block in getattr(unet, part).items()
              if isinstance(block, UNetBlock)}
    assert any(name.startswith("dec.") for name in blocks)
    received = {}

    def record(name):
        def hook(module, args, kwargs):
            received[name] = args[2] if len(args) > 2 else kwargs.get("emb_step")
        return hook

    hooks = [block.register_forward_pre_hook(record(name), with_kwargs=True) for name, block in blocks.items()]
    x = torch.randn(2, 3, 16, 16)
    labels = torch.eye(10)[[3, 4]] if arch.get("label_dim") else None
    try:
        with torch.no_grad():
            net(x, 1.0, labels, step_condition=5)
    finally:
        for h in hooks:
            h.remove()
    expected = unet.embed_step(torch.full([2], 5.0))
    for name in blocks:  # every block receives the step embedding
        assert received[name] is not None, name
        torch.testing.assert_close(received[name], expected, msg=name)

    # And it acts there: zeroing only the decoder's affine_step changes D(x); zeroing the encoder's too removes
    # the rest of the step condition's effect.
    def with_zeroed(parts):
        copy = tiny_net(**arch, use_step_condition=True)
        copy.load_state_dict(net.state_dict())
        with torch.no_grad():
            for name, p in copy.named_parameters():
                if "affine_step" in name and name.split(".")[1] in parts:
                    p.zero_()
            return copy(x, 1.0, labels, step_condition=5)

    with torch.no_grad():
        full, step7 = net(x, 1.0, labels, step_condition=5), net(x, 1.0, labels, step_condition=7)
    no_dec, none = with_zeroed({"dec"}), with_zeroed({"enc", "dec"})
    effect = (full - none).abs().max()
    assert (full - no_dec).abs().max() > 0.05 * effect, ((full - no_dec).abs().max(), effect)
    assert (full - step7).abs().max() > 1e-4


@pytest.mark.parametrize("arch", [SONG_16, dict(ADM_16, label_dim=0)], ids=["song", "adm"])
def test_step_embedding_takes_the_noise_path(arch):
    # Paper's code: map_step is the same embedding as map_noise (SongUNet with its sin/cos swap, ADM_16
    # without), then two SiLU layers. With the noise path's weights copied in, both give the same vector.
    unet = tiny_net(**dict(arch, augment_dim=0), use_step_condition=True).model
    with torch.no_grad():
        unet.map_step_layer0.load_state_dict(unet.map_layer0.state_dict())
        unet.map_step_layer1.load_state_dict(unet.map_layer1.state_dict())
    steps = torch.tensor([3.0, 4.0, 7.0])
    torch.testing.assert_close(unet.embed_step(steps), unet.embed_noise(steps))


def test_step_wiring_inside_blocks():
    torch.manual_seed(0)
    x, emb, emb_step = torch.randn(1, 32, 8, 8), torch.randn(1, 64), torch.randn(1, 64)
    with torch.no_grad():
        # Non-adaptive (SongUNet): affine_step(emb_step) is added next to affine(emb), before norm1.
        block = perturbed(UNetBlock(32, 32, 64, adaptive_scale=False, use_step_condition=True))
        folded = perturbed(UNetBlock(32, 32, 64, adaptive_scale=False))
        folded.load_state_dict({k: v for k, v in block.state_dict().items() if "affine_step" not in k})
        folded.affine.bias += block.affine_step(emb_step)[0]
        torch.testing.assert_close(block(x, emb, emb_step), folded(x, emb), rtol=1e-5, atol=1e-5)

        # Adaptive (ADM_16): norm1(x)(1+s)+h, then (.)(1+s')+h', i.e. one scale (1+s)(1+s')-1, shift h(1+s')+h'.
        block = perturbed(UNetBlock(32, 32, 64, adaptive_scale=True, use_step_condition=True))
        folded = perturbed(UNetBlock(32, 32, 64, adaptive_scale=True))
        folded.load_state_dict({k: v for k, v in block.state_dict().items() if "affine_step" not in k})
        scale, shift = block.affine(emb)[0].chunk(2)
        scale_step, shift_step = block.affine_step(emb_step)[0].chunk(2)
        folded.affine.weight.zero_()
        folded.affine.bias.copy_(torch.cat([(1 + scale) * (1 + scale_step) - 1, shift * (1 + scale_step) + shift_step]))
        torch.testing.assert_close(block(x, emb, emb_step), folded(x, emb), rtol=1e-5, atol=1e-5)


def test_step_layers_are_initialised_like_their_neighbours():
    torch.manual_seed(0)
    net = EDMPrecond(**SONG_16, use_step_condition=True)
    block = net.model.enc["16x16_block0"]
    assert block.affine_step.weight.shape == block.affine.weight.shape
    ratio = block.affine_step.weight.std() / block.affine.weight.std()
    assert 0.8 < ratio < 1.25  # Xavier like `affine`, not zero
    assert net.model.map_step_layer0.weight.abs().sum() > 0


def test_init_kwargs_rebuild_the_same_architecture():
    for kwargs in (SONG_16, ADM_16, dict(SONG_16, use_step_condition=True)):
        net = EDMPrecond(**kwargs)
        again = EDMPrecond(**json.loads(json.dumps(net.init_kwargs)))
        assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}
        assert again.init_kwargs == net.init_kwargs
    assert EDMPrecond(**SONG_16).use_step_condition is False


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="model_type"):
        EDMPrecond(img_resolution=8, img_channels=1, model_type="NoSuchUNet")
    with pytest.raises(ValueError, match="embedding_type"):
        EDMPrecond(**dict(SONG_16, embedding_type="learned"))


class StubUNet(torch.nn.Module):
    """Stands in for the U-Net F: records what the preconditioner feeds it and returns a fixed tensor."""

    def __init__(self, out):
        super().__init__()
        self.out = out
        self.calls = []

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None, step_condition=None):
        self.calls.append((x.clone(), noise_labels.clone()))
        return self.out


def iddpm_levels(M=1000, C_1=0.001, C_2=0.008):
    """EDM Table 1 (iDDPM): u_M = 0, u_{j-1} = sqrt((u_j² + 1) / max(ᾱ_{j-1}/ᾱ_j, C_1) - 1),
    ᾱ_j = sin²(π/2 · j / (M (C_2 + 1))), in float64."""
    alpha_bar = np.sin(0.5 * np.pi * np.arange(M + 1) / M / (C_2 + 1)) ** 2
    u = np.zeros(M + 1)
    for j in range(M, 0, -1):
        u[j - 1] = np.sqrt((u[j] ** 2 + 1) / max(alpha_bar[j - 1] / alpha_bar[j], C_1) - 1)
    return u


def table1(cls, sigma):
    """(c_skip, c_out, c_in, c_noise) of EDM's Table 1 (Karras et al. 2022) for float64 sigmas, written out
    from the paper; VP with beta_d = 19.9, beta_min = 0.1, M = 1000 and iDDPM with M = 1000."""
    one = np.ones_like(sigma)
    if cls is EDMPrecond:
        sd = 0.5
        return sd ** 2 / (sigma ** 2 + sd ** 2), sigma * sd / np.sqrt(sigma ** 2 + sd ** 2), \
            1 / np.sqrt(sigma ** 2 + sd ** 2), np.log(sigma) / 4
    if cls is VPPrecond:
        beta_d, beta_min, M = 19.9, 0.1, 1000
        t = (np.sqrt(beta_min ** 2 + 2 * beta_d * np.log(sigma ** 2 + 1)) - beta_min) / beta_d  # sigma^-1
        return one, -sigma, 1 / np.sqrt(sigma ** 2 + 1), (M - 1) * t
    if cls is VEPrecond:
        return one, sigma, one, np.log(0.5 * sigma)
    u = iddpm_levels()
    index = np.abs(sigma[:, None] - u[None, :]).argmin(1)
    return one, -sigma, 1 / np.sqrt(sigma ** 2 + 1), 1000 - 1 - index.astype(np.float64)


PRECOND_SIGMAS = {
    EDMPrecond: [0.002, 0.3, 1.0, 80.0],
    VPPrecond: [0.0015, 0.3, 2.0, 150.0],
    VEPrecond: [0.02, 0.7, 5.0, 100.0],
    # iDDPM: levels u_j themselves and points a tenth of the way to a neighbour (never near a midpoint)
    iDDPMPrecond: [float(iddpm_levels()[j] + f * (iddpm_levels()[j - 1] - iddpm_levels()[j]))
                   for j, f in ((999, 0.0), (700, 0.1), (400, 0.0), (100, 0.1), (1, 0.0))],
}


@pytest.mark.parametrize("cls", [EDMPrecond, VPPrecond, VEPrecond, iDDPMPrecond])
def test_preconditioners_follow_edm_table_1(cls):
    """D(x) = c_skip x + c_out F(c_in x, c_noise): what reaches F and what comes back, against Table 1."""
    arch = ADM_16 if cls is iDDPMPrecond else SONG_16
    net = tiny_net(cls, **arch)
    sigma = np.array(PRECOND_SIGMAS[cls])
    batch = len(sigma)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 16, 16, generator=g)
    F = torch.randn(batch, 3 * net.model_out_factor, 16, 16, generator=g)  # iDDPM's F also returns variances
    net.model = StubUNet(F)
    labels = torch.eye(10)[:batch] if arch is ADM_16 else None
    D = net(x, torch.tensor(sigma, dtype=torch.float32), class_labels=labels)

    c_skip, c_out, c_in, c_noise = (torch.tensor(c, dtype=torch.float32).reshape(-1, 1, 1, 1)
                                    for c in table1(cls, sigma))
    (fed_x, fed_noise), = net.model.calls
    torch.testing.assert_close(fed_x, c_in * x, rtol=1e-5, atol=1e-6)
    # VP's sigma^-1 takes log(1 + sigma²) in float32, as EDM does: an absolute error up to ulp(1)/2 = 6e-8 there,
    # times d c_noise / d log(1 + sigma²) <= 999/beta_min ~ 1e4 at small sigma, is up to 6e-4.
    torch.testing.assert_close(fed_noise, c_noise.flatten(), rtol=1e-5, atol=1e-3 if cls is VPPrecond else 1e-5)
    torch.testing.assert_close(D, c_skip * x + c_out * F[:, :3], rtol=1e-5, atol=1e-5)


def test_vp_and_iddpm_noise_ranges_follow_edm():
    vp = VPPrecond(**SONG_16)
    sigma_vp = lambda t: math.sqrt(math.exp(0.5 * 19.9 * t ** 2 + 0.1 * t) - 1)  # EDM Table 1, VP sigma(t)
    # EDM evaluates exp(~1e-6) - 1 in float32, as we do: a few ulps of 1 out of 1e-6, i.e. up to ~10% on sigma_min.
    assert vp.sigma_min == pytest.approx(sigma_vp(1e-5), rel=0.1)
    assert vp.sigma_max == pytest.approx(sigma_vp(1.0), rel=1e-6)
    ddpm = iDDPMPrecond(**ADM_16)
    u = iddpm_levels()
    # EDM runs the recursion in float32: each step scales u² + 1 with a relative error of ~1e-7, so after 1000 steps
    # u² + 1 is within 1e-4 relative (u itself loses more where u² << 1, hence the comparison on u² + 1).
    np.testing.assert_allclose(ddpm.u.double().numpy() ** 2 + 1, u ** 2 + 1, rtol=1e-4, atol=0)
    assert ddpm.sigma_min == float(ddpm.u[999]) and ddpm.sigma_max == float(ddpm.u[0])
    snapped = ddpm.round_sigma(torch.tensor([u[500] * 1.001, u[20] * 0.999]))
    torch.testing.assert_close(snapped, ddpm.u[[500, 20]].double(), rtol=0, atol=0)  # the nearest level itself


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_runs_the_convolutions_in_half_on_cuda_only_and_stays_close(device):
    """EDM's use_fp16: float16 convolutions and a float32 result close to fp32 on CUDA; on a CPU the same calls run
    in float32 and give the fp32 result exactly (EDM casts to float16 on CUDA only)."""
    net = tiny_net(**SONG_16).to(device)
    x = torch.randn(2, 3, 16, 16, device=device)
    with torch.no_grad():
        ref, ref_dtypes = convolution_dtypes(lambda: net(x, 1.0))
        net.use_fp16 = True
        half, half_dtypes = convolution_dtypes(lambda: net(x, 1.0))
        forced = net(x, 1.0, force_fp32=True)
    assert half.dtype == torch.float32 and ref_dtypes == {torch.float32}
    torch.testing.assert_close(forced, ref)  # force_fp32 overrides use_fp16
    if device == "cuda":
        assert half_dtypes == {torch.float16}
        assert 0 < (half - ref).abs().max() < 2e-2 * ref.abs().max()
    else:
        assert half_dtypes == {torch.float32} and torch.equal(half, ref)
