import os
import tracemalloc

import cv2
import numpy as np
import pytest
from PIL import Image

from input_pipeline import video_io
from input_pipeline.errors import UserError


def _gradient(h=48, w=64):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (w + h - 2)], -1).astype(np.uint8)


@pytest.mark.parametrize("ext", [".png", ".jpg", ".webp", ".bmp"])
def test_image_round_trip(tmp_path, ext):
    img = _gradient()
    path = tmp_path / f"a{ext}"
    video_io.write_image(path, img)
    back = video_io.read_image(path)
    assert back.dtype == np.uint8 and back.shape == img.shape
    tol = 0 if ext in (".png", ".bmp") else 12
    assert np.abs(back.astype(int) - img).max() <= tol


def test_rgba_grayscale_16bit(tmp_path):
    img = _gradient()
    rgba = np.concatenate([img, np.full(img.shape[:2] + (1,), 7, np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(video_io.read_image(tmp_path / "rgba.png"), img)  # alpha dropped

    gray = img[..., 0]
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    back = video_io.read_image(tmp_path / "gray.png")
    assert back.shape == img.shape
    for c in range(3):
        np.testing.assert_array_equal(back[..., c], gray)

    deep = np.minimum(img.astype(np.uint32) * 257 + 3, 65535).astype(np.uint16)[..., ::-1]  # BGR for cv2
    cv2.imwrite(str(tmp_path / "deep.png"), deep)
    np.testing.assert_array_equal(video_io.read_image(tmp_path / "deep.png"), img)  # v >> 8


def test_exif_orientation(tmp_path):
    img = _gradient(40, 60)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(img).save(tmp_path / "rot.jpg", exif=exif, quality=100)
    back = video_io.read_image(tmp_path / "rot.jpg")
    assert back.shape == (60, 40, 3)
    expected = np.rot90(img, k=-1)
    assert np.abs(back.astype(int) - expected).mean() < 4


def test_image_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        video_io.read_image(tmp_path / "missing.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(UserError, match="empty.png: file is empty"):
        video_io.read_image(tmp_path / "empty.png")
    (tmp_path / "text.jpg").write_text("hello, not an image")
    with pytest.raises(UserError, match="text.jpg: not a readable image"):
        video_io.read_image(tmp_path / "text.jpg")


def _frames(n=12, h=48, w=64):
    base = _gradient(h, w)
    return np.stack([np.roll(base, 3 * t, axis=1) for t in range(n)])


@pytest.mark.parametrize("ext", [".mp4", ".avi", ".mov"])
def test_video_round_trip(tmp_path, ext):
    frames = _frames()
    path = tmp_path / f"v{ext}"
    assert video_io.write_video(path, frames, fps=12.5) == len(frames)
    back, fps = video_io.read_video(path)
    assert back.shape == frames.shape and back.dtype == np.uint8
    assert fps == pytest.approx(12.5)
    assert np.abs(back.astype(float) - frames).mean() < 6
    info = video_io.probe_video(path)
    assert (info.width, info.height, info.num_frames) == (64, 48, 12)


def test_frame_folder_natural_order(tmp_path):
    frames = _frames(11)
    for i, f in enumerate(frames):
        video_io.write_image(tmp_path / f"frame_{i}.png", f)
    (tmp_path / "notes.txt").write_text("ignored")
    reader = video_io.VideoReader(tmp_path, fps=30)
    assert reader.fps == 30 and reader.info.num_frames == 11
    np.testing.assert_array_equal(np.stack(list(reader)), frames)  # frame_10 after frame_9
    chunks = list(video_io.VideoReader(tmp_path).chunks(4))
    assert [len(c) for c in chunks] == [4, 4, 3]


def test_max_frames(tmp_path):
    video_io.write_video(tmp_path / "v.mp4", _frames(10), fps=25)
    frames, _ = video_io.read_video(tmp_path / "v.mp4", max_frames=4)
    assert len(frames) == 4


def test_streaming_memory_is_bounded(tmp_path):
    n, h, w = 240, 96, 128
    path = tmp_path / "long.mp4"
    with video_io.VideoWriter(path, fps=25) as writer:
        for t in range(n):
            writer.write(np.roll(_gradient(h, w), t, axis=0))
    frame_bytes = h * w * 3
    tracemalloc.start()
    count = 0
    for chunk in video_io.VideoReader(path).chunks(8):
        count += len(chunk)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == n
    assert peak < 40 * frame_bytes, f"peak {peak} bytes: the reader holds too many frames"


def test_bad_videos(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        video_io.VideoReader(tmp_path / "nope.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(UserError, match="empty"):
        video_io.VideoReader(tmp_path / "empty.mp4")
    (tmp_path / "garbage.mp4").write_bytes(os.urandom(4096))
    with pytest.raises(UserError, match="garbage.mp4"):
        video_io.VideoReader(tmp_path / "garbage.mp4")
    video_io.write_video(tmp_path / "ok.mp4", _frames(10), fps=25)
    data = (tmp_path / "ok.mp4").read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(data[:64])
    with pytest.raises(UserError, match="truncated.mp4"):
        video_io.VideoReader(tmp_path / "truncated.mp4")
    (tmp_path / "frames").mkdir()
    with pytest.raises(UserError, match="no frame images"):
        video_io.VideoReader(tmp_path / "frames")


def test_writer_is_atomic(tmp_path):
    path = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError):
        with video_io.VideoWriter(path, fps=25) as writer:
            writer.write(_frames(1)[0])
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError):
        with video_io.VideoWriter(path, fps=25) as writer:
            writer.write(_frames(1)[0])
            writer.write(np.zeros((10, 10, 3), np.uint8))  # wrong size
    assert os.listdir(tmp_path) == []
    with pytest.raises(UserError, match="unsupported video extension"):
        video_io.VideoWriter(tmp_path / "x.gif", fps=25)
