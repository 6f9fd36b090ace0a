"""Throughput of ckptfmt save / load / verify for chunk sizes of 1, 2, 4, 8 and 16 MiB.

The state: ~512 MiB of float32 tensors (4 of 4096x4096 and 96 of mixed smaller sizes,
fixed seed). For each chunk size, in rounds with the order of chunk sizes rotated (and
reversed every other round) after one discarded warm-up round:

  save    ckptfmt.save(state, path, chunk_size=cs, sync=True)   hashing + fsync included
  load    ckptfmt.load(path, verify=True), one byte per page touched (page-cached reads)
  verify  ckptfmt.verify(path)                                    re-hashes every chunk

Throughput is state bytes / median time. "total" is the sum of the three medians. The
default chunk size (``ckptfmt.format.spec.DEFAULT_CHUNK_SIZE``, 4 MiB) should be the best
or within noise of it; "within noise" here means the per-round paired ratio
total(4 MiB) / total(best) has a range that includes 1.0, or its median is <= 1.03.

Usage: python benchmarks/bench_chunk_size.py [--quick] [--rounds N] [--size-mib M]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    Ballast,
    Case,
    GiB,
    MiB,
    header,
    median,
    mixed_state,
    parser,
    remove,
    run_rounds,
    scratch_dir,
    state_bytes,
    table,
    touch,
)

import ckptfmt  # noqa: E402
from ckptfmt.format.spec import DEFAULT_CHUNK_SIZE  # noqa: E402


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5, --quick 3)")
    p.add_argument("--size-mib", type=int, default=512)
    args = p.parse_args()
    rounds = args.rounds or (3 if args.quick else 5)
    sizes = [1, 2, 4, 8, 16]
    header("bench_chunk_size", rounds=rounds, warmup=1, default_chunk=f"{DEFAULT_CHUNK_SIZE // MiB} MiB",
           mode="quick" if args.quick else "full")
    size = args.size_mib * MiB
    state = mixed_state(size, n_big=max(1, round(8 * size / GiB)), n_tensors=100)
    nbytes = state_bytes(state)
    print(f"   state: {len(state)} float32 tensors, {nbytes / MiB:.1f} MiB")
    ballast = Ballast(int(2.5 * nbytes))
    with scratch_dir(3 * nbytes, args.dir) as d:
        ballast.hold()
        groups = []
        for cs in sizes:
            path = d / f"ck-{cs}"

            def save(path=path, cs=cs):
                ckptfmt.save(state, path, chunk_size=cs * MiB, sync=True)

            def load(path=path):
                r = ckptfmt.load(path, verify=True)
                touch(r)
                return r

            def verify(path=path):
                rep = ckptfmt.verify(path, progress=False)
                assert rep.ok, rep
                return rep

            groups.append([
                Case(f"{cs}:save", save, prepare=lambda path=path: remove(path)),
                Case(f"{cs}:load", load),
                Case(f"{cs}:verify", verify),
            ])
        times = run_rounds(groups, rounds, warmup=1, ballast=ballast)
        ballast.release()

    def tot(cs: int, r: int | None = None) -> float:
        if r is None:
            return sum(median(times[f"{cs}:{op}"]) for op in ("save", "load", "verify"))
        return sum(times[f"{cs}:{op}"][r] for op in ("save", "load", "verify"))

    best = min(sizes, key=tot)
    rows = []
    for cs in sizes:
        row = [f"{cs} MiB" + (" (default)" if cs * MiB == DEFAULT_CHUNK_SIZE else "")]
        for op in ("save", "load", "verify"):
            m = median(times[f"{cs}:{op}"])
            row.append(f"{m:.3f} s  {nbytes / m / GiB:5.2f} GiB/s")
        paired = [tot(cs, r) / tot(best, r) for r in range(rounds)]
        row += [f"{tot(cs):.3f} s", f"{tot(cs) / tot(best):.3f}x", f"{median(paired):.3f}x ({min(paired):.2f}..{max(paired):.2f})"]
        rows.append(row)
    print()
    table(["chunk", "save (sync)", "load (verify)", "verify", "total", "vs best", "paired vs best (range)"], rows,
          title=f"CHUNK SIZE, {nbytes / MiB:.0f} MiB state, medians of {rounds} rounds (page-cached reads)")
    d_mib = DEFAULT_CHUNK_SIZE // MiB
    paired = [tot(d_mib, r) / tot(best, r) for r in range(rounds)]
    within = best == d_mib or min(paired) <= 1.0 or median(paired) <= 1.03
    print()
    print(f"best total: {best} MiB; default {d_mib} MiB is {tot(d_mib) / tot(best):.3f}x the best "
          f"(paired median {median(paired):.3f}x, range {min(paired):.3f}..{max(paired):.3f}): "
          f"{'within noise of the best' if within else 'NOT within noise of the best'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
