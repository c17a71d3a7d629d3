r"""X-NeMo sampling speed: seconds per window-step, per output frame and per second of 25 fps video, peak
memory, and what precomputing the motion codes and batching the windows save against the official
per-window structure.

    python benchmarks/xnemo_sample.py [--model=tiny|official] [--dtype=float32|bfloat16] [--frames=48] \
        [--steps=25] [--window-batch=2] [--repeats=3] [--json=benchmarks/results/xnemo_sample.json]

Random weights (the speed does not depend on them) in the bundle of ``--model`` (``tiny`` runs on a CPU;
``official`` is the release's size: run it where memory allows, e.g. one GPU), random inputs at the
model's sizes, ``--frames`` frames (48 at the defaults: two closed-loop windows of 24 overlapping by 4 per
step), ``--steps`` DDIM steps, CFG 3.5. Timed (medians of ``--repeats`` runs after one warm-up run whose
wall time, compile included, is the "first run" column):

* ``ours``: ``xnemo_jax.sampling.Sampler.denoise`` — the whole loop one compiled program, motion codes
  computed once beforehand (their time is added), ``--window-batch`` windows per denoiser call; and the
  same with one window per call (``window_batch=1``);
* ``official structure``: the official per-window loop driven from Python with the same jitted denoiser
  call per window (one CFG pair), the motion encoder re-run on the window's crops and on the pose crop for
  every window at every step, averaging and the DDIM step as separate calls.

Per row: seconds per window-step (loop time / (steps x windows)), per output frame, per second of 25 fps
video, and the speed-up of ours over the official structure. Also the reference pass (VAE encode, CLIP,
bank: once per video) and the SVD decode per frame. Memory: the device's peak bytes in use where the
backend reports it (GPU/TPU), and XLA's compiled memory analysis of the denoising program (arguments +
temporaries; known before running) everywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from xnemo_jax import model as model_lib  # noqa: E402
from xnemo_jax import sampling  # noqa: E402
from xnemo_jax import scheduler as ddim  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 1 << 20
GUIDANCE = 3.5


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """(first-run seconds, median of ``repeats`` further runs, last result)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times), out


def peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def random_bundle(name: str, dtype: str) -> model_lib.XNemo:
    """The bundle with random weights, filled on the device leaf by leaf (no slow module init)."""
    abstract = model_lib.abstract(model_lib.XNemoConfig.preset(name, dtype=dtype))
    graphdef, state = nnx.split(abstract)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    filled = [jax.random.normal(k, x.shape, x.dtype) * 0.02 if jnp.issubdtype(x.dtype, jnp.floating)
              else jnp.zeros(x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, filled))


class OfficialStructure:
    """The official per-window loop from Python: motion encoder per window per step, one CFG pair per call."""

    def __init__(self, sampler: sampling.Sampler):
        self.sampler = sampler
        graphdef, self.state = sampler._split["denoiser"]
        self.motion_net = sampler._split["motion_encoder"]

        @jax.jit
        def window(state, lat, t, ctx, motion, neg, bank):
            den = nnx.merge(graphdef, state)
            x = jnp.concatenate([lat, lat]).astype(den.dtype)
            context = jnp.concatenate([jnp.zeros_like(ctx), ctx]).astype(den.dtype)
            mot = jnp.concatenate([jnp.broadcast_to(neg, motion.shape), motion]).astype(den.dtype)
            return den(x, t, context, mot, bank=bank, bank_mask=jnp.array([False, True])).astype(jnp.float32)

        @jax.jit
        def finish(schedule, x, acc, count, t):
            mean = acc / count[None, :, None, None, None]
            eps = mean[0] + GUIDANCE * (mean[1] - mean[0])
            return ddim.step(schedule, eps, t, x)[0]

        self.window, self.finish = window, finish

    @staticmethod
    def null_rts(n: int) -> jax.Array:
        return jnp.tile(jnp.asarray(sampling.NULL_F_RTS, jnp.float32), (n, 1))

    def __call__(self, latents, bank, context, crops, pose, offsets, plan, steps):
        schedule = sampling.schedule_for(steps)
        x = latents
        n = plan.num_frames
        for i, t in enumerate(schedule.timesteps.tolist()):
            acc = jnp.zeros((2,) + x.shape, jnp.float32)
            count = jnp.zeros((n,), jnp.float32)
            for idx in plan.windows(offsets[i]):
                # the motion encoder re-run on the window's crops and on the pose crop, per window and step
                motion = sampling._motion(*self.motion_net, crops[idx], self.null_rts(len(idx)))[None]
                neg = sampling._motion(*self.motion_net, pose[None], self.null_rts(1))[None]
                eps = self.window(self.state, x[idx][None], t, context, motion, neg, bank)
                acc = acc.at[:, idx].add(eps)  # (2, F, h, w, c): the CFG pair of one window
                count = count.at[idx].add(1.0)
            x = self.finish(schedule, x, acc, count, t)
        return x


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=model_lib.PRESETS, default="tiny")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--frames", type=int, default=48)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--context-frames", type=int, default=24)
    p.add_argument("--context-overlap", type=int, default=4)
    p.add_argument("--window-batch", type=int, default=2)
    p.add_argument("--decode-chunk", type=int, default=25)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-official", action="store_true", help="skip the official-structure baseline")
    p.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "xnemo_sample.json"))
    args = p.parse_args()

    bundle = random_bundle(args.model, args.dtype)
    cfg = bundle.config
    sampler = sampling.Sampler(bundle, motion_batch=16)
    rng = np.random.default_rng(0)
    s, r, n = cfg.motion_encoder.image_size, cfg.resolution, args.frames
    reference = rng.integers(0, 256, (r, r, 3), dtype=np.uint8)
    pose = rng.integers(0, 256, (s, s, 3), dtype=np.uint8)
    crops = jnp.asarray(rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8))
    clip_pixels = jnp.asarray(rng.standard_normal((cfg.image_encoder.image_size,) * 2 + (3,)), jnp.float32)
    offsets = sampling.seeded_offsets(0, args.steps, args.context_frames)
    results = {}

    def reference_pass():
        latent = sampler.reference_latent(reference)
        context = sampler.clip_context(clip_pixels)
        return latent, context, sampler.reference_bank(latent, context)

    first, med, (ref_latent, context, bank) = timed(reference_pass, args.repeats)
    results["reference_pass_s"] = med
    _, motion_s, motion = timed(lambda: sampler.motion(crops), args.repeats)
    negative = sampler.motion(jnp.asarray(pose)[None])[0]
    results["motion_all_frames_s"] = motion_s
    noise = jax.random.normal(jax.random.key(0), (n,) + ref_latent.shape, jnp.float32)
    init = sampling.initial_latents(sampling.schedule_for(args.steps), ref_latent, noise)

    rows = []
    for wb in dict.fromkeys((args.window_batch, 1)):
        plan = sampling.WindowPlan(n, args.context_frames, args.context_overlap, wb)
        compiled = sampler.lower_denoise(plan, args.steps).compile()
        mem = compiled.memory_analysis()
        analysis = None if mem is None else int(mem.argument_size_in_bytes + mem.temp_size_in_bytes
                                                 + mem.output_size_in_bytes)
        first, med, _ = timed(lambda plan=plan: sampler.denoise(
            jnp.array(init), bank, context, motion, negative, steps=args.steps, guidance=GUIDANCE,
            offsets=offsets, plan=plan), args.repeats)
        rows.append(dict(variant=f"ours (window_batch={plan.window_batch_used})", first_s=first,
                         loop_s=med + motion_s, windows=plan.num_windows, compiled_bytes=analysis))
    if not args.skip_official:
        plan = sampling.WindowPlan(n, args.context_frames, args.context_overlap, 1)
        official = OfficialStructure(sampler)
        first, med, _ = timed(lambda: official(init, bank, context, crops, jnp.asarray(pose), offsets, plan,
                                               args.steps), args.repeats)
        rows.append(dict(variant="official structure", first_s=first, loop_s=med, windows=plan.num_windows,
                         compiled_bytes=None))

    decode_first, decode_s, _ = timed(lambda: list(sampler.decode(init, args.decode_chunk)), args.repeats)
    results["decode_per_frame_s"] = decode_s / n
    results["peak_bytes_in_use"] = peak_bytes()
    base = rows[-1]["loop_s"] if not args.skip_official else None
    for row in rows:
        row["s_per_window_step"] = row["loop_s"] / (args.steps * row["windows"])
        row["s_per_frame"] = row["loop_s"] / n
        row["s_per_video_second"] = row["loop_s"] * 25.0 / n
        row["speedup_vs_official"] = None if base is None else base / row["loop_s"]

    device = jax.devices()[0]
    print(f"X-NeMo {args.model} ({cfg.resolution}², {args.dtype}) on {device.device_kind} ({jax.default_backend()}),"
          f" {n} frames, {args.steps} steps, windows {args.context_frames}/{args.context_overlap}, CFG {GUIDANCE}")
    print(f"{'variant':28s} {'first run s':>11s} {'loop s':>8s} {'s/window-step':>13s} {'s/frame':>8s} "
          f"{'s/video-s':>9s} {'vs official':>11s} {'compiled MB':>11s}")
    for row in rows:
        speed = "" if row["speedup_vs_official"] is None else f"{row['speedup_vs_official']:.2f}x"
        mem = "" if row["compiled_bytes"] is None else f"{row['compiled_bytes'] / MB:.0f}"
        print(f"{row['variant']:28s} {row['first_s']:11.2f} {row['loop_s']:8.2f} {row['s_per_window_step']:13.3f} "
              f"{row['s_per_frame']:8.3f} {row['s_per_video_second']:9.2f} {speed:>11s} {mem:>11s}")
    print(f"reference pass (once per video) {results['reference_pass_s']:.3f} s; motion codes for all {n} frames "
          f"{motion_s:.3f} s; SVD decode {results['decode_per_frame_s'] * 1e3:.1f} ms/frame (chunks of "
          f"{args.decode_chunk}); device peak "
          + ("n/a on this backend" if results["peak_bytes_in_use"] is None
             else f"{results['peak_bytes_in_use'] / MB:.0f} MB"))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"benchmark": "xnemo_sample", "model": args.model, "dtype": args.dtype, "frames": n,
                   "steps": args.steps, "context_frames": args.context_frames,
                   "context_overlap": args.context_overlap, "backend": jax.default_backend(),
                   "device": device.device_kind, "cpus": os.cpu_count(), "python": platform.python_version(),
                   "jax": jax.__version__, "rows": rows, **results}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
