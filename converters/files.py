"""File conventions every converter writer follows, defined once.

* A destination file appears atomically: it is written under a temporary name beside it
  (:func:`temp_path`), synced, renamed over the destination, and the directory synced
  (:func:`commit_file`, :func:`atomic_file`). A writer killed halfway leaves the previous
  file (or none), never a part of one.
* A destination is refused before anything is read when it exists and may not be replaced
  (:func:`check_destination`), by the rules of its kind.

Example:
    >>> import tempfile, pathlib
    >>> p = os.path.join(tempfile.mkdtemp(), "f.bin")
    >>> atomic_file(p, lambda tmp: pathlib.Path(tmp).write_bytes(b"x"))
    >>> open(p, "rb").read(), os.listdir(os.path.dirname(p))
    (b'x', ['f.bin'])
"""

from __future__ import annotations

__all__ = ["temp_path", "fsync_path", "fsync_dir", "commit_file", "atomic_file", "remove_quietly", "check_destination"]

import os
from collections.abc import Callable

from ckptfmt.errors import CheckpointExistsError
from ckptfmt.format.spec import MANIFEST_NAME


def temp_path(dst: str) -> str:
    """The temporary name a file is written under before it becomes ``dst`` (same directory).

    Example:
        >>> os.path.basename(temp_path("out/w.safetensors")).startswith(".w.safetensors.tmp-")
        True
    """
    return os.path.join(os.path.dirname(os.path.abspath(dst)), f".{os.path.basename(dst)}.tmp-{os.getpid()}")


def fsync_path(path: str) -> None:
    """Make a file's written data durable (whoever wrote it).

    Example:
        >>> fsync_path(__file__)
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: str) -> None:
    """Make renames and creations inside ``directory`` durable (where the filesystem can).

    Example:
        >>> fsync_dir(".")
    """
    from ckptfmt.storage.local import LocalStorage

    LocalStorage().sync_dir(directory or ".")  # the storage layer's one definition


def commit_file(tmp: str, dst: str) -> None:
    """Sync ``tmp``, rename it over ``dst`` and sync the directory: the commit of a new file.

    Example:
        >>> import tempfile, pathlib
        >>> d = tempfile.mkdtemp(); _ = pathlib.Path(d, "t").write_text("x")
        >>> commit_file(os.path.join(d, "t"), os.path.join(d, "f")); os.listdir(d)
        ['f']
    """
    fsync_path(tmp)
    os.replace(tmp, dst)
    fsync_dir(os.path.dirname(os.path.abspath(dst)))


def remove_quietly(path: str) -> None:
    """Remove a file of ours if it is there (a temporary file after a failure).

    Example:
        >>> remove_quietly("/nonexistent/.x.tmp-1")
    """
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def atomic_file(dst: str, write: Callable[[str], object]) -> None:
    """Call ``write(tmp)``, then :func:`commit_file`; a failed write leaves no ``dst`` and no ``tmp``.

    Example:
        >>> import tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "f.txt")
        >>> atomic_file(p, lambda tmp: open(tmp, "w").close())
        >>> os.path.exists(p)
        True
    """
    from ._temps import remove_stale_temporaries, wrap_write_error

    # temporaries of ``dst`` left by processes that no longer run (SIGKILL, a power cut) go
    # first; a full disk is reported naming ``dst``
    remove_stale_temporaries(dst)
    tmp = temp_path(dst)
    if os.path.lexists(tmp):  # this process's own name: something put there (a symlink would be followed)
        from ckptfmt.errors import CheckpointExistsError

        raise CheckpointExistsError(f"{tmp} is in the way of writing {dst} (this process's temporary name): remove it")
    try:
        write(tmp)
        commit_file(tmp, dst)
    except OSError as e:
        remove_quietly(tmp)
        raise wrap_write_error(e, dst) from e
    except BaseException:
        remove_quietly(tmp)
        raise


def check_destination(dst: str, kind: str, overwrite: bool) -> None:
    """Refuse a destination before anything is read or written.

    ``kind`` says what ``dst`` will be:

    - ``"file"`` (a safetensors, torch or ONNX file): must not exist unless ``overwrite``,
      and never be a directory;
    - ``"ckptfmt"`` (a checkpoint directory): may be missing, an empty directory, or (with
      ``overwrite``) a ckptfmt checkpoint; never a file or a directory holding anything else;
    - ``"tf"`` (a TensorBundle prefix): neither ``dst`` nor ``dst.index`` may exist unless
      ``overwrite``.

    Raises:
        CheckpointExistsError: as above, naming ``dst``.
        ValueError: an unknown ``kind``.

    Example:
        >>> check_destination("/nonexistent/new.safetensors", "file", overwrite=False)
    """
    if kind == "tf":
        if not overwrite and (os.path.lexists(dst) or os.path.lexists(dst + ".index")):
            raise CheckpointExistsError(f"{dst} already exists; pass overwrite=True (--overwrite) to replace it")
    elif kind == "file":
        if os.path.isdir(dst):
            raise CheckpointExistsError(f"{dst} is a directory; the destination is a file")
        if os.path.lexists(dst) and not overwrite:
            raise CheckpointExistsError(f"{dst} already exists; pass overwrite=True (--overwrite) to replace it")
    elif kind == "ckptfmt":
        _check_ckptfmt_dir(dst, overwrite)
    else:
        raise ValueError(f"unknown destination kind {kind!r} (file, ckptfmt, tf)")


def _check_ckptfmt_dir(dst: str, overwrite: bool) -> None:
    if not os.path.lexists(dst):
        return
    if not os.path.isdir(dst):
        raise CheckpointExistsError(f"{dst} exists and is not a directory; a name without .pt/.pth/.bin/.safetensors "
                                    "is written as a ckptfmt checkpoint directory")
    names = os.listdir(dst)
    if not names:
        return
    if MANIFEST_NAME not in names:
        from ._temps import clear_partial_checkpoint

        if clear_partial_checkpoint(dst):
            return  # what an interrupted save left: never a reason to refuse the rerun
        raise CheckpointExistsError(f"{dst} is a non-empty directory but not a ckptfmt checkpoint; refusing to write "
                                    "into it (choose a new or empty directory)")
    if not overwrite:
        raise CheckpointExistsError(f"a ckptfmt checkpoint already exists at {dst}; pass overwrite=True (--overwrite) to replace it")
