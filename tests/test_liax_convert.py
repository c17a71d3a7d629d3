import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from liax_torch_reference import Generator, randomize_

from conftest import ROOT
from liax_jax import convert
from liax_jax.model import LiaX, LiaXConfig, count_params


def _config(variant):
    from configs import liax as liax_configs

    return LiaXConfig.from_config(liax_configs.get_config(variant).model)


@pytest.mark.parametrize("variant,expected", [("official", 910_571_751), ("middle", 227_728_551)])
def test_parameter_counts_without_allocating(variant, expected):
    model = nnx.eval_shape(lambda: LiaX(_config(variant), rngs=nnx.Rngs(0)))
    assert count_params(model) == expected


def test_official_keys_and_shapes_match_the_release():
    model = nnx.eval_shape(lambda: LiaX(_config("official"), rngs=nnx.Rngs(0)))
    expected = {}
    with open(os.path.join(ROOT, "tests", "data", "liax_state_dict.txt")) as f:  # the release's 596 keys
        for line in f:
            key, shape, _ = line.split()
            expected[key] = tuple(int(v) for v in shape.strip("()").split(",") if v)
    assert convert.official_shapes(model) == expected
    # every parameter of the model is reached by the official walk (nothing left uninitialised)
    entries = model.official_entries()
    n_params = sum(int(np.prod(r.shape)) for r, layout in entries.values() if layout != "kernel")
    assert n_params == count_params(model) == 910_571_751
    assert sum(layout == "kernel" for _, layout in entries.values()) == 41


@pytest.fixture(scope="module")
def tiny_state():
    ref = Generator(size=64, scale=0.125, norm_groups=4)
    randomize_(ref, 0)
    return {k: v.numpy() for k, v in ref.state_dict().items()}


TINY = LiaXConfig(64, 0.125, norm_groups=4)


def test_errors_name_the_key(tiny_state):
    sd = dict(tiny_state)
    del sd["dec.flow2.bias"]
    with pytest.raises(convert.ConversionError, match="missing key 'dec.flow2.bias'"):
        convert.load_official(sd, TINY)
    sd = dict(tiny_state, **{"dec.extra.weight": np.zeros(3)})
    with pytest.raises(convert.ConversionError, match="unexpected key 'dec.extra.weight'"):
        convert.load_official(sd, TINY)
    sd = dict(tiny_state)
    sd["enc.enc_r2t.0.weight"] = np.zeros((41, 64), np.float32)
    with pytest.raises(convert.ConversionError,
                       match=r"key 'enc.enc_r2t.0.weight' has shape \(41, 64\), expected \(40, 64\)"):
        convert.load_official(sd, TINY)
    sd = dict(tiny_state)
    sd["dec.rgb2.up.kernel"] = np.ones((4, 4), np.float32)
    with pytest.raises(convert.ConversionError, match="dec.rgb2.up.kernel"):
        convert.load_official(sd, TINY)
    with pytest.raises(convert.ConversionError, match="missing key"):
        convert.load_official(tiny_state, LiaXConfig(128, 0.25, norm_groups=8))


def test_load_from_pt_file_and_round_trip(tmp_path, tiny_state):
    path = tmp_path / "lia-x.pt"
    torch.save({k: torch.from_numpy(v) for k, v in tiny_state.items()}, path)
    model = convert.load_official(str(path), TINY)
    back = convert.to_official(model)
    assert back.keys() == tiny_state.keys()
    for k, v in tiny_state.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(convert.ConversionError, match="bad.pt: not a readable PyTorch checkpoint"):
        convert.load_official(str(tmp_path / "bad.pt"), TINY)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_reduced_precision_paths_run(tiny_state, dtype):
    from liax_jax import inference

    model = convert.load_official(tiny_state, LiaXConfig(64, 0.125, norm_groups=4, dtype=dtype))
    src = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 64, 64, 3)), jnp.float32)
    drv = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (3, 64, 64, 3)), jnp.float32)
    out = inference.animate(model, src, drv, chunk_size=2)
    assert out.shape == (3, 64, 64, 3) and out.dtype == jnp.dtype(dtype)
    assert bool(jnp.isfinite(out.astype(jnp.float32)).all())
    assert jax.tree.leaves(nnx.state(model, nnx.Param))[0].dtype == jnp.float32  # params stay fp32


def test_convert_cli_round_trip(tmp_path, tiny_state):
    import subprocess
    import sys

    pt = tmp_path / "tiny.pt"
    torch.save({k: torch.from_numpy(v) for k, v in tiny_state.items()}, pt)
    cli = [sys.executable, os.path.join(ROOT, "launch", "convert.py"), "liax"]
    arch = ["--resolution=64", "--scale=0.125", "--norm-groups=4"]
    r = subprocess.run(cli + [f"--torch-checkpoint={pt}", f"--output={tmp_path}/ckpt", *arch],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    info = __import__("json").loads((tmp_path / "ckpt" / "model.json").read_text())
    assert info["model"] == "liax" and info["config"]["resolution"] == 64
    r = subprocess.run(cli + ["--to-torch", f"--checkpoint={tmp_path}/ckpt", f"--output={tmp_path}/back.pt"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    back = torch.load(tmp_path / "back.pt")
    assert back.keys() == tiny_state.keys()
    for k, v in tiny_state.items():
        np.testing.assert_array_equal(back[k].numpy(), v, err_msg=k)
    # the wrong architecture is one clear line naming the file and the first missing key
    r = subprocess.run(cli + [f"--torch-checkpoint={pt}", f"--output={tmp_path}/other"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {pt}: missing key 'enc.enc_2r.block5.0.conv1.0.weight'")
    assert not (tmp_path / "other").exists()
    # a missing file names its path once
    r = subprocess.run(cli + [f"--torch-checkpoint={tmp_path}/nope.pt", f"--output={tmp_path}/other"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path}/nope.pt: no such file"]
    assert not (tmp_path / "other").exists()
