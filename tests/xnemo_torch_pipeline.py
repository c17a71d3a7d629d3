"""PyTorch test reference of the official X-NeMo sampling loop (``scripts/pose2vid_xnemo.py`` +
``pipeline_pose2vid_motenc_long.py``), for parity tests against the JAX sampler.

Written from the facts in ``/work/shared/reference/xnemo_official.md`` (§1.1-§1.10, §5b); not a copy of the
official code. The networks are the torch references of this folder (:class:`xnemo_torch_denoiser.XNemoUNet`,
:class:`xnemo_torch_motion_encoder.MotEncoder_withExtra`) plus diffusers' SVD VAE and transformers' CLIP
vision tower; everything runs in float32 (the official run is fp16).

* :func:`load_release` — the modules of a release folder, loaded in the official order (SD UNet, then
  ``xnemo_denoising_unet.pth``, then ``xnemo_temporal_module.pth``, all non-strict; the rest strict).
* :func:`context_windows` — the closed-loop ``uniform`` context schedule with X-NeMo's per-step offset.
* :func:`gaussian_blur` — torchvision ``GaussianBlur`` semantics (reflect padding), without torchvision.
* :func:`official_sample` — reference bank (once, t = 0), blurred-and-noised initial latents, DDIM with
  per-window [uncond, cond] denoising, window averaging, then classifier-free guidance.
* :func:`official_decode` — the SVD VAE decode in chunks of consecutive frames.

The noise is injected (torch's RNG draws cannot be reproduced elsewhere, §5b) and so are the per-step
window offsets (the official ones come from Python's unseeded ``random.randint(0, 23)``).
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F  # noqa: N812
from xnemo_torch_denoiser import XNemoUNet
from xnemo_torch_motion_encoder import MotEncoder_withExtra, tiny_kwargs

from xnemo_jax import convert

SCHEDULER_KWARGS = dict(beta_start=0.00085, beta_end=0.02, beta_schedule="scaled_linear", clip_sample=False,
                        steps_offset=1, prediction_type="epsilon")  # inference_xnemo_stage2.yaml (§1.7)


def _load_pth(path: str) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def load_release(folder: str, motion_config) -> dict:
    """``{denoiser, reference, motion_encoder, vae, image_encoder}``: float32 eval-mode torch modules from a
    release folder in the official layout, loaded as the official script does. ``motion_config`` is the
    ``xnemo_jax.motion_encoder.MotionEncoderConfig`` that sizes the motion encoder."""
    import diffusers
    import transformers

    unet_dir = os.path.join(folder, convert.RELEASE_FOLDERS["unet"])
    with open(os.path.join(unet_dir, "config.json")) as f:
        unet_config = json.load(f)
    files = {role: os.path.join(folder, name) for role, name in convert.RELEASE_FILES.items()}

    denoiser = XNemoUNet(unet_config)
    sd_state = diffusers.UNet2DConditionModel.from_pretrained(unet_dir).state_dict()
    denoiser.load_state_dict(sd_state, strict=False)  # SD weights first (from_pretrained_2d)
    del sd_state
    for role in ("denoising", "temporal"):  # then the X-NeMo files; later ones overwrite (pe tables included)
        denoiser.load_state_dict(_load_pth(files[role]), strict=False)

    reference = XNemoUNet(unet_config, reference=True)
    reference.load_state_dict(_load_pth(files["reference"]), strict=True)
    motion_encoder = MotEncoder_withExtra(**tiny_kwargs(motion_config))
    motion_encoder.load_state_dict(_load_pth(files["motion_encoder"]), strict=True)
    vae = diffusers.AutoencoderKLTemporalDecoder.from_pretrained(os.path.join(folder, convert.RELEASE_FOLDERS["vae"]))
    image_encoder = transformers.CLIPVisionModelWithProjection.from_pretrained(
        os.path.join(folder, convert.RELEASE_FOLDERS["image_encoder"]))
    models = dict(denoiser=denoiser, reference=reference, motion_encoder=motion_encoder, vae=vae,
                  image_encoder=image_encoder)
    return {name: m.float().eval().requires_grad_(False) for name, m in models.items()}


def context_windows(num_frames: int, context_frames: int, overlap: int, offset: int) -> list[list[int]]:
    """The frame indices of each window (§1.9): all frames when they fit in one window (no offset), else
    starts 0, stride, 2 * stride, ... below ``num_frames`` (stride = ``context_frames - overlap``), each
    window ``(start + k + offset) mod num_frames`` for k < ``context_frames`` (closed loop)."""
    if num_frames <= context_frames:
        return [list(range(num_frames))]
    stride = context_frames - overlap
    return [[(j + k + offset) % num_frames for k in range(context_frames)] for j in range(0, num_frames, stride)]


def gaussian_blur(x: torch.Tensor, kernel: int = 9, sigma: float = 18.0) -> torch.Tensor:
    """torchvision ``GaussianBlur(kernel, sigma)`` on the last two dims of ``x`` (any leading dims):
    normalised 1-D Gaussian over ``linspace(-(k-1)/2, (k-1)/2, k)``, separable, reflect padding ``k // 2``."""
    half = (kernel - 1) * 0.5
    t = torch.linspace(-half, half, kernel, dtype=torch.float32)
    pdf = torch.exp(-0.5 * (t / sigma) ** 2)
    k1 = (pdf / pdf.sum()).to(x.dtype)
    shape = x.shape
    y = x.reshape(-1, 1, *shape[-2:])
    pad = kernel // 2
    y = F.pad(y, [pad, pad, pad, pad], mode="reflect")
    y = F.conv2d(y, k1.reshape(1, 1, 1, kernel))  # along W
    y = F.conv2d(y, k1.reshape(1, 1, kernel, 1))  # along H
    return y.reshape(shape)


def make_scheduler():
    import diffusers

    return diffusers.DDIMScheduler(**SCHEDULER_KWARGS)


def official_sample(models: dict, *, reference: torch.Tensor, clip_pixels: torch.Tensor, pose: torch.Tensor,
                    driving: torch.Tensor, noise: torch.Tensor, offsets, steps: int, guidance: float,
                    context_frames: int = 24, context_overlap: int = 4,
                    bank_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The official sampling loop; returns the final latents ``(1, 4, N, h, w)``.

    ``reference`` (1, 3, R, R) in [-1, 1] (VAE input); ``clip_pixels`` (1, 3, 224, 224), CLIP-normalised;
    ``pose`` (1, 3, S, S) in [-1, 1], the reference image's pose crop (negative motion code); ``driving``
    (N, 3, S, S) in [-1, 1]; ``noise`` (1, 4, N, h, w); ``offsets`` one window offset per step.
    ``bank_dtype=torch.float16`` mimics the official cast of the reference bank (§5b); default: no cast."""
    denoiser, reference_net = models["denoiser"], models["reference"]
    motion_encoder, vae, image_encoder = models["motion_encoder"], models["vae"], models["image_encoder"]
    num_frames = driving.shape[0]
    offsets = list(offsets)
    if len(offsets) != steps:
        raise ValueError(f"{len(offsets)} offsets for {steps} steps")
    if noise.shape[2] != num_frames:
        raise ValueError(f"noise has {noise.shape[2]} frames, driving {num_frames}")
    with torch.no_grad():
        ref_latent = vae.encode(reference).latent_dist.mean * vae.config.scaling_factor  # (1, 4, h, w)
        cond_ctx = image_encoder(clip_pixels).image_embeds.unsqueeze(1)  # (1, 1, D)
        context = torch.cat([torch.zeros_like(cond_ctx), cond_ctx])  # [uncond, cond]

        bank: dict[str, torch.Tensor] = {}  # reference net once, t = 0, batch 2, one frame; output discarded
        reference_net(ref_latent.unsqueeze(2).repeat(2, 1, 1, 1, 1), torch.tensor(0), context, collect=bank)
        if bank_dtype is not None:
            bank = {k: v.to(bank_dtype) for k, v in bank.items()}

        scheduler = make_scheduler()
        scheduler.set_timesteps(steps)
        timesteps = scheduler.timesteps
        init = gaussian_blur(ref_latent.unsqueeze(2).repeat(1, 1, num_frames, 1, 1))
        latents = scheduler.add_noise(init, noise, timesteps[:1])

        f_rts = torch.tensor([[0.0, 0.0, 1.0]])
        uc_mask = torch.tensor([True, False])
        for i, t in enumerate(timesteps):
            noise_pred = torch.zeros((2, *latents.shape[1:]), dtype=latents.dtype)
            counter = torch.zeros(num_frames, dtype=latents.dtype)
            for window in context_windows(num_frames, context_frames, context_overlap, offsets[i]):
                n = len(window)
                x = scheduler.scale_model_input(latents[:, :, window].repeat(2, 1, 1, 1, 1), t)
                # motion codes recomputed for every window and step, as the official code does
                cond_motion = motion_encoder(driving[window], f_rts.repeat(n, 1)).unsqueeze(0)  # (1, F, 32, 16)
                neg_motion = motion_encoder(pose, f_rts).unsqueeze(1).repeat(1, n, 1, 1)  # (1, F, 32, 16)
                motion = torch.cat([neg_motion, cond_motion])
                eps = denoiser(x, t, context, motion, bank=bank, uc_mask=uc_mask)
                noise_pred[:, :, window] += eps
                counter[window] += 1
            mean = noise_pred / counter.reshape(1, 1, -1, 1, 1)
            eps_u, eps_c = mean.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
            latents = scheduler.step(eps, t, latents, eta=0.0).prev_sample
    return latents


def official_decode(vae, latents: torch.Tensor, chunk: int = 25) -> torch.Tensor:
    """Latents ``(b, 4, N, h, w)`` -> frames ``((b N), 3, R, R)`` in [0, 1]: ``latents / scaling_factor``
    decoded per chunk of ``chunk`` consecutive frames (``num_frames`` = the chunk's length)."""
    with torch.no_grad():
        z = latents / vae.config.scaling_factor
        b, c, f, h, w = z.shape
        z = z.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)  # b c f h w -> (b f) c h w
        frames = [vae.decode(z[s:s + chunk], num_frames=z[s:s + chunk].shape[0]).sample
                  for s in range(0, z.shape[0], chunk)]
        return (torch.cat(frames) / 2 + 0.5).clamp(0, 1)
