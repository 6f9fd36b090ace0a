"""Temporaries of atomic file writes: their names, stale ones of dead processes, full disks.

A destination ``DIR/NAME`` is written as ``DIR/.NAME.tmp-PID`` and renamed into place. A
process killed with SIGKILL cannot remove its temporary; the next write of the same
destination removes every ``.NAME.tmp-PID`` (and ``NAME.tmp-PID``, tf2torch's older
spelling) whose process no longer exists (only those exact patterns, only regular files,
only in ``DIR``: nothing ckptfmt did not create).

Example:
    >>> temporary_name("/tmp/out.pt").startswith("/tmp/.out.pt.tmp-")
    True
"""

from __future__ import annotations

__all__ = ["temporary_name", "stale_temporaries", "remove_stale_temporaries", "clear_partial_checkpoint", "wrap_write_error"]

import errno
import os
import re
import stat

from ckptfmt.errors import StorageError
from ckptfmt.format.spec import MANIFEST_NAME, MANIFEST_TMP_PREFIX


def temporary_name(dst: str, pid: int | None = None) -> str:
    """The temporary ``dst`` is written as before it is renamed into place."""
    d, name = os.path.split(os.path.abspath(dst))
    return os.path.join(d, f".{name}.tmp-{os.getpid() if pid is None else pid}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True
    return True


def stale_temporaries(dst: str) -> list[str]:
    """Temporaries of ``dst`` whose writing process no longer runs.

    Example:
        >>> stale_temporaries("/nonexistent/dir/x.pt")
        []
    """
    d, name = os.path.split(os.path.abspath(dst))
    # ".NAME.tmp-PID" (sources.base.atomic_file, keras.outputs) and "NAME.tmp-PID" (tf2torch's torch file)
    pattern = re.compile(rf"\.?{re.escape(name)}\.tmp-(\d+)")
    try:
        entries = os.listdir(d)
    except OSError:
        return []
    out = []
    for entry in entries:
        m = pattern.fullmatch(entry)
        if not m or _alive(int(m.group(1))):
            continue
        path = os.path.join(d, entry)
        try:
            if stat.S_ISREG(os.lstat(path).st_mode):  # never a link, never a directory
                out.append(path)
        except OSError:
            continue
    return out


def remove_stale_temporaries(dst: str) -> list[str]:
    """Remove :func:`stale_temporaries` of ``dst``; returns the paths removed."""
    removed = []
    for path in stale_temporaries(dst):
        try:
            os.remove(path)
            removed.append(path)
        except OSError:
            pass
    return removed


def wrap_write_error(e: OSError, dst: str) -> OSError:
    """A failed write of ``dst`` as our StorageError naming ``dst`` (a full disk says what to do)."""
    if isinstance(e, StorageError):
        return e
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        if e.filename is not None:  # already names the file it failed on
            return e
        err = StorageError(e.errno, f"{e.strerror or type(e).__name__} writing {dst} (nothing was left half-written)")
        err.filename = dst
        return err
    err = StorageError(
        e.errno,
        f"disk full ({errno.errorcode[e.errno]}) writing {dst}: free space or choose another disk, "
        "then run again (nothing was left half-written)",
    )
    err.filename = dst
    return err


#: Data files ckptfmt.save names ``data-NNNNN-TOKEN.data`` (see ckptfmt/_writer.py).
_DATA_FILE = re.compile(r"data-\d{5}-[0-9a-f]{8}\.data")


def clear_partial_checkpoint(path: str) -> bool:
    """Empty what an interrupted ``ckptfmt.save`` left at ``path``; False if it is anything else.

    A partial checkpoint is a real directory (not a link) with no ``MANIFEST`` holding only
    regular files ckptfmt names as its own (data files, manifest temporaries). Only those
    files are removed; the directory stays, and a save into it proceeds.

    Example:
        >>> clear_partial_checkpoint("/nonexistent")
        False
    """
    if os.path.islink(path) or not os.path.isdir(path):
        return False
    names = os.listdir(path)
    if MANIFEST_NAME in names:
        return False
    for n in names:
        p = os.path.join(path, n)
        if not (_DATA_FILE.fullmatch(n) or n.startswith(MANIFEST_TMP_PREFIX)) or not stat.S_ISREG(os.lstat(p).st_mode):
            return False
    for n in names:
        os.remove(os.path.join(path, n))
    return True
