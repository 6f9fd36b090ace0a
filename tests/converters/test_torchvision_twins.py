"""The torch twins of ``fixtures/realarch/models.py`` against torchvision's own definitions.

The real-architecture tests convert into torch twins written in torchvision's layout, with
Keras's numerics where torchvision differs. Here each twin is compared with the model
torchvision itself builds, configured through torchvision's own constructor arguments to the
twin's reduced size, with only the twin's documented differences applied to it (attribute
changes: BatchNorm eps/momentum, conv biases, v1 strides, TF padding; and, where torchvision
hard-codes widths, the reduced classifier). Asserted: the same ``state_dict`` keys in the same
order (the optimizer's parameter order) with the same shapes, and, with identical weights,
bit-identical outputs in eval mode. So "torchvision's layout" is checked against torchvision,
not against our reading of it.

torchvision is installed ``--no-deps`` (see the README's test command); its registry wheel
registers C++ operators a CPU torch build lacks, so the two registration modules (used by
``torchvision.ops`` kernels, not by these models) are stubbed before it is imported.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import types
from pathlib import Path

import pytest

pytestmark = pytest.mark.torch

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "fixtures" / "realarch" / "models.py"


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tv(torch):
    for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
        sys.modules.setdefault(name, types.ModuleType(name))
    return pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def twins(torch):
    spec = importlib.util.spec_from_file_location("_realarch_twins", MODELS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _batchnorms(model, torch, eps, momentum):
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eps, m.momentum = eps, momentum


def _densenet(tv, torch, twins):
    ref = tv.models.DenseNet(growth_rate=32, block_config=twins.DENSENET_BLOCKS, num_init_features=64, bn_size=4,
                             num_classes=twins.CLASSES)
    _batchnorms(ref, torch, 1.001e-5, 0.01)  # keras.applications' DenseNet
    return twins.DenseNet(), ref


def _resnet(tv, torch, twins, bias=True):
    """torchvision's Bottleneck ResNet at its own widths (64..512), one or two blocks a stage."""
    from torchvision.models.resnet import Bottleneck

    layers = (2, 1, 1, 1)
    stages = tuple((64 * 2 ** i, n, 1 if i == 0 else 2) for i, n in enumerate(layers))
    twin = twins.ResNet(stages=stages)
    ref = tv.models.ResNet(Bottleneck, list(layers), num_classes=twins.CLASSES)
    _batchnorms(ref, torch, 1.001e-5, 0.01)
    for m in ref.modules():
        if isinstance(m, Bottleneck) and m.stride != 1:  # v1 (Keras): the stride on the first 1x1, not the 3x3
            m.conv1.stride, m.conv2.stride = m.conv2.stride, (1, 1)
    convs = [m for m in (twin if not bias else ref).modules() if isinstance(m, torch.nn.Conv2d)]
    for m in convs:
        if bias:  # keras.applications' ResNet convs have biases; torchvision's have none
            m.bias = torch.nn.Parameter(torch.zeros(m.out_channels))
        else:  # the twin's resnet_no_bias: torchvision's own bias-free convs
            m.bias = None
    return twin, ref


def _mobilenet(tv, torch, twins):
    ref = tv.models.MobileNetV2(num_classes=twins.CLASSES, width_mult=twins.MOBILENET_ALPHA)
    _batchnorms(ref, torch, 1e-3, 0.001)  # keras.applications' MobileNetV2
    for m in ref.modules():
        if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2):  # TF's 'same' padding: bottom/right only
            m.padding = (0, 0)
            m.__class__ = twins._TFConv
    return twins.MobileNetV2(), ref


def _convnext(tv, torch, twins):
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    ref = ConvNeXt([CNBlockConfig(twins.CONVNEXT_DIM, None, twins.CONVNEXT_BLOCKS)], num_classes=twins.CLASSES)
    return twins.ConvNeXt(), ref


def _vgg(tv, torch, twins):
    from torchvision.models.vgg import VGG, make_layers

    # the twin's two blocks and its extra pool (keras_vgg's block3_pool) as a torchvision cfg
    ref = VGG(make_layers([8, 8, "M", 16, 16, "M", "M"]), num_classes=twins.CLASSES, init_weights=False)
    twin = twins.VGG()
    # torchvision hard-codes the head for 224 px (7x7 pooling, 4096 wide): the twin's reduced
    # sizes, in torchvision's own modules and places (Linear, ReLU, Dropout, ...)
    ref.avgpool = torch.nn.AdaptiveAvgPool2d(twin.avgpool.output_size)
    for i in (0, 3, 6):
        ref.classifier[i] = torch.nn.Linear(twin.classifier[i].in_features, twin.classifier[i].out_features)
    return twin, ref


CASES = {
    "densenet": _densenet,
    "resnet": _resnet,
    "resnet_no_bias": lambda tv, torch, twins: _resnet(tv, torch, twins, bias=False),
    "mobilenet": _mobilenet,
    "convnext": _convnext,
    "vgg": _vgg,
}


@pytest.mark.parametrize("name", CASES)
def test_twin_is_torchvisions_model(name, tv, torch, twins):
    twin, ref = CASES[name](tv, torch, twins)
    layout = [(k, tuple(v.shape)) for k, v in twin.state_dict().items()]
    assert layout == [(k, tuple(v.shape)) for k, v in ref.state_dict().items()]
    assert [n for n, _ in twin.named_parameters()] == [n for n, _ in ref.named_parameters()]

    x = _same_weights(torch, twins, twin, ref)
    with torch.no_grad():
        a, b = twin(x), ref(x)
    assert a.shape == (2, twins.CLASSES) and float((a[0] - a[1]).abs().max()) > 1e-3  # the outputs depend on the input
    assert torch.equal(a, b), float((a - b).abs().max())


def _same_weights(torch, twins, twin, *others):
    """The twin's initialization with random BatchNorm affines and statistics measured on
    random batches (so the signal survives the depth), loaded into every model, all in eval
    mode; returns an input batch."""
    gen = torch.Generator().manual_seed(0)
    norms = [m for m in twin.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for m in norms:
            m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
            m.reset_running_stats()
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.momentum = None  # a cumulative average over the batches below
        twin.train()
        for _ in range(2):
            twin(torch.randn(8, 3, twins.SIZE, twins.SIZE, generator=gen))
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
    state = twin.state_dict()
    for model in (twin, *others):
        model.load_state_dict(state)
        model.eval()
    return torch.randn(2, 3, twins.SIZE, twins.SIZE, generator=gen)


def test_the_documented_differences_matter(tv, torch, twins):
    """Without the twin's Keras numerics, torchvision's ResNet and MobileNetV2 compute
    something else: the differences applied above are real, not noise."""
    for make, undo in ((_resnet, "stride"), (_mobilenet, "padding")):
        twin, ref = make(tv, torch, twins)
        plain = copy.deepcopy(ref)
        for m in plain.modules():
            if undo == "stride" and type(m).__name__ == "Bottleneck" and m.conv1.stride != (1, 1):
                m.conv1.stride, m.conv2.stride = (1, 1), m.conv1.stride
            if undo == "padding" and isinstance(m, twins._TFConv):
                m.__class__, m.padding = torch.nn.Conv2d, (1, 1)
        x = _same_weights(torch, twins, twin, ref, plain)
        with torch.no_grad():
            assert torch.equal(twin(x), ref(x))
            assert float((twin(x) - plain(x)).abs().max()) > 1e-4
