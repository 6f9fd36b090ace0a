"""Builders of small checkpoints of every kind, and of damaged copies of them."""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

import ckptfmt

# Values every builder writes, so that checkpoints of different kinds compare equal.
TENSORS = {
    "layer/w": np.arange(12, dtype=np.float32).reshape(3, 4),
    "layer/b": np.linspace(-1, 1, 4).astype(np.float32),
    "step": np.array(7, dtype=np.int64),
}


def flip(path: str | os.PathLike, offset: int) -> None:
    """Invert one byte of a file."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def truncate(path: str | os.PathLike, keep: int | None = None) -> None:
    """Cut a file to ``keep`` bytes (default: half)."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2 if keep is None else keep)


class Builders:
    def __init__(self, root: Path) -> None:
        self.root = root

    def ckptfmt(self, name: str = "ck") -> str:
        from ckptfmt.converters.kinds import nest

        p = str(self.root / name)
        ckptfmt.save(nest(dict(TENSORS)), p, metadata={"run": "unit"})
        return p

    def safetensors(self, name: str = "m.safetensors") -> str:
        from safetensors.numpy import save_file

        p = str(self.root / name)
        save_file(dict(TENSORS), p, metadata={"run": "unit"})
        return p

    def torch(self, name: str = "m.pt") -> str:
        torch = pytest.importorskip("torch")
        p = str(self.root / name)
        torch.save({k: torch.from_numpy(v.copy()) for k, v in TENSORS.items()}, p)
        return p

    def onnx(self, name: str = "m.onnx", *, external: bool = False) -> str:
        onnx = pytest.importorskip("onnx")
        from onnx import TensorProto, helper, numpy_helper

        nodes = [helper.make_node("MatMul", ["x", "layer/w"], ["h"]), helper.make_node("Add", ["h", "layer/b"], ["y"])]
        graph = helper.make_graph(
            nodes, "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
            [numpy_helper.from_array(TENSORS["layer/w"], "layer/w"), numpy_helper.from_array(TENSORS["layer/b"], "layer/b"),
             numpy_helper.from_array(TENSORS["step"], "step")],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        p = str(self.root / name)
        if external:
            onnx.save_model(model, p, save_as_external_data=True, location=name + ".data", size_threshold=0)
        else:
            onnx.save_model(model, p)
        return p

    def tf(self, name: str = "tf") -> str:
        from ckptfmt.converters.tf import write_checkpoint

        d = self.root / name
        d.mkdir()
        prefix = str(d / "ckpt-1")
        write_checkpoint(prefix, dict(TENSORS))
        return prefix

    def tf_fixture(self, which: str = "tf_module") -> str:
        src = Path(__file__).resolve().parents[2] / "fixtures" / "tf" / which
        dst = self.root / which
        shutil.copytree(src, dst)
        return str(dst)

    def build(self, kind: str) -> str:
        return getattr(self, kind)()


def torch_member_offset(path: str, suffix: str = "data/0") -> int:
    """Byte offset of the data of a torch zip member."""
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        info = next(i for i in zf.infolist() if i.filename.endswith(suffix))
        f.seek(info.header_offset + 26)
        head = f.read(4)
        return info.header_offset + 30 + int.from_bytes(head[:2], "little") + int.from_bytes(head[2:], "little")


@pytest.fixture
def make(tmp_path: Path) -> Builders:
    return Builders(tmp_path)


@pytest.fixture
def helpers():
    """flip/truncate/torch_member_offset for test modules (conftest is not importable)."""

    class H:
        pass

    h = H()
    h.flip, h.truncate, h.torch_member_offset, h.tensors = flip, truncate, torch_member_offset, TENSORS
    return h
