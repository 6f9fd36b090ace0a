"""Crash consistency on a real S3 server: a saving process killed at random moments.

A forked child (it inherits the imported modules, so a trial costs milliseconds, not an
interpreter start) replaces a checkpoint again and again with ``overwrite=True`` and writes
incremental children of it; the test SIGKILLs it at a random moment, then checks that the
checkpoint loads bit-exact as one of the states the child was saving, that every path with a
manifest is complete and every other one is absent, and at the end that gc deletes the
orphaned objects and nothing else.
"""

from __future__ import annotations

import os
import random
import signal
import time

import numpy as np
import pytest

import ckptfmt
from ckptfmt.errors import CheckpointNotFoundError
from ckptfmt.storage.fsspec import FsspecStorage

TRIALS = int(os.environ.get("CKPTFMT_CRASH_TRIALS", "50"))
CHUNK = 256 << 10


def _state(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((3, 1 << 19)).astype(np.float32),  # 6 MiB
        "v": rng.standard_normal(1 << 17).astype(np.float64),  # 1 MiB
        "step": seed,
    }


def _storage(store) -> FsspecStorage:
    # Small data files: one save is many objects, so a kill lands between uploads too.
    return FsspecStorage(store.fs(), "s3", max_file_size=1 << 20)


def _child(store, base: str, first_seed: int, wfd: int) -> None:
    storage = _storage(store)
    storage.exists(f"{base}/ck/MANIFEST")  # connected: from here on, time is spent saving
    os.write(wfd, b"r")
    seed = first_seed
    while True:
        st = _state(seed)
        ckptfmt.save(st, f"{base}/ck", storage=storage, overwrite=True, metadata={"seed": seed}, chunk_size=CHUNK)
        os.write(wfd, b"f")
        st["w"][1, :1000] += 1.0
        ckptfmt.save(st, f"{base}/inc-{seed}", storage=storage, parent=f"{base}/ck", metadata={"seed": seed, "inc": True})
        os.write(wfd, b"i")
        seed += 1


def _expected(meta: dict) -> dict:
    st = _state(meta["seed"])
    if meta.get("inc"):
        st["w"][1, :1000] += 1.0
    return st


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (a[k].tobytes() == b[k].tobytes() and a[k].dtype == b[k].dtype) if isinstance(a[k], np.ndarray) else a[k] == b[k]
        for k in a
    )


@pytest.mark.slow
def test_killed_saves_never_expose_a_partial_checkpoint(seaweedfs):
    storage = _storage(seaweedfs)
    base = seaweedfs.url()
    ckptfmt.save(_state(0), f"{base}/ck", storage=storage, metadata={"seed": 0}, chunk_size=CHUNK)
    t0 = time.monotonic()
    ckptfmt.save(_state(0), f"{base}/probe", storage=storage, chunk_size=CHUNK, metadata={"seed": 0})
    one_save = time.monotonic() - t0
    rng = random.Random(1234)
    seed = 1
    commits = 0
    seen: set[str] = set()
    for trial in range(TRIALS):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns
            os.close(r)
            try:
                _child(seaweedfs, base, seed, w)
            finally:
                os._exit(0)
        os.close(w)
        assert os.read(r, 1) == b"r", f"trial {trial}: the child died before it was ready"
        time.sleep(rng.uniform(0.0, 2.5 * one_save))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.set_blocking(r, False)
        try:
            done = os.read(r, 1 << 16)
        except BlockingIOError:
            done = b""
        os.close(r)
        commits += len(done)
        seed += max(1, done.count(b"f") + 1)  # the next child saves states never seen before

        # The checkpoint is always there, whole, and equal to a state some save committed.
        with ckptfmt.open(f"{base}/ck", storage=storage) as rd:
            meta = rd.metadata
            assert _same(rd.load(), _expected(meta)), f"trial {trial}: ck is not bit-exact"
        # Every other path is a complete checkpoint or none at all.
        for name in storage.listdir(base):
            if name in ("ck", "probe") or name in seen:
                continue
            p = f"{base}/{name}"
            try:
                rd = ckptfmt.open(p, storage=storage)
            except CheckpointNotFoundError:
                continue  # killed before its manifest: absent to every reader
            with rd:
                assert _same(rd.load(), _expected(rd.metadata)), f"trial {trial}: {p} is not bit-exact"
            rep = ckptfmt.verify(p, storage=storage)
            assert rep.ok, (trial, p, rep.errors)
            seen.add(name)  # complete checkpoints never change: checked once
    assert commits > 0, "no save ever completed: the kills came too early to test anything"
    rep = ckptfmt.verify(f"{base}/ck", storage=storage)
    assert rep.ok
    orphans = [p.file for p in rep.warnings if p.kind == "extra_file"]
    assert orphans, "no kill landed mid-save (no orphaned objects): widen the kill window"
    before = ckptfmt.run_info(base, storage=storage)

    # gc frees the orphans. The killed savers' shared-lock objects stay behind (an object
    # store cannot tell that their holders died), so gc is refused until they are deleted.
    stale = [n for n in storage.listdir(base) if n.startswith(".ckptfmt.lock")]
    if stale:
        with pytest.raises(ckptfmt.CheckpointLockedError, match="delete"):
            ckptfmt.gc(base, grace_seconds=0, storage=storage, timeout=0)
        storage.delete_many([f"{base}/{n}" for n in stale])
    gc_rep = ckptfmt.gc(base, grace_seconds=0, storage=storage)
    assert not gc_rep.unreadable and len(gc_rep.deleted) >= len(orphans)
    rep = ckptfmt.verify(f"{base}/ck", storage=storage)
    assert rep.ok and not rep.warnings, rep.problems
    after = ckptfmt.run_info(base, storage=storage)
    assert after.unreferenced_bytes == 0 and after.checkpoints == before.checkpoints
    for p in after.checkpoints:  # nothing a complete checkpoint needs was deleted
        with ckptfmt.open(p, storage=storage) as rd:
            assert _same(rd.load(), _expected(rd.metadata)), p
    print(f"{TRIALS} kills, {commits} saves committed between them, {len(orphans)} orphaned objects in ck, "
          f"{before.unreferenced_bytes} unreferenced store bytes; gc deleted {len(gc_rep.deleted)} objects")
