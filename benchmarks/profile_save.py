"""Where the time of ckptfmt.save goes (a diagnostic companion to bench_save_load.py).

Same ~1 GiB state as bench_save_load. Cases, alternated in rounds like the benchmarks:

  ckptfmt save sync=True          the real thing
  ckptfmt save sync=False         without fsync (the difference is fsync + writeback)
  ckptfmt save sync=True, early writeback
                                  the real ckptfmt.save through a benchmark-only storage
                                  whose write handle calls sync_file_range(WRITE) every
                                  64 MiB (prototype of the proposed fix)
  safetensors save_file+fsync, torch.save+fsync   the peers
  raw write+fsync                 os.write of every array (one file) + fsync: the I/O floor
  raw write+hash inline+fsync     same, blake3 of every 4 MiB chunk on the writing thread
  raw write+hash pooled+fsync     same, hashing on a 2-thread pool overlapped with writing
  raw write+hash pooled+bg fdatasync / +sync_file_range (+ the same without hashing):
                                  prototypes that start writeback every 64 MiB while still
                                  writing, so the final fsync has little left to flush
  hash only (1 thread)            blake3 of every 4 MiB chunk, no I/O
  ckptfmt _chunks() only          the writer's chunking of every tensor (staging copies,
                                  if the writer makes any)

and finally a cProfile of one ckptfmt.save(sync=True), top functions by total time.

Usage: python benchmarks/profile_save.py [--quick] [--rounds N] [--size-mib M]
"""

from __future__ import annotations

import cProfile
import ctypes
import io
import os
import pstats
import sys
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import blake3  # noqa: E402
import numpy as np  # noqa: E402
from _common import Ballast, Case, GiB, MiB, header, median, mixed_state, parser, remove, run_rounds, scratch_dir, state_bytes, table  # noqa: E402

import ckptfmt  # noqa: E402
from ckptfmt._writer import _chunks  # noqa: E402
from ckptfmt.format.spec import DEFAULT_CHUNK_SIZE  # noqa: E402
from ckptfmt.storage.local import LocalStorage, _LocalWrite  # noqa: E402

CS = DEFAULT_CHUNK_SIZE
EARLY = 64 << 20  # start writeback every 64 MiB written (prototype cases)
SYNC_FILE_RANGE_WRITE = 2
_libc = ctypes.CDLL(None, use_errno=True)
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def _sync_file_range(fd: int, off: int, n: int, flags: int) -> None:
    if _libc.sync_file_range(fd, off, n, flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class _EarlyWrite(_LocalWrite):
    """Prototype of the proposed fix: LocalStorage's write handle, plus a non-blocking
    sync_file_range(SYNC_FILE_RANGE_WRITE) every EARLY bytes so that writeback runs while
    the writer is still writing and hashing, and the final fsync has little left to do.
    (Uses ckptfmt's private _LocalWrite; a benchmark-only stand-in, ckptfmt is unchanged.)"""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._out = self._kicked = 0

    def _write_all(self, view: memoryview) -> None:
        super()._write_all(view)
        self._out += len(view)
        if self._out - self._kicked >= EARLY:
            _sync_file_range(self._fd, self._kicked, self._out - self._kicked, SYNC_FILE_RANGE_WRITE)
            self._kicked = self._out


class EarlyWritebackStorage(LocalStorage):
    def open_write(self, path: str):
        return _EarlyWrite(path)


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--size-mib", type=int, default=1024)
    args = p.parse_args()
    rounds = args.rounds or (3 if args.quick else 5)
    import safetensors.numpy as stn
    import torch

    header("profile_save", rounds=rounds)
    size = args.size_mib * MiB
    state = mixed_state(size, n_big=max(1, round(8 * size / GiB)), n_tensors=200)
    nbytes = state_bytes(state)
    flats = [a.reshape(-1).view(np.uint8) for a in state.values()]
    tstate = {k: torch.from_numpy(v) for k, v in state.items()}
    tails = sum(1 for f in flats if len(f) % CS)
    print(f"   state: {len(state)} tensors, {nbytes / MiB:.0f} MiB; {tails} tensors end in a partial chunk")
    ballast = Ballast(int(2.5 * nbytes))
    pool = ThreadPoolExecutor(2)
    sync_pool = ThreadPoolExecutor(1)

    def fsync_close(fd):
        os.fsync(fd)
        os.close(fd)

    with scratch_dir(4 * nbytes, args.dir) as d:
        ballast.hold()
        ck, st, raw, pt = d / "ck", d / "st", d / "raw", d / "pt"
        early = EarlyWritebackStorage()

        def raw_write(hash_mode: str | None, early: str | None = None):
            """early: start writeback while writing, every EARLY bytes: "fdatasync" on a
            background thread, or "sfr" = sync_file_range(SYNC_FILE_RANGE_WRITE) (non-blocking)."""
            fd = os.open(raw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            futs = []
            pos = kicked = 0
            sync_fut = None
            for f in flats:
                for s in range(0, len(f), CS):
                    mv = memoryview(f[s : s + CS])
                    if hash_mode == "inline":
                        blake3.blake3(mv).digest()
                    elif hash_mode == "pool":
                        futs.append(pool.submit(lambda m: blake3.blake3(m).digest(), mv))
                    while len(mv):
                        n = os.write(fd, mv)
                        mv = mv[n:]
                        pos += n
                    if early and pos - kicked >= EARLY:
                        if early == "sfr":
                            _sync_file_range(fd, kicked, pos - kicked, SYNC_FILE_RANGE_WRITE)
                            kicked = pos
                        elif sync_fut is None or sync_fut.done():
                            sync_fut = sync_pool.submit(os.fdatasync, fd)
                            kicked = pos
                    if len(futs) > 8:
                        futs.pop(0).result()
            for fu in futs:
                fu.result()
            if sync_fut is not None:
                sync_fut.result()
            fsync_close(fd)

        def hash_only():
            for f in flats:
                for s in range(0, len(f), CS):
                    blake3.blake3(memoryview(f[s : s + CS])).digest()

        def chunking():
            n = 0
            for f in flats:
                for c in _chunks(f, CS):
                    n += len(c)
            return n

        def pt_save():
            torch.save(tstate, pt)
            fsync_close(os.open(pt, os.O_RDONLY))

        def st_save():
            stn.save_file(state, st)
            fd = os.open(st, os.O_RDONLY)
            fsync_close(fd)

        groups = [
            [Case("ckptfmt save sync=True", lambda: ckptfmt.save(state, ck, sync=True), prepare=lambda: remove(ck))],
            [Case("ckptfmt save sync=False", lambda: ckptfmt.save(state, ck, sync=False), prepare=lambda: remove(ck))],
            [Case("ckptfmt save sync=True, early writeback", lambda: ckptfmt.save(state, ck, sync=True, storage=early),
                  prepare=lambda: remove(ck))],
            [Case("safetensors save_file+fsync", st_save, prepare=lambda: remove(st))],
            [Case("torch.save+fsync", pt_save, prepare=lambda: remove(pt))],
            [Case("raw write+fsync", lambda: raw_write(None), prepare=lambda: remove(raw))],
            [Case("raw write+hash inline+fsync", lambda: raw_write("inline"), prepare=lambda: remove(raw))],
            [Case("raw write+hash pooled+fsync", lambda: raw_write("pool"), prepare=lambda: remove(raw))],
            [Case("raw write+hash pooled+bg fdatasync+fsync", lambda: raw_write("pool", "fdatasync"), prepare=lambda: remove(raw))],
            [Case("raw write+hash pooled+sync_file_range+fsync", lambda: raw_write("pool", "sfr"), prepare=lambda: remove(raw))],
            [Case("raw write+sync_file_range+fsync (no hash)", lambda: raw_write(None, "sfr"), prepare=lambda: remove(raw))],
            [Case("hash only (1 thread)", hash_only)],
            [Case("ckptfmt _chunks() only", chunking)],
        ]
        times = run_rounds(groups, rounds, warmup=1, ballast=ballast)
        base = median(times["ckptfmt save sync=True"])
        proto = median(times["ckptfmt save sync=True, early writeback"])
        print()
        table(["case", "median s", "min..max s", "GiB/s", "vs ckptfmt save", "peer / prototype"],
              [[n, f"{median(t):.3f}", f"{min(t):.3f}..{max(t):.3f}", f"{nbytes / median(t) / GiB:.2f}",
                f"{median(t) / base:.2f}x", f"{median(t) / proto:.2f}x"] for n, t in times.items()],
              title=f"SAVE BREAKDOWN, {nbytes / MiB:.0f} MiB, medians of {rounds} rounds")

        remove(ck)
        ballast.release()
        prof = cProfile.Profile()
        prof.enable()
        ckptfmt.save(state, ck, sync=True)
        prof.disable()
        ballast.hold()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(14)
        print()
        print("cProfile of one ckptfmt.save(sync=True), by tottime (main thread only):")
        print("\n".join(s.getvalue().splitlines()[:40]))
        ballast.release()
    pool.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
