"""xnemo_jax.unet: SD-1.x UNet2DConditionModel vs diffusers (random weights, tiny configs), the X-NeMo
seams (norm1 taps, reference bank, headless reference net), checkpoint loading and config validation."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from xnemo_jax import convert
from xnemo_jax.denoiser import SD_IMAGE_VARIATIONS_UNET
from xnemo_jax.unet import UNet2DConditionModel, resize_nearest

diffusers = pytest.importorskip("diffusers")

# sd-image-variations-diffusers' UNet (SD-1.x with a 768-d CLIP image embedding as cross-attention context)
SD_IMAGE_VARIATIONS = dict(SD_IMAGE_VARIATIONS_UNET, dual_cross_attention=False)
SD_PARAMS = 859_520_964

# Reduced configs; each case: (config, latent (H, W), batch, timestep(s), context length).
TINY = dict(
    block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    attention_head_dim=8, use_linear_projection=False, flip_sin_to_cos=True, freq_shift=0,
)
CASES = {
    # conv 1x1 projections, batch 2 with a different timestep per example
    "conv_proj": (TINY, (16, 16), 2, [3, 701], 7),
    # Linear projections, heads per block, 1 and 2 transformer layers per block, float scalar timestep,
    # sin-first embedding with freq_shift 1, a CrossAttn block at every level
    "linear_proj": (dict(TINY, use_linear_projection=True, attention_head_dim=[2, 4],
                         transformer_layers_per_block=[1, 2], down_block_types=["CrossAttnDownBlock2D"] * 2,
                         up_block_types=["CrossAttnUpBlock2D"] * 2,
                         flip_sin_to_cos=False, freq_shift=1, cross_attention_dim=24),
                    (8, 8), 1, 417.5, 5),
    # odd channel counts, 3 levels on 18x14 latents (not multiples of 4: upsampling to the skip sizes),
    # per-block layers and heads, only_cross_attention in two blocks (diffusers never uses it in the mid
    # block), centre input, 1x1 conv_in, asymmetric-padding downsampler, scaled mid block, custom time
    # embedding width
    "odd_sizes": (dict(block_out_channels=[24, 40, 40], layers_per_block=[1, 2, 1], norm_num_groups=8,
                       down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                       up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                       attention_head_dim=[4, 8, 5], only_cross_attention=[False, True, True],
                       cross_attention_dim=20, center_input_sample=True, conv_in_kernel=1, conv_out_kernel=3,
                       downsample_padding=0, mid_block_scale_factor=1.5, time_embedding_dim=48, norm_eps=1e-6),
                  (18, 14), 2, [999, 0], 3),
}


def _count(model) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_parameter_count_sd_image_variations_without_allocating():
    model = nnx.eval_shape(lambda: UNet2DConditionModel.from_config(SD_IMAGE_VARIATIONS, rngs=nnx.Rngs(0)))
    assert _count(model) == SD_PARAMS
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel.from_config(SD_IMAGE_VARIATIONS)
    assert sum(p.numel() for p in ref.parameters()) == SD_PARAMS
    # same parameter names and (permuted) shapes as diffusers
    ours = {".".join(str(k) for k in path): v.shape for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert set(ours) == set(theirs)
    for key, shape in theirs.items():
        assert math.prod(ours[key]) == math.prod(shape), key
    assert len(model.tap_keys()) == 16


# ------------------------------------------------------------------------------------------- helpers
def _randomize_(model: torch.nn.Module, seed: int):
    """Every parameter random: fan-in-scaled weights, small biases, norm scales 1 + noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=g)
                if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                    p.copy_((1.0 if name == "weight" else 0.0) + 0.1 * noise)
                elif name == "weight":
                    p.copy_(noise / math.sqrt(max(1, p[0].numel())))
                else:
                    p.copy_(0.05 * noise)


def _torch_unet(config: dict, seed: int = 0):
    torch.manual_seed(seed)
    ref = diffusers.UNet2DConditionModel.from_config(config).eval()
    _randomize_(ref, seed)
    return ref


def _inputs(ref, hw, batch, timestep, seq, seed=0):
    rng = np.random.default_rng(seed)
    cfg = ref.config
    sample = rng.standard_normal((batch, cfg.in_channels, *hw)).astype(np.float32)
    context = rng.standard_normal((batch, seq, cfg.cross_attention_dim)).astype(np.float32)
    return sample, context, timestep


def _torch_forward(ref, sample, timestep, context):
    t = torch.tensor(timestep) if isinstance(timestep, list) else timestep
    with torch.no_grad():
        out = ref(torch.from_numpy(sample), t, torch.from_numpy(context)).sample
    return out.permute(0, 2, 3, 1).numpy()


@nnx.jit
def _run(model, sample, t, context):
    return model(sample, t, context)


@nnx.jit
def _run_collect(model, sample, t, context):
    taps = {}  # filled while tracing, returned as outputs
    return model(sample, t, context, collect=taps), taps


@nnx.jit
def _run_bank(model, sample, t, context, bank):
    return model(sample, t, context, bank=bank)


def _jax_forward(model, sample, timestep, context, run=_run, *args):
    """A jitted forward (one XLA compile per program and shapes) at full fp32 matmul precision."""
    t = jnp.asarray(timestep)
    with jax.default_matmul_precision("highest"):
        return run(model, jnp.asarray(sample.transpose(0, 2, 3, 1)), t, jnp.asarray(context), *args)


def _check(out, expected, name=""):
    err = float(np.max(np.abs(np.asarray(out) - expected)))
    scale = max(1.0, float(np.max(np.abs(expected))))
    print(f"{name}: max abs err {err:.3g} (max |out| {np.max(np.abs(expected)):.3g})")
    assert err <= 1e-4 * scale, (err, scale)
    return err


@pytest.fixture(scope="module")
def torch_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, torch_threads):
    """The diffusers TINY UNet with random weights, its save_pretrained folder, and the loaded JAX model."""
    folder = str(tmp_path_factory.mktemp("unet_tiny"))
    ref = _torch_unet(TINY, seed=1)
    ref.save_pretrained(folder)
    return ref, folder, convert.load_pretrained(folder, "unet")


# -------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_diffusers(case, tiny, tmp_path):
    config, hw, batch, timestep, seq = CASES[case]
    if config is TINY:
        ref, _, model = tiny
    else:
        ref = _torch_unet(config, seed=len(case))
        ref.save_pretrained(str(tmp_path))
        model = convert.load_pretrained(str(tmp_path), "unet")
    sample, context, t = _inputs(ref, hw, batch, timestep, seq)
    expected = _torch_forward(ref, sample, t, context)
    out = _jax_forward(model, sample, t, context)
    assert out.shape == (batch, *hw, ref.config.out_channels)
    _check(out, expected, case)


def test_bin_checkpoint_and_errors_name_the_key(tiny, tmp_path):
    ref, folder, model = tiny
    ref.save_pretrained(str(tmp_path), safe_serialization=False)
    assert list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.safetensors"))
    loaded = convert.load_pretrained(str(tmp_path), "unet")
    a, b = nnx.to_flat_state(nnx.state(model, nnx.Param)), nnx.to_flat_state(nnx.state(loaded, nnx.Param))
    assert len(a) == len(b)
    for (pa, va), (pb, vb) in zip(a, b, strict=True):
        assert pa == pb and np.array_equal(np.asarray(va[...]), np.asarray(vb[...]))

    state = convert.read_state_dict(folder)  # (re-assigning the same values leaves `loaded` unchanged)
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    with pytest.raises(convert.ConversionError, match=key.replace(".", r"\.") + r"' has shape \(32, 31\)"):
        convert.assign(loaded, dict(state, **{key: state[key][:, :-1]}))
    with pytest.raises(convert.ConversionError, match=r"not in the checkpoint: conv_out\.bias"):
        convert.assign(loaded, {k: v for k, v in state.items() if k != "conv_out.bias"})
    with pytest.raises(convert.ConversionError, match="unexpected key 'extra.weight'"):
        convert.assign(loaded, dict(state, **{"extra.weight": np.zeros(3, np.float32)}))


# --------------------------------------------------------------------------------------------- seams
def test_collect_taps_and_bank_seams(tiny):
    ref, _, model = tiny
    config, hw, batch, timestep, seq = CASES["conv_proj"]  # the shapes test_parity compiled for
    sample, context, t = _inputs(ref, hw, batch, timestep, seq)
    plain = _jax_forward(model, sample, t, context)
    out, taps = _jax_forward(model, sample, t, context, _run_collect)
    np.testing.assert_allclose(np.asarray(out), np.asarray(plain), atol=1e-6)  # collecting changes nothing
    _check(out, _torch_forward(ref, sample, t, context), "with collect")
    keys = model.tap_keys()
    assert list(keys) == ["down_blocks.0.attentions.0.transformer_blocks.0",
                          "mid_block.attentions.0.transformer_blocks.0",
                          "up_blocks.1.attentions.0.transformer_blocks.0",
                          "up_blocks.1.attentions.1.transformer_blocks.0"]
    assert set(taps) == set(keys)
    for key in keys:  # (B, H*W, C): 32 channels at full size, 64 at half size in the mid block
        expected = (batch, 8 * 8, 64) if key.startswith("mid") else (batch, 16 * 16, 32)
        assert taps[key].shape == expected, key

    # bank = each block's own norm1 output: attention over [x, x] is attention over x (duplicated keys
    # get the same weights and the same values), so the output is unchanged
    same = _jax_forward(model, sample, t, context, _run_bank, taps)
    np.testing.assert_allclose(np.asarray(same), np.asarray(plain), atol=2e-5, rtol=0)

    # a reference bank from another input changes the output
    _, other = _jax_forward(model, sample[::-1].copy(), t, context, _run_collect)
    changed = _jax_forward(model, sample, t, context, _run_bank, other)
    assert float(jnp.max(jnp.abs(changed - plain))) > 1e-2
    with pytest.raises(ValueError, match="name no BasicTransformerBlock"):
        _jax_forward(model, sample, t, context, _run_bank, {"down_blocks.9.attentions.0.transformer_blocks.0":
                                                            taps[keys[0]]})


@nnx.jit
def _block_runs(block, x, ctx, bank):
    taps = {}
    return (block(x, ctx, bank=[bank], collect=taps), taps, block(x, ctx),
            block(x, ctx, bank=[bank[:, :1], bank[:, 1:]]))


def test_bank_extends_attn1_keys_and_values(tiny):
    """A bank makes attn1 diffusers' Attention with encoder_hidden_states = [norm1(x), bank] (the
    reference attention of ReferenceNet-style models); the rest of the block is unchanged."""
    ref, _, model = tiny
    ours = model.down_blocks[0].attentions[0].transformer_blocks[0]
    theirs = ref.down_blocks[0].attentions[0].transformer_blocks[0]
    rng = np.random.default_rng(0)
    x, ctx, bank = (rng.standard_normal(shape).astype(np.float32) for shape in [(2, 5, 32), (2, 3, 32), (2, 4, 32)])
    with jax.default_matmul_precision("highest"):
        out, taps, plain, split = _block_runs(ours, jnp.asarray(x), jnp.asarray(ctx), jnp.asarray(bank))
    xt, ct = torch.from_numpy(x), torch.from_numpy(ctx)
    with torch.no_grad():
        h = theirs.norm1(xt)
        x1 = theirs.attn1(h, encoder_hidden_states=torch.cat([h, torch.from_numpy(bank)], 1)) + xt
        x2 = theirs.attn2(theirs.norm2(x1), encoder_hidden_states=ct) + x1
        expected = theirs.ff(theirs.norm3(x2)) + x2
        expected_plain = theirs(xt, encoder_hidden_states=ct)
    np.testing.assert_allclose(np.asarray(taps[ours.tap_key]), h.numpy(), atol=1e-5)
    _check(out, expected.numpy(), "block with bank")
    _check(plain, expected_plain.numpy(), "block without bank")
    assert float(np.max(np.abs(expected.numpy() - expected_plain.numpy()))) > 1e-2
    # several bank arrays are appended in order (the same as one concatenated bank)
    np.testing.assert_allclose(np.asarray(split), np.asarray(out), atol=1e-5)


def test_without_output_head(tiny):
    ref, folder, model = tiny
    config = convert.read_config(folder)
    headless = nnx.eval_shape(lambda: UNet2DConditionModel.from_config(config, rngs=nnx.Rngs(0),
                                                                     with_output_head=False))
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(headless, nnx.Param))}
    assert not any(n.startswith(("conv_out", "conv_norm_out")) for n in names)
    assert headless.conv_out is None and headless.conv_norm_out is None
    assert _count(headless) == _count(model) - sum(p.numel() for n, p in ref.named_parameters()
                                                   if n.startswith(("conv_out", "conv_norm_out")))
    # a full checkpoint fills it (the head's keys are skipped)
    graphdef, state = nnx.split(headless)
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), nnx.to_pure_dict(state)))
    headless = convert.assign(nnx.merge(graphdef, state), convert.read_state_dict(folder))
    # it returns what diffusers feeds to conv_norm_out
    _, hw, batch, timestep, seq = CASES["conv_proj"]
    sample, context, t = _inputs(ref, hw, batch, timestep, seq, seed=5)
    seen = []
    hook = ref.conv_norm_out.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    try:
        _torch_forward(ref, sample, t, context)
    finally:
        hook.remove()
    features = _jax_forward(headless, sample, t, context)
    assert features.shape == (batch, *hw, 32)
    _check(features, seen[0].permute(0, 2, 3, 1).numpy(), "headless")


# ------------------------------------------------------------------------------------- small pieces
def test_timestep_forms_and_embedding(tiny):
    ref, _, model = tiny
    scalar = model.time_embed(7, 3)
    np.testing.assert_array_equal(np.asarray(scalar), np.asarray(model.time_embed(jnp.array([7, 7, 7]), 3)))
    np.testing.assert_allclose(np.asarray(scalar), np.asarray(model.time_embed(7.0, 3)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(model.time_embed(jnp.array(7), 3)), np.asarray(scalar), atol=0)
    from diffusers.models.embeddings import get_timestep_embedding

    from xnemo_jax.unet import get_timestep_embedding as ours

    t = np.array([0, 1, 17.5, 999], np.float32)
    for dim, flip, shift in [(32, True, 0), (33, False, 1), (24, True, 1)]:
        expected = get_timestep_embedding(torch.from_numpy(t), dim, flip, shift).numpy()
        np.testing.assert_allclose(np.asarray(ours(jnp.asarray(t), dim, flip, shift)), expected, atol=2e-4)


def test_resize_nearest_matches_torch():
    x = np.arange(2 * 5 * 4 * 3, dtype=np.float32).reshape(2, 5, 4, 3)
    for size in [(9, 7), (10, 8), (5, 4), (11, 13)]:
        expected = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=size,
                                                   mode="nearest").permute(0, 2, 3, 1).numpy()
        np.testing.assert_array_equal(np.asarray(resize_nearest(jnp.asarray(x), size)), expected)


@pytest.mark.parametrize("change,match", [
    (dict(class_embed_type="timestep"), "class_embed_type"),
    (dict(num_class_embeds=10), "num_class_embeds"),
    (dict(addition_embed_type="text_time"), "addition_embed_type"),
    (dict(encoder_hid_dim=64), "encoder_hid_dim"),
    (dict(time_embedding_type="fourier"), "time_embedding_type"),
    (dict(resnet_time_scale_shift="scale_shift"), "resnet_time_scale_shift"),
    (dict(num_attention_heads=4), "num_attention_heads"),
    (dict(act_fn="gelu"), "act_fn"),
    (dict(down_block_types=["AttnDownBlock2D", "DownBlock2D"]), "down block type"),
    (dict(up_block_types=["UpBlock2D", "SimpleCrossAttnUpBlock2D"]), "up block type"),
    (dict(mid_block_type="UNetMidBlock2DSimpleCrossAttn"), "mid_block_type"),
    (dict(attention_head_dim=[8, 8, 8]), "attention_head_dim"),
    (dict(transformer_layers_per_block=[[1, 2], [1, 2]]), "nested"),
    (dict(norm_num_groups=None), "norm_num_groups"),
    (dict(cross_attention_dim=None), "cross_attention_dim"),
])
def test_unsupported_options_raise(change, match):
    with pytest.raises(ValueError, match=match):
        nnx.eval_shape(lambda: UNet2DConditionModel.from_config(dict(TINY, **change), rngs=nnx.Rngs(0)))


def test_unknown_keys_are_ignored(tmp_path):
    config = dict(TINY, _class_name="UNet2DConditionModel", _diffusers_version="0.42.1", sample_size=32,
                  some_future_option=True, dropout=0.0, resnet_skip_time_act=False)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    model = nnx.eval_shape(lambda: UNet2DConditionModel.from_config(convert.read_config(str(tmp_path)),
                                                                  rngs=nnx.Rngs(0)))
    assert model.config.block_out_channels == (32, 64)
    assert os.path.exists(path)
