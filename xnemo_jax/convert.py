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

The same machinery serves files that are plain ``torch.save`` state dicts (X-NeMo's official ``.pth``
files, :mod:`xnemo_jax.denoiser`): :func:`assign` also fills non-``Param`` variables that are part of a
state dict (``kinds``, e.g. the denoiser's ``pos_encoder.pe`` buffers) and can run non-strict (the
official loader's ``strict=False``); :func:`torch_shapes` lists a model's keys with their PyTorch
shapes (works on an ``nnx.eval_shape`` model) and :func:`to_torch` writes the state dict back
(the exact inverse of :func:`assign`).
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


def _targets(model, kinds=None) -> dict:
    """``{parameter path: (module, attribute, TORCH_LAYOUT permutation or None)}`` for every variable of
    the types ``kinds`` (default: ``nnx.Param``), in ``nnx.iter_graph`` order."""
    from flax import nnx  # noqa: PLC0415

    kinds = tuple(kinds) if kinds else (nnx.Param,)
    targets = {}
    for mpath, module in _modules_with_params(model).items():
        layout = getattr(module, "TORCH_LAYOUT", {}) or {}
        for name, value in vars(module).items():
            if isinstance(value, kinds):
                key = f"{mpath}.{name}" if mpath else name
                targets[key] = (module, name, layout.get(name))
    return targets


def _torch_order(perm: tuple | None, ndim: int) -> tuple | None:
    """The inverse of a TORCH_LAYOUT permutation (JAX array -> torch array), None when not applicable."""
    if perm is None or ndim != len(perm):
        return None
    return tuple(int(i) for i in np.argsort(perm))


def torch_shapes(model, kinds=None) -> dict[str, tuple]:
    """``{key: PyTorch shape}`` of the variables of ``kinds`` (keys are the parameter paths); works on an
    ``nnx.eval_shape`` model, nothing is allocated."""
    out = {}
    for key, (module, name, perm) in _targets(model, kinds).items():
        shape = tuple(getattr(module, name).shape)
        order = _torch_order(perm, len(shape))
        out[key] = shape if order is None else tuple(shape[i] for i in order)
    return out


def to_torch(model, kinds=None) -> dict[str, np.ndarray]:
    """``{key: numpy array in PyTorch layout}`` — the exact inverse of :func:`assign` (bit for bit)."""
    out = {}
    for key, (module, name, perm) in _targets(model, kinds).items():
        value = np.asarray(getattr(module, name)[...])
        order = _torch_order(perm, value.ndim)
        out[key] = value if order is None else np.ascontiguousarray(np.transpose(value, order))
    return out


def assign(model, state: dict[str, np.ndarray], source: str = "checkpoint", *, kinds=None, strict: bool = True,
           report: dict | None = None):
    """Fills ``model``'s variables in place from a torch-named state dict; returns ``model``.

    ``kinds``: the variable types to fill (default ``nnx.Param``). ``strict=False`` ignores keys the
    model lacks and leaves variables the state dict lacks as they are; ``report`` (a dict) then
    receives the sorted ``"unexpected"`` keys and ``"missing"`` parameter paths. Shapes must match
    either way. Variables that are still abstract (``nnx.eval_shape``) get new values.
    """
    rename = getattr(model, "torch_key", None)
    targets = _targets(model, kinds)
    used: dict[str, np.ndarray] = {}
    unexpected = []
    for key, array in state.items():
        new = rename(key) if rename is not None else key
        if new is None:
            continue
        new = _ALIAS.sub(".conv.", "." + new)[1:]  # diffusers registers Down/Upsample convs twice
        if new not in targets:
            if not strict:
                unexpected.append(key)
                continue
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
        value = np.asarray(array, param.dtype)
        current = param.get_value()
        if isinstance(current, np.ndarray):
            param[...] = value
        elif hasattr(current, "devices"):  # a jax array: stays one
            import jax.numpy as jnp  # noqa: PLC0415
            param.set_value(jnp.asarray(value))
        else:  # an abstract ShapeDtypeStruct (nnx.eval_shape): becomes the numpy value
            param.set_value(value)
        used[new] = array
    missing = sorted(set(targets) - set(used))
    if report is not None:
        report.update(missing=missing, unexpected=sorted(unexpected))
    if missing and strict:
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
