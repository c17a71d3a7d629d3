"""xnemo_jax.denoiser: X-NeMo's 3-D denoiser (motion cross-attention + temporal modules + reference
attention) and the reference net, against the PyTorch reference ``tests/xnemo_torch_denoiser.py``.

Full-size models are only ever built under ``nnx.eval_shape`` (parameter counts, official key sets).
Numerical parity runs on the tiny configuration (UNet widths [32, 64, 128, 128], CLIP context 64: the
release's structure and key set at small widths) through the real conversion path: random torch weights
with every path active (zero-initialised proj_outs and norm affines perturbed, ``pe`` tables perturbed)
are written with ``torch.save`` in the official file split (denoising = SD + motion_modules, temporal,
reference), read back weights-only with ``liax_jax.convert.read_state_dict`` and loaded non-strict in the
official order. One CFG window: F = 3 frames, batch 2 = [uncond: zero CLIP context, no bank; cond: CLIP
context, reference bank], different timesteps per example; the bank comes from the converted reference
net at t = 0 on the [zeros, CLIP] pair, as the official pipeline computes it.

Measured on the shared 2-core CPU (load ~4): fp32 max-abs error denoiser 4.4e-06 (max |eps| 2.4),
reference features 1.7e-05 (max 12.3), bank 1.2e-05 (max 4.6); float64 relative error denoiser 8.9e-10
(the timestep embedding is float32 in both frameworks, as in diffusers), reference features 3.2e-15, bank
5.0e-15. Jitted window (reference net + denoiser) compile + run: 52 s fp32, 59 s float64.
"""

import copy
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import xnemo_torch_denoiser as R
from flax import nnx
from xnemo_helpers import random_official_state

from conftest import ROOT
from liax_jax.convert import read_state_dict
from xnemo_jax import convert
from xnemo_jax import denoiser as D
from xnemo_jax.unet import UNet2DConditionModel

KEYS_FILE = os.path.join(ROOT, "..", "shared", "reference", "xnemo_param_keys_full.txt")

SD_PARAMS = 859_520_964          # sd-image-variations UNet
MOTION_PARAMS = 372_088_000      # 21 motion cross-attention modules
TEMPORAL_PARAMS = 453_209_280    # 21 temporal modules, learnable only
PE_BUFFER_ENTRIES = 1_208_320    # 42 pos_encoder.pe tables (1, 32, C): 454.42 M with the parameters
DENOISER_PARAMS = 1_684_818_244  # = SD + motion + temporal
REFERENCE_PARAMS = 859_508_800   # the SD UNet without conv_norm_out / conv_out

FRAMES, BATCH, HW = 3, 2, 16
TIMESTEPS = np.array([417, 801])
UNCOND_READS = np.array([False, True])  # bank_mask: the uncond half gets plain self-attention


def _count(state) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


def _section(name: str) -> dict[str, tuple]:
    if not os.path.exists(KEYS_FILE):
        raise FileNotFoundError(f"{KEYS_FILE} is missing: the shared reference folder must sit beside the clone")
    out, on = {}, False
    with open(KEYS_FILE) as f:
        for line in f:
            if line.startswith("## ["):
                on = line.startswith(f"## [{name}]")
                continue
            if on and line.strip() and not line.startswith("#"):
                key, shape = line.rstrip("\n").split("\t")
                out[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return out


# ------------------------------------------------------------------------------------ full size, abstract
@pytest.fixture(scope="module")
def full_models():
    t = time.time()
    den, ref = D.abstract_denoiser(D.DenoiserConfig.official()), D.abstract_reference_net()
    print(f"eval_shape of both full-size models: {time.time() - t:.1f} s")
    return den, ref


def test_parameter_counts_without_allocating(full_models):
    den, ref = full_models
    params = nnx.state(den, nnx.Param)
    assert _count(params) == DENOISER_PARAMS
    paths = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(params)]
    sizes = [int(np.prod(v.shape)) for _, v in nnx.to_flat_state(params)]
    by_kind = {"motion_modules": 0, "temporal_modules": 0, "sd": 0}
    for path, size in zip(paths, sizes, strict=True):
        kind = next((k for k in ("motion_modules", "temporal_modules") if f".{k}." in path), "sd")
        by_kind[kind] += size
    assert by_kind == {"motion_modules": MOTION_PARAMS, "temporal_modules": TEMPORAL_PARAMS, "sd": SD_PARAMS}
    assert _count(nnx.state(den, D.Buffer)) == PE_BUFFER_ENTRIES  # not trainable, but official keys
    assert _count(nnx.state(ref, nnx.Param)) == REFERENCE_PARAMS
    assert len(den.tap_keys()) == len(ref.tap_keys()) == 16 and den.tap_keys() == ref.tap_keys()


def test_official_key_sets_and_shapes(full_models):
    den, ref = full_models
    expected_den, expected_ref = _section("A"), _section("B")
    assert len(expected_den) == 1820 and len(expected_ref) == 682
    ours_den, ours_ref = D.official_keys(den), D.official_keys(ref)
    assert set(ours_den) == set(expected_den), (sorted(set(ours_den) ^ set(expected_den))[:5])
    assert ours_den == expected_den
    assert ours_ref == expected_ref
    assert sum(k.endswith("pos_encoder.pe") for k in ours_den) == 42


def test_logical_axis_names_on_every_weight(full_models):
    den, _ = full_models
    flat = nnx.to_flat_state(nnx.state(den, nnx.Param))
    matrices = [(p, v) for p, v in flat if len(v.shape) >= 2]
    expected = [k for k, shape in _section("A").items() if len(shape) >= 2 and not k.endswith(".pe")]
    assert len(matrices) == len(expected) == 786  # every Linear / Conv weight
    for path, var in matrices:
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(var.shape), path


# ----------------------------------------------------------------------------------- tiny, numerical
@pytest.fixture(scope="module")
def torch_models(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    den = R.randomize_(R.XNemoUNet(D.TINY_UNET), seed=0, pe_noise=0.01).eval()
    ref = R.randomize_(R.XNemoUNet(D.TINY_UNET, reference=True), seed=1).eval()
    folder = tmp_path_factory.mktemp("xnemo_official")
    sd = den.state_dict()
    files = {
        "denoising": {k: v for k, v in sd.items() if ".temporal_modules." not in k},
        "temporal": {k: v for k, v in sd.items() if ".temporal_modules." in k},
        "reference": ref.state_dict(),
    }
    paths = {}
    for name, state in files.items():
        paths[name] = str(folder / f"xnemo_{name}.pth")
        torch.save(state, paths[name])
    yield den, ref, paths
    torch.set_num_threads(threads)


def _load(paths, dtype="float32"):
    """The official loading sequence: denoiser non-strict from the denoising file, then the temporal file;
    reference strict."""
    den = D.abstract_denoiser(D.DenoiserConfig.tiny(), dtype=dtype)
    first, second = {}, {}
    D.from_official(den, read_state_dict(paths["denoising"]), strict=False, report=first)
    D.from_official(den, read_state_dict(paths["temporal"]), strict=False, report=second)
    ref = D.from_official(D.abstract_reference_net(D.TINY_UNET, dtype=dtype), read_state_dict(paths["reference"]))
    return den, ref, first, second


@pytest.fixture(scope="module")
def jax_models(torch_models):
    _, _, paths = torch_models
    den, ref, first, second = _load(paths)
    assert first["unexpected"] == [] and second["unexpected"] == []
    assert len(first["missing"]) == 588 and all(".temporal_modules." in k for k in first["missing"])
    assert set(second["missing"]) == set(D.official_keys(den)) - set(first["missing"])  # filled by the first
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(nnx.state(den)))  # nothing left abstract
    return den, ref


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((BATCH, FRAMES, HW, HW, 4)).astype(np.float32)
    ref_latent = rng.standard_normal((1, HW, HW, 4)).astype(np.float32).repeat(BATCH, 0)
    clip = rng.standard_normal((BATCH, 1, 64)).astype(np.float32)
    clip[0] = 0  # the unconditional context
    motion = rng.standard_normal((BATCH, FRAMES, 32, 16)).astype(np.float32)
    return latents, ref_latent, clip, motion


def _torch_window(den, ref, inputs, dtype=torch.float32):
    latents, ref_latent, clip, motion = (torch.from_numpy(a).to(dtype) for a in inputs)
    with torch.no_grad():
        bank = {}
        features = ref(ref_latent.permute(0, 3, 1, 2)[:, :, None], torch.zeros(BATCH), clip, collect=bank)
        eps = den(latents.permute(0, 4, 1, 2, 3), torch.from_numpy(TIMESTEPS), clip, motion, bank=bank,
                  uc_mask=torch.from_numpy(~UNCOND_READS))
    return (eps.permute(0, 2, 3, 4, 1).numpy(), features[:, :, 0].permute(0, 2, 3, 1).numpy(),
            {k: v.numpy() for k, v in bank.items()})


def _window(den, ref, latents, ref_latent, clip, motion):
    taps = {}
    features = ref(ref_latent, 0, clip, collect=taps)
    eps = den(latents, jnp.asarray(TIMESTEPS), clip, motion, bank=taps, bank_mask=jnp.asarray(UNCOND_READS))
    return eps, features, taps


# XLA:CPU compile time dominates this file (the tiny model has the release's 21 + 21 modules and 16
# transformers); the backend's optimisation passes cost ~25 % of it and are irrelevant to the numerics.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _run_window(den, ref, inputs, dtype=np.float32):
    (gd, sd), (gr, sr) = nnx.split(den), nnx.split(ref)
    run = jax.jit(lambda sd, sr, *a: _window(nnx.merge(gd, sd), nnx.merge(gr, sr), *a), compiler_options=FAST_COMPILE)
    with jax.default_matmul_precision("highest"):
        t = time.time()
        out = jax.block_until_ready(run(sd, sr, *(jnp.asarray(a.astype(dtype)) for a in inputs)))
    print(f"jitted window (compile + run, {np.dtype(dtype).name}): {time.time() - t:.1f} s")
    return jax.tree.map(np.asarray, out)


def test_round_trip_is_bit_exact(torch_models, jax_models):
    den_t, ref_t, _ = torch_models
    den, ref = jax_models
    for model, torch_model in ((den, den_t), (ref, ref_t)):
        out, theirs = D.to_official(model), torch_model.state_dict()
        assert set(out) == set(theirs)
        for key, value in theirs.items():
            assert out[key].shape == tuple(value.shape) and np.array_equal(out[key], value.numpy()), key
    # the pe tables come from the file (perturbed there), not from the constructor
    key = "down_blocks.0.temporal_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.1.pos_encoder.pe"
    table = D.sinusoidal_table(32, 32)
    np.testing.assert_allclose(table, R.sinusoidal_pe(32, 32).numpy(), atol=1e-6)
    assert np.abs(D.to_official(den)[key] - table).max() > 1e-3


def test_strict_conversion_names_the_key(torch_models):
    _, _, paths = torch_models
    state = read_state_dict(paths["reference"])
    key = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    with pytest.raises(convert.ConversionError, match="not in the checkpoint: " + key.replace(".", r"\.")):
        D.from_official(D.abstract_reference_net(D.TINY_UNET), {k: v for k, v in state.items() if k != key})
    with pytest.raises(convert.ConversionError, match=r"has shape \(128, 63\)"):
        D.from_official(D.abstract_reference_net(D.TINY_UNET), dict(state, **{key: state[key][:, :-1]}))
    extra = "down_blocks.0.motion_modules.0.temporal_transformer.proj_in.weight"  # a denoiser key
    with pytest.raises(convert.ConversionError, match=f"unexpected key '{extra}'"):
        D.from_official(D.abstract_reference_net(D.TINY_UNET), dict(state, **{extra: np.zeros((32, 32))}))


@pytest.fixture(scope="module")
def fp32_window(torch_models, jax_models, inputs):
    den_t, ref_t, _ = torch_models
    expected = _torch_window(den_t, ref_t, inputs)
    return _run_window(*jax_models, inputs), expected


def test_fp32_parity_window_with_cfg_and_reference_bank(fp32_window):
    (eps, features, bank), (eps_t, features_t, bank_t) = fp32_window
    assert eps.shape == (BATCH, FRAMES, HW, HW, 4)
    assert set(bank) == set(bank_t) and len(bank) == 16
    errors = {
        "denoiser": (np.abs(eps - eps_t).max(), np.abs(eps_t).max()),
        "reference features": (np.abs(features - features_t).max(), np.abs(features_t).max()),
        "bank": (max(np.abs(bank[k] - bank_t[k]).max() for k in bank), max(np.abs(v).max() for v in bank_t.values())),
    }
    for name, (err, scale) in errors.items():
        print(f"fp32 {name}: max abs err {err:.3g} (max |ref| {scale:.3g})")
        assert err <= 1e-4 * max(1.0, scale), name


def test_bank_only_reaches_the_conditional_half(torch_models, inputs, fp32_window):
    den_t, _, _ = torch_models
    (eps, _, _), _ = fp32_window
    latents, _, clip, motion = (torch.from_numpy(a) for a in inputs)
    with torch.no_grad():
        plain = den_t(latents.permute(0, 4, 1, 2, 3), torch.from_numpy(TIMESTEPS), clip, motion)
    plain = plain.permute(0, 2, 3, 4, 1).numpy()
    assert np.abs(eps[0] - plain[0]).max() <= 1e-4 * max(1.0, np.abs(plain[0]).max())  # uncond: no bank
    assert np.abs(eps[1] - plain[1]).max() > 1e-2  # cond: the bank matters


def test_window_longer_than_the_position_table_is_an_error(jax_models):
    den, _ = jax_models
    f = 33
    args = (jax.ShapeDtypeStruct((1, f, 8, 8, 4), jnp.float32), 10, jax.ShapeDtypeStruct((1, 1, 64), jnp.float32),
            jax.ShapeDtypeStruct((1, f, 32, 16), jnp.float32))
    with pytest.raises(ValueError, match="33 frames is longer than the temporal position table"):
        jax.eval_shape(lambda *a: den(*a), *args)
    jax.eval_shape(lambda *a: den(*a, skip_mm=True), *args)  # image mode has no frame limit


def test_mask_bank(jax_models):
    rng = np.random.default_rng(1)
    bank = {"a": jnp.asarray(rng.standard_normal((2, 10, 4)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal((2, 64, 8)), jnp.float32)}
    assert D.mask_bank(bank, 0.0, jax.random.key(0)) is bank
    kept = D.mask_bank(bank, 0.3, jax.random.key(0))
    assert kept["a"].shape == (2, 7, 4) and kept["b"].shape == (2, 44, 8)
    for key, value in kept.items():
        original = np.asarray(bank[key])
        for b in range(2):  # a subset of the example's own tokens, without repeats
            rows = [int(np.flatnonzero((original[b] == row).all(-1))[0]) for row in np.asarray(value[b])]
            assert len(set(rows)) == len(rows)
        assert not np.array_equal(np.asarray(value[0]), original[0, : value.shape[1]])  # random, not a prefix
    # the denoiser sees the same subset in every frame of a clip
    expanded = D.expand_bank(kept, 2, FRAMES)
    per_frame = np.asarray(expanded["b"]).reshape(2, FRAMES, 44, 8)
    for f in range(FRAMES):
        np.testing.assert_array_equal(per_frame[:, f], np.asarray(kept["b"]))
    with pytest.raises(ValueError, match="mask_ratio"):
        D.mask_bank(bank, 1.0, jax.random.key(0))


# a small structure for the image-mode check (two compiles of a 2-level UNet)
SMALL_UNET = dict(D.TINY_UNET, block_out_channels=[32, 64], layers_per_block=1,
                  down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])


def _random(abstract, seed: int):
    """Fills an abstract model with random official-layout weights (fast: no per-shape random programs)."""
    state = random_official_state(D.official_keys(abstract), seed)
    return D.from_official(abstract, state), state


def test_skip_mm_is_the_plain_unet_on_every_frame():
    den, state = _random(D.abstract_denoiser(D.DenoiserConfig.tiny(**SMALL_UNET)), seed=3)
    assert any(".motion_modules." in k for k in state) and any(".temporal_modules." in k for k in state)
    sd_only = {k: v for k, v in state.items() if ".motion_modules." not in k and ".temporal_modules." not in k}
    plain = nnx.eval_shape(lambda: UNet2DConditionModel.from_config(SMALL_UNET, rngs=D.ShapeOnlyRngs()))
    plain = D.from_official(plain, sd_only)
    rng = np.random.default_rng(2)
    latents = jnp.asarray(rng.standard_normal((2, FRAMES, 8, 8, 4)), jnp.float32)
    clip = jnp.asarray(rng.standard_normal((2, 1, 64)), jnp.float32)
    t = jnp.array([5, 900])
    with jax.default_matmul_precision("highest"):
        out = nnx.jit(lambda m, x, c: m(x, t, c, None, skip_mm=True))(den, latents, clip)
        expected = nnx.jit(lambda m, x, c: m(x, t.repeat(FRAMES), c.repeat(FRAMES, 0)))(
            plain, latents.reshape(2 * FRAMES, 8, 8, 4), clip)
    np.testing.assert_allclose(np.asarray(out).reshape(expected.shape), np.asarray(expected), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------- float64 (x64 from here on)
def test_float64_parity(torch_models, inputs, float64_parity):
    den_t, ref_t, paths = torch_models
    expected = _torch_window(copy.deepcopy(den_t).double(), copy.deepcopy(ref_t).double(), inputs, torch.float64)
    den, ref, _, _ = _load(paths, dtype="float64")
    got = _run_window(den, ref, inputs, np.float64)
    for name, a, b in (("denoiser", got[0], expected[0]), ("reference features", got[1], expected[1])):
        assert a.dtype == np.float64
        rel = float(np.abs(a - b).max() / np.abs(b).max())
        print(f"float64 {name}: relative error {rel:.3g}")
        assert rel <= 1e-8, name
    rel = max(float(np.abs(got[2][k] - expected[2][k]).max() / np.abs(expected[2][k]).max()) for k in expected[2])
    print(f"float64 bank: relative error {rel:.3g}")
    assert rel <= 1e-8
