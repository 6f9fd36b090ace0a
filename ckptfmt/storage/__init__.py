"""Storage backends: bytes at paths. ``LocalStorage`` now; others implement ``Storage``."""

from __future__ import annotations

from ckptfmt.storage.base import ReadHandle, Storage, WriteHandle
from ckptfmt.storage.local import LocalStorage

__all__ = ["Storage", "ReadHandle", "WriteHandle", "LocalStorage"]
