"""Round trips: whatever goes in comes back bit-exact, with the same tree shape."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import ckptfmt
from ckptfmt.format.dtypes import DTYPE_NAMES, numpy_dtype

CS = 4096  # small chunks so multi-chunk tensors are cheap


def assert_same_tree(a, b):
    assert type(a) is type(b) or (isinstance(a, np.generic) and isinstance(b, np.ndarray))
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same_tree(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tree(x, y)
    elif isinstance(a, (np.ndarray, np.generic)):
        a = np.asarray(a)
        assert b.dtype.name == a.dtype.newbyteorder("=").name
        assert b.shape == a.shape
        assert a.tobytes() == b.astype(a.dtype).tobytes()  # bit-exact, NaNs included
    else:
        assert a == b and type(a) is type(b)


def _arrays():
    def for_dtype(name):
        dt = numpy_dtype(name)
        shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=9)
        # Random bytes reinterpreted: every bit pattern (NaN payloads, subnormals, -0) must survive.
        return shapes.flatmap(
            lambda shp: st.binary(min_size=int(np.prod(shp)) * dt.itemsize, max_size=int(np.prod(shp)) * dt.itemsize).map(
                lambda raw: np.frombuffer(raw, dtype=dt).reshape(shp).copy()
            )
        )

    return st.sampled_from(DTYPE_NAMES).flatmap(for_dtype)


plain = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 63), (1 << 64) - 1), st.floats(allow_nan=False), st.text(max_size=8), st.binary(max_size=8))
keys = st.one_of(st.text(min_size=1, max_size=6), st.integers(0, 50))
trees = st.recursive(
    st.one_of(_arrays(), plain),
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.lists(kids, max_size=3).map(tuple), st.dictionaries(keys, kids, max_size=4)),
    max_leaves=12,
)


def _names_unique(tree) -> bool:
    # keys 1 and "1" in one dict would give two tensors the same name: a documented error.
    if isinstance(tree, dict):
        if len({str(k) for k in tree}) != len(tree):
            return False
        return all(_names_unique(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return all(_names_unique(v) for v in tree)
    return True


@given(tree=trees)
def test_any_tree_round_trips_bit_exact(tmp_path_factory, tree):
    if not _names_unique(tree):
        return
    path = str(tmp_path_factory.mktemp("rt") / "ck")
    ckptfmt.save({"root": tree}, path, chunk_size=CS, sync=False)
    assert_same_tree({"root": tree}, ckptfmt.load(path))
    assert_same_tree({"root": tree}, ckptfmt.load(path, mmap=True))
    assert ckptfmt.verify(path).ok


@pytest.mark.parametrize("name", DTYPE_NAMES)
def test_every_dtype_multi_chunk(ckdir, name):
    dt = numpy_dtype(name)
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=3 * CS + 17 * dt.itemsize, dtype=np.uint8)
    arr = raw.view(dt).reshape(-1)
    state = {"x": arr, "scalar": arr[:1].reshape(()).copy(), "empty": arr[:0].reshape(0, 3)}
    ckptfmt.save(state, ckdir, chunk_size=CS)
    out = ckptfmt.load(ckdir)
    for k in state:
        assert out[k].dtype == state[k].dtype and out[k].shape == state[k].shape
        assert out[k].tobytes() == state[k].tobytes()


def test_big_endian_and_strided_inputs_are_stored_little_endian(ckdir):
    base = np.arange(4000, dtype=">f8").reshape(40, 100)
    state = {"be": base, "t": base.T, "step": base[::3, ::7], "neg": base[::-1], "f": np.asfortranarray(base)}
    ckptfmt.save(state, ckdir, chunk_size=CS)
    out = ckptfmt.load(ckdir)
    for k, v in state.items():
        assert out[k].dtype == np.dtype("<f8")
        np.testing.assert_array_equal(out[k], v)


def test_huge_rows_non_contiguous(ckdir):
    a = np.arange(3 * 5 * 3000, dtype=np.float32).reshape(3, 5, 3000)[:, :, ::2]  # rows > chunk
    ckptfmt.save({"a": a}, ckdir, chunk_size=CS)
    np.testing.assert_array_equal(ckptfmt.load(ckdir)["a"], a)


def test_shared_arrays_stored_once_and_loaded_tied(ckdir):
    w = np.arange(10.0)
    ckptfmt.save({"enc": {"w": w}, "dec": {"w": w}, "other": w.copy()}, ckdir)
    r = ckptfmt.open(ckdir)
    assert r.keys() == ["enc/w", "other"]
    out = r.load()
    assert out["enc"]["w"] is out["dec"]["w"]
    assert out["other"] is not out["enc"]["w"]


def test_numpy_scalars_and_plain_values(ckdir):
    state = {"f": np.float32(1.5), "b": np.bool_(True), "s": np.str_("text"), "bf": ml_dtypes.bfloat16(2.0), "n": None}
    ckptfmt.save(state, ckdir)
    out = ckptfmt.load(ckdir)
    assert out["f"].shape == () and out["f"].dtype == np.float32 and out["f"] == 1.5
    assert out["bf"].dtype == ml_dtypes.bfloat16
    assert out["s"] == "text" and type(out["s"]) is str
    assert out["n"] is None


def test_metadata_and_identity(ckdir):
    digest = ckptfmt.save({"a": np.ones(3)}, ckdir, metadata={"step": 10, "tags": ["x"], "blob": b"\0"})
    r = ckptfmt.open(ckdir)
    assert r.metadata == {"step": 10, "tags": ["x"], "blob": b"\0"}
    assert r.digest == digest and ckptfmt.verify(ckdir).digest == digest
    assert r.manifest.producer["library"] == "ckptfmt"


def test_colliding_names_are_refused(ckdir):
    with pytest.raises(ckptfmt.FormatError, match="named '1'"):
        ckptfmt.save({1: np.ones(1), "1": np.ones(1)}, ckdir)


def test_unsupported_leaf_leaves_nothing_behind(ckdir):
    import os

    with pytest.raises(ckptfmt.UnsupportedDtypeError, match="'a/b'"):
        ckptfmt.save({"a": {"b": np.array(["x"], dtype=object)}}, ckdir)
    assert not os.path.exists(ckdir) or not os.listdir(ckdir)


def test_memmap_source_is_streamed(ckdir, tmp_path):
    mm = np.memmap(tmp_path / "src.bin", dtype=np.float32, mode="w+", shape=(300, 1000))
    mm[:] = np.arange(300000, dtype=np.float32).reshape(300, 1000)
    mm.flush()
    ckptfmt.save({"mm": mm}, ckdir, chunk_size=CS)
    np.testing.assert_array_equal(ckptfmt.load(ckdir)["mm"], mm)
