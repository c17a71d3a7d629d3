"""DDIM noise schedule and sampler as pure JAX functions, reproducing diffusers' ``DDIMScheduler``.

What is reproduced (diffusers 0.42 ``schedulers/scheduling_ddim.py``, re-implemented here, no torch):

* the training schedule: betas for ``linear``, ``scaled_linear`` (linspace of sqrt(beta) squared) and
  ``squaredcos_cap_v2`` (``betas_for_alpha_bar`` with the cosine alpha_bar
  ``cos((t + 0.008) / 1.008 * pi / 2) ** 2`` and ``max_beta = 0.999``) or ``trained_betas``; the optional
  zero-terminal-SNR rescale (Lin et al. 2023, Algorithm 1); ``alphas_cumprod`` and ``final_alpha_cumprod``
  (``set_alpha_to_one``). These are computed once in numpy and are **bit-identical** to diffusers' float32
  tensors: torch's CPU ``linspace`` evaluates ``start + step * i`` (first half) / ``end - step * (n-1-i)``
  (second half) as fused multiply-adds in float32, and torch's CPU ``cumprod`` accumulates float32 inputs in
  float64 and rounds each partial product to float32 -- both emulated exactly below (a plain float32
  ``np.cumprod`` would be off by up to ~5e-7); verified against torch 2.13 on x86-64 (AVX2). Only the
  zero-SNR rescale may differ by an ulp or so: it takes square roots, which numpy rounds correctly and that
  torch build does not always (<= 0.75 ulp), giving alphas_cumprod differences <= ~4e-7;
* ``set_timesteps`` for ``timestep_spacing`` ``leading`` / ``trailing`` / ``linspace`` with ``steps_offset``:
  the same numpy expressions and int64 results, the same ``ValueError`` when ``num_inference_steps`` exceeds
  ``num_train_timesteps``;
* ``step`` (DDIM, Song et al. 2020, eq. 12) for ``prediction_type`` ``epsilon`` / ``v_prediction`` /
  ``sample``, with ``eta`` (caller-supplied ``noise``), ``clip_sample`` / ``clip_sample_range``, dynamic
  ``thresholding`` and ``use_clipped_model_output``; the previous timestep is ``t - num_train_timesteps //
  num_inference_steps`` exactly as diffusers does (for every spacing), and ``final_alpha_cumprod`` is used
  when it is negative;
* ``add_noise`` (forward process), ``get_velocity`` (v-prediction target), ``scale_model_input`` (identity)
  and ``init_noise_sigma = 1``.

Everything after the schedule is computed in float32 (float64 if the inputs are float64 under x64), works on
any array layout -- the model layout here is channels-last, e.g. ``(B, F, H, W, C)`` video latents -- and is
jit-able with a traced timestep. Configuration (and ``num_inference_steps``) is static pytree metadata of
:class:`DDIMState`; the schedule arrays are its leaves.

X-NeMo's settings (``configs/inference/inference_xnemo_stage2.yaml`` of the official code, see
``shared/reference/xnemo_official.md`` §1.7) are :data:`XNEMO_DDIM_CONFIG`: ``beta_start 0.00085, beta_end
0.02, beta_schedule "scaled_linear", clip_sample False, steps_offset 1, prediction_type "epsilon"`` and
diffusers' defaults otherwise (1000 training steps, ``set_alpha_to_one True``, ``leading`` spacing, no
thresholding, no zero-SNR rescale). Sampling uses ``eta = 0``; 35 steps give timesteps 953, 925, ..., 29, 1
and 25 steps 961, 921, ..., 41, 1.

Typical use::

    state = set_timesteps(make_schedule(XNEMO_DDIM_CONFIG), 35)
    for t in state.timesteps:
        eps = unet(latents, int(t))
        latents, _ = step(state, eps, int(t), latents)

or :func:`sample_loop` for the whole loop.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xnemo_jax import layers

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DDIMConfig:
    """The ``DDIMScheduler`` constructor arguments; defaults are diffusers' (not X-NeMo's, see
    :data:`XNEMO_DDIM_CONFIG`). Frozen and hashable (``trained_betas`` is stored as a tuple), so it can be
    static metadata under ``jax.jit``. Invalid values raise ``ValueError`` at construction."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    clip_sample: bool = True
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    clip_sample_range: float = 1.0
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False

    def __post_init__(self):
        def fix(name, value):
            object.__setattr__(self, name, value)

        if isinstance(self.num_train_timesteps, bool) or int(self.num_train_timesteps) != self.num_train_timesteps \
                or self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive integer, got {self.num_train_timesteps!r}")
        fix("num_train_timesteps", int(self.num_train_timesteps))
        if int(self.steps_offset) != self.steps_offset:
            raise ValueError(f"steps_offset must be an integer, got {self.steps_offset!r}")
        fix("steps_offset", int(self.steps_offset))
        for name in ("beta_start", "beta_end", "dynamic_thresholding_ratio", "clip_sample_range", "sample_max_value"):
            fix(name, float(getattr(self, name)))
        for name in ("clip_sample", "set_alpha_to_one", "thresholding", "rescale_betas_zero_snr"):
            fix(name, bool(getattr(self, name)))
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"Unknown beta_schedule {self.beta_schedule!r}; expected one of {BETA_SCHEDULES}")
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"Unknown timestep_spacing {self.timestep_spacing!r}; expected one of {TIMESTEP_SPACINGS}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"Unknown prediction_type {self.prediction_type!r}; expected one of {PREDICTION_TYPES}")
        if self.trained_betas is not None:
            betas = tuple(float(b) for b in np.asarray(self.trained_betas, np.float64).reshape(-1))
            if len(betas) != self.num_train_timesteps:
                raise ValueError(f"trained_betas has {len(betas)} entries but num_train_timesteps is "
                                 f"{self.num_train_timesteps}")
            fix("trained_betas", betas)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | str | os.PathLike | DDIMConfig) -> DDIMConfig:
        """From a diffusers scheduler config: a dict, or the path of a ``scheduler_config.json`` (or of the
        folder holding one). Keys that are not ``DDIMScheduler`` arguments (``_class_name``,
        ``_diffusers_version``, ``skip_prk_steps``, ...) are ignored, so e.g. SD-1.5's PNDM config works."""
        if isinstance(config, DDIMConfig):
            return config
        if isinstance(config, (str, os.PathLike)):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "scheduler_config.json")
            with open(path) as f:
                config = json.load(f)
        return cls(**layers.config_fields(cls, config))

    def to_dict(self) -> dict[str, Any]:
        """Plain keyword arguments (``trained_betas`` as a list), e.g. for ``diffusers.DDIMScheduler(**d)``."""
        d = dataclasses.asdict(self)
        if d["trained_betas"] is not None:
            d["trained_betas"] = list(d["trained_betas"])
        return d

    def replace(self, **changes) -> DDIMConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


XNEMO_DDIM_CONFIG = DDIMConfig(beta_start=0.00085, beta_end=0.02, beta_schedule="scaled_linear",
                               clip_sample=False, steps_offset=1, prediction_type="epsilon")
"""X-NeMo's inference scheduler (official ``inference_xnemo_stage2.yaml``; the rest diffusers defaults)."""


# ----------------------------------------------------------------------------------------------------------
# Training schedule (numpy, bit-exact with diffusers' torch float32 tensors)
# ----------------------------------------------------------------------------------------------------------

def _fma_f32(a, b, c) -> np.ndarray:
    """float32 ``a * b + c`` rounded once, like a hardware fused multiply-add (numpy has none).

    ``a`` and ``b`` are float32 values, so their product is exact in float64; the float64 sum is then rounded
    to float32. Double rounding can only be wrong when that float64 sum lies exactly halfway between two
    float32 numbers while the exact sum does not; the exact error of the float64 addition (TwoSum) settles
    those ties.
    """
    a, b, c = (np.asarray(x, np.float32).astype(np.float64) for x in (a, b, c))
    p = a * b
    s = p + c
    bv = s - p
    err = (p - (s - bv)) + (c - bv)
    r = s.astype(np.float32)
    other = np.nextafter(r, np.where(s > r, np.float32(np.inf), np.float32(-np.inf)).astype(np.float32))
    tie = (s != r) & (s == (r.astype(np.float64) + other.astype(np.float64)) / 2) & (err != 0)
    toward = np.where(err > 0, np.maximum(r, other), np.minimum(r, other))
    return np.where(tie, toward, r).astype(np.float32)


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` on CPU, bit for bit.

    start/end are rounded to float32, ``step = (end - start) / (steps - 1)`` in float32, and element ``i`` is
    ``fma(step, i, start)`` for ``i < steps // 2`` and ``fma(-step, steps - 1 - i, end)`` otherwise.
    """
    start32, end32 = np.float32(start), np.float32(end)
    if steps <= 1:
        return np.full((max(steps, 0),), start32, np.float32)
    step = np.float32((end32 - start32) / np.float32(steps - 1))
    i = np.arange(steps)
    from_start = _fma_f32(step, i.astype(np.float32), start32)
    from_end = _fma_f32(-step, (steps - 1 - i).astype(np.float32), end32)
    return np.where(i < steps // 2, from_start, from_end).astype(np.float32)


def cumprod_f32(x: np.ndarray) -> np.ndarray:
    """``torch.cumprod`` of a float32 vector on CPU: products accumulated in float64, each rounded to float32."""
    return np.cumprod(np.asarray(x, np.float32).astype(np.float64)).astype(np.float32)


def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Betas (float32) discretising the cosine ``alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2) ** 2``:
    ``beta_i = min(1 - alpha_bar((i + 1) / N) / alpha_bar(i / N), max_beta)`` in float64, then float32
    (``squaredcos_cap_v2``, Nichol & Dhariwal 2021)."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_diffusion_timesteps
    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale float32 betas so the last timestep has zero SNR (Lin et al. 2023, "Common Diffusion Noise
    Schedules and Sample Steps are Flawed", Algorithm 1): shift sqrt(alpha_bar) so its last value is 0 and
    scale so its first value is unchanged, then go back to betas. float32 arithmetic like diffusers'."""
    alphas = np.float32(1.0) - np.asarray(betas, np.float32)
    sqrt_ab = np.sqrt(cumprod_f32(alphas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alphas_bar = sqrt_ab * sqrt_ab
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


def make_betas(config: DDIMConfig) -> np.ndarray:
    """The float32 betas of a config (``trained_betas`` first, then ``beta_schedule``, then the optional
    zero-SNR rescale), equal to diffusers' ``DDIMScheduler(...).betas``."""
    c = config
    if c.trained_betas is not None:
        betas = np.asarray(c.trained_betas, np.float32)
    elif c.beta_schedule == "linear":
        betas = torch_linspace_f32(c.beta_start, c.beta_end, c.num_train_timesteps)
    elif c.beta_schedule == "scaled_linear":
        root = torch_linspace_f32(c.beta_start ** 0.5, c.beta_end ** 0.5, c.num_train_timesteps)
        betas = root * root
    elif c.beta_schedule == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(c.num_train_timesteps)
    else:  # unreachable: DDIMConfig validates
        raise ValueError(f"Unknown beta_schedule {c.beta_schedule!r}")
    if c.rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas.astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DDIMState:
    """Schedule arrays (pytree leaves) plus static metadata (``config``, ``num_inference_steps``).

    ``betas``, ``alphas_cumprod``: float32 ``(num_train_timesteps,)``; ``final_alpha_cumprod``: float32 scalar
    (1 with ``set_alpha_to_one``, else ``alphas_cumprod[0]``). ``num_inference_steps`` is ``None`` until
    :func:`set_timesteps`. Pass it to jitted functions as an ordinary argument.
    """

    betas: jax.Array
    alphas_cumprod: jax.Array
    final_alpha_cumprod: jax.Array
    config: DDIMConfig
    num_inference_steps: int | None = None

    @property
    def timesteps(self) -> np.ndarray:
        """The sampling timesteps, int64 numpy, descending (all training timesteps before set_timesteps)."""
        if self.num_inference_steps is None:
            return np.arange(self.config.num_train_timesteps, dtype=np.int64)[::-1].copy()
        return compute_timesteps(self.config, self.num_inference_steps)

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial noise: 1 for DDIM."""
        return 1.0

    @property
    def step_ratio(self) -> int:
        """``num_train_timesteps // num_inference_steps``: how far back :func:`step` goes."""
        if self.num_inference_steps is None:
            raise ValueError("num_inference_steps is None: call set_timesteps(state, n) first")
        return self.config.num_train_timesteps // self.num_inference_steps


jax.tree_util.register_dataclass(DDIMState, data_fields=["betas", "alphas_cumprod", "final_alpha_cumprod"],
                                 meta_fields=["config", "num_inference_steps"])


def make_schedule(config: DDIMConfig | Mapping[str, Any] | str | os.PathLike) -> DDIMState:
    """The training schedule of a config (a :class:`DDIMConfig`, a diffusers config dict or its json path)."""
    config = DDIMConfig.from_config(config)
    betas = make_betas(config)
    alphas_cumprod = cumprod_f32(np.float32(1.0) - betas)
    final = np.float32(1.0) if config.set_alpha_to_one else alphas_cumprod[0]
    return DDIMState(betas=jnp.asarray(betas), alphas_cumprod=jnp.asarray(alphas_cumprod),
                     final_alpha_cumprod=jnp.asarray(final, jnp.float32), config=config)


def compute_timesteps(config: DDIMConfig, num_inference_steps: int) -> np.ndarray:
    """diffusers' ``DDIMScheduler.set_timesteps`` timesteps (int64 numpy, descending), same expressions:

    * ``leading``: ``arange(n) * (T // n)`` reversed, ``+ steps_offset``;
    * ``trailing``: ``round(arange(T, 0, -T / n)) - 1``;
    * ``linspace``: ``round(linspace(0, T - 1, n))`` reversed.

    As in diffusers, ``leading`` with ``steps_offset`` can yield ``T`` itself (e.g. n = T, offset 1), a
    timestep that :func:`step` then rejects (eagerly; under jit the table lookup would clamp it).
    """
    n = num_inference_steps
    num_train = config.num_train_timesteps
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {n!r}")
    n = int(n)
    if n > num_train:
        raise ValueError(f"num_inference_steps ({n}) cannot be larger than num_train_timesteps ({num_train}): "
                         f"the model trained with this scheduler only knows {num_train} timesteps")
    if config.timestep_spacing == "leading":
        ratio = num_train // n
        timesteps = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64)
        timesteps += config.steps_offset
    elif config.timestep_spacing == "trailing":
        ratio = num_train / n
        timesteps = np.round(np.arange(num_train, 0, -ratio)).astype(np.int64) - 1
    elif config.timestep_spacing == "linspace":
        timesteps = np.linspace(0, num_train - 1, n).round()[::-1].copy().astype(np.int64)
    else:  # unreachable: DDIMConfig validates
        raise ValueError(f"Unknown timestep_spacing {config.timestep_spacing!r}; expected one of {TIMESTEP_SPACINGS}")
    return timesteps


def set_timesteps(state_or_config: DDIMState | DDIMConfig | Mapping[str, Any], num_inference_steps: int) -> DDIMState:
    """The state for ``num_inference_steps`` sampling steps (its ``timesteps`` are diffusers'). A config is
    turned into a schedule first. Raises ``ValueError`` when ``num_inference_steps`` is not in
    ``[1, num_train_timesteps]``."""
    state = state_or_config if isinstance(state_or_config, DDIMState) else make_schedule(state_or_config)
    compute_timesteps(state.config, num_inference_steps)  # validates
    return dataclasses.replace(state, num_inference_steps=int(num_inference_steps))


# ----------------------------------------------------------------------------------------------------------
# Sampling / training functions (jit-able)
# ----------------------------------------------------------------------------------------------------------

def _compute_dtype(*arrays) -> jnp.dtype:
    return jnp.result_type(jnp.float32, *(jnp.asarray(a).dtype for a in arrays))


def _per_sample(coef: jax.Array, ndim: int) -> jax.Array:
    """A scalar stays a scalar; a ``(B,)`` vector broadcasts over the leading axis of an ``ndim`` array."""
    return coef if coef.ndim == 0 else coef.reshape(coef.shape + (1,) * (ndim - coef.ndim))


def _check_concrete_timestep(timestep, num_train: int, what: str = "timestep"):
    if isinstance(timestep, jax.core.Tracer):
        return
    t = np.asarray(timestep)
    if t.size and (t.min() < 0 or t.max() >= num_train):
        raise ValueError(f"{what} {t.tolist()} out of range [0, {num_train})")


def scale_model_input(state: DDIMState, sample: jax.Array, timestep=None) -> jax.Array:
    """DDIM does not scale the model input: returns ``sample`` unchanged."""
    del state, timestep
    return sample


def threshold_sample(sample: jax.Array, ratio: float = 0.995, max_value: float = 1.0) -> jax.Array:
    """Dynamic thresholding (Imagen, Saharia et al. 2022): per sample (all axes but the first), ``s`` = the
    ``ratio`` quantile of ``|x|`` (linear interpolation, like ``torch.quantile``) clamped to ``[1,
    max_value]``; returns ``clip(x, -s, s) / s``. Layout-agnostic (the quantile ignores element order)."""
    flat = sample.reshape(sample.shape[0], -1)
    s = jnp.quantile(jnp.abs(flat), ratio, axis=1, method="linear")
    s = jnp.clip(s, 1.0, max_value)[:, None].astype(flat.dtype)
    return (jnp.clip(flat, -s, s) / s).reshape(sample.shape)


def step(state: DDIMState, model_output: jax.Array, timestep, sample: jax.Array, eta: float = 0.0,
         noise: jax.Array | None = None, use_clipped_model_output: bool = False) -> tuple[jax.Array, jax.Array]:
    """One DDIM step from ``timestep`` t to ``t - num_train_timesteps // num_inference_steps``.

    Args:
      state: a schedule after :func:`set_timesteps`.
      model_output: the model's prediction (noise, v or x0 depending on ``config.prediction_type``), the shape
        of ``sample`` (any layout).
      timestep: an integer scalar (Python int or a traced int array; a ``(B,)`` vector also works and is
        broadcast over the leading axis).
      sample: the current noisy sample x_t.
      eta: DDIM's eta (0: deterministic DDIM, 1: DDPM-like). A Python number: noise is added when ``eta >
        0`` (as diffusers); a traced value: ``noise`` is required and added where ``eta > 0``.
      noise: standard normal noise of ``sample``'s shape, needed when noise is added (diffusers'
        ``variance_noise``; there is no generator here).
      use_clipped_model_output: recompute the noise from the clipped/thresholded x0 (diffusers' flag).

    Returns:
      ``(prev_sample, pred_original_sample)`` in float32 (float64 for float64 inputs under x64).

    The arithmetic runs as one jitted computation (compiled once per shape), also when called eagerly.
    """
    if state.num_inference_steps is None:
        raise ValueError("num_inference_steps is None: call set_timesteps(state, n) before step")
    _check_concrete_timestep(timestep, state.config.num_train_timesteps)
    static_eta = isinstance(eta, (int, float, np.number))
    noise_mode = ("add" if eta > 0 else "none") if static_eta else "where"
    if noise_mode != "none" and noise is None:
        raise ValueError("step with eta > 0 (or a traced eta) needs `noise` (standard normal, the sample's "
                         "shape), e.g. jax.random.normal(key, sample.shape)")
    return _step(state, model_output, timestep, sample, eta, noise if noise_mode != "none" else None,
                 noise_mode=noise_mode, use_clipped_model_output=bool(use_clipped_model_output))


@functools.partial(jax.jit, static_argnames=("noise_mode", "use_clipped_model_output"))
def _step(state: DDIMState, model_output, timestep, sample, eta, noise, *, noise_mode: str,
          use_clipped_model_output: bool):
    cfg = state.config
    dtype = _compute_dtype(model_output, sample)
    model_output = jnp.asarray(model_output, dtype)
    sample = jnp.asarray(sample, dtype)
    ndim = sample.ndim

    t = jnp.asarray(timestep, jnp.int32)
    prev_t = t - state.step_ratio
    alphas_cumprod = state.alphas_cumprod.astype(dtype)
    alpha_t = _per_sample(alphas_cumprod[t], ndim)
    alpha_prev = jnp.where(prev_t >= 0, alphas_cumprod[jnp.maximum(prev_t, 0)],
                           state.final_alpha_cumprod.astype(dtype))
    alpha_prev = _per_sample(alpha_prev, ndim)
    beta_t = 1 - alpha_t

    if cfg.prediction_type == "epsilon":
        pred_x0 = (sample - jnp.sqrt(beta_t) * model_output) / jnp.sqrt(alpha_t)
        pred_eps = model_output
    elif cfg.prediction_type == "sample":
        pred_x0 = model_output
        pred_eps = (sample - jnp.sqrt(alpha_t) * pred_x0) / jnp.sqrt(beta_t)
    else:  # v_prediction
        pred_x0 = jnp.sqrt(alpha_t) * sample - jnp.sqrt(beta_t) * model_output
        pred_eps = jnp.sqrt(alpha_t) * model_output + jnp.sqrt(beta_t) * sample

    if cfg.thresholding:
        pred_x0 = threshold_sample(pred_x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
    elif cfg.clip_sample:
        pred_x0 = jnp.clip(pred_x0, -cfg.clip_sample_range, cfg.clip_sample_range)

    variance = ((1 - alpha_prev) / beta_t) * (1 - alpha_t / alpha_prev)
    eta = jnp.asarray(eta, dtype)
    std_dev = eta * jnp.sqrt(variance)

    if use_clipped_model_output:
        pred_eps = (sample - jnp.sqrt(alpha_t) * pred_x0) / jnp.sqrt(beta_t)

    direction = jnp.sqrt(1 - alpha_prev - std_dev ** 2) * pred_eps
    prev_sample = jnp.sqrt(alpha_prev) * pred_x0 + direction

    if noise_mode != "none":
        added = std_dev * jnp.asarray(noise, dtype)
        prev_sample = prev_sample + (added if noise_mode == "add" else jnp.where(eta > 0, added, 0))
    return prev_sample, pred_x0


@jax.jit
def _sqrt_alphas(state: DDIMState, timesteps, like: jax.Array) -> tuple[jax.Array, jax.Array]:
    """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t), flattened and broadcast over the leading axis of ``like``."""
    alpha = state.alphas_cumprod.astype(like.dtype)[jnp.asarray(timesteps, jnp.int32)].reshape(-1)
    shape = alpha.shape + (1,) * max(like.ndim - 1, 0)
    return jnp.sqrt(alpha).reshape(shape), jnp.sqrt(1 - alpha).reshape(shape)


def add_noise(state: DDIMState, original_samples: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
    """Forward diffusion ``sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * noise``; ``timesteps`` is a scalar
    or one per sample (leading axis). float32 result (diffusers computes in the samples' dtype)."""
    _check_concrete_timestep(timesteps, state.config.num_train_timesteps, "timesteps")
    dtype = _compute_dtype(original_samples, noise)
    x0, noise = jnp.asarray(original_samples, dtype), jnp.asarray(noise, dtype)
    sqrt_a, sqrt_1ma = _sqrt_alphas(state, timesteps, x0)
    return sqrt_a * x0 + sqrt_1ma * noise


def get_velocity(state: DDIMState, sample: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
    """The v-prediction target ``sqrt(alpha_bar_t) * noise - sqrt(1 - alpha_bar_t) * sample`` (Salimans & Ho
    2022), ``sample`` being the clean x0; ``timesteps`` as in :func:`add_noise`."""
    _check_concrete_timestep(timesteps, state.config.num_train_timesteps, "timesteps")
    dtype = _compute_dtype(sample, noise)
    sample, noise = jnp.asarray(sample, dtype), jnp.asarray(noise, dtype)
    sqrt_a, sqrt_1ma = _sqrt_alphas(state, timesteps, sample)
    return sqrt_a * noise - sqrt_1ma * sample


def sample_loop(state: DDIMState | DDIMConfig | Mapping[str, Any], model_fn: Callable[[jax.Array, int], jax.Array],
                latents: jax.Array, num_inference_steps: int, eta: float = 0.0,
                noise_fn: Callable[[int, int], jax.Array] | None = None,
                use_clipped_model_output: bool = False) -> jax.Array:
    """Run the whole DDIM loop and return the final latents (float32).

    ``latents`` are the initial x_T (already multiplied by ``init_noise_sigma`` = 1). For each timestep t
    (Python int, descending) ``model_fn(latents, t)`` returns the model output, and with ``eta > 0``
    ``noise_fn(i, t)`` returns step ``i``'s standard normal noise. A Python loop over :func:`step` (jitted
    with a traced timestep: compiled once); ``model_fn`` runs as given (jit it yourself).
    """
    state = set_timesteps(state, num_inference_steps)
    add = eta > 0
    if add and noise_fn is None:
        raise ValueError("sample_loop with eta > 0 needs noise_fn(i, t) -> standard normal noise")
    x = jnp.asarray(latents, _compute_dtype(latents))
    for i, t in enumerate(state.timesteps.tolist()):
        output = model_fn(scale_model_input(state, x, t), t)
        noise = noise_fn(i, t) if add else None
        x, _ = step(state, output, t, x, eta=eta, noise=noise, use_clipped_model_output=use_clipped_model_output)
    return x
