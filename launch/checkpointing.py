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

