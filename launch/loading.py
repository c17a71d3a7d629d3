"""Model weights on disk -> ready-to-run models, for the CLIs (and notebooks, the app).

Checkpoint discovery (:func:`launch.checkpointing.find_model_checkpoint`: a params checkpoint written by
``launch/convert.py``, or a training workdir / its ``checkpoints/`` / one step folder of
``launch/train.py``) and the restore live here, in the runtime layer; the model packages only take
parameters, so they stay free of file I/O and import with jax, flax, optax and numpy alone.
"""

from __future__ import annotations

import dataclasses

from input_pipeline.errors import UserError
from launch import checkpointing


@dataclasses.dataclass(frozen=True)
class Found:
    """Weights found on disk, validated from their JSON alone: where, the model config, the metadata."""

    checkpoint: checkpointing.ModelCheckpoint
    config: object   # the model package's config dataclass (e.g. liax_jax.model.LiaXConfig)
    metadata: dict

    @property
    def path(self) -> str:
        return self.checkpoint.path


def read_liax(checkpoint: str, dtype: str | None = None) -> Found:
    """LIA-X weights on disk, reading only JSON (cheap; checks them before a slow load).

    Metadata keys: ``directions`` (name -> ids, see :func:`liax_jax.inference.direction_names`; a
    training run takes them from its config's ``directions``), ``mouth_directions`` (ids whose edits make
    the manipulation sweep swing positive twice) and, for a training run, ``step``. ``dtype`` overrides
    the compute dtype (``float32`` or ``bfloat16``). Raises :class:`UserError` naming the checkpoint.
    """
    from liax_jax.inference import direction_names  # noqa: PLC0415
    from liax_jax.model import LiaXConfig  # noqa: PLC0415

    found = checkpointing.find_model_checkpoint(checkpoint)
    if found.model != "liax":
        raise UserError(f"holds a {found.model or 'unknown'!r} model checkpoint, not LIA-X", found.path)
    cfg = dict(found.config)
    if dtype:
        cfg["dtype"] = dtype
    try:
        config = LiaXConfig.from_config(cfg)
        metadata = dict(found.metadata)
        if found.kind == "train":
            metadata["directions"] = found.train_config.get("directions", "")
            metadata["step"] = found.step
        metadata["directions"] = direction_names(metadata.get("directions"))
        metadata["mouth_directions"] = [int(i) for i in metadata.get("mouth_directions", [])]
    except (ValueError, TypeError) as e:
        raise UserError(f"bad model description: {e}", found.path) from e
    return Found(found, config, metadata)


def load_liax(checkpoint: str | Found, *, dtype: str | None = None, chunk_size: int = 8):
    """``(liax_jax.inference.Runner, metadata)`` for LIA-X weights on disk: a path (``dtype`` as in
    :func:`read_liax`) or :func:`read_liax`'s result. From a training run only the generator is read,
    not the optimizer or discriminator."""
    from flax import nnx  # noqa: PLC0415

    from liax_jax.inference import Runner  # noqa: PLC0415
    from liax_jax.model import LiaX  # noqa: PLC0415

    found = checkpoint if isinstance(checkpoint, Found) else read_liax(checkpoint, dtype)
    abstract = nnx.eval_shape(lambda: LiaX(found.config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    params = checkpointing.restore_model_params(found.checkpoint, nnx.to_pure_dict(abstract_state),
                                                ("model", "generator"))
    nnx.replace_by_pure_dict(abstract_state, params)
    return Runner(nnx.merge(graphdef, abstract_state), chunk_size), found.metadata


def read_xnemo(checkpoint: str, dtype: str | None = None) -> Found:
    """X-NeMo weights on disk (a params checkpoint of ``launch/convert.py xnemo``), reading only JSON.
    ``dtype`` overrides the compute dtype. Raises :class:`UserError` naming the checkpoint."""
    from xnemo_jax.model import XNemoConfig  # noqa: PLC0415

    found = checkpointing.find_model_checkpoint(checkpoint)
    if found.model != "xnemo":
        raise UserError(f"holds a {found.model or 'unknown'!r} model checkpoint, not X-NeMo", found.path)
    if found.kind != "params":
        raise UserError("is an X-NeMo training step; export it with launch/convert.py first", found.path)
    try:
        config = XNemoConfig.from_dict({**found.config, **({"dtype": dtype} if dtype else {})})
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"bad model description: {type(e).__name__}: {e}", found.path) from e
    return Found(found, config, dict(found.metadata))


def load_xnemo(checkpoint: str | Found, *, dtype: str | None = None):
    """``(xnemo_jax.model.XNemo, metadata)`` for X-NeMo weights on disk: every network's parameters,
    BatchNorm statistics and buffers, restored onto the abstract bundle (nothing allocated twice)."""
    from flax import nnx  # noqa: PLC0415

    from xnemo_jax import model as model_lib  # noqa: PLC0415

    found = checkpoint if isinstance(checkpoint, Found) else read_xnemo(checkpoint, dtype)
    graphdef, abstract_state = nnx.split(model_lib.abstract(found.config))
    params = checkpointing.restore_model_params(found.checkpoint, nnx.to_pure_dict(abstract_state), ("model",))
    nnx.replace_by_pure_dict(abstract_state, params)
    return nnx.merge(graphdef, abstract_state), found.metadata
