"""xnemo_jax.gan_head: the X-NeMo dual GAN head (tiny preset on the CPU; the official one shape-only).

* the tiny generator's output shape/dtype/range, and that it depends on both f_app and f_mot (the module
  fixture draws the mapping's f_mot weights like the rest: ``motion_zero_init=False``, a trained head);
* the default head starts with zero f_mot weights: its output ignores the motion code and no gradient
  reaches the code, while the zero weights themselves get one (the code enters gradually);
* gradients of the generator loss reach f_mot, the appearance ResNet, app_proj, the mapping and the
  synthesis, with the ResNet's BatchNorm in training mode (running statistics returned functionally),
  and never reach the target image or the real discriminator features (stop-gradient);
* every loss term against a formula written here on small arrays, the weighted total, and the
  ValueErrors for a missing VGG / face network with a nonzero weight;
* the official preset's parameter counts per part, from formulas of the architecture written here;
* the discriminator's ``return_features`` logits equal the default output bit for bit.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from liax_jax import vgg
from liax_jax.discriminator import Discriminator, DiscriminatorConfig
from perception import resnet
from xnemo_jax import gan_head
from xnemo_jax.gan_head import GAN_LOSS_WEIGHTS, GanHead, GanHeadConfig

B = 2


@pytest.fixture(scope="module")
def head():
    return GanHead(GanHeadConfig.preset("tiny", motion_zero_init=False), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def nets():
    """Frozen loss networks: narrow VGG19 parameters and a tiny VGGFace2-layout ResNet."""
    face = resnet.ResNet(resnet.ResNetConfig.preset("tiny_vggface2"), rngs=nnx.Rngs(3))
    return vgg.init_params(jax.random.key(1), channel_scale=1 / 16), face


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    r = GanHeadConfig.preset("tiny").resolution
    return dict(reference=jnp.asarray(rng.uniform(-1, 1, (B, 40, 40, 3)), jnp.float32),   # resized inside
                f_mot=jnp.asarray(rng.normal(size=(B, 512)), jnp.float32),
                target=jnp.asarray(rng.uniform(-1, 1, (B, r, r, 3)), jnp.float32))


@functools.partial(jax.jit, static_argnums=0)
def _generate(graphdef, state, reference, f_mot):
    return nnx.merge(graphdef, state)(reference, f_mot, train=False)


def test_tiny_output_shape_dtype_and_range(head, batch):
    graphdef, state = nnx.split(head.generator)
    out = _generate(graphdef, state, batch["reference"], batch["f_mot"])
    assert out.shape == (B, 32, 32, 3) and out.dtype == jnp.float32
    out = np.asarray(out)
    assert np.isfinite(out).all()
    assert 1e-3 < out.std() < 10 and np.abs(out).max() < 100, (out.std(), np.abs(out).max())
    assert np.abs(out[0] - out[1]).max() > 1e-4   # different references and codes -> different images
    # the motion code and the reference both change the image
    other_mot = _generate(graphdef, state, batch["reference"], batch["f_mot"][::-1])
    other_ref = _generate(graphdef, state, batch["reference"][::-1], batch["f_mot"])
    assert np.abs(np.asarray(other_mot) - out).max() > 1e-4
    assert np.abs(np.asarray(other_ref) - out).max() > 1e-4
    # tokens (B, 32, 16) flatten to the same code
    tokens = _generate(graphdef, state, batch["reference"], batch["f_mot"].reshape(B, 32, 16))
    np.testing.assert_array_equal(np.asarray(tokens), out)
    with pytest.raises(ValueError, match=r"f_mot must be \(B, 512\)"):
        head.generator(batch["reference"], batch["f_mot"][:, :100])


def test_default_head_starts_blind_to_the_motion_code(batch):
    generator = GanHead(GanHeadConfig.preset("tiny"), rngs=nnx.Rngs(0)).generator
    app_dim = generator.config.app_dim
    first = generator.mapping.layers[0].weight.get_value()
    assert float(jnp.abs(first[app_dim:]).max()) == 0 and float(jnp.abs(first[:app_dim]).min()) > 0
    graphdef, params, rest = nnx.split(generator, nnx.Param, ...)

    def l1(params, f_mot):
        fake = nnx.merge(graphdef, params, rest, copy=True)(batch["reference"], f_mot, train=False)
        return jnp.mean(jnp.abs(fake - batch["target"])), fake

    (_, out), (g_params, g_mot) = jax.value_and_grad(l1, argnums=(0, 1), has_aux=True)(params, batch["f_mot"])
    (_, other), _ = jax.value_and_grad(l1, argnums=(0, 1), has_aux=True)(params, batch["f_mot"][::-1])
    np.testing.assert_array_equal(np.asarray(other), np.asarray(out))
    assert float(jnp.abs(g_mot).max()) == 0
    assert float(jnp.abs(g_params["mapping"]["layers"][0]["weight"][...][app_dim:]).max()) > 0


def test_generator_loss_gradients(head, batch, nets):
    vgg_params, face = nets
    graphdef, params, rest = nnx.split(head.generator, nnx.Param, ...)
    d_graphdef, d_state = nnx.split(head.discriminator)
    face_graphdef, face_state = nnx.split(face)
    discriminator = nnx.merge(d_graphdef, d_state)
    _, real_features = discriminator(batch["target"], return_features=True)

    @jax.jit
    def step(params, rest, f_mot, target, real_features):
        def loss_fn(params, f_mot, target, real_features, rest):
            # copy=True: the BatchStat variables must belong to this (grad) trace to be updated in place
            model = nnx.merge(graphdef, params, rest, copy=True)
            fake = model(batch["reference"], f_mot, train=True)
            disc = nnx.merge(d_graphdef, d_state)
            total, terms = gan_head.generator_losses(
                fake, target, disc_fake=disc(fake, return_features=True), disc_real_features=real_features,
                vgg_params=vgg_params, face_net=nnx.merge(face_graphdef, face_state))
            return total, (terms, nnx.state(model, nnx.BatchStat))
        return jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3), has_aux=True)(params, f_mot, target,
                                                                                 real_features, rest)

    (total, (terms, stats)), grads = step(params, rest, batch["f_mot"], batch["target"], real_features)
    assert set(terms) == set(GAN_LOSS_WEIGHTS) and bool(jnp.isfinite(total))
    g_params, g_mot, g_target, g_real = grads
    assert float(jnp.abs(g_mot).max()) > 0
    for part in ("appearance_encoder", "app_proj", "mapping", "synthesis"):
        leaves = jax.tree.leaves(g_params[part])
        assert leaves and all(bool(jnp.isfinite(g).all()) for g in leaves), part
        assert max(float(jnp.abs(g).max()) for g in leaves) > 0, part
    # the mapping's first layer and the constant input are reached everywhere
    assert float(jnp.abs(g_params["mapping"]["layers"][0]["weight"][...]).min()) > 0
    assert float(jnp.abs(g_params["synthesis"]["input"][...]).max()) > 0
    # nothing flows into the target or the real features (stop-gradient), so not into D's real branch
    assert float(jnp.abs(g_target).max()) == 0
    assert all(float(jnp.abs(g).max()) == 0 for g in g_real)
    # train=True: the appearance ResNet's BatchNorm statistics moved (returned functionally)
    before, after = jax.tree.leaves(nnx.state(head.generator, nnx.BatchStat)), jax.tree.leaves(stats)
    assert len(before) == len(after) > 0
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))


# ---------------------------------------------------------------------------------------- loss terms
def _softplus(x):
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0)


def test_loss_terms_match_formulas(nets):
    vgg_params, face = nets
    rng = np.random.default_rng(1)
    fake = rng.uniform(-1, 1, (B, 32, 32, 3)).astype(np.float32)
    target = rng.uniform(-1, 1, (B, 32, 32, 3)).astype(np.float32)
    logits = np.array([[0.3], [-1.2]], np.float32)
    fake_feats = [rng.normal(size=(B, 8, 8, 4)).astype(np.float32), rng.normal(size=(B, 4, 4, 6)).astype(np.float32)]
    real_feats = [rng.normal(size=(B, 8, 8, 4)).astype(np.float32), rng.normal(size=(B, 4, 4, 6)).astype(np.float32)]

    total, terms = gan_head.generator_losses(
        jnp.asarray(fake), jnp.asarray(target), disc_fake=(jnp.asarray(logits), [jnp.asarray(f) for f in fake_feats]),
        disc_real_features=[jnp.asarray(f) for f in real_feats], vgg_params=vgg_params, face_net=face)

    expected = {
        "adv": np.mean(_softplus(-logits.astype(np.float64))),
        "l1": np.mean(np.abs(fake.astype(np.float64) - target)),
        "fm": np.mean([np.mean(np.abs(f.astype(np.float64) - r)) for f, r in zip(fake_feats, real_feats, strict=True)]),
    }
    # VGG19: sum over relu1_1..relu5_1 of the mean absolute difference (one scale, weight 1)
    fv, tv = vgg.features(vgg_params, jnp.asarray(fake)), vgg.features(vgg_params, jnp.asarray(target))
    assert len(fv) == 5
    expected["vgg"] = sum(np.mean(np.abs(np.asarray(a, np.float64) - np.asarray(b)))
                          for a, b in zip(fv, tv, strict=True))
    # VGGFace: mean over the face net's maps (images separately here, batched together inside)
    _, fm = face(resnet.preprocess_vggface2(jnp.asarray(fake)), train=False, return_features=True)
    _, tm = face(resnet.preprocess_vggface2(jnp.asarray(target)), train=False, return_features=True)
    assert len(fm) >= 2
    expected["vggface"] = np.mean([np.mean(np.abs(np.asarray(a, np.float64) - np.asarray(b)))
                                   for a, b in zip(fm, tm, strict=True)])
    assert set(terms) == set(expected)
    for k, v in expected.items():
        np.testing.assert_allclose(float(terms[k]), v, rtol=2e-5, atol=1e-7, err_msg=k)
        assert terms[k].dtype == jnp.float32 and terms[k].shape == ()
    np.testing.assert_allclose(float(total), sum(GAN_LOSS_WEIGHTS[k] * float(terms[k]) for k in terms), rtol=1e-6)
    assert GAN_LOSS_WEIGHTS == dict(adv=1.0, l1=1.0, vgg=3e-2, vggface=6e-3, fm=10.0)   # paper eq. 7

    # custom weights, skipped networks
    custom = dict(adv=0.5, l1=2.0, vgg=0.0, vggface=0.0, fm=1.5)
    total2, terms2 = gan_head.generator_losses(
        jnp.asarray(fake), jnp.asarray(target), disc_fake=(jnp.asarray(logits), fake_feats),
        disc_real_features=real_feats, vgg_params=None, face_net=None, weights=custom)
    assert set(terms2) == {"adv", "l1", "fm"}
    np.testing.assert_allclose(float(total2), 0.5 * expected["adv"] + 2.0 * expected["l1"] + 1.5 * expected["fm"],
                               rtol=1e-5)
    kw = dict(disc_fake=(jnp.asarray(logits), fake_feats), disc_real_features=real_feats)
    with pytest.raises(ValueError, match="vgg_params is None but the VGG19 loss weight is 0.03"):
        gan_head.generator_losses(jnp.asarray(fake), jnp.asarray(target), vgg_params=None, face_net=face, **kw)
    with pytest.raises(ValueError, match="face_net is None but the VGGFace loss weight is 0.006"):
        gan_head.generator_losses(jnp.asarray(fake), jnp.asarray(target), vgg_params=vgg_params, face_net=None, **kw)
    with pytest.raises(ValueError, match="unknown loss weights"):
        gan_head.generator_losses(jnp.asarray(fake), jnp.asarray(target), vgg_params=None, face_net=None,
                                  weights=dict(l1=1.0, vgg_face=1.0), **kw)
    with pytest.raises(ValueError, match="feature maps"):
        gan_head.feature_matching_loss(fake_feats, real_feats[:1])


def test_discriminator_losses_formula():
    real = np.array([[1.5], [-0.2], [0.0], [3.0]], np.float32)
    fake = np.array([[-2.0], [0.4], [1.0], [-0.1]], np.float32)
    total, parts = gan_head.discriminator_losses(jnp.asarray(real), jnp.asarray(fake))
    r, f = np.mean(_softplus(-real.astype(np.float64))), np.mean(_softplus(fake.astype(np.float64)))
    np.testing.assert_allclose([float(parts["real"]), float(parts["fake"]), float(total)], [r, f, r + f], rtol=1e-6)
    np.testing.assert_allclose([float(parts["real_logit"]), float(parts["fake_logit"])], [real.mean(), fake.mean()],
                               rtol=1e-6)


# ------------------------------------------------------------------------------- official parameter counts
def _resnet50_params():
    """torchvision ResNet-50 without the fc: 7x7 stem + BN, bottlenecks [3, 4, 6, 3] (expansion 4)."""
    n = 7 * 7 * 3 * 64 + 2 * 64
    cin = 64
    for blocks, w in zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True):
        for i in range(blocks):
            n += cin * w + 2 * w + 9 * w * w + 2 * w + w * 4 * w + 2 * 4 * w
            if i == 0:
                n += cin * 4 * w + 2 * 4 * w
            cin = 4 * w
    return n


def _stylegan2_widths(cm):
    return {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * cm, 128: 128 * cm, 256: 64 * cm}


def _synthesis_params(res, style, cm):
    ch = _stylegan2_widths(cm)

    def styled(cin, cout):      # 3x3 weight + modulation (style -> cin, bias) + activation bias
        return 9 * cin * cout + style * cin + cin + cout

    def to_rgb(cin):            # 1x1 weight + modulation + rgb bias
        return cin * 3 + style * cin + cin + 3

    n = 16 * ch[4] + styled(ch[4], ch[4]) + to_rgb(ch[4])
    for i in range(3, int(math.log2(res)) + 1):
        cin, c = ch[2 ** (i - 1)], ch[2 ** i]
        n += styled(cin, c) + styled(c, c) + to_rgb(c)
    return n


def _discriminator_params(res, cm):
    ch = _stylegan2_widths(cm)
    n = 3 * ch[res] + ch[res]                                  # 1x1 from RGB (+ fused-act bias)
    for i in range(int(math.log2(res)), 2, -1):
        cin, cout = ch[2 ** i], ch[2 ** (i - 1)]
        n += 9 * cin * cin + cin + 9 * cin * cout + cout + cin * cout   # conv1, conv2, skip (no bias)
    c4 = ch[4]
    return n + 9 * (c4 + 1) * c4 + c4 + 16 * c4 * c4 + c4 + c4 + 1


def test_official_parameter_counts():
    cfg = GanHeadConfig.preset("official")
    assert (cfg.resolution, cfg.app_dim, cfg.motion_dim, cfg.style_dim, cfg.mlp_layers) == (256, 512, 512, 512, 4)
    model = nnx.eval_shape(lambda: GanHead(cfg, rngs=nnx.Rngs(0)))
    g = model.generator
    counts = {
        "appearance_encoder": gan_head.count_params(g.appearance_encoder),
        "app_proj": gan_head.count_params(g.app_proj),
        "mapping": gan_head.count_params(g.mapping),
        "synthesis": gan_head.count_params(g.synthesis),
        "discriminator": gan_head.count_params(model.discriminator),
    }
    print({k: f"{v:,}" for k, v in counts.items()})
    expected = {
        "appearance_encoder": _resnet50_params(),
        "app_proj": 2048 * 512 + 512,
        "mapping": (1024 * 512 + 512) + 3 * (512 * 512 + 512),
        "synthesis": _synthesis_params(256, 512, cm=2),
        "discriminator": _discriminator_params(256, cm=2),
    }
    assert counts == expected
    # cross-checks with well-known totals: torchvision resnet50 minus its fc; rosinality's cm=2 256 D
    assert expected["appearance_encoder"] == 25_557_032 - (2048 * 1000 + 1000)
    assert expected["discriminator"] == 28_864_129
    assert gan_head.count_params(model) == sum(counts.values())
    assert g.synthesis.input.shape == (1, 4, 4, 512) and len(g.synthesis.to_rgbs) == 6 and len(g.synthesis.convs) == 12


def test_config_validation_and_discriminator_override():
    cfg = GanHeadConfig.preset("tiny", discriminator=dict(channel_multiplier=1, scale=0.25))
    assert cfg.discriminator == DiscriminatorConfig(32, channel_multiplier=1, scale=0.25)
    assert hash(cfg) == hash(GanHeadConfig.from_config(cfg.to_dict()))
    with pytest.raises(ValueError, match="discriminator's resolution 64 differs"):
        GanHeadConfig(resolution=32, discriminator=DiscriminatorConfig(64))
    with pytest.raises(ValueError, match="unknown preset"):
        GanHeadConfig.preset("huge")
    with pytest.raises(ValueError, match="resolution must be a power of two"):
        GanHeadConfig(resolution=48)


# ------------------------------------------------------------------------------ discriminator features
def test_discriminator_return_features_keeps_logits(head, batch):
    d = head.discriminator
    graphdef, state = nnx.split(d)

    @jax.jit
    def both(state, x):
        model = nnx.merge(graphdef, state)
        return model(x), model(x, return_features=True)

    plain, (logits, feats) = both(state, batch["target"])
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(logits))
    eager = Discriminator(d.config, rngs=nnx.Rngs(0))
    nnx.update(eager, state)
    np.testing.assert_array_equal(np.asarray(eager(batch["target"])), np.asarray(plain))
    r = d.config.resolution
    assert [f.shape[1] for f in feats] == [r >> k for k in range(int(math.log2(r)) - 1)] + [4]
    assert [f.shape[-1] for f in feats] == [d.config.channels(r >> k) for k in range(int(math.log2(r)) - 1)] + \
        [d.config.channels(4)]
