"""LIA / LIA-X training losses and image metrics (liax_official.md §6), as pure ``jnp`` functions.

Images are NHWC in [-1, 1]. The generator objective of LIA is ``perceptual_loss + l1 +
generator_adversarial_loss`` (all weight 1); LIA-X adds ``sparsity_loss`` on the motion coefficients
A_{r->d}. ``psnr`` and ``ssim`` are evaluation metrics on images mapped to [0, 1].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from liax_jax import vgg

PYRAMID_SCALES = (1, 0.5, 0.25, 0.125)
VGG_LAYER_WEIGHTS = (10.0, 10.0, 10.0, 10.0, 10.0)


# --------------------------------------------------------------------------- image pyramid (FOMM)


def _gaussian_1d(size: int, sigma: float) -> np.ndarray:
    """Normalised Gaussian taps over ``arange(size)`` centred at ``(size - 1) / 2`` (float64)."""
    t = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(t ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def _separable_filter(x: jax.Array, taps: np.ndarray, stride: int = 1) -> jax.Array:
    """Per-channel 'valid' filtering of NHWC ``x`` with the 2-D kernel ``outer(taps, taps)``, then a stride."""
    c = x.shape[-1]
    k = jnp.asarray(taps, x.dtype)
    for kernel_shape, strides in (((len(taps), 1, 1, 1), (stride, 1)), ((1, len(taps), 1, 1), (1, stride))):
        x = jax.lax.conv_general_dilated(
            x, jnp.tile(k.reshape(kernel_shape), (1, 1, 1, c)), window_strides=strides, padding="VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c,
            precision=jax.lax.Precision.HIGHEST)
    return x


def anti_alias_downsample(x: jax.Array, scale: float) -> jax.Array:
    """FOMM's ``AntiAliasInterpolation2d``: Gaussian blur, then keep every ``int(1/scale)``-th pixel.

    sigma = (1/scale - 1) / 2, kernel size 2*round(4*sigma) + 1 (Python rounding, as FOMM), zero padding
    of half the kernel on each side. The 2-D kernel is separable (the normalised product of two 1-D
    Gaussians equals the outer product of the normalised 1-D ones), so the blur runs as two 1-D passes,
    each evaluated only at the kept pixels; this equals blur-then-subsample up to float rounding.
    """
    if scale == 1:
        return x
    sigma = (1 / scale - 1) / 2
    size = 2 * round(sigma * 4) + 1
    ka = size // 2
    kb = ka - 1 if size % 2 == 0 else ka
    stride = int(1 / scale)
    x = jnp.pad(x, ((0, 0), (ka, kb), (ka, kb), (0, 0)))
    return _separable_filter(x, _gaussian_1d(size, sigma), stride)


def image_pyramid(x: jax.Array, scales: Sequence[float] = PYRAMID_SCALES) -> list[jax.Array]:
    """``[anti_alias_downsample(x, s) for s in scales]`` (FOMM's ``ImagePyramide``)."""
    return [anti_alias_downsample(x, s) for s in scales]


# --------------------------------------------------------------------------- generator / discriminator losses


def perceptual_loss(vgg_params: Mapping, pred: jax.Array, target: jax.Array,
                    scales: Sequence[float] = PYRAMID_SCALES,
                    layer_weights: Sequence[float] = VGG_LAYER_WEIGHTS, *,
                    precision=jax.lax.Precision.HIGHEST) -> jax.Array:
    """LIA's ``VGGLoss``: sum over pyramid scales and VGG19 layers of ``w * mean|f(pred) - sg(f(target))|``.

    ``vgg_params`` is a :mod:`liax_jax.vgg` parameter tree (frozen ImageNet weights); no gradient flows
    into ``target``. ``precision`` is passed to the VGG convolutions. Returns a float32 scalar.
    """
    target = jax.lax.stop_gradient(target)
    total = jnp.zeros((), jnp.float32)
    for pred_s, target_s in zip(image_pyramid(pred.astype(jnp.float32), scales),
                                image_pyramid(target.astype(jnp.float32), scales), strict=True):
        pred_feats = vgg.features(vgg_params, pred_s, precision=precision)
        target_feats = vgg.features(vgg_params, target_s, precision=precision)
        for weight, f, g in zip(layer_weights, pred_feats, target_feats, strict=True):
            total = total + weight * jnp.mean(jnp.abs(f - jax.lax.stop_gradient(g)))
    return total


def l1(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean absolute error over all elements (float32 scalar)."""
    return jnp.mean(jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32)))


def generator_adversarial_loss(fake_logits: jax.Array) -> jax.Array:
    """Non-saturating generator loss: mean softplus(-D(x_hat))."""
    return jnp.mean(jax.nn.softplus(-fake_logits.astype(jnp.float32)))


def discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """Logistic discriminator loss: mean softplus(-D(x)) + mean softplus(D(x_hat)) (x_hat detached by the caller)."""
    return (jnp.mean(jax.nn.softplus(-real_logits.astype(jnp.float32)))
            + jnp.mean(jax.nn.softplus(fake_logits.astype(jnp.float32))))


def lazy_r1(disc, real: jax.Array, step, weight: float, every: int) -> tuple[jax.Array, jax.Array]:
    """StyleGAN2's lazy R1 regulariser: the penalty ``mean_i ||d disc(real_i) / d real_i||^2`` computed
    every ``every``-th step (``step % every == 0``, zero otherwise) and scaled by ``weight / 2 * every``
    so its average over steps is the eager ``weight / 2`` penalty. ``disc`` maps images to logits.
    Returns ``(the term to add to the discriminator loss, the raw penalty)``."""
    def r1():
        g = jax.grad(lambda x: jnp.sum(disc(x)))(real)
        return jnp.mean(jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim))))

    penalty = jax.lax.cond(step % every == 0, r1, lambda: jnp.zeros((), jnp.float32))
    return weight / 2 * every * penalty, penalty


def sparsity_loss(alpha: jax.Array) -> jax.Array:
    """LIA-X's sparse-motion-dictionary penalty: mean |alpha| of the motion coefficients."""
    return jnp.mean(jnp.abs(alpha.astype(jnp.float32)))


# --------------------------------------------------------------------------- metrics


def _to_unit(x: jax.Array) -> jax.Array:
    return jnp.clip((x.astype(jnp.float32) + 1.0) * 0.5, 0.0, 1.0)


def psnr(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Per-example PSNR in dB, (B,), of [-1, 1] images mapped to [0, 1] and clipped (MSE floored at 1e-10)."""
    mse = jnp.mean((_to_unit(pred) - _to_unit(target)) ** 2, axis=(1, 2, 3))
    return 10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10))


SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def ssim(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Per-example SSIM, (B,), of [-1, 1] images mapped to [0, 1] and clipped (Wang et al. 2004).

    11-tap Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, population covariances, statistics on
    'valid' windows only, averaged over pixels and channels. Equals scikit-image's
    ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1,
    channel_axis=-1)``, which filters with reflect padding and then crops the 5-pixel border.
    """
    x, y = _to_unit(pred), _to_unit(target)
    if min(x.shape[1:3]) < SSIM_WINDOW:
        raise ValueError(f"ssim needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {x.shape[1:3]}")
    c = x.shape[-1]
    taps = _gaussian_1d(SSIM_WINDOW, SSIM_SIGMA)
    stats = _separable_filter(jnp.concatenate([x, y, x * x, y * y, x * y], axis=-1), taps)
    ux, uy, uxx, uyy, uxy = (stats[..., i * c:(i + 1) * c] for i in range(5))
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return jnp.mean(s, axis=(1, 2, 3))
