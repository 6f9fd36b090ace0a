"""Many small tensors: the batched load, the one-chunk get path and its read-ahead, the
writer's one-chunk path. Each must give exactly what the general paths give and find
and name corruption the same way."""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest

import ckptfmt
from ckptfmt.format.tree import decode_tree


def _state(n: int = 200) -> dict:
    rng = np.random.default_rng(1)
    dtypes = [np.float32, np.int64, np.float16, np.uint8, np.bool_, np.complex128, ml_dtypes.bfloat16]
    state: dict = {"layers": {}, "step": 3, "big": rng.standard_normal(40_000).astype(np.float32)}
    for i in range(n):
        dt = dtypes[i % len(dtypes)]
        shape = [(), (0,), (5,), (2, 3), (7, 1, 2)][i % 5]
        state["layers"][f"l{i}/w~"] = rng.standard_normal(shape).astype(dt)
    state["layers"]["strided"] = np.arange(40, dtype=np.float32)[::2]  # not contiguous
    state["layers"]["bigendian"] = np.arange(6, dtype=">i4").reshape(2, 3)
    state["layers"]["fortran"] = np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4))
    return state


def _equal(a, b) -> None:
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _equal(a[k], b[k])
    elif isinstance(a, np.ndarray):
        assert a.dtype.newbyteorder("=") == b.dtype.newbyteorder("=") and a.shape == b.shape
        assert np.array_equal(a.astype(a.dtype.newbyteorder("=")), b), (a, b)
        assert b.flags.writeable and b.flags.c_contiguous
    else:
        assert a == b


@pytest.fixture
def saved(tmp_path):
    path = str(tmp_path / "ck")
    state = _state()
    ckptfmt.save(state, path, chunk_size=4096)
    return path, state


def test_load_and_get_match_the_state(saved):
    path, state = saved
    _equal(state, ckptfmt.load(path))
    _equal(state, ckptfmt.load(path, verify=False))
    with ckptfmt.open(path) as r:
        got = {k: r.get(k) for k in r.keys()}  # in order: the read-ahead path
        names = r.keys()
    with ckptfmt.open(path) as r:
        backwards = {k: r.get(k) for k in reversed(names)}  # never in order: no read-ahead
    flat = {f"layers/{k.replace('~', '~0').replace('/', '~1')}": v for k, v in state["layers"].items()}
    flat["big"] = state["big"]
    for k, v in flat.items():
        _equal(v, got[k])
        _equal(v, backwards[k])


def test_loaded_small_tensors_do_not_share_memory(saved):
    path, _ = saved
    out = ckptfmt.load(path)
    a, b = out["layers"]["l2/w~"], out["layers"]["l7/w~"]
    a[...] = 0
    assert not np.shares_memory(a, b) and a.base is None


@pytest.mark.parametrize("how", ["load", "get in order", "get one"])
def test_corrupt_small_tensor_is_named(saved, how):
    path, _ = saved
    r = ckptfmt.open(path)
    name = "layers/l150~1w~0"
    e = r.info(name)
    assert e.num_chunks == 1
    off = int(r.manifest.chunk_offset[e.first_chunk])
    data = os.path.join(path, r.manifest.files[0].path)
    with open(data, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(ckptfmt.IntegrityError, match=rf"'{name}', chunk 0 .* offset {off}"):
        if how == "load":
            ckptfmt.load(path)
        elif how == "get one":
            with ckptfmt.open(path) as r2:
                for k in r2.keys()[:100]:
                    r2.get(k)  # past the threshold where the column path starts
                r2.get(name)
        else:
            with ckptfmt.open(path) as r2:
                for k in r2.keys():
                    r2.get(k)
    ckptfmt.load(path, verify=False)  # trusted reads skip the check


def test_truncated_file_is_reported_by_every_path(saved):
    path, _ = saved
    r = ckptfmt.open(path)
    data = os.path.join(path, r.manifest.files[0].path)
    os.truncate(data, os.path.getsize(data) // 2)
    with pytest.raises(ckptfmt.IntegrityError, match="truncated"):
        ckptfmt.load(path)
    with pytest.raises(ckptfmt.IntegrityError, match="truncated"):
        with ckptfmt.open(path) as r2:
            for k in r2.keys():
                r2.get(k)


def test_file_shrunk_after_open_is_an_integrity_error(saved):
    """The size is checked when a file is first opened; a file cut afterwards still gives
    our error from the batched and the one-chunk paths, not a short or garbage tensor."""
    path, _ = saved
    with ckptfmt.open(path) as r:
        r.get("big")  # opens the data file
        data = os.path.join(path, r.manifest.files[0].path)
        os.truncate(data, 4096)
        with pytest.raises(ckptfmt.IntegrityError):
            r.load()
        with pytest.raises(ckptfmt.IntegrityError):
            for k in r.keys()[::-1]:
                r.get(k)


def test_incremental_save_of_many_small_tensors(tmp_path):
    state = _state(100)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    ckptfmt.save(state, a, shared_store=True)  # 1.2: only data in the run's store is shared
    state["layers"]["l3/w~"] = state["layers"]["l3/w~"] + 1
    ckptfmt.save(state, b, parent=a)
    with ckptfmt.open(b) as r:
        s = r.sharing()
    assert 0 < s["own_bytes"] < 200 and s["shared_bytes"] > 100_000
    _equal(state, ckptfmt.load(b))
    assert ckptfmt.verify(b).ok


def test_tree_errors_still_name_the_path():
    node = ["d", ["a/b", "x"], [["d", ["c~"], [["t", 5]]], ["t", 0]]]
    with pytest.raises(ckptfmt.FormatError, match=r"at 'a~1b/c~0'.*tensor index out of range"):
        decode_tree(node, 1, lambda i: i)
    assert decode_tree(["d", ["a"], [["t", 0]]], 1, lambda i: ("leaf", i)) == {"a": ("leaf", 0)}
