"""Issue 10: nothing a user does to a checkpoint (run) directory may lose a checkpoint.

Each numbered case of the issue is a test here; it failed before the 1.2 run layout.
"""

from __future__ import annotations

import os
import shutil
import threading
import time

import numpy as np
import pytest

import ckptfmt
from ckptfmt.manager import CheckpointManager

CS = 4096


def _state(step: int) -> dict:
    w = np.arange(32 * 1024, dtype=np.float32)  # 32 chunks of 4 KiB
    w[(step % 32) * 1024 : (step % 32 + 1) * 1024] += step  # one chunk changes per step
    return {"w": w, "step": step, "frozen": np.ones(4 * 1024, np.float32)}


def _same(out: dict, step: int) -> bool:
    ref = _state(step)
    return out["step"] == step and out["w"].tobytes() == ref["w"].tobytes() and out["frozen"].tobytes() == ref["frozen"].tobytes()


def _canary(tmp_path, run):
    """Foreign things in and around a run directory; returns a snapshot function."""
    outside = tmp_path / "outside"
    (outside / "ds").mkdir(parents=True)
    (outside / "ds" / "shard-0.data").write_bytes(b"dataset" * 10)
    (outside / "ds" / "data-00000-0123abcd.data").write_bytes(b"looks like ours")
    ckptfmt.save({"x": np.arange(5.0)}, str(outside / "other-ck"))
    run.mkdir(exist_ok=True)
    (run / "data").mkdir()
    (run / "data" / "train.data").write_bytes(b"train" * 10)
    (run / "export").mkdir()
    (run / "export" / "model.onnx").write_bytes(b"onnx")
    (run / "export" / "model.onnx.data").write_bytes(b"weights" * 10)
    (run / "tensorboard").mkdir()
    (run / "notes.data").write_bytes(b"a file of the user's")
    os.symlink(outside / "ds", run / "datasets")
    os.symlink(outside / "other-ck", run / "linked-ck")
    old = time.time() - 3600  # older than any grace period
    for p in [*(outside / "ds").iterdir(), run / "data" / "train.data", run / "export" / "model.onnx.data", run / "notes.data"]:
        os.utime(p, (old, old))

    def snapshot():
        out = {}
        for base in (outside, run / "data", run / "export", run / "tensorboard"):
            for d, _dirs, files in os.walk(base):
                out[d] = "dir"
                for f in files:
                    with open(os.path.join(d, f), "rb") as fh:
                        out[os.path.join(d, f)] = fh.read()
        out["notes"] = (run / "notes.data").read_bytes()
        out["links"] = (os.readlink(run / "datasets"), os.readlink(run / "linked-ck"))
        return out

    return snapshot


# 1. A symlink to an old checkpoint destroys every kept checkpoint.
def test_1_symlink_to_an_old_step_breaks_nothing(tmp_path):
    run = tmp_path / "runs"
    with CheckpointManager(run, max_to_keep=2, chunk_size=CS) as m:
        m.save(1, _state(1))
        os.symlink("step-1", run / "best")
        for s in range(2, 7):
            m.save(s, _state(s))
        assert m.all_steps() == [5, 6]
        for s in (5, 6):
            assert _same(m.restore(s), s) and ckptfmt.verify(m.step_path(s)).ok
    ckptfmt.gc(run, grace_seconds=0)
    with pytest.raises(ckptfmt.UnsafePathError, match="symbolic link"):
        ckptfmt.remove(run / "best")
    for s in (5, 6):
        assert ckptfmt.verify(run / f"step-{s}").ok
    assert os.path.islink(run / "best")


# 2. gc deletes files that are not ours; 3. deletion follows symlinks out of the tree.
def test_2_3_foreign_files_and_outside_links_survive_everything(tmp_path):
    run = tmp_path / "runs"
    snap = _canary(tmp_path, run)
    before = snap()
    with CheckpointManager(run, max_to_keep=2, chunk_size=CS) as m:
        for s in range(1, 6):
            m.save(s, _state(s))
    with CheckpointManager(run, max_to_keep=2, chunk_size=CS) as m:  # recovery on start
        m.save(6, _state(6))
    ckptfmt.gc(run, grace_seconds=0)
    with pytest.raises(ckptfmt.UnsafePathError):
        ckptfmt.remove(run / "linked-ck")
    assert snap() == before
    assert ckptfmt.verify(tmp_path / "outside" / "other-ck").ok
    for s in (5, 6):
        assert ckptfmt.verify(run / f"step-{s}").ok


def test_3_retention_never_deletes_through_a_symlinked_step(tmp_path):
    run = tmp_path / "runs"
    ckptfmt.save(_state(1), str(tmp_path / "elsewhere"), chunk_size=CS)
    run.mkdir()
    os.symlink(tmp_path / "elsewhere", run / "step-1")
    with CheckpointManager(run, max_to_keep=1, chunk_size=CS) as m:
        for s in range(2, 5):
            m.save(s, _state(s))
        assert m.all_steps() == [1, 4]  # the link is listed, never counted or deleted by retention
    assert ckptfmt.verify(tmp_path / "elsewhere").ok and os.path.islink(run / "step-1")


# 4. Shared data lives in a directory users will delete.
def test_4_rm_r_of_any_step_breaks_no_other(tmp_path):
    run = tmp_path / "runs"
    with CheckpointManager(run, max_to_keep=3, chunk_size=CS) as m:
        for s in range(1, 7):
            m.save(s, _state(s))
    shutil.rmtree(run / "step-4")
    for s in (5, 6):
        assert _same(ckptfmt.load(run / f"step-{s}"), s) and ckptfmt.verify(run / f"step-{s}").ok
    ckptfmt.gc(run, grace_seconds=0)
    shutil.rmtree(run / "step-6")
    assert _same(ckptfmt.load(run / "step-5"), 5)
    # Nothing left on disk but what step-5 needs.
    need = {os.path.normpath(os.path.join(run, "step-5", f.path)) for f in ckptfmt.open(run / "step-5").manifest.files}
    ckptfmt.gc(run, grace_seconds=0)
    left = {os.path.join(d, f) for d, _, fs in os.walk(run) for f in fs if f.endswith(".data")}
    assert left == need


def test_4_cp_r_of_a_step_is_complete_or_says_how_to_copy(tmp_path):
    run = tmp_path / "runs"
    with CheckpointManager(run, max_to_keep=3, chunk_size=CS) as m:
        for s in range(1, 4):
            m.save(s, _state(s))
    shutil.copytree(run / "step-3", tmp_path / "copy")
    rep = ckptfmt.verify(tmp_path / "copy")
    assert not rep.ok and "ckptfmt compact" in rep.errors[0].message
    ckptfmt.compact(run / "step-3", to=tmp_path / "portable")
    shutil.copytree(tmp_path / "portable", tmp_path / "copy2")
    assert ckptfmt.verify(tmp_path / "copy2").ok and _same(ckptfmt.load(tmp_path / "copy2"), 3)


# 5. An incremental save reports success while broken (its parent removed meanwhile).
def test_5_parent_removed_during_an_incremental_save(tmp_path):
    p, c = tmp_path / "p", tmp_path / "c"
    ckptfmt.save(_state(1), p, chunk_size=CS, shared_store=True)
    from ckptfmt.storage.local import LocalStorage

    outcome = []

    class Meddling(LocalStorage):
        def open_write(self, path, *, durable=True):
            if not outcome:
                try:
                    ckptfmt.remove(p, timeout=0)
                    outcome.append("removed")
                except ckptfmt.CheckpointLockedError:
                    outcome.append("locked")
            return super().open_write(path, durable=durable)

    try:
        ckptfmt.save(_state(2), c, parent=p, storage=Meddling())
    except ckptfmt.CkptFmtError:
        assert not os.path.exists(c / "MANIFEST")
        return
    assert outcome and ckptfmt.verify(c).ok and _same(ckptfmt.load(c), 2)


# 6. Two managers on one directory in one process.
def test_6_second_manager_in_the_same_process_is_refused(tmp_path):
    with CheckpointManager(tmp_path, chunk_size=CS):
        with pytest.raises(ckptfmt.CheckpointLockedError):
            CheckpointManager(tmp_path)


# 7. remove() leaks the data of earlier-removed ancestors.
def test_7_remove_frees_everything_nobody_needs(tmp_path):
    kept: list[str] = []
    for s in range(1, 16):
        path = str(tmp_path / f"s{s}")
        ckptfmt.save(_state(s), path, chunk_size=CS, parent=kept[-1] if kept else None, shared_store=True)
        kept.append(path)
        while len(kept) > 3:
            ckptfmt.remove(kept.pop(0))
    need = {os.path.normpath(os.path.join(k, f.path)) for k in kept for f in ckptfmt.open(k).manifest.files}
    on_disk = {os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs if f.endswith(".data")}
    assert on_disk == need
    for k, s in zip(kept, range(13, 16)):
        assert _same(ckptfmt.load(k), s)


# 8. gc next to saves rmdirs a fresh save directory; remove fails at once while gc holds the lock.
def test_8_gc_during_a_save_leaves_it_alone(tmp_path):
    from ckptfmt.storage.local import LocalStorage

    class GcMidway(LocalStorage):
        done = False

        def open_write(self, path, *, durable=True):
            if not GcMidway.done:
                GcMidway.done = True
                ckptfmt.gc(tmp_path, grace_seconds=0)
            return super().open_write(path, durable=durable)

    ckptfmt.save(_state(1), tmp_path / "fresh", chunk_size=CS, storage=GcMidway())
    assert _same(ckptfmt.load(tmp_path / "fresh"), 1)


def test_8_remove_waits_for_a_running_gc(tmp_path):
    ckptfmt.save(_state(1), tmp_path / "a", chunk_size=CS)
    from ckptfmt._lock import run_lock
    from ckptfmt.storage.local import LocalStorage

    held = run_lock(LocalStorage(), str(tmp_path))
    threading.Timer(0.3, held.release).start()
    ckptfmt.remove(tmp_path / "a")
    assert not (tmp_path / "a").exists()


# 9. Read-only storage.
def test_9_read_only_directory(tmp_path):
    from ckptfmt.storage.readonly import ReadOnlyStorage

    with CheckpointManager(tmp_path, max_to_keep=2, chunk_size=CS) as m:
        for s in (1, 2, 3):
            m.save(s, _state(s))
    before = sorted(os.listdir(tmp_path))
    ro = ReadOnlyStorage()
    m = CheckpointManager(tmp_path, storage=ro)
    assert m.all_steps() == [2, 3] and _same(m.restore(), 3)
    with pytest.raises(ckptfmt.StorageError, match="read-only"):
        m.save(4, _state(4))
    m.close()
    assert ckptfmt.verify(tmp_path / "step-3", storage=ro).ok
    rep = ckptfmt.gc(tmp_path, dry_run=True, grace_seconds=0, storage=ro)
    assert rep.dry_run and rep.deleted == ()
    assert sorted(os.listdir(tmp_path)) == before


# 10. step-007, and a failed save's empty directory.
def test_10_non_canonical_step_names_are_not_the_managers(tmp_path):
    ckptfmt.save(_state(7), tmp_path / "step-007", chunk_size=CS)
    with CheckpointManager(tmp_path, max_to_keep=1, chunk_size=CS) as m:
        assert m.all_steps() == []
        m.save(8, _state(8))
        m.save(9, _state(9))
        assert m.all_steps() == [9] and _same(m.restore(), 9)
    assert ckptfmt.verify(tmp_path / "step-007").ok


def test_10_a_failed_save_leaves_no_directory(tmp_path):
    from ckptfmt._writer import DeferredTensor

    def boom():
        raise RuntimeError("the source went away")

    state = {"a": np.ones(3), "b": DeferredTensor((3,), np.dtype("float64"), boom)}
    for kw in ({}, {"shared_store": True}):
        with pytest.raises(RuntimeError):
            ckptfmt.save(state, tmp_path / "new", **kw)
        assert not (tmp_path / "new").exists()


GOLDEN_11 = os.path.join(os.path.dirname(__file__), "..", "..", "fixtures", "golden", "v1.1")


def test_a_1_1_run_is_collected_by_the_same_rules(tmp_path):
    """Checkpoints referring to a sibling's directory (1.1) keep loading; remove frees their data."""
    run = tmp_path / "run"
    run.mkdir()
    for n in ("base", "delta"):
        shutil.copytree(os.path.join(GOLDEN_11, n), run / n)
    files = lambda: sorted(str(p.relative_to(run)) for p in run.rglob("*.data"))  # noqa: E731
    before = files()
    assert ckptfmt.gc(run, grace_seconds=0).deleted == ()
    ckptfmt.remove(run / "base")
    assert files() == before and ckptfmt.verify(run / "delta").ok  # delta still uses base's data
    ckptfmt.remove(run / "delta")
    assert files() == [] and sorted(os.listdir(run)) == [".ckptfmt.lock"]


def test_gc_refuses_when_a_manifest_refers_through_a_link(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(os.path.join(GOLDEN_11, "base"), run / "real-base")
    os.symlink("real-base", run / "base")
    shutil.copytree(os.path.join(GOLDEN_11, "delta"), run / "delta")  # refers to ../base/...
    rep = ckptfmt.gc(run, grace_seconds=0)
    assert rep.refused and "symbolic link" in rep.refused[0] and rep.deleted == ()
    with pytest.raises(ckptfmt.UnsafePathError):
        ckptfmt.save(_state(1), run / "child", parent=run / "base")
    assert ckptfmt.verify(run / "delta").ok


def test_deletion_never_touches_links_or_foreign_names_inside_checkpoints(tmp_path):
    outside = tmp_path / "outside.data"
    outside.write_bytes(b"precious")
    ck = tmp_path / "run" / "ck"
    ckptfmt.save(_state(1), ck, chunk_size=CS)
    os.symlink(outside, ck / "data-00001-0123abcd.data")  # named like ours, but a link
    (ck / "notes.txt").write_text("mine")
    ckptfmt.remove(ck)
    assert outside.read_bytes() == b"precious" and (ck / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(ck)) == ["data-00001-0123abcd.data", "notes.txt"]


def test_5_shared_data_deleted_behind_the_lock_fails_the_save(tmp_path):
    """Even a deletion that ignores the lock (a user's rm in the store) never yields a broken success."""
    p, c = tmp_path / "p", tmp_path / "c"
    ckptfmt.save(_state(1), p, chunk_size=CS, shared_store=True)
    pack = tmp_path / "ckptfmt-store" / ckptfmt.open(p).manifest.files[0].path.split("/")[-1]
    from ckptfmt.storage.local import LocalStorage

    class RmInStore(LocalStorage):
        def open_write(self, path, *, durable=True):
            if pack.exists():
                os.remove(pack)
            return super().open_write(path, durable=durable)

    with pytest.raises(ckptfmt.IntegrityError, match="deleted or changed while this save ran"):
        ckptfmt.save(_state(2), c, parent=p, storage=RmInStore())
    assert not c.exists()


def test_saving_a_step_again_frees_its_old_data(tmp_path):
    with CheckpointManager(tmp_path, max_to_keep=5, chunk_size=CS) as m:
        m.save(1, _state(1))
        m.save(1, _state(2), force=True)
        out = m.restore(1)
        assert out["w"].tobytes() == _state(2)["w"].tobytes()
        need = {os.path.normpath(os.path.join(m.step_path(1), f.path)) for f in ckptfmt.open(m.step_path(1)).manifest.files}
    left = {os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs if f.endswith(".data")}
    assert left == need
