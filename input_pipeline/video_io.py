"""Image and video input/output with OpenCV.

Pixels leave this module as uint8 RGB arrays, ``(H, W, 3)`` for an image and ``(T, H, W, 3)`` for a
batch of frames. Conventions:

* Images: png, jpg, webp, bmp, tiff. RGBA loses its alpha channel (as PIL's ``convert('RGB')`` does, the
  official LIA-X preprocessing), grayscale is replicated to three channels, 16-bit images are reduced to
  8 bits (``v >> 8``), and the EXIF orientation tag is applied.
* Videos: anything FFmpeg inside OpenCV decodes (mp4, mov, avi, webm, mkv, ...) or a folder of frame
  images (sorted in natural order, ``frame_2`` before ``frame_10``). :class:`VideoReader` streams: it holds
  one frame (or one chunk) at a time, so arbitrarily long videos fit in bounded memory.
* Writing is atomic: output goes to a hidden temporary file beside the target and is renamed into place
  only when complete, so a failure never leaves a partial file behind.

Bad input raises :class:`~input_pipeline.errors.UserError` naming the file and the problem.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import tempfile
from collections.abc import Iterable, Iterator

os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # FFmpeg's own lines ("Invalid PNG signature"...) off;
# unreadable input is reported by the UserError below instead

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from input_pipeline.errors import UserError  # noqa: E402

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".webm", ".mkv", ".m4v", ".mpg", ".mpeg")
DEFAULT_FOLDER_FPS = 25.0

_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)


def _check_file(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError("no such file", path)
    if not os.path.isfile(path):
        raise UserError("not a regular file", path)
    if os.path.getsize(path) == 0:
        raise UserError("file is empty", path)
    return path


def decode_image(data: bytes | np.ndarray, name: str = "<bytes>") -> np.ndarray:
    """Decodes encoded image bytes (png/jpg/webp/...) to uint8 RGB ``(H, W, 3)``."""
    buf = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data
    flags = _IMREAD_RGB if _IMREAD_RGB is not None else cv2.IMREAD_COLOR
    image = cv2.imdecode(buf, flags) if buf.size else None
    if image is None:
        raise UserError("not a readable image (corrupt or unsupported format)", name)
    if _IMREAD_RGB is None:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(image)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Reads an image file as uint8 RGB ``(H, W, 3)`` (alpha dropped, EXIF orientation applied)."""
    path = _check_file(path)
    return decode_image(np.fromfile(path, np.uint8), path)


def encode_image(image: np.ndarray, fmt: str = "jpeg", quality: int = 95) -> bytes:
    """Encodes uint8 RGB ``(H, W, 3)`` as ``jpeg`` or ``png`` bytes."""
    image = _as_rgb8(image)
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    if fmt in ("jpeg", "jpg"):
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    elif fmt == "png":
        ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    else:
        raise ValueError(f"unknown image format {fmt!r} (expected 'jpeg' or 'png')")
    if not ok:
        raise RuntimeError(f"OpenCV failed to encode a {image.shape} image as {fmt}")
    return buf.tobytes()


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path beside ``path``; renames it to ``path`` on success, deletes it on error."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    stem, ext = os.path.splitext(os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".partial{ext}", dir=directory)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_image(path: str | os.PathLike, image: np.ndarray, quality: int = 95) -> None:
    """Writes uint8 RGB to png/jpg/webp (chosen by the extension), atomically."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in IMAGE_EXTENSIONS:
        raise UserError(f"unsupported image extension {ext!r} (use one of {', '.join(IMAGE_EXTENSIONS)})", path)
    bgr = cv2.cvtColor(_as_rgb8(image), cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if ext in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(ext, bgr, params)
    if not ok:
        raise UserError("OpenCV could not encode the image", path)
    with atomic_output(path) as tmp:
        buf.tofile(tmp)


def _as_rgb8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) RGB image, got {image.dtype} {image.shape}")
    return np.ascontiguousarray(image)


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def list_frame_files(folder: str | os.PathLike) -> list[str]:
    """Image files of a frame folder in natural order."""
    folder = os.fspath(folder)
    names = [n for n in os.listdir(folder) if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS]
    return [os.path.join(folder, n) for n in sorted(names, key=_natural_key)]


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    fps: float
    width: int
    height: int
    num_frames: int  # exact for frame folders, the container's estimate for video files


class VideoReader:
    """Streams the frames of a video file or a folder of frames as uint8 RGB arrays.

    ``for frame in reader`` yields ``(H, W, 3)`` frames; ``reader.chunks(n)`` yields ``(<=n, H, W, 3)``
    arrays. Only the current frame or chunk is held in memory. Opening validates the input: a missing,
    empty, corrupt or zero-frame input raises :class:`UserError` immediately.

    Args:
      path: video file or folder of frame images.
      fps: frame rate to report for a frame folder (video files use the container's rate).
      max_frames: stop after this many frames (None: all).
    """

    def __init__(self, path: str | os.PathLike, fps: float | None = None, max_frames: int | None = None):
        self.path = os.fspath(path)
        self.max_frames = max_frames
        self._cap = None
        self._files: list[str] | None = None
        if os.path.isdir(self.path):
            self._files = list_frame_files(self.path)
            if not self._files:
                raise UserError("folder contains no frame images", self.path)
            first = read_image(self._files[0])
            num = len(self._files)
            rate = float(fps) if fps else DEFAULT_FOLDER_FPS
        else:
            _check_file(self.path)
            self._cap = cv2.VideoCapture(self.path)
            if not self._cap.isOpened():
                raise UserError("cannot open as a video (corrupt or unsupported format)", self.path)
            ok, bgr = self._cap.read()
            if not ok or bgr is None:
                self._cap.release()
                raise UserError("video contains no decodable frames", self.path)
            first = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            rate = self._cap.get(cv2.CAP_PROP_FPS)
            if not rate or not np.isfinite(rate) or rate <= 0 or rate > 1000:
                rate = float(fps) if fps else DEFAULT_FOLDER_FPS
            num = max(int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT)), 1)
        if max_frames is not None:
            num = min(num, max_frames)
        self._first: np.ndarray | None = first
        self.info = VideoInfo(fps=float(rate), width=first.shape[1], height=first.shape[0], num_frames=num)
        self._consumed = False

    @property
    def fps(self) -> float:
        return self.info.fps

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._consumed:
            raise RuntimeError(f"{self.path}: a VideoReader can be iterated once; open a new one")
        self._consumed = True
        count = 0
        limit = self.max_frames if self.max_frames is not None else float("inf")
        first, self._first = self._first, None
        if count < limit:
            yield first
            count += 1
        shape = first.shape
        if self._files is not None:
            for name in self._files[1:]:
                if count >= limit:
                    break
                frame = read_image(name)
                if frame.shape != shape:
                    raise UserError(f"frame size {frame.shape[:2]} differs from the first frame's {shape[:2]}", name)
                yield frame
                count += 1
        else:
            while count < limit:
                ok, bgr = self._cap.read()
                if not ok or bgr is None:
                    break
                yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                count += 1
        self.close()

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        """Yields stacked chunks of up to ``size`` consecutive frames."""
        if size < 1:
            raise ValueError("chunk size must be >= 1")
        buf = []
        for frame in self:
            buf.append(frame)
            if len(buf) == size:
                yield np.stack(buf)
                buf = []
        if buf:
            yield np.stack(buf)

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def probe_video(path: str | os.PathLike, fps: float | None = None) -> VideoInfo:
    """Frame rate, size and frame count of a video file or frame folder (validates it too)."""
    with VideoReader(path, fps=fps) as reader:
        return reader.info


def read_video(path: str | os.PathLike, max_frames: int | None = None,
               fps: float | None = None) -> tuple[np.ndarray, float]:
    """Reads a whole (short) video into memory: ``(frames (T, H, W, 3) uint8, fps)``.

    Use :class:`VideoReader` to stream long videos instead.
    """
    reader = VideoReader(path, fps=fps, max_frames=max_frames)
    frames = np.stack(list(reader))
    return frames, reader.fps


class _H264Writer:
    """H.264 (libx264, yuv420p, CRF 18, the official X-NeMo writer's settings) through PyAV, with the
    ``cv2.VideoWriter`` methods used here (``write`` takes RGB)."""

    def __init__(self, path: str, fps: float, size: tuple[int, int]):
        import fractions  # noqa: PLC0415

        import av  # noqa: PLC0415

        self._container = av.open(path, mode="w")
        self._stream = self._container.add_stream("libx264", rate=fractions.Fraction(fps).limit_denominator(1001))
        self._stream.width, self._stream.height = size
        self._stream.pix_fmt = "yuv420p"
        self._stream.options = {"crf": "18"}
        self._frame = av.VideoFrame

    def isOpened(self) -> bool:  # noqa: N802 - cv2.VideoWriter's name
        return True

    def write(self, rgb: np.ndarray) -> None:
        for packet in self._stream.encode(self._frame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")):
            self._container.mux(packet)

    def release(self) -> None:
        if self._container is None:
            return
        try:
            for packet in self._stream.encode():
                self._container.mux(packet)
        finally:
            self._container.close()
            self._container = None


def h264_available() -> bool:
    """Whether PyAV with libx264 is installed (the default mp4/mov encoder; else OpenCV's ``mp4v``)."""
    try:
        import av  # noqa: PLC0415

        av.codec.Codec("libx264", "w")
    except Exception:  # noqa: BLE001 - any import or codec lookup failure means "not available"
        return False
    return True


class VideoWriter:
    """Writes uint8 RGB frames to an mp4 (or avi/mov/mkv) at a given fps, atomically.

    Codecs: H.264 (``h264``: libx264 through PyAV, yuv420p, CRF 18; playable everywhere) for mp4/mov when
    PyAV is installed, else OpenCV's MPEG-4 part 2 (``mp4v``); Motion JPEG for avi, lossless FFV1 for mkv.

    The file appears at ``path`` only after :meth:`close` succeeds; leaving a ``with`` block through an
    exception deletes the partial output. All frames must have the size of the first one. The encoders
    need even frame sizes (they would silently drop an odd last row or column), so an odd height or
    width is padded by repeating the last row or column: :attr:`size` is the size written.
    """

    def __init__(self, path: str | os.PathLike, fps: float, codec: str | None = None):
        self.path = os.fspath(path)
        ext = os.path.splitext(self.path)[1].lower()
        if ext not in (".mp4", ".mov", ".m4v", ".avi", ".mkv"):
            raise UserError(f"unsupported video extension {ext!r} (use .mp4, .mov, .avi or .mkv)", self.path)
        if not fps or fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.fps = float(fps)
        self.codec = codec or {".avi": "MJPG", ".mkv": "FFV1"}.get(ext, "h264" if h264_available() else "mp4v")
        self._atomic = atomic_output(self.path)
        self._tmp = None
        self._writer = None
        self._size = None
        self.num_frames = 0

    @property
    def size(self) -> tuple[int, int] | None:
        """``(height, width)`` of the written frames (after even padding), once a frame was written."""
        return None if self._size is None else (self._size[1] + self._size[1] % 2, self._size[0] + self._size[0] % 2)

    def write(self, frame: np.ndarray) -> None:
        frame = _as_rgb8(frame)
        h, w = frame.shape[:2]
        if self._writer is None:
            self._tmp = self._atomic.__enter__()
            self._size = (w, h)
            even = (w + w % 2, h + h % 2)
            if self.codec == "h264":
                self._writer = _H264Writer(self._tmp, self.fps, even)
            else:
                self._writer = cv2.VideoWriter(self._tmp, cv2.VideoWriter_fourcc(*self.codec), self.fps, even)
            if not self._writer.isOpened():
                self.abort()
                raise UserError(f"OpenCV cannot write {self.codec} video here", self.path)
        elif (w, h) != self._size:
            raise ValueError(f"frame size {(w, h)} differs from the first frame's {self._size}")
        if h % 2 or w % 2:
            frame = cv2.copyMakeBorder(frame, 0, h % 2, 0, w % 2, cv2.BORDER_REPLICATE)
        self._writer.write(frame if self.codec == "h264" else cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        self.num_frames += 1

    def write_many(self, frames: Iterable[np.ndarray]) -> None:
        for frame in frames:
            self.write(frame)

    def close(self) -> None:
        """Finishes the file and moves it into place."""
        if self._writer is None:
            raise ValueError(f"{self.path}: no frames were written")
        self._writer.release()
        self._writer = None
        self._atomic.__exit__(None, None, None)

    def abort(self) -> None:
        """Discards everything written so far."""
        if self._writer is not None:
            self._writer.release()
            self._writer = None
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(self._tmp)
            self._tmp = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_video(path: str | os.PathLike, frames: Iterable[np.ndarray], fps: float) -> int:
    """Writes frames (an array ``(T, H, W, 3)`` or any iterable of frames) to ``path``; returns the count."""
    with VideoWriter(path, fps) as writer:
        writer.write_many(frames)
    return writer.num_frames
