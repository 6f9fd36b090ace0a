"""Many small tensors: save, load and open+get of 100,000 tiny tensors, ckptfmt vs safetensors.

The state: ``--n`` (100,000) float32 tensors of 16 elements, ``layers.{i}.weight`` in one
flat dict (6.1 MiB of data), the shape of a model with very many parameters where
per-tensor overhead, not bytes, is the cost. Cases, alternating each round (the order
rotates), medians and per-round ratios, memory pre-faulted alike for both (Ballast):

* save: ``ckptfmt.save`` (hashes every tensor, fsyncs data and manifest) vs
  ``safetensors.numpy.save_file`` followed by an fsync of the file.
* load: ``ckptfmt.load`` (every tensor's hash checked) vs ``safetensors.numpy.load_file``.
* open+get: ``ckptfmt.open`` and ``get`` of every tensor by name (hash-checked) vs
  ``safe_open(..., framework="numpy")`` and ``get_tensor`` of every key.

Targets: each >= 1.0x safetensors (ratio = safetensors time / ckptfmt time).

Run: python benchmarks/bench_many_small.py [--quick] [--n N]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np  # noqa: E402
from _common import Ballast, Case, fmt_s, header, median, paired_ratios, parser, remove, run_rounds, scratch_dir, spread, table  # noqa: E402

import ckptfmt  # noqa: E402


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--n", type=int, default=100_000)
    args = p.parse_args()
    rounds = 3 if args.quick else 7

    import safetensors
    import safetensors.numpy as stn
    from safetensors import safe_open

    header("many small tensors", safetensors=safetensors.__version__, tensors=args.n, rounds=rounds)
    rng = np.random.default_rng(0)
    state = {f"layers.{i}.weight": rng.random(16, dtype=np.float32) for i in range(args.n)}
    ballast = Ballast(256 << 20)
    ballast.hold()
    with scratch_dir(256 << 20, args.dir) as d:
        ck, st = str(d / "ck"), str(d / "many.safetensors")

        def ck_save():
            remove(ck)
            ckptfmt.save(state, ck)

        def st_save():
            remove(st)
            stn.save_file(state, st)
            fd = os.open(st, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        def ck_load():
            return ckptfmt.load(ck)

        def st_load():
            return stn.load_file(st)

        def ck_open_get():
            with ckptfmt.open(ck) as r:
                return {k: r.get(k) for k in r.keys()}

        def st_open_get():
            with safe_open(st, framework="numpy") as f:
                return {k: f.get_tensor(k) for k in f.keys()}

        ck_save()
        st_save()
        for fn in (ck_load, st_load, ck_open_get, st_open_get):
            out = fn()
            assert len(out) == args.n and np.array_equal(out["layers.7.weight"], state["layers.7.weight"])
        del out
        groups = [
            [Case("ckptfmt save", ck_save)], [Case("safetensors save+fsync", st_save)],
            [Case("ckptfmt load", ck_load)], [Case("safetensors load_file", st_load)],
            [Case("ckptfmt open+get", ck_open_get)], [Case("safetensors safe_open+get_tensor", st_open_get)],
        ]
        times = run_rounds(groups, rounds, ballast=ballast)

    pairs = [("save", "ckptfmt save", "safetensors save+fsync"), ("load", "ckptfmt load", "safetensors load_file"),
             ("open+get", "ckptfmt open+get", "safetensors safe_open+get_tensor")]
    rows = []
    for what, ours, peer in pairs:
        r = median(times[peer]) / median(times[ours])
        paired = median(paired_ratios(times, peer, ours))
        rows.append([what, fmt_s(median(times[ours])), spread(times[ours]), fmt_s(median(times[peer])), spread(times[peer]),
                     f"{r:.2f}x", f"{paired:.2f}x", "PASS" if r >= 1.0 else "FAIL"])
    table(["case", "ckptfmt", "spread (s)", "safetensors", "spread (s)", "st / ckptfmt", "paired", ">= 1.0x"], rows,
          title=f"\n{args.n:,} tensors x 16 float32, {rounds} alternating rounds (medians)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
