r"""Training entry point: ``python launch/train.py --config=configs/liax.py:tiny --workdir=DIR``.

Status: the data stage is complete: the configured pipeline (built-in synthetic talking heads, or a
prepared dataset via ``--config.data.path``) is built, per-process sharded and iterated; a preview video
of the first training pairs and the resolved config are written to the workdir. The model, optimiser,
checkpointing and metrics of the runtime land with the training-runtime issue; this command line is
already the final one.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from launch import cli  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/liax.py:tiny.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.", required=True)
flags.DEFINE_integer("preview_batches", 4, "Batches to pull in the data stage (and show in the preview).")


def main(argv):
    del argv
    import numpy as np  # noqa: PLC0415

    from input_pipeline import pipeline, video_io  # noqa: PLC0415
    from input_pipeline.errors import UserError  # noqa: PLC0415

    config = flags.FLAGS.config
    if config is None:
        raise UserError("missing --config (e.g. --config=configs/liax.py:tiny)")
    workdir = flags.FLAGS.workdir
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=1))

    d = config.data
    source = pipeline.open_source(d.path, "train", synthetic_clips=d.synthetic_clips,
                                  synthetic_frames=d.synthetic_frames, synthetic_size=d.resolution,
                                  seed=config.seed)
    logging.info("training data: %r", source)
    import jax  # noqa: PLC0415

    per_process = config.batch_size // jax.process_count()
    ds = pipeline.pairs_dataset(source, batch_size=per_process, resolution=d.resolution, seed=config.seed,
                                max_gap=d.max_gap)
    it = pipeline.make_iterator(ds, worker_count=d.worker_count, read_threads=d.read_threads,
                                prefetch=d.prefetch)
    start = time.perf_counter()
    preview = []
    for step in range(flags.FLAGS.preview_batches):
        batch = next(it)
        preview.extend(np.concatenate([batch["source"], batch["driving"]], axis=2))
        logging.info("batch %d: %s", step, {k: (v.shape, str(v.dtype)) for k, v in batch.items()})
    elapsed = time.perf_counter() - start
    n_pairs = flags.FLAGS.preview_batches * per_process
    video = os.path.join(workdir, "samples", "data_preview.mp4")
    video_io.write_video(video, preview, fps=4)
    summary = {"pairs": n_pairs, "pairs_per_s": round(n_pairs / elapsed, 1), "preview": video,
               "status": "data stage only: model training lands with the training-runtime issue"}
    with open(os.path.join(workdir, "data_stage.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary))


if __name__ == "__main__":
    cli.run(main)
