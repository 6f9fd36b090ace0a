"""Conformance tests every storage backend inherits."""

from __future__ import annotations

import os
import threading
import time

import pytest

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

    def test_empty_file(self, storage):
        s, root = storage
        p = s.join(root, "empty")
        s.write_atomic(p, b"")
        assert s.read_file(p, max_size=100) == b"" and s.read_file(p) == b"" and s.size(p) == 0
        with s.open_read(p) as r:
            assert r.size() == 0 and r.read(0, 10) == b""

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
        s.write_atomic(s.join(d, "x"), b"1")
        assert s.isdir(d) and s.isdir(s.join(root, "a")) and not s.isdir(s.join(d, "x"))
        assert s.listdir(s.join(root, "a")) == ["b"]
        s.delete(s.join(d, "x"))
        s.rmdir(d)
        assert not s.exists(d)

    def test_exclusive_create(self, storage):
        s, root = storage
        p = s.join(root, "MANIFEST")
        s.write_atomic(p, b"first", exclusive=True)
        with pytest.raises(FileExistsError):
            s.write_atomic(p, b"second", exclusive=True)
        assert s.read_file(p) == b"first"
        s.write_atomic(p, b"third")  # a plain replace still works
        assert s.read_file(p) == b"third"

    def test_exclusive_create_race(self, storage):
        """Writers racing for one name: exactly one succeeds, and its bytes are what is there."""
        import threading

        s, root = storage
        p = s.join(root, "race")
        results: dict[int, object] = {}
        barrier = threading.Barrier(4)

        def go(i: int) -> None:
            barrier.wait()
            try:
                s.write_atomic(p, f"writer {i}".encode(), exclusive=True)
                results[i] = "won"
            except FileExistsError as e:
                results[i] = e

        threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [i for i, r in results.items() if r == "won"]
        assert len(winners) == 1 and len(results) == 4, results
        assert s.read_file(p) == f"writer {winners[0]}".encode()

    def test_delete_many_and_nested_listing(self, storage):
        s, root = storage
        names = [s.join(root, "d", f"f{i}") for i in range(5)]
        s.makedirs(s.join(root, "d"))
        for n in names:
            s.write_atomic(n, b"x")
        s.makedirs(s.join(root, "d", "sub"))
        s.write_atomic(s.join(root, "d", "sub", "g"), b"y")
        assert s.listdir(s.join(root, "d")) == ["f0", "f1", "f2", "f3", "f4", "sub"]
        s.delete_many(names[:3] + [s.join(root, "d", "never-there")])
        assert s.listdir(s.join(root, "d")) == ["f3", "f4", "sub"]

    def test_abandoned_write_leaves_nothing_new(self, storage):
        """close(sync=False) after a failure: the file need not exist, and must never be partial."""
        s, root = storage
        p = s.join(root, "partial")
        w = s.open_write(p)
        w.write(b"abc")
        w.close(sync=False)
        assert not s.exists(p) or s.read_file(p) == b"abc"

    def test_mtime(self, storage):
        import time

        s, root = storage
        p = s.join(root, "t")
        s.write_atomic(p, b"1")
        m = s.mtime(p)
        assert m is None or abs(m - time.time()) < 300


    def test_scan(self, storage):
        s, root = storage
        s.makedirs(s.join(root, "d"))
        s.write_atomic(s.join(root, "d", "x"), b"")  # object stores have no empty directories
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


class TestFsspecStorage(StorageConformance):
    """memory://, SeaweedFS and moto (see the objstore fixture in tests/conftest.py)."""

    @pytest.fixture
    def storage(self, objstore):
        from ckptfmt.storage.urls import resolve

        root = objstore.url()
        s, root = resolve(root, storage_options=objstore.options)
        return s, root

    def test_reads_are_ranged(self, storage):
        s, root = storage
        p = s.join(root, "big")
        s.write_atomic(p, bytes(range(256)) * 4096)
        calls = []
        real = s.fs.cat_file

        def counting(path, start=None, end=None, **kw):
            calls.append((start, end))
            return real(path, start=start, end=end, **kw)

        s.fs.cat_file = counting
        try:
            with s.open_read(p) as r:
                assert r.read(1000, 10) == (bytes(range(256)) * 4096)[1000:1010]
        finally:
            del s.fs.cat_file
        assert calls == [(1000, 1010)]


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
