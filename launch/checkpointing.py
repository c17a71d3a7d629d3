"""Checkpoint files: every Orbax call of portrait-jax lives here.

A *params checkpoint* (written by ``launch/convert.py``, read by inference and as a training
initialisation) is a folder::

    DIR/model.json     {"model": "liax", "config": {...LiaXConfig fields...}, "metadata": {...}}
    DIR/params/        Orbax PyTree checkpoint of the parameters (a nested dict of arrays)

``metadata`` carries what a user of the weights needs beyond the architecture, e.g. the names of the
motion directions of an official LIA-X checkpoint.
"""

from __future__ import annotations

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
        import jax  # noqa: PLC0415
        import shutil  # noqa: PLC0415
        import time  # noqa: PLC0415

        if jax.process_index() != 0:
            return
        src = os.path.join(self.directory, str(step))
        if os.path.isdir(src):
            dst_dir = self.directory.rstrip("/") + ".corrupt"
            os.makedirs(dst_dir, exist_ok=True)
            shutil.move(src, os.path.join(dst_dir, f"{step}-{int(time.time())}"))
