r"""LIA-X forward speed: ms per frame for encode, decode and animate, per config, on the current backend.

    python benchmarks/liax_forward.py [--configs=tiny,base,official] [--json=benchmarks/results/liax_forward.json]

Random weights (the speed does not depend on them), batch 1 for encode/decode, ``--frames`` driving
frames (one chunk) for animate, float32 unless ``--dtype``. Every function is jitted and run once before
timing (compile time is reported separately); the table shows the median of ``--repeats`` runs.
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

from liax_jax import inference  # noqa: E402
from liax_jax.model import LiaX, LiaXConfig, count_params  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(variant: str, dtype: str) -> LiaXConfig:
    from configs import liax as liax_configs  # noqa: PLC0415

    model_cfg = dict(liax_configs.get_config(variant).model)
    model_cfg["dtype"] = dtype
    return LiaXConfig.from_config(model_cfg)


def timed(fn, repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        runs.append(time.perf_counter() - start)
    return first, statistics.median(runs), runs


def bench(variant, dtype, frames, repeats):
    config = load_config(variant, dtype)
    model = LiaX(config, rngs=nnx.Rngs(0))
    run = inference.Runner(model)
    r = config.resolution
    rng = np.random.default_rng(0)
    src = jnp.asarray(rng.uniform(-1, 1, (1, r, r, 3)), jnp.float32)
    drv = jnp.asarray(rng.uniform(-1, 1, (frames, r, r, 3)), jnp.float32)
    z, feats, alpha = run.encode(src)
    latent = z + model.direction_latent(alpha, run.directions)
    enc_first, enc, _ = timed(lambda: run.encode(src), repeats)
    dec_first, dec, _ = timed(lambda: run.decode(latent, feats), repeats)
    ani_first, ani, _ = timed(lambda: inference.animate(run, src, drv, chunk_size=frames), repeats)
    return {"config": variant, "dtype": dtype, "resolution": r, "params": count_params(model),
            "encode_ms": round(enc * 1e3, 2), "decode_ms": round(dec * 1e3, 2),
            "animate_ms_per_frame": round(ani / frames * 1e3, 2), "animate_frames": frames,
            "first_call_s": {"encode": round(enc_first, 2), "decode": round(dec_first, 2),
                             "animate": round(ani_first, 2)}, "repeats": repeats}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="tiny,base,official")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--frames", default="tiny=8,base=4,official=2", help="driving frames per config")
    p.add_argument("--repeats", default="tiny=10,base=3,official=1")
    p.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "liax_forward.json"))
    args = p.parse_args()
    frames = dict(kv.split("=") for kv in args.frames.split(","))
    repeats = dict(kv.split("=") for kv in args.repeats.split(","))
    rows = []
    for variant in args.configs.split(","):
        row = bench(variant, args.dtype, int(frames.get(variant, 2)), int(repeats.get(variant, 1)))
        rows.append(row)
        print(json.dumps(row), flush=True)
    backend = jax.default_backend()
    device = jax.devices()[0].device_kind
    print(f"\nbackend {backend} ({device}), dtype {args.dtype}, batch 1")
    print(f"{'config':<10}{'res':>5}{'params':>14}{'encode ms':>12}{'decode ms':>12}{'animate ms/frame':>18}")
    for r in rows:
        print(f"{r['config']:<10}{r['resolution']:>5}{r['params']:>14,}{r['encode_ms']:>12}{r['decode_ms']:>12}"
              f"{r['animate_ms_per_frame']:>18}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"benchmark": "liax_forward", "backend": backend, "device": device, "cpus": os.cpu_count(),
                   "platform": platform.platform(), "jax": jax.__version__, "rows": rows}, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
