"""End-to-end training runtime through the real CLI (launch/train.py) on tiny LIA-X + synthetic data.

Resume exactness (SIGKILL at a random step), SIGTERM save, NaN guard, a corrupt latest checkpoint,
8-device sharding against 1 device, and a 2-process (gloo, 127.0.0.1) run. Subprocesses share a
persistent XLA compilation cache, so only the first run of each program pays for compiling it.
"""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT
from launch import metrics

STEPS = 8
TINY = ["--config.batch_size=4", f"--config.num_train_steps={STEPS}", "--config.log_every_steps=1",
        "--config.eval_every_steps=1000", "--config.checkpoint_every_steps=2", "--config.eval.at_start=False",
        "--config.eval.num_batches=1", "--config.eval.cross_identity_batches=1", "--config.data.synthetic_clips=16",
        "--config.data.synthetic_eval_clips=4", "--config.mesh.data=1"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ)
    e["XLA_FLAGS"] = ""                      # one CPU device per process unless a test asks for more
    e["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("xla_cache"))
    e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    e.pop("JAX_NUM_CPU_DEVICES", None)
    return e


def _cmd(workdir, *extra):
    return [sys.executable, os.path.join(ROOT, "launch", "train.py"), f"--config={ROOT}/configs/liax.py:tiny",
            f"--workdir={workdir}", *TINY, *extra]


def _run(env, workdir, *extra, timeout=900):  # a guard against hangs, not a speed bound
    return subprocess.run(_cmd(workdir, *extra), capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def _wait_for_step(proc, workdir, step, timeout=400):
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = metrics.read_metrics(str(workdir))
        if any(r["step"] >= step and "train/loss" in r for r in rows):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before step {step}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def _final(workdir, name="train/loss"):
    return metrics.last_value(metrics.read_metrics(str(workdir)), name, STEPS)


def _checkpoints(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit())


@pytest.fixture(scope="module")
def reference_run(env, tmp_path_factory):
    """An uninterrupted run: every later run must reproduce its final losses bit for bit."""
    workdir = tmp_path_factory.mktemp("reference")
    r = _run(env, workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    return workdir


def test_uninterrupted_run_writes_checkpoints_metrics_samples(reference_run):
    workdir = reference_run
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == STEPS
    assert _checkpoints(workdir) == [4, 6, 8]            # keep-3
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
    proc = subprocess.Popen(_cmd(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=env)
    try:
        _wait_for_step(proc, tmp_path, kill_at)
    finally:
        proc.kill()
        proc.wait()
    r = _run(env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("train/loss", "train/d_loss", "train/l1"):
        assert _final(tmp_path, name) == _final(reference_run, name), name


def test_sigterm_saves_and_exits_cleanly_then_resumes(env, reference_run, tmp_path):
    proc = subprocess.Popen(_cmd(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=env)
    _wait_for_step(proc, tmp_path, 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "preempted" and 3 <= summary["step"] < STEPS
    assert summary["last_checkpoint"] == summary["step"] and _checkpoints(tmp_path)[-1] == summary["step"]
    assert "SIGTERM: saved step" in err
    r = _run(env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _final(tmp_path) == _final(reference_run)


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(env, tmp_path):
    r = _run(env, tmp_path, "--config.debug_nan_at_step=5")
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "train/loss is nan at step 5" in last
    assert "last good checkpoint (step 4) is kept" in last
    assert _checkpoints(tmp_path) == [2, 4]
    # the kept checkpoint is intact: the run resumes from it and finishes
    r = _run(env, tmp_path)
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
    r = _run(env, workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"checkpoint step {STEPS} in" in r.stderr and "unreadable" in r.stderr
    assert f"checkpoints/{STEPS - 2}" in r.stderr                        # resumed from the previous step
    assert any(n.startswith(f"{STEPS}-") for n in os.listdir(workdir / "checkpoints.corrupt"))
    assert _final(workdir) == _final(reference_run)                       # redone steps match exactly


def _train_rows(workdir) -> dict[int, dict]:
    return {r["step"]: r for r in metrics.read_metrics(str(workdir)) if "train/loss" in r}


def test_eight_device_fsdp_run_matches_one_device(env, tmp_path):
    """Sharding is correct: the same numbers on 1 device and on data 2 x fsdp 4, checked where they cannot
    drift (step 1: loss and gradient norms of the initial weights), and the 8-device run repeats itself
    bit for bit. Later steps only get a loose bound: a different reduction order rounds differently, and
    every Adam step (beta1 = 0, tiny gradients) amplifies that by ~50x (measured relative differences
    0 / 2.2e-7 / 1.2e-5 / 9.6e-4 at steps 1-4 on one CPU), so a tight bound there depends on the CPU."""
    e = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    common = ["--config.batch_size=8", "--config.num_train_steps=3", "--config.checkpoint_every_steps=100",
              "--config.eval_every_steps=0"]
    runs = {}
    for name, mesh in (("one", ("1", "1")), ("eight", ("2", "4")), ("eight_again", ("2", "4"))):
        r = _run(e, tmp_path / name, *common, f"--config.mesh.data={mesh[0]}", f"--config.mesh.fsdp={mesh[1]}")
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = _train_rows(tmp_path / name)
    assert "data=2 x fsdp=4 x tensor=1 (8 devices)" in r.stderr
    one, eight = runs["one"], runs["eight"]
    assert sorted(one) == sorted(eight) == [1, 2, 3]
    assert eight == runs["eight_again"]                          # deterministic: bit-identical rerun
    for name in ("train/loss", "train/l1", "train/g_grad_norm", "train/d_grad_norm", "train/d_loss"):
        a, b = one[1][name], eight[1][name]
        assert abs(a - b) <= 1e-5 * abs(a), (name, a, b)
    for step in (2, 3):                                          # loose: catches a wrong update, not rounding
        a, b = one[step]["train/loss"], eight[step]["train/loss"]
        assert np.isfinite(b) and abs(a - b) <= 1e-2 * abs(a), (step, a, b)


def test_preemption_is_agreed_every_n_steps_across_processes(monkeypatch):
    import jax
    from jax.experimental import multihost_utils

    from launch import trainer

    calls = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather",
                        lambda x: calls.append(int(x[0])) or np.stack([x, np.array([0], np.int32)]))
    p = trainer._Preemption(check_every=5)
    p.requested = True
    assert [s for s in range(1, 13) if p.any_process(s)] == [5, 10]     # only every 5th step decides
    assert len(calls) == 2
    p.requested = False
    assert not p.any_process(15) and calls[-1] == 0
    monkeypatch.setattr(jax, "process_count", lambda: 1)                 # one process: every step, no collective
    p.requested = True
    assert p.any_process(1) and len(calls) == 3


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
    for run, eval_every in (("eval_on", "2"), ("eval_off", "0")):
        r = _run(env, tmp_path / run, f"--config.data.path={data}", "--config.num_train_steps=2",
                 f"--config.eval_every_steps={eval_every}")
        assert r.returncode == 0, r.stderr[-3000:]
        rows = metrics.read_metrics(str(tmp_path / run))
        assert [x["step"] for x in rows if "train/loss" in x] == [1, 2]
        assert any("eval/l1" in x for x in rows) == (eval_every != "0")
        assert (tmp_path / run / "samples").exists() == (eval_every != "0")


def test_dataset_without_eval_split_trains_with_eval_off_and_says_how_to_fix(env, small_video_datasets, tmp_path):
    data, stdout = small_video_datasets["no_eval"]
    assert "eval: 0 videos, 0 clips" in stdout
    r = _run(env, tmp_path / "off", f"--config.data.path={data}", "--config.num_train_steps=2",
             "--config.eval_every_steps=0")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run(env, tmp_path / "on", f"--config.data.path={data}", "--config.num_train_steps=2")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: {data}: the 'eval' split of this dataset is empty"), lines[-1]
    assert "--eval_fraction=" in lines[-1] and "--config.eval_every_steps=0" in lines[-1]
    assert not (tmp_path / "on" / "checkpoints").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_on_loopback_train_and_checkpoint(env, tmp_path):
    port = _free_port()
    procs = []
    for pid in range(2):
        e = dict(env, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid),
                 JAX_NUM_CPU_DEVICES="2", JAX_PLATFORMS="cpu")
        procs.append(subprocess.Popen(_cmd(tmp_path, "--config.num_train_steps=3", "--config.mesh.data=-1",
                                           "--config.eval_every_steps=0"),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=e))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=400))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "process 0 of 2" in outs[0][1] and "data=4 x fsdp=1 x tensor=1 (4 devices)" in outs[0][1]
    assert _checkpoints(tmp_path) == [2, 3]
    data_files = os.listdir(tmp_path / "checkpoints" / "3" / "data")
    assert len([n for n in data_files if "process" in n]) == 2, data_files      # one iterator state per process
    rows = metrics.read_metrics(str(tmp_path))
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]            # process 0 alone writes


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
