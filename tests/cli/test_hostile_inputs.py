"""Issue 12: no silent success, only our own errors, no debris, exit codes as documented.

Each case goes through the library and the command line (CliRunner; a subprocess where a
signal is involved), asserting the exit code and that the message names the file and what
to do.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import msgpack
import numpy as np
import pytest
from click.testing import CliRunner

import ckptfmt
from ckptfmt.cli.main import EXIT_ERROR, EXIT_FOUND, EXIT_OK, main
from ckptfmt.converters import kinds
from ckptfmt.format.hashing import get_hash


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], env={"CKPTFMT_DEBUG": ""})


# --------------------------------------------------------------- manifest fields


def _rewrite_body(path, change):
    mp = os.path.join(path, "MANIFEST")
    env = msgpack.unpackb(open(mp, "rb").read(), raw=False)
    body = msgpack.unpackb(env["body"], raw=False, strict_map_key=False)
    change(body)
    env["body"] = msgpack.packb(body, use_bin_type=True)
    env["hash"] = get_hash(env["hash_alg"]).digest(env["body"])
    open(mp, "wb").write(msgpack.packb(env, use_bin_type=True))


def _depth_x(b):
    b["parent"] = {"name": "x", "depth": "x"}


def _file_2_63(b):
    b["files"][0][1] = 1 << 63


def _empty_huge(b):
    dims = bytearray(b["tensors"]["dims"])
    dims[-16:] = (0).to_bytes(8, "little") + (1 << 62).to_bytes(8, "little")
    b["tensors"]["dims"] = bytes(dims)


@pytest.mark.parametrize("change, words", [(_depth_x, "parent.depth"), (_file_2_63, "records a size"), (_empty_huge, "non-zero dimensions")],
                         ids=["parent-depth-x", "file-size-2^63", "shape-0x2^62"])
def test_manifest_hostile_fields_are_our_errors(tmp_path, change, words):
    ck = str(tmp_path / "ck")
    ckptfmt.save({"a": np.arange(10, dtype=np.float32), "z": np.zeros((0, 3), np.float32)}, ck)
    _rewrite_body(ck, change)
    with pytest.raises(ckptfmt.FormatError, match=words):
        ckptfmt.open(ck)
    report = ckptfmt.verify(ck)  # reported, not raised
    assert not report.ok and words in report.errors[0].message
    r = run("verify", ck)
    assert r.exit_code == EXIT_FOUND and words in r.output
    r = run("inspect", ck)
    assert r.exit_code == EXIT_ERROR and "MANIFEST" in r.output and "Traceback" not in r.output


def test_data_file_symlink_is_refused(tmp_path):
    secret = tmp_path / "outside.txt"
    secret.write_bytes(b"s3cr3t" * 100)
    ck = str(tmp_path / "ck")
    ckptfmt.save({"a": np.zeros(4, np.uint8)}, ck)
    data = next(f for f in os.listdir(ck) if f.endswith(".data"))
    os.remove(os.path.join(ck, data))
    os.symlink(secret, os.path.join(ck, data))
    with pytest.raises(ckptfmt.FormatError, match="symbolic link"):
        ckptfmt.load(ck, verify=False)
    report = ckptfmt.verify(ck)
    assert not report.ok and "symbolic link" in report.errors[0].message
    r = run("verify", ck)
    assert r.exit_code == EXIT_FOUND and "replace the link" in r.output
    assert "600" not in r.output and "s3cr3t" not in r.output  # nothing about the target leaks


# --------------------------------------------------------------- foreign parsers


def test_tf_index_declaring_a_pebibyte_does_not_allocate(tmp_path):
    from ckptfmt.converters.tf import TFCheckpointReader, write_checkpoint
    from ckptfmt.converters.tf._proto import BundleEntry
    from ckptfmt.converters.tf._table import build_table, read_table
    from ckptfmt.converters.tf.bundle import slice_key

    prefix = str(tmp_path / "ckpt-1")
    write_checkpoint(prefix, {"w": np.ones(4, np.float32)})
    pairs = dict(read_table(open(prefix + ".index", "rb").read(), "x"))
    big = (1 << 24, 1 << 24)
    extents = ((0, None), (0, None))
    pairs[b"emb"] = BundleEntry(dtype=1, shape=big, slices=(extents,)).encode()
    pairs[slice_key(b"emb", extents)] = BundleEntry(dtype=1, shape=big, size=4 << 48).encode()
    open(prefix + ".index", "wb").write(build_table(sorted(pairs.items())))
    with pytest.raises(ckptfmt.FormatError, match="shard holds"):
        TFCheckpointReader(prefix).get("emb")
    assert not kinds.verify_any(prefix).ok
    assert run("verify", prefix).exit_code == EXIT_FOUND


def test_safetensors_empty_tensor_of_impossible_shape(tmp_path):
    p = tmp_path / "e.safetensors"
    header = json.dumps({"x": {"dtype": "F32", "shape": [0, 2**63], "data_offsets": [0, 0]}}).encode()
    header += b" " * (-len(header) % 8)
    p.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(ckptfmt.FormatError, match="beyond what any array"):
        kinds.open_any(p)
    assert run("verify", p).exit_code == EXIT_FOUND


def test_unreadable_inputs_exit_3_and_say_what_they_are(tmp_path, make):
    st = make.safetensors()
    named_pt = tmp_path / "really-safetensors.pt"
    named_pt.write_bytes(open(st, "rb").read())
    pt_named_st = tmp_path / "x.safetensors"
    pt_named_st.write_bytes(b"PK\x03\x04" + os.urandom(100))
    noise = tmp_path / "noise.pt"
    noise.write_bytes(os.urandom(300).replace(b"PK", b"pk").lstrip(b"\x80") or b"x")
    cases = [(noise, "not a torch file"), (pt_named_st, "not a safetensors file")]
    if pytest.importorskip("torch", reason="torch cases") is not None:
        cases.append((named_pt, "rename it to .safetensors"))
    for path, words in cases:
        r = run("verify", path)
        assert r.exit_code == EXIT_ERROR, (path, r.output)
        assert r.output.startswith("ERROR") and str(path) in r.output and words in r.output
        assert "weights_only" not in r.output and "ckptfmt verify" not in r.output.split("hint:")[-1]
        d = json.loads(run("verify", "--json", path).output)
        assert d["results"][0]["status"] == "unreadable" and d["exit_code"] == EXIT_ERROR


@pytest.mark.torch
def test_malicious_pickle_names_the_global(tmp_path):
    torch = pytest.importorskip("torch")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    p = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": Evil()}, p)
    with pytest.raises(ckptfmt.FormatError, match=r"posix\.system") as e:
        kinds.open_any(p)
    assert "weights_only=False" not in str(e.value)
    r = run("inspect", p)
    assert r.exit_code == EXIT_ERROR and "posix.system" in r.output and "weights_only=False" not in r.output


@pytest.mark.torch
def test_expanded_torch_view_is_refused_before_allocating(tmp_path):
    torch = pytest.importorskip("torch")
    p = tmp_path / "expanded.pt"
    torch.save({"x": torch.ones(4).as_strided((1 << 40,), (0,)), "ok": torch.arange(6.0).reshape(2, 3).t()}, p)
    assert os.path.getsize(p) < 4096
    with pytest.raises(ckptfmt.FormatError, match="expanded or overlapping view") as e:
        kinds.open_any(p)
    assert "'x'" in str(e.value) and "x.contiguous()" in str(e.value)
    r = run("verify", p)
    assert r.exit_code == EXIT_FOUND and "expanded_view" in r.output and "tensor='x'" in r.output
    assert run("inspect", p).exit_code == EXIT_ERROR
    r = run("convert", "to-ckptfmt", p, tmp_path / "out")
    assert r.exit_code == EXIT_ERROR and not (tmp_path / "out").exists()
    # a transposed (non-contiguous, non-overlapping) view is an ordinary tensor
    q = tmp_path / "t.pt"
    torch.save({"ok": torch.arange(6.0).reshape(2, 3).t()}, q)
    assert run("verify", q).exit_code == EXIT_OK


@pytest.mark.torch
@pytest.mark.parametrize("cmd, name", [("to-safetensors", "out.safetensors"), ("to-ckptfmt", "out")])
def test_a_corrupted_torch_file_is_not_laundered_by_convert(tmp_path, cmd, name):
    """torch.load ignores the zip CRCs: a flipped byte in tensor data must stop a convert."""
    torch = pytest.importorskip("torch")
    p = tmp_path / "c.pt"
    torch.save({"model": {"w": torch.arange(64.0).reshape(8, 8)}}, p)
    b = bytearray(p.read_bytes())
    i = b.find(np.arange(64.0, dtype=np.float32).tobytes()[40:48])
    b[i] ^= 0x40
    p.write_bytes(bytes(b))
    with kinds.open_any(p) as src:  # opening and listing stay cheap; reading data checks
        assert src.keys() == ["model/w"]
        with pytest.raises(ckptfmt.IntegrityError, match="CRC-32") as e:
            src.get("model/w")
        assert str(p) in str(e.value) and "data/0" in str(e.value)
    r = run("convert", cmd, p, tmp_path / name)
    assert r.exit_code == EXIT_ERROR and "CRC-32" in r.output, r.output
    assert not (tmp_path / name).exists()


# --------------------------------------------------------------- silent success


@pytest.mark.parametrize("cmd, name", [("to-safetensors", "out.pt"), ("to-torch", "out.safetensors"),
                                       ("to-ckptfmt", "out.safetensors"), ("to-safetensors", "out.onnx")])
def test_suffix_contradicting_the_command_is_refused(make, tmp_path, cmd, name):
    src = make.ckptfmt()
    dst = tmp_path / name
    r = run("convert", cmd, src, dst)
    assert r.exit_code == EXIT_ERROR and str(dst) in r.output and "suffix says" in r.output
    assert not dst.exists() and not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_verify_says_contents_are_not_verifiable(make):
    st = make.safetensors()
    r = run("verify", st)
    assert r.exit_code == EXIT_OK and "contents not verifiable: no checksums in this format" in r.output
    d = json.loads(run("verify", "--json", st).output)
    assert d["results"][0]["coverage"] == "structure" and "no checksums" in d["results"][0]["note"]
    assert json.loads(run("verify", "--json", make.ckptfmt()).output)["results"][0]["coverage"] == "full"


@pytest.mark.onnx
def test_onnx_export_never_clobbers_out_data_or_the_input(make, tmp_path):
    pytest.importorskip("onnx")
    model = make.onnx(external=True)  # its data lives in m.onnx.data
    st = str(tmp_path / "w.safetensors")
    assert run("convert", "onnx-import", model, st).exit_code == EXIT_OK
    out = tmp_path / "new.onnx"
    (tmp_path / "new.onnx.data").write_bytes(b"precious")  # not ours: never replaced silently
    r = run("convert", "onnx-export", st, model, out)
    assert r.exit_code == EXIT_ERROR and "new.onnx.data" in r.output and "--overwrite" in r.output
    assert (tmp_path / "new.onnx.data").read_bytes() == b"precious" and not out.exists()
    # OUT.data is the input model's own external data: refused even with --overwrite
    before = open(model + ".data", "rb").read()
    r = run("convert", "onnx-export", st, model, tmp_path / "m.onnx.x")  # unrelated name: fine
    assert r.exit_code == EXIT_OK, r.output
    os.rename(model, tmp_path / "in.onnx")  # in.onnx keeps pointing at m.onnx.data
    r = run("convert", "onnx-export", "--overwrite", st, tmp_path / "in.onnx", tmp_path / "m.onnx")
    assert r.exit_code == EXIT_ERROR and "would destroy the input" in r.output
    assert open(model + ".data", "rb").read() == before
    assert run("verify", tmp_path / "in.onnx").exit_code == EXIT_OK


# --------------------------------------------------------------- messages, debris


def test_debug_after_the_subcommand(tmp_path):
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "nope"), "--debug"], env={"CKPTFMT_DEBUG": ""})
    assert isinstance(r.exception, ckptfmt.CheckpointNotFoundError)
    r = CliRunner().invoke(main, ["verify", "--debug", str(tmp_path / "nope")], env={"CKPTFMT_DEBUG": ""})
    assert isinstance(r.exception, ckptfmt.CheckpointNotFoundError)


def test_verify_hint_does_not_recommend_verify(tmp_path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(b"\x10" + b"\x00" * 7 + b"{not json at all")
    r = run("verify", p)
    assert "ckptfmt verify" not in r.output


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("cmd, name", [("to-safetensors", "o.safetensors"), pytest.param("to-torch", "o.pt", marks=pytest.mark.torch),
                                       ("to-ckptfmt", "o")])
def test_disk_full_is_named_and_leaves_nothing(make, tmp_path, monkeypatch, cmd, name):
    src = make.ckptfmt()
    out = tmp_path / "out"
    out.mkdir()
    from ckptfmt.storage import local

    monkeypatch.setattr(local.os, "write", _enospc)  # ckptfmt's own writer
    monkeypatch.setattr(local.os, "pwrite", _enospc, raising=False)
    monkeypatch.setattr(local.os, "writev", _enospc, raising=False)
    import ckptfmt.converters.sources.safetensors as sfm
    import ckptfmt.converters.sources.torch as tfm

    class Full:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def write(self, b):
            _enospc()

        def flush(self):
            pass

        def fileno(self):
            return 0

    monkeypatch.setattr(sfm, "open", Full, raising=False)
    monkeypatch.setattr(tfm, "open", lambda p, m="rb", *a, **k: Full() if "w" in m else open(p, m, *a, **k), raising=False)
    dst = out / name
    r = run("convert", cmd, src, dst)
    assert r.exit_code == EXIT_ERROR, r.output
    assert f"disk full (ENOSPC) writing {dst}" in r.output, r.output
    assert "free" in r.output and "inline_container" not in r.output
    assert os.listdir(out) == []  # no temporary, no empty directory


@pytest.mark.parametrize("cmd, name", [("to-safetensors", "o.safetensors"), pytest.param("to-torch", "o.pt", marks=pytest.mark.torch)])
def test_any_write_error_names_the_file(make, tmp_path, monkeypatch, cmd, name):
    """EFBIG (a file-size limit) printed only "[Errno 27] File too large"."""
    src = make.ckptfmt()
    import ckptfmt.converters.sources.safetensors as sfm
    import ckptfmt.converters.sources.torch as tfm

    def efbig(*a, **k):
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))

    class TooLarge:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        write = staticmethod(efbig)

        def flush(self):
            pass

        def fileno(self):
            return 0

    monkeypatch.setattr(sfm, "open", TooLarge, raising=False)
    monkeypatch.setattr(tfm, "open", lambda p, m="rb", *a, **k: TooLarge() if "w" in m else open(p, m, *a, **k), raising=False)
    dst = tmp_path / name
    r = run("convert", cmd, src, dst)
    assert r.exit_code == EXIT_ERROR and f"writing {dst}" in r.output and "File too large" in r.output, r.output
    assert not dst.exists()  # nothing half-written, no temporary
    assert [p for p in os.listdir(tmp_path) if p.startswith(name)] == []


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporaries_of_dead_processes_are_removed(make, tmp_path):
    src = make.ckptfmt()
    dst = tmp_path / "o.safetensors"
    stale = tmp_path / f".o.safetensors.tmp-{_dead_pid()}"
    stale.write_bytes(b"x" * 1000)
    live = tmp_path / f".o.safetensors.tmp-{os.getppid()}"  # a running process: left alone
    live.write_bytes(b"y")
    other = tmp_path / ".unrelated.tmp-1"
    other.write_bytes(b"z")
    assert run("convert", "to-safetensors", src, dst).exit_code == EXIT_OK
    assert not stale.exists() and live.exists() and other.exists()


def test_partial_ckptfmt_output_does_not_block_a_rerun(make, tmp_path):
    src = make.safetensors()
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "data-00000-0badc0de.data").write_bytes(b"\0" * 64)  # what a killed save leaves
    r = run("convert", "to-ckptfmt", src, dst)
    assert r.exit_code == EXIT_OK, r.output
    assert ckptfmt.verify(str(dst)).ok and not ckptfmt.verify(str(dst)).warnings
    # anything else in the directory still needs --overwrite
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    r = run("convert", "to-ckptfmt", src, other)
    assert r.exit_code == EXIT_ERROR and str(other) in r.output and (other / "notes.txt").exists()
    assert "--overwrite" not in r.output  # it would not help: the directory is not a ckptfmt checkpoint


_SLOW_CONVERT = """
import sys, time
import ckptfmt.converters.sources.safetensors as s
real = s.write_safetensors
def slow(path, tensors, metadata=None):
    def late(get):
        def inner():
            open(sys.argv[-1] + ".started", "w").close()
            time.sleep(60)
            return get()
        return inner
    return real(path, [(info, late(get)) for info, get in tensors], metadata)
s.write_safetensors = slow
from ckptfmt.cli.main import main
sys.argv = ["ckptfmt"] + sys.argv[1:]
main()
"""


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_during_convert_cleans_up(make, tmp_path, sig, code):
    src = make.ckptfmt()
    dst = tmp_path / "out" / "o.safetensors"
    dst.parent.mkdir()
    p = subprocess.Popen([sys.executable, "-c", _SLOW_CONVERT, "convert", "to-safetensors", src, str(dst)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    marker = str(dst) + ".started"
    deadline = time.time() + 60
    while not os.path.exists(marker) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert os.path.exists(marker), p.communicate()
    os.remove(marker)
    assert [f for f in os.listdir(dst.parent) if ".tmp-" in f]  # the temporary exists mid-write
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == code, (out, err)
    assert "interrupted" in err and "Traceback" not in err
    assert os.listdir(dst.parent) == []  # no temporary, no partial output
    assert run("convert", "to-safetensors", src, dst).exit_code == EXIT_OK  # the rerun just works


def test_tf1_partitioned_variable_verify(make, helpers):
    d = make.tf_fixture("v1_partitioned")
    prefix = os.path.join(d, "model.ckpt-5")
    report = kinds.verify_any(prefix)
    assert report.ok and report.bytes_checked == 248 and report.chunks_checked == 7  # 3 + 2 slices, 2 plain
    shard = prefix + ".data-00000-of-00002"
    helpers.flip(shard, 150)  # inside emb's second slice, rows 4..7
    r = run("verify", d)
    assert r.exit_code == EXIT_FOUND
    line = next(x for x in r.output.splitlines() if "hash_mismatch" in x)
    assert "emb[4:7, 0:3]" in line and "data-00000-of-00002" in line and "offset=144" in line
    helpers.flip(shard, 150)
    helpers.truncate(shard, 170)
    r = run("verify", d)
    assert r.exit_code == EXIT_FOUND and "truncated_file" in r.output and "is truncated" in r.output
    assert "emb[7:10, 0:3]" in r.output and "hash_mismatch" not in r.output


@pytest.mark.parametrize("keep", [0, 1, 7, 5000, 24301])
def test_tf1_truncated_meta_graph_fails_verify(make, keep):
    """A v1 checkpoint's .meta (MetaGraphDef) cut short: verify exited 0."""
    d = make.tf_fixture("v1_partitioned")
    meta = os.path.join(d, "model.ckpt-5.meta")
    assert run("verify", d).exit_code == EXIT_OK
    data = open(meta, "rb").read()
    assert len(data) > keep
    open(meta, "wb").write(data[:keep])
    r = run("verify", d)
    assert r.exit_code == EXIT_FOUND and "truncated_file" in r.output and "model.ckpt-5.meta" in r.output, r.output


def test_verify_of_a_checkpoint_manager_directory(tmp_path, helpers):
    from ckptfmt.manager import CheckpointManager

    with CheckpointManager(str(tmp_path / "runs"), max_to_keep=5) as mgr:
        for step in (9, 10, 11):
            mgr.save(step, {"w": np.full(4, step, np.float32)}, force=True)
    r = run("verify", tmp_path / "runs")
    assert r.exit_code == EXIT_OK, r.output
    assert "3 of 3 intact" in r.output and r.output.index("step-9") < r.output.index("step-10")
    step10 = tmp_path / "runs" / "step-10"
    with ckptfmt.open(str(step10)) as r:  # 1.2: the data may lie in the run's store
        data = os.path.normpath(step10 / r.manifest.files[-1].path)
    helpers.flip(data, os.path.getsize(data) - 1)
    r = run("verify", tmp_path / "runs")
    assert r.exit_code == EXIT_FOUND and "step-10" in r.output and "2 of 3 intact" in r.output


@pytest.mark.torch
def test_tf2torch_disk_full_and_stale_temporaries(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "fixtures" / "examples" / "cnn_adam"
    dst = tmp_path / "w.pt"
    stale = tmp_path / f"w.pt.tmp-{_dead_pid()}"  # what a SIGKILLed tf2torch left
    stale.write_bytes(b"x" * 100)
    import ckptfmt.converters.keras.torchfile as tfm

    real = tfm._record

    def full(zf, name, size, pieces):  # the disk fills up once the first tensor's record is reached
        if "/data/" in name:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(zf, name, size, pieces)

    monkeypatch.setattr(tfm, "_record", full)
    r = run("convert", "tf2torch", example, dst, "--no-optimizer")
    assert r.exit_code == EXIT_ERROR and f"disk full (ENOSPC) writing {dst}" in r.output, r.output
    assert "inline_container" not in r.output and os.listdir(tmp_path) == []
    monkeypatch.setattr(tfm, "_record", real)
    assert run("convert", "tf2torch", example, dst, "--no-optimizer").exit_code == EXIT_OK


_SLOW_SAVE = """
import sys, time
import ckptfmt._writer as w
real = w._write_tensor
def slow(*a, **k):
    real(*a, **k)
    open(sys.argv[-1] + ".started", "w").close()
    time.sleep(60)
w._write_tensor = slow
w._INLINE_HASH_BYTES = 0  # every tensor through _write_tensor (not the one-chunk fast path)
from ckptfmt.cli.main import main
sys.argv = ["ckptfmt"] + sys.argv[1:]
main()
"""


def test_ctrl_c_during_to_ckptfmt_leaves_no_directory(make, tmp_path):
    src = make.safetensors()
    dst = tmp_path / "out" / "ck"
    dst.parent.mkdir()
    p = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, "convert", "to-ckptfmt", src, str(dst)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    marker = str(dst) + ".started"
    deadline = time.time() + 60
    while not os.path.exists(marker) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert os.path.exists(marker), p.communicate()
    os.remove(marker)
    assert dst.is_dir() and os.listdir(dst)  # data is being written
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, (out, err)
    assert os.listdir(dst.parent) == []  # no data file, no empty directory: the rerun is a plain save
    assert run("convert", "to-ckptfmt", src, dst).exit_code == EXIT_OK
