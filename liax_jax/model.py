"""LIA-X in Flax NNX: encoder, motion dictionary, flow generator + render path (NHWC, images in [-1, 1]).

Architecture and naming follow the official ``networks/*.py`` (``shared/reference/liax_official.md``
§2); module attributes mirror the official module paths so :mod:`liax_jax.convert` can walk them.

Sizes other than 512² generalise the official layout: ``L = log2(resolution) - 2`` decoder levels, and
the channel count at depth ``d = log2(resolution / res)`` is ``[64, 128, 256][d] * scale`` for d < 3,
``512 * scale`` beyond (the official table at 512²). Encoder ResBlocks are ``block2 .. block{L}`` (each a
one-element list, like the official Sequential) then ``block_512``; decoder levels are ``conv_512_*`` /
``flow_512`` / ``rgb_512`` (8x8) then ``conv{i+1}_*`` / ``flow{i+1}`` / ``rgb{i+1}``.

Public API: ``LiaX(config, rngs=...)``, ``encode(x) -> (z, feats)``, ``motion_coefficients(z) -> alpha``,
``directions() -> Q``, ``direction_latent(alpha) -> alpha @ Q^T``, ``decode(latent, feats) -> image``
(``decode(..., return_intermediates=True)`` also returns per-level flow logits and rgb).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from liax_jax.ops import (
    SQRT2,
    ConvLayer,
    EqualConv2d,
    EqualLinear,
    ModelConfig,
    ModulatedConv2d,
    StyledConv,
    _Base,
    fir_kernel,
    grid_sample_align_corners,
    group_norm,
    upsample2x,
)


@dataclasses.dataclass(frozen=True)
class LiaXConfig(ModelConfig):
    resolution: int = 512
    scale: float = 2.0
    motion_dim: int = 40
    style_dim: int = 512
    norm_groups: int = 32
    dtype: str = "float32"   # compute dtype; params are float32 (float64 when dtype is float64)

    def __post_init__(self):
        levels = math.log2(self.resolution) - 2
        if self.resolution < 64 or self.resolution > 512 or levels != int(levels):
            raise ValueError(f"resolution must be a power of two in [64, 512], got {self.resolution}")
        self.check_dtype()
        for d in range(self.levels + 1):
            if self.channels(d) % self.norm_groups:
                raise ValueError(f"channels {self.channels(d)} not divisible by norm_groups {self.norm_groups}")

    @property
    def levels(self) -> int:
        return int(math.log2(self.resolution)) - 2

    @property
    def style(self) -> int:
        return int(round(self.style_dim * self.scale))

    def channels(self, depth: int) -> int:
        base = [64, 128, 256][depth] if depth < 3 else 512
        return int(round(base * self.scale))


# -------------------------------------------------------------------------------------------- encoder
class EncoderResBlock(_Base):
    """conv1 3x3 in->out, conv2 3x3 out->out blur-down, skip 1x1 blur-down (no act, no bias), /sqrt(2)."""

    def __init__(self, cin, cout, *, rngs, param_dtype):
        self.conv1 = ConvLayer(cin, cout, 3, rngs=rngs, param_dtype=param_dtype)
        self.conv2 = ConvLayer(cout, cout, 3, downsample=True, rngs=rngs, param_dtype=param_dtype)
        self.skip = ConvLayer(cin, cout, 1, downsample=True, activate=False, bias=False, rngs=rngs,
                              param_dtype=param_dtype)

    def __call__(self, x):
        return (self.conv2(self.conv1(x)) + self.skip(x)) / jnp.asarray(SQRT2, x.dtype)

    def official(self, prefix, out):
        for name in ("conv1", "conv2", "skip"):
            getattr(self, name).official(f"{prefix}.{name}", out)


class Encoder2R(_Base):
    def __init__(self, c: LiaXConfig, *, rngs, param_dtype):
        L = c.levels
        self.block1 = ConvLayer(3, c.channels(0), 1, rngs=rngs, param_dtype=param_dtype)
        self.names = tuple(f"block{k}" for k in range(2, L + 1))
        for d, name in enumerate(self.names):
            setattr(self, name, nnx.List([EncoderResBlock(c.channels(d), c.channels(d + 1), rngs=rngs,
                                                          param_dtype=param_dtype)]))
        self.block_512 = EncoderResBlock(c.channels(L - 1), c.channels(L), rngs=rngs, param_dtype=param_dtype)
        self.block8 = EqualConv2d(c.channels(L), c.style, 4, bias=False, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x):
        h = self.block1(x)
        feats = [h]
        for name in self.names:
            h = getattr(self, name)[0](h)
            feats.append(h)
        h = self.block_512(h)
        z = self.block8(h)[:, 0, 0, :]
        return z, feats[::-1]

    def official(self, prefix, out):
        self.block1.official(f"{prefix}.block1", out)
        for name in self.names:
            getattr(self, name)[0].official(f"{prefix}.{name}.0", out)
        self.block_512.official(f"{prefix}.block_512", out)
        self.block8.official(f"{prefix}.block8", out)


class Encoder(_Base):
    def __init__(self, c: LiaXConfig, *, rngs, param_dtype):
        self.enc_2r = Encoder2R(c, rngs=rngs, param_dtype=param_dtype)
        self.enc_r2t = nnx.List([EqualLinear(c.style, c.motion_dim, rngs=rngs, param_dtype=param_dtype)])

    def official(self, prefix, out):
        self.enc_2r.official(f"{prefix}.enc_2r", out)
        self.enc_r2t[0].official(f"{prefix}.enc_r2t.0", out)


# -------------------------------------------------------------------------------------------- decoder
def torch_linspace_float32(n: int) -> np.ndarray:
    """``torch.linspace(-1, 1, n, dtype=float32)`` bit for bit (the official warping grid).

    PyTorch computes ``start + step * i`` for the first half and ``end - step * (n - 1 - i)`` for the
    rest, with a float32 step and one rounding (FMA); numpy's or jnp's float32 linspace differ in the
    last bit, which the flow generator amplifies.
    """
    step = float(np.float32(2.0) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    return np.where(i < n // 2, -1.0 + step * i, 1.0 - step * (n - 1 - i)).astype(np.float32)


class FlowResBlock(_Base):
    """h = StyledConv1(x); out = gamma * StyledConv2(GroupNorm(h)) + h (the input is not added back)."""

    def __init__(self, ch, style, groups, *, rngs, param_dtype):
        self.conv1 = StyledConv(ch, ch, 3, style, rngs=rngs, param_dtype=param_dtype)
        self.conv2 = StyledConv(ch, ch, 3, style, rngs=rngs, param_dtype=param_dtype)
        self.norm_weight = nnx.Param(jnp.ones((ch,), param_dtype))
        self.norm_bias = nnx.Param(jnp.zeros((ch,), param_dtype))
        self.gamma = nnx.Param(jnp.full((ch,), 1e-5, param_dtype))
        self.groups = groups

    def __call__(self, x, latent):
        h = self.conv1(x, latent)
        r = group_norm(h, self.groups, self.norm_weight[...], self.norm_bias[...])
        r = self.conv2(r, latent)
        return self.gamma[...].astype(h.dtype) * r + h

    def official(self, prefix, out):
        out[f"{prefix}.gamma"] = (self.gamma, "vector4")
        out[f"{prefix}.norm.weight"] = (self.norm_weight, "vector")
        out[f"{prefix}.norm.bias"] = (self.norm_bias, "vector")
        self.conv1.official(f"{prefix}.conv1", out)
        self.conv2.official(f"{prefix}.conv2", out)


class RenderResBlock(_Base):
    """Two plain 3x3 ConvLayers, identity skip, /sqrt(2)."""

    def __init__(self, ch, *, rngs, param_dtype):
        self.conv1 = ConvLayer(ch, ch, 3, rngs=rngs, param_dtype=param_dtype)
        self.conv2 = ConvLayer(ch, ch, 3, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x):
        return (self.conv2(self.conv1(x)) + x) / jnp.asarray(SQRT2, x.dtype)

    def official(self, prefix, out):
        self.conv1.official(f"{prefix}.conv1", out)
        self.conv2.official(f"{prefix}.conv2", out)


class ToFlow(_Base):
    """Flow/mask logits (modulated 1x1, no demod, + bias, + upsampled previous logits) and the warp."""

    def __init__(self, ch, style, *, rngs, param_dtype):
        self.conv = ModulatedConv2d(ch, 3, 1, style, demodulate=False, rngs=rngs, param_dtype=param_dtype)
        self.bias = nnx.Param(jnp.zeros((3,), param_dtype))

    def __call__(self, h, latent, feat, skip=None):
        o = self.conv(h, latent) + self.bias[...].astype(h.dtype)
        if skip is not None:
            o = o + upsample2x(skip)
        lin = jnp.asarray(torch_linspace_float32(o.shape[1]), o.dtype)
        gx, gy = jnp.meshgrid(lin, lin, indexing="xy")
        grid = jnp.tanh(o[..., 0:2]) + jnp.stack([gx, gy], -1)[None]
        mask = jax.nn.sigmoid(o[..., 2:3])
        warped = grid_sample_align_corners(feat.astype(o.dtype), grid) * mask
        return warped, warped + (1 - mask) * h, o

    def official(self, prefix, out):
        out[f"{prefix}.bias"] = (self.bias, "vector4")
        out[f"{prefix}.up.kernel"] = (fir_kernel(4.0), "kernel")
        self.conv.official(f"{prefix}.conv", out)


class ToRGB(_Base):
    """1x1 ConvLayer with FusedLeakyReLU, + bias, + upsampled previous rgb."""

    def __init__(self, ch, *, rngs, param_dtype):
        self.conv = ConvLayer(ch, 3, 1, rngs=rngs, param_dtype=param_dtype)
        self.bias = nnx.Param(jnp.zeros((3,), param_dtype))

    def __call__(self, x, skip=None):
        y = self.conv(x) + self.bias[...].astype(x.dtype)
        return y + upsample2x(skip) if skip is not None else y

    def official(self, prefix, out):
        out[f"{prefix}.bias"] = (self.bias, "vector4")
        out[f"{prefix}.up.kernel"] = (fir_kernel(4.0), "kernel")
        self.conv.official(f"{prefix}.conv", out)


class DecoderLevel(_Base):
    """One resolution level: StyledConv-up, 4 FlowResBlocks, ToFlow, [up ConvLayer], 4 RenderResBlocks, ToRGB."""

    def __init__(self, cin, ch, style, groups, *, first: bool, rngs, param_dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.conv_1 = StyledConv(cin, ch, 3, style, upsample=True, **kw)
        self.conv_2 = nnx.List([FlowResBlock(ch, style, groups, **kw) for _ in range(4)])
        self.conv_2_up = None if first else ConvLayer(cin, ch, 3, upsample=True, **kw)
        self.conv_2_rgb = nnx.List([RenderResBlock(ch, **kw) for _ in range(4)])
        self.flow = ToFlow(ch, style, **kw)
        self.rgb = ToRGB(ch, **kw)

    def __call__(self, h, latent, feat, render_prev, flow_prev, rgb_prev):
        h = self.conv_1(h, latent)
        for block in self.conv_2:
            h = block(h, latent)
        warped, h, o = self.flow(h, latent, feat, flow_prev)
        if self.conv_2_up is not None:
            warped = warped + self.conv_2_up(render_prev)
        render = warped
        for block in self.conv_2_rgb:
            render = block(render)
        rgb = self.rgb(render, rgb_prev)
        return h, render, o, rgb

    def official(self, prefix, out, flow_name, rgb_name):
        self.conv_1.official(f"{prefix}_1", out)
        for j, block in enumerate(self.conv_2):
            block.official(f"{prefix}_2.{j}", out)
        if self.conv_2_up is not None:
            self.conv_2_up.official(f"{prefix}_2_up", out)
        for j, block in enumerate(self.conv_2_rgb):
            block.official(f"{prefix}_2_rgb.{j}", out)
        self.flow.official(flow_name, out)
        self.rgb.official(rgb_name, out)


class Decoder(_Base):
    def __init__(self, c: LiaXConfig, *, rngs, param_dtype):
        L = c.levels
        top = c.channels(L)
        self.direction_weight = nnx.Param(jax.random.normal(rngs.params(), (c.style, c.motion_dim), param_dtype))
        self.input = nnx.Param(jax.random.normal(rngs.params(), (1, 4, 4, top), param_dtype))
        self.conv1 = StyledConv(top, top, 3, c.style, rngs=rngs, param_dtype=param_dtype)
        levels, cin = [], top
        for i in range(L):
            ch = c.channels(L - 1 - i)
            levels.append(DecoderLevel(cin, ch, c.style, c.norm_groups, first=i == 0, rngs=rngs,
                                       param_dtype=param_dtype))
            cin = ch
        self.levels = nnx.List(levels)

    def official(self, prefix, out):
        out[f"{prefix}.direction.weight"] = (self.direction_weight, "raw")
        out[f"{prefix}.input.input"] = (self.input, "const")
        self.conv1.official(f"{prefix}.conv1", out)
        for i, level in enumerate(self.levels):
            if i == 0:
                level.official(f"{prefix}.conv_512", out, f"{prefix}.flow_512", f"{prefix}.rgb_512")
            else:
                level.official(f"{prefix}.conv{i + 1}", out, f"{prefix}.flow{i + 1}", f"{prefix}.rgb{i + 1}")


# ----------------------------------------------------------------------------------------------- model
class LiaX(nnx.Module):
    """The LIA-X generator (``Generator`` of the official code)."""

    def __init__(self, config: Mapping | LiaXConfig, *, rngs: nnx.Rngs):
        self.config = LiaXConfig.from_config(config)
        pd = self.config.param_dtype
        self.enc = Encoder(self.config, rngs=rngs, param_dtype=pd)
        self.dec = Decoder(self.config, rngs=rngs, param_dtype=pd)

    @property
    def dtype(self):
        return self.config.compute_dtype

    def encode(self, x: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        """Images (B, R, R, 3) in [-1, 1] -> (z (B, S), feats coarse->fine)."""
        return self.enc.enc_2r(x.astype(self.dtype))

    def motion_coefficients(self, z: jax.Array) -> jax.Array:
        """alpha = enc_r2t(z), (B, motion_dim)."""
        return self.enc.enc_r2t[0](z.astype(self.dtype))

    def directions(self) -> jax.Array:
        """The orthonormal motion dictionary Q (S, M): reduced QR of (weight + 1e-8)."""
        w = self.dec.direction_weight[...]
        q, _ = jnp.linalg.qr(w + jnp.asarray(1e-8, w.dtype), mode="reduced")
        return q.astype(self.dtype)

    def direction_latent(self, alpha: jax.Array, q: jax.Array | None = None) -> jax.Array:
        """D(alpha) = alpha @ Q^T, (B, S)."""
        q = self.directions() if q is None else q
        return alpha.astype(q.dtype) @ q.T

    def decode(self, latent: jax.Array, feats: list[jax.Array], return_intermediates: bool = False):
        """Latent z_{s->t} (B, S) and source feats -> image (B, R, R, 3) (no tanh, nominally [-1, 1])."""
        latent = latent.astype(self.dtype)
        b = latent.shape[0]
        feats = [jnp.broadcast_to(f, (b,) + f.shape[1:]) if f.shape[0] != b else f for f in feats]
        d = self.dec
        h = jnp.broadcast_to(d.input[...].astype(self.dtype), (b,) + d.input.shape[1:])
        h = d.conv1(h, latent)
        render = flow = rgb = None
        flows, rgbs = [], []
        for level, feat in zip(d.levels, feats, strict=True):
            h, render, flow, rgb = level(h, latent, feat, render, flow, rgb)
            flows.append(flow)
            rgbs.append(rgb)
        if return_intermediates:
            return rgb, {"flow_logits": flows, "rgb": rgbs}
        return rgb

    def navigate(self, z: jax.Array, alpha: list[jax.Array] | None = None, q: jax.Array | None = None) -> jax.Array:
        """Latent navigation (§2.3): [a] -> z + D(a); [a_t, a_s, a_start] -> z + (D(a_t) - D(a_start)) + D(a_s)."""
        if alpha is None:
            return z
        q = self.directions() if q is None else q
        if len(alpha) == 1:
            return z + self.direction_latent(alpha[0], q)
        a_t, a_s, a_start = alpha
        return z + (self.direction_latent(a_t, q) - self.direction_latent(a_start, q)) + \
            self.direction_latent(a_s, q)

    def official_entries(self) -> dict:
        """Official state-dict key -> (nnx.Param or constant ndarray, layout tag)."""
        out: dict = {}
        self.enc.official("enc", out)
        self.dec.official("dec", out)
        return out

    def __call__(self, source: jax.Array, driving: jax.Array) -> jax.Array:
        """Training form: x_hat = G(z_src + D(alpha_drv), feats_src)."""
        z, feats = self.encode(source)
        z_d, _ = self.encode(driving)
        return self.decode(self.navigate(z, [self.motion_coefficients(z_d)]), feats)


def count_params(model: nnx.Module) -> int:
    return sum(int(p.size) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
