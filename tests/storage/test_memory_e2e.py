"""Every layer above Storage runs on MemoryStorage, written only against the interface.

If save, overwrite, incremental saves, remove, gc, compact, the manager or the lock made a
filesystem call behind the seam, these tests would find nothing in memory (or a stray file
on disk).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import ckptfmt
from ckptfmt.manager import CheckpointManager, history
from ckptfmt.storage.memory import MemoryStorage

CS = 4096


def _state(step: int) -> dict:
    w = np.arange(16 * 1024, dtype=np.float32)
    w[(step % 16) * 1024 : (step % 16 + 1) * 1024] += step
    return {"w": w, "step": step}


def _same(out, step):
    return out["step"] == step and out["w"].tobytes() == _state(step)["w"].tobytes()


@pytest.fixture
def mem(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything written to disk by mistake would land here
    s = MemoryStorage()
    s.makedirs("/run")
    yield s
    assert os.listdir(tmp_path) == [], "something went around the Storage interface"


def test_save_overwrite_incremental_remove_gc_compact(mem):
    ckptfmt.save(_state(1), "/run/a", chunk_size=CS, shared_store=True, storage=mem)
    ckptfmt.save(_state(2), "/run/b", parent="/run/a", storage=mem)
    ckptfmt.save(_state(9), "/run/plain", chunk_size=CS, storage=mem)
    ckptfmt.save(_state(3), "/run/plain", chunk_size=CS, overwrite=True, storage=mem)
    assert len([n for n in mem.listdir("/run/plain") if n.endswith(".data")]) == 1  # the old data went
    assert _same(ckptfmt.load("/run/b", storage=mem), 2) and _same(ckptfmt.load("/run/plain", storage=mem), 3)
    own = ckptfmt.open("/run/b", storage=mem).manifest
    assert len(own.wrote) < len(own.files)  # b shares a's data
    ckptfmt.remove("/run/a", storage=mem)
    assert not mem.exists("/run/a") and _same(ckptfmt.load("/run/b", storage=mem), 2)
    assert ckptfmt.verify("/run/b", storage=mem).ok
    ckptfmt.compact("/run/b", storage=mem)
    rep = ckptfmt.gc("/run", grace_seconds=0, storage=mem)
    assert rep.deleted and mem.listdir("/run/ckptfmt-store") == ["STORE"]
    assert _same(ckptfmt.load("/run/b", storage=mem), 2)
    ckptfmt.compact("/run/b", to="/run/copy", storage=mem)
    assert ckptfmt.verify("/run/copy", storage=mem).ok


def test_manager_and_lock(mem):
    with CheckpointManager("/run", max_to_keep=2, chunk_size=CS, storage=mem) as m:
        with pytest.raises(ckptfmt.CheckpointLockedError):
            CheckpointManager("/run", storage=mem)
        with pytest.raises(ckptfmt.CheckpointLockedError):
            ckptfmt.gc("/run", storage=mem, timeout=0)
        for s in range(1, 7):
            m.save(s, _state(s))
        assert m.all_steps() == [5, 6] and _same(m.restore(), 6)
    assert [e.depth for e in history("/run", storage=mem)] == [4, 5]
    packs = [n for n in mem.listdir("/run/ckptfmt-store") if n.endswith(".data")]
    need = {f.path for s in (5, 6) for f in ckptfmt.open(f"/run/step-{s}", storage=mem).manifest.files}
    assert {f"../ckptfmt-store/{p}" for p in packs} == need  # retention freed everything else
    with CheckpointManager("/run", max_to_keep=2, chunk_size=CS, storage=mem) as m:
        m.save(7, _state(7))
        assert m.all_steps() == [6, 7]
