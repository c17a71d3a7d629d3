r"""Input-pipeline throughput: (source, driving) pairs per second from prepared ArrayRecord shards.

    python benchmarks/data_pipeline.py [--workers=2] [--json=benchmarks/results/data_pipeline.json]

Builds a temporary dataset of synthetic talking-head clips at 512² (JPEG frames, the format of real
prepared data), then runs the Grain pairs pipeline (decode two frames, resize, batch) at 256² and 512²
with ``--workers`` process workers. Each configuration is timed over ``--repeats`` windows of
``--batches`` batches after a warm-up; the table reports the median window. Also measures the built-in
on-the-fly synthetic source (rendering instead of decoding).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from input_pipeline import building, pipeline  # noqa: E402


def measure(source, resolution, batch_size, workers, batches, repeats, warmup=2):
    ds = pipeline.pairs_dataset(source, batch_size=batch_size, resolution=resolution, seed=0,
                                shard_index=0, shard_count=1)
    it = pipeline.make_iterator(ds, worker_count=workers)
    for _ in range(warmup):
        next(it)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        rates.append(batches * batch_size / (time.perf_counter() - start))
    return statistics.median(rates), rates


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "data_pipeline.json"))
    args = p.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        building.prepare_synthetic(args.clips, tmp, building.BuildOptions(resolution=512, eval_fraction=0),
                                   frames_per_clip=24, progress=False)
        print(f"prepared {args.clips} synthetic 512² clips in {time.perf_counter() - t0:.1f} s")
        source = pipeline.open_source(tmp, "train")
        for res in (256, 512):
            median, rates = measure(source, res, args.batch_size, args.workers, args.batches, args.repeats)
            rows.append({"source": "arrayrecord-jpeg-512", "resolution": res, "workers": args.workers,
                         "pairs_per_s": round(median, 1), "windows": [round(r, 1) for r in rates]})
    for res in (256, 512):
        synth = pipeline.SyntheticClipSource(num_clips=64, num_frames=32, size=res)
        median, rates = measure(synth, res, args.batch_size, args.workers, args.batches, args.repeats)
        rows.append({"source": "synthetic-on-the-fly", "resolution": res, "workers": args.workers,
                     "pairs_per_s": round(median, 1), "windows": [round(r, 1) for r in rates]})

    print(f"\n{'source':<24}{'res':>6}{'workers':>9}{'pairs/s (median)':>18}")
    for r in rows:
        print(f"{r['source']:<24}{r['resolution']:>6}{r['workers']:>9}{r['pairs_per_s']:>18}")
    result = {"benchmark": "data_pipeline", "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                         "python": platform.python_version()},
              "batch_size": args.batch_size, "batches_per_window": args.batches, "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
