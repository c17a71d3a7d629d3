r"""X-NeMo training-state memory under FSDP, and the cost of lowering the sharded train step, from shapes alone.

    python benchmarks/xnemo_train_memory.py [--variant=official] [--stage=image|motion|temporal|finetune|all] \
        [--fsdp=8] [--batch-size=N] [--num-frames=F] [--mesh=abstract|cpu] [--compile] \
        [--json=benchmarks/results/xnemo_train_memory.json]

Nothing is allocated: the train state is ``jax.eval_shape`` of the state ``launch/trainer.py``'s ``Runtime``
initialises (step, run RNG, the task's ``init``: trainable / frozen parameters, buffers, optimizer states),
its shardings come from ``launch.sharding.state_shardings`` with the config's ``sharding_rules`` on a
``data=1 x fsdp=N`` mesh (a ``jax.sharding.AbstractMesh`` by default; ``--mesh=cpu`` uses N fake CPU devices
instead, needed for ``--compile``), and the train step is jitted exactly as the runtime jits it (same
step function, in/out shardings, donation) and *lowered* on abstract arguments.

Reported per group of the state (trainable parameters incl. the GAN head's generator and discriminator,
frozen parameters, buffers, optimizer states, step/RNG): element count, total bytes, per-device bytes with
FSDP N (the sum over leaves of shard shape x itemsize) and with FSDP 1, and the bytes left replicated
under FSDP N (leaves whose dimensions do not divide by N or have no sharding rule). Also the trace and
lowering times; with ``--compile`` also XLA's compiled memory analysis (arguments, outputs, temporaries per
device) — slow on a CPU: the full-size image-stage step did not compile within 3 minutes on 2 cores.

Measured (2 CPU cores, jax 0.10.2, official 512², stage image, bf16, batch 64, data=1 x fsdp=8): 1,719 M
trainable + 1,289 M frozen parameters; params + AdamW state 24.02 GiB in total, 3.02 GiB per device under
FSDP 8 (1.006 x total / 8: 20 MiB of small leaves stay replicated), 24.02 GiB per device under FSDP 1;
eval_shape 3.6 s, trace 12.6 s, lowering 3.7 s.

Tracing note: ``XNemoTask.init`` builds the bundle with ``nnx.Rngs``, whose key counter makes tracing
quadratic in the number of parameters under flax 0.12.8 (every ``count += 1`` asks a tracer for its
sharding, which walks the whole jaxpr: about 2-4 minutes for the full-size bundle on 2 CPU cores).
:func:`abstract_train_state` therefore traces it with :class:`CountingRngs` (the same keys —
``fold_in(key, n)`` for the n-th draw, as ``nnx.Rngs.params()`` — counted in Python: seconds); the
tests check that both give the same abstract state on the tiny config. ``--exact-rngs`` traces with the
real ``nnx.Rngs``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if __name__ == "__main__" and "--mesh=cpu" in sys.argv:  # fake CPU devices: must be set before JAX starts
    _n = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--fsdp=")), "8")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_n}")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AbstractMesh, AxisType  # noqa: E402

from launch import models, sharding  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 1 << 30
CLIP_STAGES = ("temporal", "finetune")   # clips: 16 x 24 frames at full size (configs/xnemo.py)
PLACEHOLDER = "<abstract: never loaded>"  # frozen-weight paths: only their shapes are used here

# the groups of the state (top-level keys of state["model"]; "step" and "rng" are "other")
GROUPS = {"trainable": ("trainable", "gan_generator", "discriminator"), "frozen": ("fixed",),
          "buffers": ("buffers", "gan_buffers"), "optimizer": ("opt", "opt_gan", "opt_d")}


# --------------------------------------------------------------------------------------------- config
def make_config(variant: str = "official", stage: str | None = None, *, batch_size: int | None = None,
                num_frames: int | None = None, remat: bool | None = None):
    """``configs/xnemo.py:variant`` with ``stage``; full-size clip stages default to the paper's 16 x 24
    frames. Frozen loss-network paths get a placeholder (their shapes are all the lowering needs)."""
    from configs import xnemo  # noqa: PLC0415

    c = xnemo.get_config(variant)
    if stage is not None:
        c.stage = stage
    if variant == "official" and c.stage in CLIP_STAGES:
        c.batch_size, c.data.num_frames = 16, 24
    if batch_size is not None:
        c.batch_size = int(batch_size)
    if num_frames is not None:
        c.data.num_frames = int(num_frames)
    if remat is not None:
        c.model.remat = bool(remat)
    for term, key in (("vgg", "vgg19_path"), ("vggface", "vggface_path")):
        if c.loss[term] > 0 and not c.loss[key]:
            c.loss[key] = PLACEHOLDER
    return c


def abstract_mesh(data: int = 1, fsdp: int = 8, tensor: int = 1) -> AbstractMesh:
    """The runtime's ``(data, fsdp, tensor)`` mesh (Auto axes) without devices."""
    return AbstractMesh((data, fsdp, tensor), sharding.AXES, axis_types=(AxisType.Auto,) * len(sharding.AXES))


def device_mesh(data: int = 1, fsdp: int = 8, tensor: int = 1) -> jax.sharding.Mesh:
    """The same over real devices (``launch.sharding.make_mesh``; e.g. fake CPU devices)."""
    return sharding.make_mesh(dict(data=data, fsdp=fsdp, tensor=tensor))


@contextlib.contextmanager
def _mesh_context(mesh):
    if isinstance(mesh, AbstractMesh):
        with jax.sharding.use_abstract_mesh(mesh):
            yield
    else:
        with jax.set_mesh(mesh):
            yield


# ---------------------------------------------------------------------------------------- abstract state
class CountingRngs:
    """``nnx.Rngs(key)`` for modules that only draw ``params()`` (or ``()``): the n-th draw is
    ``fold_in(key, n)``, exactly nnx's default stream, but counted in Python, so tracing stays linear."""

    def __init__(self, key=0, **_):
        self.key = jax.random.key(key) if isinstance(key, int) else key
        self.count = 0

    def params(self):
        key = jax.random.fold_in(self.key, self.count)
        self.count += 1
        return key

    __call__ = default = params


@contextlib.contextmanager
def counting_rngs():
    """Temporarily replaces ``flax.nnx.Rngs`` (which ``XNemoTask.init`` calls) with :class:`CountingRngs`."""
    original = nnx.Rngs
    nnx.Rngs = CountingRngs
    try:
        yield
    finally:
        nnx.Rngs = original


def runtime_init_fn(task, seed: int):
    """``launch.trainer.Runtime``'s ``init_fn``: ``{"step", "rng", "model": task.init(init_key)}``."""
    init_key, run_key = jax.random.split(jax.random.key(seed))

    def init_fn():
        return {"step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(run_key), "model": task.init(init_key)}

    return init_fn


def abstract_train_state(task, seed: int, mesh, *, exact_rngs: bool = False):
    """``jax.eval_shape`` of the runtime's initial state under ``mesh`` (see the module note on the RNGs)."""
    init_fn = runtime_init_fn(task, seed)
    with _mesh_context(mesh), (contextlib.nullcontext() if exact_rngs else counting_rngs()):
        return jax.eval_shape(init_fn)


def abstract_batch(config, task) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch the runtime feeds the step (``input_pipeline.pipeline.MakeXNemoClip``'s numeric keys)."""
    b, f, r = int(config.batch_size), int(config.data.num_frames), int(config.data.resolution)
    m, c = task.motion_size, task.clip_size
    u8, f32, i32 = jnp.uint8, jnp.float32, jnp.int32
    shapes = {"reference": ((b, r, r, 3), u8), "frames": ((b, f, r, r, 3), u8), "motion": ((b, f, m, m, 3), u8),
              "reference_motion": ((b, m, m, 3), u8), "f_rts": ((b, f, 3), f32), "clip_pixels": ((b, c, c, 3), f32),
              "clip_index": ((b,), i32), "start": ((b,), i32), "reference_index": ((b,), i32)}
    return {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in shapes.items()}


def abstract_frozen(task) -> dict:
    """The frozen loss networks' abstract weights (the runtime loads them replicated)."""
    return {name: abstract for name, (_, abstract) in task.frozen_weights().items()}


# ------------------------------------------------------------------------------------------- train step
def jit_train_step(task, mesh, shardings, frozen):
    """The train step jitted as ``launch.trainer.Runtime`` jits it (same function, shardings, donation).
    (The runtime builds it inside ``Runtime.__init__``, which also opens the data and the checkpointer, so
    it is restated here; keep the two in step.)"""
    frozen_sh = jax.tree.map(lambda _: sharding.replicated(mesh), frozen)
    batch_sh = sharding.batch_sharding(mesh)
    repl = sharding.replicated(mesh)

    def train_step(state, frozen, batch):
        step = state["step"]
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
        model, m = task.train_step(state["model"], frozen, batch, step, rng)
        return {"step": step + 1, "rng": state["rng"], "model": model}, m

    return jax.jit(train_step, in_shardings=(shardings, frozen_sh, batch_sh), out_shardings=(shardings, repl),
                   donate_argnums=(0,))


def lower_train_step(task, config, mesh, abstract, shardings):
    """(lowered, trace seconds, lower seconds) of the sharded train step on abstract arguments."""
    frozen = abstract_frozen(task)
    step = jit_train_step(task, mesh, shardings, frozen)
    repl = sharding.replicated(mesh)
    args = (sharding.with_shardings(abstract, shardings),
            jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), frozen),
            {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh))
             for k, v in abstract_batch(config, task).items()})
    t0 = time.perf_counter()
    with _mesh_context(mesh):
        traced = step.trace(*args)
        t1 = time.perf_counter()
        # an abstract mesh names no devices: the platform to lower for is given explicitly
        lowered = traced.lower(lowering_platforms=(jax.default_backend(),)) if isinstance(mesh, AbstractMesh) \
            else traced.lower()
    return lowered, t1 - t0, time.perf_counter() - t1


# -------------------------------------------------------------------------------------------- memory
def _group(path) -> str:
    keys = [str(getattr(p, "key", getattr(p, "idx", p))) for p in path]
    if keys[0] != "model":
        return "other"
    return next((g for g, names in GROUPS.items() if keys[1] in names), "other")


def memory_table(abstract, shardings) -> dict[str, dict]:
    """Per group: elements, total bytes, per-device bytes (shard shape x itemsize summed over leaves) and
    the bytes of the leaves that stay replicated; plus ``params_and_optimizer`` (all but step/RNG)."""
    flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
    shards = jax.tree.leaves(shardings)
    assert len(flat) == len(shards), (len(flat), len(shards))
    out = {g: dict(leaves=0, elements=0, bytes=0, per_device_bytes=0, replicated_bytes=0)
           for g in (*GROUPS, "other")}
    for (path, x), s in zip(flat, shards, strict=True):
        row = out[_group(path)]
        item = np.dtype(x.dtype).itemsize
        total = math.prod(x.shape) * item
        local = math.prod(s.shard_shape(x.shape)) * item
        row["leaves"] += 1
        row["elements"] += math.prod(x.shape)
        row["bytes"] += total
        row["per_device_bytes"] += local
        row["replicated_bytes"] += total if local == total else 0
    out["params_and_optimizer"] = {k: sum(out[g][k] for g in GROUPS) for k in out["trainable"]}
    return out


def compiled_memory(lowered) -> dict:
    mem = lowered.compile().memory_analysis()
    if mem is None:
        return {}
    return {k: int(getattr(mem, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                               "temp_size_in_bytes", "alias_size_in_bytes",
                                               "generated_code_size_in_bytes") if hasattr(mem, k)}


def measure(variant: str = "official", stage: str | None = None, *, fsdp: int = 8, batch_size: int | None = None,
            num_frames: int | None = None, mesh_kind: str = "abstract", lower: bool = True, compile: bool = False,
            exact_rngs: bool = False, remat: bool | None = None) -> dict:
    """Everything the table shows, as a dict (the JSON)."""
    config = make_config(variant, stage, batch_size=batch_size, num_frames=num_frames, remat=remat)
    make = abstract_mesh if mesh_kind == "abstract" else device_mesh
    mesh, mesh1 = make(1, fsdp, 1), make(1, 1, 1)
    if config.batch_size % sharding.batch_shards(mesh):   # the runtime's check (launch/trainer.py _check_batch)
        raise ValueError(f"batch_size {config.batch_size} does not divide by the data x fsdp mesh size {fsdp}")
    rules = tuple(tuple(r) for r in config.sharding_rules)
    t0 = time.perf_counter()
    task = models.make_task(config)
    t1 = time.perf_counter()
    abstract = abstract_train_state(task, int(config.seed), mesh, exact_rngs=exact_rngs)
    t2 = time.perf_counter()
    shardings = sharding.state_shardings(abstract, mesh, rules)
    result = {"variant": variant, "stage": task.stage, "batch_size": int(config.batch_size),
              "num_frames": task.num_frames, "resolution": task.model_config.resolution,
              "dtype": str(config.model.dtype), "remat": bool(config.model.remat), "gan_head": task.use_gan,
              "mesh": dict(mesh.shape),
              "mesh_kind": mesh_kind,
              "task_s": t1 - t0, "eval_shape_s": t2 - t1, "exact_rngs": exact_rngs,
              f"fsdp{fsdp}": memory_table(abstract, shardings),
              "fsdp1": memory_table(abstract, sharding.state_shardings(abstract, mesh1, rules))}
    if lower or compile:
        lowered, trace_s, lower_s = lower_train_step(task, config, mesh, abstract, shardings)
        result.update(trace_s=trace_s, lower_s=lower_s, hlo_chars=len(lowered.as_text()))
        if compile:
            t3 = time.perf_counter()
            result["compiled"] = compiled_memory(lowered)
            result["compile_s"] = time.perf_counter() - t3
    return result


# ---------------------------------------------------------------------------------------------- main
def print_table(r: dict, fsdp: int) -> None:
    big = r[f"fsdp{fsdp}"]
    unit, scale = ("GiB", 1 << 30) if big["params_and_optimizer"]["bytes"] >= 1 << 30 else ("MiB", 1 << 20)
    print(f"X-NeMo {r['variant']} {r['resolution']}², stage {r['stage']!r}, {r['dtype']} compute, batch "
          f"{r['batch_size']} x {r['num_frames']} frame(s), remat {'on' if r['remat'] else 'off'}, "
          f"GAN head {'on' if r['gan_head'] else 'off'}; "
          f"mesh data=1 x fsdp={fsdp} ({r['mesh_kind']})")
    print(f"{'group':22s} {'leaves':>6s} {'params (M)':>11s} {f'total {unit}':>10s} {f'FSDP{fsdp} {unit}/dev':>15s} "
          f"{f'FSDP1 {unit}/dev':>14s} {f'replicated {unit}':>15s}")
    for g in (*GROUPS, "other", "params_and_optimizer"):
        a, b = big[g], r["fsdp1"][g]
        print(f"{g:22s} {a['leaves']:6d} {a['elements'] / 1e6:11.1f} {a['bytes'] / scale:10.3f} "
              f"{a['per_device_bytes'] / scale:15.3f} {b['per_device_bytes'] / scale:14.3f} "
              f"{a['replicated_bytes'] / scale:15.3f}")
    tot = big["params_and_optimizer"]
    print(f"params + optimizer per device with FSDP {fsdp}: {tot['per_device_bytes'] / tot['bytes'] * fsdp:.4f} x "
          f"(total / {fsdp}); task {r['task_s']:.1f} s, eval_shape {r['eval_shape_s']:.1f} s"
          + (f", trace {r['trace_s']:.1f} s, lower {r['lower_s']:.1f} s" if "lower_s" in r else ", not lowered"))
    if "compiled" in r:
        c = {k: v / GiB for k, v in r["compiled"].items()}
        print(f"compiled in {r['compile_s']:.0f} s; per device: arguments "
              f"{c.get('argument_size_in_bytes', 0):.2f} GiB, "
              f"outputs {c.get('output_size_in_bytes', 0):.2f} GiB (aliased {c.get('alias_size_in_bytes', 0):.2f}), "
              f"temporaries {c.get('temp_size_in_bytes', 0):.2f} GiB")
    else:
        print("compiled memory analysis: skipped (--mesh=cpu --compile; the full-size step compiles for more than "
              "3 minutes on a 2-core CPU)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=("official", "tiny"), default="official")
    p.add_argument("--stage", choices=("image", "motion", "temporal", "finetune", "all"), default=None)
    p.add_argument("--fsdp", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--num-frames", type=int, default=None)
    p.add_argument("--mesh", choices=("abstract", "cpu"), default="abstract")
    p.add_argument("--no-lower", action="store_true", help="memory figures only")
    p.add_argument("--compile", action="store_true", help="also compile (needs --mesh=cpu) for XLA's memory analysis")
    p.add_argument("--exact-rngs", action="store_true", help="trace init with the real nnx.Rngs (slow)")
    p.add_argument("--remat", choices=("config", "on", "off"), default="config",
                   help="gradient checkpointing of the UNets (config: the variant's model.remat)")
    p.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "xnemo_train_memory.json"))
    args = p.parse_args()
    if args.compile and args.mesh != "cpu":
        p.error("--compile needs --mesh=cpu (an abstract mesh has no devices to compile for)")

    r = measure(args.variant, args.stage, fsdp=args.fsdp, batch_size=args.batch_size, num_frames=args.num_frames,
                mesh_kind=args.mesh, lower=not args.no_lower, compile=args.compile, exact_rngs=args.exact_rngs,
                remat={"config": None, "on": True, "off": False}[args.remat])
    print_table(r, args.fsdp)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"benchmark": "xnemo_train_memory", **r, "backend": jax.default_backend(), "cpus": os.cpu_count(),
                   "python": platform.python_version(), "jax": jax.__version__}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
