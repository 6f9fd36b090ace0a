"""Conformance tests every storage backend inherits."""

from __future__ import annotations

import os

import pytest

import threading
import time

import ckptfmt
from ckptfmt.storage.base import Storage
from ckptfmt.storage.local import LocalStorage
from ckptfmt.storage.memory import MemoryStorage


class StorageConformance:
    """Subclass with a ``storage`` fixture returning (backend, root path)."""

    def test_write_read_ranges(self, storage):
        s, root = storage
        p = s.join(root, "f.bin")
        w = s.open_write(p)
        w.write(b"hello ")
        w.write(memoryview(b"world" * 1000))
        assert w.tell() == 6 + 5000
        w.close(sync=True)
        assert s.size(p) == 5006 and s.exists(p) and not s.isdir(p)
        with s.open_read(p) as r:
            assert r.size() == 5006
            assert r.read(0, 5) == b"hello"
            buf = bytearray(10)
            assert r.readinto(5001, memoryview(buf)) == 5 and bytes(buf[:5]) == b"world"
            assert r.read(6000, 10) == b""

    def test_atomic_replace(self, storage):
        s, root = storage
        p = s.join(root, "m")
        s.write_atomic(p, b"one")
        s.write_atomic(p, b"two")
        assert s.read_file(p) == b"two"
        assert s.listdir(root) == ["m"]

    def test_read_file_limit(self, storage):
        s, root = storage
        p = s.join(root, "big")
        s.write_atomic(p, b"x" * 100)
        with pytest.raises(OSError):
            s.read_file(p, max_size=10)

    def test_missing(self, storage):
        s, root = storage
        with pytest.raises(FileNotFoundError):
            s.read_file(s.join(root, "nope"))
        with pytest.raises(FileNotFoundError):
            s.size(s.join(root, "nope"))
        s.delete(s.join(root, "nope"))  # no error
        assert s.listdir(s.join(root, "nodir")) == []

    def test_dirs_and_delete(self, storage):
        s, root = storage
        d = s.join(root, "a", "b")
        s.makedirs(d)
        s.makedirs(d)
        assert s.isdir(d)
        s.write_atomic(s.join(d, "x"), b"1")
        s.delete(s.join(d, "x"))
        s.rmdir(d)
        assert not s.exists(d)


    def test_scan(self, storage):
        s, root = storage
        s.makedirs(s.join(root, "d"))
        s.write_atomic(s.join(root, "f"), b"12345")
        got = {e.name: e for e in s.scan(root)}
        assert sorted(got) == ["d", "f"] and got["d"].kind == "dir"
        assert got["f"].kind == "file" and got["f"].size == 5 and abs(got["f"].mtime - time.time()) < 60
        assert s.scan(s.join(root, "nodir")) == []

    def test_lock_exclusive_and_shared(self, storage):
        s, root = storage
        p = s.join(root, ".lock")
        a = s.lock(p)
        with pytest.raises(ckptfmt.CheckpointLockedError):
            s.lock(p)  # not re-entrant, even in one process
        with pytest.raises(ckptfmt.CheckpointLockedError):
            s.lock(p, shared=True)
        a.release()
        a.release()  # twice is harmless
        b, c = s.lock(p, shared=True), s.lock(p, shared=True)
        with pytest.raises(ckptfmt.CheckpointLockedError):
            s.lock(p, timeout=0.05)
        b.release()
        threading.Timer(0.2, c.release).start()
        t = time.monotonic()
        s.lock(p, timeout=5).release()  # waits for the last shared holder
        assert time.monotonic() - t >= 0.15

    def test_write_atomic_leaves_no_temporary(self, storage):
        s, root = storage
        d = s.join(root, "ck")
        s.makedirs(d)
        s.write_atomic(s.join(d, "MANIFEST"), b"m")
        assert s.listdir(d) == ["MANIFEST"]
        s.delete(s.join(d, "MANIFEST"), sync=True)
        assert s.listdir(d) == []


class TestMemoryStorage(StorageConformance):
    @pytest.fixture
    def storage(self):
        s = MemoryStorage()
        s.makedirs("/root")
        return s, "/root"


class TestLocalStorage(StorageConformance):
    @pytest.fixture
    def storage(self, tmp_path):
        return LocalStorage(), str(tmp_path)

    def test_mmap(self, tmp_path):
        s = LocalStorage()
        p = str(tmp_path / "f")
        s.write_atomic(p, b"abcdef")
        with s.open_read(p) as r:
            assert bytes(r.mmap()[2:4]) == b"cd"


def test_abc_cannot_be_instantiated():
    with pytest.raises(TypeError):
        Storage()  # type: ignore[abstract]


def test_local_scan_never_follows_links(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "x").write_bytes(b"1")
    os.symlink(tmp_path / "real", tmp_path / "dirlink")
    os.symlink(tmp_path / "real" / "x", tmp_path / "filelink")
    os.mkfifo(tmp_path / "fifo")
    got = {e.name: e.kind for e in LocalStorage().scan(str(tmp_path))}
    assert got == {"real": "dir", "dirlink": "link", "filelink": "link", "fifo": "other"}


def test_local_lock_names_the_holder_and_read_only_shared_lock(tmp_path):
    s = LocalStorage()
    held = s.lock(str(tmp_path / ".lock"))
    with pytest.raises(ckptfmt.CheckpointLockedError, match=f"pid {os.getpid()}"):
        s.lock(str(tmp_path / ".lock"))
    held.release()
