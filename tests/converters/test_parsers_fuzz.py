"""The parser property for every foreign kind: hostile bytes give our errors, and verify never raises.

Each test mutates a real file of one kind (written by safetensors, torch, onnx or our
TensorBundle writer) and hands it to ``open_any`` (keys, info, get of every tensor) and
``verify_any``. Reading may fail only with a ckptfmt error; ``verify`` must return a report
(corruption is reported, never raised). A few hundred inputs per parser run in CI; the
long opt-in run (documented in benchmarks/README.md) is::

    CKPTFMT_FUZZ_EXAMPLES=20000 python -m pytest tests/converters/test_parsers_fuzz.py tests/api/test_fuzz.py
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptfmt.converters import kinds
from ckptfmt.errors import CheckpointNotFoundError, CkptFmtError

EXAMPLES = int(os.environ.get("CKPTFMT_FUZZ_EXAMPLES", "250"))
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "tf"
TENSORS = {"layer/w": np.arange(12, dtype=np.float32).reshape(3, 4), "layer/b": np.ones(4, np.float32), "step": np.array(7)}


def exercise(kind: str, path: str) -> None:
    """Read everything ``path`` offers; only ckptfmt errors may come out, and none from verify."""
    try:
        with kinds.open_any(path, kind=kind) as src:
            for name in src.keys():
                src.info(name)
                src.get(name)
            _ = (src.metadata, src.version, src.digest)
    except CkptFmtError:
        pass
    try:
        report = kinds.verify_any(path, kind=kind)
    except CheckpointNotFoundError:
        return  # e.g. a TF index whose header now names shards that do not exist
    assert report.ok == (not report.errors)
    assert report.readable or not report.ok


def mutate_bytes(raw: bytes, rng: random.Random) -> bytes:
    """Flip bits, overwrite bytes, cut runs, insert junk, plant extreme integers."""
    out = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        op = rng.choice(("flip", "byte", "cut", "insert", "int"))
        i = rng.randrange(max(1, len(out)))
        if op == "flip" and out:
            out[i] ^= 1 << rng.randrange(8)
        elif op == "byte" and out:
            out[i] = rng.randrange(256)
        elif op == "cut":
            del out[i : i + rng.randint(1, 64)]
        elif op == "insert":
            out[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        else:  # where a length or offset may be
            out[i : i + 8] = rng.choice((2**63, 2**64 - 1, 2**62, 2**31, 0)).to_bytes(8, "little")
    return bytes(out)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    from safetensors.numpy import save_file

    from ckptfmt.converters.tf import write_checkpoint

    out = {"safetensors": str(root / "m.safetensors")}
    save_file(dict(TENSORS), out["safetensors"], metadata={"run": "x"})
    (root / "tf").mkdir()
    write_checkpoint(str(root / "tf" / "ckpt-1"), dict(TENSORS))
    out["tf"] = str(root / "tf" / "ckpt-1")
    return out


def _run(seed_file: str, work: Path, kind: str, data: bytes, name: str | None = None) -> None:
    target = work / (name or os.path.basename(seed_file))
    target.write_bytes(data)
    exercise(kind, str(target))


def _fuzz(tmp_path_factory, seed_file: str, kind: str, *, target_suffix: str = "", copy: tuple[str, ...] = ()):
    """One hypothesis test body: mutate ``seed_file + target_suffix`` and exercise it."""
    work = tmp_path_factory.mktemp(f"fz-{kind}")
    for c in copy:
        shutil.copy(c, work / os.path.basename(c))
    raw = Path(seed_file + target_suffix).read_bytes()
    path = work / os.path.basename(seed_file)

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True)
    @given(st.integers(0, 2**32 - 1))
    def run(seed: int) -> None:
        (work / os.path.basename(seed_file + target_suffix)).write_bytes(mutate_bytes(raw, random.Random(seed)))
        exercise(kind, str(path))

    run()


def test_safetensors_mutations(seeds, tmp_path_factory):
    _fuzz(tmp_path_factory, seeds["safetensors"], "safetensors")


def test_tf_index_mutations(seeds, tmp_path_factory):
    prefix = seeds["tf"]
    _fuzz(tmp_path_factory, prefix, "tf", target_suffix=".index", copy=(prefix + ".data-00000-of-00001",))


def test_tf_partitioned_index_mutations(tmp_path_factory):
    prefix = str(FIXTURES / "v1_partitioned" / "model.ckpt-5")
    shards = tuple(f"{prefix}.data-0000{i}-of-00002" for i in range(2))
    _fuzz(tmp_path_factory, prefix, "tf", target_suffix=".index", copy=shards)


@pytest.mark.torch
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torch_mutations(tmp_path_factory, legacy):
    torch = pytest.importorskip("torch")
    p = str(tmp_path_factory.mktemp("torch-seed") / "m.pt")
    torch.save({k: torch.from_numpy(v.copy()) for k, v in TENSORS.items()} | {"epoch": 3}, p,
               _use_new_zipfile_serialization=not legacy)
    _fuzz(tmp_path_factory, p, "torch")


def _onnx_seed(root: Path, external: bool) -> str:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("MatMul", ["x", "layer/w"], ["h"]), helper.make_node("Add", ["h", "layer/b"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(v, k) for k, v in TENSORS.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    p = str(root / ("ex.onnx" if external else "in.onnx"))
    if external:
        onnx.save_model(model, p, save_as_external_data=True, location="ex.onnx.data", size_threshold=0)
    else:
        onnx.save_model(model, p)
    return p


@pytest.mark.onnx
def test_onnx_byte_mutations(tmp_path_factory):
    p = _onnx_seed(tmp_path_factory.mktemp("onnx-seed"), external=False)
    _fuzz(tmp_path_factory, p, "onnx")


def _mutate_model(onnx, model, rng: random.Random):
    """Type-confused and out-of-range initializer fields: dtype, dims, raw data, external data."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = m.graph.initializer
    for _ in range(rng.randint(1, 3)):
        t = inits[rng.randrange(len(inits))]
        op = rng.choice(["dtype", "dims", "raw", "ext", "loc", "typed", "dup", "graph", "ir"])
        if op == "dtype":
            t.data_type = rng.choice([0, 8, 16, 17, 18, 19, 20, 21, 22, 23, 25, 40, 2**31 - 1])
        elif op == "dims":
            del t.dims[:]
            t.dims.extend(rng.choice([[-1], [2**40, 2**40], [0, 2**62], [2**62], [3, -4], [], [1] * 70]))
        elif op == "raw":
            t.raw_data = rng.randbytes(rng.randint(0, 64))
        elif op == "ext":
            t.data_location = onnx.TensorProto.EXTERNAL
            t.ClearField("raw_data")
            del t.external_data[:]
            fields = [("location", rng.choice(["ex.onnx.data", "../x", "/etc/hostname", "", "nope"])),
                      ("offset", rng.choice(["0", "-5", "x", str(2**63), "999999"])),
                      ("length", rng.choice(["0", "-1", "y", str(2**64), "48"])), ("checksum", "z")]
            for k, v in rng.sample(fields, rng.randint(0, 4)):
                e = t.external_data.add()
                e.key, e.value = k, v
        elif op == "loc":
            t.data_location = rng.choice([0, 1])
        elif op == "typed":
            t.ClearField("raw_data")
            t.float_data.extend([1.0] * rng.randint(0, 20))
            t.int64_data.extend([5] * rng.randint(0, 3))
            t.string_data.append(b"\xff")
        elif op == "dup":
            inits.add().CopyFrom(t)
        elif op == "graph":
            m.graph.node[0].input[0] = "nope"
        else:
            m.ir_version = rng.choice([0, -1, 99])
    return m


@pytest.mark.onnx
@pytest.mark.parametrize("external", [False, True], ids=["embedded", "external"])
def test_onnx_field_mutations(tmp_path_factory, external):
    onnx = pytest.importorskip("onnx")
    root = tmp_path_factory.mktemp("onnx-fields")
    p = _onnx_seed(root, external)
    model = onnx.load(p, load_external_data=False)

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True)
    @given(st.integers(0, 2**32 - 1))
    def run(seed: int) -> None:
        Path(p).write_bytes(_mutate_model(onnx, model, random.Random(seed)).SerializeToString())
        exercise("onnx", p)

    run()
