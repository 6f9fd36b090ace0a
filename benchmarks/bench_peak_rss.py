"""Peak memory of saving: ckptfmt vs safetensors save_file vs torch.save.

Each case runs in a fresh subprocess which imports its library, records its RSS (the
"baseline": interpreter + imports), builds a ~1 GiB state (200 float32 tensors, the same
mix as bench_save_load), saves it, and exits. Its peak RSS is its own ``VmHWM`` from
/proc/self/status (not ``ru_maxrss``, which on Linux also holds the parent's pre-exec
high-water mark); the child also samples RssAnon and RssFile every 2 ms. We report

    ratio = (peak RSS - baseline) / state size

i.e. the state itself counts 1.0x and everything above it is the saver's overhead.
Target: ckptfmt <= 1.2x. (safetensors was expected near 2x, as older versions serialised
the whole file in memory; safetensors >= 0.5's serialize_file streams from the arrays.)

Second part: a 2 GiB float32 ``np.memmap`` (mode "r", file in the page cache) saved with
ckptfmt in a subprocess. Its total RSS may grow up to the array size because mapped file
pages that have been read count as RSS (they are clean, reclaimable page cache), so we
report RssAnon separately: that is the memory the save really needs and it should stay
near the chunk buffers (a few MiB), far below 2 GiB. safetensors save_file of the same
memmap is shown for comparison.

Every case runs ``--reps`` times (alternating tools); medians are reported.

Usage: python benchmarks/bench_peak_rss.py [--quick] [--reps N]
"""

from __future__ import annotations

import os
import sys
import textwrap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from _common import Ballast, MiB, fmt_bytes, header, median, parser, remove, run_child, scratch_dir, table  # noqa: E402

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))

# The sampler runs in the child: VmHWM covers total RSS, but there is no high-water mark
# for anonymous memory alone, so we poll it.
_PRELUDE = textwrap.dedent(
    """
    import json, os, sys, threading, time, resource
    sys.path.insert(0, {bench_dir!r})
    import numpy as np
    from _common import rss_now, mixed_state, state_bytes
    peak = {{"RssAnon": 0, "RssFile": 0, "VmRSS": 0}}
    stop = False
    def sample():
        while not stop:
            r = rss_now()
            for k in peak:
                peak[k] = max(peak[k], r.get(k, 0))
            time.sleep(0.002)
    """
)

_SAVE = {
    "ckptfmt": ("import ckptfmt", "ckptfmt.save(state, OUT, sync=True)"),
    "safetensors": ("import safetensors.numpy as stn", "stn.save_file(state, OUT); fd = os.open(OUT, os.O_RDONLY); os.fsync(fd); os.close(fd)"),
    "torch": ("import torch", "state = {k: torch.from_numpy(v) for k, v in state.items()}\ntorch.save(state, OUT); fd = os.open(OUT, os.O_RDONLY); os.fsync(fd); os.close(fd)"),
}


def state_code(tool: str, out: str, size: int) -> str:
    imp, save = _SAVE[tool]
    return _PRELUDE.format(bench_dir=BENCH_DIR) + textwrap.dedent(
        f"""
        {imp}
        OUT = {out!r}
        base = rss_now()
        state = mixed_state({size}, n_big=max(1, round(8 * {size} / (1 << 30))), n_tensors=200)
        nbytes = state_bytes(state)
        built = rss_now()
        th = threading.Thread(target=sample, daemon=True); th.start()
        t = time.perf_counter()
        """
    ) + save + textwrap.dedent(
        """
        dt = time.perf_counter() - t
        stop = True; th.join()
        print(json.dumps({"base": base, "built": built, "nbytes": nbytes, "peak": peak, "end": rss_now(), "seconds": dt}))
        """
    )


def memmap_code(tool: str, src: str, out: str, shape: tuple[int, int]) -> str:
    imp, save = _SAVE[tool]
    return _PRELUDE.format(bench_dir=BENCH_DIR) + textwrap.dedent(
        f"""
        {imp}
        OUT = {out!r}
        base = rss_now()
        state = {{"embedding": np.memmap({src!r}, dtype=np.float32, mode="r", shape={shape!r})}}
        nbytes = state["embedding"].nbytes
        built = rss_now()
        th = threading.Thread(target=sample, daemon=True); th.start()
        t = time.perf_counter()
        """
    ) + save + textwrap.dedent(
        """
        dt = time.perf_counter() - t
        stop = True; th.join()
        print(json.dumps({"base": base, "built": built, "nbytes": nbytes, "peak": peak, "end": rss_now(), "seconds": dt}))
        """
    )


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--reps", type=int, default=None, help="runs per case (default 3, --quick 1)")
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--memmap-mib", type=int, default=2048)
    args = p.parse_args()
    reps = args.reps or (1 if args.quick else 3)
    size = args.size_mib * MiB
    header("bench_peak_rss", reps=reps, mode="quick" if args.quick else "full")
    # Pre-fault in the parent right before each child starts, so the child's first touches
    # hit host-backed pages (this changes time, not RSS, but keeps the run short).
    ballast = Ballast(3 * max(size, 1 << 30))
    tools = ["ckptfmt", "safetensors", "torch"]
    res: dict[str, list[dict]] = {t: [] for t in tools}
    mm: dict[str, list[dict]] = {"ckptfmt": [], "safetensors": []}
    with scratch_dir(4 * size + 3 * args.memmap_mib * MiB, args.dir) as d:
        ballast.hold()
        for r in range(reps):
            for tool in tools[r % 3:] + tools[: r % 3]:
                out = str(d / f"out-{tool}")
                remove(out)
                ballast.release()
                info = run_child(state_code(tool, out, size))
                ballast.hold()
                info["maxrss"] = info["end"]["VmHWM"]
                res[tool].append(info)
                remove(out)
                print(f"   {tool}: peak {fmt_bytes(info['maxrss'])}", flush=True)

        # the memmap source file, written once in 64 MiB blocks and fsync'ed
        rows = args.memmap_mib * MiB // (4 * 4096)
        src = d / "embedding.f32"
        rng = np.random.default_rng(1)
        with open(src, "wb") as f:
            for r0 in range(0, rows, 4096):
                f.write(rng.random((min(4096, rows - r0), 4096), dtype=np.float32).tobytes())
            f.flush()
            os.fsync(f.fileno())
        for r in range(reps):
            for tool in (["ckptfmt", "safetensors"] if r % 2 == 0 else ["safetensors", "ckptfmt"]):
                out = str(d / f"mm-{tool}")
                remove(out)
                ballast.release()
                info = run_child(memmap_code(tool, str(src), out, (rows, 4096)))
                ballast.hold()
                info["maxrss"] = info["end"]["VmHWM"]
                mm[tool].append(info)
                remove(out)
                print(f"   memmap {tool}: peak {fmt_bytes(info['maxrss'])}, anon {fmt_bytes(info['peak']['RssAnon'])}", flush=True)
        ballast.release()

    def med(xs):
        return median(xs)

    print()
    rows_out = []
    base_ratio = None
    for tool in tools:
        runs = res[tool]
        nb = runs[0]["nbytes"]
        peak = med([x["maxrss"] for x in runs])
        base = med([x["base"]["VmRSS"] for x in runs])
        anon_over = med([x["peak"]["RssAnon"] - x["built"]["RssAnon"] for x in runs])
        ratio = med([(x["maxrss"] - x["base"]["VmRSS"]) / x["nbytes"] for x in runs])
        if tool == "ckptfmt":
            base_ratio = ratio
        rows_out.append([tool, fmt_bytes(nb), fmt_bytes(base), fmt_bytes(peak), fmt_bytes(peak - base - nb),
                         fmt_bytes(anon_over), f"{ratio:.3f}x", f"{ratio / base_ratio:.2f}x",
                         f"{med([x['seconds'] for x in runs]):.2f} s"])
    table(["saver", "state", "baseline RSS", "peak RSS", "overhead", "anon overhead (sampled)",
           "(peak-baseline)/state", "ratio vs ckptfmt", "save time"], rows_out,
          title=f"PEAK RSS of a fresh process that builds a {fmt_bytes(size)} state and saves it (median of {reps})")
    print()
    rows_mm = []
    for tool, runs in mm.items():
        nb = runs[0]["nbytes"]
        rows_mm.append([f"{tool} (np.memmap source)", fmt_bytes(nb), fmt_bytes(med([x['base']['VmRSS'] for x in runs])),
                        fmt_bytes(med([x["maxrss"] for x in runs])),
                        fmt_bytes(med([x["peak"]["RssAnon"] for x in runs])),
                        fmt_bytes(med([x["peak"]["RssAnon"] - x["built"]["RssAnon"] for x in runs])),
                        fmt_bytes(med([x["peak"]["RssFile"] for x in runs])),
                        f"{med([x['seconds'] for x in runs]):.2f} s"])
    table(["saver", "array", "baseline RSS", "peak RSS", "peak RssAnon", "RssAnon growth", "peak RssFile", "save time"],
          rows_mm, title=f"SAVING a {fmt_bytes(args.memmap_mib * MiB)} np.memmap-backed array (median of {reps})")
    ck_anon = med([x["peak"]["RssAnon"] - x["built"]["RssAnon"] for x in mm["ckptfmt"]])
    print()
    table(["target", "measured", "result"],
          [["ckptfmt (peak-baseline)/state <= 1.2x", f"{base_ratio:.3f}x", "PASS" if base_ratio <= 1.2 else "FAIL"],
           ["ckptfmt memmap save: anon RSS growth far below array (< 10%)", fmt_bytes(ck_anon),
            "PASS" if ck_anon < 0.1 * args.memmap_mib * MiB else "FAIL"]],
          title="TARGETS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
