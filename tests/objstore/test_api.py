"""The public verbs on object stores: memory://, SeaweedFS and moto (real S3 servers on 127.0.0.1)."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

import ckptfmt
from ckptfmt.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    FrameworkNotAvailableError,
    IntegrityError,
    UnsupportedURLError,
)
from ckptfmt.storage.urls import resolve


def _state(seed: int = 0, rows: int = 600) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "model": {
            "emb": rng.standard_normal((rows, 4096)).astype(np.float32),  # ~9.4 MiB: 3 chunks of 4 MiB
            "bias": rng.standard_normal(7).astype(np.float16),
        },
        "opt": [rng.integers(0, 9, (3, 5), dtype=np.int64), np.bool_(True)],
        "step": seed,
    }


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, (np.ndarray, np.generic)):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    return a == b


def test_roundtrip_verify_and_open(objstore):
    url = objstore.url("ck")
    st = _state(1)
    digest = ckptfmt.save(st, url, metadata={"run": "a"}, storage_options=objstore.options)
    assert _equal(ckptfmt.load(url, storage_options=objstore.options), st)
    with ckptfmt.open(url, storage_options=objstore.options) as r:
        assert r.digest == digest and r.metadata == {"run": "a"}
        np.testing.assert_array_equal(r.slice("model/emb")[100:103], st["model"]["emb"][100:103])
    rep = ckptfmt.verify(url, storage_options=objstore.options)
    assert rep.ok and rep.digest == digest and rep.bytes_checked == sum(
        a.nbytes for a in (st["model"]["emb"], st["model"]["bias"], st["opt"][0], st["opt"][1])
    )


def test_large_tensor_is_split_across_objects(objstore):
    """Data files stay at the storage's size; a tensor larger than that spans several."""
    storage, url = resolve(objstore.url("ck"), storage_options=objstore.options)
    storage_small = type(storage)(storage.fs, storage.protocol, max_file_size=8 << 20)
    st = {"big": np.arange(5 << 20, dtype=np.float32), "small": np.ones(10)}  # 20 MiB
    ckptfmt.save(st, url, storage=storage_small, chunk_size=1 << 20)
    with ckptfmt.open(url, storage=storage) as r:
        sizes = [f.size for f in r.manifest.files]
        assert len(sizes) >= 3 and max(sizes) <= 8 << 20
        np.testing.assert_array_equal(r.get("big"), st["big"])
        np.testing.assert_array_equal(r.slice("big")[(3 << 20) - 2 : (3 << 20) + 2], st["big"][(3 << 20) - 2 : (3 << 20) + 2])
    assert ckptfmt.verify(url, storage=storage).ok


def test_existing_checkpoint_is_refused_and_overwrite_replaces(objstore):
    url = objstore.url("ck")
    o = objstore.options
    ckptfmt.save(_state(1), url, storage_options=o)
    with pytest.raises(CheckpointExistsError):
        ckptfmt.save(_state(2), url, storage_options=o)
    assert ckptfmt.load(url, storage_options=o)["step"] == 1
    ckptfmt.save(_state(2), url, overwrite=True, storage_options=o)
    assert _equal(ckptfmt.load(url, storage_options=o), _state(2))
    assert ckptfmt.verify(url, storage_options=o).ok


def test_two_writers_one_path_exactly_one_commits(objstore):
    """Both pass the existence check, both upload their data; the conditional manifest
    create lets exactly one commit, the other gets CheckpointExistsError, and what is there
    is the winner's checkpoint, whole."""
    url = objstore.url("ck")
    o = objstore.options
    barrier = threading.Barrier(2)
    results: dict[int, object] = {}
    storage, _ = resolve(url, storage_options=o)
    real_commit = type(storage).write_atomic

    def commit_together(self, path, data, **kw):
        if path.endswith("/MANIFEST"):
            barrier.wait(timeout=60)  # both have checked, uploaded their data: now both commit
        return real_commit(self, path, data, **kw)

    def writer(i: int) -> None:
        try:
            results[i] = ckptfmt.save(_state(10 + i), url, storage_options=o)
        except CheckpointExistsError as e:
            results[i] = e

    type(storage).write_atomic = commit_together
    try:
        threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        type(storage).write_atomic = real_commit
    won = [i for i, r in results.items() if isinstance(r, str)]
    lost = [i for i, r in results.items() if isinstance(r, CheckpointExistsError)]
    assert len(won) == 1 and len(lost) == 1, results
    assert ckptfmt.open(url, storage_options=o).digest == results[won[0]]
    assert _equal(ckptfmt.load(url, storage_options=o), _state(10 + won[0]))
    rep = ckptfmt.verify(url, storage_options=o)
    # The loser deleted its own data objects: nothing but the winner's files is there.
    assert rep.ok and not rep.warnings, rep.problems


def test_slice_fetches_only_the_chunks_it_touches(objstore):
    url = objstore.url("ck")
    o = objstore.options
    rows, cols = 2048, 1024  # float32: 4 KiB a row, 8 MiB; 1 MiB chunks of 256 rows
    w = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    ckptfmt.save({"w": w}, url, chunk_size=1 << 20, storage_options=o)
    storage, _ = resolve(url, storage_options=o)
    gets: list[tuple[str, int | None, int | None]] = []
    real = storage.fs.cat_file

    def counting(path, start=None, end=None, **kw):
        gets.append((path, start, end))
        return real(path, start=start, end=end, **kw)

    storage.fs.cat_file = counting
    try:
        with ckptfmt.open(url, storage_options=o) as r:
            manifest_gets = len(gets)
            got = r.slice("w")[300:310]  # inside chunk 1
            np.testing.assert_array_equal(got, w[300:310])
            data_gets = gets[manifest_gets:]
            assert [(e - s) for _, s, e in data_gets] == [1 << 20]
            got = r.slice("w")[250:260]  # spans chunks 0 and 1: one GET of exactly those two
            np.testing.assert_array_equal(got, w[250:260])
            assert len(gets) - manifest_gets == 2 and gets[-1][1:] == (0, 2 << 20)
    finally:
        del storage.fs.cat_file
    assert manifest_gets == 1  # the manifest is one ranged GET


def test_incremental_save_uploads_only_changed_chunks(objstore):
    o = objstore.options
    base = objstore.url()
    a, b = f"{base}/a", f"{base}/b"
    st = {"w": np.zeros((64, 65536), np.float32)}  # 16 MiB, 16 chunks of 1 MiB
    ckptfmt.save(st, a, chunk_size=1 << 20, shared_store=True, storage_options=o)
    st["w"][5, :] = 1.0  # one chunk changes
    ckptfmt.save(st, b, parent=a, storage_options=o)
    with ckptfmt.open(b, storage_options=o) as r:
        share = r.sharing()
        assert share["own_bytes"] == 1 << 20 and share["shared_bytes"] == 15 << 20
        m = r.manifest
        assert sum(m.files[i].size for i in m.own_files()) == 1 << 20  # what this save uploaded
    np.testing.assert_array_equal(ckptfmt.load(b, storage_options=o)["w"], st["w"])
    assert ckptfmt.verify(b, storage_options=o).ok


def test_corruption_and_missing_objects_are_reported(objstore):
    url = objstore.url("ck")
    o = objstore.options
    ckptfmt.save(_state(3), url, storage_options=o)
    storage, _ = resolve(url, storage_options=o)
    m = ckptfmt.open(url, storage_options=o).manifest
    data = storage.join(url, m.files[0].path)
    raw = bytearray(storage.read_file(data))
    raw[100] ^= 0xFF
    storage.write_atomic(data, bytes(raw))
    rep = ckptfmt.verify(url, storage_options=o)
    assert not rep.ok and [p.kind for p in rep.errors] == ["hash_mismatch"]
    with pytest.raises(IntegrityError, match="chunk 0"):
        ckptfmt.load(url, storage_options=o)
    storage.delete(data)
    rep = ckptfmt.verify(url, storage_options=o)
    assert [p.kind for p in rep.errors] == ["missing_file"]


def test_missing_and_incomplete_checkpoints(objstore):
    o = objstore.options
    url = objstore.url("ck")
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint"):
        ckptfmt.load(url, storage_options=o)
    storage, _ = resolve(url, storage_options=o)
    storage.write_atomic(storage.join(url, "data-00000-deadbeef.data"), b"x" * 64)
    with pytest.raises(CheckpointNotFoundError, match="not a complete checkpoint"):
        ckptfmt.open(url, storage_options=o)


def test_credentials_and_endpoint_from_the_environment(seaweedfs, monkeypatch):
    """No storage_options: the standard AWS variables (including AWS_ENDPOINT_URL) are used."""
    import s3fs

    from ckptfmt.storage import urls

    o = seaweedfs.options
    monkeypatch.setenv("AWS_ENDPOINT_URL", o["endpoint_url"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", o["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", o["secret"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setattr(urls, "_cache", {})
    s3fs.S3FileSystem.clear_instance_cache()
    url = seaweedfs.url("ck")
    ckptfmt.save(_state(4), url)
    assert _equal(ckptfmt.load(url), _state(4))
    # The same bytes through a filesystem built from explicit options: it is the same server.
    assert seaweedfs.fs().exists(url.removeprefix("s3://") + "/MANIFEST")
    urls._cache.clear()
    s3fs.S3FileSystem.clear_instance_cache()


# -- URLs nobody handles are refused, never turned into local directories ------------------


@pytest.fixture
def in_tmp_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("url", ["ftp://host/ck", "hdfs://nn/ck", "s3:/bucket/ck", "http://example.com/ck"])
def test_unsupported_urls_are_refused_by_every_verb(url, in_tmp_cwd):
    st = {"a": np.ones(2)}
    calls = [
        lambda: ckptfmt.save(st, url),
        lambda: ckptfmt.load(url),
        lambda: ckptfmt.open(url),
        lambda: ckptfmt.verify(url),
        lambda: ckptfmt.remove(url),
        lambda: ckptfmt.gc(url),
        lambda: ckptfmt.compact(url),
        lambda: ckptfmt.CheckpointManager(url),
        lambda: ckptfmt.save(st, str(in_tmp_cwd / "ok"), parent=url),
    ]
    for call in calls:
        with pytest.raises(UnsupportedURLError):
            call()
    assert os.listdir(in_tmp_cwd) == []  # nothing was created locally


def test_file_urls_are_local(tmp_path):
    p = tmp_path / "ck"
    ckptfmt.save({"a": np.ones(2)}, f"file://{p}")
    assert (p / "MANIFEST").is_file()
    np.testing.assert_array_equal(ckptfmt.load(str(p))["a"], np.ones(2))


def test_missing_backend_names_the_extra(monkeypatch):
    from ckptfmt.storage import urls

    monkeypatch.setitem(urls.SCHEMES, "gs", urls._Scheme("gs", "ckptfmt_no_such_module", "gcsfs", "gcs"))
    monkeypatch.setattr(urls, "_cache", {})
    with pytest.raises(FrameworkNotAvailableError, match=r"pip install 'ckptfmt\[gcs\]'"):
        ckptfmt.load("gs://bucket/ck")


def test_storage_errors_name_the_url():
    """An unreachable endpoint is a StorageError naming the object, not a botocore exception."""
    opts = {"key": "k", "secret": "s", "endpoint_url": "http://127.0.0.1:9", "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}}
    with pytest.raises(ckptfmt.StorageError, match=r"s3://nobucket/ck/MANIFEST"):
        ckptfmt.load("s3://nobucket/ck", storage_options=opts)


class _Concurrency:
    """Wraps a filesystem method: counts calls and the most running at once (each sleeps a bit)."""

    def __init__(self, fn, delay: float = 0.02) -> None:
        self.fn, self.delay = fn, delay
        self.running = self.peak = self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, *a, **kw):
        import time

        with self.lock:
            self.running += 1
            self.calls += 1
            self.peak = max(self.peak, self.running)
        try:
            time.sleep(self.delay)  # a network round trip
            return self.fn(*a, **kw)
        finally:
            with self.lock:
                self.running -= 1


def test_save_uploads_load_and_verify_fetch_in_parallel():
    storage, url = resolve("memory://ckpt/parallel/ck")
    storage = type(storage)(storage.fs, "memory", max_file_size=1 << 20)
    st = {f"t{i}": np.full((1 << 18,), i, np.float32) for i in range(8)}  # 8 MiB, 8 objects
    put = _Concurrency(storage.fs.pipe_file)
    storage.fs.pipe_file = put
    try:
        ckptfmt.save(st, url, storage=storage, chunk_size=256 << 10)
    finally:
        del storage.fs.pipe_file
    assert put.calls == 9 and put.peak > 1  # 8 data objects (uploaded together) + the manifest
    get = _Concurrency(storage.fs.cat_file)
    storage.fs.cat_file = get
    try:
        out = ckptfmt.load(url, storage=storage)
        assert get.peak > 1 and get.calls == 1 + 8  # the manifest, then each object's 4 adjacent chunks in one GET
        get.peak = 0
        assert ckptfmt.verify(url, storage=storage).chunks_checked == 32
        assert get.peak > 1
    finally:
        del storage.fs.cat_file
    assert all(np.array_equal(out[k], st[k]) for k in st)


# -- the run-directory verbs over URLs: manager, retention, gc, remove, compact, history -----


def test_manager_retention_async_and_restore_over_a_url(objstore):
    o = objstore.options
    run = objstore.url("run")
    states = {}
    with ckptfmt.CheckpointManager(run, max_to_keep=2, async_save=True, storage_options=o) as mgr:
        for step in range(1, 6):
            st = _state(step, rows=300)
            states[step] = st
            assert mgr.save(step, st, metadata={"step": step})
        mgr.wait()
        assert mgr.all_steps() == [4, 5]
        assert _equal(mgr.restore(), states[5])
        assert _equal(mgr.restore(4), states[4])
        with pytest.raises(ckptfmt.CheckpointLockedError):
            ckptfmt.CheckpointManager(run, storage_options=o)  # one manager per run
    from ckptfmt.manager import history

    h = history(run, storage_options=o)
    assert [e.step for e in h] == [4, 5] and h[1].parent == "step-4"
    # Retention freed the store data only the removed steps used: a gc finds nothing more.
    rep = ckptfmt.gc(run, grace_seconds=0, storage_options=o)
    assert rep.deleted == () and not rep.unreadable
    for s in (4, 5):
        assert ckptfmt.verify(f"{run}/step-{s}", storage_options=o).ok
    # The lock object is gone with the manager: a new one opens at once.
    ckptfmt.CheckpointManager(run, storage_options=o).close()


def test_remove_gc_and_compact_over_a_url(objstore):
    o = objstore.options
    run = objstore.url("run")
    a, b = f"{run}/a", f"{run}/b"
    st = _state(5)
    ckptfmt.save(st, a, shared_store=True, storage_options=o)
    st["model"]["bias"][:] = 0
    ckptfmt.save(st, b, parent=a, storage_options=o)
    ckptfmt.remove(a, storage_options=o)
    with pytest.raises(CheckpointNotFoundError):
        ckptfmt.open(a, storage_options=o)
    assert _equal(ckptfmt.load(b, storage_options=o), st)  # b's shared data survived a's removal
    ckptfmt.compact(b, storage_options=o)
    rep = ckptfmt.gc(run, grace_seconds=0, storage_options=o)
    assert rep.deleted, "the store data nobody uses after compact is freed"
    assert _equal(ckptfmt.load(b, storage_options=o), st) and ckptfmt.verify(b, storage_options=o).ok


def test_compact_to_a_local_portable_copy(objstore, tmp_path):
    o = objstore.options
    run = objstore.url("run")
    st = _state(6)
    ckptfmt.save(st, f"{run}/a", shared_store=True, storage_options=o)
    ckptfmt.compact(f"{run}/a", to=str(tmp_path / "copy"), storage_options=o)
    assert _equal(ckptfmt.load(str(tmp_path / "copy")), st) and ckptfmt.verify(str(tmp_path / "copy")).ok


def test_a_crashed_managers_lock_object_is_named(moto_s3):
    """An object store cannot tell that a lock holder died: the next manager is refused with
    a message naming the lock object; deleting it lets the run go on."""
    o = moto_s3.options
    run = moto_s3.url("run")
    mgr = ckptfmt.CheckpointManager(run, storage_options=o)
    mgr.save(1, _state(1, rows=10))
    mgr._lock = None  # the process "dies" holding the lock: nothing releases it
    with pytest.raises(ckptfmt.CheckpointLockedError, match=r"\.ckptfmt\.lock") as e:
        ckptfmt.CheckpointManager(run, storage_options=o)
    assert "delete" in str(e.value)
    storage, _ = resolve(run, storage_options=o)
    storage.delete(f"{run}/.ckptfmt.lock")
    with ckptfmt.CheckpointManager(run, storage_options=o) as m2:
        assert m2.latest_step() == 1
