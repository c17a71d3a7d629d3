"""``launch/animate.py xnemo`` end to end on a tiny bundle converted from ``.pth`` files written by
``torch.save`` (the fake release of ``xnemo_helpers.write_tiny_release`` through ``launch/convert.py
xnemo``), a synthetic portrait and a 34-frame synthetic driving video at 20 fps (BlazeFace finds the
synthetic faces).

Every sampling run uses the same shapes (34 frames, 2 DDIM steps, the default windows of 24 frames
overlapping by 4: two closed-loop windows per step, the second wrapping to the first frames, batched into
one call), so the compiled programs are shared: the first run compiles, the others only execute (with
full XLA optimisation, as they are execution-bound). Outputs compared pixel for pixel are
lossless ``.mkv`` (FFV1); the main run writes the H.264 ``.mp4`` users get.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from xnemo_helpers import write_tiny_release

from input_pipeline import synthetic, video_io
from launch import animate
from launch import convert as convert_cli
from xnemo_jax import sampling

FRAMES, FPS = 34, 20.0
FAST = ["--steps=2", "--window-batch=2", "--quiet"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, optimized_xla):
    d = tmp_path_factory.mktemp("xnemo_animate")
    release = str(d / "release")
    os.makedirs(release)
    write_tiny_release(release)
    ckpt = str(d / "ckpt")
    assert convert_cli.main(["xnemo", f"--official={release}", f"--output={ckpt}"]) == 0
    driving = str(d / "driving.mp4")
    video_io.write_video(driving, synthetic.make_clip(seed=3, num_frames=FRAMES, size=96).frames, FPS)
    faces = synthetic.make_clip(seed=5, num_frames=3, size=128).frames
    paths = {}
    for name, image in (("source", faces[0]), ("smile", faces[1]), ("frown", faces[2]),
                        ("blank", np.full((96, 96, 3), 128, np.uint8))):
        paths[name] = str(d / f"{name}.png")
        video_io.write_image(paths[name], image)
    text = str(d / "notes.png")
    with open(text, "w") as f:
        f.write("not an image\n")
    return {"dir": d, "ckpt": ckpt, "driving": driving, "text": text, **paths}


def run(files, *argv, capsys=None):
    code = animate.main(["xnemo", f"--checkpoint={files['ckpt']}", f"--source={files['source']}", *FAST, *argv])
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


@pytest.fixture(scope="module")
def first(files):
    """The main run: an H.264 mp4 of the 34 driving frames (seeded offsets), and a lossless copy."""
    out = str(files["dir"] / "out.mp4")
    lossless = str(files["dir"] / "out.mkv")
    assert run(files, f"--driving={files['driving']}", f"--output={out}", "--seed=1")[0] == 0
    assert run(files, f"--driving={files['driving']}", f"--output={lossless}", "--seed=1")[0] == 0
    return out, video_io.read_video(lossless)[0]


def test_animation_writes_every_driving_frame_at_the_driving_fps(first):
    import cv2

    out, frames = first
    decoded, fps = video_io.read_video(out)
    assert decoded.shape == (FRAMES, 64, 64, 3) and fps == FPS
    cap = cv2.VideoCapture(out)
    assert int(cap.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little") in (b"avc1", b"h264")  # H.264
    assert frames.shape == (FRAMES, 64, 64, 3) and frames.std() > 1  # the random model draws something
    assert not [p for p in os.listdir(os.path.dirname(out)) if ".partial" in p]


def test_offsets_replay_and_matter(files, first):
    """--window-offsets equal to the seed's offsets replay the run exactly; other offsets change it (the
    closed-loop windows move), and so does another seed."""
    _, frames = first
    replay = str(files["dir"] / "replay.mkv")
    offsets = ",".join(map(str, sampling.seeded_offsets(1, 2, 24)))
    assert run(files, f"--driving={files['driving']}", f"--output={replay}", "--seed=1",
               f"--window-offsets={offsets}")[0] == 0
    np.testing.assert_array_equal(video_io.read_video(replay)[0], frames)
    moved = str(files["dir"] / "moved.mkv")
    other = [(o + 5) % 24 for o in sampling.seeded_offsets(1, 2, 24)]
    assert run(files, f"--driving={files['driving']}", f"--output={moved}", "--seed=1",
               "--window-offsets=" + ",".join(map(str, other)))[0] == 0
    assert np.abs(video_io.read_video(moved)[0].astype(int) - frames).max() > 0


def test_interpolation_and_still_driver(files):
    """Two keyframe images, 33 frames per pair -> 34 frames (25 fps); an image driver with --motion-bbox
    -> a 34-frame still performance, paste-back + side-by-side framing."""
    morph = str(files["dir"] / "morph.mkv")
    assert run(files, "--mode=interpolation", f"--driving={files['smile']}", f"--driving={files['frown']}",
               "--interp-frames=33", f"--output={morph}")[0] == 0
    frames, fps = video_io.read_video(morph)
    assert frames.shape[0] == FRAMES and fps == 25.0
    still = str(files["dir"] / "still.mkv")
    assert run(files, f"--driving={files['smile']}", f"--still-frames={FRAMES}", "--motion-bbox", "--paste-back",
               "--side-by-side", f"--output={still}")[0] == 0
    frames, _ = video_io.read_video(still)
    assert frames.shape == (FRAMES, 128, 3 * 128, 3)  # source | driving image | pasted result, at 128²


@pytest.mark.parametrize("case", ["no_face", "not_an_image", "long_window", "offsets_count", "output", "ckpt",
                                  "keyframes"])
def test_bad_input_is_one_line_and_no_output(files, case, capsys):
    out = str(files["dir"] / f"bad_{case}.mp4")
    drv = f"--driving={files['driving']}"
    argv, expected = {
        "no_face": ([f"--source={files['blank']}", drv], "no face found"),
        "not_an_image": ([f"--source={files['text']}", drv], "notes.png"),
        "long_window": ([drv, "--context-frames=40"], "--context-frames"),
        "offsets_count": ([drv, "--window-offsets=1,2,3"], "3 offsets for 2 steps"),
        "output": ([drv, f"--output={out}.txt"], "writes a video"),
        "ckpt": ([drv, f"--checkpoint={files['dir'] / 'missing'}"], "missing"),
        "keyframes": (["--mode=interpolation", f"--driving={files['smile']}"], "two or more keyframe"),
    }[case]
    code, err = run(files, f"--output={out}", *argv, capsys=capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], err
    assert not os.path.exists(out) and not os.path.exists(out + ".txt")
