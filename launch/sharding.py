"""Device mesh, logical-axis rules and shardings: the one place that maps model state onto devices.

* :func:`make_mesh` builds the ``("data", "fsdp", "tensor")`` mesh with ``AxisType.Auto`` (GSPMD style)
  from the config's ``mesh`` sizes (``-1`` fills the remaining devices).
* Parameters carry *logical* axis names (``nnx.Param(..., sharding_names=(...))`` metadata, e.g.
  ``(None, None, "conv_in", "conv_out")`` for a conv kernel). A short rule table from the config
  (``sharding_rules``: ``(("conv_out", "fsdp"), ("conv_in", "tensor"), ...)``) maps them to mesh axes.
  :func:`state_shardings` turns an abstract state (any pytree; nnx ``Variable`` leaves contribute their
  logical names, everything else is replicated) into a pytree of ``NamedSharding`` of the same structure.
  A dimension whose size does not divide by its mesh axes is left unsharded (replicated) rather than
  failing, so one rule table serves every model size.
* Batches are sharded on their leading axis over ``("data", "fsdp")``; :func:`global_batch` assembles
  the global arrays from each process's local batch (``jax.make_array_from_process_local_data``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from input_pipeline.errors import UserError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_config: Mapping, num_devices: int) -> tuple[int, ...]:
    """Axis sizes for ``num_devices``; one ``-1`` fills what is left. The product may be < num_devices."""
    sizes = [int(mesh_config.get(a, 1)) for a in AXES]
    if sum(s == -1 for s in sizes) > 1:
        raise UserError(f"mesh: at most one axis may be -1, got {dict(zip(AXES, sizes, strict=True))}", "config.mesh")
    if any(s == 0 or s < -1 for s in sizes):
        raise UserError(f"mesh: axis sizes must be positive or -1, got {dict(zip(AXES, sizes, strict=True))}",
                        "config.mesh")
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % fixed:
            raise UserError(f"mesh: {num_devices} devices do not divide by the fixed axes {fixed}", "config.mesh")
        sizes[sizes.index(-1)] = num_devices // fixed
    if math.prod(sizes) > num_devices:
        raise UserError(f"mesh {dict(zip(AXES, sizes, strict=True))} needs {math.prod(sizes)} devices, "
                        f"only {num_devices} available", "config.mesh")
    return tuple(sizes)


def make_mesh(mesh_config: Mapping, devices: Sequence | None = None) -> jax.sharding.Mesh:
    """The ``(data, fsdp, tensor)`` mesh with Auto axis types over ``devices`` (default: all devices).

    A mesh smaller than the device count uses the first devices (handy for 1-device reference runs).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    n = math.prod(shape)
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices[:n])


def _axis_size(mesh: jax.sharding.Mesh, axes) -> int:
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in axes)


def logical_to_mesh_spec(names: Sequence | None, shape: Sequence[int], mesh: jax.sharding.Mesh,
                         rules: Sequence[tuple[str, str | Sequence[str] | None]]) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec; unmatched names, non-divisible dims and reused mesh
    axes stay unsharded."""
    if not names:
        return PartitionSpec()
    table = {}
    for logical, physical in rules:
        table.setdefault(logical, physical)
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape, strict=True):
        physical = table.get(name) if name is not None else None
        if physical is None:
            spec.append(None)
            continue
        axes = (physical,) if isinstance(physical, str) else tuple(physical)
        axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
        if not axes or size % _axis_size(mesh, axes):
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def logical_names(variable: nnx.Variable):
    meta = variable.get_metadata()
    return meta.get("out_sharding", meta.get("sharding_names"))


def state_shardings(abstract_state, mesh: jax.sharding.Mesh, rules) -> object:
    """NamedShardings for every leaf of ``abstract_state`` (same pytree structure)."""

    def one(x):
        if _is_variable(x):
            spec = logical_to_mesh_spec(logical_names(x), x.shape, mesh, rules)
            return x.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, abstract_state, is_leaf=_is_variable)


def with_shardings(abstract_state, shardings):
    """``ShapeDtypeStruct``s carrying the target shardings (an Orbax restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1)
    return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def batch_shards(mesh: jax.sharding.Mesh) -> int:
    return _axis_size(mesh, BATCH_AXES)


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Global arrays (leading axis sharded over data x fsdp) from this process's numeric arrays."""
    sharding = batch_sharding(mesh)
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        if value.dtype.kind in "biuf":
            out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out


def describe(mesh: jax.sharding.Mesh) -> str:
    return " x ".join(f"{a}={mesh.shape[a]}" for a in AXES) + f" ({mesh.devices.size} devices)"
