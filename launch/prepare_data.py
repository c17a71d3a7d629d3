r"""Builds a talking-head dataset (ArrayRecord shards, optionally also TFDS) from videos or synthetic clips.

    python launch/prepare_data.py --input='videos/**/*.mp4' --output=data/heads --resolution=512
    python launch/prepare_data.py --synthetic=1000 --output=data/synthetic --resolution=256
    python launch/prepare_data.py --output=data/heads --cache-latents=checkpoints/sd   # X-NeMo latent cache

Each video is face-tracked with BlazeFace, cut into clips, cropped with one stable square per clip and
resized; see input_pipeline/building.py for the format. Re-running the same command resumes: finished
shards are skipped. Unreadable videos and videos without a face are reported and skipped.

``--cache-latents=CKPT`` (alone on a built dataset, or with --input/--synthetic after building) stores X-NeMo's
frozen VAE posterior moments and CLIP embedding of every frame in OUTPUT/latents/ (see launch/cache_latents.py
for what CKPT may be: a `launch/convert.py sd` output, an X-NeMo training run or params checkpoint), so
training skips those encoders; resumable shard by shard too.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from launch import cli  # noqa: E402

flags.DEFINE_string("input", None, "Video file, folder (recursive), glob or comma list of them.")
flags.DEFINE_string("output", None, "Output folder for the ArrayRecord shards.", required=True)
flags.DEFINE_integer("synthetic", 0, "Write this many synthetic talking-head clips instead of videos.")
flags.DEFINE_integer("resolution", 512, "Side of the square crops.")
flags.DEFINE_integer("clip_length", 128, "Frames per clip (longer videos are cut into several clips).")
flags.DEFINE_integer("min_clip_length", 8, "Drop clips shorter than this.")
flags.DEFINE_integer("frames_per_clip", 32, "Frames per synthetic clip.")
flags.DEFINE_integer("detect_every", 1, "Run the face detector on every n-th frame (interpolate between).")
flags.DEFINE_enum("detector", "short", ["short", "full", "auto"], "BlazeFace model.")
flags.DEFINE_enum("on_missing_face", "error", ["error", "center"],
                  "No face in a video: skip it ('error') or use a centred box ('center').")
flags.DEFINE_float("crop_scale", 2.0, "Crop side relative to the median face size.")
flags.DEFINE_enum("image_format", "jpeg", ["jpeg", "png"], "Frame encoding.")
flags.DEFINE_integer("quality", 95, "JPEG quality.")
flags.DEFINE_float("eval_fraction", 0.05, "Fraction of videos (or synthetic clips) held out as 'eval'; with two "
                   "or more videos and a fraction > 0, at least one video is held out and one trains.")
flags.DEFINE_integer("max_frames", 0, "Read at most this many frames per video (0: all).")
flags.DEFINE_integer("videos_per_shard", 16, "Videos per shard group (synthetic: 64 clips per shard).")
flags.DEFINE_integer("seed", 0, "Seed of the synthetic clips.")
flags.DEFINE_string("tfds_dir", "", "Also build the TFDS 'talking_heads' dataset under this data dir.")
flags.DEFINE_string("cache_latents", "", "X-NeMo latent cache: encode every frame with the frozen VAE and CLIP of "
                    "this checkpoint (convert.py sd output, X-NeMo run or params checkpoint) into OUTPUT/latents/ "
                    "(also spelled --cache-latents).")
flags.DEFINE_enum("cache_dtype", "float16", ["float16", "float32"], "Storage dtype of the cached VAE moments.")
flags.DEFINE_integer("cache_batch_size", 16, "Frames per compiled encoder call when caching latents.")


def main(argv):
    del argv
    from input_pipeline import building  # noqa: PLC0415
    from input_pipeline.errors import UserError  # noqa: PLC0415

    F = flags.FLAGS
    if F.input and F.synthetic:
        raise UserError("give exactly one of --input (videos) or --synthetic=N")
    if not F.input and not F.synthetic:
        if not F.cache_latents:
            raise UserError("give exactly one of --input (videos) or --synthetic=N (or --cache-latents=CKPT to "
                            "cache the latents of the dataset already in --output)")
        _cache(F)
        return
    if F.resolution < 16:
        raise UserError(f"--resolution must be >= 16, got {F.resolution}")
    options = building.BuildOptions(
        resolution=F.resolution, clip_length=F.clip_length, min_clip_length=F.min_clip_length,
        detect_every=F.detect_every, detector_model=F.detector, on_missing=F.on_missing_face,
        crop_scale=F.crop_scale, image_format=F.image_format, quality=F.quality,
        eval_fraction=F.eval_fraction, max_frames=F.max_frames or None)
    if F.synthetic:
        info = building.prepare_synthetic(F.synthetic, F.output, options, frames_per_clip=F.frames_per_clip,
                                          seed=F.seed)
    else:
        info = building.prepare_videos(building.resolve_inputs(F.input), F.output, options,
                                       videos_per_shard=F.videos_per_shard)
    unit = "clip" if F.synthetic else "video"
    for split in building.SPLITS:
        n, clips = info["num_sources"][split], info["num_clips"][split]
        print(f"{split}: {n} {unit}{'s' * (n != 1)}, {clips} clip{'s' * (clips != 1)}")
    if F.eval_fraction > 0 and info["num_clips"]["eval"] == 0:
        print("warning: the eval split is empty (too few usable videos); train with --config.eval_every_steps=0 "
              "or add videos", file=sys.stderr)
    print(json.dumps({"output": F.output, "num_clips": info["num_clips"], "num_sources": info["num_sources"],
                      "skipped": len(info["skipped"])}))
    if F.tfds_dir:
        from input_pipeline import tfds_talking_heads  # noqa: PLC0415
        tfds_talking_heads.build(F.output, F.tfds_dir)
        print(f"TFDS dataset 'talking_heads' written under {F.tfds_dir}")
    if sum(info["num_clips"].values()) == 0:
        raise UserError("no clips were written (every input was skipped; see the messages above)", F.output)
    if F.cache_latents:
        _cache(F)


def _cache(F) -> None:
    from input_pipeline import latent_cache  # noqa: PLC0415
    from launch import cache_latents  # noqa: PLC0415

    encoders = cache_latents.load_encoders(F.cache_latents)
    info = cache_latents.build_cache(F.output, encoders, batch_size=F.cache_batch_size, moments_dtype=F.cache_dtype)
    print(f"latent cache: {info['written']} shard(s) written, {info['skipped']} already there; "
          f"{latent_cache.describe(info)}")
    print(json.dumps({"latent_cache": latent_cache.cache_dir(F.output), "written": info["written"],
                      "skipped": info["skipped"], "bytes_per_frame": info["bytes_per_frame"]}))


if __name__ == "__main__":
    sys.argv = [("--cache_latents" + a[len("--cache-latents"):]) if a.startswith("--cache-latents") else a
                for a in sys.argv]
    cli.run(main)
