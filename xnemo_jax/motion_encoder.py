"""X-NeMo's motion encoder: ``MotEncoder_withExtra`` with the ``FAN_SA`` backbone, named like the official.

One face crop per frame (``(N, 224, 224, 3)`` NHWC in [-1, 1]) and its box parameters ``f_rts``
(``(N, 3)``, official order ``(dy, dx, s)``) give ``(N, 32, 16)`` motion tokens:

1. ``model`` (FAN_SA): ``conv1`` 7x7/2 (3->64, bias) -> ``bn1`` -> ReLU; ``conv2`` ConvBlock 64->128 @112;
   ``att_1`` (patch 4); max-pool 2; ``conv3`` ConvBlock 128->128; ``conv4`` ConvBlock 128->256; ``att_2``
   (patch 2); ``m0`` hourglass (depth 4, 256 features, bilinear upsampling to the skip size,
   ``align_corners=False``, dropout 0.5 on the skip branch in training only); ``top_m_0`` ConvBlock ->
   ``conv_last0`` 1x1 -> ``bn_end0``; ``att_3`` (patch 2); ReLU -> ``l0`` 1x1 (256->68) -> ``bn5`` -> ReLU ->
   ``conv6`` 3x3/2 (68->1) -> flatten (784) -> ReLU -> ``fc`` (784->512) = ``f_mot``.
2. ``bbox_proj`` (``0``: Linear 3->64, ReLU, Identity, ``3``: Linear 64->64) on ``f_rts``.
3. ``final_proj`` (576->512) on ``concat(f_mot, bbox)``, reshaped to 32 tokens x 16 (token ``l`` = dims
   ``16l..16l+15``) plus the fixed 1-D sincos buffer ``pe`` (``(1, 32, 16)``: sin | cos, omega_k = 10000^(-k/8)).

ConvBlock(in, out): three pre-activation stages (BatchNorm -> ReLU -> 3x3 conv, no bias) of widths out/2,
out/4, out/4, concatenated, plus the residual (``downsample``: BatchNorm -> ReLU -> 1x1 conv when in != out).

Patch-transformer adapter (``att_{1,2,3}``, the official ``TemporalTransformer3DModel`` of
``FAN_temporal_feature_extractor.py`` used per frame): ``norm`` GroupNorm(32, C, eps 1e-6) -> ``pos_embed``
(diffusers ``PatchEmbed``: ``proj`` conv kernel = stride = p, C->1024, no LayerNorm, plus the 2-D sincos
table of ``get_2d_sincos_pos_embed`` for the 28x28 grid, base size 28 — not a checkpoint key, recomputed
here) -> ``transformer_blocks.0`` (``norms.0`` LayerNorm -> ``attention_blocks.0`` spatial self-attention,
8 heads x 128, bias-free q/k/v, biased ``to_out.0`` -> residual; ``ff_norm`` LayerNorm -> ``ff`` GEGLU
1024->4096->1024 -> residual; LayerNorm eps 1e-5) -> tokens as ``(28, 28, p, p, 1024/p^2)`` -> ``proj_out``
Linear 1024/p^2 -> C (zero-initialised) -> un-patchified (``nhwpqc -> nchpwq``) and added to the input.

BatchNorm: running statistics when ``train=False``. With ``train=True`` the batch statistics normalise
(biased variance) and the running statistics are updated in place with torch's rule
``running = (1 - momentum) * running + momentum * batch`` (momentum 0.1, unbiased batch variance) and
``num_batches_tracked += 1``. Inside a jitted step over globally sharded arrays (batch axis over the
data-parallel mesh axes) the mean over the batch axis *is* the global statistic, i.e. this behaves like
torch's ``SyncBatchNorm`` (whether the authors synchronised BN is not known). Running statistics are
:class:`flax.nnx.BatchStat` variables and ``pe`` a :class:`Buffer`, so ``nnx.split(model, nnx.Param,
nnx.BatchStat, ...)`` separates what the optimiser trains from what the forward pass updates; a training
step returns the new BatchStat state after the call.

Checkpoint conversion (``xnemo_motion_encoder.pth``, 407 keys, loaded strict in the official code):
:func:`official_keys`, :func:`from_official`, :func:`to_official`, :func:`load_official`. Module attribute
paths mirror the official module paths, and layers declare their ``TORCH_LAYOUT`` (Linear transposed,
conv (O, I, kh, kw) -> (kh, kw, I, O)), so conversion is by name plus that permutation.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from perception import resnet
from xnemo_jax import layers
from xnemo_jax.blocks import Attention
from xnemo_jax.layers import Buffer
from xnemo_jax.unet import FeedForward


# --------------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class MotionEncoderConfig:
    """FAN_SA + bbox fusion. Defaults are the official architecture (61,665,393 learnable parameters).

    ``widths``: the ConvBlock widths (``conv2``/``conv3`` and ``conv4``); ``widths[1]`` is also the
    hourglass/``top_m_0``/``conv_last0`` width (256 in the official code, where it is hard-coded).
    The adapters' token dim is ``adapter_heads * adapter_head_dim``; the token grid is
    ``image_size // 8`` (28); ``f_mot_dim`` is both the FAN output and the ``final_proj`` output, split
    into ``f_mot_dim // token_dim`` tokens.
    """

    image_size: int = 224
    in_channels: int = 3
    stem_channels: int = 64
    widths: tuple[int, int] = (128, 256)
    hourglass_depth: int = 4
    landmarks: int = 68
    adapter_heads: int = 8
    adapter_head_dim: int = 128
    ff_mult: int = 4
    patch_sizes: tuple[int, int, int] = (4, 2, 2)
    norm_groups: int = 32
    group_norm_eps: float = 1e-6
    layer_norm_eps: float = 1e-5
    batch_norm_eps: float = 1e-5
    batch_norm_momentum: float = 0.1
    hourglass_dropout: float = 0.5
    f_mot_dim: int = 512
    extra_dim: int = 3
    bbox_dim: int = 64
    token_dim: int = 16

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(self.widths))
        object.__setattr__(self, "patch_sizes", tuple(self.patch_sizes))
        problems = []
        if self.image_size % 8:
            problems.append(f"image_size {self.image_size} is not a multiple of 8")
        if (self.image_size // 4) >> self.hourglass_depth < 1:
            problems.append(f"image_size {self.image_size} is too small for hourglass depth {self.hourglass_depth}")
        for w in (self.stem_channels, *self.widths):
            if w % 4:
                problems.append(f"width {w} is not a multiple of 4 (ConvBlock splits out/2, out/4, out/4)")
        for c in self.widths:
            if c % self.norm_groups:
                problems.append(f"width {c} does not split into {self.norm_groups} GroupNorm groups")
        e = self.embed_dim
        if e % 4:
            problems.append(f"adapter dim {e} is not a multiple of 4 (2-D sincos position embedding)")
        grid_sizes = (self.image_size // 2, self.image_size // 4, self.image_size // 4)
        for p, size in zip(self.patch_sizes, grid_sizes, strict=True):
            if e % (p * p):
                problems.append(f"adapter dim {e} does not split into {p}x{p} patches")
            if size // p != self.token_grid or size % p:
                problems.append(f"patch {p} on a {size}x{size} map does not give the {self.token_grid}^2 grid")
        if self.f_mot_dim % self.token_dim:
            problems.append(f"f_mot_dim {self.f_mot_dim} does not split into tokens of {self.token_dim}")
        if self.token_dim % 2:
            problems.append(f"token_dim {self.token_dim} must be even (sin | cos halves)")
        if problems:
            raise ValueError("MotionEncoderConfig: " + "; ".join(problems))

    @property
    def embed_dim(self) -> int:
        return self.adapter_heads * self.adapter_head_dim

    @property
    def token_grid(self) -> int:
        return self.image_size // 8

    @property
    def num_tokens(self) -> int:
        return self.f_mot_dim // self.token_dim

    @classmethod
    def tiny(cls, **overrides) -> MotionEncoderConfig:
        """A slim encoder with the official structure and key names for CPU tests: 80x80 input (so the
        hourglass meets an odd size, 5 -> 2, and a non-integer upsampling, 2 -> 5, like 7 -> 3 in the
        official 56 -> 28 -> 14 -> 7 -> 3), widths 16/32/64, 4 heads x 16, 16 landmark channels, GroupNorm 8;
        the output layout stays (32, 16) (the denoiser's motion cross-attention reads 16-d tokens)."""
        base = dict(image_size=80, stem_channels=16, widths=(32, 64), landmarks=16, adapter_heads=4,
                    adapter_head_dim=16, norm_groups=8)
        return cls(**{**base, **overrides})

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> MotionEncoderConfig:
        return cls(**layers.config_fields(cls, config))


# -------------------------------------------------------------------------------------------- helpers
def sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """diffusers ``get_1d_sincos_pos_embed_from_grid`` (float64): ``[sin(pos w) | cos(pos w)]``,
    ``w_k = 10000^(-k / (embed_dim / 2))``."""
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", np.asarray(pos).reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(embed_dim: int, grid: int, base_size: int, interpolation_scale: float = 1.0) -> np.ndarray:
    """diffusers (0.26) ``get_2d_sincos_pos_embed`` for a square grid, as the float32 table PatchEmbed keeps:
    ``(grid * grid, embed_dim)``, token ``t = row * grid + col``; the first half of the dims encodes the
    column, the second half the row."""
    pos = np.arange(grid, dtype=np.float32) / np.float32(grid / base_size) / np.float32(interpolation_scale)
    cols, rows = np.meshgrid(pos, pos)  # (grid, grid) each: cols[r, c] = pos[c]
    emb = np.concatenate([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], axis=1)
    return emb.astype(np.float32)


def token_pe(num_tokens: int, token_dim: int) -> np.ndarray:
    """The official ``pe`` buffer, ``(1, num_tokens, token_dim)`` float32."""
    return sincos_1d(token_dim, np.arange(num_tokens)).astype(np.float32)[None]


def max_pool2(x: jax.Array) -> jax.Array:
    """``F.max_pool2d(x, 2)`` (floor: an odd last row/column is dropped), NHWC."""
    n, h, w, c = x.shape
    x = x[:, : 2 * (h // 2), : 2 * (w // 2)]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _bilinear_taps(in_size: int, out_size: int, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch ``upsample_bilinear2d`` (``align_corners=False``, output size given) source indices and weights,
    computed in torch's op-math precision (float32 for float32/bf16/fp16 inputs, float64 for float64)."""
    ft = np.float64 if jnp.dtype(dtype) == jnp.float64 else np.float32
    if in_size == out_size:
        idx = np.arange(out_size)
        return idx, idx, np.zeros(out_size, ft)
    scale = ft(in_size) / ft(out_size)
    src = scale * (np.arange(out_size, dtype=ft) + ft(0.5)) - ft(0.5)
    src = np.maximum(src, ft(0))
    i0 = src.astype(np.int64)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = np.clip(src - i0.astype(ft), ft(0), ft(1)).astype(ft)
    return i0, i1, lam


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` (no antialiasing), NHWC."""
    for axis, out in ((1, size[0]), (2, size[1])):
        i0, i1, lam = _bilinear_taps(x.shape[axis], out, x.dtype)
        if x.shape[axis] == out:
            continue
        shape = [1] * x.ndim
        shape[axis] = out
        lam = jnp.asarray(lam.reshape(shape), x.dtype)
        x = jnp.take(x, jnp.asarray(i0), axis=axis) * (1 - lam) + jnp.take(x, jnp.asarray(i1), axis=axis) * lam
    return x


# --------------------------------------------------------------------------------------------- layers
def BatchNorm2d(num_features: int, **kw) -> resnet.BatchNorm2d:  # noqa: N802 - the torch module's name
    """torch ``nn.BatchNorm2d`` (``perception.resnet.BatchNorm2d``) with ``num_batches_tracked``, a key of
    the official state dict: ``train=True`` normalises with the batch statistics and updates the running
    ones and the counter in place (module doc)."""
    return resnet.BatchNorm2d(num_features, track_batches=True, **kw)


class ConvBlock(nnx.Module):
    """FAN ``ConvBlock(in, out)``: ``bn1/conv1`` (out/2), ``bn2/conv2`` (out/4), ``bn3/conv3`` (out/4),
    concatenated, + residual (``downsample`` = ``[BN, ReLU, 1x1 conv]`` when in != out)."""

    def __init__(self, in_planes: int, out_planes: int, *, cfg: MotionEncoderConfig, rngs: nnx.Rngs,
                 dtype=jnp.float32):
        bn = dict(eps=cfg.batch_norm_eps, momentum=cfg.batch_norm_momentum, dtype=dtype)
        kw = dict(padding=1, bias=False, rngs=rngs, dtype=dtype)
        half, quarter = out_planes // 2, out_planes // 4
        self.bn1 = BatchNorm2d(in_planes, **bn)
        self.conv1 = layers.Conv(in_planes, half, 3, **kw)
        self.bn2 = BatchNorm2d(half, **bn)
        self.conv2 = layers.Conv(half, quarter, 3, **kw)
        self.bn3 = BatchNorm2d(quarter, **bn)
        self.conv3 = layers.Conv(quarter, quarter, 3, **kw)
        self.downsample = nnx.List([BatchNorm2d(in_planes, **bn), None,
                                    layers.Conv(in_planes, out_planes, 1, bias=False, rngs=rngs, dtype=dtype)]) \
            if in_planes != out_planes else None

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        out1 = self.conv1(jax.nn.relu(self.bn1(x, train=train)))
        out2 = self.conv2(jax.nn.relu(self.bn2(out1, train=train)))
        out3 = self.conv3(jax.nn.relu(self.bn3(out2, train=train)))
        residual = x
        if self.downsample is not None:
            residual = self.downsample[2](jax.nn.relu(self.downsample[0](x, train=train)))
        return jnp.concatenate([out1, out2, out3], axis=-1) + residual.astype(out1.dtype)


class HourGlass(nnx.Module):
    """FAN ``HourGlass(1, depth, features)``: ``b1_L`` (skip), max-pool -> ``b2_L`` -> (level L-1 or
    ``b2_plus_1``) -> ``b3_L`` -> bilinear upsampling to the skip size, summed. Dropout (p 0.5) on the skip
    branch only in training and only when a ``dropout_rng`` is given."""

    def __init__(self, depth: int, features: int, *, cfg: MotionEncoderConfig, rngs: nnx.Rngs,
                 dtype=jnp.float32):
        self.depth, self.rate = depth, cfg.hourglass_dropout
        for level in range(depth, 0, -1):
            setattr(self, f"b1_{level}", ConvBlock(features, features, cfg=cfg, rngs=rngs, dtype=dtype))
            setattr(self, f"b2_{level}", ConvBlock(features, features, cfg=cfg, rngs=rngs, dtype=dtype))
            if level == 1:
                self.b2_plus_1 = ConvBlock(features, features, cfg=cfg, rngs=rngs, dtype=dtype)
            setattr(self, f"b3_{level}", ConvBlock(features, features, cfg=cfg, rngs=rngs, dtype=dtype))

    def _forward(self, level: int, x: jax.Array, train: bool, rng) -> jax.Array:
        up1 = getattr(self, f"b1_{level}")(x, train=train)
        if train and rng is not None and self.rate > 0:
            keep = jax.random.bernoulli(jax.random.fold_in(rng, level), 1.0 - self.rate, up1.shape)
            up1 = jnp.where(keep, up1 / (1.0 - self.rate), 0).astype(up1.dtype)
        low = getattr(self, f"b2_{level}")(max_pool2(x), train=train)
        low = self._forward(level - 1, low, train, rng) if level > 1 else self.b2_plus_1(low, train=train)
        low = getattr(self, f"b3_{level}")(low, train=train)
        return up1 + resize_bilinear(low, up1.shape[1:3])

    def __call__(self, x: jax.Array, *, train: bool = False, dropout_rng: jax.Array | None = None) -> jax.Array:
        return self._forward(self.depth, x, train, dropout_rng)


class PatchEmbed(nnx.Module):
    """diffusers ``PatchEmbed`` (``layer_norm=False``, ``flatten=True``): ``proj`` conv (kernel = stride =
    patch) + the 2-D sincos table (a constant recomputed from the grid, not a checkpoint key)."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int, base_size: int, *, rngs: nnx.Rngs,
                 dtype=jnp.float32):
        self.patch_size, self.base_size, self.embed_dim = patch_size, base_size, embed_dim
        self.proj = layers.Conv(in_channels, embed_dim, patch_size, stride=patch_size, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.proj(x)  # (B, h, w, D)
        b, h, w, d = y.shape
        if h != w:
            raise ValueError(f"PatchEmbed: square grids only, got {h}x{w}")
        table = sincos_2d(self.embed_dim, h, self.base_size)
        return y.reshape(b, h * w, d) + jnp.asarray(table, y.dtype)[None]


class AdapterBlock(nnx.Module):
    """The official ``TemporalTransformerBlock`` with one ``Spatial_Self`` attention: ``norms.0`` ->
    ``attention_blocks.0`` -> +res; ``ff_norm`` -> ``ff`` (GEGLU) -> +res."""

    def __init__(self, dim: int, heads: int, head_dim: int, *, cfg: MotionEncoderConfig, rngs: nnx.Rngs,
                 dtype=jnp.float32):
        eps = cfg.layer_norm_eps
        self.attention_blocks = nnx.List([Attention(dim, heads=heads, dim_head=head_dim, bias=False, out_bias=True,
                                                    rngs=rngs, dtype=dtype)])
        self.norms = nnx.List([layers.LayerNorm(dim, eps=eps, dtype=dtype)])
        self.ff = FeedForward(dim, cfg.ff_mult, rngs=rngs, dtype=dtype)
        self.ff_norm = layers.LayerNorm(dim, eps=eps, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        for attn, norm in zip(self.attention_blocks, self.norms, strict=True):
            x = attn(norm(x)) + x
        return self.ff(self.ff_norm(x)) + x


class PatchTransformer(nnx.Module):
    """``att_{1,2,3}``: the official ``TemporalTransformer3DModel`` of ``FAN_temporal_feature_extractor.py``
    applied per frame (``skip=True``): input ``(B, H, W, C)`` -> same shape."""

    def __init__(self, in_channels: int, patch_size: int, *, cfg: MotionEncoderConfig, rngs: nnx.Rngs,
                 dtype=jnp.float32):
        dim = cfg.embed_dim
        self.patch_size, self.in_channels = patch_size, in_channels
        self.norm = layers.GroupNorm(cfg.norm_groups, in_channels, eps=cfg.group_norm_eps, dtype=dtype)
        self.transformer_blocks = nnx.List([AdapterBlock(dim, cfg.adapter_heads, cfg.adapter_head_dim, cfg=cfg,
                                                         rngs=rngs, dtype=dtype)])
        self.proj_out = layers.Linear(dim // patch_size ** 2, in_channels, rngs=rngs, dtype=dtype)
        self.proj_out.weight.set_value(jnp.zeros_like(self.proj_out.weight.get_value()))  # zero_module
        self.proj_out.bias.set_value(jnp.zeros_like(self.proj_out.bias.get_value()))
        self.pos_embed = PatchEmbed(in_channels, dim, patch_size, cfg.token_grid, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        p = self.patch_size
        gh, gw = h // p, w // p
        t = self.pos_embed(self.norm(x))  # (B, gh*gw, D)
        for block in self.transformer_blocks:
            t = block(t)
        t = self.proj_out(t.reshape(b, gh, gw, p, p, -1))  # (B, gh, gw, p, p, C)
        t = t.transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * p, gw * p, c)  # "nhwpqc -> n(hp)(wq)c"
        return t + x.astype(t.dtype)


class FAN_SA(nnx.Module):  # noqa: N801 - the official class name
    """The official ``FAN_SA`` backbone: ``(N, S, S, 3)`` in [-1, 1] -> ``f_mot`` ``(N, 512)``."""

    def __init__(self, cfg: MotionEncoderConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        bn = dict(eps=cfg.batch_norm_eps, momentum=cfg.batch_norm_momentum, dtype=dtype)
        kw = dict(cfg=cfg, rngs=rngs, dtype=dtype)
        stem, (w1, w2) = cfg.stem_channels, cfg.widths
        self.conv1 = layers.Conv(cfg.in_channels, stem, 7, stride=2, padding=3, rngs=rngs, dtype=dtype)
        self.bn1 = BatchNorm2d(stem, **bn)
        self.conv2 = ConvBlock(stem, w1, **kw)
        self.conv3 = ConvBlock(w1, w1, **kw)
        self.conv4 = ConvBlock(w1, w2, **kw)
        self.m0 = HourGlass(cfg.hourglass_depth, w2, **kw)
        self.top_m_0 = ConvBlock(w2, w2, **kw)
        self.conv_last0 = layers.Conv(w2, w2, 1, rngs=rngs, dtype=dtype)
        self.l0 = layers.Conv(w2, cfg.landmarks, 1, rngs=rngs, dtype=dtype)
        self.bn_end0 = BatchNorm2d(w2, **bn)
        self.conv6 = layers.Conv(cfg.landmarks, 1, 3, stride=2, padding=1, rngs=rngs, dtype=dtype)
        self.fc = layers.Linear(cfg.token_grid ** 2, cfg.f_mot_dim, rngs=rngs, dtype=dtype)
        self.bn5 = BatchNorm2d(cfg.landmarks, **bn)
        p1, p2, p3 = cfg.patch_sizes
        self.att_1 = PatchTransformer(w1, p1, **kw)
        self.att_2 = PatchTransformer(w2, p2, **kw)
        self.att_3 = PatchTransformer(w2, p3, **kw)

    def __call__(self, x: jax.Array, *, train: bool = False, dropout_rng: jax.Array | None = None) -> jax.Array:
        x = jax.nn.relu(self.bn1(self.conv1(x), train=train))
        x = self.att_1(self.conv2(x, train=train))
        x = self.conv4(self.conv3(max_pool2(x), train=train), train=train)
        x = self.att_2(x)
        ll = self.top_m_0(self.m0(x, train=train, dropout_rng=dropout_rng), train=train)
        ll = self.att_3(self.bn_end0(self.conv_last0(ll), train=train))
        net = jax.nn.relu(self.bn5(self.l0(jax.nn.relu(ll)), train=train))
        net = self.conv6(net)  # (N, g, g, 1)
        net = jax.nn.relu(net.reshape(net.shape[0], -1))
        return self.fc(net)


class MotionEncoder(layers.FromConfig, nnx.Module):
    """``MotEncoder_withExtra``: ``images`` ``(..., S, S, 3)`` NHWC in [-1, 1] and ``f_rts`` ``(..., 3)``
    (``(dy, dx, s)``; the released pipeline always passes ``(0, 0, 1)``) -> ``(..., 32, 16)`` motion tokens.

    ``train=True``: BatchNorm batch statistics with in-place running-stat updates (see the module doc);
    the hourglass dropout (p 0.5, torch's ``.train()`` behaviour) is applied only when ``dropout_rng`` is
    given, so ``train=True`` without it is "BatchNorm in training mode, dropout off".
    Parameters are float32; ``dtype`` is the compute dtype (float32, bfloat16; float64 under jax x64).
    """

    CONFIG = MotionEncoderConfig

    def __init__(self, config: MotionEncoderConfig | None = None, *, rngs: nnx.Rngs, dtype=jnp.float32):
        cfg = config if config is not None else MotionEncoderConfig()
        self.config, self.dtype = cfg, dtype
        self.pe = Buffer(jnp.asarray(token_pe(cfg.num_tokens, cfg.token_dim)))
        self.model = FAN_SA(cfg, rngs=rngs, dtype=dtype)
        self.bbox_proj = nnx.List([layers.Linear(cfg.extra_dim, cfg.bbox_dim, rngs=rngs, dtype=dtype), None, None,
                                   layers.Linear(cfg.bbox_dim, cfg.bbox_dim, rngs=rngs, dtype=dtype)])
        self.final_proj = layers.Linear(cfg.f_mot_dim + cfg.bbox_dim, cfg.f_mot_dim, rngs=rngs, dtype=dtype)

    def __call__(self, images: jax.Array, f_rts: jax.Array, *, train: bool = False,
                 dropout_rng: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        lead = images.shape[:-3]
        if images.shape[-3:] != (cfg.image_size, cfg.image_size, cfg.in_channels):
            raise ValueError(f"MotionEncoder: images must be (..., {cfg.image_size}, {cfg.image_size}, "
                             f"{cfg.in_channels}) NHWC, got {images.shape}")
        if f_rts.shape != lead + (cfg.extra_dim,):
            raise ValueError(f"MotionEncoder: f_rts must be {lead + (cfg.extra_dim,)}, got {f_rts.shape}")
        x = images.reshape((-1,) + images.shape[-3:]).astype(self.dtype)
        f = f_rts.reshape(-1, cfg.extra_dim).astype(self.dtype)
        f_mot = self.model(x, train=train, dropout_rng=dropout_rng)
        bbox = self.bbox_proj[3](jax.nn.relu(self.bbox_proj[0](f)))
        latent = self.final_proj(jnp.concatenate([f_mot, bbox], axis=-1))
        tokens = latent.reshape(-1, cfg.num_tokens, cfg.token_dim) + self.pe.get_value().astype(self.dtype)
        return tokens.reshape(lead + (cfg.num_tokens, cfg.token_dim))


def count_params(model) -> int:
    """Learnable parameters (``nnx.Param``; BatchNorm statistics and ``pe`` excluded); works on abstract
    models."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


# ----------------------------------------------------------------------------------------- conversion
# The variables of the official state dict: parameters, BatchNorm running statistics and ``pe``.
KINDS = (nnx.Param, nnx.BatchStat, Buffer)


def official_keys(model) -> dict[str, tuple]:
    """The official state-dict keys of ``model`` with their PyTorch-layout shapes (abstract models too)."""
    from xnemo_jax import convert  # noqa: PLC0415 - convert imports the UNet; keep this module light

    return convert.torch_shapes(model, KINDS)


def from_official(model, state_dict: Mapping[str, Any], source: str = "state dict") -> None:
    """Fills ``model`` (concrete or ``nnx.eval_shape``-abstract) in place from an official torch-layout
    state dict (numpy arrays, or anything ``np.asarray`` reads). Strict: a missing, unexpected or
    mis-shaped key raises :class:`xnemo_jax.convert.ConversionError` naming it. The adapters' 2-D
    ``pos_embed.pos_embed`` tables are not keys (recomputed); ``pe`` and the BatchNorm statistics are."""
    from xnemo_jax import convert  # noqa: PLC0415

    convert.assign(model, {k: np.asarray(v) for k, v in state_dict.items()}, source, kinds=KINDS)
    convert.to_device(model)


def to_official(model) -> dict[str, np.ndarray]:
    """The exact inverse of :func:`from_official`: every key (parameters, BatchNorm running statistics,
    ``num_batches_tracked`` as int64 as torch stores it, ``pe``) as a torch-layout numpy array."""
    from xnemo_jax import convert  # noqa: PLC0415

    return {k: v.astype(np.int64) if np.issubdtype(v.dtype, np.integer) else v
            for k, v in convert.to_torch(model, KINDS).items()}


def build(config: MotionEncoderConfig | None = None, *, dtype=jnp.float32, abstract: bool = False,
          seed: int = 0) -> MotionEncoder:
    """A :class:`MotionEncoder` (``abstract``: under ``nnx.eval_shape``, nothing allocated)."""
    make = lambda rngs: MotionEncoder(config, rngs=rngs, dtype=layers.as_dtype(dtype))  # noqa: E731
    return nnx.eval_shape(lambda: make(layers.ShapeOnlyRngs())) if abstract else make(nnx.Rngs(seed))


def load_official(state_dict_or_path, config: MotionEncoderConfig | None = None, *,
                  dtype=jnp.float32) -> MotionEncoder:
    """A :class:`MotionEncoder` with the weights of ``xnemo_motion_encoder.pth`` (a path: read weights-only
    through :func:`xnemo_jax.convert.read_torch_file`; torch needed then) or of an official-layout state
    dict. Built abstract first, so nothing is allocated twice."""
    source = "state dict"
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        from xnemo_jax.convert import read_torch_file  # noqa: PLC0415
        source = os.fspath(state_dict_or_path)
        state = read_torch_file(source)
    else:
        state = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v))
                 for k, v in state_dict_or_path.items()}
    model = build(config, dtype=dtype, abstract=True)
    from_official(model, state, source)
    return model
