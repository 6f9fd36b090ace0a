"""`ckptfmt verify` throughput on a page-cached ~1 GiB checkpoint, next to sha256sum.

Target: at least 1.5 GB/s on this 2-core machine. The peers hash the same bytes (the
checkpoint's data file): `sha256sum` (coreutils, one core) and Python's hashlib.sha256.
Medians of alternating rounds; every read is served from the page cache.

A second table times the command a CI gate runs: `ckptfmt verify` of a 512 MiB checkpoint
as a fresh process, start-up and imports included, next to `sha256sum` of the same data
file (also a fresh process). Target: >= 1.5 GB/s including start-up. The CLI runs with its
bytecode cached, as after a pip install (the cache is kept in the scratch directory).

Run: python benchmarks/bench_verify.py [--quick]
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Case, GiB, MiB, fmt_bytes, fmt_s, header, median, mixed_state, parser, run_rounds, scratch_dir, spread, table  # noqa: E402

import ckptfmt  # noqa: E402


def main() -> None:
    args = parser(__doc__).parse_args()
    size = 256 * MiB if args.quick else GiB
    rounds = 3 if args.quick else 7
    header("verify throughput", state=fmt_bytes(size))
    with scratch_dir(size * 2, args.dir) as root:
        path = str(root / "ck")
        state = mixed_state(size, n_big=max(1, size // (256 * MiB)))
        ckptfmt.save(state, path)
        del state
        data = [os.path.join(path, f.path) for f in ckptfmt.open(path).manifest.files]
        nbytes = sum(os.path.getsize(p) for p in data)

        def verify():
            rep = ckptfmt.verify(path)
            assert rep.ok
            return rep

        def sha256sum():
            subprocess.run(["sha256sum", *data], check=True, stdout=subprocess.DEVNULL)

        def hashlib_sha256():
            for p in data:
                with open(p, "rb") as f:
                    hashlib.file_digest(f, "sha256")

        cases = [[Case("ckptfmt verify", verify)], [Case("hashlib.sha256", hashlib_sha256)]]
        if shutil.which("sha256sum"):
            cases.append([Case("sha256sum", sha256sum)])
        verify()  # warm the page cache
        times = run_rounds(cases, rounds)
        base = median(times["ckptfmt verify"])
        rows = [[k, fmt_s(median(v)), spread(v), f"{nbytes / median(v) / 1e9:.2f} GB/s", f"{median(v) / base:.2f}"] for k, v in times.items()]
        table(["tool", "median", "spread (s)", "throughput", "time / ckptfmt"], rows, title=f"\nhashing {fmt_bytes(nbytes)} (page-cached)")
        gbs = nbytes / base / 1e9

        # The CLI, a fresh process each time, on a 512 MiB checkpoint.
        small = str(root / "ck512")
        cli_size = (128 if args.quick else 512) * MiB
        state = mixed_state(cli_size, n_big=2)
        ckptfmt.save(state, small)
        del state
        small_data = [os.path.join(small, f.path) for f in ckptfmt.open(small).manifest.files]
        small_bytes = sum(os.path.getsize(p) for p in small_data)
        exe = os.path.join(os.path.dirname(sys.executable), "ckptfmt")
        # As installed: with its bytecode cached (pip compiles a wheel's modules). Without
        # that (PYTHONDONTWRITEBYTECODE, as in some sandboxes) every run compiles ckptfmt's
        # ~40 modules from source, ~0.07 s. The cache goes to the scratch directory.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env.update(CI="1", PYTHONPYCACHEPREFIX=str(root / "pycache"))
        cli_cases = [[Case("ckptfmt verify (CLI)", lambda: subprocess.run([exe, "verify", small], check=True, stdout=subprocess.DEVNULL, env=env))]]
        if shutil.which("sha256sum"):
            cli_cases.append([Case("sha256sum (CLI)", lambda: subprocess.run(["sha256sum", *small_data], check=True, stdout=subprocess.DEVNULL))])
        subprocess.run([exe, "verify", small], check=True, stdout=subprocess.DEVNULL, env=env)  # warm the page cache
        cli_times = run_rounds(cli_cases, rounds)
        cbase = median(cli_times["ckptfmt verify (CLI)"])
        rows = [[k, fmt_s(median(v)), spread(v), f"{small_bytes / median(v) / 1e9:.2f} GB/s", f"{median(v) / cbase:.2f}"] for k, v in cli_times.items()]
        table(["command", "median", "spread (s)", "throughput", "time / ckptfmt"], rows,
              title=f"\nfresh process, start-up included, {fmt_bytes(small_bytes)} (page-cached)")
        cgbs = small_bytes / cbase / 1e9
        print(f"\nsummary\n  ckptfmt verify: {gbs:.2f} GB/s (target >= 1.5) {'PASS' if gbs >= 1.5 else 'FAIL'}")
        print(f"  ckptfmt verify CLI incl. start-up, {fmt_bytes(small_bytes)}: {cgbs:.2f} GB/s (target >= 1.5) {'PASS' if cgbs >= 1.5 else 'FAIL'}")


if __name__ == "__main__":
    main()
