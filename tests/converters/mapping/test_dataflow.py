"""The torch dataflow tracer: how a Linear is fed, which modules lie on one path, what is refused."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from ckptfmt.converters.mapping._dataflow import INPUT, TorchDataflow, producers  # noqa: E402
from ckptfmt.errors import ConversionError  # noqa: E402


class _Head(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 2 * 3 if how != "pool" else 4, 5)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        if self.how == "chw":
            return self.fc(x.flatten(1))
        if self.how == "hwc":
            return self.fc(x.permute(0, 2, 3, 1).flatten(1))
        if self.how == "pool":
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
        return self.fc(x.reshape(x.shape[0], 6, 4).transpose(1, 2).reshape(x.shape[0], -1))


@pytest.mark.parametrize("how, flattened, known", [
    ("chw", (2, 3, 4), True),   # channels-first flatten of a 2x3 map: Keras rows are (H, W, C)
    ("hwc", None, True),        # already Keras's order
    ("pool", None, True),       # one position: nothing to permute
    ("odd", None, False),       # a reshape the converter cannot relate to Keras's order
])
def test_linear_input_layout(how, flattened, known):
    flow = TorchDataflow.trace(_Head(how), torch.zeros(1, 3, 2, 3))
    fed = flow.linear_input("fc")
    assert (fed.flattened, fed.known) == (flattened, known), fed


class _Block(nn.Module):
    """A residual block whose shortcut runs after the main branch (as torchvision's Bottleneck)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.a = nn.Conv2d(4, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)
        self.short = nn.Conv2d(4, 4, 1)
        self.relu = nn.ReLU()  # one module called three times: three calls, not one node

    def forward(self, x):
        x = self.relu(self.stem(x))
        return self.relu(self.b(self.relu(self.a(x))) + self.short(x))


def test_parallel_branches_are_not_a_chain():
    flow = TorchDataflow.trace(_Block(), torch.zeros(1, 3, 4, 4))
    assert flow.chain(["stem", "a", "b"])
    assert not flow.chain(["b", "short"])  # execution order says b first; the dataflow does not
    part = {"stem", "a", "b", "short"}
    assert flow.producers("short", part) == {"stem"} and flow.producers("b", part) == {"a"}
    assert flow.producers("stem", part) == {INPUT}


def test_untraceable_model_is_a_conversion_error():
    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x  # data-dependent control flow

    with pytest.raises(ConversionError, match="torch.fx cannot trace"):
        TorchDataflow.trace(Dynamic(), torch.zeros(1, 2))


def test_producers_walk_through_other_layers():
    graph = {"conv": {INPUT}, "relu": {"conv"}, "pool": {"relu"}, "dense": {"pool", "conv"}}
    assert producers(graph, "dense", {"conv", "dense"}) == {"conv"}
    assert producers(graph, "conv", {"conv", "dense"}) == {INPUT}


# -- a recorded run (hooks on the leaf modules, a torch function mode between them) -------------


def _decisions(flow):
    modules = {}
    for _, (m, ps) in flow.calls.items():
        modules.setdefault(m, []).append(sorted(flow.calls[p][0] for p in ps))
    return {k: sorted(v) for k, v in modules.items()}, flow.order, flow.linear_inputs, flow.norm_inputs


@pytest.mark.parametrize("model, x", [(_Head(h), torch.zeros(1, 3, 2, 3)) for h in ("chw", "hwc", "pool", "odd")]
                         + [(_Block(), torch.zeros(1, 3, 4, 4))])
def test_a_recorded_run_decides_as_the_fx_trace(model, x):
    traced, recorded = TorchDataflow.trace(model, x), TorchDataflow.record(model, x)
    assert _decisions(recorded) == _decisions(traced)
    assert traced.recorded is None and recorded.recorded is not None


class _Guarded(nn.Module):
    """fx cannot trace it: its forward branches on the data and asserts on the input's shape."""

    def __init__(self, how: str = "chw") -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 2 * 3, 5)
        self.other = nn.Linear(4 * 2 * 3, 5)

    def forward(self, x):
        assert x.shape[1] == 3, "three channels"
        x = torch.relu(self.bn(self.conv(x)))
        if self.how == "numpy":  # a reshape made where no torch function sees it
            return self.fc(torch.from_numpy(x.numpy().reshape(x.shape[0], -1)))
        if self.how == "as_tensor":  # the same, back through a torch function that takes no tensor
            return self.fc(torch.as_tensor(x.numpy().reshape(x.shape[0], -1)) + 0)
        if x.sum() >= 0:
            return self.fc(x.permute(0, 2, 3, 1).flatten(1) if self.how == "hwc" else x.flatten(1))
        return self.other(x.flatten(1))


@pytest.mark.parametrize("how, flattened, channels_last", [("chw", (2, 3, 4), None), ("hwc", None, (2, 3, 4))])
def test_a_model_fx_cannot_trace_is_recorded_with_its_flatten_order(how, flattened, channels_last):
    model, x = _Guarded(how), torch.rand(1, 3, 2, 3)
    with pytest.raises(ConversionError, match="torch.fx cannot trace"):
        TorchDataflow.trace(model, x)
    flow = TorchDataflow.of(model, x)
    assert "torch.fx cannot trace" in flow.recorded
    fed = flow.linear_input("fc")
    assert (fed.known, fed.flattened, fed.channels_last) == (True, flattened, channels_last), fed
    assert flow.producers("fc", {"conv", "bn", "fc"}) == {"bn"} and flow.producers("conv", {"conv"}) == {INPUT}
    # only the branch the input takes is seen: `other` never ran, so nothing is said of it
    assert flow.linear_input("other") is None and "other" not in flow.order
    assert model.training  # the run is in eval mode, and the mode is restored


@pytest.mark.parametrize("how", ["numpy", "as_tensor"])
def test_a_reshape_the_recorded_run_cannot_see_leaves_the_layout_unknown(how):
    flow = TorchDataflow.of(_Guarded(how), torch.rand(1, 3, 2, 3))
    fed = flow.linear_input("fc")
    assert not fed.known and "numpy" in fed.how
    assert flow.producers("fc", {"conv", "bn", "fc"}) == frozenset()  # its producer is unknown, never guessed


def test_a_model_that_does_not_run_on_the_input_is_a_conversion_error():
    with pytest.raises(ConversionError, match="does not run on the example input"):
        TorchDataflow.of(_Guarded(), torch.rand(1, 2, 2, 3))
