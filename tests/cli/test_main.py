"""The ckptfmt command line, through click's CliRunner: output and exit codes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import click
import numpy as np
import pytest
from click.testing import CliRunner

import ckptfmt
from ckptfmt.cli import main as cli
from ckptfmt.cli.main import EXIT_ERROR, EXIT_FOUND, EXIT_OK, EXIT_USAGE, main

ALL_KINDS = [
    "ckptfmt",
    "safetensors",
    pytest.param("torch", marks=pytest.mark.torch),
    pytest.param("onnx", marks=pytest.mark.onnx),
    "tf",
]


def run(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env or {"CKPTFMT_DEBUG": ""})


# ------------------------------------------------------------------------- basics


def test_version():
    r = run("--version")
    assert r.exit_code == 0
    assert ckptfmt.__version__ in r.output and "format" in r.output


@pytest.mark.parametrize(
    "cmd",
    [[], ["inspect"], ["verify"], ["diff"], ["convert"], ["convert", "to-safetensors"], ["convert", "to-ckptfmt"],
     ["convert", "to-torch"], ["convert", "onnx-import"], ["convert", "onnx-export"]],
)
def test_every_help_has_an_example(cmd):
    r = run(*cmd, "--help")
    assert r.exit_code == 0, r.output
    assert "Example" in r.output and "ckptfmt " in r.output


def test_help_documents_exit_codes():
    out = run("verify", "--help").output
    for code in ("0", "1", "2", "3"):
        assert f"  {code}  " in out


def test_usage_error_is_2():
    assert run("verify").exit_code == EXIT_USAGE
    assert run("diff", "--atol", "-1", "a", "b").exit_code == EXIT_USAGE


# ------------------------------------------------------------------------- inspect


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_inspect_every_kind(make, kind):
    path = make.build(kind)
    r = run("inspect", path)
    assert r.exit_code == 0, r.output
    assert f"kind:     {kind}" in r.output
    lines = r.output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("name "))
    w = next(line for line in lines[header:] if line.startswith("layer/w "))
    assert "float32" in w and "[3, 4]" in w and "48 B" in w
    # aligned: every column of the table starts at the same offset
    assert lines[header].index("dtype") == w.index("float32")


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_inspect_json(make, kind):
    path = make.build(kind)
    r = run("inspect", "--json", path)
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["kind"] == kind
    by_name = {t["name"]: t for t in d["tensors"]}
    assert by_name["layer/w"] == {"name": "layer/w", "dtype": "float32", "shape": [3, 4], "nbytes": 48}
    assert by_name["step"]["dtype"] == "int64" and by_name["step"]["shape"] == []
    assert d["nbytes"] == sum(t["nbytes"] for t in d["tensors"])
    assert d["count"] == len(d["tensors"])


def test_inspect_ckptfmt_shows_digest_version_metadata(make):
    path = make.ckptfmt()
    d = json.loads(run("inspect", "--json", path).output)
    assert d["digest"] == ckptfmt.open(path).digest
    assert d["version"] == "{}.{}".format(*ckptfmt.FORMAT_VERSION)
    assert d["metadata"] == {"run": "unit"}
    assert d["digest"] in run("inspect", path).output


def test_inspect_missing_path_is_one_line_and_3(tmp_path):
    r = run("inspect", tmp_path / "nope")
    assert r.exit_code == EXIT_ERROR
    lines = r.output.strip().splitlines()
    assert lines[0].startswith("error: no checkpoint at") and lines[1].startswith("hint: ")
    assert "Traceback" not in r.output


# ------------------------------------------------------------------------- verify


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_verify_good_every_kind(make, kind):
    path = make.build(kind)
    r = run("verify", path)
    assert r.exit_code == EXIT_OK, r.output
    assert r.output.startswith("ok ") and path in r.output and kind in r.output


def test_verify_quiet_prints_nothing_when_intact(make):
    r = run("verify", "--quiet", make.ckptfmt(), make.safetensors())
    assert r.exit_code == 0 and r.output == ""


def _data_file(ck: str) -> str:
    return next(os.path.join(ck, n) for n in sorted(os.listdir(ck)) if n != "MANIFEST")


def _corrupt_ckptfmt_flip(make, h):
    ck = make.ckptfmt()
    h.flip(_data_file(ck), 0)
    return ck, os.path.basename(_data_file(ck)), "layer/w"


def _corrupt_ckptfmt_truncate(make, h):
    ck = make.ckptfmt()
    h.truncate(_data_file(ck), 10)
    return ck, os.path.basename(_data_file(ck)), None


def _corrupt_ckptfmt_missing(make, h):
    ck = make.ckptfmt()
    name = os.path.basename(_data_file(ck))
    os.remove(_data_file(ck))
    return ck, name, None


def _corrupt_safetensors_header(make, h):
    p = make.safetensors()
    raw = open(p, "rb").read()
    i = raw.index(b'"shape":[3,4]') + len('"shape":[')
    h.flip(p, i)  # "3" becomes garbage: the JSON no longer parses
    return p, p, None


def _corrupt_safetensors_offsets(make, h):
    p = make.safetensors()
    raw = open(p, "rb").read()
    i = raw.index(b'"shape":[3,4]') + len('"shape":[')
    with open(p, "r+b") as f:
        f.seek(i)
        f.write(b"2")  # a [2,4] float32 tensor does not fill its 48 data bytes
    return p, p, "layer/w"


def _corrupt_safetensors_truncate(make, h):
    p = make.safetensors()
    h.truncate(p, os.path.getsize(p) - 4)
    return p, p, None


def _corrupt_torch_flip(make, h):
    p = make.torch()
    h.flip(p, h.torch_member_offset(p, "data/0") + 5)
    return p, p, "layer/w"


def _corrupt_torch_truncate(make, h):
    p = make.torch()
    h.truncate(p)
    return p, p, None


def _corrupt_onnx_truncate(make, h):
    p = make.onnx()
    h.truncate(p)
    return p, p, None


def _corrupt_onnx_missing_data(make, h):
    p = make.onnx(external=True)
    os.remove(p + ".data")
    return p, "m.onnx.data", "layer/w"


def _corrupt_onnx_short_data(make, h):
    p = make.onnx(external=True)
    h.truncate(p + ".data", 20)
    return p, "m.onnx.data", "layer/b"


def _corrupt_tf_flip(make, h):
    prefix = make.tf()
    from ckptfmt.converters.tf import TFCheckpointReader

    with TFCheckpointReader(prefix) as r:
        off = r.entry("layer/b").offset
    h.flip(prefix + ".data-00000-of-00001", off + 1)
    return prefix, "ckpt-1.data-00000-of-00001", "layer/b"


def _corrupt_tf_truncate(make, h):
    prefix = make.tf()
    h.truncate(prefix + ".data-00000-of-00001", 8)
    return prefix, "ckpt-1.data-00000-of-00001", None


def _corrupt_tf_missing_shard(make, h):
    d = make.tf_fixture("v1_partitioned")
    os.remove(os.path.join(d, "model.ckpt-5.data-00001-of-00002"))
    return d, "model.ckpt-5.data-00001-of-00002", None


CORRUPTIONS = [
    _corrupt_ckptfmt_flip,
    _corrupt_ckptfmt_truncate,
    _corrupt_ckptfmt_missing,
    _corrupt_safetensors_header,
    _corrupt_safetensors_offsets,
    _corrupt_safetensors_truncate,
    pytest.param(_corrupt_torch_flip, marks=pytest.mark.torch),
    pytest.param(_corrupt_torch_truncate, marks=pytest.mark.torch),
    pytest.param(_corrupt_onnx_truncate, marks=pytest.mark.onnx),
    pytest.param(_corrupt_onnx_missing_data, marks=pytest.mark.onnx),
    pytest.param(_corrupt_onnx_short_data, marks=pytest.mark.onnx),
    _corrupt_tf_flip,
    _corrupt_tf_truncate,
    _corrupt_tf_missing_shard,
]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: getattr(f, "__name__", str(f)).removeprefix("_corrupt_"))
def test_verify_finds_corruption(make, helpers, corrupt):
    path, file, tensor = corrupt(make, helpers)
    r = run("verify", path)
    assert r.exit_code == EXIT_FOUND, r.output
    assert r.output.startswith("FAILED")
    problems = [line.strip() for line in r.output.splitlines()[1:] if ": error: " in line]
    assert problems, r.output
    assert any(os.path.basename(file) in line for line in problems), r.output
    if tensor is not None:
        assert any(repr(tensor) in line for line in problems), r.output
    # --quiet keeps exactly the problem lines, --json agrees
    q = run("verify", "--quiet", path)
    assert q.exit_code == EXIT_FOUND and q.output.strip().splitlines() == problems
    d = json.loads(run("verify", "--json", path).output)
    assert d["exit_code"] == EXIT_FOUND and d["results"][0]["status"] == "corrupt"
    assert len([p for p in d["results"][0]["problems"] if p["severity"] == "error"]) == len(problems)


def test_verify_problem_line_names_file_tensor_offset(make, helpers):
    ck, _, _ = _corrupt_ckptfmt_flip(make, helpers)
    line = run("verify", "--quiet", ck).output.splitlines()[0]
    assert "hash_mismatch" in line and "tensor='layer/w'" in line and "offset=" in line and "file=" in line


def test_verify_unsupported_and_missing_are_3(tmp_path, make):
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    for path in (txt, tmp_path / "missing.safetensors", tmp_path):
        r = run("verify", path)
        assert r.exit_code == EXIT_ERROR, r.output
        assert r.output.startswith("ERROR") and "Traceback" not in r.output


def test_verify_many_inputs_worst_code_wins(make, helpers, tmp_path):
    good = make.safetensors()
    bad, _, _ = _corrupt_ckptfmt_flip(make, helpers)
    r = run("verify", good, bad)
    assert r.exit_code == EXIT_FOUND
    assert "1 of 2 intact, 1 corrupt, 0 unreadable" in r.output
    r = run("verify", good, bad, tmp_path / "nope")
    assert r.exit_code == EXIT_ERROR
    d = json.loads(run("verify", "--json", good, bad, tmp_path / "nope").output)
    assert [x["status"] for x in d["results"]] == ["ok", "corrupt", "unreadable"]
    assert d["exit_code"] == EXIT_ERROR and d["ok"] is False
    assert "no checkpoint" in d["results"][2]["error"]


def test_verify_json_good(make):
    d = json.loads(run("verify", "--json", make.ckptfmt()).output)
    assert d == {**d, "ok": True, "exit_code": 0}
    res = d["results"][0]
    assert res["kind"] == "ckptfmt" and res["ok"] and res["tensors"] == 3 and res["problems"] == []


@pytest.mark.torch
def test_verify_refuses_pickled_code(tmp_path):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    p = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": Evil()}, p)
    r = run("verify", p)
    assert r.exit_code == EXIT_FOUND, r.output
    assert "posix.mkdir" in r.output and "never runs code" in r.output  # the real cause, named
    assert "weights_only=False" not in r.output  # never the advice to run it anyway
    assert not marker.exists()


# ------------------------------------------------------------------------- diff


def test_diff_identical_across_kinds(make):
    ck = make.ckptfmt()
    st = make.safetensors()
    r = run("diff", ck, st)
    assert r.exit_code == EXIT_OK, r.output
    assert "identical: 3 same" in r.output


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_diff_against_ckptfmt_every_kind(make, kind):
    assert run("diff", make.ckptfmt("ref"), make.build(kind)).exit_code == EXIT_OK


def test_diff_reports_added_removed_changed(tmp_path):
    from safetensors.numpy import save_file

    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    save_file({"same": np.ones(3, np.float32), "gone": np.zeros(2, np.int32), "w": np.array([1.0, 2.0], np.float32),
               "s": np.zeros((2, 2), np.float32)}, a)
    save_file({"same": np.ones(3, np.float32), "new": np.zeros(1, np.int8), "w": np.array([1.0, 2.5], np.float32),
               "s": np.zeros(4, np.float32)}, b)
    r = run("diff", a, b)
    assert r.exit_code == EXIT_FOUND
    lines = r.output.splitlines()
    assert any(line.startswith("-") and "gone" in line for line in lines[2:])
    assert any(line.startswith("+") and "new" in line for line in lines[2:])
    w = next(line for line in lines if line.startswith("~") and " w " in line)
    assert "max abs 0.5" in w and "max rel 0.2" in w
    s = next(line for line in lines if line.startswith("~") and " s " in line)
    assert "[2, 2] -> [4]" in s
    d = json.loads(run("diff", "--json", a, b).output)
    assert d["identical"] is False and d["unchanged"] == 1
    assert [t["name"] for t in d["added"]] == ["new"] and [t["name"] for t in d["removed"]] == ["gone"]
    w = next(c for c in d["changed"] if c["name"] == "w")
    assert w["max_abs"] == 0.5 and w["max_rel"] == pytest.approx(0.2)


def test_diff_tolerances(tmp_path):
    from safetensors.numpy import save_file

    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    save_file({"w": np.array([1.0, 100.0], np.float32)}, a)
    save_file({"w": np.array([1.001, 100.0], np.float32)}, b)
    assert run("diff", a, b).exit_code == EXIT_FOUND
    assert run("diff", "--atol", "1e-2", a, b).exit_code == EXIT_OK
    assert run("diff", "--rtol", "1e-2", a, b).exit_code == EXIT_OK
    assert run("diff", "--atol", "1e-5", a, b).exit_code == EXIT_FOUND


def test_diff_missing_input_is_3(make, tmp_path):
    assert run("diff", make.ckptfmt(), tmp_path / "nope").exit_code == EXIT_ERROR


# ------------------------------------------------------------------------- convert


TARGETS = {"safetensors": "out.safetensors", "ckptfmt": "out_ck", "torch": "out.pt"}


@pytest.mark.parametrize("target", [
    "safetensors", "ckptfmt", pytest.param("torch", marks=pytest.mark.torch),
])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_convert_every_kind_round_trips(make, tmp_path, kind, target):
    if target == "torch":
        pytest.importorskip("torch")
    src = make.build(kind)
    dst = str(tmp_path / TARGETS[target])
    r = run("convert", f"to-{target}", src, dst)
    assert r.exit_code == 0, r.output
    assert f"wrote {dst} ({target}, 3 tensors" in r.output
    assert run("verify", dst).exit_code == EXIT_OK
    d = run("diff", src, dst)
    assert d.exit_code == EXIT_OK, d.output


def test_convert_keeps_metadata(make, tmp_path):
    st = str(tmp_path / "x.safetensors")
    ck2 = str(tmp_path / "ck2")
    assert run("convert", "to-safetensors", make.ckptfmt(), st).exit_code == 0
    assert run("convert", "to-ckptfmt", st, ck2).exit_code == 0
    assert ckptfmt.open(ck2).metadata == {"run": "unit"}


def test_convert_refuses_to_overwrite(make, tmp_path):
    src = make.ckptfmt()
    dst = str(tmp_path / "x.safetensors")
    assert run("convert", "to-safetensors", src, dst).exit_code == 0
    r = run("convert", "to-safetensors", src, dst)
    assert r.exit_code == EXIT_ERROR and "already exists" in r.output and "--overwrite" in r.output
    assert run("convert", "to-safetensors", "--overwrite", src, dst).exit_code == 0


def test_convert_tf_fixture_skips_object_graph(make, tmp_path):
    src = make.tf_fixture("tf_module")
    dst = str(tmp_path / "tf.safetensors")
    r = run("convert", "to-safetensors", src, dst)
    assert r.exit_code == 0, r.output
    assert "skipped _CHECKPOINTABLE_OBJECT_GRAPH (string tensor)" in r.output
    d = json.loads(run("diff", "--json", src, dst).output)
    assert [t["name"] for t in d["removed"]] == ["_CHECKPOINTABLE_OBJECT_GRAPH"] and not d["changed"] and not d["added"]


def test_convert_unsupported_dtype(tmp_path):
    from safetensors.numpy import save_file

    ck = str(tmp_path / "ck")
    ckptfmt.save({"c": np.ones(2, np.complex128), "w": np.ones(2, np.float32)}, ck)
    r = run("convert", "to-safetensors", ck, tmp_path / "x.safetensors")
    assert r.exit_code == EXIT_ERROR and "complex128" in r.output and "--skip-unsupported" in r.output
    r = run("convert", "to-safetensors", "--skip-unsupported", ck, tmp_path / "x.safetensors")
    assert r.exit_code == 0 and "skipped c" in r.output
    del save_file


@pytest.mark.onnx
@pytest.mark.parametrize("external", [False, True])
def test_onnx_import_export(make, tmp_path, external):
    pytest.importorskip("onnx")
    model = make.onnx(external=external)
    st = str(tmp_path / "w.safetensors")
    assert run("convert", "onnx-import", model, st).exit_code == 0
    assert run("diff", model, st).exit_code == EXIT_OK

    from safetensors.numpy import load_file, save_file

    tuned = {k: np.asarray(v * 2) for k, v in load_file(st).items()}
    st2 = str(tmp_path / "tuned.safetensors")
    save_file(tuned, st2)
    out = str(tmp_path / "tuned.onnx")
    r = run("convert", "onnx-export", st2, model, out)
    assert r.exit_code == 0, r.output
    assert run("verify", out).exit_code == EXIT_OK
    assert run("diff", st2, out).exit_code == EXIT_OK
    assert run("diff", model, out).exit_code == EXIT_FOUND  # the model itself is untouched


@pytest.mark.onnx
def test_onnx_import_to_ckptfmt_dir(make, tmp_path):
    pytest.importorskip("onnx")
    dst = str(tmp_path / "from_onnx")
    assert run("convert", "onnx-import", make.onnx(), dst).exit_code == 0
    assert run("inspect", dst).output.splitlines()[1] == "kind:     ckptfmt"


@pytest.mark.onnx
def test_onnx_export_mismatch_lists_everything(make, tmp_path):
    pytest.importorskip("onnx")
    from safetensors.numpy import save_file

    st = str(tmp_path / "bad.safetensors")
    save_file({"layer/w": np.zeros((2, 4), np.float32), "extra": np.zeros(1, np.float32)}, st)
    r = run("convert", "onnx-export", st, make.onnx(), tmp_path / "o.onnx")
    assert r.exit_code == EXIT_ERROR
    assert "layer/w: float32[2, 4]" in r.output and "float32[3, 4] in the model" in r.output
    assert "extra" in r.output and "layer/b" in r.output
    assert not (tmp_path / "o.onnx").exists()

    save_file({"layer/w": np.zeros((3, 4), np.float32), "extra": np.zeros(1, np.float32)}, st)
    r = run("convert", "onnx-export", st, make.onnx("m2.onnx"), tmp_path / "o.onnx")
    assert r.exit_code == EXIT_ERROR and "--allow-missing" in r.output and "--allow-unknown" in r.output
    r = run("convert", "onnx-export", "--allow-missing", "--allow-unknown", st, make.onnx("m3.onnx"), tmp_path / "o.onnx")
    assert r.exit_code == 0, r.output


def test_convert_group_loads_plugins_lazily(monkeypatch):
    # monkeypatch restores the registry, so the real tf2torch/torch2tf stay registered.
    monkeypatch.setitem(cli.CONVERT_COMMANDS, "broken-plugin", "ckptfmt.cli.no_such_module:broken")
    assert "broken-plugin" in run("convert", "--help").output
    r = run("convert", "broken-plugin", "a", "b")
    assert r.exit_code == EXIT_ERROR and "cannot be loaded" in r.output

    @click.command("hello")
    def hello() -> None:
        click.echo("hi")

    cli.register_convert_command(hello)
    try:
        assert run("convert", "hello").output == "hi\n"
    finally:
        cli.convert.commands.pop("hello")


# ------------------------------------------------------------------------- errors, entry point


def test_debug_shows_traceback(tmp_path):
    r = CliRunner().invoke(main, ["--debug", "inspect", str(tmp_path / "nope")])
    assert isinstance(r.exception, ckptfmt.CheckpointNotFoundError)
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "nope")], env={"CKPTFMT_DEBUG": "1"})
    assert isinstance(r.exception, ckptfmt.CheckpointNotFoundError)


def test_module_and_console_script(make):
    path = make.safetensors()
    p = subprocess.run([sys.executable, "-m", "ckptfmt.cli.main", "verify", path], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("ok ")
    script = shutil.which("ckptfmt", path=os.path.dirname(sys.executable))
    if script:
        p = subprocess.run([script, "verify", path + ".missing"], capture_output=True, text=True, timeout=120)
        assert p.returncode == EXIT_ERROR and "no checkpoint" in p.stdout
