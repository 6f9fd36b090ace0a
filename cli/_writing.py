"""What every writing command shares: a full disk named in the message (``writing(path)``).

Kept apart from :mod:`ckptfmt.cli.main` so the converter subcommands it loads lazily
(:mod:`ckptfmt.cli.tfconvert`) can use it without importing ``main`` back.

Example:
    >>> with writing("out.pt"):
    ...     pass
"""

from __future__ import annotations

__all__ = ["writing"]

import contextlib
import errno
from collections.abc import Iterator


@contextlib.contextmanager
def writing(path: str) -> Iterator[None]:
    """Name ``path`` in a disk-full message when the failing library does not."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT) and not getattr(e, "filename", None):
            e.filename = path
        raise
