"""Grain input pipelines (Dataset API) over talking-head clips.

Sources (:func:`open_source`): a directory written by ``launch/prepare_data.py`` (ArrayRecord shards), a
TFDS data dir holding the ``talking_heads`` dataset, or, with an empty path, the built-in synthetic talking
heads rendered on the fly (:class:`SyntheticClipSource`). Every source yields clips with ``num_frames``,
``fps``, per-frame ``boxes`` and frame decoding of selected indices only.

Pipelines (``grain.MapDataset``, batched, per-process sharded, then :func:`make_iterator`):

* :func:`pairs_dataset` — two distinct frames of one clip, ``source`` and ``driving`` (LIA-X training,
  X-NeMo's GAN head), with their face boxes and, for synthetic data, ground-truth motion.
* :func:`clips_dataset` — ``num_frames`` consecutive frames (with a stride) plus a ``reference`` frame
  drawn from the same clip (X-NeMo stage 2).

Elements are dicts of numpy arrays; images stay uint8 RGB ``(H, W, 3)`` (conversion to float in [-1, 1]
happens at the model boundary). Order: source -> process shard -> shuffle (reshuffled every epoch) ->
repeat -> per-element random choice of frames (``random_map``, so deterministic per element and seed)
-> optional driving-frame augmentation -> batch. Iterators expose ``get_state``/``set_state`` and are
checkpointed with Orbax through ``grain.checkpoint.CheckpointSave/CheckpointRestore``; a restored
iterator continues with exactly the elements the original would have produced.
"""

from __future__ import annotations

import dataclasses
import os

import grain
import numpy as np

from input_pipeline import building, crops, latent_cache, schema
from input_pipeline.errors import UserError

TFDS_NAME = "talking_heads"


# ------------------------------------------------------------------------------------------ sources
class RecordSource(grain.sources.RandomAccessDataSource):
    """Wraps a random-access source of serialized records (bytes, or TFDS dicts) into ClipRecords."""

    def __init__(self, inner, key: str | None = None, name: str = "records"):
        self._inner = inner
        self._key = key
        self._name = name

    def __len__(self) -> int:
        return len(self._inner)

    def __getitem__(self, index: int) -> schema.ClipRecord:
        item = self._inner[index]
        data = item[self._key] if self._key else item
        try:
            return schema.deserialize(data)
        except schema.SchemaError as e:
            raise UserError(f"record {index}: {e}", self._name) from e

    def __repr__(self) -> str:
        return f"RecordSource({self._name!r}, {len(self)} clips)"


@dataclasses.dataclass(frozen=True)
class SyntheticClip:
    """A synthetic clip whose frames are rendered on demand (only the frames a pipeline asks for)."""

    seed: int
    num_frames: int
    size: int
    fps: float = 25.0

    def _spec(self):
        """Identity and motion exactly as ``synthetic.make_clip(seed, ...)`` draws them."""
        from input_pipeline import synthetic  # noqa: PLC0415
        identity_seed, motion_seed = synthetic.derive_seeds(self.seed)
        identity = synthetic.sample_identity(identity_seed)
        motion = synthetic.sample_motion(motion_seed, self.num_frames, fps=self.fps)
        return synthetic, identity, motion

    def take(self, indices) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        synthetic, identity, motion = self._spec()
        frames, boxes = [], []
        for i in indices:
            frame, box, _ = synthetic.render_frame(identity, motion[int(i)], self.size)
            frames.append(frame)
            boxes.append(box)
        extra = {"motion": motion[np.asarray(indices)], "identity": identity.to_vector()}
        return np.stack(frames), np.stack(boxes).astype(np.float32), extra


class SyntheticClipSource(grain.sources.RandomAccessDataSource):
    """``num_clips`` synthetic talking-head clips, each a distinct identity and motion (deterministic)."""

    def __init__(self, num_clips: int, num_frames: int, size: int, seed: int = 0, fps: float = 25.0):
        if num_clips < 1 or num_frames < 2:
            raise ValueError("need num_clips >= 1 and num_frames >= 2")
        self.num_clips, self.num_frames, self.size, self.seed, self.fps = num_clips, num_frames, size, seed, fps

    def __len__(self) -> int:
        return self.num_clips

    def __getitem__(self, index: int) -> SyntheticClip:
        seed = int(np.random.SeedSequence([self.seed, int(index)]).generate_state(1)[0])
        return SyntheticClip(seed=seed, num_frames=self.num_frames, size=self.size, fps=self.fps)

    def __repr__(self) -> str:
        return (f"SyntheticClipSource({self.num_clips} clips x {self.num_frames} frames at {self.fps:g} fps, "
                f"{self.size}px, seed {self.seed})")


def take_frames(clip, indices) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """``(frames (k, H, W, 3) uint8, boxes (k, 4), per-frame extras)`` of a clip at ``indices``."""
    indices = np.asarray(indices, np.int64)
    if isinstance(clip, SyntheticClip):
        return clip.take(indices)
    extra = {}
    for name, arr in clip.arrays.items():
        if arr.ndim >= 1 and arr.shape[0] == clip.num_frames and name != "landmarks":
            extra[name] = arr[indices]
        elif arr.ndim == 1:
            extra[name] = arr
    return clip.decode_frames(indices), clip.boxes[indices], extra


class EmptySplitError(UserError):
    """A prepared dataset has no clips in the requested split."""


def open_source(path: str | None, split: str = "train", *, synthetic_clips: int = 256,
                synthetic_frames: int = 32, synthetic_size: int = 256, synthetic_fps: float = 25.0, seed: int = 0,
                latents: bool = False):
    """Opens a clip source: a prepared ArrayRecord dir, a TFDS data dir, or (empty path) synthetic data.

    Synthetic data uses disjoint seeds for the ``train`` and ``eval`` splits (held-out identities). With
    ``latents`` and a latent cache in the prepared dir (:mod:`input_pipeline.latent_cache`; checking that it
    fits the run is the caller's job), every clip also carries its cached per-frame ``latent_moments`` and
    ``clip_embeds`` arrays, which :class:`MakeXNemoClip` then emits.
    """
    if not path:
        split_seed = {"train": seed, "eval": seed + 1_000_003}.get(split)
        if split_seed is None:
            raise UserError(f"unknown split {split!r} for synthetic data (use train or eval)")
        return SyntheticClipSource(synthetic_clips, synthetic_frames, synthetic_size, seed=split_seed,
                                   fps=synthetic_fps)
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise UserError("data path is not a folder", path)
    if os.path.exists(os.path.join(path, building.DATASET_INFO)):
        paths = building.shard_paths(path, split)
        if not paths:
            raise EmptySplitError(f"the {split!r} split of this dataset is empty", path)
        source = RecordSource(grain.sources.ArrayRecordDataSource(paths), name=f"{path} [{split}]")
        if latents and latent_cache.exists(path):
            cached, offsets = latent_cache.shard_paths(path, split)
            if [os.path.basename(p) for p in cached] != [os.path.basename(p) for p in paths]:
                raise UserError(f"the latent cache's {split!r} shards are not the dataset's (the dataset changed "
                                f"after the cache was built); {latent_cache.fix_hint(path)}",
                                latent_cache.info_path(path))
            source = latent_cache.CachedRecordSource(source, grain.sources.ArrayRecordDataSource(cached), offsets,
                                                     latent_cache.load_info(path), name=f"{path} [{split}]",
                                                     directory=path)
        return source
    if os.path.isdir(os.path.join(path, TFDS_NAME)):
        import tensorflow_datasets as tfds  # noqa: PLC0415

        from input_pipeline import tfds_talking_heads  # noqa: F401,PLC0415 - registers the builder
        try:
            inner = tfds.data_source(TFDS_NAME, split=split, data_dir=path)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"cannot open the TFDS {TFDS_NAME} split {split!r}: {e}", path) from e
        return RecordSource(inner, key="record", name=f"{path} [tfds {split}]")
    raise UserError(f"not a dataset folder (no {building.DATASET_INFO} and no {TFDS_NAME}/ inside); "
                    "run launch/prepare_data.py first", path)


# --------------------------------------------------------------------------------------- elements
def _fit(frames: np.ndarray, boxes: np.ndarray, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    h, w = frames.shape[1:3]
    if (h, w) == (resolution, resolution):
        return frames, boxes
    out = np.stack([crops.resize(f, resolution, resolution) for f in frames])
    scale = np.array([resolution / w, resolution / h] * 2, np.float32)
    return out, (boxes * scale).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class MakePair:
    """Picks two distinct frames of a clip (source, driving), optionally at most ``max_gap`` apart."""

    resolution: int
    max_gap: int = 0  # 0: any two frames
    augment: object | None = None  # input_pipeline.augment.AugmentConfig for the driving frame

    def __call__(self, item, rng: np.random.Generator):
        clip_index, clip = item
        n = clip.num_frames
        if n < 2:
            raise UserError(f"clip {clip_index} has {n} frame(s); pairs need at least 2")
        i = int(rng.integers(n))
        if self.max_gap and self.max_gap < n - 1:
            lo, hi = max(0, i - self.max_gap), min(n - 1, i + self.max_gap)
            j = int(rng.integers(lo, hi))
            j = j + 1 if j >= i else j
        else:
            j = int(rng.integers(n - 1))
            j = j + 1 if j >= i else j
        frames, boxes, extra = take_frames(clip, [i, j])
        frames, boxes = _fit(frames, boxes, self.resolution)
        driving, driving_box = frames[1], boxes[1]
        if self.augment is not None:
            from input_pipeline.augment import augment_driving  # noqa: PLC0415
            driving, driving_box = augment_driving(driving, driving_box, rng, self.augment, self.resolution)
        out = {"source": frames[0], "driving": np.ascontiguousarray(driving),
               "source_box": boxes[0], "driving_box": np.asarray(driving_box, np.float32),
               "clip_index": np.int32(clip_index), "frame_index": np.array([i, j], np.int32)}
        if "motion" in extra:
            out["source_motion"], out["driving_motion"] = extra["motion"][0], extra["motion"][1]
        return out


@dataclasses.dataclass(frozen=True)
class MakeClip:
    """Picks ``num_frames`` frames ``stride`` apart and a reference frame from the same clip."""

    resolution: int
    num_frames: int
    stride: int = 1

    def __call__(self, item, rng: np.random.Generator):
        clip_index, clip = item
        n = clip.num_frames
        span = (self.num_frames - 1) * self.stride + 1
        if n < span:
            raise UserError(f"clip {clip_index} has {n} frames; a window of {self.num_frames} frames with "
                            f"stride {self.stride} needs {span}")
        start = int(rng.integers(n - span + 1))
        ref = int(rng.integers(n))
        indices = [start + k * self.stride for k in range(self.num_frames)] + [ref]
        frames, boxes, extra = take_frames(clip, indices)
        frames, boxes = _fit(frames, boxes, self.resolution)
        out = {"frames": frames[:-1], "boxes": boxes[:-1], "reference": frames[-1], "reference_box": boxes[-1],
               "clip_index": np.int32(clip_index), "start": np.int32(start), "reference_index": np.int32(ref)}
        if "motion" in extra:
            out["motion"], out["reference_motion"] = extra["motion"][:-1], extra["motion"][-1]
        return out


@dataclasses.dataclass(frozen=True)
class MakeXNemoClip:
    """X-NeMo training examples: a reference frame and ``num_frames`` consecutive target frames of one clip
    (``num_frames=1``: the image/motion stages' pairs), each target frame's face crop for the motion
    encoder, the reference's own crop (the unconditional branch's motion) and its CLIP input.

    Keys: ``reference`` (H, W, 3) and ``frames`` (F, H, W, 3) uint8 at ``resolution`` (the clean loose
    frames: the denoising targets), ``motion`` (F, m, m, 3) uint8 at ``motion_size`` (face-centred crops,
    augmented with ``augment`` when given: colour jitter, scale, piecewise affine, crop jitter; otherwise
    the plain tight crop of ``tight`` x the face box), ``reference_motion`` (m, m, 3) (always plain),
    ``f_rts`` (F, 3) (dy, dx, s) of each frame's box against the reference's (``crops.relative_box_
    transform``), ``clip_pixels`` (c, c, 3) float32 (``xnemo_jax.clip.preprocess`` of the reference) and
    the indices. The reference is another frame of the clip than the targets where the clip allows it.

    Clips of a latent-cached source (``open_source(..., latents=True)``) also give ``reference_moments``
    (h, w, 2C) and ``frame_moments`` (F, h, w, 2C) (the VAE posterior moments, cache dtype) and
    ``clip_embeds`` (D,) float32 (the reference's CLIP embedding) in place of ``clip_pixels``; their frames
    must already be at ``resolution`` (the cache was encoded there).
    """

    resolution: int
    num_frames: int
    motion_size: int
    clip_size: int = 224
    augment: object | None = None   # input_pipeline.augment.AugmentConfig
    tight: float = 1.1              # plain motion crop side = tight x max(box w, h) (the official driving crop)

    def __call__(self, item, rng: np.random.Generator):
        from input_pipeline import augment as aug  # noqa: PLC0415
        from xnemo_jax import clip as clip_lib  # noqa: PLC0415

        clip_index, clip = item
        n, f = clip.num_frames, self.num_frames
        if n < f + 1:
            raise UserError(f"clip {clip_index} has {n} frames; X-NeMo examples of {f} frame(s) need {f + 1}")
        start = int(rng.integers(n - f + 1))
        ref = int(rng.integers(n - f))
        ref = ref + f if ref >= start else ref   # outside the target frames
        indices = list(range(start, start + f)) + [ref]
        frames, boxes, extra = take_frames(clip, indices)
        cached = "latent_moments" in extra
        if cached and frames.shape[1:3] != (self.resolution, self.resolution):
            raise UserError(f"clip {clip_index}: its latent cache is of {frames.shape[1]}² frames, the pipeline "
                            f"makes {self.resolution}² examples")
        frames, boxes = _fit(frames, boxes, self.resolution)
        plain = aug.AugmentConfig(p_color=0.0, p_scale=0.0, p_piecewise=0.0, crop_scale=(self.tight, self.tight),
                                  crop_jitter=0.0)
        motion = [aug.augment_driving(frames[k], boxes[k], rng, self.augment or plain, self.motion_size)[0]
                  for k in range(f)]
        reference_motion = aug.augment_driving(frames[-1], boxes[-1], rng, plain, self.motion_size)[0]
        out = {"reference": frames[-1], "frames": frames[:-1], "motion": np.stack(motion),
               "reference_motion": reference_motion,
               "f_rts": crops.relative_box_transform(boxes[-1], boxes[:-1]).astype(np.float32),
               "clip_index": np.int32(clip_index), "start": np.int32(start), "reference_index": np.int32(ref)}
        if cached:
            out.update(reference_moments=extra["latent_moments"][-1], frame_moments=extra["latent_moments"][:-1],
                       clip_embeds=np.asarray(extra["clip_embeds"][-1], np.float32))
        else:
            out["clip_pixels"] = clip_lib.preprocess(frames[-1], self.clip_size)[0]
        return out


def xnemo_dataset(source, *, batch_size: int, resolution: int, num_frames: int, motion_size: int,
                  clip_size: int = 224, augment=None, seed: int = 0, shuffle: bool = True,
                  num_epochs: int | None = None, shard_index: int | None = None,
                  shard_count: int | None = None) -> grain.MapDataset:
    """Batches of :class:`MakeXNemoClip` examples (``batch_size`` per process)."""
    ds = _base(source, seed=seed, shuffle=shuffle, num_epochs=num_epochs, shard_index=shard_index,
               shard_count=shard_count)
    ds = ds.random_map(MakeXNemoClip(resolution, num_frames, motion_size, clip_size, augment))
    return ds.batch(batch_size, drop_remainder=True)


def xnemo_eval_batches(source, *, batch_size: int, num_batches: int, seed: int = 0, **kwargs) -> list[dict]:
    """A fixed list of un-augmented :func:`xnemo_dataset` batches from held-out clips (same arguments, same
    batches: eval metrics are comparable across steps and runs)."""
    ds = xnemo_dataset(source, batch_size=batch_size, seed=seed, augment=None, **kwargs)
    return [ds[i] for i in range(num_batches)]


class _Indexed(grain.sources.RandomAccessDataSource):
    """``(index, clip)`` items, so pipelines can report which clip an element came from."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        return int(index), self.source[index]

    def __repr__(self) -> str:
        return repr(self.source)


def _base(source, *, seed: int, shuffle: bool, num_epochs: int | None,
          shard_index: int | None, shard_count: int | None) -> grain.MapDataset:
    if shard_index is None or shard_count is None:
        options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
        shard_index, shard_count = options.shard_index, options.shard_count
    ds = grain.MapDataset.source(_Indexed(source))
    usable = len(ds) // shard_count * shard_count
    if usable == 0:
        raise UserError(f"{len(ds)} clips cannot be split over {shard_count} processes", repr(source))
    ds = ds[:usable][shard_index::shard_count]
    ds = ds.seed(seed)
    if shuffle:
        ds = ds.shuffle()
    return ds.repeat(num_epochs)


def pairs_dataset(source, *, batch_size: int, resolution: int, seed: int = 0, shuffle: bool = True,
                  num_epochs: int | None = None, max_gap: int = 0, augment=None, drop_remainder: bool = True,
                  shard_index: int | None = None, shard_count: int | None = None) -> grain.MapDataset:
    """Batches of (source, driving) frame pairs; ``batch_size`` is per process.

    ``num_epochs=None`` repeats forever. Sharding defaults to this JAX process's share
    (``ShardByJaxProcess``); pass ``shard_index``/``shard_count`` to override.
    """
    ds = _base(source, seed=seed, shuffle=shuffle, num_epochs=num_epochs, shard_index=shard_index,
               shard_count=shard_count)
    ds = ds.random_map(MakePair(resolution, max_gap, augment))
    return ds.batch(batch_size, drop_remainder=drop_remainder)


def clips_dataset(source, *, batch_size: int, num_frames: int, resolution: int, stride: int = 1, seed: int = 0,
                  shuffle: bool = True, num_epochs: int | None = None, drop_remainder: bool = True,
                  shard_index: int | None = None, shard_count: int | None = None) -> grain.MapDataset:
    """Batches of ``num_frames``-frame windows plus a reference frame of the same clip (per process)."""
    ds = _base(source, seed=seed, shuffle=shuffle, num_epochs=num_epochs, shard_index=shard_index,
               shard_count=shard_count)
    ds = ds.random_map(MakeClip(resolution, num_frames, stride))
    return ds.batch(batch_size, drop_remainder=drop_remainder)


def make_iterator(ds: grain.MapDataset, *, worker_count: int = 0, worker_buffer_size: int = 2,
                  read_threads: int = 2, prefetch: int = 4):
    """An iterator with ``get_state``/``set_state``; ``worker_count > 0`` adds process workers."""
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch))
    if worker_count > 0:
        from absl import flags  # noqa: PLC0415
        if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; notebooks/tests never parse them
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                               per_worker_buffer_size=worker_buffer_size))
    return iter(it_ds)


# ------------------------------------------------------------------------------------------ evaluation
def eval_batches(source, *, batch_size: int, num_batches: int, resolution: int, seed: int = 0,
                 shard_index: int | None = None, shard_count: int | None = None) -> list[dict[str, np.ndarray]]:
    """A fixed list of (source, driving) pair batches from held-out clips (``batch_size`` per process).

    The same pairs come back for the same arguments, so eval metrics are comparable across steps and runs.
    Clips are visited in a seeded order; a small eval set is cycled to fill ``num_batches``.
    """
    ds = pairs_dataset(source, batch_size=batch_size, resolution=resolution, seed=seed, shuffle=True,
                       num_epochs=None, shard_index=shard_index, shard_count=shard_count)
    return [ds[i] for i in range(num_batches)]


def cross_identity_batches(*, batch_size: int, num_batches: int, resolution: int, seed: int = 0,
                           num_frames: int = 32, shard_index: int | None = None,
                           shard_count: int | None = None) -> list[dict[str, np.ndarray]]:
    """Synthetic cross-identity reenactment with ground truth (``batch_size`` per process).

    Each example takes a source frame of identity A, a driving frame of identity B (another person, other
    motion) and the *target*: identity A rendered with the driving frame's motion. A model that transfers
    motion without leaking B's appearance gets close to the target; copying the source or the driving
    frame does not.
    """
    from input_pipeline import synthetic  # noqa: PLC0415

    if shard_index is None or shard_count is None:
        options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
        shard_index, shard_count = options.shard_index, options.shard_count
    batches = []
    for b in range(num_batches):
        rows = {"source": [], "driving": [], "target": [], "source_motion": [], "driving_motion": []}
        for k in range(batch_size):
            example = (b * shard_count + shard_index) * batch_size + k
            ss = np.random.SeedSequence([seed, 7_919, example])
            id_a, id_b, mo_a, mo_b, pick = ss.generate_state(5, np.uint64)
            ident_a, ident_b = synthetic.sample_identity(int(id_a)), synthetic.sample_identity(int(id_b))
            motion_a = synthetic.sample_motion(int(mo_a), num_frames)
            motion_b = synthetic.sample_motion(int(mo_b), num_frames)
            rng = np.random.default_rng(int(pick))
            i, j = int(rng.integers(num_frames)), int(rng.integers(num_frames))
            rows["source"].append(synthetic.render_frame(ident_a, motion_a[i], resolution)[0])
            rows["driving"].append(synthetic.render_frame(ident_b, motion_b[j], resolution)[0])
            rows["target"].append(synthetic.render_frame(ident_a, motion_b[j], resolution)[0])
            rows["source_motion"].append(motion_a[i])
            rows["driving_motion"].append(motion_b[j])
        batches.append({k: np.stack(v) for k, v in rows.items()})
    return batches
