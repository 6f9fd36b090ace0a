"""Chunk fingerprints (spec section 10.1): written into a run's store, used by incremental
saves to skip hashing unchanged chunks, checked by verify."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import xxhash

import ckptfmt
from ckptfmt._writer import write_checkpoint
from ckptfmt.format.hashing import get_hash
from ckptfmt.storage.local import LocalStorage

CS = 4096


def _chunk_bytes(path, m, c: int, length: int) -> bytes:
    with open(path / m.files[int(m.chunk_file[c])].path, "rb") as f:
        f.seek(int(m.chunk_offset[c]))
        return f.read(length)


def _state(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((64, 100)).astype(np.float32),  # 25,600 bytes: 7 chunks
        "big_endian": rng.standard_normal(3000).astype(">f8"),  # stored byte-swapped
        "fortran": np.asfortranarray(rng.standard_normal((50, 40))),  # stored in C order
        "tiny": np.arange(3, dtype=np.int16),
        "step": 3,
    }


def test_store_saves_record_the_fingerprint_of_every_stored_chunk(tmp_path):
    ckptfmt.save(_state(), tmp_path / "a", chunk_size=CS, shared_store=True)
    m = ckptfmt.open(tmp_path / "a").manifest
    assert m.fp_alg == "xxh3-128" and len(m.chunk_fps) == 16 * m.num_chunks
    for i in range(m.num_tensors):
        e = m.tensor(i)
        for k in range(e.num_chunks):
            c = e.first_chunk + k
            data = _chunk_bytes(tmp_path / "a", m, c, m.chunk_length(e, k))
            assert get_hash("blake3").digest(data) == m.chunk_hash(c)
            assert xxhash.xxh3_128_digest(data) == m.chunk_fp(c), (e.name, k)


def test_self_contained_saves_have_no_fingerprints(tmp_path):
    ckptfmt.save(_state(), tmp_path / "a", chunk_size=CS)
    m = ckptfmt.open(tmp_path / "a").manifest
    assert m.fp_alg is None and m.chunk_fps is None


def test_incremental_save_hashes_only_changed_chunks_and_is_exact(tmp_path, monkeypatch):
    base = _state()
    ckptfmt.save(base, tmp_path / "p", chunk_size=CS, shared_store=True)
    new = dict(base, w=base["w"].copy(), big_endian=base["big_endian"].copy(), fortran=base["fortran"].copy())
    new["w"][20, 5] = 7.0  # byte 8020: chunk 1 of w
    new["big_endian"][2999] = -1.0  # the last (short) chunk
    new["fortran"][0, 39] = 3.0  # C-order element 39: chunk 0
    from tests.fixtures.test_golden_fp import _count_chunk_hashes

    calls = _count_chunk_hashes(monkeypatch)
    ckptfmt.save(new, tmp_path / "c", parent=tmp_path / "p")
    assert sorted(calls) == sorted([CS, 24000 - 5 * CS, CS])  # three chunks hashed, not all 17
    out = ckptfmt.load(tmp_path / "c")
    for k in ("w", "big_endian", "fortran", "tiny"):
        assert np.array_equal(out[k], new[k]), k
    rep = ckptfmt.verify(tmp_path / "c")
    assert rep.ok and not rep.problems
    m = ckptfmt.open(tmp_path / "c").manifest
    own = set(m.wrote)
    written = {(m.names[i], k) for i in range(m.num_tensors) for k in range(m.tensor(i).num_chunks)
               if int(m.chunk_file[m.tensor(i).first_chunk + k]) in own}
    assert written == {("w", 1), ("big_endian", 5), ("fortran", 0)}


def _forge_fingerprint(path, tensor: str, k: int, fp: bytes) -> None:
    """Rewrite a manifest so chunk k of ``tensor`` records fingerprint ``fp`` (hash recomputed)."""
    mpath = path / "MANIFEST"
    env = msgpack.unpackb(mpath.read_bytes(), raw=False)
    body = msgpack.unpackb(env["body"], raw=False, strict_map_key=False)
    m = ckptfmt.open(path).manifest
    c = m.tensor(m.index_of(tensor)).first_chunk + k
    fps = bytearray(body["chunks"]["fp"])
    fps[16 * c : 16 * c + 16] = fp
    body["chunks"]["fp"] = bytes(fps)
    env["body"] = msgpack.packb(body, use_bin_type=True)
    env["hash"] = get_hash(env["hash_alg"]).digest(env["body"])
    mpath.write_bytes(msgpack.packb(env, use_bin_type=True))


def test_a_forged_parent_fingerprint_is_found_by_verify_and_is_the_documented_trade(tmp_path):
    """Spec 10.1: the writer trusts the parent's fingerprints as it trusts its manifest;
    verify finds a fingerprint that does not match its chunk."""
    base = _state()
    ckptfmt.save(base, tmp_path / "p", chunk_size=CS, shared_store=True)
    new = dict(base, w=base["w"].copy())
    new["w"][0, 0] = 42.0
    _forge_fingerprint(tmp_path / "p", "w", 0, xxhash.xxh3_128_digest(new["w"].tobytes()[:CS]))
    rep = ckptfmt.verify(tmp_path / "p")
    assert not rep.ok and [p.kind for p in rep.errors] == ["fingerprint_mismatch"]
    assert rep.errors[0].tensor == "w" and rep.errors[0].chunk == 0 and "without parent=" in rep.errors[0].message
    assert np.array_equal(ckptfmt.load(tmp_path / "p")["w"], base["w"])  # the data itself is intact
    # Built on anyway, the child records the parent's chunk: what section 10.1 says a
    # collision would do (and why a CheckpointManager builds only on parents it trusts).
    ckptfmt.save(new, tmp_path / "c", parent=tmp_path / "p")
    assert ckptfmt.load(tmp_path / "c")["w"][0, 0] == base["w"][0, 0]
    assert "loads correctly" in rep.errors[0].message  # the parent's own chunk: its data is what it saved
    # ... but the child's verify must not call it correct: its chunk is the parent's, not what was saved
    child = ckptfmt.verify(tmp_path / "c")
    assert not child.ok and [p.kind for p in child.errors] == ["fingerprint_mismatch"]
    assert "instead of what was saved" in child.errors[0].message and "loads correctly" not in child.errors[0].message


def test_a_byte_comparison_overrules_the_fingerprint(tmp_path):
    """Chunks the manager compared and found changed are hashed whatever the fingerprints say."""
    base = _state()
    storage = LocalStorage()
    write_checkpoint(base, str(tmp_path / "p"), storage, chunk_size=CS, shared_store=True)
    new = dict(base, w=base["w"].copy())
    new["w"][0, 0] = 42.0
    _forge_fingerprint(tmp_path / "p", "w", 0, xxhash.xxh3_128_digest(new["w"].tobytes()[:CS]))

    def same_as_parent(name, arr, chunk_size):
        n = -(-arr.nbytes // chunk_size)
        return [not (name == "w" and k == 0) for k in range(n)]

    write_checkpoint(new, str(tmp_path / "c"), storage, parent=str(tmp_path / "p"), same_as_parent=same_as_parent)
    assert ckptfmt.load(tmp_path / "c")["w"][0, 0] == 42.0
    m = ckptfmt.open(tmp_path / "c").manifest
    assert m.chunk_fp(0) == xxhash.xxh3_128_digest(new["w"].tobytes()[:CS])  # its own, recomputed


def test_a_parent_without_fingerprints_still_gives_an_exact_incremental_save(tmp_path):
    """Saved by an older writer (no fp column): every chunk is hashed, the child gets fingerprints."""
    base = _state()
    ckptfmt.save(base, tmp_path / "p", chunk_size=CS, shared_store=True)
    mpath = tmp_path / "p" / "MANIFEST"
    env = msgpack.unpackb(mpath.read_bytes(), raw=False)
    body = msgpack.unpackb(env["body"], raw=False, strict_map_key=False)
    del body["chunks"]["fp"], body["chunks"]["fp_alg"]
    env["body"] = msgpack.packb(body, use_bin_type=True)
    env["hash"] = get_hash(env["hash_alg"]).digest(env["body"])
    mpath.write_bytes(msgpack.packb(env, use_bin_type=True))
    new = dict(base, w=base["w"].copy())
    new["w"][63, 99] = 1.5
    ckptfmt.save(new, tmp_path / "c", parent=tmp_path / "p")
    out = ckptfmt.load(tmp_path / "c")
    assert all(np.array_equal(out[k], new[k]) for k in ("w", "big_endian", "fortran", "tiny"))
    m = ckptfmt.open(tmp_path / "c").manifest
    assert m.fp_alg == "xxh3-128" and len(m.wrote) == 1
    assert ckptfmt.verify(tmp_path / "c").ok


@pytest.mark.parametrize("changed", [0, 1])
def test_manager_incremental_saves_keep_fingerprints_exact(tmp_path, changed):
    state = _state()
    with ckptfmt.CheckpointManager(tmp_path / "run", incremental=True, chunk_size=CS, async_save=True) as mgr:
        mgr.save(1, state)
        new = dict(state, w=state["w"].copy())
        new["w"][0, :changed] += 1
        mgr.save(2, new)
        mgr.wait()
        path = mgr.step_path(2)
    rep = ckptfmt.verify(path)  # recomputes every fingerprint
    assert rep.ok and not rep.problems
    assert np.array_equal(ckptfmt.load(path)["w"], new["w"])
    assert ckptfmt.open(path).manifest.fp_alg == "xxh3-128"
