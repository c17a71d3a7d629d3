"""Plain-PyTorch test reference of the LIA-X generator (encoder + motion dictionary + decoder).

Written from ``/work/shared/reference/liax_official.md`` (sections 1-4 and 8) and
``liax_state_dict.txt``; it is *not* a copy of the official code.  It exists so that the
JAX/Flax port (``liax_jax``) can be checked against an independent, dtype-agnostic
implementation, in float64 (``G.double()``).

At ``size=512`` the module tree reproduces the official ``Generator(motion_dim, scale)``
``state_dict`` exactly (keys, order, shapes, the 41 FIR ``*.kernel`` buffers and their
gains), so an official checkpoint loads with ``load_state_dict(strict=True)``.

Smaller sizes (64..256, used for fast tests) generalise the architecture as follows:

* ``L = log2(size) - 2`` decoder levels; the channel count at "depth" ``d = log2(size/res)``
  is ``c(d) = round([64, 128, 256][d] * scale)`` for ``d < 3`` else ``round(512 * scale)``;
  the style dim is ``S = round(style_dim * scale)``.
* Encoder: ``block1`` (1x1 ConvLayer 3 -> c(0)), then ``L`` downsampling ResBlocks
  c(d) -> c(d+1): ``block2 .. block{L}`` (each wrapped in an ``nn.Sequential``) and
  ``block_512`` (not wrapped), then ``block8`` (4x4 EqualConv2d, pad 0, no bias, c(L) -> S).
* Decoder level ``i`` works at ``8 * 2**i`` with ``c(L-1-i)`` channels; level 0 is named
  ``*_512`` (no ``conv_512_2_up``), level ``i >= 1`` is named ``conv{i+1}_*``/``flow{i+1}``/
  ``rgb{i+1}``.

Numerics follow the official code op for op (equalised-lr scales applied at run time, FIR
``upfirdn2d`` with zero insertion, demodulation eps 1e-8 inside the rsqrt, GroupNorm eps 1e-5,
float32 ``linspace`` warping grid, ``grid_sample(bilinear, zeros, align_corners=True)``,
``+1e-8`` before the Householder QR, three separate dictionary calls in ``animate``,
float32-rounded edit offsets in ``edit_img``/``interpolate_img``).

Public API
----------
``Generator(size, style_dim, motion_dim, scale, norm_groups)`` with
``G.encode(x) -> (z, feats)``, ``G.alpha(z)``, ``G.directions()`` (Q), ``G.motion(a)`` (D(a)),
``G.navigate(z, alphas)``, ``G.decode(latent, feats) -> (image, {"flow_logits", "rgb"})``;
inference modes ``edit_img``, ``animate``, ``edit_vid``, ``interpolate_img``
(+ ``manipulation_schedule``, ``make_delta``); ``randomize_(G, seed)``; ``count_parameters(G)``;
low-level ops ``make_kernel``, ``upfirdn2d`` and every building block class.
Also the StyleGAN2 ``Discriminator(size, channel_multiplier, scale, stddev_group, stddev_feat)`` of
LIA's training recipe (§6), whose ``state_dict`` keys follow the original module paths.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "make_kernel", "upfirdn2d", "EqualConv2d", "EqualLinear", "FusedLeakyReLU", "Blur", "Upsample",
    "ConvLayer", "ModulatedConv2d", "StyledConv", "EncoderResBlock", "FlowResBlock", "RenderResBlock",
    "ToFlow", "ToRGB", "ConstantInput", "Direction", "Encoder2R", "Encoder", "Decoder", "Generator",
    "discriminator_channels", "DiscriminatorResBlock", "Discriminator",
    "channel", "num_levels", "level_names", "make_delta", "manipulation_schedule", "edit_img", "animate",
    "edit_vid", "interpolate_img", "randomize_", "count_parameters", "MOTION_IDS",
]

SQRT2 = math.sqrt(2.0)

#: The 14 dictionary indices every official config lists, in list order (liax_official.md §4.1).
MOTION_IDS = (37, 39, 28, 15, 33, 31, 6, 25, 16, 19, 13, 24, 17, 26)


# ---------------------------------------------------------------------------------------------
# Architecture arithmetic
# ---------------------------------------------------------------------------------------------

def num_levels(size: int) -> int:
    """Number of decoder levels / encoder ResBlocks: ``log2(size) - 2`` (7 at 512)."""
    levels = int(round(math.log2(size))) - 2
    if 2 ** (levels + 2) != size or levels < 1:
        raise ValueError(f"size must be a power of two >= 8, got {size}")
    return levels


def channel(depth: int, scale: float) -> int:
    """Channels at depth ``d = log2(size / res)``: ``[64, 128, 256][d]*scale``, else ``512*scale``."""
    base = (64, 128, 256)[depth] if depth < 3 else 512
    return int(round(base * scale))


def level_names(i: int) -> dict[str, str]:
    """Module names of decoder level ``i`` (level 0 is the ``_512`` level, which has no ``_2_up``)."""
    if i == 0:
        return {"conv_1": "conv_512_1", "conv_2": "conv_512_2", "conv_2_up": None,
                "conv_2_rgb": "conv_512_2_rgb", "flow": "flow_512", "rgb": "rgb_512"}
    p = f"conv{i + 1}"
    return {"conv_1": f"{p}_1", "conv_2": f"{p}_2", "conv_2_up": f"{p}_2_up",
            "conv_2_rgb": f"{p}_2_rgb", "flow": f"flow{i + 1}", "rgb": f"rgb{i + 1}"}


# ---------------------------------------------------------------------------------------------
# FIR resampling
# ---------------------------------------------------------------------------------------------

def make_kernel(gain: float = 1.0) -> torch.Tensor:
    """The 4x4 FIR kernel ``outer([1,3,3,1], [1,3,3,1]) / 64 * gain`` (float32, exact)."""
    k1 = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=torch.float32)
    k = k1[None, :] * k1[:, None]
    return k / k.sum() * gain


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1,
              pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Per-channel upsample -> FIR filter -> downsample, same on H and W (non-negative pads).

    1. insert ``up - 1`` zeros *after* every sample (length ``H * up``, trailing zeros included);
    2. zero-pad ``pad[0]`` before and ``pad[1]`` after;
    3. true convolution with ``kernel`` (the kernel is flipped, then cross-correlated);
    4. keep every ``down``-th sample starting at 0.
    """
    b, c, h, w = x.shape
    p0, p1 = pad
    if up > 1:
        x = x.reshape(b, c, h, 1, w, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(b, c, h * up, w * up)
    x = F.pad(x, [p0, p1, p0, p1])
    kh, kw = kernel.shape
    wgt = torch.flip(kernel, [0, 1]).to(x.dtype).reshape(1, 1, kh, kw)
    x = x.reshape(b * c, 1, x.shape[2], x.shape[3])
    x = F.conv2d(x, wgt)
    x = x[:, :, ::down, ::down]
    return x.reshape(b, c, x.shape[2], x.shape[3])


class Blur(nn.Module):
    """FIR blur (``up = down = 1``) with a stored ``kernel`` buffer (gain 1 or 4)."""

    def __init__(self, pad: tuple[int, int], gain: float = 1.0):
        super().__init__()
        self.register_buffer("kernel", make_kernel(gain))
        self.pad = tuple(pad)

    def forward(self, x):
        return upfirdn2d(x, self.kernel, pad=self.pad)


class Upsample(nn.Module):
    """x2 FIR upsampling: zero insertion, gain-4 kernel, pad (2, 1): H -> 2H."""

    def __init__(self, factor: int = 2):
        super().__init__()
        self.factor = factor
        self.register_buffer("kernel", make_kernel(factor ** 2))
        p = 4 - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x):
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)


# ---------------------------------------------------------------------------------------------
# Equalised-learning-rate layers
# ---------------------------------------------------------------------------------------------

class EqualConv2d(nn.Module):
    """Conv with weight N(0,1) stored unscaled, applied as ``weight / sqrt(in*k*k)``."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel_size, kernel_size))
        self.scale = 1.0 / math.sqrt(in_ch * kernel_size ** 2)
        self.stride, self.padding = stride, padding
        self.bias = nn.Parameter(torch.zeros(out_ch)) if bias else None

    def forward(self, x):
        return F.conv2d(x, self.weight * self.scale, bias=self.bias, stride=self.stride, padding=self.padding)


class EqualLinear(nn.Module):
    """``y = x (W / sqrt(in))^T + b`` with ``b`` initialised to ``bias_init`` (lr_mul 1).

    ``activate=True`` (StyleGAN2's ``activation="fused_lrelu"``, used only by the discriminator) adds
    the bias inside the activation: ``leaky_relu(x (W / sqrt(in))^T + b, 0.2) * sqrt(2)``.
    """

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True, bias_init: float = 0.0,
                 activate: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim))
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init))) if bias else None
        self.scale = 1.0 / math.sqrt(in_dim)
        self.activate = activate

    def forward(self, x):
        if self.activate:
            return F.leaky_relu(F.linear(x, self.weight * self.scale) + self.bias, negative_slope=0.2) * SQRT2
        return F.linear(x, self.weight * self.scale, bias=self.bias)


class FusedLeakyReLU(nn.Module):
    """``leaky_relu(x + bias[c], 0.2) * sqrt(2)`` with a learnable ``bias`` (init 0)."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return F.leaky_relu(x + self.bias.reshape(shape), negative_slope=0.2) * SQRT2


class ConvLayer(nn.Sequential):
    """StyleGAN2-style ConvLayer (``nn.Sequential``, so keys follow the position).

    plain: ``[EqualConv2d(pad k//2), act]``; downsample: ``[Blur, EqualConv2d(stride 2, pad 0), act]``;
    upsample: ``[Upsample, EqualConv2d(pad k//2), act]``.  With ``activate`` the conv has no bias
    and ``act = FusedLeakyReLU(out)`` carries it.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, downsample: bool = False,
                 upsample: bool = False, bias: bool = True, activate: bool = True):
        layers: list[nn.Module] = []
        if downsample:
            p = (4 - 2) + (kernel_size - 1)
            layers.append(Blur(((p + 1) // 2, p // 2), gain=1.0))
            stride, padding = 2, 0
        else:
            if upsample:
                layers.append(Upsample(2))
            stride, padding = 1, kernel_size // 2
        layers.append(EqualConv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding,
                                  bias=bias and not activate))
        if activate:
            layers.append(FusedLeakyReLU(out_ch))
        super().__init__(*layers)


# ---------------------------------------------------------------------------------------------
# Modulated convolutions
# ---------------------------------------------------------------------------------------------

class ModulatedConv2d(nn.Module):
    """StyleGAN2 modulated conv: per-sample weight ``W * s_b / sqrt(in k^2)`` (+ demodulation).

    ``upsample``: grouped ``conv_transpose2d(stride 2, pad 0)`` (2H+1) then a gain-4 blur with
    pad (1, 1) (2H).  No noise injection.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, style_dim: int, demodulate: bool = True,
                 upsample: bool = False):
        super().__init__()
        self.in_ch, self.out_ch, self.kernel_size = in_ch, out_ch, kernel_size
        self.demodulate, self.upsample = demodulate, upsample
        self.weight = nn.Parameter(torch.randn(1, out_ch, in_ch, kernel_size, kernel_size))
        if upsample:
            p = (4 - 2) - (kernel_size - 1)
            self.blur = Blur(((p + 1) // 2 + 1, p // 2 + 1), gain=4.0)
        self.modulation = EqualLinear(style_dim, in_ch, bias_init=1.0)
        self.scale = 1.0 / math.sqrt(in_ch * kernel_size ** 2)
        self.padding = kernel_size // 2

    def modulated_weight(self, z: torch.Tensor) -> torch.Tensor:
        """Per-sample weight ``(B, out, in, k, k)`` (modulated, demodulated if enabled)."""
        b = z.shape[0]
        style = self.modulation(z).reshape(b, 1, self.in_ch, 1, 1)
        w = self.scale * self.weight * style
        if self.demodulate:
            demod = torch.rsqrt(w.pow(2).sum([2, 3, 4]) + 1e-8)
            w = w * demod.reshape(b, self.out_ch, 1, 1, 1)
        return w

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        b, c, h, wd = x.shape
        k = self.kernel_size
        w = self.modulated_weight(z)
        if self.upsample:
            x = x.reshape(1, b * c, h, wd)
            w = w.transpose(1, 2).reshape(b * c, self.out_ch, k, k)
            out = F.conv_transpose2d(x, w, padding=0, stride=2, groups=b)
            out = out.reshape(b, self.out_ch, out.shape[2], out.shape[3])
            return self.blur(out)
        x = x.reshape(1, b * c, h, wd)
        w = w.reshape(b * self.out_ch, c, k, k)
        out = F.conv2d(x, w, padding=self.padding, groups=b)
        return out.reshape(b, self.out_ch, out.shape[2], out.shape[3])


class StyledConv(nn.Module):
    """ModulatedConv2d (demodulated) followed by FusedLeakyReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, style_dim: int, upsample: bool = False):
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, out_ch, kernel_size, style_dim, demodulate=True, upsample=upsample)
        self.activate = FusedLeakyReLU(out_ch)

    def forward(self, x, z):
        return self.activate(self.conv(x, z))


# ---------------------------------------------------------------------------------------------
# Residual blocks
# ---------------------------------------------------------------------------------------------

class EncoderResBlock(nn.Module):
    """``(conv2(conv1(x)) + skip(x)) / sqrt(2)``; conv1 in->out 3x3, conv2 3x3 down, skip 1x1 down."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = ConvLayer(in_ch, out_ch, 3)
        self.conv2 = ConvLayer(out_ch, out_ch, 3, downsample=True)
        self.skip = ConvLayer(in_ch, out_ch, 1, downsample=True, activate=False, bias=False)

    def forward(self, x):
        out = self.conv2(self.conv1(x))
        skip = self.skip(x)
        return (out + skip) / SQRT2


class FlowResBlock(nn.Module):
    """``h = conv1(x, z); r = conv2(GroupNorm(h), z); out = gamma * r + h`` (x not added back)."""

    def __init__(self, channels: int, style_dim: int, norm_groups: int = 32):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((1, channels, 1, 1), 1e-5))
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-5, affine=True)
        self.conv1 = StyledConv(channels, channels, 3, style_dim)
        self.conv2 = StyledConv(channels, channels, 3, style_dim)

    def forward(self, x, z):
        h = self.conv1(x, z)
        r = F.group_norm(h, self.norm.num_groups, self.norm.weight, self.norm.bias, self.norm.eps)
        r = self.conv2(r, z)
        return self.gamma * r + h


class RenderResBlock(nn.Module):
    """Unmodulated render block: ``(conv2(conv1(x)) + x) / sqrt(2)`` with two plain 3x3 ConvLayers."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = ConvLayer(channels, channels, 3)
        self.conv2 = ConvLayer(channels, channels, 3)

    def forward(self, x):
        return (self.conv2(self.conv1(x)) + x) / SQRT2


# ---------------------------------------------------------------------------------------------
# Output heads
# ---------------------------------------------------------------------------------------------

def base_grid(res: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """Identity sampling grid ``(res, res, 2)``: float32 ``linspace(-1, 1)``, meshgrid 'xy', then cast."""
    lin = torch.linspace(-1.0, 1.0, res, dtype=torch.float32, device=device)
    gx, gy = torch.meshgrid(lin, lin, indexing="xy")
    return torch.stack([gx, gy], dim=-1).to(dtype)


class ToFlow(nn.Module):
    """Flow/mask head: logits ``o = modconv1x1(h, z) + bias [+ up(o_prev)]`` and feature warping.

    ``forward`` returns ``(warped, h_new, o)`` with ``warped = grid_sample(feat, grid + tanh(o[:, :2]))
    * sigmoid(o[:, 2:])`` and ``h_new = warped + (1 - m) * h``; ``o`` (raw logits) feeds the next level.
    """

    def __init__(self, in_ch: int, style_dim: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))
        self.up = Upsample(2)
        self.conv = ModulatedConv2d(in_ch, 3, 1, style_dim, demodulate=False)

    def logits(self, h, z, skip=None):
        o = self.conv(h, z) + self.bias
        if skip is not None:
            o = o + self.up(skip)
        return o

    def forward(self, h, z, feat, skip=None):
        o = self.logits(h, z, skip)
        b, _, res, res_w = o.shape
        if res != res_w:
            raise ValueError("ToFlow assumes square maps")
        grid = torch.tanh(o[:, 0:2]).permute(0, 2, 3, 1) + base_grid(res, o.dtype, o.device)
        mask = torch.sigmoid(o[:, 2:3])
        warped = F.grid_sample(feat, grid, mode="bilinear", padding_mode="zeros", align_corners=True) * mask
        h = warped + (1 - mask) * h
        return warped, h, o


class ToRGB(nn.Module):
    """``conv1x1 + FusedLeakyReLU(3)`` (a ConvLayer), ``+ bias``, ``+ up(rgb_prev)``."""

    def __init__(self, in_ch: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))
        self.up = Upsample(2)
        self.conv = ConvLayer(in_ch, 3, 1)

    def forward(self, x, skip=None):
        out = self.conv(x) + self.bias
        if skip is not None:
            out = out + self.up(skip)
        return out


class ConstantInput(nn.Module):
    """Learned constant ``input`` ``(1, C, 4, 4)`` repeated over the batch."""

    def __init__(self, channels: int, res: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channels, res, res))

    def forward(self, batch: int):
        return self.input.repeat(batch, 1, 1, 1)


class Direction(nn.Module):
    """Motion dictionary: ``Q = qr(weight + 1e-8)`` (reduced, Householder signs), ``D(a) = a Q^T``."""

    def __init__(self, style_dim: int, motion_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(style_dim, motion_dim))

    def basis(self) -> torch.Tensor:
        q, _ = torch.linalg.qr(self.weight + 1e-8, mode="reduced")
        return q

    def forward(self, alpha: torch.Tensor) -> torch.Tensor:
        q = self.basis()
        return torch.matmul(torch.diag_embed(alpha), q.T).sum(dim=1)


# ---------------------------------------------------------------------------------------------
# Encoder / decoder / generator
# ---------------------------------------------------------------------------------------------

class Encoder2R(nn.Module):
    """Appearance encoder: image -> (z (B, S), feats coarse->fine)."""

    def __init__(self, size: int, style_dim: int, scale: float):
        super().__init__()
        self.levels = levels = num_levels(size)
        c = [channel(d, scale) for d in range(levels + 1)]
        self.block1 = ConvLayer(3, c[0], 1)
        for k in range(levels - 1):
            self.add_module(f"block{k + 2}", nn.Sequential(EncoderResBlock(c[k], c[k + 1])))
        self.block_512 = EncoderResBlock(c[levels - 1], c[levels])
        self.block8 = EqualConv2d(c[levels], style_dim, 4, padding=0, bias=False)

    def forward(self, x):
        h = self.block1(x)
        outs = [h]
        for k in range(self.levels - 1):
            h = getattr(self, f"block{k + 2}")(h)
            outs.append(h)
        h = self.block_512(h)
        z = self.block8(h).flatten(1)
        return z, outs[::-1]


class Encoder(nn.Module):
    """``enc``: ``enc_2r`` (appearance CNN) and ``enc_r2t`` (one EqualLinear S -> M)."""

    def __init__(self, size: int, style_dim: int, motion_dim: int, scale: float):
        super().__init__()
        self.enc_2r = Encoder2R(size, style_dim, scale)
        self.enc_r2t = nn.Sequential(EqualLinear(style_dim, motion_dim))

    def forward(self, src, drv=None):
        """Training-style API: ``(z_src, alpha_drv or None, feats_src)``."""
        z, feats = self.enc_2r(src)
        if drv is None:
            return z, None, feats
        z_d, _ = self.enc_2r(drv)
        return z, self.enc_r2t(z_d), feats


class Decoder(nn.Module):
    """``dec``: motion dictionary, flow generator (modulated) and render path (unmodulated)."""

    def __init__(self, size: int, style_dim: int, motion_dim: int, scale: float, norm_groups: int = 32):
        super().__init__()
        self.levels = levels = num_levels(size)
        S = style_dim
        self.direction = Direction(S, motion_dim)
        top = channel(levels, scale)
        self.input = ConstantInput(top)
        self.conv1 = StyledConv(top, top, 3, S)
        prev = top
        for i in range(levels):
            ch = channel(levels - 1 - i, scale)
            n = level_names(i)
            self.add_module(n["conv_1"], StyledConv(prev, ch, 3, S, upsample=True))
            self.add_module(n["conv_2"], nn.ModuleList([FlowResBlock(ch, S, norm_groups) for _ in range(4)]))
            if n["conv_2_up"] is not None:
                self.add_module(n["conv_2_up"], ConvLayer(prev, ch, 3, upsample=True))
            self.add_module(n["conv_2_rgb"], nn.Sequential(*[RenderResBlock(ch) for _ in range(4)]))
            self.add_module(n["rgb"], ToRGB(ch))
            self.add_module(n["flow"], ToFlow(ch, S))
            prev = ch

    def navigation(self, z, alpha=None):
        """Latent navigation (§2.3): None -> z; [a] -> z + D(a); [a_t, a_s, a_start] ->
        ``z + (D(a_t) - D(a_start)) + D(a_s)`` (three separate dictionary calls)."""
        if alpha is None:
            return z
        if len(alpha) == 1:
            return z + self.direction(alpha[0])
        if len(alpha) == 3:
            a_t, a_s, a_start = alpha
            return z + (self.direction(a_t) - self.direction(a_start)) + self.direction(a_s)
        raise ValueError("alpha must be None or a list of 1 or 3 tensors")

    def synthesize(self, latent, feats):
        """Decode a motion latent with (source) encoder features -> (image, intermediates)."""
        b = latent.shape[0]
        feats = [f if f.shape[0] == b else f.repeat(b // f.shape[0], 1, 1, 1) for f in feats]
        h = self.conv1(self.input(b), latent)
        o = rgb = render = None
        logits_all, rgb_all = [], []
        for i in range(self.levels):
            n = level_names(i)
            h = getattr(self, n["conv_1"])(h, latent)
            for blk in getattr(self, n["conv_2"]):
                h = blk(h, latent)
            warped, h, o = getattr(self, n["flow"])(h, latent, feats[i], o)
            if n["conv_2_up"] is not None:
                warped = warped + getattr(self, n["conv_2_up"])(render)
            render = getattr(self, n["conv_2_rgb"])(warped)
            rgb = getattr(self, n["rgb"])(render, rgb)
            logits_all.append(o)
            rgb_all.append(rgb)
        return rgb, {"flow_logits": logits_all, "rgb": rgb_all}

    def forward(self, z, alpha, feats):
        return self.synthesize(self.navigation(z, alpha), feats)


class Generator(nn.Module):
    """LIA-X generator with official key names at size 512 (``enc``, ``dec``)."""

    def __init__(self, size: int = 512, style_dim: int = 512, motion_dim: int = 40, scale: float = 1.0,
                 norm_groups: int = 32):
        super().__init__()
        self.size = size
        self.style_dim = int(round(style_dim * scale))
        self.motion_dim = motion_dim
        self.scale = scale
        self.levels = num_levels(size)
        self.enc = Encoder(size, self.style_dim, motion_dim, scale)
        self.dec = Decoder(size, self.style_dim, motion_dim, scale, norm_groups)

    def encode(self, x):
        """``E(x) -> (z (B, S), feats)`` with feats coarse -> fine (res 8 .. size)."""
        return self.enc.enc_2r(x)

    def alpha(self, z):
        """``A(z)``: motion coefficients (B, M)."""
        return self.enc.enc_r2t(z)

    def get_alpha(self, x):
        return self.alpha(self.encode(x)[0])

    def directions(self):
        """Orthonormal dictionary ``Q`` (S, M)."""
        return self.dec.direction.basis()

    def motion(self, a):
        """``D(a) = a Q^T`` (B, S)."""
        return self.dec.direction(a)

    def navigate(self, z, alpha=None):
        return self.dec.navigation(z, alpha)

    def decode(self, latent, feats):
        """``(image (B,3,size,size), {"flow_logits": [L x (B,3,r,r)], "rgb": [L x (B,3,r,r)]})``."""
        return self.dec.synthesize(latent, feats)


# ---------------------------------------------------------------------------------------------
# StyleGAN2 discriminator (LIA's training recipe, liax_official.md §6)
# ---------------------------------------------------------------------------------------------

def discriminator_channels(channel_multiplier: int = 1, scale: float = 1.0) -> dict[int, int]:
    """Channels per feature-map size, ``{4..32: 512, 64: 256 cm, ..., 1024: 16 cm}`` times ``scale``."""
    cm = channel_multiplier
    base = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * cm, 128: 128 * cm, 256: 64 * cm, 512: 32 * cm,
            1024: 16 * cm}
    return {res: max(1, int(round(c * scale))) for res, c in base.items()}


class DiscriminatorResBlock(nn.Module):
    """``(conv2(conv1(x)) + skip(x)) / sqrt(2)``; conv1 3x3 **in->in**, conv2 3x3 in->out down, skip 1x1 down."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = ConvLayer(in_ch, in_ch, 3)
        self.conv2 = ConvLayer(in_ch, out_ch, 3, downsample=True)
        self.skip = ConvLayer(in_ch, out_ch, 1, downsample=True, activate=False, bias=False)

    def forward(self, x):
        return (self.conv2(self.conv1(x)) + self.skip(x)) / SQRT2


class Discriminator(nn.Module):
    """StyleGAN2 discriminator: ``convs`` (1x1 from RGB + ResBlocks down to 4x4), minibatch stddev,
    ``final_conv`` (3x3, +stddev channels in), ``final_linear`` (fused-lrelu linear, then linear to 1).

    ``scale`` shrinks every channel count (``1`` is the original architecture). NCHW, returns (B, 1).
    """

    def __init__(self, size: int, channel_multiplier: int = 1, scale: float = 1.0, stddev_group: int = 4,
                 stddev_feat: int = 1):
        super().__init__()
        ch = discriminator_channels(channel_multiplier, scale)
        log_size = int(round(math.log2(size)))
        layers: list[nn.Module] = [ConvLayer(3, ch[size], 1)]
        for i in range(log_size, 2, -1):
            layers.append(DiscriminatorResBlock(ch[2 ** i], ch[2 ** (i - 1)]))
        self.convs = nn.Sequential(*layers)
        self.stddev_group, self.stddev_feat = stddev_group, stddev_feat
        self.final_conv = ConvLayer(ch[4] + stddev_feat, ch[4], 3)
        self.final_linear = nn.Sequential(EqualLinear(ch[4] * 16, ch[4], activate=True), EqualLinear(ch[4], 1))

    def minibatch_stddev(self, x):
        """Appends ``stddev_feat`` channels: per group position, the population std over the group,
        averaged over channels-per-feature and pixels (sample ``b`` is in group ``b // (B // G)``)."""
        b, c, h, w = x.shape
        group = min(b, self.stddev_group)
        f = self.stddev_feat
        y = x.reshape(group, b // group, f, c // f, h, w)
        y = torch.sqrt(y.var(0, unbiased=False) + 1e-8)       # (B//G, F, C//F, H, W)
        y = y.mean(dim=(2, 3, 4)).reshape(b // group, f, 1, 1)
        y = y.repeat(group, 1, h, w)                           # row g*(B//G) + m <- m
        return torch.cat([x, y], 1)

    def forward(self, x):
        out = self.final_conv(self.minibatch_stddev(self.convs(x)))
        return self.final_linear(out.reshape(out.shape[0], -1))


# ---------------------------------------------------------------------------------------------
# Inference modes (§4)
# ---------------------------------------------------------------------------------------------

def make_delta(motion_ids: Sequence[int], motion_values: Sequence[float], motion_dim: int,
               dtype: torch.dtype, float32_values: bool, device=None) -> torch.Tensor:
    """``delta (1, M)`` with ``delta[ids[j]] += values[j]``.

    ``float32_values=True`` mirrors ``torch.FloatTensor(values)`` (``edit_img``, manipulation);
    ``False`` mirrors ``torch.tensor(values, dtype=alpha.dtype)`` (``animate``, ``edit_vid``).
    """
    vals = torch.tensor(np.asarray(motion_values, dtype=np.float64), device=device)
    vals = vals.to(torch.float32 if float32_values else dtype).to(dtype)
    delta = torch.zeros(1, motion_dim, dtype=dtype, device=device)
    idx = torch.as_tensor(list(motion_ids), dtype=torch.long, device=device)
    delta[0].index_put_((idx,), vals, accumulate=True)
    return delta


def _cat_levels(per_chunk: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [torch.cat(level, dim=0) for level in zip(*per_chunk, strict=True)]


@torch.no_grad()
def edit_img(G: Generator, src, motion_ids, motion_values):
    """``img_edit``: latent ``z_s + D(A(z_s) + delta)`` with float32-rounded delta."""
    z, feats = G.encode(src)
    alpha = G.alpha(z)
    delta = make_delta(motion_ids, motion_values, G.motion_dim, alpha.dtype, True, alpha.device)
    alpha_edit = alpha + delta
    latent = G.navigate(z, [alpha_edit])
    image, inter = G.decode(latent, feats)
    return {"image": image, "z": z, "feats": feats, "alpha": alpha, "delta": delta,
            "alpha_edit": alpha_edit, "latent": latent, **inter}


@torch.no_grad()
def animate(G: Generator, src, drv, motion_ids, motion_values, chunk_size: int = 8):
    """``animation``: frame t latent ``z_s + (D(A(E(d_t))) - D(A(E(d_0)))) + D(A(z_s) + delta)``.

    ``src`` (1,3,H,W), ``drv`` (T,3,H,W).  ``alpha_start`` is computed once at batch size 1; the
    driving frames are encoded in chunks of ``chunk_size`` (frame 0 again inside its chunk).
    """
    z_s, feats = G.encode(src)
    alpha_s0 = G.alpha(z_s)
    delta = make_delta(motion_ids, motion_values, G.motion_dim, alpha_s0.dtype, False, alpha_s0.device)
    alpha_s = alpha_s0 + delta
    z_d0, _ = G.encode(drv[0:1])
    alpha_start = G.alpha(z_d0)
    frames, zs, alphas, latents, logits, rgbs = [], [], [], [], [], []
    for start in range(0, drv.shape[0], chunk_size):
        chunk = drv[start:start + chunk_size]
        z_t, _ = G.encode(chunk)
        alpha_t = G.alpha(z_t)
        latent = G.navigate(z_s, [alpha_t, alpha_s, alpha_start])
        img, inter = G.decode(latent, feats)
        frames.append(img)
        zs.append(z_t)
        alphas.append(alpha_t)
        latents.append(latent)
        logits.append(inter["flow_logits"])
        rgbs.append(inter["rgb"])
    return {"video": torch.cat(frames), "z_s": z_s, "feats": feats, "alpha_s": alpha_s0, "delta": delta,
            "alpha_s_edit": alpha_s, "z_d0": z_d0, "alpha_start": alpha_start, "z_t": torch.cat(zs),
            "alpha_t": torch.cat(alphas), "latent": torch.cat(latents),
            "flow_logits": _cat_levels(logits), "rgb": _cat_levels(rgbs)}


@torch.no_grad()
def edit_vid(G: Generator, vid, motion_ids, motion_values, chunk_size: int = 8):
    """``vid_edit``: ``animate`` with the video's own frame 0 as the source."""
    return animate(G, vid[0:1], vid, motion_ids, motion_values, chunk_size)


def manipulation_schedule(motion_values: Sequence[float], steps: int = 16) -> np.ndarray:
    """The 64-frame ping-pong schedule of ``interpolate_img`` as float64 ``(4*steps, len(values))``.

    0 -> v -> 0 by repeated ``+= v/16`` / ``-= v/16``, then again 0 -> v -> 0 if any of list
    positions 6..9 (mouth controls) is non-zero, else 0 -> -v -> 0.
    """
    values = np.asarray(motion_values, dtype=np.float64)
    stride = values / steps
    v = np.zeros_like(values)
    out = []
    mouth = bool(np.any(values[6:10] != 0))
    second = (1.0 if mouth else -1.0)
    for sign in (1.0, -1.0, second, -second):
        for _ in range(steps):
            if sign > 0:
                v = v + stride
            else:
                v = v - stride
            out.append(v.copy())
    return np.stack(out)


@torch.no_grad()
def interpolate_img(G: Generator, src, motion_ids, motion_values, chunk_size: int = 8):
    """``manipulation``: frame k latent ``z_s + D(A(z_s) + delta_k)`` (delta_k float32-rounded)."""
    z, feats = G.encode(src)
    alpha = G.alpha(z)
    sched = manipulation_schedule(motion_values)
    deltas = torch.cat([make_delta(motion_ids, v, G.motion_dim, alpha.dtype, True, alpha.device) for v in sched])
    frames, latents, logits, rgbs = [], [], [], []
    for start in range(0, deltas.shape[0], chunk_size):
        latent = G.navigate(z, [alpha + deltas[start:start + chunk_size]])
        img, inter = G.decode(latent, feats)
        frames.append(img)
        latents.append(latent)
        logits.append(inter["flow_logits"])
        rgbs.append(inter["rgb"])
    return {"video": torch.cat(frames), "z": z, "feats": feats, "alpha": alpha, "schedule": sched,
            "delta": deltas, "latent": torch.cat(latents), "flow_logits": _cat_levels(logits),
            "rgb": _cat_levels(rgbs)}


# ---------------------------------------------------------------------------------------------
# Test utilities
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def randomize_(G: nn.Module, seed: int = 0) -> nn.Module:
    """Deterministic random weights with every path active (FIR kernels untouched).

    Values are drawn in float64 from ``torch.Generator().manual_seed(seed)`` in ``named_parameters``
    order, then cast to the parameter dtype: conv/linear/modulated weights, ``direction.weight`` and
    ``input.input`` N(0,1); ``modulation.bias`` 1 + N(0,0.1); ``norm.weight`` 1 + N(0,0.1);
    ``gamma`` U(0.1, 0.5); every other bias (incl. ``norm.bias``) N(0,0.1).
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in G.named_parameters():
        shape = tuple(p.shape)
        if name.endswith("gamma"):
            v = 0.1 + 0.4 * torch.rand(shape, generator=gen, dtype=torch.float64)
        elif name.endswith("modulation.bias") or name.endswith("norm.weight"):
            v = 1.0 + 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)
        elif name.endswith("bias"):
            v = 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)
        else:
            v = torch.randn(shape, generator=gen, dtype=torch.float64)
        p.copy_(v.to(p.dtype))
    return G


def count_parameters(G: nn.Module) -> int:
    """Number of trainable parameters (buffers excluded)."""
    return sum(p.numel() for p in G.parameters() if p.requires_grad)
