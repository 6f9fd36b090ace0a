"""Benchmark ckptfmt's TensorBundle reader/writer against TensorFlow's own.

    python benchmarks/bench_tf_bundle.py [--gib 1.0] [--runs 3] [--dir /tmp/bench_tf]
                                         [--variables 6002] [--skip-large] [--skip-many]

Many variables: a checkpoint TensorFlow writes for a tf.Module holding ``--variables``
small variables (pairs of a 32x32 kernel and a 32-vector bias, a step counter, and the
object graph TF adds: 6,002 by default) is read completely -- open plus every tensor as
numpy -- by ``TFCheckpointReader.read_all`` and by ``tf.train.load_checkpoint`` +
``get_tensor`` for every name, alternating, many rounds. Target: >= 1.0x TF, TF's import
excluded.

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


def many_variables(args) -> None:
    import tensorflow as tf

    from ckptfmt.converters.tf import TFCheckpointReader

    root = os.path.join(args.dir, "many")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    rng = np.random.default_rng(0)
    pairs = (args.variables - 2) // 2
    module = tf.Module()
    module.vars = [
        tf.Variable(rng.standard_normal((32, 32) if i % 2 == 0 else (32,)).astype(np.float32), name=f"v{i}")
        for i in range(2 * pairs)
    ]
    module.step = tf.Variable(0, dtype=tf.int64)
    prefix = tf.train.Checkpoint(model=module).write(os.path.join(root, "ckpt"))

    def read_ours():
        return TFCheckpointReader(prefix).read_all()

    def read_tf():
        r = tf.train.load_checkpoint(prefix)
        return {k: r.get_tensor(k) for k in r.get_variable_to_shape_map()}

    ours, theirs = read_ours(), read_tf()
    assert ours.keys() == theirs.keys(), "the readers list different tensors"
    for k, v in theirs.items():
        if isinstance(v, np.ndarray) and v.dtype != object:
            assert np.array_equal(ours[k], v), k
    n = len(ours)
    del ours, theirs
    runs = max(args.runs, 5) * 3
    times: dict[str, list[float]] = {"read ours": [], "read tf": []}
    cases = [("read ours", read_ours), ("read tf", read_tf)]
    for run in range(runs):
        for label, fn in (cases if run % 2 == 0 else cases[::-1]):
            t = time.perf_counter()
            got = fn()
            times[label].append(time.perf_counter() - t)
            del got
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = statistics.median(t / o for t, o in zip(times["read tf"], times["read ours"]))
    print(f"many variables: {n} tensors ({os.path.getsize(prefix + '.data-00000-of-00001') / (1 << 20):.1f} MiB), {runs} alternating runs")
    for k, v in times.items():
        print(f"{k:11s} median {med[k] * 1e3:7.1f} ms  (min {min(v) * 1e3:.1f}, max {max(v) * 1e3:.1f})")
    verdict = "PASS" if med["read tf"] / med["read ours"] >= 1.0 else "FAIL"
    print(f"read everything: tf/ours = {med['read tf'] / med['read ours']:.2f}x (paired per-run median {paired:.2f}x) "
          f"without TF import; target >= 1.0x {verdict}\n")
    shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--dir", default="/tmp/bench_tf_bundle")
    ap.add_argument("--variables", type=int, default=6002)
    ap.add_argument("--skip-large", action="store_true")
    ap.add_argument("--skip-many", action="store_true")
    args = ap.parse_args()
    if not args.skip_many:
        many_variables(args)
    if args.skip_large:
        return 0

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
