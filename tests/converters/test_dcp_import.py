"""The DCP ``.metadata`` reader: an allow-list of inert records. Any bytes raise FormatError
(never run anything, never another exception); real metadata from DCP itself reads back."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ckptfmt
from ckptfmt.errors import FormatError

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

import torch.distributed.checkpoint as dcp  # noqa: E402

from ckptfmt.converters._dcp_import import ALLOWED_GLOBALS, dcp_import, read_dcp_metadata  # noqa: E402


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A checkpoint written by DCP's own FileSystemWriter in one process."""
    path = str(tmp_path_factory.mktemp("dcpfs") / "ck")
    state = {"m": {"w": torch.arange(12.0).reshape(3, 4), "h": torch.ones(5, dtype=torch.float16)},
             "step": 4, "groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(path))
    with open(os.path.join(path, ".metadata"), "rb") as f:
        return path, f.read()


def test_real_metadata_reads_back_as_plain_data(written):
    md = read_dcp_metadata(written[0])
    assert md.tensors["m.w"].shape == (3, 4) and md.tensors["m.h"].dtype == "float16"
    assert set(md.bytes_items) == {"step", "groups.0.lr", "groups.0.betas"}
    assert md.mappings["groups.0.betas"] == ("groups", 0, "betas")


def test_import_keeps_nesting_and_plain_values(written, tmp_path):
    dst = str(tmp_path / "out")
    dcp_import(written[0], dst)
    got = ckptfmt.load(dst)
    assert got["m"]["w"].tolist() == np.arange(12.0).reshape(3, 4).tolist()
    assert got["step"] == 4 and got["groups"] == [{"lr": 0.1, "betas": (0.9, 0.99)}]


def test_a_pickled_object_item_is_refused(tmp_path):
    from fractions import Fraction

    path = str(tmp_path / "ck")
    dcp.save({"w": torch.ones(2), "f": Fraction(1, 3)}, storage_writer=dcp.FileSystemWriter(path))
    with pytest.raises(FormatError, match="weights_only"):
        dcp_import(path, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("glob", ["os.system", "builtins.eval", "torch.load", "torch.distributed.checkpoint.metadata.Metadata.__init__"])
def test_globals_outside_the_allow_list_are_refused(tmp_path, glob):
    module, _, name = glob.rpartition(".")
    payload = b"\x80\x04" + b"c" + module.encode() + b"\n" + name.encode() + b"\n" + b"X\x01\x00\x00\x00x\x85R."
    d = tmp_path / "ck"
    d.mkdir()
    (d / ".metadata").write_bytes(payload)
    with pytest.raises(FormatError, match="refused"):
        read_dcp_metadata(str(d))


def test_the_allow_list_is_small_and_holds_no_callable_from_torch():
    assert len({k for k in ALLOWED_GLOBALS if not (k[0] == "torch" and k[1] not in ("Size",))}) <= 20
    for value in ALLOWED_GLOBALS.values():
        assert getattr(value, "__module__", "").split(".")[0] != "torch"


def _check(data: bytes, tmp_dir: str) -> None:
    os.makedirs(tmp_dir, exist_ok=True)
    with open(os.path.join(tmp_dir, ".metadata"), "wb") as f:
        f.write(data)
    try:
        read_dcp_metadata(tmp_dir)
    except FormatError:
        pass


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=500))
def test_any_bytes_raise_only_format_error(tmp_path_factory, data):
    _check(data, str(tmp_path_factory.mktemp("r")))


@settings(max_examples=100, deadline=None)
@given(pos=st.integers(0, 1 << 20), flip=st.integers(1, 255), cut=st.booleans())
def test_damaged_real_metadata_raises_only_format_error(written, tmp_path_factory, pos, flip, cut):
    data = bytearray(written[1])
    pos %= len(data)
    if cut:
        data = data[:pos]
    else:
        data[pos] ^= flip
    _check(bytes(data), str(tmp_path_factory.mktemp("d")))


_BOUNDED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
from ckptfmt.errors import FormatError
from ckptfmt.converters._dcp_import import read_dcp_metadata
try:
    read_dcp_metadata(sys.argv[1])
except FormatError as e:
    print("FormatError:", e)
"""


@pytest.mark.parametrize("op", [b"r\x00\xca\x9a;", b"p1000000000\n"], ids=["LONG_BINPUT", "PUT"])
def test_a_forged_memo_index_is_refused_before_any_allocation(tmp_path, op):
    """A 1e9 memo index makes the C unpickler allocate its memo array (GBs) before find_class."""
    import subprocess
    import sys

    d = tmp_path / "ck"
    d.mkdir()
    (d / ".metadata").write_bytes(b"\x80\x02]" + op + b".")
    out = subprocess.run([sys.executable, "-c", _BOUNDED, str(d)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "FormatError:" in out.stdout and "memo index" in out.stdout, out.stdout


def _rewrite_metadata(written, tmp_path, change):
    import pickle
    import shutil

    d = tmp_path / "ck"
    shutil.copytree(written[0], d)
    md = pickle.loads(written[1])  # our own file, written by DCP in this test module
    change(md)
    (d / ".metadata").write_bytes(pickle.dumps(md))
    return str(d)


@pytest.mark.parametrize("index", [2, 10**6, 10**13])
def test_a_sparse_list_index_in_planner_data_is_refused(written, tmp_path, index):
    """An int in a key path is a list index: 10**13 made the import build a list of that length."""
    d = _rewrite_metadata(written, tmp_path, lambda md: md.planner_data.__setitem__("groups.0.lr", ("groups", index, "lr")))
    with pytest.raises(FormatError, match="dense lists"):
        read_dcp_metadata(d)
    assert not os.path.exists(tmp_path / "out")
    with pytest.raises(FormatError, match="dense lists"):
        dcp_import(d, str(tmp_path / "out"))


def test_dense_list_indices_and_the_dcp_manifest_reader_refuse_sparse_paths():
    from ckptfmt.dcp import _plain_mappings
    from ckptfmt.format.tree import dense_list_indices

    assert dense_list_indices([("g", 0, "lr"), ("g", 0, "b"), ("g", 1, "lr"), ("s",)]) is None
    assert "index 2" in dense_list_indices([("g", 0), ("g", 2)])
    assert "negative" in dense_list_indices([("g", -1)])
    assert _plain_mappings({"g.0": ["g", 0], "g.1": ["g", 1]}) == {"g.0": ("g", 0), "g.1": ("g", 1)}
    assert _plain_mappings({"g.0": ["g", 10**13]}) is None


@pytest.mark.parametrize("value", [5, 2.5])
def test_a_malformed_offset_is_format_error_not_type_error(written, tmp_path, value):
    """A MetadataIndex offset or chunk offset that is not a sequence of ints (fuzz item 598)."""

    def change(md):
        key = next(k for k in md.storage_data if k.fqn == "m.w")
        info = md.storage_data.pop(key)
        object.__setattr__(key, "offset", value)
        md.storage_data[key] = info

    d = _rewrite_metadata(written, tmp_path, change)
    with pytest.raises(FormatError, match="torch.Size"):
        read_dcp_metadata(d)


def test_a_malformed_chunk_offset_is_format_error_not_type_error(written, tmp_path):
    def change(md):
        chunk = md.state_dict_metadata["m.w"].chunks[0]
        object.__setattr__(chunk, "offsets", ([0], 0))

    d = _rewrite_metadata(written, tmp_path, change)
    with pytest.raises(FormatError, match="offsets/sizes"):
        read_dcp_metadata(d)


def _many_chunks(n, overlap=False):
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    def change(md):
        t = md.state_dict_metadata["m.h"]
        info = md.storage_data.pop(MetadataIndex("m.h", torch.Size([0])))
        t.size = torch.Size([n])
        offs = list(range(n))
        if overlap:
            offs[n // 2] = n // 2 + 1  # two chunks at n//2 + 1, none at n//2
        t.chunks = [ChunkStorageMetadata(offsets=torch.Size([o]), sizes=torch.Size([1])) for o in offs]
        for o in offs:
            md.storage_data[MetadataIndex("m.h", torch.Size([o]))] = info

    return change


_TIMED = """
import sys, time
from ckptfmt.errors import FormatError
from ckptfmt.converters._dcp_import import read_dcp_metadata
t0 = time.perf_counter()
try:
    md = read_dcp_metadata(sys.argv[1])
    print("chunks", len(md.tensors["m.h"].chunks))
except FormatError as e:
    print("FormatError:", e)
print("seconds", time.perf_counter() - t0)
"""


@pytest.mark.parametrize("overlap", [False, True])
def test_many_chunks_are_checked_by_a_sweep_not_every_pair(written, tmp_path, overlap):
    """20000 one-element chunks: every pair (2e8) took minutes; the sweep takes well under a second."""
    import subprocess
    import sys

    d = _rewrite_metadata(written, tmp_path, _many_chunks(20000, overlap))
    out = subprocess.run([sys.executable, "-c", _TIMED, d], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    if overlap:
        assert "FormatError:" in out.stdout and "chunk at [10001]" in out.stdout and "overlap" in out.stdout, out.stdout
    else:
        assert "chunks 20000" in out.stdout, out.stdout


def test_a_huge_shape_is_refused_before_allocating(written, tmp_path):
    """A 1e6 x 1e6 tensor in one chunk backed by a few hundred bytes: refused, not np.empty(3.6 TiB)."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    n = 10**6

    def change(md):
        t = md.state_dict_metadata["m.w"]
        info = md.storage_data.pop(MetadataIndex("m.w", torch.Size([0, 0])))
        t.size = torch.Size([n, n])
        t.chunks = [ChunkStorageMetadata(offsets=torch.Size([0, 0]), sizes=torch.Size([n, n]))]
        md.storage_data[MetadataIndex("m.w", torch.Size([0, 0]))] = info

    d = _rewrite_metadata(written, tmp_path, change)
    with pytest.raises(FormatError, match="needs 4000000000000 bytes"):
        read_dcp_metadata(d)
