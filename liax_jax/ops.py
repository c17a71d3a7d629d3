"""StyleGAN2-style building blocks in Flax NNX (NHWC), shared by LIA-X and X-NeMo's GAN head.

Semantics follow the official LIA-X code exactly (``shared/reference/liax_official.md`` §2):

* equalised learning rate: weights are stored unscaled (initialised N(0, 1)) and multiplied by
  ``1/sqrt(fan_in)`` at run time;
* :func:`fused_leaky_relu`: ``leaky_relu(x + b, 0.2) * sqrt(2)``;
* :func:`upfirdn2d`: zero-insert ``up - 1`` samples after every sample, zero-pad ``(p0, p1)``, convolve
  with the FIR kernel (``outer([1,3,3,1])/64``, times a gain), keep every ``down``-th sample;
* :class:`ModulatedConv2d`: StyleGAN2 modulated conv with demodulation eps 1e-8. It modulates
  *activations* (input scaled by the style, one conv shared by the whole batch, output scaled by the
  demodulation factor), which equals per-sample weight modulation mathematically and avoids grouped
  convolutions. The upsampling variant is a stride-2 transposed conv followed by a gain-4 blur.

Every module can list its official state-dict entries (:meth:`official`) so that checkpoint conversion
is a walk over the module tree rather than a table of names (see :mod:`liax_jax.convert`). Layout tags:
``conv`` (O,I,kh,kw) <-> HWIO, ``modconv`` (1,O,I,kh,kw) <-> HWIO, ``linear`` (O,I) <-> (I,O),
``vector`` any shape with one non-unit axis <-> (C,), ``const`` (1,C,H,W) <-> (1,H,W,C); FIR kernels
are constant buffers (``kernel``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

SQRT2 = math.sqrt(2.0)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64, "float16": jnp.float16}


class ModelConfig:
    """Shared behaviour of the frozen config dataclasses (a ``dtype`` field naming the compute dtype)."""

    @classmethod
    def from_config(cls, cfg):
        """From a mapping (e.g. an ml_collections ConfigDict) or an instance; unknown keys are ignored."""
        if isinstance(cfg, cls):
            return cfg
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(cfg).items() if k in fields})

    def check_dtype(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def param_dtype(self):
        """Parameters are float32 (float64 when computing in float64)."""
        return jnp.float64 if self.dtype == "float64" else jnp.float32


# Logical axis names of the weights (see launch/sharding.py and the config's ``sharding_rules``).
CONV_AXES = (None, None, "conv_in", "conv_out")
LINEAR_AXES = ("embed_in", "embed_out")


def fir_kernel(gain: float = 1.0) -> np.ndarray:
    """The 4x4 FIR kernel ``outer([1,3,3,1],[1,3,3,1]) / 64 * gain`` (as stored in the official state dict)."""
    k = np.array([1.0, 3.0, 3.0, 1.0])
    return (np.outer(k, k) / 64.0 * gain).astype(np.float32)


def _separable(kernel: np.ndarray):
    """``(u, v)`` with ``kernel == outer(u, v)`` when the kernel is rank one (every StyleGAN FIR kernel is)."""
    k = np.asarray(kernel, np.float64)
    u, v, total = k.sum(axis=1), k.sum(axis=0), k.sum()
    if total != 0 and np.allclose(np.outer(u, v) / total, k, rtol=0, atol=1e-12 * np.abs(k).max()):
        return u, v / total
    return None


def upfirdn2d(x: jax.Array, kernel: np.ndarray, up: int = 1, down: int = 1,
              pad: tuple[int, int] = (0, 0)) -> jax.Array:
    """upfirdn2d on NHWC input, per channel (the official semantics, including trailing zeros).

    Separable kernels are applied as two 1-D passes of shifted adds, which XLA fuses into a few
    elementwise kernels (on CPU ~20x faster than a depthwise convolution, ~30x for its gradient);
    other kernels use a depthwise convolution.
    """
    c = x.shape[-1]
    zero = jnp.zeros((), x.dtype)
    if up > 1:
        x = jax.lax.pad(x, zero, [(0, 0, 0), (0, up - 1, up - 1), (0, up - 1, up - 1), (0, 0, 0)])
    p0, p1 = pad
    x = jax.lax.pad(x, zero, [(0, 0, 0), (p0, p1, 0), (p0, p1, 0), (0, 0, 0)])
    factors = _separable(kernel)
    if factors is not None:
        u, v = factors[0][::-1], factors[1][::-1]  # true convolution
        h, w = x.shape[1] - len(u) + 1, x.shape[2] - len(v) + 1
        y = sum(x[:, i:i + h] * jnp.asarray(u[i], x.dtype) for i in range(len(u)))
        y = sum(y[:, :, j:j + w] * jnp.asarray(v[j], x.dtype) for j in range(len(v)))
        return y[:, ::down, ::down] if down > 1 else y
    k = np.asarray(kernel)[::-1, ::-1]  # true convolution
    w = jnp.asarray(np.tile(k[:, :, None, None], (1, 1, 1, c)), x.dtype)
    return jax.lax.conv_general_dilated(x, w, (down, down), "VALID", feature_group_count=c,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=jax.lax.Precision.HIGHEST)


def upsample2x(x: jax.Array) -> jax.Array:
    """StyleGAN2 ``Upsample``: up 2, gain-4 FIR, pad (2, 1): (H, W) -> (2H, 2W)."""
    return upfirdn2d(x, fir_kernel(4.0), up=2, pad=(2, 1))


def fused_leaky_relu(x: jax.Array, bias: jax.Array) -> jax.Array:
    return jax.nn.leaky_relu(x + bias.astype(x.dtype), 0.2) * jnp.asarray(SQRT2, x.dtype)


def conv2d(x: jax.Array, w: jax.Array, stride: int = 1, padding: int | tuple = 0, lhs_dilation=None) -> jax.Array:
    pad = [(padding, padding)] * 2 if isinstance(padding, int) else padding
    return jax.lax.conv_general_dilated(x, w.astype(x.dtype), (stride, stride), pad, lhs_dilation=lhs_dilation,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


class _Base(nnx.Module):
    """Holds the compute dtype; params are created in ``param_dtype``."""

    def _normal(self, rngs: nnx.Rngs, shape, param_dtype, names=None):
        """An N(0, 1) weight; ``names`` are its logical axes (mapped to mesh axes by launch/sharding.py).

        ``eager_sharding=False``: the names are metadata only, so modules can be built outside a mesh
        (tests, conversion, inference); the runtime shards the state explicitly.
        """
        value = jax.random.normal(rngs.params(), shape, param_dtype)
        if names is None:
            return nnx.Param(value)
        return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


class EqualConv2d(_Base):
    """Conv with equalised learning rate; weight HWIO, runtime scale 1/sqrt(in*k*k)."""

    def __init__(self, cin: int, cout: int, k: int, *, stride: int = 1, padding: int = 0, bias: bool = True,
                 rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.weight = self._normal(rngs, (k, k, cin, cout), param_dtype, CONV_AXES)
        self.bias = nnx.Param(jnp.zeros((cout,), param_dtype)) if bias else None
        self.scale = 1.0 / math.sqrt(cin * k * k)
        self.stride, self.padding = stride, padding

    def __call__(self, x):
        y = conv2d(x, self.weight[...] * self.scale, self.stride, self.padding)
        return y + self.bias[...].astype(y.dtype) if self.bias is not None else y

    def official(self, prefix: str, out: dict) -> None:
        out[f"{prefix}.weight"] = (self.weight, "conv")
        if self.bias is not None:
            out[f"{prefix}.bias"] = (self.bias, "vector")


class EqualLinear(_Base):
    """Linear with equalised learning rate; weight (in, out), runtime scale 1/sqrt(in).

    ``activate=True`` is StyleGAN2's ``EqualLinear(activation="fused_lrelu")``: the bias is added inside
    :func:`fused_leaky_relu` (``leaky_relu(x W + b, 0.2) * sqrt(2)``). The official keys are the same.
    """

    def __init__(self, cin: int, cout: int, *, bias_init: float = 0.0, activate: bool = False, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        self.weight = self._normal(rngs, (cin, cout), param_dtype, LINEAR_AXES)
        self.bias = nnx.Param(jnp.full((cout,), bias_init, param_dtype))
        self.scale = 1.0 / math.sqrt(cin)
        self.activate = activate

    def __call__(self, x):
        y = x @ (self.weight[...] * self.scale).astype(x.dtype)
        if self.activate:
            return fused_leaky_relu(y, self.bias[...])
        return y + self.bias[...].astype(y.dtype)

    def official(self, prefix: str, out: dict) -> None:
        out[f"{prefix}.weight"] = (self.weight, "linear")
        out[f"{prefix}.bias"] = (self.bias, "vector")


class FusedLeakyReLU(_Base):
    def __init__(self, c: int, *, param_dtype=jnp.float32):
        self.bias = nnx.Param(jnp.zeros((c,), param_dtype))

    def __call__(self, x):
        return fused_leaky_relu(x, self.bias[...])

    def official(self, prefix: str, out: dict) -> None:
        out[f"{prefix}.bias"] = (self.bias, "vector")


class ConvLayer(_Base):
    """The official ``ConvLayer`` (a Sequential): plain, blur-downsample or FIR-upsample conv + fused act.

    With ``activate`` the conv has no bias and the FusedLeakyReLU carries it; with ``activate=False`` the
    conv has ``bias`` (False for the skip convs). Official keys: plain ``.0.weight .1.bias``; down/up
    ``.0.kernel .1.weight .2.bias``.
    """

    def __init__(self, cin: int, cout: int, k: int, *, downsample: bool = False, upsample: bool = False,
                 bias: bool = True, activate: bool = True, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.downsample, self.upsample, self.k = downsample, upsample, k
        stride = 2 if downsample else 1
        padding = 0 if downsample else k // 2
        self.conv = EqualConv2d(cin, cout, k, stride=stride, padding=padding, bias=bias and not activate,
                                rngs=rngs, param_dtype=param_dtype)
        self.act = FusedLeakyReLU(cout, param_dtype=param_dtype) if activate else None

    def __call__(self, x):
        if self.downsample:
            p = (4 - 2) + (self.k - 1)
            x = upfirdn2d(x, fir_kernel(), pad=((p + 1) // 2, p // 2))
        elif self.upsample:
            x = upsample2x(x)
        x = self.conv(x)
        return self.act(x) if self.act is not None else x

    def official(self, prefix: str, out: dict) -> None:
        i = 0
        if self.downsample or self.upsample:
            out[f"{prefix}.0.kernel"] = (fir_kernel(4.0 if self.upsample else 1.0), "kernel")
            i = 1
        self.conv.official(f"{prefix}.{i}", out)
        if self.act is not None:
            self.act.official(f"{prefix}.{i + 1}", out)


class ModulatedConv2d(_Base):
    """StyleGAN2 modulated conv (activation modulation; see the module docstring)."""

    def __init__(self, cin: int, cout: int, k: int, style_dim: int, *, demodulate: bool = True,
                 upsample: bool = False, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.weight = self._normal(rngs, (k, k, cin, cout), param_dtype, CONV_AXES)
        self.modulation = EqualLinear(style_dim, cin, bias_init=1.0, rngs=rngs, param_dtype=param_dtype)
        self.scale = 1.0 / math.sqrt(cin * k * k)
        self.k, self.demodulate, self.upsample = k, demodulate, upsample

    def __call__(self, x, latent):
        style = self.modulation(latent.astype(x.dtype))            # (B, cin)
        w = (self.weight[...] * self.scale).astype(x.dtype)         # (k, k, cin, cout)
        x = x * style[:, None, None, :]
        if self.upsample:
            y = conv2d(x, w[::-1, ::-1], padding=self.k - 1, lhs_dilation=(2, 2))  # transposed conv, 2H+1
        else:
            y = conv2d(x, w, padding=self.k // 2)
        if self.demodulate:
            wsq = jnp.sum(jnp.square(w), axis=(0, 1))              # (cin, cout)
            demod = jax.lax.rsqrt(jnp.square(style) @ wsq + jnp.asarray(1e-8, x.dtype))
            y = y * demod[:, None, None, :]
        if self.upsample:
            y = upfirdn2d(y, fir_kernel(4.0), pad=(1, 1))
        return y

    def official(self, prefix: str, out: dict) -> None:
        out[f"{prefix}.weight"] = (self.weight, "modconv")
        self.modulation.official(f"{prefix}.modulation", out)
        if self.upsample:
            out[f"{prefix}.blur.kernel"] = (fir_kernel(4.0), "kernel")


class StyledConv(_Base):
    """ModulatedConv2d (demodulated) + FusedLeakyReLU; keys ``.conv.*`` and ``.activate.bias``."""

    def __init__(self, cin: int, cout: int, k: int, style_dim: int, *, upsample: bool = False,
                 rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.conv = ModulatedConv2d(cin, cout, k, style_dim, upsample=upsample, rngs=rngs, param_dtype=param_dtype)
        self.activate = FusedLeakyReLU(cout, param_dtype=param_dtype)

    def __call__(self, x, latent):
        return self.activate(self.conv(x, latent))

    def official(self, prefix: str, out: dict) -> None:
        self.conv.official(f"{prefix}.conv", out)
        self.activate.official(f"{prefix}.activate", out)


def group_norm(x: jax.Array, groups: int, weight: jax.Array, bias: jax.Array, eps: float = 1e-5) -> jax.Array:
    """GroupNorm over NHWC (two-pass variance, biased, as PyTorch)."""
    b, h, w, c = x.shape
    g = x.reshape(b, h, w, groups, c // groups)
    mean = jnp.mean(g, axis=(1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(g - mean), axis=(1, 2, 4), keepdims=True)
    g = (g - mean) * jax.lax.rsqrt(var + jnp.asarray(eps, x.dtype))
    return g.reshape(b, h, w, c) * weight.astype(x.dtype) + bias.astype(x.dtype)


def grid_sample_align_corners(feat: jax.Array, grid: jax.Array) -> jax.Array:
    """``F.grid_sample(feat, grid, mode='bilinear', padding_mode='zeros', align_corners=True)`` in NHWC.

    ``feat`` (B, H, W, C); ``grid`` (B, Ho, Wo, 2) with (x, y) in [-1, 1]; out-of-range taps read zeros.
    """
    b, h, w, c = feat.shape
    x = (grid[..., 0] + 1) * 0.5 * (w - 1)
    y = (grid[..., 1] + 1) * 0.5 * (h - 1)
    x0, y0 = jnp.floor(x), jnp.floor(y)
    wx1, wy1 = x - x0, y - y0
    wx0, wy0 = 1 - wx1, 1 - wy1
    flat = feat.reshape(b, h * w, c)
    out = jnp.zeros(grid.shape[:3] + (c,), feat.dtype)
    for dy, wy in ((0, wy0), (1, wy1)):
        for dx, wx in ((0, wx0), (1, wx1)):
            xi, yi = x0 + dx, y0 + dy
            valid = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
            idx = (jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)).astype(jnp.int32)
            taps = jnp.take_along_axis(flat, idx.reshape(b, -1, 1), axis=1).reshape(out.shape)
            out = out + taps * (wx * wy * valid).astype(feat.dtype)[..., None]
    return out
