"""X-NeMo training at full size, abstractly: the official train state and its FSDP-8 lowering.

* The official 512² variant builds abstractly and its train step, jitted as the runtime jits it, lowers on a
  data 1 x fsdp 8 mesh; parameters + optimizer state take 1/8 of their bytes per device, up to the small
  leaves left replicated (``benchmarks/xnemo_train_memory.py``).
"""

import time

import numpy as np
import pytest


# ------------------------------------------------------------------------------- official, abstractly
@pytest.fixture(scope="module")
def bench():
    from benchmarks import xnemo_train_memory  # (benchmarks/ is a namespace package under ROOT)

    return xnemo_train_memory


def test_official_train_step_lowers_on_eight_devices_with_an_eighth_of_the_state_each(bench):
    t0 = time.perf_counter()
    r = bench.measure("official", fsdp=8)
    print(f"official image stage: task {r['task_s']:.1f} s, eval_shape {r['eval_shape_s']:.1f} s, trace "
          f"{r['trace_s']:.1f} s, lower {r['lower_s']:.1f} s, all {time.perf_counter() - t0:.1f} s")
    assert r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and r["resolution"] == 512 and r["batch_size"] == 64
    assert r["hlo_chars"] > 0
    eight, one = r["fsdp8"], r["fsdp1"]
    trainable, opt = eight["trainable"]["elements"], eight["optimizer"]["elements"]
    assert 1.6e9 < trainable < 1.8e9 and eight["frozen"]["elements"] > 1e9      # UNet + reference net; VAE, CLIP...
    assert 2 * trainable <= opt <= 2 * trainable + 100                          # AdamW mu + nu (+ counts)
    both = eight["params_and_optimizer"]
    # sharded leaves split exactly 8 ways (fsdp is the only axis > 1); the rest is the replicated remainder
    assert both["per_device_bytes"] == (both["bytes"] - both["replicated_bytes"]) // 8 + both["replicated_bytes"]
    assert both["replicated_bytes"] < 2e-3 * both["bytes"], both                 # measured 0.08 %
    assert both["per_device_bytes"] < 1.01 * both["bytes"] / 8
    assert one["params_and_optimizer"]["per_device_bytes"] == both["bytes"] > 20 * 2**30   # FSDP 1: everything


def test_counting_rngs_draw_the_keys_of_nnx_rngs(bench):
    """The benchmark traces ``init`` with :class:`CountingRngs` (linear tracing time): the same keys."""
    import jax
    from flax import nnx

    key = jax.random.key(7)
    make = lambda rngs: nnx.state((nnx.Linear(3, 4, rngs=rngs), nnx.Conv(2, 5, (3, 3), rngs=rngs)))  # noqa: E731
    want, got = jax.tree.leaves(make(nnx.Rngs(key))), jax.tree.leaves(make(bench.CountingRngs(key)))
    assert len(want) == len(got) == 4
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_benchmark_batch_spec_is_the_runtime_batch(bench):
    """The lowered step's inputs are the batches the runtime feeds (keys, shapes, dtypes)."""
    from launch import models, sharding, trainer

    config = bench.make_config("tiny", batch_size=4)
    task = models.make_task(config)
    it, _ = trainer._make_data(config, 4, False, task)
    real = sharding.global_batch(next(it), sharding.make_mesh({"data": 1}))
    spec = bench.abstract_batch(config, task)
    assert {k: (v.shape, v.dtype) for k, v in real.items()} == {k: (v.shape, v.dtype) for k, v in spec.items()}
