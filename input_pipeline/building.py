"""Building talking-head datasets: videos (or synthetic clips) -> cropped clips -> ArrayRecord shards.

Output directory layout (read back by :mod:`input_pipeline.pipeline`)::

    DIR/train-00000.array_record   one serialized ClipRecord (input_pipeline.schema) per record
    DIR/eval-00000.array_record    held-out clips of the same shard group (absent when none)
    DIR/.done/shard-00000.json     completion marker: counts and skipped inputs of that shard
    DIR/inputs.json                the input list, to refuse mixing datasets in one directory
    DIR/dataset_info.json          summary: resolution, schema version, clip counts, shards, errors

Inputs are split into shard groups (``videos_per_shard`` consecutive inputs of the sorted list); a group's
files are written under temporary names and renamed, then its marker is written, so an interrupted run
restarts at the first unfinished shard and never reads a half-written one. A video that cannot be read or
has no face is reported and skipped; it never stops the run. Held-out ("eval") videos are chosen by a
stable hash of their path (:func:`assign_splits`), so the split does not depend on the input order; a
small dataset (two or more videos) always gets at least one eval video and keeps at least one for training.

Per video: pass 1 streams the frames through BlazeFace (every ``detect_every``-th frame, the rest
interpolated); pass 2 streams them again, cuts the video into clips of at most ``clip_length`` frames,
crops each clip with one stable square window (:func:`input_pipeline.crops.stable_clip_window`), resizes
to ``resolution`` and encodes the frames. Only boxes and one clip's encoded frames are held in memory.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator

import numpy as np
from tqdm import tqdm

from input_pipeline import crops, schema
from input_pipeline.errors import UserError
from input_pipeline.video_io import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, VideoReader, atomic_output, encode_image

DATASET_INFO = "dataset_info.json"
SPLITS = ("train", "eval")
_DONE_DIR = ".done"


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    resolution: int = 512
    clip_length: int = 128          # frames per clip (longer videos are cut into several clips)
    min_clip_length: int = 8        # shorter tails are dropped
    detect_every: int = 1           # run the detector on every n-th frame, interpolate the rest
    detector_model: str = "short"   # BlazeFace: short, full or auto
    on_missing: str = "error"       # no face in a video: "error" (skip the video) or "center" (centred box)
    crop_scale: float = 2.0         # crop side / median face size (see crops.stable_clip_window)
    image_format: str = "jpeg"
    quality: int = 95
    eval_fraction: float = 0.05
    max_frames: int | None = None   # per video; None = all


def shard_path(directory: str, split: str, index: int) -> str:
    return os.path.join(directory, f"{split}-{index:05d}.array_record")


def _marker_path(directory: str, index: int) -> str:
    return os.path.join(directory, _DONE_DIR, f"shard-{index:05d}.json")


def _split_hash(name: str) -> float:
    return int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def assign_splits(names: list[str], eval_fraction: float) -> set[str]:
    """The names held out for evaluation: those whose path hash falls below ``eval_fraction``.

    With two or more names and ``0 < eval_fraction < 1`` both splits are non-empty: when no hash falls
    below the fraction (likely for a handful of videos at the default 5 %), the name with the smallest
    hash is held out; when every name would be held out, the one with the largest hash trains. The rule
    depends only on the set of names, so it is deterministic and a resumed build makes the same split.
    """
    if eval_fraction <= 0:
        return set()
    if eval_fraction >= 1:
        return set(names)
    held = {n for n in names if _split_hash(n) < eval_fraction}
    ranked = sorted(set(names), key=lambda n: (_split_hash(n), n))
    if len(ranked) >= 2:
        if not held:
            held = {ranked[0]}
        elif len(held) == len(ranked):
            held.discard(ranked[-1])
    return held


def resolve_inputs(spec: str) -> list[str]:
    """Videos named by ``spec``: a video file, a folder (searched recursively), a glob, or a comma list.

    A folder that holds image files (and no videos) directly is taken as one video given as frames.
    """
    found: list[str] = []
    for part in [p for p in spec.split(",") if p.strip()]:
        part = os.path.expanduser(part.strip())
        matches = sorted(glob.glob(part, recursive=True)) if glob.has_magic(part) else [part]
        if not matches:
            raise UserError("no files match this pattern", part)
        for path in matches:
            if os.path.isdir(path):
                found.extend(_videos_in_folder(path))
            elif os.path.isfile(path):
                found.append(path)
            else:
                raise UserError("no such file or folder", path)
    videos = sorted(dict.fromkeys(os.path.abspath(p) for p in found))
    if not videos:
        raise UserError("no videos found (expected video files or folders of frames)", spec)
    return videos


def _videos_in_folder(folder: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        vids = [os.path.join(root, f) for f in sorted(files) if os.path.splitext(f)[1].lower() in VIDEO_EXTENSIONS]
        imgs = [f for f in files if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
        out.extend(vids)
        if imgs and not vids and root != folder:
            out.append(root)  # a folder of frames
    if not out and any(os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS for f in os.listdir(folder)):
        out.append(folder)
    return out


# ------------------------------------------------------------------------------------- per video
def video_clips(path: str, options: BuildOptions, detector, name: str | None = None) -> Iterator[schema.ClipRecord]:
    """Cropped clips of one video as records (two streaming passes; see the module docstring)."""
    from input_pipeline.face_detection import detect_video  # noqa: PLC0415 - TensorFlow loads lazily

    name = name or os.path.basename(path)
    reader = VideoReader(path, max_frames=options.max_frames)
    info = reader.info
    boxes, found = detect_video(detector, reader, every=options.detect_every,
                                on_missing=options.on_missing, name=path)
    total = len(boxes)
    starts = list(range(0, total, options.clip_length))
    with VideoReader(path, max_frames=options.max_frames) as reader:
        frames_iter = iter(reader)
        for clip_index, start in enumerate(starts):
            stop = min(start + options.clip_length, total)
            if stop - start < options.min_clip_length:
                break
            clip_boxes = boxes[start:stop]
            x0, y0, x1, y1 = crops.stable_clip_window(clip_boxes, info.height, info.width, options.crop_scale)
            scale = options.resolution / float(x1 - x0)
            encoded = []
            for _ in range(stop - start):
                frame = next(frames_iter)
                crop = crops.resize(frame[y0:y1, x0:x1], options.resolution)
                encoded.append(encode_image(crop, options.image_format, options.quality))
            out_boxes = (clip_boxes - np.array([x0, y0, x0, y0], np.float32)) * scale
            meta = {
                "clip_id": f"{name}#{clip_index}", "source": name, "source_fps": info.fps,
                "source_size": [info.height, info.width], "start_frame": start,
                "crop_window": [x0, y0, x1, y1], "face_found_fraction": float(found[start:stop].mean()),
                "detector": getattr(detector, "model", "?"),
            }
            yield schema.ClipRecord(frames=encoded, fps=info.fps, boxes=out_boxes, height=options.resolution,
                                    width=options.resolution, image_format=options.image_format, meta=meta)


def synthetic_clip_record(index: int, options: BuildOptions, num_frames: int, seed: int = 0) -> schema.ClipRecord:
    """Synthetic clip ``index`` (deterministic in ``seed`` and ``index``) as a record with ground truth."""
    from input_pipeline import synthetic  # noqa: PLC0415

    clip = synthetic.make_clip(seed=_mix_seed(seed, index), num_frames=num_frames, size=options.resolution)
    meta = {"clip_id": f"synthetic-{index:06d}", "source": "synthetic", "seed": seed, "index": index,
            "motion_names": list(synthetic.MOTION_NAMES), "identity_names": list(synthetic.IDENTITY_NAMES)}
    return schema.ClipRecord.from_frames(clip.frames, clip.fps, clip.boxes, image_format=options.image_format,
                                         quality=options.quality, meta=meta,
                                         arrays={"motion": clip.motion, "identity": clip.identity,
                                                 "landmarks": clip.landmarks})


def _mix_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


# -------------------------------------------------------------------------------------- writing
def _write_array_record(path: str, records: list[bytes]) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter  # noqa: PLC0415

    with atomic_output(path) as tmp:
        writer = ArrayRecordWriter(tmp, "group_size:1")
        try:
            for rec in records:
                writer.write(rec)
        finally:
            writer.close()


def _check_inputs_file(directory: str, inputs: list[str], kind: dict) -> None:
    """Refuses to continue a directory that was prepared from other inputs or options."""
    path = os.path.join(directory, "inputs.json")
    current = {"kind": kind, "inputs": inputs}
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        if previous != current:
            raise UserError("this output folder was prepared from other inputs or options; "
                            "use a new --output folder (or delete this one)", directory)
        return
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        json.dump(current, f, indent=1)


def _build(directory: str, groups: list[list], make_records: Callable, kind: dict, inputs_key: list[str],
           desc: str, progress: bool = True) -> dict:
    """Writes every shard group that has no completion marker yet; returns the dataset summary."""
    os.makedirs(os.path.join(directory, _DONE_DIR), exist_ok=True)
    _check_inputs_file(directory, inputs_key, kind)
    total_units = sum(len(g) for g in groups)
    bar = tqdm(total=total_units, desc=desc, unit=kind.get("unit", "video"), disable=not progress)
    for index, group in enumerate(groups):
        marker = _marker_path(directory, index)
        if os.path.exists(marker):
            bar.update(len(group))
            continue
        by_split: dict[str, list[bytes]] = {s: [] for s in SPLITS}
        units = {s: 0 for s in SPLITS}    # videos (or synthetic clips) that gave each split a clip
        errors = []
        for unit in group:
            try:
                splits = set()
                for split, record in make_records(unit):
                    by_split[split].append(schema.serialize(record))
                    splits.add(split)
                for split in splits:
                    units[split] += 1
            except UserError as e:
                errors.append(str(e))
                tqdm.write(f"skipped: {e}", file=sys.stderr)
            except Exception as e:  # noqa: BLE001 - a bad input must not stop the whole run
                msg = f"{unit}: {type(e).__name__}: {e}"
                errors.append(msg)
                tqdm.write(f"skipped: {msg}", file=sys.stderr)
            bar.update(1)
            bar.set_postfix(clips=sum(len(v) for v in by_split.values()), shard=index)
        for split, records in by_split.items():
            if records:
                _write_array_record(shard_path(directory, split, index), records)
        with atomic_output(marker) as tmp, open(tmp, "w") as f:
            json.dump({"counts": {s: len(v) for s, v in by_split.items()}, "units": units, "errors": errors}, f)
    bar.close()
    return _write_info(directory, len(groups), kind)


def _write_info(directory: str, num_shards: int, kind: dict) -> dict:
    counts = {s: 0 for s in SPLITS}
    sources = {s: 0 for s in SPLITS}
    shards = {s: [] for s in SPLITS}
    errors = []
    for index in range(num_shards):
        with open(_marker_path(directory, index)) as f:
            marker = json.load(f)
        errors.extend(marker["errors"])
        for split in SPLITS:
            sources[split] += marker.get("units", {}).get(split, 0)
            if marker["counts"][split]:
                counts[split] += marker["counts"][split]
                shards[split].append(os.path.basename(shard_path(directory, split, index)))
    info = {"format": "portrait-jax talking heads", "schema_version": schema.SCHEMA_VERSION,
            "resolution": kind["resolution"], "source": kind["source"], "num_clips": counts,
            "num_sources": sources, "shards": shards, "skipped": errors, "options": kind}
    with atomic_output(os.path.join(directory, DATASET_INFO)) as tmp, open(tmp, "w") as f:
        json.dump(info, f, indent=1)
    return info


def prepare_videos(inputs: list[str], directory: str, options: BuildOptions = BuildOptions(), *,
                   videos_per_shard: int = 16, progress: bool = True, detector=None) -> dict:
    """Builds (or finishes building) a dataset from real videos; returns the dataset summary."""
    if not inputs:
        raise UserError("no input videos", directory)
    common = os.path.commonpath(inputs) if len(inputs) > 1 else os.path.dirname(inputs[0])
    names = {p: os.path.relpath(p, common) for p in inputs}
    held_out = assign_splits(list(names.values()), options.eval_fraction)
    state = {"detector": detector}

    def make_records(path):
        if state["detector"] is None:
            from input_pipeline.face_detection import FaceDetector  # noqa: PLC0415
            state["detector"] = FaceDetector(options.detector_model)
        split = "eval" if names[path] in held_out else "train"
        for record in video_clips(path, options, state["detector"], name=names[path]):
            yield split, record

    groups = [inputs[i:i + videos_per_shard] for i in range(0, len(inputs), videos_per_shard)]
    kind = {"source": "videos", "resolution": options.resolution, "unit": "video",
            **{k: v for k, v in dataclasses.asdict(options).items() if k != "resolution"}}
    return _build(directory, groups, make_records, kind, inputs, "preparing videos", progress)


def prepare_synthetic(num_clips: int, directory: str, options: BuildOptions = BuildOptions(), *,
                      frames_per_clip: int = 32, seed: int = 0, clips_per_shard: int = 64,
                      progress: bool = True) -> dict:
    """Builds a dataset of ``num_clips`` synthetic talking-head clips (ground-truth boxes, no detector).

    The first ``ceil(num_clips * eval_fraction)`` clips are held out for evaluation (at most
    ``num_clips - 1`` of them when there are two or more, so the training split is never empty).
    """
    if num_clips < 1:
        raise UserError(f"--synthetic must be >= 1, got {num_clips}")
    num_eval = math.ceil(num_clips * options.eval_fraction) if options.eval_fraction > 0 else 0
    if num_clips >= 2 and options.eval_fraction < 1:
        num_eval = min(num_eval, num_clips - 1)

    def make_records(index):
        split = "eval" if index < num_eval else "train"
        yield split, synthetic_clip_record(index, options, frames_per_clip, seed)

    indices = list(range(num_clips))
    groups = [indices[i:i + clips_per_shard] for i in range(0, num_clips, clips_per_shard)]
    kind = {"source": "synthetic", "resolution": options.resolution, "unit": "clip", "seed": seed,
            "frames_per_clip": frames_per_clip, "image_format": options.image_format,
            "quality": options.quality, "eval_fraction": options.eval_fraction}
    return _build(directory, groups, make_records, kind, [f"synthetic:{num_clips}"], "synthesizing clips", progress)


def load_info(directory: str) -> dict:
    """The ``dataset_info.json`` of a prepared dataset directory."""
    path = os.path.join(directory, DATASET_INFO)
    if not os.path.exists(path):
        raise UserError(f"not a prepared dataset (no {DATASET_INFO}; run launch/prepare_data.py)", directory)
    with open(path) as f:
        return json.load(f)


def shard_paths(directory: str, split: str) -> list[str]:
    """The ArrayRecord files of one split of a prepared dataset."""
    info = load_info(directory)
    if split not in info["shards"]:
        raise UserError(f"unknown split {split!r} (have {sorted(info['shards'])})", directory)
    paths = [os.path.join(directory, name) for name in info["shards"][split]]
    for p in paths:
        if not os.path.exists(p):
            raise UserError("shard listed in dataset_info.json is missing", p)
    return paths

