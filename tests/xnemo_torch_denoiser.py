"""PyTorch test reference of X-NeMo's denoising UNet (official ``UNet3DConditionModel`` with
``inference_xnemo_stage2.yaml``) and of its reference net with the mutual self-attention read/write.

Written from ``/work/shared/reference/xnemo_official.md`` (§1.3, §1.4, §1.8, §3.1, §3.3, §5b) and
``xnemo_param_patterns.txt``; not a copy of the official code. The SD layers are diffusers' torch modules
(a ``UNet2DConditionModel`` supplies ``conv_in``, ``time_embedding``, the blocks' ResNets,
``Transformer2DModel`` s, samplers and the output head, all under their official names); the 3-D forward
pass, the motion cross-attention / temporal modules and the reference hooks are written here. The main
stream keeps the official 5-D layout ``(b, c, f, h, w)``; spatial layers run on ``(b f) c h w``.

* :class:`VanillaTemporalModule` — ``temporal_transformer.{norm, proj_in, transformer_blocks.k.
  {attention_blocks.i.{to_q,to_k,to_v,to_out.0[,pos_encoder.pe]}, norms.i, ff.net.{0.proj,2}, ff_norm},
  proj_out}``; attention block types ``Spatial_Cross`` (each frame's H*W tokens attend to its own motion
  tokens) and ``Temporal_Self`` (each position across the frames, with the interleaved sinusoidal table
  added to the LayerNorm output).
* :class:`XNemoUNet` — ``reference=False``: the denoiser (SD keys + 21 ``motion_modules`` + 21
  ``temporal_modules``); ``reference=True``: the reference UNet (no modules, no ``conv_norm_out`` /
  ``conv_out``, 682 keys at full size). ``forward(sample (b, c, f, h, w), timestep (b,), context (b, n, d),
  motion (b, f, m, 16), bank=None, uc_mask=None, collect=None, skip_mm=False)``: ``collect`` (a dict)
  receives every transformer block's ``norm1`` output (write mode); ``bank`` ``{path: (b, L, C)}`` is
  read (repeated over frames, concatenated to attn1's K/V); ``uc_mask`` ``(b,)`` bool marks the
  unconditional examples, whose self-attention is then recomputed without the bank (as the official does).
* :func:`randomize_` — every parameter random (zero-initialised ``proj_out`` s, norm affines included),
  optionally the ``pe`` buffers perturbed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention import FeedForward
from torch import nn


def sinusoidal_pe(max_len: int, d_model: int) -> torch.Tensor:
    position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(1, max_len, d_model)
    pe[0, :, 0::2] = torch.sin(position * div_term)
    pe[0, :, 1::2] = torch.cos(position * div_term)
    return pe


class PositionalEncoding(nn.Module):
    def __init__(self, d_model: int, max_len: int = 32):
        super().__init__()
        self.register_buffer("pe", sinusoidal_pe(max_len, d_model))

    def forward(self, x):
        return x + self.pe[:, : x.size(1)].to(x.dtype)


class VersatileAttention(nn.Module):
    def __init__(self, dim: int, block_type: str, heads: int, cross_dim: int | None, pe: bool, max_len: int):
        super().__init__()
        self.temporal = block_type.startswith("Temporal")
        self.cross = block_type.endswith("_Cross")
        self.heads = heads
        kv = cross_dim if self.cross else dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(kv, dim, bias=False)
        self.to_v = nn.Linear(kv, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.pos_encoder = PositionalEncoding(dim, max_len) if (self.temporal and pe) else None

    def _attend(self, x, ctx):
        n, length, c = x.shape
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return self.to_out[0](out.transpose(1, 2).reshape(n, length, c))

    def forward(self, x, video_length: int, encoder_hidden_states=None):
        if not self.temporal:
            return self._attend(x, encoder_hidden_states if self.cross else x)
        bf, d, c = x.shape
        b = bf // video_length
        # (b f) d c -> (b d) f c
        x = x.reshape(b, video_length, d, c).permute(0, 2, 1, 3).reshape(b * d, video_length, c)
        if self.pos_encoder is not None:
            x = self.pos_encoder(x)
        out = self._attend(x, x)
        return out.reshape(b, d, video_length, c).permute(0, 2, 1, 3).reshape(bf, d, c)


class TemporalTransformerBlock(nn.Module):
    def __init__(self, dim, block_types, heads, cross_dim, pe, max_len):
        super().__init__()
        self.attention_blocks = nn.ModuleList([VersatileAttention(dim, t, heads, cross_dim, pe, max_len)
                                               for t in block_types])
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in block_types])
        self.ff = FeedForward(dim, dropout=0.0, activation_fn="geglu")
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, x, video_length, encoder_hidden_states=None):
        for attn, norm in zip(self.attention_blocks, self.norms, strict=True):
            x = attn(norm(x), video_length, encoder_hidden_states if attn.cross else None) + x
        return self.ff(self.ff_norm(x)) + x


class TemporalTransformer3DModel(nn.Module):
    def __init__(self, channels, block_types, heads=8, cross_dim=None, pe=False, max_len=32, num_blocks=1):
        super().__init__()
        self.norm = nn.GroupNorm(32, channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList([
            TemporalTransformerBlock(channels, block_types, heads, cross_dim, pe, max_len) for _ in range(num_blocks)])
        self.proj_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj_out.weight)  # zero_initialize
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x, encoder_hidden_states=None):
        b, c, f, h, w = x.shape
        residual = x
        t = x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)  # b c f h w -> (b f) c h w
        t = self.norm(t).permute(0, 2, 3, 1).reshape(b * f, h * w, c)
        t = self.proj_in(t)
        ctx = None
        if encoder_hidden_states is not None:  # (b, f, m, d) -> (b f) m d: each frame its own tokens
            ctx = encoder_hidden_states.reshape(b * f, *encoder_hidden_states.shape[2:])
        for block in self.transformer_blocks:
            t = block(t, f, ctx)
        t = self.proj_out(t)
        t = t.reshape(b, f, h, w, c).permute(0, 4, 1, 2, 3)
        return t + residual


class VanillaTemporalModule(nn.Module):
    def __init__(self, channels, block_types, **kw):
        super().__init__()
        self.temporal_transformer = TemporalTransformer3DModel(channels, block_types, **kw)

    def forward(self, x, temb=None, encoder_hidden_states=None):
        return self.temporal_transformer(x, encoder_hidden_states)


def motion_module(channels):
    return VanillaTemporalModule(channels, ("Spatial_Cross", "Spatial_Cross"), heads=8, cross_dim=16, pe=False)


def temporal_module(channels):
    return VanillaTemporalModule(channels, ("Temporal_Self", "Temporal_Self"), heads=8, pe=True, max_len=32)


# ----------------------------------------------------------------------------------------------- helpers
def fold(x):
    b, c, f, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def unfold(x, f):
    bf, c, h, w = x.shape
    return x.reshape(bf // f, f, c, h, w).permute(0, 2, 1, 3, 4)


class XNemoUNet(nn.Module):
    """The denoiser (``reference=False``) or the reference UNet (``reference=True``) over a diffusers
    UNet config dict; state-dict names are the official ones."""

    def __init__(self, unet_config: dict, *, reference: bool = False, resolutions=(1, 2, 4, 8)):
        super().__init__()
        base = UNet2DConditionModel.from_config(unet_config)
        self.config = base.config
        self.conv_in = base.conv_in
        self.time_proj = base.time_proj
        self.time_embedding = base.time_embedding
        self.down_blocks = base.down_blocks
        self.mid_block = base.mid_block
        self.up_blocks = base.up_blocks
        self.reference = reference
        if not reference:
            self.conv_norm_out = base.conv_norm_out
            self.conv_out = base.conv_out
            ch = list(base.config.block_out_channels)
            for i, blk in enumerate(self.down_blocks):
                if 2 ** i in resolutions:
                    blk.motion_modules = nn.ModuleList([motion_module(ch[i]) for _ in blk.resnets])
                    blk.temporal_modules = nn.ModuleList([temporal_module(ch[i]) for _ in blk.resnets])
            self.mid_block.motion_modules = nn.ModuleList([motion_module(ch[-1])])
            self.mid_block.temporal_modules = nn.ModuleList([temporal_module(ch[-1])])
            for i, blk in enumerate(self.up_blocks):
                if 2 ** (3 - i) in resolutions:
                    blk.motion_modules = nn.ModuleList([motion_module(ch[::-1][i]) for _ in blk.resnets])
                    blk.temporal_modules = nn.ModuleList([temporal_module(ch[::-1][i]) for _ in blk.resnets])

    # ---- one spatial transformer (Transformer2DModel), per frame, with the reference hooks
    def _transformer_block(self, blk, x, ctx, *, key, frames, bank, uc_mask, collect):
        norm = blk.norm1(x)
        if collect is not None:  # write
            collect[key] = norm.clone()
        if bank is not None and key in bank:  # read
            b, length, c = bank[key].shape  # (b, L, C) -> (b f) L C
            ref = bank[key].to(norm.dtype).unsqueeze(1).repeat(1, frames, 1, 1).reshape(b * frames, length, c)
            attn = blk.attn1(norm, encoder_hidden_states=torch.cat([norm, ref], dim=1)) + x
            if uc_mask is not None:  # unconditional examples: plain self-attention, overwriting
                m = uc_mask.repeat_interleave(frames)
                attn = attn.clone()
                attn[m] = blk.attn1(norm[m], encoder_hidden_states=norm[m]) + x[m]
            x = attn
        else:
            x = blk.attn1(norm) + x
        x = blk.attn2(blk.norm2(x), encoder_hidden_states=ctx) + x
        return blk.ff(blk.norm3(x)) + x

    def _spatial(self, module, x5, ctx, *, path, **hooks):
        frames = x5.shape[2]
        x = fold(x5)
        bf, c, h, w = x.shape
        t = module.norm(x)
        if module.use_linear_projection:
            t = module.proj_in(t.permute(0, 2, 3, 1).reshape(bf, h * w, c))
        else:
            t = module.proj_in(t)
            t = t.permute(0, 2, 3, 1).reshape(bf, h * w, t.shape[1])
        ctx_f = ctx.repeat_interleave(frames, dim=0)  # b n c -> (b f) n c
        for k, blk in enumerate(module.transformer_blocks):
            t = self._transformer_block(blk, t, ctx_f, key=f"{path}.transformer_blocks.{k}", frames=frames, **hooks)
        if module.use_linear_projection:
            t = module.proj_out(t).reshape(bf, h, w, c).permute(0, 3, 1, 2)
        else:
            t = module.proj_out(t.reshape(bf, h, w, -1).permute(0, 3, 1, 2))
        return unfold(t + x, frames)

    @staticmethod
    def _resnet(resnet, x5, temb_f):
        return unfold(resnet(fold(x5), temb_f), x5.shape[2])

    def _after_layer(self, blk, j, x5, motion, skip_mm):
        if skip_mm:
            return x5
        if getattr(blk, "motion_modules", None) is not None:
            x5 = blk.motion_modules[j](x5, None, encoder_hidden_states=motion)
        if getattr(blk, "temporal_modules", None) is not None:
            x5 = blk.temporal_modules[j](x5, None)
        return x5

    def forward(self, sample, timestep, context, motion=None, *, bank=None, uc_mask=None, collect=None,
                skip_mm=False):
        b, c, f, h, w = sample.shape
        t = torch.as_tensor(timestep).reshape(-1).expand(b)
        emb = self.time_embedding(self.time_proj(t).to(sample.dtype))  # (b, temb): the same for every frame
        temb_f = emb.repeat_interleave(f, dim=0)
        hooks = dict(bank=bank, uc_mask=uc_mask, collect=collect)
        x = unfold(self.conv_in(fold(sample)), f)
        skips = [x]
        for i, blk in enumerate(self.down_blocks):
            for j, resnet in enumerate(blk.resnets):
                x = self._resnet(resnet, x, temb_f)
                if getattr(blk, "attentions", None) is not None:
                    x = self._spatial(blk.attentions[j], x, context, path=f"down_blocks.{i}.attentions.{j}", **hooks)
                x = self._after_layer(blk, j, x, motion, skip_mm)
                skips.append(x)
            if blk.downsamplers is not None:
                x = unfold(blk.downsamplers[0](fold(x)), f)
                skips.append(x)
        mid = self.mid_block
        x = self._resnet(mid.resnets[0], x, temb_f)
        for j, (attn, resnet) in enumerate(zip(mid.attentions, mid.resnets[1:], strict=True)):
            x = self._spatial(attn, x, context, path=f"mid_block.attentions.{j}", **hooks)
            x = self._after_layer(mid, j, x, motion, skip_mm)
            x = self._resnet(resnet, x, temb_f)
        for i, blk in enumerate(self.up_blocks):
            for j, resnet in enumerate(blk.resnets):
                x = torch.cat([x, skips.pop()], dim=1)
                x = self._resnet(resnet, x, temb_f)
                if getattr(blk, "attentions", None) is not None:
                    x = self._spatial(blk.attentions[j], x, context, path=f"up_blocks.{i}.attentions.{j}", **hooks)
                x = self._after_layer(blk, j, x, motion, skip_mm)
            if blk.upsamplers is not None:
                x = unfold(blk.upsamplers[0](fold(x)), f)
        if self.reference:
            return x
        return unfold(self.conv_out(F.silu(self.conv_norm_out(fold(x)))), f)


def randomize_(model: nn.Module, seed: int, pe_noise: float = 0.0):
    """Every parameter random: fan-in-scaled weights, small biases, norm scales 1 + noise (zero-initialised
    proj_outs become active); ``pe_noise`` perturbs the positional tables (to prove they are read)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
                if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
                    p.copy_((1.0 if name == "weight" else 0.0) + 0.1 * noise)
                elif name == "weight":
                    p.copy_(noise / math.sqrt(max(1, p[0].numel())))
                else:
                    p.copy_(0.05 * noise)
            if pe_noise and isinstance(module, PositionalEncoding):
                module.pe.add_(pe_noise * torch.randn(module.pe.shape, generator=g))
    return model
