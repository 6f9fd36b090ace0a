"""Incremental saves, gc, remove and compact: every kept checkpoint stays bit-exact."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ckptfmt

CS = 4096


def _own_bytes(path):
    m = ckptfmt.open(path).manifest
    return sum(m.files[i].size for i in m.own_files())


def test_delta_writes_only_changed_chunks(tmp_path):
    a = np.random.default_rng(0).standard_normal((100, 1024)).astype(np.float32)  # 100 chunks
    p1, p2 = str(tmp_path / "s1"), str(tmp_path / "s2")
    ckptfmt.save({"a": a, "frozen": a.copy()}, p1, chunk_size=CS, shared_store=True)
    b = a.copy()
    b[10:20] += 1  # 10 of 100 chunks of "a"
    ckptfmt.save({"a": b, "frozen": a, "new": np.ones(3)}, p2, parent=p1)
    assert _own_bytes(p2) <= 11 * CS + 64
    r = ckptfmt.open(p2)
    assert r.manifest.parent["name"] == "s1" and r.manifest.parent["depth"] == 1
    out = ckptfmt.load(p2)
    np.testing.assert_array_equal(out["a"], b)
    np.testing.assert_array_equal(out["frozen"], a)
    rep = ckptfmt.verify(p2)
    assert rep.ok and rep.bytes_checked == 2 * a.nbytes + 24
    np.testing.assert_array_equal(ckptfmt.load(p2, mmap=True)["a"], b)  # falls back to copying


def test_delta_needs_a_sibling(tmp_path):
    ckptfmt.save({"a": np.ones(3)}, str(tmp_path / "x" / "p"))
    with pytest.raises(ValueError, match="sibling"):
        ckptfmt.save({"a": np.ones(3)}, str(tmp_path / "y" / "c"), parent=str(tmp_path / "x" / "p"))


def test_verify_catches_damage_in_the_parent_data(tmp_path):
    p1, p2 = str(tmp_path / "s1"), str(tmp_path / "s2")
    a = np.arange(4096, dtype=np.float64)
    ckptfmt.save({"a": a}, p1, chunk_size=CS, shared_store=True)
    ckptfmt.save({"a": a}, p2, parent=p1)
    data = os.path.join(p1, ckptfmt.open(p1).manifest.files[0].path)
    with open(data, "r+b") as f:
        f.seek(5000)
        f.write(b"\xff")
    rep = ckptfmt.verify(p2)
    assert not rep.ok and rep.errors[0].kind == "hash_mismatch" and rep.errors[0].file.startswith("../ckptfmt-store/")


def test_remove_keeps_shared_data_and_gc_frees_it_later(tmp_path):
    p1, p2 = str(tmp_path / "s1"), str(tmp_path / "s2")
    a = np.arange(8192, dtype=np.float64)
    ckptfmt.save({"a": a}, p1, chunk_size=CS, shared_store=True)
    ckptfmt.save({"a": a, "b": np.ones(2)}, p2, parent=p1)
    store = tmp_path / "ckptfmt-store"
    packs = sorted(f for f in os.listdir(store) if f.endswith(".data"))
    ckptfmt.remove(p1)
    assert not os.path.exists(p1) and sorted(f for f in os.listdir(store) if f.endswith(".data")) == packs  # still used
    np.testing.assert_array_equal(ckptfmt.load(p2)["a"], a)
    ckptfmt.compact(p2)
    assert ckptfmt.open(p2).manifest.parent is None
    rep = ckptfmt.gc(tmp_path, grace_seconds=0)
    assert rep.freed_bytes >= a.nbytes and not [f for f in os.listdir(store) if f.endswith(".data")]
    np.testing.assert_array_equal(ckptfmt.load(p2)["a"], a)
    assert ckptfmt.verify(p2).ok


def test_overwrite_of_a_parent_keeps_its_children_loadable(tmp_path):
    p1, p2 = str(tmp_path / "s1"), str(tmp_path / "s2")
    a = np.arange(8192, dtype=np.float64)
    ckptfmt.save({"a": a}, p1, chunk_size=CS, shared_store=True)
    ckptfmt.save({"a": a}, p2, parent=p1)
    ckptfmt.save({"a": -a}, p1, overwrite=True, chunk_size=CS)
    np.testing.assert_array_equal(ckptfmt.load(p2)["a"], a)
    np.testing.assert_array_equal(ckptfmt.load(p1)["a"], -a)


def test_gc_dry_run_and_grace(tmp_path):
    p = tmp_path / "half"
    p.mkdir()
    (p / "data-00000-deadbeef.data").write_bytes(b"x" * 100)
    assert ckptfmt.gc(tmp_path).kept_young  # too young: a save may be writing it
    rep = ckptfmt.gc(tmp_path, grace_seconds=0, dry_run=True)
    assert rep.freed_bytes == 100 and (p / "data-00000-deadbeef.data").exists()
    ckptfmt.gc(tmp_path, grace_seconds=0)
    assert not p.exists()


def test_gc_refuses_when_a_manifest_is_unreadable(tmp_path):
    ckptfmt.save({"a": np.ones(3)}, str(tmp_path / "good"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "MANIFEST").write_bytes(b"garbage")
    (tmp_path / "orphan").mkdir()
    (tmp_path / "orphan" / "data-1-x.data").write_bytes(b"1")
    rep = ckptfmt.gc(tmp_path, grace_seconds=0)
    assert rep.unreadable and not rep.deleted and (tmp_path / "orphan" / "data-1-x.data").exists()


ops = st.lists(
    st.tuples(st.sampled_from(["save", "save_full", "remove", "gc", "compact"]), st.integers(0, 7), st.integers(0, 2**31)),
    min_size=1, max_size=14,
)


@settings(max_examples=25)
@given(ops=ops)
def test_any_sequence_keeps_every_checkpoint_bit_exact(tmp_path_factory, ops):
    root = tmp_path_factory.mktemp("seq")
    expected: dict[str, dict] = {}
    base = np.random.default_rng(0).standard_normal(16 * 1024).astype(np.float32)  # 16 chunks
    last = None
    for i, (op, target, seed) in enumerate(ops):
        if op in ("save", "save_full"):
            rng = np.random.default_rng(seed)
            w = base.copy()
            for c in rng.choice(16, size=rng.integers(0, 4), replace=False):
                w[c * 1024 : (c + 1) * 1024] += 1.0
            state = {"w": w, "b": np.full(3, seed, np.int64)}
            path = str(root / f"c{i}")
            ckptfmt.save(state, path, chunk_size=CS, sync=False, shared_store=op == "save",
                         parent=last if op == "save" and last in expected else None)
            expected[path] = state
            last = path
        elif expected:
            path = sorted(expected)[target % len(expected)]
            if op == "remove":
                ckptfmt.remove(path)
                del expected[path]
            elif op == "compact":
                ckptfmt.compact(path)
            else:
                ckptfmt.gc(root, grace_seconds=0)
        for p, state in expected.items():
            out = ckptfmt.load(p)
            assert out["w"].tobytes() == state["w"].tobytes() and out["b"].tobytes() == state["b"].tobytes()
    ckptfmt.gc(root, grace_seconds=0)
    for p in expected:
        assert ckptfmt.verify(p).ok
    # Everything left on disk is needed by some kept checkpoint.
    left = {os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".data")}
    needed = {os.path.normpath(os.path.join(p, fe.path)) for p in expected for fe in ckptfmt.open(p).manifest.files}
    assert left == needed
