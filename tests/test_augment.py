"""Tests for input_pipeline.augment (X-NeMo driving-image augmentations)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from input_pipeline import augment as A

ASTRONAUT_FACE = np.array([175, 80, 280, 175], np.float32)  # x0, y0, x1, y1


# --------------------------------------------------------------------------- #
# fixtures / helpers
# --------------------------------------------------------------------------- #


def gradient_image(h: int = 64, w: int = 64) -> np.ndarray:
    """Smooth colourful test image with values in [1, 254]."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 1 + 253 * x / (w - 1)
    g = 1 + 253 * y / (h - 1)
    b = 128 + 100 * np.sin(x / 7.0) * np.cos(y / 5.0)
    return np.stack([r, g, b], axis=-1).round().astype(np.uint8)


def shapes_image(h: int = 96, w: int = 96) -> np.ndarray:
    img = gradient_image(h, w) // 2
    img[h // 4 : h // 2, w // 5 : w // 2] = (250, 40, 40)
    yy, xx = np.mgrid[0:h, 0:w]
    img[(yy - 0.65 * h) ** 2 + (xx - 0.6 * w) ** 2 < (0.15 * h) ** 2] = (30, 200, 60)
    return img


def white_bbox(img: np.ndarray, thr: int = 127) -> np.ndarray:
    """Bounding box (continuous coords) of pixels brighter than thr."""
    mask = img.max(axis=-1) > thr if img.ndim == 3 else img > thr
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    skdata = pytest.importorskip("skimage.data")
    img = skdata.astronaut()
    assert img.shape == (512, 512, 3) and img.dtype == np.uint8
    return img


# --------------------------------------------------------------------------- #
# determinism / dtypes / shapes
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "fn",
    [
        lambda im, rng: A.color_jitter(im, rng),
        lambda im, rng: A.random_scale(im, rng, 0.3, [20, 20, 60, 70])[0],
        lambda im, rng: A.random_scale(im, rng)[0],
        lambda im, rng: A.piecewise_affine(im, rng, 4, 0.03),
        lambda im, rng: A.face_centered_crop(im, [30, 20, 60, 60], rng, 48)[0],
    ],
    ids=["color", "scale_box", "scale", "piecewise", "crop"],
)
def test_ops_deterministic_uint8(fn):
    img = shapes_image(96, 80)
    a = fn(img, np.random.default_rng(3))
    b = fn(img, np.random.default_rng(3))
    c = fn(img, np.random.default_rng(4))
    assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.flags.c_contiguous


def test_shape_kept():
    img = shapes_image(96, 80)
    rng = np.random.default_rng(0)
    assert A.color_jitter(img, rng).shape == img.shape
    assert A.random_scale(img, rng)[0].shape == img.shape
    assert A.piecewise_affine(img, rng).shape == img.shape
    assert A.face_centered_crop(img, [30, 20, 60, 60], rng, 40)[0].shape == (40, 40, 3)
    out, box = A.augment_driving(img, [30, 20, 60, 60], 0)
    assert out.shape == img.shape and out.dtype == np.uint8
    out, box = A.augment_driving(img, [30, 20, 60, 60], 0, out_size=64)
    assert out.shape == (64, 64, 3) and box.dtype == np.float32 and box.shape == (4,)


def test_augment_driving_deterministic():
    img = shapes_image()
    box = np.array([20, 24, 50, 56], np.float32)
    a_img, a_box = A.augment_driving(img, box, 7, out_size=64)
    b_img, b_box = A.augment_driving(img, box, 7, out_size=64)
    c_img, c_box = A.augment_driving(img, box, 8, out_size=64)
    g_img, g_box = A.augment_driving(img, box, np.random.default_rng(7), out_size=64)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_box, b_box)
    np.testing.assert_array_equal(a_img, g_img)  # int seed == default_rng(seed)
    np.testing.assert_array_equal(a_box, g_box)
    assert not np.array_equal(a_img, c_img)
    # inputs are not modified
    np.testing.assert_array_equal(img, shapes_image())
    np.testing.assert_array_equal(box, [20, 24, 50, 56])


def test_rejects_bad_input():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        A.color_jitter(np.zeros((8, 8, 3), np.float32), rng)
    with pytest.raises(ValueError):
        A.random_scale(np.zeros((8, 8), np.uint8), rng)
    with pytest.raises(ValueError):
        A.face_centered_crop(np.zeros((8, 8, 3), np.uint8), [1, 2, 3], rng, 8)


# --------------------------------------------------------------------------- #
# colour jitter
# --------------------------------------------------------------------------- #


def test_color_jitter_zero_strength_is_identity():
    img = shapes_image()
    for seed in range(5):
        out = A.color_jitter(img, np.random.default_rng(seed), 0.0, 0.0, 0.0, 0.0)
        np.testing.assert_array_equal(out, img)
        assert out is not img


def test_color_jitter_consumes_same_draws_for_any_strength():
    rng1, rng2 = np.random.default_rng(5), np.random.default_rng(5)
    A.color_jitter(gradient_image(), rng1, 0.0, 0.0, 0.0, 0.0)
    A.color_jitter(gradient_image(), rng2)
    assert rng1.random() == rng2.random()


def test_brightness_changes_mean_in_sampled_direction():
    img = gradient_image(64, 64) // 2 + 40  # away from the clip limits
    ups = downs = 0
    for seed in range(20):
        params = A.sample_color_params(np.random.default_rng(seed), 0.3, 0.0, 0.0, 0.0)
        assert 0.7 <= params.brightness <= 1.3
        out = A.color_jitter(img, np.random.default_rng(seed), 0.3, 0.0, 0.0, 0.0)
        ratio = out.mean() / img.mean()
        assert ratio == pytest.approx(params.brightness, abs=0.01)
        if params.brightness > 1:
            assert out.mean() > img.mean()
            ups += 1
        else:
            assert out.mean() < img.mean()
            downs += 1
    assert ups and downs


def test_hue_shift_keeps_greys_grey():
    grey_levels = np.arange(0, 256, dtype=np.uint8)
    grey = np.repeat(np.tile(grey_levels, (4, 1))[..., None], 3, axis=-1)
    for seed in range(10):
        out = A.color_jitter(grey, np.random.default_rng(seed), 0.0, 0.0, 0.0, 0.5)
        np.testing.assert_array_equal(out, grey)
    # greys inside a colourful image stay grey under the full jitter too
    img = shapes_image()
    img[:10, :10] = 77
    for seed in range(10):
        out = A.color_jitter(img, np.random.default_rng(seed), 0.3, 0.3, 0.3, 0.05)
        patch = out[:10, :10].astype(int)
        assert (patch.max(-1) - patch.min(-1)).max() == 0


def test_hue_direction_and_saturation_contrast_extremes():
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 200
    third = A.ColorParams((3, 0, 1, 2), 1.0, 1.0, 1.0, 1.0 / 3.0)
    out = A.apply_color_params(red, third)
    np.testing.assert_allclose(out[0, 0], [0, 200, 0], atol=1)  # red -> green
    img = shapes_image()
    grey = A.apply_color_params(img, A.ColorParams((2, 0, 1, 3), 1.0, 1.0, 0.0, 0.0))
    assert (grey.max(-1).astype(int) - grey.min(-1)).max() <= 1
    flat = A.apply_color_params(img, A.ColorParams((1, 0, 2, 3), 1.0, 0.0, 1.0, 0.0))
    assert flat.max() - flat.min() <= 1
    luma = (img.astype(np.float64) @ [0.299, 0.587, 0.114]).mean()
    assert abs(float(flat.mean()) - luma) <= 1.0


def test_color_params_ranges():
    for seed in range(20):
        p = A.sample_color_params(np.random.default_rng(seed), 0.3, 0.2, 0.1, 0.05)
        assert sorted(p.order) == [0, 1, 2, 3]
        assert 0.7 <= p.brightness <= 1.3
        assert 0.8 <= p.contrast <= 1.2
        assert 0.9 <= p.saturation <= 1.1
        assert -0.05 <= p.hue <= 0.05


# --------------------------------------------------------------------------- #
# random scale
# --------------------------------------------------------------------------- #


def test_random_scale_zero_range_is_identity():
    img = shapes_image()
    box = np.array([10, 12, 40, 50], np.float32)
    out, out_box = A.random_scale(img, np.random.default_rng(0), 0.0, box)
    np.testing.assert_array_equal(out, img)
    np.testing.assert_array_equal(out_box, box)
    out, out_box = A.random_scale(img, np.random.default_rng(0), 0.0)
    np.testing.assert_array_equal(out, img)
    assert out_box is None


@pytest.mark.parametrize("seed", range(8))
def test_random_scale_box_matches_white_rectangle(seed):
    img = np.zeros((96, 96, 3), np.uint8)
    box = np.array([32, 40, 60, 62], np.float32)
    img[40:62, 32:60] = 255
    out, out_box = A.random_scale(img, np.random.default_rng(seed), 0.3, box)
    np.testing.assert_allclose(white_bbox(out), out_box, atol=1.0)
    # box centre is the fixed point; the side scales by s in [0.7, 1.3]
    np.testing.assert_allclose(
        (out_box[:2] + out_box[2:]) / 2, (box[:2] + box[2:]) / 2, atol=1e-4
    )
    s = (out_box[2] - out_box[0]) / (box[2] - box[0])
    assert 0.7 - 1e-6 <= s <= 1.3 + 1e-6
    assert (out_box[3] - out_box[1]) / (box[3] - box[1]) == pytest.approx(s, rel=1e-5)


def test_random_scale_about_image_centre_with_reflection():
    img = np.zeros((64, 64, 3), np.uint8)
    img[24:40, 24:40] = 255
    for seed in range(6):
        rng = np.random.default_rng(seed)
        s = 1.0 + 0.3 * np.random.default_rng(seed).uniform(-1, 1)
        out, none = A.random_scale(img, rng, 0.3)
        assert none is None
        expect = np.array([32 - 8 * s, 32 - 8 * s, 32 + 8 * s, 32 + 8 * s])
        np.testing.assert_allclose(white_bbox(out), expect, atol=1.0)
    # zooming out fills the border by reflection, not with black
    bright = np.full((64, 64, 3), 200, np.uint8)
    for seed in range(6):
        out, _ = A.random_scale(bright, np.random.default_rng(seed), 0.3)
        assert out.min() == 200


# --------------------------------------------------------------------------- #
# piecewise affine
# --------------------------------------------------------------------------- #


def test_piecewise_field_zero_offsets_is_identity():
    for h, w, gy, gx in [(64, 64, 4, 4), (37, 50, 3, 5), (2, 2, 1, 1)]:
        mx, my = A.piecewise_affine_field(h, w, np.zeros((gy + 1, gx + 1, 2), np.float32))
        assert mx.dtype == np.float32 and mx.shape == (h, w) and my.shape == (h, w)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        np.testing.assert_array_equal(mx, xx)
        np.testing.assert_array_equal(my, yy)


def test_piecewise_strength_zero_is_identity():
    img = shapes_image()
    out = A.piecewise_affine(img, np.random.default_rng(0), 4, 0.0)
    np.testing.assert_array_equal(out, img)
    # and a zero-offset remap through the field is exact as well
    mx, my = A.piecewise_affine_field(96, 96, np.zeros((5, 5, 2), np.float32))
    np.testing.assert_array_equal(A._remap(img, mx, my), img)


def _random_offsets(seed, h, w, gy, gx, strength):
    rng = np.random.default_rng(seed)
    off = rng.uniform(-1, 1, size=(gy + 1, gx + 1, 2)).astype(np.float32)
    off[..., 0] *= strength * w
    off[..., 1] *= strength * h
    off[0] = off[-1] = 0
    off[:, 0] = off[:, -1] = 0
    return off


@pytest.mark.parametrize("shape", [(64, 64, 4, 4), (50, 70, 3, 5)])
def test_piecewise_field_continuous_and_border_fixed(shape):
    h, w, gy, gx = shape
    off = _random_offsets(1, h, w, gy, gx, 0.05)
    mx, my = A.piecewise_affine_field(h, w, off)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dx, dy = mx - xx, my - yy
    max_off = np.abs(off).max()
    assert np.abs(dx).max() <= np.abs(off[..., 0]).max() + 1e-4
    assert np.abs(dy).max() <= np.abs(off[..., 1]).max() + 1e-4
    # continuity: neighbouring displacements differ by at most the max slope
    cw, ch = (w - 1) / gx, (h - 1) / gy
    bound = 2 * max_off / min(cw, ch) + 1e-4
    for d in (dx, dy):
        assert np.abs(np.diff(d, axis=1)).max() <= bound
        assert np.abs(np.diff(d, axis=0)).max() <= bound
        assert np.abs(np.diff(d, axis=1)).max() < max_off  # no jumps
    # border fixed: the map equals the identity on all four image edges
    for d in (dx, dy):
        assert np.abs(d[0]).max() < 1e-5 and np.abs(d[-1]).max() < 1e-5
        assert np.abs(d[:, 0]).max() < 1e-5 and np.abs(d[:, -1]).max() < 1e-5
    # vertices map exactly by their own offsets where they fall on pixels
    if (w - 1) % gx == 0 and (h - 1) % gy == 0:
        for r in range(gy + 1):
            for c in range(gx + 1):
                y, x = r * (h - 1) // gy, c * (w - 1) // gx
                np.testing.assert_allclose([dx[y, x], dy[y, x]], off[r, c], atol=1e-4)


def _barycentric(p, a, b, c):
    m = np.array([[a[0] - c[0], b[0] - c[0]], [a[1] - c[1], b[1] - c[1]]])
    l1, l2 = np.linalg.solve(m, np.asarray(p, float) - c)
    return l1, l2, 1.0 - l1 - l2


@pytest.mark.parametrize("shape", [(65, 65, 4, 4), (50, 70, 3, 5)])
def test_piecewise_field_is_affine_per_triangle(shape):
    h, w, gy, gx = shape
    off = _random_offsets(2, h, w, gy, gx, 0.04).astype(np.float64)
    mx, my = A.piecewise_affine_field(h, w, off)
    cw, ch = (w - 1) / gx, (h - 1) / gy
    rng = np.random.default_rng(0)
    checked = {"A": 0, "B": 0}
    for _ in range(300):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        c = min(int(x // cw), gx - 1)
        r = min(int(y // ch), gy - 1)
        fu, fv = x / cw - c, y / ch - r
        p00 = np.array([c * cw, r * ch])
        p10, p01, p11 = p00 + [cw, 0], p00 + [0, ch], p00 + [cw, ch]
        if fu >= fv:  # triangle A: 00, 10, 11
            verts, offs, name = (p00, p10, p11), (off[r, c], off[r, c + 1], off[r + 1, c + 1]), "A"
        else:  # triangle B: 00, 01, 11
            verts, offs, name = (p00, p01, p11), (off[r, c], off[r + 1, c], off[r + 1, c + 1]), "B"
        lam = _barycentric((x, y), *verts)
        assert min(lam) >= -1e-9
        d = sum(weight * o for weight, o in zip(lam, offs, strict=True))
        np.testing.assert_allclose([mx[y, x], my[y, x]], [x + d[0], y + d[1]], atol=2e-4)
        checked[name] += 1
    assert checked["A"] > 50 and checked["B"] > 50


def test_piecewise_warp_moves_pixels_moderately():
    img = gradient_image(96, 96)
    out = A.piecewise_affine(img, np.random.default_rng(0), 4, 0.02)
    diff = np.abs(out.astype(int) - img.astype(int))
    assert diff.max() > 0
    # max displacement ~2 px on a gradient of ~2.7 levels / px
    assert diff[..., :2].max() <= 12
    np.testing.assert_array_equal(out[0, :, :2], img[0, :, :2])  # border row fixed


def test_sample_piecewise_offsets_border_zero():
    off = A.sample_piecewise_offsets(80, 60, np.random.default_rng(0), 4, 0.02)
    assert off.shape == (5, 5, 2)
    assert not off[0].any() and not off[-1].any()
    assert not off[:, 0].any() and not off[:, -1].any()
    assert np.abs(off[1:-1, 1:-1, 0]).max() <= 0.02 * 60
    assert np.abs(off[1:-1, 1:-1, 1]).max() <= 0.02 * 80
    assert np.abs(off[1:-1, 1:-1]).min() > 0


# --------------------------------------------------------------------------- #
# face-centred crop
# --------------------------------------------------------------------------- #


def test_face_centered_crop_known_box():
    cv2 = pytest.importorskip("cv2")
    img = shapes_image(96, 96)
    box = np.array([20, 20, 52, 52], np.float32)  # 32 px, centre 36 -> window [4, 68)
    out, out_box = A.face_centered_crop(img, box, np.random.default_rng(0), 32, (2.0, 2.0), 0.0)
    assert out.shape == (32, 32, 3)
    np.testing.assert_allclose(out_box, [8, 8, 24, 24], atol=1e-5)  # centred, side out/2
    expect = cv2.resize(img[4:68, 4:68], (32, 32), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(out, expect)
    # enlarging
    out, out_box = A.face_centered_crop(img, box, np.random.default_rng(0), 128, (2.0, 2.0), 0.0)
    np.testing.assert_allclose(out_box, [32, 32, 96, 96], atol=1e-5)
    expect = cv2.resize(img[4:68, 4:68], (128, 128), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(out, expect)


def test_face_centered_crop_zero_padding():
    img = np.full((50, 60, 3), 9, np.uint8) + shapes_image(50, 60) // 2
    assert img.min() > 0
    box = np.array([0, 0, 20, 20], np.float32)  # window [-10, 30) in x and y
    out, out_box = A.face_centered_crop(img, box, np.random.default_rng(0), 40, (2.0, 2.0), 0.0)
    np.testing.assert_allclose(out_box, [10, 10, 30, 30])
    assert not out[:10].any() and not out[:, :10].any()
    np.testing.assert_array_equal(out[10:, 10:], img[:30, :30])
    # fully outside on the bottom-right
    box = np.array([50, 40, 60, 50], np.float32)  # window [45, 65) x [35, 55)
    out, out_box = A.face_centered_crop(img, box, np.random.default_rng(0), 20, (2.0, 2.0), 0.0)
    np.testing.assert_array_equal(out[:15, :15], img[35:50, 45:60])
    assert not out[15:].any() and not out[:, 15:].any()


@pytest.mark.parametrize("seed", range(6))
def test_face_centered_crop_box_tracks_content(seed):
    img = np.zeros((120, 100, 3), np.uint8)
    box = np.array([30, 40, 62, 80], np.float32)
    img[40:80, 30:62] = 255
    out, out_box = A.face_centered_crop(img, box, np.random.default_rng(seed), 64)
    np.testing.assert_allclose(white_bbox(out), out_box, atol=1.0)
    side_ratio = max(out_box[2] - out_box[0], out_box[3] - out_box[1]) / 64
    assert 1 / 2.4 - 0.02 <= side_ratio <= 1 / 1.6 + 0.02
    centre = (out_box[:2] + out_box[2:]) / 2
    assert np.all(np.abs(centre - 32) <= 0.1 * 40 * 64 / (1.6 * 40) + 1.0)


# --------------------------------------------------------------------------- #
# full chain
# --------------------------------------------------------------------------- #


def test_augment_driving_all_off_is_identity():
    img = shapes_image()
    box = np.array([20, 24, 50, 56], np.float32)
    cfg = A.AugmentConfig(p_color=0.0, p_scale=0.0, p_piecewise=0.0, p_crop=0.0)
    out, out_box = A.augment_driving(img, box, 3, cfg)
    np.testing.assert_array_equal(out, img)
    np.testing.assert_array_equal(out_box, box)
    out, out_box = A.augment_driving(img, None, 3, cfg)
    np.testing.assert_array_equal(out, img)
    assert out_box is None


def test_augment_driving_crop_skipped_letterboxes():
    img = shapes_image(60, 90)
    cfg = A.AugmentConfig(p_color=0.0, p_scale=0.0, p_piecewise=0.0, p_crop=0.0)
    out, out_box = A.augment_driving(img, [30, 15, 60, 45], 0, cfg, out_size=45)
    assert out.shape == (45, 45, 3)
    assert not out[:7].any() and not out[-7:].any()  # 15 px of padding -> 7.5 px
    np.testing.assert_allclose(out_box, [15, 15, 30, 30], atol=1e-5)


def test_augment_driving_fused_warp_matches_sequential():
    """Scale + piecewise are fused into one remap; compare with applying both ops."""
    img = gradient_image(96, 96)
    box = np.array([30, 30, 66, 70], np.float32)
    cfg = A.AugmentConfig(p_color=0.0, p_crop=0.0, piecewise_strength=0.03)
    for seed in range(4):
        out, out_box = A.augment_driving(img, box, seed, cfg)
        # replay the chain's draws: crop gate + sub-seed, then scale, then piecewise
        rng = np.random.default_rng(seed)
        rng.random(), rng.integers(0, 2**63)
        rng.random()
        s_rng = np.random.default_rng(rng.integers(0, 2**63))
        rng.random()
        p_rng = np.random.default_rng(rng.integers(0, 2**63))
        ref, ref_box = A.random_scale(img, s_rng, cfg.scale, box)
        ref = A.piecewise_affine(ref, p_rng, cfg.piecewise_grid, cfg.piecewise_strength)
        np.testing.assert_allclose(out_box, np.clip(ref_box, 0, 96), atol=1e-5)
        diff = np.abs(out.astype(int) - ref.astype(int))
        assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 3


def test_augment_driving_astronaut(astronaut):
    box = ASTRONAUT_FACE
    sizes = []
    for seed in range(6):
        out, out_box = A.augment_driving(astronaut, box, seed, out_size=128)
        assert out.shape == (128, 128, 3) and out.dtype == np.uint8
        assert out_box.dtype == np.float32
        assert np.all(out_box >= 0) and np.all(out_box <= 128)
        w, h = out_box[2] - out_box[0], out_box[3] - out_box[1]
        assert w > 10 and h > 10
        sizes.append(max(w, h))
        assert out.std() > 20  # a real picture, not a blank
    # face size varies (crop scale and zoom)
    assert max(sizes) - min(sizes) > 5


def test_augment_driving_astronaut_keeps_size_without_out_size(astronaut):
    out, out_box = A.augment_driving(astronaut, ASTRONAUT_FACE, 0)
    assert out.shape == astronaut.shape
    assert np.all(out_box >= 0) and np.all(out_box <= 512)
    # moderate change: the image is still close to the original on average
    # around the face (zoom about the face centre keeps it in place)
    x0, y0, x1, y1 = ASTRONAUT_FACE.astype(int)
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    assert np.all(np.abs((out_box[:2] + out_box[2:]) / 2 - [cx, cy]) < 1.0)


def test_config_is_frozen_dataclass():
    cfg = A.AugmentConfig()
    assert cfg.scale == 0.3 and cfg.crop_scale == (1.6, 2.4) and cfg.piecewise_grid == 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.scale = 0.1  # type: ignore[misc]
