"""The README's main command (launch/train.py) and CI stay runnable and in sync."""

import os
import re
import subprocess
import sys

from conftest import ROOT


def _train(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"),
                           f"--config={ROOT}/configs/liax.py:tiny", *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_train_bad_data_path_is_one_line(tmp_path):
    r = _train(f"--workdir={tmp_path}", f"--config.data.path={tmp_path}/nope")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == f"error: {tmp_path}/nope: data path is not a folder"


def test_perceptual_loss_without_vgg_weights_refuses_to_start(tmp_path):
    r = _train(f"--workdir={tmp_path}", "--config.loss.perceptual=1")
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: config: the perceptual loss needs ImageNet VGG19 weights")
    assert "launch/convert.py vgg19" in last and "--config.loss.perceptual=0" in last
    assert not os.path.exists(tmp_path / "checkpoints")


def test_readme_quickstart_matches_ci():
    readme = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"## Quickstart\n.*?```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip()]
    assert len(commands) == 2
    assert commands[0].rstrip().endswith("python launch/train.py --config=configs/xnemo.py --workdir=runs/quickstart")
    order = [commands[1].index(part) for part in ("torch==2.13.0", ".[test,convert]", "ruff check .", "pytest")]
    assert order == sorted(order)  # the lint gate runs before the tests
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert "README.md" in ci and "lines[1]" in ci  # CI executes the README's second command itself
