"""LIA-X configs: ``--config=configs/liax.py[:variant]``.

Variants: ``official`` (512², channel scale 2, 40 motion directions: the released model), ``middle``
(scale 1), ``base`` (scale 0.5), ``base256`` (256², scale 0.5), ``tiny`` (64², a CPU demo/test model
that jit-compiles in seconds). Field names shared by every model's config (scripts rely on them):
``seed``, ``batch_size`` (global), ``num_train_steps``, ``log_every_steps``, ``eval_every_steps``,
``checkpoint_every_steps``, ``data.path`` (empty: built-in synthetic talking heads) and ``mesh.*``.
"""

import ml_collections

VARIANTS = ("official", "middle", "base", "base256", "tiny")


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    variant = variant or "tiny"
    if variant not in VARIANTS:
        raise ValueError(f"unknown LIA-X config variant {variant!r}; choose one of {VARIANTS}")
    c = ml_collections.ConfigDict()
    c.model_name = "liax"
    c.variant = variant
    c.seed = 0

    resolution, scale, groups = {"official": (512, 2.0, 32), "middle": (512, 1.0, 32), "base": (512, 0.5, 32),
                                 "base256": (256, 0.5, 32), "tiny": (64, 0.125, 4)}[variant]
    # liax_jax.model.LiaXConfig fields; dtype is the compute dtype (float32, bfloat16 or float64).
    c.model = ml_collections.ConfigDict(dict(resolution=resolution, scale=scale, motion_dim=40, style_dim=512,
                                             norm_groups=groups, dtype="float32"))

    # Data: empty path = built-in synthetic talking heads rendered on the fly.
    c.data = ml_collections.ConfigDict(dict(
        path="",
        resolution=resolution,
        max_gap=0,               # max frame distance within a pair (0: any two frames of a clip)
        worker_count=0,          # Grain process workers (0: threads only)
        read_threads=2,
        prefetch=4,
        synthetic_clips=512,     # size of the synthetic training set (eval uses other identities)
        synthetic_eval_clips=16,
        synthetic_frames=32,
        synthetic_fps=25.0,      # frame rate of the synthetic motion (lower: larger motion between frames)
    ))

    c.batch_size = 8 if variant == "tiny" else 32
    c.num_train_steps = 300 if variant == "tiny" else 500_000
    c.log_every_steps = 10 if variant == "tiny" else 100
    c.eval_every_steps = 100 if variant == "tiny" else 5_000   # <= 0 disables evaluation
    c.checkpoint_every_steps = 100 if variant == "tiny" else 5_000

    c.checkpoint_keep = 3          # newest checkpoints kept in workdir/checkpoints
    # Multi-process jobs agree on a SIGTERM stop every this many steps (a blocking host all-gather); up to
    # this many - 1 steps run after the signal before the save (launch/trainer.py _Preemption).
    c.preemption_check_every = 10

    # Discriminator (StyleGAN2, minibatch stddev); resolution follows the model.
    c.discriminator = ml_collections.ConfigDict(dict(channel_multiplier=1, scale=0.125 if variant == "tiny" else 1.0,
                                                     stddev_group=4))

    # Generator loss = l1*L1 + perceptual*VGG19 + adversarial*softplus(-D) + sparsity*mean|alpha|.
    # The VGG19 perceptual loss needs converted ImageNet weights (launch/convert.py vgg19); the tiny demo
    # config disables it so it runs anywhere without downloads (the log says so).
    c.loss = ml_collections.ConfigDict(dict(
        l1=1.0,
        perceptual=0.0 if variant == "tiny" else 1.0,
        vgg19_path="",
        perceptual_scales=(1.0, 0.5, 0.25, 0.125),
        perceptual_layer_weights=(10.0, 10.0, 10.0, 10.0, 10.0),
        adversarial=0.05 if variant == "tiny" else 1.0,
        sparsity=0.01,           # LIA-X's sparse-motion weight (unpublished; our default, see liax_jax/training.py)
        r1=0.0,                  # optional lazy R1 on the discriminator (off, as in LIA)
        r1_every=16,
    ))

    # Adam with LIA's settings (lazy-regularisation ratios 4/5 and 16/17 folded in). The tiny demo trains
    # its generator 3x faster (lr 0.005) and keeps the GAN term small (0.05): without the VGG loss the
    # discriminator otherwise overpowers L1 within ~200 steps.
    c.optim = ml_collections.ConfigDict(dict(g_lr=0.005 if variant == "tiny" else 0.002 * 4 / 5, g_b1=0.0,
                                             g_b2=0.99 ** (4 / 5), d_lr=0.002 * 16 / 17, d_b1=0.0,
                                             d_b2=0.99 ** (16 / 17), eps=1e-8))
    c.init_flow_gain = 0.0         # flow heads start at 0 x their N(0,1) init: identity warps (liax_jax/training.py)

    # Evaluation on held-out clips (and, on synthetic data, cross-identity reenactment with ground truth).
    c.eval = ml_collections.ConfigDict(dict(num_batches=4 if variant == "tiny" else 16,
                                            cross_identity_batches=2 if variant == "tiny" else 8,
                                            at_start=True, sample_rows=8))

    # Device mesh (axes data, fsdp, tensor; -1 fills the remaining devices) and the logical-axis rules
    # that map parameter axes onto it (first match wins; non-divisible dimensions stay replicated).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sharding_rules = (("conv_out", "fsdp"), ("conv_in", "tensor"), ("embed_out", "fsdp"), ("embed_in", "tensor"))

    # Names of motion directions for `launch/animate.py --edit=name=value` ("name=id,name2=id+id"): which
    # direction does what is only known after training; set it when you know (or name them at export,
    # `launch/convert.py liax --from-train=WORKDIR --directions=...`).
    c.directions = ""
    c.debug_nan_at_step = 0        # fault injection for tests: poison the weights before this step
    return c
