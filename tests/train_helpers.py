"""Shared pieces of the training-runtime tests (``test_train.py``, ``test_train_sharding.py``): the tiny
LIA-X CLI command, subprocess runs sharing a persistent XLA compilation cache, metric/checkpoint readers."""

import os
import subprocess
import sys
import time

from conftest import ROOT
from launch import metrics

STEPS = 8
TINY = ["--config.batch_size=4", f"--config.num_train_steps={STEPS}", "--config.log_every_steps=1",
        "--config.eval_every_steps=1000", "--config.checkpoint_every_steps=2", "--config.eval.at_start=False",
        "--config.eval.num_batches=1", "--config.eval.cross_identity_batches=1", "--config.data.synthetic_clips=16",
        "--config.data.synthetic_eval_clips=4", "--config.mesh.data=1"]


def make_env(tmp_path_factory) -> dict:
    e = dict(os.environ)
    e["XLA_FLAGS"] = ""                      # one CPU device per process unless a test asks for more
    e["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("xla_cache"))
    e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    e.pop("JAX_NUM_CPU_DEVICES", None)
    return e


def cmd(workdir, *extra):
    return [sys.executable, os.path.join(ROOT, "launch", "train.py"), f"--config={ROOT}/configs/liax.py:tiny",
            f"--workdir={workdir}", *TINY, *extra]


def run(env, workdir, *extra, timeout=900):  # a guard against hangs, not a speed bound
    return subprocess.run(cmd(workdir, *extra), capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def wait_for_step(proc, workdir, step, timeout=400):
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = metrics.read_metrics(str(workdir))
        if any(r["step"] >= step and "train/loss" in r for r in rows):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before step {step}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def final(workdir, name="train/loss"):
    return metrics.last_value(metrics.read_metrics(str(workdir)), name, STEPS)


def checkpoints(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def train_rows(workdir) -> dict[int, dict]:
    return {r["step"]: r for r in metrics.read_metrics(str(workdir)) if "train/loss" in r}
