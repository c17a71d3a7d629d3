"""xnemo_jax.vae against diffusers: parameter counts, fp32 parity on small random models, loading errors.

The torch references are diffusers' own ``AutoencoderKL`` / ``AutoencoderKLTemporalDecoder`` with every
parameter randomised (norm weights around 1, non-zero ``mix_factor``), written with ``save_pretrained`` and
read back through :func:`xnemo_jax.convert.load_pretrained`, so the key mapping is tested too. JAX works
channels-last; torch outputs are transposed before comparing.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from xnemo_jax import convert, vae  # noqa: E402

# The SD-1.5 VAE (also SD 2.x) and the SVD VAE (stabilityai/stable-video-diffusion-img2vid*/vae).
SD15_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
                layers_per_block=2, act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=512,
                scaling_factor=0.18215)
SVD_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
               block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, sample_size=768,
               scaling_factor=0.18215, force_upcast=True)
SD15_PARAMS, SVD_PARAMS = 83_653_863, 97_742_847


def _jax_param_count(cls, config) -> int:
    model = nnx.eval_shape(lambda: cls.from_config(config, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("name, config, expected", [
    ("AutoencoderKL", SD15_VAE, SD15_PARAMS),
    ("AutoencoderKLTemporalDecoder", SVD_VAE, SVD_PARAMS),
])
def test_parameter_counts(name, config, expected):
    assert _jax_param_count(getattr(vae, name), config) == expected
    with torch.device("meta"):  # no memory: proves the configs give the published models' sizes
        reference = getattr(diffusers, name)(**config)
    assert sum(p.numel() for p in reference.parameters()) == expected


# ------------------------------------------------------------------------------------------ parity
@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPU is shared; also keeps torch's reductions deterministic
    yield
    torch.set_num_threads(threads)


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random: N(0, 0.05) (query/key projections N(0, 0.15) so attention is not uniform),
    group-norm weights 1 + N(0, 0.05), ``mix_factor`` N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module_name, module in model.named_modules():
            for name, p in module.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=g)
                if isinstance(module, torch.nn.GroupNorm) and name == "weight":
                    p.copy_(1.0 + 0.05 * noise)
                elif name == "mix_factor":
                    p.copy_(noise)
                elif module_name.endswith(("to_q", "to_k")) and name == "weight":
                    p.copy_(0.15 * noise)
                else:
                    p.copy_(0.05 * noise)
    return model.eval()


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _check(what: str, got, want: np.ndarray):
    """fp32 parity: max abs error <= 1e-4 * max(1, max |reference|); prints the error for the log."""
    got = np.asarray(got)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = float(np.max(np.abs(got.astype(np.float64) - want)))
    scale = max(1.0, float(np.max(np.abs(want))))
    print(f"{what}: max abs err {err:.2e} (max |ref| {np.max(np.abs(want)):.3g})")
    assert err <= 1e-4 * scale, f"{what}: max abs error {err:.3e} > {1e-4 * scale:.3e}"


def _save_and_load(reference, tmp_path_factory, kind: str):
    folder = str(tmp_path_factory.mktemp(kind))
    reference.save_pretrained(folder)
    return convert.load_pretrained(folder, kind), folder


SMALL_VAES = {
    # name: (config overrides, image (H, W))
    "two_blocks": (dict(block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8), (32, 32)),
    "three_blocks": (dict(block_out_channels=[24, 40, 40], layers_per_block=2, norm_num_groups=8,
                          latent_channels=3, scaling_factor=0.13025), (32, 24)),
}


@pytest.fixture(scope="module", params=sorted(SMALL_VAES))
def sd_vae_pair(request, tmp_path_factory):
    overrides, hw = SMALL_VAES[request.param]
    n = len(overrides["block_out_channels"])
    config = dict(SD15_VAE, down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                  sample_size=hw[0], **{k: v for k, v in overrides.items()})
    reference = _randomise(diffusers.AutoencoderKL(**config), seed=len(request.param))
    model, _ = _save_and_load(reference, tmp_path_factory, "vae")
    return request.param, reference, model, config, hw


def test_vae_parity(sd_vae_pair):
    name, reference, model, config, (h, w) = sd_vae_pair
    assert model.scaling_factor == config["scaling_factor"]
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 3, h, w)).astype(np.float32)
    f = 2 ** (len(config["block_out_channels"]) - 1)
    z = rng.normal(size=(2, config["latent_channels"], h // f, w // f)).astype(np.float32)
    with torch.no_grad():
        posterior = reference.encode(torch.from_numpy(x)).latent_dist
        decoded = reference.decode(torch.from_numpy(z)).sample
        reconstructed = reference(torch.from_numpy(x)).sample
    with jax.default_matmul_precision("highest"):
        x_jax = jnp.asarray(x.transpose(0, 2, 3, 1))
        ours = model.encode(x_jax)
        ours_decoded = model.decode(jnp.asarray(z.transpose(0, 2, 3, 1)))
        ours_reconstructed = model(x_jax)
    _check(f"{name} encode mean", ours.mean, _nhwc(posterior.mean))
    _check(f"{name} encode logvar", ours.logvar, _nhwc(posterior.logvar))
    _check(f"{name} decode", ours_decoded, _nhwc(decoded))
    _check(f"{name} forward", ours_reconstructed, _nhwc(reconstructed))


@pytest.fixture(scope="module")
def svd_vae_pair(tmp_path_factory):
    # The temporal decoder hard-codes 32 groups, so channels are multiples of 32; layers_per_block=2 makes the
    # mid-block attention run (with one layer diffusers builds it but never applies it).
    config = dict(SVD_VAE, down_block_types=["DownEncoderBlock2D"] * 2, block_out_channels=[32, 64],
                  sample_size=32)
    reference = _randomise(diffusers.AutoencoderKLTemporalDecoder(**config), seed=7)
    model, _ = _save_and_load(reference, tmp_path_factory, "svd_vae")
    return reference, model


def test_svd_vae_parity(svd_vae_pair):
    reference, model = svd_vae_pair
    num_frames, clips = 3, 2
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (clips * num_frames, 3, 32, 32)).astype(np.float32)
    z = rng.normal(size=(clips * num_frames, 4, 16, 16)).astype(np.float32)
    with torch.no_grad():
        posterior = reference.encode(torch.from_numpy(x)).latent_dist
        decoded = reference.decode(torch.from_numpy(z), num_frames=num_frames).sample
    with jax.default_matmul_precision("highest"):
        ours = model.encode(jnp.asarray(x.transpose(0, 2, 3, 1)))
        z_jax = jnp.asarray(z.transpose(0, 2, 3, 1))
        ours_decoded = model.decode(z_jax, num_frames)
        # clips are independent: changing the second clip's latents leaves the first clip's frames alone
        other = model.decode(z_jax.at[num_frames:].multiply(-1.0), num_frames)
    _check("svd encode mean", ours.mean, _nhwc(posterior.mean))
    _check("svd encode logvar", ours.logvar, _nhwc(posterior.logvar))
    _check("svd decode (2 clips x 3 frames)", ours_decoded, _nhwc(decoded))
    np.testing.assert_array_equal(np.asarray(other[:num_frames]), np.asarray(ours_decoded[:num_frames]))
    assert not np.allclose(np.asarray(other[num_frames:]), np.asarray(ours_decoded[num_frames:]))
    with pytest.raises(ValueError, match="num_frames"):
        model.decode(z_jax[:5], num_frames)


# ----------------------------------------------------------------------------------- posterior, API
def test_diagonal_gaussian_matches_diffusers():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    moments = np.random.default_rng(2).normal(scale=20.0, size=(2, 6, 3, 5)).astype(np.float32)  # beyond the clip
    ref = DiagonalGaussianDistribution(torch.from_numpy(moments))
    ours = vae.DiagonalGaussian.from_moments(jnp.asarray(moments.transpose(0, 2, 3, 1)))
    other = vae.DiagonalGaussian.from_moments(jnp.asarray(moments[::-1].copy().transpose(0, 2, 3, 1)))
    ref_other = DiagonalGaussianDistribution(torch.from_numpy(moments[::-1].copy()))
    np.testing.assert_array_equal(np.asarray(ours.mean), _nhwc(ref.mean))
    np.testing.assert_array_equal(np.asarray(ours.logvar), _nhwc(ref.logvar))
    assert float(ours.logvar.max()) == 20.0 and float(ours.logvar.min()) == -30.0
    np.testing.assert_allclose(np.asarray(ours.std), _nhwc(ref.std), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ours.kl()), ref.kl().numpy(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ours.kl(other)), ref.kl(ref_other).numpy(), rtol=1e-5)
    sample = np.asarray(ours.mean) + 0.5
    np.testing.assert_allclose(np.asarray(ours.nll(jnp.asarray(sample))),
                               ref.nll(torch.from_numpy(sample.transpose(0, 3, 1, 2))).numpy(), rtol=1e-5)
    key = jax.random.key(0)
    np.testing.assert_array_equal(np.asarray(ours.sample(key)),
                                  np.asarray(ours.mean + ours.std * jax.random.normal(key, ours.mean.shape)))
    assert ours.mode() is ours.mean


def _random_model(config: dict, seed: int = 0) -> vae.AutoencoderKL:
    """A small JAX VAE with N(0, 0.1) parameters, built abstractly and filled from numpy (eager
    ``jax.random`` initialisation compiles one threefry program per parameter shape: slow on a busy CPU)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: vae.AutoencoderKL.from_config(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    values = jax.tree.map(lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), a.dtype), nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, values)
    return nnx.merge(graphdef, state)


def test_sample_posterior_and_jit():
    config = dict(block_out_channels=[16], layers_per_block=1, norm_num_groups=4, latent_channels=2)
    model = _random_model(config)
    x = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (1, 8, 8, 3)), jnp.float32)
    mode = nnx.jit(lambda m, x: m(x))(model, x)
    np.testing.assert_allclose(np.asarray(mode), np.asarray(model.decode(model.encode(x).mean)), atol=1e-5)
    sampled = model(x, jax.random.key(1), sample_posterior=True)
    assert sampled.shape == mode.shape == (1, 8, 8, 3) and not np.allclose(sampled, mode)
    with pytest.raises(ValueError, match="key"):
        model(x, sample_posterior=True)
    assert model.scaling_factor == 0.18215 and model.post_quant_conv is not None
    bare = _random_model(dict(config, use_quant_conv=False, use_post_quant_conv=False))
    assert bare.quant_conv is None and bare.post_quant_conv is None
    assert bare.decode(bare.encode(x).mode()).shape == (1, 8, 8, 3)


def test_config_errors():
    with pytest.raises(ValueError, match="AttnDownEncoderBlock2D"):
        vae.AutoencoderKL.from_config(dict(down_block_types=["AttnDownEncoderBlock2D"]), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="up block"):
        vae.AutoencoderKL.from_config(dict(up_block_types=["UpBlock2D"]), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="act_fn"):
        vae.AutoencoderKL.from_config(dict(act_fn="relu"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="block_out_channels"):
        vae.AutoencoderKLTemporalDecoder.from_config(dict(block_out_channels=[32, 64]), rngs=nnx.Rngs(0))


def test_legacy_attention_keys():
    assert vae.AutoencoderKL.torch_key("encoder.mid_block.attentions.0.query.weight") == \
        "encoder.mid_block.attentions.0.to_q.weight"
    assert vae.AutoencoderKL.torch_key("decoder.mid_block.attentions.0.proj_attn.bias") == \
        "decoder.mid_block.attentions.0.to_out.0.bias"
    assert vae.AutoencoderKL.torch_key("decoder.conv_in.weight") == "decoder.conv_in.weight"


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    reference = diffusers.AutoencoderKL(block_out_channels=[8], norm_num_groups=4, latent_channels=2)
    reference.save_pretrained(str(tmp_path))
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    del state["decoder.mid_block.attentions.0.to_k.bias"]
    save_file(state, str(path))
    with pytest.raises(convert.ConversionError, match=r"decoder\.mid_block\.attentions\.0\.to_k\.bias"):
        convert.load_pretrained(str(tmp_path), "vae")
