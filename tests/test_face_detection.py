import numpy as np
import pytest

from conftest import moving_photo_frames
from input_pipeline import face_detection, video_io
from input_pipeline.errors import UserError

ASTRONAUT_FACE = np.array([177, 80, 275, 176], np.float32)  # her face in skimage's astronaut (x0, y0, x1, y1)


def iou(a, b):
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, x1 - x0) * max(0, y1 - y0)
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


@pytest.mark.parametrize("model", ["short", "full"])
def test_finds_the_astronaut(astronaut, model):
    det = face_detection.FaceDetector(model)
    found = det.detect(astronaut)
    assert found is not None
    box, score = found
    assert score > 0.8
    assert iou(box, ASTRONAUT_FACE) > 0.75, box
    assert len(det.detect_all(astronaut)) == 1


def test_no_face(detector):
    y, x = np.mgrid[0:256, 0:320]
    blank = np.stack([x % 256, y % 256, np.full_like(x, 128)], -1).astype(np.uint8)
    assert detector.detect(blank) is None
    with pytest.raises(UserError, match="gradient.png: no face found"):
        face_detection.detect_image(detector, blank, name="gradient.png")
    box = face_detection.detect_image(detector, blank, on_missing="center")
    np.testing.assert_allclose(box, [160 - 102.4, 128 - 102.4, 160 + 102.4, 128 + 102.4], rtol=1e-6)
    with pytest.raises(UserError, match="no face found in any frame"):
        face_detection.detect_video(detector, [blank, blank], name="v.mp4")
    boxes, found = face_detection.detect_video(detector, [blank] * 3, on_missing="center")
    assert boxes.shape == (3, 4) and not found.any()


def test_tracks_a_moving_photo_through_a_video(tmp_path, astronaut, detector):
    frames, offsets = moving_photo_frames(astronaut, 10)
    path = tmp_path / "moving.mp4"
    video_io.write_video(path, frames, fps=25)
    boxes, found = face_detection.detect_video(detector, video_io.VideoReader(path), name=str(path))
    assert found.all() and boxes.shape == (10, 4)
    # The face is fixed in the photo, so box + window offset is constant; the box itself moves.
    in_photo = boxes + np.concatenate([offsets, offsets], 1)
    assert np.abs(in_photo - in_photo.mean(0)).max() < 6
    assert iou(in_photo.mean(0), ASTRONAUT_FACE) > 0.75
    moved = (boxes[-1, :2] - boxes[0, :2])
    np.testing.assert_allclose(moved, -(offsets[-1] - offsets[0]), atol=5)


def test_detect_every_interpolates(astronaut, detector):
    frames, offsets = moving_photo_frames(astronaut, 9)
    boxes, found = face_detection.detect_video(detector, frames, every=4)
    assert found.tolist() == [True, False, False, False, True, False, False, False, True]
    full, _ = face_detection.detect_video(detector, frames)
    assert np.abs(boxes - full).max() < 4


def test_interpolate_and_smooth():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 0, 0], [20, 0, 30, 10]], np.float32)
    filled = face_detection.interpolate_missing(boxes, np.array([True, False, True]))
    np.testing.assert_allclose(filled[1], [10, 0, 20, 10])
    rng = np.random.default_rng(0)
    t = np.arange(100, dtype=np.float32)
    centers = np.stack([100 + t, 50 + 0 * t], 1) + rng.normal(0, 3, (100, 2))
    sizes = rng.uniform(40, 60, (100, 1))
    noisy = np.concatenate([centers - sizes / 2, centers + sizes / 2], 1).astype(np.float32)
    smooth = face_detection.smooth_box_centers(noisy, sigma=5)
    np.testing.assert_allclose(smooth[:, 2:] - smooth[:, :2], noisy[:, 2:] - noisy[:, :2], atol=1e-4)  # sizes kept
    c = (smooth[:, :2] + smooth[:, 2:]) / 2
    truth = np.stack([100 + t, 50 + 0 * t], 1)
    assert np.abs(c - truth)[10:-10].std() < np.abs(centers - truth)[10:-10].std() / 3
    const = np.tile([[5, 6, 25, 30]], (20, 1)).astype(np.float32)
    np.testing.assert_allclose(face_detection.smooth_box_centers(const), const, atol=1e-4)
