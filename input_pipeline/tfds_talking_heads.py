"""The ``talking_heads`` TFDS builder: a prepared dataset exposed through TFDS (ArrayRecord files).

Build it from a folder written by ``launch/prepare_data.py`` (its ``train``/``eval`` splits)::

    from input_pipeline import tfds_talking_heads
    tfds_talking_heads.build(prepared_dir="data/heads", data_dir="data/tfds")
    # or: python launch/prepare_data.py ... --output=data/heads --tfds_dir=data/tfds

and read it back without TensorFlow, e.g. with ``tfds.data_source("talking_heads", data_dir=...)``, or
point a training config's ``data.path`` at ``data_dir``; Grain reads the TFDS data source directly.
Each example is one clip: ``record`` holds the serialized :class:`input_pipeline.schema.ClipRecord`
(encoded frames, fps, boxes, metadata) and ``clip_id``/``num_frames``/``fps`` are queryable fields.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from input_pipeline import building, schema


class TalkingHeads(tfds.core.GeneratorBasedBuilder):
    """Cropped talking-head clips prepared by portrait-jax."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Clip records of schema version 1."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass a folder written by launch/prepare_data.py as the manual_dir."

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Talking-head clips (encoded frames, fps, per-frame face boxes) for portrait-jax.",
            features=tfds.features.FeaturesDict({
                "record": tfds.features.Tensor(shape=(), dtype=np.object_),
                "clip_id": tfds.features.Text(),
                "num_frames": tfds.features.Scalar(dtype=np.int32),
                "fps": tfds.features.Scalar(dtype=np.float32),
            }),
        )

    def _split_generators(self, dl_manager):
        prepared = os.fspath(dl_manager.manual_dir)
        info = building.load_info(prepared)
        return {split: self._generate_examples(building.shard_paths(prepared, split))
                for split, names in info["shards"].items() if names}

    def _generate_examples(self, paths):
        from array_record.python.array_record_data_source import ArrayRecordDataSource  # noqa: PLC0415

        for path in paths:
            source = ArrayRecordDataSource([path])
            for i in range(len(source)):
                data = source[i]
                record = schema.deserialize(data)
                key = record.meta.get("clip_id", f"{os.path.basename(path)}:{i}")
                yield key, {"record": data, "clip_id": key, "num_frames": record.num_frames,
                            "fps": np.float32(record.fps)}


def build(prepared_dir: str, data_dir: str) -> TalkingHeads:
    """Builds (or reuses) the TFDS version of a prepared dataset under ``data_dir``."""
    builder = TalkingHeads(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=prepared_dir))
    return builder
