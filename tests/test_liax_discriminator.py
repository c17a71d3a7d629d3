"""The StyleGAN2 discriminator (liax_jax.discriminator) vs. the PyTorch reference, random weights.

The reference is ``Discriminator`` in tests/liax_torch_reference.py (native torch ops, NCHW), written from
liax_official.md §6 and the StyleGAN2 layout. Weights go torch state_dict -> ``load_official``. Bars, as
relative error ``max |jax - torch| / max |torch|`` on the logits:

* float64 (both sides): <= 1e-10 (measured <= 4e-15);
* float32 JAX (float32-rounded weights) vs. the float64 reference: <= 1e-5 (measured <= 1.5e-6).

Batches 4 and 8 exercise the stddev grouping (B // group = 1 and 2 with group 4; 2 and 4 with group 2);
batches 1-3 (group = batch) also match, and a batch not divisible by the group raises ValueError. Small
channel scales keep the module fast (jit per shape, ~30 s); the full 256² model is only shape-evaluated.
"""

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from liax_torch_reference import Discriminator as TorchDiscriminator
from liax_torch_reference import randomize_

from liax_jax import convert
from liax_jax.discriminator import Discriminator, DiscriminatorConfig, load_official, minibatch_stddev, to_official
from liax_jax.model import count_params

TOL64 = 1e-10
TOL32 = 1e-5
# (resolution, channel_multiplier, scale, stddev_group, stddev_feat)
CASES = [(64, 1, 0.125, 4, 1), (64, 2, 0.0625, 2, 2)]


@pytest.fixture(scope="module", autouse=True)
def x64(float64_parity):
    yield


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


def forward(model, x):
    """The model applied functionally under jit (one compile per shape instead of one per op)."""
    graphdef, state = nnx.split(model)
    return _forward(graphdef, state, x)


def make_reference(res, cm, scale, group, feat, seed=0):
    ref = TorchDiscriminator(res, channel_multiplier=cm, scale=scale, stddev_group=group, stddev_feat=feat)
    randomize_(ref, seed)
    return ref.double().eval()


def config(res, cm, scale, group, feat, dtype):
    return DiscriminatorConfig(res, channel_multiplier=cm, scale=scale, stddev_group=group, stddev_feat=feat,
                               dtype=dtype)


def images(batch, res, seed=1):
    x = np.random.default_rng(seed).uniform(-1, 1, (batch, res, res, 3))
    return x, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), ref.detach().numpy()
    assert ours.shape == ref.shape
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}px-cm{c[1]}-g{c[3]}f{c[4]}")
def test_logits_match_reference(case):
    ref = make_reference(*case)
    res = case[0]
    sd = ref.state_dict()
    model64 = load_official(sd, config(*case, "float64"))
    errors = {}
    for batch in (4, 8):
        x, x_t = images(batch, res, seed=batch)
        with torch.no_grad():
            expected = ref(x_t)
        out64 = forward(model64, jnp.asarray(x))
        assert out64.shape == (batch, 1) and out64.dtype == jnp.float64
        errors[f"f64/B{batch}"] = rel_err(out64, expected)
    # float32 (weights rounded to float32) against the float64 reference, on the last batch
    model32 = load_official({k: v.float() for k, v in sd.items()}, config(*case, "float32"))
    out32 = forward(model32, jnp.asarray(x, jnp.float32))
    assert out32.shape == (8, 1) and out32.dtype == jnp.float32
    errors["f32/B8"] = rel_err(out32, expected)
    print(case, errors)
    assert max(v for k, v in errors.items() if k.startswith("f64")) <= TOL64, errors
    assert errors["f32/B8"] <= TOL32, errors


@pytest.mark.parametrize("batch,group,feat", [(8, 4, 1), (8, 4, 2), (8, 2, 4), (2, 4, 1), (1, 4, 1)])
def test_minibatch_stddev_matches_reference(batch, group, feat):
    ref = TorchDiscriminator(8, scale=1 / 64, stddev_group=group, stddev_feat=feat)
    rng = np.random.default_rng(batch * 10 + group)
    # per-sample scales make every (group position, feature) statistic different
    x = rng.normal(size=(batch, 4, 4, 8)) * rng.uniform(0.5, 2.0, (batch, 1, 1, 8))
    with torch.no_grad():
        expected = ref.minibatch_stddev(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    ours = np.asarray(minibatch_stddev(jnp.asarray(x), group, feat))
    assert ours.shape == (batch, 4, 4, 8 + feat)
    expected = expected.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(ours, expected, rtol=1e-13, atol=0)
    # bfloat16 features: the statistic is taken in float32, the result is bfloat16
    ours16 = minibatch_stddev(jnp.asarray(x, jnp.bfloat16), group, feat)
    assert ours16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(ours16[..., 8:], np.float64), expected[..., 8:], rtol=2e-2)


def test_small_batches_and_batch_not_divisible_by_group():
    case = (32, 1, 0.125, 4, 1)
    ref = make_reference(*case, seed=2)
    model = load_official(ref.state_dict(), config(*case, "float64"))
    with pytest.raises(ValueError, match="batch size 6 is not divisible by the group size 4"):
        forward(model, jnp.zeros((6, 32, 32, 3)))
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 32, 32, 3\)"):
        forward(model, jnp.zeros((4, 64, 64, 3)))
    for batch in (1, 2, 3):  # below the group size the group is the whole batch
        x, x_t = images(batch, 32, seed=batch)
        with torch.no_grad():
            expected = ref(x_t)
        assert rel_err(forward(model, jnp.asarray(x)), expected) <= TOL64


@pytest.mark.parametrize("case", CASES)
def test_official_keys_shapes_and_round_trip(case):
    ref = make_reference(*case)
    sd = {k: v.float().numpy() for k, v in ref.state_dict().items()}
    model = nnx.eval_shape(lambda: Discriminator(config(*case, "float32"), rngs=nnx.Rngs(0)))
    # same keys, same order, same official shapes (after the layout conversion)
    assert list(convert.official_shapes(model)) == list(sd)
    assert convert.official_shapes(model) == {k: v.shape for k, v in sd.items()}
    back = to_official(load_official(sd, config(*case, "float32")))
    assert back.keys() == sd.keys()
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_loads_an_original_lia_checkpoint(tmp_path):
    """A full LIA training checkpoint {gen, dis, g_optim, d_optim, args} loads through its ``dis`` entry."""
    case = (64, 1, 0.125, 4, 1)
    ref = make_reference(*case).float()
    path = tmp_path / "000123.pt"
    torch.save({"gen": {"dec.w": torch.zeros(2)}, "dis": ref.state_dict(), "g_optim": {}, "d_optim": {},
                "args": argparse.Namespace(size=64, channel_multiplier=1)}, path)
    model = load_official(str(path), config(*case, "float32"))
    for k, v in to_official(model).items():
        np.testing.assert_array_equal(v, ref.state_dict()[k].numpy(), err_msg=k)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    del sd["final_linear.0.bias"]
    with pytest.raises(convert.ConversionError, match="missing key 'final_linear.0.bias'"):
        load_official(sd, config(*case, "float32"))
    with pytest.raises(convert.ConversionError, match="missing key"):
        load_official(ref.state_dict(), config(128, 1, 0.125, 4, 1, "float32"))


def test_parameter_count_without_allocating():
    """The 256² discriminator of LIA (cm=1): 24,001,089 parameters (rosinality's cm=2 one: 28,864,129)."""
    for cm, expected in [(1, 24_001_089), (2, 28_864_129)]:
        model = nnx.eval_shape(lambda: Discriminator(DiscriminatorConfig(256, channel_multiplier=cm),  # noqa: B023
                                                     rngs=nnx.Rngs(0)))
        assert count_params(model) == expected
        entries = model.official_entries()
        assert sum(int(np.prod(r.shape)) for r, layout in entries.values() if layout != "kernel") == expected
        assert sum(layout == "kernel" for _, layout in entries.values()) == 2 * 6  # conv2 + skip per ResBlock


def test_functional_jit_and_grad():
    case = (32, 1, 0.125, 4, 1)
    sd = {k: v.float() for k, v in make_reference(*case).state_dict().items()}
    model = load_official(sd, config(*case, "float32"))
    x = jnp.asarray(images(4, 32)[0], jnp.float32)
    graphdef, params = nnx.split(model)

    @jax.jit
    def loss(params, x):  # the non-saturating loss on "real" images, as in LIA's recipe
        return jnp.mean(jax.nn.softplus(-nnx.merge(graphdef, params)(x)))

    value, grads = jax.value_and_grad(loss)(params, x)
    assert bool(jnp.isfinite(value))
    assert all(bool(jnp.isfinite(g).all()) and bool((g != 0).any()) for g in jax.tree.leaves(grads))
    model16 = load_official(sd, config(*case, "bfloat16"))
    assert jax.tree.leaves(nnx.state(model16, nnx.Param))[0].dtype == jnp.float32  # params stay fp32
