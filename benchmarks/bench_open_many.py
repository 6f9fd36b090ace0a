"""Opening a checkpoint with 100,000 small tensors: ckptfmt.open(path) + .keys().

The checkpoint: 100,000 float32 tensors of 16 elements each, named ``layers.{i}.weight``
(one flat dict). Measured in-process, with the manifest in the page cache:

  * open + keys: ``ckptfmt.open(path)`` (reads, hash-checks and decodes the manifest)
    followed by ``.keys()``; median over many runs.            Target: <= 50 ms.
  * for reference: open + keys + ``info`` of one tensor (builds the name index), and
    safetensors ``safe_open(..., framework="np").keys()`` of the same tensors.
  * the save time of that checkpoint (sync=True), median of a few saves, and the size of its
    manifest (and of the safetensors header for comparison).

Usage: python benchmarks/bench_open_many.py [--quick] [--n N] [--runs R]
"""

from __future__ import annotations

import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from _common import Ballast, fmt_bytes, header, median, parser, remove, scratch_dir, table  # noqa: E402

import ckptfmt  # noqa: E402
from ckptfmt.format.spec import MANIFEST_NAME  # noqa: E402


def timeit(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        gc.collect()
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--n", type=int, default=100_000, help="number of tensors (default 100000)")
    p.add_argument("--runs", type=int, default=None, help="open runs per round (default 20, --quick 10)")
    args = p.parse_args()
    runs = args.runs or (10 if args.quick else 20)
    rounds = 3 if args.quick else 5
    save_runs = 2 if args.quick else 3

    import safetensors
    import safetensors.numpy as stn
    from safetensors import safe_open

    header("bench_open_many", safetensors=safetensors.__version__, tensors=args.n,
           runs=f"{rounds} rounds x {runs}", mode="quick" if args.quick else "full")
    rng = np.random.default_rng(0)
    state = {f"layers.{i}.weight": rng.random(16, dtype=np.float32) for i in range(args.n)}
    ballast = Ballast(256 << 20)
    ballast.hold()
    with scratch_dir(64 << 20, args.dir) as d:
        ck, st = d / "ckpt", d / "many.safetensors"
        save_times, st_save_times = [], []
        for _ in range(save_runs):
            for which in ("ck", "st"):  # alternate
                remove(ck if which == "ck" else st)
                gc.collect()
                ballast.release()
                t = time.perf_counter()
                if which == "ck":
                    ckptfmt.save(state, ck, sync=True)
                    save_times.append(time.perf_counter() - t)
                else:
                    stn.save_file(state, st)
                    fd = os.open(st, os.O_RDONLY)
                    os.fsync(fd)
                    os.close(fd)
                    st_save_times.append(time.perf_counter() - t)
                ballast.hold()
        manifest_size = (ck / MANIFEST_NAME).stat().st_size
        data_size = sum(f.stat().st_size for f in ck.iterdir() if f.name != MANIFEST_NAME)
        with open(st, "rb") as f:
            st_header = int.from_bytes(f.read(8), "little")

        def ck_open_keys():
            with ckptfmt.open(ck) as r:
                k = r.keys()
            assert len(k) == args.n

        def ck_open_keys_info():
            with ckptfmt.open(ck) as r:
                r.keys()
                r.info(f"layers.{args.n - 1}.weight")

        def st_open_keys():
            with safe_open(st, framework="np") as f:
                k = list(f.keys())
            assert len(k) == args.n

        cases = [("ckptfmt open+keys", ck_open_keys), ("ckptfmt open+keys+info", ck_open_keys_info),
                 ("safetensors safe_open+keys", st_open_keys)]
        for _, fn in cases:
            fn()  # warm-up (page cache, lazy imports)
        times: dict[str, list[float]] = {n: [] for n, _ in cases}
        for r in range(rounds):
            order = cases[r % len(cases):] + cases[: r % len(cases)]
            for name, fn in order:
                times[name].extend(timeit(fn, runs))
        # where the open time goes (one profile-free breakdown, for the report)
        from ckptfmt.format.manifest import decode_manifest
        from ckptfmt.storage.local import LocalStorage

        raw = LocalStorage().read_file(str(ck / MANIFEST_NAME))
        t_read = median(timeit(lambda: LocalStorage().read_file(str(ck / MANIFEST_NAME)), runs))
        t_dec = median(timeit(lambda: decode_manifest(raw, where="m"), runs))
        t_dec_nohash = median(timeit(lambda: decode_manifest(raw, where="m", check_hash=False), runs))

    base = median(times["ckptfmt open+keys"])
    print()
    table(
        ["case", "median", "min..max", "ratio vs ckptfmt open+keys"],
        [[n, f"{median(ts) * 1e3:.2f} ms", f"{min(ts) * 1e3:.2f}..{max(ts) * 1e3:.2f} ms", f"{median(ts) / base:.2f}x"]
         for n, ts in times.items()],
        title=f"OPEN of a checkpoint with {args.n:,} tensors x 16 float32 ({rounds * runs} runs each, page-cached)",
    )
    print()
    table(
        ["part of ckptfmt.open", "median"],
        [["read MANIFEST file", f"{t_read * 1e3:.2f} ms"],
         ["decode_manifest (with manifest hash check)", f"{t_dec * 1e3:.2f} ms"],
         ["decode_manifest (without hash check)", f"{t_dec_nohash * 1e3:.2f} ms"]],
        title="BREAKDOWN",
    )
    print()
    table(
        ["what", "ckptfmt", "safetensors", "ratio (safetensors / ckptfmt)"],
        [["save time (sync/fsync), median", f"{median(save_times):.3f} s", f"{median(st_save_times):.3f} s",
          f"{median(st_save_times) / median(save_times):.2f}x"],
         ["metadata size", f"{fmt_bytes(manifest_size)} manifest", f"{fmt_bytes(st_header)} header",
          f"{st_header / manifest_size:.2f}x"],
         ["data size", fmt_bytes(data_size), "", ""]],
        title="SAVE of that checkpoint",
    )
    print()
    table(["target", "measured", "result"],
          [[f"open+keys of {args.n:,} tensors <= 50 ms", f"{base * 1e3:.2f} ms", "PASS" if base <= 0.050 else "FAIL"]],
          title="TARGETS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
