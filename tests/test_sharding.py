"""launch/sharding.py: mesh factory, logical-axis rules, state shardings, global batches (8 fake CPUs)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from input_pipeline.errors import UserError
from launch import sharding

RULES = (("conv_out", "fsdp"), ("conv_in", "tensor"), ("embed_out", ("data", "fsdp")))


def test_mesh_shape_fills_and_validates():
    assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
    assert sharding.mesh_shape({"data": 1, "fsdp": 1, "tensor": 1}, 8) == (1, 1, 1)
    with pytest.raises(UserError, match="at most one axis"):
        sharding.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)
    with pytest.raises(UserError, match="do not divide"):
        sharding.mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)
    with pytest.raises(UserError, match="needs 16 devices"):
        sharding.mesh_shape({"data": 4, "fsdp": 4, "tensor": 1}, 8)


def test_make_mesh_uses_auto_axes_and_first_devices():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 1})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert list(mesh.devices.flat) == jax.devices()[:4]


def test_logical_rules_respect_divisibility_and_axis_reuse():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    spec = sharding.logical_to_mesh_spec
    assert spec((None, None, "conv_in", "conv_out"), (3, 3, 16, 32), mesh, RULES) == P(None, None, None, "fsdp")
    # 6 output channels do not split over fsdp=4: replicated rather than an error
    assert spec((None, None, "conv_in", "conv_out"), (3, 3, 16, 6), mesh, RULES) == P()
    # a mesh axis is used once per array
    assert spec(("conv_out", "conv_out"), (8, 8), mesh, RULES) == P("fsdp")
    assert spec(("embed_in", "embed_out"), (4, 16), mesh, RULES) == P(None, ("data", "fsdp"))
    assert spec(None, (4,), mesh, RULES) == P()


class _Tiny(nnx.Module):
    def __init__(self, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (3, 3, 4, 16)),
                           out_sharding=(None, None, "conv_in", "conv_out"), eager_sharding=False)
        self.b = nnx.Param(jnp.zeros((16,)))


def test_state_shardings_follow_param_metadata_into_optimizer_state():
    import optax

    mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})

    def init():
        params = nnx.state(_Tiny(nnx.Rngs(0)), nnx.Param)
        return {"params": params, "opt": optax.adam(1e-3).init(params), "step": jnp.zeros((), jnp.int32)}

    abstract = jax.eval_shape(init)
    shardings = sharding.state_shardings(abstract, mesh, RULES)
    state = jax.jit(init, out_shardings=shardings)()
    assert state["params"]["w"][...].sharding.spec == P(None, None, None, "fsdp")
    assert state["params"]["b"][...].sharding.spec == P()
    mu = state["opt"][0].mu
    assert mu["w"][...].sharding.spec == P(None, None, None, "fsdp")
    # the restore target carries the same shardings
    target = sharding.with_shardings(abstract, shardings)
    assert jax.tree.leaves(target)[0].sharding is not None


def test_global_batch_shards_leading_axis_and_drops_non_numeric():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    local = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3), "name": np.array(["a"] * 16)}
    batch = sharding.global_batch(local, mesh)
    assert set(batch) == {"x"}
    assert batch["x"].sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(batch["x"]), local["x"])
    assert sharding.batch_shards(mesh) == 8
