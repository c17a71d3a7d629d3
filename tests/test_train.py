"""End-to-end training runtime through the real CLI (launch/train.py) on tiny LIA-X + synthetic data.

Resume exactness (SIGKILL at a random step), SIGTERM save, NaN guard, a corrupt latest checkpoint, real
prepared datasets and the eval pass (sharding and multi-process runs: ``test_train_sharding.py``).
Subprocesses share a persistent XLA compilation cache, so only the first run of each program pays for
compiling it.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from train_helpers import STEPS, checkpoints, cmd, final, make_env, metrics, run, wait_for_step

from conftest import ROOT


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_env(tmp_path_factory)


@pytest.fixture(scope="module")
def reference_run(env, tmp_path_factory):
    """An uninterrupted run: every later run must reproduce its final losses bit for bit."""
    workdir = tmp_path_factory.mktemp("reference")
    r = run(env, workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    return workdir


def test_uninterrupted_run_writes_checkpoints_metrics_samples(reference_run):
    workdir = reference_run
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == STEPS
    assert checkpoints(workdir) == [4, 6, 8]            # keep-3
    rows = metrics.read_metrics(str(workdir))
    logged = [r["step"] for r in rows if "train/loss" in r]
    assert logged == list(range(1, STEPS + 1))
    for name in ("eval/l1", "eval/psnr", "eval/ssim", "eval/l1_copy_source", "eval/cross_l1"):
        assert np.isfinite(metrics.last_value(rows, name, STEPS)), name
    assert (workdir / "samples" / f"self_step_{STEPS:07d}.png").exists()
    assert (workdir / "samples" / f"cross_step_{STEPS:07d}.png").exists()
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(workdir))


def test_sigkill_at_random_step_then_resume_is_bit_identical(env, reference_run, tmp_path):
    kill_at = random.Random().randint(2, STEPS - 1)
    print(f"SIGKILL after step {kill_at}")
    proc = subprocess.Popen(cmd(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=env)
    try:
        wait_for_step(proc, tmp_path, kill_at)
    finally:
        proc.kill()
        proc.wait()
    r = run(env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("train/loss", "train/d_loss", "train/l1"):
        assert final(tmp_path, name) == final(reference_run, name), name


def test_sigterm_saves_and_exits_cleanly_then_resumes(env, reference_run, tmp_path):
    proc = subprocess.Popen(cmd(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=env)
    wait_for_step(proc, tmp_path, 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "preempted" and 3 <= summary["step"] < STEPS
    assert summary["last_checkpoint"] == summary["step"] and checkpoints(tmp_path)[-1] == summary["step"]
    assert "SIGTERM: saved step" in err
    r = run(env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert final(tmp_path) == final(reference_run)


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(env, tmp_path):
    r = run(env, tmp_path, "--config.debug_nan_at_step=5")
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "train/loss is nan at step 5" in last
    assert "last good checkpoint (step 4) is kept" in last
    assert checkpoints(tmp_path) == [2, 4]
    # the kept checkpoint is intact: the run resumes from it and finishes
    r = run(env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "checkpoints/4" in r.stderr


def test_corrupt_latest_checkpoint_is_skipped(env, reference_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference_run, workdir)
    state_dir = workdir / "checkpoints" / str(STEPS) / "state"
    for root, _, files in os.walk(state_dir):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    r = run(env, workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"checkpoint step {STEPS} in" in r.stderr and "unreadable" in r.stderr
    assert f"checkpoints/{STEPS - 2}" in r.stderr                        # resumed from the previous step
    assert any(n.startswith(f"{STEPS}-") for n in os.listdir(workdir / "checkpoints.corrupt"))
    assert final(workdir) == final(reference_run)                       # redone steps match exactly


@pytest.fixture(scope="module")
def small_video_datasets(tmp_path_factory, astronaut):
    """Three short real-photo videos prepared twice: with the default eval fraction and with none."""
    from conftest import moving_photo_frames
    from input_pipeline import video_io

    root = tmp_path_factory.mktemp("small_videos")
    videos = root / "videos"
    videos.mkdir()
    frames, _ = moving_photo_frames(astronaut, 12)
    for i, name in enumerate(("anna.mp4", "ben.mp4", "carl.mp4")):
        video_io.write_video(videos / name, np.roll(frames, 2 * i, axis=0), fps=25)
    out = {}
    for key, fraction in (("default", None), ("no_eval", "0")):
        args = [sys.executable, os.path.join(ROOT, "launch", "prepare_data.py"), f"--input={videos}",
                f"--output={root / key}", "--resolution=64", "--clip_length=8", "--min_clip_length=4",
                "--detect_every=4"] + ([f"--eval_fraction={fraction}"] if fraction else [])
        r = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]
        out[key] = (root / key, r.stdout)
    return out


def test_small_real_dataset_gets_both_splits_and_trains(env, small_video_datasets, tmp_path):
    data, stdout = small_video_datasets["default"]
    info = json.loads((data / "dataset_info.json").read_text())
    # 3 videos at the default 5 %: no path hash falls that low here, yet one video is held out
    assert info["num_sources"] == {"train": 2, "eval": 1}, info
    assert info["num_clips"] == {"train": 4, "eval": 2}              # 12 frames -> clips of 8 + 4
    assert "train: 2 videos, 4 clips" in stdout and "eval: 1 video, 2 clips" in stdout
    for name, eval_every in (("eval_on", "2"), ("eval_off", "0")):
        r = run(env, tmp_path / name, f"--config.data.path={data}", "--config.num_train_steps=2",
                 f"--config.eval_every_steps={eval_every}")
        assert r.returncode == 0, r.stderr[-3000:]
        rows = metrics.read_metrics(str(tmp_path / name))
        assert [x["step"] for x in rows if "train/loss" in x] == [1, 2]
        assert any("eval/l1" in x for x in rows) == (eval_every != "0")
        assert (tmp_path / name / "samples").exists() == (eval_every != "0")


def test_dataset_without_eval_split_trains_with_eval_off_and_says_how_to_fix(env, small_video_datasets, tmp_path):
    data, stdout = small_video_datasets["no_eval"]
    assert "eval: 0 videos, 0 clips" in stdout
    r = run(env, tmp_path / "off", f"--config.data.path={data}", "--config.num_train_steps=2",
             "--config.eval_every_steps=0")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run(env, tmp_path / "on", f"--config.data.path={data}", "--config.num_train_steps=2")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: {data}: the 'eval' split of this dataset is empty"), lines[-1]
    assert "--eval_fraction=" in lines[-1] and "--config.eval_every_steps=0" in lines[-1]
    assert not (tmp_path / "on" / "checkpoints").exists()


def test_eval_writes_samples_from_the_eval_pass_without_a_second_forward(tmp_path, monkeypatch):
    """The sample grids come from the eval step's own reconstruction: each eval set's program traces the
    generator once (a separate sample program used to run the first batch's forward pass again)."""
    from configs import liax as liax_configs
    from launch import trainer
    from liax_jax import training

    traced = []
    original = training.LiaXTask.reconstruct
    monkeypatch.setattr(training.LiaXTask, "reconstruct",
                        lambda self, *a: traced.append(1) or original(self, *a))
    config = liax_configs.get_config("tiny")
    config.batch_size, config.mesh.data = 4, 1
    config.eval.num_batches, config.eval.cross_identity_batches = 2, 1
    config.data.synthetic_clips, config.data.synthetic_eval_clips = 8, 4
    rt = trainer.Runtime(config, str(tmp_path))
    try:
        state = rt.init_fn()
        results = rt.evaluate(0, state)
    finally:
        rt.checkpointer.close()
    assert len(traced) == 2                                   # one trace per eval set (self, cross), no sampler
    assert {"eval/l1", "eval/cross_l1"} <= set(results)
    for name in ("self_step_0000000.png", "cross_step_0000000.png"):
        assert (tmp_path / "samples" / name).exists(), name
