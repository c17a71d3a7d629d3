"""CLIP vision tower (xnemo_jax.clip): parameter count, parity with transformers through the checkpoint
converter (safetensors, .bin, full CLIPModel folders), converter errors, and CLIPImageProcessor parity."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from xnemo_jax import clip, convert  # noqa: E402

VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
               image_size=224, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)
VIT_L14_PARAMS = 303_966_208

SMALL = {
    "h32_quick_gelu": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           patch_size=4, image_size=16, projection_dim=24),
    "h48_gelu": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3, patch_size=8,
                     image_size=32, projection_dim=40, hidden_act="gelu", layer_norm_eps=1e-6),
}


def _randomise(model, seed: int = 0):
    """Random weights everywhere (biases, norm shifts) and non-trivial norm scales, so every path counts."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.05
            is_norm_scale = "norm" in name and name.endswith(".weight")
            p.copy_(1.0 + 2 * noise if is_norm_scale else noise)
    return model.eval()


def _torch_model(config: dict, seed: int = 0):
    cfg = transformers.CLIPVisionConfig(**config)
    return _randomise(transformers.CLIPVisionModelWithProjection(cfg), seed)


def _pixels(config: dict, batch: int = 2, seed: int = 0) -> np.ndarray:
    """NCHW float32 pixels (torch layout); the JAX model gets them transposed to NHWC."""
    s = config["image_size"]
    return np.random.default_rng(seed).normal(size=(batch, 3, s, s)).astype(np.float32)


@nnx.jit(static_argnames="output_hidden_states")
def _forward(model, pixels, output_hidden_states=False):
    return model(pixels, output_hidden_states=output_hidden_states)


def _run_jax(model, pixels_nchw: np.ndarray, output_hidden_states: bool = False):
    """The jitted forward in full fp32 matmul precision (jit: faster to compile than eager op by op)."""
    with jax.default_matmul_precision("highest"):
        return _forward(model, jnp.asarray(pixels_nchw.transpose(0, 2, 3, 1)), output_hidden_states)


def _assert_close(ours, ref, what: str):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    err, scale = float(np.abs(ours - ref).max()), max(1.0, float(np.abs(ref).max()))
    assert err <= 1e-4 * scale, f"{what}: max abs error {err:.3g} (scale {scale:.3g})"
    return err


# --------------------------------------------------------------------------------------------- structure
def test_vit_l14_parameter_count():
    model = nnx.eval_shape(lambda: clip.CLIPVisionModelWithProjection.from_config(VIT_L14, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    assert sum(x.size for x in jax.tree.leaves(params)) == VIT_L14_PARAMS
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    assert isinstance(jax.tree.leaves(params)[0], jax.ShapeDtypeStruct)  # nothing allocated
    # the same config in transformers (meta device: no memory) has the same count
    with torch.device("meta"):
        ref = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**VIT_L14))
    assert sum(p.numel() for p in ref.parameters()) == VIT_L14_PARAMS


def test_parameter_paths_match_transformers_keys():
    config = SMALL["h32_quick_gelu"]
    ref = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**config))
    torch_keys = {k for k in ref.state_dict() if clip.CLIPVisionModelWithProjection.torch_key(k) is not None}
    model = nnx.eval_shape(lambda: clip.CLIPVisionModelWithProjection.from_config(config, rngs=nnx.Rngs(0)))
    ours = {".".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert ours == torch_keys
    assert "vision_model.pre_layrnorm.weight" in ours and "vision_model.encoder.layers.1.mlp.fc2.bias" in ours


def test_config_parsing():
    full = {"projection_dim": 64, "logit_scale_init_value": 2.6592, "text_config": {"hidden_size": 16},
            "vision_config": dict(SMALL["h32_quick_gelu"], projection_dim=512, some_unknown_key=1)}
    cfg = clip.CLIPVisionConfig.from_dict(full)
    assert (cfg.hidden_size, cfg.projection_dim, cfg.patch_size) == (32, 64, 4)
    assert clip.CLIPVisionConfig.from_dict({}) == clip.CLIPVisionConfig()  # transformers' defaults
    with pytest.raises(ValueError, match="hidden_act"):
        clip.CLIPVisionConfig.from_dict({"hidden_act": "swish"})
    assert clip.CLIPVisionModelWithProjection.torch_key("vision_model.embeddings.position_ids") is None
    assert clip.CLIPVisionModelWithProjection.torch_key("visual_projection.weight") == "visual_projection.weight"


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("name", sorted(SMALL))
def test_parity_with_transformers_safetensors(name, tmp_path):
    config = SMALL[name]
    ref = _torch_model(config, seed=1)
    ref.save_pretrained(tmp_path)
    assert any(f.endswith(".safetensors") for f in os.listdir(tmp_path))
    model = convert.load_pretrained(str(tmp_path), "clip_vision")

    pixels = _pixels(config, batch=3)
    with torch.no_grad():
        want = ref(pixel_values=torch.from_numpy(pixels), output_hidden_states=True)
    got = _run_jax(model, pixels, output_hidden_states=True)
    _assert_close(got.image_embeds, want.image_embeds, "image_embeds")
    _assert_close(got.last_hidden_state, want.last_hidden_state, "last_hidden_state")
    assert len(got.hidden_states) == len(want.hidden_states) == config["num_hidden_layers"] + 1
    for i, (g, w) in enumerate(zip(got.hidden_states, want.hidden_states, strict=True)):
        _assert_close(g, w, f"hidden_states[{i}]")
    assert _run_jax(model, pixels).hidden_states is None  # only when asked


def test_parity_bin_folder_with_position_ids(tmp_path):
    """A legacy folder: pytorch_model.bin (transformers 5 only writes safetensors, so the .bin is written by
    hand) holding the position_ids buffer that older transformers versions saved; the converter skips it."""
    config = SMALL["h32_quick_gelu"]
    ref = _torch_model(config, seed=2)
    ref.save_pretrained(tmp_path)
    for f in os.listdir(tmp_path):
        if f.endswith(".safetensors"):
            os.remove(os.path.join(tmp_path, f))
    state = dict(ref.state_dict())
    num_positions = (config["image_size"] // config["patch_size"]) ** 2 + 1
    state["vision_model.embeddings.position_ids"] = torch.arange(num_positions)[None]
    torch.save(state, os.path.join(tmp_path, "pytorch_model.bin"))
    model = convert.load_pretrained(str(tmp_path), "clip_vision")
    pixels = _pixels(config, seed=3)
    with torch.no_grad():
        want = ref(pixel_values=torch.from_numpy(pixels))
    got = _run_jax(model, pixels)
    _assert_close(got.image_embeds, want.image_embeds, "image_embeds")
    _assert_close(got.last_hidden_state, want.last_hidden_state, "last_hidden_state")


def test_full_clip_model_folder(tmp_path):
    """A CLIPModel folder (CLIPConfig with vision_config; text tower keys skipped) loads as the vision tower."""
    vision = SMALL["h48_gelu"]
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                max_position_embeddings=8)
    config = transformers.CLIPConfig(vision_config=vision, text_config=text, projection_dim=20)
    ref = _randomise(transformers.CLIPModel(config), seed=4)
    ref.save_pretrained(tmp_path)
    model = convert.load_pretrained(str(tmp_path), "clip_vision")
    assert model.config.projection_dim == 20
    pixels = _pixels(vision, seed=5)
    with torch.no_grad():
        out = ref.vision_model(pixel_values=torch.from_numpy(pixels))
        want = ref.visual_projection(out.pooler_output)
    got = _run_jax(model, pixels)
    _assert_close(got.image_embeds, want, "image_embeds")
    _assert_close(got.last_hidden_state, out.last_hidden_state, "last_hidden_state")


def test_bfloat16_compute_close_to_float32(tmp_path):
    config = SMALL["h32_quick_gelu"]
    _torch_model(config, seed=6).save_pretrained(tmp_path)
    f32 = convert.load_pretrained(str(tmp_path), "clip_vision")
    bf16 = convert.load_pretrained(str(tmp_path), "clip_vision", dtype="bfloat16")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    pixels = _pixels(config)
    a, b = _run_jax(f32, pixels).image_embeds, _run_jax(bf16, pixels).image_embeds
    assert b.dtype == jnp.bfloat16
    err = float(jnp.abs(a - b.astype(jnp.float32)).max())
    assert err <= 0.05 * max(1.0, float(jnp.abs(a).max())), err


def test_wrong_image_size_is_rejected():
    config = SMALL["h32_quick_gelu"]
    model = nnx.eval_shape(lambda: clip.CLIPVisionModelWithProjection.from_config(config, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="expects"):  # checked before any parameter is used
        model(jnp.zeros((1, 20, 20, 3)))


# ----------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("damage", ["missing", "wrong_shape", "unexpected"])
def test_converter_names_the_bad_key(damage, tmp_path):
    from safetensors.numpy import load_file, save_file

    _torch_model(SMALL["h32_quick_gelu"]).save_pretrained(tmp_path)
    (path,) = [os.path.join(tmp_path, f) for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    state = load_file(path)
    key = "vision_model.encoder.layers.1.self_attn.v_proj.weight"
    if damage == "missing":
        del state[key]
    elif damage == "wrong_shape":
        state[key] = np.zeros((32, 31), np.float32)
    else:
        key = "vision_model.encoder.layers.2.self_attn.v_proj.weight"
        state[key] = np.zeros((32, 32), np.float32)
    save_file(state, path)
    with pytest.raises(convert.ConversionError, match=key.replace(".", r"\.")):
        convert.load_pretrained(str(tmp_path), "clip_vision")


def test_config_json_is_what_transformers_writes(tmp_path):
    _torch_model(SMALL["h48_gelu"]).save_pretrained(tmp_path)
    with open(os.path.join(tmp_path, "config.json")) as f:
        written = json.load(f)
    cfg = clip.CLIPVisionConfig.from_dict(written)
    assert (cfg.hidden_act, cfg.layer_norm_eps, cfg.num_hidden_layers) == ("gelu", 1e-6, 3)


# -------------------------------------------------------------------------------------------- preprocess
def _processor(size: int = 224):
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    kw = {} if size == 224 else dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return cls(**kw)


@pytest.mark.parametrize("size", [224, 64])
def test_preprocess_matches_clip_image_processor(size):
    rng = np.random.default_rng(0)
    shapes = [(300, 400), (400, 300), (224, 224), (100, 57), (513, 231), (64, 64)]
    images = [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in shapes]
    # smooth content too (random noise is the worst case for interpolation differences)
    yy, xx = np.mgrid[0:333, 0:250]
    images.append(np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8))
    want = _processor(size)(images=images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    got = clip.preprocess(images, size=size)
    assert got.shape == (len(images), size, size, 3) and got.dtype == np.float32
    assert float(np.abs(got - want).max()) <= 1e-5


def test_preprocess_batch_array():
    batch = np.random.default_rng(1).integers(0, 256, size=(2, 240, 320, 3), dtype=np.uint8)
    want = _processor()(images=list(batch), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    got = clip.preprocess(batch)
    assert got.shape == (2, 224, 224, 3)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(clip.preprocess(batch[0]), want[:1], atol=1e-5, rtol=0)  # one HWC image
    with pytest.raises(ValueError, match="uint8"):
        clip.preprocess(batch.astype(np.float32))
