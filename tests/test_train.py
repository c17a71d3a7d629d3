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


def _run(env, workdir, *extra, timeout=400):
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


def test_eight_device_fsdp_run_matches_one_device(env, tmp_path):
    e = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    common = ["--config.batch_size=8", "--config.num_train_steps=4", "--config.checkpoint_every_steps=100",
              "--config.eval_every_steps=0"]
    one = _run(e, tmp_path / "one", *common, "--config.mesh.data=1", "--config.mesh.fsdp=1")
    assert one.returncode == 0, one.stderr[-3000:]
    eight = _run(e, tmp_path / "eight", *common, "--config.mesh.data=2", "--config.mesh.fsdp=4")
    assert eight.returncode == 0, eight.stderr[-3000:]
    assert "data=2 x fsdp=4 x tensor=1 (8 devices)" in eight.stderr
    a = {r["step"]: r["train/loss"] for r in metrics.read_metrics(str(tmp_path / "one")) if "train/loss" in r}
    b = {r["step"]: r["train/loss"] for r in metrics.read_metrics(str(tmp_path / "eight")) if "train/loss" in r}
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), (step, a[step], b[step])


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
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "process 0 of 2" in outs[0][1] and "data=4 x fsdp=1 x tensor=1 (4 devices)" in outs[0][1]
    assert _checkpoints(tmp_path) == [2, 3]
    data_files = os.listdir(tmp_path / "checkpoints" / "3" / "data")
    assert len([n for n in data_files if "process" in n]) == 2, data_files      # one iterator state per process
    rows = metrics.read_metrics(str(tmp_path))
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]            # process 0 alone writes
