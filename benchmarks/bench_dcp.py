"""Save throughput through torch.distributed.checkpoint: ckptfmt.dcp.Writer vs DCP's FileSystemWriter.

The state: ``--size-mib`` MiB (default 256) of float32 in 16 equal matrices, each a DTensor
sharded on dim 0 over the ranks (built from local shards, no rank ever holds the whole
state), fixed seed. For 1 and 2 ranks (a gloo process group of CPU processes on this
machine), every rank calls ``torch.distributed.checkpoint.save`` with the same state and
a different storage writer; the time is from a barrier before the save to a barrier
after it (so it includes the coordinator's metadata write and commit), measured on rank 0.

Writers (all fsync their data and metadata):
  ckptfmt         ckptfmt.dcp.Writer: blake3 hash of every 4 MiB chunk, msgpack manifest
  ckptfmt-nohash  the same with the chunk hash replaced by a constant (NOT a valid
                  checkpoint: isolates what hashing costs)
  dcp-fs          torch.distributed.checkpoint.FileSystemWriter (torch.save per item, pickle
                  metadata, no hashes), default options

Rounds: one warm-up, then ``--rounds`` (default 3) with the order of writers rotated and
reversed every other round; medians and min..max are printed, and the ratio
dcp-fs time / ckptfmt time (above 1.0: ckptfmt is faster).

Also measured: ``dcp.async_save`` with ckptfmt.dcp.Writer and FileSystemWriter, the time
the call blocks the caller (DCP's staging copy) and the time until the checkpoint is
written. Not measured: 4 ranks (a 2-core machine cannot give 4 ranks their own core; the
tests cover 4-rank correctness).

Usage: python benchmarks/bench_dcp.py [--quick] [--rounds N] [--size-mib M] [--ranks 1,2]
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

WRITERS = ("ckptfmt", "ckptfmt-nohash", "dcp-fs")
ASYNC_WRITERS = ("ckptfmt", "dcp-fs")


def rank_main(rank: int, world: int, port: int, size_mib: int, rounds: int, work: str, out: str) -> None:
    import datetime

    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    import ckptfmt.dcp

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    mesh = init_device_mesh("cpu", (world,))
    n, cols = 16, 2048
    rows = size_mib * C.MiB // (n * cols * 4)
    rng = np.random.default_rng(rank)
    state = {}
    for i in range(n):
        local = torch.from_numpy(rng.standard_normal((rows // world, cols), dtype=np.float32))
        state[f"layer{i}.weight"] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
    total = n * (rows // world) * world * cols * 4

    real_write = ckptfmt.dcp._write_tensor

    class _NoHash:
        name, digest_size = "blake3", 32

        @staticmethod
        def digest(data) -> bytes:
            return bytes(32)

    def nohash_write(arr, chunk_size, hasher, *args):
        real_write(arr, chunk_size, _NoHash, *args)

    def save(kind: str, path: str) -> None:
        ckptfmt.dcp._write_tensor = nohash_write if kind == "ckptfmt-nohash" else real_write
        writer = dcp.FileSystemWriter(path) if kind == "dcp-fs" else ckptfmt.dcp.Writer(path)
        dcp.save(state, storage_writer=writer)

    def save_async(kind: str, path: str) -> tuple[float, float]:
        """(time async_save blocked the caller, time until the checkpoint was written)."""
        ckptfmt.dcp._write_tensor = real_write
        writer = dcp.FileSystemWriter(path) if kind == "dcp-fs" else ckptfmt.dcp.Writer(path)
        t0 = time.perf_counter()
        fut = dcp.async_save(state, storage_writer=writer)
        t1 = time.perf_counter()
        fut.result()
        return t1 - t0, time.perf_counter() - t0

    times: dict[str, list[float]] = {k: [] for k in WRITERS}
    for k in ASYNC_WRITERS:
        times[f"async-block:{k}"] = []
        times[f"async-total:{k}"] = []
    for r in range(1 + rounds):
        order = [WRITERS[(i + r) % len(WRITERS)] for i in range(len(WRITERS))]
        if r % 2:
            order = order[::-1]
        for kind in order:
            path = os.path.join(work, f"{kind}-{r}")
            dist.barrier()
            t0 = time.perf_counter()
            save(kind, path)
            dist.barrier()
            dt = time.perf_counter() - t0
            if r:
                times[kind].append(dt)
            dist.barrier()
            if rank == 0:
                C.remove(path)
        order = [ASYNC_WRITERS[(i + r) % len(ASYNC_WRITERS)] for i in range(len(ASYNC_WRITERS))]
        for kind in order if r % 2 == 0 else order[::-1]:
            path = os.path.join(work, f"async-{kind}-{r}")
            dist.barrier()
            blocked, written = save_async(kind, path)
            dist.barrier()
            if r:
                times[f"async-block:{kind}"].append(blocked)
                times[f"async-total:{kind}"].append(written)
            if rank == 0:
                C.remove(path)
        if rank == 0:
            print(f"   {world} rank(s): {'warm-up' if r == 0 else f'round {r}/{rounds}'} done", flush=True)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"times": times, "bytes": total}, f)
    dist.destroy_process_group()


def main() -> int:
    p = C.parser(__doc__)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--size-mib", type=int, default=None)
    p.add_argument("--ranks", default="1,2")
    args = p.parse_args()
    rounds = args.rounds or (2 if args.quick else 3)
    size = args.size_mib or (64 if args.quick else 256)
    worlds = [int(x) for x in args.ranks.split(",")]
    C.header("bench_dcp: DCP save throughput, ckptfmt.dcp.Writer vs FileSystemWriter", size=f"{size} MiB", rounds=rounds)
    rows, arows = [], []
    with C.scratch_dir(size * C.MiB * 3, args.dir) as scratch:
        for world in worlds:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            out = str(scratch / f"result-{world}.json")
            procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), str(world), str(port), str(size),
                                       str(rounds), str(scratch), out]) for r in range(world)]
            if any(pr.wait() for pr in procs):
                print(f"a rank failed with {world} ranks", file=sys.stderr)
                return 1
            with open(out) as f:
                res = json.load(f)
            t, nbytes = res["times"], res["bytes"]
            base = C.median(t["ckptfmt"])
            for kind in WRITERS:
                med = C.median(t[kind])
                rows.append([f"{world} rank(s)", kind, C.fmt_s(med), C.spread(t[kind]),
                             f"{nbytes / C.MiB / med:.0f} MiB/s", f"{med / base:.2f}x"])
            for what in ("block", "total"):
                base_a = C.median(t[f"async-{what}:ckptfmt"])
                for kind in ASYNC_WRITERS:
                    xs = t[f"async-{what}:{kind}"]
                    arows.append([f"{world} rank(s)", f"async_save {what}", kind, C.fmt_s(C.median(xs)), C.spread(xs),
                                  f"{C.median(xs) / base_a:.2f}x"])
    C.table(["ranks", "measure", "writer", "median", "min..max (s)", "time / ckptfmt"], arows,
            title="dcp.async_save: time the call blocked (staging to CPU) and time until written; both writers "
                  "use DCP's staging (DefaultStager for ckptfmt, FileSystemWriter's own BlockingAsyncStager)")
    C.table(["ranks", "writer", "median", "min..max (s)", "throughput", "time / ckptfmt"], rows,
            title="Save (fsync'ed), whole state; time / ckptfmt above 1.0 means ckptfmt is faster")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 9 and sys.argv[1] == "--rank":
        a = sys.argv[2:]
        rank_main(int(a[0]), int(a[1]), int(a[2]), int(a[3]), int(a[4]), a[5], a[6])
        sys.exit(0)
    sys.exit(main())
