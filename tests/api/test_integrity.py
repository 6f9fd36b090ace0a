"""Corruption is always found and named: tensor, chunk, file and byte offset."""

from __future__ import annotations

import os

import numpy as np
import pytest

import ckptfmt
from ckptfmt.format.spec import MANIFEST_NAME

CS = 4096


@pytest.fixture
def saved(ckdir):
    state = {"a": np.arange(3 * CS // 4, dtype=np.float32), "b": np.arange(100, dtype=np.int64)}
    ckptfmt.save(state, ckdir, chunk_size=CS)
    r = ckptfmt.open(ckdir)
    data = os.path.join(ckdir, r.manifest.files[0].path)
    return ckdir, state, r.manifest, data


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def test_flipped_byte_names_tensor_chunk_file_offset(saved):
    path, _, m, data = saved
    off = int(m.chunk_offset[1])  # tensor a, chunk 1
    _flip(data, off + 10)
    with pytest.raises(ckptfmt.IntegrityError) as ei:
        ckptfmt.load(path)
    msg = str(ei.value)
    assert "'a'" in msg and "chunk 1" in msg and m.files[0].path in msg and f"offset {off}" in msg
    # The untouched tensor still reads, and trusted reads skip the check.
    np.testing.assert_array_equal(ckptfmt.open(path).get("b"), np.arange(100))
    ckptfmt.load(path, verify=False)
    with pytest.raises(ckptfmt.IntegrityError):
        ckptfmt.load(path, mmap=True)
    rep = ckptfmt.verify(path)
    assert not rep.ok
    [p] = rep.errors
    assert (p.kind, p.tensor, p.chunk, p.offset, p.file) == ("hash_mismatch", "a", 1, off, m.files[0].path)


def test_truncated_data_file(saved):
    path, _, m, data = saved
    os.truncate(data, os.path.getsize(data) - 100)
    with pytest.raises(ckptfmt.IntegrityError, match="truncated"):
        ckptfmt.load(path)
    rep = ckptfmt.verify(path)
    assert [p.kind for p in rep.errors] == ["truncated_file"]


def test_extended_data_file(saved):
    path, _, _, data = saved
    with open(data, "ab") as f:
        f.write(b"junk")
    with pytest.raises(ckptfmt.IntegrityError, match="longer than recorded"):
        ckptfmt.load(path)
    assert [p.kind for p in ckptfmt.verify(path).errors] == ["size_mismatch"]


def test_missing_data_file(saved):
    path, _, m, data = saved
    os.remove(data)
    with pytest.raises(ckptfmt.IntegrityError, match="missing"):
        ckptfmt.load(path)
    rep = ckptfmt.verify(path)
    assert not rep.ok and rep.errors[0].kind == "missing_file"
    assert rep.chunks_checked == 0


def test_extra_and_leftover_files_are_warnings(saved):
    path, _, _, _ = saved
    open(os.path.join(path, "notes.txt"), "w").close()
    open(os.path.join(path, ".MANIFEST.tmp-MANIFEST-1234"), "w").close()
    rep = ckptfmt.verify(path)
    assert rep.ok
    assert sorted(p.kind for p in rep.warnings) == ["extra_file", "leftover"]


def test_altered_manifest(saved):
    path, _, _, _ = saved
    mpath = os.path.join(path, MANIFEST_NAME)
    size = os.path.getsize(mpath)
    _flip(mpath, size - 40)  # inside the body
    with pytest.raises(ckptfmt.FormatError):
        ckptfmt.open(path)
    rep = ckptfmt.verify(path)
    assert not rep.ok and rep.errors[0].kind == "manifest"


def test_verify_report_counts_and_json(saved):
    import json

    path, state, m, _ = saved
    rep = ckptfmt.verify(path)
    assert rep.ok and rep.tensors == 2 and rep.chunks_checked == m.num_chunks
    assert rep.bytes_checked == sum(v.nbytes for v in state.values())
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["ok"] is True and d["digest"] == m.hexdigest


def test_verify_of_nothing_raises(tmp_path):
    with pytest.raises(ckptfmt.CheckpointNotFoundError):
        ckptfmt.verify(tmp_path / "nope")


def test_fifos_are_refused_not_waited_on(tmp_path):
    """A named pipe where a file should be must give an error at once, never a hang."""
    ck = tmp_path / "ck"
    ck.mkdir()
    os.mkfifo(ck / "MANIFEST")
    with pytest.raises(ckptfmt.StorageError, match="not a regular file"):
        ckptfmt.open(ck)
    good = str(tmp_path / "good")
    ckptfmt.save({"a": np.ones(4)}, good)
    data = os.path.join(good, ckptfmt.open(good).manifest.files[0].path)
    os.remove(data)
    os.mkfifo(data)
    with pytest.raises(ckptfmt.CkptFmtError):
        ckptfmt.load(good)
    assert not ckptfmt.verify(good).ok


@pytest.mark.parametrize("shared_store", [False, True])
def test_verify_of_chunks_larger_than_its_read_pieces(tmp_path, shared_store):
    """verify reads a large chunk in pieces (256 KiB locally): a byte flipped in a late piece,
    or a file cut inside a chunk, is still found and named."""
    from ckptfmt._verify import _PIECE

    cs = 4 * _PIECE + 4096
    state = {"w": np.random.default_rng(0).standard_normal(3 * cs // 8 - 100)}  # 3 chunks, the last short
    path = tmp_path / "run" / "ck"
    ckptfmt.save(state, path, chunk_size=cs, shared_store=shared_store)
    rep = ckptfmt.verify(path)
    assert rep.ok and rep.chunks_checked == 3 and rep.bytes_checked == state["w"].nbytes
    m = ckptfmt.open(path).manifest
    data = os.path.join(path, m.files[0].path)
    _flip(data, int(m.chunk_offset[1]) + 3 * _PIECE + 17)
    [p] = ckptfmt.verify(path).errors
    assert (p.kind, p.tensor, p.chunk) == ("hash_mismatch", "w", 1)
    _flip(data, int(m.chunk_offset[1]) + 3 * _PIECE + 17)
    os.truncate(data, int(m.chunk_offset[2]) + _PIECE + 5)
    [p] = ckptfmt.verify(path).errors
    assert p.kind == "truncated_file"
