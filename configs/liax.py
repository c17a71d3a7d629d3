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
    ))

    c.batch_size = 8 if variant == "tiny" else 32
    c.num_train_steps = 300 if variant == "tiny" else 500_000
    c.log_every_steps = 10 if variant == "tiny" else 100
    c.eval_every_steps = 100 if variant == "tiny" else 5_000
    c.checkpoint_every_steps = 100 if variant == "tiny" else 5_000

    # Device mesh (axes data, fsdp, tensor; -1 fills the remaining devices).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    return c
