r"""``launch/animate.py xnemo``: X-NeMo on real portraits and videos (the sampler is ``xnemo_jax.sampling``).

    python launch/animate.py xnemo --checkpoint=CKPT --source=me.jpg --driving=talk.mp4 --output=out.mp4
    python launch/animate.py xnemo --checkpoint=CKPT --mode=interpolation --source=me.jpg \
        --driving=smile.jpg --driving=frown.jpg --output=morph.mp4

Inputs (``xnemo_official.md`` §1.2): the source's BlazeFace box gives the **reference crop** (the box grown
by half its size on every side, zero-padded, resized to the model resolution: what the model renders) and
its **pose crop** (the 1.1x square of the box: the negative motion of CFG). The driving video is read
twice: once for the per-frame boxes, then for the **driving crops** (a fixed 1.1x square size from frame
0, centres smoothed with a Gaussian of sigma 5 frames, resized to the motion encoder's 224² with Lanczos).
``--crop=none`` uses whole frames (inputs already aligned, as the official demo's). A single image as the
driver gives a still video of that expression (``--still-frames`` frames).

Output: the generated reference-crop video at the model resolution and the driving video's frame rate (image drivers and
interpolation: 25 fps, or ``--fps``), one frame per driving frame used; ``--paste-back`` blends it into
the source image, ``--side-by-side`` writes source | driving | result. The write is atomic; progress bars
cover the face pass, denoising steps and decoding. Bad input: one ``error:`` line, exit status 2, no file.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator

import numpy as np

from input_pipeline import crops as crops_lib
from input_pipeline import portrait, video_io
from input_pipeline.errors import UserError

MODES = ("animation", "interpolation")
VIDEO_EXTENSIONS = (".mp4", ".mov", ".m4v", ".avi", ".mkv")
STILL_FPS = 25.0


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("xnemo", help="X-NeMo (diffusion)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="launch/convert.py xnemo output (params checkpoint)")
    p.add_argument("--mode", choices=MODES, default="animation")
    p.add_argument("--source", required=True, help="portrait image (a video: its first frame)")
    p.add_argument("--driving", action="append", help="driving video, frame folder or image; interpolation: "
                                                      "repeat for keyframe images, or one video + --keyframes")
    p.add_argument("--output", required=True, help="output video (.mp4; .mkv/.mov/.avi)")
    p.add_argument("--preset", choices=("paper", "official"), default="paper",
                   help="paper: 25 steps, CFG 3.5; official: the release's 35 steps, CFG 2.5")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the preset's)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the preset's)")
    p.add_argument("--seed", type=int, default=0, help="initial noise and per-step window offsets")
    p.add_argument("--window-offsets", default=None,
                   help="comma-separated window offset per step (replays a run; default: from --seed)")
    p.add_argument("--max-frames", type=int, default=None, help="use only the first N driving frames")
    p.add_argument("--still-frames", type=int, default=25, help="frames of the video for an image driver")
    p.add_argument("--motion-bbox", action="store_true",
                   help="feed the real head translation/scale (dy, dx, s) instead of the official (0, 0, 1)")
    p.add_argument("--context-frames", type=int, default=24, help="frames per context window (<= 32)")
    p.add_argument("--context-overlap", type=int, default=4, help="frames shared by consecutive windows")
    p.add_argument("--window-batch", type=int, default=1, help="context windows per denoiser call")
    p.add_argument("--decode-chunk", type=int, default=25, help="frames per SVD decoder call")
    p.add_argument("--motion-batch", type=int, default=16, help="crops per motion-encoder call")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype (default: the checkpoint's)")
    p.add_argument("--crop", choices=("auto", "none"), default="auto",
                   help="auto: BlazeFace crops (official); none: whole frames, already aligned")
    p.add_argument("--detector", choices=("short", "full", "auto"), default="auto", help="BlazeFace model")
    p.add_argument("--on-missing-face", choices=("error", "center"), default="error",
                   help="no face found: stop with an error, or use a centred box")
    p.add_argument("--keyframes", help="interpolation: frame indices of the driving video (default 0,-1)")
    p.add_argument("--interp-frames", type=int, default=16, help="interpolation: frames per keyframe pair")
    p.add_argument("--paste-back", action="store_true", help="blend the result into the full source image")
    p.add_argument("--feather", type=float, default=0.1, help="paste-back blend width, fraction of the crop side")
    p.add_argument("--side-by-side", action="store_true", help="write source | driving | result")
    p.add_argument("--fps", type=float, default=None, help="output frame rate (default: the driving video's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _is_image(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in video_io.IMAGE_EXTENSIONS


def check_args(args) -> None:
    for flag in ("max_frames", "still_frames", "context_frames", "window_batch", "decode_chunk", "motion_batch",
                 "interp_frames"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError("must be >= 1", "--" + flag.replace("_", "-"))
    if args.steps is not None and not 1 <= args.steps <= 1000:
        raise UserError("must be in [1, 1000]", "--steps")
    if args.context_frames > 32:
        raise UserError("the temporal modules' position table has 32 rows; use at most 32", "--context-frames")
    if not 0 <= args.context_overlap < args.context_frames:
        raise UserError(f"must be in [0, --context-frames={args.context_frames})", "--context-overlap")
    if args.fps is not None and args.fps <= 0:
        raise UserError("must be positive", "--fps")
    drv = args.driving or []
    if args.mode == "animation" and len(drv) != 1:
        raise UserError("--mode=animation needs one driving video, frame folder or image", "--driving")
    if args.mode == "interpolation":
        if not drv or (len(drv) == 1 and _is_image(drv[0])):
            raise UserError("--mode=interpolation needs two or more keyframe images, or one video with "
                            "--keyframes", "--driving")
    if args.keyframes and not (args.mode == "interpolation" and len(drv) == 1):
        raise UserError("--keyframes picks frames of one driving video in --mode=interpolation", "--keyframes")
    if args.motion_bbox and args.crop == "none":
        raise UserError("--motion-bbox needs face boxes; drop --crop=none", "--motion-bbox")
    if os.path.splitext(args.output)[1].lower() not in VIDEO_EXTENSIONS:
        raise UserError("writes a video; use .mp4 (or .mkv/.mov/.avi)", args.output)
    if os.path.isdir(args.output):
        raise UserError("is a folder; give a file name", args.output)


def parse_offsets(spec: str | None, steps: int) -> list[int] | None:
    if spec is None:
        return None
    try:
        offsets = [int(p) for p in spec.split(",") if p.strip()]
    except ValueError:
        raise UserError(f"expected integers like 3,17,0, got {spec!r}", "--window-offsets") from None
    if len(offsets) != steps:
        raise UserError(f"gives {len(offsets)} offsets for {steps} steps; give one per step", "--window-offsets")
    if any(o < 0 for o in offsets):
        raise UserError("offsets must be >= 0", "--window-offsets")
    return offsets


def progress(total: int | None, desc: str, quiet: bool, unit: str = "frame"):
    from tqdm import tqdm  # noqa: PLC0415

    return tqdm(total=total, desc=desc, unit=unit, disable=quiet, file=sys.stderr, dynamic_ncols=True)


class Faces:
    """BlazeFace boxes, loaded on first use; ``--on-missing-face`` decides what a face-less input gives."""

    def __init__(self, args):
        self.args = args
        self._detector = None

    @property
    def detector(self):
        if self._detector is None:
            from input_pipeline.face_detection import FaceDetector  # noqa: PLC0415
            self._detector = FaceDetector(self.args.detector)
        return self._detector

    def image_box(self, image: np.ndarray, name: str) -> np.ndarray:
        from input_pipeline.face_detection import detect_image  # noqa: PLC0415
        try:
            return detect_image(self.detector, image, on_missing=self.args.on_missing_face, name=name)
        except UserError:
            raise UserError("no face found (use --on-missing-face=center for a centred box, or --crop=none for "
                            "aligned inputs)", name) from None

    def video_boxes(self, frames, name: str) -> np.ndarray:
        from input_pipeline.face_detection import detect_video  # noqa: PLC0415
        try:
            return detect_video(self.detector, frames, on_missing=self.args.on_missing_face, name=name)[0]
        except UserError as e:
            if "no face" not in str(e):
                raise
            raise UserError("no face found in any frame (use --on-missing-face=center, or --crop=none)",
                            name) from None


def pose_crop(image: np.ndarray, box: np.ndarray | None, size: int) -> np.ndarray:
    """The 1.1x face square (the driving-crop rule) resized to ``size`` (Lanczos); the whole frame (padded
    to a square) without a box."""
    if box is None:
        framing = portrait.Framing.whole_frame(*image.shape[:2], resolution=size)
        x0, y0, x1, y1 = framing.window
        window = crops_lib.crop_padded(image, x0, y0, x1, y1)
    else:
        x0, y0, x1, y1 = crops_lib.xnemo_driving_windows(np.asarray(box)[None], *image.shape[:2])[0]
        window = image[y0:y1, x0:x1]
    return crops_lib.resize(np.ascontiguousarray(window), size, size, method="lanczos")


class XNemoJob:
    """One run: inputs read and cropped, the model loaded, the video sampled and written."""

    def __init__(self, args, models=None):
        from launch import loading  # noqa: PLC0415
        from xnemo_jax import sampling  # noqa: PLC0415

        self.args, self.sampling = args, sampling
        preset = sampling.PRESETS[args.preset]
        self.steps = args.steps or preset["steps"]
        self.guidance = preset["guidance"] if args.guidance is None else args.guidance
        self.offsets = parse_offsets(args.window_offsets, self.steps)
        if models is None:
            found = loading.read_xnemo(args.checkpoint, args.dtype)  # JSON only: fail fast on a bad path
            config = found.config
        else:
            found, config = None, models.config
        self.resolution, self.motion_size = config.resolution, config.motion_encoder.image_size
        self.faces = Faces(args)
        self._read_source()
        self._read_driving()
        if models is None:
            models, _ = loading.load_xnemo(found)
        self.models = models

    # ------------------------------------------------------------------------------------ inputs
    def _read_source(self):
        args = self.args
        if _is_image(args.source):
            image = video_io.read_image(args.source)
        else:
            with video_io.VideoReader(args.source) as reader:
                image = next(iter(reader))
        h, w = image.shape[:2]
        self.source = image
        self.source_box = None if args.crop == "none" else self.faces.image_box(image, args.source)
        if self.source_box is None:
            self.framing = portrait.Framing.whole_frame(h, w, self.resolution, pad="black")
        else:
            window = crops_lib.xnemo_reference_window(self.source_box)
            self.framing = portrait.Framing(h, w, window, self.resolution, pad="black")
        self.reference = self.framing.crop(image)
        self.reference_pose = pose_crop(image, self.source_box, self.motion_size)

    def _crop_frames(self, frames: list[np.ndarray], boxes: np.ndarray | None) -> np.ndarray:
        if boxes is None:
            return np.stack([pose_crop(f, None, self.motion_size) for f in frames])
        return np.stack([pose_crop(f, b, self.motion_size) for f, b in zip(frames, boxes, strict=True)])

    def _read_driving(self):
        args = self.args
        self.driving_path = args.driving[0]
        self.f_rts = None
        self.still = None
        if args.mode == "interpolation":
            self._read_keyframes()
            return
        if _is_image(self.driving_path):
            image = video_io.read_image(self.driving_path)
            box = None if args.crop == "none" else self.faces.image_box(image, self.driving_path)
            self.still = image
            n = args.still_frames
            self.crops = np.repeat(pose_crop(image, box, self.motion_size)[None], n, axis=0)
            self.fps = args.fps or STILL_FPS
            boxes = None if box is None else np.repeat(np.asarray(box)[None], n, axis=0)
        else:
            boxes, self.crops, self.fps = self._video_crops()
        if args.motion_bbox:
            self.f_rts = crops_lib.relative_box_transform(self.source_box, boxes)

    def _video_crops(self):
        """Pass 1: per-frame boxes (streamed); pass 2: the smoothed fixed-size crops (streamed)."""
        args, path = self.args, self.driving_path
        with video_io.VideoReader(path, max_frames=args.max_frames) as reader:
            fps, size, total = reader.info.fps, (reader.info.height, reader.info.width), reader.info.num_frames
            if args.crop == "none":
                boxes = None
            else:
                with progress(total, "faces", args.quiet) as bar:
                    def frames():
                        for frame in reader:
                            bar.update(1)
                            yield frame
                    boxes = self.faces.video_boxes(frames(), path)
        windows = None if boxes is None else crops_lib.xnemo_driving_windows(boxes, *size)
        out = []
        with video_io.VideoReader(path, max_frames=args.max_frames) as reader, \
                progress(total if boxes is None else len(boxes), "crops", args.quiet) as bar:
            for i, frame in enumerate(reader):
                if windows is None:
                    out.append(pose_crop(frame, None, self.motion_size))
                else:
                    x0, y0, x1, y1 = windows[i]
                    out.append(crops_lib.resize(np.ascontiguousarray(frame[y0:y1, x0:x1]), self.motion_size,
                                                self.motion_size, method="lanczos"))
                bar.update(1)
        return boxes, np.stack(out), float(args.fps or fps)

    def _read_keyframes(self):
        from launch.animate import parse_keyframes, video_keyframes  # noqa: PLC0415

        args = self.args
        if len(args.driving) == 1:
            path = self.driving_path
            frames = video_keyframes(path, parse_keyframes(args.keyframes), args.max_frames)
            names = [path] * len(frames)
        else:
            frames = [video_io.read_image(p) for p in args.driving]
            names = list(args.driving)
        boxes = None if args.crop == "none" else np.stack([self.faces.image_box(f, n)
                                                           for f, n in zip(frames, names, strict=True)])
        self.keyframe_crops = self._crop_frames(frames, boxes)
        if args.motion_bbox:
            self.f_rts = crops_lib.relative_box_transform(self.source_box, boxes)
        self.crops = None
        self.fps = args.fps or STILL_FPS

    # ----------------------------------------------------------------------------------- sampling
    @property
    def num_frames(self) -> int:
        if self.crops is None:
            return (len(self.keyframe_crops) - 1) * self.args.interp_frames + 1
        return len(self.crops)

    def latents(self, sampler):
        args, sampling = self.args, self.sampling
        motion = None
        if self.crops is None:
            motion = sampling.interpolate_motion(sampler.motion(self.keyframe_crops, self.f_rts), args.interp_frames)
        with progress(self.steps, "denoising", args.quiet, unit="step") as bar:
            return sampling.sample_latents(
                self.models, self.reference, self.crops, steps=self.steps, guidance=self.guidance,
                context_frames=args.context_frames, context_overlap=args.context_overlap,
                window_offsets=self.offsets, seed=args.seed, window_batch=args.window_batch,
                reference_pose=self.reference_pose, f_rts=self.f_rts if motion is None else None, motion=motion,
                sampler=sampler, progress=lambda i: bar.update(1))

    def driving_frames(self) -> Iterator[np.ndarray | None]:
        """The driving frames again, for --side-by-side (a third streamed pass)."""
        if self.still is not None:
            while True:
                yield self.still
        if self.crops is None or not self.args.side_by_side:
            while True:
                yield None
        with video_io.VideoReader(self.driving_path, max_frames=self.args.max_frames) as reader:
            yield from reader

    def compose(self, result: np.ndarray, driving, mask) -> np.ndarray:
        args, framing = self.args, self.framing
        if args.paste_back:
            image = framing.paste(self.source, portrait.to_uint8(framing.uncrop(result)), mask)
        else:  # the model's own framing, at its resolution (as the official output)
            image = portrait.to_uint8(result)
        if args.side_by_side:
            x0, y0, x1, y1 = framing.visible
            panels = [self.source if args.paste_back else self.source[y0:y1, x0:x1]]
            if driving is not None:
                panels.append(driving)
            image = portrait.side_by_side(panels + [image], image.shape[0])
        return image

    def run(self) -> int:
        from xnemo_jax import sampling  # noqa: PLC0415

        args = self.args
        sampler = sampling.Sampler(self.models, motion_batch=args.motion_batch)
        latents = self.latents(sampler)
        mask = self.framing.feather_mask(args.feather) if args.paste_back else None
        driving = self.driving_frames()
        with video_io.VideoWriter(args.output, self.fps) as writer, \
                progress(self.num_frames, "decoding", args.quiet) as bar:
            for chunk in sampler.decode(latents, args.decode_chunk):
                for result in chunk:
                    writer.write(self.compose(result, next(driving), mask))
                    bar.update(1)
        return writer.num_frames


def main(args) -> int:
    check_args(args)
    return XNemoJob(args).run()
