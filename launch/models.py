"""Which model package trains which ``config.model_name`` (the runtime itself is model-agnostic).

A model package's training module exposes ``make_task(config) -> task`` where ``task`` has

* ``init(rng) -> state``: a pure, jit-able initialiser of the trainable state (params and optimizer
  states; nnx ``Variable`` leaves may carry logical axis names, see :mod:`launch.sharding`);
  a task with ``eager_init = True`` is initialised op by op and then placed (compiling thousands of
  small random initialisers can take minutes on a CPU);
* ``frozen_weights() -> {name: (path, abstract_tree)}``: pretrained, non-trained weights the steps need
  (e.g. VGG19); the runtime loads each params checkpoint from ``path`` replicated;
* ``train_step(state, frozen, batch, step, rng) -> (state, metrics)``: one optimisation step; ``metrics``
  are scalars and always include ``loss`` (the generator's total loss);
* ``eval_step(state, frozen, batch) -> ({name: (B,) per-example values}, {column: (B, H, W, 3) images
  in [-1, 1]})``: metrics and the sample columns for summaries from one forward pass (the runtime keeps
  the images of the first batch of each eval set only); a batch may carry ``target`` (cross-identity
  data) and otherwise the target is the driving frame;
* ``describe(state) -> str``: a one-line summary (parameter counts) for the log.
"""

from __future__ import annotations

import importlib
import os

from input_pipeline.errors import UserError
from launch import checkpointing

TASKS = {"liax": "liax_jax.training", "xnemo": "xnemo_jax.training"}


def make_task(config):
    name = config.get("model_name", "")
    if name not in TASKS:
        raise UserError(f"unknown model_name {name!r}; trainable models: {sorted(TASKS)}", "config.model_name")
    module = importlib.import_module(TASKS[name])
    try:
        task = module.make_task(config)
        previous = getattr(task, "init_from_workdir", "")
        if previous:
            _attach_previous_run(task, previous)
        if getattr(task, "init_sd", ""):
            _attach_sd(task, task.init_sd)
        return task
    except ValueError as e:
        raise UserError(str(e), "config") from e


def _attach_previous_run(task, path: str) -> None:
    """``init.from_workdir``: the newest checkpoint of a previous training run of the same model; the task
    restores the subtrees it needs from it (no optimizer states) in its ``init``."""
    found = checkpointing.find_model_checkpoint(path)
    if found.kind != "train" or found.model != task.name:
        raise UserError(f"init.from_workdir needs a {task.name} training run, found a "
                        f"{found.model or 'unknown'!r} {found.kind} checkpoint", found.path)
    task.attach_previous_run(found.train_config or {}, f"{found.path}, step {found.step}",
                             lambda abstract: checkpointing.restore_model_params(found, abstract, ("model",)))


def _attach_sd(task, path: str) -> None:
    """``init.sd``: the ``launch/convert.py sd`` output folder (``unet/``, ``vae/``, ``image_encoder/`` params
    checkpoints); the task checks the kinds and restores the weights in its ``init``."""
    if not os.path.isdir(path):
        raise UserError("init.sd: no such folder (write it with `python launch/convert.py sd --unet=... "
                        "--vae=... --clip=... --output=DIR`)", path)
    parts = {}
    for part in task.SD_PARTS:
        folder = os.path.join(path, part)
        if not os.path.isdir(folder):
            continue   # the task names what is missing
        info = checkpointing.read_model_info(folder)
        parts[part] = (info.get("model", ""), info.get("config", {}), folder,
                       lambda abstract, folder=folder: checkpointing.load_params(folder, abstract)[1])
    task.attach_sd(parts)
