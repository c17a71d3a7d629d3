"""The StyleGAN2 discriminator of LIA's training recipe, in Flax NNX (NHWC, images in [-1, 1]).

Architecture (``shared/reference/liax_official.md`` §6; the rosinality StyleGAN2 layout LIA trains with):

* ``convs[0]``: 1x1 ConvLayer from RGB to ``ch[R]``;
* ``convs[1..]``: one :class:`DiscriminatorResBlock` per halving, ``ch[2^i] -> ch[2^(i-1)]`` for
  ``i = log2(R) .. 3``, ending at 4x4. Unlike LIA-X's encoder ResBlock, conv1 keeps ``in`` channels and
  conv2 (blur-downsample) changes them;
* minibatch standard deviation (:func:`minibatch_stddev`), appending ``stddev_feat`` channels;
* ``final_conv``: 3x3 ConvLayer ``ch[4] + stddev_feat -> ch[4]``;
* ``final_linear``: EqualLinear ``16 ch[4] -> ch[4]`` with fused leaky ReLU, then EqualLinear ``ch[4] -> 1``.
  The 4x4 map is flattened in PyTorch's (C, H, W) order so official weights apply unchanged.

Channels by feature-map size are ``{4..32: 512, 64: 256 cm, 128: 128 cm, 256: 64 cm, 512: 32 cm,
1024: 16 cm}`` (``cm`` the channel multiplier, 1 in LIA), each times ``scale`` (1 for the original; smaller
values give tiny test/demo models). The 256² ``cm=1`` discriminator has 24,001,089 parameters.

Public API: ``DiscriminatorConfig``, ``Discriminator(config, rngs=...)`` with ``__call__(x) -> logits (B, 1)``
(``__call__(x, return_features=True) -> (logits, feature maps)``, for feature matching) and
``official_entries()``; ``load_official(state_dict_or_path, config)`` (the ``dis`` entry of an original
LIA checkpoint, a bare state dict, or a file) and ``to_official(model)``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from liax_jax import convert
from liax_jax.convert import _as_numpy, assign_official, read_state_dict
from liax_jax.ops import SQRT2, ConvLayer, EqualLinear, ModelConfig, _Base

_BASE_CHANNELS = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64, 512: 32, 1024: 16}


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig(ModelConfig):
    resolution: int
    channel_multiplier: int = 1
    scale: float = 1.0
    stddev_group: int = 4
    stddev_feat: int = 1
    dtype: str = "float32"   # compute dtype; params are float32 (float64 when dtype is float64)

    def __post_init__(self):
        if self.resolution not in _BASE_CHANNELS or self.resolution < 8:
            raise ValueError(f"resolution must be a power of two in [8, 1024], got {self.resolution}")
        if self.channel_multiplier < 1 or self.scale <= 0:
            raise ValueError(f"channel_multiplier must be >= 1 and scale > 0, got {self.channel_multiplier}, "
                             f"{self.scale}")
        if self.stddev_group < 1 or self.stddev_feat < 1 or self.channels(4) % self.stddev_feat:
            raise ValueError(f"stddev_group must be >= 1 and stddev_feat must divide {self.channels(4)} channels, "
                             f"got {self.stddev_group}, {self.stddev_feat}")
        self.check_dtype()

    def channels(self, res: int) -> int:
        """Channels of the feature map at spatial size ``res``."""
        base = _BASE_CHANNELS[res] * (self.channel_multiplier if res >= 64 else 1)
        return max(1, int(round(base * self.scale)))


class DiscriminatorResBlock(_Base):
    """conv1 3x3 in->in, conv2 3x3 in->out blur-down, skip 1x1 blur-down (no act, no bias), /sqrt(2)."""

    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs, param_dtype):
        self.conv1 = ConvLayer(cin, cin, 3, rngs=rngs, param_dtype=param_dtype)
        self.conv2 = ConvLayer(cin, cout, 3, downsample=True, rngs=rngs, param_dtype=param_dtype)
        self.skip = ConvLayer(cin, cout, 1, downsample=True, activate=False, bias=False, rngs=rngs,
                              param_dtype=param_dtype)

    def __call__(self, x):
        return (self.conv2(self.conv1(x)) + self.skip(x)) / jnp.asarray(SQRT2, x.dtype)

    def official(self, prefix: str, out: dict) -> None:
        for name in ("conv1", "conv2", "skip"):
            getattr(self, name).official(f"{prefix}.{name}", out)


def minibatch_stddev(x: jax.Array, group_size: int = 4, num_features: int = 1, eps: float = 1e-8) -> jax.Array:
    """StyleGAN2 minibatch standard deviation on NHWC features: (B, H, W, C) -> (B, H, W, C + F).

    With ``G = min(B, group_size)`` and ``M = B // G``, sample ``b`` sits at position ``m = b % M`` of group
    ``b // M``. For every (m, f) the population variance is taken over the G samples sharing ``m`` (per
    pixel and channel, channels split into F contiguous groups of ``C // F``), then ``sqrt(var + eps)`` is
    averaged over the pixels and the channels of group f. The F values of position ``m`` are appended, as
    constant channels, to every sample at that position. The statistic is computed in at least float32.
    """
    b, h, w, c = x.shape
    group = min(b, group_size)
    if b % group:
        raise ValueError(f"minibatch stddev: batch size {b} is not divisible by the group size {group} "
                         f"(min(batch, stddev_group={group_size}))")
    if c % num_features:
        raise ValueError(f"minibatch stddev: {c} channels are not divisible by stddev_feat={num_features}")
    m = b // group
    stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
    y = x.astype(stat_dtype).reshape(group, m, h, w, num_features, c // num_features)
    var = jnp.mean(jnp.square(y - jnp.mean(y, axis=0)), axis=0)         # (M, H, W, F, C//F)
    std = jnp.mean(jnp.sqrt(var + jnp.asarray(eps, stat_dtype)), axis=(1, 2, 4))  # (M, F)
    std = jnp.tile(std, (group, 1)).astype(x.dtype)                    # row g*M + m <- std[m]
    return jnp.concatenate([x, jnp.broadcast_to(std[:, None, None, :], (b, h, w, num_features))], axis=-1)


class Discriminator(nnx.Module):
    """The StyleGAN2 discriminator (``Discriminator(size, channel_multiplier)`` of LIA's training code)."""

    def __init__(self, config: Mapping | DiscriminatorConfig, *, rngs: nnx.Rngs):
        self.config = c = DiscriminatorConfig.from_config(config)
        kw = dict(rngs=rngs, param_dtype=c.param_dtype)
        convs = [ConvLayer(3, c.channels(c.resolution), 1, **kw)]
        for i in range(int(math.log2(c.resolution)), 2, -1):
            convs.append(DiscriminatorResBlock(c.channels(2 ** i), c.channels(2 ** (i - 1)), **kw))
        self.convs = nnx.List(convs)
        top = c.channels(4)
        self.final_conv = ConvLayer(top + c.stddev_feat, top, 3, **kw)
        self.final_linear = nnx.List([EqualLinear(top * 16, top, activate=True, **kw), EqualLinear(top, 1, **kw)])

    @property
    def dtype(self):
        return self.config.compute_dtype

    def __call__(self, x: jax.Array, *, return_features: bool = False):
        """Images (B, R, R, 3) in [-1, 1] -> logits (B, 1) in the compute dtype.

        ``return_features=True`` returns ``(logits, features)`` instead: the NHWC feature maps after
        ``convs[0]`` (R x R), after every ResBlock (R/2 ... 4) and after ``final_conv`` (4 x 4), i.e.
        ``log2(R)`` maps, fine to coarse (for feature-matching losses). The logits are the same either way.
        B must be divisible by ``min(B, stddev_group)`` (ValueError otherwise).
        """
        r = self.config.resolution
        if x.ndim != 4 or x.shape[1:] != (r, r, 3):
            raise ValueError(f"expected images of shape (B, {r}, {r}, 3), got {tuple(x.shape)}")
        h = x.astype(self.dtype)
        features = []
        for layer in self.convs:
            h = layer(h)
            features.append(h)
        h = minibatch_stddev(h, self.config.stddev_group, self.config.stddev_feat)
        h = self.final_conv(h)                                    # (B, 4, 4, C)
        features.append(h)
        h = jnp.transpose(h, (0, 3, 1, 2)).reshape(h.shape[0], -1)  # PyTorch's (C, H, W) flatten order
        for layer in self.final_linear:
            h = layer(h)
        return (h, features) if return_features else h

    def official_entries(self) -> dict:
        """Official state-dict key -> (nnx.Param or constant ndarray, layout tag), as in ``LiaX``."""
        out: dict = {}
        self.convs[0].official("convs.0", out)
        for k, block in enumerate(self.convs[1:], start=1):
            block.official(f"convs.{k}", out)
        self.final_conv.official("final_conv", out)
        for k, layer in enumerate(self.final_linear):
            layer.official(f"final_linear.{k}", out)
        return out


# -------------------------------------------------------------------------------------------- conversion
def read_discriminator_state(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a discriminator state dict from a file as numpy.

    ``.pt``/``.pth``: an original LIA training checkpoint ``{gen, dis, g_optim, d_optim, args}`` (its ``dis``
    entry is used; the ``args`` Namespace is allowed through the weights-only unpickler) or a bare state
    dict. ``.safetensors``/``.npz``: a bare state dict.
    """
    import argparse  # noqa: PLC0415

    return read_state_dict(path, wrappers=("dis",), safe_globals=(argparse.Namespace,))


def _unwrap(state: Mapping) -> Mapping:
    """The discriminator part of a full LIA checkpoint (``state["dis"]``), else ``state`` itself."""
    if "dis" in state and isinstance(state["dis"], Mapping):
        return state["dis"]
    return state


def load_official(state_dict_or_path, config: Mapping | DiscriminatorConfig) -> Discriminator:
    """Builds a Discriminator from an official-layout state dict (mapping of arrays/tensors, a full LIA
    checkpoint mapping with a ``dis`` entry, or a file path). Every key must be used with the right shape;
    anything missing, unexpected or mis-shaped is a :class:`ConversionError` naming the key."""
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        state = read_discriminator_state(state_dict_or_path)
    else:
        state = {k: _as_numpy(v) for k, v in _unwrap(state_dict_or_path).items()}
    config = DiscriminatorConfig.from_config(config)
    model = nnx.eval_shape(lambda: Discriminator(config, rngs=nnx.Rngs(0)))
    return assign_official(model, state, config)


def to_official(model: Discriminator) -> dict[str, np.ndarray]:
    """The model's parameters as an official-layout state dict (float32 numpy, FIR kernel buffers included)."""
    return convert.to_official(model)
