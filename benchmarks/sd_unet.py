r"""Stable Diffusion UNet speed: ms per denoising step at 64x64 latents (a 512² image), JAX vs diffusers.

    python benchmarks/sd_unet.py [--batches=1,2] [--dtypes=float32,bfloat16] [--torch] [--json=...]

The sd-image-variations UNet config (859,520,964 parameters, cross-attention to one 768-d CLIP image
token, X-NeMo's backbone) with random weights (speed does not depend on them). Each JAX step is one
jitted ``UNet2DConditionModel`` call; it is compiled and run once before timing, and the table shows the
median of ``--repeats`` runs. With ``--torch`` (and torch + diffusers installed) the same config runs in
diffusers under ``torch.inference_mode()`` on the same machine, fp32 only on CPU, and the ratio
torch / JAX is printed.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# lambdalabs/sd-image-variations-diffusers unet/config.json (the SD-1.x UNet with a 768-d image context)
SD_IMAGE_VARIATIONS_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 768, "attention_head_dim": 8, "use_linear_projection": False,
}


def timed(fn, repeats: int):
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return first, statistics.median(runs)


def bench_jax(batch: int, dtype: str, repeats: int) -> dict:
    from xnemo_jax.unet import UNet2DConditionModel  # noqa: PLC0415

    make = lambda: UNet2DConditionModel.from_config(SD_IMAGE_VARIATIONS_UNET, rngs=nnx.Rngs(0), dtype=dtype)  # noqa: E731
    graphdef = nnx.graphdef(nnx.eval_shape(make))
    state = jax.jit(lambda: nnx.state(make()))()  # one compiled initialiser, not one per parameter shape

    @jax.jit
    def step(state, x, t, ctx):
        return nnx.merge(graphdef, state)(x, t, ctx)

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, 64, 64, 4)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((batch, 1, 768)), jnp.float32)
    t = jnp.full((batch,), 500, jnp.int32)
    first, median = timed(lambda: step(state, x, t, ctx).block_until_ready(), repeats)
    params = sum(int(p.size) for p in jax.tree.leaves(state))
    return {"impl": "jax", "batch": batch, "dtype": dtype, "ms": round(median * 1e3, 1),
            "first_call_s": round(first, 2), "params": params, "repeats": repeats}


def bench_torch(batch: int, repeats: int) -> dict | None:
    try:
        import torch  # noqa: PLC0415
        from diffusers import UNet2DConditionModel as TorchUNet  # noqa: PLC0415
    except ImportError:
        return None
    model = TorchUNet(**SD_IMAGE_VARIATIONS_UNET).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, 64, 64, generator=g)
    ctx = torch.randn(batch, 1, 768, generator=g)
    t = torch.full((batch,), 500)
    with torch.inference_mode():
        first, median = timed(lambda: model(x, t, encoder_hidden_states=ctx).sample, repeats)
    return {"impl": "diffusers", "batch": batch, "dtype": "float32", "ms": round(median * 1e3, 1),
            "first_call_s": round(first, 2), "torch_threads": torch.get_num_threads(), "repeats": repeats}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,2")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--torch", action="store_true", help="also time diffusers (fp32) for the ratio")
    p.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "sd_unet.json"))
    args = p.parse_args()
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for dtype in args.dtypes.split(","):
            rows.append(bench_jax(batch, dtype, args.repeats))
            print(json.dumps(rows[-1]), flush=True)
        if args.torch:
            row = bench_torch(batch, args.repeats)
            if row is None:
                print("torch/diffusers not installed: no diffusers timing", flush=True)
            else:
                rows.append(row)
                print(json.dumps(row), flush=True)
    backend, device = jax.default_backend(), jax.devices()[0].device_kind
    print(f"\nUNet (sd-image-variations config), 64x64 latents, one step; backend {backend} ({device}), "
          f"{os.cpu_count()} CPUs")
    print(f"{'impl':<11}{'batch':>6}{'dtype':>10}{'ms/step':>11}{'first call s':>14}{'diffusers/jax':>15}")
    ref = {r["batch"]: r["ms"] for r in rows if r["impl"] == "diffusers"}
    for r in rows:
        ratio = f"{ref[r['batch']] / r['ms']:.2f}" if r["impl"] == "jax" and r["batch"] in ref else ""
        print(f"{r['impl']:<11}{r['batch']:>6}{r['dtype']:>10}{r['ms']:>11}{r['first_call_s']:>14}{ratio:>15}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"benchmark": "sd_unet", "backend": backend, "device": device, "cpus": os.cpu_count(),
                   "platform": platform.platform(), "jax": jax.__version__, "latent": [64, 64], "rows": rows},
                  f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
