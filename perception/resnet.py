"""Bottleneck ResNets (ResNet-50) in Flax NNX, NHWC: torchvision's ImageNet net and the VGGFace2 face net.

Facts from ``shared/reference/perception_nets.md`` §1 (torchvision ``resnet50``) and §2.1 (cydonia999
VGGFace2-pytorch ``resnet50_ft``/``resnet50_scratch``). Both share torchvision's state-dict key names and
shapes but compute different functions (the layout, :attr:`ResNetConfig.layout`):

========================  ==================================  ==========================================
                          ``"torchvision"`` (ResNet V1.5)      ``"vggface2"`` (Caffe / original ResNet)
========================  ==================================  ==========================================
stem                      conv1 7x7/s2/p3, bn1, ReLU           same
stem max-pool             3x3/s2, **padding 1**                3x3/s2, **padding 0, ceil_mode=True**
Bottleneck stride on      ``conv2`` (the 3x3)                  ``conv1`` (the first 1x1)
========================  ==================================  ==========================================

Every convolution pads symmetrically and explicitly, as torch does (never ``'SAME'``); max-pools pad with
-inf, and ``ceil_mode`` adds the extra -inf padding at the bottom/right that the final partial window
needs. The head is a global average pool (torch ``AdaptiveAvgPool2d(1)``; cydonia's ``AvgPool2d(7)`` is
the same at its 224x224 input, where layer4 is 7x7) and, when ``num_classes > 0``, ``fc``.

BatchNorm is torch's ``BatchNorm2d`` exactly (eps 1e-5, momentum 0.1 in torch's meaning, i.e.
``running = 0.9 * running + 0.1 * batch``): ``train=False`` normalises with the running statistics;
``train=True`` with the batch statistics (biased variance) and updates ``running_mean`` and
``running_var`` (with the *unbiased* batch variance, as torch does; ``flax.nnx.BatchNorm`` would store
the biased one) in place. The statistics are :class:`flax.nnx.BatchStat` variables, so ``nnx.split(model,
nnx.Param, ...)`` separates what an optimiser trains from what the forward pass updates. torch's
``num_batches_tracked`` counter is not kept here (``track_batches=False``: an integer leaf would break
``jax.grad`` over the state; it only matters for ``momentum=None``).

Module attribute names mirror the torch module paths, and every leaf is named like the torch tensor, so
the torch key of a variable is its state path joined with dots (``layer2.0.downsample.1.running_var``).
Conv weights are stored HWIO (torch OIHW), ``fc.weight`` as (in, out) (torch (out, in)).

Inputs are NHWC float images that have *already* been preprocessed: :func:`preprocess_imagenet` for
torchvision weights, :func:`preprocess_vggface2` for the VGGFace2 weights (both map images in [-1, 1];
neither resizes or crops: the pretrained nets expect 224x224 crops, faces for VGGFace2).

Public API: :class:`ResNetConfig` (``preset("resnet50" | "vggface2" | "tiny" | "tiny_vggface2")``),
:class:`ResNet`, :func:`preprocess_imagenet`, :func:`preprocess_vggface2`, :func:`from_torch`,
:func:`to_torch`, :func:`torch_shapes`, :func:`count_params`, :func:`max_pool2d`.
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

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "float64": jnp.float64}
LAYOUTS = ("torchvision", "vggface2")
EXPANSION = 4  # Bottleneck output channels = 4 x planes

IMAGENET_MEAN = (0.485, 0.456, 0.406)          # RGB, images in [0, 1]
IMAGENET_STD = (0.229, 0.224, 0.225)
VGGFACE2_MEAN_BGR = (91.4953, 103.8827, 131.0912)  # BGR, images in [0, 255] (resnet50_ft.prototxt)

# Logical axis names of the weights (launch/sharding.py maps them to mesh axes); metadata only.
CONV_AXES = (None, None, "conv_in", "conv_out")
LINEAR_AXES = ("embed_in", "embed_out")

PRESETS: dict[str, dict[str, Any]] = {
    "resnet50": dict(layout="torchvision", layers=(3, 4, 6, 3), width=64, num_classes=1000),
    "vggface2": dict(layout="vggface2", layers=(3, 4, 6, 3), width=64, num_classes=8631),
    "tiny": dict(layout="torchvision", layers=(1, 1, 1, 1), width=8, num_classes=0),
    "tiny_vggface2": dict(layout="vggface2", layers=(1, 1, 1, 1), width=8, num_classes=0),
}


def _positive_int(value) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and value > 0


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """A Bottleneck ResNet: ``layout`` (module doc), blocks per stage ``layers`` (four stages), base
    ``width`` (stage ``i`` has ``width * 2**i`` planes and ``4 *`` that many output channels),
    ``num_classes`` (0: no ``fc``, the output is the pooled features) and the compute ``dtype`` (parameters
    are float32; float64 when computing in float64). The defaults are torchvision's ResNet-50."""

    layout: str = "torchvision"
    layers: tuple[int, ...] = (3, 4, 6, 3)
    width: int = 64
    num_classes: int = 1000
    dtype: str = "float32"

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"ResNetConfig: layout must be one of {LAYOUTS}, got {self.layout!r}")
        try:
            layers = tuple(self.layers)
        except TypeError:
            raise ValueError(f"ResNetConfig: layers must be 4 positive ints, got {self.layers!r}") from None
        if len(layers) != 4 or not all(_positive_int(n) for n in layers):
            raise ValueError(f"ResNetConfig: layers must be 4 positive ints (blocks per stage), got {self.layers!r}")
        object.__setattr__(self, "layers", tuple(int(n) for n in layers))  # lists (e.g. from JSON) -> tuple
        if not _positive_int(self.width):
            raise ValueError(f"ResNetConfig: width must be a positive int, got {self.width!r}")
        if not (isinstance(self.num_classes, int | np.integer) and not isinstance(self.num_classes, bool)
                and self.num_classes >= 0):
            raise ValueError(f"ResNetConfig: num_classes must be an int >= 0 (0: no fc head), got {self.num_classes!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"ResNetConfig: dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    @classmethod
    def preset(cls, name: str, **overrides) -> ResNetConfig:
        """``resnet50`` (torchvision, 1000 classes), ``vggface2`` (cydonia999, 8631 identities), ``tiny`` /
        ``tiny_vggface2`` (one block per stage, width 8, no fc: CPU tests); ``overrides`` replace fields."""
        if name not in PRESETS:
            raise ValueError(f"ResNetConfig.preset: unknown preset {name!r} (known: {sorted(PRESETS)})")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_config(cls, cfg) -> ResNetConfig:
        """From an instance or a mapping of fields (e.g. a ``model.json`` config); unknown keys are ignored."""
        if isinstance(cfg, cls):
            return cfg
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(cfg).items() if k in fields})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def feature_dim(self) -> int:
        """Channels of layer4 and of the pooled features (2048 for ResNet-50)."""
        return self.width * 8 * EXPANSION

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def param_dtype(self):
        return jnp.float64 if self.dtype == "float64" else jnp.float32


def _stat_dtype(dtype):
    """BatchNorm statistics / pooling accumulate in float32 (float64 for float64 inputs)."""
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


# ----------------------------------------------------------------------------------------------- layers
def max_pool2d(x: jax.Array, kernel: int, stride: int, padding: int = 0, *, ceil_mode: bool = False) -> jax.Array:
    """torch ``F.max_pool2d(x, kernel, stride, padding, ceil_mode=...)`` on NHWC input.

    Padding is -inf. With ``ceil_mode`` the output size is ``ceil((n + 2p - k) / s) + 1`` (less one when
    the last window would start in the right padding, as torch), realised by extra -inf padding at the end.
    """
    pads = []
    for n in x.shape[1:3]:
        span = n + 2 * padding - kernel
        out = (-(-span // stride) if ceil_mode else span // stride) + 1
        if ceil_mode and (out - 1) * stride >= n + padding:
            out -= 1
        extra = max(0, (out - 1) * stride + kernel - (n + 2 * padding))
        pads.append((padding, padding + extra))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, kernel, kernel, 1),  # a literal: differentiable
                                 (1, stride, stride, 1), ((0, 0), pads[0], pads[1], (0, 0)))


class Conv2d(nnx.Module):
    """torch ``Conv2d(cin, cout, k, stride, padding, bias=False)``, weight HWIO, symmetric explicit padding.

    Initialised as torchvision's ResNet: Kaiming normal, fan_out, ReLU gain."""

    def __init__(self, cin: int, cout: int, kernel: int, *, stride: int = 1, padding: int = 0, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        std = math.sqrt(2.0 / (kernel * kernel * cout))
        w = jax.random.normal(rngs.params(), (kernel, kernel, cin, cout), param_dtype) * std
        self.weight = nnx.Param(w, out_sharding=CONV_AXES, eager_sharding=False)
        self.stride, self.padding, self.dtype = stride, padding, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.padding
        return jax.lax.conv_general_dilated(x.astype(self.dtype), self.weight[...].astype(self.dtype),
                                            (self.stride, self.stride), ((p, p), (p, p)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))


class BatchNorm2d(nnx.Module):
    """torch ``BatchNorm2d`` over the last (channel) axis (module doc): ``weight``/``bias`` are
    :class:`nnx.Param`, ``running_mean``/``running_var`` :class:`nnx.BatchStat`. ``momentum`` has torch's
    meaning (0.1). Statistics are computed in float32 (float64 for float64 input); the mean over the batch
    axes of a globally sharded array is the global (data-parallel) statistic. ``track_batches``: also keep
    torch's ``num_batches_tracked`` (an int32 :class:`nnx.BatchStat`, + 1 per training call) for state
    dicts that have the key (the X-NeMo motion encoder's)."""

    def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: float = 0.1, dtype=jnp.float32,
                 param_dtype=jnp.float32, track_batches: bool = False):
        self.eps, self.momentum, self.dtype = eps, momentum, dtype
        self.weight = nnx.Param(jnp.ones((num_features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))
        self.running_mean = nnx.BatchStat(jnp.zeros((num_features,), param_dtype))
        self.running_var = nnx.BatchStat(jnp.ones((num_features,), param_dtype))
        if track_batches:
            self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        sd = _stat_dtype(x.dtype)
        xf = x.astype(sd)
        if train:
            axes = tuple(range(x.ndim - 1))
            mean = xf.mean(axes)
            var = jnp.square(xf - mean).mean(axes)
            n = math.prod(x.shape[:-1])
            unbiased = var * (n / max(n - 1, 1))
            m = self.momentum
            for stat, batch in ((self.running_mean, mean), (self.running_var, unbiased)):
                old = stat.get_value()
                stat.set_value(((1 - m) * old.astype(sd) + m * batch).astype(old.dtype))
            if hasattr(self, "num_batches_tracked"):
                self.num_batches_tracked.set_value(self.num_batches_tracked.get_value() + 1)
        else:
            mean = self.running_mean.get_value().astype(sd)
            var = self.running_var.get_value().astype(sd)
        scale = jax.lax.rsqrt(var + self.eps) * self.weight.get_value().astype(sd)
        return ((xf - mean) * scale + self.bias.get_value().astype(sd)).astype(self.dtype)


class Linear(nnx.Module):
    """torch ``Linear(cin, cout)`` (weight stored (in, out)), torch's default uniform(+-1/sqrt(in)) init."""

    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        bound = 1.0 / math.sqrt(cin)
        self.weight = nnx.Param(jax.random.uniform(rngs.params(), (cin, cout), param_dtype, -bound, bound),
                                out_sharding=LINEAR_AXES, eager_sharding=False)
        self.bias = nnx.Param(jax.random.uniform(rngs.params(), (cout,), param_dtype, -bound, bound))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return x.astype(self.dtype) @ self.weight[...].astype(self.dtype) + self.bias[...].astype(self.dtype)


class Bottleneck(nnx.Module):
    """``conv1`` 1x1 -> ``bn1`` -> ReLU -> ``conv2`` 3x3 p1 -> ``bn2`` -> ReLU -> ``conv3`` 1x1 (4x planes) ->
    ``bn3``, + identity (``downsample`` = [1x1 conv with the stride, BN] when the shape changes), ReLU.
    The stride sits on ``conv2`` (torchvision) or ``conv1`` (vggface2)."""

    def __init__(self, inplanes: int, planes: int, stride: int, *, layout: str, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        bn = dict(dtype=dtype, param_dtype=param_dtype)
        s1, s2 = (stride, 1) if layout == "vggface2" else (1, stride)
        out = planes * EXPANSION
        self.conv1 = Conv2d(inplanes, planes, 1, stride=s1, **kw)
        self.bn1 = BatchNorm2d(planes, **bn)
        self.conv2 = Conv2d(planes, planes, 3, stride=s2, padding=1, **kw)
        self.bn2 = BatchNorm2d(planes, **bn)
        self.conv3 = Conv2d(planes, out, 1, **kw)
        self.bn3 = BatchNorm2d(out, **bn)
        self.downsample = (nnx.List([Conv2d(inplanes, out, 1, stride=stride, **kw), BatchNorm2d(out, **bn)])
                           if stride != 1 or inplanes != out else None)

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        h = jax.nn.relu(self.bn1(self.conv1(x), train=train))
        h = jax.nn.relu(self.bn2(self.conv2(h), train=train))
        h = self.bn3(self.conv3(h), train=train)
        identity = x if self.downsample is None else self.downsample[1](self.downsample[0](x), train=train)
        return jax.nn.relu(h + identity.astype(h.dtype))


class ResNet(nnx.Module):
    """A Bottleneck ResNet (module doc): ``conv1``, ``bn1``, ``layer1`` ... ``layer4`` (``nnx.List`` of
    :class:`Bottleneck`), and ``fc`` when ``num_classes > 0`` (else ``fc`` is None)."""

    def __init__(self, config: ResNetConfig | Mapping, *, rngs: nnx.Rngs):
        self.config = c = ResNetConfig.from_config(config)
        dtype, pd = c.compute_dtype, c.param_dtype
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=pd)
        self.conv1 = Conv2d(3, c.width, 7, stride=2, padding=3, **kw)
        self.bn1 = BatchNorm2d(c.width, dtype=dtype, param_dtype=pd)
        inplanes = c.width
        for i, blocks in enumerate(c.layers):
            planes = c.width * 2 ** i
            stage = []
            for b in range(blocks):
                stage.append(Bottleneck(inplanes, planes, 2 if i > 0 and b == 0 else 1, layout=c.layout, **kw))
                inplanes = planes * EXPANSION
            setattr(self, f"layer{i + 1}", nnx.List(stage))
        self.fc = Linear(c.feature_dim, c.num_classes, **kw) if c.num_classes else None

    @property
    def dtype(self):
        return self.config.compute_dtype

    def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False):
        """``x`` (B, H, W, 3) preprocessed images -> logits (B, num_classes), or the pooled features
        (B, feature_dim) when ``num_classes == 0``, in the compute dtype. ``return_features``: also the maps
        ``[stem (after conv1/bn1/ReLU, before the max-pool), layer1, layer2, layer3, layer4]``.
        ``train``: BatchNorm batch statistics + in-place running-statistic updates (module doc)."""
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"ResNet: expected NHWC images (B, H, W, 3), got shape {x.shape}")
        h = jax.nn.relu(self.bn1(self.conv1(x), train=train))
        features = [h]
        if self.config.layout == "vggface2":
            h = max_pool2d(h, 3, 2, 0, ceil_mode=True)
        else:
            h = max_pool2d(h, 3, 2, 1)
        for i in range(len(self.config.layers)):
            for block in getattr(self, f"layer{i + 1}"):
                h = block(h, train=train)
            features.append(h)
        pooled = jnp.mean(h.astype(_stat_dtype(h.dtype)), axis=(1, 2)).astype(self.dtype)
        out = pooled if self.fc is None else self.fc(pooled)
        return (out, features) if return_features else out


# ------------------------------------------------------------------------------------------- preprocessing
def preprocess_imagenet(x: jax.Array) -> jax.Array:
    """RGB images in [-1, 1] (NHWC) -> torchvision's ImageNet input ``((x + 1) / 2 - mean) / std`` (float32).

    No resizing or cropping (torchvision's preset resizes to 256/232 and centre-crops 224 first)."""
    x = (x.astype(jnp.promote_types(x.dtype, jnp.float32)) + 1.0) * 0.5
    return (x - jnp.asarray(IMAGENET_MEAN, x.dtype)) / jnp.asarray(IMAGENET_STD, x.dtype)


def preprocess_vggface2(x: jax.Array) -> jax.Array:
    """RGB images in [-1, 1] (NHWC) -> the VGGFace2 net's input: **BGR**, 0-255 (``(x + 1) * 127.5``) minus
    the BGR mean (91.4953, 103.8827, 131.0912), no std (float32).

    No resizing or cropping (the pretrained net expects 224x224 face crops: resize 256, centre-crop 224)."""
    x = (x.astype(jnp.promote_types(x.dtype, jnp.float32))[..., ::-1] + 1.0) * 127.5
    return x - jnp.asarray(VGGFACE2_MEAN_BGR, x.dtype)


# ---------------------------------------------------------------------------------------------- conversion
def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[str, tuple[tuple, Any]]:
    """``{torch key: (state path, leaf)}`` of a pure-dict state."""
    out = {}
    for k, v in tree.items():
        path = (*prefix, k)
        if isinstance(v, Mapping):
            out.update(_flatten(v, path))
        else:
            out[".".join(map(str, path))] = (path, v)
    return out


def _to_torch_layout(key: str, value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:
        return value.transpose(3, 2, 0, 1)   # HWIO -> OIHW
    if value.ndim == 2:
        return value.T                        # (in, out) -> (out, in)
    return value


def _to_jax_layout(key: str, value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)   # OIHW -> HWIO
    if value.ndim == 2:
        return value.T
    return value


def _torch_shape(shape: tuple) -> tuple:
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def _as_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor (torch itself is never imported here)
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _abstract(config: ResNetConfig) -> ResNet:
    return nnx.eval_shape(lambda: ResNet(config, rngs=nnx.Rngs(0)))


def torch_shapes(config: ResNetConfig | Mapping) -> dict[str, tuple[int, ...]]:
    """``{torch state-dict key: torch shape}`` of a config (no ``num_batches_tracked``; nothing allocated)."""
    flat = _flatten(nnx.to_pure_dict(nnx.state(_abstract(ResNetConfig.from_config(config)))))
    return {k: _torch_shape(tuple(leaf.shape)) for k, (_, leaf) in flat.items()}


def _names(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def from_torch(state_dict: Mapping[str, Any], config: ResNetConfig | Mapping) -> ResNet:
    """A :class:`ResNet` from a torchvision-layout state dict (numpy arrays or torch tensors).

    Works for both layouts (same key names: ``conv1.weight``, ``bn1.*``, ``layer{L}.{B}.conv{1,2,3}.weight``,
    ``layer{L}.{B}.bn{1,2,3}.*``, ``layer{L}.0.downsample.{0,1}.*``, ``fc.{weight,bias}``). Strict:
    ``num_batches_tracked`` entries are ignored, any other missing, unexpected or mis-shaped key raises
    :class:`ValueError` naming it. Values are cast to the parameter dtype (float32).
    """
    config = ResNetConfig.from_config(config)
    graphdef, state = nnx.split(_abstract(config))
    pure = nnx.to_pure_dict(state)
    flat = _flatten(pure)
    given = {k: v for k, v in state_dict.items() if k.split(".")[-1] != "num_batches_tracked"}
    missing = [k for k in flat if k not in given]
    unexpected = sorted(k for k in given if k not in flat)
    if missing:
        prefixed = next((k for k in given if k.endswith("." + missing[0])), None)
        hint = f"; found {prefixed!r}: strip the prefix" if prefixed else ""
        raise ValueError(f"missing key(s) {_names(missing)} for {config}{hint}")
    if unexpected:
        raise ValueError(f"unexpected key(s) {_names(unexpected)} for {config}")
    np_dtype = np.dtype(config.param_dtype)
    for key, (path, leaf) in flat.items():
        value = _as_numpy(given[key])
        expected = _torch_shape(tuple(leaf.shape))
        if tuple(value.shape) != expected:
            raise ValueError(f"key {key!r} has shape {tuple(value.shape)}, expected {expected} for {config}")
        node = pure
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = jnp.asarray(_to_jax_layout(key, value.astype(np_dtype)))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def to_torch(model: ResNet) -> dict[str, np.ndarray]:
    """The inverse of :func:`from_torch`: every parameter and running statistic as a torch-layout numpy
    array (the parameter dtype, float32). ``num_batches_tracked`` is not produced (not tracked here);
    torch's ``load_state_dict`` (strict) fills it with 0 for a plain dict without it."""
    flat = _flatten(nnx.to_pure_dict(nnx.state(model)))
    return {k: np.array(_to_torch_layout(k, np.asarray(leaf)), order="C") for k, (_, leaf) in flat.items()}


def count_params(config_or_model: ResNetConfig | Mapping | ResNet) -> int:
    """Learnable parameters (``nnx.Param``; BatchNorm statistics excluded) of a config (abstractly, nothing
    allocated) or of a model. torchvision ResNet-50: 25,557,032; VGGFace2 ResNet-50: 41,192,951."""
    model = config_or_model if isinstance(config_or_model, nnx.Module) else \
        _abstract(ResNetConfig.from_config(config_or_model))
    return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
