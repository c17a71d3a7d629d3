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

import functools
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
    from xnemo_jax.layers import ShapeOnlyRngs  # noqa: PLC0415

    make = lambda rngs: cls.from_config(config, rngs=rngs, dtype=dtype, **options)  # noqa: E731
    return nnx.eval_shape(lambda: make(ShapeOnlyRngs())) if abstract else make(nnx.Rngs(seed))


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
    return to_device(assign(nnx.merge(graphdef, abstract_state), state, folder))  # device arrays, not numpy


def to_device(model, *, partial: bool = False):
    """Turns every variable of ``model`` that holds a numpy array (filled by :func:`assign`) into a jax
    array, in place; returns ``model``. A variable still abstract (never filled) is an error unless
    ``partial``."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Variable):
            value = node.get_value()
            if isinstance(value, np.ndarray):
                node.set_value(jnp.asarray(value))
            elif isinstance(value, jax.ShapeDtypeStruct) and not partial:
                raise ConversionError(f"{'.'.join(map(str, path))} was never filled from a checkpoint")
    return model


# ------------------------------------------------------------------------------------- X-NeMo release
SD_FOLDER = "sd-image-variations-diffusers"
SVD_FOLDER = "stable-video-diffusion-img2vid-xt"
RELEASE_FILES = {  # role -> file name in the release folder (xnemo_official.md §3.2)
    "denoising": "xnemo_denoising_unet.pth",
    "temporal": "xnemo_temporal_module.pth",
    "reference": "xnemo_reference_unet.pth",
    "motion_encoder": "xnemo_motion_encoder.pth",
}
RELEASE_FOLDERS = {"unet": f"{SD_FOLDER}/unet", "image_encoder": f"{SD_FOLDER}/image_encoder",
                   "vae": f"{SVD_FOLDER}/vae"}


def release_paths(folder: str) -> dict[str, str]:
    """``{role: path}`` of the X-NeMo release folder's parts (the four ``.pth`` files of
    :data:`RELEASE_FILES` and the three diffusers/transformers folders of :data:`RELEASE_FOLDERS`);
    raises :class:`ConversionError` listing everything that is not there."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ConversionError(f"{folder}: no such folder (expected the X-NeMo release layout)")
    paths = {role: os.path.join(folder, name) for role, name in {**RELEASE_FOLDERS, **RELEASE_FILES}.items()}
    absent = [os.path.relpath(p, folder) for role, p in paths.items()
              if not (os.path.isdir(p) if role in RELEASE_FOLDERS else os.path.isfile(p))]
    if absent:
        raise ConversionError(f"{folder}: not the X-NeMo release layout, missing {', '.join(absent)} (download the "
                              "official checkpoints and the two diffusers repositories into this folder)")
    return paths


def read_torch_file(path: str, dtypes: dict | None = None, ignore=()) -> dict[str, np.ndarray]:
    """A ``torch.save`` state dict (optionally under ``"state_dict"``) read with torch's weights-only (safe)
    unpickler, as numpy arrays (``dtypes``, ``ignore``: see :func:`liax_jax.convert.read_state_dict`)."""
    from liax_jax import convert as liax_convert  # noqa: PLC0415

    try:
        return liax_convert.read_state_dict(path, wrappers=("state_dict",), ignore=ignore, dtypes=dtypes)
    except liax_convert.ConversionError as e:
        raise ConversionError(str(e)) from e


@functools.lru_cache(maxsize=8)
def _motion_encoder_shapes(config) -> dict[str, tuple]:
    from xnemo_jax import motion_encoder as motion_lib  # noqa: PLC0415

    return motion_lib.official_keys(motion_lib.build(config, abstract=True))


def release_config(folder: str, *, motion_encoder=None, dtype: str = "float32", motion_state: dict | None = None):
    """The :class:`xnemo_jax.model.XNemoConfig` of a release folder: the UNet, CLIP and VAE configs from
    their ``config.json`` files, the official motion/temporal module settings, the resolution from the
    UNet's ``sample_size`` x the VAE scale, and the motion encoder's config (not in the release: given,
    or the preset whose key shapes match ``motion_state``, official first)."""
    from xnemo_jax import clip, vae  # noqa: PLC0415
    from xnemo_jax import denoiser as denoiser_lib  # noqa: PLC0415
    from xnemo_jax import model as model_lib  # noqa: PLC0415
    from xnemo_jax import motion_encoder as motion_lib  # noqa: PLC0415

    paths = release_paths(folder)
    unet_config, vae_config = read_config(paths["unet"]), read_config(paths["vae"])
    if vae_config.get("_class_name", "AutoencoderKLTemporalDecoder") != "AutoencoderKLTemporalDecoder":
        raise ConversionError(f"{paths['vae']}: holds a {vae_config['_class_name']}, X-NeMo uses the SVD "
                              "AutoencoderKLTemporalDecoder (stable-video-diffusion-img2vid-xt/vae)")
    if motion_encoder is None:
        candidates = {"official": motion_lib.MotionEncoderConfig(), "tiny": motion_lib.MotionEncoderConfig.tiny()}
        if motion_state is None:
            motion_encoder = candidates["official"]
        else:
            shapes = {k: tuple(np.shape(v)) for k, v in motion_state.items()}
            for candidate in candidates.values():
                if _motion_encoder_shapes(candidate) == shapes:
                    motion_encoder = candidate
                    break
            else:
                raise ConversionError(f"{paths['motion_encoder']}: its keys and shapes match no known motion "
                                      f"encoder configuration ({', '.join(candidates)}); pass "
                                      "motion_encoder=MotionEncoderConfig(...)")
    vae_cfg = vae.TemporalVAEConfig.from_dict(vae_config)
    scale = 2 ** (len(vae_cfg.block_out_channels) - 1)
    try:
        return model_lib.XNemoConfig(
            denoiser=denoiser_lib.DenoiserConfig.from_dict(unet_config), motion_encoder=motion_encoder, vae=vae_cfg,
            image_encoder=clip.CLIPVisionConfig.from_dict(read_config(paths["image_encoder"])),
            resolution=int(unet_config.get("sample_size", 64)) * scale, dtype=dtype)
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{folder}: the release's configs do not make an X-NeMo model: {e}") from e


def _load_denoiser(denoiser, sources) -> None:
    """The official denoiser loading: ``sources`` = ``[(path, read_state)]`` applied in order, each
    non-strict (later files overwrite), then every variable must have come from one of them."""
    from xnemo_jax import denoiser as denoiser_lib  # noqa: PLC0415

    missing = None
    for path, read in sources:
        report: dict = {}
        denoiser_lib.from_official(denoiser, read(), strict=False, source=path, report=report)
        if report["unexpected"]:
            keys = report["unexpected"]
            raise ConversionError(f"{path}: unexpected key {keys[0]!r}" + (f" (+{len(keys) - 1} more)" if len(keys) > 1
                                                                           else "") + " (no such denoiser parameter)")
        missing = set(report["missing"]) if missing is None else missing & set(report["missing"])
    if missing:
        temporal = sorted(k for k in missing if ".temporal_modules." in k)
        path = sources[-1][0] if temporal else sources[-2][0]
        keys = temporal or sorted(missing)
        raise ConversionError(f"{path}: {len(keys)} denoiser keys missing, e.g. {keys[0]!r} (a truncated or "
                              "different checkpoint)")


def load_official(folder: str, *, dtype: str = "float32", motion_encoder=None, dtypes: dict | None = None):
    """The :class:`xnemo_jax.model.XNemo` bundle of the official release folder (torch needed to read it).

    Layout (:func:`release_paths`): ``sd-image-variations-diffusers/{unet,image_encoder}/``,
    ``stable-video-diffusion-img2vid-xt/vae/`` and the four ``.pth`` files of :data:`RELEASE_FILES`.
    The config comes from the folders' ``config.json`` files (:func:`release_config`; ``dtype`` is the
    compute dtype, parameters stay float32). Loading follows the official code (xnemo_official.md §1.1,
    §5b): the denoiser gets the SD UNet's weights, then ``xnemo_denoising_unet.pth``, then
    ``xnemo_temporal_module.pth`` (each non-strict: later files overwrite; the 42 ``pos_encoder.pe``
    tables come from the temporal file), the reference net and the motion encoder are loaded strict,
    the SVD VAE and CLIP strict from their folders. Stricter than the official loader: any key a file
    has that the network lacks, a shape mismatch, or a denoiser variable no file provides raises
    :class:`ConversionError` naming the file and the key. ``.pth`` files go through torch's weights-only
    unpickler (no code runs). ``dtypes`` (a dict) receives ``{file role: {key: stored dtype}}`` for the
    four ``.pth`` files (what a writer of :func:`to_release`'s states needs to write them back bit for bit).
    """
    from xnemo_jax import denoiser as denoiser_lib  # noqa: PLC0415
    from xnemo_jax import model as model_lib  # noqa: PLC0415
    from xnemo_jax import motion_encoder as motion_lib  # noqa: PLC0415

    paths = release_paths(folder)
    stored = {role: {} for role in RELEASE_FILES}
    motion_state = read_torch_file(paths["motion_encoder"], stored["motion_encoder"])
    config = release_config(folder, motion_encoder=motion_encoder, dtype=dtype, motion_state=motion_state)
    bundle = model_lib.abstract(config)
    motion_lib.from_official(bundle.motion_encoder, motion_state, paths["motion_encoder"])
    del motion_state
    denoiser_lib.from_official(bundle.reference_net, read_torch_file(paths["reference"], stored["reference"]),
                               source=paths["reference"])
    _load_denoiser(bundle.denoiser, [
        (paths["unet"], lambda: read_state_dict(paths["unet"])),
        (paths["denoising"], lambda: read_torch_file(paths["denoising"], stored["denoising"])),
        (paths["temporal"], lambda: read_torch_file(paths["temporal"], stored["temporal"]))])
    for role in ("vae", "image_encoder"):
        assign(getattr(bundle, role), read_state_dict(paths[role]), paths[role])
    if dtypes is not None:
        dtypes.update(stored)
    return to_device(bundle)


def to_release(bundle) -> dict[str, dict[str, np.ndarray]]:
    """``{role: state dict}`` of the four official ``.pth`` files (:data:`RELEASE_FILES`) for an X-NeMo
    bundle, the inverse of :func:`load_official`: ``denoising`` = the denoiser's SD and ``motion_modules``
    keys, ``temporal`` = its ``temporal_modules`` keys with the ``pe`` tables, ``reference`` the reference
    net's 682 and ``motion_encoder`` the motion encoder's 407 keys, as float32 (int64 step counters).
    Casting back to a file's stored dtypes (``load_official``'s ``dtypes``) is the writer's job:
    ``launch/convert.py xnemo --to-torch``."""
    from xnemo_jax import denoiser as denoiser_lib  # noqa: PLC0415
    from xnemo_jax import motion_encoder as motion_lib  # noqa: PLC0415

    den = denoiser_lib.to_official(bundle.denoiser)
    return {"denoising": {k: v for k, v in den.items() if ".temporal_modules." not in k},
            "temporal": {k: v for k, v in den.items() if ".temporal_modules." in k},
            "reference": denoiser_lib.to_official(bundle.reference_net),
            "motion_encoder": motion_lib.to_official(bundle.motion_encoder)}


# ------------------------------------------------------------------------------ AnimateDiff v2 modules
def animatediff_key(key: str) -> str | None:
    """An ``mm_sd_v15_v2.ckpt`` key as the denoiser's key: AnimateDiff's ``<block>.motion_modules.<i>.*``
    are X-NeMo's ``temporal_modules`` (X-NeMo's ``motion_modules`` are its motion cross-attention);
    ``pos_encoder.pe`` tables are dropped (``None``: the denoiser's own sinusoidal tables are the same
    rows, and newer AnimateDiff code does not store them)."""
    if ".pos_encoder." in key:
        return None
    return key.replace(".motion_modules.", ".temporal_modules.")


def load_animatediff(denoiser, state_or_path, *, source: str = "AnimateDiff checkpoint"):
    """Fills the denoiser's 21 temporal modules from an AnimateDiff v2 motion-module checkpoint (a path
    to ``mm_sd_v15_v2.ckpt``, a plain state dict or ``{"state_dict": ...}``, an ``animatediff_config``
    entry ignored; or a mapping of arrays), in place; returns the denoiser. Every temporal-module
    parameter must be in the file and every file key must be one (shapes checked), or
    :class:`ConversionError` names the key. The rest of the denoiser is left as it is (a training
    initialisation on top of the SD weights)."""
    from flax import nnx  # noqa: PLC0415

    if isinstance(state_or_path, (str, os.PathLike)):
        source = os.fspath(state_or_path)
        state = read_torch_file(source, ignore=("animatediff_config",))
    else:
        state = {k: (v.detach().cpu().float().numpy() if hasattr(v, "detach") else np.asarray(v))
                 for k, v in state_or_path.items()}
    renamed = {}
    for key, value in state.items():
        new = animatediff_key(key)
        if new is None:
            continue
        if ".temporal_modules." not in new:
            raise ConversionError(f"{source}: unexpected key {key!r} (not an AnimateDiff motion-module weight)")
        renamed[new] = value
    report: dict = {}
    assign(denoiser, renamed, source, kinds=(nnx.Param,), strict=False, report=report)
    if report["unexpected"]:
        raise ConversionError(f"{source}: unexpected key {report['unexpected'][0]!r} (no such temporal module "
                              "parameter in this denoiser)")
    missing = [k for k in report["missing"] if ".temporal_modules." in k]
    if missing:
        raise ConversionError(f"{source}: {len(missing)} temporal-module weights missing, e.g. "
                              f"{missing[0].replace('.temporal_modules.', '.motion_modules.')!r}")
    return to_device(denoiser, partial=True)
