"""Blocks shared by the Stable Diffusion UNet and the VAEs, named like diffusers' modules.

* :class:`ResnetBlock2D` — diffusers ``ResnetBlock2D`` (``time_embedding_norm="default"``): GroupNorm →
  SiLU → conv1 → (+ time_emb_proj(SiLU(temb))) → GroupNorm → SiLU → (dropout) → conv2, plus the shortcut
  (``conv_shortcut``, a 1x1 conv when the channel count changes), divided by ``output_scale_factor``.
* :class:`Downsample2D` — 3x3 stride-2 ``conv``; ``padding=0`` means diffusers' VAE variant, which pads
  (0, 1) on the bottom/right first.
* :class:`Upsample2D` — nearest 2x, then a 3x3 ``conv``.
* :class:`Attention` — diffusers ``Attention`` with ``to_q``/``to_k``/``to_v``/``to_out.0`` (optionally
  a ``group_norm`` over spatial input and a residual connection: the VAE mid-block form). Keys and values
  come from ``context`` when given (cross-attention, or self-attention over extra tokens: the caller may
  pass ``concat([x, bank])`` as context — the seam X-NeMo's reference attention uses).

Inputs are channels-last: ``(B, H, W, C)`` images, ``(B, L, C)`` token sequences.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from xnemo_jax import layers


class ResnetBlock2D(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int | None = None, *, temb_channels: int | None = 512,
                 groups: int = 32, groups_out: int | None = None, eps: float = 1e-6,
                 output_scale_factor: float = 1.0, use_in_shortcut: bool | None = None, rngs: nnx.Rngs,
                 dtype=jnp.float32):
        out_channels = out_channels or in_channels
        kw = dict(rngs=rngs, dtype=dtype)
        self.norm1 = layers.GroupNorm(groups, in_channels, eps=eps, dtype=dtype)
        self.conv1 = layers.Conv(in_channels, out_channels, 3, padding=1, **kw)
        self.time_emb_proj = layers.Linear(temb_channels, out_channels, **kw) if temb_channels else None
        self.norm2 = layers.GroupNorm(groups_out or groups, out_channels, eps=eps, dtype=dtype)
        self.conv2 = layers.Conv(out_channels, out_channels, 3, padding=1, **kw)
        shortcut = in_channels != out_channels if use_in_shortcut is None else use_in_shortcut
        self.conv_shortcut = layers.Conv(in_channels, out_channels, 1, **kw) if shortcut else None
        self.output_scale_factor = output_scale_factor
        self.remat = False  # recompute the block's activations in the backward pass (layers.set_remat)

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        if self.remat:
            return layers.checkpointed(self, type(self)._forward, x, temb)
        return self._forward(x, temb)

    def _forward(self, x: jax.Array, temb: jax.Array | None) -> jax.Array:
        h = self.conv1(layers.silu(self.norm1(x)))
        if temb is not None and self.time_emb_proj is not None:
            t = self.time_emb_proj(layers.silu(temb))
            h = h + t.reshape(t.shape[:1] + (1,) * (h.ndim - 2) + t.shape[-1:])
        h = self.conv2(layers.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x.astype(h.dtype) + h
        return out / self.output_scale_factor if self.output_scale_factor != 1.0 else out


class Downsample2D(nnx.Module):
    def __init__(self, channels: int, out_channels: int | None = None, *, padding: int = 1, rngs: nnx.Rngs,
                 dtype=jnp.float32):
        self.padding = padding
        self.conv = layers.Conv(channels, out_channels or channels, 3, stride=2, padding=padding, rngs=rngs,
                                dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:  # diffusers' VAE: asymmetric (0, 1) padding of H and W
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


class Upsample2D(nnx.Module):
    def __init__(self, channels: int, out_channels: int | None = None, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.conv = layers.Conv(channels, out_channels or channels, 3, padding=1, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest, as F.interpolate(scale_factor=2)
        return self.conv(x)


class Attention(nnx.Module):
    def __init__(self, query_dim: int, *, cross_attention_dim: int | None = None, heads: int = 8,
                 dim_head: int = 64, bias: bool = False, out_bias: bool = True, norm_num_groups: int | None = None,
                 eps: float = 1e-5, residual_connection: bool = False, rescale_output_factor: float = 1.0,
                 rngs: nnx.Rngs, dtype=jnp.float32):
        inner = heads * dim_head
        kv_dim = cross_attention_dim or query_dim
        kw = dict(rngs=rngs, dtype=dtype)
        self.heads, self.dim_head = heads, dim_head
        self.group_norm = (layers.GroupNorm(norm_num_groups, query_dim, eps=eps, dtype=dtype) if norm_num_groups
                           else None)
        self.to_q = layers.Linear(query_dim, inner, bias=bias, **kw)
        self.to_k = layers.Linear(kv_dim, inner, bias=bias, **kw)
        self.to_v = layers.Linear(kv_dim, inner, bias=bias, **kw)
        self.to_out = nnx.List([layers.Linear(inner, query_dim, bias=out_bias, **kw)])  # to_out.1 is dropout
        self.residual_connection = residual_connection
        self.rescale_output_factor = rescale_output_factor

    def __call__(self, x: jax.Array, context: jax.Array | None = None, mask: jax.Array | None = None) -> jax.Array:
        """``mask``: optional ``(B, S)`` bool over the keys/values (False: left out of the softmax)."""
        residual = x
        spatial = x.ndim == 4
        if spatial:  # (B, H, W, C) -> (B, HW, C)
            b, h, w, c = x.shape
            x = x.reshape(b, h * w, c)
        if self.group_norm is not None:
            x = self.group_norm(x)
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, self.dim_head)  # noqa: E731
        out = layers.attention(split(q), split(k), split(v), mask=None if mask is None else mask[:, None, None, :])
        out = self.to_out[0](out.reshape(out.shape[0], out.shape[1], self.heads * self.dim_head))
        if spatial:
            out = out.reshape(b, h, w, c)
        if self.residual_connection:
            out = out + residual.astype(out.dtype)
        return out / self.rescale_output_factor if self.rescale_output_factor != 1.0 else out
