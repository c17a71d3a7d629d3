"""Checkpoint files: every Orbax call of portrait-jax lives here.

A *params checkpoint* (written by ``launch/convert.py``, read by inference and as a training
initialisation) is a folder::

    DIR/model.json     {"model": "liax", "config": {...LiaXConfig fields...}, "metadata": {...}}
    DIR/params/        Orbax PyTree checkpoint of the parameters (a nested dict of arrays)

``metadata`` carries what a user of the weights needs beyond the architecture, e.g. the names of the
motion directions of an official LIA-X checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os

from input_pipeline.errors import UserError

MODEL_FILE = "model.json"


def save_params(directory: str, model_name: str, config: dict, params: dict, metadata: dict | None = None) -> None:
    """Writes ``params`` (nested dict of arrays) and the model description to ``directory``."""
    import orbax.checkpoint as ocp  # noqa: PLC0415

    directory = os.path.abspath(directory)
    if os.path.exists(os.path.join(directory, "params")):
        raise UserError("already holds a params checkpoint; choose a new --output folder", directory)
    os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(directory, "params"), params)
        ckptr.wait_until_finished()
    with open(os.path.join(directory, MODEL_FILE), "w") as f:
        json.dump({"model": model_name, "config": config, "metadata": metadata or {}}, f, indent=1)


def read_model_info(directory: str) -> dict:
    path = os.path.join(directory, MODEL_FILE)
    if not os.path.exists(path):
        raise UserError(f"not a portrait-jax params checkpoint (no {MODEL_FILE})", directory)
    with open(path) as f:
        return json.load(f)


def load_params(directory: str, abstract_params: dict | None = None) -> tuple[dict, dict]:
    """``(model info, params)``; with ``abstract_params`` the arrays are restored onto its shapes/shardings."""
    import orbax.checkpoint as ocp  # noqa: PLC0415

    info = read_model_info(directory)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(os.path.join(os.path.abspath(directory), "params"), abstract_params)
    return info, params


# ------------------------------------------------------------------------------ finding model weights
@dataclasses.dataclass(frozen=True)
class ModelCheckpoint:
    """Model weights found on disk: a params checkpoint or one step of a training run.

    ``config`` is the model's architecture config; ``metadata`` what the params checkpoint carries (for
    a training run: ``{}``); ``train_config`` the full training config (training runs only).
    """

    path: str
    kind: str  # "params" or "train"
    model: str
    config: dict
    metadata: dict
    step: int | None = None
    train_config: dict | None = None


def _train_steps(directory: str) -> list[int]:
    steps = []
    for name in os.listdir(directory):
        if name.isdigit() and os.path.isdir(os.path.join(directory, name, "state")):
            steps.append(int(name))
    return sorted(steps)


def find_model_checkpoint(path: str) -> ModelCheckpoint:
    """Resolves ``path``: a params checkpoint folder, a training workdir, its ``checkpoints/`` folder
    (newest step) or one step folder. Reads only JSON; raises :class:`UserError` naming ``path``."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise UserError("no such checkpoint folder", path)
    if not os.path.isdir(path):
        raise UserError("not a checkpoint folder (expected a folder written by launch/train.py or "
                        "launch/convert.py)", path)
    if os.path.exists(os.path.join(path, MODEL_FILE)):
        info = read_model_info(path)
        if not os.path.isdir(os.path.join(path, "params")):
            raise UserError("params checkpoint without its params/ folder", path)
        return ModelCheckpoint(path, "params", info.get("model", ""), info.get("config", {}), info.get("metadata", {}))
    step_dir = path
    if not os.path.isdir(os.path.join(path, "state")):
        root = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
        steps = _train_steps(root)
        if not steps:
            raise UserError(f"not a portrait-jax checkpoint (no {MODEL_FILE}, no training checkpoints)", path)
        step_dir = os.path.join(root, str(steps[-1]))
    config_file = os.path.join(step_dir, "config", "metadata")
    try:
        with open(config_file) as f:
            train_config = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"training checkpoint without a readable config ({type(e).__name__})", step_dir) from e
    name = os.path.basename(step_dir.rstrip("/"))
    return ModelCheckpoint(step_dir, "train", train_config.get("model_name", ""), train_config.get("model", {}), {},
                           int(name) if name.isdigit() else None, train_config)


def restore_model_params(found: ModelCheckpoint, abstract_params: dict, train_item: tuple[str, ...]) -> dict:
    """The model parameters of ``found`` as a nested dict shaped like ``abstract_params``.

    For a training step only the subtree ``state[train_item]`` (e.g. ``("model", "generator")``) is read,
    not the optimizer or discriminator states. ``abstract_params`` leaves are ``jax.ShapeDtypeStruct``
    (optionally with a sharding; default: the first device).
    """
    import jax  # noqa: PLC0415
    import orbax.checkpoint as ocp  # noqa: PLC0415

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract_params = jax.tree.map(
        lambda x: x if getattr(x, "sharding", None) is not None
        else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_params)
    try:
        if found.kind == "params":
            return load_params(found.path, abstract_params)[1]
        # the train state holds nnx Variables, which Orbax stores as {"value": array}
        target = jax.tree.map(lambda x: {"value": x}, abstract_params)
        for key in reversed(train_item):
            target = {key: target}
        with ocp.PyTreeCheckpointer() as ckptr:
            restored = ckptr.restore(os.path.join(found.path, "state"), args=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - Orbax raises many types for unreadable or mismatched data
        first = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"cannot read the model weights ({type(e).__name__}: {first[:200]})", found.path) from e
    for key in train_item:
        restored = restored[key]
    return jax.tree.map(lambda v: v["value"], restored, is_leaf=lambda v: isinstance(v, dict) and "value" in v)



# --------------------------------------------------------------------------------------- training state
class TrainCheckpointer:
    """Orbax ``CheckpointManager`` for training runs: ``DIR/<step>/{state,data,config}``.

    * ``state``: the runtime's train state (model + optimizer + step + RNG), restored onto the sharded
      abstract target so a run can resume on a different mesh;
    * ``data``: the Grain iterator state of this process (one file per process);
    * ``config``: the resolved config as JSON (for humans and tools; not needed to resume).

    Saves are asynchronous (the train loop continues while the arrays are written) and keep the newest
    ``max_to_keep``. Orbax writes each step to a temporary folder and renames it when complete, so a run
    killed mid-save leaves no half-written step behind; a step that is present but unreadable (a
    corrupted file) is moved to ``DIR.corrupt/`` with a warning and the previous step is used.
    """

    def __init__(self, directory: str, *, max_to_keep: int = 3, asynchronous: bool = True):
        import orbax.checkpoint as ocp  # noqa: PLC0415

        self.directory = os.path.abspath(directory)
        self._ocp = ocp
        self._options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                     cleanup_tmp_directories=True,
                                                     enable_async_checkpointing=asynchronous)
        self._open()

    def _open(self):
        self.manager = self._ocp.CheckpointManager(self.directory, options=self._options,
                                                   item_names=("state", "data", "config"))

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iterator, config: dict) -> None:
        import grain  # noqa: PLC0415

        args = self._ocp.args.Composite(state=self._ocp.args.StandardSave(state),
                                        data=grain.checkpoint.CheckpointSave(data_iterator),
                                        config=self._ocp.args.JsonSave(config))
        self.manager.save(step, args=args, force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def restore_latest(self, abstract_state, data_iterator):
        """``(step, state)`` of the newest readable checkpoint (or ``None``); the iterator is restored in place."""
        import grain  # noqa: PLC0415
        import jax  # noqa: PLC0415
        from absl import logging  # noqa: PLC0415

        for step in reversed(self.all_steps()):
            try:
                args = self._ocp.args.Composite(state=self._ocp.args.StandardRestore(abstract_state),
                                                data=grain.checkpoint.CheckpointRestore(data_iterator))
                restored = self.manager.restore(step, args=args)
                return step, restored["state"]
            except Exception as e:  # noqa: BLE001 - any failure to read a step means "unusable"
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                logging.warning("checkpoint step %d in %s is unreadable (%s); falling back to the previous one",
                                step, self.directory, reason[:300])
                self._quarantine(step)
                if jax.process_count() > 1:
                    from jax.experimental import multihost_utils  # noqa: PLC0415
                    multihost_utils.sync_global_devices(f"quarantine-{step}")
                self.manager.close()
                self._open()
        return None

    def _quarantine(self, step: int) -> None:
        import shutil  # noqa: PLC0415
        import time  # noqa: PLC0415

        import jax  # noqa: PLC0415

        if jax.process_index() != 0:
            return
        src = os.path.join(self.directory, str(step))
        if os.path.isdir(src):
            dst_dir = self.directory.rstrip("/") + ".corrupt"
            os.makedirs(dst_dir, exist_ok=True)
            shutil.move(src, os.path.join(dst_dir, f"{step}-{int(time.time())}"))
