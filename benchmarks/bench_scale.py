"""Scale: save, verify, lazy open+read and load of 1, 4 and 8 GiB states; time and peak memory.

Each operation runs in a fresh child process (so each peak is its own) on a state of
``--sizes`` GiB (default 1 4 8): float32 tensors, one 256 MiB tensor per 256 MiB of state
plus 200 mixed small ones (``_common.mixed_state``), pre-faulted before timing. The child
samples RssAnon every 2 ms (VmHWM would also count the page cache of mapped files) and
reports, relative to its RSS before the operation:

* save (hash + fsync): peak anonymous memory / state size   target <= 1.05x (the state is 1.0x)
* verify:              peak anonymous memory                target: constant in the size
* open + get each tensor, dropped after use: peak memory    target: constant (one tensor)
* load (hash-checked): time

Time should grow linearly: the table shows seconds per GiB and the ratio to the smallest
size. The state needs ``size`` GiB of RAM in the child and about 2x that in page cache;
run it by hand on a quiet machine (``--sizes 0.25 0.5 1`` is a smoke run).

Run: python benchmarks/bench_scale.py [--sizes 1 4 8] [--reps 2]
"""

from __future__ import annotations

import os
import sys
import textwrap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import GiB, MiB, fmt_bytes, header, median, parser, remove, run_child, scratch_dir, table  # noqa: E402

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))

_PRELUDE = textwrap.dedent(
    """
    import json, os, sys, threading, time
    sys.path.insert(0, {bench_dir!r})
    import numpy as np
    import ckptfmt
    from _common import rss_now, mixed_state, state_bytes, touch
    peak = [0]
    stop = [False]
    def sample():
        while not stop[0]:
            peak[0] = max(peak[0], rss_now().get("RssAnon", 0))
            time.sleep(0.002)
    def measure(fn):
        base = rss_now().get("RssAnon", 0)
        peak[0] = base
        th = threading.Thread(target=sample, daemon=True)
        th.start()
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        stop[0] = True
        th.join()
        return dt, max(peak[0], rss_now().get("RssAnon", 0)) - base
    path = {path!r}
    """
)

_OPS = {
    "save": """
        state = mixed_state({size}, n_big=max(1, {size} // (256 << 20)))
        for a in state.values():
            a[...] = a  # pre-fault
        dt, extra = measure(lambda: ckptfmt.save(state, path))
        print(json.dumps({{"t": dt, "extra": extra, "state": state_bytes(state)}}))
    """,
    "verify": """
        def run():
            assert ckptfmt.verify(path).ok
        dt, extra = measure(run)
        print(json.dumps({{"t": dt, "extra": extra}}))
    """,
    "open+get": """
        def run():
            with ckptfmt.open(path) as r:
                for k in r.keys():
                    touch(r.get(k))
        dt, extra = measure(run)
        print(json.dumps({{"t": dt, "extra": extra}}))
    """,
    "load": """
        out = {{}}
        def run():
            out["s"] = ckptfmt.load(path)
            touch(out["s"])
        dt, extra = measure(run)
        print(json.dumps({{"t": dt, "extra": extra}}))
    """,
}


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--sizes", type=float, nargs="+", default=[1, 4, 8], help="state sizes in GiB")
    p.add_argument("--reps", type=int, default=2)
    args = p.parse_args()
    sizes = [int(s * GiB) for s in (args.sizes if not args.quick else [0.125, 0.25, 0.5])]
    header("scale: 1/4/8 GiB", sizes=", ".join(fmt_bytes(s) for s in sizes), reps=args.reps)
    results: dict[tuple[int, str], list[dict]] = {}
    with scratch_dir(3 * max(sizes), args.dir) as root:
        for size in sizes:
            path = str(root / f"ck-{size >> 20}")
            for rep in range(args.reps):
                for op in _OPS:
                    if op == "save":
                        remove(path)
                    code = _PRELUDE.format(bench_dir=BENCH_DIR, path=path) + textwrap.dedent(_OPS[op]).format(size=size)
                    results.setdefault((size, op), []).append(run_child(code))
                print(f"   {fmt_bytes(size)}: round {rep + 1}/{args.reps} done", flush=True)
            remove(path)
    rows = []
    first = sizes[0]
    verdicts = []
    for op in _OPS:
        base_rate = median([r["t"] for r in results[(first, op)]]) / first
        for size in sizes:
            rs = results[(size, op)]
            t = median([r["t"] for r in rs])
            extra = median([r["extra"] for r in rs])
            mem = f"{extra / size:.3f}x state" if op in ("save", "load") else fmt_bytes(extra)
            rows.append([op, fmt_bytes(size), f"{t:.3f} s", f"{t / (size / GiB):.3f} s/GiB",
                         f"{(t / size) / base_rate:.2f}", mem])
            if op == "save":
                ratio = 1 + extra / size  # the state (1.0x) plus what the save added
                verdicts.append(f"save {fmt_bytes(size)}: peak = {ratio:.3f}x the state (target <= 1.05) {'PASS' if ratio <= 1.05 else 'FAIL'}")
    table(["op", "state", "median", "per GiB", "per GiB / smallest", "peak anon memory added"], rows,
          title=f"\nmedians of {args.reps} runs, each a fresh process")
    for op in ("verify", "open+get"):
        peaks = [median([r["extra"] for r in results[(s, op)]]) for s in sizes]
        flat = max(peaks) <= max(64 * MiB, 1.5 * min(peaks) + 16 * MiB)
        verdicts.append(f"{op}: peak added {', '.join(fmt_bytes(p) for p in peaks)} (target: flat) {'PASS' if flat else 'FAIL'}")
    print("\nsummary")
    for v in verdicts:
        print("  " + v)
    return 0


if __name__ == "__main__":
    sys.exit(main())
