"""Driving-image augmentations for X-NeMo training (X-NeMo paper, Sec. 3.3).

X-NeMo learns a 1-D latent motion descriptor from the *driving* image I_D.  To
stop identity / appearance / face-shape information from leaking through that
descriptor, the paper augments I_D (and only I_D) with

* **colour jittering** -- changes skin tone, lighting and white balance;
* **random scaling within 30 %** -- changes apparent face size;
* **piecewise affine transformations** -- small local non-rigid deformations
  that alter the face *shape* while keeping the expression / pose semantics;
* **face-centred cropping** -- increases the spatial disparity between the
  driving and the target frame (face position and size differ between them).

All functions take and return ``uint8`` RGB images of shape ``(H, W, 3)``;
boxes are float32 ``[x0, y0, x1, y1]`` in *continuous* pixel coordinates
(pixel ``i`` covers ``[i, i + 1)``, so the image spans ``[0, W] x [0, H]``).
OpenCV works with pixel *centres* at integer positions; the helper
:func:`_to_cv_affine` converts an affine map written in continuous
coordinates into the matrix ``cv2.warpAffine`` expects, so image and box
transforms are exactly consistent.

Randomness: every random function takes an explicit ``np.random.Generator``
(the global NumPy RNG is never used); :func:`augment_driving` also accepts an
``int`` seed.  Every op consumes a fixed number of random draws regardless of
its strength settings, so results for a seed are stable across configs that
only change strengths.

Operations
----------
``color_jitter``
    Like torchvision's ``ColorJitter``: the four ops are applied in a random
    order, each clipping to ``[0, 255]`` (float32 math, rounded once at the end):

    * brightness: ``x * b``,                       ``b ~ U[1 - brightness, 1 + brightness]``
    * contrast:   ``c * x + (1 - c) * mean(luma)``,  ``c ~ U[1 - contrast, 1 + contrast]``
    * saturation: ``s * x + (1 - s) * luma(x)``,     ``s ~ U[1 - saturation, 1 + saturation]``
    * hue:        rotation of the colour about the grey axis ``r = g = b`` by
      ``2 * pi * h`` with ``h ~ U[-hue, hue]`` (fraction of the colour wheel).
      This is the rotation-in-an-opponent-colour-plane variant (as with a YIQ
      rotation) rather than an RGB->HSV->RGB round trip: it is a single 3x3
      matrix (``cv2.transform``), keeps ``(r + g + b) / 3`` and keeps greys
      grey exactly; a positive shift moves red towards green, like HSV hue.
      Luma is ITU-R BT.601 (``cv2.COLOR_RGB2GRAY``).

``random_scale``
    Zoom by ``s ~ U[1 - max_change, 1 + max_change]`` about the image centre
    (or the box centre when a box is given) with ``cv2.warpAffine``
    (bilinear, ``BORDER_REFLECT_101``); output size is unchanged and the box
    is transformed by the same affine map.

``piecewise_affine``
    A regular ``(grid + 1) x (grid + 1)`` lattice of vertices spanning the
    image (border vertices on the first / last pixel row and column); interior
    vertices get random offsets ``U[-strength * W, strength * W]`` (x) and
    ``U[-strength * H, strength * H]`` (y), border vertices stay fixed.  Each
    lattice cell is split along its main diagonal into two triangles and the
    offset inside each triangle is the barycentric (linear) interpolation of
    its three vertices' offsets, i.e. the backward map ``output -> source`` is
    exactly affine per triangle and continuous everywhere.  The dense map is
    built vectorised in NumPy (:func:`piecewise_affine_field`) and applied with
    ``cv2.remap`` (bilinear, ``BORDER_REFLECT_101``).  The face box is not
    changed by this op (offsets are a few percent and vanish at the border).

``face_centered_crop``
    Square crop of side ``f * max(box_w, box_h)``, ``f ~ U[crop_scale]``,
    around the box centre jittered by ``U[-jitter, jitter] * (box_w, box_h)``;
    the crop window is snapped to integer pixels, zero-padded where it leaves
    the image and resized to ``out_size`` (``cv2.INTER_AREA`` when shrinking,
    ``cv2.INTER_LINEAR`` when enlarging).  The returned box is in crop
    coordinates, computed from the actual (snapped) window.

``augment_driving``
    The full chain: face-centred crop (only if ``out_size`` is given) ->
    random scale (about the box centre) -> piecewise affine -> colour jitter,
    each applied with its probability from :class:`AugmentConfig`.  The zoom
    and the piecewise warp are composed into one backward map and applied with
    a single ``cv2.remap`` (same geometry as applying them one after the
    other, but only one bilinear resampling and about half the cost).

Speed: OpenCV's vectorised warp kernels handle 1- and 4-channel images, so the
RGB warps go through RGBA (``cv2.cvtColor``), which is about 2x faster than
warping 3 channels; the piecewise layout (cell indices / in-cell coordinates)
is cached per ``(h, w, grid)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading

import cv2
import numpy as np

__all__ = [
    "AugmentConfig",
    "ColorParams",
    "sample_color_params",
    "apply_color_params",
    "color_jitter",
    "random_scale",
    "piecewise_affine_field",
    "sample_piecewise_offsets",
    "piecewise_affine",
    "face_centered_crop",
    "augment_driving",
]


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Strengths and probabilities of the X-NeMo driving-image augmentations."""

    brightness: float = 0.3  # multiplicative factor in [1-b, 1+b]
    contrast: float = 0.3  # blend with mean grey, factor in [1-c, 1+c]
    saturation: float = 0.3  # blend with greyscale, factor in [1-s, 1+s]
    hue: float = 0.05  # hue shift as a fraction of the colour wheel, in [-h, h]
    scale: float = 0.3  # zoom factor in [1-scale, 1+scale], output keeps the size
    piecewise_grid: int = 4  # cells per side ((n+1)x(n+1) vertices incl. border)
    piecewise_strength: float = 0.02  # max vertex offset, fraction of image size
    crop_scale: tuple[float, float] = (1.6, 2.4)  # crop side = f * max(box w, h)
    crop_jitter: float = 0.1  # crop-centre jitter, fraction of the box size
    p_color: float = 1.0
    p_scale: float = 1.0
    p_piecewise: float = 1.0
    p_crop: float = 1.0


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"expected a uint8 HxWx3 image, got dtype={image.dtype} shape={image.shape}"
        )
    return image


def _check_box(box) -> np.ndarray | None:
    if box is None:
        return None
    box = np.asarray(box, dtype=np.float32).reshape(-1)
    if box.shape != (4,):
        raise ValueError(f"expected a box [x0, y0, x1, y1], got shape {box.shape}")
    return box


def _to_cv_affine(a: np.ndarray) -> np.ndarray:
    """Affine 2x3 map in continuous coords -> the matrix for cv2 (pixel centres).

    With ``p = x - 0.5`` (OpenCV pixel-centre coordinates) and ``x' = A x + t``
    we get ``p' = A p + (A @ [0.5, 0.5] + t - 0.5)``.
    """
    a = np.asarray(a, dtype=np.float64)
    m = a.copy()
    m[:, 2] = a[:, :2] @ np.array([0.5, 0.5]) + a[:, 2] - 0.5
    return m


def _transform_box(box: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine (continuous coords) to a box; returns its bounding box."""
    x0, y0, x1, y1 = (float(v) for v in box)
    corners = np.array([[x0, y0, 1.0], [x1, y0, 1.0], [x0, y1, 1.0], [x1, y1, 1.0]])
    pts = corners @ np.asarray(a, dtype=np.float64).T
    return np.array(
        [pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()],
        dtype=np.float32,
    )


_TLS = threading.local()


def _scratch(slot: str, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """Per-thread reusable work buffer (contents undefined).

    Fresh multi-hundred-kB arrays are served by ``mmap`` and page-faulted on
    every call, which costs more than the arithmetic on them; the temporaries
    of the ops below therefore live in a small per-thread cache.  Buffers from
    here are never returned to the caller.
    """
    cache = getattr(_TLS, "buffers", None)
    if cache is None:
        cache = _TLS.buffers = {}
    key = (slot, tuple(shape), np.dtype(dtype).str)
    buf = cache.get(key)
    if buf is None:
        if len(cache) >= 32:  # many different sizes: start over
            cache.clear()
        buf = cache[key] = np.empty(shape, dtype=dtype)
    return buf


def _warp_affine(image: np.ndarray, m_cv: np.ndarray, border: int) -> np.ndarray:
    """``cv2.warpAffine`` (bilinear, same size) of an RGB uint8 image.

    OpenCV's vectorised warp paths cover 1 and 4 channels only, so 3-channel
    images are padded to RGBA (about 2x faster; identical per-channel result).
    """
    h, w = image.shape[:2]
    rgba = cv2.cvtColor(image, cv2.COLOR_RGB2RGBA, dst=_scratch("rgba_in", (h, w, 4), np.uint8))
    out = cv2.warpAffine(
        rgba,
        m_cv,
        (w, h),
        dst=_scratch("rgba_out", (h, w, 4), np.uint8),
        flags=cv2.INTER_LINEAR,
        borderMode=border,
    )
    return cv2.cvtColor(out, cv2.COLOR_RGBA2RGB)


def _remap(image: np.ndarray, map_x: np.ndarray, map_y: np.ndarray) -> np.ndarray:
    """``cv2.remap`` (bilinear, reflect-101 border) of an RGB uint8 image via RGBA."""
    h, w = map_x.shape
    hi, wi = image.shape[:2]
    rgba = cv2.cvtColor(image, cv2.COLOR_RGB2RGBA, dst=_scratch("rgba_in", (hi, wi, 4), np.uint8))
    out = cv2.remap(
        rgba,
        map_x,
        map_y,
        interpolation=cv2.INTER_LINEAR,
        dst=_scratch("rgba_out", (h, w, 4), np.uint8),
        borderMode=cv2.BORDER_REFLECT_101,
    )
    return cv2.cvtColor(out, cv2.COLOR_RGBA2RGB)


# --------------------------------------------------------------------------- #
# colour jitter
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class ColorParams:
    """Sampled colour-jitter parameters (see :func:`sample_color_params`)."""

    order: tuple[int, ...]  # permutation of (0 brightness, 1 contrast, 2 saturation, 3 hue)
    brightness: float  # multiplicative factor (1 = identity)
    contrast: float  # blend factor with the mean grey (1 = identity)
    saturation: float  # blend factor with the greyscale image (1 = identity)
    hue: float  # shift as a fraction of the colour wheel (0 = identity)


def sample_color_params(
    rng: np.random.Generator,
    brightness: float = 0.3,
    contrast: float = 0.3,
    saturation: float = 0.3,
    hue: float = 0.05,
) -> ColorParams:
    """Draw the op order and the four factors (always 5 draws, any strengths)."""
    for name, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {v}")
    if not 0.0 <= hue <= 0.5:
        raise ValueError(f"hue must be in [0, 0.5], got {hue}")
    order = tuple(int(i) for i in rng.permutation(4))
    u = rng.uniform(-1.0, 1.0, size=4)
    return ColorParams(
        order=order,
        brightness=1.0 + brightness * float(u[0]),
        contrast=1.0 + contrast * float(u[1]),
        saturation=1.0 + saturation * float(u[2]),
        hue=hue * float(u[3]),
    )


def _hue_matrix(shift: float) -> np.ndarray:
    """3x3 RGB matrix rotating colours about the grey axis by ``2*pi*shift``.

    Rodrigues' rotation about ``u = (1, 1, 1) / sqrt(3)``:
    ``R = cos(t) I + (1 - cos(t)) u u^T + sin(t) [u]_x``.
    """
    t = 2.0 * math.pi * shift
    c, s = math.cos(t), math.sin(t)
    k = s / math.sqrt(3.0)
    j = (1.0 - c) / 3.0
    return np.array(
        [[c + j, j - k, j + k], [j + k, c + j, j - k], [j - k, j + k, c + j]],
        dtype=np.float32,
    )


_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)  # ITU-R BT.601


def _saturation_matrix(s: float) -> np.ndarray:
    """3x3 RGB matrix of ``s * x + (1 - s) * luma(x)``."""
    m = (1.0 - s) * np.tile(_LUMA, (3, 1)) + s * np.eye(3)
    return m.astype(np.float32)


def apply_color_params(image: np.ndarray, params: ColorParams) -> np.ndarray:
    """Apply sampled colour-jitter parameters (deterministic).

    float32 math, clipped to ``[0, 255]`` after every op, rounded once at the
    end.  Ops whose factor is the identity are skipped, so all-identity
    parameters return an exact copy.
    """
    image = _check_image(image)
    active = {
        0: params.brightness != 1.0,
        1: params.contrast != 1.0,
        2: params.saturation != 1.0,
        3: params.hue != 0.0,
    }
    if not any(active.values()):
        return image.copy()
    x = _scratch("color_a", image.shape)
    np.copyto(x, image)
    buf = _scratch("color_b", image.shape)  # ping-pong buffer for the 3x3 transforms
    for op in params.order:
        if not active[op]:
            continue
        # Factors <= 1 of brightness / contrast / saturation are convex blends
        # of in-range values, so the clip is only needed for the other cases.
        if op == 0:  # brightness
            x *= np.float32(params.brightness)
            needs_clip = params.brightness > 1.0
        elif op == 1:  # contrast: blend with the mean luma of the image
            c = params.contrast
            mean = float(np.dot(cv2.mean(x)[:3], _LUMA))
            x *= np.float32(c)
            x += np.float32((1.0 - c) * mean)
            needs_clip = c > 1.0
        elif op == 2:  # saturation: blend with the per-pixel luma
            buf = cv2.transform(x, _saturation_matrix(params.saturation), dst=buf)
            x, buf = buf, x
            needs_clip = params.saturation > 1.0
        else:  # hue: rotation about the grey axis
            buf = cv2.transform(x, _hue_matrix(params.hue), dst=buf)
            x, buf = buf, x
            needs_clip = True
        if needs_clip:
            np.clip(x, 0.0, 255.0, out=x)
    # Round-to-nearest with a saturating cast to uint8 (x >= 0 up to float
    # round-off here, so the absolute value taken by convertScaleAbs is moot).
    return cv2.convertScaleAbs(x)


def color_jitter(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness: float = 0.3,
    contrast: float = 0.3,
    saturation: float = 0.3,
    hue: float = 0.05,
) -> np.ndarray:
    """Random brightness / contrast / saturation / hue in a random order."""
    image = _check_image(image)
    params = sample_color_params(rng, brightness, contrast, saturation, hue)
    return apply_color_params(image, params)


# --------------------------------------------------------------------------- #
# random scaling
# --------------------------------------------------------------------------- #


def _scale_affine(s: float, center: tuple[float, float]) -> np.ndarray:
    """2x3 affine (continuous coords) of a zoom by ``s`` about ``center``."""
    cx, cy = center
    return np.array([[s, 0.0, (1.0 - s) * cx], [0.0, s, (1.0 - s) * cy]])


def _scale_center(image: np.ndarray, box: np.ndarray | None) -> tuple[float, float]:
    if box is None:
        h, w = image.shape[:2]
        return (w / 2.0, h / 2.0)
    return (0.5 * float(box[0] + box[2]), 0.5 * float(box[1] + box[3]))


def _sample_scale(rng: np.random.Generator, max_change: float) -> float:
    if not 0.0 <= max_change < 1.0:
        raise ValueError(f"max_change must be in [0, 1), got {max_change}")
    return 1.0 + max_change * float(rng.uniform(-1.0, 1.0))


def random_scale(
    image: np.ndarray,
    rng: np.random.Generator,
    max_change: float = 0.3,
    box=None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Zoom by ``s ~ U[1 - max_change, 1 + max_change]`` keeping the output size.

    ``s > 1`` enlarges the content.  The fixed point is the box centre when a
    box is given, else the image centre; borders are reflected
    (``cv2.BORDER_REFLECT_101``).  Returns ``(image, box)`` with the box
    transformed by the same map (``None`` if no box was given).
    """
    image = _check_image(image)
    box = _check_box(box)
    s = _sample_scale(rng, max_change)
    a = _scale_affine(s, _scale_center(image, box))
    if s == 1.0:
        out = image.copy()
    else:
        out = _warp_affine(image, _to_cv_affine(a), cv2.BORDER_REFLECT_101)
    return out, (None if box is None else _transform_box(box, a))


# --------------------------------------------------------------------------- #
# piecewise affine
# --------------------------------------------------------------------------- #


@functools.lru_cache(maxsize=32)
def _pwa_layout(h: int, w: int, gy: int, gx: int):
    """Per-pixel cell indices and in-cell coordinates (cached, read-only).

    Vertex ``(r, c)`` sits at pixel-centre position ``(c * (w-1)/gx, r * (h-1)/gy)``.
    Returns the cell column ``ci`` and in-cell x coordinate ``fu`` of every
    pixel column, the in-cell y coordinate ``fv`` of every pixel row,
    ``min(fu, fv)`` for every pixel, the pixel coordinates ``xs`` / ``ys`` and
    the first pixel row of every cell-row band (``gy + 1`` entries).
    """
    u = np.arange(w, dtype=np.float64) * (gx / (w - 1))
    v = np.arange(h, dtype=np.float64) * (gy / (h - 1))
    ci = np.minimum(np.floor(u), gx - 1).astype(np.intp)
    ri = np.minimum(np.floor(v), gy - 1).astype(np.intp)
    fu = (u - ci).astype(np.float32)
    fv = (v - ri).astype(np.float32)
    min_fuv = np.minimum(fu[None, :], fv[:, None])
    xs = np.arange(w, dtype=np.float32)
    ys = np.arange(h, dtype=np.float32)
    # ri is non-decreasing: rows of cell-row band r are band_start[r]:band_start[r+1].
    band_start = np.searchsorted(ri, np.arange(gy + 1)).tolist()
    for arr in (ci, ri, fu, fv, min_fuv, xs, ys):
        arr.setflags(write=False)
    return ci, fu, fv, min_fuv, xs, ys, band_start


def piecewise_affine_field(
    h: int, w: int, vertex_offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Dense backward map of a piecewise-affine warp for ``cv2.remap``.

    Args:
      h, w: output size (>= 2 each).
      vertex_offsets: ``(gy + 1, gx + 1, 2)`` offsets ``(dx, dy)`` in pixels of
        a regular vertex lattice whose vertex ``(r, c)`` is at pixel
        ``(x, y) = (c * (w - 1) / gx, r * (h - 1) / gy)``.

    Returns:
      ``(map_x, map_y)``, float32 ``(h, w)``: output pixel ``(x, y)`` samples
      the source at ``(x + d_x, y + d_y)`` where ``d`` is the barycentric
      interpolation of the offsets of the triangle containing ``(x, y)``.

    Each cell ``(r, c)`` with in-cell coordinates ``fu, fv`` in ``[0, 1]`` is
    split along its diagonal ``(0,0)-(1,1)`` into triangle A (``fu >= fv``:
    vertices 00, 10, 11) and B (``fu < fv``: 00, 01, 11).  The two barycentric
    interpolants can be written as one expression,

        d = V00 + fu (V10 - V00) + fv (V01 - V00) + min(fu, fv) (V11 - V10 - V01 + V00),

    (in A ``min = fv`` gives ``V00 + fu (V10 - V00) + fv (V11 - V10)``; in B
    ``min = fu`` gives ``V00 + fu (V11 - V01) + fv (V01 - V00)``), so the map is
    a few row-gathers and multiply-adds of ``(h, w)`` float32 arrays.
    """
    h, w = int(h), int(w)
    map_x = np.empty((h, w), dtype=np.float32)
    map_y = np.empty((h, w), dtype=np.float32)
    _piecewise_affine_field_into(vertex_offsets, map_x, map_y)
    return map_x, map_y


def _piecewise_affine_field_into(vertex_offsets, map_x: np.ndarray, map_y: np.ndarray) -> None:
    """:func:`piecewise_affine_field` writing into given ``(h, w)`` float32 maps."""
    h, w = map_x.shape
    vo = np.asarray(vertex_offsets, dtype=np.float32)
    if vo.ndim != 3 or vo.shape[2] != 2 or vo.shape[0] < 2 or vo.shape[1] < 2:
        raise ValueError(f"vertex_offsets must be (gy+1, gx+1, 2), got {vo.shape}")
    if h < 2 or w < 2:
        raise ValueError(f"image must be at least 2x2, got {h}x{w}")
    gy, gx = vo.shape[0] - 1, vo.shape[1] - 1
    ci, fu, fv, min_fuv, xs, ys, band_start = _pwa_layout(h, w, gy, gx)
    fv_col = fv[:, None]
    ys_col = ys[:, None]
    tmp = _scratch("pwa_tmp", (h, w))
    for k, m in ((0, map_x), (1, map_y)):
        vk = vo[:, :, k]
        left = vk[:, ci]  # (gy + 1, w): V[r, c(x)]
        right = vk[:, ci + 1]  # (gy + 1, w): V[r, c(x) + 1]
        # Per cell-row band, functions of x only.
        top = left[:-1] + fu * (right[:-1] - left[:-1])  # V00 + fu (V10 - V00)
        if k == 0:
            top += xs  # identity part of map_x (exact: top is 0 for zero offsets)
        step = left[1:] - left[:-1]  # V01 - V00
        cross = right[1:] - left[1:] - right[:-1] + left[:-1]  # V11 - V10 - V01 + V00
        for r in range(gy):  # one band of pixel rows per cell row, broadcast over x
            y0, y1 = band_start[r], band_start[r + 1]
            mb, tb = m[y0:y1], tmp[y0:y1]
            np.multiply(min_fuv[y0:y1], cross[r], out=mb)
            np.multiply(fv_col[y0:y1], step[r], out=tb)
            mb += tb
            mb += top[r]
        if k == 1:
            m += ys_col


def sample_piecewise_offsets(
    h: int, w: int, rng: np.random.Generator, grid: int = 4, strength: float = 0.02
) -> np.ndarray:
    """Random ``(grid+1, grid+1, 2)`` vertex offsets; border vertices are zero."""
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    u = rng.uniform(-1.0, 1.0, size=(grid + 1, grid + 1, 2))
    u[..., 0] *= strength * w
    u[..., 1] *= strength * h
    u[0, :] = 0.0
    u[-1, :] = 0.0
    u[:, 0] = 0.0
    u[:, -1] = 0.0
    return u.astype(np.float32)


def piecewise_affine(
    image: np.ndarray,
    rng: np.random.Generator,
    grid: int = 4,
    strength: float = 0.02,
) -> np.ndarray:
    """Random piecewise-affine warp (see module docstring); same output size."""
    image = _check_image(image)
    h, w = image.shape[:2]
    offsets = sample_piecewise_offsets(h, w, rng, grid, strength)
    if not np.any(offsets):
        return image.copy()
    map_x, map_y = piecewise_affine_field(h, w, offsets)
    return _remap(image, map_x, map_y)


# --------------------------------------------------------------------------- #
# face-centred crop
# --------------------------------------------------------------------------- #


def _crop_resize(image: np.ndarray, x0: int, y0: int, side: int, out_size: int) -> np.ndarray:
    """Square window ``[x0, x0+side) x [y0, y0+side)``, zero padded, resized."""
    h, w = image.shape[:2]
    sx0, sy0 = max(x0, 0), max(y0, 0)
    sx1, sy1 = min(x0 + side, w), min(y0 + side, h)
    if sx0 == x0 and sy0 == y0 and sx1 == x0 + side and sy1 == y0 + side:
        crop = image[y0 : y0 + side, x0 : x0 + side]
    else:
        crop = np.zeros((side, side, image.shape[2]), dtype=image.dtype)
        if sx1 > sx0 and sy1 > sy0:
            crop[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1]
    if side == out_size:
        return np.ascontiguousarray(crop).copy()
    interp = cv2.INTER_AREA if side > out_size else cv2.INTER_LINEAR
    return cv2.resize(crop, (out_size, out_size), interpolation=interp)


def face_centered_crop(
    image: np.ndarray,
    box,
    rng: np.random.Generator,
    out_size: int,
    crop_scale: tuple[float, float] = (1.6, 2.4),
    jitter: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """Square crop around the (jittered) face-box centre, resized to ``out_size``.

    Side ``= f * max(box_w, box_h)`` with ``f ~ U[crop_scale]``; the centre is
    the box centre plus ``U[-jitter, jitter] * (box_w, box_h)``.  The window is
    snapped to integer pixels, zero-padded outside the image, and resized with
    ``INTER_AREA`` (shrinking) or ``INTER_LINEAR`` (enlarging).  Returns
    ``(crop, box_in_crop_coords)``.
    """
    image = _check_image(image)
    box = _check_box(box)
    if box is None:
        raise ValueError("face_centered_crop needs a box")
    out_size = int(out_size)
    if out_size < 1:
        raise ValueError(f"out_size must be positive, got {out_size}")
    lo, hi = float(crop_scale[0]), float(crop_scale[1])
    if not 0.0 < lo <= hi:
        raise ValueError(f"crop_scale must satisfy 0 < lo <= hi, got {crop_scale}")
    f = lo + (hi - lo) * float(rng.uniform(0.0, 1.0))
    jx, jy = (float(t) for t in rng.uniform(-1.0, 1.0, size=2))
    bw = max(float(box[2] - box[0]), 1.0)
    bh = max(float(box[3] - box[1]), 1.0)
    cx = 0.5 * float(box[0] + box[2]) + jitter * jx * bw
    cy = 0.5 * float(box[1] + box[3]) + jitter * jy * bh
    side = max(int(round(f * max(bw, bh))), 1)
    x0 = int(round(cx - side / 2.0))
    y0 = int(round(cy - side / 2.0))
    out = _crop_resize(image, x0, y0, side, out_size)
    k = out_size / side
    new_box = np.array(
        [(box[0] - x0) * k, (box[1] - y0) * k, (box[2] - x0) * k, (box[3] - y0) * k],
        dtype=np.float32,
    )
    return out, new_box


# --------------------------------------------------------------------------- #
# full chain
# --------------------------------------------------------------------------- #


def augment_driving(
    image: np.ndarray,
    box,
    seed_or_rng,
    config: AugmentConfig = AugmentConfig(),
    out_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """X-NeMo driving-image augmentation chain (Sec. 3.3).

    face-centred crop (if ``out_size``) -> random scale -> piecewise affine ->
    colour jitter, each applied with its probability in ``config``.

    * ``seed_or_rng``: an ``int`` seed (or ``SeedSequence``) or a ``Generator``.
    * Every stage always consumes its random draws (a gate draw plus its
      parameters) whether or not it is applied, so stages are decoupled.
    * If ``out_size`` is given but the crop is skipped (prob. ``1 - p_crop``)
      or no box is given, the whole image is zero-padded to a centred square
      and resized to ``out_size`` instead.
    * Random scaling is about the box centre (image centre without a box);
      it is fused with the piecewise warp into a single ``cv2.remap``.
    * The returned box is clipped to the output image; ``None`` if no box.
    """
    if isinstance(seed_or_rng, np.random.Generator):
        rng = seed_or_rng
    else:
        rng = np.random.default_rng(seed_or_rng)
    image = _check_image(image)
    box = _check_box(box)
    cfg = config

    # 1) face-centred crop.
    gate = rng.random()
    crop_rng = np.random.default_rng(rng.integers(0, 2**63))
    if out_size is not None:
        if box is not None and gate < cfg.p_crop:
            image, box = face_centered_crop(
                image, box, crop_rng, out_size, cfg.crop_scale, cfg.crop_jitter
            )
        else:
            h, w = image.shape[:2]
            side = max(h, w)
            x0, y0 = (w - side) // 2, (h - side) // 2
            image = _crop_resize(image, x0, y0, side, int(out_size))
            if box is not None:
                k = out_size / side
                box = ((box - np.array([x0, y0, x0, y0], np.float32)) * k).astype(np.float32)

    # 2) random scaling and 3) piecewise affine.  Both are geometric warps of
    # the same image, so they are fused into one backward map and a single
    # cv2.remap (one resampling instead of two): the piecewise map q(p) of the
    # output pixel p is pulled back through the inverse zoom.  The zoom is
    # about the box centre, so the box is transformed by it; the piecewise
    # warp keeps the box (its offsets are a few % and vanish at the border).
    h, w = image.shape[:2]
    gate_s = rng.random()
    s_rng = np.random.default_rng(rng.integers(0, 2**63))
    gate_p = rng.random()
    p_rng = np.random.default_rng(rng.integers(0, 2**63))
    s = 1.0
    if gate_s < cfg.p_scale and cfg.scale > 0:
        s = _sample_scale(s_rng, cfg.scale)
    offsets = None
    if gate_p < cfg.p_piecewise and cfg.piecewise_strength > 0:
        offsets = sample_piecewise_offsets(
            h, w, p_rng, cfg.piecewise_grid, cfg.piecewise_strength
        )
        if not np.any(offsets):
            offsets = None
    if s != 1.0:
        a = _scale_affine(s, _scale_center(image, box))
        if box is not None:
            box = _transform_box(box, a)
    if offsets is not None:
        map_x = _scratch("map_x", (h, w))
        map_y = _scratch("map_y", (h, w))
        _piecewise_affine_field_into(offsets, map_x, map_y)
        if s != 1.0:
            # zoom in OpenCV pixel-centre coords: p' = s p + t, so p = (p' - t) / s.
            t = _to_cv_affine(a)[:, 2]
            inv_s = np.float32(1.0 / s)
            map_x -= np.float32(t[0])
            map_x *= inv_s
            map_y -= np.float32(t[1])
            map_y *= inv_s
        image = _remap(image, map_x, map_y)
    elif s != 1.0:
        image = _warp_affine(image, _to_cv_affine(a), cv2.BORDER_REFLECT_101)

    # 4) colour jitter.
    gate = rng.random()
    c_rng = np.random.default_rng(rng.integers(0, 2**63))
    if gate < cfg.p_color:
        image = color_jitter(
            image, c_rng, cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue
        )

    if box is not None:
        h, w = image.shape[:2]
        box = np.clip(box, 0.0, np.array([w, h, w, h], np.float32)).astype(np.float32)
    return image, box
