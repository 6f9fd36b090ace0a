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
from torch.distributed.checkpoint.api import CheckpointException  # noqa: E402  (a BaseException)
from click.testing import CliRunner  # noqa: E402

import ckptfmt  # noqa: E402
import ckptfmt.dcp  # noqa: E402
from ckptfmt.cli.main import main as cli  # noqa: E402
from ckptfmt.errors import CheckpointExistsError, FormatError, IntegrityError  # noqa: E402

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
            raise AssertionError("a rank did not finish in time")
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
        assert sorted(f.path.split("-")[1] for f in r.manifest.files) == ["r00000", "r00001", "r00002", "r00003"]
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
    own = [f for f in os.listdir(inc_b) if f != "MANIFEST"]
    assert [f.split("-")[1] for f in own] == ["r00000"]  # rank 1's pieces did not change: no file
    with ckptfmt.open(inc_b) as r:
        share = r.sharing()
    assert share["parent"] == "inc-a" and share["own_bytes"] == 4096  # one chunk of one row
    assert ckptfmt.verify(inc_b).ok
    _same(_flat(ckptfmt.load(inc_b)), np.load(os.path.join(runs["main"], "ref-b.npz")))


# ------------------------------------------------------------------ corruption, failures
def test_flipped_byte_is_named_by_verify_and_refused_on_load(runs, tmp_path):
    ck = str(tmp_path / "ck4")
    shutil.copytree(os.path.join(runs["main"], "ck4"), ck)
    with ckptfmt.open(ck) as r:
        victim = next(f.path for f in r.manifest.files if "-r00002-" in f.path)
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
    assert any(p.kind == "extra_file" for p in report.problems)  # the dead save's data, uncommitted
    ckptfmt.load(path)


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
