r"""LIA-X end to end: frames/s of ``launch/animate.py`` (decode + animate + encode) per config, and memory
over a long driving video.

    python benchmarks/liax_animate.py [--configs=tiny,official] [--long-frames=2000] \
        [--json=benchmarks/results/liax_animate.json]

Throughput: for each config, random weights (the speed does not depend on them) in a
``liax_jax.inference.Runner``, handed to ``launch.animate.Job`` (no checkpoint on disk), animation mode,
whole-frame framing (no ``--crop``). The driving video is synthetic talking heads (``--size`` pixels square,
mp4) and the source a png of the same size; each frame is decoded, resized to the model's resolution,
animated, resized back and encoded to an mp4, so frames/s covers the whole tool. A warm-up run over one
chunk compiles the programs (its wall time is the "first-run" column); the table shows the median of
``--repeats`` timed runs of ``Job(...)`` + ``Job.run()`` over ``--frames`` frames.

Memory: the tiny config over a ``--long-frames`` video (and a ``--short-frames`` one, to show the peak does
not grow with length), each in a fresh subprocess so nothing from the other runs counts. After a warm-up
run, a thread samples the resident set size (``/proc/self/statm``) every ``--sample-ms`` while
``Job.run()`` streams the video, and the RSS is also read when 10/25/50/75/100 % of the frames have been
written (the output writer is wrapped to count them). "growth" is the RSS at 100 % minus the RSS at 10 %;
"data" is the size of the decoded driving frames (frames x H x W x 3 bytes, the output is as large).
The JSON also keeps the highest sampled RSS during each tenth of the frames.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.liax_forward import load_config  # noqa: E402
from input_pipeline import synthetic, video_io  # noqa: E402
from launch import animate  # noqa: E402
from liax_jax import inference  # noqa: E402
from liax_jax.model import LiaX, count_params  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FPS = 25.0
MB = 1 << 20
MILESTONES = (0.10, 0.25, 0.50, 0.75, 1.00)


# ------------------------------------------------------------------------------------------- helpers
def rss_bytes() -> int:
    """Current resident set size of this process (the peak so far where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return max_rss_bytes()


def max_rss_bytes() -> int:
    """Peak resident set size of this process so far (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def per_config(spec: str, cast=int) -> dict:
    """``"tiny=8,official=2"`` -> ``{"tiny": 8, "official": 2}``."""
    return {k: cast(v) for k, v in (kv.split("=") for kv in spec.split(",") if kv)}


def write_driving(path: str, num_frames: int, size: int, piece: int = 100) -> None:
    """A synthetic talking-head mp4, streamed: clips of ``piece`` frames (a new person and motion each)
    are rendered one at a time, so a long video is never held in memory."""
    def frames():
        for i, start in enumerate(range(0, num_frames, piece)):
            yield from synthetic.make_clip(1000 + i, min(piece, num_frames - start), size, FPS).frames

    n = video_io.write_video(path, frames(), FPS)
    assert n == num_frames, (n, num_frames)


def write_source(path: str, size: int) -> None:
    video_io.write_image(path, synthetic.make_clip(7, 1, size, FPS).frames[0])


def make_runner(variant: str, dtype: str, chunk: int):
    """A Runner over random weights, and (resolution, params, build seconds)."""
    start = time.perf_counter()
    config = load_config(variant, dtype)
    model = LiaX(config, rngs=nnx.Rngs(0))
    runner = inference.Runner(model, chunk)
    jax.block_until_ready(runner.directions)
    return runner, config.resolution, count_params(model), time.perf_counter() - start


def run_job(runner, source: str, driving: str, output: str, chunk: int) -> tuple[int, float]:
    """``(frames written, wall seconds)`` of one ``launch/animate.py`` run: read inputs, animate, encode."""
    args = animate.build_parser().parse_args(
        ["liax", "--checkpoint=unused", f"--source={source}", f"--driving={driving}", f"--output={output}",
         "--quiet", f"--chunk-size={chunk}"])
    animate.check_args(args)
    start = time.perf_counter()
    count = animate.Job(args, runner=runner).run()
    return count, time.perf_counter() - start


# ---------------------------------------------------------------------------------------- throughput
def bench_throughput(variant, dtype, frames, chunk, repeats, size):
    runner, res, params, build_s = make_runner(variant, dtype, chunk)
    size = size or res
    with tempfile.TemporaryDirectory() as tmp:
        source, warm, driving = (os.path.join(tmp, n) for n in ("source.png", "warm.mp4", "driving.mp4"))
        output = os.path.join(tmp, "out.mp4")
        write_source(source, size)
        write_driving(warm, chunk, size)  # one chunk: compiles every program the timed runs use
        write_driving(driving, frames, size)
        _, first_s = run_job(runner, source, warm, output, chunk)
        runs = []
        for _ in range(repeats):
            count, wall = run_job(runner, source, driving, output, chunk)
            assert count == frames, (count, frames)
            runs.append(wall)
    wall = statistics.median(runs)
    return {"config": variant, "dtype": dtype, "resolution": res, "params": params, "driving_size": size,
            "chunk": chunk, "frames": frames, "frames_per_s": float(f"{frames / wall:.4g}"),
            "ms_per_frame": round(wall / frames * 1e3, 1), "first_run_s": round(first_s, 2),
            "first_run_frames": chunk, "model_build_s": round(build_s, 2), "repeats": repeats,
            "runs_s": [round(r, 3) for r in runs]}


# -------------------------------------------------------------------------------------------- memory
def child_long(num_frames: int, dtype: str, chunk: int, size: int, sample_ms: float) -> dict:
    """Runs in a fresh process: RSS while the tiny config streams a ``num_frames`` video."""
    runner, res, _, _ = make_runner("tiny", dtype, chunk)
    with tempfile.TemporaryDirectory() as tmp:
        source, warm, driving = (os.path.join(tmp, n) for n in ("source.png", "warm.mp4", "driving.mp4"))
        output = os.path.join(tmp, "out.mp4")
        write_source(source, size)
        write_driving(warm, chunk, size)
        write_driving(driving, num_frames, size)
        run_job(runner, source, warm, output, chunk)  # compile outside the measurement
        gc.collect()
        baseline = rss_bytes()

        # frames written so far, and the RSS when a milestone count is reached
        marks = {max(1, round(p * num_frames)): p for p in MILESTONES}
        written, at_mark = [0], {}

        class CountingWriter(video_io.VideoWriter):
            def write(self, frame):
                super().write(frame)
                written[0] = self.num_frames
                if self.num_frames in marks:
                    at_mark[marks[self.num_frames]] = rss_bytes()

        samples, stop = [], threading.Event()
        t0 = time.perf_counter()

        def sample():
            while not stop.is_set():
                samples.append((time.perf_counter() - t0, rss_bytes(), written[0]))
                stop.wait(sample_ms / 1e3)

        sampler = threading.Thread(target=sample, daemon=True)
        original = video_io.VideoWriter
        video_io.VideoWriter = CountingWriter  # launch/animate.py looks it up on the module at run time
        sampler.start()
        try:
            count, wall = run_job(runner, source, driving, output, chunk)
        finally:
            stop.set()
            sampler.join()
            video_io.VideoWriter = original
    assert count == num_frames, (count, num_frames)
    rss_all = [r for _, r, _ in samples] + list(at_mark.values())
    after_10 = [r for _, r, n in samples if n >= min(marks)] + list(at_mark.values())
    rss10, rss_end = at_mark[MILESTONES[0]], at_mark[1.0]
    # the highest sampled RSS while each tenth of the frames was being produced (a coarse trace)
    bands = [[r for _, r, n in samples if k * num_frames <= 10 * n < (k + 1) * num_frames] for k in range(10)]
    return {"frames": num_frames, "config": "tiny", "resolution": res, "dtype": dtype, "chunk": chunk,
            "driving_size": size, "data_mb": round(num_frames * size * size * 3 / MB, 1),
            "frames_per_s": round(num_frames / wall, 2), "wall_s": round(wall, 2),
            "baseline_rss_mb": round(baseline / MB, 1), "peak_rss_mb": round(max(rss_all) / MB, 1),
            "rss_mb_at": {f"{int(p * 100)}%": round(at_mark[p] / MB, 1) for p in MILESTONES},
            "growth_mb": round((rss_end - rss10) / MB, 1),
            "peak_above_10pct_mb": round((max(after_10) - rss10) / MB, 1),
            "max_rss_mb_per_tenth": [round(max(b) / MB, 1) if b else None for b in bands],
            "process_max_rss_mb": round(max_rss_bytes() / MB, 1), "samples": len(samples),
            "sample_ms": sample_ms}


def measure_long(num_frames, args) -> dict:
    """:func:`child_long` in a fresh interpreter (its peak RSS is its own)."""
    cmd = [sys.executable, os.path.abspath(__file__), f"--_child-long={num_frames}", f"--dtype={args.dtype}",
           f"--long-chunk={args.long_chunk}", f"--long-size={args.long_size}", f"--sample-ms={args.sample_ms}"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- main
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="tiny,official")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--frames", default="tiny=64,official=4", help="driving frames per config")
    p.add_argument("--chunk", default="tiny=8,official=2", help="frames per chunk (--chunk-size) per config")
    p.add_argument("--repeats", default="tiny=3,official=1", help="timed runs per config (median reported)")
    p.add_argument("--size", default="tiny=256,official=512", help="driving/source video side per config "
                                                                  "(0: the model's resolution)")
    p.add_argument("--long-frames", type=int, default=2000, help="memory test length (0: skip the memory test)")
    p.add_argument("--short-frames", type=int, default=500, help="a second, shorter memory run (0: skip)")
    p.add_argument("--long-chunk", type=int, default=8)
    p.add_argument("--long-size", type=int, default=256, help="driving video side of the memory runs")
    p.add_argument("--sample-ms", type=float, default=50.0, help="RSS sampling interval")
    p.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "liax_animate.json"))
    p.add_argument("--_child-long", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args._child_long:
        result = child_long(args._child_long, args.dtype, args.long_chunk, args.long_size, args.sample_ms)
        print(json.dumps(result), flush=True)
        return

    # memory first, while this process holds no model (the children are separate processes anyway)
    mem_rows = []
    for n in sorted({n for n in (args.short_frames, args.long_frames) if n > 0} if args.long_frames else ()):
        row = measure_long(n, args)
        mem_rows.append(row)
        print(json.dumps(row), flush=True)

    frames, chunks = per_config(args.frames), per_config(args.chunk)
    repeats, sizes = per_config(args.repeats), per_config(args.size)
    rows = []
    for variant in [v for v in args.configs.split(",") if v]:
        row = bench_throughput(variant, args.dtype, frames.get(variant, 4), chunks.get(variant, 2),
                               repeats.get(variant, 1), sizes.get(variant, 0))
        rows.append(row)
        print(json.dumps(row), flush=True)
        gc.collect()

    backend = jax.default_backend()
    device = jax.devices()[0].device_kind
    print(f"\nbackend {backend} ({device}), {os.cpu_count()} CPUs, dtype {args.dtype}; "
          "end to end = read + decode + resize + animate + resize back + encode mp4")
    if rows:
        print(f"{'config':<10}{'res':>5}{'driving':>10}{'chunk':>7}{'frames':>8}{'frames/s':>10}{'ms/frame':>10}"
              f"{'first-run s':>13}")
        for r in rows:
            drv = f"{r['driving_size']}²"
            print(f"{r['config']:<10}{r['resolution']:>5}{drv:>10}{r['chunk']:>7}{r['frames']:>8}"
                  f"{r['frames_per_s']:>10.3g}{r['ms_per_frame']:>10}{r['first_run_s']:>13}")
    if mem_rows:
        m0 = mem_rows[0]
        print(f"\nmemory: tiny ({m0['resolution']}²), chunk {m0['chunk']}, driving and output {m0['driving_size']}², "
              f"RSS in MB (fresh process, after a warm-up run)")
        print(f"{'frames':>7}{'data MB':>9}{'base':>8}{'peak':>8}{'@10%':>8}{'@25%':>8}{'@50%':>8}{'@75%':>8}"
              f"{'@100%':>8}{'growth':>8}{'frames/s':>10}")
        for m in mem_rows:
            at = m["rss_mb_at"]
            print(f"{m['frames']:>7}{m['data_mb']:>9}{m['baseline_rss_mb']:>8}{m['peak_rss_mb']:>8}{at['10%']:>8}"
                  f"{at['25%']:>8}{at['50%']:>8}{at['75%']:>8}{at['100%']:>8}{m['growth_mb']:>8}"
                  f"{m['frames_per_s']:>10}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"benchmark": "liax_animate", "backend": backend, "device": device, "cpus": os.cpu_count(),
                   "platform": platform.platform(), "jax": jax.__version__, "dtype": args.dtype,
                   "throughput": rows, "memory": mem_rows}, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
