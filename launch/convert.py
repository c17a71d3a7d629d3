r"""Converts official PyTorch checkpoints to portrait-jax params checkpoints (Orbax) and back.

    python launch/convert.py liax --torch-checkpoint=lia-x.pt --output=checkpoints/liax-official
    python launch/convert.py liax --to-torch --checkpoint=checkpoints/liax-official --output=lia-x.pt
    python launch/convert.py liax --from-train=runs/mine --output=checkpoints/mine --directions=smile=3,yaw=7
    python launch/convert.py vgg19 --torch-checkpoint=vgg19-dcbb9e9d.pth --output=checkpoints/vgg19
    python launch/convert.py resnet50 --torch-checkpoint=resnet50-0676ba61.pth --output=checkpoints/resnet50
    python launch/convert.py vggface2 --torch-checkpoint=resnet50_ft_weight.pkl --output=checkpoints/vggface2
    python launch/convert.py sd --unet=sd-image-variations-diffusers/unet --vae=svd-xt/vae \
        --clip=sd-image-variations-diffusers/image_encoder --output=checkpoints/sd
    python launch/convert.py xnemo --official=xnemo-release --output=checkpoints/xnemo-official
    python launch/convert.py xnemo --to-torch --checkpoint=checkpoints/xnemo-official --output=xnemo-pth

``liax`` options: ``--scale`` (2 for the release), ``--motion-dim`` (40), ``--resolution`` (512),
``--norm-groups`` (32).
The output folder holds ``model.json`` (architecture config + metadata, including the names of the
official checkpoint's motion directions) and ``params/`` (Orbax). ``--from-train`` exports the generator
of a training run (its newest step, or the step folder given) without optimizer or discriminator
states; ``--directions`` names motion directions for ``launch/animate.py --edit`` (``name=id`` or
``name=id+id``, comma-separated; replaces the default names).

``xnemo`` reads the official release folder (``xnemo_jax.convert.load_official``: the two diffusers
folders ``sd-image-variations-diffusers/{unet,image_encoder}`` and ``stable-video-diffusion-img2vid-xt/vae``
plus the four ``xnemo_*.pth`` files, in the official loading order) and writes one params checkpoint of
all five networks (parameters, BatchNorm statistics and ``pe`` buffers; ``model.json`` holds the
``XNemoConfig`` and each file's stored dtypes). ``--to-torch`` writes the four ``.pth`` files back into a
new folder, bit for bit (``xnemo_denoising_unet.pth`` = SD + ``motion_modules`` keys).

``vgg19`` converts torchvision's ImageNet VGG19 (the perceptual-loss network, :mod:`liax_jax.vgg`); only
the convolutions up to relu5_1 are kept, the others and the classifier are listed in the metadata as
``ignored_keys``.

``resnet50`` (torchvision's ImageNet ResNet-50) and ``vggface2`` (cydonia999's VGGFace2 ResNet-50: a plain
pickle of numpy arrays, ``.pkl``, or a torch state dict) write a ``"resnet"`` params checkpoint of
:mod:`perception.resnet` (parameters and BatchNorm statistics; ``model.json`` holds the ``ResNetConfig``).
Both files use the same key names; the subcommand picks the layout. ``--preset`` names the depth/width
(``resnet50``; ``tiny`` for tests), the number of classes is read from ``fc.weight`` (0 when the file has
no ``fc``); ``num_batches_tracked`` entries are ignored. Pickles are read with an unpickler that only
builds numpy arrays.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The 14 named directions of the official LIA-X checkpoint (liax_official.md §4.1): name -> dictionary id.
OFFICIAL_LIAX_DIRECTIONS = {"yaw1": 37, "yaw2": 39, "pitch": 28, "roll1": 15, "roll2": 33, "neck": 31, "pout": 6,
                            "mouth": 25, "o_mouth": 16, "smile": 19, "eyes": 13, "brows": 24, "gaze1": 17,
                            "gaze2": 26,
                            "yaw": [37, 39]}  # both yaw directions by the same value, as the official demos
# Edits of these make the manipulation sweep swing positive twice (the official list positions 6..9).
OFFICIAL_LIAX_MOUTH_DIRECTIONS = [6, 25, 16, 19]


def _conversion_error(error: Exception, path: str):
    """A :class:`UserError` from a conversion error, naming ``path`` once (some messages already do)."""
    from input_pipeline.errors import UserError  # noqa: PLC0415

    message = str(error)
    return UserError(message) if os.fspath(path) in message else UserError(message, path)


def convert_liax(args) -> None:
    import dataclasses  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from input_pipeline.errors import UserError  # noqa: PLC0415
    from launch import checkpointing  # noqa: PLC0415
    from liax_jax import convert  # noqa: PLC0415
    from liax_jax.model import LiaX, LiaXConfig  # noqa: PLC0415

    if args.from_train:
        export_liax_run(args)
        return
    if args.to_torch:
        if not args.checkpoint:
            raise UserError("--to-torch needs --checkpoint=DIR (a params checkpoint)")
        info = checkpointing.read_model_info(args.checkpoint)
        if info.get("model") != "liax":
            raise UserError(f"holds a {info.get('model')!r} checkpoint, not liax", args.checkpoint)
        config = LiaXConfig.from_config(info["config"])
        abstract = nnx.eval_shape(lambda: LiaX(config, rngs=nnx.Rngs(0)))
        graphdef, abstract_state = nnx.split(abstract)
        _, params = checkpointing.load_params(args.checkpoint, nnx.to_pure_dict(abstract_state))
        nnx.replace_by_pure_dict(abstract_state, params)
        model = nnx.merge(graphdef, abstract_state)
        import torch  # noqa: PLC0415
        state = {k: torch.from_numpy(np.array(v)) for k, v in convert.to_official(model).items()}
        tmp = args.output + ".partial"
        torch.save(state, tmp)
        os.replace(tmp, args.output)
        print(f"wrote {len(state)} tensors to {args.output}")
        return
    if not args.torch_checkpoint:
        raise UserError("give --torch-checkpoint=FILE (or --to-torch --checkpoint=DIR)")
    try:
        config = LiaXConfig(resolution=args.resolution, scale=args.scale, motion_dim=args.motion_dim,
                            norm_groups=args.norm_groups)
    except ValueError as e:
        raise UserError(f"bad LIA-X architecture flags: {e}") from e
    try:
        model = convert.load_official(args.torch_checkpoint, config)
    except convert.ConversionError as e:
        raise _conversion_error(e, args.torch_checkpoint) from e
    _, state = nnx.split(model)
    official = (args.resolution, args.scale, args.motion_dim, args.norm_groups) == (512, 2.0, 40, 32)
    metadata = {"source": os.path.abspath(args.torch_checkpoint),
                "directions": OFFICIAL_LIAX_DIRECTIONS if official else {},
                "mouth_directions": OFFICIAL_LIAX_MOUTH_DIRECTIONS if official else []}
    if args.directions:
        metadata["directions"] = _directions_flag(args.directions)
    checkpointing.save_params(args.output, "liax", dataclasses.asdict(config), nnx.to_pure_dict(state), metadata)
    print(f"wrote LIA-X params ({args.torch_checkpoint}) to {args.output}")


def _directions_flag(spec: str) -> dict:
    from input_pipeline.errors import UserError  # noqa: PLC0415
    from liax_jax import inference  # noqa: PLC0415

    try:
        return {k: list(v) if len(v) > 1 else v[0] for k, v in inference.direction_names(spec).items()}
    except ValueError as e:
        raise UserError(str(e), "--directions") from e


def export_liax_run(args) -> None:
    """Writes the generator of a training run as a params checkpoint (for inference and sharing)."""
    import dataclasses  # noqa: PLC0415

    from flax import nnx  # noqa: PLC0415

    from launch import checkpointing, loading  # noqa: PLC0415

    weights = loading.read_liax(args.from_train)
    runner, metadata = loading.load_liax(weights)
    found = weights.checkpoint
    names = _directions_flag(args.directions) if args.directions else \
        {k: list(v) if len(v) > 1 else v[0] for k, v in metadata["directions"].items()}
    info = {"source": found.path, "step": found.step, "directions": names, "mouth_directions": []}
    _, state = nnx.split(runner.model)
    checkpointing.save_params(args.output, "liax", dataclasses.asdict(runner.model.config), nnx.to_pure_dict(state),
                              info)
    print(f"wrote the LIA-X generator of {found.path} (step {found.step}) to {args.output}")


def convert_vgg19(args) -> None:
    from launch import checkpointing  # noqa: PLC0415
    from liax_jax import convert, vgg  # noqa: PLC0415

    try:
        state = convert.read_state_dict(args.torch_checkpoint)
        params = vgg.from_torchvision(state)
    except convert.ConversionError as e:
        raise _conversion_error(e, args.torch_checkpoint) from e
    metadata = {"source": os.path.basename(args.torch_checkpoint), "ignored_keys": vgg.ignored_keys(state)}
    checkpointing.save_params(args.output, "vgg19", {"channel_scale": 1.0}, params, metadata)
    print(f"wrote VGG19 params ({args.torch_checkpoint}) to {args.output}")


def _read_pickled_arrays(path: str) -> dict:
    """A plain pickle of ``{name: numpy array}`` (cydonia999's VGGFace2 format, Python 2 protocol); only
    numpy arrays (and dicts) may be built, so a hostile pickle cannot run code."""
    import pickle  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415

    from liax_jax.convert import ConversionError  # noqa: PLC0415

    allowed = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict"),
               ("_codecs", "encode")}  # protocol-2 pickles written by Python 3 encode bytes with it

    class ArraysOnly(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) not in allowed:
                raise pickle.UnpicklingError(f"refusing to build {module}.{name}")
            return super().find_class(module, name)

    if not os.path.exists(path):
        raise ConversionError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            state = ArraysOnly(f, encoding="latin1").load()
    except Exception as e:  # noqa: BLE001
        raise ConversionError(f"{path}: not a readable pickle of numpy arrays ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, np.ndarray)
                                              for k, v in state.items()):
        raise ConversionError(f"{path}: not a pickled dict of numpy arrays")
    return dict(state)


def convert_resnet(args) -> None:
    """``resnet50`` / ``vggface2``: a torchvision-named ResNet state dict -> a ``resnet`` params checkpoint."""
    import dataclasses  # noqa: PLC0415

    from flax import nnx  # noqa: PLC0415

    from input_pipeline.errors import UserError  # noqa: PLC0415
    from launch import checkpointing  # noqa: PLC0415
    from liax_jax import convert  # noqa: PLC0415
    from perception import resnet  # noqa: PLC0415

    layout = "torchvision" if args.model == "resnet50" else "vggface2"
    try:
        config = resnet.ResNetConfig.preset(args.preset, layout=layout)
    except ValueError as e:
        raise UserError(str(e), "--preset") from e
    path = args.torch_checkpoint
    try:
        if path.endswith((".pkl", ".pickle")):
            state = _read_pickled_arrays(path)
        else:
            state = convert.read_state_dict(path)
        fc = state.get("fc.weight")
        config = dataclasses.replace(config, num_classes=int(fc.shape[0]) if fc is not None else 0)
        model = resnet.from_torch(state, config)
    except ValueError as e:  # ConversionError is a ValueError
        raise _conversion_error(e, path) from e
    checkpointing.save_params(args.output, "resnet", config.to_dict(), nnx.to_pure_dict(nnx.state(model)),
                              {"source": os.path.basename(path)})
    print(f"wrote {args.model} ResNet params ({path}: {layout} layout, {config.num_classes} classes) "
          f"to {args.output}")


def _diffusers_kind(folder: str, default: str) -> str:
    from xnemo_jax import convert  # noqa: PLC0415

    name = convert.read_config(folder).get("_class_name", "")
    return "svd_vae" if name == "AutoencoderKLTemporalDecoder" else default


def convert_sd(args) -> None:
    """Stable Diffusion components (diffusers/transformers folders) -> one params checkpoint each."""
    from flax import nnx  # noqa: PLC0415

    from input_pipeline.errors import UserError  # noqa: PLC0415
    from launch import checkpointing  # noqa: PLC0415
    from xnemo_jax import convert  # noqa: PLC0415

    parts = [(name, folder, kind) for name, folder, kind in
             (("unet", args.unet, "unet"), ("vae", args.vae, "vae"), ("image_encoder", args.clip, "clip_vision"))
             if folder]
    if not parts:
        raise UserError("give at least one of --unet, --vae, --clip")
    for _, folder, _ in parts:
        if not os.path.isdir(folder):
            raise UserError("no such folder", folder)
    for name, folder, kind in parts:
        try:
            kind = _diffusers_kind(folder, kind) if kind == "vae" else kind
            model = convert.load_pretrained(folder, kind)
            config = convert.read_config(folder)
        except convert.ConversionError as e:
            raise UserError(str(e)) from e
        out = os.path.join(args.output, name)
        checkpointing.save_params(out, kind, config, nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                                  {"source": os.path.abspath(folder)})
        print(f"wrote {kind} ({folder}) to {out}")


def _dtype_summary(dtypes: dict) -> dict:
    """``{role: {key: dtype}}`` -> ``{role: {"default": most common dtype, "keys": {exceptions}}}``."""
    import collections  # noqa: PLC0415

    out = {}
    for role, per_key in dtypes.items():
        default = collections.Counter(per_key.values()).most_common(1)[0][0] if per_key else "float32"
        out[role] = {"default": default, "keys": {k: v for k, v in per_key.items() if v != default}}
    return out


def convert_xnemo(args) -> None:
    from flax import nnx  # noqa: PLC0415

    from input_pipeline.errors import UserError  # noqa: PLC0415
    from launch import checkpointing  # noqa: PLC0415
    from xnemo_jax import convert  # noqa: PLC0415

    if args.to_torch:
        export_xnemo_torch(args)
        return
    if not args.official:
        raise UserError("give --official=DIR (the X-NeMo release folder) or --to-torch --checkpoint=DIR")
    dtypes: dict = {}
    try:
        bundle = convert.load_official(args.official, dtypes=dtypes)
    except convert.ConversionError as e:
        raise _conversion_error(e, args.official) from e
    metadata = {"source": os.path.abspath(args.official), "stored_dtypes": _dtype_summary(dtypes)}
    checkpointing.save_params(args.output, "xnemo", bundle.config.to_dict(), nnx.to_pure_dict(nnx.state(bundle)),
                              metadata)
    print(f"wrote X-NeMo ({args.official}: {', '.join(bundle.NETWORKS)}) to {args.output}")


def export_xnemo_torch(args) -> None:
    """The four official .pth files of an X-NeMo params checkpoint, into a new folder."""
    import shutil  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from input_pipeline.errors import UserError  # noqa: PLC0415
    from launch import loading  # noqa: PLC0415
    from xnemo_jax import convert  # noqa: PLC0415

    if not args.checkpoint:
        raise UserError("--to-torch needs --checkpoint=DIR (an X-NeMo params checkpoint)")
    if os.path.exists(args.output):
        raise UserError("already exists; choose a new --output folder for the .pth files", args.output)
    bundle, metadata = loading.load_xnemo(args.checkpoint)
    summary = metadata.get("stored_dtypes", {})
    tmp = args.output.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for role, state in convert.to_release(bundle).items():
        stored = summary.get(role, {})
        tensors = {}
        for key, value in state.items():
            tensor = torch.from_numpy(np.array(value))  # a writable copy
            dtype = getattr(torch, stored.get("keys", {}).get(key, stored.get("default", "float32")))
            tensors[key] = tensor.to(dtype) if tensor.is_floating_point() and dtype.is_floating_point else tensor
        torch.save(tensors, os.path.join(tmp, convert.RELEASE_FILES[role]))
    os.replace(tmp, args.output)
    print(f"wrote {', '.join(convert.RELEASE_FILES.values())} to {args.output}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="model", required=True)
    p = sub.add_parser("liax", help="LIA-X (lia-x.pt)")
    p.add_argument("--torch-checkpoint", help="official state dict (.pt/.pth/.safetensors)")
    p.add_argument("--output", required=True, help="output folder (or .pt file with --to-torch)")
    p.add_argument("--to-torch", action="store_true", help="write a params checkpoint back as a torch state dict")
    p.add_argument("--checkpoint", help="params checkpoint folder to read with --to-torch")
    p.add_argument("--from-train", help="training workdir (newest step) or step folder to export")
    p.add_argument("--directions", help="motion direction names, e.g. 'smile=3,yaw=7+9'")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--scale", type=float, default=2.0)
    p.add_argument("--motion-dim", type=int, default=40)
    p.add_argument("--norm-groups", type=int, default=32, help="GroupNorm groups (32 in the release)")
    p = sub.add_parser("vgg19", help="torchvision ImageNet VGG19 for the perceptual loss (vgg19-dcbb9e9d.pth)")
    p.add_argument("--torch-checkpoint", required=True, help="torchvision vgg19 state dict (.pth/.safetensors)")
    p.add_argument("--output", required=True, help="output folder")
    for name, help_, file_help in (
            ("resnet50", "torchvision ImageNet ResNet-50 (resnet50-0676ba61.pth)",
             "torchvision resnet50 state dict (.pth/.safetensors)"),
            ("vggface2", "VGGFace2 ResNet-50, cydonia999 layout (resnet50_ft_weight.pkl)",
             "plain pickle of numpy arrays (.pkl) or a torch state dict (.pth)")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--torch-checkpoint", required=True, help=file_help)
        p.add_argument("--output", required=True, help="output folder")
        p.add_argument("--preset", default="resnet50",
                       help="perception.resnet preset for depth/width (resnet50; tiny for tests)")
    p = sub.add_parser("sd", help="Stable Diffusion parts for X-NeMo (diffusers/transformers folders)")
    p.add_argument("--unet", help="UNet2DConditionModel folder (config.json + weights)")
    p.add_argument("--vae", help="AutoencoderKL or AutoencoderKLTemporalDecoder folder")
    p.add_argument("--clip", help="CLIPVisionModelWithProjection folder")
    p.add_argument("--output", required=True, help="output folder (one params checkpoint per part)")
    p = sub.add_parser("xnemo", help="X-NeMo release folder (two diffusers folders + four xnemo_*.pth files)")
    p.add_argument("--official", help="release folder (sd-image-variations-diffusers/, "
                   "stable-video-diffusion-img2vid-xt/, xnemo_*.pth)")
    p.add_argument("--output", required=True, help="output folder (the .pth folder with --to-torch)")
    p.add_argument("--to-torch", action="store_true", help="write a params checkpoint back as the four .pth files")
    p.add_argument("--checkpoint", help="X-NeMo params checkpoint folder to read with --to-torch")
    args = parser.parse_args(argv)

    from input_pipeline.errors import UserError  # noqa: PLC0415
    try:
        {"liax": convert_liax, "vgg19": convert_vgg19, "resnet50": convert_resnet, "vggface2": convert_resnet,
         "sd": convert_sd, "xnemo": convert_xnemo}[args.model](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
