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


_io_pool: ThreadPoolExecutor | None = None
_io_pid = 0
#: Threads for network I/O (object stores): waiting on a socket costs no CPU.
IO_THREADS = 16


def io_pool() -> ThreadPoolExecutor:
    """A wider pool for I/O-bound work (ranged GETs, uploads), recreated after a fork.

    Its tasks never wait on other tasks of this pool, so it cannot deadlock.
    """
    global _io_pool, _io_pid
    with _lock:
        if _io_pool is None or _io_pid != os.getpid():
            _io_pool = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="ckptfmt-io")
            _io_pid = os.getpid()
        return _io_pool
