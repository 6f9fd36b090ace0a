"""The v1.3 golden run (sharded checkpoints in a run's shared store, written through DCP by
two processes) must read identically forever, and obey the 1.2 deletion rules."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import pytest

import ckptfmt
from ckptfmt.format.spec import STORE_FILE_RE

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLDEN = os.path.join(ROOT, "fixtures", "golden", "v1.3-store")

with open(os.path.join(GOLDEN, "expected.json")) as f:
    EXPECTED = json.load(f)


def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _maker():
    return _load(os.path.join(GOLDEN, "make_golden.py"), "make_golden_13_store")


def _digest_tree():
    return _load(os.path.join(ROOT, "fixtures", "golden", "v1", "make_golden.py"), "v1").digest_tree


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_golden_v1_3_store_reads_identically(name):
    exp = EXPECTED[name]
    path = os.path.join(GOLDEN, "run", name)
    rep = ckptfmt.verify(path)
    assert rep.ok and not rep.problems and rep.digest == exp["digest"] and rep.version == exp["version"]
    assert os.listdir(path) == ["MANIFEST"]
    with ckptfmt.open(path) as r:
        m = r.manifest
        assert r.sharded_keys() == exp["sharded"]
        names = [f.path for f in m.files]
        assert all(p.startswith("../ckptfmt-store/") and STORE_FILE_RE.match(p.split("/")[-1]) for p in names)
        wrote = [names[i] for i in m.wrote]
        if "parent" in exp:
            assert m.parent["name"] == exp["parent"] and m.parent["depth"] == 1
            # only rank 1 held a changed chunk (model.cols[3, 700]); replicated "step" went to one rank
            assert len(wrote) == 1 and wrote[0].split("-")[-2].endswith("000001")
            assert r.sharing()["shared_bytes"] > 10 * r.sharing()["own_bytes"]
        else:
            assert sorted(w.split("-")[-2][-6:] for w in wrote) == ["000000", "000001"]  # one pack per rank
        assert _digest_tree()(r.load()) == exp["tree"]


def test_golden_v1_3_store_state_is_still_what_the_script_writes():
    for name in EXPECTED:
        assert _digest_tree()(_maker().expected_tree(name)) == EXPECTED[name]["tree"]


def test_golden_v1_3_store_delta_loads_through_dcp_after_rm_r_of_its_parent(tmp_path):
    torch = pytest.importorskip("torch")
    import warnings

    import torch.distributed.checkpoint as dcp

    import ckptfmt.dcp

    run = str(tmp_path / "run")
    shutil.copytree(os.path.join(GOLDEN, "run"), run)
    shutil.rmtree(os.path.join(run, "base"))
    assert ckptfmt.gc(run, grace_seconds=0).deleted == ()  # delta uses both of base's packs
    state = {"model": {"rows": torch.zeros(37, 64), "cols": torch.zeros(8, 1030), "vec": torch.zeros(300, dtype=torch.bfloat16)},
             "step": torch.tensor(0), "extra": {"lr": 0.0, "betas": None, "name": ""}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=ckptfmt.dcp.Reader(os.path.join(run, "delta")))
    exp = _maker().expected_tree("delta")
    assert state["model"]["cols"].numpy().tobytes() == exp["model"]["cols"].tobytes()
    assert int(state["step"]) == 13 and state["extra"]["betas"] == (0.9, 0.999)
    ckptfmt.remove(os.path.join(run, "delta"))
    assert [f for f in os.listdir(os.path.join(run, "ckptfmt-store")) if STORE_FILE_RE.match(f)] == []


def test_golden_v1_3_store_remove_of_the_child_frees_only_its_own_pack(tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(os.path.join(GOLDEN, "run"), run)
    with ckptfmt.open(os.path.join(run, "delta")) as r:
        own = {r.manifest.files[i].path.split("/")[-1] for i in r.manifest.wrote}
    rep = ckptfmt.remove(os.path.join(run, "delta"))
    assert {os.path.basename(p) for p in rep.deleted} == own
    assert not os.path.exists(os.path.join(run, "delta"))
    assert ckptfmt.verify(os.path.join(run, "base")).digest == EXPECTED["base"]["digest"]
