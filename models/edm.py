"""EDM's U-Net backbones with EDM's parameter names, plus SFD-v's step-condition layers.

SongUNet is DDPM++/NCSN++ (Song et al. 2021) and DhariwalUNet is ADM (Dhariwal & Nichol 2021), both as
re-implemented by EDM (Karras et al. 2022). Parameter names, buffer names and constructor keywords follow
EDM exactly, so the state of EDM's released checkpoints loads strictly.

SFD-v (SFD paper, Sec. 4 "variable NFEs"; design §5): with `use_step_condition=True` a second embedding
path maps the step condition (the student's `num_steps`) through `map_step`, `map_step_layer0`,
`map_step_layer1`, and every UNet block gets an `affine_step` projection of it. Names and wiring match the
paper's code, so networks trained there load here with strict keys.
"""

import functools
import math

import numpy as np
import torch
from torch.nn.functional import silu

from .rebuild import (STEP_LAYER_NAMES, RecordedModule, is_step_layer_key,  # noqa: F401  (models.edm's names)
                      load_state_strict)


# ----------------------------------------------------------------------------
# Layers (EDM's weight initialisation; weights are cast to the activation dtype for fp16 runs).


def weight_init(shape, mode, fan_in, fan_out):
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"unknown init_mode {mode!r}: use xavier_uniform, xavier_normal, kaiming_uniform or kaiming_normal")


def _init_affine(module, weight_shape, bias, init_mode, init_weight, init_bias, fan_in, fan_out):
    """Give `module` a weight of weight_shape (None for an empty shape) and a bias of its first dimension."""
    def draw(shape, gain):
        return torch.nn.Parameter(weight_init(shape, init_mode, fan_in, fan_out) * gain)

    module.weight = draw(weight_shape, init_weight) if weight_shape else None
    module.bias = draw(weight_shape[:1], init_bias) if weight_shape and bias else None


class Linear(RecordedModule):
    def __init__(self, in_features, out_features, bias=True, init_mode="kaiming_normal", init_weight=1, init_bias=0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        _init_affine(self, [out_features, in_features], bias, init_mode, init_weight, init_bias,
                     fan_in=in_features, fan_out=out_features)

    def forward(self, x):
        y = torch.matmul(x, self.weight.to(x.dtype).T)
        return y if self.bias is None else y + self.bias.to(x.dtype)


class Conv2d(RecordedModule):
    """Convolution with optional 2x up/down-sampling by a separable FIR filter (`resample_filter`)."""

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False,
                 resample_filter=(1, 1), fused_resample=False, init_mode="kaiming_normal", init_weight=1, init_bias=0):
        if up and down:
            raise ValueError("Conv2d: up and down cannot both be set")
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        _init_affine(self, [out_channels, in_channels, kernel, kernel] if kernel else [], bias, init_mode, init_weight,
                     init_bias, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = torch.outer(f, f)[None, None] / f.sum().square()
        # Registered even when unused (as None) so the state_dict matches EDM's key for key.
        self.register_buffer("resample_filter", f if up or down else None)

    def forward(self, x):
        w = None if self.weight is None else self.weight.to(x.dtype)
        f = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        w_pad = 0 if w is None else w.shape[-1] // 2
        f_pad = 0 if f is None else (f.shape[-1] - 1) // 2
        fused = self.fused_resample and w is not None  # resampling and convolution share their padding
        if self.up:
            x = _fir_resample(x, 4 * f, max(f_pad - w_pad, 0) if fused else f_pad, up=True)
        if self.down and not fused:
            x = _fir_resample(x, f, f_pad, up=False)
        if w is not None:
            padding = w_pad
            if fused:
                padding = max(w_pad - f_pad, 0) if self.up else w_pad + f_pad
            x = torch.nn.functional.conv2d(x, w, padding=padding)
        if self.down and fused:
            x = _fir_resample(x, f, 0, up=False)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


def _fir_resample(x, taps, padding, up):
    """Depthwise stride-2 filtering of every channel: transposed (2x up) or plain (2x down)."""
    channels = x.shape[1]
    op = torch.nn.functional.conv_transpose2d if up else torch.nn.functional.conv2d
    return op(x, taps.tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=padding)


class GroupNorm(RecordedModule):
    """Group normalisation with at least `min_channels_per_group` channels a group; affine in the input dtype."""

    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups, self.eps = min(num_groups, num_channels // min_channels_per_group), eps
        self.weight, self.bias = (torch.nn.Parameter(torch.full([num_channels], value)) for value in (1.0, 0.0))

    def forward(self, x):
        scale, shift = self.weight.to(x.dtype), self.bias.to(x.dtype)
        return torch.nn.functional.group_norm(x, self.num_groups, scale, shift, self.eps)


class UNetBlock(RecordedModule):
    """EDM's unified residual block (DDPM++, NCSN++ and ADM), optionally with self-attention.

    With `use_step_condition`, `affine_step` adds the step embedding next to the noise embedding:
    non-adaptive (SongUNet): x = silu(norm1(x + affine(emb) + affine_step(emb_step)));
    adaptive (DhariwalUNet): x = norm1(x)*(1+scale)+shift, then x = silu(x*(1+scale_step)+shift_step).
    """

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 num_heads=None, channels_per_head=64, dropout=0, skip_scale=1, eps=1e-5,
                 resample_filter=(1, 1), resample_proj=False, adaptive_scale=True,
                 init=None, init_zero=None, init_attn=None, use_step_condition=False):
        super().__init__()
        init = dict(init or {})
        init_zero = dict(init_zero) if init_zero is not None else dict(init_weight=0)
        heads = (num_heads if num_heads is not None else out_channels // channels_per_head) if attention else 0
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        self.num_heads, self.dropout, self.skip_scale, self.adaptive_scale = heads, dropout, skip_scale, adaptive_scale
        resample = dict(up=up, down=down, resample_filter=resample_filter)
        emb_width = 2 * out_channels if adaptive_scale else out_channels  # (scale, shift) or a shift only

        # Main path, then the shortcut: a projection when the width changes (or with resample_proj), otherwise
        # the bare resampling of the input, or the input itself.
        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=3, **resample, **init)
        self.affine = Linear(in_features=emb_channels, out_features=emb_width, **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=3, **init_zero)
        # SFD-v: initialised like its neighbour `affine` (not zero), as in the paper's code.
        self.affine_step = Linear(in_features=emb_channels, out_features=emb_width, **init) if use_step_condition else None
        widened = out_channels != in_channels
        self.skip = None
        if widened or up or down:
            self.skip = Conv2d(in_channels=in_channels, out_channels=out_channels,
                               kernel=1 if resample_proj or widened else 0, **resample, **init)
        if heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(in_channels=out_channels, out_channels=3 * out_channels, kernel=1,
                              **(init if init_attn is None else init_attn))
            self.proj = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=1, **init_zero)

    def forward(self, x, emb, emb_step=None):
        orig = x
        x = self.conv0(silu(self.norm0(x)))

        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        step = emb_step is not None and self.affine_step is not None
        params_step = self.affine_step(emb_step)[:, :, None, None].to(x.dtype) if step else None
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = torch.addcmul(shift, self.norm1(x), scale + 1)
            if step:
                scale_step, shift_step = params_step.chunk(chunks=2, dim=1)
                x = torch.addcmul(shift_step, x, scale_step + 1)
            x = silu(x)
        else:
            x = x + params
            if step:
                x = x + params_step
            x = silu(self.norm1(x))

        x = self.conv1(torch.nn.functional.dropout(x, p=self.dropout, training=self.training))
        x = x + (self.skip(orig) if self.skip is not None else orig)
        x = x * self.skip_scale

        if self.num_heads:
            x = (self.proj(self._attention(self.norm2(x))) + x) * self.skip_scale
        return x

    def _attention(self, h):
        # EDM: per head, softmax(q^T k / sqrt(channels per head)) over positions, applied to v.
        # scaled_dot_product_attention computes the same (softmax accumulated in fp32 on CUDA kernels).
        n, c, height, width = h.shape
        heads, ch = self.num_heads, c // self.num_heads
        q, k, v = self.qkv(h).reshape(n * heads, ch, 3, height * width).unbind(2)
        q, k, v = (t.transpose(1, 2).reshape(n, heads, height * width, ch) for t in (q, k, v))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return a.reshape(n * heads, height * width, ch).transpose(1, 2).reshape(n, c, height, width)


def _cos_sin(x, freqs):
    """One row [cos(x f) for f in freqs, sin(x f) for f in freqs] per element x."""
    angles = torch.outer(x, freqs.to(x.dtype))
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class PositionalEmbedding(RecordedModule):
    """Sinusoidal embedding with frequencies max_positions^(-i/(C/2 - endpoint)), i < C/2."""

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x):
        half = self.num_channels // 2
        exponents = torch.arange(half, dtype=torch.float32, device=x.device) / (half - int(self.endpoint))
        return _cos_sin(x, (1 / self.max_positions) ** exponents)


class FourierEmbedding(RecordedModule):
    """Random Fourier features (NCSN++); `freqs` is a buffer, so it travels with the checkpoint."""

    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        return _cos_sin(x, 2 * np.pi * self.freqs)


def _swap_sin_cos(emb):
    # DDPM++ orders its sinusoidal embedding [sin, cos]; EDM emulates it by flipping halves.
    return emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)


def _dropped_labels(class_labels, label_dropout, training):
    if training and label_dropout:
        keep = torch.rand([class_labels.shape[0], 1], device=class_labels.device) >= label_dropout
        return class_labels * keep.to(class_labels.dtype)
    return class_labels


# ----------------------------------------------------------------------------
# The two U-Nets share one layout. Level i works at resolution img_resolution / 2**i; its blocks have
# model_channels * channel_mult[i] channels. The encoder visits the levels finest first: a stem convolution
# (level 0) or a downsampling block, then `num_blocks` blocks, every output kept as a skip connection. The
# decoder visits them coarsest first: two middle blocks (coarsest level) or an upsampling block, then
# `num_blocks + 1` blocks that each take one skip. Module names ("16x16_block0", "8x8_in0", ...) are the keys
# of EDM's checkpoints.


class _LevelUNet(RecordedModule):
    """Encoder/decoder walk shared by SongUNet and DhariwalUNet; subclasses define the embeddings and the head."""

    def _build_levels(self, img_resolution, in_channels, out_channels, stem_channels, widths, num_blocks,
                      attn_resolutions, new_block, init, init_zero, attend_all_decoder_blocks,
                      resample_filter=(1, 1), encoder_type="standard", decoder_type=None):
        """Create `enc` and `dec`. decoder_type None: no image head (ADM); 'standard'/'skip': NCSN++ heads."""
        self.tags = [f"{img_resolution >> i}x{img_resolution >> i}" for i in range(len(widths))]
        self.num_blocks, self.encoder_type, self.decoder_type = num_blocks, encoder_type, decoder_type
        attends = [(img_resolution >> i) in attn_resolutions for i in range(len(widths))]
        self.enc, self.dec = torch.nn.ModuleDict(), torch.nn.ModuleDict()
        enc, dec = self.enc, self.dec

        width, image_width, skip_widths = stem_channels, in_channels, []
        for level, tag in enumerate(self.tags):
            if level == 0:
                enc[f"{tag}_conv"] = Conv2d(in_channels=in_channels, out_channels=width, kernel=3, **init)
            else:
                enc[f"{tag}_down"] = new_block(width, width, down=True)
            if level and encoder_type == "skip":
                enc[f"{tag}_aux_down"] = Conv2d(in_channels=image_width, out_channels=image_width, kernel=0,
                                                down=True, resample_filter=resample_filter)
                enc[f"{tag}_aux_skip"] = Conv2d(in_channels=image_width, out_channels=width, kernel=1, **init)
            if level and encoder_type == "residual":
                enc[f"{tag}_aux_residual"] = Conv2d(in_channels=image_width, out_channels=width, kernel=3, down=True,
                                                    resample_filter=resample_filter, fused_resample=True, **init)
                image_width = width
            skip_widths.append(width)
            for j in range(num_blocks):
                enc[f"{tag}_block{j}"] = new_block(width, widths[level], attention=attends[level])
                width = widths[level]
                skip_widths.append(width)

        coarsest = len(self.tags) - 1
        for level in range(coarsest, -1, -1):
            tag = self.tags[level]
            if level == coarsest:
                dec[f"{tag}_in0"] = new_block(width, width, attention=True)
                dec[f"{tag}_in1"] = new_block(width, width)
            else:
                dec[f"{tag}_up"] = new_block(width, width, up=True)
            for j in range(num_blocks + 1):
                attention = attends[level] and (attend_all_decoder_blocks or j == num_blocks)
                dec[f"{tag}_block{j}"] = new_block(width + skip_widths.pop(), widths[level], attention=attention)
                width = widths[level]
            if self._has_image_head(level):
                if level != coarsest and decoder_type == "skip":
                    dec[f"{tag}_aux_up"] = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=0,
                                                  up=True, resample_filter=resample_filter)
                dec[f"{tag}_aux_norm"] = GroupNorm(num_channels=width, eps=1e-6)
                dec[f"{tag}_aux_conv"] = Conv2d(in_channels=width, out_channels=out_channels, kernel=3, **init_zero)
        return width

    def _has_image_head(self, level):
        # NCSN++'s 'skip' decoder emits an image at every level, 'standard' at the finest only; ADM has none.
        return self.decoder_type == "skip" or (self.decoder_type == "standard" and level == 0)

    def _walk_levels(self, x, emb, emb_step):
        """Run encoder and decoder; returns the last features and the image head's sum (None without heads)."""
        enc, dec = self.enc, self.dec
        image, skips = x, []
        for level, tag in enumerate(self.tags):
            x = enc[f"{tag}_down"](x, emb, emb_step) if level else enc[f"{tag}_conv"](x)
            if level and self.encoder_type == "skip":
                image = enc[f"{tag}_aux_down"](image)
                x = x + enc[f"{tag}_aux_skip"](image)
            if level and self.encoder_type == "residual":
                x = image = (x + enc[f"{tag}_aux_residual"](image)) / np.sqrt(2)
            skips.append(x)
            for j in range(self.num_blocks):
                x = enc[f"{tag}_block{j}"](x, emb, emb_step)
                skips.append(x)

        out, coarsest = None, len(self.tags) - 1
        for level in range(coarsest, -1, -1):
            tag = self.tags[level]
            if level == coarsest:
                x = dec[f"{tag}_in1"](dec[f"{tag}_in0"](x, emb, emb_step), emb, emb_step)
            else:
                x = dec[f"{tag}_up"](x, emb, emb_step)
            for j in range(self.num_blocks + 1):
                x = dec[f"{tag}_block{j}"](torch.cat([x, skips.pop()], dim=1), emb, emb_step)
            if self._has_image_head(level):
                head = dec[f"{tag}_aux_conv"](silu(dec[f"{tag}_aux_norm"](x)))
                out = head if out is None else head + dec[f"{tag}_aux_up"](out)
        return x, out

    def _step_layers(self, embedding, in_features, emb_channels, init):
        """SFD-v: the step condition's own embedding and two-layer mapping (names as in the paper's code)."""
        self.map_step = embedding
        self.map_step_layer0 = Linear(in_features=in_features, out_features=emb_channels, **init)
        self.map_step_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **init)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None, step_condition=None):
        emb = self.embed_noise(noise_labels, class_labels, augment_labels)
        emb_step = None
        if self.use_step_condition and step_condition is not None:
            emb_step = self.embed_step(step_condition)
        return self.head(*self._walk_levels(x, emb, emb_step))


class SongUNet(_LevelUNet):
    """DDPM++ (positional embedding, standard encoder) and NCSN++ (Fourier embedding, residual encoder).

    img_resolution, in_channels, out_channels: image size and channels; label_dim / augment_dim: 0 for none;
    model_channels * channel_mult[i]: channels of level i; channel_mult_emb, channel_mult_noise: embedding and
    noise-embedding widths in units of model_channels; num_blocks: blocks per level; attn_resolutions: levels
    with self-attention; label_dropout: class-label dropout for guidance; embedding_type 'positional' or
    'fourier'; encoder_type 'standard', 'skip' or 'residual'; decoder_type 'standard' or 'skip';
    resample_filter: FIR taps of the 2x resampling; use_step_condition: SFD-v step layers.
    """

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0, model_channels=128,
                 channel_mult=(1, 2, 2, 2), channel_mult_emb=4, num_blocks=4, attn_resolutions=(16,), dropout=0.10,
                 label_dropout=0, embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                 decoder_type="standard", resample_filter=(1, 1), use_step_condition=False):
        _check_choice("embedding_type", embedding_type, ("fourier", "positional"))
        _check_choice("encoder_type", encoder_type, ("standard", "skip", "residual"))
        _check_choice("decoder_type", decoder_type, ("standard", "skip"))
        super().__init__()
        self.label_dropout, self.use_step_condition = label_dropout, use_step_condition
        emb_channels, noise_channels = model_channels * channel_mult_emb, model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)

        def embedding():
            if embedding_type == "fourier":
                return FourierEmbedding(num_channels=noise_channels)
            return PositionalEmbedding(num_channels=noise_channels, endpoint=True)

        self.map_noise = embedding()
        self.map_label = Linear(in_features=label_dim, out_features=noise_channels, **init) if label_dim else None
        self.map_augment = (Linear(in_features=augment_dim, out_features=noise_channels, bias=False, **init)
                            if augment_dim else None)
        self.map_layer0 = Linear(in_features=noise_channels, out_features=emb_channels, **init)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **init)
        if use_step_condition:  # the same embedding type as the noise label, as in the paper's code
            self._step_layers(embedding(), noise_channels, emb_channels, init)

        block_options = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5),
                             eps=1e-6, resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                             init=init, init_zero=init_zero, init_attn=dict(init_mode="xavier_uniform",
                                                                            init_weight=math.sqrt(0.2)),
                             use_step_condition=use_step_condition)
        self._build_levels(img_resolution, in_channels, out_channels, model_channels,
                           [model_channels * m for m in channel_mult], num_blocks, attn_resolutions,
                           functools.partial(_new_block, block_options), init, init_zero,
                           attend_all_decoder_blocks=False, resample_filter=resample_filter,
                           encoder_type=encoder_type, decoder_type=decoder_type)

    def embed_noise(self, noise_labels, class_labels=None, augment_labels=None):
        emb = _swap_sin_cos(self.map_noise(noise_labels))
        if self.map_label is not None:
            labels = _dropped_labels(class_labels, self.label_dropout, self.training)
            emb = emb + self.map_label(labels * np.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        return silu(self.map_layer1(silu(self.map_layer0(emb))))

    def embed_step(self, step_condition):
        """SFD-v: the step condition takes the same path as the noise label, through its own layers."""
        emb_step = _swap_sin_cos(self.map_step(step_condition))
        return silu(self.map_step_layer1(silu(self.map_step_layer0(emb_step))))

    def head(self, features, image):
        return image


class DhariwalUNet(_LevelUNet):
    """ADM. Arguments as for SongUNet; attention heads have 64 channels each, and every decoder block of an
    attention level attends."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0, model_channels=192,
                 channel_mult=(1, 2, 3, 4), channel_mult_emb=4, num_blocks=3, attn_resolutions=(32, 16, 8),
                 dropout=0.10, label_dropout=0, use_step_condition=False):
        super().__init__()
        self.label_dropout, self.use_step_condition = label_dropout, use_step_condition
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)

        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = (Linear(in_features=augment_dim, out_features=model_channels, bias=False, **init_zero)
                            if augment_dim else None)
        self.map_layer0 = Linear(in_features=model_channels, out_features=emb_channels, **init)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **init)
        self.map_label = (Linear(in_features=label_dim, out_features=emb_channels, bias=False,
                                 init_mode="kaiming_normal", init_weight=np.sqrt(label_dim)) if label_dim else None)
        if use_step_condition:
            self._step_layers(PositionalEmbedding(num_channels=model_channels), model_channels, emb_channels, init)

        block_options = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init,
                             init_zero=init_zero, use_step_condition=use_step_condition)
        widths = [model_channels * m for m in channel_mult]
        width = self._build_levels(img_resolution, in_channels, out_channels, widths[0], widths, num_blocks,
                                   attn_resolutions, functools.partial(_new_block, block_options), init, init_zero,
                                   attend_all_decoder_blocks=True)
        self.out_norm = GroupNorm(num_channels=width)
        self.out_conv = Conv2d(in_channels=width, out_channels=out_channels, kernel=3, **init_zero)

    def embed_noise(self, noise_labels, class_labels=None, augment_labels=None):
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(_dropped_labels(class_labels, self.label_dropout, self.training))
        return silu(emb)

    def embed_step(self, step_condition):
        """SFD-v: the noise label's path without labels; ADM keeps [cos, sin] order, so no swap here."""
        emb_step = silu(self.map_step_layer0(self.map_step(step_condition)))
        return silu(self.map_step_layer1(emb_step))

    def head(self, features, image):
        return self.out_conv(silu(self.out_norm(features)))


def _new_block(options, in_channels, out_channels, **kwargs):
    return UNetBlock(in_channels=in_channels, out_channels=out_channels, **options, **kwargs)


def _check_choice(option, value, choices):
    if value not in choices:
        raise ValueError(f"{option}={value!r} is not supported: use one of {', '.join(choices)}")


# model_type strings recorded in EDM checkpoints -> our classes.
UNET_CLASSES = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}
