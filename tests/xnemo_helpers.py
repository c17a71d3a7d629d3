"""Random official-layout state dicts for the X-NeMo networks (tests only).

Filled straight from numpy for every ``{key: torch shape}`` of ``official_keys`` (no per-shape random
programs, no slow module init): weights scaled by 1/sqrt(fan-in), 1-D tensors around 1 (``weight``) or 0,
positive ``running_var``, int64 ``num_batches_tracked``, and the sinusoidal ``pe`` tables plus
``pe_noise`` (so a test can tell a file's tables from the constructor's).
"""

from __future__ import annotations

import numpy as np


def random_official_state(shapes: dict[str, tuple], seed: int, *, pe_noise: float = 0.0) -> dict[str, np.ndarray]:
    from xnemo_jax.denoiser import sinusoidal_table

    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            value = np.asarray(rng.integers(0, 1000), np.int64)
        elif key.endswith("running_var"):
            value = 0.5 + rng.random(shape)
        elif key.endswith(".pe") and len(shape) == 3 and shape[0] == 1:
            value = sinusoidal_table(shape[1], shape[2]) + pe_noise * rng.standard_normal(shape)
        elif len(shape) <= 1:
            value = float(key.endswith("weight")) + 0.1 * rng.standard_normal(shape)
        else:
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        state[key] = np.asarray(value, np.int64 if key.endswith("num_batches_tracked") else np.float32)
    return state


def split_temporal(state: dict) -> tuple[dict, dict]:
    """A denoiser state dict -> (``xnemo_denoising_unet.pth`` part, ``xnemo_temporal_module.pth`` part)."""
    temporal = {k: v for k, v in state.items() if ".temporal_modules." in k}
    return {k: v for k, v in state.items() if k not in temporal}, temporal


def save_pth(path: str, state: dict) -> None:
    import torch

    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, path)


TINY_UNET_SAMPLE_SIZE = 16  # 16 latent pixels x VAE scale 4 = the tiny bundle's 64² images
VAE_FIELDS = ("in_channels", "out_channels", "down_block_types", "block_out_channels", "layers_per_block",
              "latent_channels", "sample_size", "scaling_factor", "force_upcast")


def write_tiny_release(folder: str) -> tuple[dict, dict]:
    """A fake X-NeMo release of the tiny bundle in the official layout under ``folder``:
    ``sd-image-variations-diffusers/{unet,image_encoder}`` and ``stable-video-diffusion-img2vid-xt/vae``
    written by diffusers / transformers ``save_pretrained`` (random torch modules, seed 0), and the four
    ``.pth`` files written by ``torch.save`` from random official-layout state dicts (the reference net's
    in float16). Returns ``(files {role: state dict}, the SD UNet's torch state dict)``."""
    import os

    import diffusers
    import torch
    import transformers

    from xnemo_jax import convert
    from xnemo_jax import denoiser as D
    from xnemo_jax import model as M
    from xnemo_jax import motion_encoder as ME

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**dict(M.TINY_UNET, sample_size=TINY_UNET_SAMPLE_SIZE))
    unet.save_pretrained(os.path.join(folder, convert.RELEASE_FOLDERS["unet"]))
    clip = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**M.TINY_CLIP))
    clip.save_pretrained(os.path.join(folder, convert.RELEASE_FOLDERS["image_encoder"]))
    vae = diffusers.AutoencoderKLTemporalDecoder(**{k: M.TINY_VAE[k] for k in VAE_FIELDS})
    vae.save_pretrained(os.path.join(folder, convert.RELEASE_FOLDERS["vae"]))

    bundle = M.abstract(M.XNemoConfig.preset("tiny"))
    denoising, temporal = split_temporal(random_official_state(D.official_keys(bundle.denoiser), 1, pe_noise=0.01))
    files = {"denoising": denoising, "temporal": temporal,
             "reference": {k: v.astype(np.float16) for k, v in
                           random_official_state(D.official_keys(bundle.reference_net), 2).items()},
             "motion_encoder": random_official_state(ME.official_keys(bundle.motion_encoder), 3)}
    for role, state in files.items():
        save_pth(os.path.join(folder, convert.RELEASE_FILES[role]), state)
    return files, unet.state_dict()
