"""Basic layers of the Stable Diffusion / CLIP ports, named like their PyTorch counterparts.

Every module here stores its parameters under the PyTorch names (``weight``, ``bias``) in JAX layouts:

* :class:`Linear`: ``weight`` (in, out) — torch (out, in) transposed;
* :class:`Conv`: ``weight`` (*kernel, in, out) for 1-3 spatial dims, channels-last inputs — torch
  (out, in, *kernel) moved; padding is symmetric and explicit like torch's ``padding=p``;
* :class:`GroupNorm`, :class:`LayerNorm`: ``weight``/``bias`` (C,), with an explicit ``eps`` (torch's
  default 1e-5, not Flax's 1e-6) and the two-pass variance (mean of squared deviations);
* :func:`attention`: the one attention entry point (``jax.nn.dot_product_attention``: cuDNN flash
  attention on NVIDIA GPUs for bf16/fp16, XLA elsewhere).

So a PyTorch state-dict key maps onto the module path by name, and :mod:`xnemo_jax.convert` only has to
transpose by rank. Compute dtype ``dtype`` (inputs are cast to it), parameters in ``param_dtype``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "float64": jnp.float64}


def as_dtype(dtype):
    """A jnp dtype from a name (``"bfloat16"``) or a dtype."""
    return DTYPES[dtype] if isinstance(dtype, str) else jnp.dtype(dtype).type


def config_fields(cls, config: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a ``config.json`` dict that are fields of the dataclass ``cls`` (diffusers' and
    transformers' extra keys such as ``_class_name`` / ``_diffusers_version`` are dropped)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in dict(config).items() if k in names}


class FromConfig:
    """``Model.from_config(config, *, rngs, dtype, **options)`` for models built as
    ``Model(Config, *, rngs, dtype, **options)``: ``config`` is a ``config.json`` dict (read with
    ``CONFIG.from_dict``) or already a ``CONFIG`` instance; ``dtype`` a name or a dtype."""

    CONFIG: type

    @classmethod
    def from_config(cls, config, *, rngs: nnx.Rngs, dtype="float32", **options):
        if not isinstance(config, cls.CONFIG):
            config = cls.CONFIG.from_dict(config)
        return cls(config, rngs=rngs, dtype=as_dtype(dtype), **options)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
              scale: float | None = None, implementation: str | None = None) -> jax.Array:
    """Multi-head attention, ``(B, L, H, D)`` layout for q/k/v (k/v: ``(B, S, H, D)``) -> ``(B, L, H, D)``.

    The single entry point of every attention layer. ``implementation=None`` lets JAX choose (cuDNN on
    GPUs where it applies, XLA otherwise); ``"xla"`` / ``"cudnn"`` force one. Softmax runs in float32
    for low-precision inputs; float64 inputs (parity tests under jax x64) take a plain float64 path.
    """
    if q.dtype == jnp.float64:  # jax.nn.dot_product_attention takes the softmax in float32 even for float64
        logits = jnp.einsum("blhd,bshd->bhls", q, k) * (q.shape[-1] ** -0.5 if scale is None else scale)
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
        return jnp.einsum("bhls,bshd->blhd", jax.nn.softmax(logits, axis=-1), v)
    if implementation is None and (q.dtype == jnp.float32 or jax.default_backend() != "gpu"):
        implementation = "xla"
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=implementation)


class Buffer(nnx.Variable):
    """A fixed, non-trainable array that an official checkpoint stores (e.g. a ``pe`` position table):
    never updated by an optimiser (not an ``nnx.Param``), but converted with the parameters."""


LINEAR_AXES = ("embed_in", "embed_out")   # logical axes of weights (launch/sharding.py maps them to the mesh)


def conv_axes(nd: int) -> tuple:
    return (None,) * nd + ("conv_in", "conv_out")


def param(value: jax.Array, names: tuple | None = None) -> nnx.Param:
    """An ``nnx.Param`` whose logical axis ``names`` are metadata only (``eager_sharding=False``), so the
    module builds outside a mesh (tests, conversion, inference) and the runtime shards the state."""
    if names is None:
        return nnx.Param(value)
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


class Linear(nnx.Module):
    TORCH_LAYOUT = {"weight": (1, 0)}  # torch (out, in) -> (in, out)

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        bound = 1.0 / math.sqrt(in_features)
        self.weight = param(jax.random.uniform(rngs.params(), (in_features, out_features), param_dtype,
                                               -bound, bound), LINEAR_AXES)
        self.bias = nnx.Param(jax.random.uniform(rngs.params(), (out_features,), param_dtype, -bound, bound)) \
            if bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = x @ self.weight[...].astype(self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Conv(nnx.Module):
    """Channels-last convolution with torch semantics (``padding`` pixels on every side, ``stride``)."""

    @property
    def TORCH_LAYOUT(self):  # noqa: N802 - torch (out, in, *k) -> (*k, in, out)
        nd = self.weight.ndim - 2
        return {"weight": tuple(range(2, 2 + nd)) + (1, 0)}

    def __init__(self, in_channels: int, out_channels: int, kernel_size, *, stride=1, padding=0, bias: bool = True,
                 rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kernel = (kernel_size,) * 2 if isinstance(kernel_size, int) else tuple(kernel_size)
        nd = len(kernel)
        self.stride = (stride,) * nd if isinstance(stride, int) else tuple(stride)
        pad = (padding,) * nd if isinstance(padding, int) else tuple(padding)
        self.padding = tuple((p, p) for p in pad)
        fan_in = in_channels * math.prod(kernel)
        bound = 1.0 / math.sqrt(fan_in)
        self.weight = param(jax.random.uniform(rngs.params(), kernel + (in_channels, out_channels), param_dtype,
                                               -bound, bound), conv_axes(nd))
        self.bias = nnx.Param(jax.random.uniform(rngs.params(), (out_channels,), param_dtype, -bound, bound)) \
            if bias else None
        self.dtype = dtype
        spatial = "DHW"[-nd:] if nd <= 3 else None
        self.dimension_numbers = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = jax.lax.conv_general_dilated(x, self.weight[...].astype(self.dtype), self.stride, self.padding,
                                         dimension_numbers=self.dimension_numbers)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """torch.nn.Embedding: ``weight`` (num, dim), same layout in both frameworks."""

    def __init__(self, num: int, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (num, dim), param_dtype))
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], ids, axis=0).astype(self.dtype)


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm over channels-last input ``(B, ..., C)``; statistics in float32."""

    def __init__(self, num_groups: int, num_channels: int, *, eps: float = 1e-5, affine: bool = True,
                 rngs: nnx.Rngs | None = None, dtype=jnp.float32, param_dtype=jnp.float32):
        if num_channels % num_groups:
            raise ValueError(f"{num_channels} channels do not split into {num_groups} groups")
        self.num_groups, self.eps, self.dtype = num_groups, eps, dtype
        self.weight = nnx.Param(jnp.ones((num_channels,), param_dtype)) if affine else None
        self.bias = nnx.Param(jnp.zeros((num_channels,), param_dtype)) if affine else None

    def __call__(self, x: jax.Array) -> jax.Array:
        shape = x.shape
        stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
        g = x.reshape(shape[0], -1, self.num_groups, shape[-1] // self.num_groups).astype(stat_dtype)
        mean = g.mean(axis=(1, 3), keepdims=True)
        var = jnp.square(g - mean).mean(axis=(1, 3), keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(shape)
        if self.weight is not None:
            y = y * self.weight[...].astype(stat_dtype) + self.bias[...].astype(stat_dtype)
        return y.astype(self.dtype)


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm over the last axis; statistics in float32."""

    def __init__(self, dim: int, *, eps: float = 1e-5, affine: bool = True, rngs: nnx.Rngs | None = None,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        self.eps, self.dtype = eps, dtype
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype)) if affine else None
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype)) if affine else None

    def __call__(self, x: jax.Array) -> jax.Array:
        stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
        xf = x.astype(stat_dtype)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight[...].astype(stat_dtype) + self.bias[...].astype(stat_dtype)
        return y.astype(self.dtype)


def silu(x):
    return jax.nn.silu(x)


def gelu(x, approximate: bool = False):
    return jax.nn.gelu(x, approximate=approximate)


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


class ShapeOnlyRngs:
    """Stands in for ``nnx.Rngs`` under ``nnx.eval_shape`` (``Model(config, rngs=ShapeOnlyRngs())``),
    where no value is computed: a constant key.
    (flax 0.12.8's stateful key counter makes tracing time quadratic in the number of parameters —
    about a minute for the full denoiser, 3 s with this.)"""

    def params(self):
        return jax.random.key(0)


def set_remat(module: nnx.Module, on: bool = True) -> int:
    """Gradient checkpointing (:func:`checkpointed`): every submodule of ``module`` with a ``remat`` attribute
    (the UNets' ResNet and transformer blocks, X-NeMo's motion / temporal transformer blocks) recomputes its
    activations in the backward pass instead of keeping them: the same values and gradients, less memory,
    about one more forward pass of compute. Returns how many blocks were set."""
    n = 0
    for _, m in nnx.iter_graph(module):
        if isinstance(m, nnx.Module) and hasattr(m, "remat") and isinstance(m.remat, bool):
            m.remat = bool(on)
            n += 1
    return n


def checkpointed(module: nnx.Module, fn, *args):
    """``fn(module, *args)`` under ``jax.checkpoint``, functionally: the module's state goes in as
    an argument and nothing is written back (the blocks that :func:`set_remat` marks update no state). Unlike
    ``nnx.remat`` this also works when the module holds arrays from an outer trace (e.g. constants closed
    over by a jitted function)."""
    graphdef, state = nnx.split(module)
    return jax.checkpoint(lambda s, *a: fn(nnx.merge(graphdef, s), *a))(state, *args)
