"""Shared SD layers and blocks (``xnemo_jax/layers.py``, ``blocks.py``) against diffusers, and the
``launch/convert.py sd`` command.

Every diffusers module gets random weights (norms included) and is loaded by name through
``xnemo_jax.convert.assign``; fp32 outputs agree to <= 1e-5 absolute (observed ~1e-6).
"""

import os

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from xnemo_jax import blocks, convert, layers

TOL = 1e-5


@pytest.fixture(autouse=True)
def highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _random(module):
    torch.manual_seed(0)
    for p in module.parameters():
        p.data.normal_(0, 0.2)
    return module.eval()


def _state(module):
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def _nchw(x):
    return torch.from_numpy(x).permute(0, 3, 1, 2)


def _nhwc(t):
    return t.permute(0, 2, 3, 1).detach().numpy()


X = np.random.RandomState(0).randn(2, 8, 8, 16).astype(np.float32)


def test_resnet_block_with_time_embedding():
    from diffusers.models.resnet import ResnetBlock2D

    temb = np.random.RandomState(1).randn(2, 12).astype(np.float32)
    ref = _random(ResnetBlock2D(in_channels=16, out_channels=24, temb_channels=12, groups=4, eps=1e-5))
    ours = convert.assign(blocks.ResnetBlock2D(16, 24, temb_channels=12, groups=4, eps=1e-5, rngs=nnx.Rngs(0)),
                          _state(ref))
    expect = _nhwc(ref(_nchw(X), torch.from_numpy(temb)))
    assert np.abs(np.asarray(ours(X, temb)) - expect).max() <= TOL


@pytest.mark.parametrize("padding", [0, 1])
def test_down_and_upsample(padding):
    from diffusers.models.resnet import Downsample2D, Upsample2D

    ref = _random(Downsample2D(16, use_conv=True, out_channels=16, padding=padding))
    ours = convert.assign(blocks.Downsample2D(16, padding=padding, rngs=nnx.Rngs(0)), _state(ref))
    assert np.abs(np.asarray(ours(X)) - _nhwc(ref(_nchw(X)))).max() <= TOL
    ref = _random(Upsample2D(16, use_conv=True))
    ours = convert.assign(blocks.Upsample2D(16, rngs=nnx.Rngs(0)), _state(ref))
    assert np.abs(np.asarray(ours(X)) - _nhwc(ref(_nchw(X)))).max() <= TOL


def test_attention_forms():
    from diffusers.models.attention_processor import Attention

    # the VAE mid-block form: GroupNorm, biases, residual, one head over spatial input
    ref = _random(Attention(16, heads=1, dim_head=16, eps=1e-6, norm_num_groups=4, residual_connection=True,
                            bias=True, upcast_softmax=True, _from_deprecated_attn_block=True))
    ours = convert.assign(blocks.Attention(16, heads=1, dim_head=16, bias=True, norm_num_groups=4, eps=1e-6,
                                           residual_connection=True, rngs=nnx.Rngs(0)), _state(ref))
    assert np.abs(np.asarray(ours(X)) - _nhwc(ref(_nchw(X)))).max() <= TOL
    # cross-attention with two heads
    ctx = np.random.RandomState(2).randn(2, 5, 10).astype(np.float32)
    seq = X.reshape(2, 64, 16)
    ref = _random(Attention(16, cross_attention_dim=10, heads=2, dim_head=8))
    ours = convert.assign(blocks.Attention(16, cross_attention_dim=10, heads=2, dim_head=8, rngs=nnx.Rngs(0)),
                          _state(ref))
    expect = ref(torch.from_numpy(seq), torch.from_numpy(ctx)).detach().numpy()
    assert np.abs(np.asarray(ours(seq, ctx)) - expect).max() <= TOL


def test_norms_and_conv3d():
    x5 = np.random.RandomState(3).randn(2, 3, 4, 4, 8).astype(np.float32)  # (N, D, H, W, C)
    conv = torch.nn.Conv3d(8, 6, (3, 1, 1), padding=(1, 0, 0))
    ours = convert.assign(layers.Conv(8, 6, (3, 1, 1), padding=(1, 0, 0), rngs=nnx.Rngs(0)), _state(conv))
    expect = conv(torch.from_numpy(x5).permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1).detach().numpy()
    assert np.abs(np.asarray(ours(x5)) - expect).max() <= TOL
    ln = _random(torch.nn.LayerNorm(16, eps=1e-5))
    ours = convert.assign(layers.LayerNorm(16, eps=1e-5), _state(ln))
    assert np.abs(np.asarray(ours(X)) - ln(torch.from_numpy(X)).detach().numpy()).max() <= TOL


def test_assign_names_bad_keys():
    ref = _state(torch.nn.Linear(3, 4))
    lin = layers.Linear(3, 4, rngs=nnx.Rngs(0))
    with pytest.raises(convert.ConversionError, match="'weight' has shape"):
        convert.assign(lin, {"weight": np.zeros((4, 5), np.float32), "bias": ref["bias"]})
    with pytest.raises(convert.ConversionError, match="not in the checkpoint: bias"):
        convert.assign(lin, {"weight": ref["weight"]})
    with pytest.raises(convert.ConversionError, match="unexpected key 'extra'"):
        convert.assign(lin, {**ref, "extra": np.zeros(1)})


def test_convert_sd_command(tmp_path):
    """``launch/convert.py sd`` turns diffusers/transformers folders into params checkpoints."""
    from diffusers import AutoencoderKLTemporalDecoder, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from launch import checkpointing
    from launch import convert as convert_cli

    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                norm_num_groups=8, cross_attention_dim=16, attention_head_dim=4)
    unet.save_pretrained(tmp_path / "unet")
    AutoencoderKLTemporalDecoder(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                                 layers_per_block=1).save_pretrained(tmp_path / "vae")
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                   num_attention_heads=4, patch_size=4, image_size=16,
                                                   projection_dim=16)).save_pretrained(tmp_path / "clip")
    out = tmp_path / "sd"
    assert convert_cli.main(["sd", f"--unet={tmp_path / 'unet'}", f"--vae={tmp_path / 'vae'}",
                             f"--clip={tmp_path / 'clip'}", f"--output={out}"]) == 0
    kinds = {name: checkpointing.read_model_info(str(out / name))["model"] for name in os.listdir(out)}
    assert kinds == {"unet": "unet", "vae": "svd_vae", "image_encoder": "clip_vision"}
    info, params = checkpointing.load_params(str(out / "unet"))
    n = sum(int(np.size(p)) for p in jax.tree.leaves(params))
    assert n == sum(p.numel() for p in unet.parameters())
    assert convert_cli.main(["sd", f"--unet={tmp_path / 'missing'}", f"--output={tmp_path / 'x'}"]) == 2
