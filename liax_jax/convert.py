"""Official LIA-X checkpoints <-> the Flax model.

``load_official(state_dict_or_path, config)`` builds :class:`liax_jax.model.LiaX` from the released
``lia-x.pt`` (a plain 596-key state dict) or any state dict of the same layout (numpy arrays or torch
tensors); ``to_official(model)`` writes it back (all keys, including the FIR kernel buffers), so the
round trip is exact. Every key must be consumed with the right shape; anything missing, unexpected or
mis-shaped is a :class:`ConversionError` naming the key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from liax_jax.model import LiaX, LiaXConfig


class ConversionError(ValueError):
    """A state dict that does not fit the model (names the offending key)."""


def _to_jax_layout(value: np.ndarray, layout: str) -> np.ndarray:
    if layout == "conv":
        return value.transpose(2, 3, 1, 0)
    if layout == "modconv":
        return value[0].transpose(2, 3, 1, 0)
    if layout == "linear":
        return value.T
    if layout in ("vector", "vector4"):
        return value.reshape(-1)
    if layout == "const":
        return value.transpose(0, 2, 3, 1)
    if layout == "raw":
        return value
    raise ValueError(layout)


def _to_torch_layout(value: np.ndarray, layout: str) -> np.ndarray:
    if layout == "conv":
        return value.transpose(3, 2, 0, 1)
    if layout == "modconv":
        return value.transpose(3, 2, 0, 1)[None]
    if layout == "linear":
        return value.T
    if layout == "vector":
        return value
    if layout == "vector4":
        return value.reshape(1, -1, 1, 1)
    if layout == "const":
        return value.transpose(0, 3, 1, 2)
    if layout == "raw":
        return value
    raise ValueError(layout)


def _torch_shape(param_shape: tuple, layout: str) -> tuple:
    """The official shape of a parameter given its Flax shape."""
    if layout == "conv":
        kh, kw, i, o = param_shape
        return (o, i, kh, kw)
    if layout == "modconv":
        kh, kw, i, o = param_shape
        return (1, o, i, kh, kw)
    if layout == "linear":
        return tuple(param_shape[::-1])
    if layout == "vector4":  # ToFlow/ToRGB biases and layer-scale gammas are stored as (1, C, 1, 1)
        return (1, param_shape[0], 1, 1)
    if layout == "const":
        b, h, w, c = param_shape
        return (b, c, h, w)
    return tuple(param_shape)


def _as_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def read_state_dict(path: str | os.PathLike, wrappers=("gen", "state_dict", "model"),
                    safe_globals=(), *, ignore=(), dtypes: dict | None = None) -> dict[str, np.ndarray]:
    """Reads a ``.pt``/``.pth`` (torch, weights only) or ``.safetensors``/``.npz`` state dict as numpy.

    A torch checkpoint that nests the state dict under one of ``wrappers`` is unwrapped;
    ``safe_globals`` are extra classes the weights-only unpickler may build (e.g. ``argparse.Namespace``);
    ``ignore``: top-level entries that are not weights (e.g. AnimateDiff's ``animatediff_config``).
    ``dtypes`` (a dict) receives each key's stored dtype name (``float16``, ``bfloat16``, ...: bfloat16
    tensors are returned as float32, the others keep their dtype).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ConversionError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file  # noqa: PLC0415
        sd = dict(load_file(path))
    elif path.endswith(".npz"):
        with np.load(path) as data:
            sd = {k: data[k] for k in data.files}
    else:
        import torch  # noqa: PLC0415
        try:
            with torch.serialization.safe_globals(list(safe_globals)):
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    for wrapper in wrappers:
        if isinstance(sd, Mapping) and wrapper in sd and isinstance(sd[wrapper], Mapping):
            sd = sd[wrapper]
    if not isinstance(sd, Mapping):
        raise ConversionError(f"{path}: expected a state dict, got {type(sd).__name__}")
    sd = {k: v for k, v in sd.items() if k not in ignore}
    for k, v in sd.items():
        if not (hasattr(v, "detach") or isinstance(v, np.ndarray)):
            raise ConversionError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        if dtypes is not None:
            dtypes[k] = str(v.dtype).removeprefix("torch.")
    return {k: _as_numpy(v) for k, v in sd.items()}


def official_shapes(model) -> dict[str, tuple]:
    """Official key -> shape for this model's configuration."""
    out = {}
    for key, (ref, layout) in model.official_entries().items():
        shape = np.shape(ref) if layout == "kernel" else tuple(ref.shape)
        out[key] = shape if layout == "kernel" else _torch_shape(shape, layout)
    return out


def load_official(state_dict_or_path, config: Mapping | LiaXConfig | None = None) -> LiaX:
    """Builds a LiaX from an official-layout state dict (mapping of arrays/tensors, or a file path)."""
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        state = read_state_dict(state_dict_or_path)
    else:
        state = {k: _as_numpy(v) for k, v in state_dict_or_path.items()}
    config = LiaXConfig.from_config(config if config is not None else LiaXConfig())
    model = nnx.eval_shape(lambda: LiaX(config, rngs=nnx.Rngs(0)))
    return assign_official(model, state, config)


def assign_official(model, state: Mapping[str, np.ndarray], config):
    """Fills an abstract model (``nnx.eval_shape``) from an official-layout state dict and returns it.

    Works for any module with ``official_entries()`` (the LIA-X generator, the discriminator). Every key
    must be used with the right shape and every parameter filled; ``config`` (with ``param_dtype``) names
    the architecture in error messages.
    """
    entries = model.official_entries()
    missing = [k for k in entries if k not in state]
    unexpected = [k for k in state if k not in entries]
    if missing:
        raise ConversionError(f"missing key {missing[0]!r} ({len(missing)} missing in all) for {config}")
    if unexpected:
        raise ConversionError(f"unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all) for {config}")
    shapes = official_shapes(model)
    dtype = config.param_dtype
    np_dtype = np.float64 if dtype == jnp.float64 else np.float32
    for key, (ref, layout) in entries.items():
        value = state[key]
        if tuple(value.shape) != tuple(shapes[key]):
            raise ConversionError(f"key {key!r} has shape {tuple(value.shape)}, expected {tuple(shapes[key])}")
        if layout == "kernel":
            if not np.allclose(value, ref, atol=1e-6):
                raise ConversionError(f"key {key!r}: FIR kernel differs from the expected constant")
            continue
        ref.set_value(jnp.asarray(_to_jax_layout(value.astype(np_dtype), layout), dtype))
    leftover = [path for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
                if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
    if leftover:
        raise ConversionError(f"parameter {'/'.join(map(str, leftover[0]))} was not initialised")
    return model


def to_official(model) -> dict[str, np.ndarray]:
    """The model's parameters as an official-layout state dict (float32 numpy, all keys incl. kernels).

    Works for any module with ``official_entries()``.
    """
    out = {}
    for key, (ref, layout) in model.official_entries().items():
        if layout == "kernel":
            out[key] = np.asarray(ref, np.float32)
            continue
        out[key] = np.ascontiguousarray(_to_torch_layout(np.asarray(ref.get_value(), np.float32), layout))
    return out
