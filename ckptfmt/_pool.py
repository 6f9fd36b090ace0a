"""A small shared thread pool for hashing and I/O (both release the GIL)."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pid = 0


def workers() -> int:
    """How many worker threads the pool has: the CPU count, between 2 and 8."""
    return max(2, min(8, os.cpu_count() or 2))


def pool() -> ThreadPoolExecutor:
    """The process-wide pool, recreated after a fork."""
    global _pool, _pid
    with _lock:
        if _pool is None or _pid != os.getpid():
            _pool = ThreadPoolExecutor(max_workers=workers(), thread_name_prefix="ckptfmt")
            _pid = os.getpid()
        return _pool
