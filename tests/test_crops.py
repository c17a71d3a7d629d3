import numpy as np
import pytest

from input_pipeline import crops


def test_xnemo_reference_crop_formula_and_padding():
    assert crops.xnemo_reference_window([100, 100, 200, 200]) == (50, 50, 250, 250)
    # a non-square box is grown to a square about its centre (no squashing)
    assert crops.xnemo_reference_window([100, 100, 200, 160]) == (50, 30, 250, 230)
    img = np.full((300, 300, 3), 200, np.uint8)
    crop, box = crops.xnemo_reference_crop(img, [0, 0, 100, 100], size=64)
    assert crop.shape == (64, 64, 3)
    # window (-50, -50, 150, 150): the top-left quarter is outside the image and zero-padded
    assert crop[:14, :14].max() == 0 and crop[20:, 20:].min() == 200
    np.testing.assert_allclose(box, [16, 16, 48, 48])


def test_xnemo_driving_crop_size():
    assert crops.xnemo_driving_crop_size([100, 100, 200, 180], 480, 640) == (110, 110)
    # the 1.1x square would leave the frame: raw box kept, sizes rounded down to even
    assert crops.xnemo_driving_crop_size([0, 10, 101, 97], 480, 640) == (100, 86)


def test_xnemo_driving_windows_smoothed_fixed_size_inside():
    t = np.arange(30, dtype=np.float32)[:, None]
    boxes = np.concatenate([100 + 2 * t, 100 + 0 * t, 200 + 2 * t, 200 + 0 * t], 1)
    boxes[15] += 20  # a jump in one frame is smoothed away
    w = crops.xnemo_driving_windows(boxes, 300, 300)
    assert (w[:, 2] - w[:, 0] == 110).all() and (w[:, 3] - w[:, 1] == 110).all()
    assert (w[:, 0] >= 0).all() and (w[:, 2] <= 300).all() and (w[:, 3] <= 300).all()
    cx = (w[:, 0] + w[:, 2]) / 2
    assert np.abs(np.diff(cx)).max() <= 4
    frames = np.zeros((30, 300, 300, 3), np.uint8)
    assert crops.xnemo_driving_crops(frames, boxes, size=32).shape == (30, 32, 32, 3)


def test_liax_crop_matches_official_arithmetic():
    box = (100, 120, 200, 240)
    # by hand: wi = max(.25, (1.5*120-100)/200) = .4, hi = max(.25, (1.5*100-120)/240) = .25
    # left = int(100-40)=60, top = int(120 - .25*120*1.5)=75, right = 240, bot = 270 -> w 180, h 195
    assert crops.liax_grown_box(box, 480, 640) == (180, 195, 60, 75)
    # square of side 180 centred at (60+90, 75+97) -> top-left (60, 82)
    assert crops.liax_crop_window(box, 480, 640) == (60, 82, 240, 262)
    # near the bottom-right corner the square is shifted inside the frame
    x0, y0, x1, y1 = crops.liax_crop_window((560, 400, 630, 470), 480, 640)
    assert x1 <= 640 and y1 <= 480 and x1 - x0 == y1 - y0
    img = np.zeros((480, 640, 3), np.uint8)
    assert crops.liax_crop(img, box).shape == (180, 180, 3)


def test_relative_box_transform_official_order():
    f = crops.relative_box_transform([100, 100, 200, 200], [110, 130, 230, 250])
    np.testing.assert_allclose(f, [0.4, 0.2, 1.2], rtol=1e-6)  # (dy, dx, s)
    many = crops.relative_box_transform([100, 100, 200, 200], [[100, 100, 200, 200], [110, 130, 230, 250]])
    np.testing.assert_allclose(many, [[0, 0, 1], [0.4, 0.2, 1.2]], rtol=1e-6, atol=1e-7)


def test_stable_clip_window_covers_all_boxes():
    t = np.arange(20, dtype=np.float32)[:, None]
    boxes = np.concatenate([200 + 3 * t, 150 + 0 * t, 300 + 3 * t, 250 + 0 * t], 1)
    x0, y0, x1, y1 = crops.stable_clip_window(boxes, 480, 640, scale=2.0)
    assert x1 - x0 == y1 - y0 == 200
    assert x0 <= boxes[:, 0].min() and x1 >= boxes[:, 2].max() and y0 <= 150 and y1 >= 250
    # never larger than the frame, always inside it
    x0, y0, x1, y1 = crops.stable_clip_window(boxes, 200, 640, scale=4.0)
    assert y1 - y0 == 200 and y0 == 0 and x1 - x0 == 200


@pytest.mark.parametrize("shape", [(10, 10), (100, 50)])
def test_resize_methods(shape):
    img = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    for method in ["auto", "lanczos", "bilinear", "area"]:
        assert crops.resize(img, *shape, method=method).shape == shape + (3,)
    assert crops.resize(img, 40, 60) is img
