"""The X-NeMo bundle: one config and one module holding the five networks the pipeline uses.

``XNemo(config, rngs=...)`` has the attributes

* ``denoiser``: :class:`xnemo_jax.denoiser.Denoiser` (the official ``UNet3DConditionModel``),
* ``reference_net``: the headless SD UNet (:func:`xnemo_jax.denoiser.reference_net`),
* ``motion_encoder``: :class:`xnemo_jax.motion_encoder.MotionEncoder`,
* ``vae``: the SVD VAE (:class:`xnemo_jax.vae.AutoencoderKLTemporalDecoder`),
* ``image_encoder``: CLIP vision with projection (:class:`xnemo_jax.clip.CLIPVisionModelWithProjection`),

and ``XNemoConfig.preset(name)`` builds the configurations: ``official`` (the release: SD-image-variations
UNet, ViT-L/14, the SVD-XT VAE, the FAN_SA motion encoder, 512² images) and ``tiny`` (a 2-level UNet of
widths 32/64 with every module kind, a 3-level VAE, a 2-layer CLIP and the slim motion encoder at 64²
images, for CPU tests and demo training). ``XNemoConfig.to_dict`` / ``from_dict`` round-trip through JSON
(the ``model.json`` of a converted checkpoint). :func:`abstract` builds the bundle under
``nnx.eval_shape`` without allocating (parameter counts, conversion targets, sharding).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

from xnemo_jax import clip, layers, unet, vae
from xnemo_jax import denoiser as denoiser_lib
from xnemo_jax import motion_encoder as motion_lib

# stable-video-diffusion-img2vid-xt/vae/config.json (the fields that shape the network)
SVD_XT_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                  block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                  sample_size=768, scaling_factor=0.18215, force_upcast=True)
# sd-image-variations-diffusers/image_encoder/config.json: CLIP ViT-L/14 with a 768-d projection
VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
               patch_size=14, image_size=224, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)

TINY_UNET = dict(denoiser_lib.TINY_UNET, block_out_channels=[32, 64], layers_per_block=1,
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
# scaling_factor: the tiny VAE is random (nothing to convert; XNemoConfig.vae_init "zero_residual"), its
# posterior means have a std of about 0.31 on the synthetic heads; 3.0 brings the diffusion latents to about
# unit std (0.93), as 0.18215 does for SD's trained VAE (with 0.18215 they would be ~0.06: the denoising
# targets would be nearly pure noise)
TINY_VAE = dict(SVD_XT_VAE, down_block_types=["DownEncoderBlock2D"] * 3, block_out_channels=[32, 64, 64],
                layers_per_block=1, sample_size=64, scaling_factor=3.0)
TINY_CLIP = dict(VIT_L14, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 patch_size=32, projection_dim=64)

PRESETS = ("official", "tiny")
VAE_INITS = ("random", "zero_residual")


@dataclasses.dataclass(frozen=True)
class XNemoConfig:
    """The five networks' configs, the image resolution and the compute dtype of the bundle."""

    denoiser: denoiser_lib.DenoiserConfig
    motion_encoder: motion_lib.MotionEncoderConfig
    vae: vae.TemporalVAEConfig
    image_encoder: clip.CLIPVisionConfig
    resolution: int = 512          # reference / output frames (latents are resolution / vae_scale)
    dtype: str = "float32"         # compute dtype (parameters stay float32)
    remat: bool = False            # gradient checkpointing of the denoiser's and reference net's blocks
    # how a VAE that no checkpoint fills is initialised: "random" (the initialisers' draw) or "zero_residual"
    # (vae.zero_residual_: a near-linear random VAE whose latents keep the image's information; the tiny
    # preset's, which has no trained VAE). Loaded weights (init.sd, a checkpoint) replace either.
    vae_init: str = "random"

    def __post_init__(self):
        u = self.denoiser.unet
        problems = []
        context = set(u.cross_attention_dim) if isinstance(u.cross_attention_dim, (tuple, list)) \
            else {u.cross_attention_dim}
        if context != {self.image_encoder.projection_dim}:
            problems.append(f"CLIP projection_dim {self.image_encoder.projection_dim} != UNet cross_attention_dim "
                            f"{sorted(context)}")
        if self.vae.latent_channels != u.in_channels:
            problems.append(f"VAE latent_channels {self.vae.latent_channels} != UNet in_channels {u.in_channels}")
        if self.resolution % (self.vae_scale * 2 ** (len(u.block_out_channels) - 1)):
            problems.append(f"resolution {self.resolution} is not a multiple of the VAE scale {self.vae_scale} x "
                            f"the UNet's downsampling {2 ** (len(u.block_out_channels) - 1)}")
        if self.vae_init not in VAE_INITS:
            problems.append(f"vae_init {self.vae_init!r} is not one of {VAE_INITS}")
        m = self.denoiser.motion_module
        tokens = (self.motion_encoder.num_tokens, self.motion_encoder.token_dim)
        if self.denoiser.use_motion_module and m.cross_attention_dim != tokens[1]:
            problems.append(f"motion tokens are {tokens[1]}-d but the motion modules read {m.cross_attention_dim}-d")
        layers.as_dtype(self.dtype)
        if problems:
            raise ValueError("inconsistent X-NeMo config: " + "; ".join(problems))

    @property
    def vae_scale(self) -> int:
        """Image pixels per latent pixel (8 for the SVD VAE)."""
        return 2 ** (len(self.vae.block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_scale

    @classmethod
    def preset(cls, name: str, **changes) -> XNemoConfig:
        """``official`` (the release) or ``tiny`` (CPU tests, demo training); ``changes`` replace fields."""
        if name == "official":
            config = cls(denoiser=denoiser_lib.DenoiserConfig.official(),
                         motion_encoder=motion_lib.MotionEncoderConfig(),
                         vae=vae.TemporalVAEConfig.from_dict(SVD_XT_VAE),
                         image_encoder=clip.CLIPVisionConfig.from_dict(VIT_L14), resolution=512)
        elif name == "tiny":
            config = cls(denoiser=denoiser_lib.DenoiserConfig.from_dict(TINY_UNET),
                         motion_encoder=motion_lib.MotionEncoderConfig.tiny(),
                         vae=vae.TemporalVAEConfig.from_dict(TINY_VAE),
                         image_encoder=clip.CLIPVisionConfig.from_dict(TINY_CLIP), resolution=64,
                         vae_init="zero_residual")
        else:
            raise ValueError(f"unknown X-NeMo preset {name!r}; choose one of {PRESETS}")
        return dataclasses.replace(config, **changes) if changes else config

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (tuples become lists); :meth:`from_dict` reads it back."""
        return json_ready(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> XNemoConfig:
        d = dict(config)
        den = dict(d["denoiser"])
        return cls(denoiser=denoiser_lib.DenoiserConfig.from_dict(den.pop("unet"), **den),
                   motion_encoder=motion_lib.MotionEncoderConfig.from_dict(d["motion_encoder"]),
                   vae=vae.TemporalVAEConfig.from_dict(d["vae"]),
                   image_encoder=clip.CLIPVisionConfig.from_dict(d["image_encoder"]),
                   resolution=int(d.get("resolution", 512)), dtype=str(d.get("dtype", "float32")),
                   remat=bool(d.get("remat", False)), vae_init=str(d.get("vae_init", "random")))


def json_ready(value):
    if isinstance(value, Mapping):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


class XNemo(nnx.Module):
    """The five X-NeMo networks (see the module docstring); ``dtype`` overrides ``config.dtype``."""

    NETWORKS = ("denoiser", "reference_net", "motion_encoder", "vae", "image_encoder")

    def __init__(self, config: XNemoConfig, *, rngs, dtype=None):
        dt = layers.as_dtype(dtype or config.dtype)
        self.config = config
        self.denoiser = denoiser_lib.Denoiser(config.denoiser, rngs=rngs, dtype=dt)
        self.reference_net = unet.UNet2DConditionModel(config.denoiser.unet, rngs=rngs, dtype=dt,
                                                       with_output_head=False)
        self.motion_encoder = motion_lib.MotionEncoder(config.motion_encoder, rngs=rngs, dtype=dt)
        self.vae = vae.AutoencoderKLTemporalDecoder(config.vae, rngs=rngs, dtype=dt)
        self.image_encoder = clip.CLIPVisionModelWithProjection(config.image_encoder, rngs=rngs, dtype=dt)
        if config.vae_init == "zero_residual":
            vae.zero_residual_(self.vae)
        if config.remat:  # the UNets hold nearly all training activations (layers.set_remat)
            layers.set_remat(self.denoiser)
            layers.set_remat(self.reference_net)


def abstract(config: XNemoConfig | str = "official", *, dtype=None) -> XNemo:
    """The bundle under ``nnx.eval_shape``: shapes, paths and metadata, nothing allocated."""
    config = XNemoConfig.preset(config) if isinstance(config, str) else config
    return nnx.eval_shape(lambda: XNemo(config, rngs=denoiser_lib.ShapeOnlyRngs(), dtype=dtype))


def parameter_counts(model: XNemo) -> dict[str, int]:
    """Learnable parameters per network (``nnx.Param`` only: BatchNorm statistics and buffers apart)."""
    return {name: sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(getattr(model, name), nnx.Param)))
            for name in XNemo.NETWORKS}
