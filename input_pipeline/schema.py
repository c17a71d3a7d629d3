"""The record schema of talking-head datasets: one record per clip, in one self-describing byte string.

A record holds the clip's encoded frames (JPEG or PNG bytes), its fps, per-frame face boxes in crop
coordinates (``[x0, y0, x1, y1]`` pixels), free-form source metadata, and optional per-frame or per-clip
arrays (synthetic data stores its ground-truth ``motion`` (T, D) and ``identity`` (D,) here).

Layout (version 1)::

    b"PJCLIP\\x00\\x01" | uint32 little-endian header length | JSON header | payload

The JSON header lists the frame byte lengths and, for every array, its name, dtype, shape and byte
length; the payload is the frames followed by the arrays' raw little-endian bytes, in header order.
Frames are decoded lazily, so reading two frames of a 200-frame clip decodes two JPEGs. Everything is
plain JSON and bytes: no pickle, so reading a dataset never executes code.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any

import numpy as np

from input_pipeline.video_io import decode_image, encode_image

MAGIC = b"PJCLIP\x00\x01"
SCHEMA_VERSION = 1
IMAGE_FORMATS = ("jpeg", "png")


class SchemaError(ValueError):
    """A record that is not a valid talking-head clip record."""


@dataclasses.dataclass
class ClipRecord:
    """One clip of a talking-head dataset.

    Attributes:
      frames: encoded frame images (JPEG or PNG bytes), one per frame.
      fps: frame rate of the clip.
      boxes: float32 (T, 4) face box per frame, in pixels of the stored frames.
      height, width: size of the stored frames.
      image_format: ``"jpeg"`` or ``"png"``.
      meta: JSON-serialisable metadata (source file, first frame index, crop window in the source, ...).
      arrays: optional extra arrays (e.g. ``motion`` (T, D), ``identity`` (D,)).
    """

    frames: list[bytes]
    fps: float
    boxes: np.ndarray
    height: int
    width: int
    image_format: str = "jpeg"
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    arrays: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.boxes = np.asarray(self.boxes, np.float32).reshape(-1, 4)
        if len(self.boxes) != len(self.frames):
            raise SchemaError(f"{len(self.frames)} frames but {len(self.boxes)} boxes")
        if self.image_format not in IMAGE_FORMATS:
            raise SchemaError(f"image_format must be one of {IMAGE_FORMATS}, got {self.image_format!r}")

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    def decode_frame(self, index: int) -> np.ndarray:
        """Frame ``index`` as uint8 RGB ``(H, W, 3)``."""
        return decode_image(self.frames[index], f"frame {index} of clip {self.meta.get('clip_id', '?')}")

    def decode_frames(self, indices=None) -> np.ndarray:
        """Frames (all, or the given indices) as uint8 ``(k, H, W, 3)``."""
        indices = range(self.num_frames) if indices is None else indices
        return np.stack([self.decode_frame(int(i)) for i in indices])

    @classmethod
    def from_frames(cls, frames: np.ndarray, fps: float, boxes: np.ndarray, *, image_format: str = "jpeg",
                    quality: int = 95, meta: dict | None = None,
                    arrays: dict[str, np.ndarray] | None = None) -> ClipRecord:
        """Encodes uint8 ``(T, H, W, 3)`` frames into a record."""
        frames = np.asarray(frames)
        return cls(frames=[encode_image(f, image_format, quality) for f in frames], fps=float(fps),
                   boxes=boxes, height=int(frames.shape[1]), width=int(frames.shape[2]),
                   image_format=image_format, meta=dict(meta or {}), arrays=dict(arrays or {}))


def pack(magic: bytes, header: dict, blobs, arrays) -> bytes:
    """``magic | uint32 LE header length | JSON header | blobs | arrays``: the framing of this module's clip
    records and of :mod:`input_pipeline.latent_cache`'s frame records. ``header`` gets an ``arrays`` list
    (name, dtype, shape, byte length of every array, stored raw and little-endian in that order)."""
    specs, array_bytes = [], []
    for name, arr in arrays.items():
        arr = np.asarray(arr)
        arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
        data = arr.tobytes()
        specs.append({"name": name, "dtype": arr.dtype.str, "shape": list(arr.shape), "nbytes": len(data)})
        array_bytes.append(data)
    head = json.dumps({**header, "arrays": specs}, separators=(",", ":")).encode()
    return b"".join([magic, struct.pack("<I", len(head)), head, *blobs, *array_bytes])


def unpack(data: bytes, magic: bytes, version: int, *, name: str, blob_sizes: str | None = None,
           error: type[Exception] = SchemaError) -> tuple[dict, list[bytes], dict[str, np.ndarray]]:
    """``(header, blobs, arrays)`` of bytes written by :func:`pack`; ``blob_sizes`` names the header list of
    the blobs' byte lengths (None: no blobs). Anything malformed raises ``error`` naming the ``name``."""
    data = memoryview(data)
    if bytes(data[:len(magic)]) != magic:
        raise error(f"not a portrait-jax {name} (bad magic bytes)")
    try:
        (head_len,) = struct.unpack_from("<I", data, len(magic))
        pos = len(magic) + 4
        header = json.loads(bytes(data[pos:pos + head_len]))
        pos += head_len
        if header.get("version") != version:
            raise error(f"unsupported {name} version {header.get('version')}")
        blobs = []
        for n in header[blob_sizes] if blob_sizes else ():
            blobs.append(bytes(data[pos:pos + n]))
            pos += n
        arrays = {}
        for spec in header["arrays"]:
            raw = data[pos:pos + spec["nbytes"]]
            if len(raw) != spec["nbytes"]:
                raise error(f"{name} is truncated")
            arrays[spec["name"]] = np.frombuffer(raw, np.dtype(spec["dtype"])).reshape(spec["shape"]).copy()
            pos += spec["nbytes"]
    except (KeyError, TypeError, struct.error, json.JSONDecodeError) as e:
        raise error(f"corrupt {name} header: {e}") from e
    if pos != len(data):
        raise error(f"{name} has {len(data) - pos} trailing bytes")
    return header, blobs, arrays


def serialize(record: ClipRecord) -> bytes:
    """Encodes a record as bytes (see the module docstring for the layout)."""
    header = {"version": SCHEMA_VERSION, "fps": float(record.fps), "height": int(record.height),
              "width": int(record.width), "image_format": record.image_format,
              "frame_nbytes": [len(f) for f in record.frames], "meta": record.meta}
    arrays = {"boxes": record.boxes, **{k: np.asarray(v) for k, v in record.arrays.items()}}
    return pack(MAGIC, header, record.frames, arrays)


def deserialize(data: bytes) -> ClipRecord:
    """Decodes bytes written by :func:`serialize` (frames stay encoded until asked for)."""
    header, frames, arrays = unpack(data, MAGIC, SCHEMA_VERSION, name="clip record", blob_sizes="frame_nbytes")
    boxes = arrays.pop("boxes")
    return ClipRecord(frames=frames, fps=header["fps"], boxes=boxes, height=header["height"],
                      width=header["width"], image_format=header["image_format"], meta=header["meta"],
                      arrays=arrays)
