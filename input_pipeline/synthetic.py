"""Procedural synthetic talking heads (numpy + OpenCV only).

This is the built-in default dataset for demos, tests and motion/identity
benchmarks of the portrait-animation models.  Every clip is generated from two
independent factors:

* an :class:`Identity` -- static appearance (face shape, colours, hair,
  feature sizes, background), flattened by :meth:`Identity.to_vector` into a
  float32 vector whose entries are named by :data:`IDENTITY_NAMES`;
* a motion trajectory -- float32 array ``(T, len(MOTION_NAMES))`` of per-frame
  pose and expression parameters.

Either factor can be changed while the other is kept fixed, so one can render
"the same person doing something else" and "the same motion on somebody else".

Motion channels (:data:`MOTION_NAMES`) and units
-----------------------------------------------
==============  ============================================================  ======================
channel         meaning                                                       range at amplitude 1
==============  ============================================================  ======================
``yaw``         head rotation about the vertical axis, radians; positive      ``[-0.6, 0.6]``
                turns the nose towards image right (+x)
``pitch``       rotation about the horizontal axis, radians; positive tilts   ``[-0.4, 0.4]``
                the nose downwards (+y, "looking down")
``roll``        in-plane rotation, radians; positive is clockwise on screen   ``[-0.3, 0.3]``
``tx``, ``ty``  head translation as a fraction of the image size (+x right,   ``[-0.08, 0.08]``
                +y down)
``scale``       multiplicative head size                                      ``[0.85, 1.15]``
``mouth_open``  0 closed .. 1 wide open (jaw/chin do not move)                ``[0, 1]``
``smile``       0 neutral .. 1 broad smile (corners up, mouth wider)          ``[0, 1]``
``blink``       0 eyes open .. 1 eyes closed                                  ``[0, 1]``
``brow_raise``  0 neutral .. 1 brows raised                                   ``[0, 1]``
``gaze_x``      iris offset, -1 image left .. +1 image right                  ``[-1, 1]``
``gaze_y``      iris offset, -1 up .. +1 down                                 ``[-1, 1]``
==============  ============================================================  ======================

:func:`sample_motion` draws smooth trajectories (sums of a few random
low-frequency sinusoids per channel, 0.05-0.6 Hz, a little faster for
``mouth_open``, plus occasional blinks that are short raised-cosine pulses).  ``amplitude`` multiplies the
excursions; ranges of
the bounded channels (``[0, 1]`` and ``[-1, 1]``) are clipped.  Because the
random draws do not depend on ``num_frames``, a longer trajectory with the
same seed extends a shorter one.

Geometry and coordinates
------------------------
All geometry lives in *normalised image units* (1.0 = image width = image
height) and is multiplied by the image ``size`` only when drawing, so the same
identity and motion rendered at different sizes give the same picture up to
resampling.  Pixel coordinates returned in ``boxes`` and ``landmarks`` are
continuous: the image spans ``[0, size]`` and pixel ``(row i, col j)`` has its
centre at ``(x, y) = (j + 0.5, i + 0.5)``.

The head is an ellipsoid (its lower half narrowed towards the chin by
``jaw``) with facial features placed as 3-D points on its surface.  The head
frame has x right, y down, z towards the camera, and its origin is the centre
of the brows-to-chin face region.  The head is rotated by
``R = Rz(roll) @ Rx(pitch) @ Ry(yaw)``, scaled by ``scale``, projected
orthographically and placed at image position ``(0.5 + tx, 0.5 + ty)``.
Features that turn away are hidden and parts are drawn in depth order.  The
neck/shoulders follow ``tx``, ``ty`` and ``scale`` but not the rotation; the
background is static.

Face box (``boxes``, like a face detector's box around brows-to-chin and
cheek-to-cheek): its centre is the projection of a fixed point
``(0, 0, BOX_ANCHOR_DEPTH)`` of the head frame, so it depends only on the
motion; its width and height are ``1.1 * face_width`` and ``0.7 *
face_width * face_aspect`` (the brows-to-chin extent plus a margin) times
``scale`` -- pose-invariant, like a detector box.

Landmarks (:data:`LANDMARK_NAMES`) are projections of 3-D points on the head,
returned whether or not they are visible.  ``left_*``/``right_*`` refer to
the image side in a frontal view (so ``left_eye`` is the subject's right eye).

Appearance: skin tones from light to dark, five hair styles
(:data:`HAIR_STYLES`: short, long, bob parted left/right, curly), iris/lip/
shirt colours, and a static two-colour gradient background with an optional
soft stripe pattern.  Hair is an ellipsoid shell around the head cut by
hairline planes; the part facing the camera is drawn over the face, the rest
behind it.  The face has a simple cel-shading crescent (light from the upper
left).

Rendering uses OpenCV anti-aliased drawing (``cv2.LINE_AA``) with 4 sub-pixel
bits; everything is deterministic (no global random state).  Cost is about
3 ms per frame on one CPU core, nearly independent of the size up to 512 px.

Example::

    clip = make_clip(seed=0, num_frames=50, size=256)        # random person + motion
    other = make_clip(seed=0, num_frames=50, size=256, identity_seed=123)   # same motion, other person
    frame, box, landmarks = render_frame(sample_identity(1), neutral_motion()[0], 128)
"""

from __future__ import annotations

import colorsys
import dataclasses
import functools
import math
from collections.abc import Callable

import cv2
import numpy as np

__all__ = [
    "MOTION_NAMES",
    "MOTION_RANGES",
    "IDENTITY_NAMES",
    "LANDMARK_NAMES",
    "BOX_ANCHOR_DEPTH",
    "HAIR_STYLES",
    "Identity",
    "SyntheticClip",
    "sample_identity",
    "sample_motion",
    "neutral_motion",
    "derive_seeds",
    "render_frame",
    "render_clip",
    "make_clip",
]

# ---------------------------------------------------------------------------
# Motion
# ---------------------------------------------------------------------------

MOTION_NAMES: tuple[str, ...] = (
    "yaw", "pitch", "roll", "tx", "ty", "scale",
    "mouth_open", "smile", "blink", "brow_raise", "gaze_x", "gaze_y",
)
_MI = {name: i for i, name in enumerate(MOTION_NAMES)}

#: Documented value range of every motion channel at ``amplitude=1``.
MOTION_RANGES: dict[str, tuple[float, float]] = {
    "yaw": (-0.6, 0.6),
    "pitch": (-0.4, 0.4),
    "roll": (-0.3, 0.3),
    "tx": (-0.08, 0.08),
    "ty": (-0.08, 0.08),
    "scale": (0.85, 1.15),
    "mouth_open": (0.0, 1.0),
    "smile": (0.0, 1.0),
    "blink": (0.0, 1.0),
    "brow_raise": (0.0, 1.0),
    "gaze_x": (-1.0, 1.0),
    "gaze_y": (-1.0, 1.0),
}

# (frequency band in Hz) of the sinusoids of each smooth channel.
_MOTION_BANDS: dict[str, tuple[float, float]] = {
    "yaw": (0.05, 0.6),
    "pitch": (0.05, 0.6),
    "roll": (0.05, 0.5),
    "tx": (0.05, 0.4),
    "ty": (0.05, 0.4),
    "scale": (0.05, 0.3),
    "mouth_open": (0.1, 0.8),   # a little faster than the pose (speech-like), still smooth
    "smile": (0.05, 0.4),
    "brow_raise": (0.05, 0.6),
    "gaze_x": (0.05, 0.6),
    "gaze_y": (0.05, 0.6),
}
_NUM_SINUSOIDS = 3


def _rng(seed: int | np.random.Generator | np.random.SeedSequence) -> np.random.Generator:
    return np.random.default_rng(seed)


def neutral_motion(num_frames: int = 1) -> np.ndarray:
    """Neutral (frontal, centred, relaxed) motion: zeros except ``scale = 1``."""
    m = np.zeros((int(num_frames), len(MOTION_NAMES)), np.float32)
    m[:, _MI["scale"]] = 1.0
    return m


def sample_motion(
    seed: int | np.random.Generator,
    num_frames: int,
    fps: float = 25.0,
    amplitude: float = 1.0,
) -> np.ndarray:
    """Random smooth motion trajectory, float32 ``(num_frames, len(MOTION_NAMES))``.

    Each smooth channel is ``sum_k w_k sin(2 pi f_k t + phi_k)`` with
    ``sum_k w_k <= 1`` (so it lies in ``[-1, 1]``) mapped to the channel's
    range scaled by ``amplitude``; ``[0, 1]`` channels use a smooth
    non-negative map of it (mostly small values).  ``blink`` holds short
    raised-cosine pulses (0.2-0.35 s, every ~3.5 s on average) of height
    ``min(1, amplitude)``.  Values are clipped to the documented ranges of the
    bounded channels (``[0, 1]``, ``[-1, 1]``); pose/translation/scale ranges
    grow linearly with ``amplitude``.
    """
    rng = _rng(seed)
    num_frames = int(num_frames)
    if num_frames < 0:
        raise ValueError("num_frames must be >= 0")
    if fps <= 0:
        raise ValueError("fps must be > 0")
    t = np.arange(num_frames, dtype=np.float64) / float(fps)
    amp = float(amplitude)

    def smooth(band: tuple[float, float]) -> np.ndarray:
        freqs = rng.uniform(band[0], band[1], _NUM_SINUSOIDS)
        phases = rng.uniform(0.0, 2.0 * np.pi, _NUM_SINUSOIDS)
        weights = rng.dirichlet(np.ones(_NUM_SINUSOIDS)) * rng.uniform(0.6, 1.0)
        waves = np.sin(2.0 * np.pi * freqs[:, None] * t[None, :] + phases[:, None])
        return (weights[:, None] * waves).sum(axis=0)

    out = np.zeros((num_frames, len(MOTION_NAMES)), np.float64)
    for name in ("yaw", "pitch", "roll", "tx", "ty"):
        out[:, _MI[name]] = amp * MOTION_RANGES[name][1] * smooth(_MOTION_BANDS[name])
    out[:, _MI["scale"]] = 1.0 + amp * 0.15 * smooth(_MOTION_BANDS["scale"])
    for name, power in (("mouth_open", 2.0), ("smile", 1.5), ("brow_raise", 2.0)):
        s = smooth(_MOTION_BANDS[name])
        out[:, _MI[name]] = np.clip(amp * (0.5 * (1.0 + s)) ** power, 0.0, 1.0)
    for name in ("gaze_x", "gaze_y"):
        out[:, _MI[name]] = np.clip(amp * smooth(_MOTION_BANDS[name]), -1.0, 1.0)

    # Blinks: a renewal process of short smooth pulses (drawn last, sequentially,
    # so that the blinks of a prefix do not depend on num_frames).
    duration = num_frames / float(fps)
    blink = np.zeros(num_frames, np.float64)
    peak = min(1.0, max(0.0, amp))
    tb = rng.uniform(0.3, 4.0)
    while tb < duration + 1.0:
        half = 0.5 * rng.uniform(0.2, 0.35)
        u = (t - tb) / half
        pulse = np.where(np.abs(u) < 1.0, 0.5 * (1.0 + np.cos(np.pi * np.clip(u, -1, 1))), 0.0)
        blink = np.maximum(blink, peak * pulse)
        tb += max(0.8, rng.exponential(3.5))
    out[:, _MI["blink"]] = blink
    return out.astype(np.float32)


# ---------------------------------------------------------------------------
# Identity
# ---------------------------------------------------------------------------

RGB = tuple[float, float, float]

#: Names of the values of ``Identity.hair_style``.
HAIR_STYLES: tuple[str, ...] = ("short", "long", "bob_left", "bob_right", "curly")


@dataclasses.dataclass(frozen=True)
class Identity:
    """Static appearance of a synthetic head.  Colours are RGB in ``[0, 1]``.

    Ranges below are those of :func:`sample_identity`; the renderer accepts
    anything reasonable.
    """

    face_width: float = 0.41        # cheek-to-cheek width / image width at scale 1 (0.36..0.46)
    face_aspect: float = 1.28       # face oval height / width (1.15..1.40)
    jaw: float = 0.5                # chin pointiness, 0 round .. 1 pointy
    skin_rgb: RGB = (0.93, 0.76, 0.64)
    hair_rgb: RGB = (0.25, 0.16, 0.10)
    hair_volume: float = 0.5        # hair thickness, 0..1
    hair_style: int = 0             # 0 short, 1 long, 2/3 bob parted left/right, 4 curly (see HAIR_STYLES)
    eye_spacing: float = 0.44       # inter-eye distance / face width (0.38..0.50)
    eye_size: float = 1.0           # (0.8..1.2)
    iris_rgb: RGB = (0.40, 0.26, 0.14)
    nose_length: float = 1.0        # (0.8..1.2)
    nose_width: float = 1.0         # (0.8..1.25)
    mouth_width: float = 1.0        # (0.8..1.25)
    lip_rgb: RGB = (0.78, 0.42, 0.42)
    brow_thickness: float = 1.0     # (0.6..1.5)
    ear_size: float = 1.0           # (0.8..1.2)
    shirt_rgb: RGB = (0.25, 0.35, 0.55)
    bg_rgb_a: RGB = (0.75, 0.80, 0.88)   # background gradient start colour
    bg_rgb_b: RGB = (0.55, 0.62, 0.75)   # background gradient end colour
    bg_angle: float = 1.2           # gradient direction, radians
    bg_pattern: float = 0.0         # strength of a soft stripe pattern, 0..1

    def to_vector(self) -> np.ndarray:
        """Flatten to a float32 vector ordered as :data:`IDENTITY_NAMES`."""
        values: list[float] = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, tuple):
                values.extend(float(x) for x in v)
            else:
                values.append(float(v))
        return np.asarray(values, np.float32)

    @classmethod
    def from_vector(cls, v) -> Identity:
        """Inverse of :meth:`to_vector` (``hair_style`` is rounded to an int)."""
        v = np.asarray(v, np.float32).reshape(-1)
        if v.shape[0] != len(IDENTITY_NAMES):
            raise ValueError(f"identity vector must have {len(IDENTITY_NAMES)} entries, got {v.shape[0]}")
        kwargs = {}
        i = 0
        for f in dataclasses.fields(cls):
            default = f.default
            if isinstance(default, tuple):
                n = len(default)
                kwargs[f.name] = tuple(float(x) for x in v[i:i + n])
                i += n
            elif isinstance(default, int) and not isinstance(default, bool):
                kwargs[f.name] = int(round(float(v[i])))
                i += 1
            else:
                kwargs[f.name] = float(v[i])
                i += 1
        return cls(**kwargs)


def _identity_names() -> tuple[str, ...]:
    """``skin_rgb`` -> ``skin_r, skin_g, skin_b``; ``bg_rgb_a`` -> ``bg_a_r, ...``."""
    names = []
    for f in dataclasses.fields(Identity):
        if isinstance(f.default, tuple):
            base = f.name.replace("_rgb", "")
            names.extend(f"{base}_{ch}" for ch in "rgb")
        else:
            names.append(f.name)
    return tuple(names)


IDENTITY_NAMES: tuple[str, ...] = _identity_names()

_SKIN_TONES = np.array([
    (0.99, 0.87, 0.77), (0.95, 0.78, 0.66), (0.87, 0.67, 0.52),
    (0.74, 0.53, 0.38), (0.56, 0.38, 0.26), (0.38, 0.25, 0.17),
])
_HAIR_COLOURS = np.array([
    (0.07, 0.06, 0.06), (0.20, 0.13, 0.08), (0.38, 0.24, 0.13), (0.55, 0.26, 0.12),
    (0.82, 0.68, 0.40), (0.62, 0.60, 0.58), (0.90, 0.88, 0.84),
])
_HAIR_WEIGHTS = np.array([0.25, 0.22, 0.18, 0.08, 0.12, 0.09, 0.06])
_IRIS_COLOURS = np.array([
    (0.36, 0.22, 0.11), (0.20, 0.12, 0.07), (0.28, 0.48, 0.72),
    (0.32, 0.52, 0.34), (0.50, 0.55, 0.60), (0.55, 0.44, 0.20),
])


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v))


def sample_identity(seed: int | np.random.Generator) -> Identity:
    """Draw a random identity (deterministic given the seed or generator state).

    The result is float32-exact: ``Identity.from_vector(i.to_vector()) == i``.
    """
    rng = _rng(seed)
    u = rng.uniform

    tone = u(0.0, 1.0) * (len(_SKIN_TONES) - 1)
    k = min(int(tone), len(_SKIN_TONES) - 2)
    skin = _SKIN_TONES[k] * (1 - (tone - k)) + _SKIN_TONES[k + 1] * (tone - k)
    skin = np.clip(skin + rng.normal(0, 0.015, 3), 0, 1)

    if u() < 0.08:   # occasional dyed hair
        hair = _hsv(u(), u(0.4, 0.8), u(0.4, 0.8))
    else:
        hair = _HAIR_COLOURS[rng.choice(len(_HAIR_COLOURS), p=_HAIR_WEIGHTS)]
        hair = np.clip(hair * u(0.85, 1.15) + rng.normal(0, 0.02, 3), 0, 1)
    iris = np.clip(_IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))] + rng.normal(0, 0.03, 3), 0, 1)
    lip_target = np.array([0.80, 0.30, 0.35])
    lip_mix = u(0.3, 0.55)
    lip = np.clip((skin * (1.0 - lip_mix) + lip_target * lip_mix) * u(0.75, 0.95), 0, 1)
    shirt = _hsv(u(), u(0.2, 0.8), u(0.25, 0.9))
    hue = u()
    bg_a = _hsv(hue, u(0.1, 0.5), u(0.6, 0.95))
    bg_b = _hsv(hue + u(-0.12, 0.12), u(0.1, 0.6), u(0.35, 0.85))

    ident = Identity(
        face_width=u(0.36, 0.46),
        face_aspect=u(1.15, 1.40),
        jaw=u(0.0, 1.0),
        skin_rgb=tuple(skin),
        hair_rgb=tuple(hair),
        hair_volume=u(0.0, 1.0),
        hair_style=int(rng.integers(len(HAIR_STYLES))),
        eye_spacing=u(0.38, 0.50),
        eye_size=u(0.8, 1.2),
        iris_rgb=tuple(iris),
        nose_length=u(0.8, 1.2),
        nose_width=u(0.8, 1.25),
        mouth_width=u(0.8, 1.25),
        lip_rgb=tuple(lip),
        brow_thickness=u(0.6, 1.5),
        ear_size=u(0.8, 1.2),
        shirt_rgb=tuple(shirt),
        bg_rgb_a=tuple(bg_a),
        bg_rgb_b=tuple(bg_b),
        bg_angle=u(0.0, 2.0 * np.pi),
        bg_pattern=max(0.0, u(-0.6, 1.0)),
    )
    # Round through float32 so that the identity is exactly representable.
    return Identity.from_vector(ident.to_vector())


def derive_seeds(seed: int) -> tuple[int, int]:
    """``(identity_seed, motion_seed)`` used by :func:`make_clip` for ``seed``."""
    id_ss, mo_ss = np.random.SeedSequence(int(seed)).spawn(2)
    return int(id_ss.generate_state(1, np.uint64)[0]), int(mo_ss.generate_state(1, np.uint64)[0])


# ---------------------------------------------------------------------------
# Static head model (per identity)
# ---------------------------------------------------------------------------

#: Depth (normalised units, head frame) of the point whose projection is the box centre.
BOX_ANCHOR_DEPTH = 0.09

#: Order of the 2-D keypoints in ``landmarks`` ("left" = image left in a frontal view):
#: eye centres (fixed in the head, do not follow gaze or blink); nose tip; mouth
#: corners; centres of the outer edges of the upper and lower lip; chin (bottom
#: of the face); middle of each eyebrow; pupil (iris) centres (follow gaze); nose
#: bridge (between the eyes); cheek outline points at mouth height.  The first
#: five follow the usual 5-point face-alignment convention.
LANDMARK_NAMES: tuple[str, ...] = (
    "left_eye", "right_eye", "nose_tip", "mouth_left", "mouth_right",
    "upper_lip", "lower_lip", "chin", "left_brow", "right_brow",
    "left_pupil", "right_pupil", "nose_bridge", "left_jaw", "right_jaw",
)

_SHIFT = 4                 # sub-pixel bits for cv2 drawing
_ONE = float(1 << _SHIFT)
_AA = cv2.LINE_AA


def _fib_sphere(n: int) -> np.ndarray:
    """``n`` roughly uniform unit vectors (Fibonacci lattice)."""
    i = np.arange(n) + 0.5
    z = 1.0 - 2.0 * i / n
    r = np.sqrt(np.maximum(0.0, 1.0 - z * z))
    phi = i * (np.pi * (3.0 - math.sqrt(5.0)))
    return np.stack([r * np.cos(phi), z, r * np.sin(phi)], axis=1)


def _circle_basis(m: np.ndarray, h: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Orthonormal ``e1, e2`` spanning the plane of the circle ``m . u = h`` and its radius."""
    mx, my, mz = (float(x) for x in m)
    if abs(mx) < 0.9:                     # e1 = m x (1, 0, 0)
        e1 = np.array([0.0, mz, -my])
    else:                                 # e1 = m x (0, 1, 0)
        e1 = np.array([-mz, 0.0, mx])
    e1 /= math.sqrt(float(e1 @ e1))
    e2 = np.array([my * e1[2] - mz * e1[1], mz * e1[0] - mx * e1[2], mx * e1[1] - my * e1[0]])
    return e1, e2, math.sqrt(max(0.0, 1.0 - h * h))


def _circle_on_sphere(m: np.ndarray, h: float, n: int) -> np.ndarray:
    """``n`` points of the unit sphere with ``m . u == h`` (``m`` unit)."""
    e1, e2, r = _circle_basis(m, h)
    ang = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return h * m + r * (np.cos(ang)[:, None] * e1 + np.sin(ang)[:, None] * e2)


def _sphere_region(halfspaces: list[tuple[np.ndarray, float]], n_ring: int = 96) -> np.ndarray:
    """Sample points of ``{u : |u| = 1, m_i . u <= h_i for all i}`` including its boundary."""
    def keep(u, skip=-1):
        ok = np.ones(len(u), bool)
        for j, (m, h) in enumerate(halfspaces):
            if j != skip:
                ok &= u @ m <= h + 1e-9
        return u[ok]

    parts = [keep(_SPHERE)]
    for i, (m, h) in enumerate(halfspaces):
        if abs(h) < 1.0:
            parts.append(keep(_circle_on_sphere(m, h, n_ring), skip=i))
    return np.concatenate(parts)


def _region_loops(halfspaces: list[tuple[np.ndarray, float]], n: int = 96, tol: float = 1e-7) -> list[np.ndarray]:
    """Boundary loops (ordered unit-sphere points) of ``{u : m_i . u <= h_i for all i}``.

    Each bounding circle is sampled (plus its exact crossings with the other
    circles); the parts inside all other halfspaces are chained into loops.
    """
    arcs: list[np.ndarray] = []
    loops: list[np.ndarray] = []
    for i, (m, h) in enumerate(halfspaces):
        if abs(h) >= 1.0:
            continue
        e1, e2, r = _circle_basis(m, h)
        theta = [np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)]
        others = [hs for j, hs in enumerate(halfspaces) if j != i]
        for mj, hj in others:               # exact crossings: A cos + B sin = C
            A, B, C = r * (mj @ e1), r * (mj @ e2), hj - h * (mj @ m)
            R = math.hypot(A, B)
            if R > 1e-12 and abs(C) <= R:
                base, d = math.atan2(B, A), math.acos(C / R)
                theta.append(np.array([base - d, base + d]))
        th = np.sort(np.mod(np.concatenate(theta), 2.0 * np.pi))
        u = h * m + r * (np.cos(th)[:, None] * e1 + np.sin(th)[:, None] * e2)
        ok = np.ones(len(u), bool)
        for mj, hj in others:
            ok &= u @ mj <= hj + tol
        if ok.all():
            loops.append(u)
            continue
        starts = np.flatnonzero(ok & ~np.roll(ok, 1))     # runs of consecutive inside samples
        ends = np.flatnonzero(ok & ~np.roll(ok, -1))      # (inclusive, cyclic)
        for s in starts:
            later = ends[ends >= s]
            e = int(later[0]) if len(later) else int(ends[0])
            idx = np.arange(s, e + 1) if e >= s else np.concatenate([np.arange(s, len(u)), np.arange(e + 1)])
            if len(idx) >= 2:
                arcs.append(u[idx])
    while arcs:                              # chain arcs end to end
        chain = [arcs.pop(0)]
        while arcs:
            end = chain[-1][-1]
            d_start = [float(np.linalg.norm(a[0] - end)) for a in arcs]
            d_end = [float(np.linalg.norm(a[-1] - end)) for a in arcs]
            j = int(np.argmin(np.minimum(d_start, d_end)))
            if min(d_start[j], d_end[j]) > np.linalg.norm(chain[0][0] - end):
                break                        # this loop closes first
            a = arcs.pop(j)
            chain.append(a if d_start[j] <= d_end[j] else a[::-1])
        loops.append(np.concatenate(chain))
    return loops


_SPHERE = _fib_sphere(500)
_SPHERE_SMALL = _fib_sphere(160)


class _Model:
    """Identity-dependent 3-D geometry in the head frame (normalised units)."""

    def __init__(self, ident: Identity):
        self.ident = ident
        a = 0.5 * float(ident.face_width)
        b = a * float(ident.face_aspect)
        c = 0.95 * a
        self.a, self.b, self.c = a, b, c
        self.yc = -0.35 * b                 # ellipsoid centre (origin = brows-to-chin centre)
        self.q = 0.5 + 0.35 * float(np.clip(ident.jaw, 0.0, 1.0))   # lower-half profile exponent

        # Face ellipsoid samples (deformed towards the chin) for the silhouette.
        lat = -np.cos(np.linspace(0.0, np.pi, 22))
        lon = np.linspace(0.0, 2.0 * np.pi, 40, endpoint=False)
        v, phi = np.meshgrid(lat, lon, indexing="ij")
        self.face_pts = np.stack([
            a * self._profile(v) * np.cos(phi),
            self.yc + b * v,
            c * np.sqrt(1.0 - v * v) * np.sin(phi),
        ], axis=-1).reshape(-1, 3)

        style = int(ident.hair_style) % len(HAIR_STYLES)
        self.style = style

        # Colours (uint8 RGB tuples for cv2).
        skin = np.asarray(ident.skin_rgb, np.float64)
        hair = np.asarray(ident.hair_rgb, np.float64)
        self.col_skin = _c(skin)
        self.col_skin_shade = _c(skin * 0.88)
        self.col_neck = _c(skin * 0.78)
        self.col_ear_inner = _c(skin * 0.78)
        self.col_nose = _c(skin * 0.90)
        self.col_nostril = _c(skin * 0.45)
        self.col_hair = _c(hair)
        self.col_hair_back = _c(hair * (0.72 if style != 4 else 0.9))
        self.col_brow = _c(hair * 0.75)
        self.col_lid = _c(np.minimum(hair * 0.5, 0.25) * 0.6 + skin * 0.1)
        self.col_lower_lid = _c(skin * 0.8)
        self.col_sclera = _c(0.92 * np.ones(3) + 0.04 * skin)
        self.col_sclera_shadow = _c(0.75 * np.ones(3) + 0.05 * skin)
        iris = np.asarray(ident.iris_rgb, np.float64)
        self.col_iris = _c(iris)
        self.col_iris_rim = _c(iris * 0.55)
        self.col_pupil = _c((0.05, 0.04, 0.04))
        lip = np.asarray(ident.lip_rgb, np.float64)
        self.col_lip = _c(lip)
        self.col_mouth = _c(np.array([0.30, 0.08, 0.09]))
        self.col_tongue = _c(np.array([0.72, 0.35, 0.38]))
        self.col_teeth = _c(np.array([0.95, 0.94, 0.90]))
        self.col_shirt = _c(np.asarray(ident.shirt_rgb))
        self.col_collar = _c(np.asarray(ident.shirt_rgb) * 0.7)

        # Hair: ellipsoid shell around the head, cut by a (tilted) hairline plane.
        vol = float(np.clip(ident.hair_volume, 0.0, 1.0))
        ht = (0.012 + 0.045 * vol) if style != 4 else (0.03 + 0.05 * vol)
        self.hair_centre = np.array([0.0, self.yc - 0.4 * ht, -0.1 * ht])
        self.hair_D = np.array([a + ht, b + 1.1 * ht, c + ht])
        # Two hairline planes {p : n . p <= d} with n = (tilt, 1, slope): the "back"
        # one bounds all hair (drawn behind the face, so it shows only around it);
        # the higher "front" one bounds the hair drawn over the face, so that the
        # temples and far-side eyes stay visible when the head turns.
        bob = style in (2, 3)
        y_front = self.yc + (-0.52 if bob else -0.58) * b      # forehead hairline
        y_temple = self.yc + (-0.36 if bob else -0.42) * b     # front plane at z = 0
        y_back = self.yc + (0.35 if style in (1, 2, 3) else 0.15) * b
        tilt = {2: 0.2, 3: -0.2}.get(style, 0.0)                # side parting of the bob cuts
        # Depth of the hair shell's front (back) surface at the given heights.
        cy, cz = self.hair_centre[1], self.hair_centre[2]
        dy, dz = self.hair_D[1], self.hair_D[2]
        z_front = cz + dz * math.sqrt(max(0.0, 1.0 - ((y_front - cy) / dy) ** 2))
        z_back = cz - dz * math.sqrt(max(0.0, 1.0 - ((y_back - cy) / dy) ** 2))
        slope_b = (y_back - y_front) / (z_front - z_back)
        slope_f = (y_temple - y_front) / z_front
        self.hs_back = self._halfspace([tilt, 1.0, slope_b], y_front + slope_b * z_front)
        self.hs_front = self._halfspace([tilt, 1.0, slope_f], y_front + slope_f * z_front)
        self.hs_behind = self._halfspace([0.0, 0.0, 1.0], 0.0)  # z <= 0 (back half of the head)
        self.cap_pts = self.hair_centre + _sphere_region([self.hs_back]) * self.hair_D
        self.hair_shell_pts = self.hair_centre + _SPHERE_SMALL * self.hair_D
        # Long hair hangs below the head, curly hair is a big puff behind it.
        self.hair_length = {1: 0.22 + 0.18 * vol, 2: 0.07 + 0.05 * vol, 3: 0.07 + 0.05 * vol}.get(style, 0.0)
        if style == 4:
            puff = 0.035 + 0.06 * vol
            D = self.hair_D + np.array([puff, puff * 0.8, puff])
            self.puff_pts = self.hair_centre + np.array([0.0, -0.3 * puff, -0.02]) + _SPHERE_SMALL * D
            self.puff_r = 0.022 + 0.012 * vol
        else:
            self.puff_pts = None

        # Ears: flat ovals on the sides, sticking outwards and a little backwards.
        es = float(ident.ear_size)
        v_ear = 0.08
        ear_h, ear_w = 0.26 * b * es, 0.085 * es
        ang = np.linspace(0.0, 2.0 * np.pi, 24, endpoint=False)
        self.ears = []
        for side in (-1.0, 1.0):
            attach = np.array([side * 0.96 * a * self._profile(v_ear), self.yc + v_ear * b, -0.15 * c])
            out = np.array([side * math.cos(0.35), 0.0, -math.sin(0.35)])
            up = np.array([0.0, 1.0, 0.0])
            outline = attach + (ear_w * (0.15 + 0.55 * np.cos(ang)))[:, None] * out \
                + (ear_h * 0.5 * np.sin(ang))[:, None] * up
            inner = attach + (ear_w * (0.33 + 0.25 * np.cos(ang)))[:, None] * out \
                + (ear_h * 0.3 * np.sin(ang))[:, None] * up
            self.ears.append((attach, out, outline, inner))

        # Neck: ring under the chin (moves with the head) ...
        ang = np.linspace(0.0, 2.0 * np.pi, 16, endpoint=False)
        self.neck_top = np.stack([
            0.34 * a * np.cos(ang), np.full_like(ang, self.yc + 0.72 * b), -0.25 * c + 0.4 * c * np.sin(ang),
        ], axis=1)
        # ... and its base on the torso (image-aligned, follows tx/ty/scale only).
        self.neck_half_width = 0.38 * a

        # Feature layout in the face plane (x, y of the head frame).
        self.eye_x = float(ident.eye_spacing) * a
        self.eye_y = self.yc - 0.02 * b
        self.eye_w = 0.21 * a * float(ident.eye_size)      # half width
        self.brow_y = self.yc - 0.27 * b
        self.nose_tip_y = self.eye_y + 0.30 * b * float(ident.nose_length)
        self.nose_w = 0.15 * a * float(ident.nose_width)
        self.nose_lift = 0.16 * c * float(ident.nose_length)
        self.mouth_y = self.yc + 0.56 * b
        self.mouth_w = 0.36 * a * float(ident.mouth_width)  # half width

        # Static shape profiles of the features (motion-independent parts).
        t = _T15
        self.eye_prof_l = (1.0 - t * t) ** 0.75 * (1.0 - 0.12 * t)   # outer corners a bit narrower
        self.eye_prof_r = self.eye_prof_l[::-1].copy()
        t = _T17
        self.mouth_bell = (1.0 - t * t) ** 0.7
        bow = 1.0 - 0.35 * np.exp(-(t / 0.16) ** 2)                   # cupid's bow
        self.mouth_upper_shape = (1.0 - t * t) ** 0.55 * bow
        self.mouth_lower_shape = (1.0 - t * t) ** 0.6
        self.mouth_teeth_shape = (1.0 - t * t) ** 0.3
        t = _T13
        self.brow_arch = 1.0 - (t * 0.95) ** 2
        s_in = -t                                                    # -1 inner end .. +1 outer end (left brow)
        self.brow_th_l = 0.032 * b * float(ident.brow_thickness) * (0.35 + 0.65 * (1.0 - ((s_in + 0.3) / 1.3) ** 2))
        self.brow_th_r = self.brow_th_l[::-1].copy()

        # Nose (3-D points): body hull, nostrils, highlight on the tip.
        w, L, ty = self.nose_w, self.nose_lift, self.nose_tip_y
        body = np.concatenate([
            self.surface([-0.25 * w, 0.25 * w], [self.eye_y + 0.06 * b] * 2, 0.1 * L),
            self.surface([-0.45 * w, 0.45 * w], [ty - 0.1 * b] * 2, 0.75 * L),
            self.surface([-w, w], [ty + 0.005 * b] * 2, 0.15 * L),
            self.surface([-0.35 * w, 0.0, 0.35 * w], [ty + 0.035 * b, ty + 0.045 * b, ty + 0.035 * b],
                         np.array([0.7 * L, L, 0.7 * L])),
        ])
        parts = [body]
        for sx in (-1.0, 1.0):
            parts.append(self.surface(sx * 0.45 * w + 0.2 * w * _COS[14], ty + 0.02 * b + 0.045 * w * _SIN[14],
                                      0.35 * L))
        parts.append(self.surface(0.3 * w * _COS[14], ty - 0.03 * b + 0.22 * w * _SIN[14], L))
        ends = np.cumsum([len(p_) for p_ in parts])
        self.nose_pts = np.concatenate(parts)
        self.nose_body = slice(0, ends[0])
        self.nostrils = (slice(ends[0], ends[1]), slice(ends[1], ends[2]))
        self.nose_highlight = slice(ends[2], ends[3])

        # Torso and collar outlines (image-aligned offsets from the head origin).
        nw = self.neck_half_width
        self.neck_base = np.array([[-nw, 0.40], [nw, 0.40], [-nw, 0.30], [nw, 0.30]])
        sh_y, sh_w = 0.335, 0.36
        ang = np.linspace(0.0, 0.5 * np.pi, 10)
        left = np.stack([-sh_w + (sh_w - 1.3 * nw) * (1 - np.cos(ang)), sh_y + 0.16 * (1 - np.sin(ang))], 1)
        tn = np.linspace(-1.0, 1.0, 11)
        neckline = np.stack([1.3 * nw * tn, sh_y + 0.055 * (1 - tn ** 2)], 1)
        right = left[::-1] * np.array([-1.0, 1.0])
        self.torso = np.concatenate([[[-sh_w, 1.2]], left, neckline, right, [[sh_w, 1.2]]])
        self.collar = np.concatenate([neckline, neckline[::-1] + np.array([0.0, 0.018])])

    def _halfspace(self, n, d) -> tuple[np.ndarray, float]:
        """Head-frame halfspace ``n . p <= d`` in unit-sphere coordinates of the hair ellipsoid."""
        n = np.asarray(n, np.float64)
        m = self.hair_D * n
        norm = float(np.linalg.norm(m))
        return m / norm, float((d - n @ self.hair_centre) / norm)

    # -- surface ------------------------------------------------------------
    def _profile(self, v):
        """Half-width factor of the face at height ``v`` (units of b)."""
        v = np.asarray(v, np.float64)
        base = np.maximum(1.0 - v * v, 0.0)
        prof = np.sqrt(base)
        lower = v > 0.0
        if np.any(lower):
            prof = np.where(lower, base ** self.q, prof)
        return prof

    def surface(self, x, y, lift=0.0) -> np.ndarray:
        """3-D points on the front of the face at face-plane positions (x, y)."""
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        v = np.minimum(np.maximum((y - self.yc) * (1.0 / self.b), -1.0), 1.0)
        prof = np.maximum(self._profile(v), 1e-6)
        u = np.minimum(np.maximum(x / (self.a * prof), -1.0), 1.0)
        z = self.c * np.sqrt(np.maximum(1.0 - v * v, 0.0) * (1.0 - u * u))
        out = np.empty(np.broadcast_shapes(x.shape, y.shape) + (3,))
        out[..., 0] = x
        out[..., 1] = y
        out[..., 2] = z + lift
        return out

    def normal(self, p: np.ndarray) -> np.ndarray:
        """Approximate outward normal of the face ellipsoid at ``p``."""
        p = np.asarray(p, np.float64)
        n = np.stack([p[..., 0] / self.a ** 2, (p[..., 1] - self.yc) / self.b ** 2, p[..., 2] / self.c ** 2], -1)
        return n / np.linalg.norm(n, axis=-1, keepdims=True)


def _c(rgb) -> tuple[int, int, int]:
    """float RGB in [0, 1] -> cv2 colour tuple (image channels are RGB)."""
    rgb = np.clip(np.asarray(rgb, np.float64), 0.0, 1.0)
    return tuple(int(round(x * 255.0)) for x in rgb)


@functools.lru_cache(maxsize=64)
def _model_cached(ident: Identity) -> _Model:
    return _Model(ident)


def _model(ident: Identity) -> _Model:
    try:
        return _model_cached(ident)
    except TypeError:          # unhashable fields (e.g. lists given as colours)
        return _Model(ident)


def _background(ident: Identity, size: int) -> np.ndarray:
    try:
        return _background_cached(ident, size)
    except TypeError:
        return _background_cached.__wrapped__(ident, size)


@functools.lru_cache(maxsize=16)
def _background_cached(ident: Identity, size: int) -> np.ndarray:
    """Static background: two-colour linear gradient plus an optional soft stripe pattern."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    ca, sa = math.cos(ident.bg_angle), math.sin(ident.bg_angle)
    proj = coords[None, :] * ca + coords[:, None] * sa            # in about [-0.71, 0.71]
    w = np.clip(proj / 1.42 + 0.5, 0.0, 1.0)[..., None]
    col_a = np.asarray(ident.bg_rgb_a, np.float32)
    col_b = np.asarray(ident.bg_rgb_b, np.float32)
    img = col_a * (1.0 - w) + col_b * w
    if ident.bg_pattern > 0.0:
        across = coords[None, :] * -sa + coords[:, None] * ca
        stripes = np.cos(2.0 * np.pi * 7.0 * across)[..., None]
        img = img * (1.0 + 0.06 * float(ident.bg_pattern) * stripes)
    out = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    out.setflags(write=False)
    return out


# ---------------------------------------------------------------------------
# Drawing helpers
# ---------------------------------------------------------------------------

def _fx(pts_px: np.ndarray) -> np.ndarray:
    """Continuous pixel coordinates -> cv2 fixed-point int32 (pixel centres at integers)."""
    return np.round((np.asarray(pts_px, np.float64) - 0.5) * _ONE).astype(np.int32)


def _fill(img: np.ndarray, pts_px: np.ndarray, colour) -> None:
    if len(pts_px) >= 3:
        cv2.fillPoly(img, [_fx(pts_px)], colour, _AA, _SHIFT)


def _fill_hull(img: np.ndarray, pts_px: np.ndarray, colour) -> np.ndarray | None:
    if len(pts_px) < 3:
        return None
    hull = cv2.convexHull(np.asarray(pts_px, np.float32)).reshape(-1, 2)
    if len(hull) >= 3:
        cv2.fillConvexPoly(img, _fx(hull), colour, _AA, _SHIFT)
    return hull


def _ellipse_poly(centre, rx, ry, n=20) -> np.ndarray:
    ang = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return np.stack([centre[0] + rx * np.cos(ang), centre[1] + ry * np.sin(ang)], axis=1)


def _clipped(img: np.ndarray, clip_px: np.ndarray, paint: Callable[[np.ndarray, np.ndarray], None],
             base_colour=None) -> None:
    """Paint onto ``img`` only inside polygon ``clip_px`` (anti-aliased mask).

    ``paint(patch, origin)`` draws onto a small patch whose pixel (0, 0) is
    image pixel ``origin``; the patch starts as a copy of the image region (or
    is filled with ``base_colour``).
    """
    h, w = img.shape[:2]
    x0 = max(int(math.floor(clip_px[:, 0].min())) - 2, 0)
    y0 = max(int(math.floor(clip_px[:, 1].min())) - 2, 0)
    x1 = min(int(math.ceil(clip_px[:, 0].max())) + 2, w)
    y1 = min(int(math.ceil(clip_px[:, 1].max())) + 2, h)
    if x1 <= x0 or y1 <= y0:
        return
    roi = img[y0:y1, x0:x1]
    if base_colour is None:
        patch = roi.copy()
    else:
        patch = np.empty_like(roi)
        patch[:] = base_colour
    origin = np.array([x0, y0], np.float64)
    paint(patch, origin)
    mask = np.zeros(roi.shape[:2], np.uint8)
    cv2.fillPoly(mask, [_fx(clip_px - origin)], 255, _AA, _SHIFT)
    m = mask[..., None].astype(np.uint16)
    blended = (patch.astype(np.uint16) * m + roi.astype(np.uint16) * (255 - m) + 127) // 255
    roi[...] = blended.astype(np.uint8)


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    cy, sy = math.cos(yaw), math.sin(yaw)
    cp, sp = math.cos(pitch), math.sin(pitch)
    cr, sr = math.cos(roll), math.sin(roll)
    ry = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, cp, sp], [0.0, -sp, cp]])
    rz = np.array([[cr, -sr, 0.0], [sr, cr, 0.0], [0.0, 0.0, 1.0]])
    return rz @ rx @ ry


class _Camera:
    """Head-frame 3-D points -> continuous pixel coordinates (orthographic)."""

    def __init__(self, motion: np.ndarray, size: int):
        self.R = _rotation(motion[_MI["yaw"]], motion[_MI["pitch"]], motion[_MI["roll"]])
        self.scale = float(motion[_MI["scale"]])
        self.centre = np.array([0.5 + motion[_MI["tx"]], 0.5 + motion[_MI["ty"]]])
        self.size = float(size)
        self.view = self.R[2]          # camera direction (towards viewer) in head coordinates
        self._proj = (self.scale * self.size) * self.R[:2].T    # (3, 2)
        self._offset = self.centre * self.size

    def rotate(self, p: np.ndarray) -> np.ndarray:
        return np.asarray(p, np.float64) @ self.R.T

    def project(self, p: np.ndarray) -> np.ndarray:
        return np.asarray(p, np.float64) @ self._proj + self._offset

    def depth(self, p: np.ndarray) -> np.ndarray:
        return np.asarray(p, np.float64) @ self.view

    def body(self, xy: np.ndarray) -> np.ndarray:
        """Image-aligned (unrotated) offsets from the head origin -> pixels."""
        return (self.centre + self.scale * np.asarray(xy, np.float64)) * self.size

    def px(self, length: float) -> float:
        return length * self.scale * self.size


# ---------------------------------------------------------------------------
# Face features (motion dependent)
# ---------------------------------------------------------------------------

_T13 = np.linspace(-1.0, 1.0, 13)
_T15 = np.linspace(-1.0, 1.0, 15)
_T17 = np.linspace(-1.0, 1.0, 17)
_ANG = {n: np.linspace(0.0, 2.0 * np.pi, n, endpoint=False) for n in (12, 14, 16, 24)}
_COS = {n: np.cos(a) for n, a in _ANG.items()}
_SIN = {n: np.sin(a) for n, a in _ANG.items()}


def _eye_geometry(md: _Model, side: float, blink: float, gaze_x: float, gaze_y: float):
    """Face-plane curves of one eye: x, upper lid, lower lid, iris centre/radius, lid profile."""
    t = _T15
    ex, ey, ew = side * md.eye_x, md.eye_y, md.eye_w
    prof = md.eye_prof_l if side < 0 else md.eye_prof_r
    hu, hl = 0.68 * ew, 0.40 * ew
    closed = ey + 0.30 * hl * prof
    upper = (1.0 - blink) * (ey - hu * prof) + blink * closed
    lower = (1.0 - blink) * (ey + hl * prof) + blink * closed
    x = ex + ew * t
    iris_r = 0.46 * ew
    iris_c = (ex + gaze_x * 0.45 * ew, ey + gaze_y * 0.28 * ew - 0.08 * ew)
    return x, upper, lower, iris_c, iris_r, prof


def _mouth_geometry(md: _Model, mouth_open: float, smile: float):
    """Face-plane curves of the mouth (x, upper outer, upper inner, lower inner, lower outer)."""
    t = _T17
    b = md.b
    half_w = md.mouth_w * (1.0 + 0.2 * smile) * (1.0 - 0.12 * mouth_open)
    x = half_w * t
    line = md.mouth_y - smile * 0.09 * b * t * t + smile * 0.01 * b       # corners rise when smiling
    upper_in = line - mouth_open * 0.03 * b * md.mouth_bell
    lower_in = line + (0.012 + mouth_open * 0.24) * b * md.mouth_bell
    upper_out = upper_in - 0.075 * b * md.mouth_upper_shape * (1.0 - 0.3 * smile)
    lower_out = lower_in + 0.085 * b * md.mouth_lower_shape * (1.0 - 0.25 * smile)
    return x, upper_out, upper_in, lower_in, lower_out


def _brow_geometry(md: _Model, side: float, raise_: float):
    """Face-plane centre line and half thickness of one eyebrow."""
    t = _T13
    x = side * md.eye_x * 1.05 + md.eye_w * 1.2 * t
    arch = (0.045 + 0.025 * raise_) * md.b * md.brow_arch
    y = md.brow_y - raise_ * 0.07 * md.b - arch + 0.02 * md.b * side * t
    th = md.brow_th_l if side < 0 else md.brow_th_r
    return x, y, th


class _Geom:
    """Collects face-plane polylines, then lifts them onto the face surface and
    projects them all at once (one vectorised call instead of dozens)."""

    def __init__(self):
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray | float]] = []
        self._n = 0
        self.p3: np.ndarray | None = None
        self.px: np.ndarray | None = None

    def add(self, x, y, lift=0.0) -> slice:
        x = np.asarray(x, np.float64).ravel()
        n = x.size
        y = np.asarray(y, np.float64).ravel()
        if y.size != n:
            y = np.full(n, float(y[0]))
        lift = np.asarray(lift, np.float64).ravel()
        if lift.size != n:
            lift = np.full(n, float(lift[0]))
        self._parts.append((x, y, lift))
        self._n += n
        return slice(self._n - n, self._n)

    def band(self, x, y_top, y_bot, lift=0.0) -> slice:
        """Closed polygon between two curves sampled at the same x."""
        x = np.asarray(x, np.float64)
        y_top = np.broadcast_to(np.asarray(y_top, np.float64), x.shape)
        y_bot = np.broadcast_to(np.asarray(y_bot, np.float64), x.shape)
        return self.add(np.concatenate([x, x[::-1]]), np.concatenate([y_top, y_bot[::-1]]), lift)

    def resolve(self, md: _Model, cam: _Camera) -> None:
        xs, ys, ls = (np.concatenate(p) for p in zip(*self._parts, strict=True))
        self.p3 = md.surface(xs, ys, ls)
        self.px = cam.project(self.p3)


def _plan_eye(g: _Geom, md: _Model, side: float, motion: np.ndarray):
    blink, gx, gy = (float(motion[_MI[k]]) for k in ("blink", "gaze_x", "gaze_y"))
    x, upper, lower, iris_c, iris_r, prof = _eye_geometry(md, side, blink, gx, gy)
    ew, lift, ilift = md.eye_w, 0.004, 0.02 * md.a
    s_open = g.band(x, upper, lower, lift)
    is_open = float(np.max(lower - upper)) > 1e-4
    if is_open:
        s_iris = g.add(iris_c[0] + iris_r * _COS[24], iris_c[1] + iris_r * _SIN[24], ilift)
        s_ctr = g.add([iris_c[0]], [iris_c[1]], ilift)
        s_shadow = g.band(x, upper, upper + 0.22 * ew * prof, lift)
    thick = (0.05 + 0.09 * prof) * ew
    s_lid = g.band(x, upper - thick, upper + 0.25 * thick, lift)
    s_low = g.band(x[2:-2], lower[2:-2], (lower + 0.06 * ew * prof)[2:-2], lift)

    def draw(img, px, cam):
        if is_open:
            ctr = px[s_ctr][0]
            rel = px[s_iris] - ctr
            r_px = cam.px(iris_r)

            def paint(patch, origin):
                _fill(patch, px[s_shadow] - origin, md.col_sclera_shadow)
                _fill(patch, ctr + rel - origin, md.col_iris_rim)
                _fill(patch, ctr + 0.8 * rel - origin, md.col_iris)
                _fill(patch, ctr + 0.42 * rel - origin, md.col_pupil)
                hl = ctr + np.array([-0.3, -0.32]) * r_px - origin
                _fill(patch, _ellipse_poly(hl, 0.17 * r_px, 0.17 * r_px, 12), (250, 250, 250))

            _clipped(img, px[s_open], paint, base_colour=md.col_sclera)
        # Upper lid line (lashes) and a faint lower lid line.
        _fill(img, px[s_lid], md.col_lid)
        _fill(img, px[s_low], md.col_lower_lid)

    return draw


def _plan_brow(g: _Geom, md: _Model, side: float, motion: np.ndarray):
    x, y, th = _brow_geometry(md, side, float(motion[_MI["brow_raise"]]))
    s = g.band(x, y - th, y + th)
    return lambda img, px, cam: _fill(img, px[s], md.col_brow)


def _plan_mouth(g: _Geom, md: _Model, motion: np.ndarray):
    mouth_open = float(motion[_MI["mouth_open"]])
    x, uo, ui, li, lo = _mouth_geometry(md, mouth_open, float(motion[_MI["smile"]]))
    s_lips = g.band(x, uo, lo)
    s_inner = g.band(x, ui, li)
    is_open = mouth_open > 0.02
    if is_open:
        teeth_h = 0.06 * md.b * md.mouth_teeth_shape
        s_teeth = g.band(x, ui - 0.01 * md.b, ui + teeth_h)
        ty = li[len(x) // 2] - 0.02 * md.b
        s_tongue = g.add(0.55 * x[-1] * _COS[16], ty + 0.07 * md.b * _SIN[16])

    def draw(img, px, cam):
        _fill(img, px[s_lips], md.col_lip)
        if is_open:
            def paint(patch, origin):
                _fill(patch, px[s_tongue] - origin, md.col_tongue)
                _fill(patch, px[s_teeth] - origin, md.col_teeth)

            _clipped(img, px[s_inner], paint, base_colour=md.col_mouth)
        else:
            _fill(img, px[s_inner], md.col_mouth)

    return draw


def _draw_nose(img, cam: _Camera, md: _Model) -> None:
    px = cam.project(md.nose_pts)
    _fill_hull(img, px[md.nose_body], md.col_nose)
    for sl in md.nostrils:
        _fill(img, px[sl], md.col_nostril)
    _fill(img, px[md.nose_highlight], md.col_skin)       # light comes from the upper left


def _plan_landmarks(g: _Geom, md: _Model, motion: np.ndarray) -> slice:
    blink, gx, gy = (float(motion[_MI[k]]) for k in ("blink", "gaze_x", "gaze_y"))
    mx, m_uo, _, _, m_lo = _mouth_geometry(md, float(motion[_MI["mouth_open"]]), float(motion[_MI["smile"]]))
    raise_ = float(motion[_MI["brow_raise"]])
    bxl, byl, _ = _brow_geometry(md, -1.0, raise_)
    bxr, byr, _ = _brow_geometry(md, 1.0, raise_)
    ic_l = _eye_geometry(md, -1.0, blink, gx, gy)[3]
    ic_r = _eye_geometry(md, 1.0, blink, gx, gy)[3]
    mid, bmid = len(mx) // 2, len(bxl) // 2
    v_jaw = 0.5
    jaw_x = 0.93 * md.a * float(md._profile(v_jaw))
    xy = np.array([
        (-md.eye_x, md.eye_y), (md.eye_x, md.eye_y),
        (0.0, md.nose_tip_y),
        (mx[0], m_uo[0]), (mx[-1], m_uo[-1]),
        (0.0, m_uo[mid]), (0.0, m_lo[mid]),
        (0.0, md.yc + 0.97 * md.b),
        (bxl[bmid], byl[bmid]), (bxr[bmid], byr[bmid]),
        ic_l, ic_r,
        (0.0, md.eye_y),
        (-jaw_x, md.yc + v_jaw * md.b), (jaw_x, md.yc + v_jaw * md.b),
    ])
    lift = np.zeros(len(xy))
    lift[2] = md.nose_lift
    lift[10:12] = 0.02 * md.a
    return g.add(xy[:, 0], xy[:, 1], lift)


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------

def _draw_ear(img, cam: _Camera, md: _Model, ear) -> None:
    _, out, outline, inner = ear
    px = cam.project(np.concatenate([outline, inner]))
    _fill(img, px[:len(outline)], md.col_skin)
    if cam.rotate(out)[2] > -0.6:
        _fill(img, px[len(outline):], md.col_ear_inner)


def _draw_hair_back(img, cam: _Camera, md: _Model) -> None:
    if md.hair_length > 0.0:
        shell = cam.project(md.hair_shell_pts)
        hang = shell.copy()
        cx = cam.centre[0] * cam.size
        hang[:, 0] = cx + (hang[:, 0] - cx) * 1.08
        hang[:, 1] += cam.px(md.hair_length)
        _fill_hull(img, np.concatenate([shell, hang]), md.col_hair_back)
    if md.puff_pts is not None:
        hull = _fill_hull(img, cam.project(md.puff_pts), md.col_hair_back)
        if hull is not None:   # curly outline: small discs along the silhouette
            r = cam.px(md.puff_r)
            closed = np.concatenate([hull, hull[:1]])
            seg = np.diff(closed, axis=0)
            cum = np.concatenate([[0.0], np.cumsum(np.hypot(seg[:, 0], seg[:, 1]))])
            n = max(8, int(cum[-1] / max(1.2 * r, 1e-6)))
            pos = np.linspace(0.0, cum[-1], n, endpoint=False)
            xs, ys = np.interp(pos, cum, closed[:, 0]), np.interp(pos, cum, closed[:, 1])
            disc = np.stack([r * _COS[12], r * _SIN[12]], 1)
            for x, y in zip(xs, ys, strict=True):
                _fill(img, disc + (x, y), md.col_hair_back)
    # Back of the hair cap (occluded by the face where they overlap).
    _fill_hull(img, cam.project(md.cap_pts), md.col_hair_back)


def _draw_hair_front(img, cam: _Camera, md: _Model) -> None:
    """Hair drawn over the face: the camera-facing part of the hair ellipsoid that is
    (above the front hairline plane) or (above the back plane and behind z = 0)."""
    k = cam.view / md.hair_D              # facing condition k . u >= 0 in unit-sphere coordinates
    facing = (-k / math.sqrt(float(k @ k)), 0.0)
    for region in ([md.hs_front, facing], [md.hs_back, md.hs_behind, facing]):
        for loop in _region_loops(region):
            _fill(img, cam.project(md.hair_centre + loop * md.hair_D), md.col_hair)


def render_frame(identity: Identity, motion: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one frame.

    Returns ``(image uint8 (size, size, 3) RGB, box float32 (4,) x0 y0 x1 y1,
    landmarks float32 (len(LANDMARK_NAMES), 2))`` in pixel coordinates.
    """
    size = int(size)
    if size < 1:
        raise ValueError("size must be >= 1")
    motion = np.asarray(motion, np.float64).reshape(-1)
    if motion.shape[0] != len(MOTION_NAMES):
        raise ValueError(f"motion must have {len(MOTION_NAMES)} entries, got {motion.shape[0]}")
    md = _model(identity)
    cam = _Camera(motion, size)
    img = _background(identity, size).copy()

    # Body, back to front: hanging hair, neck, torso (image-aligned: follows
    # tx/ty/scale only), back of the hair cap.
    hanging = md.hair_length > 0.0 or md.puff_pts is not None
    if hanging:
        _draw_hair_back(img, cam, md)
    _fill_hull(img, np.concatenate([cam.project(md.neck_top), cam.body(md.neck_base)]), md.col_neck)
    _fill(img, cam.body(md.torso), md.col_shirt)
    _fill(img, cam.body(md.collar), md.col_collar)
    if not hanging:
        _draw_hair_back(img, cam, md)

    # Head: far ears, face, near ears, features in depth order, front hair.
    front_ears = []
    for ear in sorted(md.ears, key=lambda e: float(cam.depth(e[0]))):
        if cam.depth(ear[0]) < 0.0:
            _draw_ear(img, cam, md, ear)
        else:
            front_ears.append(ear)
    # Face: a shadow-coloured silhouette, then a slightly smaller lit copy shifted
    # towards the light (upper left), leaving a crescent of shade.
    face_px = cam.project(md.face_pts)
    _fill_hull(img, face_px, md.col_skin_shade)
    centre_px = cam.project(np.array([0.0, md.yc, 0.0]))
    lit = centre_px + (face_px - centre_px) * 0.95 + np.array([-0.035, -0.03]) * cam.px(md.a)
    _fill_hull(img, lit, md.col_skin)
    for ear in front_ears:
        _draw_ear(img, cam, md, ear)

    g = _Geom()
    anchors = g.add([-md.eye_x, md.eye_x, -md.eye_x, md.eye_x, 0.0, 0.0],
                    [md.eye_y, md.eye_y, md.brow_y, md.brow_y, md.nose_tip_y, md.mouth_y],
                    [0.0, 0.0, 0.0, 0.0, md.nose_lift, 0.0])
    plans = [
        _plan_eye(g, md, -1.0, motion), _plan_eye(g, md, 1.0, motion),
        _plan_brow(g, md, -1.0, motion), _plan_brow(g, md, 1.0, motion),
        lambda img_, px_, cam_: _draw_nose(img_, cam_, md),
        _plan_mouth(g, md, motion),
    ]
    s_lm = _plan_landmarks(g, md, motion)
    g.resolve(md, cam)
    anchor3 = g.p3[anchors]
    facing = cam.rotate(md.normal(anchor3))[:, 2] > 0.0     # hide features turned away
    depth = cam.depth(anchor3)
    for i in sorted(range(len(plans)), key=lambda i: depth[i]):
        if facing[i]:
            plans[i](img, g.px, cam)
    _draw_hair_front(img, cam, md)

    # Annotations.
    landmarks = g.px[s_lm].astype(np.float32)
    centre = cam.project(np.array([0.0, 0.0, BOX_ANCHOR_DEPTH]))
    half = np.array([1.1 * md.a, 0.7 * md.b]) * (cam.scale * size)
    box = np.concatenate([centre - half, centre + half]).astype(np.float32)
    return img, box, landmarks


@dataclasses.dataclass
class SyntheticClip:
    """A rendered clip with its ground truth."""

    frames: np.ndarray      # uint8 (T, S, S, 3) RGB
    boxes: np.ndarray       # float32 (T, 4) face box x0, y0, x1, y1 in pixels
    landmarks: np.ndarray   # float32 (T, K, 2) (x, y) pixels, order LANDMARK_NAMES
    motion: np.ndarray      # float32 (T, len(MOTION_NAMES))
    identity: np.ndarray    # float32 (len(IDENTITY_NAMES),)
    fps: float

    def __len__(self) -> int:
        return int(self.frames.shape[0])


def render_clip(identity: Identity, motion: np.ndarray, size: int, fps: float = 25.0) -> SyntheticClip:
    """Render every row of ``motion`` (``(T, len(MOTION_NAMES))``) with ``identity``."""
    motion = np.asarray(motion, np.float32)
    if motion.ndim == 1:
        motion = motion[None]
    if motion.ndim != 2 or motion.shape[1] != len(MOTION_NAMES):
        raise ValueError(f"motion must have shape (T, {len(MOTION_NAMES)}), got {motion.shape}")
    size = int(size)
    num = motion.shape[0]
    frames = np.empty((num, size, size, 3), np.uint8)
    boxes = np.empty((num, 4), np.float32)
    landmarks = np.empty((num, len(LANDMARK_NAMES), 2), np.float32)
    for i in range(num):
        frames[i], boxes[i], landmarks[i] = render_frame(identity, motion[i], size)
    return SyntheticClip(frames=frames, boxes=boxes, landmarks=landmarks, motion=motion.copy(),
                         identity=identity.to_vector(), fps=float(fps))


def make_clip(
    seed: int,
    num_frames: int,
    size: int,
    fps: float = 25.0,
    *,
    identity_seed: int | None = None,
    motion_seed: int | None = None,
) -> SyntheticClip:
    """Random identity + random motion, fully determined by ``seed``.

    ``identity_seed`` / ``motion_seed`` default to :func:`derive_seeds` of
    ``seed``; pass either to keep that factor fixed while varying the other.
    """
    id_seed, mo_seed = derive_seeds(seed)
    if identity_seed is not None:
        id_seed = int(identity_seed)
    if motion_seed is not None:
        mo_seed = int(motion_seed)
    identity = sample_identity(id_seed)
    motion = sample_motion(mo_seed, num_frames, fps=fps)
    return render_clip(identity, motion, size, fps=fps)
