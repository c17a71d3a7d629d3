"""Test setup: 8 fake CPU devices (set before JAX starts), quiet TensorFlow, shared fixtures."""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests are compile-bound on the 2-core CPU: skip XLA's expensive backend passes (about 40 % less compile
# time, programs run up to 2x slower; numerics are the same programs). Inherited by the CLI subprocesses.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="module")
def float64_parity():
    """float64 JAX and single-threaded torch for a parity-test module (restored afterwards)."""
    import jax
    import torch

    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    jax.config.update("jax_enable_x64", previous)
    torch.set_num_threads(torch_threads)


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    """scikit-image's public-domain astronaut photo (512x512 RGB, one face)."""
    import skimage.data

    return skimage.data.astronaut()


@pytest.fixture(scope="session")
def detector():
    from input_pipeline.face_detection import FaceDetector

    return FaceDetector("short")


def moving_photo_frames(image: np.ndarray, num_frames: int, size: int = 384,
                        step: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A 'video' made by sliding a ``size`` window over a photo: frames and the window offsets (x, y)."""
    frames, offsets = [], []
    for t in range(num_frames):
        x, y = 40 + step * t, 40 + (step // 2) * t
        frames.append(image[y:y + size, x:x + size])
        offsets.append((x, y))
    return np.stack(frames), np.array(offsets, np.float32)


@pytest.fixture(scope="module")
def optimized_xla():
    """Full XLA optimisation for a module whose programs run many times (execution-bound: the X-NeMo
    sampling loops run about 3x faster for about 2x their O0 compile time); restored afterwards."""
    import jax

    previous = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


# The longest modules first, so that a parallel run (README: ``pytest -n 2 --dist loadfile
# --no-loadscope-reorder``; xdist would otherwise order files by test count) starts them
# at once instead of ending with one worker alone on them (within a module the order is unchanged).
SLOW_MODULES = ("test_train.py", "test_train_sharding.py", "test_xnemo_training.py", "test_liax_parity.py",
                "test_xnemo_animate.py", "test_sampling.py", "test_animate.py", "test_model.py", "test_denoiser.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
