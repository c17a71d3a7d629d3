"""Stable Diffusion 1.x UNet (diffusers' ``UNet2DConditionModel``) in Flax NNX, channels-last.

What is ported — the SD-1.x family of diffusers' ``UNet2DConditionModel`` as ``diffusers`` 0.3x-0.4x
implements it:

* the sinusoidal timestep embedding (``get_timestep_embedding`` with ``flip_sin_to_cos`` and
  ``freq_shift``) → ``time_embedding.linear_1`` → SiLU → ``time_embedding.linear_2``;
* ``conv_in`` → down blocks (``CrossAttnDownBlock2D`` / ``DownBlock2D``) → ``UNetMidBlock2DCrossAttn`` →
  up blocks (``UpBlock2D`` / ``CrossAttnUpBlock2D``, skip connections concatenated on channels) →
  ``conv_norm_out`` → SiLU → ``conv_out``;
* ``Transformer2DModel`` (GroupNorm eps 1e-6, ``proj_in``/``proj_out`` as 1x1 convs or, with
  ``use_linear_projection``, Linear layers) holding ``BasicTransformerBlock`` s: ``norm1`` → ``attn1``
  (self-attention; cross-attention with ``only_cross_attention``) → residual, ``norm2`` → ``attn2``
  (cross-attention over ``encoder_hidden_states``) → residual, ``norm3`` → GEGLU feed-forward → residual;
* per-block ``attention_head_dim`` / ``transformer_layers_per_block`` / ``cross_attention_dim`` /
  ``only_cross_attention`` / ``layers_per_block`` (reversed for the up blocks, as diffusers does),
  ``center_input_sample``, ``conv_in_kernel`` / ``conv_out_kernel``, ``downsample_padding``,
  ``mid_block_scale_factor``, ``time_embedding_dim``, ``mid_block_type=None`` (no mid block);
* diffusers' handling of sizes that the total downsampling factor does not divide: each up block's
  upsampler resizes (nearest, PyTorch's index rule) to the size of the next skip connection.

diffusers' naming quirk is kept: ``attention_head_dim`` in a UNet config is the number of *heads* (the
head dim is ``channels // attention_head_dim``); ``num_attention_heads`` must be absent, as in diffusers.
Options outside that family (other block types, class / addition embeddings, ``encoder_hid_dim``,
Fourier time embeddings, scale-shift ResNets, ...) raise ``ValueError``; unknown config keys are ignored.
``upcast_attention`` needs no code: the attention entry point (:func:`xnemo_jax.layers.attention`) runs
its softmax in float32. Dropout is not implemented (``dropout`` is ignored: SD configs use 0.0, and it
is inactive at inference). Both down-block types are one class here (:class:`DownBlock`, ``attentions``
None for ``DownBlock2D``), likewise :class:`UpBlock`; only the parameter paths need to match diffusers.

Key-name convention: module attribute paths mirror diffusers' module paths (lists are ``nnx.List``), so
``down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q.weight`` is the parameter
``unet.down_blocks[0].attentions[1].transformer_blocks[0].attn1.to_q.weight`` and
:func:`xnemo_jax.convert.load_pretrained` (``kind="unet"``) fills the model by name (layouts from each
layer's ``TORCH_LAYOUT``: Linear (in, out), convs (kh, kw, in, out)). ``ff.net.1`` (dropout) is an empty
slot of ``ff.net``. A model built without its output head skips the checkpoint's ``conv_norm_out`` /
``conv_out`` keys (:meth:`UNet2DConditionModel.torch_key`).

Seams for X-NeMo (not used by the default path, which is exactly diffusers'):

* **Frames**: the model is per-image; fold a frame axis into the batch (``(B*F, H, W, C)``) and give
  ``timestep`` either as a scalar or per folded example.
* **Reference bank**: every :class:`BasicTransformerBlock` knows its path (``block.tap_key``, e.g.
  ``"down_blocks.0.attentions.0.transformer_blocks.0"``; :meth:`UNet2DConditionModel.tap_keys` lists them
  in call order). ``__call__(..., collect=taps)`` stores each block's ``norm1`` output ``(B, H*W, C)``
  in the dict ``taps`` under that key (create the dict inside the traced function and return it);
  ``__call__(..., bank={key: array or [arrays]})`` concatenates those ``(B, S', C)`` tokens to the block's
  ``norm1`` output along the sequence axis to form ``attn1``'s keys/values (queries unchanged) — the
  reference attention of ReferenceNet-style models. Blocks without an entry run plain self-attention.
* **Bank mask**: ``__call__(..., bank=..., bank_mask=m)`` with ``m`` a ``(B,)`` bool array: examples with
  ``False`` ignore the bank (their attn1 is plain self-attention; the bank keys are masked out of the
  softmax, which gives them exactly zero weight) — the unconditional CFG half of X-NeMo's denoiser.
* **Extra modules after each spatial layer** (motion cross-attention, temporal attention):
  ``__call__(..., after_layer=fn)`` calls ``x = fn(block, j, x)`` after layer ``j`` of every down / up
  block (after its ResNet and, where present, its transformer) and after the mid block's transformer
  (before its second ResNet), ``block`` being the DownBlock / UpBlock / mid block module. The modules
  themselves can live as extra attributes of the blocks (``block.motion_modules``), so the parameter
  paths above are untouched (:mod:`xnemo_jax.denoiser`).
* **Reference net without head**: ``from_config(..., with_output_head=False)`` omits ``conv_norm_out``
  and ``conv_out``; ``__call__`` then returns the last up block's features ``(B, H, W, C0)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xnemo_jax import blocks, layers

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)

# Config keys whose non-default values change the architecture in ways this port does not implement:
# key -> the accepted values. (Keys that only matter for block types we reject anyway — e.g.
# ``resnet_skip_time_act``, ``resnet_out_scale_factor``, ``cross_attention_norm``,
# ``mid_block_only_cross_attention`` — are ignored, as diffusers ignores them for these blocks.)
_UNSUPPORTED = {
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "addition_embed_type": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "resnet_time_scale_shift": ("default",),
    "dual_cross_attention": (False,),
    "attention_type": ("default",),
    "reverse_transformer_layers_per_block": (None,),
    "num_attention_heads": (None,),  # diffusers itself refuses it (the attention_head_dim naming issue)
    "act_fn": ("silu", "swish"),
}


# ----------------------------------------------------------------------------------------------- config
def _per_block(value, n: int, name: str, kind=int) -> tuple:
    """An int/bool (broadcast to every down block) or a list of ``n`` of them, as a tuple."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries; the UNet has {n} down blocks")
    if any(isinstance(v, (list, tuple)) for v in values):
        raise ValueError(f"unsupported {name}={value!r}: nested (asymmetric) per-layer lists")
    if any(v is None for v in values):
        raise ValueError(f"unsupported {name}={value!r}: every block needs a value")
    return tuple(kind(v) for v in values)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The fields of diffusers' ``UNet2DConditionModel`` config that shape an SD-1.x UNet (diffusers'
    defaults), with per-block options expanded to one entry per down block."""

    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    only_cross_attention: tuple[bool, ...] = (False,) * 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: tuple[int, ...] = (2,) * 4
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: tuple[int, ...] = (1280,) * 4
    transformer_layers_per_block: tuple[int, ...] = (1,) * 4
    attention_head_dim: tuple[int, ...] = (8,) * 4  # = number of heads per block (diffusers' quirk)
    use_linear_projection: bool = False
    upcast_attention: bool = False
    time_embedding_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> UNetConfig:
        """From a diffusers ``config.json`` dict; unknown keys are ignored, unsupported options raise."""
        for key, allowed in _UNSUPPORTED.items():
            if key in config and config[key] not in allowed:
                raise ValueError(f"unsupported UNet option {key}={config[key]!r} (supported: "
                                 f"{', '.join(repr(a) for a in allowed)})")
        if "norm_num_groups" in config and config["norm_num_groups"] is None:
            raise ValueError("unsupported UNet option norm_num_groups=None (GroupNorm-free output head)")
        given = layers.config_fields(cls, config)
        down = tuple(given.get("down_block_types", cls.down_block_types))
        up = tuple(given.get("up_block_types", cls.up_block_types))
        n = len(down)
        for name, types, allowed in (("down", down, DOWN_BLOCK_TYPES), ("up", up, UP_BLOCK_TYPES)):
            bad = [t for t in types if t not in allowed]
            if bad:
                raise ValueError(f"unsupported {name} block type(s) {bad}; supported: {list(allowed)}")
        mid = given.get("mid_block_type", cls.mid_block_type)
        if mid not in MID_BLOCK_TYPES:
            raise ValueError(f"unsupported mid_block_type {mid!r}; supported: {list(MID_BLOCK_TYPES)}")
        channels = tuple(int(c) for c in given.get("block_out_channels", cls.block_out_channels))
        if len(up) != n or len(channels) != n:
            raise ValueError(f"{n} down_block_types, {len(up)} up_block_types and {len(channels)} "
                             "block_out_channels: they must all have the same length")
        given.update(
            down_block_types=down, up_block_types=up, mid_block_type=mid, block_out_channels=channels,
            only_cross_attention=_per_block(given.get("only_cross_attention", False), n, "only_cross_attention",
                                            bool),
            layers_per_block=_per_block(given.get("layers_per_block", 2), n, "layers_per_block"),
            cross_attention_dim=_per_block(given.get("cross_attention_dim", 1280), n, "cross_attention_dim"),
            transformer_layers_per_block=_per_block(given.get("transformer_layers_per_block", 1), n,
                                                    "transformer_layers_per_block"),
            attention_head_dim=_per_block(given.get("attention_head_dim", 8), n, "attention_head_dim"),
        )
        return cls(**given)

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]


# ------------------------------------------------------------------------------------ timestep embedding
def get_timestep_embedding(timesteps: jax.Array, embedding_dim: int, flip_sin_to_cos: bool = False,
                           downscale_freq_shift: float = 1, scale: float = 1, max_period: int = 10000) -> jax.Array:
    """diffusers' sinusoidal embedding of 1-D ``timesteps`` -> ``(N, embedding_dim)`` float32.

    Frequencies ``exp(-log(max_period) * i / (half - downscale_freq_shift))`` for ``i < half``; the
    embedding is ``[sin, cos]`` (``[cos, sin]`` with ``flip_sin_to_cos``), zero-padded to an odd dim.
    """
    half = embedding_dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
    exponent = exponent / np.float32(half - downscale_freq_shift)
    freqs = jnp.exp(jnp.asarray(exponent, jnp.float32))
    args = jnp.asarray(timesteps).astype(jnp.float32)[:, None] * freqs[None, :] * scale
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if embedding_dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    """``linear_1`` → SiLU → ``linear_2`` (diffusers' ``TimestepEmbedding`` without conditioning)."""

    def __init__(self, in_channels: int, time_embed_dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.linear_1 = layers.Linear(in_channels, time_embed_dim, rngs=rngs, dtype=dtype)
        self.linear_2 = layers.Linear(time_embed_dim, time_embed_dim, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(layers.silu(self.linear_1(x)))


# ------------------------------------------------------------------------------------------ transformer
class GEGLU(nnx.Module):
    """``proj`` (dim -> 2 * inner), split into (hidden, gate): ``hidden * gelu(gate)`` (exact GELU)."""

    def __init__(self, dim: int, inner: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.proj = layers.Linear(dim, 2 * inner, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden, gate = jnp.split(self.proj(x), 2, axis=-1)
        return hidden * layers.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """diffusers' ``FeedForward`` with GEGLU: ``net.0`` (GEGLU), ``net.1`` (dropout: empty), ``net.2``."""

    def __init__(self, dim: int, mult: int = 4, *, rngs: nnx.Rngs, dtype=jnp.float32):
        inner = int(dim * mult)
        self.net = nnx.List([GEGLU(dim, inner, rngs=rngs, dtype=dtype), None,
                             layers.Linear(inner, dim, rngs=rngs, dtype=dtype)])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
    """norm1 → attn1 → +res, norm2 → attn2 (cross) → +res, norm3 → GEGLU FF → +res (LayerNorm eps 1e-5).

    ``tap_key`` is the block's module path in the UNet (set by :class:`UNet2DConditionModel`); it keys
    the ``collect`` / ``bank`` dicts of the X-NeMo reference-attention seam.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, *, cross_attention_dim: int,
                 only_cross_attention: bool = False, rngs: nnx.Rngs, dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype)
        self.only_cross_attention = only_cross_attention
        self.norm1 = layers.LayerNorm(dim, eps=1e-5, dtype=dtype)
        self.attn1 = blocks.Attention(dim, heads=heads, dim_head=dim_head,
                                      cross_attention_dim=cross_attention_dim if only_cross_attention else None, **kw)
        self.norm2 = layers.LayerNorm(dim, eps=1e-5, dtype=dtype)
        self.attn2 = blocks.Attention(dim, cross_attention_dim=cross_attention_dim, heads=heads, dim_head=dim_head,
                                      **kw)
        self.norm3 = layers.LayerNorm(dim, eps=1e-5, dtype=dtype)
        self.ff = FeedForward(dim, **kw)
        self.tap_key = ""
        self.remat = False  # recompute the block's activations in the backward pass (layers.set_remat)

    def __call__(self, x: jax.Array, context: jax.Array | None, *, bank: Sequence[jax.Array] | None = None,
                 collect: dict | None = None, bank_mask: jax.Array | None = None) -> jax.Array:
        """``x`` (B, L, C) tokens, ``context`` (B, S, cross_dim) -> (B, L, C).

        ``bank``: extra ``(B, S', C)`` token arrays appended to ``norm1(x)`` to form ``attn1``'s keys and
        values; ``collect``: a dict that receives ``norm1(x)`` under :attr:`tap_key`; ``bank_mask``
        ``(B,)`` bool: which examples see the bank (the others get plain self-attention).
        """
        if self.only_cross_attention and bank:
            raise ValueError(f"{self.tap_key}: a reference bank needs self-attention in attn1 "
                             "(only_cross_attention is set)")
        bank = list(bank) if bank else None
        if self.remat:
            out, h = layers.checkpointed(self, type(self)._forward, x, context, bank, bank_mask)
        else:
            out, h = self._forward(x, context, bank, bank_mask)
        if collect is not None:
            collect[self.tap_key] = h
        return out

    def _forward(self, x, context, bank, bank_mask) -> tuple[jax.Array, jax.Array]:
        """(block output, ``norm1(x)``: the reference-bank tap)."""
        h = self.norm1(x)
        if self.only_cross_attention:
            kv = context
        elif bank:
            kv = jnp.concatenate([h, *[b.astype(h.dtype) for b in bank]], axis=1)
        else:
            kv = None  # plain self-attention
        valid = None
        if kv is not None and bank and bank_mask is not None:
            n, extra = h.shape[0], kv.shape[1] - h.shape[1]
            read = jnp.broadcast_to(jnp.asarray(bank_mask, bool).reshape(n, 1), (n, extra))
            valid = jnp.concatenate([jnp.ones((n, h.shape[1]), bool), read], axis=1)
        x = self.attn1(h, kv, mask=valid) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x, h


class Transformer2DModel(nnx.Module):
    """GroupNorm (eps 1e-6) → ``proj_in`` → BasicTransformerBlocks over the H*W tokens → ``proj_out`` → +res.

    ``proj_in``/``proj_out`` are 1x1 convs, or Linear layers with ``use_linear_projection`` (the same
    function; only the checkpoint layout differs).
    """

    def __init__(self, heads: int, dim_head: int, channels: int, *, num_layers: int, cross_attention_dim: int,
                 norm_num_groups: int, use_linear_projection: bool, only_cross_attention: bool, rngs: nnx.Rngs,
                 dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype)
        inner = heads * dim_head
        self.norm = layers.GroupNorm(norm_num_groups, channels, eps=1e-6, dtype=dtype)
        proj = (lambda i, o: layers.Linear(i, o, **kw)) if use_linear_projection else \
            (lambda i, o: layers.Conv(i, o, 1, **kw))
        self.proj_in = proj(channels, inner)
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(inner, heads, dim_head, cross_attention_dim=cross_attention_dim,
                                  only_cross_attention=only_cross_attention, **kw)
            for _ in range(num_layers)])
        self.proj_out = proj(inner, channels)

    def __call__(self, x: jax.Array, context: jax.Array | None, *, bank: Mapping | None = None,
                 collect: dict | None = None, bank_mask: jax.Array | None = None) -> jax.Array:
        b, h, w, c = x.shape
        # channels-last: a 1x1 conv and a Linear act identically on (B, H, W, C) — no transposes needed
        t = self.proj_in(self.norm(x))
        t = t.reshape(b, h * w, t.shape[-1])
        for block in self.transformer_blocks:
            t = block(t, context, bank=_bank_for(bank, block.tap_key), collect=collect, bank_mask=bank_mask)
        t = self.proj_out(t.reshape(b, h, w, t.shape[-1]))
        return t + x.astype(t.dtype)


def _bank_for(bank: Mapping | None, key: str) -> list | None:
    """The list of bank arrays for one block (an entry may be one array or a sequence of them)."""
    if not bank or key not in bank:
        return None
    entry = bank[key]
    return [entry] if isinstance(entry, (jax.Array, np.ndarray)) else list(entry)


# ------------------------------------------------------------------------------------------ up/down/mid
def resize_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``F.interpolate(x, size=size, mode="nearest")`` for channels-last ``(B, H, W, C)``.

    PyTorch's index rule: source index ``min(floor(i * (in / out)), in - 1)`` with the scale in float32.
    """
    for axis, out in zip((1, 2), size, strict=True):
        n = x.shape[axis]
        if out == n:
            continue
        if out == 2 * n:
            idx = np.arange(out) // 2
        else:
            scale = np.float32(n) / np.float32(out)
            idx = np.minimum(np.floor(np.arange(out, dtype=np.float32) * scale).astype(np.int64), n - 1)
        x = jnp.take(x, jnp.asarray(idx, jnp.int32), axis=axis)
    return x


def _upsample(upsampler: blocks.Upsample2D, x: jax.Array, size: tuple[int, int] | None) -> jax.Array:
    """diffusers' ``Upsample2D(x, output_size)``: nearest 2x, or nearest to ``size``, then the 3x3 conv."""
    return upsampler(x) if size is None else upsampler.conv(resize_nearest(x, size))


def _transformer(cfg: UNetConfig, i: int, channels: int, *, rngs, dtype, up: bool = False,
                 mid: bool = False) -> Transformer2DModel:
    """The Transformer2DModel of down block ``i``, of up block ``i`` (per-block options reversed), or of
    the mid block (``i`` = the last block; diffusers' mid block never uses only_cross_attention)."""
    pick = (lambda v: v[::-1][i]) if up else (lambda v: v[i])
    heads = pick(cfg.attention_head_dim)  # diffusers' num_attention_heads defaults to attention_head_dim
    return Transformer2DModel(heads, channels // heads, channels, num_layers=pick(cfg.transformer_layers_per_block),
                              cross_attention_dim=pick(cfg.cross_attention_dim), norm_num_groups=cfg.norm_num_groups,
                              use_linear_projection=cfg.use_linear_projection,
                              only_cross_attention=False if mid else pick(cfg.only_cross_attention), rngs=rngs,
                              dtype=dtype)


class DownBlock(nnx.Module):
    """``CrossAttnDownBlock2D`` (``attentions`` set) or ``DownBlock2D`` (``attentions`` is None):
    (resnet → [transformer]) x layers, then an optional stride-2 conv; every stage's output is a skip."""

    def __init__(self, cfg: UNetConfig, i: int, in_channels: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        out = cfg.block_out_channels[i]
        kw = dict(rngs=rngs, dtype=dtype)
        n = cfg.layers_per_block[i]
        self.resnets = nnx.List([
            blocks.ResnetBlock2D(in_channels if j == 0 else out, out, temb_channels=cfg.time_embed_dim,
                                 groups=cfg.norm_num_groups, eps=cfg.norm_eps, **kw) for j in range(n)])
        self.attentions = nnx.List([_transformer(cfg, i, out, **kw) for _ in range(n)]) \
            if cfg.down_block_types[i] == "CrossAttnDownBlock2D" else None
        is_final = i == len(cfg.block_out_channels) - 1
        self.downsamplers = None if is_final else \
            nnx.List([blocks.Downsample2D(out, out, padding=cfg.downsample_padding, **kw)])

    def __call__(self, x, temb, context, *, bank=None, collect=None, bank_mask=None,
                 after_layer=None) -> tuple[jax.Array, list[jax.Array]]:
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context, bank=bank, collect=collect, bank_mask=bank_mask)
            if after_layer is not None:
                x = after_layer(self, j, x)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UNetMidBlock2DCrossAttn(nnx.Module):
    """resnet → (transformer → resnet) x 1, ResNets scaled by ``mid_block_scale_factor``."""

    def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        c = cfg.block_out_channels[-1]
        kw = dict(rngs=rngs, dtype=dtype)
        resnet = lambda: blocks.ResnetBlock2D(  # noqa: E731
            c, c, temb_channels=cfg.time_embed_dim, groups=cfg.norm_num_groups, eps=cfg.norm_eps,
            output_scale_factor=cfg.mid_block_scale_factor, **kw)
        last = len(cfg.block_out_channels) - 1
        self.attentions = nnx.List([_transformer(cfg, last, c, mid=True, **kw)])
        self.resnets = nnx.List([resnet(), resnet()])

    def __call__(self, x, temb, context, *, bank=None, collect=None, bank_mask=None, after_layer=None) -> jax.Array:
        x = self.resnets[0](x, temb)
        for j, (attn, resnet) in enumerate(zip(self.attentions, self.resnets[1:], strict=True)):
            x = attn(x, context, bank=bank, collect=collect, bank_mask=bank_mask)
            if after_layer is not None:
                x = after_layer(self, j, x)
            x = resnet(x, temb)
        return x


class UpBlock(nnx.Module):
    """``CrossAttnUpBlock2D`` / ``UpBlock2D``: (concat skip → resnet → [transformer]) x (layers + 1), then
    an optional upsampler (nearest 2x, or to the next skip's size, then a 3x3 conv)."""

    def __init__(self, cfg: UNetConfig, i: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        rev = cfg.block_out_channels[::-1]
        nb = len(rev)
        out, prev = rev[i], rev[max(i - 1, 0)]
        skip_in = rev[min(i + 1, nb - 1)]
        n = cfg.layers_per_block[::-1][i] + 1
        kw = dict(rngs=rngs, dtype=dtype)
        self.resnets = nnx.List([
            blocks.ResnetBlock2D((prev if j == 0 else out) + (skip_in if j == n - 1 else out), out,
                                 temb_channels=cfg.time_embed_dim, groups=cfg.norm_num_groups, eps=cfg.norm_eps, **kw)
            for j in range(n)])
        self.attentions = nnx.List([_transformer(cfg, i, out, up=True, **kw) for _ in range(n)]) \
            if cfg.up_block_types[i] == "CrossAttnUpBlock2D" else None
        self.upsamplers = None if i == nb - 1 else nnx.List([blocks.Upsample2D(out, out, **kw)])

    def __call__(self, x, skips: list[jax.Array], temb, context, *, upsample_size=None, bank=None,
                 collect=None, bank_mask=None, after_layer=None) -> jax.Array:
        for j, resnet in enumerate(self.resnets):
            x = jnp.concatenate([x, skips[-1 - j].astype(x.dtype)], axis=-1)  # last skip first
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context, bank=bank, collect=collect, bank_mask=bank_mask)
            if after_layer is not None:
                x = after_layer(self, j, x)
        if self.upsamplers is not None:
            x = _upsample(self.upsamplers[0], x, upsample_size)
        return x


# ------------------------------------------------------------------------------------------------- UNet
class UNet2DConditionModel(layers.FromConfig, nnx.Module):
    """SD-1.x UNet: ``(sample (B, H, W, C_in), timestep, encoder_hidden_states (B, S, D)) -> (B, H, W, C_out)``.

    ``from_config(config_dict, *, rngs, dtype, with_output_head=True)``; ``with_output_head=False`` omits
    ``conv_norm_out``/``conv_out`` (a reference net: ``__call__`` returns the last features).
    """

    CONFIG = UNetConfig

    def __init__(self, config: UNetConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, with_output_head: bool = True):
        self.config = config
        self.dtype = dtype
        kw = dict(rngs=rngs, dtype=dtype)
        c0 = config.block_out_channels[0]
        self.conv_in = layers.Conv(config.in_channels, c0, config.conv_in_kernel,
                                   padding=(config.conv_in_kernel - 1) // 2, **kw)
        self.time_embedding = TimestepEmbedding(c0, config.time_embed_dim, **kw)
        down, prev = [], c0
        for i in range(len(config.block_out_channels)):
            down.append(DownBlock(config, i, prev, **kw))
            prev = config.block_out_channels[i]
        self.down_blocks = nnx.List(down)
        self.mid_block = UNetMidBlock2DCrossAttn(config, **kw) if config.mid_block_type else None
        self.up_blocks = nnx.List([UpBlock(config, i, **kw) for i in range(len(config.block_out_channels))])
        self.num_upsamplers = len(config.block_out_channels) - 1
        self.with_output_head = with_output_head
        if with_output_head:
            self.conv_norm_out = layers.GroupNorm(config.norm_num_groups, c0, eps=config.norm_eps, dtype=dtype)
            self.conv_out = layers.Conv(c0, config.out_channels, config.conv_out_kernel,
                                        padding=(config.conv_out_kernel - 1) // 2, **kw)
        else:
            self.conv_norm_out = self.conv_out = None
        # name every transformer block by its module path (in call order): the keys of collect / bank
        keys = []
        named = [(f"down_blocks.{i}", blk) for i, blk in enumerate(self.down_blocks)]
        named += [("mid_block", self.mid_block)] if self.mid_block is not None else []
        named += [(f"up_blocks.{i}", blk) for i, blk in enumerate(self.up_blocks)]
        for prefix, blk in named:
            for j, attn in enumerate(blk.attentions or ()):
                for k, tb in enumerate(attn.transformer_blocks):
                    tb.tap_key = f"{prefix}.attentions.{j}.transformer_blocks.{k}"
                    keys.append(tb.tap_key)
        self._tap_keys = tuple(keys)

    def torch_key(self, key: str) -> str | None:
        """Checkpoint key -> parameter path; a model without output head skips the head's keys."""
        if not self.with_output_head and key.startswith(("conv_norm_out.", "conv_out.")):
            return None
        return key

    def tap_keys(self) -> tuple[str, ...]:
        """The module paths of every BasicTransformerBlock, in call order (the collect / bank keys)."""
        return self._tap_keys

    def time_embed(self, timestep, batch: int) -> jax.Array:
        """``time_embedding(get_timestep_embedding(timestep))`` for a scalar or ``(B,)`` timestep, int or
        float, broadcast to ``batch`` -> ``(batch, time_embed_dim)``."""
        t = jnp.asarray(timestep)
        if t.ndim > 1:
            raise ValueError(f"timestep must be a scalar or (B,), got shape {t.shape}")
        t = jnp.broadcast_to(t.reshape(-1), (batch,))
        cfg = self.config
        emb = get_timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        return self.time_embedding(emb.astype(self.dtype))

    def __call__(self, sample: jax.Array, timestep, encoder_hidden_states: jax.Array, *,
                 bank: Mapping[str, jax.Array | Sequence[jax.Array]] | None = None,
                 collect: dict | None = None, bank_mask: jax.Array | None = None,
                 after_layer=None) -> jax.Array:
        """The UNet output ``(B, H, W, out_channels)`` (without output head: ``(B, H, W, C0)`` features).

        ``bank``: ``{tap key: (B, S', C) array or list of them}`` appended to those blocks' attn1
        keys/values; ``collect``: a dict filled with every block's ``norm1`` output ``(B, H*W, C)``;
        ``bank_mask``: ``(B,)`` bool, the examples that read the bank (default: all);
        ``after_layer``: ``fn(block, j, x) -> x`` run after every spatial layer (module docstring).
        """
        if bank:
            unknown = sorted(set(bank) - set(self._tap_keys))
            if unknown:
                raise ValueError(f"bank keys {unknown[:3]} name no BasicTransformerBlock (see tap_keys())")
        b, h, w, _ = sample.shape
        # like diffusers: when H/W are not multiples of the total downsampling factor, every upsampler
        # resizes to the size of the skip connection it will be concatenated with
        factor = 2 ** self.num_upsamplers
        forward_upsample_size = h % factor != 0 or w % factor != 0
        x = sample.astype(self.dtype)
        if self.config.center_input_sample:
            x = 2 * x - 1.0
        temb = self.time_embed(timestep, b)
        ctx = encoder_hidden_states
        seams = dict(bank=bank, collect=collect, bank_mask=bank_mask, after_layer=after_layer)

        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, res = block(x, temb, ctx, **seams)
            skips += res
        if self.mid_block is not None:
            x = self.mid_block(x, temb, ctx, **seams)
        for block in self.up_blocks:
            n = len(block.resnets)
            res, skips = skips[-n:], skips[:-n]
            size = tuple(skips[-1].shape[1:3]) if (forward_upsample_size and block.upsamplers is not None) else None
            x = block(x, res, temb, ctx, upsample_size=size, **seams)
        if self.conv_out is None:
            return x
        return self.conv_out(layers.silu(self.conv_norm_out(x)))

