"""`ckptfmt hash` / `verify --sums` and the content digest (issue 12)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

import ckptfmt
from ckptfmt.cli.main import EXIT_ERROR, EXIT_FOUND, EXIT_OK, main
from ckptfmt.converters import kinds, sums


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], env={"CKPTFMT_DEBUG": ""})


def _flip_data_byte(path):
    raw = bytearray(open(path, "rb").read())
    raw[-3] ^= 0x40  # the last tensor's data: structure intact, contents changed
    open(path, "wb").write(bytes(raw))


def test_flipped_safetensors_byte_passes_structure_and_fails_sums(make, tmp_path):
    st = make.safetensors()
    r = run("hash", st)
    assert r.exit_code == EXIT_OK
    (tmp_path / "SUMS").write_text(r.output)
    lines = [json.loads(x) for x in r.output.splitlines()]
    assert lines[0] == {"ckptfmt_sums": 1} and {x["tensor"] for x in lines[1:-1]} == {"layer/w", "layer/b", "step"}
    assert set(lines[-1]) == {"path", "kind", "contents"}
    assert run("verify", "--sums", tmp_path / "SUMS", st).exit_code == EXIT_OK
    _flip_data_byte(st)
    r = run("verify", st)
    assert r.exit_code == EXIT_OK and "contents not verifiable" in r.output  # the format cannot tell
    r = run("verify", "--sums", tmp_path / "SUMS", st)
    assert r.exit_code == EXIT_FOUND and "hash_mismatch" in r.output and "contents changed" in r.output
    assert "contents not verifiable" not in r.output


def test_sums_are_stable_across_kinds_and_reserialisation(make, tmp_path):
    ck = make.ckptfmt()
    st = str(tmp_path / "a.safetensors")
    kinds.convert(ck, st)
    again = str(tmp_path / "again")
    kinds.convert(st, again)
    digests = [{e.tensor: e.blake3 for e in sums.hash_checkpoint(p)} for p in (ck, st, again)]
    assert digests[0] == digests[1] == digests[2]
    r = run("hash", ck)
    (tmp_path / "SUMS").write_text(r.output.replace(ck, st))  # the same tensors, recorded for the export
    assert run("verify", "--sums", tmp_path / "SUMS", st).exit_code == EXIT_OK


@pytest.mark.torch
def test_sums_for_torch_and_missing_or_extra_tensors(make, tmp_path):
    pt = make.torch()
    (tmp_path / "SUMS").write_text(run("hash", pt).output)
    assert run("verify", "--sums", tmp_path / "SUMS", pt).exit_code == EXIT_OK
    import torch

    torch.save({"layer/w": torch.zeros(3, 4), "new": torch.ones(1)}, pt)
    r = run("verify", "--sums", tmp_path / "SUMS", pt)
    assert r.exit_code == EXIT_FOUND
    assert "missing_tensor" in r.output and "extra_tensor" in r.output and "hash_mismatch" in r.output


def test_sums_errors(make, tmp_path):
    st = make.safetensors()
    bad = tmp_path / "SUMS"
    bad.write_text("not json\n")
    r = run("verify", "--sums", bad, st)
    assert r.exit_code == EXIT_ERROR and "not a ckptfmt sums file" in r.output and "ckptfmt hash" in r.output
    (tmp_path / "S2").write_text(run("hash", st).output)
    other = make.ckptfmt("other")
    r = run("verify", "--sums", tmp_path / "S2", other)
    assert r.exit_code == EXIT_FOUND and "not_in_sums" in r.output


def test_content_digest_ignores_time_names_and_incremental_layout(tmp_path):
    state = {"a": np.arange(10.0), "b": {"c": np.ones((3, 4), np.float32)}, "n": 3}
    paths = [str(tmp_path / n) for n in ("x", "y", "z")]
    ckptfmt.save(state, paths[0])
    ckptfmt.save(state, paths[1])
    ckptfmt.save(state, paths[2], parent=paths[0])
    readers = [ckptfmt.open(p) for p in paths]
    assert len({r.digest for r in readers}) == 3  # the manifest digest covers save time and files
    assert len({r.content_digest for r in readers}) == 1
    changed = str(tmp_path / "w")
    ckptfmt.save({**state, "a": np.arange(10.0) + 1}, changed)
    assert ckptfmt.open(changed).content_digest != readers[0].content_digest
    retree = str(tmp_path / "t")
    ckptfmt.save({"a": np.arange(10.0), "b": {"c": np.ones((3, 4), np.float32)}, "n": 4}, retree)
    assert ckptfmt.open(retree).content_digest != readers[0].content_digest  # the tree counts
    r = run("inspect", paths[1])
    assert f"content:  {readers[0].content_digest}" in r.output
    assert json.loads(run("inspect", "--json", paths[2]).output)["content_digest"] == readers[0].content_digest


def test_sums_of_a_structurally_damaged_file_is_corrupt_not_unreadable(make, tmp_path):
    st = make.safetensors()
    (tmp_path / "SUMS").write_text(run("hash", st).output)
    with open(st, "r+b") as f:
        f.truncate(os.path.getsize(st) - 4)
    r = run("verify", "--sums", tmp_path / "SUMS", st)
    assert r.exit_code == EXIT_FOUND and "truncated" in r.output and "ckptfmt verify" not in r.output


@pytest.mark.parametrize("kind", ["ckptfmt", "safetensors"])
def test_changed_non_tensor_contents_fail_sums(tmp_path, kind):
    """epoch/lr (a ckptfmt tree's plain leaves) or safetensors __metadata__ changed, tensors not."""
    from safetensors.numpy import save_file

    w = {"w": np.arange(6, dtype=np.float32)}
    p = str(tmp_path / ("ck" if kind == "ckptfmt" else "m.safetensors"))

    def write(epoch):
        if kind == "ckptfmt":
            ckptfmt.save({**w, "epoch": epoch, "opt": {"lr": 0.1}}, p, overwrite=True)
        else:
            save_file(w, p, metadata={"epoch": str(epoch)})

    write(3)
    r = run("hash", p)
    assert r.exit_code == EXIT_OK
    (tmp_path / "SUMS").write_text(r.output)
    write(3)  # the same contents written again: still passes
    assert run("verify", "--sums", tmp_path / "SUMS", p).exit_code == EXIT_OK
    write(4)
    r = run("verify", "--sums", tmp_path / "SUMS", p)
    assert r.exit_code == EXIT_FOUND and "non-tensor contents" in r.output, r.output


def test_content_digest_covers_the_shard_table():
    """Two manifests alike but for where their two pieces sit in the sharded tensor."""
    from types import SimpleNamespace

    from ckptfmt._reader import CheckpointReader
    from ckptfmt.format.dtypes import DTYPE_NAMES
    from ckptfmt.format.manifest import ManifestBuilder, decode_manifest
    from ckptfmt.format.shards import GlobalTensor, encode_shards

    def manifest(offsets):
        b = ManifestBuilder(chunk_size=4096)
        f = b.add_file("d.data")
        for k, name in enumerate(("w@a", "w@b")):
            b.add_tensor(name, "float32", (1, 3))
            b.add_chunk(f, 12 * k, bytes([k]) * 32)
        b.set_file_size(f, 24)
        g = GlobalTensor("w", DTYPE_NAMES.index("float32"), (2, 3), (0, 1), offsets)
        return decode_manifest(b.encode(tree=["d", ["w"], [["s", 0]]], metadata=None, producer={},
                                        extra={"shards": encode_shards([g])}))

    digest = CheckpointReader.content_digest.fget
    a, b = manifest(((0, 0), (1, 0))), manifest(((1, 0), (0, 0)))
    assert digest(SimpleNamespace(manifest=a)) == digest(SimpleNamespace(manifest=manifest(((0, 0), (1, 0)))))
    assert digest(SimpleNamespace(manifest=a)) != digest(SimpleNamespace(manifest=b))
