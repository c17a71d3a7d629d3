"""Initial weights of a training run: ``init.from_workdir`` (stage hand-off), ``init.sd`` and
``init.animatediff``.

``init.from_workdir``: a run starts from the newest checkpoint of a previous stage's run.

The previous run's checkpoint is written by the runtime's own checkpointer (``launch.checkpointing``) from
the state ``XNemoTask.init`` builds, so its trainable / frozen split is the other stage's; the new task
(another stage, another seed) must come up with exactly those weights, BatchNorm statistics and GAN head,
and fresh optimizer states.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from configs import xnemo as xnemo_config
from input_pipeline.errors import UserError
from launch import checkpointing, models, trainer
from xnemo_jax import training


def _config(stage, frames, seed, **init):
    c = xnemo_config.get_config("tiny")
    c.stage, c.data.num_frames, c.batch_size, c.seed = stage, frames, 2, seed
    c.init.update(init)
    return c


def _weights(state) -> dict:
    """Every network array of a task state, by path, whatever the trainable / frozen split."""
    out = {}
    for part in ("trainable", "fixed", "buffers", "gan_generator", "gan_buffers", "discriminator"):
        if part in state:
            flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state[part]))[0]
            out.update({(part if part.startswith(("gan", "disc")) else "model",) + tuple(str(k) for k in p):
                        np.asarray(v) for p, v in flat})
    return out


@pytest.fixture(scope="module")
def previous_run(tmp_path_factory):
    """A stage 'all' run (GAN head on) checkpointed at step 3, as launch/train.py writes it."""
    workdir = tmp_path_factory.mktemp("stage_all")
    config = _config("all", 2, seed=0)
    task = training.XNemoTask(config)
    state = {"step": np.int32(3), "rng": jax.random.key_data(jax.random.key(5)), "model": task.init(jax.random.key(0))}
    it, _ = trainer._make_data(config, 2, False, task)
    ckpt = checkpointing.TrainCheckpointer(str(workdir / "checkpoints"), asynchronous=False)
    ckpt.save(3, state, it, trainer._config_dict(config))
    ckpt.wait()
    ckpt.close()
    return workdir, _weights(state["model"])


def test_the_motion_stage_starts_from_the_previous_runs_weights_and_gan_head(previous_run):
    workdir, want = previous_run
    task = models.make_task(_config("motion", 1, seed=1, from_workdir=str(workdir)))
    state = task.init(jax.random.key(1))
    got = _weights(state)
    assert set(got) == set(want) and len(got) > 100
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=str(k))
    fresh = _weights(training.XNemoTask(_config("motion", 1, seed=1)).init(jax.random.key(1)))
    drawn = [k for k in want if np.ptp(fresh[k]) > 0]  # not constant-initialised (zeros, ones: equal across seeds)
    assert sum(not np.array_equal(fresh[k], want[k]) for k in drawn) > 0.5 * len(drawn)  # seed 1 differs
    assert "initialised from" in task.describe(state) and "step 3, stage 'all'" in task.describe(state)
    # a new stage trains another set: its optimizer starts from zero moments
    for leaf in jax.tree.leaves(state["opt"]):
        assert not np.any(np.asarray(leaf)), "optimizer state must start fresh"
    # the motion stage trains fewer parameters than 'all' did: the split changed, the values did not
    assert 0 < sum(x.size for x in jax.tree.leaves(state["trainable"])) < sum(
        x.size for x in jax.tree.leaves(training.XNemoTask(_config("all", 2, 0)).init(jax.random.key(0))["trainable"]))


def test_the_image_stage_takes_the_network_weights_without_a_gan_head(previous_run):
    workdir, want = previous_run
    state = models.make_task(_config("image", 1, seed=2, from_workdir=str(workdir))).init(jax.random.key(2))
    got = _weights(state)
    assert "gan_generator" not in state
    assert set(got) == {k for k in want if k[0] == "model"}
    for k in got:
        np.testing.assert_array_equal(got[k], want[k], err_msg=str(k))


def test_bad_hand_offs_are_refused_with_the_path(tmp_path):
    with pytest.raises(UserError, match="no such checkpoint folder") as e:
        models.make_task(_config("image", 1, 0, from_workdir=str(tmp_path / "missing")))
    assert str(tmp_path / "missing") in str(e.value)
    with pytest.raises(UserError, match="init.sd: no such folder") as e:
        models.make_task(_config("image", 1, 0, sd=str(tmp_path / "no_sd")))
    assert str(tmp_path / "no_sd") in str(e.value)
    with pytest.raises(ValueError, match="build the task with launch.models.make_task"):
        training.XNemoTask(_config("image", 1, 0, from_workdir=str(tmp_path))).init(jax.random.key(0))


def test_a_run_of_another_model_size_is_refused(previous_run):
    workdir, _ = previous_run
    c = _config("image", 1, 0, from_workdir=str(workdir))
    c.data.resolution = 128
    with pytest.raises(UserError, match="start from a run of the same model"):
        models.make_task(c)


# ------------------------------------------------------------------------------ init.sd / init.animatediff
def _pure(net) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(net, nnx.Param)))[0]}


@pytest.fixture(scope="module")
def sd_parts(tmp_path_factory):
    """A tiny random SD UNet / SVD VAE / CLIP (diffusers / transformers folders) converted with
    ``launch/convert.py sd``, an AnimateDiff-layout temporal-module file, and what each should load as."""
    import torch
    import xnemo_helpers
    from xnemo_helpers import random_official_state

    from launch import convert as convert_cli
    from xnemo_jax import convert
    from xnemo_jax import denoiser as D
    from xnemo_jax import model as M

    release = str(tmp_path_factory.mktemp("release"))
    xnemo_helpers.write_tiny_release(release)
    paths = {k: f"{release}/{v}" for k, v in convert.RELEASE_FOLDERS.items()}
    out = str(tmp_path_factory.mktemp("sd") / "converted")
    assert convert_cli.main(["sd", f"--unet={paths['unet']}", f"--vae={paths['vae']}",
                             f"--clip={paths['image_encoder']}", f"--output={out}"]) in (0, None)
    want = {part: _pure(convert.load_pretrained(paths[part], kind))
            for part, kind in (("unet", "unet"), ("vae", "svd_vae"), ("image_encoder", "clip_vision"))}
    shapes = D.official_keys(M.abstract(M.XNemoConfig.preset("tiny")).denoiser)
    temporal = {k: v for k, v in random_official_state(shapes, 7).items()
                if ".temporal_modules." in k and not k.endswith(".pe")}
    mm = str(tmp_path_factory.mktemp("animatediff") / "mm_sd_v15_v2.ckpt")
    torch.save({k.replace(".temporal_modules.", ".motion_modules."): torch.from_numpy(v) for k, v in temporal.items()},
               mm)
    return out, want, mm, temporal


def test_init_sd_fills_denoiser_reference_net_vae_clip_and_animatediff_the_temporal_modules(sd_parts):
    from xnemo_jax import denoiser as D

    out, want, mm, temporal = sd_parts
    task = models.make_task(_config("motion", 1, seed=3, sd=out, animatediff=mm))
    model = task._merge(task.init(jax.random.key(3)))
    fresh = training.XNemoTask(_config("motion", 1, seed=3))._merge(
        training.XNemoTask(_config("motion", 1, seed=3)).init(jax.random.key(3)))
    den, ref = _pure(model.denoiser), _pure(model.reference_net)
    for k, v in want["unet"].items():                       # every SD weight in the denoiser ...
        np.testing.assert_array_equal(den[k], v, err_msg=k)
        if k in ref:                                         # ... and in the reference net
            np.testing.assert_array_equal(ref[k], v, err_msg=k)
    assert set(ref) < set(want["unet"]) and {k.split("[")[1] for k in set(want["unet"]) - set(ref)} == \
        {"'conv_norm_out']", "'conv_out']"}                 # the reference net has no output head
    for part in ("vae", "image_encoder"):
        got = _pure(getattr(model, part))
        assert set(got) == set(want[part])
        for k, v in want[part].items():
            np.testing.assert_array_equal(got[k], v, err_msg=k)
    # the motion branch keeps its initialisation; the temporal modules come from the AnimateDiff file
    fresh_den = _pure(fresh.denoiser)
    extra = [k for k in den if k not in want["unet"]]
    assert extra and all("'motion_modules'" in k or "'temporal_modules'" in k for k in extra)
    official = D.to_official(model.denoiser)
    for k, v in temporal.items():
        np.testing.assert_array_equal(official[k], v, err_msg=k)
    for k in extra:
        if "'motion_modules'" in k:
            np.testing.assert_array_equal(den[k], fresh_den[k], err_msg=k)
    for k, v in _pure(fresh.motion_encoder).items():
        np.testing.assert_array_equal(_pure(model.motion_encoder)[k], v, err_msg=k)
    text = task.describe(task.init(jax.random.key(3)))
    assert "unet from" in text and "temporal modules from" in text


def test_init_sd_refuses_an_incomplete_folder_and_init_sd_with_from_workdir(sd_parts, tmp_path):
    import shutil

    out = sd_parts[0]
    partial = tmp_path / "partial"
    shutil.copytree(out, partial)
    shutil.rmtree(partial / "image_encoder")
    with pytest.raises(UserError, match="no image_encoder/ part"):
        models.make_task(_config("image", 1, 0, sd=str(partial)))
    with pytest.raises(UserError, match="give one of them"):
        models.make_task(_config("image", 1, 0, sd=out, from_workdir=str(tmp_path)))
