"""liax_jax.vgg / liax_jax.losses against small PyTorch references written here from liax_official.md §6.

The references are LIA's ``Vgg19`` (torchvision ``vgg19().features`` layout, sliced at relu1_1 ... relu5_1),
FOMM's ``AntiAliasInterpolation2d`` / ``ImagePyramide`` and LIA's ``VGGLoss``, all with random weights and
(for speed) narrow channels via ``channel_scale``; the weights are copied with ``to_torchvision``. Metrics
are checked against scikit-image, the logistic GAN losses against ``torch.nn.functional.softplus``.

Error bounds are fp32 (JAX convolutions at ``Precision.HIGHEST``) and were set a few times above the
errors measured on CPU; they are relative to the largest magnitude of the reference.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import ROOT
from liax_jax import losses, vgg
from liax_jax.convert import ConversionError

# ------------------------------------------------------------------------------------------ torch references


class TorchVgg19(nn.Module):
    """LIA's ``Vgg19``: torchvision's ``vgg19().features[:30]`` layout, ImageNet normalisation, 5 slices."""

    CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512)
    SLICES = ((0, 2), (2, 7), (7, 12), (12, 21), (21, 30))

    def __init__(self, channel_scale=1.0):
        super().__init__()
        layers, cin = [], 3
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                cout = max(1, round(v * channel_scale))
                layers += [nn.Conv2d(cin, cout, kernel_size=3, padding=1), nn.ReLU()]
                cin = cout
        self.features = nn.Sequential(*layers)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x):
        x = (x.clamp(-1, 1) / 2 + 0.5 - self.mean) / self.std
        outs = []
        for a, b in self.SLICES:
            x = self.features[a:b](x)
            outs.append(x)
        return outs


class TorchAntiAlias(nn.Module):
    """FOMM's ``AntiAliasInterpolation2d`` (2-D Gaussian, zero padding, depthwise conv, strided subsampling)."""

    def __init__(self, channels, scale):
        super().__init__()
        sigma = (1 / scale - 1) / 2
        size = 2 * round(sigma * 4) + 1
        self.ka = size // 2
        self.kb = self.ka - 1 if size % 2 == 0 else self.ka
        grids = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                               indexing="ij")
        kernel = 1
        for grid in grids:
            kernel = kernel * torch.exp(-((grid - (size - 1) / 2) ** 2) / (2 * sigma ** 2))
        kernel = kernel / kernel.sum()
        self.register_buffer("weight", kernel.view(1, 1, size, size).repeat(channels, 1, 1, 1))
        self.groups, self.scale, self.step = channels, scale, int(1 / scale)

    def forward(self, x):
        if self.scale == 1.0:
            return x
        out = F.conv2d(F.pad(x, (self.ka, self.kb, self.ka, self.kb)), self.weight, groups=self.groups)
        return out[:, :, ::self.step, ::self.step]


class TorchVGGLoss(nn.Module):
    """LIA's ``VGGLoss``: FOMM pyramid at 1, 1/2, 1/4, 1/8; weight 10 per layer; L1 to detached targets."""

    def __init__(self, vgg19, scales=(1, 0.5, 0.25, 0.125), weights=(10, 10, 10, 10, 10)):
        super().__init__()
        self.vgg, self.weights = vgg19, weights
        self.pyramid = nn.ModuleList(TorchAntiAlias(3, s) for s in scales)

    def forward(self, recon, real):
        loss = 0
        for down in self.pyramid:
            x_vgg, y_vgg = self.vgg(down(recon)), self.vgg(down(real))
            for w, xf, yf in zip(self.weights, x_vgg, y_vgg, strict=True):
                loss = loss + w * torch.abs(xf - yf.detach()).mean()
        return loss


# ------------------------------------------------------------------------------------------ helpers


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _rel_err(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))


def _torch_vgg(params, channel_scale):
    model = TorchVgg19(channel_scale)
    state = {k: torch.from_numpy(v) for k, v in vgg.to_torchvision(params).items()}
    model.features.load_state_dict({k.removeprefix("features."): v for k, v in state.items()})
    return model.eval()


def _images(seed, shape, lo=-1.3, hi=1.3):
    """Random NHWC images, slightly out of [-1, 1] so that the clamp is exercised."""
    return np.random.default_rng(seed).uniform(lo, hi, shape).astype(np.float32)


SCALE = 0.25  # narrow VGG: 16, 32, 64, 128, 128 channels


@pytest.fixture(scope="module")
def narrow():
    params = vgg.init_params(jax.random.key(0), SCALE)
    return params, _torch_vgg(params, SCALE)


# ------------------------------------------------------------------------------------------ VGG19


def test_layout_and_abstract_params():
    shapes = jax.tree.map(lambda a: a.shape, vgg.abstract_params())
    assert list(shapes) == [name for name, _, _ in vgg.LAYERS]
    assert shapes["conv1_1"] == {"kernel": (3, 3, 3, 64), "bias": (64,)}
    assert shapes["conv3_1"]["kernel"] == (3, 3, 128, 256) and shapes["conv5_1"]["kernel"] == (3, 3, 512, 512)
    n = sum(int(np.prod(s)) for s in jax.tree.leaves(shapes, is_leaf=lambda s: isinstance(s, tuple)))
    assert n == 12_944_960  # torchvision vgg19 features[0:29]: 20,024,384 - features 30/32/34 (7,079,424)
    assert vgg.layer_shapes(0.01)["conv1_1"] == (3, 1)  # channels never drop below 1
    # the torch reference has exactly the torchvision key layout the converter expects
    ref_keys = [f"features.{k}" for k in TorchVgg19(SCALE).features.state_dict()]
    assert ref_keys == vgg.torchvision_keys()


def test_features_match_torch(narrow):
    params, ref = narrow
    x = _images(1, (2, 50, 38, 3))  # odd sizes: the max-pools drop the last row/column like torch
    got = jax.jit(vgg.features)(params, x)
    with torch.no_grad():
        want = ref(_nchw(x))
    assert [g.shape for g in got] == [tuple(w.permute(0, 2, 3, 1).shape) for w in want]
    assert got[-1].shape == (2, 3, 2, 128)  # 50x38 -> 25x19 -> 12x9 -> 6x4 -> 3x2
    for g, w in zip(got, want, strict=True):
        assert _rel_err(g, w.permute(0, 2, 3, 1).numpy()) < 1e-5  # measured <= 2.0e-6


def test_full_width_features_match_torch():
    params = vgg.init_params(jax.random.key(1))
    ref = _torch_vgg(params, 1.0)
    x = _images(2, (1, 32, 32, 3))
    got = jax.jit(vgg.features)(params, x)
    with torch.no_grad():
        want = ref(_nchw(x))
    for g, w in zip(got, want, strict=True):
        assert _rel_err(g, w.permute(0, 2, 3, 1).numpy()) < 1e-5  # measured <= 2.0e-6


def test_torchvision_round_trip_is_exact(narrow):
    params, _ = narrow
    sd = vgg.to_torchvision(params)
    assert list(sd) == vgg.torchvision_keys()
    assert sd["features.0.weight"].shape == (16, 3, 3, 3)
    sd_torch = {k: torch.from_numpy(v) for k, v in sd.items()}  # tensors are accepted too
    back = vgg.from_torchvision(sd_torch, SCALE)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, back)


def test_conversion_errors_name_the_key(narrow):
    params, _ = narrow
    sd = vgg.to_torchvision(params)
    bad = dict(sd)
    del bad["features.21.bias"]
    with pytest.raises(ConversionError, match="missing key 'features.21.bias'"):
        vgg.from_torchvision(bad, SCALE)
    bad = dict(sd, **{"features.5.weight": np.zeros((32, 16, 5, 5), np.float32)})
    with pytest.raises(ConversionError,
                       match=r"key 'features.5.weight' has shape \(32, 16, 5, 5\), expected \(32, 16, 3, 3\)"):
        vgg.from_torchvision(bad, SCALE)
    with pytest.raises(ConversionError,
                       match=r"key 'features.0.weight' has shape \(16, 3, 3, 3\), expected \(64, 3, 3, 3\)"):
        vgg.from_torchvision(sd)  # a narrow state dict is not the full network
    with pytest.raises(ConversionError, match="unexpected key 'features.1.running_mean'"):
        vgg.from_torchvision(dict(sd, **{"features.1.running_mean": np.zeros(16)}), SCALE)
    with pytest.raises(ConversionError, match="missing key 'features.0.weight'; found 'module.features.0.weight'"):
        vgg.from_torchvision({"module." + k: v for k, v in sd.items()}, SCALE)
    # the rest of torchvision's vgg19 (convs after relu5_1, the classifier) is accepted and ignored
    extra = dict(sd, **{"features.30.bias": np.zeros(128), "classifier.6.weight": np.zeros((10, 4))})
    assert vgg.ignored_keys(extra) == ["classifier.6.weight", "features.30.bias"]
    vgg.from_torchvision(extra, SCALE)


# ------------------------------------------------------------------------------------------ pyramid / perceptual loss


@pytest.mark.parametrize("hw", [(64, 64), (67, 45)])
def test_pyramid_matches_fomm(hw):
    x = _images(3, (2, *hw, 3))
    got = jax.jit(losses.image_pyramid)(x)
    for scale, g in zip((1, 0.5, 0.25, 0.125), got, strict=True):
        with torch.no_grad():
            want = TorchAntiAlias(3, scale)(_nchw(x)).permute(0, 2, 3, 1).numpy()
        assert g.shape == want.shape
        assert _rel_err(g, want) < 5e-6  # measured <= 1.4e-6 (separable vs 2-D kernel summation order)
    assert [g.shape[1:3] for g in got] == [hw] + [(-(-hw[0] // s), -(-hw[1] // s)) for s in (2, 4, 8)]


def test_pyramid_kernel_sizes():
    # FOMM: 2*round(4*sigma)+1 taps -> 5, 13, 29. Blur a horizontal line and count the rows it reaches;
    # rolling the line through one stride period makes the strided samples cover every row once.
    x = np.zeros((1, 64, 64, 1), np.float32)
    x[0, 32, :, 0] = 1.0
    for scale, size in ((0.5, 5), (0.25, 13), (0.125, 29)):
        reached = 0
        for shift in range(int(1 / scale)):
            y = np.asarray(losses.anti_alias_downsample(np.roll(x, shift, axis=1), scale))
            reached += np.count_nonzero(y[0, :, 0, 0] > 0)
        assert reached == size


def test_perceptual_loss_matches_lia(narrow):
    params, ref = narrow
    pred, target = _images(4, (2, 128, 128, 3)), _images(5, (2, 128, 128, 3))
    loss_fn = jax.jit(losses.perceptual_loss)
    loss = loss_fn(params, pred, target)
    assert loss.dtype == jnp.float32 and loss.shape == ()
    with torch.no_grad():
        want = TorchVGGLoss(ref)(_nchw(pred), _nchw(target)).item()
    assert abs(float(loss) - want) / want < 1e-6  # measured <= 1.2e-7 over 8 input seeds
    assert abs(float(loss_fn(params, pred, pred))) < 1e-7 * want


def test_perceptual_loss_gradient_matches_lia(narrow):
    # two of the four scales keep the backward pass cheap to compile; the pyramid itself is tested above
    params, ref = narrow
    pred, target = _images(4, (2, 128, 128, 3)), _images(5, (2, 128, 128, 3))
    scales = (1, 0.25)
    grads = jax.jit(jax.grad(losses.perceptual_loss, argnums=(1, 2)), static_argnums=3)
    grad, grad_target = grads(params, pred, target, scales)
    assert not np.any(np.asarray(grad_target))  # the target is a constant
    pred_t = _nchw(pred).requires_grad_(True)
    TorchVGGLoss(ref, scales)(pred_t, _nchw(target)).backward()
    want = pred_t.grad.permute(0, 2, 3, 1).numpy()
    # ~1e-6 relative L2 error, except that on about half of the random inputs some ReLU, max-pool or |.|
    # lies within fp32 rounding of its kink and takes the other branch, which changes the gradient over
    # that feature's receptive field (measured up to 5e-3 relative L2 over 8 seeds, all four scales).
    assert np.linalg.norm(np.asarray(grad) - want) / np.linalg.norm(want) < 1e-2


# ------------------------------------------------------------------------------------------ metrics and GAN losses


def test_psnr_and_ssim_match_skimage():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    rng = np.random.default_rng(6)
    smooth = np.cumsum(np.cumsum(rng.normal(size=(3, 40, 48, 3)), 1), 2)
    target = (2 * (smooth - smooth.min()) / np.ptp(smooth) - 1).astype(np.float32)
    noise = rng.normal(0, [[[[0.02]]], [[[0.1]]], [[[0.4]]]], target.shape)
    pred = np.clip(target + noise, -1.2, 1.2).astype(np.float32)
    p = np.asarray(jax.jit(losses.psnr)(pred, target))
    s = np.asarray(jax.jit(losses.ssim)(pred, target))
    assert p.shape == s.shape == (3,)

    def unit(a):
        return np.clip((a.astype(np.float64) + 1) / 2, 0, 1)

    for i in range(3):
        want_p = peak_signal_noise_ratio(unit(target[i]), unit(pred[i]), data_range=1)
        want_s = structural_similarity(unit(pred[i]), unit(target[i]), gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False, data_range=1, channel_axis=-1)
        assert abs(p[i] - want_p) < 5e-5  # dB; measured <= 2e-6 (fp32 ulp at 40 dB is ~4e-6)
        assert abs(s[i] - want_s) < 1e-5  # measured <= 1.1e-6 (fp32 vs skimage's fp64)
    assert s[0] > s[1] > s[2] and p[0] > p[1] > p[2]
    same = np.asarray(losses.psnr(target, target))
    assert np.allclose(same, 100.0)  # mse floored at 1e-10
    np.testing.assert_allclose(np.asarray(losses.ssim(target, target)), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="at least 11x11"):
        losses.ssim(target[:, :10], target[:, :10])


def test_gan_l1_and_sparsity_losses():
    rng = np.random.default_rng(7)
    real, fake = rng.normal(0, 3, (8, 1)).astype(np.float32), rng.normal(0, 3, (8, 1)).astype(np.float32)

    def sp(a):
        return F.softplus(torch.from_numpy(a))

    np.testing.assert_allclose(float(losses.generator_adversarial_loss(fake)), sp(-fake).mean().item(), rtol=1e-6)
    np.testing.assert_allclose(float(losses.discriminator_loss(real, fake)),
                               (sp(-real).mean() + sp(fake).mean()).item(), rtol=1e-6)
    alpha = rng.normal(size=(4, 40)).astype(np.float32)
    np.testing.assert_allclose(float(losses.sparsity_loss(alpha)), np.abs(alpha).mean(), rtol=1e-6)
    np.testing.assert_allclose(float(losses.l1(real, fake)), np.abs(real - fake).mean(), rtol=1e-6)


# ------------------------------------------------------------------------------------------ launch/convert.py vgg19


def _full_size_state_dict():
    """A torchvision-layout vgg19 state dict with random full-size weights for features[0:29] (~52 MB),
    plus two of the keys torchvision also has but the extractor ignores (kept small: they are not checked)."""
    gen = torch.Generator().manual_seed(0)
    sd = {}
    shapes = vgg.layer_shapes()
    for name, index, _ in vgg.LAYERS:
        cin, cout = shapes[name]
        sd[f"features.{index}.weight"] = torch.randn(cout, cin, 3, 3, generator=gen) * 0.05
        sd[f"features.{index}.bias"] = torch.randn(cout, generator=gen) * 0.05
    sd["features.30.bias"] = torch.zeros(512)
    sd["classifier.6.bias"] = torch.zeros(1000)
    return sd


def test_convert_cli_end_to_end(tmp_path):
    from launch import checkpointing

    sd = _full_size_state_dict()
    pth = tmp_path / "vgg19-test.pth"
    torch.save(sd, pth)
    out = tmp_path / "vgg19"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "convert.py"), "vgg19",
                        f"--torch-checkpoint={pth}", f"--output={out}"], check=False, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    info, params = checkpointing.load_params(str(out), vgg.abstract_params())
    assert info == json.loads((out / "model.json").read_text())
    assert info["model"] == "vgg19" and info["config"] == {"channel_scale": 1.0}
    assert info["metadata"] == {"source": "vgg19-test.pth", "ignored_keys": ["classifier.6.bias", "features.30.bias"]}
    back = vgg.to_torchvision(params)
    for key, value in back.items():
        np.testing.assert_array_equal(value, sd[key].numpy(), err_msg=key)


def test_convert_cli_user_errors(tmp_path, capsys):
    from launch.convert import main

    missing = tmp_path / "nope.pth"
    assert main(["vgg19", f"--torch-checkpoint={missing}", f"--output={tmp_path}/a"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {missing}: no such file"]
    assert not (tmp_path / "a").exists()

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    assert main(["vgg19", f"--torch-checkpoint={garbage}", f"--output={tmp_path}/b"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {garbage}: not a readable PyTorch checkpoint")
    assert not (tmp_path / "b").exists()

    narrow_pth = tmp_path / "narrow.pth"  # the right keys, the wrong widths
    narrow = vgg.to_torchvision(vgg.init_params(jax.random.key(0), 0.125))
    torch.save({k: torch.from_numpy(v) for k, v in narrow.items()},
               narrow_pth)
    assert main(["vgg19", f"--torch-checkpoint={narrow_pth}", f"--output={tmp_path}/c"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {narrow_pth}: key 'features.0.weight' has shape (8, 3, 3, 3), expected (64, 3, 3, 3)"]
    assert not (tmp_path / "c").exists()


def test_lazy_r1_is_the_gradient_penalty_every_nth_step_scaled_by_the_interval():
    """disc(x) = sum over pixels of x^2 per example: d disc / dx = 2x, so the penalty is mean_i sum 4 x_i^2."""
    x = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
    disc = lambda im: jnp.sum(jnp.square(im), axis=(1, 2, 3))  # noqa: E731
    want = float(np.mean(np.sum(4 * np.square(np.asarray(x)), axis=(1, 2, 3))))
    for step, expect in ((0, want), (16, want), (5, 0.0)):
        term, penalty = jax.jit(lambda s: losses.lazy_r1(disc, x, s, 10.0, 16))(jnp.int32(step))
        np.testing.assert_allclose(float(penalty), expect, rtol=1e-6)
        np.testing.assert_allclose(float(term), 10.0 / 2 * 16 * expect, rtol=1e-6)
