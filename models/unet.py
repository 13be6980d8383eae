"""OpenAI's U-Net (Dhariwal & Nichol's UNetModel, as CompVis and Consistency Models ship it) with those parameter
names, plus SFD-v's step layers.

`LatentUNet` covers the backbones SFD distils in latent space:
  - the unconditional LDM U-Net of the LSUN-bedroom / FFHQ checkpoints: "legacy" self-attention blocks
    (`norm`, fused `qkv`, `proj_out`) whose fused qkv is laid out head by head;
  - the Stable Diffusion v1 U-Net: cross-attention "spatial transformers" fed the CLIP text embedding.
`OpenAIUNet` is the pixel-space `lsun_bedroom` teacher (see its section below).

Module names and nesting follow `UNetModel` (input_blocks.i.j, middle_block, output_blocks,
in_layers/emb_layers/out_layers, ...), so a released checkpoint loads by name, with no renaming and no splitting
of the fused qkv. Weights start from PyTorch's default init; released checkpoints overwrite everything but
SFD-v's layers.

SFD-v (SFD paper, "variable NFEs"): with `use_step_condition=True` the step number goes through the same
sinusoidal embedding as the timestep and an MLP `nfe_embed`, and every ResBlock adds `emb_nfe_layers(emb_nfe)`
next to its timestep term, as in the paper's code (names included).
"""
import math

import torch
from torch import nn
from torch.nn import functional as F

from .edm import RecordedModule



def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (possibly fractional or negative) timesteps, cosines first as in LDM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """Group normalisation computed in float32 whatever the activation dtype (as LDM does)."""

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


def normalization(channels):
    return GroupNorm32(32, channels)


def _resample(x, updown):
    """OpenAI's parameter-free 2x resampling: average pooling down, nearest-neighbour up."""
    if updown == "down":
        return F.avg_pool2d(x, kernel_size=2, stride=2)
    return F.interpolate(x, scale_factor=2, mode="nearest")


class ResBlock(nn.Module):
    """Residual block; h = conv(act(norm(x))) + emb term (+ step term), then a second conv. No scale-shift
    norm: none of the configurations SFD uses turns it on. updown 'down'/'up': a resampling block that resizes
    both paths after the first normalisation (OpenAI's resblock_updown)."""

    def __init__(self, channels, emb_channels, dropout, out_channels=None, use_step_condition=False, updown=None):
        super().__init__()
        out_channels = out_channels or channels
        self.updown = updown
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(normalization(out_channels), nn.SiLU(), nn.Dropout(p=dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        if use_step_condition:
            self.emb_nfe_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb, emb_nfe=None):
        if self.updown is None:
            h = self.in_layers(x)
        else:
            h = self.in_layers[-1](_resample(self.in_layers[:-1](x), self.updown))
            x = _resample(x, self.updown)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if emb_nfe is not None:
            h = h + self.emb_nfe_layers(emb_nfe).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Self-attention with one fused 1x1-conv qkv. layout 'legacy' (LDM): qkv channels are [head][q|k|v][channel];
    'split' (OpenAI's flash layout, Consistency Models): [q|k|v][head][channel]. conv_dims: 1 (LDM's Conv1d
    weights) or 2 (Conv2d)."""

    def __init__(self, channels, num_heads, layout="legacy", conv_dims=1):
        super().__init__()
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"attention: {channels} channels do not split into {num_heads} heads (the heads are too "
                             f"wide for this level, or do not divide it)")
        if layout not in ("legacy", "split") or conv_dims not in (1, 2):
            raise ValueError(f"attention: layout {layout!r} / conv_dims {conv_dims!r} not in legacy|split / 1|2")
        self.num_heads, self.layout, self.conv_dims = num_heads, layout, conv_dims
        conv = nn.Conv1d if conv_dims == 1 else nn.Conv2d
        self.norm = normalization(channels)
        self.qkv = conv(channels, channels * 3, 1)
        self.proj_out = conv(channels, channels, 1)

    def forward(self, x, *unused):
        b, c, *spatial = x.shape
        flat = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(flat if self.conv_dims == 1 else x)).reshape(b, 3 * c, -1)
        length, heads = qkv.shape[-1], self.num_heads
        if self.layout == "legacy":
            q, k, v = qkv.reshape(b * heads, 3 * c // heads, length).chunk(3, dim=1)
        else:
            q, k, v = (part.reshape(b * heads, c // heads, length) for part in qkv.chunk(3, dim=1))
        h = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        h = h.transpose(1, 2).reshape(b, c, length)
        h = self.proj_out(h if self.conv_dims == 1 else h.reshape(b, c, *spatial))
        return (flat + h.reshape(b, c, length)).reshape(b, c, *spatial)


class CrossAttention(nn.Module):
    def __init__(self, query_dim, heads, dim_head, context_dim=None, dropout=0.0):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        b, n, inner = q.shape
        q, k, v = (t.reshape(b, t.shape[1], self.heads, inner // self.heads).transpose(1, 2) for t in (q, k, v))
        h = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(h.transpose(1, 2).reshape(b, n, inner))


class GatedMLP(nn.Module):
    """A transformer block's position-wise MLP with a GELU gate: one linear map widens each token to a value half
    and a gate half (mult * dim each), value * gelu(gate) is narrowed back to dim.

    Parameter names are the checkpoints': the widening map is `net.0.proj` (value rows, then gate rows), the
    narrowing one `net.2`; `net.1` is the dropout between them and holds no parameters."""

    def __init__(self, dim, mult=4, dropout=0.0):
        super().__init__()
        width = dim * mult
        widen = nn.ModuleDict(dict(proj=nn.Linear(dim, 2 * width)))
        self.net = nn.ModuleList([widen, nn.Dropout(dropout), nn.Linear(width, dim)])

    def forward(self, x):
        widen, dropout, narrow = self.net
        value, gate = widen["proj"](x).chunk(2, dim=-1)
        return narrow(dropout(value * F.gelu(gate)))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, heads, dim_head, context_dim, dropout=0.0):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, dim_head, dropout=dropout)
        self.ff = GatedMLP(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim=context_dim, dropout=dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Stable Diffusion's cross-attention block over the feature map (1x1-conv projections)."""

    def __init__(self, channels, heads, dim_head, depth, context_dim):
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)])
        self.proj_out = nn.Conv2d(inner, channels, 1)

    def forward(self, x, context):
        b, c, height, width = x.shape
        h = self.proj_in(self.norm(x))
        h = h.reshape(b, h.shape[1], height * width).transpose(1, 2)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = h.transpose(1, 2).reshape(b, -1, height, width)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TimestepSequential(nn.Sequential):
    """Runs its layers in order, giving each the inputs it takes (emb for ResBlocks, context for transformers)."""

    def forward(self, x, emb, context=None, emb_nfe=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, emb_nfe)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class LatentUNet(nn.Module):
    """CompVis' UNetModel for the configurations SFD loads (keyword names as in the CompVis YAML configs)."""

    def __init__(self, in_channels, out_channels, model_channels, num_res_blocks, attention_resolutions,
                 channel_mult=(1, 2, 4, 8), dropout=0.0, num_heads=-1, num_head_channels=-1,
                 use_spatial_transformer=False, transformer_depth=1, context_dim=None, legacy=True,
                 use_step_condition=False, resblock_updown=False, attention_layout="legacy", attention_conv_dims=1):
        # `legacy` only changed how CompVis derived the head width; for every configuration here the heads
        # come out as num_heads (or channels // num_head_channels), each channels // heads wide.
        super().__init__()
        if use_spatial_transformer != (context_dim is not None):
            raise ValueError("LatentUNet: a spatial transformer needs context_dim, and context_dim needs one")
        if (num_heads == -1) == (num_head_channels == -1):
            raise ValueError("LatentUNet: set exactly one of num_heads and num_head_channels")
        self.model_channels = model_channels
        self.use_step_condition = use_step_condition
        emb_dim = model_channels * 4

        def attention(ch):
            heads = num_heads if num_head_channels == -1 else ch // num_head_channels
            if not use_spatial_transformer:
                return AttentionBlock(ch, heads, attention_layout, attention_conv_dims)
            return SpatialTransformer(ch, heads, ch // heads, transformer_depth, context_dim)

        def resblock(ch_in, ch_out, updown=None):
            return ResBlock(ch_in, emb_dim, dropout, ch_out, use_step_condition=use_step_condition, updown=updown)

        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if use_step_condition:
            self.nfe_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        skip_channels, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [resblock(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepSequential(resblock(ch, ch, "down") if resblock_updown
                                                            else Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepSequential(resblock(ch, ch), attention(ch), resblock(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [resblock(ch + skip_channels.pop(), mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                if level and i == num_res_blocks:
                    layers.append(resblock(ch, ch, "up") if resblock_updown else Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepSequential(*layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(), nn.Conv2d(model_channels, out_channels, 3, padding=1))

    def forward(self, x, timesteps, context=None, step_condition=None):
        """x [B, C, H, W]; timesteps [B] (fractional allowed); context [B, L, D] or None; step_condition [B] or None."""
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        emb_nfe = None
        if step_condition is not None and self.use_step_condition:
            emb_nfe = self.nfe_embed(timestep_embedding(step_condition, self.model_channels))
        h, skips = x, []
        for block in self.input_blocks:
            h = block(h, emb, context, emb_nfe)
            skips.append(h)
        h = self.middle_block(h, emb, context, emb_nfe)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context, emb_nfe)
        return self.out(h)


# ----------------------------------------------------------------------------
# The `lsun_bedroom` teacher: the EDM model on LSUN Bedroom 256 released with Consistency Models
# (`edm_bedroom256_ema.pt`), in the form EDM's preconditioners call. Its settings: resampling by ResBlocks
# (average pooling down, nearest up), attention with 64-channel heads whose fused qkv is a Conv2d laid out
# [q|k|v][head][channel], no scale-shift norm; parameter names are the file's keys. The timestep input is
# 1000 c_noise = 250 ln(sigma), as in Consistency Models' denoiser. diffusers' UNet2DModel expresses the plain
# network too (the tests use it as the reference), but SFD-v adds a step term inside every ResBlock, for which it
# has no place; hence this module.


class OpenAIUNet(LatentUNet, RecordedModule):
    """img_resolution, in_channels, out_channels: image size and channels; model_channels * channel_mult[i]:
    channels of level i; num_blocks: ResBlocks per level; attn_resolutions: resolutions with self-attention (and
    the middle block); channels_per_head: attention head width; use_step_condition: SFD-v step layers."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, model_channels=256,
                 channel_mult=(1, 1, 2, 2, 4, 4), num_blocks=2, attn_resolutions=(32, 16, 8), channels_per_head=64,
                 dropout=0.1, use_step_condition=False):
        if label_dim:
            raise ValueError("OpenAIUNet: only the unconditional network (label_dim=0) is supported")
        downsampling = [img_resolution // res for res in attn_resolutions]
        super().__init__(in_channels, out_channels, model_channels, num_blocks, downsampling,
                         channel_mult=channel_mult, dropout=dropout, num_head_channels=channels_per_head,
                         use_step_condition=use_step_condition, resblock_updown=True, attention_layout="split",
                         attention_conv_dims=2)
        self.label_dim = label_dim

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None, step_condition=None):
        # EDM's use_fp16 hands in float16 activations: run the convolutions in float16 (normalisations stay
        # float32, as in OpenAI's fp16 mode) and return float32.
        with torch.autocast(x.device.type, dtype=torch.float16, enabled=x.dtype == torch.float16):
            out = super().forward(x.float(), 1000 * noise_labels, step_condition=step_condition)
        return out.float()
