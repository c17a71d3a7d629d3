"""The README's main command (launch/train.py) and CI stay runnable and in sync."""

import json
import os
import re
import subprocess
import sys

from conftest import ROOT
from input_pipeline import video_io


def _train(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"),
                           f"--config={ROOT}/configs/liax.py:tiny", *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_train_data_stage_writes_preview(tmp_path):
    r = _train(f"--workdir={tmp_path}", "--preview_batches=2", "--config.batch_size=4")
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "data_stage.json").read_text())
    assert summary["pairs"] == 8
    frames, fps = video_io.read_video(tmp_path / "samples" / "data_preview.mp4")
    assert frames.shape == (8, 64, 128, 3) and fps == 4
    assert json.loads((tmp_path / "config.json").read_text())["model_name"] == "liax"


def test_train_bad_data_path_is_one_line(tmp_path):
    r = _train(f"--workdir={tmp_path}", f"--config.data.path={tmp_path}/nope")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == f"error: {tmp_path}/nope: data path is not a folder"


def test_readme_quickstart_matches_ci():
    readme = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"## Quickstart\n.*?```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip()]
    assert len(commands) == 2
    assert "launch/train.py --config=configs/liax.py:tiny" in commands[0]
    assert commands[1].index("torch==2.13.0") < commands[1].index(".[test,convert]") < commands[1].index("pytest")
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert "README.md" in ci and "lines[1]" in ci  # CI executes the README's second command itself
