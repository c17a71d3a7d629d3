"""Tests of the procedural synthetic talking-head dataset (input_pipeline/synthetic.py)."""

import dataclasses

import cv2
import numpy as np
import pytest

from input_pipeline import synthetic as sy

M = {name: i for i, name in enumerate(sy.MOTION_NAMES)}
L = {name: i for i, name in enumerate(sy.LANDMARK_NAMES)}


def _motion(**kw) -> np.ndarray:
    m = sy.neutral_motion(1)[0]
    for k, v in kw.items():
        m[M[k]] = v
    return m


# ----------------------------------------------------------------------------- API / identity


def test_names_and_vector_layout():
    assert sy.MOTION_NAMES == ("yaw", "pitch", "roll", "tx", "ty", "scale", "mouth_open", "smile", "blink",
                               "brow_raise", "gaze_x", "gaze_y")
    assert set(sy.MOTION_RANGES) == set(sy.MOTION_NAMES)
    assert len(set(sy.IDENTITY_NAMES)) == len(sy.IDENTITY_NAMES)
    assert len(set(sy.LANDMARK_NAMES)) == len(sy.LANDMARK_NAMES)
    for name in ("left_eye", "right_eye", "nose_tip", "mouth_left", "mouth_right", "upper_lip", "lower_lip", "chin"):
        assert name in sy.LANDMARK_NAMES
    v = sy.Identity().to_vector()
    assert v.dtype == np.float32 and v.shape == (len(sy.IDENTITY_NAMES),)
    assert v[sy.IDENTITY_NAMES.index("face_width")] == np.float32(sy.Identity().face_width)
    assert {"skin_r", "skin_g", "skin_b", "hair_style", "bg_angle"} <= set(sy.IDENTITY_NAMES)


def test_neutral_motion():
    m = sy.neutral_motion(3)
    assert m.shape == (3, len(sy.MOTION_NAMES)) and m.dtype == np.float32
    assert (m[:, M["scale"]] == 1).all()
    assert np.count_nonzero(m) == 3


@pytest.mark.parametrize("seed", [0, 1, 7, 123])
def test_identity_vector_round_trip(seed):
    ident = sy.sample_identity(seed)
    v = ident.to_vector()
    assert sy.Identity.from_vector(v) == ident
    np.testing.assert_array_equal(sy.Identity.from_vector(v).to_vector(), v)
    # also for a hand-made identity and a perturbed vector
    v2 = v.copy()
    v2[sy.IDENTITY_NAMES.index("nose_length")] += 0.1
    np.testing.assert_array_equal(sy.Identity.from_vector(v2).to_vector(), v2)
    with pytest.raises(ValueError):
        sy.Identity.from_vector(v[:-1])


def test_sample_identity_deterministic_and_varied():
    assert sy.sample_identity(5) == sy.sample_identity(5)
    assert sy.sample_identity(np.random.default_rng(5)) == sy.sample_identity(5)
    vecs = np.stack([sy.sample_identity(s).to_vector() for s in range(20)])
    assert np.isfinite(vecs).all()
    assert (vecs.std(0) > 0).sum() >= len(sy.IDENTITY_NAMES) - 2
    styles = {sy.sample_identity(s).hair_style for s in range(20)}
    assert len(styles) >= 3 and styles <= set(range(len(sy.HAIR_STYLES)))


# ----------------------------------------------------------------------------- motion


def test_motion_ranges_and_smoothness():
    fps = 25.0
    all_motion = []
    for seed in range(8):
        m = sy.sample_motion(seed, 250, fps=fps)
        assert m.shape == (250, len(sy.MOTION_NAMES)) and m.dtype == np.float32
        all_motion.append(m)
        for name, (lo, hi) in sy.MOTION_RANGES.items():
            col = m[:, M[name]]
            assert col.min() >= lo - 1e-6 and col.max() <= hi + 1e-6, name
        for name in sy.MOTION_NAMES:
            col = m[:, M[name]].astype(np.float64)
            span = sy.MOTION_RANGES[name][1] - sy.MOTION_RANGES[name][0]
            d2 = np.abs(np.diff(col, 2)).mean()
            limit = 0.05 if name == "blink" else 0.02
            assert d2 < limit * span, (name, d2, span)
    all_motion = np.concatenate(all_motion)
    # trajectories actually move: a decent share of every range is used
    for name, (lo, hi) in sy.MOTION_RANGES.items():
        col = all_motion[:, M[name]]
        assert col.max() - col.min() > 0.25 * (hi - lo), name
    # blinks are short pulses that reach (almost) fully closed eyes
    blink = all_motion[:, M["blink"]]
    assert blink.max() > 0.95 and np.mean(blink > 0.5) < 0.1


def test_motion_deterministic_prefix_and_amplitude():
    a = sy.sample_motion(3, 100)
    np.testing.assert_array_equal(a, sy.sample_motion(3, 100))
    np.testing.assert_array_equal(a[:40], sy.sample_motion(3, 40))     # longer clip extends shorter one
    assert not np.array_equal(a, sy.sample_motion(4, 100))
    small = sy.sample_motion(3, 100, amplitude=0.5)
    np.testing.assert_allclose(small[:, M["yaw"]], 0.5 * a[:, M["yaw"]], atol=1e-6)
    still = sy.sample_motion(3, 10, amplitude=0.0)
    np.testing.assert_allclose(still, sy.neutral_motion(10), atol=1e-7)
    assert sy.sample_motion(3, 0).shape == (0, len(sy.MOTION_NAMES))


# ----------------------------------------------------------------------------- frames


def test_make_clip_deterministic():
    a = sy.make_clip(3, 5, 64)
    b = sy.make_clip(3, 5, 64)
    for f in ("frames", "boxes", "landmarks", "motion", "identity"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    c = sy.make_clip(4, 5, 64)
    assert not np.array_equal(a.frames, c.frames)
    assert not np.array_equal(a.motion, c.motion)
    assert not np.array_equal(a.identity, c.identity)
    # the derived seeds reproduce the clip; either can be overridden independently
    id_seed, mo_seed = sy.derive_seeds(3)
    d = sy.make_clip(99, 5, 64, identity_seed=id_seed, motion_seed=mo_seed)
    np.testing.assert_array_equal(a.frames, d.frames)
    e = sy.make_clip(3, 5, 64, identity_seed=17)
    np.testing.assert_array_equal(e.motion, a.motion)
    np.testing.assert_array_equal(e.identity, sy.sample_identity(17).to_vector())


def test_clip_shapes_and_dtypes():
    clip = sy.make_clip(0, 4, 64, fps=30.0)
    k = len(sy.LANDMARK_NAMES)
    assert clip.frames.shape == (4, 64, 64, 3) and clip.frames.dtype == np.uint8
    assert clip.boxes.shape == (4, 4) and clip.boxes.dtype == np.float32
    assert clip.landmarks.shape == (4, k, 2) and clip.landmarks.dtype == np.float32
    assert clip.motion.shape == (4, len(sy.MOTION_NAMES)) and clip.motion.dtype == np.float32
    assert clip.identity.shape == (len(sy.IDENTITY_NAMES),) and clip.identity.dtype == np.float32
    assert clip.fps == 30.0 and len(clip) == 4
    assert np.isfinite(clip.boxes).all() and np.isfinite(clip.landmarks).all()
    with pytest.raises(ValueError):
        sy.render_clip(sy.Identity(), np.zeros((3, 5), np.float32), 32)
    with pytest.raises(ValueError):
        sy.render_frame(sy.Identity(), np.zeros(3), 32)


@pytest.mark.parametrize("size", [32, 37, 64, 128])
def test_any_size(size):
    ident = sy.sample_identity(2)
    img, box, lm = sy.render_frame(ident, _motion(yaw=0.2, mouth_open=0.5), size)
    assert img.shape == (size, size, 3) and img.dtype == np.uint8
    assert box.shape == (4,) and lm.shape == (len(sy.LANDMARK_NAMES), 2)
    assert img.std() > 10                                  # not a blank image
    assert 0 < box[0] < box[2] < size and 0 < box[1] < box[3] < size
    assert ((lm > 0) & (lm < size)).all()


def test_same_picture_at_different_sizes():
    ident = sy.sample_identity(6)
    m = _motion(yaw=-0.3, pitch=0.1, smile=0.6, mouth_open=0.4)
    small, box_s, lm_s = sy.render_frame(ident, m, 64)
    big, box_b, lm_b = sy.render_frame(ident, m, 256)
    down = cv2.resize(big, (64, 64), interpolation=cv2.INTER_AREA)
    assert np.abs(down.astype(float) - small.astype(float)).mean() < 4.0
    np.testing.assert_allclose(box_b / 4, box_s, atol=1e-3)
    np.testing.assert_allclose(lm_b / 4, lm_s, atol=1e-3)


def test_antialiased():
    img, _, _ = sy.render_frame(sy.sample_identity(1), _motion(yaw=0.25, mouth_open=0.5), 96)
    colours = np.unique(img.reshape(-1, 3), axis=0)
    # ~35 flat colours are drawn, plus a smooth background: AA edges create many more
    assert len(colours) > 600
    # across the face edge on the image row through the eyes, the colour changes gradually
    ident = sy.Identity(bg_pattern=0.0)
    img, _, lm = sy.render_frame(ident, sy.neutral_motion(1)[0], 96)
    row = img[int(lm[L["left_jaw"], 1])].astype(int)
    skin = np.array([round(c * 255) for c in ident.skin_rgb])
    dist = np.abs(row - skin).sum(1)
    assert ((dist > 10) & (dist < np.abs(row[0] - skin).sum() - 10)).sum() >= 2


def test_face_box_framing():
    sizes = []
    for seed in range(10):
        ident = sy.sample_identity(seed)
        _, box, lm = sy.render_frame(ident, sy.neutral_motion(1)[0], 100)
        w, h = box[2] - box[0], box[3] - box[1]
        sizes.append(w / 100)
        assert abs((box[0] + box[2]) / 2 - 50) < 1e-3           # centred horizontally
        assert abs((box[1] + box[3]) / 2 - 50) < 0.2 * h
        # the box covers the eyes, nose and mouth, and reaches about brows to chin
        for name in ("left_eye", "right_eye", "nose_tip", "mouth_left", "mouth_right", "lower_lip"):
            x, y = lm[L[name]]
            assert box[0] < x < box[2] and box[1] < y < box[3], name
        assert abs(lm[L["chin"], 1] - box[3]) < 0.12 * h
    assert 0.38 < min(sizes) and max(sizes) < 0.52


# ----------------------------------------------------------------------------- independence


def test_same_identity_other_motion():
    ident = sy.sample_identity(11)
    a = sy.render_clip(ident, sy.sample_motion(1, 6, amplitude=0.7), 64)
    b = sy.render_clip(ident, sy.sample_motion(2, 6, amplitude=0.7), 64)
    np.testing.assert_array_equal(a.identity, b.identity)
    c = 5
    for clip_a, clip_b in ((a, b), (a, a)):
        for corner in (np.s_[:, :c, :c], np.s_[:, :c, -c:]):
            np.testing.assert_array_equal(clip_a.frames[corner], clip_b.frames[corner])
    # the static background does not move with the head either
    np.testing.assert_array_equal(a.frames[:, :c, :c], np.broadcast_to(a.frames[:1, :c, :c], a.frames[:, :c, :c].shape))
    assert np.abs(a.frames.astype(int) - b.frames.astype(int)).sum(-1).astype(bool)[:, 16:48, 16:48].mean() > 0.1


def test_same_motion_other_identity():
    a = sy.make_clip(0, 12, 96, identity_seed=1, motion_seed=5)
    b = sy.make_clip(0, 12, 96, identity_seed=2, motion_seed=5)
    np.testing.assert_array_equal(a.motion, b.motion)
    assert not np.array_equal(a.identity, b.identity)
    ca = (a.boxes[:, :2] + a.boxes[:, 2:]) / 2
    cb = (b.boxes[:, :2] + b.boxes[:, 2:]) / 2
    np.testing.assert_allclose(ca, cb, atol=1.0)
    for k in (0, 1):                      # width and height ratios are constant over the clip
        ratio = (a.boxes[:, k + 2] - a.boxes[:, k]) / (b.boxes[:, k + 2] - b.boxes[:, k])
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-4)
    # and the box follows the motion: it moves when the head moves
    assert np.ptp(ca, axis=0).max() > 2.0


# ----------------------------------------------------------------------------- semantic controls


def _changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(int) - b.astype(int)).sum(-1) > 0


def _region(points: np.ndarray, pad_x: float, pad_y: float, size: int) -> np.ndarray:
    """Axis-aligned box around ``points`` (pixels) grown by the pads, as a mask."""
    mask = np.zeros((size, size), bool)
    x0, y0 = points.min(0) - (pad_x, pad_y)
    x1, y1 = points.max(0) + (pad_x, pad_y)
    mask[max(int(np.floor(y0)), 0):int(np.ceil(y1)) + 1, max(int(np.floor(x0)), 0):int(np.ceil(x1)) + 1] = True
    return mask


def _face_uv(lm: np.ndarray, size: int):
    """Pixel-centre coordinates in the face's own frame: u along the eye line, v across it,
    origin between the eyes; also returns the inter-eye distance d."""
    left, right = lm[L["left_eye"]].astype(float), lm[L["right_eye"]].astype(float)
    centre, d = (left + right) / 2, float(np.linalg.norm(right - left))
    ex = (right - left) / d
    ey = np.array([-ex[1], ex[0]])
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    rel = np.stack([xs - centre[0], ys - centre[1]], -1)
    return rel @ ex, rel @ ey, d, (centre, ex, ey)


def _eye_region(lm: np.ndarray, size: int) -> np.ndarray:
    u, v, d, _ = _face_uv(lm, size)
    return (np.abs(u) <= 0.95 * d + 1.5) & (np.abs(v) <= 0.36 * d + 1.5)


def _mouth_region(lm_list, size: int) -> np.ndarray:
    u, v, d, (centre, ex, ey) = _face_uv(lm_list[0], size)
    pts = np.concatenate([lm[[L["mouth_left"], L["mouth_right"], L["upper_lip"], L["lower_lip"]]] for lm in lm_list])
    pu, pv = (pts - centre) @ ex, (pts - centre) @ ey
    w = np.ptp(pu)
    return ((u >= pu.min() - 0.1 * w - 1.5) & (u <= pu.max() + 0.1 * w + 1.5)
            & (v >= pv.min() - 0.25 * w - 1.5) & (v <= pv.max() + 0.25 * w + 1.5))


@pytest.mark.parametrize("seed,pose", [(0, {}), (3, {"yaw": 0.3, "roll": 0.1}), (8, {"pitch": -0.2, "yaw": -0.2})])
def test_mouth_open_changes_only_the_mouth(seed, pose):
    size = 96
    ident = sy.sample_identity(seed)
    closed, _, lm0 = sy.render_frame(ident, _motion(mouth_open=0.0, **pose), size)
    opened, _, lm1 = sy.render_frame(ident, _motion(mouth_open=1.0, **pose), size)
    diff = _changed(closed, opened)
    assert diff.sum() > 20
    assert not diff[~_mouth_region([lm0, lm1], size)].any()
    assert not diff[_eye_region(lm0, size)].any()
    assert lm1[L["lower_lip"], 1] > lm0[L["lower_lip"], 1] + 3        # the lower lip drops
    np.testing.assert_array_equal(lm0[L["nose_tip"]], lm1[L["nose_tip"]])


@pytest.mark.parametrize("seed,pose", [(1, {}), (4, {"yaw": -0.3, "pitch": 0.15})])
def test_blink_changes_only_the_eyes(seed, pose):
    size = 128
    ident = sy.sample_identity(seed)
    opened, _, lm0 = sy.render_frame(ident, _motion(blink=0.0, **pose), size)
    closed, _, lm1 = sy.render_frame(ident, _motion(blink=1.0, **pose), size)
    diff = _changed(opened, closed)
    assert diff.sum() > 10
    assert not diff[~_eye_region(lm0, size)].any()
    assert not diff[_mouth_region([lm0], size)].any()
    # closed eyes show no eye white
    eye = _eye_region(lm0, size)
    assert (opened[eye].min(-1) > 200).sum() > 3 * (closed[eye].min(-1) > 200).sum()


def test_smile_and_brows_and_gaze():
    size = 128
    ident = sy.sample_identity(9)
    _, _, lm0 = sy.render_frame(ident, _motion(), size)
    _, _, lm_s = sy.render_frame(ident, _motion(smile=1.0), size)
    assert lm_s[L["mouth_left"], 1] < lm0[L["mouth_left"], 1] - 1      # corners go up ...
    assert lm_s[L["mouth_right"], 0] - lm_s[L["mouth_left"], 0] > lm0[L["mouth_right"], 0] - lm0[L["mouth_left"], 0]
    _, _, lm_b = sy.render_frame(ident, _motion(brow_raise=1.0), size)
    assert lm_b[L["left_brow"], 1] < lm0[L["left_brow"], 1] - 1
    _, _, lm_g = sy.render_frame(ident, _motion(gaze_x=1.0, gaze_y=-1.0), size)
    assert lm_g[L["left_pupil"], 0] > lm0[L["left_pupil"], 0] + 1
    assert lm_g[L["left_pupil"], 1] < lm0[L["left_pupil"], 1]
    np.testing.assert_array_equal(lm_g[L["left_eye"]], lm0[L["left_eye"]])


def test_head_pose_moves_landmarks():
    size = 128
    ident = sy.sample_identity(12)
    xs, ys = [], []
    for yaw in (-0.6, -0.3, 0.0, 0.3, 0.6):
        _, _, lm = sy.render_frame(ident, _motion(yaw=yaw), size)
        xs.append(lm[L["nose_tip"], 0])
    assert np.all(np.diff(xs) > 1)                # positive yaw: nose to image right
    for pitch in (-0.4, 0.0, 0.4):
        _, _, lm = sy.render_frame(ident, _motion(pitch=pitch), size)
        ys.append(lm[L["nose_tip"], 1])
    assert np.all(np.diff(ys) > 1)                # positive pitch: nose down
    _, _, lm = sy.render_frame(ident, _motion(roll=0.3), size)
    left, right = lm[L["left_eye"]], lm[L["right_eye"]]
    assert right[1] > left[1] + 2                 # positive roll: clockwise on screen
    # turning strongly hides the far eye but still renders a head
    img, _, _ = sy.render_frame(ident, _motion(yaw=np.pi), size)
    assert img.shape == (size, size, 3)


def test_translation_and_scale_move_the_box():
    size = 96
    ident = sy.sample_identity(4)
    pose = dict(yaw=0.2, pitch=-0.1)
    img0, box0, lm0 = sy.render_frame(ident, _motion(**pose), size)
    img1, box1, lm1 = sy.render_frame(ident, _motion(tx=0.05, ty=-0.03, **pose), size)
    np.testing.assert_allclose(box1 - box0, [0.05 * size, -0.03 * size] * 2, atol=1e-3)
    np.testing.assert_allclose(lm1 - lm0, np.broadcast_to([0.05 * size, -0.03 * size], lm0.shape), atol=1e-3)
    _, box2, _ = sy.render_frame(ident, _motion(scale=1.1, **pose), size)
    np.testing.assert_allclose((box2[2:] - box2[:2]) / (box0[2:] - box0[:2]), 1.1, rtol=1e-4)
    # scale acts about the head origin at the image centre (tx = ty = 0 here)
    np.testing.assert_allclose((box2[2:] + box2[:2]) / 2 - size / 2, 1.1 * ((box0[2:] + box0[:2]) / 2 - size / 2),
                               atol=1e-3)
    # the face pixels moved by about tx*size: compare the shifted image
    shift = np.float32([[1, 0, -0.05 * size], [0, 1, 0.03 * size]])
    back = cv2.warpAffine(img1, shift, (size, size))
    head = _region(lm0, 3, 3, size)
    assert np.abs(back[head].astype(int) - img0[head].astype(int)).mean() < 12


def test_identity_changes_appearance_not_geometry_of_motion():
    size = 64
    m = _motion(yaw=0.2, mouth_open=0.3)
    a, box_a, _ = sy.render_frame(sy.sample_identity(20), m, size)
    ident = dataclasses.replace(sy.sample_identity(20), skin_rgb=(0.3, 0.6, 0.3))
    b, box_b, _ = sy.render_frame(ident, m, size)
    np.testing.assert_array_equal(box_a, box_b)
    assert _changed(a, b).mean() > 0.05
