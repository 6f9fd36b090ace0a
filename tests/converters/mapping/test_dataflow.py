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


# -- between the flatten and the Linear: walked through, evidence of a vector, or refused ---------


def _iadd(f):
    f += 0
    return f


# ops that keep every element of the flattened map where it is (fx and a recorded run alike)
_KEEPING = {
    "float": lambda f: f.float(),
    "to": lambda f: f.to(torch.float32),
    "type": lambda f: f.type(torch.float32),
    "detach": lambda f: f.detach(),
    "clone.contiguous": lambda f: f.clone().contiguous(),
    "full slice": lambda f: f[:, :],
    "iadd": _iadd,
    "mul_": lambda f: f.mul_(1),
    "add_ of itself": lambda f: f.add_(f),
    "relu_": lambda f: f.relu_(),
    "dropout": lambda f: nn.functional.dropout(f, 0.0),
}
# ops that may move the map's positions or weigh them in torch's order: refused, never "vector"
_MOVING = {
    "cat": lambda f, m: torch.cat([f, m.extra_flat], 1),
    "normalize": lambda f, m: nn.functional.normalize(f, dim=1) * f.norm(dim=1, keepdim=True),
    "BatchNorm1d": lambda f, m: m.bn1d(f),
    "LayerNorm": lambda f, m: m.ln(f),
    "roll": lambda f, m: f.roll(1, 1),
    "partial slice": lambda f, m: f[:, :24],
    "squeeze to rank 1": lambda f, m: f.squeeze(),
    "add of another map": lambda f, m: f + torch.relu(m.conv(m.x0)).permute(0, 2, 3, 1).flatten(1),
}


class _Between(nn.Module):
    """conv -> flatten -> op -> Linear; ``dynamic``: fx cannot trace it (a recorded run decides)."""

    def __init__(self, op, dynamic: bool = False) -> None:
        super().__init__()
        self.op, self.dynamic = op, dynamic
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1d = nn.BatchNorm1d(24)
        self.ln = nn.LayerNorm(24)
        self.fc = nn.Linear(24 if op not in (_MOVING["cat"], _MOVING["partial slice"]) else 48 if op is _MOVING["cat"] else 24, 5)

    def forward(self, x):
        if self.dynamic and torch.isnan(x).any():
            raise ValueError("NaN")
        self.x0 = x
        f = torch.relu(self.conv(x)).flatten(1)
        self.extra_flat = f
        return self.fc(self.op(f) if self.op in _KEEPING.values() else self.op(f, self))


@pytest.mark.parametrize("dynamic", [False, True], ids=["fx", "recorded"])
@pytest.mark.parametrize("name", list(_KEEPING))
def test_ops_that_keep_elements_in_place_are_walked_through(name, dynamic):
    flow = TorchDataflow.of(_Between(_KEEPING[name], dynamic), torch.rand(2, 3, 2, 3))
    assert (flow.recorded is not None) == dynamic
    fed = flow.linear_input("fc")
    assert (fed.known, fed.flattened) == (True, (2, 3, 4)), fed


@pytest.mark.parametrize("dynamic", [False, True], ids=["fx", "recorded"])
@pytest.mark.parametrize("name, op", [(n, n.split()[0]) for n in _MOVING])
def test_ops_that_may_move_a_flattened_map_are_refused(name, op, dynamic):
    x = torch.rand(1 if name == "squeeze to rank 1" else 2, 3, 2, 3)
    flow = TorchDataflow.of(_Between(_MOVING[name], dynamic), x)
    fed = flow.linear_input("fc")
    assert not fed.known and fed.flattened is None, fed
    assert name == "squeeze to rank 1" or op.replace("partial", "getitem") in fed.how, fed


class _Pooled(nn.Module):
    """Heads with evidence that the Linear's input holds no positions of a map: not permuted, not refused."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1d = nn.BatchNorm1d(4)
        self.emb = nn.Embedding(10, 4)
        self.lstm = nn.LSTM(4, 4, batch_first=True)
        self.attn = nn.MultiheadAttention(4, 1, batch_first=True)
        self.hidden = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        m = torch.relu(self.conv(x))
        if self.how == "mean":  # ConvNeXt's and ShuffleNet's global pooling
            return self.fc(m.mean((2, 3)))
        if self.how == "pool squeeze":
            return self.fc(nn.functional.adaptive_avg_pool2d(m, 1).squeeze(-1).squeeze(-1))
        if self.how == "pool flatten bn1d":
            return self.fc(self.bn1d(nn.functional.adaptive_avg_pool2d(m, 1).flatten(1)))
        if self.how == "mlp":  # no map at all: an op the walk does not know changes nothing
            h = self.hidden(m.mean((2, 3)))
            return self.fc(torch.cat([h[:, :2], h[:, 2:]], 1))
        if self.how == "cls token":  # a ViT's x[:, 0] after attention over the patches
            t = m.flatten(2).transpose(1, 2)
            return self.fc(self.attn(t, t, t)[0][:, 0])
        tokens = self.emb((x[:, 0, 0, :3] * 0).long())  # an LSTM's last step
        return self.fc(self.lstm(tokens)[0][:, -1, :])


@pytest.mark.parametrize("dynamic", [False, True], ids=["fx", "recorded"])
@pytest.mark.parametrize("how", ["mean", "pool squeeze", "pool flatten bn1d", "mlp", "cls token", "lstm"])
def test_evidence_of_no_positions_is_a_vector(how, dynamic):
    model, x = _Pooled(how), torch.rand(2, 3, 2, 3)
    flow = TorchDataflow.record(model, x) if dynamic else TorchDataflow.trace(model, x)
    fed = flow.linear_input("fc")
    assert (fed.known, fed.flattened, fed.channels_last) == (True, None, None), fed


def test_a_forward_set_on_the_instance_is_recorded_not_traced_from_the_class():
    import types

    model = _Head("chw")

    def forward(self, x):  # flattens channels-last, as the class's forward does not
        return self.fc(torch.relu(self.conv(x)).permute(0, 2, 3, 1).flatten(1))

    model.forward = types.MethodType(forward, model)
    x = torch.zeros(1, 3, 2, 3)
    with pytest.raises(ConversionError, match="forward set on the instance"):
        TorchDataflow.trace(model, x)
    flow = TorchDataflow.of(model, x)
    assert "forward set on the instance" in flow.recorded
    fed = flow.linear_input("fc")
    assert (fed.flattened, fed.channels_last) == (None, (2, 3, 4)), fed


class _Sum(nn.Module):
    """Linear(a + b): decided by both addends, whatever each says in words."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.proj = nn.Linear(4, 4)
        self.fc = nn.Linear(4 if how == "pooled" else 24, 5)

    def forward(self, x):
        m = torch.relu(self.conv(x))
        if self.how == "pooled":  # a one-position flatten plus a Linear's output: both vectors
            p = nn.functional.adaptive_avg_pool2d(m, 1).flatten(1)
            return self.fc(p + self.proj(p))
        a, b = m.flatten(1), m.permute(0, 2, 3, 1).flatten(1)
        return self.fc(a + (a if self.how == "alike" else b))


@pytest.mark.parametrize("how, known, flattened", [("pooled", True, None), ("alike", True, (2, 3, 4)), ("mixed", False, None)])
def test_a_sum_is_decided_by_both_addends(how, known, flattened):
    for flow in (TorchDataflow.trace(_Sum(how), torch.rand(2, 3, 2, 3)), TorchDataflow.record(_Sum(how), torch.rand(2, 3, 2, 3))):
        fed = flow.linear_input("fc")
        assert (fed.known, fed.flattened) == (known, flattened), fed


class _LastAxis(nn.Module):
    """conv -> flatten -> op adding a length-1 axis -> Linear over the last axis (rank 3 input)."""

    def __init__(self, op, dynamic: bool = False) -> None:
        super().__init__()
        self.op, self.dynamic = op, dynamic
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        if self.dynamic and torch.isnan(x).any():
            raise ValueError("NaN")
        return self.fc(self.op(torch.relu(self.conv(x)).flatten(1)))


@pytest.mark.parametrize("dynamic", [False, True], ids=["fx", "recorded"])
@pytest.mark.parametrize("op", [lambda f: f.unsqueeze(1), lambda f: f[:, None], lambda f: torch.stack([f], 1)],
                         ids=["unsqueeze", "none-index", "stack"])
def test_a_flattened_map_given_a_new_axis_is_not_a_last_axis_vector(op, dynamic):
    """A Linear over the last axis whose length is a whole flattened map may need its rows permuted:
    an op the walk cannot follow there is unknown, never "vector"."""
    fed = TorchDataflow.of(_LastAxis(op, dynamic), torch.rand(2, 3, 2, 3)).linear_input("fc")
    assert not fed.known and fed.flattened is None, fed


class _FeatureAfterFlatten(nn.Module):
    def __init__(self, head: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head_kind = head
        self.head = {"bn": nn.BatchNorm1d(24), "ln": nn.LayerNorm(24), "conv": nn.Conv2d(24, 5, 1)}[head]

    def forward(self, x):
        f = torch.relu(self.conv(x)).flatten(1)
        return self.head(f[:, :, None, None] if self.head_kind == "conv" else f)


@pytest.mark.parametrize("head", ["bn", "ln", "conv"])
def test_per_feature_weights_after_a_flatten_are_recorded_for_refusal(head):
    """A BatchNorm1d/LayerNorm/1x1 conv whose features are a flattened channels-first map: its
    weights would need a Dense's permutation; matching refuses it (flattened_features)."""
    flow = TorchDataflow.of(_FeatureAfterFlatten(head), torch.rand(2, 3, 2, 3))
    fed = flow.feature_inputs["head"]
    assert fed.flattened == (2, 3, 4) or not fed.known, fed
    pooled = TorchDataflow.of(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(4)),
                              torch.rand(2, 3, 5, 5))
    assert pooled.feature_inputs == {}  # a pooled vector: nothing to permute
