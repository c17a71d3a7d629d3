"""LIA-X in JAX vs. the PyTorch reference (tests/liax_torch_reference.py), float64, random weights.

Every path is active (layer-scale gammas 0.1-0.5, non-trivial norms and biases). Bar: relative error
(max |jax - torch| / max |torch|) <= 1e-8 on z, alpha, every flow-logit level, every ToRGB level and the
final image, for edit_image and animate, at 64² and 128² (reduced channel scale).
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from liax_torch_reference import MOTION_IDS, Generator, animate, edit_img, randomize_

from liax_jax import convert, inference
from liax_jax.model import LiaXConfig

TOL = 1e-8
SIZES = [(64, 0.125, 4), (128, 0.25, 8)]
VALUES = [0.14, 0, -0.26, -0.29, -0.11, 0, -0.13, -0.18, 0, 0, 0, 0, -0.02, 0.07]  # official animation1


@pytest.fixture(scope="module", autouse=True)
def x64(float64_parity):
    yield


def rel_err(ours, ref, layout="nhwc"):
    ours = np.asarray(ours, np.float64)
    ref = ref.detach().numpy()
    if layout == "nhwc":
        ref = ref.transpose(0, 2, 3, 1)
    assert ours.shape == ref.shape
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def build(size, scale, groups, seed=0):
    ref = Generator(size=size, scale=scale, norm_groups=groups, motion_dim=40)
    randomize_(ref, seed)
    ref = ref.double().eval()
    model = convert.load_official(ref.state_dict(), LiaXConfig(resolution=size, scale=scale, norm_groups=groups,
                                                               dtype="float64"))
    return ref, model


def inputs(size, frames, seed=1):
    rng = np.random.default_rng(seed)
    src = rng.uniform(-1, 1, (1, size, size, 3))
    drv = rng.uniform(-1, 1, (frames, size, size, 3))
    to_t = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())  # noqa: E731
    return src, drv, to_t(src), to_t(drv)


def check_levels(ours, ref):
    assert len(ours["flow_logits"]) == len(ref["flow_logits"])
    errs = []
    for key in ("flow_logits", "rgb"):
        for a, b in zip(ours[key], ref[key], strict=True):
            errs.append(rel_err(a, b))
    return max(errs)


@pytest.mark.parametrize("size,scale,groups", SIZES)
def test_edit_image_matches_reference(size, scale, groups):
    ref, model = build(size, scale, groups)
    src, _, src_t, _ = inputs(size, 1)
    with torch.no_grad():
        expected = edit_img(ref, src_t, MOTION_IDS, VALUES)
    image, inter = inference.edit_image(model, src, MOTION_IDS, VALUES, return_intermediates=True)
    assert image.dtype == jnp.float64
    errors = {"z": rel_err(inter["z"], expected["z"], None), "alpha": rel_err(inter["alpha"], expected["alpha"], None),
              "levels": check_levels(inter, expected), "image": rel_err(image, expected["image"])}
    assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("size,scale,groups", SIZES)
def test_animate_matches_reference(size, scale, groups):
    ref, model = build(size, scale, groups, seed=3)
    src, drv, src_t, drv_t = inputs(size, 5)
    with torch.no_grad():
        expected = animate(ref, src_t, drv_t, MOTION_IDS, VALUES, chunk_size=2)
    video, inter = inference.animate(model, src, drv, MOTION_IDS, VALUES, chunk_size=2, return_intermediates=True)
    errors = {"z": rel_err(inter["z"], expected["z_s"], None),
              "alpha_t": rel_err(inter["alpha_t"], expected["alpha_t"], None),
              "alpha_start": rel_err(inter["alpha_start"], expected["alpha_start"], None),
              "levels": check_levels(inter, expected), "video": rel_err(video, expected["video"])}
    assert max(errors.values()) <= TOL, errors


def test_round_trip_to_official_is_exact():
    ref, model = build(64, 0.125, 4)
    sd = {k: v.float().numpy() for k, v in ref.state_dict().items()}
    back = convert.to_official(convert.load_official(sd, LiaXConfig(64, 0.125, norm_groups=4)))
    assert back.keys() == sd.keys()
    for k in sd:
        assert back[k].shape == sd[k].shape, k
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_manipulate_matches_reference():
    from liax_torch_reference import interpolate_img, manipulation_schedule

    values = [0, 0, 0, 0, 0, 0, 0, -0.3, 0, 0, 0, 0.2, 0, 0]  # a mouth control: second half goes 0 -> v -> 0
    np.testing.assert_array_equal(inference.manipulation_schedule(values), manipulation_schedule(values))
    np.testing.assert_array_equal(inference.manipulation_schedule(values[:7] + [0] * 7),
                                  manipulation_schedule(values[:7] + [0] * 7))
    ids = list(range(14))  # M = 16 on this small model
    ref = Generator(size=64, scale=0.0625, norm_groups=4, motion_dim=16)
    randomize_(ref, 5)
    ref = ref.double().eval()
    model = convert.load_official(ref.state_dict(), LiaXConfig(64, 0.0625, motion_dim=16, norm_groups=4,
                                                               dtype="float64"))
    src, _, src_t, _ = inputs(64, 1)
    with torch.no_grad():
        expected = interpolate_img(ref, src_t, ids, values, chunk_size=16)
    video = inference.manipulate(model, src, ids, values, chunk_size=16)
    assert video.shape == (64, 64, 64, 3)
    assert rel_err(video, expected["video"]) <= TOL
