"""`ckptfmt log`, `gc`, `compact` and the sharing line of `inspect`, through CliRunner."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
from click.testing import CliRunner

import ckptfmt
from ckptfmt.cli.main import main
from ckptfmt.manager import CheckpointManager


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _make_run(tmp_path):
    with CheckpointManager(tmp_path, max_to_keep=None, chunk_size=4096) as m:
        w = np.arange(64 * 1024, dtype=np.float32)
        for s in (1, 2, 3):
            w[s * 1024] += 1
            m.save(s, {"w": w.copy(), "step": s})
    return tmp_path


def test_log_table_and_json(tmp_path):
    d = _make_run(tmp_path)
    r = _run("log", d)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split()[:3] == ["step", "saved", "at"]
    rows = [l.split() for l in lines[1:] if l.split() and l.split()[1].startswith("20")]
    assert [r[0] for r in rows] == ["1", "2", "3"] and rows[2][-2] == "step-2"
    assert "3 checkpoints" in r.output
    j = json.loads(_run("log", d, "--json").output)
    steps = j["checkpoints"]
    assert [c["step"] for c in steps] == [1, 2, 3] and [c["depth"] for c in steps] == [0, 1, 2]
    assert steps[1]["written_bytes"] < steps[0]["written_bytes"] / 10
    assert _run("log", tmp_path / "nope").exit_code == 3


def test_inspect_shows_the_parent_share(tmp_path):
    d = _make_run(tmp_path)
    r = _run("inspect", d / "step-3")
    assert r.exit_code == 0 and "parent:   step-2 (chain depth 2" in r.output and "% of the data is shared" in r.output
    j = json.loads(_run("inspect", d / "step-3", "--json").output)
    assert j["sharing"]["parent"] == "step-2" and j["sharing"]["shared_bytes"] > 0


def test_compact_then_gc(tmp_path):
    d = _make_run(tmp_path)
    r = _run("compact", d / "step-3", "--dry-run")
    assert r.exit_code == 0 and "would copy" in r.output
    assert ckptfmt.open(d / "step-3").manifest.parent is not None
    r = _run("compact", d / "step-3")
    assert r.exit_code == 0 and "compacted" in r.output
    assert "already self-contained" in _run("compact", d / "step-3").output
    ckptfmt.remove(d / "step-1")  # its data is still used by step-2: kept in the store
    shutil.rmtree(d / "step-2")  # the habit: now step-1's and step-2's data are garbage
    r = _run("gc", d, "--grace", "0", "--dry-run")
    assert r.exit_code == 0 and "would delete" in r.output
    # STORE + three packs: remove frees only what the removed checkpoint listed, not step-3's
    # pack that compact left unused (a checkpoint moved out of the run looks the same)
    assert len(os.listdir(d / "ckptfmt-store")) == 4
    r = _run("gc", d, "--grace", "0")
    assert r.exit_code == 0 and "deleted 3 file(s)" in r.output, r.output
    assert os.listdir(d / "ckptfmt-store") == ["STORE"]
    assert not os.path.exists(d / "step-1") and _run("verify", d / "step-3").exit_code == 0
    assert json.loads(_run("gc", d, "--json").output)["deleted"] == []


def test_verify_accepts_a_manifest_file_path(tmp_path):
    """The pre-commit hook passes file names: DIR/MANIFEST means the checkpoint DIR."""
    ckptfmt.save({"a": np.ones(3)}, tmp_path / "ck")
    r = _run("verify", tmp_path / "ck" / "MANIFEST")
    assert r.exit_code == 0, r.output


def test_verify_a_run_directory_and_its_store(tmp_path):
    d = _make_run(tmp_path)
    r = _run("verify", d)
    assert r.exit_code == 0 and "run directory with 3 checkpoint(s)" in r.output and "shared store holds" in r.output
    assert r.output.count("ok      ") == 3
    r = _run("verify", *sorted(p for p in d.iterdir() if not p.name.startswith(".")))  # `verify runs/*`: the store is explained, not failed
    assert r.exit_code == 0 and "shared data store of the run" in r.output
    shutil.copytree(d / "step-3", tmp_path.parent / (tmp_path.name + "-copy"))
    r = _run("verify", tmp_path.parent / (tmp_path.name + "-copy"))
    assert r.exit_code == 1 and "ckptfmt compact SRC --to DST" in r.output
    dest = tmp_path.parent / (tmp_path.name + "-portable")
    r = _run("compact", d / "step-3", "--to", dest)
    assert r.exit_code == 0 and "self-contained copy" in r.output
    shutil.copytree(dest, tmp_path.parent / (tmp_path.name + "-copy2"))
    assert _run("verify", tmp_path.parent / (tmp_path.name + "-copy2")).exit_code == 0


def test_read_only_run_directory(tmp_path, monkeypatch):
    """As root, permission bits do not stop writes: the local backend is made read-only instead."""
    import errno

    from ckptfmt.storage.local import LocalStorage

    d = _make_run(tmp_path)
    before = sorted(os.listdir(d))

    def refuse(self, path, *a, **k):
        raise ckptfmt.StorageError(errno.EROFS, f"{path}: read-only file system")

    for name in ("lock", "makedirs", "open_write", "write_atomic", "delete", "rmdir"):
        monkeypatch.setattr(LocalStorage, name, refuse)
    assert _run("verify", d / "step-3").exit_code == 0
    assert _run("inspect", d / "step-3").exit_code == 0
    assert _run("log", d).exit_code == 0
    r = _run("gc", d, "--dry-run", "--grace", "0")
    assert r.exit_code == 0 and "would delete 0 file(s)" in r.output
    assert _run("gc", d, "--grace", "0").exit_code != 0  # a real gc needs write access, and says so
    with CheckpointManager(d) as m:
        assert m.read_only and m.restore()["step"] == 3
    assert sorted(os.listdir(d)) == before


def test_verify_run_dir_reports_a_damaged_manifest(tmp_path):
    """REVIEW10 8: a step whose MANIFEST does not decode is verified (and fails), never skipped."""
    _make_run(tmp_path)
    p = tmp_path / "step-2" / "MANIFEST"
    b = bytearray(p.read_bytes())
    b[-5] ^= 0xFF
    p.write_bytes(bytes(b))
    r = _run("verify", tmp_path)
    assert r.exit_code == 1, r.output
    assert "FAILED" in r.output and "step-2" in r.output and "2 of 3 intact" in r.output


def test_gc_that_refuses_exits_3_naming_why(tmp_path):
    """REVIEW10 9: gc that deletes nothing because a manifest cannot be read does not exit 0."""
    _make_run(tmp_path)
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "MANIFEST").write_text("include README.md\n")
    r = _run("gc", tmp_path, "--grace", "0")
    assert r.exit_code == 3 and "code has a MANIFEST that cannot be read" in r.output
    r = _run("gc", tmp_path, "--json")
    assert r.exit_code == 3 and json.loads(r.output)["ok"] is False
    shutil.rmtree(tmp_path / "code")
    assert _run("gc", tmp_path).exit_code == 0
