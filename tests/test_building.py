"""prepare_data -> ArrayRecord (and TFDS) -> Grain, on synthetic clips and on a real photo made into videos."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, moving_photo_frames
from input_pipeline import building, pipeline, schema, video_io
from input_pipeline.errors import UserError


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "prepare_data.py"), *args],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    r = run_cli("--synthetic=6", f"--output={out}", "--resolution=48", "--frames_per_clip=8",
                "--eval_fraction=0.2", "--image_format=png")
    assert r.returncode == 0, r.stderr
    return out


def test_prepare_synthetic_then_grain_pairs(synthetic_dir):
    info = building.load_info(str(synthetic_dir))
    assert info["num_clips"] == {"train": 4, "eval": 2} and info["resolution"] == 48
    source = pipeline.open_source(str(synthetic_dir), "train")
    assert len(source) == 4
    record = source[0]
    assert isinstance(record, schema.ClipRecord) and record.num_frames == 8
    assert record.arrays["motion"].shape[0] == 8
    ds = pipeline.pairs_dataset(source, batch_size=2, resolution=32, seed=0, shard_index=0, shard_count=1)
    for k in range(3):
        batch = ds[k]
        assert batch["source"].shape == (2, 32, 32, 3) and batch["driving"].shape == (2, 32, 32, 3)
        for b in range(2):
            rec = source[int(batch["clip_index"][b])]
            i, j = batch["frame_index"][b]
            assert i != j
            # correctly paired: the ground-truth motion of the stored frames, and the stored pixels
            np.testing.assert_array_equal(batch["source_motion"][b], rec.arrays["motion"][i])
            np.testing.assert_array_equal(batch["driving_motion"][b], rec.arrays["motion"][j])
            stored = pipeline._fit(rec.decode_frames([i]), rec.boxes[[i]], 32)[0][0]
            np.testing.assert_array_equal(batch["source"][b], stored)


def test_rerun_skips_finished_shards(synthetic_dir):
    shard = os.path.join(synthetic_dir, "train-00000.array_record")
    before = os.stat(shard).st_mtime_ns
    r = run_cli("--synthetic=6", f"--output={synthetic_dir}", "--resolution=48", "--frames_per_clip=8",
                "--eval_fraction=0.2", "--image_format=png")
    assert r.returncode == 0, r.stderr
    assert os.stat(shard).st_mtime_ns == before
    r = run_cli("--synthetic=7", f"--output={synthetic_dir}", "--resolution=48")
    assert r.returncode == 2 and "prepared from other inputs" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_tfds_builder_reads_like_the_prepared_dir(synthetic_dir, tmp_path):
    from input_pipeline import tfds_talking_heads

    tfds_talking_heads.build(str(synthetic_dir), str(tmp_path / "tfds"))
    tfds_source = pipeline.open_source(str(tmp_path / "tfds"), "train")
    ar_source = pipeline.open_source(str(synthetic_dir), "train")
    assert len(tfds_source) == len(ar_source) == 4
    by_id = {ar_source[i].meta["clip_id"]: ar_source[i] for i in range(4)}
    for i in range(4):
        rec = tfds_source[i]
        np.testing.assert_array_equal(rec.decode_frames([0, 7]), by_id[rec.meta["clip_id"]].decode_frames([0, 7]))
    batch = pipeline.pairs_dataset(tfds_source, batch_size=2, resolution=48, shard_index=0, shard_count=1)[0]
    assert batch["driving"].shape == (2, 48, 48, 3)


def test_prepare_real_videos_skips_bad_ones(tmp_path, astronaut):
    videos = tmp_path / "videos"
    videos.mkdir()
    frames, _ = moving_photo_frames(astronaut, 12)
    video_io.write_video(videos / "a.mp4", frames, fps=25)
    video_io.write_video(videos / "b.avi", frames[::-1], fps=30)
    (videos / "broken.mp4").write_bytes(os.urandom(2048))
    y, x = np.mgrid[0:128, 0:128]
    video_io.write_video(videos / "noface.mp4", np.stack([np.stack([x, y, x ^ y], -1).astype(np.uint8)] * 10), fps=25)
    out = tmp_path / "out"
    r = run_cli(f"--input={videos}", f"--output={out}", "--resolution=64", "--clip_length=8",
                "--min_clip_length=4", "--eval_fraction=0", "--detect_every=2")
    assert r.returncode == 0, r.stderr
    assert "broken.mp4" in r.stderr and "noface.mp4" in r.stderr  # reported, not fatal
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["num_clips"]["train"] == 4  # two videos x (8 + 4 frames)
    assert len(info["skipped"]) == 2
    source = pipeline.open_source(str(out), "train")
    rec = source[0]
    assert (rec.height, rec.width) == (64, 64) and rec.fps in (25.0, 30.0)
    # boxes are in crop coordinates: inside the crop and about half its side (crop_scale 2)
    sides = rec.boxes[:, 2] - rec.boxes[:, 0]
    assert (rec.boxes >= -2).all() and (rec.boxes <= 66).all()
    assert 20 < np.median(sides) < 40
    assert rec.meta["source"] in ("a.mp4", "b.avi")


def test_bad_inputs_give_one_line_errors(tmp_path):
    r = run_cli(f"--input={tmp_path}/missing.mp4", f"--output={tmp_path}/out")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path}/missing.mp4: no such file or folder"]
    r = run_cli(f"--output={tmp_path}/out")
    assert r.returncode == 2 and "exactly one of --input" in r.stderr
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no videos found"):
        building.resolve_inputs(str(tmp_path / "empty"))
