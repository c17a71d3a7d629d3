"""LIA-X inference: the official ``edit_img`` / ``animate`` / ``edit_vid`` / ``interpolate_img`` equations.

Notation (``shared/reference/liax_official.md`` §4): E = encoder, A = motion head, D(a) = a Q^T, and
delta = zeros(M) with ``delta[id] += value`` for each edit. The decoder always uses the source's features.

* :func:`edit_image`: ``z_s + D(A(z_s) + delta)`` (delta float32-rounded, as the official code).
* :func:`animate`: ``z_s + (D(A(E(d_t))) - D(A(E(d_0)))) + D(A(z_s) + delta)`` per driving frame, relative
  to the first driving frame; the source is encoded once, driving frames in chunks of ``chunk_size``.
* :func:`edit_video`: ``animate`` with the video's own frame 0 as the source.
* :func:`manipulate`: 64 frames ``z_s + D(A(z_s) + v_k)`` along the official ping-pong schedule.

Everything runs through jitted encode/decode functions of the split model (graphdef + state), so the
same functions serve float64 parity checks, float32 and bfloat16. Images are NHWC in [-1, 1].
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from liax_jax.model import LiaX

MANIPULATION_STEPS = 16


@functools.partial(jax.jit, static_argnums=(0,))
def _encode(graphdef, state, x):
    model = nnx.merge(graphdef, state)
    z, feats = model.encode(x)
    return z, feats, model.motion_coefficients(z)


@functools.partial(jax.jit, static_argnums=(0,))
def _directions(graphdef, state):
    return nnx.merge(graphdef, state).directions()


@functools.partial(jax.jit, static_argnums=(0, 4))
def _decode(graphdef, state, latent, feats, intermediates):
    return nnx.merge(graphdef, state).decode(latent, feats, return_intermediates=intermediates)


class Runner:
    """Jitted encode/decode over a split model (build once, reuse for many calls).

    The motion dictionary Q (a QR decomposition) is computed once here, not per encoded chunk.
    """

    def __init__(self, model: LiaX):
        self.model = model
        self.graphdef, self.state = nnx.split(model)
        self.dtype = model.config.compute_dtype
        self.directions = _directions(self.graphdef, self.state)

    def encode(self, x):
        return _encode(self.graphdef, self.state, jnp.asarray(x, self.dtype))

    def decode(self, latent, feats, intermediates=False):
        return _decode(self.graphdef, self.state, latent, feats, intermediates)


def make_delta(motion_ids: Sequence[int], motion_values: Sequence[float], motion_dim: int, dtype,
               float32_rounded: bool) -> jax.Array:
    """delta (1, M): zeros with ``delta[id] += value`` (values rounded to float32 where the official does)."""
    if len(motion_ids) != len(motion_values):
        raise ValueError(f"{len(motion_ids)} motion ids but {len(motion_values)} values")
    values = np.asarray(motion_values, np.float32 if float32_rounded else np.float64).astype(np.float64)
    delta = np.zeros((1, motion_dim), np.float64)
    for i, v in zip(motion_ids, values):
        if not 0 <= int(i) < motion_dim:
            raise ValueError(f"motion id {i} out of range [0, {motion_dim})")
        delta[0, int(i)] += v
    return jnp.asarray(delta, dtype)


def _as_runner(model) -> Runner:
    return model if isinstance(model, Runner) else Runner(model)


def _direction(alpha, q):
    return alpha.astype(q.dtype) @ q.T


def edit_image(model, source, motion_ids=(), motion_values=(), *, return_intermediates: bool = False):
    """Edits source images (B, R, R, 3) by moving their motion coefficients; returns (B, R, R, 3)."""
    run = _as_runner(model)
    z, feats, alpha = run.encode(source)
    q = run.directions
    delta = make_delta(motion_ids, motion_values, alpha.shape[-1], alpha.dtype, float32_rounded=True)
    latent = z + _direction(alpha + delta, q)
    out = run.decode(latent, feats, return_intermediates)
    if return_intermediates:
        image, inter = out
        return image, {"z": z, "alpha": alpha, "latent": latent, **inter}
    return out


def _latent_chunks(run, z_s, alpha_s_edit, alpha_start, q, frames, chunk_size):
    for start in range(0, len(frames), chunk_size):
        _, _, alpha_t = run.encode(frames[start:start + chunk_size])
        yield z_s + (_direction(alpha_t, q) - _direction(alpha_start, q)) + _direction(alpha_s_edit, q), alpha_t


def animate(model, source, driving, motion_ids=(), motion_values=(), chunk_size: int = 8, *,
            return_intermediates: bool = False):
    """Animates one source image (1, R, R, 3) with driving frames (T, R, R, 3); returns (T, R, R, 3).

    Motion is relative to the first driving frame. ``driving`` may be any array-like of frames; it is
    processed ``chunk_size`` frames at a time.
    """
    run = _as_runner(model)
    source = jnp.asarray(source)
    if source.ndim == 3:
        source = source[None]
    if source.shape[0] != 1:
        raise ValueError(f"animate takes one source image, got a batch of {source.shape[0]}")
    z_s, feats, alpha_s = run.encode(source)
    q = run.directions
    _, _, alpha_start = run.encode(jnp.asarray(driving[0:1]))
    delta = make_delta(motion_ids, motion_values, alpha_s.shape[-1], alpha_s.dtype, float32_rounded=False)
    alpha_s_edit = alpha_s + delta
    frames, inters, alphas = [], [], []
    for latent, alpha_t in _latent_chunks(run, z_s, alpha_s_edit, alpha_start, q, driving, chunk_size):
        out = run.decode(latent, feats, return_intermediates)
        if return_intermediates:
            out, inter = out
            inters.append(inter)
            alphas.append(alpha_t)
        frames.append(out)
    video = jnp.concatenate(frames)
    if not return_intermediates:
        return video
    cat = lambda key: [jnp.concatenate([i[key][lvl] for i in inters]) for lvl in range(len(inters[0][key]))]  # noqa: E731
    return video, {"z": z_s, "alpha": alpha_s, "alpha_start": alpha_start, "alpha_t": jnp.concatenate(alphas),
                   "flow_logits": cat("flow_logits"), "rgb": cat("rgb")}


def edit_video(model, video, motion_ids=(), motion_values=(), chunk_size: int = 8, **kwargs):
    """Edits a video with its own first frame as the source (the official ``edit_vid``)."""
    return animate(model, video[0:1], video, motion_ids, motion_values, chunk_size, **kwargs)


def manipulation_schedule(motion_values: Sequence[float], steps: int = MANIPULATION_STEPS) -> np.ndarray:
    """The official 4*steps-frame ping-pong of edit values, float64 (frames, len(values)).

    0 -> v -> 0 by repeated ``+= v/steps`` / ``-= v/steps``; then 0 -> v -> 0 again when any of list
    positions 6..9 (the mouth controls of the standard 14-id order) is non-zero, else 0 -> -v -> 0.
    """
    values = np.asarray(motion_values, np.float64)
    stride = values / steps
    mouth = bool(np.any(values[6:10] != 0))
    v = np.zeros_like(values)
    out = []
    for sign in (1.0, -1.0) + ((1.0, -1.0) if mouth else (-1.0, 1.0)):
        for _ in range(steps):
            v = v + stride if sign > 0 else v - stride
            out.append(v.copy())
    return np.stack(out)


def manipulate(model, source, motion_ids, motion_values, chunk_size: int = 8):
    """The official ``manipulation`` mode: 64 frames of one source image sweeping the given edits."""
    run = _as_runner(model)
    z, feats, alpha = run.encode(source)
    q = run.directions
    schedule = manipulation_schedule(motion_values)
    deltas = jnp.concatenate([make_delta(motion_ids, v, alpha.shape[-1], alpha.dtype, True) for v in schedule])
    frames = []
    for start in range(0, len(deltas), chunk_size):
        latent = z + _direction(alpha + deltas[start:start + chunk_size], q)
        frames.append(run.decode(latent, feats))
    return jnp.concatenate(frames)
