"""xnemo_jax.motion_encoder: X-NeMo's MotEncoder_withExtra / FAN_SA vs the official architecture.

* size: 61,665,393 learnable parameters (eval_shape, nothing allocated; the torch reference agrees);
* keys: ``official_keys`` of the full-size model == the 407 entries of section [C] of
  ``shared/reference/xnemo_param_keys_full.txt``, shapes included (and the torch reference's
  ``state_dict()`` has the same keys in the same order);
* parity through the real conversion path (torch ``state_dict`` -> ``.pth`` -> weights-only reader ->
  ``from_official``) on the tiny preset with every path active (random zero-init projections, BN running
  statistics and affines, norm affines): fp32 max-abs error <= 1e-4 (measured 3.3e-6 on outputs of max
  magnitude 1.6), float64 relative error <= 1e-8 (measured 5e-15); BatchNorm training mode (batch
  statistics: measured 4e-14; running-stat update: 5e-8 relative, i.e. float32 storage rounding;
  ``num_batches_tracked``) against torch's ``.train()`` (float64);
* ``to_official`` is the bit-exact inverse; missing / unexpected / mis-shaped keys name the key.
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import xnemo_torch_motion_encoder as ref_lib
from flax import nnx

from xnemo_jax import motion_encoder as me
from xnemo_jax.convert import ConversionError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS_FILE = os.path.join(ROOT, "..", "shared", "reference", "xnemo_param_keys_full.txt")
OFFICIAL_PARAMS = 61_665_393
CFG = me.MotionEncoderConfig.tiny()


def _official_section_c() -> dict[str, tuple]:
    assert os.path.exists(KEYS_FILE), (
        f"{os.path.normpath(KEYS_FILE)} not found: the key-coverage test needs the shared reference folder "
        "(shared/) next to the repository clone")
    lines = open(KEYS_FILE).read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("## [C]"))
    out = {}
    for line in lines[start + 1:]:
        if line.startswith("## ["):
            break
        if not line.strip() or line.startswith("#"):
            continue
        key, shape = line.split("\t")
        out[key] = tuple(int(s) for s in re.findall(r"\d+", shape))
    return out


# --------------------------------------------------------------------------------------- size and keys
def test_parameter_count_and_official_keys_of_the_full_model():
    model = me.build(abstract=True, dtype="bfloat16")  # parameters are float32 whatever the compute dtype
    assert me.count_params(model) == OFFICIAL_PARAMS
    official = _official_section_c()
    assert len(official) == 407
    ours = me.official_keys(model)
    assert set(ours) - set(official) == set(), "keys the official checkpoint does not have"
    assert set(official) - set(ours) == set(), "official keys the model lacks"
    assert {k: ours[k] for k in official} == official  # shapes, torch layout
    assert not any("pos_embed.pos_embed" in k for k in ours)  # non-persistent, recomputed
    with torch.device("meta"):
        ref = ref_lib.MotEncoder_withExtra()
    assert sum(p.numel() for p in ref.parameters()) == OFFICIAL_PARAMS
    assert [(k, tuple(v.shape)) for k, v in ref.state_dict().items()] == list(official.items())
    # the whole forward traces at full size, with leading (batch, frame) axes and bf16 compute
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}
    graphdef, state = nnx.split(model)
    out = jax.eval_shape(lambda s, x, f: nnx.merge(graphdef, s)(x, f), state,
                         jax.ShapeDtypeStruct((2, 3, 224, 224, 3), jnp.float32),
                         jax.ShapeDtypeStruct((2, 3, 3), jnp.float32))
    assert out.shape == (2, 3, 32, 16) and out.dtype == jnp.bfloat16
    # and the training path (BatchNorm batch statistics + hourglass dropout) traces too
    out = jax.eval_shape(lambda s, x, f, k: nnx.merge(graphdef, s)(x, f, train=True, dropout_rng=k), state,
                         jax.ShapeDtypeStruct((4, 224, 224, 3), jnp.float32), jax.ShapeDtypeStruct((4, 3), jnp.float32),
                         jax.random.key(0))
    assert out.shape == (4, 32, 16)


def test_position_tables_match_diffusers():
    from diffusers.models.embeddings import get_1d_sincos_pos_embed_from_grid, get_2d_sincos_pos_embed

    table = get_2d_sincos_pos_embed(1024, 28, base_size=28, interpolation_scale=1, output_type="pt")
    np.testing.assert_allclose(me.sincos_2d(1024, 28, 28), table.float().numpy(), atol=1e-7)
    pe = get_1d_sincos_pos_embed_from_grid(16, torch.arange(32), output_type="pt")
    np.testing.assert_allclose(me.token_pe(32, 16)[0], pe.float().numpy(), atol=1e-7)
    # first 8 dims sin, last 8 cos, omega_k = 10000^(-k/8)
    k, pos = np.arange(8), np.arange(32)[:, None]
    np.testing.assert_allclose(me.token_pe(32, 16)[0], np.concatenate(
        [np.sin(pos * 10000.0 ** (-k / 8)), np.cos(pos * 10000.0 ** (-k / 8))], 1), atol=1e-6)


# ------------------------------------------------------------------------------------------- fixtures
def _inputs(n: int, seed: int):
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (n, CFG.image_size, CFG.image_size, 3)).astype(np.float32)
    f_rts = (np.array([0.0, 0.0, 1.0]) + 0.3 * rng.standard_normal((n, 3))).astype(np.float32)  # (dy, dx, s)
    return images, f_rts


def _torch_in(images, f_rts, dtype=torch.float32):
    return torch.from_numpy(images).permute(0, 3, 1, 2).to(dtype), torch.from_numpy(f_rts).to(dtype)


@pytest.fixture(scope="module")
def torch_ref():
    torch.manual_seed(0)
    ref = ref_lib.MotEncoder_withExtra(**ref_lib.tiny_kwargs(CFG))
    ref_lib.randomize_(ref, seed=0)
    ref_lib.calibrate_(ref, *_torch_in(*_inputs(4, seed=1)), seed=0)
    return ref.eval()


@pytest.fixture(scope="module")
def checkpoint(torch_ref, tmp_path_factory):
    """The torch reference saved like ``xnemo_motion_encoder.pth`` (a plain state dict)."""
    path = tmp_path_factory.mktemp("motion_encoder") / "xnemo_motion_encoder.pth"
    torch.save(torch_ref.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def state(checkpoint):
    from liax_jax.convert import read_state_dict  # the project's weights-only .pth reader

    return read_state_dict(checkpoint, wrappers=())


@pytest.fixture(scope="module")
def model32(checkpoint):
    return me.load_official(checkpoint, CFG)


def _abstract_copy(model):
    """An ``nnx.eval_shape``-like copy of ``model`` (shapes only), without re-tracing the initialisers."""
    graphdef, st = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), st))


def _compile(fn, *args):
    """``jax.jit(fn)`` compiled once for ``args`` with LLVM at -O0: the same XLA program (same numerics
    up to instruction selection), compiled in ~4 s instead of ~11 s on a loaded 2-core CPU."""
    return jax.jit(fn).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})


def _apply(model, images, f_rts, dtype):
    """A compiled eval-mode forward of ``model`` for inputs shaped like ``images``/``f_rts``."""
    graphdef, state = nnx.split(model)
    x, f = jnp.asarray(images, dtype), jnp.asarray(f_rts, dtype)
    run = _compile(lambda s, x, f: nnx.merge(graphdef, s)(x, f), state, x, f)
    return lambda x, f: np.asarray(run(state, jnp.asarray(x, dtype), jnp.asarray(f, dtype)))


# -------------------------------------------------------------------------------------------- parity
def test_fp32_parity_through_the_pth_file(torch_ref, model32):
    """fp32: max-abs error 3.3e-6 measured (outputs up to 1.6 in magnitude); bound 1e-4."""
    model = model32
    images, f_rts = _inputs(2, seed=2)
    with torch.no_grad():
        expected = torch_ref(*_torch_in(images, f_rts)).numpy()
    with jax.default_matmul_precision("highest"):
        run = _apply(model, images, f_rts, jnp.float32)
        got = run(images, f_rts)
    assert got.shape == (2, 32, 16) and got.dtype == np.float32
    assert 0.3 < np.abs(expected).max() < 30  # unit-scale outputs, every path active
    err = np.abs(got - expected).max()
    assert err <= 1e-4, err
    # and the bbox branch is live: another f_rts changes the tokens
    with jax.default_matmul_precision("highest"):
        assert np.abs(run(images, f_rts + 1) - got).max() > 1e-3


def test_float64_parity_eval_and_train(torch_ref, checkpoint, float64_parity):
    """float64 (params float32-exact, compute float64): relative error 5e-15 measured in eval mode, 4e-14
    for the train-mode forward (batch statistics); the updated running statistics agree to 5e-8 relative
    (they are stored in float32, like the parameters)."""
    ref64 = ref_lib.MotEncoder_withExtra(**ref_lib.tiny_kwargs(CFG))
    ref64.load_state_dict(torch_ref.state_dict())
    ref64 = ref64.double().eval()
    images, f_rts = _inputs(2, seed=3)
    x, f = _torch_in(images, f_rts, torch.float64)
    model = me.load_official(checkpoint, CFG, dtype=jnp.float64)

    with torch.no_grad():
        expected = ref64(x, f).numpy()
        # training mode: BatchNorm batch statistics + torch's running-stat update (dropout off on both sides)
        ref64.train()
        ref64.model.m0.dropout.eval()
        expected_train = ref64(x, f).numpy()
    graphdef, state = nnx.split(model)

    def both(s, x, f):  # eval and train forwards in one program: one compile
        out = nnx.merge(graphdef, s)(x, f)
        m = nnx.merge(graphdef, s)
        return out, m(x, f, train=True), nnx.state(m)

    x64, f64 = jnp.asarray(images, jnp.float64), jnp.asarray(f_rts, jnp.float64)
    got, got_train, new_state = _compile(both, state, x64, f64)(state, x64, f64)
    got = np.asarray(got)
    rel = np.abs(got - expected).max() / np.abs(expected).max()
    assert rel <= 1e-8, rel
    got_train = np.asarray(got_train)
    assert np.abs(got_train - got).max() > 1e-3  # batch statistics differ from the running ones
    rel = np.abs(got_train - expected_train).max() / np.abs(expected_train).max()
    assert rel <= 1e-8, rel
    nnx.update(model, new_state)
    after = me.to_official(model)
    theirs = {k: v.numpy() for k, v in ref64.state_dict().items()}
    stats = [k for k in theirs if k.endswith(("running_mean", "running_var"))]
    assert len(stats) == 2 * 56
    for key in stats:
        np.testing.assert_allclose(after[key], theirs[key], rtol=2e-7, atol=1e-7, err_msg=key)
    for key in (k for k in theirs if k.endswith("num_batches_tracked")):
        assert after[key].dtype == np.int64 and after[key] == theirs[key], key
    before = torch_ref.state_dict()
    assert after["model.bn1.num_batches_tracked"] == before["model.bn1.num_batches_tracked"].item() + 1
    for key in (k for k in theirs if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))):
        assert np.array_equal(after[key], before[key].numpy()), key  # parameters untouched


# ---------------------------------------------------------------------------------------- conversion
def test_to_official_is_the_exact_inverse(torch_ref, state, model32):
    model = model32
    back = me.to_official(model)
    assert list(back) == list(me.official_keys(model))
    assert set(back) == set(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        assert back[key].tobytes() == value.tobytes(), key
    # an abstract model refilled from it gives the same bytes again
    other = _abstract_copy(model)
    me.from_official(other, back)
    again = me.to_official(other)
    assert all(again[k].tobytes() == v.tobytes() for k, v in back.items())
    # defaults as in torch: unit BatchNorm statistics, pe = the official sincos buffer
    bn = me.to_official(me.BatchNorm2d(8))
    assert (bn["running_var"] == 1).all() and not bn["running_mean"].any() and bn["num_batches_tracked"] == 0
    assert bn["num_batches_tracked"].dtype == np.int64 and (bn["weight"] == 1).all() and not bn["bias"].any()
    np.testing.assert_array_equal(me.token_pe(32, 16), torch_ref.state_dict()["pe"].numpy())


def test_conversion_errors_name_the_key(checkpoint, state, model32):
    abstract = _abstract_copy(model32)
    missing = {k: v for k, v in state.items() if k != "model.m0.b2_plus_1.bn3.running_var"}
    with pytest.raises(ConversionError,
                       match=r"1 parameters not in the checkpoint: model\.m0\.b2_plus_1\.bn3\.running_var"):
        me.from_official(abstract, missing)
    extra = dict(state, **{"model.att_1.pos_embed.pos_embed": np.zeros((1, 100, 64), np.float32)})
    with pytest.raises(ConversionError, match=r"unexpected key 'model\.att_1\.pos_embed\.pos_embed'"):
        me.from_official(abstract, extra)
    bad = dict(state, **{"model.att_2.proj_out.weight": state["model.att_2.proj_out.weight"].T})
    with pytest.raises(ConversionError, match=r"'model\.att_2\.proj_out\.weight' has shape \(16, 64\)"):
        me.from_official(abstract, bad)
    with pytest.raises(ConversionError, match="no such file"):
        me.load_official(checkpoint + ".missing", CFG)
    # the full-size official checkpoint does not fit the tiny preset
    full = {k: np.zeros(s, np.float32) for k, s in _official_section_c().items()}
    with pytest.raises(ConversionError, match="has shape"):
        me.from_official(abstract, full)


def test_config_validation():
    with pytest.raises(ValueError, match="GroupNorm groups"):
        me.MotionEncoderConfig.tiny(norm_groups=12)
    with pytest.raises(ValueError, match="hourglass depth"):
        me.MotionEncoderConfig(image_size=56)
    assert me.MotionEncoderConfig().num_tokens == 32 and me.MotionEncoderConfig().token_grid == 28
    assert CFG.num_tokens == 32 and CFG.token_dim == 16
