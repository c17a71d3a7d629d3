"""A PyTorch reference of X-NeMo's motion encoder (``MotEncoder_withExtra`` + ``FAN_SA``), for parity tests.

Written from the facts in ``shared/reference/xnemo_official.md`` §1.5/§2 and the key list of
``xnemo_param_keys_full.txt`` [C]: NCHW, torch conventions, the official module names and registration
order (so ``state_dict()`` has exactly the 407 official keys, in the official order), with configurable
widths so that a small instance runs fast. Defaults are the official sizes.

Semantics reproduced: ConvBlock (pre-activation BN -> ReLU -> 3x3 conv stages of out/2, out/4, out/4,
concatenated, + residual with a BN -> ReLU -> 1x1 conv downsample when widths differ), FAN hourglass
(max-pool 2, bilinear ``align_corners=False`` upsampling to the skip size, dropout 0.5 on the skip branch),
the patch-transformer adapters (GroupNorm eps 1e-6 -> diffusers-0.26 PatchEmbed with a float32 2-D sincos
buffer that is not persistent -> LayerNorm + 8x128 self-attention + LayerNorm + GEGLU feed-forward ->
``(h, w, p, p, D/p^2)`` -> zero-initialised Linear -> ``nhwpqc -> nchpwq`` un-patchify -> + input), and
the bbox fusion + 32x16 token reshape + ``pe`` buffer.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


def sincos_1d(dim: int, pos) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    ang = np.asarray(pos, dtype=np.float64).reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(ang), np.cos(ang)], axis=1)


def sincos_2d(dim: int, grid: int, base_size: int) -> np.ndarray:
    """(grid*grid, dim): first half the column (w) code, second half the row (h) code."""
    pos = np.arange(grid, dtype=np.float32) / np.float32(grid / base_size)
    w_idx, h_idx = np.meshgrid(pos, pos)
    return np.concatenate([sincos_1d(dim // 2, w_idx), sincos_1d(dim // 2, h_idx)], axis=1)


class ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout // 2, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout // 2)
        self.conv2 = nn.Conv2d(cout // 2, cout // 4, 3, 1, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout // 4)
        self.conv3 = nn.Conv2d(cout // 4, cout // 4, 3, 1, 1, bias=False)
        self.downsample = (nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cout, 1, bias=False))
                           if cin != cout else None)

    def forward(self, x):
        a = self.conv1(F.relu(self.bn1(x)))
        b = self.conv2(F.relu(self.bn2(a)))
        c = self.conv3(F.relu(self.bn3(b)))
        skip = x if self.downsample is None else self.downsample(x)
        return torch.cat([a, b, c], dim=1) + skip


class HourGlass(nn.Module):
    def __init__(self, depth: int, features: int):
        super().__init__()
        self.depth = depth
        self.dropout = nn.Dropout(0.5)
        self._make(depth, features)

    def _make(self, level: int, f: int):
        self.add_module(f"b1_{level}", ConvBlock(f, f))
        self.add_module(f"b2_{level}", ConvBlock(f, f))
        if level > 1:
            self._make(level - 1, f)
        else:
            self.add_module(f"b2_plus_{level}", ConvBlock(f, f))
        self.add_module(f"b3_{level}", ConvBlock(f, f))

    def _run(self, level: int, x):
        up1 = self.dropout(self._modules[f"b1_{level}"](x))
        low = self._modules[f"b2_{level}"](F.max_pool2d(x, 2, stride=2))
        low = self._run(level - 1, low) if level > 1 else self._modules[f"b2_plus_{level}"](low)
        low = self._modules[f"b3_{level}"](low)
        return up1 + F.interpolate(low, size=tuple(up1.shape[2:]), mode="bilinear", align_corners=False)

    def forward(self, x):
        return self._run(self.depth, x)


class PatchEmbed(nn.Module):
    def __init__(self, size: int, patch: int, cin: int, dim: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(cin, dim, patch, stride=patch, bias=True)
        table = sincos_2d(dim, size // patch, size // patch)
        self.register_buffer("pos_embed", torch.from_numpy(table).float()[None], persistent=False)

    def forward(self, x):
        y = self.proj(x).flatten(2).transpose(1, 2)
        return y + self.pos_embed.to(y.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])

    def forward(self, x):
        b, n, _ = x.shape
        split = lambda t: t.view(b, n, self.heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x))
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1)
        o = (w @ v).transpose(1, 2).reshape(b, n, self.heads * self.head_dim)
        return self.to_out[1](self.to_out[0](o))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        h, g = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(g)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.attention_blocks = nn.ModuleList([Attention(dim, heads, head_dim)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim)])
        self.ff = FeedForward(dim)
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, x):
        for attn, norm in zip(self.attention_blocks, self.norms, strict=True):
            x = attn(norm(x)) + x
        return self.ff(self.ff_norm(x)) + x


class Adapter(nn.Module):
    """The official ``TemporalTransformer3DModel`` as FAN_SA uses it (one frame, ``Spatial_Self``)."""

    def __init__(self, cin: int, size: int, patch: int, heads: int, head_dim: int, groups: int):
        super().__init__()
        dim = heads * head_dim
        self.cin, self.patch = cin, patch
        self.norm = nn.GroupNorm(groups, cin, eps=1e-6, affine=True)
        self.transformer_blocks = nn.ModuleList([Block(dim, heads, head_dim)])
        self.proj_out = nn.Linear(dim // patch ** 2, cin)
        self.pos_embed = PatchEmbed(size, patch, cin, dim)
        with torch.no_grad():
            self.proj_out.weight.zero_()
            self.proj_out.bias.zero_()

    def forward(self, x):  # (B, C, H, W)
        b, _, h, w = x.shape
        p = self.patch
        t = self.pos_embed(self.norm(x))
        for block in self.transformer_blocks:
            t = block(t)
        t = self.proj_out(t.reshape(b, h // p, w // p, p, p, -1))
        t = torch.einsum("nhwpqc->nchpwq", t).reshape(b, self.cin, h, w)
        return t + x


class FAN_SA(nn.Module):  # noqa: N801
    def __init__(self, image_size=224, stem=64, widths=(128, 256), depth=4, landmarks=68, heads=8, head_dim=128,
                 patches=(4, 2, 2), groups=32, f_mot=512):
        super().__init__()
        w1, w2 = widths
        grid = image_size // 8
        self.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=3)
        self.bn1 = nn.BatchNorm2d(stem)
        self.conv2 = ConvBlock(stem, w1)
        self.conv3 = ConvBlock(w1, w1)
        self.conv4 = ConvBlock(w1, w2)
        self.m0 = HourGlass(depth, w2)
        self.top_m_0 = ConvBlock(w2, w2)
        self.conv_last0 = nn.Conv2d(w2, w2, 1)
        self.l0 = nn.Conv2d(w2, landmarks, 1)
        self.bn_end0 = nn.BatchNorm2d(w2)
        self.conv6 = nn.Conv2d(landmarks, 1, 3, 2, 1)
        self.fc = nn.Linear(grid * grid, f_mot)
        self.bn5 = nn.BatchNorm2d(landmarks)
        self.att_1 = Adapter(w1, image_size // 2, patches[0], heads, head_dim, groups)
        self.att_2 = Adapter(w2, image_size // 4, patches[1], heads, head_dim, groups)
        self.att_3 = Adapter(w2, image_size // 4, patches[2], heads, head_dim, groups)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.att_1(self.conv2(x))
        x = self.conv4(self.conv3(F.max_pool2d(x, 2)))
        x = self.att_2(x)
        ll = self.top_m_0(self.m0(x))
        ll = self.att_3(self.bn_end0(self.conv_last0(ll)))
        net = F.relu(self.bn5(self.l0(F.relu(ll))))
        net = self.conv6(net)
        net = F.relu(net.reshape(net.shape[0], -1))
        return self.fc(net)


class MotEncoder_withExtra(nn.Module):  # noqa: N801
    def __init__(self, extra_dim: int = 3, out_ch: int = 16, bbox_dim: int = 64, f_mot: int = 512, **fan):
        super().__init__()
        self.out_ch = out_ch
        self.model = FAN_SA(f_mot=f_mot, **fan)
        self.register_buffer("pe", torch.from_numpy(sincos_1d(out_ch, np.arange(f_mot // out_ch))).float()[None])
        self.bbox_proj = nn.Sequential(nn.Linear(extra_dim, bbox_dim), nn.ReLU(), nn.Identity(),
                                       nn.Linear(bbox_dim, bbox_dim))
        self.final_proj = nn.Linear(f_mot + bbox_dim, f_mot)

    def forward(self, x, emb):  # x (N, 3, S, S), emb (N, 3)
        latent = torch.cat([self.model(x), self.bbox_proj(emb)], dim=1)
        latent = self.final_proj(latent)
        return latent.reshape(latent.shape[0], -1, self.out_ch) + self.pe


def tiny_kwargs(cfg) -> dict:
    """Constructor arguments matching a ``xnemo_jax.motion_encoder.MotionEncoderConfig``."""
    return dict(image_size=cfg.image_size, stem=cfg.stem_channels, widths=tuple(cfg.widths),
                depth=cfg.hourglass_depth, landmarks=cfg.landmarks, heads=cfg.adapter_heads,
                head_dim=cfg.adapter_head_dim, patches=tuple(cfg.patch_sizes), groups=cfg.norm_groups,
                f_mot=cfg.f_mot_dim, out_ch=cfg.token_dim, bbox_dim=cfg.bbox_dim, extra_dim=cfg.extra_dim)


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every path active: fan-in-scaled weights (incl. the zero-initialised ``proj_out``), small biases,
    norm affines 1 + noise, BatchNorm running stats perturbed. Values are float32 (so a ``.double()`` copy
    holds exactly the same numbers)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda shape: torch.randn(shape, generator=g)  # noqa: E731
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if isinstance(module, (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d)):
                    p.copy_((1.0 if name == "weight" else 0.0) + 0.1 * rand(p.shape))
                elif name == "weight":
                    p.copy_(rand(p.shape) / math.sqrt(max(1, p[0].numel())))
                else:
                    p.copy_(0.05 * rand(p.shape))
    return model


@torch.no_grad()
def calibrate_(model: nn.Module, x, emb, seed: int = 0) -> nn.Module:
    """Sets every BatchNorm's running statistics to the batch statistics of one forward pass on ``x``
    (so eval-mode activations stay unit-scale), then perturbs them (mean +- 0.1 std, var x U(0.8, 1.25))
    and sets ``num_batches_tracked`` to a non-zero count. Dropout stays off."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = 1.0
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    model(x, emb)
    model.eval()
    g = torch.Generator().manual_seed(seed + 1)
    for i, bn in enumerate(bns):
        bn.momentum = 0.1
        std = bn.running_var.sqrt()
        bn.running_mean.add_(0.1 * std * torch.randn(bn.running_mean.shape, generator=g))
        bn.running_var.mul_(torch.exp(0.2 * (2 * torch.rand(bn.running_var.shape, generator=g) - 1)))
        bn.num_batches_tracked.fill_(7 + i)
    return model
