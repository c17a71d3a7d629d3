"""Builds the latent cache of a prepared dataset (``launch/prepare_data.py --cache-latents=CKPT``).

``CKPT`` provides X-NeMo's frozen encoders (:func:`load_encoders`):

* a ``launch/convert.py sd`` output (what ``init.sd`` takes; the official path): its ``vae/`` (the SVD
  temporal VAE) and ``image_encoder/`` (CLIP) params checkpoints; the ``unet/`` part is not read;
* an X-NeMo training run (workdir, its ``checkpoints/`` or one step folder): the ``vae`` and
  ``image_encoder`` of its newest (or that) step, at its config's ``model.preset`` and ``data.resolution``
  (the tiny model's random VAE / CLIP live there);
* an X-NeMo params checkpoint (``launch/convert.py xnemo`` output).

Every frame of every clip of every split is encoded at the dataset's resolution, in float32, on the default JAX device
with one jit-compiled program (fixed batches of ``batch_size`` frames; the last one padded). Shards are
written under temporary names and renamed when complete, so a killed run restarts at the first missing
shard and never leaves a half-written one that is later read; ``cache_info.json`` is written last (see
:mod:`input_pipeline.latent_cache` for the layout).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from tqdm import tqdm

from input_pipeline import building, latent_cache, schema
from input_pipeline.errors import UserError
from input_pipeline.video_io import atomic_output

MOMENTS_DTYPES = ("float16", "float32")


@dataclasses.dataclass
class Encoders:
    """X-NeMo's frozen VAE (``AutoencoderKLTemporalDecoder``) and CLIP image encoder, ready to run."""

    vae: object
    image_encoder: object
    source: str

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.scaling_factor)

    @property
    def clip_size(self) -> int:
        return int(self.image_encoder.config.image_size)

    def fingerprints(self) -> dict[str, str]:
        from flax import nnx  # noqa: PLC0415

        from xnemo_jax.training import encoder_weights  # noqa: PLC0415

        weights = encoder_weights(nnx.to_pure_dict(nnx.state(self.vae, nnx.Param)),
                                  nnx.to_pure_dict(nnx.state(self.image_encoder, nnx.Param)))
        return {k: latent_cache.fingerprint(v) for k, v in weights.items()}


def _restore(module, restore):
    """``module`` (abstract) with its parameters from ``restore(abstract pure dict) -> arrays``."""
    import jax  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    graphdef, state = nnx.split(module)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, restore(abstract))
    return nnx.merge(graphdef, state)


def load_encoders(path: str) -> Encoders:
    """The frozen encoders of ``path`` (see the module docstring for what it may be)."""
    from launch import checkpointing  # noqa: PLC0415
    from xnemo_jax import convert  # noqa: PLC0415
    from xnemo_jax import model as model_lib  # noqa: PLC0415

    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(os.path.join(path, "vae")) or os.path.isdir(os.path.join(path, "image_encoder")):
        parts = {}
        for part, want in (("vae", "svd_vae"), ("image_encoder", "clip_vision")):
            folder = os.path.join(path, part)
            if not os.path.isdir(folder):
                raise UserError(f"--cache-latents: this convert.py sd output has no {part}/ part (write it with "
                                "`python launch/convert.py sd --vae=... --clip=... --output=DIR`)", path)
            info = checkpointing.read_model_info(folder)
            if info.get("model") != want:
                raise UserError(f"--cache-latents: a {info.get('model')!r} checkpoint; X-NeMo's {part} is {want!r}",
                                folder)
            module = convert.build(want, info.get("config", {}), abstract=True)
            parts[part] = _restore(module, lambda abstract, folder=folder:
                                   checkpointing.load_params(folder, abstract)[1])
        return Encoders(parts["vae"], parts["image_encoder"], path)
    found = checkpointing.find_model_checkpoint(path)
    if found.model != "xnemo":
        raise UserError(f"--cache-latents needs X-NeMo weights (a convert.py sd output, an X-NeMo training run or "
                        f"params checkpoint), found a {found.model or 'unknown'!r} checkpoint", found.path)
    if found.kind != "train":   # an exported bundle: every network is read (cheap next to encoding a dataset)
        from launch import loading  # noqa: PLC0415

        bundle, _ = loading.load_xnemo(found.path, dtype="float32")
        return Encoders(bundle.vae, bundle.image_encoder, found.path)
    tc = found.train_config or {}
    model = tc.get("model", {}) or {}
    try:
        config = model_lib.XNemoConfig.preset(model.get("preset", "official"), dtype="float32",
                                              resolution=int((tc.get("data", {}) or {}).get("resolution", 512)))
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"bad model description: {type(e).__name__}: {e}", found.path) from e
    bundle = model_lib.abstract(config)

    def restore_part(name):
        return lambda abstract: checkpointing.restore_model_params(found, {name: abstract}, ("model", "fixed"))[name]

    return Encoders(_restore(bundle.vae, restore_part("vae")), _restore(bundle.image_encoder,
                                                                         restore_part("image_encoder")),
                    f"{found.path} (step {found.step})")


def make_encode_fn(encoders: Encoders, moments_dtype: str):
    """``fn(images uint8 (N, H, W, 3), clip_pixels (N, c, c, 3)) -> (moments (N, h, w, 2C), embeds (N, D))``,
    one jit-compiled program over the encoders' weights."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from xnemo_jax.training import to_float  # noqa: PLC0415

    vae_graph, vae_state = nnx.split(encoders.vae)
    clip_graph, clip_state = nnx.split(encoders.image_encoder)

    @jax.jit
    def encode(vae_state, clip_state, images, clip_pixels):
        posterior = nnx.merge(vae_graph, vae_state).encode(to_float(images))
        moments = jnp.concatenate([posterior.mean, posterior.logvar], axis=-1).astype(jnp.float32)
        embeds = nnx.merge(clip_graph, clip_state)(clip_pixels).image_embeds.astype(jnp.float32)
        return moments.astype(moments_dtype), embeds

    return lambda images, clip_pixels: encode(vae_state, clip_state, images, clip_pixels)


def _read_records(path: str):
    from array_record.python.array_record_module import ArrayRecordReader  # noqa: PLC0415

    reader = ArrayRecordReader(path)
    try:
        for i in range(reader.num_records()):
            yield reader.read([i])[0]
    finally:
        reader.close()


def _num_records(path: str) -> int:
    from array_record.python.array_record_module import ArrayRecordReader  # noqa: PLC0415

    reader = ArrayRecordReader(path)
    try:
        return int(reader.num_records())
    finally:
        reader.close()


def build_cache(directory: str, encoders: Encoders, *, batch_size: int = 16, moments_dtype: str = "float16",
                progress: bool = True) -> dict:
    """Writes (or finishes) ``directory``'s latent cache; returns ``cache_info.json``'s content plus
    ``written`` / ``skipped``: the shard files written now and those already there."""
    from xnemo_jax import clip as clip_lib  # noqa: PLC0415

    if moments_dtype not in MOMENTS_DTYPES:
        raise UserError(f"--cache_dtype must be one of {MOMENTS_DTYPES}, got {moments_dtype!r}")
    if batch_size < 1:
        raise UserError(f"--cache_batch_size must be >= 1, got {batch_size}")
    data_info = building.load_info(directory)
    resolution = int(data_info["resolution"])
    scale = 2 ** (len(encoders.vae.config.block_out_channels) - 1)
    if resolution % scale:
        raise UserError(f"the dataset's {resolution}² frames do not divide by the VAE's scale {scale}", directory)
    side = resolution // scale
    latent_shape = [side, side, int(encoders.vae.config.latent_channels)]
    fingerprints = encoders.fingerprints()
    spec = {"format": latent_cache.FORMAT, "version": latent_cache.CACHE_VERSION, "resolution": resolution,
            "latent_shape": latent_shape, "moments_dtype": moments_dtype, "clip_embeds_dtype": "float32",
            "scaling_factor": encoders.scaling_factor, "clip_image_size": encoders.clip_size,
            "vae_fingerprint": fingerprints["vae"], "clip_fingerprint": fingerprints["clip"]}
    out_dir = latent_cache.cache_dir(directory)
    os.makedirs(out_dir, exist_ok=True)
    build_file = os.path.join(out_dir, latent_cache.BUILD_INFO)
    if os.path.exists(build_file):
        with open(build_file) as f:
            previous = json.load(f)
        changed = [k for k in spec if previous.get(k) != spec[k]]
        if changed:
            raise UserError(f"this latent cache was built with other {', '.join(changed)} "
                            f"({previous.get('source', '?')}); delete {out_dir} to rebuild it from "
                            f"{encoders.source}", build_file)
    else:
        with atomic_output(build_file) as tmp, open(tmp, "w") as f:
            json.dump({**spec, "source": encoders.source}, f, indent=1)

    todo, shards, skipped = [], {}, 0
    for split in building.SPLITS:
        shards[split] = []
        for name in data_info["shards"].get(split, []):
            frames_path, out = os.path.join(directory, name), os.path.join(out_dir, name)
            if os.path.exists(out):
                skipped += 1
            else:
                todo.append((frames_path, out))
            shards[split].append(name)
    encode = make_encode_fn(encoders, moments_dtype) if todo else None
    total = sum(_num_records(p) for p, _ in todo)
    bar = tqdm(total=total, desc="caching latents", unit="clip", disable=not progress)
    for frames_path, out in todo:
        from array_record.python.array_record_module import ArrayRecordWriter  # noqa: PLC0415

        with atomic_output(out) as tmp:
            frames_per_clip = []
            writer = ArrayRecordWriter(tmp, "group_size:1")
            try:
                for data in _read_records(frames_path):
                    record = schema.deserialize(data)
                    if (record.height, record.width) != (resolution, resolution):
                        raise UserError(f"clip {record.meta.get('clip_id', '?')} is {record.height}x{record.width}, "
                                        f"the dataset {resolution}²", frames_path)
                    clip_id = str(record.meta.get("clip_id", "?"))
                    moments, embeds = _encode_clip(record, encode, batch_size, clip_lib, encoders.clip_size)
                    for k in range(record.num_frames):
                        writer.write(latent_cache.serialize(clip_id, k, record.num_frames, moments[k], embeds[k]))
                    frames_per_clip.append(record.num_frames)
                    bar.update(1)
            finally:
                writer.close()
            with atomic_output(_index_path(out)) as index_tmp, open(index_tmp, "w") as f:   # before the rename
                json.dump({"frames_per_clip": frames_per_clip}, f)
    bar.close()
    info = {**spec, "source": encoders.source,
            "moments_layout": "mean then logvar (clipped to [-30, 20]) on the last axis, unscaled latents",
            "clip_embed_dim": int(encoders.image_encoder.config.projection_dim),
            "bytes_per_frame": (2 * int(np.prod(latent_shape)) * np.dtype(moments_dtype).itemsize
                                + 4 * int(encoders.image_encoder.config.projection_dim)),
            "shards": {s: [_shard_entry(directory, out_dir, n) for n in names] for s, names in shards.items()}}
    with atomic_output(latent_cache.info_path(directory)) as tmp, open(tmp, "w") as f:
        json.dump(info, f)
    return {**info, "written": len(todo), "skipped": skipped}


def _index_path(shard: str) -> str:
    return os.path.join(os.path.dirname(shard), ".index", os.path.basename(shard) + ".json")


def _shard_entry(directory: str, out_dir: str, name: str) -> dict:
    """A finished latent shard's entry of cache_info.json, checked against its frame shard."""
    path = os.path.join(out_dir, name)
    try:
        with open(_index_path(path)) as f:
            frames_per_clip = [int(n) for n in json.load(f)["frames_per_clip"]]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"latent shard without a readable index ({type(e).__name__}); delete it and rerun", path) from e
    records, clips = _num_records(path), _num_records(os.path.join(directory, name))
    if len(frames_per_clip) != clips or sum(frames_per_clip) != records:
        raise UserError(f"latent shard holds {records} frames of {len(frames_per_clip)} clips, the frame shard "
                        f"{clips} clips; delete it and rerun", path)
    return {"file": name, "records": records, "clips": clips, "frames_per_clip": frames_per_clip}


def _encode_clip(record, encode, batch_size: int, clip_lib, clip_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A clip's ``(moments (T, h, w, 2C), clip embeddings (T, D))``."""
    frames = record.decode_frames()
    moments, embeds = [], []
    for start in range(0, len(frames), batch_size):
        chunk = frames[start:start + batch_size]
        n = len(chunk)
        pixels = clip_lib.preprocess(chunk, clip_size)
        if n < batch_size:   # one program for every batch: pad the last one
            chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:], chunk.dtype)])
            pixels = np.concatenate([pixels, np.zeros((batch_size - n,) + pixels.shape[1:], pixels.dtype)])
        m, e = encode(chunk, pixels)
        moments.append(np.asarray(m)[:n])
        embeds.append(np.asarray(e)[:n])
    return np.concatenate(moments), np.concatenate(embeds)
