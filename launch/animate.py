r"""Animate, edit and manipulate real portraits and videos with a trained or converted model.

    python launch/animate.py xnemo --checkpoint=CKPT --source=face.jpg --driving=talk.mp4 --output=out.mp4
    python launch/animate.py liax --checkpoint=CKPT --source=face.jpg --driving=talk.mp4 --output=out.mp4
    python launch/animate.py liax --checkpoint=CKPT --mode=img_edit --source=face.jpg \
        --edit=yaw=-0.3,mouth=0.2 --output=edit.png
    python launch/animate.py liax --checkpoint=CKPT --mode=vid_edit --driving=talk.mp4 \
        --edit=eyes=-0.3 --output=edit.mp4
    python launch/animate.py liax --checkpoint=CKPT --mode=manipulation --source=face.jpg \
        --edit=smile=0.3 --output=sweep.mp4
    python launch/animate.py liax --checkpoint=CKPT --mode=interpolation --source=face.jpg \
        --driving=a.jpg --driving=b.jpg --output=morph.mp4

X-NeMo (diffusion): see ``launch/xnemo_animate.py`` and ``python launch/animate.py xnemo --help``.

LIA-X modes (the official equations, ``liax_jax/inference.py``):

* ``animation`` (default): the source image moves like the driving video (relative to its first frame).
* ``img_edit``: the source image with the ``--edit`` directions applied (png/jpg output).
* ``vid_edit``: every frame of a video edited (its own first frame is the source).
* ``manipulation``: a 64-frame sweep of the ``--edit`` directions on the source (12 fps).
* ``interpolation``: the source driven by motion interpolated linearly between keyframes: two or more
  ``--driving`` images, or frames ``--keyframes`` of one driving video (default: its first and last).

``--checkpoint``: a params checkpoint (``launch/convert.py``) or a training workdir / step folder
(``launch/train.py``). ``--edit``: ``name=value`` or ``index=value``, comma-separated; names come from the
checkpoint's metadata (the official checkpoint: yaw1 yaw2 yaw pitch roll1 roll2 neck pout mouth o_mouth
smile eyes brows gaze1 gaze2).

Framing: the whole frame, padded to a square (never squashed), or with ``--crop`` the official LIA-X face
crop around the BlazeFace box (a video uses its first frame's box); resized to the model's resolution.
Outputs are resized back to the framed region; ``--paste-back`` blends the animated crop into the full
source image (or each video frame) with a feathered edge. Pixels are mapped from [-1, 1] to uint8 per
frame with clipping; ``--official-normalize`` uses the official min-max over the whole output instead
(a second pass over the video). Videos stream in chunks of ``--chunk-size`` frames (bounded memory),
keep the driving video's frame rate, and show a progress bar; ``--side-by-side`` writes
source | driving | result. Bad input stops with one ``error:`` line naming the file, exit status 2,
and no output file.
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import threading
from collections.abc import Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from input_pipeline import portrait, video_io  # noqa: E402
from input_pipeline.errors import UserError  # noqa: E402
from launch import xnemo_animate  # noqa: E402

MODES = ("animation", "img_edit", "vid_edit", "manipulation", "interpolation")
IMAGE_MODES = ("img_edit",)
MANIPULATION_FPS = 12.0
INTERPOLATION_FPS = 25.0


# ------------------------------------------------------------------------------------------ plumbing
def prefetch(iterable, depth: int = 2) -> Iterator:
    """Runs ``iterable`` (decode + crop) in a background thread, ``depth`` items ahead.

    Errors in the thread are raised in the consumer; when the consumer stops early the thread stops too
    and closes ``iterable`` (releasing the video file).
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(message) -> bool:
        while not stop.is_set():
            try:
                q.put(message, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in iterable:
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            put(("error", e))
        finally:
            close = getattr(iterable, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def pipelined(items, dispatch) -> Iterator:
    """``(item, np.asarray(dispatch(item)))`` with the next item dispatched before the previous result is
    fetched, so the accelerator computes while the host decodes, crops and encodes."""
    pending = None
    for item in items:
        out = dispatch(item)
        if pending is not None:
            yield pending[0], np.asarray(pending[1])
        pending = (item, out)
    if pending is not None:
        yield pending[0], np.asarray(pending[1])


def progress(total: int | None, desc: str, quiet: bool):
    from tqdm import tqdm  # noqa: PLC0415

    return tqdm(total=total, desc=desc, unit="frame", disable=quiet, file=sys.stderr, dynamic_ncols=True,
                smoothing=0.1)


# ------------------------------------------------------------------------------------------- inputs
def _is_image(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in video_io.IMAGE_EXTENSIONS


def check_args(args) -> None:
    """Flag combinations and output names, before anything is read."""
    mode = args.mode
    drv = args.driving or []
    if args.chunk_size < 1:
        raise UserError("must be >= 1", "--chunk-size")
    if args.max_frames is not None and args.max_frames < 1:
        raise UserError("must be >= 1", "--max-frames")
    if args.paste_back and not args.crop:
        raise UserError("--paste-back blends a face crop back into the frame; add --crop", "--paste-back")
    if mode in ("animation", "img_edit", "manipulation", "interpolation") and not args.source:
        raise UserError(f"--mode={mode} needs a source image", "--source")
    if mode == "animation" and len(drv) != 1:
        raise UserError("--mode=animation needs one driving video (file or folder of frames)", "--driving")
    if mode == "vid_edit":
        if args.source and not drv and not _is_image(args.source):
            args.driving = drv = [args.source]  # `--source=video.mp4` reads naturally too
            args.source = None
        if len(drv) != 1 or args.source:
            raise UserError("--mode=vid_edit edits one video given as --driving", "--driving")
    if mode in ("img_edit", "manipulation") and drv:
        raise UserError(f"--mode={mode} takes no driving input", "--driving")
    if mode == "interpolation" and not drv:
        raise UserError("--mode=interpolation needs keyframes: two or more --driving images, or one video "
                        "with --keyframes", "--driving")
    if mode == "manipulation" and not args.edit:
        raise UserError("--mode=manipulation sweeps the given edits; pass --edit=name=value", "--edit")
    if args.keyframes and not (mode == "interpolation" and len(drv) == 1):
        raise UserError("--keyframes picks frames of one driving video in --mode=interpolation", "--keyframes")
    ext = os.path.splitext(args.output)[1].lower()
    if mode in IMAGE_MODES:
        if ext not in video_io.IMAGE_EXTENSIONS:
            raise UserError(f"--mode={mode} writes an image; use .png or .jpg", args.output)
    elif ext not in (".mp4", ".mov", ".m4v", ".avi", ".mkv"):
        raise UserError(f"--mode={mode} writes a video; use .mp4 (or .mov/.avi/.mkv)", args.output)
    if os.path.isdir(args.output):
        raise UserError("is a folder; give a file name", args.output)
    if args.fps is not None and args.fps <= 0:
        raise UserError("must be positive", "--fps")


class Framer:
    """Face detection (``--crop``) and :class:`~input_pipeline.portrait.Framing` for the inputs."""

    def __init__(self, args, resolution: int):
        self.args = args
        self.resolution = resolution
        self._detector = None

    def __call__(self, image: np.ndarray, name: str) -> portrait.Framing:
        h, w = image.shape[:2]
        if not self.args.crop:
            return portrait.Framing.whole_frame(h, w, self.resolution, pad=self.args.pad)
        if self._detector is None:
            from input_pipeline.face_detection import FaceDetector  # noqa: PLC0415
            self._detector = FaceDetector(self.args.detector)
        found = self._detector.detect(image)
        if found is None:
            raise UserError("no face found (try --detector=full, or drop --crop to use the whole frame)", name)
        box = found[0]
        return portrait.Framing.face(box, h, w, self.resolution, pad=self.args.pad)


def parse_keyframes(spec: str | None) -> list[int]:
    if not spec:
        return [0, -1]
    try:
        frames = [int(p) for p in spec.split(",") if p.strip()]
    except ValueError:
        raise UserError(f"expected frame indices like 0,40,-1, got {spec!r}", "--keyframes") from None
    if len(frames) < 2:
        raise UserError("give at least two frame indices", "--keyframes")
    return frames


def video_keyframes(path: str, indices: list[int], max_frames: int | None) -> list[np.ndarray]:
    """The frames ``indices`` (negative: from the end) of a video, streaming through it once."""
    reader = video_io.VideoReader(path, max_frames=max_frames)
    wanted = {i for i in indices if i >= 0}
    tail_len = max([-i for i in indices if i < 0], default=0)
    picked, tail, count = {}, [], 0
    for i, frame in enumerate(reader):
        count = i + 1
        if i in wanted:
            picked[i] = frame
        if tail_len:
            tail = (tail + [frame])[-tail_len:]
    out = []
    for i in indices:
        j = i if i >= 0 else count + i
        if not 0 <= j < count:
            raise UserError(f"keyframe {i} is outside the video's {count} frames", path)
        out.append(picked[j] if j in picked else tail[j - (count - len(tail))])
    return out


# --------------------------------------------------------------------------------------------- modes
class Job:
    """One run of the tool: inputs read and framed, the model loaded, frames produced on demand."""

    def __init__(self, args, runner=None, metadata: dict | None = None):
        """``runner``/``metadata``: an already loaded model (benchmarks, notebooks); else ``--checkpoint``."""
        from launch import loading  # noqa: PLC0415
        from liax_jax import inference  # noqa: PLC0415

        self.args = args
        self.inference = inference
        found = None
        if runner is None:
            found = loading.read_liax(args.checkpoint, args.dtype)
            config, metadata, self.checkpoint = found.config, found.metadata, found.path
        else:
            config, self.checkpoint = runner.model.config, args.checkpoint
            metadata = {"directions": {}, "mouth_directions": [], **(metadata or {})}
        try:
            self.ids, self.values = inference.parse_edits(args.edit, metadata["directions"], config.motion_dim)
        except KeyError as e:
            raise UserError(e.args[0], self.checkpoint) from None
        except ValueError as e:
            raise UserError(str(e), "--edit") from None
        self.metadata = metadata
        self.framer = Framer(args, config.resolution)
        mode = args.mode
        # read and validate every input before the (slow) model load
        self.source = self.source_framing = None
        if args.source:
            self.source = video_io.read_image(args.source)
            self.source_framing = self.framer(self.source, args.source)
        self.keyframes = None
        self.reader_info = None
        if mode in ("animation", "vid_edit"):
            with video_io.VideoReader(args.driving[0]) as reader:  # validates; info + first frame only
                self.reader_info = reader.info
                first = next(iter(reader))
            self.driving_framing = self.framer(first, args.driving[0])
        elif mode == "interpolation":
            if len(args.driving) == 1 and not _is_image(args.driving[0]):
                frames = video_keyframes(args.driving[0], parse_keyframes(args.keyframes), args.max_frames)
                framing = self.framer(frames[0], args.driving[0])
                self.keyframes = [framing.crop(f) for f in frames]
            else:
                if len(args.driving) < 2:
                    raise UserError("interpolation needs two or more keyframe images (or one video)", "--driving")
                self.keyframes = []
                for path in args.driving:
                    image = video_io.read_image(path)
                    self.keyframes.append(self.framer(image, path).crop(image))
        if runner is None:
            runner, _ = loading.load_liax(found, chunk_size=args.chunk_size)
        self.runner = runner

    # ------------------------------------------------------------------------------------- outputs
    @property
    def fps(self) -> float:
        if self.args.fps:
            return float(self.args.fps)
        if self.reader_info is not None:
            return self.reader_info.fps
        return MANIPULATION_FPS if self.args.mode == "manipulation" else INTERPOLATION_FPS

    @property
    def num_frames(self) -> int | None:
        mode = self.args.mode
        if mode in ("animation", "vid_edit"):
            n = self.reader_info.num_frames
            return min(n, self.args.max_frames) if self.args.max_frames else n
        if mode == "manipulation":
            return 4 * self.args.steps
        if mode == "interpolation":
            return (len(self.keyframes) - 1) * self.args.steps + 1
        return 1

    def frames(self) -> Iterator[tuple[np.ndarray, portrait.Framing, np.ndarray, list[np.ndarray]]]:
        """``(float result (R, R, 3), framing, canvas for --paste-back, side-by-side panels)`` per frame."""
        import jax.numpy as jnp  # noqa: PLC0415

        inf, args, run = self.inference, self.args, self.runner
        mode = args.mode
        if mode in ("animation", "vid_edit"):
            framing = self.driving_framing

            def decoded():
                with video_io.VideoReader(args.driving[0], max_frames=args.max_frames) as reader:
                    for chunk in reader.chunks(run.chunk_size):
                        yield chunk, portrait.to_model(framing.crop_many(chunk))

            stream = prefetch(decoded())
            anim = None
            if mode == "animation":
                src = portrait.to_model(self.source_framing.crop(self.source))
                anim = inf.Animation(run, src[None], self.ids, self.values)

            def dispatch(item):
                nonlocal anim
                chunk, x = item
                x = jnp.asarray(x)
                if anim is None:  # vid_edit: the video's own first frame is the source
                    anim = inf.Animation(run, x[0:1], self.ids, self.values)
                if anim.alpha_start is None:
                    anim.start(x[0:1])
                return anim(x)

            for (chunk, _), out in pipelined(stream, dispatch):
                for full, result in zip(chunk, out, strict=True):
                    if mode == "animation":
                        yield result, self.source_framing, self.source, [self._shown(self.source, self.source_framing),
                                                                         self._shown(full, framing)]
                    else:
                        yield result, framing, full, [self._shown(full, framing)]
            return
        src = jnp.asarray(portrait.to_model(self.source_framing.crop(self.source)))[None]
        if mode == "img_edit":
            out = inf.edit_image(run, src, self.ids, self.values)
        elif mode == "manipulation":
            mouth = set(self.metadata["mouth_directions"])
            repeat = any(i in mouth and v != 0 for i, v in zip(self.ids, self.values, strict=True))
            out = inf.manipulate(run, src, self.ids, self.values, steps=args.steps, repeat_positive=repeat)
        else:
            keys = jnp.asarray(portrait.to_model(np.stack(self.keyframes)))
            out = inf.interpolate(run, src, keys, args.steps, self.ids, self.values)
        shown = [self._shown(self.source, self.source_framing)]
        for result in np.asarray(out):
            yield result, self.source_framing, self.source, shown

    def _shown(self, image, framing):
        """What a side-by-side panel shows of an input: the full frame with --paste-back, else the region."""
        if self.args.paste_back:
            return image
        x0, y0, x1, y1 = framing.visible
        return image[y0:y1, x0:x1]

    def postprocess(self, result, framing, canvas, panels, lo_hi, masks: dict) -> np.ndarray:
        region = framing.uncrop(result)
        image = portrait.minmax_to_uint8(region, *lo_hi) if lo_hi else portrait.to_uint8(region)
        if self.args.paste_back:
            key = id(framing)
            if key not in masks:
                masks[key] = framing.feather_mask(self.args.feather)
            image = framing.paste(canvas, image, masks[key])
        if self.args.side_by_side:
            image = portrait.side_by_side(panels + [image], image.shape[0])
        return image

    def output_range(self) -> tuple[float, float]:
        """The official normalisation's (min, max) of the clamped output: a first pass over all frames."""
        lo, hi = np.inf, -np.inf
        with progress(self.num_frames, "pass 1/2 (range)", self.args.quiet) as bar:
            for result, framing, _, _ in self.frames():
                region = np.clip(framing.uncrop(result), -1.0, 1.0)
                lo, hi = min(lo, float(region.min())), max(hi, float(region.max()))
                bar.update(1)
        return lo, hi

    def run(self) -> int:
        args = self.args
        lo_hi = self.output_range() if args.official_normalize else None
        masks: dict = {}
        desc = "pass 2/2" if lo_hi else args.mode
        if args.mode in IMAGE_MODES:
            (result, framing, canvas, panels), = list(self.frames())
            video_io.write_image(args.output, self.postprocess(result, framing, canvas, panels, lo_hi, masks))
            return 1
        with video_io.VideoWriter(args.output, self.fps) as writer, progress(self.num_frames, desc, args.quiet) as bar:
            for result, framing, canvas, panels in self.frames():
                writer.write(self.postprocess(result, framing, canvas, panels, lo_hi, masks))
                bar.update(1)
        return writer.num_frames


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="model", required=True)
    p = sub.add_parser("liax", help="LIA-X", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="params checkpoint or training workdir/step folder")
    p.add_argument("--mode", choices=MODES, default="animation")
    p.add_argument("--source", help="source image (vid_edit: the video may be given here instead)")
    p.add_argument("--driving", action="append", help="driving video or frame folder; interpolation: repeat for "
                                                      "keyframe images")
    p.add_argument("--output", required=True, help="output .mp4 (img_edit: .png/.jpg)")
    p.add_argument("--edit", default="", help="edits, e.g. yaw=-0.3,mouth=0.2 or 37=-0.3")
    p.add_argument("--crop", action="store_true", help="crop the face (official LIA-X rule, BlazeFace box)")
    p.add_argument("--detector", choices=("short", "full", "auto"), default="auto", help="BlazeFace model")
    p.add_argument("--pad", choices=portrait.PADS, default="edge", help="fill of a framing window past the image")
    p.add_argument("--paste-back", action="store_true", help="blend the animated crop into the full frame")
    p.add_argument("--feather", type=float, default=0.1, help="paste-back blend width, fraction of the crop side")
    p.add_argument("--side-by-side", action="store_true", help="write source | driving | result")
    p.add_argument("--official-normalize", action="store_true",
                   help="official min-max colour normalisation over the whole output (two passes)")
    p.add_argument("--chunk-size", type=int, default=8, help="frames decoded, animated and encoded together")
    p.add_argument("--max-frames", type=int, default=None, help="use only the first N driving frames")
    p.add_argument("--keyframes", help="interpolation: frame indices of the driving video (default 0,-1)")
    p.add_argument("--steps", type=int, default=16, help="manipulation: frames per quarter sweep; "
                                                         "interpolation: frames per keyframe pair")
    p.add_argument("--fps", type=float, default=None, help="output frame rate (default: the driving video's; "
                                                           "manipulation 12, interpolation 25)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype (default: the checkpoint's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    xnemo_animate.add_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.model == "xnemo":
            count = xnemo_animate.main(args)
        else:
            if args.steps < 1:
                raise UserError("must be >= 1", "--steps")
            check_args(args)
            count = Job(args).run()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no output written", file=sys.stderr)
        return 130
    if not args.quiet:
        print(f"wrote {count} frame{'s' if count != 1 else ''} to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
