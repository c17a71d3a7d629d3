"""X-NeMo's dual GAN head: f_app (ResNet-50) + f_mot -> StyleGAN2 synthesis -> RGB, with its discriminator and losses.

X-NeMo GAN head
---------------
The paper (§3.2 "Dual-Head Latent Supervision", App. A "GAN Head Training Losses" and "Encoder
Architecture") co-trains, with the diffusion motion control, an image-space head that reconstructs the
driving frame I_D from an appearance code of the reference I_R and the 1-D motion code f_mot of the
(augmented) driving crop, so that image losses (L1, VGG, VGGFace, adversarial, feature matching) shape
the motion latent. The head is training-only and is not part of the official release; this module is our
design from that description, in the conventions of ``../shared/DESIGN.md``:

* **Appearance encoder** ``appearance_encoder``: a ResNet-50 (``perception.resnet``, preset
  ``config.appearance``; trainable, BatchNorm included) on the reference resized to ``resolution``
  (antialiased) and ImageNet-normalised; its pooled features (2048) go through ``app_proj`` (EqualLinear)
  to ``f_app`` (``app_dim`` = 512). The paper only says "implemented as a ResNet50".
* **Mapping** ``mapping``: ``concat[pixel_norm(f_app), pixel_norm(f_mot)]`` -> ``mlp_layers`` EqualLinear
  layers with fused leaky ReLU (StyleGAN's mapping network) -> the style ``w`` (``style_dim``). Each code
  is pixel-normalised on its own so that neither dominates the style by scale; there is no noise input
  and no per-layer lr multiplier (4 layers, not StyleGAN's 8 with lr_mul 0.01). The first layer's f_mot
  rows start at zero (``motion_zero_init``, default on): the code enters the style only as the head learns
  what to take from it. With them drawn like the rest, an untrained head treats the motion code as noise
  and its gradient drives the motion encoder to a constant output. We measured this in the tiny Quickstart:
  the ReLU after the encoder's 1-channel ``conv6`` went from 100 % to 0 % active by step 240, so the eval
  motion codes were identical across examples (spread 6e-8) and shuffling them changed nothing. With zero
  rows the code stays alive (``motion_spread`` 2.4 at step 240).
* **Synthesis** ``synthesis``: StyleGAN2 (Karras et al. 2020, rosinality's layout): a learned constant
  4x4 input, ``conv1`` StyledConv + ``to_rgb1``, then per doubling up to ``resolution`` two StyledConvs
  (the first upsampling: transposed conv + blur) and a :class:`ToRGB` (modulated 1x1, no demodulation,
  bias, plus the FIR-upsampled previous RGB: skip architecture). One ``w`` modulates every layer. Noise
  injection is left out (deterministic reconstruction). No output tanh (StyleGAN2 outputs the skip sum).
  Widths are StyleGAN2's ``{4..32: 512, 64: 256 cm, 128: 128 cm, 256: 64 cm}`` with ``cm`` =
  ``channel_multiplier`` (2 = StyleGAN2 config-f, the default) times ``channel_scale`` (tiny models).
* **Discriminator**: :class:`liax_jax.discriminator.Discriminator` (StyleGAN2, minibatch stddev) at
  ``resolution``; ``return_features=True`` gives its feature maps for the feature-matching loss
  (Burkov et al. 2020).
* **Losses** (paper eq. 3-7): :func:`generator_losses` = ``L_adv + 1.0 L1 + 3e-2 L_VGG19 + 6e-3
  L_VGGFace + 10 L_FM`` (:data:`GAN_LOSS_WEIGHTS`): non-saturating softplus adversarial loss; mean
  absolute pixel error; VGG19 = sum over relu1_1..relu5_1 of the mean L1 of activations (single scale,
  layer weight 1: :func:`liax_jax.losses.perceptual_loss` with ``scales=(1,)``); VGGFace = mean over the
  face network's feature maps (``perception.resnet`` VGGFace2 ResNet: stem, layer1..layer4) of their mean
  L1, on :func:`perception.resnet.preprocess_vggface2` inputs; FM = mean over the discriminator's feature
  maps of the mean L1 between fake and (stop-gradient) real features. Targets never receive gradients.
  :func:`discriminator_losses` is the logistic loss ``softplus(-D(real)) + softplus(D(fake))`` (the caller
  detaches the fake). R1 is left to the training step (as in ``liax_jax.training``).

Training use (the lead's step): ``fake = head.generator(I_R, f_mot, train=True)`` with ``f_mot`` the motion
encoder's code of the augmented driving crop (flattened ``(B, 512)``); ``target = resize_images(I_D,
resolution)``; ``disc_fake = head.discriminator(fake, return_features=True)``; ``_, real_feats =
head.discriminator(target, return_features=True)``; then :func:`generator_losses`. With ``train=True`` the
appearance ResNet's BatchNorm uses batch statistics and updates its running statistics in place
(``nnx.BatchStat``): split them out and return them from the step.

Public API: :class:`GanHeadConfig` (``preset("official" | "tiny")``), :class:`GanGenerator`,
:class:`GanHead`, :data:`GAN_LOSS_WEIGHTS`, :func:`generator_losses`, :func:`discriminator_losses`,
:func:`vgg19_loss`, :func:`vggface_loss`, :func:`feature_matching_loss`, :func:`resize_images`,
:func:`count_params`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from liax_jax import losses
from liax_jax.discriminator import _BASE_CHANNELS, Discriminator, DiscriminatorConfig
from liax_jax.ops import EqualLinear, ModelConfig, ModulatedConv2d, StyledConv, _Base, upsample2x
from perception import resnet


# --------------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class GanHeadConfig(ModelConfig):
    """The GAN head: appearance encoder, mapping, StyleGAN2 synthesis and discriminator (module doc)."""

    resolution: int = 256          # output RGB size (and the discriminator's input size)
    appearance: str = "resnet50"   # perception.resnet.ResNetConfig preset of the appearance encoder f_app
    app_dim: int = 512             # f_app = EqualLinear(pooled ResNet features) -> app_dim
    motion_dim: int = 512          # f_mot (the motion encoder's 1-D code, flattened tokens)
    style_dim: int = 512
    mlp_layers: int = 4            # mapping: concat[f_app, f_mot] -> w
    # the mapping's first layer starts with zero weights on f_mot (the motion code enters the head gradually;
    # see MappingNetwork): False draws them like the rest
    motion_zero_init: bool = True
    channel_multiplier: int = 2    # StyleGAN2 widths {4..32: 512, 64: 256 cm, 128: 128 cm, 256: 64 cm, ...}
    channel_scale: float = 1.0     # every synthesis width times this (tiny models)
    # DiscriminatorConfig, or a mapping of its fields (``resolution``/``dtype`` filled in); None: StyleGAN2's
    # discriminator with this config's channel_multiplier and channel_scale.
    discriminator: DiscriminatorConfig | Mapping | None = None
    dtype: str = "float32"         # compute dtype; params are float32 (float64 when dtype is float64)

    def __post_init__(self):
        self.check_dtype()
        r = self.resolution
        if r not in _BASE_CHANNELS or r < 8:
            raise ValueError(f"GanHeadConfig: resolution must be a power of two in [8, 1024], got {r}")
        for name in ("app_dim", "motion_dim", "style_dim", "mlp_layers", "channel_multiplier"):
            if getattr(self, name) < 1:
                raise ValueError(f"GanHeadConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.channel_scale <= 0:
            raise ValueError(f"GanHeadConfig: channel_scale must be > 0, got {self.channel_scale}")
        d = self.discriminator
        if d is None:
            d = DiscriminatorConfig(r, channel_multiplier=self.channel_multiplier, scale=self.channel_scale,
                                    dtype=self.dtype)
        elif not isinstance(d, DiscriminatorConfig):
            d = DiscriminatorConfig(**{"resolution": r, "dtype": self.dtype, **dict(d)})
        if d.resolution != r:
            raise ValueError(f"GanHeadConfig: the discriminator's resolution {d.resolution} differs from "
                             f"the head's {r}")
        object.__setattr__(self, "discriminator", d)

    def channels(self, res: int) -> int:
        """Synthesis width at spatial size ``res``."""
        base = _BASE_CHANNELS[res] * (self.channel_multiplier if res >= 64 else 1)
        return max(1, int(round(base * self.channel_scale)))

    @property
    def log_size(self) -> int:
        return int(math.log2(self.resolution))

    def appearance_config(self) -> resnet.ResNetConfig:
        return resnet.ResNetConfig.preset(self.appearance, num_classes=0, dtype=self.dtype)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["discriminator"] = dataclasses.asdict(self.discriminator)
        return d

    @classmethod
    def preset(cls, name: str, **overrides) -> GanHeadConfig:
        """``official``: 256², ResNet-50 f_app, StyleGAN2 config-f widths (cm 2) for the synthesis and the
        discriminator. ``tiny``: 32², the tiny ResNet, 16 channels everywhere, 32-d f_app/style, 2 mapping
        layers (CPU tests; f_mot stays 512, the tiny motion encoder's size)."""
        presets = {
            "official": dict(),
            "tiny": dict(resolution=32, appearance="tiny", app_dim=32, style_dim=32, mlp_layers=2,
                         channel_scale=1 / 32),
        }
        if name not in presets:
            raise ValueError(f"GanHeadConfig.preset: unknown preset {name!r} (known: {sorted(presets)})")
        return cls(**{**presets[name], **overrides})


# -------------------------------------------------------------------------------------------- helpers
def resize_images(x: jax.Array, size: int) -> jax.Array:
    """NHWC images to ``size`` x ``size`` (bilinear, antialiased when shrinking); unchanged if already so."""
    if x.ndim != 4:
        raise ValueError(f"expected NHWC images, got shape {tuple(x.shape)}")
    if x.shape[1:3] == (size, size):
        return x
    return jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "linear", antialias=True)


def pixel_norm(x: jax.Array, eps: float = 1e-8) -> jax.Array:
    """StyleGAN's PixelNorm over the last axis: ``x / sqrt(mean(x^2) + eps)``."""
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return (xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)).astype(x.dtype)


def count_params(model: nnx.Module) -> int:
    """Learnable parameters (``nnx.Param``; BatchNorm statistics excluded); works on abstract models."""
    return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


# ------------------------------------------------------------------------------------------- modules
class ToRGB(_Base):
    """StyleGAN2 ToRGB: modulated 1x1 conv (no demodulation) + bias, + the FIR-upsampled previous RGB."""

    def __init__(self, cin: int, style_dim: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.conv = ModulatedConv2d(cin, 3, 1, style_dim, demodulate=False, rngs=rngs, param_dtype=param_dtype)
        self.bias = nnx.Param(jnp.zeros((3,), param_dtype))

    def __call__(self, x, latent, skip=None):
        y = self.conv(x, latent) + self.bias[...].astype(x.dtype)
        return y + upsample2x(skip) if skip is not None else y


class MappingNetwork(_Base):
    """``concat[pixel_norm(f_app), pixel_norm(f_mot)]`` -> ``layers`` EqualLinear + fused leaky ReLU -> w."""

    def __init__(self, c: GanHeadConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        dims = [c.app_dim + c.motion_dim] + [c.style_dim] * c.mlp_layers
        self.layers = nnx.List([EqualLinear(a, b, activate=True, rngs=rngs, param_dtype=param_dtype)
                                for a, b in zip(dims[:-1], dims[1:], strict=True)])
        if c.motion_zero_init:
            first = self.layers[0].weight
            first.set_value(first.get_value().at[c.app_dim:].set(0.0))

    def __call__(self, f_app, f_mot):
        h = jnp.concatenate([pixel_norm(f_app), pixel_norm(f_mot)], axis=-1)
        for layer in self.layers:
            h = layer(h)
        return h


class Synthesis(_Base):
    """StyleGAN2 skip generator: const 4x4 -> conv1/to_rgb1 -> (StyledConv up, StyledConv, ToRGB) per level."""

    def __init__(self, c: GanHeadConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        s, c4 = c.style_dim, c.channels(4)
        self.input = nnx.Param(jax.random.normal(rngs.params(), (1, 4, 4, c4), param_dtype))
        self.conv1 = StyledConv(c4, c4, 3, s, **kw)
        self.to_rgb1 = ToRGB(c4, s, **kw)
        convs, to_rgbs, cin = [], [], c4
        for i in range(3, c.log_size + 1):
            ch = c.channels(2 ** i)
            convs += [StyledConv(cin, ch, 3, s, upsample=True, **kw), StyledConv(ch, ch, 3, s, **kw)]
            to_rgbs.append(ToRGB(ch, s, **kw))
            cin = ch
        self.convs = nnx.List(convs)
        self.to_rgbs = nnx.List(to_rgbs)

    def __call__(self, w, dtype):
        w = w.astype(dtype)
        h = jnp.broadcast_to(self.input[...].astype(dtype), (w.shape[0],) + self.input.shape[1:])
        h = self.conv1(h, w)
        skip = self.to_rgb1(h, w)
        for k, to_rgb in enumerate(self.to_rgbs):
            h = self.convs[2 * k](h, w)
            h = self.convs[2 * k + 1](h, w)
            skip = to_rgb(h, w, skip)
        return skip


class GanGenerator(nnx.Module):
    """``(reference I_R, f_mot) -> RGB`` reconstruction of the driving frame (module doc)."""

    def __init__(self, config: GanHeadConfig | Mapping, *, rngs: nnx.Rngs):
        self.config = c = GanHeadConfig.from_config(config)
        pd = c.param_dtype
        app = c.appearance_config()
        self.appearance_encoder = resnet.ResNet(app, rngs=rngs)
        self.app_proj = EqualLinear(app.feature_dim, c.app_dim, rngs=rngs, param_dtype=pd)
        self.mapping = MappingNetwork(c, rngs=rngs, param_dtype=pd)
        self.synthesis = Synthesis(c, rngs=rngs, param_dtype=pd)

    @property
    def dtype(self):
        return self.config.compute_dtype

    def appearance(self, reference: jax.Array, *, train: bool = False) -> jax.Array:
        """f_app (B, app_dim) of references (B, H, W, 3) in [-1, 1] (resized to ``resolution`` first)."""
        x = resize_images(reference.astype(jnp.float32), self.config.resolution)
        pooled = self.appearance_encoder(resnet.preprocess_imagenet(x).astype(self.dtype), train=train)
        return self.app_proj(pooled.astype(self.dtype))

    def style(self, f_app: jax.Array, f_mot: jax.Array) -> jax.Array:
        """The style w (B, style_dim) from f_app (B, app_dim) and f_mot (B, motion_dim) or (B, T, D)."""
        f_mot = f_mot.reshape(f_mot.shape[0], -1) if f_mot.ndim == 3 else f_mot
        if f_mot.ndim != 2 or f_mot.shape[-1] != self.config.motion_dim:
            raise ValueError(f"GanGenerator: f_mot must be (B, {self.config.motion_dim}) (or tokens that "
                             f"flatten to it), got {tuple(f_mot.shape)}")
        if f_mot.shape[0] != f_app.shape[0]:
            raise ValueError(f"GanGenerator: batch of f_mot {f_mot.shape[0]} != batch of the reference "
                             f"{f_app.shape[0]}")
        return self.mapping(f_app.astype(self.dtype), f_mot.astype(self.dtype))

    def __call__(self, reference: jax.Array, f_mot: jax.Array, *, train: bool = False) -> jax.Array:
        """Reference (B, H, W, 3) in [-1, 1] (any size) and f_mot (B, motion_dim) -> RGB (B, R, R, 3) float32.

        ``train`` is the appearance ResNet's BatchNorm mode (batch statistics + in-place running-stat
        updates when True).
        """
        if reference.ndim != 4 or reference.shape[-1] != 3:
            raise ValueError(f"GanGenerator: reference must be (B, H, W, 3), got {tuple(reference.shape)}")
        w = self.style(self.appearance(reference, train=train), f_mot)
        return self.synthesis(w, self.dtype).astype(jnp.float32)


class GanHead(nnx.Module):
    """The generator and its discriminator (both at ``config.resolution``)."""

    def __init__(self, config: GanHeadConfig | Mapping, *, rngs: nnx.Rngs):
        self.config = c = GanHeadConfig.from_config(config)
        self.generator = GanGenerator(c, rngs=rngs)
        self.discriminator = Discriminator(c.discriminator, rngs=rngs)


# -------------------------------------------------------------------------------------------- losses
GAN_LOSS_WEIGHTS = dict(adv=1.0, l1=1.0, vgg=3e-2, vggface=6e-3, fm=10.0)   # the paper's (eq. 7)
VGG_LAYER_WEIGHTS = (1.0, 1.0, 1.0, 1.0, 1.0)


def vgg19_loss(vgg_params: Mapping, fake: jax.Array, target: jax.Array, *,
               precision=jax.lax.Precision.HIGHEST) -> jax.Array:
    """Paper eq. 4: sum over VGG19 relu1_1..relu5_1 of ``mean |VGG(fake) - sg(VGG(target))|`` (one scale)."""
    return losses.perceptual_loss(vgg_params, fake, target, scales=(1,), layer_weights=VGG_LAYER_WEIGHTS,
                                  precision=precision)


def vggface_loss(face_net: nnx.Module, fake: jax.Array, target: jax.Array) -> jax.Array:
    """Paper eq. 5: mean over the face ResNet's feature maps of ``mean |F(fake) - sg(F(target))|``.

    ``face_net`` is a ``perception.resnet.ResNet`` (VGGFace2 weights, eval mode); both images go through
    :func:`perception.resnet.preprocess_vggface2` in one batch.
    """
    b = fake.shape[0]
    x = jnp.concatenate([fake.astype(jnp.float32), jax.lax.stop_gradient(target).astype(jnp.float32)])
    _, maps = face_net(resnet.preprocess_vggface2(x), train=False, return_features=True)
    terms = [losses.l1(m[:b], jax.lax.stop_gradient(m[b:])) for m in maps]
    return sum(terms) / len(terms)


def feature_matching_loss(fake_features: Sequence[jax.Array], real_features: Sequence[jax.Array]) -> jax.Array:
    """Paper eq. 6: mean over discriminator feature maps of ``mean |D_i(fake) - sg(D_i(real))|``."""
    if len(fake_features) != len(real_features) or not fake_features:
        raise ValueError(f"feature_matching_loss: {len(fake_features)} fake vs {len(real_features)} real "
                         "feature maps (need the same non-zero number)")
    terms = [losses.l1(f, jax.lax.stop_gradient(r)) for f, r in zip(fake_features, real_features, strict=True)]
    return sum(terms) / len(terms)


def _weights(weights: Mapping) -> dict[str, float]:
    unknown = sorted(set(weights) - set(GAN_LOSS_WEIGHTS))
    if unknown:
        raise ValueError(f"generator_losses: unknown loss weights {unknown} (known: {sorted(GAN_LOSS_WEIGHTS)})")
    return {k: float(weights.get(k, 0.0)) for k in GAN_LOSS_WEIGHTS}


def generator_losses(fake: jax.Array, target: jax.Array, *, disc_fake: tuple[jax.Array, Sequence[jax.Array]],
                     disc_real_features: Sequence[jax.Array], vgg_params: Mapping | None,
                     face_net: nnx.Module | None, weights: Mapping = GAN_LOSS_WEIGHTS,
                     vgg_precision=jax.lax.Precision.HIGHEST) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L_gan = w_adv L_adv + w_l1 L1 + w_vgg L_VGG19 + w_vggface L_VGGFace + w_fm L_FM (paper eq. 7).

    ``fake`` (B, R, R, 3) the generator output; ``target`` the driving frame at R (no gradient reaches it);
    ``disc_fake`` = ``discriminator(fake, return_features=True)`` (logits, feature maps);
    ``disc_real_features`` the feature maps of ``discriminator(target, return_features=True)`` (stopped);
    ``vgg_params`` a ``liax_jax.vgg`` tree or None; ``face_net`` a ``perception.resnet.ResNet`` or None.
    ``weights``: Python numbers keyed by ``adv l1 vgg vggface fm`` (missing keys weigh 0, unknown keys
    raise). A term whose network is None is skipped (and absent from the dict), which requires its weight
    to be 0 (ValueError otherwise). Returns the weighted total (float32 scalar) and the unweighted terms.
    """
    w = _weights(weights)
    if vgg_params is None and w["vgg"] != 0:
        raise ValueError(f"generator_losses: vgg_params is None but the VGG19 loss weight is {w['vgg']}; pass "
                         "the VGG19 parameters or set weights['vgg'] = 0")
    if face_net is None and w["vggface"] != 0:
        raise ValueError(f"generator_losses: face_net is None but the VGGFace loss weight is {w['vggface']}; "
                         "pass the face network or set weights['vggface'] = 0")
    fake_logits, fake_features = disc_fake
    target = jax.lax.stop_gradient(target)
    terms = {"adv": losses.generator_adversarial_loss(fake_logits), "l1": losses.l1(fake, target)}
    if vgg_params is not None:
        terms["vgg"] = vgg19_loss(vgg_params, fake, target, precision=vgg_precision)
    if face_net is not None:
        terms["vggface"] = vggface_loss(face_net, fake, target)
    terms["fm"] = feature_matching_loss(fake_features, disc_real_features)
    total = sum(w[k] * v for k, v in terms.items())
    return total, terms


def discriminator_losses(real_logits: jax.Array, fake_logits: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Logistic loss ``mean softplus(-D(real)) + mean softplus(D(fake))`` (fake detached by the caller).

    Returns the total and ``{"real": mean softplus(-D(real)), "fake": mean softplus(D(fake)),
    "real_logit": mean D(real), "fake_logit": mean D(fake)}``.
    """
    real = jnp.mean(jax.nn.softplus(-real_logits.astype(jnp.float32)))
    fake = jnp.mean(jax.nn.softplus(fake_logits.astype(jnp.float32)))
    return real + fake, {"real": real, "fake": fake, "real_logit": jnp.mean(real_logits.astype(jnp.float32)),
                         "fake_logit": jnp.mean(fake_logits.astype(jnp.float32))}
