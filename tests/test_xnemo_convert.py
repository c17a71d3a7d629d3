"""X-NeMo release conversion: ``xnemo_jax.convert.load_official`` over a tiny fake release folder.

The folder has the official layout: ``sd-image-variations-diffusers/{unet,image_encoder}`` and
``stable-video-diffusion-img2vid-xt/vae`` written by diffusers / transformers ``save_pretrained`` (random
torch modules of the tiny bundle's configs), and the four ``.pth`` files written by ``torch.save`` from
random official-layout state dicts (the reference net's in float16, to check that dtypes come back).
Checked: the official loading order and strictness (SD folder, then the denoising file, then the temporal
file, later ones overwriting; ``pe`` tables from the temporal file), one-line errors naming the file
and the key, the weights-only unpickler, ``launch/convert.py xnemo`` and its bit-exact ``--to-torch``,
and the AnimateDiff v2 import (its full-size key list too, without allocating).
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from xnemo_helpers import random_official_state, save_pth, write_tiny_release

from conftest import ROOT
from xnemo_jax import convert
from xnemo_jax import denoiser as D
from xnemo_jax import model as M
from xnemo_jax import motion_encoder as ME

PERCEPTION_KEYS = os.path.join(ROOT, "..", "shared", "reference", "perception_nets_keys.txt")


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """``(folder, files, SD UNet state)``: the fake release and the state dicts written to its .pth files."""
    folder = str(tmp_path_factory.mktemp("xnemo_release"))
    files, sd_unet = write_tiny_release(folder)
    return folder, files, sd_unet


@pytest.fixture(scope="module")
def loaded(release):
    dtypes = {}
    return convert.load_official(release[0], dtypes=dtypes), dtypes


def _variant(release, tmp_path, **files) -> str:
    """A copy of the release folder (links) with some .pth files replaced (``role=state``) or removed
    (``role=None``)."""
    folder = str(tmp_path / "variant")
    os.makedirs(folder)
    for name in (convert.SD_FOLDER, convert.SVD_FOLDER):
        os.symlink(os.path.join(release[0], name), os.path.join(folder, name))
    for role, name in convert.RELEASE_FILES.items():
        if role not in files:
            os.symlink(os.path.join(release[0], name), os.path.join(folder, name))
        elif files[role] is not None:
            save_pth(os.path.join(folder, name), files[role])
    return folder


def _equal(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        np.testing.assert_array_equal(ours[key], np.asarray(value, ours[key].dtype), err_msg=key)


def test_release_loads_in_the_official_order(release, loaded):
    folder, files, _ = release
    bundle, dtypes = loaded
    assert isinstance(bundle, M.XNemo)
    c = bundle.config
    assert (c.resolution, c.latent_size, c.motion_encoder) == (64, 16, ME.MotionEncoderConfig.tiny())
    assert c.denoiser.unet.block_out_channels == (32, 64) and c.image_encoder.projection_dim == 64
    # denoiser = denoising file (SD + motion_modules) then temporal file (incl. the perturbed pe tables)
    _equal(D.to_official(bundle.denoiser), {**files["denoising"], **files["temporal"]})
    _equal(D.to_official(bundle.reference_net), files["reference"])
    _equal(ME.to_official(bundle.motion_encoder), files["motion_encoder"])
    for role, kind in (("vae", "svd_vae"), ("image_encoder", "clip_vision")):
        expected = convert.to_torch(convert.load_pretrained(os.path.join(folder, convert.RELEASE_FOLDERS[role]), kind))
        _equal(convert.to_torch(getattr(bundle, role)), expected)
    assert set(dtypes["reference"].values()) == {"float16"} and dtypes["motion_encoder"][
        "model.bn1.num_batches_tracked"] == "int64"
    # nothing left abstract or in numpy: every variable is a device array
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(nnx.state(bundle)))


def test_later_files_overwrite_and_the_sd_folder_fills_the_rest(release, tmp_path):
    """Official non-strict semantics: an SD key absent from the denoising file keeps the SD folder's value;
    a temporal key in the denoising file is overwritten by the temporal file."""
    _, files, sd_unet = release
    denoising = dict(files["denoising"])
    del denoising["conv_in.bias"]
    key = next(k for k in files["temporal"] if k.endswith("proj_in.weight"))
    denoising[key] = files["temporal"][key] + 1.0
    bundle = convert.load_official(_variant(release, tmp_path, denoising=denoising))
    ours = D.to_official(bundle.denoiser)
    np.testing.assert_array_equal(ours["conv_in.bias"], sd_unet["conv_in.bias"].numpy())
    np.testing.assert_array_equal(ours[key], files["temporal"][key])


@pytest.mark.parametrize("case", ["no_file", "missing_motion", "missing_pe", "unexpected", "shape"])
def test_release_errors_name_the_file_and_the_key(release, tmp_path, case):
    _, files, _ = release
    motion_key = next(k for k in files["denoising"] if ".motion_modules." in k)
    pe_key = next(k for k in files["temporal"] if k.endswith(".pe"))
    shape_key = next(k for k in files["temporal"] if k.endswith("to_q.weight"))
    variants = {
        "no_file": (dict(temporal=None), r"missing xnemo_temporal_module\.pth"),
        "missing_motion": (dict(denoising={k: v for k, v in files["denoising"].items() if k != motion_key}),
                           rf"xnemo_denoising_unet\.pth: 1 denoiser keys missing, e\.g\. '{motion_key}'"),
        "missing_pe": (dict(temporal={k: v for k, v in files["temporal"].items() if k != pe_key}),
                       rf"xnemo_temporal_module\.pth: 1 denoiser keys missing, e\.g\. '{pe_key}'"),
        "unexpected": (dict(reference={**files["reference"], "extra.weight": np.zeros(3, np.float16)}),
                       r"xnemo_reference_unet\.pth: unexpected key 'extra\.weight'"),
        "shape": (dict(temporal={**files["temporal"], shape_key: files["temporal"][shape_key][:, :3]}),
                  rf"xnemo_temporal_module\.pth: '{shape_key}' has shape"),
    }
    changes, message = variants[case]
    with pytest.raises(convert.ConversionError, match=message):
        convert.load_official(_variant(release, tmp_path, **changes))


class _Payload:
    def __reduce__(self):
        return (os.makedirs, ("PWNED_DIR",))


def test_pth_files_are_read_without_running_code(release, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = _variant(release, tmp_path, motion_encoder=None)
    torch.save({"x": _Payload()}, os.path.join(folder, convert.RELEASE_FILES["motion_encoder"]))
    with pytest.raises(convert.ConversionError, match=r"xnemo_motion_encoder\.pth: not a readable PyTorch checkpoint"):
        convert.load_official(folder)
    assert not os.path.exists(tmp_path / "PWNED_DIR")


def test_convert_cli_round_trips_the_four_files_bit_for_bit(release, loaded, tmp_path, capsys):
    from launch import convert as cli
    from launch import loading

    folder = release[0]
    out, back = str(tmp_path / "xnemo"), str(tmp_path / "back")
    assert cli.main(["xnemo", f"--official={folder}", f"--output={out}"]) == 0
    bundle, metadata = loading.load_xnemo(out)
    assert bundle.config == loaded[0].config and metadata["source"] == os.path.abspath(folder)
    ours, theirs = nnx.to_pure_dict(nnx.state(bundle)), nnx.to_pure_dict(nnx.state(loaded[0]))
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)  # BatchStats and pe buffers included
    assert cli.main(["xnemo", "--to-torch", f"--checkpoint={out}", f"--output={back}"]) == 0
    for name in convert.RELEASE_FILES.values():
        original = torch.load(os.path.join(folder, name), weights_only=True)
        written = torch.load(os.path.join(back, name), weights_only=True)
        assert list(written) == list(original), name
        for key, value in original.items():
            assert written[key].dtype == value.dtype and torch.equal(written[key], value), (name, key)
    # bad input: a one-line error, exit 2, no output folder
    capsys.readouterr()
    assert cli.main(["xnemo", f"--official={tmp_path / 'nowhere'}", f"--output={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nowhere" in err and "\n" not in err and not os.path.exists(tmp_path / "x")


# ------------------------------------------------------------------------------------------- AnimateDiff
def _animatediff_keys() -> dict[str, tuple]:
    with open(PERCEPTION_KEYS) as f:
        text = f.read()
    section = text.split("######## animatediff_mm_v2\n", 1)[1].split("\n########", 1)[0]
    out = {}
    for line in section.splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split("\t")
            out[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return out


def test_animatediff_v2_keys_map_onto_the_full_size_temporal_modules():
    keys = _animatediff_keys()
    assert len(keys) == 588 and sum(k.endswith(".pe") for k in keys) == 42
    ours = {k: v for k, v in D.official_keys(D.abstract_denoiser()).items()
            if ".temporal_modules." in k and not k.endswith(".pe")}
    mapped = {convert.animatediff_key(k): v for k, v in keys.items() if convert.animatediff_key(k)}
    assert mapped == ours and len(ours) == 546


def test_animatediff_checkpoint_fills_only_the_temporal_modules(tmp_path):
    abstract = D.abstract_denoiser(D.DenoiserConfig.from_dict(M.TINY_UNET))
    start = random_official_state(D.official_keys(abstract), 4)
    den = D.from_official(abstract, start)
    source = random_official_state(D.official_keys(D.abstract_denoiser(D.DenoiserConfig.from_dict(M.TINY_UNET))), 5)
    mm = {k.replace(".temporal_modules.", ".motion_modules."): v
          for k, v in source.items() if ".temporal_modules." in k}
    path = str(tmp_path / "mm_sd_v15_v2.ckpt")
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in mm.items()},
                "animatediff_config": {"note": "ignored"}}, path)
    convert.load_animatediff(den, path)
    after = D.to_official(den)
    for key, value in after.items():
        expected = source[key] if ".temporal_modules." in key and not key.endswith(".pe") else start[key]
        np.testing.assert_array_equal(value, expected, err_msg=key)
    missing = dict(mm)
    missing.pop(next(k for k in mm if k.endswith("ff_norm.bias")))
    with pytest.raises(convert.ConversionError, match=r"1 temporal-module weights missing, e\.g\. '.*motion_modules"):
        convert.load_animatediff(den, missing)
    with pytest.raises(convert.ConversionError, match=r"unexpected key 'conv_in\.weight'"):
        convert.load_animatediff(den, {**mm, "conv_in.weight": start["conv_in.weight"]})
