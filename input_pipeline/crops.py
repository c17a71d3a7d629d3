"""Face crops of the official LIA-X and X-NeMo code, and the f_rts box triplet of X-NeMo.

Boxes are float ``[x0, y0, x1, y1]`` in pixels of the frame they were detected in; images are uint8 RGB
``(H, W, 3)``. Formulas follow ``shared/reference/liax_official.md`` §4.3 and ``xnemo_official.md`` §1.2:

* :func:`xnemo_reference_crop` — the X-NeMo appearance crop: the face box grown by 0.5 of its width on the
  left and right and 0.5 of its height above and below (2w x 2h), zero-padded outside the image, resized
  to 512 with antialiasing. Aspect preservation: a non-square grown box is widened along its shorter side
  (symmetrically) to a square, so the resize never squashes the face. BlazeFace boxes are square, where
  this is exactly the 2x box.
* :func:`xnemo_driving_windows` / :func:`xnemo_driving_crops` — the X-NeMo motion-encoder ("pose") crops of
  a driving video: frame 0's box becomes a square of side 1.1 * max(w, h) about its centre (only when that
  square stays inside the frame; otherwise the raw box is kept), its width and height rounded down to even
  numbers give one fixed crop size for the whole video; per-frame centres are Gaussian-smoothed (sigma 5
  frames); each window is shifted back inside the frame (no padding) and resized to 224 with Lanczos.
* :func:`liax_crop_window` / :func:`liax_crop` — ``utils/crop.py`` of LIA-X with its integer arithmetic:
  the box grown by ``increase`` (0.25) with aspect-preserving growth factors and an extra top growth
  ``increase_top`` (0.5), clipped to the frame, then a square of side min(h, w) of the grown box centred on
  it and shifted inside the frame. No resize. For a video the window of frame 0 is used for every frame.
* :func:`relative_box_transform` — f_rts. The paper writes (dx/s_r, dy/s_r, s_d/s_r); the official code
  computes **(dy, dx, s)**, y first, with L = max(w, h) of the raw boxes. We use the official order so
  that converted official motion-encoder weights (``bbox_proj``) receive what they were trained on.
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from input_pipeline.face_detection import smooth_box_centers


def box_center_size(box) -> tuple[float, float, float, float]:
    """``(cx, cy, w, h)`` of a box ``[x0, y0, x1, y1]``."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return (x0 + x1) / 2.0, (y0 + y1) / 2.0, x1 - x0, y1 - y0


def crop_padded(image: np.ndarray, x0: int, y0: int, x1: int, y1: int, fill: int = 0) -> np.ndarray:
    """``image[y0:y1, x0:x1]`` where the window may leave the image; outside pixels are ``fill``."""
    h, w = image.shape[:2]
    out = np.full((y1 - y0, x1 - x0) + image.shape[2:], fill, image.dtype)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image[sy0:sy1, sx0:sx1]
    return out


def resize(image: np.ndarray, height: int, width: int | None = None, method: str = "auto") -> np.ndarray:
    """Resizes uint8 images; ``auto`` = area averaging to shrink (antialiased), bicubic to enlarge.

    ``method`` may also be ``"lanczos"`` (PIL's antialiased Lanczos, as diffusers' image processor),
    ``"bilinear"`` or ``"area"``.
    """
    width = height if width is None else width
    if image.shape[:2] == (height, width):
        return image
    if method == "lanczos":
        return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.LANCZOS))
    if method == "auto":
        shrink = height < image.shape[0] or width < image.shape[1]
        interp = cv2.INTER_AREA if shrink else cv2.INTER_CUBIC
    else:
        interp = {"bilinear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA, "cubic": cv2.INTER_CUBIC}[method]
    return cv2.resize(image, (width, height), interpolation=interp)


# ----------------------------------------------------------------------------------------- X-NeMo
def xnemo_reference_window(box, grow: float = 0.5) -> tuple[int, int, int, int]:
    """Integer window ``(x0, y0, x1, y1)`` of the X-NeMo reference crop (may leave the image)."""
    cx, cy, w, h = box_center_size(box)
    side = max(w, h) * (1.0 + 2.0 * grow)  # square: aspect preserved for non-square boxes
    x0 = int(round(cx - side / 2.0))
    y0 = int(round(cy - side / 2.0))
    s = int(round(side))
    return x0, y0, x0 + s, y0 + s


def xnemo_reference_crop(image: np.ndarray, box, size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """X-NeMo appearance crop: ``(crop (size, size, 3), box in crop pixels)``."""
    x0, y0, x1, y1 = xnemo_reference_window(box)
    crop = crop_padded(image, x0, y0, x1, y1)
    scale = size / float(x1 - x0)
    new_box = (np.asarray(box, np.float32) - np.array([x0, y0, x0, y0], np.float32)) * scale
    return resize(crop, size, size), new_box


def xnemo_driving_crop_size(box0, frame_height: int, frame_width: int, enlarge: float = 1.1) -> tuple[int, int]:
    """Fixed ``(crop_w, crop_h)`` of the driving crops from frame 0's box (even numbers)."""
    cx, cy, w, h = box_center_size(box0)
    side = enlarge * max(w, h)
    inside = (cx - side / 2 >= 0 and cy - side / 2 >= 0 and cx + side / 2 <= frame_width
              and cy + side / 2 <= frame_height)
    cw, ch = (side, side) if inside else (w, h)
    cw, ch = int(cw) // 2 * 2, int(ch) // 2 * 2
    return max(2, min(cw, frame_width // 2 * 2)), max(2, min(ch, frame_height // 2 * 2))


def xnemo_driving_windows(boxes: np.ndarray, frame_height: int, frame_width: int,
                          sigma: float = 5.0, enlarge: float = 1.1) -> np.ndarray:
    """Per-frame integer windows ``(T, 4)`` = x0, y0, x1, y1 of the X-NeMo driving crops."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    cw, ch = xnemo_driving_crop_size(boxes[0], frame_height, frame_width, enlarge)
    smooth = smooth_box_centers(boxes, sigma)
    cx = (smooth[:, 0] + smooth[:, 2]) / 2.0
    cy = (smooth[:, 1] + smooth[:, 3]) / 2.0
    x0 = np.clip(np.round(cx - cw / 2.0), 0, frame_width - cw).astype(np.int32)
    y0 = np.clip(np.round(cy - ch / 2.0), 0, frame_height - ch).astype(np.int32)
    return np.stack([x0, y0, x0 + cw, y0 + ch], axis=1)


def xnemo_driving_crops(frames: np.ndarray, boxes: np.ndarray, size: int = 224,
                        sigma: float = 5.0) -> np.ndarray:
    """X-NeMo motion-encoder crops ``(T, size, size, 3)`` of a driving clip ``(T, H, W, 3)``."""
    frames = np.asarray(frames)
    windows = xnemo_driving_windows(boxes, frames.shape[1], frames.shape[2], sigma)
    return np.stack([resize(f[y0:y1, x0:x1], size, size, method="lanczos")
                     for f, (x0, y0, x1, y1) in zip(frames, windows, strict=True)])


def relative_box_transform(reference_box, driving_boxes) -> np.ndarray:
    """f_rts of X-NeMo in the official (dy, dx, s) order.

    ``dy = (cy_d - cy_r) / L_r``, ``dx = (cx_d - cx_r) / L_r``, ``s = L_d / L_r`` with ``L = max(w, h)``.
    ``driving_boxes`` may be one box ``(4,)`` or ``(T, 4)``; returns float32 ``(3,)`` or ``(T, 3)``.
    """
    ref = np.asarray(reference_box, np.float64)
    drv = np.asarray(driving_boxes, np.float64)
    single = drv.ndim == 1
    drv = drv.reshape(-1, 4)
    l_ref = max(ref[2] - ref[0], ref[3] - ref[1])
    cy_r, cx_r = (ref[1] + ref[3]) / 2, (ref[0] + ref[2]) / 2
    l_drv = np.maximum(drv[:, 2] - drv[:, 0], drv[:, 3] - drv[:, 1])
    out = np.stack([((drv[:, 1] + drv[:, 3]) / 2 - cy_r) / l_ref,
                    ((drv[:, 0] + drv[:, 2]) / 2 - cx_r) / l_ref,
                    l_drv / l_ref], axis=1).astype(np.float32)
    return out[0] if single else out


# ------------------------------------------------------------------------------------------ LIA-X
def liax_grown_box(box, frame_height: int, frame_width: int, increase: float = 0.25,
                   increase_top: float = 0.5) -> tuple[int, int, int, int]:
    """LIA-X ``compute_bbox``: returns ``(w, h, left, top)`` of the grown, clipped box (integers)."""
    left, top, right, bot = (float(v) for v in box)
    width, height = right - left, bot - top
    wi = max(increase, ((1 + 2 * increase) * height - width) / (2 * width))
    hi = max(increase, ((1 + 2 * increase) * width - height) / (2 * height))
    left = int(left - wi * width)
    top = int(top - hi * height * (1 + increase_top))
    right = int(right + wi * width)
    bot = int(bot + hi * height)
    top, bot = max(0, top), min(bot, frame_height)
    left, right = max(0, left), min(right, frame_width)
    return right - left, bot - top, left, top


def liax_crop_window(box, frame_height: int, frame_width: int, increase: float = 0.25,
                     increase_top: float = 0.5) -> tuple[int, int, int, int]:
    """Square window ``(x0, y0, x1, y1)`` of the official LIA-X crop of a frame of the given size."""
    w, h, left, top = liax_grown_box(box, frame_height, frame_width, increase, increase_top)
    size = min(h, w)
    new_top = max(0, top + h // 2 - size // 2)
    new_left = max(0, left + w // 2 - size // 2)
    new_top -= max(0, new_top + size - frame_height)
    new_left -= max(0, new_left + size - frame_width)
    new_top, new_left = max(0, new_top), max(0, new_left)
    return new_left, new_top, min(new_left + size, frame_width), min(new_top + size, frame_height)


def liax_crop(image: np.ndarray, box, increase: float = 0.25, increase_top: float = 0.5) -> np.ndarray:
    """The official LIA-X crop of one image (no resize)."""
    x0, y0, x1, y1 = liax_crop_window(box, image.shape[0], image.shape[1], increase, increase_top)
    return image[y0:y1, x0:x1]


def stable_clip_window(boxes: np.ndarray, frame_height: int, frame_width: int,
                       scale: float = 2.0, margin: float = 0.1) -> tuple[int, int, int, int]:
    """One square window for a whole clip, used to build training data (``launch/prepare_data.py``).

    Side = ``scale`` x the median face size, enlarged if needed so that every frame's box plus a margin
    of ``margin`` x face size fits; centred on the union of the boxes; at most min(H, W) and shifted
    inside the frame, so no padding is ever needed. The head moves inside a fixed window, as in the
    VoxCeleb/HDTF crops LIA and X-NeMo were trained on.
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    face = float(np.median(np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])))
    ux0, uy0 = boxes[:, 0].min() - margin * face, boxes[:, 1].min() - margin * face
    ux1, uy1 = boxes[:, 2].max() + margin * face, boxes[:, 3].max() + margin * face
    side = max(scale * face, ux1 - ux0, uy1 - uy0)
    side = int(min(round(side), frame_height, frame_width))
    cx, cy = (ux0 + ux1) / 2.0, (uy0 + uy1) / 2.0
    x0 = int(np.clip(round(cx - side / 2.0), 0, frame_width - side))
    y0 = int(np.clip(round(cy - side / 2.0), 0, frame_height - side))
    return x0, y0, x0 + side, y0 + side
