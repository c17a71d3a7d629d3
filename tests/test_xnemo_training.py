"""X-NeMo training (``xnemo_jax/training.py``): the recipe's formulas, each stage's trainable set, and steps
that leave every frozen parameter bit-identical (tiny bundle, batch 2, one shared data batch)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import xnemo as xnemo_config
from input_pipeline import augment, pipeline
from xnemo_jax import model as model_lib
from xnemo_jax import scheduler as ddim
from xnemo_jax import training


def config(stage="all", frames=2, **changes):
    c = xnemo_config.get_config("tiny")
    c.stage, c.data.num_frames, c.batch_size = stage, frames, 2
    c.optim.warmup_steps = 0     # (warm-up starts at lr 0: a first step would change nothing)
    for k, v in changes.items():
        c[k] = v
    return c


# --------------------------------------------------------------------------------------------- recipe
def test_min_snr_weights_match_the_formula():
    """min(SNR, 5) / SNR with SNR = abar / (1 - abar), abar from the scaled-linear betas written out here."""
    c = ddim.XNEMO_DDIM_CONFIG
    betas = np.linspace(math.sqrt(c.beta_start), math.sqrt(c.beta_end), c.num_train_timesteps, dtype=np.float64) ** 2
    abar = np.cumprod(1.0 - betas)
    t = np.array([0, 1, 10, 100, 250, 500, 750, 999])
    snr = abar[t] / (1 - abar[t])
    want = np.minimum(snr, 5.0) / snr
    schedule = ddim.make_schedule(c)
    got = np.asarray(training.min_snr_weight(schedule.alphas_cumprod, jnp.asarray(t), 5.0))
    # the schedule is float32 (torch's linspace and cumprod, as the official code): 2.8e-5 relative at t = 0
    np.testing.assert_allclose(got, want, rtol=5e-5)
    assert got[0] < 0.01 and got[-1] == 1.0            # low t: SNR huge -> small weight; high t: weight 1
    np.testing.assert_array_equal(np.asarray(training.min_snr_weight(schedule.alphas_cumprod, jnp.asarray(t), 0.0)),
                                  np.ones(len(t), np.float32))


def test_offset_noise_is_gaussian_plus_a_per_example_per_channel_constant():
    key = jax.random.key(3)
    shape = (3, 4, 8, 8, 4)
    k_noise, k_offset = jax.random.split(key)
    base = np.asarray(jax.random.normal(k_noise, shape))
    offset = np.asarray(jax.random.normal(k_offset, (3, 1, 1, 1, 4)))
    got = np.asarray(training.offset_noise(key, shape, 0.05))
    np.testing.assert_allclose(got, base + 0.05 * offset, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(training.offset_noise(key, shape, 0.0)), base)
    delta = got - base                                  # constant over frames and pixels, differs per (b, c)
    assert np.ptp(delta, axis=(1, 2, 3)).max() < 1e-6 and np.ptp(delta[:, 0, 0, 0]) > 1e-3


# --------------------------------------------------------------------------------------------- stages
def _abstract(stage):
    task = training.make_task(config(stage, frames=1 if stage in ("image", "motion") else 2))
    return task, jax.eval_shape(task.init, jax.random.key(0))


def _networks(tree) -> dict[str, set]:
    """{network: {"motion_modules" / "temporal_modules" / "other"}} of a state's parameter paths."""
    out: dict[str, set] = {}
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [str(getattr(p, "key", getattr(p, "idx", p))) for p in path]
        kind = "motion_modules" if "motion_modules" in names else "temporal_modules" \
            if "temporal_modules" in names else "other"
        out.setdefault(names[0], set()).add(kind)
    return out


@pytest.mark.parametrize("stage, want", [
    ("image", {"denoiser": {"other"}, "reference_net": {"other"}}),
    ("motion", {"denoiser": {"other", "motion_modules"}, "reference_net": {"other"}, "motion_encoder": {"other"}}),
    ("temporal", {"denoiser": {"temporal_modules"}}),
    ("finetune", {"denoiser": {"other", "motion_modules", "temporal_modules"}, "reference_net": {"other"},
                  "motion_encoder": {"other"}}),
    ("all", {"denoiser": {"other", "motion_modules", "temporal_modules"}, "reference_net": {"other"},
             "motion_encoder": {"other"}}),
])
def test_each_stage_trains_its_set_and_only_that_set_has_optimizer_state(stage, want):
    task, state = _abstract(stage)
    assert _networks(state["trainable"]) == want
    frozen = _networks(state["fixed"])
    assert {"vae", "image_encoder"} <= set(frozen)      # always frozen
    size = lambda t: sum(math.prod(x.shape) for x in jax.tree.leaves(t))  # noqa: E731
    # AdamW keeps mu and nu for the trainable parameters only (plus scalar counts)
    assert size(state["opt"]) - 2 * size(state["trainable"]) < 16
    # trainable + frozen = every parameter of the bundle (buffers and BatchNorm statistics apart)
    counts = model_lib.parameter_counts(model_lib.abstract(task.model_config))
    assert size(state["trainable"]) + size(state["fixed"]) == sum(counts.values())
    assert size(state["fixed"]) >= counts["vae"] + counts["image_encoder"]


def test_clips_are_refused_for_the_single_frame_stages():
    with pytest.raises(ValueError, match="num_frames=1"):
        training.make_task(config("image", frames=2))
    with pytest.raises(ValueError, match="unknown stage"):
        training.make_task(config("warmup"))


# ---------------------------------------------------------------------------------------------- steps
@pytest.fixture(scope="module")
def batches():
    task = training.make_task(config("all", frames=2))
    src = pipeline.open_source("", "train", synthetic_clips=4, synthetic_frames=8, synthetic_size=64, seed=0)
    kw = dict(resolution=64, motion_size=task.motion_size, clip_size=task.clip_size, seed=0)
    return {f: pipeline.xnemo_dataset(src, batch_size=2, num_frames=f, augment=augment.AugmentConfig(), **kw)[0]
            for f in (1, 2)}


def _leaves(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# finetune runs the same program as all (only its initial weights differ: init.from_workdir)
@pytest.mark.parametrize("stage", ["image", "motion", "temporal", "all"])
def test_steps_change_the_trainable_set_and_leave_frozen_parameters_bit_identical(stage, batches):
    frames = 1 if stage in ("image", "motion") else 2
    task = training.make_task(config(stage, frames=frames))
    assert task.use_gan == (stage in ("motion", "all"))
    state = task.init(jax.random.key(0))   # eager: a jitted init of the bundle compiles for minutes
    assert ("gan_generator" in state) == task.use_gan and ("discriminator" in state) == task.use_gan
    before = {k: _leaves(v) for k, v in state.items()}
    step = jax.jit(lambda s, b, i: task.train_step(s, {}, b, i, jax.random.key(i)))
    for i in range(2):
        state, m = step(state, batches[frames], i)
        assert np.isfinite(float(m["loss"]))
        if task.use_gan:   # the total is the weighted LDM loss plus loss.gan x L_gan
            np.testing.assert_allclose(float(m["loss"]), float(m["ldm_loss"]) + float(m["gan_loss"]), rtol=1e-5)
            assert np.isfinite(float(m["d_loss"]))
    after = {k: _leaves(v) for k, v in state.items()}
    for k, v in before["fixed"].items():
        np.testing.assert_array_equal(after["fixed"][k], v, err_msg=k)
    motion_stats_change = stage in ("motion", "all")   # the motion encoder's BatchNorm trains with it
    for k, v in before["buffers"].items():
        if not (motion_stats_change and "motion_encoder" in k):
            np.testing.assert_array_equal(after["buffers"][k], v, err_msg=k)
    groups = ["trainable"] + (["gan_generator", "discriminator"] if task.use_gan else [])
    for g in groups:
        changed = [k for k, v in before[g].items() if not np.array_equal(after[g][k], v)]
        assert len(changed) > 0.9 * len(before[g]), (g, len(changed), len(before[g]))


def test_the_gan_head_needs_its_loss_networks_unless_their_terms_are_off():
    c = config("all")
    c.loss.vgg = 3e-2
    with pytest.raises(ValueError, match="convert.py vgg19"):
        training.make_task(c)
    c.loss.vgg, c.loss.vggface = 0.0, 6e-3
    with pytest.raises(ValueError, match="convert.py vggface2"):
        training.make_task(c)
    c.loss.vggface_path = "/some/dir"
    task = training.make_task(c)
    assert set(task.frozen_weights()) == {"vggface"}
    c.loss.gan = 0.0                       # the paper's "w/o GAN head" ablation: no head, no loss networks
    task = training.make_task(c)
    assert not task.use_gan and task.frozen_weights() == {}
    assert not training.make_task(config("temporal")).use_gan


# ----------------------------------------------------------------------------------------------- eval
def test_eval_step_metrics_and_its_sampling_loop_equal_a_step_by_step_loop(batches):
    """The eval pass at init: finite metrics per example; the zero-initialised motion modules add exactly
    nothing yet (shuffled motion = real motion), while another example's reference changes the loss; the
    sampled reconstruction (one ``fori_loop``) equals the same DDIM + CFG steps taken one call at a time."""
    task = training.make_task(config("all", frames=2))
    state = task.init(jax.random.key(0))
    batch = batches[2]
    out, cols = jax.jit(lambda s, b: task.eval_step(s, {}, b))(state, batch)
    assert set(out) == {"ldm_loss", "ldm_loss_shuffled_motion", "ldm_loss_shuffled_reference", "motion_spread",
                        "gan_l1", "gan_psnr", "gan_l1_copy_source", "sample_l1", "sample_psnr", "vae_l1",
                        "l1_copy_source"}
    for k, v in out.items():
        assert v.shape == (2,) and np.all(np.isfinite(np.asarray(v))), k
    np.testing.assert_array_equal(out["ldm_loss_shuffled_motion"], out["ldm_loss"])
    assert np.all(np.abs(np.asarray(out["ldm_loss_shuffled_reference"] - out["ldm_loss"])) > 1e-6)
    assert cols["prediction"].shape == (2, 64, 64, 3)

    model = task._merge(state)
    lat, ref_lat, context = task._encode(model, batch, None, False)
    motion, ref_motion = task._motion(model, batch, train=False, rng=None)
    # motion_spread: each example's RMS distance from the batch-mean motion tokens (0 = a collapsed code)
    m = np.asarray(motion, np.float64).reshape(2, -1)
    np.testing.assert_allclose(out["motion_spread"], np.sqrt(np.mean((m - m.mean(0)) ** 2, axis=1)), rtol=1e-4)
    noise = jax.random.normal(jax.random.key(0), lat.shape, jnp.float32)
    schedule = training.sampling.schedule_for(task.sample_steps)
    x = jax.vmap(lambda r, n: training.sampling.initial_latents(schedule, r, n))(ref_lat, noise)
    cond = jnp.ones((2,), bool)
    bank = training.denoiser_lib.reference_bank(model.reference_net, ref_lat, context, timestep=0)

    @jax.jit
    def one_step(x, t):
        uncond = task._eps(model, x, t, jnp.zeros_like(context), bank, jnp.broadcast_to(ref_motion, motion.shape),
                           ~cond)   # (the bank is masked off for these examples)
        eps = task._eps(model, x, t, context, bank, motion, cond)
        return ddim.step(schedule, uncond + task.guidance * (eps - uncond), t, x)[0]

    assert len(schedule.timesteps) == task.sample_steps == 4
    for t in schedule.timesteps:
        x = one_step(x, jnp.int32(t))
    z = x.reshape((4,) + x.shape[2:]) / model.vae.scaling_factor
    want = jnp.clip(model.vae.decode(z, 2).astype(jnp.float32), -1, 1).reshape(2, 2, 64, 64, 3)
    # the same arithmetic in another batching (CFG halves concatenated there): float32 rounding only
    np.testing.assert_allclose(np.asarray(cols["prediction"]), np.asarray(want[:, 0]), atol=2e-5)
