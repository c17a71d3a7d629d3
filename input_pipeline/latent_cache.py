"""The latent cache of a prepared dataset: the frozen X-NeMo encoders' outputs per frame, stored next to the
frames, so training can skip the VAE encoder and CLIP (``launch/prepare_data.py --cache-latents=CKPT``
writes it with :mod:`launch.cache_latents`; :func:`input_pipeline.pipeline.open_source` reads it).

Layout, beside the frame shards of :mod:`input_pipeline.building`::

    DIR/latents/train-00000.array_record   one latent record per clip, in the order of DIR/train-00000...
    DIR/latents/eval-00000.array_record
    DIR/latents/cache_info.json            written last: its presence means the cache is complete
    DIR/latents/build.json                 what the (possibly unfinished) build encodes with (resume check)

A latent record (``b"PJLATS\\x00\\x01" | uint32 LE header length | JSON header | payload``, like the clip
records: plain bytes, no pickle) holds the clip's ``clip_id`` and frame count (checked against the frame
record when read) and two per-frame arrays:

* ``moments`` ``(T, h, w, 2C)``: the VAE posterior of each frame at the dataset's resolution, mean then
  log-variance (already clipped to [-30, 20]) on the last axis, *unscaled* (multiply a draw by
  ``scaling_factor``), stored as ``moments_dtype`` (float16 by default: 2^-11 relative rounding, see
  README);
* ``clip_embeds`` ``(T, D)`` float32: CLIP's projected ``image_embeds`` of each frame (any frame can be
  the reference).

``cache_info.json`` records the schema version, resolution, latent shape ``(h, w, C)``, dtypes, the VAE
scaling factor, the CLIP input size, the source checkpoint, the shards with their record counts, and
sha256 fingerprints of the VAE encoder weights (``encoder`` + ``quant_conv``) and of the CLIP weights
(:func:`fingerprint`). :func:`check` refuses a cache that does not fit a run.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping

import numpy as np

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
class LatentRecord:
    """One clip's cached encoder outputs (numpy views over the record bytes; indexing copies)."""

    def __init__(self, clip_id: str, moments: np.ndarray, clip_embeds: np.ndarray):
        if len(moments) != len(clip_embeds):
            raise ValueError(f"{len(moments)} moments but {len(clip_embeds)} CLIP embeddings")
        self.clip_id, self.moments, self.clip_embeds = clip_id, moments, clip_embeds

    @property
    def num_frames(self) -> int:
        return len(self.moments)


def serialize(record: LatentRecord) -> bytes:
    arrays = {"moments": record.moments, "clip_embeds": record.clip_embeds}
    specs, payload = [], []
    for name, arr in arrays.items():
        arr = np.ascontiguousarray(arr, dtype=np.asarray(arr).dtype.newbyteorder("<"))
        data = arr.tobytes()
        specs.append({"name": name, "dtype": arr.dtype.str, "shape": list(arr.shape), "nbytes": len(data)})
        payload.append(data)
    head = json.dumps({"version": CACHE_VERSION, "clip_id": record.clip_id, "num_frames": record.num_frames,
                       "arrays": specs}, separators=(",", ":")).encode()
    return b"".join([MAGIC, struct.pack("<I", len(head)), head, *payload])


def deserialize(data: bytes) -> LatentRecord:
    data = memoryview(data)
    if bytes(data[:len(MAGIC)]) != MAGIC:
        raise ValueError("not a portrait-jax latent record (bad magic bytes)")
    (head_len,) = struct.unpack_from("<I", data, len(MAGIC))
    pos = len(MAGIC) + 4
    header = json.loads(bytes(data[pos:pos + head_len]))
    pos += head_len
    if header.get("version") != CACHE_VERSION:
        raise ValueError(f"unsupported latent record version {header.get('version')}")
    arrays = {}
    for spec in header["arrays"]:
        raw = data[pos:pos + spec["nbytes"]]
        if len(raw) != spec["nbytes"]:
            raise ValueError("latent record is truncated")
        arrays[spec["name"]] = np.frombuffer(raw, np.dtype(spec["dtype"])).reshape(spec["shape"])
        pos += spec["nbytes"]
    if pos != len(data):
        raise ValueError(f"latent record has {len(data) - pos} trailing bytes")
    return LatentRecord(header["clip_id"], arrays["moments"], arrays["clip_embeds"])


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


def shard_paths(directory: str, split: str) -> list[str]:
    """The latent shards of ``split``, in the order of the frame shards (each with as many records)."""
    info = load_info(directory)
    out = []
    for shard in info["shards"].get(split, []):
        path = os.path.join(cache_dir(directory), shard["file"])
        if not os.path.exists(path):
            raise UserError(f"latent shard listed in {CACHE_INFO} is missing; {fix_hint(directory)}", path)
        out.append(path)
    return out


class CachedRecordSource:
    """A frame source (``pipeline.RecordSource``) whose clips also carry their cached per-frame arrays
    ``latent_moments`` (T, h, w, 2C) and ``clip_embeds`` (T, D) in ``ClipRecord.arrays``."""

    def __init__(self, frames, latents, name: str, directory: str):
        if len(frames) != len(latents):
            raise UserError(f"the latent cache has {len(latents)} clips but the dataset {len(frames)} (the "
                            f"dataset changed after the cache was built); {fix_hint(directory)}", name)
        self._frames, self._latents, self._name, self._directory = frames, latents, name, directory

    def __len__(self) -> int:
        return len(self._frames)

    def __getitem__(self, index: int):
        clip = self._frames[index]
        try:
            lat = deserialize(self._latents[index])
        except (ValueError, KeyError, struct.error) as e:
            raise UserError(f"latent record {index}: {e}; {fix_hint(self._directory)}", self._name) from e
        clip_id = clip.meta.get("clip_id", "?")
        if lat.clip_id != clip_id or lat.num_frames != clip.num_frames:
            raise UserError(f"latent record {index} is of clip {lat.clip_id!r} ({lat.num_frames} frames), the "
                            f"dataset's of {clip_id!r} ({clip.num_frames}); {fix_hint(self._directory)}", self._name)
        clip.arrays["latent_moments"], clip.arrays["clip_embeds"] = lat.moments, lat.clip_embeds
        return clip

    def __repr__(self) -> str:
        return f"{self._frames!r} + latent cache"
