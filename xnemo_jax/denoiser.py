"""X-NeMo's denoising UNet (the official ``UNet3DConditionModel`` with ``inference_xnemo_stage2.yaml``),
its reference attention, and official-checkpoint conversion. Channels-last, Flax NNX.

Facts: ``/work/shared/reference/xnemo_official.md`` §1.3, §1.4, §1.8, §3.1, §3.3, §5b.

**Layout.** :class:`Denoiser` is :class:`xnemo_jax.unet.UNet2DConditionModel` (the SD-1.x
``sd-image-variations`` UNet, exact vs diffusers) run over latents ``(B, F, h, w, 4)`` with the frames
folded into the batch (every conv / GroupNorm / spatial transformer acts per frame; the time embedding
is per batch element, the same ``t`` for all frames; the CLIP context is repeated per frame), plus after
every spatial layer (down 4x2, mid 1, up 4x3 = 21 places; ``motion_module_resolutions`` [1, 2, 4, 8],
mid block on, not decoder-only):

* a **motion module** ``<block>.motion_modules.<j>`` — X-NeMo's motion cross-attention
  (``[Spatial_Cross, Spatial_Cross]``): GroupNorm(32, C, eps 1e-6) → Linear ``proj_in`` on each
  frame's H*W tokens → 2 x [LayerNorm → cross-attention to the frame's own 32 motion tokens (K/V
  16 → C, bias-free q/k/v, biased out) → +res] → LayerNorm → GEGLU FF (C → 4C → C) → +res → Linear
  ``proj_out`` (zero-initialised) → + module input;
* then a **temporal module** ``<block>.temporal_modules.<j>`` — AnimateDiff's
  (``[Temporal_Self, Temporal_Self]``): the same wrapper, each spatial position attending across the F
  frames; before each attention the interleaved sinusoidal table ``attention_blocks.<k>.pos_encoder.pe``
  (1, 32, C) is **added to the LayerNorm output** (Q, K and V see it). Windows longer than the table
  (32 frames) raise ``ValueError``.

Per layer: ResNet → spatial transformer (where the block has one) → motion module → temporal module;
the mid block: ResNet → transformer → motion → temporal → ResNet (the ``after_layer`` seam of
:mod:`xnemo_jax.unet`). The naming trap is kept: ``motion_modules`` are the motion cross-attention,
``temporal_modules`` the AnimateDiff modules. ``skip_mm=True`` runs without both kinds (image mode:
exactly the 2-D UNet on every frame).

**Reference attention** (§1.3): the reference net is ``UNet2DConditionModel(..., with_output_head=False)``
run once at ``t = 0`` on the reference latent; :func:`reference_bank` returns its 16 ``norm1`` outputs
keyed by module path (``down_blocks.0.attentions.0.transformer_blocks.0`` ...), which the denoiser
repeats over the window's frames and appends to ``attn1``'s keys/values in the same-named block.
``bank_mask`` ``(B,)`` selects the examples that read it (CFG: the unconditional half gets plain
self-attention — the bank's keys are masked out of its softmax, which is exactly the official recompute).
:func:`mask_bank` is training's reference-feature masking (MAE-style random subset of tokens per example,
the same for every frame of the clip).

**Conversion**: :func:`official_keys` (``{key: torch shape}``, works on ``nnx.eval_shape`` models),
:func:`from_official` and :func:`to_official` (its bit-exact inverse, ``pe`` buffers included) for the
denoiser (1820 keys = 686 SD + 546 ``motion_modules`` + 588 ``temporal_modules`` incl. 42 ``pe``) and
the reference net (682 keys). Parameter paths are the official keys; layouts come from each layer's
``TORCH_LAYOUT`` (:mod:`xnemo_jax.convert`). The ``pe`` tables are :class:`Buffer` variables: part of the
state dict (§5b: the official loader takes them from ``xnemo_temporal_module.pth``), not trainable
(``nnx.state(model, nnx.Param)`` excludes them).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xnemo_jax import blocks, convert, layers, unet
from xnemo_jax.layers import Buffer

MOTION_BLOCK_TYPES = ("Spatial_Cross", "Spatial_Cross")
TEMPORAL_BLOCK_TYPES = ("Temporal_Self", "Temporal_Self")
ATTENTION_BLOCK_TYPES = ("Spatial_Cross", "Spatial_Self", "Temporal_Self")


# ----------------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class ModuleConfig:
    """One kind of ``VanillaTemporalModule`` (``motion_module_kwargs`` / ``temporal_module_kwargs``)."""

    num_attention_heads: int = 8
    num_transformer_block: int = 1
    attention_block_types: tuple[str, ...] = TEMPORAL_BLOCK_TYPES
    cross_attention_dim: int | None = None  # K/V input width of the *_Cross blocks
    temporal_position_encoding: bool = True
    temporal_position_encoding_max_len: int = 32
    temporal_attention_dim_div: int = 1
    zero_initialize: bool = True
    norm_num_groups: int = 32  # hard-coded in the official modules

    def __post_init__(self):
        bad = [t for t in self.attention_block_types if t not in ATTENTION_BLOCK_TYPES]
        if bad:
            raise ValueError(f"unsupported attention block type(s) {bad}; supported: {list(ATTENTION_BLOCK_TYPES)}")
        if any(t.endswith("_Cross") for t in self.attention_block_types) and not self.cross_attention_dim:
            raise ValueError("*_Cross attention blocks need cross_attention_dim")
        if self.temporal_position_encoding and any(t.startswith("Spatial") for t in self.attention_block_types):
            raise ValueError("temporal_position_encoding applies to Temporal_* attention blocks only")


MOTION_MODULE = ModuleConfig(attention_block_types=MOTION_BLOCK_TYPES, cross_attention_dim=16,
                             temporal_position_encoding=False)
TEMPORAL_MODULE = ModuleConfig()

# sd-image-variations-diffusers/unet/config.json (the fields that shape the network)
SD_IMAGE_VARIATIONS_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, mid_block_type="UNetMidBlock2DCrossAttn",
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True,
    freq_shift=0, use_linear_projection=False, act_fn="silu", center_input_sample=False, downsample_padding=1,
    mid_block_scale_factor=1,
)
# a tiny configuration of the same structure (§5b: widths 1:2:4:4 keep the release's key set; the modules'
# GroupNorm(32) needs multiples of 32)
TINY_UNET = dict(SD_IMAGE_VARIATIONS_UNET, block_out_channels=[32, 64, 128, 128], cross_attention_dim=64,
                 sample_size=16)


@dataclasses.dataclass(frozen=True)
class DenoiserConfig:
    """``UNet3DConditionModel`` settings of ``inference_xnemo_stage2.yaml`` over a diffusers UNet config."""

    unet: unet.UNetConfig = dataclasses.field(default_factory=lambda: unet.UNetConfig.from_dict(
        SD_IMAGE_VARIATIONS_UNET))
    use_motion_module: bool = True
    motion_module: ModuleConfig = MOTION_MODULE
    use_temporal_module: bool = True
    temporal_module: ModuleConfig = TEMPORAL_MODULE
    motion_module_resolutions: tuple[int, ...] = (1, 2, 4, 8)  # for both module kinds
    motion_module_mid_block: bool = True
    motion_module_decoder_only: bool = False

    @classmethod
    def from_dict(cls, unet_config: Mapping[str, Any] | unet.UNetConfig, **options) -> DenoiserConfig:
        """From the diffusers UNet ``config.json`` dict (or a UNetConfig) plus any field of this class;
        ``motion_module`` / ``temporal_module`` may be dicts of :class:`ModuleConfig` fields."""
        if not isinstance(unet_config, unet.UNetConfig):
            unet_config = unet.UNetConfig.from_dict(unet_config)
        for name in ("motion_module", "temporal_module"):
            if isinstance(options.get(name), Mapping):
                base = MOTION_MODULE if name == "motion_module" else TEMPORAL_MODULE
                value = dict(options[name])
                if "attention_block_types" in value:
                    value["attention_block_types"] = tuple(value["attention_block_types"])
                options[name] = dataclasses.replace(base, **value)
        if "motion_module_resolutions" in options:
            options["motion_module_resolutions"] = tuple(options["motion_module_resolutions"])
        return cls(unet=unet_config, **options)

    @classmethod
    def official(cls, **options) -> DenoiserConfig:
        return cls.from_dict(SD_IMAGE_VARIATIONS_UNET, **options)

    @classmethod
    def tiny(cls, **unet_changes) -> DenoiserConfig:
        """UNet widths [32, 64, 128, 128], CLIP context 64 (same key set as the release)."""
        return cls.from_dict(dict(TINY_UNET, **unet_changes))

    @property
    def max_frames(self) -> int | None:
        """The longest window the temporal position tables allow (None: no limit)."""
        m = self.temporal_module
        if self.use_temporal_module and m.temporal_position_encoding:
            return m.temporal_position_encoding_max_len
        return None


# ------------------------------------------------------------------------------------- temporal modules
def sinusoidal_table(max_len: int, d_model: int) -> np.ndarray:
    """AnimateDiff's ``PositionalEncoding.pe`` (1, max_len, d_model) float32: sin on even channels, cos on
    odd ones (interleaved), frequencies ``exp(-2i * log(10000) / d_model)``, computed in float32 as torch."""
    position = np.arange(max_len, dtype=np.float32)[:, None]
    div_term = np.exp(np.arange(0, d_model, 2, dtype=np.float32) * np.float32(-math.log(10000.0) / d_model))
    pe = np.zeros((1, max_len, d_model), np.float32)
    pe[0, :, 0::2] = np.sin(position * div_term)
    pe[0, :, 1::2] = np.cos(position * div_term)[:, : d_model // 2]
    return pe


class PositionalEncoding(nnx.Module):
    """``x + pe[:, :F]`` over ``(N, F, C)``; ``pe`` a :class:`Buffer` (from the checkpoint when loaded)."""

    def __init__(self, d_model: int, max_len: int = 32):
        self.pe = Buffer(jnp.asarray(sinusoidal_table(max_len, d_model)))

    def __call__(self, x: jax.Array) -> jax.Array:
        f, max_len = x.shape[1], self.pe.shape[1]
        if f > max_len:
            raise ValueError(f"a window of {f} frames is longer than the temporal position table ({max_len} rows)")
        return x + self.pe[...][:, :f].astype(x.dtype)


class VersatileAttention(blocks.Attention):
    """AnimateDiff's ``VersatileAttention``: ``Spatial`` (per-frame tokens; ``_Cross``: K/V from the
    frame's own context tokens) or ``Temporal`` (each spatial position over the F frames, plus the
    position table)."""

    def __init__(self, dim: int, block_type: str, cfg: ModuleConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        heads = cfg.num_attention_heads
        head_dim = dim // heads // cfg.temporal_attention_dim_div
        cross = block_type.endswith("_Cross")
        super().__init__(dim, cross_attention_dim=cfg.cross_attention_dim if cross else None, heads=heads,
                         dim_head=head_dim, rngs=rngs, dtype=dtype)
        self.temporal = block_type.startswith("Temporal")
        self.cross = cross
        self.pos_encoder = PositionalEncoding(dim, cfg.temporal_position_encoding_max_len) \
            if self.temporal and cfg.temporal_position_encoding else None

    def __call__(self, x: jax.Array, frames: int, context: jax.Array | None = None) -> jax.Array:
        """``x`` (B*F, L, C) normalised tokens, ``context`` (B*F, N, D) -> (B*F, L, C)."""
        if not self.temporal:
            return super().__call__(x, context if self.cross else None)
        bf, d, c = x.shape
        b = bf // frames
        t = x.reshape(b, frames, d, c).transpose(0, 2, 1, 3).reshape(b * d, frames, c)  # (b f) d c -> (b d) f c
        if self.pos_encoder is not None:
            t = self.pos_encoder(t)
        out = super().__call__(t, None)
        return out.reshape(b, d, frames, c).transpose(0, 2, 1, 3).reshape(bf, d, c)


class TemporalTransformerBlock(nnx.Module):
    """[LayerNorm → attention → +res] per attention block, then LayerNorm → GEGLU FF → +res."""

    def __init__(self, dim: int, cfg: ModuleConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype)
        self.attention_blocks = nnx.List([VersatileAttention(dim, t, cfg, **kw) for t in cfg.attention_block_types])
        self.norms = nnx.List([layers.LayerNorm(dim, eps=1e-5, dtype=dtype) for _ in cfg.attention_block_types])
        self.ff = unet.FeedForward(dim, **kw)
        self.ff_norm = layers.LayerNorm(dim, eps=1e-5, dtype=dtype)
        self.remat = False  # recompute the block's activations in the backward pass (layers.set_remat)

    def __call__(self, x: jax.Array, frames: int, context: jax.Array | None) -> jax.Array:
        if self.remat:  # (frames stays a Python int: closed over, not traced)
            return layers.checkpointed(self, lambda m, x, c: m._forward(x, frames, c), x, context)
        return self._forward(x, frames, context)

    def _forward(self, x: jax.Array, frames: int, context: jax.Array | None) -> jax.Array:
        for attn, norm in zip(self.attention_blocks, self.norms, strict=True):
            x = attn(norm(x), frames, context) + x
        return self.ff(self.ff_norm(x)) + x


class TemporalTransformer3DModel(nnx.Module):
    """GroupNorm (per frame) → ``proj_in`` → blocks over (B*F, H*W, C) tokens → ``proj_out`` → + input."""

    def __init__(self, channels: int, cfg: ModuleConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype)
        inner = cfg.num_attention_heads * (channels // cfg.num_attention_heads // cfg.temporal_attention_dim_div)
        self.norm = layers.GroupNorm(cfg.norm_num_groups, channels, eps=1e-6, dtype=dtype)
        self.proj_in = layers.Linear(channels, inner, **kw)
        self.transformer_blocks = nnx.List([TemporalTransformerBlock(inner, cfg, **kw)
                                            for _ in range(cfg.num_transformer_block)])
        self.proj_out = layers.Linear(inner, channels, **kw)
        if cfg.zero_initialize:
            self.proj_out.weight.set_value(jnp.zeros_like(self.proj_out.weight[...]))
            self.proj_out.bias.set_value(jnp.zeros_like(self.proj_out.bias[...]))

    def __call__(self, x: jax.Array, frames: int, context: jax.Array | None = None) -> jax.Array:
        bf, h, w, c = x.shape
        t = self.proj_in(self.norm(x).reshape(bf, h * w, c))
        for block in self.transformer_blocks:
            t = block(t, frames, context)
        t = self.proj_out(t).reshape(bf, h, w, c)
        return t + x.astype(t.dtype)


class VanillaTemporalModule(nnx.Module):
    """The official wrapper (``<block>.{motion,temporal}_modules.<j>.temporal_transformer``)."""

    def __init__(self, channels: int, cfg: ModuleConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.temporal_transformer = TemporalTransformer3DModel(channels, cfg, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, frames: int, context: jax.Array | None = None) -> jax.Array:
        return self.temporal_transformer(x, frames, context)


# --------------------------------------------------------------------------------------------- denoiser
def expand_bank(bank: Mapping[str, jax.Array] | None, batch: int, frames: int) -> dict | None:
    """Reference bank ``{key: (B or 1, S, C)}`` -> ``{key: (B*F, S, C)}``, each clip's tokens repeated for
    every frame of its window (frame-major inside the clip, like the folded latents)."""
    if not bank:
        return None
    out = {}
    for key, value in bank.items():
        if value.ndim != 3 or value.shape[0] not in (1, batch):
            raise ValueError(f"bank[{key!r}] has shape {value.shape}; expected ({batch} or 1, tokens, channels)")
        value = jnp.broadcast_to(value, (batch,) + value.shape[1:])
        out[key] = jnp.repeat(value, frames, axis=0)
    return out


class Denoiser(unet.UNet2DConditionModel):
    """The X-NeMo denoiser: ``(latents (B, F, h, w, 4), timestep, clip_context (B, L, D), motion_tokens
    (B, F, N, 16)) -> epsilon (B, F, h, w, 4)``. Built from a :class:`DenoiserConfig`
    (``Denoiser.from_config(unet_config_dict_or_DenoiserConfig, rngs=..., dtype=...)``)."""

    CONFIG = DenoiserConfig

    def __init__(self, config: DenoiserConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        super().__init__(config.unet, rngs=rngs, dtype=dtype, with_output_head=True)
        self.denoiser_config = config
        kw = dict(rngs=rngs, dtype=dtype)
        channels = config.unet.block_out_channels
        resolutions = config.motion_module_resolutions

        def attach(block, c: int, use: bool):
            layers_ = len(block.resnets) if not isinstance(block, unet.UNetMidBlock2DCrossAttn) else \
                len(block.attentions)
            block.motion_modules = nnx.List([VanillaTemporalModule(c, config.motion_module, **kw)
                                             for _ in range(layers_)]) \
                if use and config.use_motion_module else None
            block.temporal_modules = nnx.List([VanillaTemporalModule(c, config.temporal_module, **kw)
                                               for _ in range(layers_)]) \
                if use and config.use_temporal_module else None

        for i, block in enumerate(self.down_blocks):
            attach(block, channels[i], 2 ** i in resolutions and not config.motion_module_decoder_only)
        if self.mid_block is not None:
            attach(self.mid_block, channels[-1], config.motion_module_mid_block)
        for i, block in enumerate(self.up_blocks):
            # the official up-block rule 2 ** (3 - i) assumes 4 levels (§5b)
            attach(block, channels[::-1][i], 2 ** (3 - i) in resolutions)

    def _after_layer(self, block, j: int, x: jax.Array, *, frames: int, motion: jax.Array | None,
                     temporal: bool = True) -> jax.Array:
        mm = getattr(block, "motion_modules", None)
        if mm is not None:
            x = mm[j](x, frames, motion)
        tm = getattr(block, "temporal_modules", None) if temporal else None
        if tm is not None:
            x = tm[j](x, frames)
        return x

    def __call__(self, latents: jax.Array, timestep, clip_context: jax.Array, motion_tokens: jax.Array | None = None,
                 *, bank: Mapping[str, jax.Array] | None = None, bank_mask: jax.Array | None = None,
                 skip_mm: bool = False, skip_temporal: bool = False) -> jax.Array:
        """epsilon ``(B, F, h, w, out_channels)``.

        ``timestep`` scalar or ``(B,)`` (the same for every frame of a clip); ``clip_context``
        ``(B, L, D)``; ``motion_tokens`` ``(B, F, N, motion cross_attention_dim)`` (unused with
        ``skip_mm``); ``bank`` from :func:`reference_bank` / :func:`mask_bank`, ``{key: (B or 1, S, C)}``;
        ``bank_mask`` ``(B,)`` bool: the examples that read the bank (default all; CFG's unconditional
        half: False); ``skip_mm``: no motion / temporal modules (image mode); ``skip_temporal``: the motion
        modules without the temporal ones (training's motion stage, on single frames).
        """
        if latents.ndim != 5:
            raise ValueError(f"latents must be (B, F, h, w, C), got shape {latents.shape}")
        b, f, h, w, c = latents.shape
        cfg = self.denoiser_config
        if not skip_mm:
            if cfg.max_frames is not None and f > cfg.max_frames:
                raise ValueError(f"a window of {f} frames is longer than the temporal position table "
                                 f"({cfg.max_frames} rows): use context windows of at most {cfg.max_frames} frames")
            if cfg.use_motion_module:
                if motion_tokens is None or motion_tokens.ndim != 4 or motion_tokens.shape[:2] != (b, f):
                    shape = None if motion_tokens is None else motion_tokens.shape
                    raise ValueError(f"motion_tokens must be ({b}, {f}, tokens, dim), got {shape}")
        t = jnp.asarray(timestep)
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, b)):
            raise ValueError(f"timestep must be a scalar or ({b},), got shape {t.shape}")
        if t.ndim == 1:
            t = jnp.repeat(jnp.broadcast_to(t, (b,)), f)
        ctx = jnp.repeat(jnp.broadcast_to(clip_context, (b,) + clip_context.shape[1:]), f, axis=0)
        mask = None
        if bank_mask is not None:
            mask = jnp.repeat(jnp.broadcast_to(jnp.asarray(bank_mask, bool).reshape(-1), (b,)), f)
        hook = None
        if not skip_mm:
            motion = None
            if cfg.use_motion_module:
                motion = motion_tokens.reshape((b * f,) + motion_tokens.shape[2:]).astype(self.dtype)
            hook = lambda block, j, x: self._after_layer(block, j, x, frames=f, motion=motion,  # noqa: E731
                                                         temporal=not skip_temporal)
        out = super().__call__(latents.reshape(b * f, h, w, c), t, ctx, bank=expand_bank(bank, b, f),
                               bank_mask=mask, after_layer=hook)
        return out.reshape((b, f) + out.shape[1:])


def reference_net(config: Mapping[str, Any] | unet.UNetConfig, *, rngs: nnx.Rngs, dtype="float32"):
    """The reference UNet: the SD UNet without ``conv_norm_out`` / ``conv_out`` (682 official keys)."""
    return unet.UNet2DConditionModel.from_config(config, rngs=rngs, dtype=dtype, with_output_head=False)


def reference_bank(net: unet.UNet2DConditionModel, ref_latent: jax.Array, clip_context: jax.Array, *,
                   timestep=0, bank_dtype=None) -> dict[str, jax.Array]:
    """The reference bank: ``net`` run on ``ref_latent`` ``(B, h, w, 4)`` at ``timestep`` (0, as the
    official) with ``clip_context`` ``(B, L, D)``; every BasicTransformerBlock's ``norm1`` output
    ``(B, h_l * w_l, C_l)`` keyed by its module path. ``bank_dtype`` (e.g. ``jnp.float16``, as the official
    ``update(..., dtype=torch.float16)``) rounds the bank; the denoiser casts it back to its compute dtype."""
    taps: dict = {}
    net(ref_latent, timestep, clip_context, collect=taps)
    if bank_dtype is not None:
        taps = {k: v.astype(bank_dtype) for k, v in taps.items()}
    return taps


def mask_bank(bank: Mapping[str, jax.Array], mask_ratio: float, rng: jax.Array) -> Mapping[str, jax.Array]:
    """Training's reference-feature masking: keep a random ``int((1 - mask_ratio) * S)`` of each entry's S
    tokens per example (MAE-style ``argsort`` of uniform noise, an independent draw per entry). The bank is
    per clip, so the denoiser reuses the same subset for every frame. ``mask_ratio`` 0 returns ``bank``."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    if mask_ratio == 0:
        return bank
    keys = sorted(bank)
    rngs = jax.random.split(rng, len(keys))
    out = {}
    for key, r in zip(keys, rngs, strict=True):
        value = bank[key]
        b, s = value.shape[:2]
        keep = int(s * (1 - mask_ratio))
        ids = jnp.argsort(jax.random.uniform(r, (b, s)), axis=1)[:, :keep]
        out[key] = jnp.take_along_axis(value, ids[:, :, None], axis=1)
    return out


ShapeOnlyRngs = layers.ShapeOnlyRngs  # (kept here too: tests and scripts import it from the denoiser)


def abstract_denoiser(config: DenoiserConfig | None = None, *, dtype="float32") -> Denoiser:
    """The :class:`Denoiser` under ``nnx.eval_shape`` (shapes, paths and metadata; nothing allocated)."""
    config = config or DenoiserConfig.official()
    return nnx.eval_shape(lambda: Denoiser(config, rngs=ShapeOnlyRngs(), dtype=layers.as_dtype(dtype)))


def abstract_reference_net(config: Mapping[str, Any] | unet.UNetConfig = SD_IMAGE_VARIATIONS_UNET, *,
                           dtype="float32") -> unet.UNet2DConditionModel:
    """The reference net under ``nnx.eval_shape`` (nothing allocated)."""
    return nnx.eval_shape(lambda: reference_net(config, rngs=ShapeOnlyRngs(), dtype=dtype))


# ------------------------------------------------------------------------------------------- conversion
KINDS = (nnx.Param, Buffer)  # the variables that make up an official state dict


def official_keys(model) -> dict[str, tuple]:
    """``{official key: PyTorch shape}`` of a :class:`Denoiser` or a reference net (abstract models too)."""
    return convert.torch_shapes(model, KINDS)


def to_official(model) -> dict[str, np.ndarray]:
    """The official state dict (numpy, PyTorch layouts, ``pe`` buffers included); bit-exact inverse of
    :func:`from_official`."""
    return convert.to_torch(model, KINDS)


def from_official(model, state_dict: Mapping[str, Any], *, strict: bool = True, source: str = "checkpoint",
                  report: dict | None = None):
    """Fills ``model`` (concrete, or abstract from ``nnx.eval_shape``) from an official-layout state dict
    (numpy arrays or torch tensors) and returns it with jax arrays.

    ``strict=True``: every key used, every parameter and buffer filled, shapes equal, or
    :class:`xnemo_jax.convert.ConversionError` names the key. ``strict=False`` is the official loader's
    (keys the model lacks ignored, missing variables kept; ``report`` receives both lists): e.g. the SD
    UNet folder, then ``xnemo_denoising_unet.pth``, then ``xnemo_temporal_module.pth``, in that order.
    """
    state = {k: _numpy(v) for k, v in state_dict.items()}
    convert.assign(model, state, source, kinds=KINDS, strict=strict, report=report)
    return convert.to_device(model, partial=not strict)


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor (no torch import here)
        value = value.detach().cpu()
        if str(value.dtype) in ("torch.bfloat16", "torch.float16"):
            value = value.float()
        return value.numpy()
    return np.asarray(value)
