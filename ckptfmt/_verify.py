"""Verifying a checkpoint: every chunk re-hashed, every file accounted for."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ckptfmt._pool import io_pool, pool, workers
from ckptfmt._progress import progress_bar
from ckptfmt._reader import read_manifest, symlink_message
from ckptfmt.errors import CheckpointNotFoundError, FormatError
from ckptfmt.format.hashing import get_fingerprint, get_hash
from ckptfmt.format.spec import MANIFEST_NAME, MANIFEST_TMP_PREFIX, STORE_NAME
from ckptfmt.storage.base import Storage

#: Problem kinds. "error" problems make a checkpoint fail verification; "warning" ones do not.
#: "fingerprint_mismatch": the data matches its hash but not the fingerprint the manifest
#: records for it (section 10.1); an incremental save built on it could record a wrong chunk.
ERROR_KINDS = ("manifest", "missing_file", "truncated_file", "size_mismatch", "hash_mismatch", "unreadable",
               "fingerprint_mismatch")
WARNING_KINDS = ("extra_file", "leftover")


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a checkpoint, and where."""

    kind: str
    message: str
    severity: str = "error"
    file: str | None = None
    tensor: str | None = None
    chunk: int | None = None
    offset: int | None = None

    def __str__(self) -> str:
        return f"{self.severity}: {self.kind}: {self.message}"


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The result of :func:`ckptfmt.verify`. ``ok`` is true when no error was found."""

    path: str
    ok: bool
    digest: str | None
    version: str | None
    tensors: int
    chunks_checked: int
    bytes_checked: int
    seconds: float
    problems: tuple[Problem, ...] = field(default_factory=tuple)
    #: False when the input is not a checkpoint of its kind at all (wrong magic, not the
    #: format its name says): the CLI reports it as unreadable (exit 3), not corrupt (exit 1).
    readable: bool = True
    #: What the kind's checks can vouch for: "full" (every byte is covered by a checksum) or
    #: "structure" (headers and offsets only: the format records no checksums of the data).
    coverage: str = "full"

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        d = asdict(self)
        d["problems"] = [asdict(p) for p in self.problems]
        return d


#: Locally, chunks are read and hashed in pieces of this size (see verify_checkpoint).
_PIECE = 256 * 1024


def _missing_hint(rel: str) -> str:
    if rel.startswith(f"../{STORE_NAME}/"):
        return (f" (this checkpoint keeps its data in its run's shared store {STORE_NAME}/, which a copy of the "
                "checkpoint directory alone (cp -r, rsync -a) does not include: make a portable copy with "
                "`ckptfmt compact SRC --to DST`, or copy the whole run directory)")
    if rel.startswith("../"):
        return (" (it lay in another checkpoint directory of the run, which was deleted or not copied: make portable "
                "copies with `ckptfmt compact SRC --to DST`)")
    return ""


#: What a fingerprint mismatch means in a file this checkpoint's save wrote itself.
_OWN_FP = ("the checkpoint loads correctly, but do not build an incremental save on it: "
           "save the next one without parent=")
#: ... and in a file it shares with an earlier checkpoint: an incremental save decided from the
#: (wrong) fingerprint that this chunk had not changed, so it may hold the earlier data.
_INHERITED_FP = ("the chunk was taken from an earlier checkpoint because its recorded fingerprint said it had not "
                 "changed: it may hold that checkpoint's data instead of what was saved; do not trust this checkpoint's "
                 "values or build on it, and save again from the live state without parent=")


def verify_checkpoint(path: str, storage: Storage, *, progress: bool | None = None) -> VerifyReport:
    """Check a checkpoint completely; see :func:`ckptfmt.verify`."""
    t0 = time.perf_counter()
    problems: list[Problem] = []

    def report(digest: str | None = None, version: str | None = None, tensors: int = 0, chunks: int = 0, nbytes: int = 0) -> VerifyReport:
        ok = not any(p.severity == "error" for p in problems)
        return VerifyReport(path, ok, digest, version, tensors, chunks, nbytes, time.perf_counter() - t0, tuple(problems))

    try:
        m = read_manifest(path, storage)
    except CheckpointNotFoundError:
        raise
    except FormatError as e:
        problems.append(Problem("manifest", str(e), file=storage.join(path, MANIFEST_NAME)))
        return report()
    version = f"{m.version[0]}.{m.version[1]}"

    # Files: present, of the recorded size, and nothing unexplained beside them.
    usable = [True] * len(m.files)
    for i, fe in enumerate(m.files):
        fpath = storage.join(path, fe.path)
        if storage.islink(fpath):
            problems.append(Problem("unreadable", symlink_message(fpath), file=fe.path))
            usable[i] = False
            continue
        try:
            size = storage.size(fpath)
        except FileNotFoundError:
            problems.append(Problem("missing_file", f"data file {fpath} is missing{_missing_hint(fe.path)}", file=fe.path))
            usable[i] = False
            continue
        if size < fe.size:
            problems.append(Problem("truncated_file", f"data file {fpath} is truncated: {size} of {fe.size} bytes", file=fe.path, offset=size))
            usable[i] = False
        elif size > fe.size:
            problems.append(Problem("size_mismatch", f"data file {fpath} is {size} bytes, the manifest records {fe.size}", file=fe.path, offset=fe.size))
    known = {fe.path for fe in m.files} | {MANIFEST_NAME}
    for name in storage.listdir(path):
        if name in known or storage.isdir(storage.join(path, name)):
            continue
        if name.startswith(MANIFEST_TMP_PREFIX):
            problems.append(Problem("leftover", f"{name} is left over from an interrupted save; it is safe to delete", "warning", file=name))
        else:
            problems.append(Problem("extra_file", f"{name} is not part of the checkpoint", "warning", file=name))

    # Chunks: grouped per worker, each worker with its own buffer and file handles.
    hasher = get_hash(m.hash_alg)
    own = set(m.own_files())
    fingerprint = get_fingerprint(m.fp_alg) if m.chunk_fps is not None else None
    cs = m.chunk_size
    entries = [m.tensor(i) for i in range(m.num_tensors)]
    jobs = [(e, k) for e in entries for k in range(e.num_chunks) if usable[int(m.chunk_file[e.first_chunk + k])]]
    total = sum(m.chunk_length(e, k) for e, k in jobs)
    bar = progress_bar(total, f"verifying {path}", progress)
    remote = storage.io_concurrency > 0
    nworkers = storage.io_concurrency if remote else workers()
    slices = [jobs[w::nworkers] for w in range(nworkers)]

    # Locally a chunk is read and hashed in pieces small enough to stay in the core's cache
    # (rather than copying a whole 4 MiB chunk out to memory and reading it back);
    # remote backends read a whole chunk per request.
    piece = cs if remote or hasher.new is None or (fingerprint is not None and fingerprint.new is None) else min(cs, _PIECE)

    def read_sums(h, off: int, length: int, view: memoryview) -> tuple[int, bytes, bytes | None]:
        """Read and hash ``length`` bytes at ``off``: (bytes read, hash, fingerprint)."""
        if length <= piece:
            got = h.readinto(off, view[:length])
            data = view[:got]
            return got, hasher.digest(data), fingerprint.digest(data) if fingerprint is not None else None
        hs, fs = hasher.new(), fingerprint.new() if fingerprint is not None else None
        got = 0
        while got < length:
            want = min(piece, length - got)
            n = h.readinto(off + got, view[:want])
            hs.update(view[:n])
            if fs is not None:
                fs.update(view[:n])
            got += n
            if n < want:  # the file ends here: reported as truncated
                break
        return got, hs.digest(), fs.digest() if fs is not None else None

    def work(part: list) -> tuple[list[Problem], int, int]:
        found: list[Problem] = []
        buf = np.empty(piece, np.uint8)
        view = memoryview(buf)
        handles: dict[int, Any] = {}
        nchunks = nbytes = 0
        try:
            for e, k in part:
                c = e.first_chunk + k
                f, off, length = int(m.chunk_file[c]), int(m.chunk_offset[c]), m.chunk_length(e, k)
                fe = m.files[f]
                try:
                    h = handles.get(f) or handles.setdefault(f, storage.open_read(storage.join(path, fe.path)))
                    got, digest, fp = read_sums(h, off, length, view)
                except OSError as ex:
                    found.append(Problem("unreadable", f"reading {fe.path} at byte {off} failed: {ex}", file=fe.path, tensor=e.name, chunk=k, offset=off))
                    continue
                if got != length:
                    found.append(Problem("truncated_file", f"tensor {e.name!r} chunk {k}: {fe.path} ends before byte {off + length}", file=fe.path, tensor=e.name, chunk=k, offset=off))
                elif digest != m.chunk_hash(c):
                    found.append(Problem("hash_mismatch", f"tensor {e.name!r} chunk {k}: hash mismatch in {fe.path} at byte offset {off}", file=fe.path, tensor=e.name, chunk=k, offset=off))
                elif fp is not None and fp != m.chunk_fp(c):
                    found.append(Problem(
                        "fingerprint_mismatch",
                        f"tensor {e.name!r} chunk {k}: the data matches its hash but not the fingerprint the manifest records "
                        f"for it ({fe.path} at byte offset {off}): "
                        + (_OWN_FP if f in own else _INHERITED_FP), file=fe.path, tensor=e.name, chunk=k, offset=off))
                nchunks += 1
                nbytes += length
                bar.update(length)
        finally:
            for h in handles.values():
                h.close()
        return found, nchunks, nbytes

    executor = io_pool() if remote else pool()
    results = [f.result() for f in [executor.submit(work, s) for s in slices]]
    bar.close()
    nchunks = nbytes = 0
    for found, c, b in results:
        problems.extend(found)
        nchunks += c
        nbytes += b
    problems.sort(key=lambda p: (p.severity != "error", p.file or "", p.offset or 0))
    return report(m.hexdigest, version, m.num_tensors, nchunks, nbytes)
