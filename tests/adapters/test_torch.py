"""ckptfmt.torch and ckptfmt.adapters.torch: round trips, tied weights, resumed training."""

from __future__ import annotations

import pickle

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

import ckptfmt  # noqa: E402
import ckptfmt.torch as ckt  # noqa: E402
from ckptfmt.adapters import torch as ta  # noqa: E402
from ckptfmt.errors import CheckpointNotFoundError, ConversionError, FormatError, UnsupportedDtypeError  # noqa: E402

pytestmark = pytest.mark.torch

VOCAB, DIM, BATCH, SEQ = 17, 8, 4, 5


class Net(torch.nn.Module):
    """Embedding -> LSTM -> BatchNorm -> Linear, with the output weight tied to the embedding."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, DIM)
        self.lstm = torch.nn.LSTM(DIM, DIM, batch_first=True)
        self.bn = torch.nn.BatchNorm1d(DIM)
        self.head = torch.nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.emb.weight
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.emb(x))
        return self.head(self.bn(h[:, -1]))


def make_adam(model):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=1e-3)
    return opt, torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)


def make_sgd(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.randint(0, VOCAB, (BATCH,), generator=g)


def train(model, opt, sched, steps: range) -> list[float]:
    losses = []
    model.train()
    for step in steps:
        x, y = batch(step)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def fresh(make_opt, seed: int, dtype=torch.float32):
    torch.manual_seed(seed)
    model = Net(dtype)
    opt, sched = make_opt(model)
    return model, opt, sched


def assert_same_tree(a, b, path="") -> None:
    """Bit-exact, type-exact comparison of two torch state trees."""
    if isinstance(a, dict):  # state_dict() returns OrderedDicts; a checkpoint gives dicts
        assert isinstance(b, dict), path
        assert list(a) == list(b), path
        for k in a:
            assert_same_tree(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{path}/{i}")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, path
        assert torch.equal(a.view(torch.uint8) if a.element_size() == 1 else a, b.view(torch.uint8) if b.element_size() == 1 else b), path
    else:
        assert type(a) is type(b), path
        assert a == b or (a != a and b != b), path


@pytest.mark.parametrize("make_opt", [make_adam, make_sgd], ids=["adam", "sgd-nesterov"])
def test_resumed_run_matches_uninterrupted_run(tmp_path, make_opt):
    model, opt, sched = fresh(make_opt, seed=0)
    train(model, opt, sched, range(0, 2))
    ckt.save(tmp_path / "ck", model=model, optimizer=opt, scheduler=sched, step=2)
    expected = train(model, opt, sched, range(2, 7))

    model2, opt2, sched2 = fresh(make_opt, seed=123)  # different initial weights
    extra = ckt.restore(tmp_path / "ck", model=model2, optimizer=opt2, scheduler=sched2)
    assert extra == {"step": 2}
    resumed = train(model2, opt2, sched2, range(extra["step"], 7))

    assert resumed == expected
    assert_same_tree(model2.state_dict(), model.state_dict())
    assert_same_tree(opt2.state_dict(), opt.state_dict())
    assert sched2.state_dict() == sched.state_dict()


@pytest.mark.parametrize("make_opt", [make_adam, make_sgd], ids=["adam", "sgd-nesterov"])
def test_round_trip_is_bit_exact(tmp_path, make_opt):
    model, opt, sched = fresh(make_opt, seed=0)
    train(model, opt, sched, range(3))
    ckt.save(tmp_path / "ck", model=model, optimizer=opt, scheduler=sched, metadata={"run": "a"})

    tree = ckptfmt.load(tmp_path / "ck")
    state = ta.numpy_to_state({k: tree[k] for k in ("model", "optimizer", "scheduler")}, tree["aliases"])
    assert_same_tree(state["model"], model.state_dict())
    assert_same_tree(state["optimizer"], opt.state_dict())
    assert state["scheduler"] == sched.state_dict()
    # Buffers are saved: BatchNorm running stats and its int64 counter.
    assert state["model"]["bn.num_batches_tracked"].item() == 3
    assert state["model"]["bn.running_var"].dtype == torch.float32
    # Optimizer int keys, per-parameter step tensors and tuple hyperparameters survive.
    assert all(type(k) is int for k in state["optimizer"]["state"])
    if make_opt is make_adam:
        assert state["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.95)
        assert state["optimizer"]["state"][0]["step"].shape == ()
    assert ckptfmt.open(tmp_path / "ck").metadata == {"run": "a"}


def test_tied_weights_are_stored_once_and_restored_tied(tmp_path):
    model, opt, sched = fresh(make_adam, seed=0)
    ckt.save(tmp_path / "ck", model=model)
    reader = ckptfmt.open(tmp_path / "ck")
    assert "model/emb.weight" in reader.keys()
    assert "model/head.weight" not in reader.keys()
    tree = ckptfmt.load(tmp_path / "ck")
    assert tree["aliases"] == {"model/head.weight": "model/emb.weight"}
    assert tree["model"]["head.weight"] is None

    state = ta.numpy_to_state(tree["model"], tree["aliases"], prefix="model")
    assert state["head.weight"] is state["emb.weight"]

    # An untied model of the same architecture gets the tied value in both places.
    untied = Net()
    untied.head.weight = torch.nn.Parameter(torch.zeros(VOCAB, DIM))
    ckt.restore(tmp_path / "ck", model=untied)
    assert torch.equal(untied.head.weight, model.emb.weight)
    assert torch.equal(untied.emb.weight, model.emb.weight)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_low_precision_model_resumes_exactly(tmp_path, dtype):
    model, opt, sched = fresh(make_sgd, seed=0, dtype=dtype)
    train(model, opt, sched, range(2))
    ckt.save(tmp_path / "ck", model=model, optimizer=opt, scheduler=sched)
    expected = train(model, opt, sched, range(2, 4))

    tree = ckptfmt.load(tmp_path / "ck")
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == torch.bfloat16 else np.dtype(np.float16)
    assert tree["model"]["emb.weight"].dtype == np_dtype

    model2, opt2, sched2 = fresh(make_sgd, seed=5, dtype=dtype)
    ckt.restore(tmp_path / "ck", model=model2, optimizer=opt2, scheduler=sched2)
    assert train(model2, opt2, sched2, range(2, 4)) == expected
    assert_same_tree(model2.state_dict(), model.state_dict())


def test_extra_values_of_every_dtype_round_trip(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    extra = {
        "epoch": 3,
        "name": "run-1",
        "blob": b"\x00\x01",
        "nothing": None,
        "rng": torch.get_rng_state(),
        "bool": torch.tensor([True, False]),
        "complex": torch.tensor([1 + 2j, -3j], dtype=torch.complex64),
        "c128": torch.tensor([1 + 2j], dtype=torch.complex128),
        "i64": torch.tensor([-(2**62), 2**62]),
        "u16": torch.tensor([1, 65535], dtype=torch.uint16),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.empty(0, 3),
        "transposed": base.t(),
        "sliced": base[:, ::2],
        "expanded": torch.arange(3.0).expand(2, 3),
        "conj": torch.tensor([1 + 1j]).conj(),
        "nested": {1: [torch.ones(2, dtype=torch.bfloat16)], "t": (torch.zeros(1, dtype=torch.float16), 0.5)},
    }
    for name in ("float8_e4m3fn", "float8_e5m2"):
        if hasattr(torch, name):
            extra[name] = torch.tensor([0.5, -2.0]).to(getattr(torch, name))
    ckt.save(tmp_path / "ck", **extra)
    back = ckt.restore(tmp_path / "ck", map_location="cpu")
    expected = {k: (v.resolve_conj().contiguous() if isinstance(v, torch.Tensor) else v) for k, v in extra.items()}
    assert_same_tree(back, expected)


def test_cpu_contiguous_tensors_are_not_copied():
    t = torch.arange(6, dtype=torch.float32)
    b = torch.zeros(3, dtype=torch.bfloat16)
    assert np.shares_memory(ta.tensor_to_numpy(t), t.numpy())
    a = ta.tensor_to_numpy(b)
    a[0] = 1
    assert b[0].item() == 1
    back = ta.numpy_to_tensor(a)
    assert back.data_ptr() == b.data_ptr()


def test_read_only_arrays_are_copied_before_torch_sees_them():
    a = np.arange(3, dtype=np.float32)
    a.flags.writeable = False
    t = ta.numpy_to_tensor(a)
    t += 1  # would corrupt (or crash on) a read-only buffer if it were shared
    assert a.tolist() == [0, 1, 2]


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_unsupported_values_name_their_path(tmp_path):
    with pytest.raises(UnsupportedDtypeError, match="extra/bad"):
        ckt.save(tmp_path / "ck", bad=torch.zeros(2, dtype=torch.complex32))
    with pytest.raises(UnsupportedDtypeError, match="extra/obj"):
        ckt.save(tmp_path / "ck", obj=object())
    with pytest.raises(UnsupportedDtypeError, match="sparse|layout"):
        ta.tensor_to_numpy(torch.zeros(2, 2).to_sparse())


def test_strict_restore_lists_all_problems_and_changes_nothing(tmp_path):
    ckt.save(tmp_path / "ck", model=torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)))
    other = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ConversionError) as info:
        ckt.restore(tmp_path / "ck", model=other)
    msg = str(info.value)
    assert "3.weight" in msg and "3.bias" in msg
    assert "0.weight: checkpoint (4, 3) vs model (5, 3)" in msg
    assert_same_tree(other.state_dict(), before)


def test_non_strict_restore_skips_missing_keys_and_sections(tmp_path):
    ckt.save(tmp_path / "ck", model=torch.nn.Linear(3, 4))
    bigger = torch.nn.Sequential()
    bigger.add_module("weight_holder", torch.nn.Linear(3, 4))
    lin = torch.nn.Linear(3, 4)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    with pytest.raises(ConversionError, match="no optimizer state"):
        ckt.restore(tmp_path / "ck", model=lin, optimizer=opt)
    assert ckt.restore(tmp_path / "ck", model=lin, optimizer=opt, strict=False) == {}
    ckt.restore(tmp_path / "ck", model=bigger, strict=False)  # no key matches: nothing loaded


def test_restore_rejects_a_non_torch_checkpoint(tmp_path):
    ckptfmt.save({"w": np.zeros(2)}, tmp_path / "plain")
    with pytest.raises(FormatError, match="ckptfmt.torch"):
        ckt.restore(tmp_path / "plain", model=torch.nn.Linear(1, 1))


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_load_torch_file_is_weights_only(tmp_path, capsys):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2), "meta": {"step": 3}}, good)
    assert torch.equal(ckt.load_torch_file(good)["w"], torch.ones(2))

    evil = tmp_path / "evil.pt"
    torch.save({"x": _Evil()}, evil)
    with pytest.raises(FormatError, match="evil.pt"):
        ckt.load_torch_file(evil)
    assert "unpickled!" not in capsys.readouterr().out

    legacy = tmp_path / "legacy.bin"
    legacy.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(FormatError, match="legacy.bin"):
        ckt.load_torch_file(legacy)
    assert "unpickled!" not in capsys.readouterr().out

    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(FormatError, match="junk.bin"):
        ckt.load_torch_file(junk)
    with pytest.raises(CheckpointNotFoundError):
        ckt.load_torch_file(tmp_path / "missing.pt")


_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
           torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128]


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(_DTYPES),
    shape=st.lists(st.integers(0, 4), max_size=4),
    transpose=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_tensor_numpy_round_trip_property(dtype, shape, transpose, seed):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * 100).to(dtype)
    if transpose and t.dim() >= 2:
        t = t.transpose(0, -1)
    back = ta.numpy_to_tensor(ta.tensor_to_numpy(t))
    assert back.dtype == t.dtype and back.shape == t.shape
    assert torch.equal(back, t)
