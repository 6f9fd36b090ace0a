"""ckptfmt.converters.kinds: detection, the safetensors parser, diff semantics, conversion."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptfmt
from ckptfmt.converters import kinds
from ckptfmt.converters.sources.safetensors import write_safetensors
from ckptfmt.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConversionError,
    FormatError,
    FrameworkNotAvailableError,
    TensorNotFoundError,
)

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "tf"


def _st_file(path: Path, header: dict, data: bytes, *, pad: bool = True) -> str:
    raw = json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return str(path)


def _entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


# ------------------------------------------------------------------------- detection


def test_detect_kind(tmp_path):
    from safetensors.numpy import save_file

    ck = str(tmp_path / "ck")
    ckptfmt.save({"w": np.ones(2)}, ck)
    assert kinds.detect_kind(ck) == "ckptfmt"
    st_path = tmp_path / "w.safetensors"
    save_file({"w": np.ones(2)}, str(st_path))
    assert kinds.detect_kind(st_path) == "safetensors"
    shutil.copy(st_path, tmp_path / "noext")
    assert kinds.detect_kind(tmp_path / "noext") == "safetensors"  # sniffed
    tf = FIXTURES / "keras3_seq_sgdm"
    assert kinds.detect_kind(tf) == "tf"
    assert kinds.detect_kind(tf / "ckpt-1") == "tf"
    assert kinds.detect_kind(tf / "ckpt-1.index") == "tf"
    assert kinds.detect_kind(tf / "ckpt-1.data-00000-of-00001") == "tf"
    (tmp_path / "m.onnx").write_bytes(b"x")
    assert kinds.detect_kind(tmp_path / "m.onnx") == "onnx"
    for name in ("m.pt", "m.pth", "m.bin"):
        (tmp_path / name).write_bytes(b"x")
        assert kinds.detect_kind(tmp_path / name) == "torch"
    (tmp_path / "zip").write_bytes(b"PK\x03\x04rest")
    assert kinds.detect_kind(tmp_path / "zip") == "torch"


def test_detect_kind_errors(tmp_path):
    with pytest.raises(CheckpointNotFoundError):
        kinds.detect_kind(tmp_path / "nothing")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(FormatError, match="not a checkpoint kind"):
        kinds.detect_kind(tmp_path / "notes.txt")
    with pytest.raises(FormatError, match="neither"):
        kinds.detect_kind(tmp_path)
    d = tmp_path / "tfdir"
    shutil.copytree(FIXTURES / "tf_module", d)
    os.remove(d / "checkpoint")
    with pytest.raises(FormatError, match="ckpt-1"):
        kinds.detect_kind(d)


def test_open_any_tf_reads_tensors():
    with kinds.open_any(FIXTURES / "tf_module") as src:
        assert src.kind == "tf"
        info = src.info("model/scale/.ATTRIBUTES/VARIABLE_VALUE")
        assert info.dtype == "float32" and info.shape == () and info.nbytes == 4
        assert src.info("_CHECKPOINTABLE_OBJECT_GRAPH").dtype == "string"
        value = src.get("model/scale/.ATTRIBUTES/VARIABLE_VALUE")
        assert value.dtype == np.float32 and value.shape == () and np.isfinite(value)


def test_partitioned_tf_verifies_and_lists_whole_tensors():
    report = kinds.verify_any(FIXTURES / "v1_partitioned")
    assert report.ok, report.problems
    expected = json.loads((FIXTURES / "v1_partitioned" / "expected.json").read_text())
    with kinds.open_any(FIXTURES / "v1_partitioned") as src:
        for name in src.keys():
            info = src.info(name)
            assert src.get(name).nbytes == info.nbytes or info.dtype == "string"
    assert expected


# ------------------------------------------------------------------------- safetensors


def test_reference_files_read_identically(tmp_path):
    from safetensors.numpy import save_file

    values = {
        "f16": np.arange(6, dtype=np.float16).reshape(2, 3),
        "u64": np.array([2**64 - 1], np.uint64),
        "b": np.array([True, False]),
        "c": np.array([1 + 2j], np.complex64),
        "empty": np.zeros((0, 3), np.float32),
        "scalar": np.array(3.5, np.float64),
    }
    p = str(tmp_path / "ref.safetensors")
    save_file(values, p, metadata={"a": "b"})
    assert kinds.verify_any(p).ok
    with kinds.open_any(p) as src:
        assert src.metadata == {"a": "b"}
        for k, v in values.items():
            got = src.get(k)
            assert got.dtype == v.dtype and got.shape == v.shape and np.array_equal(got, v)
        with pytest.raises(TensorNotFoundError):
            src.info("nope")


def test_our_files_read_by_reference(tmp_path):
    from safetensors.numpy import load_file

    from ckptfmt.format.dtypes import dtype_name

    values = {"a/b": np.arange(5, dtype=np.int32), "x": np.ones((2, 2), np.float64), "s": np.array(2, np.uint8)}
    p = str(tmp_path / "ours.safetensors")
    write_safetensors(p, [(kinds.TensorInfo(k, dtype_name(v.dtype), v.shape, v.nbytes), lambda v=v: v) for k, v in values.items()], {"k": "v"})
    assert kinds.verify_any(p).ok
    loaded = load_file(p)
    assert all(np.array_equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in values.items())


@pytest.mark.torch
def test_our_bfloat16_read_by_reference(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    p = str(tmp_path / "bf.safetensors")
    bf = np.arange(3).astype(ml_dtypes.bfloat16)
    write_safetensors(p, [(kinds.TensorInfo("bf", "bfloat16", (3,), 6), lambda: bf)])
    t = load_file(p)["bf"]
    assert t.dtype == torch.bfloat16 and t.float().tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize(
    "header,data,kind,tensor",
    [
        ({"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 4, 12)}, bytes(12), "overlap", "b"),
        ({"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 12, 20)}, bytes(20), "gap", "b"),
        ({"a": _entry("F32", [2], 0, 8)}, bytes(12), "size_mismatch", None),
        ({"a": _entry("F32", [3], 0, 8)}, bytes(8), "size_mismatch", "a"),
        ({"a": _entry("F32", [4], 0, 16)}, bytes(8), "truncated_file", "a"),
        ({"a": _entry("Q99", [2], 0, 8)}, bytes(8), "header", "a"),
        ({"a": _entry("F32", [-2], 0, 8)}, bytes(8), "header", "a"),
        ({"a": _entry("F32", [2], 8, 0)}, bytes(8), "header", "a"),
        ({"a": {"dtype": "F32", "shape": [2]}}, bytes(8), "header", "a"),
        ({"__metadata__": {"k": 1}, "a": _entry("F32", [2], 0, 8)}, bytes(8), "header", None),
    ],
)
def test_safetensors_header_problems(tmp_path, header, data, kind, tensor):
    p = _st_file(tmp_path / "x.safetensors", header, data)
    report = kinds.verify_any(p)
    assert not report.ok
    assert any(pr.kind == kind and pr.tensor == tensor for pr in report.problems), report.problems
    with pytest.raises(FormatError):
        kinds.open_any(p)


def test_safetensors_bad_lengths(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    assert kinds.verify_any(p).problems[0].kind == "header"
    p.write_bytes((100).to_bytes(8, "little") + b"{}")
    assert kinds.verify_any(p).problems[0].kind == "truncated_file"
    p.write_bytes(b"\x01")
    assert kinds.verify_any(p).problems[0].kind == "truncated_file"
    p.write_bytes((len(b'{"a":1,"a":2}')).to_bytes(8, "little") + b'{"a":1,"a":2}')
    assert "duplicate" in kinds.verify_any(p).problems[0].message


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200), st.booleans())
def test_any_bytes_give_a_report_or_format_error(tmp_path, blob, with_header):
    p = tmp_path / "fuzz.safetensors"
    if with_header:
        blob = len(blob[:64]).to_bytes(8, "little") + blob
    p.write_bytes(blob)
    report = kinds.verify_any(p)
    assert isinstance(report, ckptfmt.VerifyReport)
    try:
        kinds.open_any(p).close()
    except FormatError:
        assert not report.ok
    else:
        assert report.ok


# ------------------------------------------------------------------------- nest, diff


def test_nest():
    assert kinds.nest({"a/b": 1, "a/c": 2, "d": 3}) == {"a": {"b": 1, "c": 2}, "d": 3}
    assert kinds.nest({"a": 1, "a/b": 2}) == {"a": 1, "a/b": 2}  # clash: left flat
    assert kinds.nest({"a//b": 1}) == {"a//b": 1}
    assert kinds.nest({"x~1y/z": 1}) == {"x/y": {"z": 1}}


def test_nest_gives_back_the_same_names(tmp_path):
    names = ["model/layers/0/w", "model/layers/1/w", "head.weight", "x~1y"]
    ck = str(tmp_path / "ck")
    ckptfmt.save(kinds.nest({n: np.ones(1) for n in names}), ck)
    assert sorted(ckptfmt.open(ck).keys()) == sorted(names)


def _pair(tmp_path, a: dict, b: dict) -> tuple[str, str]:
    from safetensors.numpy import save_file

    pa, pb = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    save_file(a, pa)
    save_file(b, pb)
    return pa, pb


def test_diff_nan_inf_and_exact_ints(tmp_path):
    x = np.array([np.nan, np.inf, -np.inf, 1.0], np.float32)
    assert kinds.diff_any(*_pair(tmp_path, {"x": x}, {"x": x.copy()})).identical
    big = np.array([2**62 + 1], np.int64)
    r = kinds.diff_any(*_pair(tmp_path, {"x": big}, {"x": big - 1}))
    assert not r.identical  # float64 would round both to 2**62
    y = x.copy()
    y[0] = 1.0
    r = kinds.diff_any(*_pair(tmp_path, {"x": x}, {"x": y}))
    assert r.changed[0].max_abs == float("inf")


def test_diff_dtype_change_and_rel(tmp_path):
    r = kinds.diff_any(*_pair(tmp_path, {"x": np.array([1.0, 0.0], np.float32)}, {"x": np.array([1.0, 0.0], np.float64)}))
    c = r.changed[0]
    assert (c.dtype_a, c.dtype_b, c.max_abs) == ("float32", "float64", 0.0)
    r = kinds.diff_any(*_pair(tmp_path, {"x": np.array([1.0], np.float32)}, {"x": np.array([0.0], np.float32)}))
    assert r.changed[0].max_rel == float("inf")
    with pytest.raises(ValueError):
        kinds.diff_any("a", "b", atol=-1)


# ------------------------------------------------------------------------- convert


def test_convert_metadata_wrapping(tmp_path):
    ck = str(tmp_path / "ck")
    meta = {"epoch": 3, "lr": [0.1, 0.01], "name": "x"}
    ckptfmt.save({"w": np.ones(2, np.float32)}, ck, metadata=meta)
    st_path = str(tmp_path / "w.safetensors")
    kinds.convert(ck, st_path)
    with kinds.open_any(st_path) as src:
        assert set(src.metadata) == {"ckptfmt.metadata"}
    back = str(tmp_path / "back")
    kinds.convert(st_path, back)
    assert ckptfmt.open(back).metadata == meta


def test_convert_checks(tmp_path):
    ck = str(tmp_path / "ck")
    ckptfmt.save({"w": np.ones(2, np.float32), "c": np.ones(1, np.complex128)}, ck)
    with pytest.raises(ConversionError, match="complex128"):
        kinds.convert(ck, str(tmp_path / "a.safetensors"))
    assert not (tmp_path / "a.safetensors").exists()  # nothing half-written
    r = kinds.convert(ck, str(tmp_path / "a.safetensors"), skip_unsupported=True)
    assert r.tensors == 1 and r.skipped == (("c", "safetensors cannot hold complex128"),)
    with pytest.raises(CheckpointExistsError):
        kinds.convert(ck, str(tmp_path / "a.safetensors"), skip_unsupported=True)
    with pytest.raises(ConversionError, match="onnx-export"):
        kinds.convert(ck, str(tmp_path / "a.onnx"))


@pytest.mark.torch
def test_convert_bfloat16_through_every_target(tmp_path):
    torch = pytest.importorskip("torch")
    ck = str(tmp_path / "ck")
    ckptfmt.save({"bf": np.arange(4).astype(ml_dtypes.bfloat16), "f8": np.ones(2, ml_dtypes.float8_e4m3fn)}, ck)
    for dst in ("x.safetensors", "x.pt", "x_ck"):
        kinds.convert(ck, str(tmp_path / dst))
        assert kinds.diff_any(ck, str(tmp_path / dst)).identical, dst
    assert torch.load(str(tmp_path / "x.pt"), weights_only=True)["bf"].dtype == torch.bfloat16


@pytest.mark.torch
def test_torch_nested_state_and_metadata(tmp_path):
    torch = pytest.importorskip("torch")
    p = str(tmp_path / "n.pt")
    torch.save({"model": {"layer.weight": torch.ones(2)}, "optimizer": {"state": {0: {"exp_avg": torch.zeros(2)}}}, "epoch": 4}, p)
    with kinds.open_any(p) as src:
        assert src.keys() == ["model/layer.weight", "optimizer/state/0/exp_avg"]
        assert src.metadata == {"epoch": 4}


def test_missing_torch_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "m.pt").write_bytes(b"PK\x03\x04")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(FrameworkNotAvailableError, match=r"ckptfmt\[torch\]"):
        kinds.open_any(tmp_path / "m.pt")
    with pytest.raises(FrameworkNotAvailableError):
        kinds.verify_any(tmp_path / "m.pt")


def test_missing_onnx_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "m.onnx").write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(FrameworkNotAvailableError, match=r"ckptfmt\[onnx\]"):
        kinds.verify_any(tmp_path / "m.onnx")
