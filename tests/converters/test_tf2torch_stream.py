"""tf2torch writes one tensor at a time: the streamed ``.pt`` equals ``torch.save`` of the same
tree, and a conversion with optimizer state never holds all its tensors at once."""

from __future__ import annotations

import dataclasses
import io
import tracemalloc
import weakref
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from ckptfmt._writer import DeferredTensor
from ckptfmt.errors import CkptFmtError, ConversionError

torch = pytest.importorskip("torch")

from ckptfmt.converters.convert import keras_to_torch, load_factory, read_keras_checkpoint  # noqa: E402
from ckptfmt.converters.keras.torchfile import save_torch_stream  # noqa: E402
from ckptfmt.converters.tf import TFCheckpointReader  # noqa: E402

pytestmark = pytest.mark.torch

ROOT = Path(__file__).resolve().parents[2]
MODELS = str(ROOT / "fixtures" / "examples" / "models.py")
FIX = ROOT / "fixtures" / "tf"


def _same(a, b, path="") -> None:
    """Same structure, types, key order, dtypes, shapes and bytes."""
    assert type(a) is type(b), (path, type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            _same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.requires_grad) == (b.dtype, b.shape, b.requires_grad), path
        assert torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8)), path
    else:
        assert a == b, path


def _tree():
    g = torch.Generator().manual_seed(0)
    return {
        "model": {
            "f32": torch.randn(5, 7, generator=g),
            "bf16": torch.randn(4, 3, generator=g).to(torch.bfloat16),
            "f16": torch.randn(6, generator=g).to(torch.float16),
            "i64": torch.arange(-3, 9, dtype=torch.int64).reshape(3, 4),
            "zero_d": torch.tensor(7, dtype=torch.int64),
            "zero_d_f": torch.tensor(2.5),
            "empty": torch.zeros(0, dtype=torch.float32),
            "empty_2d": torch.zeros(2, 0, 3, dtype=torch.bfloat16),
            "bool": torch.tensor([True, False]),
        },
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(5, 7)}},
                      "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": False, "foreach": None,
                                        "params": [0]}]},
        "optimizer_class": "torch.optim.Adam",
        "conversion_report": "a report\nwith lines",
    }


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _streamed(obj) -> bytes:
    buf = io.BytesIO()
    save_torch_stream(obj, buf)
    return buf.getvalue()


def _load(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


def test_streamed_file_is_torch_saves_file():
    tree = _tree()
    ours, theirs = zipfile.ZipFile(io.BytesIO(_streamed(tree))), zipfile.ZipFile(io.BytesIO(_saved(tree)))
    # the same records with the same bytes (torch also writes a random .data/serialization_id)
    assert ours.namelist() == [n for n in theirs.namelist() if n != "archive/.data/serialization_id"]
    for name in ours.namelist():
        assert ours.read(name) == theirs.read(name), name
    for info in ours.infolist():  # stored, each record's data 64-byte aligned as torch writes them
        assert info.compress_type == zipfile.ZIP_STORED
        assert (info.header_offset + 30 + len(info.filename) + len(info.extra)) % 64 == 0, info.filename


def test_numpy_deferred_and_strided_leaves_load_as_torch_save_of_the_tensors(tmp_path):
    rng = np.random.default_rng(1)
    k = rng.standard_normal((6, 4)).astype(np.float32)
    bf = rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16)
    big_endian = np.arange(6, dtype=">i8").reshape(2, 3)
    calls = []

    def load():
        calls.append(1)
        return k.T  # a transposed view

    ours = {"t": DeferredTensor((4, 6), np.dtype(np.float32), load), "bf": bf[:, ::2], "be": big_endian,
            "nc": torch.arange(12.0).reshape(3, 4).t(), "zero_d": np.array(1.5, np.float16),
            "empty": DeferredTensor((0, 3), np.dtype(np.int64), lambda: np.zeros((0, 3), np.int64))}
    want = {"t": torch.from_numpy(np.ascontiguousarray(k.T)),
            "bf": torch.from_numpy(np.ascontiguousarray(bf[:, ::2]).view(np.uint16)).view(torch.bfloat16),
            "be": torch.from_numpy(big_endian.astype("<i8")), "nc": torch.arange(12.0).reshape(3, 4).t().contiguous(),
            "zero_d": torch.tensor(1.5, dtype=torch.float16), "empty": torch.zeros((0, 3), dtype=torch.int64)}
    data = _streamed(ours)
    assert calls == [1]  # loaded once, when its record was written
    _same(_load(data), _load(_saved(want)))
    p = tmp_path / "m.pt"
    p.write_bytes(data)
    _same(torch.load(p, weights_only=True, mmap=True), _load(_saved(want)))  # aligned records map


def test_refusals_name_the_tensor():
    bad = {"optimizer": {"state": {3: {"exp_avg": DeferredTensor((2, 2), np.dtype(np.float32), lambda: np.zeros((2, 3), np.float32))}}}}
    with pytest.raises(CkptFmtError, match="optimizer/state/3/exp_avg"):  # its path in the tree, not a zip record
        _streamed(bad)
    with pytest.raises(ConversionError, match="requires_grad"):
        _streamed({"p": torch.nn.Parameter(torch.ones(2))})


def test_tensors_are_written_in_blocks_never_copied_whole(tmp_path):
    src = np.random.default_rng(2).standard_normal((2048, 8192)).astype(np.float32)  # 64 MiB
    tree = {f"w{i}": DeferredTensor((8192, 2048), np.dtype(np.float32), lambda: src.T) for i in range(3)}
    tracemalloc.start()
    try:
        save_torch_stream(tree, tmp_path / "w.pt")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the transposed copies are blocks of 8 MiB (two alive at once), each written and dropped
    assert peak < src.nbytes // 2, peak
    _same(torch.load(tmp_path / "w.pt", weights_only=True)["w2"], torch.from_numpy(np.ascontiguousarray(src.T)))


class _CountingReader:
    """A checkpoint reader that records how many arrays it returned are alive at each read."""

    def __init__(self, inner):
        self._inner = inner
        self.alive: list[int] = []
        self._out: list[weakref.ref] = []

    def get(self, key):
        self._out = [r for r in self._out if r() is not None]
        self.alive.append(len(self._out))
        arr = np.array(self._inner.get(key))  # its own buffer, so its lifetime is the consumer's
        self._out.append(weakref.ref(arr))
        return arr

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _eager_reference(kc, model, example, exact, config):
    """What tf2torch wrote before streaming: every slot read, converted, loaded into a live optimizer."""
    from ckptfmt.adapters.torch import numpy_to_state, numpy_to_tensor
    from ckptfmt.converters.keras.optimizer import keras_optimizer_settings, optimizer_type
    from ckptfmt.converters.keras.planner import plan_conversion
    from ckptfmt.converters.optim import keras_to_torch_optimizer

    plan, _ = plan_conversion(kc, model, example, None, True)
    state, _ = keras_optimizer_settings(kc, config)
    eager = {v: {s: np.asarray(d.load()) for s, d in slots.items()} for v, slots in state.slots.items()}
    state = dataclasses.replace(state, slots=eager)
    names = [n for n, _ in model.named_parameters()]
    conv = keras_to_torch_optimizer(state, plan, names, exact=exact)
    weights = plan.apply({k: kc.get(kc.keys[k]) for e in plan.entries for k in e.sources})
    opt = optimizer_type(conv.optimizer)(model.parameters(), **conv.hyperparameters)
    opt.load_state_dict(numpy_to_state(conv.state_dict(opt.state_dict())))
    return {"model": {k: numpy_to_tensor(v) for k, v in weights.items()}, "optimizer": opt.state_dict(),
            "optimizer_class": conv.optimizer, "optimizer_hyperparameters": dict(conv.hyperparameters)}


@pytest.mark.parametrize("name, exact, config", [("tfkeras2_cnn_adam", False, None), ("tfkeras2_cnn_adam", True, None),
                                                 ("tfkeras2_cnn_sgd_legacy", False, {"nesterov": True})])
def test_tf2torch_streams_slots_and_writes_what_torch_save_did(tmp_path, name, exact, config):
    import ckptfmt

    model, example = load_factory(MODELS + ":cnn")()
    with TFCheckpointReader(FIX / name) as r:
        kc = read_keras_checkpoint(r)
        want = _eager_reference(kc, model, example, exact, config)
        counting = _CountingReader(r)
        kc = dataclasses.replace(kc, reader=counting)
        n_slots = sum(len(d) for d in kc.slots.values())
        keras_to_torch(kc, tmp_path / "o.pt", model=model, example=example, exact_optimizer=exact, optimizer_config=config)
        pt_alive, counting.alive = counting.alive, []
        keras_to_torch(kc, tmp_path / "o", model=model, example=example, exact_optimizer=exact, optimizer_config=config)
        dir_alive = counting.alive
    got = torch.load(tmp_path / "o.pt", weights_only=True)
    report = got.pop("conversion_report")
    assert "optimizer" in report or report
    _same(got, want)
    # the ckptfmt directory holds the same numbers
    tree = ckptfmt.load(tmp_path / "o")
    for i, st in want["optimizer"]["state"].items():
        for slot, t in st.items():
            np.testing.assert_array_equal(np.asarray(tree["optimizer"]["state"][i][slot]), t.numpy())
    for k, t in want["model"].items():
        np.testing.assert_array_equal(np.asarray(tree["model"][k]), t.numpy())
    # every weight and slot was read, but never more than one entry's sources (2 for a split/fused entry) at a time
    assert len(pt_alive) >= len(want["model"]) + n_slots > 4
    assert max(pt_alive) <= 2 and max(dir_alive) <= 2, (pt_alive, dir_alive)


def test_a_flattened_kernel_is_permuted_without_a_full_copy(tmp_path):
    """Reshape -> Transpose -> Reshape (Keras HWC rows to torch CHW) stays a view until written."""
    import ckptfmt
    from ckptfmt.converters.keras import outputs
    from ckptfmt.converters.mapping import Convert, Mapping, Reshape, Transpose

    rng = np.random.default_rng(3)
    src = {"d/kernel": rng.standard_normal((4 * 4 * 8, 6)).astype(np.float32), "d/bias": rng.standard_normal(6).astype(np.float32)}
    ops = (Reshape((4, 4, 8, 6)), Transpose((3, 2, 0, 1)), Reshape((6, 128)))
    plan = Mapping((Convert(("d/kernel",), ("fc.weight",), ops), Convert(("d/bias",), ("fc.bias",), ()))).plan(src)
    want = plan.apply(src)
    from ckptfmt.converters.optim.convert import entry_views

    view = entry_views(plan.entries[0], (src["d/kernel"],))[0]
    assert np.shares_memory(view, src["d/kernel"]) and view.shape == (6, 8, 4, 4)  # the last reshape is left to the writer
    outputs.write_torch_checkpoint(str(tmp_path / "f.pt"), plan, src.__getitem__, None, None, "")
    outputs.write_ckptfmt(str(tmp_path / "f"), plan, src.__getitem__, None, None, "", "src", False, False)
    got = torch.load(tmp_path / "f.pt", weights_only=True)["model"]
    back = ckptfmt.load(tmp_path / "f")["model"]
    for k, v in want.items():
        np.testing.assert_array_equal(got[k].numpy(), v)
        np.testing.assert_array_equal(np.asarray(back[k]), v)
        assert got[k].shape == v.shape and np.asarray(back[k]).shape == v.shape


@pytest.mark.parametrize("shape, ops, shared", [
    ((98, 6), "R(7,7,2,6) T(2,0,1,3) R(98,6) T(1,0)", True),  # a Flatten-permuted Dense kernel
    ((3, 3, 4, 5), "T(3,2,0,1)", True),  # a conv kernel
    ((12,), "R(3,4) T(1,0) R(12,)", True),
    ((12,), "R(3,4) T(1,0) R(2,6)", False),  # splits a merged run: numpy copies
    ((6, 4), "T(1,0) R(4,6,1)", True),
    ((1, 6), "R(6,) R(2,3) T(1,0)", True),
    ((24,), "R(2,3,4) T(2,0,1) R(4,6) T(1,0) R(3,2,4)", True),
])
def test_layout_view_has_the_results_elements_in_c_order(shape, ops, shared):
    from ckptfmt.converters.mapping import Reshape, Transpose
    from ckptfmt.converters.optim.convert import _layout_view

    parsed = [(Reshape if s[0] == "R" else Transpose)(tuple(int(x) for x in s[2:-1].split(",") if x)) for s in ops.split()]
    a = np.random.default_rng(4).standard_normal(shape)
    want = a
    for op in parsed:
        want = op.apply((want,))[0]
    got = _layout_view(a, parsed)
    assert got.size == want.size and np.shares_memory(got, a) == shared
    np.testing.assert_array_equal(np.ascontiguousarray(got).reshape(-1), np.ascontiguousarray(want).reshape(-1))


@pytest.mark.parametrize("dt", [torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2])
def test_dtypes_without_a_typed_storage_are_written_as_torch_save_writes_them(dt):
    """torch keeps these in untyped storages (``_rebuild_tensor_v3``); the old eager path wrote them."""
    t = (torch.arange(6, dtype=torch.float32) / 4).to(dt).reshape(2, 3)
    ref = io.BytesIO()
    torch.save({"w": t}, ref)
    got = torch.load(io.BytesIO(_streamed({"w": t})), weights_only=True)["w"]
    want = torch.load(io.BytesIO(ref.getvalue()), weights_only=True)["w"]
    assert got.dtype == want.dtype == dt and got.shape == want.shape
    assert got.view(torch.uint8).tolist() == want.view(torch.uint8).tolist()


def test_the_byteorder_record_says_little_as_the_data_is():
    """_pieces writes little-endian on any host: the record must not claim the host's order."""
    with zipfile.ZipFile(io.BytesIO(_streamed({"w": np.arange(3, dtype=np.float32)}))) as z:
        assert z.read([n for n in z.namelist() if n.endswith("/byteorder")][0]) == b"little"


def test_a_failed_write_to_a_path_leaves_the_previous_file(tmp_path):
    """The path form is atomic; a damaged source's own error (IntegrityError) passes unchanged."""
    from ckptfmt.errors import IntegrityError

    p = tmp_path / "w.pt"
    save_torch_stream({"w": np.ones(3, np.float32)}, p)

    def damaged():
        raise IntegrityError("chunk 0 of 'w' does not match its hash")

    with pytest.raises(IntegrityError, match="does not match"):
        save_torch_stream({"a": np.zeros(1 << 20, np.float32), "w": DeferredTensor((3,), np.dtype(np.float32), damaged)}, p)
    assert torch.load(p, weights_only=True)["w"].tolist() == [1.0, 1.0, 1.0]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["w.pt"]


def test_a_streamed_slot_has_the_dtype_its_ops_make():
    """A Cast in a mapping file changes the slots' dtype too: declared as the eager path computes it."""
    from ckptfmt.converters.mapping import Cast, Convert, Mapping, Transpose
    from ckptfmt.converters.optim.convert import _slot_values

    entry = Mapping((Convert(("k",), ("w",), (Transpose((1, 0)), Cast("float64"))),)).plan({"k": (2, 3)}).entries[0]
    m = np.arange(6, dtype=np.float32).reshape(2, 3)
    problems: list[str] = []
    (streamed,) = _slot_values(entry, (DeferredTensor((2, 3), np.dtype(np.float32), lambda: m),), "m", problems)
    (eager,) = entry.run((m,), slots=True)
    assert not problems and np.dtype(streamed.dtype) == eager.dtype == np.float64
    np.testing.assert_array_equal(streamed.materialize("w"), eager)
