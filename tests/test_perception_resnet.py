"""perception/resnet.py against a small torch reference written here from perception_nets.md §1-2.

The reference (``TorchResNet``) is torchvision's Bottleneck ResNet (stride on conv2, stem max-pool 3/2/p1)
or cydonia999's VGGFace2 ResNet (stride on conv1, stem max-pool 3/2/p0 ``ceil_mode=True``), with the same
module names, at width 8 with layers (1, 2, 1, 1) and random weights and BatchNorm statistics. (torchvision
itself is not installed here; the reference follows its ``resnet.py`` line for line. The head is
``AdaptiveAvgPool2d(1)``: cydonia's ``AvgPool2d(7)`` is the same at 224², the only size it supports.)

Parity, float32 both sides, ``jax_default_matmul_precision="highest"``: logits, pooled features and the
five feature maps in eval mode at 64² (even stem map: the ceil-mode max-pool needs its extra -inf column)
and 57² (odd), and the train-mode output plus the updated running statistics. Tolerance: max-abs error
<= 1e-4 x max(1, the reference's max-abs magnitude). Measured (CPU): eval mode <= 4.8e-7 on maps of magnitude
~2-3 and <= 5e-8 on logits; train mode 1.3e-6 on logits (~0.8), 2.3e-5 on layer4 (~5: batch statistics of 3
images at 2x2 amplify rounding), running statistics < 1e-6 (``pytest -s`` prints the figures).
"""

import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from torch import nn

from conftest import ROOT
from perception import resnet
from perception.resnet import ResNet, ResNetConfig

KEYS_FILE = os.path.join(ROOT, "..", "shared", "reference", "perception_nets_keys.txt")
REL_TOL = 1e-4
LAYERS, WIDTH, CLASSES = (1, 2, 1, 1), 8, 5


# ------------------------------------------------------------------------------------ torch reference
class TorchBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride, layout):
        super().__init__()
        s1, s2 = (stride, 1) if layout == "vggface2" else (1, stride)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=s1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=s2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class TorchResNet(nn.Module):
    def __init__(self, layout, layers=LAYERS, width=WIDTH, num_classes=CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = (nn.MaxPool2d(3, stride=2, padding=0, ceil_mode=True) if layout == "vggface2"
                        else nn.MaxPool2d(3, stride=2, padding=1))
        inplanes = width
        for i, blocks in enumerate(layers):
            planes = width * 2 ** i
            stage = []
            for b in range(blocks):
                stage.append(TorchBottleneck(inplanes, planes, 2 if i > 0 and b == 0 else 1, layout))
                inplanes = planes * 4
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes) if num_classes else None

    def forward(self, x):
        h = self.relu(self.bn1(self.conv1(x)))
        maps = [h]
        h = self.maxpool(h)
        for i in range(4):
            h = getattr(self, f"layer{i + 1}")(h)
            maps.append(h)
        pooled = torch.flatten(self.avgpool(h), 1)
        return (pooled if self.fc is None else self.fc(pooled)), pooled, maps


def _randomized(layout, seed=0, **kw):
    torch.manual_seed(seed)
    model = TorchResNet(layout, **kw)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.8, 1.2)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _config(layout, num_classes=CLASSES):
    return ResNetConfig(layout=layout, layers=LAYERS, width=WIDTH, num_classes=num_classes)


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _check(name, ours, ref, figures):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
    err, scale = float(np.abs(ours - ref).max()), float(np.abs(ref).max())
    figures[name] = (err, scale)
    assert err <= REL_TOL * max(scale, 1.0), (name, err, scale)


@pytest.fixture(scope="module")
def torch_models():
    return {layout: _randomized(layout, seed=i) for i, layout in enumerate(resnet.LAYOUTS)}


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


# ------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("layout", resnet.LAYOUTS)
def test_eval_parity_odd_and_even_inputs(torch_models, layout):
    ref = torch_models[layout]
    model = resnet.from_torch(ref.state_dict(), _config(layout))
    forward = nnx.jit(lambda m, x: m(x, return_features=True))
    rng = np.random.default_rng(0)
    figures = {}
    for size in (64, 57):
        x = rng.standard_normal((2, 3, size, size)).astype(np.float32)
        with torch.no_grad():
            logits, pooled, maps = ref(torch.from_numpy(x))
        out, features = forward(model, jnp.asarray(x.transpose(0, 2, 3, 1)))
        assert out.shape == (2, CLASSES) and out.dtype == jnp.float32
        _check(f"{size} logits", out, logits.numpy(), figures)
        for i, (f, r) in enumerate(zip(features, maps, strict=True)):
            _check(f"{size} map{i}", f, _nhwc(r), figures)
        # num_classes=0: the pooled features (same weights without fc)
        sd = {k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
        feat = resnet.from_torch(sd, _config(layout, 0))(jnp.asarray(x.transpose(0, 2, 3, 1)))
        assert feat.shape == (2, _config(layout).feature_dim)
        _check(f"{size} pooled", feat, pooled.numpy(), figures)
    print(layout, {k: f"{e:.1e} (max {s:.2g})" for k, (e, s) in figures.items()})
    # the layouts really differ (the naive-converter trap of perception_nets.md §2.1)
    other = "torchvision" if layout == "vggface2" else "vggface2"
    wrong = resnet.from_torch(ref.state_dict(), _config(other))(jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert float(jnp.abs(wrong - jnp.asarray(logits.numpy())).max()) > 100 * REL_TOL * float(logits.abs().max())


@pytest.mark.parametrize("layout", resnet.LAYOUTS)
def test_train_mode_batch_stats_and_running_update(layout):
    ref = _randomized(layout, seed=7)
    model = resnet.from_torch(ref.state_dict(), _config(layout))
    x = np.random.default_rng(1).standard_normal((3, 3, 48, 48)).astype(np.float32)
    ref.train()
    with torch.no_grad():
        logits, _, maps = ref(torch.from_numpy(x))
    out, features = nnx.jit(lambda m, x: m(x, train=True, return_features=True))(
        model, jnp.asarray(x.transpose(0, 2, 3, 1)))
    figures = {}
    _check("train logits", out, logits.numpy(), figures)
    _check("train layer4", features[-1], _nhwc(maps[-1]), figures)
    after = resnet.to_torch(model)
    for key, value in ref.state_dict().items():
        if "running" in key:
            _check(key, after[key], value.numpy(), figures)
    moved = ref.state_dict()["layer2.0.bn1.running_var"].numpy()
    assert not np.allclose(moved, _randomized(layout, seed=7).state_dict()["layer2.0.bn1.running_var"].numpy())
    print(layout, {k: f"{e:.1e} (max {s:.2g})" for k, (e, s) in figures.items() if e > 1e-6})


@pytest.mark.parametrize("k,s,p,ceil", [(3, 2, 1, False), (3, 2, 0, True), (2, 2, 1, True), (3, 3, 1, True),
                                        (2, 2, 0, False)])
def test_max_pool_matches_torch(k, s, p, ceil):
    for n in range(4, 12):
        x = np.random.default_rng(n).standard_normal((1, 2, n, n + 1)).astype(np.float32)
        ref = torch.nn.functional.max_pool2d(torch.from_numpy(x), k, s, p, ceil_mode=ceil)
        ours = resnet.max_pool2d(jnp.asarray(x.transpose(0, 2, 3, 1)), k, s, p, ceil_mode=ceil)
        np.testing.assert_array_equal(np.asarray(ours), _nhwc(ref), err_msg=f"n={n}")


def test_functional_train_step_gradients_and_stats(torch_models):
    """The DESIGN pattern: split Param / BatchStat, plain jax.jit + grad, the new statistics returned."""
    ref = torch_models["vggface2"]
    graphdef, params, stats = nnx.split(resnet.from_torch(ref.state_dict(), _config("vggface2")), nnx.Param, ...)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 40, 40, 3)), jnp.float32)

    @jax.jit
    def step(params, stats, x):
        def loss(params, stats, x):
            model = nnx.merge(graphdef, params, stats, copy=True)
            out, maps = model(x, train=True, return_features=True)
            return jnp.mean(out ** 2) + jnp.mean(maps[1]), nnx.state(model, nnx.BatchStat)
        return jax.value_and_grad(loss, argnums=(0, 2), has_aux=True)(params, stats, x)

    (_, new_stats), (g_params, g_x) = step(params, stats, x)
    grads = jax.tree.leaves(g_params)
    assert all(bool(jnp.isfinite(g).all()) for g in grads) and float(jnp.abs(g_x).max()) > 0
    assert float(jnp.abs(g_params["conv1"]["weight"][...]).max()) > 0  # through the ceil-mode max-pool
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(new_stats),
                                                         strict=True))


def test_reduced_precision_runs():
    model = nnx.jit(lambda: ResNet(ResNetConfig.preset("tiny", dtype="bfloat16", num_classes=3), rngs=nnx.Rngs(0)))()
    out, maps = nnx.jit(lambda m, x: m(x, return_features=True))(model, jnp.zeros((1, 32, 32, 3)))
    assert out.dtype == jnp.bfloat16 and out.shape == (1, 3) and all(m.dtype == jnp.bfloat16 for m in maps)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


# ---------------------------------------------------------------------------------------- conversion
def test_round_trip_is_bit_exact_and_loads_back_into_torch(torch_models):
    ref = torch_models["vggface2"]
    sd = ref.state_dict()
    assert any(k.endswith("num_batches_tracked") for k in sd)
    back = resnet.to_torch(resnet.from_torch(sd, _config("vggface2")))
    expected = {k: v.numpy() for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert back.keys() == expected.keys()
    for k, v in expected.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    # numpy input (as the pickle holds) gives the same; torch accepts the dict strictly (num_batches_tracked 0)
    again = resnet.to_torch(resnet.from_torch(expected, _config("vggface2")))
    assert all(np.array_equal(again[k], v) for k, v in expected.items())
    fresh = TorchResNet("vggface2")
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_conversion_errors_name_the_keys(torch_models):
    sd = {k: v.numpy() for k, v in torch_models["torchvision"].state_dict().items()}
    cfg = _config("torchvision")
    with pytest.raises(ValueError, match=r"missing key\(s\) 'layer2\.1\.conv1\.weight'"):
        resnet.from_torch({k: v for k, v in sd.items() if k != "layer2.1.conv1.weight"}, cfg)
    with pytest.raises(ValueError, match=r"unexpected key\(s\) 'extra\.weight'"):
        resnet.from_torch({**sd, "extra.weight": np.zeros(3)}, cfg)
    with pytest.raises(ValueError, match=r"key 'fc\.bias' has shape \(5,\), expected \(7,\)"):
        resnet.from_torch(sd, _config("torchvision", 7))
    with pytest.raises(ValueError, match=r"found 'module\.bn1\.bias': strip the prefix"):
        resnet.from_torch({"module." + k: v for k, v in sd.items()}, cfg)


def test_full_size_keys_shapes_and_parameter_counts():
    for name, section, params in (("resnet50", "tv_resnet50", 25_557_032), ("vggface2", "vggface2_resnet50",
                                                                            41_192_951)):
        cfg = ResNetConfig.preset(name)
        assert resnet.count_params(cfg) == params, name
        assert cfg.feature_dim == 2048
        shapes = resnet.torch_shapes(cfg)
        assert len(shapes) == 267  # 320 model state-dict entries - 53 num_batches_tracked
        assert shapes["layer2.0.conv2.weight"] == (128, 128, 3, 3) and shapes["fc.weight"] == (cfg.num_classes, 2048)
        if os.path.exists(KEYS_FILE):
            ref = _keys_section(section)
            assert {k: v for k, v in ref.items() if not k.endswith("num_batches_tracked")} == shapes, name
    tiny = ResNetConfig.preset("tiny")
    assert resnet.count_params(tiny) == resnet.count_params(ResNetConfig.preset("tiny_vggface2"))
    assert tiny.num_classes == 0 and tiny.feature_dim == 256


def _keys_section(section):
    out, inside = {}, False
    with open(KEYS_FILE) as f:
        for line in f:
            if line.startswith("######## "):
                inside = line.split()[1] == section
            elif inside and not line.startswith("#") and line.strip():
                key, shape = line.split("\t")[:2]
                out[key] = tuple(int(d) for d in shape.strip().strip("()").split(",") if d.strip())
    return out


def test_config_validation_and_presets():
    assert ResNetConfig() == ResNetConfig.preset("resnet50")
    cfg = ResNetConfig.preset("vggface2", num_classes=0)
    assert (cfg.layout, cfg.layers, cfg.width, cfg.num_classes) == ("vggface2", (3, 4, 6, 3), 64, 0)
    assert ResNetConfig.from_config(cfg.to_dict() | {"layers": [3, 4, 6, 3], "other": 1}) == cfg  # JSON lists
    with pytest.raises(ValueError, match=r"unknown preset 'resnet18' \(known: \['resnet50', 'tiny'"):
        ResNetConfig.preset("resnet18")
    for bad, match in ((dict(layout="caffe"), "layout must be one of"), (dict(layers=(1, 1, 1)), "layers must be 4"),
                       (dict(layers=(1, 0, 1, 1)), "layers must be 4"), (dict(width=0), "width must be"),
                       (dict(num_classes=-1), "num_classes must be"), (dict(dtype="int8"), "dtype must be")):
        with pytest.raises(ValueError, match=match):
            ResNetConfig(**bad)
    with pytest.raises(ValueError, match="expected NHWC"):
        ResNet(ResNetConfig.preset("tiny"), rngs=nnx.Rngs(0))(jnp.zeros((1, 3, 32, 32)))


def test_preprocessing_formulas():
    x = np.random.default_rng(0).uniform(-1, 1, (2, 5, 4, 3)).astype(np.float32)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(np.asarray(resnet.preprocess_imagenet(jnp.asarray(x))),
                               ((x + 1) / 2 - mean) / std, rtol=1e-6, atol=1e-6)
    bgr = (x[..., ::-1].astype(np.float64) + 1) * 127.5 - np.array([91.4953, 103.8827, 131.0912])
    out = resnet.preprocess_vggface2(jnp.asarray(x))
    assert out.shape == x.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), bgr, rtol=1e-6, atol=1e-4)
    # channel 0 of the output is blue: a pure-red image is (-mean_b, -mean_g, 255 - mean_r)
    red = jnp.asarray(np.broadcast_to(np.array([1.0, -1.0, -1.0], np.float32), (1, 1, 1, 3)))
    np.testing.assert_allclose(np.asarray(resnet.preprocess_vggface2(red))[0, 0, 0],
                               [-91.4953, -103.8827, 255 - 131.0912], rtol=1e-6)


# ------------------------------------------------------------------------------------ launch/convert.py
def _tiny_state(layout, num_classes, seed):
    sd = _randomized(layout, seed=seed, layers=(1, 1, 1, 1), num_classes=num_classes).state_dict()
    return {k: v.numpy() for k, v in sd.items()}


def _restored(out, config):
    from launch import checkpointing

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: ResNet(config, rngs=nnx.Rngs(0))))
    info, params = checkpointing.load_params(str(out), nnx.to_pure_dict(abstract))
    nnx.replace_by_pure_dict(abstract, params)
    return info, nnx.merge(graphdef, abstract)


def test_convert_cli_both_subcommands(tmp_path, capsys):
    from launch.convert import main

    # resnet50: a torch state dict (with num_batches_tracked), 6 classes read from fc.weight
    tv = _tiny_state("torchvision", 6, seed=3)
    pth = tmp_path / "resnet50-tiny.pth"
    torch.save({k: torch.from_numpy(v) for k, v in tv.items()}, pth)
    assert main(["resnet50", f"--torch-checkpoint={pth}", f"--output={tmp_path}/tv", "--preset=tiny"]) == 0
    # vggface2: cydonia's format, a protocol-2 pickle of numpy arrays without num_batches_tracked
    vf = {k: v for k, v in _tiny_state("vggface2", 7, seed=4).items() if not k.endswith("num_batches_tracked")}
    pkl = tmp_path / "resnet50_ft_tiny.pkl"
    with open(pkl, "wb") as f:
        pickle.dump(vf, f, protocol=2)
    assert main(["vggface2", f"--torch-checkpoint={pkl}", f"--output={tmp_path}/vf", "--preset=tiny"]) == 0
    capsys.readouterr()
    for out, layout, classes, state, name in (("tv", "torchvision", 6, tv, pth.name),
                                              ("vf", "vggface2", 7, vf, pkl.name)):
        config = ResNetConfig.preset("tiny", layout=layout, num_classes=classes)
        info, model = _restored(tmp_path / out, config)
        assert info["model"] == "resnet" and ResNetConfig.from_config(info["config"]) == config
        assert info["metadata"] == {"source": name}
        back = resnet.to_torch(model)
        expected = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
        assert back.keys() == expected.keys()
        for k, v in expected.items():
            np.testing.assert_array_equal(back[k], v, err_msg=f"{out} {k}")


def test_convert_cli_bad_files(tmp_path, capsys):
    from launch.convert import main

    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"not a pickle")
    assert main(["vggface2", f"--torch-checkpoint={garbage}", f"--output={tmp_path}/a"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {garbage}: not a readable pickle of numpy arrays")
    hostile = tmp_path / "hostile.pkl"
    hostile.write_bytes(pickle.dumps({"conv1.weight": os.system}))  # must not be built, let alone called
    assert main(["vggface2", f"--torch-checkpoint={hostile}", f"--output={tmp_path}/b"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refusing to build" in err[0]
    # a tiny file for the full-size preset: one line naming the file and the first missing keys
    pth = tmp_path / "tiny.pth"
    torch.save({k: torch.from_numpy(v) for k, v in _tiny_state("torchvision", 0, seed=5).items()}, pth)
    assert main(["resnet50", f"--torch-checkpoint={pth}", f"--output={tmp_path}/c"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {pth}: missing key(s) 'layer1.1."), err
    assert not any((tmp_path / d).exists() for d in "abc")
