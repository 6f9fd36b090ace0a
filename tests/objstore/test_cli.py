"""The CLI on object-store URLs (SeaweedFS), credentials from the standard AWS variables."""

from __future__ import annotations

import os

import numpy as np
import pytest
from click.testing import CliRunner

import ckptfmt
from ckptfmt.cli.main import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def s3env(seaweedfs, monkeypatch):
    import s3fs

    from ckptfmt.storage import urls

    o = seaweedfs.options
    monkeypatch.setenv("AWS_ENDPOINT_URL", o["endpoint_url"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", o["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", o["secret"])
    monkeypatch.setattr(urls, "_cache", {})
    s3fs.S3FileSystem.clear_instance_cache()
    yield seaweedfs
    s3fs.S3FileSystem.clear_instance_cache()


def test_every_command_takes_a_url(s3env, tmp_path):
    run = s3env.url("run")
    with ckptfmt.CheckpointManager(run) as m:
        m.save(1, {"w": np.ones(10)})
        m.save(2, {"w": np.zeros(10)})
    r = CliRunner()
    res = r.invoke(main, ["verify", f"{run}/step-1"])
    assert res.exit_code == 0 and res.output.startswith(f"ok      {run}/step-1")
    res = r.invoke(main, ["verify", run])
    assert res.exit_code == 0 and "run directory with 2 checkpoint(s)" in res.output and f"{run}/step-2" in res.output
    res = r.invoke(main, ["inspect", f"{run}/step-2"])
    assert res.exit_code == 0 and "parent:   step-1" in res.output
    res = r.invoke(main, ["diff", f"{run}/step-1", f"{run}/step-2"])
    assert res.exit_code == 1 and "1 changed" in res.output  # differ: exit 1
    res = r.invoke(main, ["log", run])
    assert res.exit_code == 0 and "2 checkpoints" in res.output
    res = r.invoke(main, ["gc", run, "--dry-run"])
    assert res.exit_code == 0 and "would delete 0 file(s)" in res.output
    res = r.invoke(main, ["compact", f"{run}/step-2", "--to", str(tmp_path / "copy")])
    assert res.exit_code == 0 and ckptfmt.verify(str(tmp_path / "copy")).ok
    # The corrupted object is found and named.
    storage, _ = ckptfmt.storage.urls.resolve(run)
    pack = [n for n in storage.listdir(f"{run}/ckptfmt-store") if n.endswith(".data")][0]
    # bytes neither step holds (step-2's own pack is all zeros: overwriting it with zeros changed nothing)
    storage.write_atomic(f"{run}/ckptfmt-store/{pack}", b"\x07" * 80)
    res = r.invoke(main, ["verify", run])
    assert res.exit_code == 1 and "hash_mismatch" in res.output, (pack, res.output)


def test_refusals(s3env):
    r = CliRunner()
    res = r.invoke(main, ["verify", "ftp://host/ck"])
    assert res.exit_code != 0 and "not supported" in res.output
    res = r.invoke(main, ["inspect", s3env.url("model.safetensors")])
    assert res.exit_code != 0 and "only ckptfmt checkpoints" in res.output
    res = r.invoke(main, ["verify", s3env.url("nothing")])
    assert res.exit_code != 0 and "no checkpoint" in res.output


def test_convert_writes_to_a_url(s3env):
    src = os.path.join(ROOT, "fixtures", "examples", "cnn_adam")
    if not os.path.exists(src + ".index") and not os.path.isdir(src):
        pytest.fail(f"the example checkpoint {src} is missing")
    dst = s3env.url("converted")
    res = CliRunner().invoke(main, ["convert", "tf2torch", src, dst, "--no-optimizer"])
    assert res.exit_code == 0, res.output
    assert ckptfmt.verify(dst).ok and ckptfmt.open(dst).keys()
    res = CliRunner().invoke(main, ["convert", "tf2torch", src, s3env.url("w.safetensors"), "--no-optimizer"])
    assert res.exit_code != 0 and "write the safetensors file locally" in res.output
