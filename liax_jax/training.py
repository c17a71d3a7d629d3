"""LIA-X training as pure functions for the model-agnostic runtime (:mod:`launch.trainer`).

Self-reconstruction within a clip (``shared/reference/liax_official.md`` §6): source and driving frames
come from one video and the generator reconstructs the driving frame,
``x_hat = G(z_src + D(alpha_drv), feats_src)``. Per iteration one generator step, then one
discriminator step on the same (detached) reconstruction.

Generator loss ``loss.l1 * L1 + loss.perceptual * VGG + loss.adversarial * softplus(-D(x_hat))
+ loss.sparsity * mean|alpha_drv|``:

* L1 and the VGG19 perceptual loss (5 relu slices x 4 anti-aliased pyramid scales, each weighted 10)
  exactly as LIA's training code; the VGG needs converted ImageNet weights (``loss.vgg19_path``);
* the non-saturating adversarial loss against a StyleGAN2 discriminator (minibatch stddev);
* LIA-X's sparse-motion-dictionary penalty, an L1 on the motion coefficients ``alpha`` of the driving
  frame. Its weight is not published; the default ``loss.sparsity = 0.01`` (on the mean over batch and
  directions) keeps it a small fraction of the reconstruction terms at initialisation while still
  pulling unused directions to zero.

Discriminator loss ``softplus(-D(x)) + softplus(D(x_hat))`` (+ optional lazy R1 every
``loss.r1_every`` steps with weight ``loss.r1 / 2 * r1_every``; off by default as in LIA).
Adam with LIA's settings (G lr 0.0016, betas (0, 0.99^0.8); D lr 0.002*16/17, betas (0, 0.99^(16/17))).

Initialisation from scratch: the modulated 1x1 convs that predict each level's flow/mask logits start at
``init_flow_gain`` times their N(0, 1) init (default 0): the first warps are then the identity (mask
0.5) instead of random displacements of up to ~0.8 image widths that saturate ``tanh`` and starve the
warp of gradient. On the tiny config this turns a run that plateaus at the mean image into one that
learns to reconstruct within ~100 steps. Official checkpoints are unaffected (they are loaded, not
initialised).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from liax_jax import losses, vgg
from liax_jax.discriminator import Discriminator, DiscriminatorConfig
from liax_jax.model import LiaX, LiaXConfig


def to_float(images: jax.Array) -> jax.Array:
    """uint8 RGB -> float32 in [-1, 1] (the pipeline/model boundary)."""
    return images.astype(jnp.float32) / 127.5 - 1.0


@dataclasses.dataclass(frozen=True)
class LossWeights:
    l1: float = 1.0
    perceptual: float = 1.0
    adversarial: float = 1.0
    sparsity: float = 0.01
    r1: float = 0.0
    r1_every: int = 16
    perceptual_scales: tuple = (1.0, 0.5, 0.25, 0.125)
    perceptual_layer_weights: tuple = (10.0, 10.0, 10.0, 10.0, 10.0)


NO_VGG_HINT = ("the perceptual loss needs ImageNet VGG19 weights: convert torchvision's vgg19-dcbb9e9d.pth with "
               "`python launch/convert.py vgg19 --torch-checkpoint=vgg19-dcbb9e9d.pth --output=DIR` and pass "
               "--config.loss.vgg19_path=DIR, or disable the loss with --config.loss.perceptual=0")


class LiaXTask:
    """init / train_step / eval_step for LIA-X (see :mod:`launch.models`)."""

    name = "liax"
    sample_columns = ("source", "driving", "prediction", "target")

    def __init__(self, config):
        self.model_config = LiaXConfig.from_config(config.model)
        dcfg = dict(config.discriminator)
        dcfg.setdefault("resolution", self.model_config.resolution)
        dcfg.setdefault("dtype", self.model_config.dtype)
        self.disc_config = DiscriminatorConfig.from_config(dcfg)
        lw = {f.name for f in dataclasses.fields(LossWeights)}
        self.weights = LossWeights(**{k: (tuple(v) if isinstance(v, (list, tuple)) else v)
                                      for k, v in dict(config.loss).items() if k in lw})
        self.vgg19_path = config.loss.get("vgg19_path", "")
        if self.weights.perceptual > 0 and not self.vgg19_path:
            raise ValueError(NO_VGG_HINT)
        if self.weights.r1 > 0 and self.weights.r1_every < 1:
            raise ValueError("loss.r1_every must be >= 1")
        o = config.optim
        self.tx_g = optax.adam(o.g_lr, b1=o.g_b1, b2=o.g_b2, eps=o.eps)
        self.tx_d = optax.adam(o.d_lr, b1=o.d_b1, b2=o.d_b2, eps=o.eps)
        self.use_disc = self.weights.adversarial > 0
        self.init_flow_gain = float(config.get("init_flow_gain", 1.0))
        self.g_graph = nnx.graphdef(nnx.eval_shape(lambda: LiaX(self.model_config, rngs=nnx.Rngs(0))))
        self.d_graph = nnx.graphdef(nnx.eval_shape(lambda: Discriminator(self.disc_config, rngs=nnx.Rngs(0))))

    # ------------------------------------------------------------------------------------------ state
    def init(self, rng):
        kg, kd = jax.random.split(rng)
        g = LiaX(self.model_config, rngs=nnx.Rngs(params=kg))
        for level in g.dec.levels:  # flow heads start at gain `init_flow_gain` (0: identity warp, mask 0.5)
            level.flow.conv.weight[...] = level.flow.conv.weight[...] * self.init_flow_gain
        gp = nnx.state(g, nnx.Param)
        state = {"generator": gp, "opt_g": self.tx_g.init(gp)}
        if self.use_disc:
            dp = nnx.state(Discriminator(self.disc_config, rngs=nnx.Rngs(params=kd)), nnx.Param)
            state.update(discriminator=dp, opt_d=self.tx_d.init(dp))
        return state

    def frozen_weights(self):
        if self.weights.perceptual > 0:
            return {"vgg19": (self.vgg19_path, vgg.abstract_params())}
        return {}

    def describe(self, state) -> str:
        count = lambda t: sum(int(x.size) for x in jax.tree.leaves(t))  # noqa: E731
        parts = [f"LIA-X {self.model_config.resolution}² generator {count(state['generator']):,} params"]
        if self.use_disc:
            parts.append(f"discriminator {count(state['discriminator']):,} params")
        else:
            parts.append("no discriminator (loss.adversarial = 0)")
        if self.weights.perceptual <= 0:
            parts.append("perceptual loss DISABLED (loss.perceptual = 0)")
        return "; ".join(parts)

    # ---------------------------------------------------------------------------------------- forward
    def reconstruct(self, gp, source, driving):
        """x_hat = G(z_src + D(alpha_drv), feats_src) and alpha_drv, for float images in [-1, 1]."""
        g = nnx.merge(self.g_graph, gp)
        b = source.shape[0]
        z_all, feats_all = g.encode(jnp.concatenate([source, driving], axis=0))
        z, z_d = z_all[:b], z_all[b:]
        feats = [f[:b] for f in feats_all]
        alpha = g.motion_coefficients(z_d)
        pred = g.decode(g.navigate(z, [alpha]), feats)
        return pred.astype(jnp.float32), alpha.astype(jnp.float32)

    def _disc(self, dp, x):
        return nnx.merge(self.d_graph, dp)(x).astype(jnp.float32)

    # ------------------------------------------------------------------------------------------- steps
    def train_step(self, state, frozen, batch, step, rng):
        del rng  # LIA-X training is deterministic given the batch
        w = self.weights
        src, drv = to_float(batch["source"]), to_float(batch["driving"])

        def g_loss_fn(gp):
            pred, alpha = self.reconstruct(gp, src, drv)
            terms = {"l1": losses.l1(pred, drv), "sparsity": losses.sparsity_loss(alpha)}
            loss = w.l1 * terms["l1"] + w.sparsity * terms["sparsity"]
            if w.perceptual > 0:
                terms["perceptual"] = losses.perceptual_loss(frozen["vgg19"], pred, drv, w.perceptual_scales,
                                                             w.perceptual_layer_weights)
                loss = loss + w.perceptual * terms["perceptual"]
            if self.use_disc:
                terms["adversarial"] = losses.generator_adversarial_loss(self._disc(state["discriminator"], pred))
                loss = loss + w.adversarial * terms["adversarial"]
            terms["alpha_abs_max"] = jnp.max(jnp.abs(alpha))
            return loss, (terms, pred)

        (loss, (terms, pred)), g_grads = jax.value_and_grad(g_loss_fn, has_aux=True)(state["generator"])
        updates, opt_g = self.tx_g.update(g_grads, state["opt_g"], state["generator"])
        new = dict(state, generator=optax.apply_updates(state["generator"], updates), opt_g=opt_g)
        metrics = dict(terms, loss=loss, g_grad_norm=optax.global_norm(g_grads))

        if self.use_disc:
            fake = jax.lax.stop_gradient(pred)

            def d_loss_fn(dp):
                real_logits, fake_logits = self._disc(dp, drv), self._disc(dp, fake)
                d_loss = losses.discriminator_loss(real_logits, fake_logits)
                aux = {"d_real": jnp.mean(real_logits), "d_fake": jnp.mean(fake_logits)}
                if w.r1 > 0:
                    term, aux["r1"] = losses.lazy_r1(lambda x: self._disc(dp, x), drv, step, w.r1, w.r1_every)
                    d_loss = d_loss + term
                return d_loss, aux

            (d_loss, d_aux), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(state["discriminator"])
            d_updates, opt_d = self.tx_d.update(d_grads, state["opt_d"], state["discriminator"])
            new.update(discriminator=optax.apply_updates(state["discriminator"], d_updates), opt_d=opt_d)
            metrics.update(d_aux, d_loss=d_loss, d_grad_norm=optax.global_norm(d_grads))
        return new, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

    def _eval_inputs(self, batch):
        src, drv = to_float(batch["source"]), to_float(batch["driving"])
        target = to_float(batch["target"]) if "target" in batch else drv
        return src, drv, target

    def eval_step(self, state, frozen, batch):
        """Per-example metrics and the sample columns of one batch, from one reconstruction."""
        del frozen
        src, drv, target = self._eval_inputs(batch)
        pred, _ = self.reconstruct(state["generator"], src, drv)
        pred = jnp.clip(pred, -1.0, 1.0)
        per_example_l1 = lambda a, b: jnp.mean(jnp.abs(a - b), axis=(1, 2, 3))  # noqa: E731
        out = {"l1": per_example_l1(pred, target), "psnr": losses.psnr(pred, target),
               "ssim": losses.ssim(pred, target), "l1_copy_source": per_example_l1(src, target)}
        cols = {"source": src, "driving": drv, "prediction": pred}
        if "target" in batch:
            out["l1_copy_driving"] = per_example_l1(drv, target)
            cols["target"] = target
        return out, cols


def make_task(config) -> LiaXTask:
    return LiaXTask(config)
