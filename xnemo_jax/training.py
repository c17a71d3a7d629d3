r"""X-NeMo training as pure functions for the model-agnostic runtime (:mod:`launch.trainer`).

The official release has no training code; this follows the paper (§3.3, appendix A) and the recipes its
authors point to (``shared/reference/xnemo_official.md`` §4). One example is a reference frame and ``F``
target frames of the same clip (``F = 1``: the pairs of the image and motion stages); the model learns to
denoise the targets' VAE latents given the reference (reference net -> the bank its self-attention
reads), the reference's CLIP embedding and, per target frame, the motion code of that frame's
(augmented) face crop.

**Stages** (``config.stage``; :data:`STAGES`), each a trainable set (:func:`is_trainable`); everything
else is frozen and gets no optimizer state. The VAE and CLIP are always frozen.

* ``image``: the denoiser's SD part + the reference net; the motion branch is off (``skip_mm``).
* ``motion``: adds the motion encoder and the 21 motion cross-attention modules (temporal modules off).
* ``temporal``: only the temporal (AnimateDiff) modules, on clips.
* ``finetune``: everything trainable at once, on clips; ``all``: the same from scratch (the paper's
  simultaneous-training ablation; the tiny default).

**Diffusion recipe** (``config.diffusion``; defaults from the ancestor recipes): ε-prediction on the
official scaled-linear schedule (1000 steps), uniform timesteps; offset noise (``noise_offset`` 0.05: a
per-example, per-channel constant added to the noise, :func:`offset_noise`); Min-SNR-γ loss weights
``min(SNR_t, γ) / SNR_t`` (``snr_gamma`` 5, :func:`min_snr_weight`); VAE latents sampled from the
posterior (``sample_posterior``); the reference net at timestep 0; reference feature masking
(``mask_ratio`` 0.3 of the bank's tokens dropped per example, :func:`xnemo_jax.denoiser.mask_bank`);
unconditional dropout (``uncond_ratio`` 0.1): exactly the branch the sampler's CFG uses — no reference
bank, zero CLIP embedding, the motion code of the reference's own crop. ``f_rts``: ``constant`` feeds
(0, 0, 1) as the official inference does (in distribution with the default sampler), ``boxes`` the real
(dy, dx, s) of the two face boxes.

**Optimizer** (``config.optim``): AdamW (β 0.9/0.999, weight decay 1e-2) with linear warm-up and
global-norm clipping; parameters stay float32, the compute dtype is ``config.model.dtype``.

**Dual GAN head** (``config.gan_head``, ``config.loss``; :mod:`xnemo_jax.gan_head`): in the stages that train
the motion encoder (``motion``, ``finetune``, ``all``) an image-space head reconstructs every target frame
(at ``gan_head.resolution``) from the reference's appearance code and the frame's motion code, so image
losses shape the motion latent: total loss = ``L_ldm_weighted + loss.gan * L_gan`` with ``L_gan = adv * L_adv
+ l1 * L1 + vgg * L_VGG19 + vggface * L_VGGFace + fm * L_FM`` (the paper's weights 1 / 1 / 3e-2 / 6e-3 / 10;
``loss.gan`` itself is not published: 1). The motion code the head sees is the conditional one (before
the unconditional dropout), so its gradient always reaches the motion encoder. The VGG19 and VGGFace2
terms need converted weights (``loss.vgg19_path`` / ``loss.vggface_path``, ``launch/convert.py vgg19`` /
``vggface2``); without them the task refuses to start unless the term's weight is 0 (the tiny default:
no downloads). One discriminator step (logistic loss, optional lazy R1) per generator step, on the
generator's detached output. The head's generator and the discriminator have their own AdamW states
(``optim.gan_lr``, ``optim.d_lr``; same betas, clipping and warm-up).

**Eval** (:meth:`XNemoTask.eval_step`): the ε-MSE at fixed timesteps (spread over [50, 950] across the
batch) and fixed noise (``ldm_loss``: comparable across steps), the same with the motion codes shuffled
across the batch (``ldm_loss_shuffled_motion``: a model that uses motion does worse there) and with
another example's reference (``ldm_loss_shuffled_reference``: the same test for the reference),
``motion_spread`` (:func:`motion_spread`, also a train metric: 0 means the motion encoder has collapsed to a
constant code, which no shuffling can reveal), and a reconstruction sampled with a few DDIM steps and CFG
(``sample_l1`` / ``sample_psnr`` against the target frame, next to ``vae_l1``, the VAE's own reconstruction
error, which bounds it); with the GAN head, ``gan_l1`` / ``gan_psnr`` of its reconstruction of the target
frames and ``gan_l1_copy_source`` (the reference itself as the prediction: the baseline a head that ignores
motion reaches).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from liax_jax import losses, vgg
from perception import resnet
from xnemo_jax import denoiser as denoiser_lib
from xnemo_jax import gan_head as gan_lib
from xnemo_jax import model as model_lib
from xnemo_jax import sampling
from xnemo_jax import scheduler as ddim
from xnemo_jax import vae as vae_lib

STAGES = ("image", "motion", "temporal", "finetune", "all")
FROZEN_NETWORKS = ("vae", "image_encoder")


def motion_spread(motion: jax.Array) -> jax.Array:
    """Per example: the RMS distance of its motion tokens ``(B, ...)`` from the batch's mean tokens. A motion
    encoder whose output no longer depends on its input (a collapsed code: nothing for the denoiser to read)
    gives 0."""
    centred = motion - jnp.mean(motion, axis=0, keepdims=True)
    return jnp.sqrt(jnp.mean(jnp.square(centred), axis=tuple(range(1, motion.ndim))))


def to_float(images: jax.Array) -> jax.Array:
    """uint8 RGB -> float32 in [-1, 1]."""
    return images.astype(jnp.float32) / 127.5 - 1.0


# ------------------------------------------------------------------------------------------ stages
def stage_uses(stage: str) -> tuple[bool, bool]:
    """(motion branch on, temporal modules on) in the forward pass of ``stage``."""
    check_stage(stage)
    return stage != "image", stage in ("temporal", "finetune", "all")


def check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {STAGES}")


def is_trainable(stage: str, path: tuple) -> bool:
    """Whether the parameter at ``path`` (an ``nnx`` state path of the :class:`~xnemo_jax.model.XNemo`
    bundle: network name first) is trained in ``stage``."""
    check_stage(stage)
    net, rest = str(path[0]), tuple(str(p) for p in path[1:])
    if net in FROZEN_NETWORKS:
        return False
    motion, temporal = "motion_modules" in rest, "temporal_modules" in rest
    if stage == "image":
        return net == "reference_net" or (net == "denoiser" and not motion and not temporal)
    if stage == "motion":
        return net in ("reference_net", "motion_encoder") or (net == "denoiser" and not temporal)
    if stage == "temporal":
        return net == "denoiser" and temporal
    return True


def _trainable_filter(stage: str):
    return lambda path, value: isinstance(value, nnx.Param) and is_trainable(stage, path)


# ---------------------------------------------------------------------------------------- recipe
def offset_noise(key: jax.Array, shape: tuple[int, ...], noise_offset: float) -> jax.Array:
    """Gaussian noise ``(B, ..., C)`` plus ``noise_offset`` x a per-example, per-channel N(0, 1) constant
    (the same for every frame and pixel of an example: diffusers' ``noise += noise_offset *
    randn(B, C, 1, 1[, 1])``, channels last)."""
    k_noise, k_offset = jax.random.split(key)
    noise = jax.random.normal(k_noise, shape, jnp.float32)
    if noise_offset:
        offset_shape = (shape[0],) + (1,) * (len(shape) - 2) + (shape[-1],)
        noise = noise + noise_offset * jax.random.normal(k_offset, offset_shape, jnp.float32)
    return noise


def min_snr_weight(alphas_cumprod: jax.Array, timesteps: jax.Array, gamma: float) -> jax.Array:
    """Min-SNR-γ weights of the ε-prediction loss, ``min(SNR_t, γ) / SNR_t`` with ``SNR_t = ᾱ_t / (1 - ᾱ_t)``
    (Hang et al. 2023; diffusers' ``train_text_to_image`` form); ``gamma <= 0``: all ones."""
    alpha = jnp.asarray(alphas_cumprod, jnp.float32)[timesteps]
    if gamma <= 0:
        return jnp.ones_like(alpha)
    snr = alpha / (1.0 - alpha)
    return jnp.minimum(snr, gamma) / snr


@dataclasses.dataclass(frozen=True)
class Recipe:
    noise_offset: float = 0.05
    snr_gamma: float = 5.0
    uncond_ratio: float = 0.1
    mask_ratio: float = 0.3
    sample_posterior: bool = True
    f_rts: str = "constant"   # or "boxes"

    def __post_init__(self):
        if self.f_rts not in ("constant", "boxes"):
            raise ValueError(f"diffusion.f_rts must be 'constant' or 'boxes', got {self.f_rts!r}")
        if not 0.0 <= self.uncond_ratio <= 1.0:
            raise ValueError(f"diffusion.uncond_ratio must be in [0, 1], got {self.uncond_ratio}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"diffusion.mask_ratio must be in [0, 1), got {self.mask_ratio}")


def make_optimizer(o, lr: float | None = None) -> optax.GradientTransformation:
    """AdamW with linear warm-up (``o.warmup_steps``) and global-norm clipping; ``lr`` overrides ``o.lr``."""
    peak = float(o.lr if lr is None else lr)
    warmup = int(o.get("warmup_steps", 0))
    lr = optax.join_schedules([optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak)],
                              [max(warmup, 1)]) if warmup > 0 else peak
    return optax.chain(optax.clip_by_global_norm(o.grad_clip),
                       optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay))


GAN_STAGES = ("motion", "finetune", "all")   # the stages that train the motion encoder (and so the GAN head)
GAN_TERMS = tuple(gan_lib.GAN_LOSS_WEIGHTS)   # adv l1 vgg vggface fm
NO_VGG_HINT = ("the GAN head's VGG19 loss needs ImageNet VGG19 weights: convert torchvision's vgg19-dcbb9e9d.pth "
               "with `python launch/convert.py vgg19 --torch-checkpoint=vgg19-dcbb9e9d.pth --output=DIR` and pass "
               "--config.loss.vgg19_path=DIR, or disable the term with --config.loss.vgg=0")
NO_VGGFACE_HINT = ("the GAN head's VGGFace loss needs VGGFace2 ResNet-50 weights: convert resnet50_ft_weight.pkl "
                   "with `python launch/convert.py vggface2 --checkpoint=resnet50_ft_weight.pkl --output=DIR` and "
                   "pass --config.loss.vggface_path=DIR, or disable the term with --config.loss.vggface=0")


def face_net_config() -> resnet.ResNetConfig:
    """The VGGFace loss network: the VGGFace2 ResNet-50 (cydonia999 layout), eval mode, float32."""
    return resnet.ResNetConfig.preset("vggface2")


def encoder_weights(vae_params: dict, clip_params: dict) -> dict:
    """``{"vae": its encoder + quant_conv, "clip": every CLIP weight}`` of pure parameter dicts: the weights
    the outputs a latent cache stores depend on (its fingerprints are taken over these)."""
    return {"vae": {k: vae_params[k] for k in ("encoder", "quant_conv")}, "clip": clip_params}


# ------------------------------------------------------------------------------------------ task
def _deep_update(out: dict, tree: dict) -> None:
    for k, v in tree.items():
        if isinstance(v, dict):
            _deep_update(out.setdefault(k, {}), v)
        else:
            out[k] = v


class XNemoTask:
    """init / train_step / eval_step for X-NeMo (see :mod:`launch.models`)."""

    name = "xnemo"
    sample_columns = ("source", "driving", "prediction", "vae_reconstruction", "gan_prediction")
    eager_init = True   # launch/trainer.py: init op by op (a jitted init of the bundle compiles for minutes)

    def __init__(self, config):
        self.stage = str(config.stage)
        check_stage(self.stage)
        self.uses_motion, self.uses_temporal = stage_uses(self.stage)
        m = config.model
        extra = {"vae_init": str(m.vae_init)} if m.get("vae_init") else {}
        self.model_config = model_lib.XNemoConfig.preset(m.preset, dtype=m.dtype, remat=bool(m.get("remat", False)),
                                                         resolution=int(config.data.resolution), **extra)
        self.num_frames = int(config.data.num_frames)
        if self.num_frames > 1 and not self.uses_temporal:
            raise ValueError(f"stage {self.stage!r} trains on single frames: set data.num_frames=1 "
                             f"(clips are for the temporal, finetune and all stages)")
        self.model_config_source = dict(m)
        self.recipe = Recipe(**{k: v for k, v in dict(config.diffusion).items()})
        self.tx = make_optimizer(config.optim)
        self.schedule = ddim.make_schedule(ddim.XNEMO_DDIM_CONFIG)
        self.num_train_timesteps = int(ddim.XNEMO_DDIM_CONFIG.num_train_timesteps)
        e = config.eval
        self.sample_steps, self.guidance = int(e.sample_steps), float(e.guidance)
        self.filters = (_trainable_filter(self.stage), nnx.Param, ...)
        init = config.get("init", {})
        self.init_from_workdir = str(init.get("from_workdir", "") or "")
        self.init_sd = str(init.get("sd", "") or "")
        self.init_animatediff = str(init.get("animatediff", "") or "")
        if self.init_from_workdir and self.init_sd:
            raise ValueError("init.sd and init.from_workdir both set: a later stage starts from the previous run "
                             "(which began from SD); give one of them")
        self.previous_run = None   # (train config, description, restore): set by launch/models.py
        self.sd_parts = None       # {part: (kind, config, description, restore)}: set by launch/models.py
        self.loaded = []
        abstract = model_lib.abstract(self.model_config)
        self.graphdef = nnx.split(abstract, *self.filters)[0]

        loss = config.get("loss", {})
        self.gan_weight = float(loss.get("gan", 0.0))
        self.use_gan = self.gan_weight > 0 and self.stage in GAN_STAGES
        self.gan_weights = {k: float(loss.get(k, gan_lib.GAN_LOSS_WEIGHTS[k])) for k in GAN_TERMS}
        self.r1, self.r1_every = float(loss.get("r1", 0.0)), int(loss.get("r1_every", 16))
        self.vgg19_path, self.vggface_path = str(loss.get("vgg19_path", "")), str(loss.get("vggface_path", ""))
        if self.use_gan:
            if self.gan_weights["vgg"] > 0 and not self.vgg19_path:
                raise ValueError(NO_VGG_HINT)
            if self.gan_weights["vggface"] > 0 and not self.vggface_path:
                raise ValueError(NO_VGGFACE_HINT)
            if self.r1 > 0 and self.r1_every < 1:
                raise ValueError("loss.r1_every must be >= 1")
            g = dict(config.gan_head)
            preset = g.pop("preset", "tiny" if m.preset == "tiny" else "official")
            self.gan_config = gan_lib.GanHeadConfig.preset(
                preset, **{"dtype": m.dtype, "motion_dim": self.model_config.motion_encoder.f_mot_dim, **g})
            o = config.optim
            self.tx_gan = make_optimizer(o, o.get("gan_lr", o.lr))
            self.tx_d = make_optimizer(o, o.get("d_lr", o.get("gan_lr", o.lr)))
            head = nnx.eval_shape(lambda: gan_lib.GanHead(self.gan_config, rngs=nnx.Rngs(0)))
            self.gen_graph = nnx.split(head.generator, nnx.Param, ...)[0]
            self.disc_graph = nnx.graphdef(head.discriminator)
            self.face_graph = nnx.graphdef(nnx.eval_shape(lambda: resnet.ResNet(face_net_config(), rngs=nnx.Rngs(0))))

    @property
    def motion_size(self) -> int:
        return self.model_config.motion_encoder.image_size

    @property
    def clip_size(self) -> int:
        return self.model_config.image_encoder.image_size

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(h, w, C) of a frame's VAE latent (what a latent cache must hold)."""
        side = self.model_config.resolution // self.model_config.vae_scale
        return side, side, self.model_config.vae.latent_channels

    def latent_cache_weights(self, state) -> dict:
        """The frozen weights a latent cache depends on (:func:`encoder_weights`) in a task state."""
        fixed = state["fixed"]
        fixed = nnx.to_pure_dict(fixed) if isinstance(fixed, nnx.State) else fixed
        return encoder_weights(fixed["vae"], fixed["image_encoder"])

    # ------------------------------------------------------------------------------------------ state
    def init(self, rng):
        model = model_lib.XNemo(self.model_config, rngs=nnx.Rngs(rng))
        head = gan_lib.GanHead(self.gan_config, rngs=nnx.Rngs(jax.random.fold_in(rng, 1))) if self.use_gan else None
        if self.init_from_workdir:
            self._load_previous_stage(model, head)
        if self.init_sd:
            self._load_sd(model)
        if self.init_animatediff:
            from xnemo_jax import convert  # noqa: PLC0415 - reads the torch file (needs torch)

            try:
                convert.load_animatediff(model.denoiser, self.init_animatediff)
            except convert.ConversionError as e:
                raise ValueError(f"init.animatediff {self.init_animatediff}: {e}") from e
            self.loaded.append(f"temporal modules from {self.init_animatediff}")
        _, trainable, fixed, buffers = nnx.split(model, *self.filters)
        state = {"trainable": trainable, "fixed": fixed, "buffers": buffers, "opt": self.tx.init(trainable)}
        if self.use_gan:
            _, gen, gen_buffers = nnx.split(head.generator, nnx.Param, ...)
            disc = nnx.state(head.discriminator, nnx.Param)
            state.update(gan_generator=gen, gan_buffers=gen_buffers, opt_gan=self.tx_gan.init(gen),
                         discriminator=disc, opt_d=self.tx_d.init(disc))
        return state

    def attach_previous_run(self, prev: dict, where: str, restore) -> None:
        """Called by the runtime for ``init.from_workdir``: the previous run's training config, a description
        of its checkpoint, and ``restore(abstract pure dict) -> arrays`` (reads only the asked subtrees)."""
        prev_stage = str(prev.get("stage", ""))
        if prev_stage not in STAGES:
            raise ValueError(f"init.from_workdir {where}: not an X-NeMo training run (stage {prev_stage!r})")
        prev_preset, preset = (prev.get("model", {}) or {}).get("preset"), self.model_config_source.get("preset")
        prev_res, res = (prev.get("data", {}) or {}).get("resolution"), self.model_config.resolution
        if prev_preset != preset or (prev_res is not None and int(prev_res) != res):
            raise ValueError(f"init.from_workdir {where}: that run trained model.preset={prev_preset!r} at "
                             f"{prev_res}², this one {preset!r} at {res}²; start from a run of the same model")
        self.previous_run = (prev, where, restore)

    SD_PARTS = {"unet": ("unet",), "vae": ("svd_vae",), "image_encoder": ("clip_vision",)}

    def attach_sd(self, parts: dict) -> None:
        """Called by the runtime for ``init.sd`` (a ``launch/convert.py sd`` output): ``{part: (kind, diffusers
        config, description, restore(abstract pure dict) -> arrays)}`` for ``unet``, ``vae``, ``image_encoder``."""
        for part, kinds in self.SD_PARTS.items():
            if part not in parts:
                raise ValueError(f"init.sd {self.init_sd}: no {part}/ part (write all three with `python launch/"
                                 f"convert.py sd --unet=... --vae=... --clip=... --output={self.init_sd}`)")
            kind, _, where, _ = parts[part]
            if kind not in kinds:
                what = "the SVD temporal VAE (AutoencoderKLTemporalDecoder)" if part == "vae" else kinds[0]
                raise ValueError(f"init.sd {where}: a {kind!r} checkpoint; X-NeMo's {part} is {what}")
        self.sd_parts = parts

    def _load_sd(self, model) -> None:
        """``init.sd``: the SD UNet into the denoiser's SD part and into the reference net (every one of its
        weights but the output head, which the reference net lacks), the SVD VAE and the CLIP image encoder.
        The motion encoder and the motion / temporal modules keep their initialisation (zero output
        projections: the denoiser starts as the SD UNet). Every stored weight must have its place, with the
        same shape (another UNet / VAE / CLIP size is refused naming the key)."""
        from xnemo_jax import convert  # noqa: PLC0415

        if self.sd_parts is None:
            raise ValueError("init.sd is read by the runtime: build the task with launch.models.make_task")
        targets = {"unet": (model.denoiser, model.reference_net), "vae": (model.vae,),
                   "image_encoder": (model.image_encoder,)}
        for part, (kind, cfg, where, restore) in self.sd_parts.items():
            source = convert.build(kind, cfg, abstract=True)
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                    nnx.to_pure_dict(nnx.state(source, nnx.Param)))
            stored = dict(jax.tree_util.tree_flatten_with_path(restore(abstract))[0])
            for i, net in enumerate(targets[part]):
                params = nnx.state(net, nnx.Param)
                pure = nnx.to_pure_dict(params)
                flat = dict(jax.tree_util.tree_flatten_with_path(pure)[0])
                for path, value in stored.items():
                    key = jax.tree_util.keystr(path)
                    if path not in flat:
                        if i == 1:   # the reference net: no output head (conv_norm_out, conv_out)
                            continue
                        raise ValueError(f"init.sd {where}: weight {key} has no place in the X-NeMo {part}")
                    if tuple(flat[path].shape) != tuple(value.shape):
                        raise ValueError(f"init.sd {where}: {key} is {tuple(value.shape)}, the X-NeMo {part} "
                                         f"has {tuple(flat[path].shape)} (another model size?)")
                    flat[path] = value
                if part != "unet":
                    missing = [jax.tree_util.keystr(p) for p in flat if p not in stored]
                    if missing:
                        raise ValueError(f"init.sd {where}: {len(missing)} {part} weights missing, e.g. {missing[0]}")
                nnx.replace_by_pure_dict(params, jax.tree_util.tree_unflatten(
                    jax.tree_util.tree_structure(pure), [flat[p] for p, _ in jax.tree_util.tree_flatten_with_path(
                        pure)[0]]))
                nnx.update(net, params)
            self.loaded.append(f"{part} from {where}")

    def _load_previous_stage(self, model, head) -> None:
        """``init.from_workdir``: every network weight, BatchNorm statistic and buffer of the newest checkpoint
        of a previous run (any stage: its trainable / frozen split is read from its config), and its GAN head
        when both runs have one. Optimizer states start fresh (a new stage trains another set).

        Reading the checkpoint is the runtime's job (``launch/models.py`` sets :attr:`previous_run` to
        ``(train config, description, restore)``, ``restore(abstract pure dict) -> arrays``): this package
        never imports the runtime layers."""
        if self.previous_run is None:
            raise ValueError("init.from_workdir is read by the runtime: build the task with launch.models.make_task")
        prev, where, restore = self.previous_run
        prev_stage = str(prev.get("stage", ""))
        state = nnx.state(model)
        _, p_train, p_fixed, p_buf = nnx.split(model, _trainable_filter(prev_stage), nnx.Param, ...)  # (shapes only)
        target = {"trainable": p_train, "fixed": p_fixed, "buffers": p_buf}
        prev_loss = prev.get("loss", {}) or {}
        if head is not None and float(prev_loss.get("gan", 0.0)) > 0 and prev_stage in GAN_STAGES:
            target.update(gan_generator=nnx.state(head.generator, nnx.Param),
                          gan_buffers=nnx.state(head.generator, nnx.Not(nnx.Param)),
                          discriminator=nnx.state(head.discriminator, nnx.Param))
        abstract = {k: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(v))
                    for k, v in target.items()}
        restored = restore(abstract)
        merged: dict = {}
        for part in ("trainable", "fixed", "buffers"):
            _deep_update(merged, restored[part])
        nnx.replace_by_pure_dict(state, merged)
        nnx.update(model, state)
        if "gan_generator" in restored:
            gen = nnx.state(head.generator)
            both: dict = {}
            _deep_update(both, restored["gan_generator"])
            _deep_update(both, restored["gan_buffers"])
            nnx.replace_by_pure_dict(gen, both)
            nnx.update(head.generator, gen)
            disc = nnx.state(head.discriminator, nnx.Param)
            nnx.replace_by_pure_dict(disc, restored["discriminator"])
            nnx.update(head.discriminator, disc)
        self.loaded.append(f"{where}, stage {prev_stage!r}")

    def frozen_weights(self):
        out = {}
        if self.use_gan and self.gan_weights["vgg"] > 0:
            out["vgg19"] = (self.vgg19_path, vgg.abstract_params())
        if self.use_gan and self.gan_weights["vggface"] > 0:
            abstract = nnx.eval_shape(lambda: resnet.ResNet(face_net_config(), rngs=nnx.Rngs(0)))
            out["vggface"] = (self.vggface_path, nnx.to_pure_dict(nnx.state(abstract)))
        return out

    def describe(self, state) -> str:
        count = lambda t: sum(int(x.size) for x in jax.tree.leaves(t))  # noqa: E731
        text = (f"X-NeMo {self.model_config.resolution}² stage {self.stage!r}: {count(state['trainable']):,} "
                f"trainable params, {count(state['fixed']):,} frozen; {self.num_frames} frame(s) per example")
        if self.loaded:
            text += f"; initialised from {'; '.join(self.loaded)}"
        if self.use_gan:
            off = [k for k in ("vgg", "vggface") if self.gan_weights[k] <= 0]
            text += (f"; GAN head {self.gan_config.resolution}² (loss.gan {self.gan_weight:g}): generator "
                     f"{count(state['gan_generator']):,} params, discriminator {count(state['discriminator']):,}"
                     + (f"; GAN terms DISABLED: {', '.join(off)} (weight 0)" if off else ""))
        else:
            text += "; no GAN head" + ("" if self.stage in GAN_STAGES else f" (stage {self.stage!r})")
        return text

    def _merge(self, state, trainable=None):
        return nnx.merge(self.graphdef, state["trainable"] if trainable is None else trainable, state["fixed"],
                         state["buffers"], copy=True)  # fresh Variables: BatchNorm updates its stats in this trace

    # ---------------------------------------------------------------------------------------- pieces
    def _encode(self, model, batch, key, sample: bool):
        """Frozen encoders: scaled target latents (B, F, h, w, 4), reference latent (B, h, w, 4), CLIP
        context (B, 1, D). A batch of a latent-cached dataset (``frame_moments``, ``reference_moments``,
        ``clip_embeds``; :mod:`input_pipeline.latent_cache`) skips the VAE encoder and CLIP: the same draw
        from the cached posterior (same key, same layout: the same noise as online) and the cached
        embedding."""
        vae = model.vae
        if "frame_moments" in batch:
            frame_moments = batch["frame_moments"]
            b, f = frame_moments.shape[:2]
            moments = jnp.concatenate([batch["reference_moments"],
                                       frame_moments.reshape((b * f,) + frame_moments.shape[2:])], axis=0)
            posterior = vae_lib.DiagonalGaussian.from_moments(moments.astype(jnp.float32))
            context = batch["clip_embeds"].astype(jnp.float32)[:, None]
        else:
            ref = to_float(batch["reference"])
            frames = to_float(batch["frames"])
            b, f = frames.shape[:2]
            posterior = vae.encode(jnp.concatenate([ref, frames.reshape((b * f,) + frames.shape[2:])], axis=0))
            context = model.image_encoder(batch["clip_pixels"]).image_embeds[:, None].astype(jnp.float32)
        latents = posterior.draw(key, sample) * vae.scaling_factor
        latents = jax.lax.stop_gradient(latents.astype(jnp.float32))
        ref_lat, lat = latents[:b], latents[b:].reshape((b, f) + latents.shape[1:])
        return lat, ref_lat, jax.lax.stop_gradient(context)

    def _motion(self, model, batch, *, train: bool, rng):
        """Motion tokens of the target frames (B, F, N, D) and of the reference's own crop (B, 1, N, D)."""
        crops = to_float(batch["motion"])
        b, f = crops.shape[:2]
        f_rts = batch["f_rts"].astype(jnp.float32) if self.recipe.f_rts == "boxes" else \
            jnp.broadcast_to(jnp.asarray(sampling.NULL_F_RTS, jnp.float32), (b, f, 3))
        images = jnp.concatenate([crops.reshape((b * f,) + crops.shape[2:]), to_float(batch["reference_motion"])])
        rts = jnp.concatenate([f_rts.reshape(b * f, 3),
                               jnp.broadcast_to(jnp.asarray(sampling.NULL_F_RTS, jnp.float32), (b, 3))])
        tokens = model.motion_encoder(images, rts, train=train, dropout_rng=rng if train else None)
        tokens = tokens.astype(jnp.float32)
        return tokens[:b * f].reshape((b, f) + tokens.shape[1:]), tokens[b * f:].reshape((b, 1) + tokens.shape[1:])

    def _bank(self, model, ref_lat, context):
        """The reference bank: the reference net on the reference latent at timestep 0."""
        return denoiser_lib.reference_bank(model.reference_net, ref_lat, context, timestep=0)

    def _eps(self, model, noisy, t, context, bank, motion, bank_mask, mask_rng=None):
        """The denoiser's ε reading ``bank`` (:meth:`_bank`) where ``bank_mask`` is set."""
        if mask_rng is not None and self.recipe.mask_ratio > 0:
            bank = denoiser_lib.mask_bank(bank, self.recipe.mask_ratio, mask_rng)
        eps = model.denoiser(noisy, t, context, motion if self.uses_motion else None, bank=bank,
                             bank_mask=bank_mask, skip_mm=not self.uses_motion,
                             skip_temporal=not self.uses_temporal)
        return eps.astype(jnp.float32)

    def _gan_inputs(self, batch, motion):
        """References repeated per target frame (B*F, H, W, 3), the frames' motion codes (B*F, N*D) and the
        targets at the head's resolution (B*F, R, R, 3)."""
        frames = to_float(batch["frames"])
        b, f = frames.shape[:2]
        ref = jnp.repeat(to_float(batch["reference"]), f, axis=0)
        codes = motion.reshape(b * f, -1)
        target = gan_lib.resize_images(frames.reshape((b * f,) + frames.shape[2:]), self.gan_config.resolution)
        return ref, codes, target

    def _face_net(self, frozen):
        return nnx.merge(self.face_graph, frozen["vggface"]) if "vggface" in frozen else None

    def _disc(self, dp, x, features=False):
        out = nnx.merge(self.disc_graph, dp)(x, return_features=features)
        return (out[0].astype(jnp.float32), out[1]) if features else out.astype(jnp.float32)

    def _gan_losses(self, state, frozen, gen, buffers, batch, motion):
        """L_gan of the head's reconstruction, its terms, the detached fake, and the new BatchNorm stats."""
        generator = nnx.merge(self.gen_graph, gen, buffers, copy=True)
        ref, codes, target = self._gan_inputs(batch, motion)
        fake = generator(ref, codes, train=True)
        real_features = self._disc(state["discriminator"], target, features=True)[1]
        total, terms = gan_lib.generator_losses(
            fake, target, disc_fake=self._disc(state["discriminator"], fake, features=True),
            disc_real_features=[jax.lax.stop_gradient(x) for x in real_features],
            vgg_params=frozen.get("vgg19"), face_net=self._face_net(frozen), weights=self.gan_weights)
        return total, terms, jax.lax.stop_gradient(fake), target, nnx.split(generator, nnx.Param, ...)[2]

    def _disc_step(self, state, fake, target, step):
        def d_loss_fn(dp):
            loss, aux = gan_lib.discriminator_losses(self._disc(dp, target), self._disc(dp, fake))
            if self.r1 > 0:
                term, aux["r1"] = losses.lazy_r1(lambda x: self._disc(dp, x), target, step, self.r1, self.r1_every)
                loss = loss + term
            return loss, aux

        (d_loss, aux), grads = jax.value_and_grad(d_loss_fn, has_aux=True)(state["discriminator"])
        updates, opt_d = self.tx_d.update(grads, state["opt_d"], state["discriminator"])
        metrics = {"d_loss": d_loss, **{f"d_{k}": v for k, v in aux.items()}}
        return {"discriminator": optax.apply_updates(state["discriminator"], updates), "opt_d": opt_d}, metrics

    # ------------------------------------------------------------------------------------------- steps
    def train_step(self, state, frozen, batch, step, rng):
        r = self.recipe
        k_post, k_noise, k_t, k_drop, k_mask, k_motion = jax.random.split(rng, 6)
        lat, ref_lat, context = self._encode(self._merge(state), batch, k_post, r.sample_posterior)
        b = lat.shape[0]
        noise = offset_noise(k_noise, lat.shape, r.noise_offset)
        t = jax.random.randint(k_t, (b,), 0, self.num_train_timesteps)
        noisy = ddim.add_noise(self.schedule, lat, noise, t)
        uncond = jax.random.uniform(k_drop, (b,)) < r.uncond_ratio
        context = jnp.where(uncond[:, None, None], 0.0, context)
        weights = min_snr_weight(self.schedule.alphas_cumprod, t, r.snr_gamma)
        train_motion = self.stage != "temporal"

        def loss_fn(params):
            trainable, gen = params
            model = self._merge(state, trainable)
            motion = None
            aux = {}
            if self.uses_motion:
                cond_motion, ref_motion = self._motion(model, batch, train=train_motion, rng=k_motion)
                motion = jnp.where(uncond[:, None, None, None], jnp.broadcast_to(ref_motion, cond_motion.shape),
                                   cond_motion)
            eps = self._eps(model, noisy, t, context, self._bank(model, ref_lat, context), motion, ~uncond,
                            mask_rng=k_mask)
            mse = jnp.mean(jnp.square(eps - noise), axis=tuple(range(1, eps.ndim)))
            ldm = jnp.mean(weights * mse)
            aux["buffers"] = nnx.split(model, *self.filters)[3]
            aux["metrics"] = {"ldm_loss": ldm, "ldm_mse": jnp.mean(mse)}
            if self.uses_motion:
                aux["metrics"]["motion_spread"] = jnp.mean(motion_spread(cond_motion))
            total = ldm
            if self.use_gan:
                gan, terms, fake, target, aux["gan_buffers"] = self._gan_losses(
                    state, frozen, gen, state["gan_buffers"], batch, cond_motion)
                total = total + self.gan_weight * gan
                aux["fake"], aux["target"] = fake, target
                aux["metrics"].update(gan_loss=gan, **{f"gan_{k}": v for k, v in terms.items()})
            return total, aux

        params = (state["trainable"], state.get("gan_generator", {}))
        (loss, aux), (grads, gan_grads) = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt = self.tx.update(grads, state["opt"], state["trainable"])
        new = dict(state, trainable=optax.apply_updates(state["trainable"], updates), opt=opt, buffers=aux["buffers"])
        metrics = {"loss": loss, **aux["metrics"], "grad_norm": optax.global_norm(grads),
                   "uncond_fraction": jnp.mean(uncond.astype(jnp.float32)), "mean_weight": jnp.mean(weights)}
        if self.use_gan:
            gan_updates, opt_gan = self.tx_gan.update(gan_grads, state["opt_gan"], state["gan_generator"])
            new.update(gan_generator=optax.apply_updates(state["gan_generator"], gan_updates), opt_gan=opt_gan,
                       gan_buffers=aux["gan_buffers"])
            disc, d_metrics = self._disc_step(state, aux["fake"], aux["target"], step)
            new.update(disc)
            metrics.update(d_metrics, gan_grad_norm=optax.global_norm(gan_grads))
        return new, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

    def eval_timesteps(self, batch_size: int) -> np.ndarray:
        """The fixed eval timesteps: ``batch_size`` values spread over [50, 950]."""
        return np.linspace(50, 950, batch_size).round().astype(np.int32)

    def eval_step(self, state, frozen, batch):
        """Per-example metrics and the sample columns of one batch (fixed noise and timesteps)."""
        del frozen
        model = self._merge(state)
        lat, ref_lat, context = self._encode(model, batch, None, False)
        b, f = lat.shape[:2]
        noise = jax.random.normal(jax.random.key(0), lat.shape, jnp.float32)
        t = jnp.asarray(self.eval_timesteps(b))
        noisy = ddim.add_noise(self.schedule, lat, noise, t)
        cond = jnp.ones((b,), bool)
        motion = ref_motion = None
        if self.uses_motion:
            motion, ref_motion = self._motion(model, batch, train=False, rng=None)
        per_example = lambda eps: jnp.mean(jnp.square(eps - noise), axis=(1, 2, 3, 4))  # noqa: E731
        # the reference net runs once: every pass below reads this bank (rolled / doubled as needed)
        bank = self._bank(model, ref_lat, context)
        roll = lambda tree: jax.tree.map(lambda a: jnp.roll(a, 1, axis=0), tree)  # noqa: E731
        out = {"ldm_loss": per_example(self._eps(model, noisy, t, context, bank, motion, cond))}
        if self.uses_motion:
            out["ldm_loss_shuffled_motion"] = per_example(self._eps(model, noisy, t, context, bank, roll(motion),
                                                                    cond))
            out["motion_spread"] = motion_spread(motion)
        # another example's reference (latent, bank and CLIP embedding): a model that uses it must do worse
        out["ldm_loss_shuffled_reference"] = per_example(self._eps(model, noisy, t, roll(context), roll(bank),
                                                                   motion, cond))
        gan_cols = {}
        if self.use_gan:
            generator = nnx.merge(self.gen_graph, state["gan_generator"], state["gan_buffers"], copy=True)
            ref, codes, target = self._gan_inputs(batch, motion)
            fake = generator(ref, codes, train=False)
            per = lambda a: jnp.mean(a.reshape(b, -1), axis=1)  # noqa: E731  (mean over an example's frames)
            mse = per(jnp.square(jnp.clip(fake, -1, 1) - target))
            out.update(gan_l1=per(jnp.abs(fake - target)), gan_psnr=10 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10)),
                       gan_l1_copy_source=per(jnp.abs(gan_lib.resize_images(ref, target.shape[1]) - target)))
            size = self.model_config.resolution
            gan_cols["gan_prediction"] = jnp.clip(gan_lib.resize_images(fake.reshape((b, f) + fake.shape[1:])[:, 0],
                                                                        size), -1, 1)

        # a reconstruction sampled with a few DDIM steps and CFG, from the official initial latents
        schedule = sampling.schedule_for(self.sample_steps)
        x = jax.vmap(lambda r, n: sampling.initial_latents(schedule, r, n))(ref_lat, noise)
        neg_motion = None if motion is None else jnp.broadcast_to(ref_motion, motion.shape)
        both_ctx = jnp.concatenate([jnp.zeros_like(context), context])
        both_motion = None if motion is None else jnp.concatenate([neg_motion, motion])
        mask = jnp.concatenate([jnp.zeros((b,), bool), cond])
        both_bank = jax.tree.map(lambda a: jnp.concatenate([a, a]), bank)   # (the first half is masked off)
        timesteps = jnp.asarray(schedule.timesteps, jnp.int32)

        def denoise(i, x):  # one compiled denoiser call for all steps (an unrolled loop compiles each)
            step_t = timesteps[i]
            eps = self._eps(model, jnp.concatenate([x, x]), step_t, both_ctx, both_bank, both_motion, mask)
            eps = eps[:b] + self.guidance * (eps[b:] - eps[:b])
            return ddim.step(schedule, eps, step_t, x)[0]

        x = jax.lax.fori_loop(0, len(schedule.timesteps), denoise, x)
        vae = model.vae
        size = self.model_config.resolution

        def decode(z):
            images = vae.decode(z.reshape((b * f,) + z.shape[2:]) / vae.scaling_factor, f).astype(jnp.float32)
            return jnp.clip(images, -1, 1).reshape((b, f, size, size, 3))

        pred, recon = decode(x), decode(lat)
        target = to_float(batch["frames"])
        l1 = lambda a: jnp.mean(jnp.abs(a - target), axis=(1, 2, 3, 4))  # noqa: E731
        mse = jnp.mean(jnp.square(pred - target), axis=(1, 2, 3, 4))
        out.update(sample_l1=l1(pred), sample_psnr=10 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10)), vae_l1=l1(recon),
                   l1_copy_source=l1(jnp.broadcast_to(to_float(batch["reference"])[:, None], target.shape)))
        cols = {"source": to_float(batch["reference"]), "driving": target[:, 0], "prediction": pred[:, 0],
                "vae_reconstruction": recon[:, 0], **gan_cols}
        return out, cols


def make_task(config) -> XNemoTask:
    return XNemoTask(config)
