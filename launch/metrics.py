"""Metric writers for training runs (process 0 writes; other processes only log).

``create_writer(workdir)`` returns a clu ``MultiWriter`` of

* the clu default writer: TensorBoard event files in ``workdir`` (scalars, images) and the log;
* :class:`JsonlWriter`: ``workdir/metrics.jsonl``, one JSON object per (step, scalars) call with the
  values at full float precision (``repr``), so scripts and tests can read curves without TensorBoard.

``image_grid`` tiles named image batches into one uint8 picture: one row per example, one column per
entry (e.g. source | driving | prediction).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
from clu import metric_writers


class JsonlWriter(metric_writers.interface.MetricWriter):
    """Appends ``{"step": s, "name": value, ...}`` lines to a file (scalars only)."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._f = open(path, "a")

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        row = {"step": int(step)}
        for k, v in scalars.items():
            v = float(np.asarray(v))
            row[k] = v if math.isfinite(v) else repr(v)
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def write_hparams(self, hparams):
        pass

    def flush(self):
        self._f.flush()

    def close(self):
        self._f.close()


def create_writer(workdir: str, *, is_main: bool = True) -> metric_writers.MetricWriter:
    default = metric_writers.create_default_writer(workdir, just_logging=not is_main, asynchronous=False)
    if not is_main:
        return default
    return metric_writers.MultiWriter([default, JsonlWriter(os.path.join(workdir, "metrics.jsonl"))])


def read_metrics(workdir: str) -> list[dict]:
    """All rows of ``workdir/metrics.jsonl`` (a resumed run repeats the steps it redid)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def last_value(rows: Sequence[dict], name: str, step: int | None = None):
    """The newest logged value of ``name`` (at ``step`` if given), or None."""
    for row in reversed(rows):
        if name in row and (step is None or row["step"] == step):
            return row[name]
    return None


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] float images -> uint8."""
    x = (np.clip(np.asarray(images, np.float32), -1.0, 1.0) + 1.0) * 127.5
    return np.round(x).astype(np.uint8)


def image_grid(columns: Mapping[str, np.ndarray], max_rows: int = 8, pad: int = 2) -> np.ndarray:
    """(B, H, W, 3) float [-1, 1] batches -> one uint8 grid: rows = examples, columns = entries."""
    cols = [to_uint8(v[:max_rows]) for v in columns.values()]
    b, h, w, _ = cols[0].shape
    grid = np.full((b * (h + pad) + pad, len(cols) * (w + pad) + pad, 3), 255, np.uint8)
    for j, col in enumerate(cols):
        for i in range(b):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y:y + h, x:x + w] = col[i]
    return grid
