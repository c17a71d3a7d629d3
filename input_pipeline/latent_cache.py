"""The latent cache of a prepared dataset: the frozen X-NeMo encoders' outputs per frame, stored next to the
frames, so training can skip the VAE encoder and CLIP (``launch/prepare_data.py --cache-latents=CKPT``
writes it with :mod:`launch.cache_latents`; :func:`input_pipeline.pipeline.open_source` reads it).

Layout, beside the frame shards of :mod:`input_pipeline.building`::

    DIR/latents/train-00000.array_record   one record per *frame*: the clips of DIR/train-00000... in their
                                           order, each clip's frames in order
    DIR/latents/eval-00000.array_record
    DIR/latents/cache_info.json            written last: its presence means the cache is complete
    DIR/latents/build.json                 what the (possibly unfinished) build encodes with (resume check)

One record per frame, so a pipeline reads only the frames it takes (an X-NeMo example uses F + 1 frames of a
clip; a record of a 512² frame is 67 KiB). A record (``b"PJLATS\x00\x01" | uint32 LE header length | JSON
header | payload``, like the clip records: plain bytes, no pickle) holds its clip's ``clip_id``, the frame
index and the clip's frame count (checked against the frame record when read), and two arrays:

* ``moments`` ``(h, w, 2C)``: the frame's VAE posterior at the dataset's resolution, mean then
  log-variance (already clipped to [-30, 20]) on the last axis, *unscaled* (multiply a draw by
  ``scaling_factor``), stored as ``moments_dtype`` (float16 by default: 2^-11 relative rounding, see
  README);
* ``clip_embed`` ``(D,)`` float32: CLIP's projected ``image_embeds`` of the frame (any frame can be the
  reference).

``cache_info.json`` records the schema version, resolution, latent shape ``(h, w, C)``, dtypes, the VAE
scaling factor, the CLIP input size, the source checkpoint, the shards with their record counts and
frames per clip (the clips' offsets), and sha256 fingerprints of the VAE encoder weights (``encoder`` +
``quant_conv``) and of the CLIP weights (:func:`fingerprint`). :func:`check` refuses a cache that does not
fit a run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping

import numpy as np

from input_pipeline import schema
from input_pipeline.errors import UserError

LATENTS_DIR = "latents"
CACHE_INFO = "cache_info.json"
BUILD_INFO = "build.json"
CACHE_VERSION = 1
MAGIC = b"PJLATS\x00\x01"
FORMAT = "portrait-jax latent cache"


def cache_dir(directory: str) -> str:
    return os.path.join(os.fspath(directory), LATENTS_DIR)


def info_path(directory: str) -> str:
    return os.path.join(cache_dir(directory), CACHE_INFO)


def exists(directory: str) -> bool:
    """Whether ``directory`` (a prepared dataset) has a complete latent cache."""
    return bool(directory) and os.path.exists(info_path(directory))


def fix_hint(directory: str) -> str:
    return (f"rebuild it with `python launch/prepare_data.py --output={directory} --cache-latents=<this run's "
            f"init.sd folder or checkpoint>` or delete {cache_dir(directory)} (or ignore it with "
            f"--config.data.use_latent_cache=False)")


# ------------------------------------------------------------------------------------------- records
def serialize(clip_id: str, frame: int, num_frames: int, moments: np.ndarray, clip_embed: np.ndarray) -> bytes:
    """One frame's record: its clip, its index in the clip, moments (h, w, 2C), CLIP embedding (D,)."""
    header = {"version": CACHE_VERSION, "clip_id": clip_id, "frame": int(frame), "num_frames": int(num_frames)}
    return schema.pack(MAGIC, header, (), {"moments": moments, "clip_embed": clip_embed})


def deserialize(data: bytes) -> tuple[dict, np.ndarray, np.ndarray]:
    """``(header, moments, clip_embed)`` of a record written by :func:`serialize` (ValueError if bad)."""
    header, _, arrays = schema.unpack(data, MAGIC, CACHE_VERSION, name="latent record", error=ValueError)
    return header, arrays["moments"], arrays["clip_embed"]


# ---------------------------------------------------------------------------------------- fingerprints
def _flatten(tree, prefix: str = ""):
    if isinstance(tree, Mapping):
        for key in tree:
            yield from _flatten(tree[key], f"{prefix}/{key}")
    elif isinstance(tree, (list, tuple)):
        for i, item in enumerate(tree):
            yield from _flatten(item, f"{prefix}/{i}")
    else:
        yield prefix, tree


def fingerprint(tree) -> str:
    """``sha256:<hex>`` over a nested dict of arrays: every leaf's path, dtype, shape and bytes, in sorted
    path order (so it does not depend on dict order). Leaves must be host arrays (numpy, or jax arrays that
    ``np.asarray`` can fetch)."""
    h = hashlib.sha256()
    for path, leaf in sorted(_flatten(tree), key=lambda item: item[0]):
        arr = np.ascontiguousarray(np.asarray(leaf))
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        h.update(f"{path}|{arr.dtype.str}|{list(arr.shape)}|".encode())
        h.update(arr.tobytes())
    return "sha256:" + h.hexdigest()


# -------------------------------------------------------------------------------------------- reading
def load_info(directory: str) -> dict:
    path = info_path(directory)
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"unreadable latent cache info ({type(e).__name__}: {e}); {fix_hint(directory)}", path) from e
    if info.get("format") != FORMAT or info.get("version") != CACHE_VERSION:
        raise UserError(f"not a version-{CACHE_VERSION} latent cache (format {info.get('format')!r}, version "
                        f"{info.get('version')!r}); {fix_hint(directory)}", path)
    return info


def check(directory: str, *, resolution: int | None = None, latent_shape=None,
          fingerprints: Mapping[str, str] | None = None) -> dict:
    """The cache info of ``directory`` if the cache fits a run, else :class:`UserError` (one line: the cache
    file, the problem, the fix). ``fingerprints``: ``{"vae": ..., "clip": ...}`` of the run's frozen weights."""
    info = load_info(directory)
    path = info_path(directory)
    problems = []
    if resolution is not None and int(info["resolution"]) != int(resolution):
        problems.append(f"it was built at {info['resolution']}² but this run trains at {resolution}²")
    if latent_shape is not None and list(info["latent_shape"]) != [int(s) for s in latent_shape]:
        problems.append(f"its latents are {tuple(info['latent_shape'])} but this run's VAE makes "
                        f"{tuple(int(s) for s in latent_shape)}")
    other = [label for name, label in (("vae", "VAE encoder"), ("clip", "CLIP"))
             if fingerprints is not None and name in fingerprints
             and info.get(f"{name}_fingerprint") != fingerprints[name]]
    if other:
        problems.append(f"it was built with other {' and '.join(other)} weights ({info.get('source', '?')}) than "
                        "this run's")
    if problems:
        raise UserError(f"latent cache does not fit this run: {'; '.join(problems)}; {fix_hint(directory)}", path)
    return info


def describe(info: dict) -> str:
    h, w, c = info["latent_shape"]
    return (f"{info['resolution']}² frames, VAE moments ({h}, {w}, {2 * c}) {info['moments_dtype']} + CLIP "
            f"embedding ({info['clip_embed_dim']},) per frame, {info['bytes_per_frame']:,} bytes per frame, "
            f"from {info['source']}")


def shard_paths(directory: str, split: str) -> tuple[list[str], np.ndarray]:
    """The latent shards of ``split`` (in the order of its frame shards) and the clip offsets into their
    concatenated frame records: clip ``i``'s frames are records ``offsets[i]:offsets[i + 1]``."""
    info = load_info(directory)
    paths, counts = [], []
    for shard in info["shards"].get(split, []):
        path = os.path.join(cache_dir(directory), shard["file"])
        if not os.path.exists(path):
            raise UserError(f"latent shard listed in {CACHE_INFO} is missing; {fix_hint(directory)}", path)
        paths.append(path)
        counts.extend(shard["frames_per_clip"])
    return paths, np.concatenate([[0], np.cumsum(np.asarray(counts, np.int64))]).astype(np.int64)


class _ClipLatents:
    """One clip's cached frames, read lazily: only the frames a pipeline takes are read (one record each)."""

    def __init__(self, records, start: int, num_frames: int, clip_id: str, name: str, directory: str,
                 moments_shape, moments_dtype, embed_dim: int):
        self._records, self._start, self._n = records, start, num_frames
        self._clip_id, self._name, self._directory = clip_id, name, directory
        self._last = None
        self.moments = _Frames(self, 0, (num_frames, *moments_shape), moments_dtype)
        self.clip_embeds = _Frames(self, 1, (num_frames, embed_dim), np.float32)

    def read(self, indices) -> tuple[np.ndarray, np.ndarray]:
        key = tuple(int(i) for i in np.atleast_1d(indices))
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        if any(not 0 <= i < self._n for i in key):
            raise IndexError(f"frame index out of range for a clip of {self._n} frames: {key}")
        moments, embeds = [], []
        for i, data in zip(key, self._records.__getitems__([self._start + i for i in key]), strict=True):
            try:
                header, m, e = deserialize(data)
            except ValueError as err:
                raise UserError(f"latent record {self._start + i}: {err}; {fix_hint(self._directory)}",
                                self._name) from err
            if header["clip_id"] != self._clip_id or header["frame"] != i or header["num_frames"] != self._n:
                raise UserError(f"latent record {self._start + i} is frame {header['frame']} of clip "
                                f"{header['clip_id']!r}, expected frame {i} of {self._clip_id!r} (the dataset "
                                f"changed after the cache was built); {fix_hint(self._directory)}", self._name)
            moments.append(m)
            embeds.append(e)
        self._last = (key, (np.stack(moments), np.stack(embeds)))
        return self._last[1]


class _Frames:
    """A lazy ``(T, ...)`` per-frame array of a clip: ``x[indices]`` reads those frames' records."""

    def __init__(self, parent: _ClipLatents, which: int, shape, dtype):
        self._parent, self._which, self.shape, self.dtype = parent, which, tuple(shape), np.dtype(dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, indices):
        if isinstance(indices, slice):
            indices = np.arange(self.shape[0])[indices]
        out = self._parent.read(indices)[self._which]
        return out[0] if np.ndim(indices) == 0 else out


class CachedRecordSource:
    """A frame source (``pipeline.RecordSource``) whose clips also carry their cached per-frame arrays
    ``latent_moments`` (T, h, w, 2C) and ``clip_embeds`` (T, D) in ``ClipRecord.arrays``: lazy arrays that
    read only the frames indexed (``take_frames``), one small record each."""

    def __init__(self, frames, latents, offsets: np.ndarray, info: dict, name: str, directory: str):
        if len(frames) != len(offsets) - 1 or len(latents) != int(offsets[-1]):
            raise UserError(f"the latent cache has {len(offsets) - 1} clips ({len(latents)} frame records, "
                            f"{int(offsets[-1])} listed) but the dataset {len(frames)} (the dataset changed after "
                            f"the cache was built); {fix_hint(directory)}", name)
        self._frames, self._latents, self._offsets = frames, latents, offsets
        self._name, self._directory = name, directory
        h, w, c = info["latent_shape"]
        self._moments_shape, self._dtype, self._dim = (h, w, 2 * c), info["moments_dtype"], info["clip_embed_dim"]

    def __len__(self) -> int:
        return len(self._frames)

    def __getitem__(self, index: int):
        clip = self._frames[index]
        start, stop = int(self._offsets[index]), int(self._offsets[index + 1])
        clip_id = clip.meta.get("clip_id", "?")
        if stop - start != clip.num_frames:
            raise UserError(f"clip {index} ({clip_id!r}) has {clip.num_frames} frames, its latent cache "
                            f"{stop - start} (the dataset changed after the cache was built); "
                            f"{fix_hint(self._directory)}", self._name)
        lat = _ClipLatents(self._latents, start, stop - start, clip_id, self._name, self._directory,
                           self._moments_shape, self._dtype, self._dim)
        clip.arrays["latent_moments"], clip.arrays["clip_embeds"] = lat.moments, lat.clip_embeds
        return clip

    def __repr__(self) -> str:
        return f"{self._frames!r} + latent cache"


def read_clip(directory: str, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Clip ``index`` of ``split``'s cached ``(moments (T, h, w, 2C), clip_embeds (T, D))`` (all frames)."""
    from array_record.python.array_record_module import ArrayRecordReader  # noqa: PLC0415

    paths, offsets = shard_paths(directory, split)
    start, stop = int(offsets[index]), int(offsets[index + 1])
    moments, embeds, base = [], [], 0
    for path in paths:
        reader = ArrayRecordReader(path)
        try:
            n = int(reader.num_records())
            lo, hi = max(start - base, 0), min(stop - base, n)
            for k in range(lo, hi):
                _, m, e = deserialize(reader.read([k])[0])
                moments.append(m)
                embeds.append(e)
        finally:
            reader.close()
        base += n
    return np.stack(moments), np.stack(embeds)
