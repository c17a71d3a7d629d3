"""xnemo_jax.model: the X-NeMo bundle and its presets (full size only under nnx.eval_shape)."""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from xnemo_helpers import random_official_state

from xnemo_jax import denoiser as D
from xnemo_jax import model as M

# learnable parameters of the release (each equal to the PyTorch model's; see test_denoiser / test_motion_encoder
# / test_vae / test_clip for the per-network checks against torch)
OFFICIAL_COUNTS = {"denoiser": 1_684_818_244, "reference_net": 859_508_800, "motion_encoder": 61_665_393,
                   "vae": 97_742_847, "image_encoder": 303_966_208}


def test_official_bundle_parameter_counts_without_allocating():
    bundle = M.abstract("official")
    assert M.parameter_counts(bundle) == OFFICIAL_COUNTS
    leaves = jax.tree.leaves(nnx.state(bundle))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)      # nothing allocated
    assert bundle.config.latent_size == 64 and bundle.config.vae_scale == 8


@pytest.mark.parametrize("name", M.PRESETS)
def test_config_round_trips_through_json(name):
    config = M.XNemoConfig.preset(name)
    assert M.XNemoConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert M.XNemoConfig.preset(name, dtype="bfloat16").dtype == "bfloat16"


def test_inconsistent_configs_are_refused():
    tiny = M.XNemoConfig.preset("tiny")
    with pytest.raises(ValueError, match="unknown X-NeMo preset"):
        M.XNemoConfig.preset("huge")
    official_clip = M.XNemoConfig.preset("official").image_encoder
    with pytest.raises(ValueError, match="CLIP projection_dim 768 != UNet cross_attention_dim"):
        M.XNemoConfig.preset("tiny", image_encoder=official_clip)
    with pytest.raises(ValueError, match="not a multiple"):
        M.XNemoConfig.preset("tiny", resolution=60)
    assert tiny.latent_size == 16


def _window_loss_and_grad(den, ref, latents, ref_latent, context, motion, target):
    graphdef, params, rest = nnx.split((den, ref), nnx.Param, ...)

    def loss(p):
        d, r = nnx.merge(graphdef, p, rest)
        bank = D.reference_bank(r, ref_latent, context)
        eps = d(latents, jnp.array([10, 700]), context, motion, bank=bank, bank_mask=jnp.array([False, True]))
        return jnp.mean(jnp.square(eps - target))

    return jax.jit(jax.value_and_grad(loss)), params


def test_tiny_bundle_runs_a_denoiser_window_forward_and_backward():
    """One training-style window of the tiny bundle: reference bank from the reference net (t = 0), then the
    denoiser over F = 4 frames for a CFG pair [uncond: no bank, cond: bank], the gradient of an MSE on
    epsilon with respect to both UNets; then the same with gradient checkpointing (``layers.set_remat``, the
    training config's ``model.remat``): the loss within 1e-6 relative, every gradient within 1e-5 of the
    largest one (measured: 4.3e-8 against 0.148), and the backward pass recomputes (``remat`` in the jaxpr).
    Measured on the 2-core CPU: see the printed lines."""
    config = M.XNemoConfig.preset("tiny")
    bundle = M.abstract(config)
    den, ref = (D.from_official(net, random_official_state(D.official_keys(net), seed))
                for net, seed in ((bundle.denoiser, 0), (bundle.reference_net, 1)))
    rng = np.random.default_rng(2)
    size, frames = config.latent_size, 4
    latents = jnp.asarray(rng.standard_normal((2, frames, size, size, 4)), jnp.float32)
    ref_latent = jnp.asarray(rng.standard_normal((2, size, size, 4)), jnp.float32)
    context = jnp.asarray(rng.standard_normal((2, 1, 64)), jnp.float32)
    motion = jnp.asarray(rng.standard_normal((2, frames, 32, 16)), jnp.float32)
    target = jnp.asarray(rng.standard_normal(latents.shape), jnp.float32)
    inputs = (latents, ref_latent, context, motion, target)
    loss_and_grad, params = _window_loss_and_grad(den, ref, *inputs)

    t0 = time.perf_counter()
    value, grads = jax.block_until_ready(loss_and_grad(params))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(loss_and_grad(params))
    again = time.perf_counter() - t0
    print(f"tiny bundle, denoiser window 2 x {frames} frames at {size}x{size} latents + reference net: "
          f"forward+backward compile+run {first:.1f} s, run {again:.2f} s")
    assert np.isfinite(float(value))
    den_grads, ref_grads = grads[0], grads[1]
    flat = {".".join(map(str, p)): float(jnp.abs(g[...]).max()) for p, g in nnx.to_flat_state(den_grads)}
    assert all(np.isfinite(v) for v in flat.values())
    assert not any(k.endswith(".pe") for k in flat)  # the pe buffers are not trained
    for kind in ("motion_modules", "temporal_modules"):  # through their zero-initialised proj_outs
        assert flat[f"down_blocks.0.{kind}.0.temporal_transformer.proj_out.weight"] > 0, kind
    # the reference net is trained through the bank the conditional half reads
    ref_flat = [float(jnp.abs(g[...]).max()) for _, g in nnx.to_flat_state(ref_grads)]
    assert max(ref_flat) > 0

    # gradient checkpointing: ResNet, transformer and motion / temporal blocks of both UNets
    from xnemo_jax import layers  # noqa: PLC0415

    den_r, ref_r = nnx.clone(den), nnx.clone(ref)
    # tiny UNet: 2 + 2 + 4 ResNets (down, mid, up), 1 + 1 + 2 transformer blocks; the denoiser's 7 layers
    # also have a motion and a temporal module of one block each
    assert (layers.set_remat(den_r), layers.set_remat(ref_r)) == (8 + 4 + 14, 8 + 4)
    remat_fn, params_r = _window_loss_and_grad(den_r, ref_r, *inputs)
    jaxpr = str(jax.make_jaxpr(remat_fn)(params_r))
    assert "remat" in jaxpr or "checkpoint" in jaxpr
    value_r, grads_r = remat_fn(params_r)
    np.testing.assert_allclose(float(value_r), float(value), rtol=1e-6)
    pairs = list(zip(nnx.to_flat_state(grads), nnx.to_flat_state(grads_r), strict=True))
    assert all(p == q for (p, _), (q, _) in pairs)
    scale = max(float(jnp.abs(g[...]).max()) for (_, g), _ in pairs)
    err = max(float(jnp.abs(g[...] - g_r[...]).max()) for (_, g), (_, g_r) in pairs)
    print(f"remat: loss {float(value_r):.7g} vs {float(value):.7g}; gradient max-abs difference {err:.3g} "
          f"(largest gradient {scale:.3g})")
    assert err <= 1e-5 * scale
    assert M.XNemoConfig.preset("tiny", remat=True).remat and M.abstract(
        M.XNemoConfig.preset("tiny", remat=True)).denoiser.down_blocks[0].resnets[0].remat
