"""X-NeMo configs: ``--config=configs/xnemo.py[:variant]`` (``python launch/train.py --config=configs/xnemo.py``
trains ``tiny``).

Variants: ``tiny`` (the default: the tiny bundle of ``xnemo_jax.model`` at 64², built-in synthetic talking
heads, CPU-trainable, stage ``all``: everything from scratch at once) and ``official`` (the release's
networks at 512²; batch sizes per the paper: 64 pairs for the image/motion stages, 16 clips x 24 frames
for temporal/finetune). Pick the stage with ``--config.stage=image|motion|temporal|finetune|all`` (see
``xnemo_jax/training.py``); ``data.num_frames`` follows the stage unless set (1 for image/motion, 24 for
temporal/finetune at full size). The shared field names are those of ``configs/liax.py``.
"""

import ml_collections

VARIANTS = ("tiny", "official")


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    variant = variant or "tiny"
    if variant not in VARIANTS:
        raise ValueError(f"unknown X-NeMo config variant {variant!r}; choose one of {VARIANTS}")
    tiny = variant == "tiny"
    c = ml_collections.ConfigDict()
    c.model_name = "xnemo"
    c.variant = variant
    c.seed = 0
    c.stage = "all" if tiny else "image"
    # xnemo_jax.model.XNemoConfig.preset(preset, dtype=..., remat=...): dtype is the compute dtype (parameters
    # float32); remat recomputes the denoiser's and reference net's block activations in the backward pass
    # (gradient checkpointing: same gradients, far less activation memory, ~1 more forward of compute);
    # vae_init: how a VAE no weights fill starts (tiny: "zero_residual", a near-linear random VAE whose latents
    # keep the frames' information; see xnemo_jax.vae.zero_residual_; init.sd / checkpoints replace it)
    c.model = ml_collections.ConfigDict(dict(preset=variant, dtype="float32" if tiny else "bfloat16",
                                             remat=not tiny, vae_init="zero_residual" if tiny else "random"))
    # Initial weights. init.sd = a `launch/convert.py sd --unet --vae --clip` output (sd-image-variations UNet
    # -> denoiser SD part + reference net, the SVD VAE, CLIP; the official image stage starts there);
    # init.animatediff = AnimateDiff v2 temporal modules (mm_sd_v15_v2.ckpt, read with torch);
    # init.from_workdir = a previous stage's run (not together with init.sd). Loaded by xnemo_jax/training.py.
    c.init = ml_collections.ConfigDict(dict(sd="", animatediff="", from_workdir=""))

    resolution = 64 if tiny else 512
    c.data = ml_collections.ConfigDict(dict(
        path="",                 # empty: built-in synthetic talking heads rendered on the fly
        resolution=resolution,
        num_frames=2 if tiny else 1,   # target frames per example (1: pairs; temporal/finetune: 24)
        worker_count=0,
        read_threads=2,
        prefetch=4,
        synthetic_clips=512,
        synthetic_eval_clips=16,
        synthetic_frames=32,
        synthetic_fps=25.0,      # frame rate of the synthetic motion (lower: larger motion within a clip)
        # a prepared dataset's latent cache (launch/prepare_data.py --cache-latents=CKPT): the frozen VAE
        # moments and CLIP embedding per frame; used when present (False: encode online anyway)
        use_latent_cache=True,
    ))
    # The motion encoder's input: the driving frame's face crop, augmented (input_pipeline/augment.py):
    # colour jitter, scale within 30 %, piecewise affine, face-centred crop around the official tight 1.1x.
    c.augment = ml_collections.ConfigDict(dict(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05, scale=0.3,
                                               piecewise_grid=4, piecewise_strength=0.02, crop_scale=(1.0, 1.3),
                                               crop_jitter=0.05))
    c.diffusion = ml_collections.ConfigDict(dict(
        noise_offset=0.05,       # offset noise (a per-example, per-channel constant)
        snr_gamma=5.0,           # Min-SNR-gamma loss weights (<= 0: plain MSE)
        uncond_ratio=0.1,        # CFG dropout: no reference bank, zero CLIP, the reference's own motion code
        mask_ratio=0.3,          # reference feature masking (paper: 30 %)
        # VAE latents sampled from the posterior (the mode at eval). Off for tiny: its VAE is random, with a
        # posterior std (~1) three times its means' spread, so samples would bury the frames in noise
        sample_posterior=not tiny,
        f_rts="constant",        # motion encoder's box input: "constant" (0, 0, 1) as the official
                                 # inference, or "boxes" (the real (dy, dx, s) of the two face boxes)
    ))
    # The dual GAN head (xnemo_jax/gan_head.py; trained in the motion, finetune and all stages): its preset
    # (tiny: 32², official: 256² with a ResNet-50 appearance encoder) and any GanHeadConfig field.
    # motion_zero_init: the head's mapping starts with zero weights on the motion code (False: drawn like the
    # rest, which lets the untrained head collapse the motion encoder to a constant; xnemo_jax/gan_head.py)
    c.gan_head = ml_collections.ConfigDict(dict(preset=variant, motion_zero_init=True))
    # Total loss = L_ldm (Min-SNR weighted) + gan * L_gan; L_gan = adv L_adv + l1 L1 + vgg L_VGG19 +
    # vggface L_VGGFace + fm L_FM with the paper's weights. gan = 0 turns the head off (the paper's
    # "w/o GAN head" ablation). The VGG19 / VGGFace2 terms need converted weights (launch/convert.py vgg19 /
    # vggface2); the tiny default disables them so it runs without downloads (the log says so).
    c.loss = ml_collections.ConfigDict(dict(
        gan=1.0, adv=1.0, l1=1.0, vgg=0.0 if tiny else 3e-2, vggface=0.0 if tiny else 6e-3, fm=10.0,
        vgg19_path="", vggface_path="",
        r1=0.0, r1_every=16,     # optional lazy R1 on the discriminator (off)
    ))
    # AdamW (paper: lr 1e-5) for the diffusion networks; the GAN head's generator and its discriminator
    # have their own states (gan_lr, d_lr: Burkov et al.'s 2e-4 at full size; ours, not published).
    c.optim = ml_collections.ConfigDict(dict(lr=1e-3 if tiny else 1e-5, gan_lr=1e-3 if tiny else 2e-4,
                                             d_lr=1e-3 if tiny else 2e-4, b1=0.9, b2=0.999, eps=1e-8,
                                             weight_decay=1e-2, grad_clip=1.0, warmup_steps=20 if tiny else 1000))

    c.batch_size = 4 if tiny else 64
    c.num_train_steps = 240 if tiny else 100_000
    c.log_every_steps = 10 if tiny else 100
    c.eval_every_steps = 80 if tiny else 5_000
    c.checkpoint_every_steps = 80 if tiny else 5_000
    c.checkpoint_keep = 3
    c.preemption_check_every = 10
    c.eval = ml_collections.ConfigDict(dict(num_batches=2 if tiny else 8, at_start=True, sample_rows=8,
                                            sample_steps=4 if tiny else 25, guidance=3.5))

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sharding_rules = (("conv_out", "fsdp"), ("conv_in", "tensor"), ("embed_out", "fsdp"), ("embed_in", "tensor"))
    c.debug_nan_at_step = 0
    return c
