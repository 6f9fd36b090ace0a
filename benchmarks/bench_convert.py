"""Benchmark `ckptfmt convert tf2torch` against the usual TensorFlow + torch route.

    python benchmarks/bench_convert.py [--gib 1.0] [--runs 5] [--quick] [--dir DIR]

A Keras-like TF checkpoint (about ``--gib`` GiB of float32: an Embedding, then blocks of
Conv2D, LayerNormalization and two big Dense layers, keys like
``model/block03_mlp_in/kernel/.ATTRIBUTES/VARIABLE_VALUE``) is written *without TensorFlow*
by our TensorBundle writer, with an object graph from ``build_object_graph``. It is then
converted to one ``.safetensors`` file, each run in a fresh process, alternating:

* ours: ``ckptfmt convert tf2torch SRC out.safetensors --no-optimizer --overwrite`` (the
  installed console script; the preset mapping transposes Dense and Conv2D kernels);
* usual: ``tf.train.load_checkpoint`` -> ``reader.get_tensor`` for each variable -> the same
  transposes in numpy -> ``torch.from_numpy`` -> ``safetensors.torch.save_file``;
* usual + fsync: the same, then an fsync of the file (ours fsyncs before its rename).

Wall time includes interpreter start and imports (measured around the child by the
parent). Peak RSS is the child's ``ru_maxrss`` as GNU time (``/usr/bin/time -f %M``)
reports it: time forks the child from its own small process, so the maximum is the
child's own (see ``_common.run_child`` for why the parent's ``RUSAGE_CHILDREN`` would
not be). The parent holds touched ballast memory and releases it just before each child
(``_common.Ballast``), so every child faults its memory in from hot pages. The source
checkpoint is in the page cache for every run (it cannot be dropped without root).
Both outputs are checked once to hold the same tensors, bit for bit.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

A = "/.ATTRIBUTES/VARIABLE_VALUE"
EMBED = (32000, 1024)
WIDTH, HIDDEN, CONV = 1024, 4096, 256

USUAL = r"""
import os, sys
import numpy as np
import tensorflow as tf
import torch
from safetensors.torch import save_file

src, dst, sync = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
names = {"kernel": "weight", "bias": "bias", "gamma": "weight", "beta": "bias", "embeddings": "weight"}
reader = tf.train.load_checkpoint(src)
out = {}
for key in sorted(reader.get_variable_to_shape_map()):
    parts = key.split("/")
    if parts[0] != "model" or "/.ATTRIBUTES/" not in key:
        continue
    layer, var = parts[1], parts[2]
    a = reader.get_tensor(key)
    if var == "kernel":
        a = a.T if a.ndim == 2 else a.transpose(3, 2, 0, 1)  # Dense (in, out) -> (out, in); HWIO -> OIHW
    out[f"{layer}.{names[var]}"] = torch.from_numpy(np.ascontiguousarray(a))
save_file(out, dst, metadata={"format": "pt"})
if sync:
    fd = os.open(dst, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
"""


def layers(total_bytes: int) -> dict[str, tuple[int, ...]]:
    """Variable key -> shape; names sort so that a LayerNormalization sits between each
    Conv2D and the Dense after it (else the preset would insert a Flatten permutation)."""
    shapes: dict[str, tuple[int, ...]] = {f"model/embedding/embeddings{A}": EMBED}
    block = (9 * CONV * CONV + CONV + 2 * WIDTH + 2 * WIDTH * HIDDEN + HIDDEN + WIDTH) * 4
    n = max(1, round((total_bytes - np.prod(EMBED) * 4) / block))
    for i in range(n):
        b = f"model/block{i:02d}"
        shapes[f"{b}_conv/kernel{A}"] = (3, 3, CONV, CONV)
        shapes[f"{b}_conv/bias{A}"] = (CONV,)
        shapes[f"{b}_ln/gamma{A}"] = (WIDTH,)
        shapes[f"{b}_ln/beta{A}"] = (WIDTH,)
        shapes[f"{b}_mlp_in/kernel{A}"] = (WIDTH, HIDDEN)
        shapes[f"{b}_mlp_in/bias{A}"] = (HIDDEN,)
        shapes[f"{b}_mlp_out/kernel{A}"] = (HIDDEN, WIDTH)
        shapes[f"{b}_mlp_out/bias{A}"] = (WIDTH,)
    return shapes


def build(prefix: str, total_bytes: int) -> int:
    from ckptfmt.converters.tf import build_object_graph, write_checkpoint

    rng = np.random.default_rng(0)
    tensors = {k: rng.standard_normal(s, dtype=np.float32) for k, s in layers(total_bytes).items()}
    write_checkpoint(prefix, tensors, object_graph=build_object_graph(tensors))
    return sum(a.nbytes for a in tensors.values())


def ckptfmt_cmd() -> list[str]:
    script = Path(sys.executable).parent / "ckptfmt"
    return [str(script)] if script.exists() else [sys.executable, "-m", "ckptfmt.cli"]


def timed(cmd: list[str], ballast: C.Ballast) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one fresh child."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CI="1")  # CI: no progress bar
    with ballast.released():
        t = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M", *cmd], capture_output=True, text=True, env=env, check=False)
        dt = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    kib = int([ln for ln in proc.stderr.splitlines() if ln.startswith("MAXRSS ")][-1].split()[1])
    return dt, kib * 1024


def main() -> int:
    p = C.parser(__doc__)
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    if args.quick:
        args.gib, args.runs = min(args.gib, 0.25), min(args.runs, 2)
    if not os.path.exists("/usr/bin/time"):
        raise SystemExit("needs GNU time at /usr/bin/time (apt-get install time) for per-child peak RSS")
    from importlib.metadata import PackageNotFoundError, version

    try:  # versions without importing TensorFlow into this (ballast-holding) process
        versions = {"tensorflow": version("tensorflow-cpu") if _has("tensorflow-cpu") else version("tensorflow"),
                    "torch": version("torch"), "safetensors": version("safetensors")}
    except PackageNotFoundError as e:
        raise SystemExit(f"needs tensorflow, torch and safetensors installed: {e}") from None
    C.header("tf2torch: ckptfmt convert vs tf.train.load_checkpoint + safetensors.torch.save_file", **versions)
    total = int(args.gib * C.GiB)
    with C.scratch_dir(4 * total, args.dir) as d:
        src = str(d / "tf" / "ckpt-1")
        t = time.perf_counter()
        nbytes = build(src, total)
        print(f"   source: {len(layers(total))} variables, {C.fmt_bytes(nbytes)} (written without TF in {time.perf_counter() - t:.1f} s)")
        ours_out, usual_out = str(d / "ours.safetensors"), str(d / "usual.safetensors")
        cases = {
            "ours": ckptfmt_cmd() + ["convert", "tf2torch", src, ours_out, "--no-optimizer", "--overwrite"],
            "usual": [sys.executable, "-c", USUAL, src, usual_out, "0"],
            "usual+fsync": [sys.executable, "-c", USUAL, src, usual_out, "1"],
        }
        # The plan must be the one the usual route reproduces: transposes only, no Flatten.
        from ckptfmt.converters.convert import tf_to_torch

        plan = tf_to_torch(src, ours_out, optimizer=False, dry_run=True).plan
        assert all(op.describe().startswith("Transpose") for e in plan.entries for op in e.ops), plan.table()
        ballast = C.Ballast(3 * C.GiB)
        ballast.hold()
        times: dict[str, list[float]] = {k: [] for k in cases}
        rss: dict[str, list[int]] = {k: [] for k in cases}
        names = list(cases)
        for r in range(args.runs + 1):  # round 0: warm-up (imports into the page cache), not recorded
            order = names[r % len(names):] + names[: r % len(names)]
            if r % 2:
                order.reverse()
            for name in order:
                for out in (ours_out, usual_out):
                    C.remove(out)
                dt, peak = timed(cases[name], ballast)
                if r:
                    times[name].append(dt)
                    rss[name].append(peak)
            print(f"   {'warm-up' if not r else f'round {r}/{args.runs}'}: " +
                  ", ".join(f"{n} {times[n][-1]:.2f} s" for n in names if r and times[n]), flush=True)
            if r == 0:
                _check_same(cases, ours_out, usual_out, ballast)
        ballast.release()
        rows = []
        for n in names:
            ratio = [a / b for a, b in zip(times[n], times["ours"])]
            rows.append([n, C.fmt_s(C.median(times[n])), C.spread(times[n]), f"{C.median(ratio):.2f}x",
                         C.fmt_bytes(C.median(rss[n])), f"{C.median(rss[n]) / C.median(rss['ours']):.2f}x",
                         f"{nbytes / C.median(times[n]) / C.GiB:.2f} GiB/s"])
        C.table(["route", "wall (median)", "spread s", "time / ours", "peak RSS", "RSS / ours", "throughput"], rows,
                title=f"{C.fmt_bytes(nbytes)} TF checkpoint -> .safetensors, {args.runs} alternating runs, fresh process each")
        for n in ("usual", "usual+fsync"):
            t_ratio = C.median(C.paired_ratios(times, n, "ours"))
            m_ratio = C.median(rss["ours"]) / C.median(rss[n])
            print(f"   vs {n}: ours {t_ratio:.2f}x faster (target >= 2x: {'met' if t_ratio >= 2 else 'MISSED'}), "
                  f"peak RSS {m_ratio:.2f}x (target <= 0.6x: {'met' if m_ratio <= 0.6 else 'MISSED'})")
    return 0


def _has(dist: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(dist)
    except PackageNotFoundError:
        return False
    return True


def _check_same(cases: dict[str, list[str]], ours_out: str, usual_out: str, ballast: C.Ballast) -> None:
    """Both routes give the same tensors, bit for bit (checked once)."""
    from safetensors.numpy import load_file

    for name in ("ours", "usual"):
        if not os.path.exists(ours_out if name == "ours" else usual_out):
            timed(cases[name], ballast)
    a, b = load_file(ours_out), load_file(usual_out)
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))[:10]
    bad = [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or a[k].tobytes() != b[k].tobytes()]
    assert not bad, bad[:10]
    print(f"   outputs identical: {len(a)} tensors, bit for bit", flush=True)
    del a, b


if __name__ == "__main__":
    raise SystemExit(main())
