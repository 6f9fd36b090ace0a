"""Sharded Hugging Face checkpoints (``model.safetensors.index.json`` + shards) as one checkpoint.

The shards are written by the safetensors library and the index in the layout
``save_pretrained`` writes (``metadata.total_size``, ``weight_map``; shard names
``model-0000i-of-0000n.safetensors``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from ckptfmt.cli.main import EXIT_ERROR, EXIT_FOUND, EXIT_OK, main
from ckptfmt.converters import kinds

TENSORS = {
    "model.embed_tokens.weight": np.arange(40, dtype=np.float32).reshape(10, 4),
    "model.layers.0.mlp.weight": np.ones((4, 4), np.float32),
    "model.layers.1.mlp.weight": np.full((4, 4), 2.0, np.float32),
    "lm_head.weight": np.linspace(0, 1, 40, dtype=np.float32).reshape(10, 4),
}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], env={"CKPTFMT_DEBUG": ""})


@pytest.fixture
def hf(tmp_path):
    from safetensors.numpy import save_file

    d = tmp_path / "hf-model"
    d.mkdir()
    names = list(TENSORS)
    shards = [names[:2], names[2:]]
    weight_map = {}
    for i, group in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: TENSORS[n] for n in group}, str(d / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in group})
    total = sum(a.nbytes for a in TENSORS.values())
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (d / "config.json").write_text("{}")
    return d


def test_inspect_verify_diff_convert_as_one(hf, tmp_path):
    index = hf / "model.safetensors.index.json"
    for p in (hf, index):
        assert kinds.detect_kind(p) == "safetensors-sharded"
        r = run("inspect", p)
        assert r.exit_code == EXIT_OK and "tensors:  4" in r.output and "2 shards" in r.output
        r = run("verify", p)
        assert r.exit_code == EXIT_OK and "contents not verifiable" in r.output, r.output
    out = tmp_path / "one.safetensors"
    assert run("convert", "to-safetensors", hf, out).exit_code == EXIT_OK
    assert run("diff", hf, out).exit_code == EXIT_OK
    from safetensors.numpy import load_file

    assert all(np.array_equal(load_file(str(out))[k], v) for k, v in TENSORS.items())
    ck = tmp_path / "ck"
    assert run("convert", "to-ckptfmt", index, ck).exit_code == EXIT_OK
    assert run("diff", ck, hf).exit_code == EXIT_OK


def test_damaged_sharded_checkpoints(hf):
    index = hf / "model.safetensors.index.json"
    shard2 = hf / "model-00002-of-00002.safetensors"
    raw = shard2.read_bytes()
    shard2.write_bytes(raw[:-8])  # truncated
    r = run("verify", hf)
    assert r.exit_code == EXIT_FOUND and "model-00002-of-00002.safetensors" in r.output
    shard2.unlink()
    r = run("verify", hf)
    assert r.exit_code == EXIT_FOUND and "missing" in r.output and "model-00002-of-00002" in r.output
    r = run("inspect", hf)
    assert r.exit_code == EXIT_ERROR and "model-00002-of-00002.safetensors" in r.output
    shard2.write_bytes(raw)
    doc = json.loads(index.read_text())
    doc["weight_map"]["model.layers.1.mlp.weight"] = "../../etc/passwd"
    index.write_text(json.dumps(doc))
    r = run("inspect", hf)
    assert r.exit_code == EXIT_ERROR and "file names beside the index" in r.output
    assert run("verify", hf).exit_code == EXIT_ERROR  # not a usable index: unreadable
    del doc["weight_map"]["model.layers.1.mlp.weight"]
    doc["weight_map"]["lm_head.weight"] = "model-00002-of-00002.safetensors"
    index.write_text(json.dumps(doc))
    r = run("verify", hf)
    assert r.exit_code == EXIT_FOUND and "extra_tensor" in r.output and "stale" in r.output
