"""Diffusers / transformers checkpoints -> the JAX modules of :mod:`xnemo_jax`.

``load_pretrained(folder, kind)`` reads a folder written by ``save_pretrained`` (``config.json`` plus
``*.safetensors`` or ``*.bin``, sharded or not), builds the module with ``Model.from_config(config)``
under ``nnx.eval_shape`` (nothing allocated twice) and fills every parameter from the state dict.

Key mapping is by name: module attribute paths mirror the PyTorch module paths
(``down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q.weight`` is
``model.down_blocks[0].attentions[1].transformer_blocks[0].attn1.to_q.weight``). A module may rename keys
with a ``torch_key(key) -> key | None`` static method (``None``: a buffer to skip, e.g. CLIP's
``position_ids``). Layouts: each layer class declares ``TORCH_LAYOUT`` (attribute -> axis permutation
from the torch array, :mod:`xnemo_jax.layers`); everything else is copied as is. Every key must be used,
every parameter filled, and every shape must match, or :class:`ConversionError` names the key.
"""

from __future__ import annotations

import glob
import importlib
import json
import os
import re

import numpy as np

KINDS = {  # kind -> (module, class)
    "unet": ("xnemo_jax.unet", "UNet2DConditionModel"),
    "vae": ("xnemo_jax.vae", "AutoencoderKL"),
    "svd_vae": ("xnemo_jax.vae", "AutoencoderKLTemporalDecoder"),
    "clip_vision": ("xnemo_jax.clip", "CLIPVisionModelWithProjection"),
}


_ALIAS = re.compile(r"\.Conv2d_0\.")


class ConversionError(ValueError):
    """A checkpoint does not fit the module (message names the file or key)."""


def read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise ConversionError(f"{folder}: no config.json (expected a diffusers/transformers save_pretrained folder)")
    with open(path) as f:
        return json.load(f)


def read_state_dict(folder: str) -> dict[str, np.ndarray]:
    """All tensors of a ``save_pretrained`` folder as float32/int numpy arrays (safetensors preferred)."""
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    state: dict[str, np.ndarray] = {}
    if files:
        from safetensors.numpy import load_file  # noqa: PLC0415

        for path in files:
            try:
                part = load_file(path)
            except Exception as e:  # noqa: BLE001 - bf16 files: read through torch instead
                if "bfloat16" not in str(e).lower() and "bf16" not in str(e).lower():
                    raise ConversionError(f"{path}: unreadable safetensors file ({e})") from e
                from safetensors.torch import load_file as load_torch  # noqa: PLC0415
                part = {k: v.float().numpy() for k, v in load_torch(path).items()}
            state.update(part)
        return state
    files = sorted(glob.glob(os.path.join(folder, "*.bin")) + glob.glob(os.path.join(folder, "*.pt*")))
    if not files:
        raise ConversionError(f"{folder}: no *.safetensors or *.bin weights")
    import torch  # noqa: PLC0415

    for path in files:
        part = torch.load(path, map_location="cpu", weights_only=True)
        state.update({k: (v.float() if v.is_floating_point() else v).numpy() for k, v in part.items()})
    return state


def _modules_with_params(model):
    """``{dotted path: module}`` for every module that directly owns Params (``nnx.iter_graph`` order)."""
    from flax import nnx  # noqa: PLC0415

    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module):
            out[".".join(str(p) for p in path)] = node
    return out


def assign(model, state: dict[str, np.ndarray], source: str = "checkpoint"):
    """Fills ``model``'s Params in place from a torch-named state dict; returns ``model``."""
    from flax import nnx  # noqa: PLC0415

    rename = getattr(model, "torch_key", None)
    modules = _modules_with_params(model)
    targets = {}
    for mpath, module in modules.items():
        layout = getattr(module, "TORCH_LAYOUT", {}) or {}
        for name, value in vars(module).items():
            if isinstance(value, nnx.Param):
                key = f"{mpath}.{name}" if mpath else name
                targets[key] = (module, name, layout.get(name))
    used: dict[str, np.ndarray] = {}
    for key, array in state.items():
        new = rename(key) if rename is not None else key
        if new is None:
            continue
        new = _ALIAS.sub(".conv.", "." + new)[1:]  # diffusers registers Down/Upsample convs twice
        if new not in targets:
            raise ConversionError(f"{source}: unexpected key {key!r} (no such parameter in the JAX module)")
        module, name, perm = targets[new]
        param = getattr(module, name)
        array = np.asarray(array)
        if perm is not None and array.ndim == len(perm):
            array = np.transpose(array, perm)
        if tuple(array.shape) != tuple(param.shape):
            raise ConversionError(f"{source}: {key!r} has shape {tuple(np.shape(state[key]))}, the JAX parameter "
                                  f"{new} needs {tuple(param.shape)} (after layout change {tuple(array.shape)})")
        if new in used:
            if not np.array_equal(used[new], array):
                raise ConversionError(f"{source}: {key!r} and another key both fill {new} with different values")
            continue
        param[...] = np.asarray(array, param.dtype)
        used[new] = array
    missing = sorted(set(targets) - set(used))
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ConversionError(f"{source}: {len(missing)} parameters not in the checkpoint: "
                              f"{', '.join(missing[:5])}{more}")
    return model


def build(kind: str, config: dict, *, dtype="float32", abstract: bool = False, seed: int = 0, **options):
    """``Model.from_config(config, **options)`` for a kind of :data:`KINDS` (``abstract``: under
    ``nnx.eval_shape``, nothing allocated)."""
    from flax import nnx  # noqa: PLC0415

    if kind not in KINDS:
        raise ConversionError(f"unknown kind {kind!r}; expected one of {sorted(KINDS)}")
    module, cls_name = KINDS[kind]
    cls = getattr(importlib.import_module(module), cls_name)
    make = lambda: cls.from_config(config, rngs=nnx.Rngs(seed), dtype=dtype, **options)  # noqa: E731
    return nnx.eval_shape(make) if abstract else make()


def load_pretrained(folder: str, kind: str, *, dtype="float32", **options):
    """The JAX module of ``kind`` with the weights of a diffusers/transformers ``save_pretrained`` folder.

    ``options`` go to ``from_config`` (e.g. ``with_output_head=False`` for X-NeMo's reference UNet)."""
    from flax import nnx  # noqa: PLC0415

    config = read_config(folder)
    state = read_state_dict(folder)
    abstract = build(kind, config, dtype=dtype, abstract=True, **options)
    graphdef, abstract_state = nnx.split(abstract)
    # materialise zeros of the right shapes, then fill (each parameter must come from the checkpoint)
    import jax  # noqa: PLC0415
    concrete = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), nnx.to_pure_dict(abstract_state))
    nnx.replace_by_pure_dict(abstract_state, concrete)
    model = assign(nnx.merge(graphdef, abstract_state), state, folder)
    graphdef, filled = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(jax.numpy.asarray, filled))  # device arrays, not numpy
