"""``launch/animate.py`` end to end: every LIA-X mode on synthetic and real-photo inputs, edits, framing,
paste-back, streaming, checkpoints of both kinds, and the malformed-input contract.

The CLI runs in-process through ``animate.main(argv)`` (one JAX process, shared jit caches); one test runs
it as a real subprocess. Model: the tiny config (64²) with random weights saved as a params checkpoint
whose metadata names the 14 official directions (+ the ``yaw`` pair). Outputs that are compared pixel
for pixel are written as lossless ``.mkv`` (FFV1) or ``.png``.
"""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from input_pipeline import portrait, synthetic, video_io
from launch import animate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(resolution=64, scale=0.125, motion_dim=40, style_dim=512, norm_groups=4, dtype="float32")
DRIVING_FRAMES, DRIVING_FPS = 11, 20.0


def _tiny_model(seed=0, dtype="float32"):
    from flax import nnx

    from liax_jax.model import LiaX, LiaXConfig

    return LiaX(LiaXConfig(**dict(TINY, dtype=dtype)), rngs=nnx.Rngs(seed))


@pytest.fixture
def x64():
    """float64 for one test: exact semantics without fp32 rounding noise (amplified by random weights)."""
    import jax

    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A params checkpoint, a VGG (other-model) checkpoint and input files."""
    from flax import nnx

    from launch import checkpointing
    from launch.convert import OFFICIAL_LIAX_DIRECTIONS, OFFICIAL_LIAX_MOUTH_DIRECTIONS

    d = tmp_path_factory.mktemp("animate")
    model = _tiny_model()
    ckpt = str(d / "ckpt")
    checkpointing.save_params(ckpt, "liax", TINY, nnx.to_pure_dict(nnx.state(model)),
                              {"directions": OFFICIAL_LIAX_DIRECTIONS,
                               "mouth_directions": OFFICIAL_LIAX_MOUTH_DIRECTIONS})
    other = str(d / "vgg")
    checkpointing.save_params(other, "vgg19", {"channel_scale": 1.0}, {"w": np.zeros(3, np.float32)})
    frames = synthetic.make_clip(seed=3, num_frames=DRIVING_FRAMES, size=80).frames
    driving = str(d / "driving.mp4")
    video_io.write_video(driving, frames, DRIVING_FPS)
    src_frames = synthetic.make_clip(seed=5, num_frames=1, size=96).frames
    source = str(d / "source.png")
    video_io.write_image(source, np.ascontiguousarray(src_frames[0][:, 8:80]))  # 96 x 72: not square
    return {"dir": d, "ckpt": ckpt, "other": other, "driving": driving, "source": source,
            "source_image": video_io.read_image(source), "driving_frames": video_io.read_video(driving)[0]}


def run_cli(*argv, capsys=None):
    code = animate.main(["liax", "--quiet", *argv])
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


def read_video(path):
    frames, fps = video_io.read_video(path)
    return frames, fps


# ------------------------------------------------------------------------------------------ modes
@pytest.mark.parametrize("mode", ["animation", "vid_edit", "manipulation", "interpolation-video",
                                  "interpolation-images"])
def test_every_video_mode(files, tmp_path, capsys, mode):
    out = str(tmp_path / "out.mp4")
    src, drv = files["source"], files["driving"]
    h, w = files["source_image"].shape[:2]
    args = {"animation": [f"--source={src}", f"--driving={drv}"],
            "vid_edit": [f"--driving={drv}", "--edit=eyes=-0.3"],
            "manipulation": [f"--source={src}", "--edit=mouth=0.3", "--steps=4"],
            "interpolation-video": [f"--source={src}", f"--driving={drv}", "--keyframes=0,5,-1", "--steps=3"],
            "interpolation-images": [f"--source={src}", f"--driving={src}", f"--driving={drv.replace('.mp4', '.png')}",
                                     "--steps=4"]}[mode]
    if mode == "interpolation-images":
        video_io.write_image(drv.replace(".mp4", ".png"), files["driving_frames"][4])
    expected = {"animation": (DRIVING_FRAMES, (h, w), DRIVING_FPS), "vid_edit": (DRIVING_FRAMES, (80, 80), DRIVING_FPS),
                "manipulation": (16, (h, w), 12.0), "interpolation-video": (7, (h, w), 25.0),
                "interpolation-images": (5, (h, w), 25.0)}[mode]
    code, err = run_cli(f"--checkpoint={files['ckpt']}", f"--mode={mode.split('-')[0]}", *args, f"--output={out}",
                        capsys=capsys)
    assert code == 0, err
    frames, fps = read_video(out)
    assert (len(frames), frames.shape[1:3], fps) == expected
    assert frames.std() > 1.0  # real content, not a blank video


def test_img_edit_png_and_side_by_side(files, tmp_path, capsys):
    out = str(tmp_path / "edit.png")
    code, err = run_cli(f"--checkpoint={files['ckpt']}", "--mode=img_edit", f"--source={files['source']}",
                        "--edit=yaw=-0.3", f"--output={out}", capsys=capsys)
    assert code == 0, err
    h, w = files["source_image"].shape[:2]
    assert video_io.read_image(out).shape == (h, w, 3)
    both = str(tmp_path / "both.mkv")
    code, err = run_cli(f"--checkpoint={files['ckpt']}", f"--source={files['source']}", f"--driving={files['driving']}",
                        "--side-by-side", "--max-frames=3", f"--output={both}", capsys=capsys)
    assert code == 0, err
    frames, _ = read_video(both)
    # source (96x72) | driving (80x80 -> 96x96) | result (96x72)
    assert frames.shape == (3, h, w + h + w, 3)
    np.testing.assert_array_equal(frames[:, :, :w], np.broadcast_to(files["source_image"], (3, h, w, 3)))


def test_zero_edits_equal_the_unedited_result(files, tmp_path, capsys):
    base = [f"--checkpoint={files['ckpt']}", f"--source={files['source']}"]
    outs = {}
    for name, edit in [("plain", []), ("zero", ["--edit=yaw=0,mouth=0,37=0"])]:
        outs[name + ".png"] = str(tmp_path / f"{name}.png")
        assert run_cli(*base, "--mode=img_edit", *edit, f"--output={outs[name + '.png']}", capsys=capsys)[0] == 0
        outs[name + ".mkv"] = str(tmp_path / f"{name}.mkv")
        assert run_cli(*base, f"--driving={files['driving']}", *edit, f"--output={outs[name + '.mkv']}",
                       capsys=capsys)[0] == 0
    np.testing.assert_array_equal(video_io.read_image(outs["plain.png"]), video_io.read_image(outs["zero.png"]))
    np.testing.assert_array_equal(read_video(outs["plain.mkv"])[0], read_video(outs["zero.mkv"])[0])
    edited = str(tmp_path / "edited.png")
    assert run_cli(*base, "--mode=img_edit", "--edit=yaw=0.5,mouth=0.3", f"--output={edited}", capsys=capsys)[0] == 0
    assert np.abs(video_io.read_image(edited).astype(int) - video_io.read_image(outs["plain.png"])).max() > 0


def test_animation_frame0_equals_img_edit(files, tmp_path, capsys):
    """Frame 0 of ``animation`` is the source with the edits applied (motion relative to frame 0 is 0).

    The two paths differ only in float rounding (driving frame 0 is encoded inside an 8-frame batch), so
    the uint8 results may differ by one level at a few pixels.
    """
    edit = "--edit=yaw=-0.3,pout=0.2,13=0.1"
    image, video = str(tmp_path / "edit.png"), str(tmp_path / "anim.mkv")
    base = [f"--checkpoint={files['ckpt']}", f"--source={files['source']}", edit]
    assert run_cli(*base, "--mode=img_edit", f"--output={image}", capsys=capsys)[0] == 0
    assert run_cli(*base, f"--driving={files['driving']}", "--max-frames=4", f"--output={video}", capsys=capsys)[0] == 0
    frame0 = read_video(video)[0][0].astype(int)
    edited = video_io.read_image(image).astype(int)
    diff = np.abs(frame0 - edited)
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())


def test_crop_and_paste_back_on_a_real_photo(astronaut, tmp_path, capsys, files):
    """BlazeFace crop of the astronaut photo; pasted back, the result keeps the photo outside the face."""
    src = str(tmp_path / "astronaut.jpg")
    video_io.write_image(src, astronaut, quality=98)
    photo = video_io.read_image(src)
    out, crop_out = str(tmp_path / "pasted.png"), str(tmp_path / "crop.png")
    base = [f"--checkpoint={files['ckpt']}", "--mode=img_edit", f"--source={src}", "--crop", "--edit=smile=0.3"]
    assert run_cli(*base, "--paste-back", f"--output={out}", capsys=capsys)[0] == 0
    assert run_cli(*base, f"--output={crop_out}", capsys=capsys)[0] == 0
    pasted, crop = video_io.read_image(out), video_io.read_image(crop_out)
    assert pasted.shape == photo.shape
    side = crop.shape[0]
    assert crop.shape == (side, side, 3) and 64 < side < 512  # the face window, at native size
    changed = np.any(pasted != photo, axis=-1)
    ys, xs = np.nonzero(changed)
    assert changed.any() and changed.mean() < 0.5
    assert ys.max() - ys.min() < side + 2 and xs.max() - xs.min() < side + 2  # only inside the window
    assert not changed[:20].any() and not changed[:, :20].any()  # corners untouched


def test_crop_on_a_real_video_and_official_normalize(astronaut, tmp_path, capsys, files):
    from conftest import moving_photo_frames

    frames, _ = moving_photo_frames(astronaut, 5, size=384)
    drv, src = str(tmp_path / "astro.mp4"), str(tmp_path / "astronaut.png")
    video_io.write_video(drv, frames, 24.0)
    video_io.write_image(src, astronaut)
    out = str(tmp_path / "out.mkv")
    code, err = run_cli(f"--checkpoint={files['ckpt']}", f"--source={src}", f"--driving={drv}", "--crop",
                        "--paste-back", "--official-normalize", f"--output={out}", capsys=capsys)
    assert code == 0, err
    video, fps = read_video(out)
    assert video.shape == (5, 512, 512, 3) and fps == 24.0
    # min-max over the whole output: some pixel reaches 0 and some 255 (inside the pasted face)
    pasted_region = video[:, np.any(video != astronaut, axis=(0, 2, 3))]
    assert pasted_region.min() == 0 and pasted_region.max() == 255


# ---------------------------------------------------------------------------------- checkpoints
def test_training_checkpoint_and_export(files, tmp_path, capsys):
    """A training run's generator (partial restore) animates like the same weights as a params checkpoint,
    and ``convert.py liax --from-train`` exports it with direction names."""
    import grain
    import jax
    from flax import nnx

    from launch import checkpointing, convert

    model = _tiny_model()
    state = {"step": jax.numpy.asarray(7), "rng": jax.random.key_data(jax.random.key(0)),
             "model": {"generator": nnx.state(model, nnx.Param), "opt_g": {"mu": np.ones(3, np.float32)}}}
    workdir = tmp_path / "run"
    ckptr = checkpointing.TrainCheckpointer(str(workdir / "checkpoints"), asynchronous=False)
    data_it = iter(grain.MapDataset.range(4).to_iter_dataset())
    config = {"model_name": "liax", "model": TINY, "directions": "smile=19,yaw=37+39"}
    ckptr.save(7, state, data_it, config)
    ckptr.close()
    outs = {}
    for name, ckpt in [("params", files["ckpt"]), ("train", str(workdir))]:
        outs[name] = str(tmp_path / f"{name}.png")
        code, err = run_cli(f"--checkpoint={ckpt}", "--mode=img_edit", f"--source={files['source']}",
                            "--edit=yaw=0.2,smile=0.1", f"--output={outs[name]}", capsys=capsys)
        assert code == 0, err
    np.testing.assert_array_equal(video_io.read_image(outs["params"]), video_io.read_image(outs["train"]))
    exported = str(tmp_path / "exported")
    assert convert.main(["liax", f"--from-train={workdir}", f"--output={exported}", "--directions=grin=19"]) == 0
    info = json.load(open(os.path.join(exported, "model.json")))
    assert info["model"] == "liax" and info["metadata"]["directions"] == {"grin": 19} and info["metadata"]["step"] == 7
    code, err = run_cli(f"--checkpoint={exported}", "--mode=img_edit", f"--source={files['source']}",
                        "--edit=grin=0.1,37=0.2,39=0.2", f"--output={tmp_path / 'exp.png'}", capsys=capsys)
    assert code == 0, err
    np.testing.assert_array_equal(video_io.read_image(str(tmp_path / "exp.png")), video_io.read_image(outs["params"]))


# ------------------------------------------------------------------------------------ bad input
def _bad_inputs(files, d):
    """name -> (argv, the path the error line must name)."""
    empty = d / "empty.png"
    empty.write_bytes(b"")
    text = d / "text.png"
    text.write_text("not an image")
    corrupt = d / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 255, 5000, dtype=np.uint8).tobytes())
    import cv2
    zero = d / "zero.mp4"
    w = cv2.VideoWriter(str(zero), cv2.VideoWriter_fourcc(*"mp4v"), 25, (64, 64))
    w.release()
    empty_dir = d / "frames_empty"
    empty_dir.mkdir(exist_ok=True)
    noise = d / "noise.png"
    video_io.write_image(noise, np.random.default_rng(1).integers(0, 255, (120, 120, 3), dtype=np.uint8))
    src, drv, ck = files["source"], files["driving"], f"--checkpoint={files['ckpt']}"
    return {
        "missing source": ([ck, f"--source={d / 'nope.png'}", f"--driving={drv}"], str(d / "nope.png")),
        "empty source": ([ck, f"--source={empty}", f"--driving={drv}"], str(empty)),
        "not an image": ([ck, f"--source={text}", f"--driving={drv}"], str(text)),
        "corrupt video": ([ck, f"--source={src}", f"--driving={corrupt}"], str(corrupt)),
        "zero-frame video": ([ck, f"--source={src}", f"--driving={zero}"], str(zero)),
        "empty frame folder": ([ck, f"--source={src}", f"--driving={empty_dir}"], str(empty_dir)),
        "missing driving": ([ck, f"--source={src}", f"--driving={d / 'nope.mp4'}"], str(d / "nope.mp4")),
        "no face": ([ck, f"--source={noise}", f"--driving={drv}", "--crop"], str(noise)),
        "unknown edit name": ([ck, f"--source={src}", f"--driving={drv}", "--edit=wink=0.3"], files["ckpt"]),
        "bad edit value": ([ck, f"--source={src}", f"--driving={drv}", "--edit=yaw=lots"], "--edit"),
        "edit index out of range": ([ck, f"--source={src}", f"--driving={drv}", "--edit=40=0.1"], "--edit"),
        "other model": ([f"--checkpoint={files['other']}", f"--source={src}", f"--driving={drv}"], files["other"]),
        "missing checkpoint": ([f"--checkpoint={d / 'nockpt'}", f"--source={src}", f"--driving={drv}"],
                               str(d / "nockpt")),
        "not a checkpoint": ([f"--checkpoint={empty_dir}", f"--source={src}", f"--driving={drv}"], str(empty_dir)),
        "missing driving flag": ([ck, f"--source={src}"], "--driving"),
        "paste-back without crop": ([ck, f"--source={src}", f"--driving={drv}", "--paste-back"], "--paste-back"),
        "zero max frames": ([ck, f"--source={src}", f"--driving={drv}", "--max-frames=0"], "--max-frames"),
    }


BAD = ["missing source", "empty source", "not an image", "corrupt video", "zero-frame video", "empty frame folder",
       "missing driving", "no face", "unknown edit name", "bad edit value", "edit index out of range", "other model",
       "missing checkpoint", "not a checkpoint", "missing driving flag", "paste-back without crop", "zero max frames"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_one_line_no_output(files, tmp_path, capsys, case):
    argv, named = _bad_inputs(files, tmp_path)[case]
    out = tmp_path / "out" / "result.mp4"
    code, err = run_cli(*argv, f"--output={out}", capsys=capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], (code, err)
    assert not out.exists() and not glob.glob(str(tmp_path / "out" / ".*"))


def test_wrong_output_type_is_refused(files, tmp_path, capsys):
    code, err = run_cli(f"--checkpoint={files['ckpt']}", "--mode=img_edit", f"--source={files['source']}",
                        f"--output={tmp_path / 'x.mp4'}", capsys=capsys)
    assert code == 2 and "writes an image" in err
    code, err = run_cli(f"--checkpoint={files['ckpt']}", f"--source={files['source']}", f"--driving={files['driving']}",
                        f"--output={tmp_path / 'x.png'}", capsys=capsys)
    assert code == 2 and "writes a video" in err


def test_failure_mid_stream_leaves_no_output(files, tmp_path, capsys):
    """A frame folder whose 6th frame has another size fails after frames were written: nothing remains."""
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(files["driving_frames"]):
        video_io.write_image(folder / f"{i:03d}.png", frame if i != 5 else frame[:40])
    out = tmp_path / "out" / "result.mp4"
    code, err = run_cli(f"--checkpoint={files['ckpt']}", f"--source={files['source']}", f"--driving={folder}",
                        "--chunk-size=2", f"--output={out}", capsys=capsys)
    assert code == 2 and "005.png" in err and "differs" in err
    assert not out.exists() and os.listdir(tmp_path / "out") == []


def test_cli_subprocess(files, tmp_path):
    """The real command line: success with a progress bar and fps kept; a bad input is one stderr line."""
    out = tmp_path / "anim.mp4"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    ok = subprocess.run([sys.executable, "launch/animate.py", "liax", f"--checkpoint={files['ckpt']}",
                         f"--source={files['source']}", f"--driving={files['driving']}", f"--output={out}",
                         "--chunk-size=4"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "frame/s" in ok.stderr and f"wrote {DRIVING_FRAMES} frames" in ok.stderr
    assert video_io.probe_video(out).fps == DRIVING_FPS
    bad = subprocess.run([sys.executable, "launch/animate.py", "liax", f"--checkpoint={files['ckpt']}",
                          f"--source={tmp_path / 'missing.png'}", f"--driving={files['driving']}",
                          f"--output={tmp_path / 'bad.mp4'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.png'}: no such file"]
    assert not (tmp_path / "bad.mp4").exists()


# ------------------------------------------------------------------------------ library pieces
def test_streaming_matches_whole_video(x64):
    """Chunked, padded streaming (chunks of 3 over 8 frames) equals one 8-frame batch (float64)."""
    import jax.numpy as jnp

    from liax_jax import inference

    model = _tiny_model(1, "float64")
    rng = np.random.default_rng(0)
    src = jnp.asarray(rng.uniform(-1, 1, (1, 64, 64, 3)))
    drv = jnp.asarray(rng.uniform(-1, 1, (8, 64, 64, 3)))
    whole = inference.animate(model, src, drv, [3], [0.2], chunk_size=8)
    anim = inference.Animation(model, src, [3], [0.2], chunk_size=3)
    anim.start(drv[0:1])
    streamed = jnp.concatenate([anim(drv[i:i + 3]) for i in range(0, 8, 3)])
    assert streamed.shape == whole.shape
    np.testing.assert_allclose(np.asarray(streamed), np.asarray(whole), rtol=0, atol=1e-10)


def test_interpolation_hits_the_keyframes(x64):
    """Frame k*steps of ``interpolate`` equals ``animate`` of keyframe k with keyframe 0 as the first driving
    frame (frame 0: the edited source itself); the weights between are linear (float64)."""
    import jax.numpy as jnp

    from liax_jax import inference

    model = _tiny_model(2, "float64")
    rng = np.random.default_rng(1)
    src = jnp.asarray(rng.uniform(-1, 1, (1, 64, 64, 3)))
    keys = jnp.asarray(rng.uniform(-1, 1, (3, 64, 64, 3)))
    video = inference.interpolate(model, src, keys, steps=4, motion_ids=[5], motion_values=[0.3])
    assert video.shape == (9, 64, 64, 3)
    animated = inference.animate(model, src, keys, [5], [0.3])
    np.testing.assert_allclose(np.asarray(video)[[0, 4, 8]], np.asarray(animated), rtol=0, atol=1e-10)
    assert np.abs(np.asarray(video[2]) - np.asarray(video[0])).max() > 1e-3  # it moves in between
    w = inference.interpolation_weights(3, 4)
    np.testing.assert_allclose(w.sum(1), 1.0)
    np.testing.assert_allclose(w[2], [0.5, 0.5, 0.0])


def test_edit_parsing():
    from liax_jax import inference

    names = inference.direction_names({"yaw1": 37, "yaw": [37, 39], "Smile": 19})
    assert inference.parse_edits("yaw=-0.3,smile=0.2,5=0.1", names, 40) == ([37, 39, 19, 5], [-0.3, -0.3, 0.2, 0.1])
    assert inference.parse_edits("", names, 40) == ([], [])
    assert inference.direction_names("a=1,b=2+3") == {"a": (1,), "b": (2, 3)}
    with pytest.raises(KeyError, match="unknown edit direction 'wink'.*Smile, yaw, yaw1"):
        inference.parse_edits("wink=1", names, 40)
    for bad in ("yaw", "yaw=x", "40=1", "-1=1", "yaw=nan"):
        with pytest.raises(ValueError):
            inference.parse_edits(bad, names, 40)


def test_framing_geometry():
    image = np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8)
    f = portrait.Framing.whole_frame(30, 50, resolution=50)
    assert f.window == (0, -10, 50, 40) and f.output_size == (30, 50)
    x = f.crop(image)
    assert x.shape == (50, 50, 3)
    np.testing.assert_array_equal(x[10:40], image)  # no resize at this resolution: the image, padded
    np.testing.assert_array_equal(x[:10], np.broadcast_to(image[:1], (10, 50, 3)))  # edge padding
    back = portrait.to_uint8(f.uncrop(portrait.to_model(x)))
    np.testing.assert_array_equal(back, image)
    # face window in the middle of a frame: feathered on all four sides; at the frame border: not feathered
    g = portrait.Framing(100, 100, (20, 20, 60, 60), resolution=64)
    m = g.feather_mask(0.25)[..., 0]
    assert m.shape == (40, 40) and m[20, 20] == 1.0 and m[0, 20] < 0.05 and m[20, -1] < 0.05
    edge = portrait.Framing(100, 100, (0, 0, 40, 40), resolution=64).feather_mask(0.25)[..., 0]
    assert edge[0, 0] == 1.0 and edge[20, -1] < 0.05
    canvas = np.zeros((100, 100, 3), np.uint8)
    pasted = g.paste(canvas, np.full((40, 40, 3), 200, np.uint8), g.feather_mask(0.25))
    assert pasted[40, 40, 0] == 200 and pasted[:20].max() == 0 and pasted[21, 40, 0] < 30
    face = portrait.Framing.face([200, 100, 260, 180], 300, 400, resolution=64)
    assert face.side == face.window[3] - face.window[1] and face.window[0] >= 0


def test_pixel_conversions():
    x = np.array([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0], np.float32)
    np.testing.assert_array_equal(portrait.to_uint8(x), [0, 0, 128, 255, 255, 255])
    np.testing.assert_array_equal(portrait.minmax_to_uint8(np.array([-0.5, 0.0, 0.5]), -0.5, 0.5), [0, 127, 255])
