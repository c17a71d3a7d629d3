"""Self-tests of the plain-PyTorch LIA-X reference (``tests/liax_torch_reference.py``).

Checks the official state_dict layout and parameter counts (on the meta device, nothing is
allocated), the generalised small models in float64, the motion dictionary and navigation
identities, and hand-checked cases of the low-level ops (upfirdn2d, demodulation, warping).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from liax_torch_reference import (  # noqa: E402
    MOTION_IDS,
    ConvLayer,
    Generator,
    ModulatedConv2d,
    ToFlow,
    ToRGB,
    Upsample,
    animate,
    count_parameters,
    edit_img,
    edit_vid,
    interpolate_img,
    make_delta,
    make_kernel,
    manipulation_schedule,
    randomize_,
    upfirdn2d,
)

STATE_DICT_TXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "liax_state_dict.txt")
F64 = torch.float64


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """float64 CPU convs are tiny here; one thread avoids oversubscription on a busy 2-core box."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _official_entries():
    entries = []
    with open(STATE_DICT_TXT) as fh:
        for line in fh:
            key, shape, dtype = line.split()
            entries.append((key, tuple(int(s) for s in shape.strip("()").split(",")), dtype))
    return entries


@pytest.fixture(scope="module")
def meta_release():
    with torch.device("meta"):
        return Generator(size=512, style_dim=512, motion_dim=40, scale=2.0)


def _tiny(size, scale, groups, seed=0):
    torch.manual_seed(seed)
    return randomize_(Generator(size=size, motion_dim=40, scale=scale, norm_groups=groups).double(), seed)


@pytest.fixture(scope="module")
def g64():
    return _tiny(64, 0.125, 4)


@pytest.fixture(scope="module")
def g128():
    return _tiny(128, 0.25, 8, seed=1)


def _img(b, size, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=gen, dtype=F64) * 2 - 1


# ------------------------------------------------------------------------------------------------
# Official layout
# ------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not os.path.exists(STATE_DICT_TXT), reason="reference state_dict listing not available")
def test_state_dict_matches_official_listing(meta_release):
    official = _official_entries()
    assert len(official) == 596
    sd = meta_release.state_dict()
    mine = [(k, tuple(v.shape)) for k, v in sd.items()]
    assert mine == [(k, s) for k, s, _ in official]  # same keys, same order, same shapes
    assert all(dt == "float32" for _, _, dt in official)
    params = dict(meta_release.named_parameters())
    kernels = [k for k in sd if k not in params]
    assert len(params) == 555 and len(kernels) == 41
    assert all(k.endswith(".kernel") and sd[k].shape == (4, 4) for k in kernels)


def test_parameter_counts_release_and_scale1(meta_release):
    G = meta_release
    assert count_parameters(G) == 910_571_751
    assert count_parameters(G.enc.enc_2r) == 115_748_864
    assert count_parameters(G.enc.enc_r2t) == 41_000
    assert count_parameters(G.dec.direction) == 40_960
    render = sum(p.numel() for n, p in G.dec.named_parameters()
                 if "_2_up" in n or "_2_rgb" in n or n.startswith("rgb"))
    flow = count_parameters(G.dec) - render - 40_960
    assert (flow, render) == (433_414_805, 361_326_122)
    assert all(p.device.type == "meta" for p in G.parameters())
    with torch.device("meta"):
        G1 = Generator(size=512, motion_dim=40, scale=1.0)
    assert count_parameters(G1) == 227_728_551


def test_kernel_buffers_and_gains(g64):
    sd = g64.state_dict()
    kernels = {k: v for k, v in sd.items() if k.endswith(".kernel")}
    L = 4
    assert len(kernels) == 2 * L + (4 * L - 1)  # 41 at L = 7
    for k, v in kernels.items():
        assert v.shape == (4, 4)
        expected = 1.0 if k.startswith("enc.") else 4.0
        assert float(v.sum()) == expected, k
        ref = np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64 * expected
        np.testing.assert_array_equal(v.numpy(), ref)


def test_small_model_naming(g64):
    keys = set(g64.state_dict())
    for name in ["enc.enc_2r.block2.0.conv1.0.weight", "enc.enc_2r.block4.0.skip.1.weight",
                 "enc.enc_2r.block_512.conv2.0.kernel", "enc.enc_2r.block8.weight",
                 "dec.conv_512_1.conv.blur.kernel", "dec.conv_512_2.3.gamma", "dec.conv4_2_up.1.weight",
                 "dec.flow4.conv.weight", "dec.rgb4.conv.1.bias", "dec.rgb_512.up.kernel"]:
        assert name in keys, name
    assert not any(k.startswith(("enc.enc_2r.block5", "dec.conv5", "dec.conv_512_2_up")) for k in keys)
    assert g64.state_dict()["dec.input.input"].shape == (1, 64, 4, 4)
    assert g64.state_dict()["enc.enc_2r.block8.weight"].shape == (64, 64, 4, 4)


# ------------------------------------------------------------------------------------------------
# Reduced models in float64
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which,size,S,chans", [
    ("g64", 64, 64, [64, 32, 16, 8]),
    ("g128", 128, 128, [128, 128, 64, 32, 16]),
])
def test_reduced_model_shapes(request, which, size, S, chans):
    G = request.getfixturevalue(which)
    B = 2
    x = _img(B, size, 0)
    with torch.no_grad():
        z, feats = G.encode(x)
        alpha = G.alpha(z)
        image, inter = G.decode(G.navigate(z, [alpha]), feats)
    assert z.shape == (B, S) and z.dtype == F64
    assert alpha.shape == (B, 40)
    assert [tuple(f.shape) for f in feats] == [(B, c, 8 * 2 ** i, 8 * 2 ** i) for i, c in enumerate(chans)]
    assert image.shape == (B, 3, size, size) and image.dtype == F64
    L = len(chans)
    assert len(inter["flow_logits"]) == len(inter["rgb"]) == L
    for i in range(L):
        r = 8 * 2 ** i
        assert inter["flow_logits"][i].shape == (B, 3, r, r)
        assert inter["rgb"][i].shape == (B, 3, r, r)
    assert torch.equal(inter["rgb"][-1], image)
    assert all(torch.isfinite(t).all() for t in [z, alpha, image, *feats, *inter["flow_logits"]])
    # every path active: flows not saturated, masks neither 0 nor 1
    for o in inter["flow_logits"]:
        assert 0.05 < float(torch.tanh(o[:, :2]).abs().mean()) < 0.95
        m = torch.sigmoid(o[:, 2])
        assert 0.02 < float(m.mean()) < 0.98
    # batch elements are independent
    with torch.no_grad():
        z1, f1 = G.encode(x[1:])
        img1, _ = G.decode(G.navigate(z1, [G.alpha(z1)]), f1)
    torch.testing.assert_close(img1, image[1:], rtol=1e-10, atol=1e-10)


def test_randomize_is_deterministic_and_complete(g64):
    G2 = _tiny(64, 0.125, 4, seed=0)
    for (n, a), (_, b) in zip(g64.state_dict().items(), G2.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    sd = g64.state_dict()
    gammas = torch.cat([v.flatten() for k, v in sd.items() if k.endswith("gamma")])
    assert 0.1 <= float(gammas.min()) and float(gammas.max()) <= 0.5
    mod_b = torch.cat([v for k, v in sd.items() if k.endswith("modulation.bias")])
    assert abs(float(mod_b.mean()) - 1) < 0.05 and 0.05 < float(mod_b.std()) < 0.15
    assert all(float(v.abs().max()) > 0 for k, v in sd.items() if k.endswith("bias"))
    G3 = _tiny(64, 0.125, 4, seed=5)
    assert not torch.equal(G3.state_dict()["dec.input.input"], sd["dec.input.input"])


# ------------------------------------------------------------------------------------------------
# Motion dictionary and navigation
# ------------------------------------------------------------------------------------------------

def test_directions_orthonormal_and_match_numpy_qr(g64):
    with torch.no_grad():
        Q = g64.directions()
    assert Q.shape == (64, 40)
    torch.testing.assert_close(Q.T @ Q, torch.eye(40, dtype=F64), rtol=0, atol=1e-12)
    Qn, _ = np.linalg.qr(g64.dec.direction.weight.detach().numpy() + 1e-8)
    np.testing.assert_allclose(Q.numpy(), Qn, rtol=0, atol=1e-12)  # same Householder signs


def test_motion_dictionary_is_linear(g64):
    gen = torch.Generator().manual_seed(3)
    a, b = (torch.randn(3, 40, generator=gen, dtype=F64) for _ in range(2))
    with torch.no_grad():
        Da, Db, Dab = g64.motion(a), g64.motion(b), g64.motion(a + 2.5 * b)
        Q = g64.directions()
    torch.testing.assert_close(Dab, Da + 2.5 * Db, rtol=0, atol=1e-12)
    torch.testing.assert_close(Da, a @ Q.T, rtol=0, atol=1e-12)


def test_navigation_forms(g64):
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(2, 64, generator=gen, dtype=F64)
    at, as_, a0 = (torch.randn(2, 40, generator=gen, dtype=F64) for _ in range(3))
    with torch.no_grad():
        assert torch.equal(g64.navigate(z, None), z)
        torch.testing.assert_close(g64.navigate(z, [at]), z + g64.motion(at), rtol=0, atol=0)
        three = g64.navigate(z, [at, as_, a0])
        torch.testing.assert_close(three, z + g64.motion(at - a0 + as_), rtol=0, atol=1e-12)
        torch.testing.assert_close(g64.navigate(z, [a0, as_, a0]), z + g64.motion(as_), rtol=0, atol=1e-12)


def test_make_delta_rounding():
    d32 = make_delta([6, 25, 6], [0.1, -0.3, 0.2], 40, F64, float32_values=True)
    d64 = make_delta([6, 25, 6], [0.1, -0.3, 0.2], 40, F64, float32_values=False)
    assert d32.shape == (1, 40)
    assert float(d64[0, 6]) == 0.1 + 0.2 and float(d64[0, 25]) == -0.3
    assert float(d32[0, 25]) == float(np.float32(-0.3)) != -0.3
    assert float(d32[0, 6]) == float(np.float32(0.1)) + float(np.float32(0.2))
    assert int((d64 != 0).sum()) == 2


VALUES = [0.25, 0, -0.5, 0, 0, 0, 0.125, 0, 0, 0, 0, 0, -0.0625, 0.0625]  # float32-exact


def test_animate_frame0_equals_edit_img(g64):
    src, drv = _img(1, 64, 10), _img(3, 64, 11)
    ed = edit_img(g64, src, MOTION_IDS, VALUES)
    an = animate(g64, src, drv, MOTION_IDS, VALUES, chunk_size=2)
    assert an["video"].shape == (3, 3, 64, 64) and an["latent"].shape == (3, 64)
    assert [o.shape[0] for o in an["flow_logits"]] == [3] * 4
    torch.testing.assert_close(an["latent"][0:1], ed["latent"], rtol=0, atol=1e-12)
    torch.testing.assert_close(an["video"][0:1], ed["image"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(an["alpha_t"][0:1], an["alpha_start"], rtol=0, atol=1e-12)
    # the latent formula, frame by frame
    with torch.no_grad():
        D = g64.motion
        exp = an["z_s"] + (D(an["alpha_t"]) - D(an["alpha_start"])) + D(an["alpha_s"] + an["delta"])
    torch.testing.assert_close(an["latent"], exp, rtol=0, atol=1e-12)
    # chunking changes nothing but rounding
    an8 = animate(g64, src, drv, MOTION_IDS, VALUES, chunk_size=8)
    torch.testing.assert_close(an8["video"], an["video"], rtol=1e-9, atol=1e-9)
    for a, b in zip(an8["rgb"], an["rgb"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_edit_vid_uses_frame0_as_source(g64):
    vid = _img(2, 64, 12)
    ev = edit_vid(g64, vid, MOTION_IDS, VALUES, chunk_size=8)
    ed = edit_img(g64, vid[0:1], MOTION_IDS, VALUES)
    torch.testing.assert_close(ev["z_s"], ed["z"], rtol=0, atol=0)
    torch.testing.assert_close(ev["latent"][0:1], ed["latent"], rtol=0, atol=1e-12)
    assert ev["video"].shape == (2, 3, 64, 64)


def test_edit_img_with_zero_motion_is_reconstruction(g64):
    src = _img(1, 64, 13)
    ed = edit_img(g64, src, MOTION_IDS, [0.0] * 14)
    with torch.no_grad():
        z, feats = g64.encode(src)
        img, _ = g64.decode(z + g64.motion(g64.alpha(z)), feats)
    torch.testing.assert_close(ed["image"], img, rtol=0, atol=0)
    assert float(ed["delta"].abs().sum()) == 0


def test_manipulation_schedule():
    vals = [0.4, 0.4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    s = manipulation_schedule(vals)
    v = np.asarray(vals)
    assert s.shape == (64, 14) and s.dtype == np.float64
    np.testing.assert_allclose(s[0], v / 16, atol=1e-15)
    np.testing.assert_allclose(s[15], v, atol=1e-15)
    np.testing.assert_allclose(s[16], v * 15 / 16, atol=1e-15)
    np.testing.assert_allclose(s[31], 0 * v, atol=1e-15)
    np.testing.assert_allclose(s[47], -v, atol=1e-15)  # no mouth control -> 0 -> -v -> 0
    np.testing.assert_allclose(s[63], 0 * v, atol=1e-15)
    mouth = [0] * 7 + [-0.3] + [0] * 6
    sm = manipulation_schedule(mouth)
    np.testing.assert_allclose(sm[47], np.asarray(mouth), atol=1e-15)  # mouth -> 0 -> v -> 0 again
    np.testing.assert_allclose(sm[32:48], sm[0:16], atol=1e-15)
    # accumulated, not multiplied: bitwise equal to repeated float64 adds
    acc = np.zeros(14)
    for _ in range(3):
        acc = acc + np.asarray(vals) / 16
    assert np.array_equal(s[2], acc)


def test_interpolate_img():
    # 64 decoded frames: use an even smaller model (M = 16, S = 32, channels 4..32)
    torch.manual_seed(7)
    G = randomize_(Generator(size=64, motion_dim=16, scale=1 / 16, norm_groups=4).double(), 7)
    ids = list(range(14))
    src = _img(1, 64, 14)
    vals = [0.0] * 10 + [0.2, 0, 0, 0]
    out = interpolate_img(G, src, ids, vals, chunk_size=16)
    assert out["video"].shape == (64, 3, 64, 64) and out["latent"].shape == (64, 32)
    assert [tuple(o.shape) for o in out["flow_logits"]][-1] == (64, 3, 64, 64)
    d = out["delta"]
    assert float(d[15, 10]) == float(np.float32(0.2)) and float(d[47, 10]) == -float(np.float32(0.2))
    np.testing.assert_array_equal(d[:, 10].numpy(), out["schedule"][:, 10].astype(np.float32))
    with torch.no_grad():
        exp = out["z"] + G.motion(out["alpha"] + d)
    torch.testing.assert_close(out["latent"], exp, rtol=0, atol=1e-12)
    ed = edit_img(G, src, ids, out["schedule"][15])
    torch.testing.assert_close(out["video"][15:16], ed["image"], rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# Low-level ops, hand-checked
# ------------------------------------------------------------------------------------------------

def _naive_upfirdn2d(x, k, up, down, pad):
    """Literal numpy transcription of the 4-step definition (one 2-D map)."""
    h, w = x.shape
    u = np.zeros((h * up, w * up))
    u[::up, ::up] = x
    p = np.pad(u, ((pad[0], pad[1]), (pad[0], pad[1])))
    kf = k[::-1, ::-1]
    kh, kw = k.shape
    oh, ow = p.shape[0] - kh + 1, p.shape[1] - kw + 1
    out = np.zeros((oh, ow))
    for i in range(oh):
        for j in range(ow):
            out[i, j] = np.sum(p[i:i + kh, j:j + kw] * kf)
    return out[::down, ::down]


@pytest.mark.parametrize("up,down,pad", [(1, 1, (1, 1)), (2, 1, (2, 1)), (1, 2, (2, 2)), (2, 2, (3, 0))])
def test_upfirdn2d_matches_definition(up, down, pad):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 7, generator=gen, dtype=F64)
    k = torch.arange(1.0, 17.0, dtype=F64).reshape(4, 4)  # asymmetric: checks the flip
    y = upfirdn2d(x, k, up=up, down=down, pad=pad)
    for b in range(2):
        for c in range(3):
            np.testing.assert_allclose(y[b, c].numpy(), _naive_upfirdn2d(x[b, c].numpy(), k.numpy(), up, down, pad),
                                       rtol=1e-13, atol=1e-12)


def test_upsample_of_constant_is_constant():
    up = Upsample().double()
    y = up(torch.full((1, 2, 6, 6), 3.0, dtype=F64))
    assert y.shape == (1, 2, 12, 12)
    torch.testing.assert_close(y[..., 1:-1, 1:-1], torch.full_like(y[..., 1:-1, 1:-1], 3.0), rtol=0, atol=1e-14)
    # borders see one zero tap per axis: weights [1,3,3,1]/4 -> 3/4 on an edge, 9/16 in a corner
    torch.testing.assert_close(y[0, 0, 0, 1:-1], torch.full((10,), 2.25, dtype=F64), rtol=0, atol=1e-14)
    assert abs(float(y[0, 0, 0, 0]) - 3.0 * 9 / 16) < 1e-14
    assert abs(float(y[0, 0, -1, -1]) - 3.0 * 9 / 16) < 1e-14


def test_blur_downsample_of_constant_is_constant_inside():
    x = torch.full((1, 1, 16, 16), -2.0, dtype=F64)
    # skip path of an encoder ResBlock: blur pad (1, 1) then stride 2 (here folded into upfirdn2d)
    y = upfirdn2d(x, make_kernel(1.0), down=2, pad=(1, 1))
    assert y.shape == (1, 1, 8, 8)
    torch.testing.assert_close(y[..., 1:-1, 1:-1], torch.full((1, 1, 6, 6), -2.0, dtype=F64), rtol=0, atol=1e-14)
    assert abs(float(y[0, 0, 0, 3]) + 2.0 * 7 / 8) < 1e-14  # one missing 1/8 tap on each edge
    assert abs(float(y[0, 0, 7, 3]) + 2.0 * 7 / 8) < 1e-14
    assert abs(float(y[0, 0, 0, 0]) + 2.0 * 49 / 64) < 1e-14
    # conv2 path: blur pad (2, 2) (16 -> 17), the 3x3 stride-2 conv follows
    g = ConvLayer(1, 1, 3, downsample=True).double()
    yb = g[0](x)
    assert yb.shape == (1, 1, 17, 17)
    torch.testing.assert_close(yb[..., 2:-2, 2:-2], torch.full((1, 1, 13, 13), -2.0, dtype=F64), rtol=0, atol=1e-14)
    assert abs(float(yb[0, 0, 0, 8]) + 2.0 * 4 / 8) < 1e-14
    assert g(x).shape == (1, 1, 8, 8)


def test_modulated_conv_demodulation_hand_checked():
    torch.manual_seed(0)
    m = ModulatedConv2d(3, 2, 3, style_dim=4, demodulate=True).double()
    randomize_(m, 1)
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(1, 4, generator=gen, dtype=F64)
    # hand computation in numpy
    W = m.weight.detach().numpy()[0]  # (2, 3, 3, 3)
    s = m.modulation.weight.detach().numpy() @ z.numpy()[0] / math.sqrt(4) + m.modulation.bias.detach().numpy()
    w = W * s[None, :, None, None] / math.sqrt(3 * 9)
    ss = (w ** 2).sum(axis=(1, 2, 3))
    w = w / np.sqrt(ss + 1e-8)[:, None, None, None]
    # one impulse per input channel, far enough apart that the 3x3 footprints do not overlap
    x = torch.zeros(1, 3, 11, 11, dtype=F64)
    centres = [(2, 2), (5, 5), (8, 8)]
    for c, (i, j) in enumerate(centres):
        x[0, c, i, j] = 1.0
    with torch.no_grad():
        y = m(x, z)[0].numpy()
    for o in range(2):
        # output channel norm = demodulated weight norm = sqrt(ss / (ss + 1e-8)) ~= 1
        np.testing.assert_allclose(np.sqrt((y[o] ** 2).sum()), np.sqrt(ss[o] / (ss[o] + 1e-8)), rtol=1e-13)
        assert abs(np.sqrt((y[o] ** 2).sum()) - 1) < 1e-6
        for c, (i, j) in enumerate(centres):  # cross-correlation: y[o, i-a+1, j-b+1] = w[o, c, a, b]
            patch = y[o, i - 1:i + 2, j - 1:j + 2][::-1, ::-1]
            np.testing.assert_allclose(patch, w[o, c], rtol=1e-13, atol=1e-15)
    # without demodulation the output scales with the style
    m.demodulate = False
    with torch.no_grad():
        y2 = m(x, 2 * z)[0].numpy()
    s2 = m.modulation.weight.detach().numpy() @ (2 * z.numpy()[0]) / 2 + m.modulation.bias.detach().numpy()
    np.testing.assert_allclose(y2[0, 1:4, 1:4][::-1, ::-1], W[0, 0] * s2[0] / math.sqrt(27), rtol=1e-13)


def test_modulated_conv_upsample_equivalent_form():
    torch.manual_seed(0)
    m = randomize_(ModulatedConv2d(3, 4, 3, style_dim=5, upsample=True).double(), 3)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 6, 6, generator=gen, dtype=F64)
    z = torch.randn(2, 5, generator=gen, dtype=F64)
    with torch.no_grad():
        y = m(x, z)
        wb = m.modulated_weight(z)
    assert y.shape == (2, 4, 12, 12)
    # zero-insert (2H-1, no trailing zero), pad 2, correlate with the flipped weight, then blur
    xu = torch.zeros(2, 3, 11, 11, dtype=F64)
    xu[..., ::2, ::2] = x
    xu = torch.nn.functional.pad(xu, [2, 2, 2, 2])
    ref = torch.stack([torch.nn.functional.conv2d(xu[b:b + 1], torch.flip(wb[b], [2, 3]))[0] for b in range(2)])
    ref = upfirdn2d(ref, make_kernel(4.0), pad=(1, 1))
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("res,tol", [(5, 1e-14), (8, 1e-6)])
def test_toflow_zero_logits_is_identity_warp(res, tol):
    torch.manual_seed(0)
    head = randomize_(ToFlow(4, 6).double(), 0)
    with torch.no_grad():
        head.conv.weight.zero_()
        head.bias.zero_()
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(2, 4, res, res, generator=gen, dtype=F64)
    feat = torch.randn(2, 4, res, res, generator=gen, dtype=F64)
    z = torch.randn(2, 6, generator=gen, dtype=F64)
    with torch.no_grad():
        warped, h_new, o = head(h, z, feat)
    assert torch.equal(o, torch.zeros_like(o))  # tanh(0) = 0 offsets, sigmoid(0) = 0.5 mask
    torch.testing.assert_close(warped, 0.5 * feat, rtol=0, atol=tol)  # float32 linspace grid: exact at res 5
    torch.testing.assert_close(h_new, 0.5 * feat + 0.5 * h, rtol=0, atol=tol)
    if res % 2 == 0:  # a zero logit skip from the coarser level changes nothing
        with torch.no_grad():
            _, _, o2 = head(h, z, feat, skip=torch.zeros(2, 3, res // 2, res // 2, dtype=F64))
        assert torch.equal(o2, o)


def test_toflow_shift_warp():
    """An x-offset of exactly one pixel (tanh(o) = 2/(R-1)) samples the right-hand neighbour."""
    torch.manual_seed(0)
    head = ToFlow(1, 2).double()
    with torch.no_grad():
        head.conv.weight.zero_()
        head.bias.copy_(torch.tensor([math.atanh(0.5), 0.0, 50.0], dtype=F64).reshape(1, 3, 1, 1))
    feat = torch.arange(25.0, dtype=F64).reshape(1, 1, 5, 5)
    with torch.no_grad():
        warped, _, _ = head(torch.zeros_like(feat), torch.zeros(1, 2, dtype=F64), feat)
    exp = torch.zeros_like(feat)
    exp[..., :, :-1] = feat[..., :, 1:]  # the last column samples x = 5 (outside): zeros padding
    mask = torch.sigmoid(torch.tensor(50.0, dtype=F64))
    torch.testing.assert_close(warped, exp * mask, rtol=0, atol=1e-12)


def test_torgb_has_leaky_relu_and_skip():
    torch.manual_seed(0)
    head = randomize_(ToRGB(2).double(), 0)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(1, 2, 4, 4, generator=gen, dtype=F64)
    skip = torch.randn(1, 3, 2, 2, generator=gen, dtype=F64)
    with torch.no_grad():
        y = head(x, skip)
        y0 = head(x)
    W = head.conv[0].weight.detach()[:, :, 0, 0] / math.sqrt(2)
    pre = torch.einsum("oc,bchw->bohw", W, x) + head.conv[1].bias.detach().reshape(1, 3, 1, 1)
    exp0 = torch.where(pre >= 0, pre, 0.2 * pre) * math.sqrt(2) + head.bias.detach()
    torch.testing.assert_close(y0, exp0, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(y, exp0 + upfirdn2d(skip, make_kernel(4.0), up=2, pad=(2, 1)), rtol=1e-13, atol=1e-13)
