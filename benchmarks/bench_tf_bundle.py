"""Benchmark ckptfmt's TensorBundle reader/writer against TensorFlow's own.

    python benchmarks/bench_tf_bundle.py [--gib 1.0] [--runs 3] [--dir /tmp/bench_tf]

A checkpoint of 200 float32 tensors of mixed sizes (about ``--gib`` GiB) is written and
read alternately by each tool. Reads cover opening the checkpoint and materialising every
tensor as a numpy array; writes start from in-memory arrays (numpy for ours, tf.Variables
for TF's ``tf.train.Checkpoint.write``). Files stay in the page cache, so this measures
CPU and memory work, not the disk. TensorFlow's import time is measured in a fresh
process and reported separately, since a user of our reader never pays it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def make_tensors(total_bytes: int, n: int = 200) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    weights = rng.pareto(1.2, n) + 0.05
    sizes = np.maximum((weights / weights.sum() * total_bytes / 4).astype(np.int64), 16)
    out = {}
    for i, s in enumerate(sizes):
        cols = 256 if s >= 4096 else 1
        arr = np.empty((int(s) // cols, cols), np.float32)
        arr.fill(i * 0.5)  # touches every page, so generation is not measured as first touch
        out[f"layer_{i:03d}/kernel"] = arr
    return out


def tf_import_seconds() -> float:
    code = "import time,os;os.environ['TF_CPP_MIN_LOG_LEVEL']='3';t=time.perf_counter();import tensorflow;print(time.perf_counter()-t)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(res.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--dir", default="/tmp/bench_tf_bundle")
    args = ap.parse_args()

    from ckptfmt.converters.tf import TFCheckpointReader, write_checkpoint

    import_s = tf_import_seconds()
    import tensorflow as tf

    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    tensors = make_tensors(int(args.gib * (1 << 30)))
    nbytes = sum(a.nbytes for a in tensors.values())
    variables = {k.replace("/", "_"): tf.Variable(v) for k, v in tensors.items()}
    module = tf.Module()
    for k, v in variables.items():
        setattr(module, k, v)
    ckpt = tf.train.Checkpoint(model=module)

    ours_prefix = os.path.join(args.dir, "ours")
    tf_prefix = os.path.join(args.dir, "tf")
    times: dict[str, list[float]] = {"write ours": [], "write tf": [], "read ours": [], "read tf": []}

    def timed(label, fn):
        t = time.perf_counter()
        result = fn()
        times[label].append(time.perf_counter() - t)
        return result

    def read_ours():
        return TFCheckpointReader(ours_prefix).read_all()

    def read_tf():
        r = tf.train.load_checkpoint(tf_prefix)
        return {k: r.get_tensor(k) for k in r.get_variable_to_shape_map()}

    for run in range(args.runs):
        # Alternate which tool goes first, so neither always meets the other's dirty pages.
        writes = [("write ours", lambda: write_checkpoint(ours_prefix, tensors)), ("write tf", lambda: ckpt.write(tf_prefix))]
        reads = [("read ours", read_ours), ("read tf", read_tf)]
        if run % 2:
            writes.reverse()
            reads.reverse()
        for label, fn in writes:
            timed(label, fn)
        for label, fn in reads:
            got = timed(label, fn)
            del got

    check = TFCheckpointReader(ours_prefix)
    assert all(np.array_equal(check.get(k), v) for k, v in list(tensors.items())[:5])
    print(f"checkpoint: {len(tensors)} float32 tensors, {nbytes / (1 << 30):.3f} GiB, {args.runs} runs each")
    print(f"tensorflow import: {import_s:.2f} s (fresh process)")
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:11s} median {med[k]:6.3f} s  {nbytes / med[k] / (1 << 30):5.2f} GiB/s  runs {[round(x, 3) for x in v]}")
    for op in ("read", "write"):
        ours, theirs = med[f"{op} ours"], med[f"{op} tf"]
        print(f"{op}: tf/ours = {theirs / ours:.2f}x without TF import, "
              f"{(theirs + import_s) / ours:.2f}x including TF import")
    shutil.rmtree(args.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
