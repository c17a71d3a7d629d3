"""Frozen ImageNet VGG19 feature extractor for LIA's perceptual loss (liax_official.md §6).

The network is a pure function over a plain nested dict of parameters (not an NNX module), so the frozen
weights can be passed to jitted train steps as an ordinary pytree argument::

    {"conv1_1": {"kernel": (3, 3, in, out) HWIO float32, "bias": (out,)}, ..., "conv5_1": {...}}

Only the 13 convolutions of torchvision's ``vgg19().features`` that lie before ``relu5_1`` are kept.
:func:`features` returns the activations relu1_1, relu2_1, relu3_1, relu4_1 and relu5_1 (the end points of
the torchvision slices ``[0:2)``, ``[2:7)``, ``[7:12)``, ``[12:21)``, ``[21:30)`` that LIA uses).

:func:`from_torchvision` / :func:`to_torchvision` convert to and from a torchvision ``vgg19`` state dict
(``features.{i}.weight`` (O, I, 3, 3) / ``features.{i}.bias``). ``channel_scale`` narrows every layer
(``round(c * scale)`` channels, at least 1) for cheap tests; the real network has ``channel_scale=1``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

# (name, torchvision index in ``features``, output channels at channel_scale=1); a 2x2 max-pool precedes
# the first convolution of stages 2..5 (torchvision indices 4, 9, 18, 27).
LAYERS: tuple[tuple[str, int, int], ...] = (
    ("conv1_1", 0, 64), ("conv1_2", 2, 64),
    ("conv2_1", 5, 128), ("conv2_2", 7, 128),
    ("conv3_1", 10, 256), ("conv3_2", 12, 256), ("conv3_3", 14, 256), ("conv3_4", 16, 256),
    ("conv4_1", 19, 512), ("conv4_2", 21, 512), ("conv4_3", 23, 512), ("conv4_4", 25, 512),
    ("conv5_1", 28, 512),
)
# The convolutions whose ReLU output is a returned feature (relu1_1 ... relu5_1).
FEATURE_LAYERS = ("conv1_1", "conv2_1", "conv3_1", "conv4_1", "conv5_1")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Keys of a torchvision vgg19 state dict that the extractor does not need (the convolutions after relu5_1
# and the classifier).
_IGNORED_KEY = re.compile(r"^(classifier\.\d+|features\.(30|32|34))\.(weight|bias)$")


def _channels(c: int, channel_scale: float) -> int:
    return max(1, round(c * channel_scale))


def layer_shapes(channel_scale: float = 1.0) -> dict[str, tuple[int, int]]:
    """``name -> (in_channels, out_channels)`` of every convolution."""
    shapes, cin = {}, 3
    for name, _, cout in LAYERS:
        cout = _channels(cout, channel_scale)
        shapes[name] = (cin, cout)
        cin = cout
    return shapes


def init_params(rng: jax.Array, channel_scale: float = 1.0) -> dict:
    """Random (He-normal kernels, zero biases) float32 parameters; real use loads ImageNet weights.

    All kernels are cut from one normal draw, so initialisation compiles a single sampler.
    """
    shapes = layer_shapes(channel_scale)
    sizes = [9 * cin * cout for cin, cout in shapes.values()]
    noise = jax.random.normal(rng, (sum(sizes),), jnp.float32)
    params, start = {}, 0
    for (name, (cin, cout)), size in zip(shapes.items(), sizes, strict=True):
        kernel = noise[start:start + size].reshape(3, 3, cin, cout) * math.sqrt(2.0 / (9 * cin))
        params[name] = {"kernel": kernel, "bias": jnp.zeros((cout,), jnp.float32)}
        start += size
    return params


def abstract_params(channel_scale: float = 1.0) -> dict:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves (no allocation)."""
    return jax.eval_shape(lambda: init_params(jax.random.key(0), channel_scale))


def _conv_relu(p: Mapping, x: jax.Array, precision) -> jax.Array:
    y = jax.lax.conv_general_dilated(x, p["kernel"], window_strides=(1, 1), padding=((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)
    return jax.nn.relu(y + p["bias"])


def _max_pool(x: jax.Array) -> jax.Array:
    """2x2 max-pool, stride 2, odd edges dropped (torch ``MaxPool2d(2, 2)``)."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def preprocess(x: jax.Array) -> jax.Array:
    """[-1, 1] images -> ImageNet-normalised float32 (clamped to [-1, 1] first, as LIA's ``Vgg19``)."""
    x = (jnp.clip(x.astype(jnp.float32), -1.0, 1.0) + 1.0) * 0.5
    return (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)


def features(params: Mapping, x: jax.Array, *, precision=jax.lax.Precision.HIGHEST) -> list[jax.Array]:
    """relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 of NHWC images ``x`` in [-1, 1] (float32).

    ``precision`` is that of the convolutions; ``HIGHEST`` (true fp32) keeps parity with PyTorch tight,
    ``DEFAULT`` lets accelerators use faster reduced-precision passes.
    """
    h = preprocess(x)
    outs = []
    for name, _, _ in LAYERS:
        if name.endswith("_1") and name != "conv1_1":
            h = _max_pool(h)
        h = _conv_relu(params[name], h, precision)
        if name in FEATURE_LAYERS:
            outs.append(h)
    return outs


def _torch_key(index: int, kind: str) -> str:
    return f"features.{index}.{kind}"


def torchvision_keys() -> list[str]:
    """The torchvision state-dict keys the extractor uses, in network order."""
    return [_torch_key(i, kind) for _, i, _ in LAYERS for kind in ("weight", "bias")]


def ignored_keys(state_dict: Mapping) -> list[str]:
    """Keys of ``state_dict`` that :func:`from_torchvision` accepts but does not use (sorted)."""
    return sorted(k for k in state_dict if _IGNORED_KEY.match(k))


def from_torchvision(state_dict: Mapping, channel_scale: float = 1.0) -> dict:
    """Parameters from a torchvision ``vgg19`` state dict (numpy arrays or torch tensors).

    Only the plain torchvision layout is accepted (``features.{i}.weight``, no ``module.`` or other
    prefix). The convolutions after relu5_1 and the classifier are ignored; anything else unexpected,
    missing or mis-shaped raises :class:`liax_jax.convert.ConversionError` naming the key.
    """
    from liax_jax.convert import ConversionError, _as_numpy  # noqa: PLC0415

    used = set(torchvision_keys())
    for key in torchvision_keys():
        if key not in state_dict:
            prefixed = next((k for k in state_dict if k.endswith("." + key)), None)
            hint = (f"; found {prefixed!r}: only the plain torchvision layout (no prefix) is accepted"
                    if prefixed else "; not a torchvision vgg19 state dict?")
            raise ConversionError(f"missing key {key!r}{hint}")
    unexpected = sorted(k for k in state_dict if k not in used and not _IGNORED_KEY.match(k))
    if unexpected:
        raise ConversionError(f"unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all); "
                              "not a torchvision vgg19 state dict?")
    params = {}
    shapes = layer_shapes(channel_scale)
    for name, index, _ in LAYERS:
        cin, cout = shapes[name]
        weight = _as_numpy(state_dict[_torch_key(index, "weight")])
        bias = _as_numpy(state_dict[_torch_key(index, "bias")])
        for key, value, expected in ((_torch_key(index, "weight"), weight, (cout, cin, 3, 3)),
                                     (_torch_key(index, "bias"), bias, (cout,))):
            if tuple(value.shape) != expected:
                raise ConversionError(f"key {key!r} has shape {tuple(value.shape)}, expected {expected}")
        params[name] = {"kernel": jnp.asarray(weight.astype(np.float32).transpose(2, 3, 1, 0)),
                        "bias": jnp.asarray(bias.astype(np.float32))}
    return params


def to_torchvision(params: Mapping) -> dict[str, np.ndarray]:
    """The inverse of :func:`from_torchvision` for the used keys (numpy float32, torchvision layout)."""
    out = {}
    for name, index, _ in LAYERS:
        kernel = np.asarray(params[name]["kernel"], np.float32)
        out[_torch_key(index, "weight")] = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))
        out[_torch_key(index, "bias")] = np.array(params[name]["bias"], np.float32)
    return out
