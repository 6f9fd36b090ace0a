"""Issue 10, second round: the defects an adversarial review found in the run-directory layout.

Each test is numbered after REVIEW10.md and failed before its fix.
"""

from __future__ import annotations

import errno
import glob
import os
import shutil
import threading
import time
import warnings

import numpy as np
import pytest

import ckptfmt
from ckptfmt._writer import DeferredTensor
from ckptfmt.manager import CheckpointManager
from ckptfmt.storage.local import LocalStorage

CS = 4096


def _w(seed: int, n: int = 64 * 1024) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


# 1. recover() while a save of the same manager writes the store.
def test_1_recover_during_a_save_waits_for_it(tmp_path):
    box: dict = {}

    class RecoverMidway(LocalStorage):
        def open_write(self, path, *, durable=True):
            h = super().open_write(path, durable=durable)
            if "pack-" in path and "thread" not in box:
                t = box["thread"] = threading.Thread(target=box["mgr"].recover, kwargs={"grace_seconds": 0})
                t.start()
                t.join(0.5)  # before the fix it ran at once and deleted this file
            return h

    with CheckpointManager(tmp_path, storage=RecoverMidway(), chunk_size=CS, async_save=True) as m:
        box["mgr"] = m
        m.save(1, {"w": _w(1)})
        m.wait()
        box["thread"].join(10)
        assert ckptfmt.verify(m.step_path(1)).ok
        assert ckptfmt.load(m.step_path(1))["w"].tobytes() == _w(1).tobytes()


def test_1_a_save_whose_own_data_vanished_before_commit_fails(tmp_path):
    class RmOwnPack(LocalStorage):
        def makedirs(self, path):  # the checkpoint's directory is made just before the commit
            if path == str(tmp_path / "ck"):
                for p in glob.glob(str(tmp_path / "ckptfmt-store" / "pack-*")):
                    os.remove(p)
            return super().makedirs(path)

    with pytest.raises(ckptfmt.IntegrityError, match="written by this save, was deleted"):
        ckptfmt.save({"w": _w(1)}, tmp_path / "ck", shared_store=True, storage=RmOwnPack())
    assert not (tmp_path / "ck" / "MANIFEST").exists()


# 2. A checkpoint whose MANIFEST is a symbolic link: gc deletes nothing it might use.
def test_2_a_linked_manifest_stops_deletion(tmp_path):
    ckptfmt.save({"w": _w(1)}, tmp_path / "step-1", shared_store=True)
    m = tmp_path / "step-1" / "MANIFEST"
    os.rename(m, tmp_path / "saved.MANIFEST")
    os.symlink("../saved.MANIFEST", m)
    rep = ckptfmt.gc(tmp_path, grace_seconds=0)
    assert rep.deleted == () and rep.unreadable == (str(tmp_path / "step-1"),)
    assert ckptfmt.verify(tmp_path / "step-1").ok


# 3. A self-contained overwrite racing a remove of the same path never reports a broken success.
@pytest.mark.parametrize("user_file", [True, False])
def test_3_overwrite_racing_remove(tmp_path, user_file):
    ck = tmp_path / "ck"
    ckptfmt.save({"a": np.ones(10)}, ck)
    if user_file:
        (ck / "README.txt").write_text("user note")

    def late():
        ckptfmt.remove(ck)  # "another process", deterministically in the middle of the save
        return np.full(1000, 2.0)

    state = {"a": np.arange(1000.0), "b": DeferredTensor((1000,), np.dtype("float64"), late)}
    try:
        ckptfmt.save(state, ck, overwrite=True)
    except ckptfmt.CkptFmtError:
        assert not (ck / "MANIFEST").exists()
        return
    assert ckptfmt.verify(ck).ok
    out = ckptfmt.load(ck)
    assert out["a"].tobytes() == np.arange(1000.0).tobytes() and out["b"].tobytes() == np.full(1000, 2.0).tobytes()


# 4. A step directory that is a symbolic link is listed and restored, never deleted.
def test_4_a_linked_step_is_restored_not_skipped(tmp_path):
    run, other = tmp_path / "run", tmp_path / "other"
    other.mkdir()
    with CheckpointManager(run, incremental=False, chunk_size=CS) as m:
        for s in (1, 2, 3):
            m.save(s, {"w": np.full(3, float(s))})
    shutil.move(run / "step-3", other / "step-3")
    os.symlink(other / "step-3", run / "step-3")
    with CheckpointManager(run, incremental=False, max_to_keep=1, chunk_size=CS) as m:
        assert m.all_steps() == [1, 2, 3] and m.latest_step() == 3
        assert m.restore()["w"][0] == 3.0
        m.save(4, {"w": np.full(3, 4.0)})
        assert m.all_steps() == [3, 4]  # retention dropped 1 and 2, never the link
    assert os.path.islink(run / "step-3") and ckptfmt.verify(other / "step-3").ok


# 5. A damaged parent is never built upon.
def test_5_a_rotten_parent_gets_a_full_save(tmp_path):
    w = _w(0, 100_000)
    with CheckpointManager(tmp_path, max_to_keep=10, chunk_size=1 << 16) as m:
        m.save(1, {"w": w})
        pack = glob.glob(str(tmp_path / "ckptfmt-store" / "pack-*"))[0]
        with open(pack, "r+b") as f:
            f.seek(100)
            b = f.read(1)
            f.seek(100)
            f.write(bytes([b[0] ^ 1]))
        for s in range(2, 5):
            w[-10:] += 1
            with warnings.catch_warnings(record=True) as got:
                warnings.simplefilter("always")
                m.save(s, {"w": w})
            assert s > 2 or any("damaged" in str(x.message) for x in got)
            assert ckptfmt.verify(m.step_path(s)).ok
            assert ckptfmt.load(m.step_path(s))["w"].tobytes() == w.tobytes()


def test_5_a_parent_missing_store_data_gets_a_full_save(tmp_path):
    w = _w(0)
    with CheckpointManager(tmp_path, chunk_size=CS) as m:
        m.save(1, {"w": w})
        os.remove(glob.glob(str(tmp_path / "ckptfmt-store" / "pack-*"))[0])
        with pytest.warns(UserWarning, match="damaged"):
            m.save(2, {"w": w})
        m.save(3, {"w": w})
        assert all(ckptfmt.verify(m.step_path(s)).ok for s in (2, 3))
    with pytest.raises(ckptfmt.IntegrityError, match="is damaged.*missing.*save without parent="):
        ckptfmt.save({"w": w}, tmp_path / "x", parent=tmp_path / "step-1")


# 6. "ck/." names ck; "ck/.." is refused.
def test_6_dot_paths(tmp_path):
    ckptfmt.save({"w": np.arange(100.0)}, f"{tmp_path}/ck/.", shared_store=True)
    assert sorted(os.listdir(tmp_path / "ck")) == ["MANIFEST"] and (tmp_path / "ckptfmt-store").is_dir()
    assert ckptfmt.verify(tmp_path / "ck").ok
    with pytest.raises(ckptfmt.UnsafePathError, match="does not end in a directory name"):
        ckptfmt.save({"w": np.arange(100.0)}, f"{tmp_path}/ck/..", shared_store=True)


# 7. A step moved out of the run and back keeps its data.
def test_7_a_step_moved_out_and_back(tmp_path):
    run = tmp_path / "run"
    with CheckpointManager(run, chunk_size=CS, max_to_keep=2) as m:
        for s in (1, 2, 3):
            m.save(s, {"w": _w(s)})
    (run / "archive").mkdir()
    shutil.move(run / "step-3", run / "archive" / "step-3")
    with pytest.warns(UserWarning, match="no checkpoint of the run uses"):
        m = CheckpointManager(run, chunk_size=CS, max_to_keep=2)
    with m:
        for s in (4, 5, 6):  # retention runs, and removes step-2, 4
            m.save(s, {"w": _w(s)})
        assert m.all_steps() == [5, 6]
    shutil.move(run / "archive" / "step-3", run / "step-3")
    assert ckptfmt.verify(run / "step-3").ok and ckptfmt.load(run / "step-3")["w"].tobytes() == _w(3).tobytes()


# 12. A lock file we may not write still locks; the manager is not read-only.
def test_12_unwritable_lock_file(tmp_path, monkeypatch):
    (tmp_path / ".ckptfmt.lock").touch()
    real = os.open

    def no_write(path, flags, *a):
        if str(path).endswith(".ckptfmt.lock") and flags & (os.O_RDWR | os.O_WRONLY):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real(path, flags, *a)

    monkeypatch.setattr(os, "open", no_write)
    with CheckpointManager(tmp_path, chunk_size=CS) as m:
        assert not m.read_only
        m.save(1, {"w": np.ones(3)})
        with pytest.raises(ckptfmt.CheckpointLockedError):
            CheckpointManager(tmp_path)
    assert ckptfmt.verify(tmp_path / "step-1").ok


# 13. A forked child neither keeps the run locked nor uses the parent's manager.
def test_13_fork(tmp_path):
    m = CheckpointManager(tmp_path, chunk_size=CS)
    m.save(1, {"w": np.ones(3)})
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            m.save(2, {"w": np.ones(3)})
            os.write(w, b"saved")
        except RuntimeError:
            os.write(w, b"refused")
        time.sleep(1.5)
        os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 16) == b"refused"
        m.close()
        with CheckpointManager(tmp_path, chunk_size=CS) as m2:  # the child is still alive
            assert m2.all_steps() == [1]
    finally:
        os.close(r)
        os.waitpid(pid, 0)


# 10. Freeing that is refused says so, naming the file.
def test_10_refused_freeing_warns_naming_the_cause(tmp_path):
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "MANIFEST").write_text("include README.md\n")
    with pytest.warns(UserWarning, match=r"no data was freed, since .*code has a MANIFEST that cannot be read"):
        with CheckpointManager(tmp_path, max_to_keep=1, chunk_size=CS) as m:
            m.save(1, {"w": _w(1)})
            m.save(2, {"w": _w(2)})  # retention drops step-1 but may free nothing
    ckptfmt.save({"w": _w(3)}, tmp_path / "x")
    with pytest.warns(UserWarning, match="code has a MANIFEST"):
        ckptfmt.remove(tmp_path / "x")


# 11. `compact --to` (a reader of the source) runs while a manager holds the run.
def test_11_compact_to_while_a_manager_trains(tmp_path):
    with CheckpointManager(tmp_path / "run", chunk_size=CS) as m:
        m.save(1, {"w": _w(1)})
        m.save(2, {"w": _w(2)})
        ckptfmt.compact(m.step_path(2), to=tmp_path / "copy")
        rep = ckptfmt.gc(tmp_path / "run", dry_run=True)  # a reader too: no lock needed
        assert rep.dry_run and rep.deleted == ()
    assert ckptfmt.verify(tmp_path / "copy").ok and ckptfmt.load(tmp_path / "copy")["w"].tobytes() == _w(2).tobytes()


def test_a_store_without_its_marker_is_not_moved_away(tmp_path):
    with CheckpointManager(tmp_path, chunk_size=CS) as m:
        m.save(1, {"w": _w(1)})
    os.remove(tmp_path / "ckptfmt-store" / "STORE")
    with pytest.raises(ckptfmt.UnsafePathError, match="do not move it: restore the marker"):
        with CheckpointManager(tmp_path, chunk_size=CS) as m:
            m.save(2, {"w": _w(2)})
    assert ckptfmt.verify(tmp_path / "step-1").ok


def test_removing_a_lone_checkpoint_leaves_no_lock_file(tmp_path):
    ckptfmt.save({"w": _w(1)}, tmp_path / "ck")
    (tmp_path / "mine.txt").write_text("a user's folder")
    ckptfmt.remove(tmp_path / "ck")
    assert sorted(os.listdir(tmp_path)) == ["mine.txt"]


def test_an_old_empty_step_directory_is_removed_on_start(tmp_path):
    for name in ("step-7", "step-8", "notes"):
        (tmp_path / name).mkdir()
    old = time.time() - 3600
    for name in ("step-7", "notes"):
        os.utime(tmp_path / name, (old, old))
    with CheckpointManager(tmp_path, chunk_size=CS) as m:
        assert m.all_steps() == []
    assert not (tmp_path / "step-7").exists()
    assert (tmp_path / "step-8").is_dir() and (tmp_path / "notes").is_dir()  # young, or not a step
