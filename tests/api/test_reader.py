"""The lazy reader: keys, slices that fetch only their chunks, memory maps."""

from __future__ import annotations

import numpy as np
import pytest

import ckptfmt
from ckptfmt.storage.local import LocalStorage

CS = 4096


@pytest.fixture
def saved(ckdir):
    state = {
        "emb": np.arange(1000 * 16, dtype=np.float32).reshape(1000, 16),  # 64 000 B: 16 chunks
        "v": np.arange(7, dtype=np.int16),
        "s": np.float64(2.5),
        "e": np.zeros((0, 4), np.float32),
        "nested": {"list": [np.ones(3, np.uint8), "text"]},
    }
    ckptfmt.save(state, ckdir, chunk_size=CS, metadata={"step": 1})
    return ckdir, state


class CountingStorage(LocalStorage):
    """Records every ranged read so tests can see what a call fetched."""

    def __init__(self):
        self.reads = []

    def open_read(self, path):
        h = super().open_read(path)
        reads = self.reads
        orig = h.readinto

        def readinto(offset, buf):
            reads.append((offset, len(buf)))
            return orig(offset, buf)

        h.readinto = readinto
        return h


def test_keys_info_metadata_tree(saved):
    path, _ = saved
    with ckptfmt.open(path) as r:
        assert r.keys() == ["emb", "v", "s", "e", "nested/list/0"]
        assert len(r) == 5 and "emb" in r and "nope" not in r
        info = r.info("emb")
        assert (info.dtype, info.shape, info.nbytes, info.num_chunks) == ("float32", (1000, 16), 64000, 16)
        assert r.metadata == {"step": 1}
        tree = r.tree
        assert tree["nested"]["list"][1] == "text" and tree["v"].name == "v"
        assert "CheckpointReader" in repr(r)


def test_missing_tensor_error_names_it(saved):
    path, _ = saved
    with pytest.raises(ckptfmt.TensorNotFoundError, match="no tensor 'nope'") as ei:
        ckptfmt.open(path).get("nope")
    assert isinstance(ei.value, KeyError)


@pytest.mark.parametrize(
    "index",
    [np.s_[5], np.s_[-1], np.s_[10:20], np.s_[990:], np.s_[::97], np.s_[500:100:-3], np.s_[3, 2:5], np.s_[7:7],
     np.s_[..., 1], np.s_[[1, 5, 9]], np.s_[None, 2], np.s_[999, -1]],
)
def test_slices_match_numpy(saved, index):
    path, state = saved
    got = ckptfmt.open(path).slice("emb")[index]
    np.testing.assert_array_equal(got, state["emb"][index])


def test_slice_reads_only_touched_chunks(saved):
    path, state = saved
    storage = CountingStorage()
    r = ckptfmt.open(path, storage=storage)
    np.testing.assert_array_equal(r.slice("emb")[100:110], state["emb"][100:110])
    # rows 100..110 are bytes 6400..7040: inside chunk 1 only.
    assert storage.reads == [(r.manifest.chunk_offset[r.info("emb").first_chunk + 1], CS)]


def test_get_reads_only_that_tensor(saved):
    path, _ = saved
    storage = CountingStorage()
    r = ckptfmt.open(path, storage=storage)
    r.get("v")
    assert len(storage.reads) == 1 and storage.reads[0][1] == 14


def test_index_errors(saved):
    path, _ = saved
    with pytest.raises(IndexError):
        ckptfmt.open(path).slice("emb")[1000]


def test_mmap_is_zero_copy_and_read_only(saved):
    path, state = saved
    r = ckptfmt.open(path)
    a = r.get("emb", mmap=True)
    assert not a.flags.writeable and not a.flags.owndata
    np.testing.assert_array_equal(a, state["emb"])
    r.close()
    np.testing.assert_array_equal(a, state["emb"])  # the mapping outlives the reader


def test_verify_false_skips_hashing(saved, monkeypatch):
    path, state = saved
    from ckptfmt.format import hashing

    calls = []
    real = hashing.HASH_ALGORITHMS["blake3"]
    monkeypatch.setitem(hashing.HASH_ALGORITHMS, "blake3", hashing.HashAlgorithm("blake3", 32, lambda d: calls.append(1) or real.digest(d)))
    r = ckptfmt.open(path, verify=False)
    n = len(calls)  # the manifest's own hash is always checked
    np.testing.assert_array_equal(r.get("emb"), state["emb"])
    assert len(calls) == n
    r.get("emb", verify=True)
    assert len(calls) == n + 16


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ckptfmt.CheckpointNotFoundError, match="no checkpoint"):
        ckptfmt.open(tmp_path / "missing")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "data-00000-abcd.data").write_bytes(b"x")
    with pytest.raises(ckptfmt.CheckpointNotFoundError, match="interrupted") as ei:
        ckptfmt.load(tmp_path / "half")
    assert isinstance(ei.value, FileNotFoundError)
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(ckptfmt.CheckpointNotFoundError):
        ckptfmt.open(tmp_path / "file")


def test_large_tensor_parallel_load(ckdir):
    a = np.random.default_rng(1).standard_normal((5000, 2000), dtype=np.float32)  # 40 MB, many batches
    ckptfmt.save({"a": a, "b": a[:10].copy()}, ckdir, chunk_size=1 << 20)
    out = ckptfmt.load(ckdir)
    np.testing.assert_array_equal(out["a"], a)
