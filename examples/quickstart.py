"""Quick start: save, verify, inspect lazily and load a checkpoint of the bundled example.

The bundled example is the golden v1 checkpoint `fixtures/golden/v1/tree` (a small model,
an Adam optimizer state, tied weights and plain values). This script loads it, saves it
again as a new checkpoint, verifies that one, reads a slice lazily, and checks the round
trip is bit-exact.

Run: python examples/quickstart.py [OUTPUT_DIR]
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np

import ckptfmt

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(HERE, "..", "fixtures", "golden", "v1", "tree")


def same(a, b) -> bool:
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    return a == b


def main() -> int:
    out_dir = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="ckptfmt-quickstart-")
    state = ckptfmt.load(EXAMPLE)
    print(f"loaded {EXAMPLE}: {len(ckptfmt.open(EXAMPLE))} tensors")

    path = os.path.join(out_dir, "step-7")
    digest = ckptfmt.save(state, path, metadata={"step": 7, "source": "quickstart"}, overwrite=True)
    print(f"saved  {path}  digest {digest[:16]}...")

    report = ckptfmt.verify(path)
    print(f"verify {'OK' if report.ok else 'FAILED'}: {report.tensors} tensors, {report.chunks_checked} chunks, "
          f"{report.bytes_checked} bytes")

    with ckptfmt.open(path) as reader:
        for name in reader.keys():
            info = reader.info(name)
            print(f"  {name:28s} {info.dtype:9s} {str(info.shape):10s} {info.nbytes:>6d} B")
        first_row = reader.slice("model/layer.0.weight")[0]
        print(f"lazy slice model/layer.0.weight[0] = {first_row}")

    ok = report.ok and same(state, ckptfmt.load(path))
    print("round trip bit-exact:", ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
