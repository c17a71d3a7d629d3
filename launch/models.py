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

from input_pipeline.errors import UserError

TASKS = {"liax": "liax_jax.training", "xnemo": "xnemo_jax.training"}


def make_task(config):
    name = config.get("model_name", "")
    if name not in TASKS:
        raise UserError(f"unknown model_name {name!r}; trainable models: {sorted(TASKS)}", "config.model_name")
    module = importlib.import_module(TASKS[name])
    try:
        return module.make_task(config)
    except ValueError as e:
        raise UserError(str(e), "config") from e
