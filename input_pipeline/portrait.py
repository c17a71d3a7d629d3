"""Framing of real portraits for inference: crop/pad/resize in, resize/paste back out.

A :class:`Framing` maps frames of one size (``H x W``) to the model's square input (``R x R``) and back:

* **window**: a square in frame pixels. Without a face box it is the whole frame, padded to a square
  (centred; the aspect ratio is preserved, never squashed). With a face box it is the official LIA-X
  crop (``utils/crop.py`` rule, :func:`input_pipeline.crops.liax_crop_window`), squared if the frame
  clipped it. Parts of the window outside the frame are filled by edge replication (``pad="edge"``) or
  black (``pad="black"``).
* :meth:`Framing.crop` cuts the window out and resizes it to ``R`` (area filter down, bicubic up).
* :meth:`Framing.uncrop` resizes a model output back to the window's size and drops the padding: the
  result covers exactly the part of the frame the window covers (the whole frame without a face box).
* :meth:`Framing.paste` blends that result into a full frame with a feathered mask (``--paste-back``):
  the blend ramps over ``feather`` x the window side on every window edge that lies inside the frame.

Pixel conversion: :func:`to_model` maps uint8 to float32 in [-1, 1]; :func:`to_uint8` maps back with
clipping and rounding, per frame, so colours do not depend on the rest of the video. The official
per-video min-max normalisation is :func:`minmax_to_uint8` (clamp, stretch ``[lo, hi]`` to [0, 255],
truncate), for users who need the official colours.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from input_pipeline import crops

PADS = ("edge", "black")


@dataclasses.dataclass(frozen=True)
class Framing:
    frame_height: int
    frame_width: int
    window: tuple[int, int, int, int]  # x0, y0, x1, y1 (a square; may extend past the frame)
    resolution: int
    pad: str = "edge"

    def __post_init__(self):
        if self.pad not in PADS:
            raise ValueError(f"pad must be one of {PADS}, got {self.pad!r}")
        x0, y0, x1, y1 = self.window
        if x1 - x0 != y1 - y0 or x1 <= x0:
            raise ValueError(f"window {self.window} is not a non-empty square")

    # ----------------------------------------------------------------------------------- factories
    @classmethod
    def whole_frame(cls, height: int, width: int, resolution: int, pad: str = "edge") -> Framing:
        """The whole frame, padded to a centred square of side max(H, W)."""
        side = max(height, width)
        x0, y0 = (width - side) // 2, (height - side) // 2
        return cls(height, width, (x0, y0, x0 + side, y0 + side), resolution, pad)

    @classmethod
    def face(cls, box, height: int, width: int, resolution: int, pad: str = "edge", increase: float = 0.25,
             increase_top: float = 0.5) -> Framing:
        """The official LIA-X face crop of ``box`` (``[x0, y0, x1, y1]``), made square if clipped."""
        x0, y0, x1, y1 = crops.liax_crop_window(box, height, width, increase, increase_top)
        side = max(x1 - x0, y1 - y0, 1)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        nx0, ny0 = cx - side // 2, cy - side // 2
        return cls(height, width, (nx0, ny0, nx0 + side, ny0 + side), resolution, pad)

    # ---------------------------------------------------------------------------------- geometry
    @property
    def side(self) -> int:
        return self.window[2] - self.window[0]

    @property
    def visible(self) -> tuple[int, int, int, int]:
        """The part of the window inside the frame, in frame pixels ``(x0, y0, x1, y1)``."""
        x0, y0, x1, y1 = self.window
        return max(x0, 0), max(y0, 0), min(x1, self.frame_width), min(y1, self.frame_height)

    @property
    def output_size(self) -> tuple[int, int]:
        """``(height, width)`` of :meth:`uncrop` results."""
        x0, y0, x1, y1 = self.visible
        return y1 - y0, x1 - x0

    def _check(self, frame: np.ndarray) -> None:
        if frame.shape[:2] != (self.frame_height, self.frame_width):
            raise ValueError(f"frame of size {frame.shape[:2]} given to a framing of "
                             f"{(self.frame_height, self.frame_width)}")

    # -------------------------------------------------------------------------------- transforms
    def crop(self, frame: np.ndarray) -> np.ndarray:
        """uint8 ``(H, W, 3)`` frame -> uint8 ``(R, R, 3)`` model input."""
        self._check(frame)
        x0, y0, x1, y1 = self.window
        h, w = self.frame_height, self.frame_width
        if x0 >= 0 and y0 >= 0 and x1 <= w and y1 <= h:
            window = frame[y0:y1, x0:x1]
        else:
            border = cv2.BORDER_REPLICATE if self.pad == "edge" else cv2.BORDER_CONSTANT
            vx0, vy0, vx1, vy1 = self.visible
            window = cv2.copyMakeBorder(np.ascontiguousarray(frame[vy0:vy1, vx0:vx1]), vy0 - y0, y1 - vy1,
                                        vx0 - x0, x1 - vx1, border, value=(0, 0, 0))
        return crops.resize(np.ascontiguousarray(window), self.resolution)

    def crop_many(self, frames: np.ndarray) -> np.ndarray:
        return np.stack([self.crop(f) for f in frames])

    def uncrop(self, result: np.ndarray) -> np.ndarray:
        """float ``(R, R, 3)`` model output in [-1, 1] -> float32 ``(h, w, 3)`` over :attr:`visible`."""
        result = np.asarray(result, np.float32)
        if result.shape[0] != self.side:
            interp = cv2.INTER_AREA if result.shape[0] > self.side else cv2.INTER_CUBIC
            result = cv2.resize(result, (self.side, self.side), interpolation=interp)
        x0, y0, _, _ = self.window
        vx0, vy0, vx1, vy1 = self.visible
        return result[vy0 - y0:vy1 - y0, vx0 - x0:vx1 - x0]

    def feather_mask(self, feather: float) -> np.ndarray:
        """float32 ``(h, w, 1)`` blend weights over :attr:`visible`: 1 inside, ramping to 0 at window
        edges that lie inside the frame (over ``feather`` x the window side, smoothstep)."""
        vx0, vy0, vx1, vy1 = self.visible
        h, w = vy1 - vy0, vx1 - vx0
        width = max(feather * self.side, 1e-6)
        ys = np.arange(h, dtype=np.float32) + 0.5
        xs = np.arange(w, dtype=np.float32) + 0.5
        big = np.full((), np.inf, np.float32)
        # distance to each edge that has frame content beyond it (edges on the frame border do not fade)
        top = ys if vy0 > 0 else big
        bottom = (h - ys) if vy1 < self.frame_height else big
        left = xs if vx0 > 0 else big
        right = (w - xs) if vx1 < self.frame_width else big
        dist = np.minimum(np.minimum(top, bottom)[:, None], np.minimum(left, right)[None, :])
        t = np.clip(dist / width, 0.0, 1.0)
        return (t * t * (3.0 - 2.0 * t)).astype(np.float32)[..., None]

    def paste(self, canvas: np.ndarray, result_uint8: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Blends ``result_uint8`` (``output_size``) into a copy of the uint8 frame ``canvas``."""
        self._check(canvas)
        vx0, vy0, vx1, vy1 = self.visible
        out = canvas.copy()
        region = canvas[vy0:vy1, vx0:vx1].astype(np.float32)
        blended = region + mask * (result_uint8.astype(np.float32) - region)
        out[vy0:vy1, vx0:vx1] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
        return out


# ------------------------------------------------------------------------------------------- pixels
def to_model(frames: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1] (``x / 127.5 - 1``)."""
    return np.asarray(frames, np.float32) / 127.5 - 1.0


def to_uint8(x: np.ndarray) -> np.ndarray:
    """float in [-1, 1] -> uint8 with clipping and rounding (each frame on its own)."""
    return np.clip(np.rint((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def minmax_to_uint8(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """The official ``denorm``: clamp to [-1, 1], map ``[lo, hi]`` (the clamped range of the whole
    output) to [0, 255] and truncate."""
    x = np.clip(np.asarray(x, np.float32), -1.0, 1.0)
    scale = 255.0 / max(hi - lo, 1e-12)
    return np.clip((x - lo) * scale, 0, 255).astype(np.uint8)


def side_by_side(panels: list[np.ndarray], height: int) -> np.ndarray:
    """uint8 panels resized to ``height`` (aspect kept) and joined left to right."""
    return np.concatenate([crops.resize(p, height, max(1, round(p.shape[1] * height / p.shape[0])))
                           for p in panels], axis=1)
