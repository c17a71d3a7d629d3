"""LIA-X inference: the official ``edit_img`` / ``animate`` / ``edit_vid`` / ``interpolate_img`` equations,
plus latent motion interpolation, on arrays (NHWC, [-1, 1]). File I/O and framing live in
:mod:`input_pipeline.portrait`, loading weights from disk in :mod:`launch.loading`; ``launch/animate.py``
joins them into the command line tool.

Notation (``shared/reference/liax_official.md`` §4): E = encoder, A = motion head, D(a) = a Q^T, and
delta = zeros(M) with ``delta[id] += value`` for each edit. The decoder always uses the source's features.

* :func:`edit_image`: ``z_s + D(A(z_s) + delta)`` (delta float32-rounded, as the official code).
* :func:`animate` / :class:`Animation` (streaming): ``z_s + (D(A(E(d_t))) - D(A(E(d_0)))) + D(A(z_s) + delta)``
  per driving frame, relative to the first driving frame; the source is encoded once.
* :func:`edit_video`: ``animate`` with the video's own frame 0 as the source.
* :func:`manipulate`: 64 frames ``z_s + D(A(z_s) + v_k)`` along the official ping-pong schedule.
* :func:`interpolate`: the source driven by motion linearly interpolated between keyframes.

Everything runs through a :class:`Runner`: jitted programs over the split model (graphdef + state) with
batches padded to ``chunk_size``, so a video of any length compiles once; the same functions serve float64
parity checks, float32 and bfloat16.
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


@functools.partial(jax.jit, static_argnums=(0, 1))
def _render(graphdef, intermediates, state, q, z_s, feats, alpha_s_edit, alpha_rel, alpha_ref):
    """Decode of ``z_s + (D(alpha_rel) - D(alpha_ref)) + D(alpha_s_edit)`` (three D terms, as the official)."""
    model = nnx.merge(graphdef, state)
    latent = model.navigate(z_s, [alpha_rel, alpha_s_edit, alpha_ref], q)
    out = model.decode(latent, feats, return_intermediates=intermediates)
    return (out[0], {"latent": latent, **out[1]}) if intermediates else out


@functools.partial(jax.jit, static_argnums=(0, 1))
def _animate_chunk(graphdef, intermediates, state, q, z_s, feats, alpha_s_edit, alpha_start, frames):
    """Encode driving frames and render them, one fused program per chunk."""
    model = nnx.merge(graphdef, state)
    z_t, _ = model.encode(frames)
    alpha_t = model.motion_coefficients(z_t)
    out = _render.__wrapped__(graphdef, intermediates, state, q, z_s, feats, alpha_s_edit, alpha_t, alpha_start)
    return out, alpha_t


def _pad_to(x, size: int):
    """Pads the batch of ``x`` to ``size`` by repeating its last row (one compiled shape per chunk size)."""
    n = x.shape[0]
    if n == size:
        return x
    return jnp.concatenate([x, jnp.repeat(x[-1:], size - n, axis=0)])


class Runner:
    """Jitted encode/render over a split model (build once, reuse for many calls).

    The motion dictionary Q (a QR decomposition) is computed once here, not per encoded chunk. Batches
    of up to ``chunk_size`` frames are padded to ``chunk_size``, so a video of any length compiles the
    per-chunk programs once.
    """

    def __init__(self, model: LiaX, chunk_size: int = 8):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.model = model
        self.chunk_size = int(chunk_size)
        self.graphdef, self.state = nnx.split(model)
        self.dtype = model.config.compute_dtype
        self.resolution = model.config.resolution
        self.motion_dim = model.config.motion_dim
        self.directions = _directions(self.graphdef, self.state)

    def encode(self, x):
        """``(z, feats, alpha)`` of images (B, R, R, 3) in [-1, 1]."""
        return _encode(self.graphdef, self.state, jnp.asarray(x, self.dtype))

    def decode(self, latent, feats, intermediates=False):
        return _decode(self.graphdef, self.state, latent, feats, intermediates)

    def render(self, z_s, feats, alpha_s_edit, alpha_rel=None, alpha_ref=None, intermediates=False):
        """Images for rows of ``z_s + (D(alpha_rel) - D(alpha_ref)) + D(alpha_s_edit)`` (B <= chunk_size
        rows; ``alpha_rel``/``alpha_ref`` default to 0, giving ``z_s + D(alpha_s_edit)``)."""
        n = max(x.shape[0] for x in (alpha_s_edit, alpha_rel, alpha_ref) if x is not None)
        if n > self.chunk_size:
            raise ValueError(f"{n} rows exceed chunk_size {self.chunk_size}")
        zero = jnp.zeros((1, self.motion_dim), alpha_s_edit.dtype)
        rows = [_pad_to(jnp.broadcast_to(a, (n, a.shape[1])) if a.shape[0] == 1 else a, self.chunk_size)
                for a in (alpha_s_edit, zero if alpha_rel is None else alpha_rel,
                          zero if alpha_ref is None else alpha_ref)]
        if z_s.shape[0] > 1:  # one source per row
            z_s, feats = _pad_to(z_s, self.chunk_size), [_pad_to(f, self.chunk_size) for f in feats]
        out = _render(self.graphdef, intermediates, self.state, self.directions, z_s, feats, *rows)
        return _take(out, n)

    def animate_chunk(self, z_s, feats, alpha_s_edit, alpha_start, frames, intermediates=False):
        """``(images, alpha_t)`` for up to ``chunk_size`` driving frames (float, [-1, 1])."""
        n = frames.shape[0]
        if not 1 <= n <= self.chunk_size:
            raise ValueError(f"a chunk holds 1..{self.chunk_size} frames, got {n}")
        frames = _pad_to(jnp.asarray(frames, self.dtype), self.chunk_size)
        out, alpha_t = _animate_chunk(self.graphdef, intermediates, self.state, self.directions, z_s, feats,
                                      alpha_s_edit, alpha_start, frames)
        return _take(out, n), alpha_t[:n]


def _take(out, n):
    return jax.tree.map(lambda x: x[:n] if x.ndim and x.shape[0] > n else x, out)


def make_delta(motion_ids: Sequence[int], motion_values: Sequence[float], motion_dim: int, dtype,
               float32_rounded: bool) -> jax.Array:
    """delta (1, M): zeros with ``delta[id] += value`` (values rounded to float32 where the official does)."""
    if len(motion_ids) != len(motion_values):
        raise ValueError(f"{len(motion_ids)} motion ids but {len(motion_values)} values")
    values = np.asarray(motion_values, np.float32 if float32_rounded else np.float64).astype(np.float64)
    delta = np.zeros((1, motion_dim), np.float64)
    for i, v in zip(motion_ids, values, strict=True):
        if not 0 <= int(i) < motion_dim:
            raise ValueError(f"motion id {i} out of range [0, {motion_dim})")
        delta[0, int(i)] += v
    return jnp.asarray(delta, dtype)


def as_runner(model, chunk_size: int | None = None) -> Runner:
    """``model`` if it is a :class:`Runner` with that ``chunk_size`` (None: any), else a new Runner (default
    chunk size 8)."""
    if isinstance(model, Runner):
        if chunk_size is None or chunk_size == model.chunk_size:
            return model
        model = model.model
    return Runner(model, 8 if chunk_size is None else chunk_size)


def _as_batch(images):
    images = jnp.asarray(images)
    return images[None] if images.ndim == 3 else images


def _concat_intermediates(inters: list[dict]) -> dict:
    out = {}
    for key, first in inters[0].items():
        if isinstance(first, list):
            out[key] = [jnp.concatenate([i[key][lvl] for i in inters]) for lvl in range(len(first))]
        else:
            out[key] = jnp.concatenate([i[key] for i in inters])
    return out


def _render_rows(run: Runner, z, feats, alpha_s_edit, alpha_rel=None, alpha_ref=None, intermediates=False):
    """Renders any number of rows, ``chunk_size`` at a time."""
    n = max(x.shape[0] for x in (alpha_s_edit, alpha_rel, alpha_ref) if x is not None)
    outs = []
    for s in range(0, n, run.chunk_size):
        part = lambda a: a if a is None or a.shape[0] == 1 else a[s:s + run.chunk_size]  # noqa: E731, B023 - called at once
        outs.append(run.render(z, feats, part(alpha_s_edit), part(alpha_rel), part(alpha_ref), intermediates))
    if not intermediates:
        return jnp.concatenate(outs)
    return jnp.concatenate([o[0] for o in outs]), _concat_intermediates([o[1] for o in outs])


def edit_image(model, source, motion_ids=(), motion_values=(), *, return_intermediates: bool = False):
    """Edits source images (B, R, R, 3) by moving their motion coefficients; returns (B, R, R, 3)."""
    run = as_runner(model)
    z, feats, alpha = run.encode(_as_batch(source))
    delta = make_delta(motion_ids, motion_values, alpha.shape[-1], alpha.dtype, float32_rounded=True)
    outs, inters = [], []
    for s in range(0, z.shape[0], run.chunk_size):  # each image is its own source
        sl = slice(s, s + run.chunk_size)
        out = _render_rows(run, z[sl], [f[sl] for f in feats], alpha[sl] + delta, intermediates=return_intermediates)
        outs.append(out[0] if return_intermediates else out)
        if return_intermediates:
            inters.append(out[1])
    image = jnp.concatenate(outs)
    if return_intermediates:
        return image, {"z": z, "alpha": alpha, **_concat_intermediates(inters)}
    return image


class Animation:
    """Streaming form of the official ``animate``: the source is encoded once, then any number of driving
    chunks are turned into output frames (relative to the first driving frame given to :meth:`start`).

    ``animation(frames)`` takes float driving frames (n, R, R, 3) in [-1, 1], any n, and returns the
    animated frames as a device array without waiting for them, so a caller can prepare the next chunk
    while the accelerator works.
    """

    def __init__(self, model, source, motion_ids=(), motion_values=(), chunk_size: int | None = None):
        self.runner = as_runner(model, chunk_size)
        source = _as_batch(source)
        if source.shape[0] != 1:
            raise ValueError(f"animate takes one source image, got a batch of {source.shape[0]}")
        self.z, self.feats, self.alpha = self.runner.encode(source)
        delta = make_delta(motion_ids, motion_values, self.alpha.shape[-1], self.alpha.dtype, float32_rounded=False)
        self.alpha_edit = self.alpha + delta
        self.alpha_start = None

    def start(self, first_driving_frame) -> None:
        """Sets the motion reference: alpha of the first driving frame (encoded alone, as the official)."""
        _, _, self.alpha_start = self.runner.encode(_as_batch(first_driving_frame))

    def __call__(self, frames, intermediates: bool = False):
        if self.alpha_start is None:
            self.start(frames[0:1])
        run = self.runner
        outs = [run.animate_chunk(self.z, self.feats, self.alpha_edit, self.alpha_start,
                                  frames[s:s + run.chunk_size], intermediates)
                for s in range(0, frames.shape[0], run.chunk_size)]
        if not intermediates:
            return outs[0][0] if len(outs) == 1 else jnp.concatenate([o[0] for o in outs])
        video = jnp.concatenate([o[0][0] for o in outs])
        return video, {**_concat_intermediates([o[0][1] for o in outs]),
                       "alpha_t": jnp.concatenate([o[1] for o in outs])}


def animate(model, source, driving, motion_ids=(), motion_values=(), chunk_size: int | None = None, *,
            return_intermediates: bool = False):
    """Animates one source image (1, R, R, 3) with driving frames (T, R, R, 3); returns (T, R, R, 3).

    Motion is relative to the first driving frame. ``driving`` may be any array-like of frames; it is
    processed ``chunk_size`` frames at a time (use :class:`Animation` to stream a video).
    """
    anim = Animation(model, source, motion_ids, motion_values, chunk_size)
    anim.start(jnp.asarray(driving[0:1]))
    out = anim(jnp.asarray(driving), intermediates=return_intermediates)
    if not return_intermediates:
        return out
    video, inter = out
    return video, {"z": anim.z, "alpha": anim.alpha, "alpha_start": anim.alpha_start, **inter}


def edit_video(model, video, motion_ids=(), motion_values=(), chunk_size: int | None = None, **kwargs):
    """Edits a video with its own first frame as the source (the official ``edit_vid``)."""
    return animate(model, video[0:1], video, motion_ids, motion_values, chunk_size, **kwargs)


def manipulation_schedule(motion_values: Sequence[float], steps: int = MANIPULATION_STEPS,
                          repeat_positive: bool | None = None) -> np.ndarray:
    """The official 4*steps-frame ping-pong of edit values, float64 (frames, len(values)).

    0 -> v -> 0 by repeated ``+= v/steps`` / ``-= v/steps``; then 0 -> v -> 0 again if ``repeat_positive``,
    else 0 -> -v -> 0. ``repeat_positive=None`` is the official rule for the standard 14-value list: any
    non-zero value at list positions 6..9 (the mouth controls).
    """
    values = np.asarray(motion_values, np.float64)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    stride = values / steps
    if repeat_positive is None:
        repeat_positive = bool(np.any(values[6:10] != 0))
    v = np.zeros_like(values)
    out = []
    for sign in (1.0, -1.0) + ((1.0, -1.0) if repeat_positive else (-1.0, 1.0)):
        for _ in range(steps):
            v = v + stride if sign > 0 else v - stride
            out.append(v.copy())
    return np.stack(out)


def manipulate(model, source, motion_ids, motion_values, chunk_size: int | None = None, *,
               steps: int = MANIPULATION_STEPS,
               repeat_positive: bool | None = None):
    """The official ``manipulation`` mode: ``4 * steps`` frames of one source image sweeping the edits
    (frame k: ``z_s + D(A(z_s) + delta_k)``, see :func:`manipulation_schedule`)."""
    run = as_runner(model, chunk_size)
    z, feats, alpha = run.encode(_as_batch(source))
    schedule = manipulation_schedule(motion_values, steps, repeat_positive)
    deltas = jnp.concatenate([make_delta(motion_ids, v, alpha.shape[-1], alpha.dtype, True) for v in schedule])
    return _render_rows(run, z, feats, alpha + deltas)


def interpolation_weights(num_keyframes: int, steps: int) -> np.ndarray:
    """Piecewise-linear weights (frames, K): ``steps`` frames from each keyframe to the next, then the
    last keyframe; ``(K - 1) * steps + 1`` frames in all (frame ``k * steps`` is keyframe k exactly)."""
    if num_keyframes < 2 or steps < 1:
        raise ValueError(f"interpolation needs >= 2 keyframes and steps >= 1, got {num_keyframes}, {steps}")
    w = np.zeros(((num_keyframes - 1) * steps + 1, num_keyframes))
    for k in range(num_keyframes - 1):
        t = np.arange(steps) / steps
        w[k * steps:(k + 1) * steps, k] = 1.0 - t
        w[k * steps:(k + 1) * steps, k + 1] = t
    w[-1, -1] = 1.0
    return w


def interpolate(model, source, keyframes, steps: int = 16, motion_ids=(), motion_values=(),
                chunk_size: int | None = None):
    """Latent motion interpolation: the source animated by motion that moves linearly between keyframes.

    ``keyframes`` (K >= 2, R, R, 3) are driving images (e.g. two frames of a video, or two photos). Frame
    j is ``z_s + (D(alpha(j)) - D(alpha_0)) + D(A(z_s) + delta)`` with ``alpha(j)`` linear between the
    keyframes' motion coefficients (D is linear, so this interpolates the motion latent itself): frame 0
    is the (edited) source and frame ``k * steps`` is what ``animate`` makes of keyframe k when the
    driving video starts at keyframe 0. Returns ``((K - 1) * steps + 1, R, R, 3)``.
    """
    run = as_runner(model, chunk_size)
    z, feats, alpha = run.encode(_as_batch(source))
    keyframes = _as_batch(keyframes)
    alpha_k = jnp.concatenate([run.encode(keyframes[i:i + 1])[2] for i in range(keyframes.shape[0])])
    weights = jnp.asarray(interpolation_weights(keyframes.shape[0], steps), alpha_k.dtype)
    delta = make_delta(motion_ids, motion_values, alpha.shape[-1], alpha.dtype, float32_rounded=False)
    return _render_rows(run, z, feats, alpha + delta, weights @ alpha_k, alpha_k[0:1])


# ----------------------------------------------------------------------------------- names and loading
def direction_names(spec) -> dict[str, tuple[int, ...]]:
    """Named motion directions: ``{"yaw1": 37, "yaw": [37, 39]}`` (checkpoint metadata) or the string
    form ``"yaw1=37,yaw=37+39"`` (configs, flags) -> ``{name: ids}``. A name with several ids moves all
    of them by the same value."""
    if not spec:
        return {}
    if isinstance(spec, str):
        items = {}
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            name, sep, ids = part.partition("=")
            if not sep or not name.strip():
                raise ValueError(f"bad direction name {part!r} (expected name=id or name=id+id)")
            items[name.strip()] = ids.split("+")
        spec = items
    out = {}
    for name, ids in dict(spec).items():
        ids = ids if isinstance(ids, (list, tuple)) else [ids]
        try:
            out[str(name)] = tuple(int(str(i).strip()) for i in ids)
        except ValueError:
            raise ValueError(f"direction {name!r}: ids must be integers, got {ids!r}") from None
    return out


def parse_edits(spec: str, names: dict[str, tuple[int, ...]], motion_dim: int) -> tuple[list[int], list[float]]:
    """``"yaw=-0.3,mouth=0.2"`` or ``"37=-0.3"`` -> (motion ids, values); names from :func:`direction_names`.

    Raises ``KeyError`` (message: the unknown name and the known ones) or ``ValueError`` (syntax, range).
    """
    ids, values = [], []
    for part in (p.strip() for p in (spec or "").split(",") if p.strip()):
        key, sep, value = part.rpartition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"bad edit {part!r} (expected name=value or index=value)")
        try:
            v = float(value)
        except ValueError:
            raise ValueError(f"bad edit value {value!r} in {part!r}") from None
        if not np.isfinite(v):
            raise ValueError(f"edit value must be finite in {part!r}")
        if key.lstrip("-").isdigit():
            targets = (int(key),)
            if not 0 <= targets[0] < motion_dim:
                raise ValueError(f"edit index {key} out of range [0, {motion_dim})")
        else:
            lookup = {n.lower(): n for n in names}
            if key.lower() not in lookup:
                known = ", ".join(sorted(names)) if names else "none (use indices, e.g. 37=-0.3)"
                raise KeyError(f"unknown edit direction {key!r}; this checkpoint names: {known}")
            targets = names[lookup[key.lower()]]
        for t in targets:
            ids.append(t)
            values.append(v)
    return ids, values
