"""The X-NeMo latent cache (``prepare_data --cache-latents``, ``input_pipeline/latent_cache.py``,
``launch/cache_latents.py``): built once by the CLI on a tiny synthetic dataset from random tiny VAE / CLIP
weights stored as a ``convert.py sd`` output, then read back: the cached moments equal the online encode,
training's ``_encode`` gives the same latents with and without the cache, caches of other weights or
another resolution are refused, and a rerun skips the finished shards."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import xnemo as xnemo_config
from input_pipeline import building, latent_cache, pipeline, schema
from input_pipeline.errors import UserError
from launch import cache_latents, checkpointing, trainer
from xnemo_jax import clip as clip_lib
from xnemo_jax import convert, training
from xnemo_jax import model as model_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIPS, FRAMES, RES = 3, 5, 64

# float16 moments: round-to-nearest keeps 11 significant bits (relative error <= 2^-11 = 4.9e-4), and
# values below float16's normal range (6.1e-5) keep an absolute error <= 3e-8; plus float32 noise of
# batching the encoder differently (<1e-5 here).
F16_RTOL, F16_ATOL = 2.0 ** -11 + 1e-5, 1e-6


def _random_module(kind: str, cfg: dict, seed: int):
    """A tiny ``kind`` module with random weights, filled in numpy (an eager init compiles op by op)."""
    graphdef, state = nnx.split(convert.build(kind, cfg, abstract=True))
    rng = np.random.default_rng(seed)

    def fill(path, x):
        name = str(path[-1])
        if len(x.shape) >= 2:
            return (rng.standard_normal(x.shape) / np.sqrt(np.prod(x.shape[:-1]))).astype(x.dtype)
        return ((1.0 if "scale" in name else 0.0) + 0.1 * rng.standard_normal(x.shape)).astype(x.dtype)

    pure = jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state), pure


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny dataset + its latent cache, written by one prepare_data call; the weights it used."""
    root = tmp_path_factory.mktemp("latent_cache")
    vae, vae_params = _random_module("svd_vae", model_lib.TINY_VAE, 0)
    clip, clip_params = _random_module("clip_vision", model_lib.TINY_CLIP, 1)
    ckpt = str(root / "sd")
    checkpointing.save_params(os.path.join(ckpt, "vae"), "svd_vae", model_lib.TINY_VAE, vae_params)
    checkpointing.save_params(os.path.join(ckpt, "image_encoder"), "clip_vision", model_lib.TINY_CLIP, clip_params)
    data = str(root / "data")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "prepare_data.py"), f"--output={data}",
                          f"--synthetic={CLIPS}", f"--resolution={RES}", f"--frames_per_clip={FRAMES}",
                          "--eval_fraction=0.3", f"--cache-latents={ckpt}", "--cache_batch_size=4"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    return types.SimpleNamespace(data=data, ckpt=ckpt, vae=vae, clip=clip, summary=summary,
                                 weights=training.encoder_weights(vae_params, clip_params))


def _records(path):
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(path)
    try:
        return [reader.read([i])[0] for i in range(reader.num_records())]
    finally:
        reader.close()


def test_the_cli_writes_the_cache_next_to_the_frames(built):
    info = json.load(open(latent_cache.info_path(built.data)))
    cfg = model_lib.XNemoConfig.preset("tiny")
    side = RES // cfg.vae_scale
    assert info["resolution"] == RES and info["latent_shape"] == [side, side, cfg.vae.latent_channels]
    assert info["moments_dtype"] == "float16" and info["scaling_factor"] == cfg.vae.scaling_factor
    assert info["vae_fingerprint"] == latent_cache.fingerprint(built.weights["vae"])
    assert info["clip_fingerprint"] == latent_cache.fingerprint(built.weights["clip"])
    assert info["source"] == os.path.abspath(built.ckpt)
    data_info = building.load_info(built.data)
    assert {s: [e["file"] for e in v] for s, v in info["shards"].items()} == data_info["shards"]
    entries = [e for v in info["shards"].values() for e in v]   # one record per frame
    assert sum(e["clips"] for e in entries) == CLIPS and sum(e["records"] for e in entries) == CLIPS * FRAMES
    assert all(e["frames_per_clip"] == [FRAMES] * e["clips"] for e in entries)
    assert built.summary["written"] == 2 and built.summary["skipped"] == 0   # train + eval shards
    # per frame: 2C x h x w float16 moments + a float32 CLIP embedding
    want = 2 * side * side * cfg.vae.latent_channels * 2 + 4 * cfg.image_encoder.projection_dim
    assert info["bytes_per_frame"] == built.summary["bytes_per_frame"] == want


def test_cached_moments_and_embeddings_equal_the_online_encoders(built):
    """(a) every frame of every clip: moments within float16 rounding, CLIP embeddings to float32 noise."""
    encode = jax.jit(lambda x: built.vae.encode(training.to_float(x)))
    embed = jax.jit(lambda x: built.clip(x).image_embeds)
    worst_m = worst_e = 0.0
    for split in building.SPLITS:
        clips = [schema.deserialize(d) for p in building.shard_paths(built.data, split) for d in _records(p)]
        for index, clip in enumerate(clips):
            moments, embeds = latent_cache.read_clip(built.data, split, index)
            assert moments.shape[0] == embeds.shape[0] == FRAMES
            assert moments.dtype == np.float16 and embeds.dtype == np.float32
            frames = clip.decode_frames()
            post = encode(frames)
            online = np.concatenate([np.asarray(post.mean), np.asarray(post.logvar)], axis=-1)
            np.testing.assert_allclose(moments.astype(np.float32), online, rtol=F16_RTOL, atol=F16_ATOL)
            emb = np.asarray(embed(clip_lib.preprocess(frames, model_lib.XNemoConfig.preset("tiny")
                                                      .image_encoder.image_size)))
            np.testing.assert_allclose(embeds, emb, rtol=1e-5, atol=1e-5)
            worst_m = max(worst_m, float(np.max(np.abs(moments.astype(np.float32) - online)
                                             / np.maximum(np.abs(online), 1e-3))))
            worst_e = max(worst_e, float(np.max(np.abs(embeds - emb))))
    print(f"max relative moment error {worst_m:.2e}, max abs CLIP error {worst_e:.2e}")


@pytest.fixture(scope="module")
def task():
    c = xnemo_config.get_config("tiny")
    c.data.num_frames, c.batch_size = 2, 2
    return training.make_task(c)


def test_encode_from_the_cache_equals_encoding_online(built, task):
    """(b) the pipeline's cached keys, and ``_encode`` with them against the frozen encoders on the pixels."""
    source = pipeline.open_source(built.data, "train", latents=True)
    kw = dict(batch_size=2, resolution=RES, num_frames=2, motion_size=task.motion_size, clip_size=task.clip_size,
              seed=0)
    batch = pipeline.xnemo_dataset(source, **kw)[0]
    plain = pipeline.xnemo_dataset(pipeline.open_source(built.data, "train"), **kw)[0]
    assert "clip_pixels" not in batch and {"reference_moments", "frame_moments", "clip_embeds"} <= set(batch)
    for k in set(plain) - {"clip_pixels"}:   # the same examples: pixels, crops and indices unchanged by the cache
        np.testing.assert_array_equal(batch[k], plain[k], err_msg=k)
    side, _, c = task.latent_shape
    assert batch["frame_moments"].shape == (2, 2, side, side, 2 * c) 
    assert batch["clip_embeds"].shape == (2, task.model_config.image_encoder.projection_dim)
    for i, clip_index in enumerate(batch["clip_index"]):   # the example's frames, read one record each
        moments, embeds = latent_cache.read_clip(built.data, "train", int(clip_index))
        ref, start = int(batch["reference_index"][i]), int(batch["start"][i])
        np.testing.assert_array_equal(batch["reference_moments"][i], moments[ref])
        np.testing.assert_array_equal(batch["frame_moments"][i], moments[start:start + 2])
        np.testing.assert_array_equal(batch["clip_embeds"][i], embeds[ref])

    model = types.SimpleNamespace(vae=built.vae, image_encoder=built.clip)
    key = jax.random.key(7)
    for sample in (False, True):   # the mean (eval) and a posterior draw (same key: the same noise)
        cached = task._encode(model, {k: jnp.asarray(v) for k, v in batch.items()}, key, sample)
        online = task._encode(model, {k: jnp.asarray(v) for k, v in plain.items()}, key, sample)
        for name, a, b in zip(("latents", "reference latents", "context"), cached, online, strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype == jnp.float32
            err = float(jnp.max(jnp.abs(a - b)))
            scale = float(jnp.max(jnp.abs(b)))
            # float16 moments: <= 2^-11 of the largest scaled latent (x 2 for a draw: mean + std * noise)
            assert err <= (2 * F16_RTOL * scale + 1e-5 if name != "context" else 1e-5), (name, sample, err, scale)
            print(f"sample={sample} {name}: max abs error {err:.2e} (max |value| {scale:.2f})")


def test_the_runtime_uses_the_cache_only_when_it_fits(built, task):
    """(c) resolution, latent shape and both fingerprints are checked; a mismatch is one UserError line that
    names the cache file and the fix; data.use_latent_cache=False ignores the cache."""
    c = xnemo_config.get_config("tiny")
    c.data.path = built.data
    info = trainer._latent_cache(c, task)
    assert info is not None and info["resolution"] == RES
    c.data.use_latent_cache = False
    assert trainer._latent_cache(c, task) is None
    c.data.path = ""
    assert trainer._latent_cache(c, task) is None

    with pytest.raises(UserError) as e:
        latent_cache.check(built.data, resolution=128)
    msg = str(e.value)
    assert "cache_info.json" in msg and "built at 64² but this run trains at 128²" in msg
    assert "--cache-latents=" in msg and "delete" in msg and "\n" not in msg
    with pytest.raises(UserError, match=r"latents are \(\d+, \d+, \d+\)"):
        latent_cache.check(built.data, latent_shape=(8, 8, 4))

    rt = types.SimpleNamespace(latent_cache=info, task=task, config=types.SimpleNamespace(data=c.data))
    c.data.path = built.data
    state = {"model": {"fixed": {"vae": {**built.weights["vae"], "decoder": {}}, "image_encoder":
                                 built.weights["clip"]}}}
    trainer.Runtime.check_latent_cache(rt, state)       # the weights it was built from: accepted
    _, other_vae = _random_module("svd_vae", model_lib.TINY_VAE, 5)
    state["model"]["fixed"]["vae"] = other_vae
    with pytest.raises(UserError, match="built with other VAE encoder weights") as e:
        trainer.Runtime.check_latent_cache(rt, state)
    assert "cache_info.json" in str(e.value) and "CLIP" not in str(e.value).split(";")[0]

    other = cache_latents.Encoders(_random_module("svd_vae", model_lib.TINY_VAE, 5)[0], built.clip, "other")
    with pytest.raises(UserError, match="built with other vae_fingerprint"):   # the builder refuses to mix
        cache_latents.build_cache(built.data, other, progress=False)


def test_a_rerun_skips_finished_shards_and_rewrites_only_a_missing_one(built):
    """(d) nothing is re-encoded when every shard is there; a deleted shard (and a stale partial file of a
    killed run beside it) is rebuilt byte-identical; the weights are read from the convert.py sd folder."""
    encoders = cache_latents.load_encoders(built.ckpt)
    assert encoders.fingerprints() == {k: latent_cache.fingerprint(v) for k, v in built.weights.items()}
    cache = latent_cache.cache_dir(built.data)
    before = {p: open(p, "rb").read() for p in glob.glob(os.path.join(cache, "*.array_record"))}
    info = cache_latents.build_cache(built.data, encoders, batch_size=4, progress=False)
    assert (info["written"], info["skipped"]) == (0, 2)
    victim = os.path.join(cache, "train-00000.array_record")
    os.remove(victim)
    stale = os.path.join(cache, ".train-00000.abc.partial.array_record")
    open(stale, "wb").write(b"half a shard")
    with pytest.raises(UserError, match="missing"):   # a reader is told, never given a partial shard
        latent_cache.shard_paths(built.data, "train")
    info = cache_latents.build_cache(built.data, encoders, batch_size=4, progress=False)
    assert (info["written"], info["skipped"]) == (1, 1)
    after = {p: open(p, "rb").read() for p in glob.glob(os.path.join(cache, "*.array_record"))}
    assert after == before


def test_the_pipeline_reads_only_the_frames_it_takes(built):
    """One record per frame: an example reads its F + 1 frames' records, not the clip's; a record of another
    clip (a dataset changed under its cache) is refused."""
    import grain

    paths, offsets = latent_cache.shard_paths(built.data, "train")
    info = latent_cache.load_info(built.data)
    reads = []

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def __len__(self):
            return len(self.inner)

        def __getitems__(self, keys):
            reads.extend(keys)
            return self.inner.__getitems__(keys)

    frames = pipeline.open_source(built.data, "train")
    source = latent_cache.CachedRecordSource(frames, Counting(grain.sources.ArrayRecordDataSource(paths)), offsets,
                                             info, name="train", directory=built.data)
    clip = source[1]
    _, _, extra = pipeline.take_frames(clip, [3, 0, 2])
    assert sorted(reads) == [offsets[1] + k for k in (0, 2, 3)]          # one read for moments and embeddings
    np.testing.assert_array_equal(extra["latent_moments"], latent_cache.read_clip(built.data, "train", 1)[0][[3, 0, 2]])
    assert len(frames) == 2
    shifted = np.array([FRAMES, 2 * FRAMES, 2 * FRAMES])   # clip 0 pointed at clip 1's records
    shifted = latent_cache.CachedRecordSource(frames, grain.sources.ArrayRecordDataSource(paths), shifted, info,
                                              name="train", directory=built.data)
    with pytest.raises(UserError, match="expected frame 0 of"):
        pipeline.take_frames(shifted[0], [0])


def test_the_weights_can_come_from_an_xnemo_training_run(built, tmp_path):
    """A training workdir (the tiny model keeps its random VAE / CLIP there): its newest step's frozen
    ``vae`` and ``image_encoder`` are read, and fingerprint like the weights that were saved."""
    ckpt = checkpointing.TrainCheckpointer(str(tmp_path / "run" / "checkpoints"), asynchronous=False)
    state = {"step": jnp.int32(3), "model": {"fixed": {"vae": nnx.state(built.vae, nnx.Param),
                                                      "image_encoder": nnx.state(built.clip, nnx.Param)}}}
    data_it = pipeline.make_iterator(pipeline.pairs_dataset(pipeline.open_source(built.data, "train"), batch_size=1,
                                                            resolution=RES, shard_index=0, shard_count=1))
    ckpt.save(3, state, data_it, {"model_name": "xnemo", "model": {"preset": "tiny"}, "data": {"resolution": RES}})
    ckpt.close()
    encoders = cache_latents.load_encoders(str(tmp_path / "run"))
    assert encoders.fingerprints() == {k: latent_cache.fingerprint(v) for k, v in built.weights.items()}
    assert encoders.source.endswith("(step 3)")
