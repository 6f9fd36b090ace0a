"""Conformance tests every storage backend inherits."""

from __future__ import annotations

import os

import pytest

from ckptfmt.storage.base import Storage
from ckptfmt.storage.local import LocalStorage


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
