"""OpenAI's U-Net of the `lsun_bedroom` teacher: ours (`models.unet.OpenAIUNet`) against diffusers' UNet2DModel
with the same weights. Prints the median forward time of each and their largest relative difference.

Examples:
python benchmarks/bench_openai_unet.py                          # real widths at 64x64, batch 2 (CPU-sized)
python benchmarks/bench_openai_unet.py --resolution=256 --batch=8 --device=cuda
"""

import os
import statistics
import sys
import time

import click
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks import common  # noqa: E402


def diffusers_unet(state, resolution, widths, levels_with_attention, num_blocks, channels_per_head):
    """diffusers' UNet2DModel with the architecture of `models.unet.OpenAIUNet`, loaded strictly from tensors
    under the released file's keys (`state`) by a key map."""
    from torch_utils.torchvision_compat import allow_import

    allow_import()  # diffusers imports torchvision, whose index wheel fails to import beside a CPU-only torch
    from diffusers import UNet2DModel

    levels = len(levels_with_attention)
    mapped = {}

    def copy(src, dst, names):
        for key, value in state.items():
            for ours, theirs in names.items():
                if key == f"{src}.{ours}":
                    mapped[f"{dst}.{theirs}"] = value

    def resnet(src, dst):
        copy(src, dst, {f"{a}.{p}": f"{b}.{p}" for a, b in (("in_layers.0", "norm1"), ("in_layers.2", "conv1"),
                                                           ("emb_layers.1", "time_emb_proj"), ("out_layers.0", "norm2"),
                                                           ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut"))
                        for p in ("weight", "bias")})

    def attention(src, dst):
        copy(src, dst, {"norm.weight": "group_norm.weight", "norm.bias": "group_norm.bias"})
        for p in ("weight", "bias"):
            q, k, v = state[f"{src}.qkv.{p}"].chunk(3, dim=0)  # [q | k | v]: plain thirds
            for name, part in (("to_q", q), ("to_k", k), ("to_v", v)):
                mapped[f"{dst}.{name}.{p}"] = part.reshape(part.shape[0], -1) if p == "weight" else part
            out = state[f"{src}.proj_out.{p}"]
            mapped[f"{dst}.to_out.0.{p}"] = out.reshape(out.shape[0], -1) if p == "weight" else out

    copy("time_embed", "time_embedding", {f"{a}.{p}": f"{b}.{p}" for a, b in (("0", "linear_1"), ("2", "linear_2"))
                                          for p in ("weight", "bias")})
    copy("input_blocks.0.0", "conv_in", {"weight": "weight", "bias": "bias"})
    n = 1
    for level, attends in enumerate(levels_with_attention):
        for j in range(num_blocks):
            resnet(f"input_blocks.{n}.0", f"down_blocks.{level}.resnets.{j}")
            if attends:
                attention(f"input_blocks.{n}.1", f"down_blocks.{level}.attentions.{j}")
            n += 1
        if level < levels - 1:
            resnet(f"input_blocks.{n}.0", f"down_blocks.{level}.downsamplers.0")
            n += 1
    resnet("middle_block.0", "mid_block.resnets.0")
    attention("middle_block.1", "mid_block.attentions.0")
    resnet("middle_block.2", "mid_block.resnets.1")
    n = 0
    for up, level in enumerate(reversed(range(levels))):
        attends = levels_with_attention[level]
        for j in range(num_blocks + 1):
            resnet(f"output_blocks.{n}.0", f"up_blocks.{up}.resnets.{j}")
            if attends:
                attention(f"output_blocks.{n}.1", f"up_blocks.{up}.attentions.{j}")
            if level and j == num_blocks:
                resnet(f"output_blocks.{n}.{2 if attends else 1}", f"up_blocks.{up}.upsamplers.0")
            n += 1
    copy("out", "conv_norm_out", {"0.weight": "weight", "0.bias": "bias"})
    copy("out", "conv_out", {"2.weight": "weight", "2.bias": "bias"})

    down = ["AttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in levels_with_attention]
    up = ["AttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in reversed(levels_with_attention)]
    model = UNet2DModel(sample_size=resolution, in_channels=3, out_channels=3, block_out_channels=widths,
                        layers_per_block=num_blocks, down_block_types=down, up_block_types=up,
                        downsample_type="resnet", upsample_type="resnet", attention_head_dim=channels_per_head,
                        flip_sin_to_cos=True, freq_shift=0, norm_num_groups=32, norm_eps=1e-5)
    model.load_state_dict(mapped, strict=True)
    return model.eval()


def _median_seconds(fn, repeats, device):
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


@click.command(help=__doc__)
@click.option("--resolution", type=int, default=64, show_default=True, help="Image size (the release: 256)")
@click.option("--model_channels", type=int, default=256, show_default=True, help="Base width (the release: 256)")
@click.option("--batch", type=int, default=2, show_default=True)
@click.option("--repeats", type=int, default=5, show_default=True, help="Timed forward passes per network")
@click.option("--device", default=None, help="Device  [default: cuda if available]")
def main(resolution, model_channels, batch, repeats, device):
    from models.unet import OpenAIUNet

    device = common.pick_device(device)
    mult, attn = (1, 1, 2, 2, 4, 4), [r for r in (32, 16, 8) if r <= resolution]
    levels = [resolution >> i for i in range(len(mult))]
    torch.manual_seed(0)
    ours = OpenAIUNet(img_resolution=resolution, in_channels=3, out_channels=3, model_channels=model_channels,
                      channel_mult=mult, attn_resolutions=attn).eval()
    state = ours.state_dict()
    theirs = diffusers_unet(state, resolution, [model_channels * m for m in mult], [r in attn for r in levels], 2, 64)
    ours, theirs = ours.to(device), theirs.to(device)
    x = torch.randn(batch, 3, resolution, resolution, device=device)
    noise = torch.full([batch], 0.3, device=device)  # c_noise = ln(sigma) / 4
    with torch.no_grad():
        a, b = ours(x, noise), theirs(x, 1000 * noise).sample
        t_ours = _median_seconds(lambda: ours(x, noise), repeats, device)
        t_theirs = _median_seconds(lambda: theirs(x, 1000 * noise), repeats, device)
    rel = float((a - b).abs().max() / b.abs().max())
    print(f"OpenAI U-Net, {common.num_params(ours) / 1e6:.1f}M parameters, {resolution}x{resolution}, batch {batch}, "
          f"{device}, {torch.get_num_threads()} threads, median of {repeats}:")
    print(f"  ours (models.unet.OpenAIUNet)  {t_ours * 1000:9.1f} ms")
    print(f"  diffusers UNet2DModel          {t_theirs * 1000:9.1f} ms   ratio ours/diffusers {t_ours / t_theirs:.2f}")
    print(f"  max |ours - diffusers| / max |diffusers| = {rel:.2e}")


if __name__ == "__main__":
    main()
