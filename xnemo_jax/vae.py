"""The Stable Diffusion VAE and the Stable Video Diffusion temporal-decoder VAE in Flax NNX.

What is ported (diffusers' modules, same arithmetic):

* :class:`AutoencoderKL` — diffusers ``AutoencoderKL`` (the SD 1.x / 2.x / XL image VAE):
  :class:`Encoder` (``conv_in``, ``down_blocks`` of ``DownEncoderBlock2D`` = ResNet blocks + a stride-2
  downsampler with diffusers' asymmetric (0, 1) padding, ``mid_block`` = ``UNetMidBlock2D`` (resnet,
  one-head self-attention with group norm and residual, resnet), ``conv_norm_out`` → SiLU → ``conv_out``
  giving ``2 * latent_channels`` moments), the 1x1 ``quant_conv`` / ``post_quant_conv`` (each optional,
  ``use_quant_conv`` / ``use_post_quant_conv``), and :class:`Decoder` (``conv_in``, ``mid_block``,
  ``up_blocks`` of ``UpDecoderBlock2D`` = ``layers_per_block + 1`` ResNet blocks + nearest-2x upsampler
  except in the last block, running over the reversed ``block_out_channels``, ``conv_norm_out`` → SiLU →
  ``conv_out``). All group norms use eps 1e-6, as diffusers' VAE does.
* :class:`AutoencoderKLTemporalDecoder` — diffusers ``AutoencoderKLTemporalDecoder`` (the SVD VAE): the
  same :class:`Encoder` and ``quant_conv`` (there is no ``post_quant_conv``), and a
  :class:`TemporalDecoder` whose ResNet blocks are :class:`SpatioTemporalResBlock` (a 2-D ResNet block per
  frame, then a :class:`TemporalResnetBlock` of (3, 1, 1) 3-D convolutions across frames, blended by an
  :class:`AlphaBlender`), plus a final (3, 1, 1) ``time_conv_out``. diffusers hard-codes 32 groups in this
  decoder and in the SVD encoder (``norm_num_groups`` is not part of its config).
* :class:`DiagonalGaussian` — diffusers' ``DiagonalGaussianDistribution`` (``mean``, ``logvar`` clipped to
  [-30, 20], ``sample(key)``, ``mode()``, ``kl()``, ``nll()``).

Layout: everything is channels-last. Images are ``(B, H, W, C)``, latents ``(B, H/f, W/f, latent_channels)``
with ``f = 2 ** (len(block_out_channels) - 1)``; the posterior's mean/logvar split the last axis (diffusers'
``chunk(2, dim=1)``). Latents are *not* scaled: multiply by :attr:`AutoencoderKL.scaling_factor` after
encoding and divide before decoding, as the diffusers pipelines do.

Frame-axis convention of the temporal decoder: :meth:`AutoencoderKLTemporalDecoder.decode` takes
``(B * F, h, w, C)`` latents in which each clip's ``F = num_frames`` frames are consecutive (row
``b * F + f`` is frame ``f`` of clip ``b``; diffusers' layout). The 2-D layers see ``B * F`` independent
images; the temporal layers reshape to ``(B, F, H, W, C)`` — channels-last, so a plain reshape, where
diffusers permutes to ``(B, C, F, H, W)`` — and convolve along ``F`` with zero padding of one frame at each
end of the clip. Every frame is decoded as part of a video (diffusers' ``image_only_indicator`` is all zeros;
the "learned" mixing strategy the decoder uses ignores it anyway).

Key-name conventions: module attribute paths mirror diffusers' module paths, so a state-dict key such as
``decoder.up_blocks.1.resnets.0.temporal_res_block.conv1.weight`` is the parameter
``model.decoder.up_blocks[1].resnets[0].temporal_res_block.conv1.weight`` (lists are ``nnx.List``;
``to_out.0`` is the attention's output projection, ``downsamplers.0.conv`` / ``upsamplers.0.conv`` the
resampling convolutions, ``time_mixer.mix_factor`` the (1,)-shaped blending logit). Layouts follow
:mod:`xnemo_jax.layers` (convolutions (*kernel, in, out), linears (in, out)), so
:func:`xnemo_jax.convert.load_pretrained` (kinds ``"vae"`` and ``"svd_vae"``) maps a ``save_pretrained``
folder by name. :meth:`AutoencoderKL.torch_key` also accepts the pre-0.14 diffusers attention names
(``query`` / ``key`` / ``value`` / ``proj_attn``) that some published VAE checkpoints still carry.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from xnemo_jax import layers
from xnemo_jax.blocks import Attention, Downsample2D, ResnetBlock2D, Upsample2D

VAE_EPS = 1e-6  # every group norm of diffusers' VAEs (the SVD temporal ResNets: TEMPORAL_EPS)
TEMPORAL_EPS = 1e-5  # MidBlockTemporalDecoder / UpBlockTemporalDecoder pass temporal_eps=1e-5
SVD_GROUPS = 32  # the temporal decoder (and the SVD encoder) always use 32 groups
ACTIVATIONS = ("silu", "swish")  # the ResNet blocks of xnemo_jax.blocks are SiLU-only
DOWN_BLOCKS = ("DownEncoderBlock2D",)
UP_BLOCKS = ("UpDecoderBlock2D",)


def _tuple(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _fields_from_dict(cls, config: dict[str, Any]) -> dict[str, Any]:
    """The known fields of a dataclass ``cls`` from a ``config.json`` dict (lists → tuples, unknown keys
    such as ``_class_name`` / ``_diffusers_version`` ignored)."""
    return {k: _tuple(v) for k, v in layers.config_fields(cls, config).items()}


def _check_blocks(kind: str, types: tuple[str, ...], supported: tuple[str, ...], channels: tuple[int, ...]):
    bad = [t for t in types if t not in supported]
    if bad:
        raise ValueError(f"unsupported {kind} block type(s) {bad}; this port implements {list(supported)}")
    if len(types) != len(channels):
        raise ValueError(f"{len(types)} {kind} block types for {len(channels)} block_out_channels {channels}")


# ----------------------------------------------------------------------------------------------- configs
@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The fields of diffusers' ``AutoencoderKL`` config that shape the model (defaults: diffusers')."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> VAEConfig:
        """From a diffusers ``config.json`` dict; unknown keys are ignored, unsupported choices raise."""
        out = cls(**_fields_from_dict(cls, config))
        _check_blocks("down", out.down_block_types, DOWN_BLOCKS, out.block_out_channels)
        _check_blocks("up", out.up_block_types, UP_BLOCKS, out.block_out_channels)
        if out.act_fn.lower() not in ACTIVATIONS:
            raise ValueError(f"unsupported act_fn {out.act_fn!r}; this port implements {list(ACTIVATIONS)}")
        return out


@dataclasses.dataclass(frozen=True)
class TemporalVAEConfig:
    """The fields of diffusers' ``AutoencoderKLTemporalDecoder`` config (defaults: diffusers')."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    force_upcast: bool = True

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> TemporalVAEConfig:
        """From a diffusers ``config.json`` dict; unknown keys are ignored, unsupported choices raise."""
        out = cls(**_fields_from_dict(cls, config))
        _check_blocks("down", out.down_block_types, DOWN_BLOCKS, out.block_out_channels)
        return out


def zero_residual_(model: nnx.Module) -> int:
    """Zero every residual branch of a VAE in place: the last convolution (``conv2``) of each 2-D and temporal
    ResNet block and the output projection of each residual attention. The blocks become identities, so a
    *random* VAE turns into a near-linear map (random convolutions between them) whose latents keep the
    image's information, as a trained VAE's do; a random VAE with its branches on is chaotic in its input
    (on the synthetic heads a frame's latent is farther from its own clip's reference than from the batch
    mean). The tiny preset's ``vae_init="zero_residual"``. Returns the number of branches zeroed."""
    n = 0
    for _, m in nnx.iter_graph(model):
        if isinstance(m, (ResnetBlock2D, TemporalResnetBlock)):
            m.conv2.weight.set_value(jnp.zeros_like(m.conv2.weight[...]))
            m.conv2.bias.set_value(jnp.zeros_like(m.conv2.bias[...]))
            n += 1
        elif isinstance(m, Attention) and m.residual_connection:
            out = m.to_out[0]
            out.weight.set_value(jnp.zeros_like(out.weight[...]))
            if out.bias is not None:
                out.bias.set_value(jnp.zeros_like(out.bias[...]))
            n += 1
    return n


# ------------------------------------------------------------------------------------------ posterior
@struct.dataclass
class DiagonalGaussian:
    """diffusers' ``DiagonalGaussianDistribution`` over channels-last latents (a pytree: jit-friendly)."""

    mean: jax.Array
    logvar: jax.Array  # already clipped to [-30, 20]

    @classmethod
    def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
        """Split ``(..., 2 * C)`` moments into mean / log-variance (first half: mean) and clip the latter."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """``mean + std * eps`` with ``eps ~ N(0, I)`` drawn from ``key``."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean

    def draw(self, key: jax.Array | None, sample: bool) -> jax.Array:
        """:meth:`sample` with ``key`` when ``sample`` is true (a key is then required), else :meth:`mode`."""
        if not sample:
            return self.mode()
        if key is None:
            raise ValueError("sample_posterior=True needs a PRNG key")
        return self.sample(key)

    def kl(self, other: DiagonalGaussian | None = None) -> jax.Array:
        """KL divergence to ``other`` (default: the standard normal), summed over (H, W, C) -> (B,)."""
        axes = tuple(range(1, self.mean.ndim))
        if other is None:
            return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=axes)
        return 0.5 * jnp.sum(jnp.square(self.mean - other.mean) / other.var + self.var / other.var - 1.0
                             - self.logvar + other.logvar, axis=axes)

    def nll(self, sample: jax.Array) -> jax.Array:
        """Negative log-likelihood of ``sample``, summed over (H, W, C) -> (B,)."""
        axes = tuple(range(1, self.mean.ndim))
        return 0.5 * jnp.sum(jnp.log(2.0 * jnp.pi) + self.logvar + jnp.square(sample - self.mean) / self.var,
                             axis=axes)


# ------------------------------------------------------------------------------------- 2-D VAE blocks
class DownEncoderBlock2D(nnx.Module):
    """``num_layers`` ResNet blocks (no time embedding), then an optional stride-2 downsampler that pads the
    bottom/right by one pixel first (diffusers' ``downsample_padding=0``)."""

    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, groups: int, add_downsample: bool,
                 rngs: nnx.Rngs, dtype=jnp.float32):
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=None, groups=groups,
                          eps=VAE_EPS, rngs=rngs, dtype=dtype)
            for i in range(num_layers)])
        self.downsamplers = nnx.List([Downsample2D(out_channels, padding=0, rngs=rngs, dtype=dtype)]) \
            if add_downsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        for down in self.downsamplers or ():
            x = down(x)
        return x


class UpDecoderBlock2D(nnx.Module):
    """``num_layers`` ResNet blocks, then an optional nearest-2x upsampler with a 3x3 convolution."""

    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, groups: int, add_upsample: bool,
                 rngs: nnx.Rngs, dtype=jnp.float32):
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=None, groups=groups,
                          eps=VAE_EPS, rngs=rngs, dtype=dtype)
            for i in range(num_layers)])
        self.upsamplers = nnx.List([Upsample2D(out_channels, rngs=rngs, dtype=dtype)]) if add_upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        for up in self.upsamplers or ():
            x = up(x)
        return x


def _vae_attention(channels: int, groups: int, *, rngs: nnx.Rngs, dtype) -> Attention:
    """The VAE mid-block self-attention: one head of width ``channels`` (diffusers passes
    ``attention_head_dim = channels``), biased projections, a group norm in front, residual connection."""
    return Attention(channels, heads=1, dim_head=channels, bias=True, norm_num_groups=groups, eps=VAE_EPS,
                     residual_connection=True, rescale_output_factor=1.0, rngs=rngs, dtype=dtype)


class UNetMidBlock2D(nnx.Module):
    """diffusers' ``UNetMidBlock2D`` as the VAE builds it (``num_layers=1``): ``resnets[0]``, then
    ``attentions[0]`` (unless ``add_attention=False``) and ``resnets[1]``."""

    def __init__(self, channels: int, *, groups: int, add_attention: bool = True, rngs: nnx.Rngs,
                 dtype=jnp.float32):
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, temb_channels=None, groups=groups, eps=VAE_EPS,
                                               rngs=rngs, dtype=dtype) for _ in range(2)])
        self.attentions = nnx.List([_vae_attention(channels, groups, rngs=rngs, dtype=dtype)]) \
            if add_attention else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nnx.Module):
    """diffusers' VAE ``Encoder`` with ``double_z=True``: image ``(B, H, W, in)`` -> moments
    ``(B, H/f, W/f, 2 * latent)``."""

    def __init__(self, in_channels: int, latent_channels: int, block_out_channels: tuple[int, ...], *,
                 layers_per_block: int, groups: int, mid_block_add_attention: bool = True, rngs: nnx.Rngs,
                 dtype=jnp.float32):
        kw = {"rngs": rngs, "dtype": dtype}
        self.conv_in = layers.Conv(in_channels, block_out_channels[0], 3, padding=1, **kw)
        blocks, channels = [], block_out_channels[0]
        for i, out in enumerate(block_out_channels):
            blocks.append(DownEncoderBlock2D(channels, out, num_layers=layers_per_block, groups=groups,
                                             add_downsample=i < len(block_out_channels) - 1, **kw))
            channels = out
        self.down_blocks = nnx.List(blocks)
        self.mid_block = UNetMidBlock2D(channels, groups=groups, add_attention=mid_block_add_attention, **kw)
        self.conv_norm_out = layers.GroupNorm(groups, channels, eps=VAE_EPS, dtype=dtype)
        self.conv_out = layers.Conv(channels, 2 * latent_channels, 3, padding=1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(layers.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """diffusers' VAE ``Decoder`` (group norms, no spatial norm): latents ``(B, h, w, latent)`` -> images."""

    def __init__(self, latent_channels: int, out_channels: int, block_out_channels: tuple[int, ...], *,
                 layers_per_block: int, groups: int, mid_block_add_attention: bool = True, rngs: nnx.Rngs,
                 dtype=jnp.float32):
        kw = {"rngs": rngs, "dtype": dtype}
        reversed_channels = tuple(reversed(block_out_channels))
        channels = reversed_channels[0]
        self.conv_in = layers.Conv(latent_channels, channels, 3, padding=1, **kw)
        self.mid_block = UNetMidBlock2D(channels, groups=groups, add_attention=mid_block_add_attention, **kw)
        blocks = []
        for i, out in enumerate(reversed_channels):
            blocks.append(UpDecoderBlock2D(channels, out, num_layers=layers_per_block + 1, groups=groups,
                                           add_upsample=i < len(reversed_channels) - 1, **kw))
            channels = out
        self.up_blocks = nnx.List(blocks)
        self.conv_norm_out = layers.GroupNorm(groups, channels, eps=VAE_EPS, dtype=dtype)
        self.conv_out = layers.Conv(channels, out_channels, 3, padding=1, **kw)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(layers.silu(self.conv_norm_out(x)))


# -------------------------------------------------------------------------------------- AutoencoderKL
_LEGACY_ATTENTION = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _legacy_attention_key(key: str) -> str:
    """Renames pre-0.14 diffusers VAE attention keys (``query``/``key``/``value``/``proj_attn``)."""
    return _LEGACY_ATTENTION.sub(lambda m: f"{m.group(1)}{_LEGACY_NAMES[m.group(2)]}.", key)


class AutoencoderKL(layers.FromConfig, nnx.Module):
    """The SD image VAE: ``encode(x) -> DiagonalGaussian``, ``decode(z) -> x``, channels-last;
    ``from_config`` takes a diffusers ``AutoencoderKL`` ``config.json`` dict."""

    CONFIG = VAEConfig

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = config
        c = config
        shared = {"layers_per_block": c.layers_per_block, "groups": c.norm_num_groups,
                  "mid_block_add_attention": c.mid_block_add_attention, "rngs": rngs, "dtype": dtype}
        self.encoder = Encoder(c.in_channels, c.latent_channels, c.block_out_channels, **shared)
        self.decoder = Decoder(c.latent_channels, c.out_channels, c.block_out_channels, **shared)
        moments = 2 * c.latent_channels
        self.quant_conv = layers.Conv(moments, moments, 1, rngs=rngs, dtype=dtype) if c.use_quant_conv else None
        self.post_quant_conv = layers.Conv(c.latent_channels, c.latent_channels, 1, rngs=rngs, dtype=dtype) \
            if c.use_post_quant_conv else None

    torch_key = staticmethod(_legacy_attention_key)

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def shift_factor(self) -> float | None:
        return self.config.shift_factor

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """Images ``(B, H, W, in_channels)`` (in [-1, 1]) -> the posterior over unscaled latents."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latents ``(B, h, w, latent_channels)`` -> images ``(B, H, W, out_channels)``."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: jax.Array, key: jax.Array | None = None, sample_posterior: bool = False) -> jax.Array:
        """Reconstruction: decode the posterior's mode (or a sample drawn with ``key``)."""
        return self.decode(self.encode(x).draw(key, sample_posterior))


# ----------------------------------------------------------------------------- temporal decoder blocks
class TemporalResnetBlock(nnx.Module):
    """diffusers' ``TemporalResnetBlock`` without a time embedding, over ``(B, F, H, W, C)``: GroupNorm →
    SiLU → (3, 1, 1) conv → GroupNorm → SiLU → (3, 1, 1) conv, plus the (1x1x1-projected) input. The
    convolutions mix each pixel across neighbouring frames only (zero padding at the clip ends)."""

    def __init__(self, in_channels: int, out_channels: int | None = None, *, groups: int = SVD_GROUPS,
                 eps: float = VAE_EPS, rngs: nnx.Rngs, dtype=jnp.float32):
        out_channels = out_channels or in_channels
        kw = {"rngs": rngs, "dtype": dtype}
        self.norm1 = layers.GroupNorm(groups, in_channels, eps=eps, dtype=dtype)
        self.conv1 = layers.Conv(in_channels, out_channels, (3, 1, 1), padding=(1, 0, 0), **kw)
        self.norm2 = layers.GroupNorm(groups, out_channels, eps=eps, dtype=dtype)
        self.conv2 = layers.Conv(out_channels, out_channels, (3, 1, 1), padding=(1, 0, 0), **kw)
        self.conv_shortcut = layers.Conv(in_channels, out_channels, (1, 1, 1), **kw) \
            if in_channels != out_channels else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(layers.silu(self.norm1(x)))
        h = self.conv2(layers.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x.astype(h.dtype) + h


class AlphaBlender(nnx.Module):
    """diffusers' ``AlphaBlender`` with ``merge_strategy="learned"``: ``alpha = sigmoid(mix_factor)``
    (``1 - alpha`` when ``switch_spatial_to_temporal_mix``), ``out = alpha * spatial + (1 - alpha) * temporal``.

    The VAE switches, so there ``out = (1 - s) * spatial + s * temporal`` with ``s = sigmoid(mix_factor)``:
    at the initial ``mix_factor = 0`` both branches weigh one half.
    """

    def __init__(self, alpha: float = 0.0, *, merge_strategy: str = "learned",
                 switch_spatial_to_temporal_mix: bool = False):
        if merge_strategy != "learned":
            raise ValueError(f"unsupported merge_strategy {merge_strategy!r}; the VAE port implements 'learned'")
        self.switch_spatial_to_temporal_mix = switch_spatial_to_temporal_mix
        self.mix_factor = nnx.Param(jnp.full((1,), alpha, jnp.float32))  # torch Parameter of shape (1,)

    def __call__(self, x_spatial: jax.Array, x_temporal: jax.Array) -> jax.Array:
        alpha = jax.nn.sigmoid(self.mix_factor[...]).astype(x_spatial.dtype)
        if self.switch_spatial_to_temporal_mix:
            alpha = 1.0 - alpha
        return alpha * x_spatial + (1.0 - alpha) * x_temporal


class SpatioTemporalResBlock(nnx.Module):
    """diffusers' ``SpatioTemporalResBlock`` as the temporal decoder builds it (no time embedding, spatial
    eps 1e-6, temporal eps 1e-5, learned switched mixing): ``(B*F, H, W, C_in) -> (B*F, H, W, C_out)``."""

    def __init__(self, in_channels: int, out_channels: int | None = None, *, rngs: nnx.Rngs, dtype=jnp.float32):
        out_channels = out_channels or in_channels
        self.spatial_res_block = ResnetBlock2D(in_channels, out_channels, temb_channels=None, groups=SVD_GROUPS,
                                               eps=VAE_EPS, rngs=rngs, dtype=dtype)
        self.temporal_res_block = TemporalResnetBlock(out_channels, out_channels, eps=TEMPORAL_EPS, rngs=rngs,
                                                      dtype=dtype)
        self.time_mixer = AlphaBlender(0.0, merge_strategy="learned", switch_spatial_to_temporal_mix=True)

    def __call__(self, x: jax.Array, num_frames: int) -> jax.Array:
        x = self.spatial_res_block(x)
        bf, h, w, c = x.shape
        video = x.reshape(bf // num_frames, num_frames, h, w, c)  # consecutive rows are one clip's frames
        mixed = self.time_mixer(video, self.temporal_res_block(video))
        return mixed.reshape(bf, h, w, c)


class MidBlockTemporalDecoder(nnx.Module):
    """diffusers' ``MidBlockTemporalDecoder``: ``num_layers`` spatio-temporal ResNets and one attention, run
    as ``resnets[0]`` then ``zip(resnets[1:], attentions)`` pairs (attention first). As in diffusers, with
    ``num_layers == 1`` the attention is built (and loaded) but never applied, and resnets beyond the second
    are never applied either."""

    def __init__(self, channels: int, *, num_layers: int, rngs: nnx.Rngs, dtype=jnp.float32):
        self.resnets = nnx.List([SpatioTemporalResBlock(channels, channels, rngs=rngs, dtype=dtype)
                                 for _ in range(num_layers)])
        self.attentions = nnx.List([_vae_attention(channels, SVD_GROUPS, rngs=rngs, dtype=dtype)])

    def __call__(self, x: jax.Array, num_frames: int) -> jax.Array:
        x = self.resnets[0](x, num_frames)
        for resnet, attention in zip(self.resnets[1:], self.attentions, strict=False):
            x = resnet(attention(x), num_frames)  # per-frame spatial self-attention
        return x


class UpBlockTemporalDecoder(nnx.Module):
    """diffusers' ``UpBlockTemporalDecoder``: spatio-temporal ResNets, then an optional 2x upsampler."""

    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, add_upsample: bool,
                 rngs: nnx.Rngs, dtype=jnp.float32):
        self.resnets = nnx.List([SpatioTemporalResBlock(in_channels if i == 0 else out_channels, out_channels,
                                                        rngs=rngs, dtype=dtype) for i in range(num_layers)])
        self.upsamplers = nnx.List([Upsample2D(out_channels, rngs=rngs, dtype=dtype)]) if add_upsample else None

    def __call__(self, x: jax.Array, num_frames: int) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x, num_frames)
        for up in self.upsamplers or ():
            x = up(x)
        return x


class TemporalDecoder(nnx.Module):
    """diffusers' ``TemporalDecoder``: latents ``(B*F, h, w, latent)`` -> frames ``(B*F, H, W, out)``."""

    def __init__(self, latent_channels: int, out_channels: int, block_out_channels: tuple[int, ...], *,
                 layers_per_block: int, rngs: nnx.Rngs, dtype=jnp.float32):
        kw = {"rngs": rngs, "dtype": dtype}
        reversed_channels = tuple(reversed(block_out_channels))
        channels = reversed_channels[0]
        self.conv_in = layers.Conv(latent_channels, channels, 3, padding=1, **kw)
        self.mid_block = MidBlockTemporalDecoder(channels, num_layers=layers_per_block, **kw)
        blocks = []
        for i, out in enumerate(reversed_channels):
            blocks.append(UpBlockTemporalDecoder(channels, out, num_layers=layers_per_block + 1,
                                                 add_upsample=i < len(reversed_channels) - 1, **kw))
            channels = out
        self.up_blocks = nnx.List(blocks)
        self.conv_norm_out = layers.GroupNorm(SVD_GROUPS, channels, eps=VAE_EPS, dtype=dtype)
        self.conv_out = layers.Conv(channels, out_channels, 3, padding=1, **kw)
        # diffusers' Conv3d(out, out, kernel (3, 1, 1), padding (1, 0, 0)): a last smoothing across frames
        self.time_conv_out = layers.Conv(out_channels, out_channels, (3, 1, 1), padding=(1, 0, 0), **kw)

    def __call__(self, z: jax.Array, num_frames: int) -> jax.Array:
        x = self.mid_block(self.conv_in(z), num_frames)
        for block in self.up_blocks:
            x = block(x, num_frames)
        x = self.conv_out(layers.silu(self.conv_norm_out(x)))
        bf, h, w, c = x.shape
        x = self.time_conv_out(x.reshape(bf // num_frames, num_frames, h, w, c))
        return x.reshape(bf, h, w, c)


class AutoencoderKLTemporalDecoder(layers.FromConfig, nnx.Module):
    """The SVD VAE: per-image :meth:`encode`, clip-wise :meth:`decode` (``num_frames`` consecutive latents
    per clip), channels-last; ``from_config`` takes a diffusers ``AutoencoderKLTemporalDecoder`` dict."""

    CONFIG = TemporalVAEConfig

    def __init__(self, config: TemporalVAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = config
        c = config
        self.encoder = Encoder(c.in_channels, c.latent_channels, c.block_out_channels,
                               layers_per_block=c.layers_per_block, groups=SVD_GROUPS, rngs=rngs, dtype=dtype)
        self.decoder = TemporalDecoder(c.latent_channels, c.out_channels, c.block_out_channels,
                                       layers_per_block=c.layers_per_block, rngs=rngs, dtype=dtype)
        moments = 2 * c.latent_channels
        self.quant_conv = layers.Conv(moments, moments, 1, rngs=rngs, dtype=dtype)  # no post_quant_conv

    torch_key = staticmethod(_legacy_attention_key)

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """Images (or video frames as a batch) ``(N, H, W, in_channels)`` -> the posterior per image."""
        return DiagonalGaussian.from_moments(self.quant_conv(self.encoder(x)))

    def decode(self, z: jax.Array, num_frames: int) -> jax.Array:
        """Unscaled latents ``(B * num_frames, h, w, C)``, each clip's frames consecutive, -> frames
        ``(B * num_frames, H, W, out_channels)`` in the same order."""
        if z.shape[0] % num_frames:
            raise ValueError(f"{z.shape[0]} latent frames do not split into clips of num_frames={num_frames}")
        return self.decoder(z, num_frames)

    def __call__(self, x: jax.Array, key: jax.Array | None = None, sample_posterior: bool = False,
                 num_frames: int = 1) -> jax.Array:
        """Reconstruction of ``(B * num_frames, H, W, C)`` frames through the posterior's mode (or a sample)."""
        return self.decode(self.encode(x).draw(key, sample_posterior), num_frames)
