"""xnemo_jax.sampling: the X-NeMo sampling pipeline against a PyTorch re-implementation of the official loop.

Parity (``tests/xnemo_torch_pipeline.py``, written from the reference facts): the tiny bundle of a fake
release written by ``torch.save`` / ``save_pretrained``, loaded by ``convert.load_official`` on our side
and by the official loading order on the torch side; the same reference crop, pose crop, 30 driving crops,
injected noise and window offsets; 3 DDIM steps with CFG 2.5 over closed-loop windows of 12 frames with
overlap 4 (4 windows per step, the last wrapping to the first frames). Our side batches 3 windows per
denoiser call (2 calls per step, one zero-weight padding window) and computes the motion codes once, in
padded batches; the torch side recomputes them per window per step, as the official code does.
fp32, max abs error on the final latents <= 1e-4 (measured: printed).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from xnemo_helpers import write_tiny_release

from xnemo_jax import clip, convert, sampling
from xnemo_jax import model as M

FRAMES, STEPS, GUIDANCE, CONTEXT, OVERLAP = 30, 3, 2.5, 12, 4
OFFSETS = [7, 0, 11]


def test_window_plan_is_the_official_closed_loop_schedule():
    import xnemo_torch_pipeline as T

    for n in (1, 11, 12, 13, 24, 25, 30, 47, 100):
        for context, overlap in ((12, 4), (24, 4), (8, 0)):
            for offset in (0, 3, context - 1):
                ours = sampling.context_windows(n, context, overlap, offset)
                np.testing.assert_array_equal(ours, np.asarray(T.context_windows(n, context, overlap, offset)))
    w = sampling.context_windows(30, 24, 4, 7)
    assert w.tolist() == [list(range(7, 30)) + [0], [27, 28, 29] + list(range(21))]   # wraps to frame 0
    assert sampling.context_windows(20, 24, 4, 9).tolist() == [list(range(20))]       # one window, no offset
    plan = sampling.WindowPlan(30, 12, 4, window_batch=3)
    assert (plan.num_windows, plan.num_groups, plan.window_batch_used) == (4, 2, 3)
    a, b = sampling.seeded_offsets(1, 25), sampling.seeded_offsets(2, 25)
    assert np.array_equal(a, sampling.seeded_offsets(1, 25)) and not np.array_equal(a, b)
    assert a.min() >= 0 and a.max() < 24
    with pytest.raises(ValueError, match="context_overlap"):
        sampling.WindowPlan(30, 12, 12)


def test_blur_and_motion_interpolation():
    import xnemo_torch_pipeline as T

    x = np.random.default_rng(0).standard_normal((2, 16, 16, 4)).astype(np.float32)
    ours = np.asarray(sampling.gaussian_blur(jnp.asarray(x)))
    theirs = T.gaussian_blur(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    keys = jnp.asarray(np.random.default_rng(1).standard_normal((3, 32, 16)), jnp.float32)
    tokens = np.asarray(sampling.interpolate_motion(keys, 4))
    assert tokens.shape == (9, 32, 16)
    np.testing.assert_allclose(tokens[[0, 4, 8]], np.asarray(keys), atol=1e-6)
    np.testing.assert_allclose(tokens[2], (np.asarray(keys[0]) + np.asarray(keys[1])) / 2, atol=1e-6)


def test_full_size_loop_lowers_in_bfloat16_without_allocating():
    """The official configuration's whole denoising loop (25 steps, one 24-frame window at 512², CFG pair)
    traces and lowers to StableHLO on abstract weights, in bfloat16."""
    bundle = M.abstract("official", dtype="bfloat16")
    text = sampling.Sampler(bundle).lower_denoise(sampling.WindowPlan(24), 25).as_text()
    assert "tensor<24x64x64x4xf32>" in text          # the latents stay float32
    assert "tensor<2x24x64x64x4xbf16>" in text or "tensor<48x64x64x4xbf16>" in text  # CFG pair in bf16


@pytest.fixture(scope="module")
def release(tmp_path_factory, optimized_xla):
    folder = str(tmp_path_factory.mktemp("xnemo_release"))
    write_tiny_release(folder)
    return folder


@pytest.fixture(scope="module")
def inputs(release):
    bundle = convert.load_official(release)
    cfg = bundle.config
    rng = np.random.default_rng(0)
    s, r, h = cfg.motion_encoder.image_size, cfg.resolution, cfg.latent_size
    return dict(bundle=bundle, reference=rng.integers(0, 256, (r, r, 3), dtype=np.uint8),
                pose=rng.integers(0, 256, (s, s, 3), dtype=np.uint8),
                driving=rng.integers(0, 256, (FRAMES, s, s, 3), dtype=np.uint8),
                noise=rng.standard_normal((FRAMES, h, h, 4)).astype(np.float32))


def _nchw(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x)).float()
    t = t / 127.5 - 1 if x.dtype == np.uint8 else t
    return t.permute(0, 3, 1, 2) if t.ndim == 4 else t.permute(2, 0, 1)[None]


def test_sampling_loop_matches_the_official_loop(release, inputs):
    import xnemo_torch_pipeline as T

    bundle = inputs["bundle"]
    clip_pixels = clip.preprocess(inputs["reference"], bundle.config.image_encoder.image_size)[0]
    sampler = sampling.Sampler(bundle, motion_batch=16)
    calls = []
    ours = sampling.sample_latents(bundle, inputs["reference"], inputs["driving"], steps=STEPS, guidance=GUIDANCE,
                                   context_frames=CONTEXT, context_overlap=OVERLAP, window_batch=3,
                                   window_offsets=OFFSETS, noise=inputs["noise"], reference_pose=inputs["pose"],
                                   clip_pixels=clip_pixels, sampler=sampler, progress=calls.append)
    assert calls == list(range(STEPS))
    models = T.load_release(release, bundle.config.motion_encoder)
    theirs = T.official_sample(models, reference=_nchw(inputs["reference"]), clip_pixels=_nchw(clip_pixels),
                               pose=_nchw(inputs["pose"]), driving=_nchw(inputs["driving"]),
                               noise=torch.from_numpy(inputs["noise"]).permute(3, 0, 1, 2)[None], offsets=OFFSETS,
                               steps=STEPS, guidance=GUIDANCE, context_frames=CONTEXT, context_overlap=OVERLAP)
    theirs = theirs[0].permute(1, 2, 3, 0).numpy()  # (4, N, h, w) -> (N, h, w, 4)
    err = float(np.abs(np.asarray(ours) - theirs).max())
    print(f"final latents: max abs error {err:.2e} (scale {np.abs(theirs).max():.2f})")
    assert err <= 1e-4
    # decoding in chunks of 25 (+ the remaining 5), as the official
    frames = np.concatenate(list(sampler.decode(jnp.asarray(theirs), 25)))
    official = T.official_decode(models["vae"], torch.from_numpy(theirs).permute(3, 0, 1, 2)[None], 25)
    derr = float(np.abs((frames + 1) / 2 - official.permute(0, 2, 3, 1).numpy()).max())
    print(f"decoded frames: max abs error {derr:.2e}")
    assert frames.shape == (FRAMES, 64, 64, 3) and derr <= 1e-4
    # the seed decides the noise and the offsets; explicit ones replay a run
    again = sampling.sample_latents(bundle, inputs["reference"], None, motion=sampler.motion(inputs["driving"]),
                                    steps=STEPS, guidance=GUIDANCE, context_frames=CONTEXT, context_overlap=OVERLAP,
                                    window_batch=3, window_offsets=OFFSETS, noise=inputs["noise"],
                                    reference_pose=inputs["pose"], clip_pixels=clip_pixels, sampler=sampler)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(ours))
