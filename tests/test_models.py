"""EDM backbones and preconditioning: EDM parameter names, the denoiser call, SFD-v step layers."""

import json

import pytest
import torch

from models import DhariwalUNet, EDMPrecond, SongUNet, VEPrecond, VPPrecond, iDDPMPrecond
from models.edm import UNetBlock, is_step_layer_key

SONG = dict(img_resolution=16, img_channels=3, model_type="SongUNet", model_channels=16, channel_mult=[1, 2],
            num_blocks=1, attn_resolutions=[8], dropout=0, augment_dim=9, embedding_type="positional",
            encoder_type="standard", decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1])
ADM = dict(img_resolution=16, img_channels=3, label_dim=10, model_type="DhariwalUNet", model_channels=32,
           channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0)


def perturbed(net, seed=0, scale=0.05):
    """EDM zero-initialises output layers; jitter every weight so each one influences D(x)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return net.eval()


def build(cls=EDMPrecond, seed=0, **kwargs):
    torch.manual_seed(seed)
    return perturbed(cls(**kwargs), seed)


def share_weights(dst, src):
    """Copy every tensor of src into dst (dst may have extra step layers)."""
    dst.load_state_dict({**dst.state_dict(), **src.state_dict()}, strict=True)
    return dst


def test_song_unet_shapes_and_edm_names():
    net = build(**SONG)
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
    net = build(**dict(SONG, label_dim=10))
    assert "model.map_label.weight" in net.state_dict() and "model.map_label.bias" in net.state_dict()
    x = torch.randn(2, 3, 16, 16)
    a = net(x, 1.0, class_labels=torch.eye(10)[[0, 1]])
    b = net(x, 1.0, class_labels=torch.eye(10)[[2, 3]])
    assert (a - b).abs().max() > 1e-4


def test_dhariwal_unet_shapes_names_and_labels():
    net = build(**ADM)
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
    net = build(**SONG)
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
    net = build(**SONG)
    x = torch.randn(3, 3, 16, 16)
    ref = net(x, torch.full([3], 2.5))
    torch.testing.assert_close(net(x, 2.5), ref)
    torch.testing.assert_close(net(x, torch.tensor(2.5)), ref)
    mixed = net(x, torch.tensor([0.1, 2.5, 9.0]))
    torch.testing.assert_close(mixed[1:2], net(x[1:2], 2.5), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="sigma"):
        net(x, torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("arch", [SONG, ADM], ids=["song", "adm"])
def test_zeroed_step_layers_reproduce_the_plain_network(arch):
    plain = build(**arch)
    step = share_weights(EDMPrecond(**arch, use_step_condition=True), plain).eval()
    with torch.no_grad():  # affine_step = 0 makes the step path a no-op in both block kinds
        for name, p in step.named_parameters():
            if "affine_step" in name:
                p.zero_()
    x = torch.randn(2, 3, 16, 16)
    labels = torch.eye(10)[[3, 4]] if arch.get("label_dim") else None
    torch.testing.assert_close(step(x, 0.8, labels, step_condition=5), plain(x, 0.8, labels), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", [SONG, ADM], ids=["song", "adm"])
def test_step_condition_changes_output_only_through_new_layers(arch):
    net = build(**arch, use_step_condition=True)
    new = {k for k in net.state_dict() if is_step_layer_key(k)}
    assert {"model.map_step_layer0.weight", "model.map_step_layer1.weight", "model.enc.16x16_block0.affine_step.weight"} <= new
    x = torch.randn(2, 3, 16, 16)
    out4, out5 = net(x, 1.0, step_condition=4), net(x, 1.0, step_condition=5)
    assert (out4 - out5).abs().max() > 1e-4
    torch.testing.assert_close(net(x, 1.0, step_condition=torch.tensor(4)), out4)
    with pytest.raises(ValueError, match="step_condition"):
        net(x, 1.0)


@pytest.mark.parametrize("arch", [SONG, dict(ADM, label_dim=0)], ids=["song", "adm"])
def test_step_embedding_takes_the_noise_path(arch):
    # Paper's code: map_step is the same embedding as map_noise (SongUNet with its sin/cos swap, ADM
    # without), then two SiLU layers. With the noise path's weights copied in, both give the same vector.
    unet = build(**dict(arch, augment_dim=0), use_step_condition=True).model
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

        # Adaptive (ADM): norm1(x)(1+s)+h, then (.)(1+s')+h', i.e. one scale (1+s)(1+s')-1, shift h(1+s')+h'.
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
    net = EDMPrecond(**SONG, use_step_condition=True)
    block = net.model.enc["16x16_block0"]
    assert block.affine_step.weight.shape == block.affine.weight.shape
    ratio = block.affine_step.weight.std() / block.affine.weight.std()
    assert 0.8 < ratio < 1.25  # Xavier like `affine`, not zero
    assert net.model.map_step_layer0.weight.abs().sum() > 0


def test_init_kwargs_rebuild_the_same_architecture():
    for kwargs in (SONG, ADM, dict(SONG, use_step_condition=True)):
        net = EDMPrecond(**kwargs)
        again = EDMPrecond(**json.loads(json.dumps(net.init_kwargs)))
        assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}
        assert again.init_kwargs == net.init_kwargs
    assert EDMPrecond(**SONG).use_step_condition is False


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="model_type"):
        EDMPrecond(img_resolution=8, img_channels=1, model_type="NoSuchUNet")
    with pytest.raises(ValueError, match="embedding_type"):
        EDMPrecond(**dict(SONG, embedding_type="learned"))


@pytest.mark.parametrize("cls", [VPPrecond, VEPrecond, iDDPMPrecond])
def test_other_edm_preconditioners_run(cls):
    arch = ADM if cls is iDDPMPrecond else SONG
    net = build(cls, **arch)
    x = torch.randn(2, 3, 16, 16)
    sigma = torch.tensor([net.sigma_min * 2, 1.0]) if cls is not VEPrecond else torch.tensor([0.5, 3.0])
    out = net(x, sigma, class_labels=torch.eye(10)[[1, 2]] if arch is ADM else None)
    assert out.shape == x.shape and torch.isfinite(out).all()
    if cls is iDDPMPrecond:
        snapped = net.round_sigma(torch.tensor([1.0]))
        assert torch.isin(snapped, net.u).all()


@pytest.mark.gpu
def test_fp16_on_cuda_is_close_to_fp32():
    net = build(**SONG).cuda()
    x = torch.randn(2, 3, 16, 16, device="cuda")
    ref = net(x, 1.0)
    net.use_fp16 = True
    half = net(x, 1.0)
    assert half.dtype == torch.float32
    assert (half - ref).abs().max() < 2e-2 * ref.abs().max()
    assert (half - net(x, 1.0, force_fp32=True)).abs().max() > 0
