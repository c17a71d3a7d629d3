"""Random official-layout state dicts for the X-NeMo networks (tests only).

Filled straight from numpy for every ``{key: torch shape}`` of ``official_keys`` (no per-shape random
programs, no slow module init): weights scaled by 1/sqrt(fan-in), 1-D tensors around 1 (``weight``) or 0,
positive ``running_var``, int64 ``num_batches_tracked``, and the sinusoidal ``pe`` tables plus
``pe_noise`` (so a test can tell a file's tables from the constructor's).
"""

from __future__ import annotations

import numpy as np


def random_official_state(shapes: dict[str, tuple], seed: int, *, pe_noise: float = 0.0) -> dict[str, np.ndarray]:
    from xnemo_jax.denoiser import sinusoidal_table

    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            value = np.asarray(rng.integers(0, 1000), np.int64)
        elif key.endswith("running_var"):
            value = 0.5 + rng.random(shape)
        elif key.endswith(".pe") and len(shape) == 3 and shape[0] == 1:
            value = sinusoidal_table(shape[1], shape[2]) + pe_noise * rng.standard_normal(shape)
        elif len(shape) <= 1:
            value = float(key.endswith("weight")) + 0.1 * rng.standard_normal(shape)
        else:
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        state[key] = np.asarray(value, np.int64 if key.endswith("num_batches_tracked") else np.float32)
    return state
