"""tf2torch into torch models torch.fx cannot trace: the dataflow of one recorded run decides.

keras.applications-built models (``fixtures/realarch/models.py``, random weights) into their
torch twins behind a forward that branches on the data, so that fx gives up. Before the
recorded run, such a ResNet was matched by execution order and written with the shortcut's
BatchNorm and ``bn3`` swapped (exit 0, logits off by more than their own size); a VGG was
refused. Now each is exact, or refused where the run cannot see what decides.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from ckptfmt.errors import ConversionError  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.tensorflow]

HERE = os.path.abspath(__file__)
MODELS = str(Path(__file__).resolve().parents[2] / "fixtures" / "realarch" / "models.py")
_spec = importlib.util.spec_from_file_location("_realarch_models_recorded", MODELS)
ra = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ra)


# -- torch twins fx cannot trace (loaded by the converter as HERE:factory) ---------------------


class _Guard(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        if torch.isnan(x).any():  # data-dependent control flow: torch.fx cannot trace this
            raise ValueError("NaN in the input")
        return self.net(x)


class _VGGChannelsLast(ra.VGG):
    """Flattens in Keras's own (H, W, C) order: the rows must not be permuted."""

    def forward(self, x):
        x = self.avgpool(self.pool(self.features(x)))
        assert x.shape[1] == 16, "16 channels"
        return self.classifier(x.permute(0, 2, 3, 1).flatten(1))


class _VGGNumpy(ra.VGG):
    """Flattens through numpy, where no hook or torch function sees the order."""

    def forward(self, x):
        x = self.avgpool(self.pool(self.features(x)))
        if x.sum() > 1e30:
            x = x * 0
        return self.classifier(torch.from_numpy(x.numpy().reshape(x.shape[0], -1)))


class _VGGSkipping(ra.VGG):
    """Runs its layers only on inputs the example input (zeros) is not."""

    def forward(self, x):
        if x.abs().sum() == 0:
            return torch.zeros(x.shape[0], ra.CLASSES)
        x = self.avgpool(self.pool(self.features(x)))
        return self.classifier(torch.flatten(x, 1))


def resnet():
    return _Guard(ra.ResNet()), ra._example()


def vgg():
    return _Guard(ra.VGG()), ra._example()


def vgg_channels_last():
    return _VGGChannelsLast(), ra._example()


def vgg_numpy():
    return _VGGNumpy(), ra._example()


def vgg_skipping():
    return _VGGSkipping(), ra._example()


def _iadd(f):
    f += 0
    return f


# one op between the flatten and fc1 (reviewer's cases): each keeps the flattened map's order ...
_KEEPING_HEADS = {
    "float": lambda x: torch.flatten(x, 1).float(),
    "to": lambda x: torch.flatten(x, 1).to(torch.float32),
    "full_slice": lambda x: x.view(x.size(0), -1)[:, :],
    "detach": lambda x: torch.flatten(x, 1).detach(),
    "squeeze": lambda x: torch.flatten(x, 1).squeeze(),  # a batch of 2: nothing to squeeze
    "iadd": lambda x: _iadd(torch.flatten(x, 1)),
    "mul_": lambda x: torch.flatten(x, 1).mul_(1),
}
# ... or is one the converter cannot relate to Keras's order (here it happens to change no value)
_REFUSED_HEADS = {"normalize": lambda x: nn.functional.normalize(torch.flatten(x, 1), dim=1) * torch.flatten(x, 1).norm(dim=1, keepdim=True)}


class _VGGHead(ra.VGG):
    def __init__(self, op: str, recorded: bool) -> None:
        super().__init__()
        self.op, self.recorded = op, recorded

    def forward(self, x):
        if self.recorded and torch.isnan(x).any():  # data-dependent: fx cannot trace it
            raise ValueError("NaN in the input")
        x = self.avgpool(self.pool(self.features(x)))
        return self.classifier({**_KEEPING_HEADS, **_REFUSED_HEADS}[self.op](x))


def _head_factory(op: str, recorded: bool):
    return lambda: (_VGGHead(op, recorded), ra._example())


for _op in [*_KEEPING_HEADS, *_REFUSED_HEADS]:
    for _rec in (False, True):
        globals()[f"vgg_head_{_op}_{'recorded' if _rec else 'fx'}"] = _head_factory(_op, _rec)


def vgg_instance_forward():
    """A forward set on the instance (a monkeypatch, accelerate's hooks) flattening channels-last:
    fx would trace the class's channels-first forward and permute fc1's rows."""
    import types

    model = ra.VGG()

    def forward(self, x):
        x = self.avgpool(self.pool(self.features(x)))
        return self.classifier(x.permute(0, 2, 3, 1).contiguous().view(x.size(0), -1))

    model.forward = types.MethodType(forward, model)
    return model, ra._example()


# -- the Keras side ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Per architecture: a keras.applications-built model with random weights, its TF checkpoint, its logits."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    tf = pytest.importorskip("tensorflow")
    pytest.importorskip("keras")
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            km = getattr(ra, f"keras_{name}")()
            rng = np.random.default_rng(0)
            for v in km.weights:  # random statistics too: at their initial values a swap would not show
                a = rng.standard_normal(v.shape).astype("float32") * 0.3
                v.assign(np.abs(a) + 0.5 if "variance" in v.path else a)
            prefix = tf.train.Checkpoint(model=km).write(str(tmp_path_factory.mktemp(name) / "ckpt"))
            x = rng.standard_normal((3, ra.SIZE, ra.SIZE, 3)).astype("float32")
            cache[name] = dict(prefix=prefix, x=x, logits=km(x, training=False).numpy())
        return cache[name]

    return get


def _convert(run, out, factory, keras_name=None):
    from ckptfmt.converters.convert import tf_to_torch

    return tf_to_torch(run["prefix"], out, model_factory=f"{HERE}:{factory}", optimizer=False,
                       keras_model=f"{MODELS}:keras_{keras_name}" if keras_name else None)


def _max_error(run, out, factory) -> float:
    model = globals()[factory]()[0]
    model.load_state_dict(torch.load(out, weights_only=True)["model"])
    model.eval()
    with torch.no_grad():
        got = model(torch.from_numpy(np.ascontiguousarray(run["x"].transpose(0, 3, 1, 2)))).numpy()
    return float(np.abs(got - run["logits"]).max() / max(np.abs(run["logits"]).max(), 1.0))


def test_resnet_shortcuts_are_matched_from_the_recorded_run(checkpoints, tmp_path):
    run = checkpoints("resnet")
    with pytest.raises(ConversionError, match="cannot trace"):
        from ckptfmt.converters.mapping._dataflow import TorchDataflow

        TorchDataflow.trace(*resnet())
    r = _convert(run, tmp_path / "r.pt", "resnet", "resnet")
    assert _max_error(run, tmp_path / "r.pt", "resnet") <= 1e-5
    assert any(n.startswith("DATAFLOW recorded") for n in r.notes)
    assert not any("UNVERIFIED" in n for n in r.notes)
    # without the Keras graph the shortcut BN and bn3 are told apart by nothing: refused, never ordered
    with pytest.raises(ConversionError, match="parallel branches") as e:
        _convert(run, tmp_path / "s.pt", "resnet")
    assert "conv2_block1_0_bn" in str(e.value) and "net.layer1.0.downsample.1" in str(e.value)
    assert not (tmp_path / "s.pt").exists()


@pytest.mark.parametrize("factory, permuted", [("vgg", True), ("vgg_channels_last", False)])
def test_vgg_flatten_order_comes_from_the_recorded_run(checkpoints, tmp_path, factory, permuted):
    run = checkpoints("vgg")
    r = _convert(run, tmp_path / "v.pt", factory, "vgg")
    assert _max_error(run, tmp_path / "v.pt", factory) <= 1e-5
    assert any(n.startswith("Flatten:") and "fc1" in n for n in r.notes) == permuted


@pytest.mark.parametrize("factory, why", [("vgg_numpy", r"Dense 'fc1' -> Linear classifier\.0: .*numpy.*--map"),
                                          ("vgg_skipping", r"Dense 'fc1' -> Linear classifier\.0: .*did not call.*--map")])
def test_what_the_recorded_run_cannot_see_is_refused(checkpoints, tmp_path, factory, why):
    run = checkpoints("vgg")
    with pytest.raises(ConversionError, match=why):
        _convert(run, tmp_path / "v.pt", factory, "vgg")
    assert not (tmp_path / "v.pt").exists()


@pytest.mark.parametrize("path", ["fx", "recorded"])
@pytest.mark.parametrize("op", list(_KEEPING_HEADS))
def test_ops_between_the_flatten_and_the_linear_that_keep_its_order(checkpoints, tmp_path, op, path):
    run, factory = checkpoints("vgg"), f"vgg_head_{op}_{path}"
    r = _convert(run, tmp_path / "v.pt", factory, "vgg")
    assert _max_error(run, tmp_path / "v.pt", factory) <= 1e-5
    assert any(n.startswith("DATAFLOW recorded") for n in r.notes) == (path == "recorded")


@pytest.mark.parametrize("path", ["fx", "recorded"])
@pytest.mark.parametrize("keras_name", [None, "vgg"])
def test_an_op_between_the_flatten_and_the_linear_the_converter_cannot_follow_is_refused(checkpoints, tmp_path, path, keras_name):
    run = checkpoints("vgg")
    with pytest.raises(ConversionError, match=r"Dense 'fc1' -> Linear classifier\.0: .*normalize.*--map"):
        _convert(run, tmp_path / "v.pt", f"vgg_head_normalize_{path}", keras_name)
    assert not (tmp_path / "v.pt").exists()


def test_a_forward_set_on_the_instance_is_what_decides(checkpoints, tmp_path):
    run = checkpoints("vgg")
    r = _convert(run, tmp_path / "v.pt", "vgg_instance_forward", "vgg")
    assert _max_error(run, tmp_path / "v.pt", "vgg_instance_forward") <= 1e-5
    assert any(n.startswith("DATAFLOW recorded") and "instance" in n for n in r.notes)
    assert not any(n.startswith("Flatten:") for n in r.notes)  # channels-last: fc1 is not permuted
