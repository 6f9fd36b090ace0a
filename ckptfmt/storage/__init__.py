"""Storage backends: bytes at paths. Every backend implements ``Storage``.

``LocalStorage`` (the filesystem), ``MemoryStorage`` (in memory, the second implementation
the conformance tests run on) and ``ReadOnlyStorage`` (a read-only view of another one).
"""

from __future__ import annotations

from ckptfmt.storage.base import Entry, ReadHandle, Storage, StorageLock, WriteHandle
from ckptfmt.storage.local import LocalStorage
from ckptfmt.storage.memory import MemoryStorage
from ckptfmt.storage.readonly import ReadOnlyStorage

__all__ = ["Storage", "ReadHandle", "WriteHandle", "Entry", "StorageLock", "LocalStorage", "MemoryStorage", "ReadOnlyStorage"]
