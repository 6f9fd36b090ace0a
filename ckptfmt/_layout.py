"""The layout of a run directory, and confined deletion in it (spec sections 10-11).

A run directory holds checkpoint directories, possibly the shared store
``ckptfmt-store/`` (1.2) and the lock file. Everything here goes through the Storage
interface and lists with :meth:`Storage.scan`, which never follows symbolic links: a link is
never read through, never descended into and never deleted.

Deletion is *positive*: a file is deleted only if

* its name is one the format gives its files (``DATA_FILE_RE``, ``STORE_FILE_RE``, a
  temporary manifest), and
* it lies directly in a real directory that is demonstrably ckptfmt's: a checkpoint
  directory (a ``MANIFEST`` that decodes), the store (its ``STORE`` marker), or a
  directory holding nothing but such files (an interrupted save), and
* no complete manifest of the run refers to it.

If any manifest of the run cannot be read, or one refers to data through a symbolic link,
nothing is deleted: it may refer to anything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ckptfmt.errors import CkptFmtError, UnsafePathError
from ckptfmt.format.manifest import Manifest, decode_manifest
from ckptfmt.format.spec import (
    DATA_FILE_RE,
    LIMITS,
    MANIFEST_NAME,
    MANIFEST_TMP_PREFIX,
    STORE_FILE_RE,
    STORE_MARKER,
    STORE_NAME,
)
from ckptfmt.storage.base import Entry, Storage

#: The content of ``ckptfmt-store/STORE``.
STORE_MARKER_BYTES = b"ckptfmt-store 1\n"
#: How a manifest names a file of the store.
STORE_PREFIX = f"../{STORE_NAME}/"


def split(path: str) -> tuple[str, str]:
    """``(parent directory, name)`` of a ``/``-separated path; a trailing ``/.`` names the same directory."""
    path = path.rstrip("/") or "/"
    while path.endswith("/.") and len(path) > 2:
        path = path[:-2].rstrip("/") or "/"
    head, _, name = path.rpartition("/")
    return (head or ("/" if path.startswith("/") else ".")), name


def split_checkpoint(path: str) -> tuple[str, str]:
    """:func:`split` of a checkpoint path, refusing a last component that is not a name.

    ``ck/..`` or ``.`` would put the run's store and lock in a directory other than the one
    beside the checkpoint that its manifest names (``../ckptfmt-store``).
    """
    directory, name = split(path)
    if name in ("", ".", "..", "/"):
        raise UnsafePathError(f"{path!r} does not end in a directory name; name the checkpoint directory itself "
                              "(e.g. runs/step-5, not runs/step-5/.. or .)")
    return directory, name


def is_own_name(name: str) -> bool:
    """A name the format gives files inside a checkpoint directory."""
    return bool(DATA_FILE_RE.match(name)) or name.startswith(MANIFEST_TMP_PREFIX)


@dataclass(slots=True)
class RunView:
    """What a run directory holds, read without following links."""

    directory: str
    entries: dict[str, Entry]
    manifests: dict[str, Manifest] = field(default_factory=dict)
    #: checkpoint directories whose MANIFEST cannot be read (or is a link)
    unreadable: list[str] = field(default_factory=list)
    #: why nothing may be deleted, besides unreadable manifests (e.g. references through links)
    problems: list[str] = field(default_factory=list)
    #: (directory name, file name) of every file some complete manifest uses
    refs: set[tuple[str, str]] = field(default_factory=set)
    store: bool = False

    @property
    def safe(self) -> bool:
        return not self.unreadable and not self.problems


def read_marker(storage: Storage, directory: str) -> bool:
    """Whether ``directory`` (a real directory) is a ckptfmt store."""
    marker = [e for e in storage.scan(storage.join(directory, STORE_NAME)) if e.name == STORE_MARKER]
    if not marker or marker[0].kind != "file":
        return False
    try:
        return storage.read_file(storage.join(directory, STORE_NAME, STORE_MARKER), max_size=64) == STORE_MARKER_BYTES
    except (OSError, CkptFmtError):
        return False


def ensure_store(storage: Storage, directory: str) -> None:
    """Create the run's store if it does not exist; refuse a foreign ``ckptfmt-store``."""
    e = {x.name: x for x in storage.scan(directory)}.get(STORE_NAME)
    path = storage.join(directory, STORE_NAME)
    if e is None:
        storage.makedirs(path)
        storage.write_atomic(storage.join(path, STORE_MARKER), STORE_MARKER_BYTES)
        return
    if e.kind != "dir":
        raise UnsafePathError(f"{path} is not a directory (a {e.kind}); ckptfmt keeps a run's shared data there: move it away")
    if not read_marker(storage, directory):
        if storage.scan(path):
            raise UnsafePathError(
                f"{path} exists but has no valid {STORE_MARKER} marker. If it is this run's store (checkpoints of the run "
                f"refer to its pack-*.data files), do not move it: restore the marker with "
                f"printf 'ckptfmt-store 1\\n' > {storage.join(path, STORE_MARKER)} ; otherwise move it away")
        storage.write_atomic(storage.join(path, STORE_MARKER), STORE_MARKER_BYTES)


def ref_of(ck: str, path: str) -> tuple[str, str]:
    """The (directory name, file name) a manifest path of checkpoint ``ck`` points at."""
    parts = path.split("/")
    if parts[0] == ".." and len(parts) >= 3:
        return parts[1], "/".join(parts[2:])
    return ck, path


def read_checkpoint(storage: Storage, directory: str, name: str) -> Manifest | None:
    """The manifest of ``directory/name`` if it is a real file there, else None; raises if unreadable."""
    ck = storage.join(directory, name)
    m = [e for e in storage.scan(ck) if e.name == MANIFEST_NAME]
    if not m:
        return None
    if m[0].kind != "file":
        # A link (or anything else) named MANIFEST may be read as a checkpoint by a reader,
        # and it may refer to anything: never a checkpoint for deletion, never ignored.
        raise UnsafePathError(f"{storage.join(ck, MANIFEST_NAME)} is a {m[0].kind}, not a file")
    mpath = storage.join(ck, MANIFEST_NAME)
    try:
        data = storage.read_file(mpath, max_size=LIMITS.max_manifest_bytes)
    except FileNotFoundError:
        return None
    return decode_manifest(data, where=mpath)


def view(storage: Storage, directory: str) -> RunView:
    """Read every checkpoint of the run ``directory`` (real directories only)."""
    entries = {e.name: e for e in storage.scan(directory)}
    v = RunView(directory, entries)
    v.store = STORE_NAME in entries and entries[STORE_NAME].kind == "dir" and read_marker(storage, directory)
    for name, e in entries.items():
        if e.kind != "dir" or name == STORE_NAME:
            continue
        try:
            m = read_checkpoint(storage, directory, name)
        except (OSError, CkptFmtError):
            v.unreadable.append(storage.join(directory, name))
            continue
        if m is None:
            continue
        v.manifests[name] = m
        for fe in m.files:
            d, f = ref_of(name, fe.path)
            target = entries.get(d)
            if target is not None and target.kind == "link":
                v.problems.append(
                    f"{storage.join(directory, name)} refers to data through the symbolic link {storage.join(directory, d)}"
                )
            v.refs.add((d, f))
    return v


@dataclass(slots=True)
class Sweep:
    deleted: list[str] = field(default_factory=list)
    freed: int = 0
    young: list[str] = field(default_factory=list)


def _delete(storage: Storage, path: str, e: Entry, now: float, grace: float, dry_run: bool, out: Sweep) -> bool:
    if now - e.mtime < grace:
        out.young.append(path)
        return False
    if not dry_run:
        storage.delete(path)
    out.deleted.append(path)
    out.freed += e.size
    return True


def sweep_store(storage: Storage, v: RunView, *, grace: float, dry_run: bool, out: Sweep,
                only: set[str] | None = None) -> None:
    """Delete the store's files no manifest refers to (only under the exclusive lock, or with a grace).

    ``only`` restricts deletion to these file names (those a removed checkpoint listed).
    """
    if not v.store or not v.safe:
        return
    now = time.time()
    store = storage.join(v.directory, STORE_NAME)
    for e in storage.scan(store):
        if only is not None and e.name not in only:
            continue
        if e.kind == "file" and STORE_FILE_RE.match(e.name) and (STORE_NAME, e.name) not in v.refs:
            _delete(storage, storage.join(store, e.name), e, now, grace, dry_run, out)


def sweep_dirs(storage: Storage, v: RunView, *, grace: float, dry_run: bool, out: Sweep,
               only: set[tuple[str, str]] | None = None) -> None:
    """Delete unreferenced data and leftovers in the run's checkpoint directories.

    A directory without a manifest is touched only when everything in it is a file the
    format names as its own (an interrupted save); it is removed once we emptied it.
    ``only`` restricts deletion to these (directory, file) pairs.
    """
    if not v.safe:
        return
    now = time.time()
    for name, e in v.entries.items():
        if e.kind != "dir" or name == STORE_NAME:
            continue
        ck = storage.join(v.directory, name)
        inside = storage.scan(ck)
        interrupted = bool(inside) and all(x.kind == "file" and is_own_name(x.name) for x in inside)
        if name not in v.manifests and not interrupted and only is None:
            continue
        emptied = bool(inside)
        for x in inside:
            if x.kind != "file" or not is_own_name(x.name) or (name, x.name) in v.refs:
                emptied = False
                continue
            if only is not None and (name, x.name) not in only:
                emptied = False
                continue
            if not _delete(storage, storage.join(ck, x.name), x, now, grace, dry_run, out):
                emptied = False
        if emptied and name not in v.manifests and not dry_run:
            try:
                storage.rmdir(ck)  # fails harmlessly if a save put something there meanwhile
            except OSError:
                pass


def unpublish(storage: Storage, directory: str, name: str, *, grace: float = 0.0) -> set[tuple[str, str]]:
    """Delete the manifest of checkpoint ``directory/name`` (durably) and return what it used.

    The returned pairs are the files it referred to (the store's included), plus the files in
    its own directory the format names as its own and older than ``grace`` seconds (younger
    unlisted ones may be a concurrent overwrite's, which takes no lock): the caller frees
    those nobody else uses.
    """
    ck = storage.join(directory, name)
    used: set[tuple[str, str]] = set()
    try:
        m = read_checkpoint(storage, directory, name)
    except (OSError, CkptFmtError):
        m = None  # a damaged manifest: its own directory's files are still ours
    if m is not None:
        used = {ref_of(name, fe.path) for fe in m.files}
    now = time.time()
    used |= {(name, x.name) for x in storage.scan(ck)
             if x.kind == "file" and is_own_name(x.name) and now - x.mtime >= grace}
    storage.delete(storage.join(ck, MANIFEST_NAME), sync=True)
    return used


def free_unpublished(storage: Storage, directory: str, used: set[tuple[str, str]], *, dry_run: bool = False) -> tuple[RunView, Sweep]:
    """After :func:`unpublish`: delete the files in ``used`` no remaining manifest needs, then empty dirs."""
    v = view(storage, directory)
    out = Sweep()
    sweep_dirs(storage, v, grace=0.0, dry_run=dry_run, out=out, only={r for r in used if r[0] != STORE_NAME})
    sweep_store(storage, v, grace=0.0, dry_run=dry_run, out=out, only={f for d, f in used if d == STORE_NAME})
    if v.safe and not dry_run:
        for d in {d for d, _ in used if d != STORE_NAME}:
            e = v.entries.get(d)
            if e is not None and e.kind == "dir" and d not in v.manifests and not storage.scan(storage.join(directory, d)):
                try:
                    storage.rmdir(storage.join(directory, d))
                except OSError:
                    pass
    return v, out


def free_stale(storage: Storage, directory: str, name: str, stale: set[str]) -> None:
    """After an overwrite: delete the replaced checkpoint's own files nobody else refers to."""
    v = view(storage, directory)
    sweep_dirs(storage, v, grace=0.0, dry_run=False, out=Sweep(), only={(name, f) for f in stale})
