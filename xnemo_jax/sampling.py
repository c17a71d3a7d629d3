"""X-NeMo sampling: a portrait and driving crops in, animated frames out. Pure functions on arrays (no file
I/O, no image libraries: framing, cropping and resizing live in :mod:`input_pipeline`, the command line tool
in ``launch/animate.py xnemo``).

Facts: ``/work/shared/reference/xnemo_official.md`` §1.2, §1.6–§1.10 and §5b. The pipeline:

1. **Reference** (once per video): the loose ≈2x reference crop at the model resolution, in [-1, 1] ->
   SVD VAE encoder, posterior **mean** x ``scaling_factor`` -> the reference latent; its CLIP image
   embedding (``clip.preprocess`` of the same crop) -> the context ``(1, 1, D)``; the reference net at
   ``t = 0`` on the latent with that context -> the reference bank, **conditional half only** (the
   official code also computes an unconditional half that nothing reads).
2. **Motion** (once per video): the motion encoder over every tight driving crop, in fixed-size batches
   (``motion_batch``; the official code re-runs it for every window at every step), with f_rts the
   official constant (0, 0, 1) unless given. The negative motion is the code of the reference image's
   own pose crop.
3. **Initial latents** (§1.6): the reference latent repeated over the frames, blurred with torchvision's
   9x9 Gaussian of sigma 18 (reflect padding), noised to the first timestep with ``add_noise``; the noise
   is drawn from ``seed`` or passed in (torch's RNG cannot be reproduced; §5b).
4. **Denoising** (§1.7–§1.9): DDIM (eta 0) on the official schedule (``scheduler.XNEMO_DDIM_CONFIG``,
   epsilon prediction). Per step the frames are covered by closed-loop context windows: starts 0, s, 2s,
   ... below N (s = ``context_frames - context_overlap``), window frames ``(start + k + offset) mod N``,
   so the last window wraps around to the first frames; ``N <= context_frames`` gives one window of all
   frames and no offset. Each window is denoised as a CFG pair in one call -- unconditional: zero CLIP
   context, no reference bank (``bank_mask``), the negative motion; conditional: CLIP context, bank, the
   window's motion -- predictions are summed per frame with a counter, averaged, **then** guided
   (``eps_u + guidance * (eps_c - eps_u)``), then one DDIM step over all frames. ``window_batch``
   windows go through the denoiser together (the batch is ``2 * window_batch`` clips); the whole loop
   over steps and windows is **one compiled program** (``lax.fori_loop``) with fixed shapes.
   The per-step offsets are deterministic: drawn from ``seed`` (numpy PCG64, uniform in
   ``[0, context_frames)`` like the official ``random.randint(0, 23)``) or given as ``window_offsets``
   (which replays an official run).
5. **Decoding** (§1.10): latents / ``scaling_factor`` through the SVD temporal decoder in chunks of
   ``decode_chunk`` (25) consecutive frames (the decoder mixes frames within a chunk, so the chunk size is
   part of the result), streamed chunk by chunk.

What differs from the official code, on purpose: the motion encoder runs once per frame instead of once per
window per step; the unconditional reference pass is skipped; the offsets are reproducible; averaging
happens before guidance for every guidance value (the official code only divides inside its CFG branch);
the bank keeps the compute dtype (``bank_dtype="float16"`` mimics the official float16 cast).

Presets: ``paper`` (the paper's 25 DDIM steps, CFG 3.5; the default) and ``official`` (the release's call,
35 steps, CFG 2.5). :func:`interpolate_motion` is the paper's latent motion interpolation (motion codes
of a few keyframes, linearly interpolated, applied to any portrait: pass the result as ``motion=``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xnemo_jax import clip as clip_lib
from xnemo_jax import denoiser as denoiser_lib
from xnemo_jax import scheduler as ddim

PRESETS = {"paper": dict(steps=25, guidance=3.5), "official": dict(steps=35, guidance=2.5)}
NULL_F_RTS = (0.0, 0.0, 1.0)  # the official constant (dy, dx, s)
CONTEXT_FRAMES, CONTEXT_OVERLAP, DECODE_CHUNK = 24, 4, 25
BLUR_KERNEL, BLUR_SIGMA = 9, 18.0
# the reference crop's pose box: the 1.1x face square inside the 2x face crop (used when no pose crop is given)
POSE_FRACTION = 1.1 / 2.0


# ------------------------------------------------------------------------------------------ windows
@dataclasses.dataclass(frozen=True)
class WindowPlan:
    """How ``num_frames`` frames are covered per step (static: part of the compiled program's shape)."""

    num_frames: int
    context_frames: int = CONTEXT_FRAMES
    context_overlap: int = CONTEXT_OVERLAP
    window_batch: int = 1

    def __post_init__(self):
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.context_frames < 1:
            raise ValueError(f"context_frames must be >= 1, got {self.context_frames}")
        if not 0 <= self.context_overlap < self.context_frames:
            raise ValueError(f"context_overlap must be in [0, context_frames={self.context_frames}), "
                             f"got {self.context_overlap}")
        if self.window_batch < 1:
            raise ValueError(f"window_batch must be >= 1, got {self.window_batch}")

    @property
    def single(self) -> bool:
        """One window of all frames (``num_frames <= context_frames``): no offsets."""
        return self.num_frames <= self.context_frames

    @property
    def frames_per_window(self) -> int:
        return self.num_frames if self.single else self.context_frames

    @property
    def stride(self) -> int:
        return self.context_frames - self.context_overlap

    @property
    def num_windows(self) -> int:
        return 1 if self.single else math.ceil(self.num_frames / self.stride)

    @property
    def window_batch_used(self) -> int:
        return min(self.window_batch, self.num_windows)

    @property
    def num_groups(self) -> int:
        """Denoiser calls per step (the last group is padded with zero-weight windows)."""
        return math.ceil(self.num_windows / self.window_batch_used)

    def windows(self, offset: int = 0) -> np.ndarray:
        """``(num_windows, frames_per_window)`` frame indices of one step with ``offset``."""
        f = self.frames_per_window
        if self.single:
            return np.arange(f)[None]
        starts = np.arange(self.num_windows) * self.stride
        return (starts[:, None] + np.arange(f)[None] + int(offset)) % self.num_frames


def context_windows(num_frames: int, context_frames: int = CONTEXT_FRAMES, context_overlap: int = CONTEXT_OVERLAP,
                    offset: int = 0) -> np.ndarray:
    """The official closed-loop context windows of one step: ``(windows, frames)`` frame indices."""
    return WindowPlan(num_frames, context_frames, context_overlap).windows(offset)


def seeded_offsets(seed: int, steps: int, context_frames: int = CONTEXT_FRAMES) -> np.ndarray:
    """Deterministic per-step window offsets in ``[0, context_frames)`` (numpy PCG64 from ``seed``)."""
    return np.random.default_rng(seed).integers(0, context_frames, size=steps).astype(np.int32)


# --------------------------------------------------------------------------------- initial latents
def gaussian_kernel1d(kernel: int = BLUR_KERNEL, sigma: float = BLUR_SIGMA) -> np.ndarray:
    """torchvision's ``_get_gaussian_kernel1d`` (float32, normalised)."""
    half = (kernel - 1) * 0.5
    x = np.linspace(-half, half, kernel, dtype=np.float32)
    pdf = np.exp(-0.5 * np.square(x / np.float32(sigma)))
    return (pdf / pdf.sum()).astype(np.float32)


def gaussian_blur(x: jax.Array, kernel: int = BLUR_KERNEL, sigma: float = BLUR_SIGMA) -> jax.Array:
    """torchvision ``GaussianBlur(kernel, sigma)`` over the two spatial axes of channels-last ``(..., h, w,
    c)``: reflect padding of ``kernel // 2`` (needs h, w > kernel // 2), separable normalised kernel."""
    k = jnp.asarray(gaussian_kernel1d(kernel, sigma), x.dtype)
    p = kernel // 2
    if x.shape[-3] <= p or x.shape[-2] <= p:
        raise ValueError(f"latents of {x.shape[-3]}x{x.shape[-2]} are too small for a {kernel}x{kernel} blur")
    pad = [(0, 0)] * (x.ndim - 3) + [(p, p), (p, p), (0, 0)]
    x = jnp.pad(x, pad, mode="reflect")
    h, w = x.shape[-3] - 2 * p, x.shape[-2] - 2 * p
    x = sum(k[i] * x[..., i:i + h, :, :] for i in range(kernel))
    return sum(k[i] * x[..., :, i:i + w, :] for i in range(kernel))


def initial_latents(schedule: ddim.DDIMState, ref_latent: jax.Array, noise: jax.Array, *,
                    blur_kernel: int = BLUR_KERNEL, blur_sigma: float = BLUR_SIGMA) -> jax.Array:
    """§1.6: ``add_noise(blur(reference latent repeated), noise, first timestep)``; ``ref_latent`` ``(h, w,
    c)``, ``noise`` ``(N, h, w, c)`` -> ``(N, h, w, c)`` float32. (The blur acts per frame and every frame
    holds the same latent, so it is computed once.)"""
    blurred = gaussian_blur(jnp.asarray(ref_latent, jnp.float32), blur_kernel, blur_sigma)
    first = int(schedule.timesteps[0])
    return ddim.add_noise(schedule, jnp.broadcast_to(blurred, noise.shape), noise, first)


def schedule_for(steps: int) -> ddim.DDIMState:
    return ddim.set_timesteps(ddim.make_schedule(ddim.XNEMO_DDIM_CONFIG), steps)


# ----------------------------------------------------------------------------------------- motion
def interpolation_weights(num_keyframes: int, steps: int) -> np.ndarray:
    """``((num_keyframes - 1) * steps + 1, num_keyframes)`` weights: ``steps`` frames from each keyframe
    towards the next (linear), then the last keyframe."""
    if num_keyframes < 2 or steps < 1:
        raise ValueError(f"need >= 2 keyframes and steps >= 1, got {num_keyframes} and {steps}")
    rows = []
    for k in range(num_keyframes - 1):
        for a in np.arange(steps) / steps:
            w = np.zeros(num_keyframes, np.float32)
            w[k], w[k + 1] = 1.0 - a, a
            rows.append(w)
    last = np.zeros(num_keyframes, np.float32)
    last[-1] = 1.0
    return np.stack(rows + [last])


def interpolate_motion(keyframe_motion: jax.Array, steps: int) -> jax.Array:
    """The paper's latent motion interpolation: motion tokens ``(K, T, D)`` of K keyframes ->
    ``((K - 1) * steps + 1, T, D)`` linearly interpolated tokens (use as ``animate(..., motion=...)``)."""
    w = jnp.asarray(interpolation_weights(keyframe_motion.shape[0], steps))
    return jnp.einsum("nk,ktd->ntd", w, jnp.asarray(keyframe_motion, jnp.float32))


def _to_model_pixels(x: jax.Array) -> jax.Array:
    """uint8 ``[0, 255]`` -> float32 ``[-1, 1]``; float input is taken as already in [-1, 1]."""
    if x.dtype == jnp.uint8:
        return x.astype(jnp.float32) / 127.5 - 1.0
    return x.astype(jnp.float32)


# ------------------------------------------------------------------------------ compiled programs
@functools.partial(jax.jit, static_argnums=(0,))
def _encode_reference(graphdef, state, image):
    vae = nnx.merge(graphdef, state)
    x = _to_model_pixels(image)[None]
    return (vae.encode(x).mode() * vae.scaling_factor)[0].astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=(0,))
def _clip_context(graphdef, state, pixels):
    return nnx.merge(graphdef, state)(pixels[None]).image_embeds[:, None].astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _reference_bank(graphdef, state, ref_latent, context, bank_dtype):
    net = nnx.merge(graphdef, state)
    return denoiser_lib.reference_bank(net, ref_latent[None], context, timestep=0,
                                       bank_dtype=None if bank_dtype is None else jnp.dtype(bank_dtype))


@functools.partial(jax.jit, static_argnums=(0,))
def _motion(graphdef, state, crops, f_rts):
    return nnx.merge(graphdef, state)(_to_model_pixels(crops), f_rts).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _decode(graphdef, state, latents, num_frames):
    vae = nnx.merge(graphdef, state)
    frames = vae.decode(latents / vae.scaling_factor, num_frames)
    return jnp.clip(frames.astype(jnp.float32), -1.0, 1.0)


_PROGRESS: list = [None]  # the running loop's progress hook (callbacks arrive on an XLA host thread)
_PROGRESS_LOCK = threading.Lock()  # one denoising loop with a progress hook at a time


def _report_step(i) -> None:
    hook = _PROGRESS[0]
    if hook is not None:
        hook(int(i))


@functools.partial(jax.jit, static_argnames=("graphdef", "plan", "report"), donate_argnames=("latents",))
def _denoise(state, schedule, latents, bank, context, motion, negative_motion, offsets, guidance, *, graphdef,
             plan: WindowPlan, report: bool):
    """The whole DDIM loop over ``schedule``'s timesteps: ``latents`` ``(N, h, w, c)`` float32, ``bank``
    ``{key: (1, S, C)}``, ``context`` ``(1, 1, D)``, ``motion`` ``(N, T, d)``, ``negative_motion``
    ``(T, d)``, ``offsets`` ``(steps,)`` int32, ``guidance`` scalar."""
    den = nnx.merge(graphdef, state)
    dtype = den.dtype
    n, f, wb = plan.num_frames, plan.frames_per_window, plan.window_batch_used
    timesteps = jnp.asarray(schedule.timesteps, jnp.int32)
    frame_ids = jnp.arange(f, dtype=jnp.int32)
    ctx = jnp.concatenate([jnp.zeros((wb,) + context.shape[1:], dtype),
                           jnp.broadcast_to(context.astype(dtype), (wb,) + context.shape[1:])])
    neg = jnp.broadcast_to(negative_motion.astype(dtype), (wb, f) + negative_motion.shape)
    bank_mask = jnp.arange(2 * wb) >= wb  # [uncond x wb, cond x wb]
    motion = motion.astype(dtype)

    def window_group(g, carry, x, t, offset):
        acc, count = carry
        w = g * wb + jnp.arange(wb, dtype=jnp.int32)
        idx = (w[:, None] * plan.stride + frame_ids[None] + offset) % n  # (wb, f)
        weight = (w < plan.num_windows).astype(jnp.float32)  # padding windows count zero
        lat = x[idx].astype(dtype)
        eps = den(jnp.concatenate([lat, lat]), t, ctx, jnp.concatenate([neg, motion[idx]]), bank=bank,
                  bank_mask=bank_mask).astype(jnp.float32)
        eps = eps.reshape((2, wb * f) + eps.shape[2:]) * jnp.repeat(weight, f)[None, :, None, None, None]
        flat = idx.reshape(-1)
        return acc.at[:, flat].add(eps), count.at[flat].add(jnp.repeat(weight, f))

    def denoise_step(i, x):
        t = timesteps[i]
        offset = jnp.int32(0) if plan.single else offsets[i]
        init = (jnp.zeros((2,) + x.shape, jnp.float32), jnp.zeros((n,), jnp.float32))
        acc, count = jax.lax.fori_loop(0, plan.num_groups, lambda g, c: window_group(g, c, x, t, offset), init)
        mean = acc / count[None, :, None, None, None]
        eps = mean[0] + guidance * (mean[1] - mean[0])
        x, _ = ddim.step(schedule, eps, t, x)
        if report:
            jax.debug.callback(_report_step, i)
        return x

    return jax.lax.fori_loop(0, len(schedule.timesteps), denoise_step, latents.astype(jnp.float32))


# ---------------------------------------------------------------------------------------- sampler
class Sampler:
    """The compiled pieces of the pipeline over one loaded bundle (:class:`xnemo_jax.model.XNemo`, as
    ``convert.load_official`` or ``launch.loading.load_xnemo`` return it). Build once, reuse for many
    videos: every program compiles once per shape (motion batches are padded to ``motion_batch``)."""

    def __init__(self, models, *, motion_batch: int = 16, bank_dtype: str | None = None):
        if motion_batch < 1:
            raise ValueError(f"motion_batch must be >= 1, got {motion_batch}")
        self.models = models
        self.config = models.config
        self.motion_batch = int(motion_batch)
        self.bank_dtype = None if bank_dtype is None else jnp.dtype(bank_dtype).name
        self._split = {name: nnx.split(getattr(models, name)) for name in models.NETWORKS}

    def _run(self, fn, name, *args, **kwargs):
        graphdef, state = self._split[name]
        return fn(graphdef, state, *args, **kwargs)

    @property
    def resolution(self) -> int:
        return self.config.resolution

    @property
    def motion_size(self) -> int:
        return self.config.motion_encoder.image_size

    # ---------------------------------------------------------------------------- reference side
    def reference_latent(self, reference) -> jax.Array:
        """``(R, R, 3)`` uint8 (or float in [-1, 1]) reference crop -> latent ``(h, w, c)`` (posterior mean
        x scaling factor)."""
        r = self.resolution
        x = jnp.asarray(reference)
        if x.shape != (r, r, 3):
            raise ValueError(f"the reference crop must be ({r}, {r}, 3) (the model resolution), got {x.shape}")
        return self._run(_encode_reference, "vae", x)

    def clip_context(self, clip_pixels) -> jax.Array:
        """CLIP-preprocessed pixels ``(S, S, 3)`` (:func:`xnemo_jax.clip.preprocess`) -> ``(1, 1, D)``."""
        return self._run(_clip_context, "image_encoder", jnp.asarray(clip_pixels, jnp.float32))

    def reference_bank(self, ref_latent, context) -> dict[str, jax.Array]:
        """The conditional reference bank ``{key: (1, S, C)}`` (the reference net at t = 0)."""
        return self._run(_reference_bank, "reference_net", ref_latent, context, self.bank_dtype)

    # ------------------------------------------------------------------------------- motion side
    def motion(self, crops, f_rts=None) -> jax.Array:
        """Motion tokens ``(N, T, d)`` of driving crops ``(N, S, S, 3)`` (uint8, or float in [-1, 1]; S the
        motion encoder's input size), in padded batches of ``motion_batch``; ``f_rts`` ``(N, 3)`` or None
        (the official constant (0, 0, 1))."""
        crops = np.asarray(crops) if not isinstance(crops, jax.Array) else crops
        s = self.motion_size
        if crops.ndim != 4 or crops.shape[1:] != (s, s, 3):
            raise ValueError(f"driving crops must be (N, {s}, {s}, 3), got {crops.shape}")
        n = crops.shape[0]
        f_rts = np.tile(np.asarray(NULL_F_RTS, np.float32), (n, 1)) if f_rts is None else \
            np.asarray(f_rts, np.float32).reshape(n, 3)
        b = self.motion_batch
        out = []
        for i in range(0, n, b):
            x, e = crops[i:i + b], f_rts[i:i + b]
            m = x.shape[0]
            if m < b:  # eval-mode BatchNorm: padding rows do not touch the real ones
                x = np.concatenate([np.asarray(x), np.repeat(np.asarray(x[-1:]), b - m, 0)])
                e = np.concatenate([e, np.repeat(e[-1:], b - m, 0)])
            out.append(self._run(_motion, "motion_encoder", jnp.asarray(x), jnp.asarray(e))[:m])
        return jnp.concatenate(out)

    # -------------------------------------------------------------------------------- denoising
    def denoise(self, latents, bank, context, motion, negative_motion, *, steps: int, guidance: float,
                offsets: Sequence[int], plan: WindowPlan, progress: Callable[[int], None] | None = None):
        """Final latents ``(N, h, w, c)`` float32 from initial ``latents`` (one compiled loop)."""
        schedule = schedule_for(steps)
        offsets = np.asarray(offsets, np.int32).reshape(-1)
        if offsets.shape != (steps,):
            raise ValueError(f"window_offsets needs one offset per step ({steps}), got {offsets.shape[0]}")
        graphdef, state = self._split["denoiser"]
        args = (state, schedule, jnp.asarray(latents, jnp.float32), bank, context, motion, negative_motion,
                jnp.asarray(offsets), jnp.float32(guidance))
        if progress is None:
            return _denoise(*args, graphdef=graphdef, plan=plan, report=False)
        with _PROGRESS_LOCK:
            _PROGRESS[0] = progress
            try:
                return jax.block_until_ready(_denoise(*args, graphdef=graphdef, plan=plan, report=True))
            finally:
                jax.effects_barrier()  # every step's callback has run
                _PROGRESS[0] = None

    def lower_denoise(self, plan: WindowPlan, steps: int, *, bank_shapes: dict | None = None):
        """``jax.jit(...).lower`` of the denoising loop on abstract inputs (works on ``model.abstract``
        bundles: nothing is allocated), e.g. to check that a full-size configuration compiles."""
        cfg = self.config
        h = cfg.latent_size
        c = cfg.denoiser.unet.in_channels
        me = cfg.motion_encoder
        d = cfg.image_encoder.projection_dim
        f32 = jnp.float32
        sds = jax.ShapeDtypeStruct
        if bank_shapes is None:
            graphdef, state = self._split["reference_net"]
            bank_shapes = jax.eval_shape(functools.partial(_reference_bank, graphdef, bank_dtype=self.bank_dtype),
                                         state, sds((h, h, c), f32), sds((1, 1, d), f32))
        graphdef, state = self._split["denoiser"]
        return _denoise.lower(state, schedule_for(steps), sds((plan.num_frames, h, h, c), f32), bank_shapes,
                              sds((1, 1, d), f32), sds((plan.num_frames, me.num_tokens, me.token_dim), f32),
                              sds((me.num_tokens, me.token_dim), f32), sds((steps,), jnp.int32), sds((), f32),
                              graphdef=graphdef, plan=plan, report=False)

    # --------------------------------------------------------------------------------- decoding
    def decode(self, latents, chunk: int = DECODE_CHUNK) -> Iterator[np.ndarray]:
        """Frames ``(n, R, R, 3)`` float32 in [-1, 1], one array per chunk of ``chunk`` latent frames
        (the SVD decoder's ``num_frames``; a shorter last chunk decodes on its own, as the official).
        The next chunk is dispatched before the previous one is fetched."""
        if chunk < 1:
            raise ValueError(f"decode chunk must be >= 1, got {chunk}")
        latents = jnp.asarray(latents)
        pending = None
        for i in range(0, latents.shape[0], chunk):
            z = latents[i:i + chunk]
            out = self._run(_decode, "vae", z, z.shape[0])
            if pending is not None:
                yield np.asarray(pending)
            pending = out
        if pending is not None:
            yield np.asarray(pending)


def default_pose_crop(reference: jax.Array, size: int) -> jax.Array:
    """Without a detected pose crop: the centre ``POSE_FRACTION`` of the reference crop (where the 1.1x face
    square sits inside the 2x face crop), resized to ``size`` (Lanczos)."""
    x = _to_model_pixels(jnp.asarray(reference))
    r = x.shape[0]
    side = max(1, int(round(r * POSE_FRACTION)))
    o = (r - side) // 2
    return jax.image.resize(x[o:o + side, o:o + side], (size, size, 3), "lanczos3")


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """[-1, 1] float frames -> uint8 (clipped, rounded)."""
    return np.clip(np.round((np.asarray(frames, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def sample_latents(models, reference, driving_crops=None, *, steps: int = 25, guidance: float = 3.5,
                   context_frames: int = CONTEXT_FRAMES, context_overlap: int = CONTEXT_OVERLAP,
                   window_offsets: Sequence[int] | None = None, noise=None, seed: int = 0, window_batch: int = 1,
                   reference_pose=None, clip_pixels=None, f_rts=None, motion=None, motion_batch: int = 16,
                   bank_dtype: str | None = None, sampler: Sampler | None = None,
                   progress: Callable[[int], None] | None = None) -> jax.Array:
    """Steps 1–4 of the pipeline: the final latents ``(N, h, w, c)`` float32 (arguments as :func:`animate`)."""
    sampler = sampler or Sampler(models, motion_batch=motion_batch, bank_dtype=bank_dtype)
    cfg = sampler.config
    if motion is None:
        if driving_crops is None:
            raise ValueError("animate needs driving_crops or motion")
        motion = sampler.motion(driving_crops, f_rts)
    motion = jnp.asarray(motion, jnp.float32)
    n = motion.shape[0]
    plan = WindowPlan(n, context_frames, context_overlap, window_batch)
    ref_pixels = jnp.asarray(reference)
    if clip_pixels is None:
        ref_u8 = np.asarray(ref_pixels) if ref_pixels.dtype == jnp.uint8 else to_uint8(np.asarray(ref_pixels))
        clip_pixels = clip_lib.preprocess(ref_u8, cfg.image_encoder.image_size)[0]
    if reference_pose is None:
        reference_pose = default_pose_crop(ref_pixels, sampler.motion_size)
    ref_latent = sampler.reference_latent(ref_pixels)
    context = sampler.clip_context(clip_pixels)
    bank = sampler.reference_bank(ref_latent, context)
    negative = sampler.motion(jnp.asarray(reference_pose)[None])[0]
    shape = (n,) + ref_latent.shape
    if noise is None:
        noise = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
    noise = jnp.asarray(noise, jnp.float32)
    if noise.shape != shape:
        raise ValueError(f"noise must be {shape} (frames, latent h, w, c), got {noise.shape}")
    if window_offsets is None:
        window_offsets = seeded_offsets(seed, steps, context_frames)
    latents = initial_latents(schedule_for(steps), ref_latent, noise)
    return sampler.denoise(latents, bank, context, motion, negative, steps=steps, guidance=guidance,
                           offsets=window_offsets, plan=plan, progress=progress)


def animate(models, reference, driving_crops=None, *, steps: int = 25, guidance: float = 3.5,
            context_frames: int = CONTEXT_FRAMES, context_overlap: int = CONTEXT_OVERLAP,
            window_offsets: Sequence[int] | None = None, noise=None, seed: int = 0, window_batch: int = 1,
            reference_pose=None, clip_pixels=None, f_rts=None, motion=None, decode_chunk: int = DECODE_CHUNK,
            motion_batch: int = 16, bank_dtype: str | None = None, return_latents: bool = False,
            sampler: Sampler | None = None, progress: Callable[[int], None] | None = None):
    """Animates ``reference`` with the motion of ``driving_crops``; returns uint8 frames ``(N, R, R, 3)``
    (and the final latents ``(N, h, w, c)`` with ``return_latents``).

    ``models``: the bundle (``convert.load_official`` / ``launch.loading.load_xnemo``). ``reference``: the
    loose reference crop ``(R, R, 3)`` at the model resolution (uint8, or float in [-1, 1]).
    ``driving_crops``: the tight driving crops ``(N, S, S, 3)`` at the motion encoder's size, or None
    with ``motion`` = precomputed tokens ``(N, T, d)`` (e.g. :func:`interpolate_motion`).
    ``reference_pose``: the reference image's pose crop ``(S, S, 3)`` for the negative motion (default:
    :func:`default_pose_crop`); ``clip_pixels``: CLIP input (default ``clip.preprocess(reference)``);
    ``f_rts``: ``(N, 3)`` (dy, dx, s) per frame, default the official (0, 0, 1). ``noise``: the initial
    noise ``(N, h, w, c)`` (default ``jax.random.normal(key(seed))``); ``window_offsets``: one offset per
    step (default :func:`seeded_offsets` of ``seed``). ``sampler``: a :class:`Sampler` to reuse compiled
    programs across calls; ``progress(step)`` is called after each denoising step.
    """
    sampler = sampler or Sampler(models, motion_batch=motion_batch, bank_dtype=bank_dtype)
    latents = sample_latents(models, reference, driving_crops, steps=steps, guidance=guidance,
                             context_frames=context_frames, context_overlap=context_overlap,
                             window_offsets=window_offsets, noise=noise, seed=seed, window_batch=window_batch,
                             reference_pose=reference_pose, clip_pixels=clip_pixels, f_rts=f_rts, motion=motion,
                             sampler=sampler, progress=progress)
    frames = np.concatenate([to_uint8(x) for x in sampler.decode(latents, decode_chunk)])
    return (frames, np.asarray(latents)) if return_latents else frames
