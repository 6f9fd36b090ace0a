"""ckptfmt as DCP's storage layer across processes, and DCP checkpoints imported safely.

The multi-rank runs are subprocesses (tests/dcp/_worker.py) on CPU with gloo; they start
once per module, concurrently where they do not depend on each other:
  * 4 ranks save an FSDP2-sharded SqueezeNet 1.1 + Adam (ckptfmt.dcp.Writer and DCP's own
    FileSystemWriter), with the unsharded state as reference; then the coordinator
    SIGKILLs itself while the next step is saved over that checkpoint;
  * 2 ranks load that checkpoint (bit-exact check inside), save twice incrementally, then
    rank 1 SIGKILLs itself while a step is saved over the incremental parent.
Each process costs ~4 s of CPU to import torch, so the runs are few and do several things.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

import torch.distributed.checkpoint as dcp  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from torch.distributed.checkpoint.api import CheckpointException  # noqa: E402  (a BaseException)

import ckptfmt  # noqa: E402
import ckptfmt.dcp  # noqa: E402
from ckptfmt.cli.main import main as cli  # noqa: E402
from ckptfmt.errors import CheckpointExistsError, CheckpointLockedError, FormatError, IntegrityError  # noqa: E402
from ckptfmt.format.spec import DATA_FILE_RE, STORE_FILE_RE  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_worker.py")
TIMEOUT = 600


def _worker_module():
    spec = importlib.util.spec_from_file_location("_dcp_worker", WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


W = _worker_module()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, mode: str, work: str, env: dict | None = None) -> list[subprocess.Popen]:
    port = _port()
    os.makedirs(work, exist_ok=True)
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    procs = []
    for r in range(world):
        log = open(os.path.join(work, f"{mode}-rank{r}.log"), "w")
        procs.append(subprocess.Popen([sys.executable, WORKER, str(r), str(world), str(port), mode, work],
                                      stdout=log, stderr=subprocess.STDOUT, env=e))
    return procs


def _wait(procs: list[subprocess.Popen], deadline: float) -> list[int]:
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    q.kill()
            raise AssertionError("a rank did not finish in time") from None
    return codes


def _log(work: str, mode: str, rank: int) -> str:
    with open(os.path.join(work, f"{mode}-rank{rank}.log")) as f:
        return f.read()[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    main = str(tmp_path_factory.mktemp("dcp"))
    deadline = time.monotonic() + TIMEOUT
    out = {"main": main, "save4": _wait(_launch(4, "save4", main), deadline)}
    assert os.path.exists(os.path.join(main, "ck4.digest")), _log(main, "save4", 0)
    out["load2"] = _wait(_launch(2, "load2", main), deadline)
    assert os.path.exists(os.path.join(main, "inc-a.digest")), _log(main, "load2", 0)
    return out


def _flat(tree) -> dict[str, np.ndarray]:
    return {"/".join(k): np.asarray(v) for k, v in W.flat(tree).items()}


def _same(got: dict, ref) -> None:
    assert sorted(got) == sorted(ref.files)
    for k in ref.files:
        a, b = got[k], ref[k]
        assert (a.dtype, a.shape) == (b.dtype, b.shape), k
        assert a.tobytes() == b.tobytes(), f"{k} differs"


# ------------------------------------------------------------------ save, load, reshard
def test_four_ranks_write_one_committed_checkpoint(runs):
    ck = os.path.join(runs["main"], "ck4")
    with ckptfmt.open(ck) as r:
        files = [f.path for f in r.manifest.files]
        assert all(DATA_FILE_RE.match(f) for f in files)  # in its own directory, named as gc knows them
        assert len({f.split("-")[2] for f in files}) == 4  # one file per rank, a token per rank
        assert r.version == (1, 3)
        assert len(r.sharded_keys()) == 208  # 52 parameters x (weight, exp_avg, exp_avg_sq, step)
        weights = [k for k in r.keys() if k.startswith("model.features.3.squeeze.weight@")]
        assert len(weights) == 4  # one piece per rank
    report = ckptfmt.verify(ck)
    assert report.ok and report.chunks_checked > 208


def test_load_in_one_process_assembles_full_tensors_bit_exact(runs):
    state = ckptfmt.load(os.path.join(runs["main"], "ck4"))
    _same(_flat(state), np.load(os.path.join(runs["main"], "ref4.npz")))
    groups = state["optim"]["param_groups"]
    assert groups[0]["lr"] == 1e-3 and groups[0]["betas"] == (0.9, 0.999)


def test_load_on_two_ranks_is_bit_exact(runs):
    # Rank 0 compares the full state after loading with ref4.npz and writes load2.ok if equal.
    assert os.path.exists(os.path.join(runs["main"], "load2.ok")), _log(runs["main"], "load2", 0)


def test_dcp_load_in_one_process_into_an_unsharded_model(runs):
    model = W.SqueezeNet11(num_classes=10)
    state = {"model": model.state_dict()}
    dcp.load(state, storage_reader=ckptfmt.dcp.Reader(os.path.join(runs["main"], "ck4")))
    ref = np.load(os.path.join(runs["main"], "ref4.npz"))
    for k, v in model.state_dict().items():
        assert v.numpy().tobytes() == ref[f"model/{k}"].tobytes(), k


def test_incremental_save_across_ranks_writes_only_what_changed(runs):
    inc_b = os.path.join(runs["main"], "inc-b")
    assert os.listdir(inc_b) == ["MANIFEST"]  # 1.2: its data lies in the run's store
    with ckptfmt.open(inc_b) as r:
        share = r.sharing()
        m = r.manifest
        assert all(f.path.startswith("../ckptfmt-store/pack-") for f in m.files)
        new = [m.files[i].path for i in m.wrote]
        # rank 1's pieces did not change: only rank 0 (the rank in the name) wrote a file
        assert len(new) == 1 and new[0].split("-")[2].endswith("000000"), new
        touched = {m.names[t] for t in range(m.num_tensors)
                   for c in range(m.tensor(t).first_chunk, m.tensor(t).first_chunk + m.tensor(t).num_chunks)
                   if int(m.chunk_file[c]) in m.wrote}
        assert touched == {"model.classifier.1.weight@[0,0,0,0]"}
    assert share["parent"] == "inc-a" and share["own_bytes"] == 4096  # one chunk of one row
    assert ckptfmt.verify(inc_b).ok
    _same(_flat(ckptfmt.load(inc_b)), np.load(os.path.join(runs["main"], "ref-b.npz")))


# ------------------------------------------------------------------ corruption, failures
def test_flipped_byte_is_named_by_verify_and_refused_on_load(runs, tmp_path):
    ck = str(tmp_path / "ck4")
    shutil.copytree(os.path.join(runs["main"], "ck4"), ck)
    with ckptfmt.open(ck) as r:
        victim = max(r.manifest.files[1:], key=lambda f: f.size).path  # one rank's file
    with open(os.path.join(ck, victim), "r+b") as f:
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 0x10]))
    res = CliRunner().invoke(cli, ["verify", ck])
    assert res.exit_code == 1
    assert "hash_mismatch" in res.output and victim in res.output
    with pytest.raises(IntegrityError, match=victim):
        ckptfmt.load(ck)
    model = W.SqueezeNet11(num_classes=10)
    with pytest.raises(CheckpointException, match="hash mismatch"):
        dcp.load({"model": model.state_dict()}, storage_reader=ckptfmt.dcp.Reader(ck))


@pytest.mark.parametrize(("run", "killed", "ck"), [("save4", 0, "ck4"), ("load2", 1, "inc-a")])
def test_killed_rank_never_commits_and_the_previous_checkpoint_stays(runs, run, killed, ck):
    codes = runs[run]
    assert codes[killed] == -9, _log(runs["main"], run, killed)
    assert all(c not in (0, -9) for i, c in enumerate(codes) if i != killed)  # survivors failed: no commit
    path = os.path.join(runs["main"], ck)
    with open(path + ".digest") as f:
        prev = f.read()
    with ckptfmt.open(path) as r:
        assert r.digest == prev
    report = ckptfmt.verify(path)
    assert report.ok
    if ck == "ck4":  # a full save: the dead save's data, uncommitted, in the checkpoint's directory
        assert any(p.kind == "extra_file" for p in report.problems)
    else:  # a save into the store: there, used by no manifest
        assert ckptfmt.run_info(runs["main"]).unreferenced_bytes > 0
        assert ckptfmt.verify(os.path.join(runs["main"], "inc-b")).ok  # its child is untouched
    ckptfmt.load(path)


# ------------------------------------------------------------------ the run directory (1.2 rules)
def test_verify_gc_rm_and_remove_on_the_run_of_dcp_checkpoints(runs, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(runs["main"], run, symlinks=True)
    store = os.path.join(run, "ckptfmt-store")
    dcp4 = sorted(os.listdir(os.path.join(run, "dcp4")))  # DCP's own FileSystemWriter: not ours
    res = CliRunner().invoke(cli, ["verify", run])
    assert res.exit_code == 0, res.output
    assert "3 checkpoint(s)" in res.output and "used by no checkpoint" in res.output  # the killed save's packs
    assert "extra_file" in res.output  # ck4: the killed full save's files
    leftovers = [f for f in os.listdir(os.path.join(run, "ck4")) if f != "MANIFEST" and f not in
                 {x.path for x in ckptfmt.open(os.path.join(run, "ck4")).manifest.files}]
    assert leftovers and all(DATA_FILE_RE.match(f) for f in leftovers)

    rep = ckptfmt.gc(run, grace_seconds=0)
    deleted = {os.path.relpath(p, run) for p in rep.deleted}
    assert {os.path.join("ck4", f) for f in leftovers} <= deleted
    assert all(d.startswith(("ck4/", "ckptfmt-store/pack-")) for d in deleted), deleted
    assert ckptfmt.run_info(run).unreferenced_bytes == 0
    assert sorted(os.listdir(os.path.join(run, "dcp4"))) == dcp4
    for ck in ("ck4", "inc-a", "inc-b"):
        rep = ckptfmt.verify(os.path.join(run, ck))
        assert rep.ok and not rep.problems, (ck, rep.problems)

    shutil.rmtree(os.path.join(run, "inc-a"))  # rm -r of the parent never breaks its child
    assert ckptfmt.verify(os.path.join(run, "inc-b")).ok
    assert ckptfmt.gc(run, grace_seconds=0).deleted == ()  # inc-b shares a chunk of every pack of inc-a
    assert ckptfmt.verify(os.path.join(run, "inc-b")).ok
    _same(_flat(ckptfmt.load(os.path.join(run, "inc-b"))), np.load(os.path.join(run, "ref-b.npz")))

    ckptfmt.remove(os.path.join(run, "inc-b"))
    assert [f for f in os.listdir(store) if STORE_FILE_RE.match(f)] == []
    ckptfmt.remove(os.path.join(run, "ck4"))
    assert not os.path.exists(os.path.join(run, "ck4"))
    assert sorted(os.listdir(os.path.join(run, "dcp4"))) == dcp4 and os.path.exists(os.path.join(run, "ref4.npz"))


# ------------------------------------------------------------------ single process
def test_existing_checkpoint_is_not_replaced_without_overwrite(tmp_path):
    p = str(tmp_path / "ck")
    dcp.save({"w": torch.arange(3.0)}, storage_writer=ckptfmt.dcp.Writer(p))
    with pytest.raises(CheckpointException, match=CheckpointExistsError.__name__):
        dcp.save({"w": torch.ones(3)}, storage_writer=ckptfmt.dcp.Writer(p))
    assert ckptfmt.load(p)["w"].tolist() == [0.0, 1.0, 2.0]
    dcp.save({"w": torch.ones(3)}, storage_writer=ckptfmt.dcp.Writer(p, overwrite=True))
    assert ckptfmt.load(p)["w"].tolist() == [1.0, 1.0, 1.0]
    assert len([f for f in os.listdir(p) if f.endswith(".data")]) == 1  # the replaced data is gone


def test_async_save_and_bf16(tmp_path):
    p = str(tmp_path / "ck")
    w = torch.randn(5, 7).to(torch.bfloat16)
    fut = dcp.async_save({"w": w, "n": 3}, storage_writer=ckptfmt.dcp.Writer(p))
    fut.result()
    got = ckptfmt.load(p)
    assert str(got["w"].dtype) == "bfloat16" and got["n"] == 3
    assert got["w"].view(np.int16).tobytes() == w.view(torch.int16).numpy().tobytes()


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_opaque_object_is_refused_unless_trusted(tmp_path):
    from fractions import Fraction

    p = str(tmp_path / "ck")
    dcp.save({"w": torch.ones(2), "frac": Fraction(1, 3)}, storage_writer=ckptfmt.dcp.Writer(p))
    with pytest.raises(FormatError, match="does not unpickle"):
        ckptfmt.load(p)
    state = {"w": torch.zeros(2), "frac": None}
    with pytest.raises(CheckpointException, match="refused"):
        dcp.load(state, storage_reader=ckptfmt.dcp.Reader(p))
    dcp.load(state, storage_reader=ckptfmt.dcp.Reader(p, trusted=True))
    assert state["frac"] == Fraction(1, 3)


# ------------------------------------------------------------------ dcp-import
def test_dcp_import_of_filesystemwriter_checkpoint_is_bit_exact(runs, tmp_path):
    src = os.path.join(runs["main"], "dcp4")
    assert sorted(os.listdir(src))[:2] == [".metadata", "__0_0.distcp"]  # written by DCP itself
    dst = str(tmp_path / "imported")
    res = CliRunner().invoke(cli, ["convert", "dcp-import", src, dst])
    assert res.exit_code == 0, res.output
    assert "208 tensors" in res.output
    _same(_flat(ckptfmt.load(dst)), np.load(os.path.join(runs["main"], "ref4.npz")))
    st = str(tmp_path / "m.safetensors")
    assert CliRunner().invoke(cli, ["convert", "dcp-import", src, st]).exit_code == 0
    from safetensors.numpy import load_file

    ref = np.load(os.path.join(runs["main"], "ref4.npz"))
    assert load_file(st)["model.classifier.1.weight"].tobytes() == ref["model/classifier.1.weight"].tobytes()


def test_dcp_import_refuses_a_malicious_global_and_runs_nothing(runs, tmp_path):
    src = str(tmp_path / "evil")
    shutil.copytree(os.path.join(runs["main"], "dcp4"), src)
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    with open(os.path.join(src, ".metadata"), "wb") as f:
        pickle.dump({"x": evil}, f)
    res = CliRunner().invoke(cli, ["convert", "dcp-import", src, str(tmp_path / "out")])
    assert res.exit_code == 3
    assert "system" in res.output and "refused" in res.output
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_dcp_import_refuses_a_tampered_payload(runs, tmp_path):
    src = str(tmp_path / "bad")
    shutil.copytree(os.path.join(runs["main"], "dcp4"), src)
    from ckptfmt.converters._dcp_import import dcp_import, read_dcp_metadata

    # The middle of rank 1's largest payload: tensor bytes inside a torch.save archive.
    chunks = [c for t in read_dcp_metadata(src).tensors.values() for c in t.chunks if c.file == "__1_0.distcp"]
    big = max(chunks, key=lambda c: c.length)
    with open(os.path.join(src, "__1_0.distcp"), "r+b") as f:
        f.seek(big.offset + big.length // 2)
        b = f.read(1)
        f.seek(big.offset + big.length // 2)
        f.write(bytes([b[0] ^ 1]))

    with pytest.raises(FormatError, match="__1_0.distcp.*CRC-32 mismatch"):
        dcp_import(src, str(tmp_path / "out"))
    assert not (tmp_path / "out" / "MANIFEST").exists()  # no checkpoint was made


def test_compact_refuses_a_sharded_checkpoint(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    dcp.save({"w": torch.arange(4.0)}, storage_writer=ckptfmt.dcp.Writer(a))
    dcp.save({"w": torch.arange(4.0)}, storage_writer=ckptfmt.dcp.Writer(b, parent=a))
    with pytest.raises(FormatError, match="sharded"):
        ckptfmt.compact(b)
    assert ckptfmt.verify(b).ok and ckptfmt.open(b).manifest.shards is not None


@pytest.mark.parametrize("name", ["ckptfmt.dcp", "ckptfmt.format.shards"])
def test_docstring_examples(name, tmp_path, monkeypatch):
    import doctest
    import importlib
    import warnings

    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that it saves in a single process
        result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.attempted and result.failed == 0


# ------------------------------------------------------------------ the store, the lock, overwrite
def _dcp_save(state, writer):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that it saves in a single process
        return dcp.save(state, storage_writer=writer)


def test_incremental_save_shares_only_the_store_and_survives_rm_r_of_its_parent(tmp_path):
    a, b, c = (str(tmp_path / n) for n in ("a", "b", "c"))
    state = {"w": torch.arange(6000.0), "v": torch.ones(2000), "n": 3}
    _dcp_save(state, ckptfmt.dcp.Writer(a, chunk_size=4096))  # full: its own directory, nothing to share
    state["w"][0] = -1.0
    _dcp_save(state, ckptfmt.dcp.Writer(b, parent=a))
    assert os.listdir(b) == ["MANIFEST"]
    with ckptfmt.open(b) as r:
        assert r.sharing()["shared_bytes"] == 0  # a's data is in a's directory: written again
        assert r.manifest.parent["name"] == "a" and r.manifest.chunk_size == 4096
    state["v"][-1] = 5.0
    _dcp_save(state, ckptfmt.dcp.Writer(c, parent=b))
    with ckptfmt.open(c) as r:
        own = r.sharing()["own_bytes"]
    assert own == 8000 - 4096  # the last chunk of v, the only one that changed
    shutil.rmtree(a)
    shutil.rmtree(b)
    assert ckptfmt.verify(c).ok
    got = ckptfmt.load(c)
    assert got["w"][0] == -1.0 and got["v"][-1] == 5.0 and got["n"] == 3


def test_the_run_lock_is_held_shared_from_plan_to_commit_and_released_after(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _dcp_save({"w": torch.arange(8.0)}, ckptfmt.dcp.Writer(a, shared_store=True))
    seen = []

    class Probe(ckptfmt.dcp.Writer):
        def write_data(self, plan, planner):
            with pytest.raises(CheckpointLockedError):
                ckptfmt.gc(str(tmp_path), timeout=0)  # a deleter waits while ranks write
            seen.append("write")
            return super().write_data(plan, planner)

        def finish(self, metadata, results):
            with pytest.raises(CheckpointLockedError):
                ckptfmt.remove(a, timeout=0)
            seen.append("finish")
            return super().finish(metadata, results)

    _dcp_save({"w": torch.arange(8.0)}, Probe(b, parent=a))
    assert seen == ["write", "finish"]
    assert ckptfmt.gc(str(tmp_path), timeout=0).deleted == ()  # released after the commit
    assert ckptfmt.open(b).sharing()["own_bytes"] == 0


def test_a_store_file_deleted_before_the_commit_fails_the_save_and_frees_the_lock(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _dcp_save({"w": torch.arange(8.0), "x": torch.ones(4)}, ckptfmt.dcp.Writer(a, shared_store=True))
    shared = ckptfmt.open(a).manifest.files[0].path

    class Lost(ckptfmt.dcp.Writer):
        def finish(self, metadata, results):
            os.remove(os.path.join(str(tmp_path), shared[3:]))  # what a gc ignoring the lock, or a lost write, does
            return super().finish(metadata, results)

    with pytest.raises(CheckpointException, match=r"IntegrityError.*pack-.*nothing was saved"):
        _dcp_save({"w": torch.arange(8.0), "x": torch.zeros(4)}, Lost(b, parent=a))
    assert not os.path.exists(b)  # no manifest, no directory
    ckptfmt.gc(str(tmp_path), timeout=0)  # the lock was released

    class Broken(ckptfmt.dcp.Writer):  # a failed write: DCP calls no finish()
        def _write_data(self, plan, planner):
            raise OSError(28, "No space left on device")

    with pytest.raises(CheckpointException, match="No space left"):
        _dcp_save({"w": torch.arange(8.0)}, Broken(str(tmp_path / "c"), shared_store=True))
    ckptfmt.gc(str(tmp_path), timeout=0)


def test_overwrite_of_a_dcp_checkpoint_follows_the_deletion_rules(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _dcp_save({"w": torch.arange(5000.0)}, ckptfmt.dcp.Writer(a, chunk_size=4096))
    own_a = [f for f in os.listdir(a) if f != "MANIFEST"]
    assert own_a and all(DATA_FILE_RE.match(f) for f in own_a)
    # overwrite with a save into the store: a's own files are freed at once
    _dcp_save({"w": torch.arange(5000.0)}, ckptfmt.dcp.Writer(a, overwrite=True, shared_store=True, chunk_size=4096))
    assert os.listdir(a) == ["MANIFEST"]
    _dcp_save({"w": torch.arange(5000.0) + 1}, ckptfmt.dcp.Writer(b, parent=a))
    # overwrite the parent with a full save: the child, whose data is in the store, is untouched
    _dcp_save({"w": torch.zeros(3)}, ckptfmt.dcp.Writer(a, overwrite=True))
    assert ckptfmt.verify(b).ok and ckptfmt.load(b)["w"][0] == 1.0
    assert ckptfmt.load(a)["w"].tolist() == [0.0, 0.0, 0.0]
    ckptfmt.gc(str(tmp_path), grace_seconds=0)
    assert ckptfmt.verify(b).ok and ckptfmt.verify(a).ok


def test_store_saves_refuse_the_store_itself_and_parent_without_store(tmp_path):
    a = str(tmp_path / "a")
    _dcp_save({"w": torch.ones(2)}, ckptfmt.dcp.Writer(a, shared_store=True))
    with pytest.raises(CheckpointException, match="UnsafePathError"):
        _dcp_save({"w": torch.ones(2)}, ckptfmt.dcp.Writer(str(tmp_path / "ckptfmt-store"), shared_store=True))
    with pytest.raises(ValueError, match="shared store"):
        ckptfmt.dcp.Writer(str(tmp_path / "b"), parent=a, shared_store=False)
    os.symlink(a, str(tmp_path / "link"))
    with pytest.raises(CheckpointException, match="symbolic link"):
        _dcp_save({"w": torch.ones(2)}, ckptfmt.dcp.Writer(str(tmp_path / "link"), overwrite=True))


def test_a_parent_replaced_after_the_plan_fails_the_save(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _dcp_save({"w": torch.arange(8.0)}, ckptfmt.dcp.Writer(a, shared_store=True))

    class Racy(ckptfmt.dcp.Writer):
        def write_data(self, plan, planner):
            ckptfmt.save({"w": np.zeros(8, np.float32)}, a, overwrite=True)  # another job replaces the parent
            return super().write_data(plan, planner)

    with pytest.raises(CheckpointException, match="was replaced while this save was being planned"):
        _dcp_save({"w": torch.arange(8.0)}, Racy(b, parent=a))
    assert not os.path.exists(b)
    ckptfmt.gc(str(tmp_path), timeout=0)  # the lock was released
