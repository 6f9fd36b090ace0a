"""Save and load time of a ~1 GiB state: ckptfmt vs safetensors, torch and TensorFlow.

The state: 200 float32 tensors (8 of 4096x4096, the rest of mixed smaller sizes), fixed
seed. Every tool saves and loads the same values, in one process, in rounds with the
order of tools rotated (and reversed every other round); one warm-up round is discarded.

Saves (all made durable: the time includes fsync of what was written):
  ckptfmt.save(sync=True)                         chunk hashing + fsync included
  safetensors.numpy.save_file + fsync(file)
  torch.save + fsync(file)                        of torch.from_numpy views of the arrays
  tf.train.Checkpoint.write + fsync(files)        of tf.Variables holding the same values

Loads (all from the page cache; every result has one byte per 4 KiB page read, timed):
  ckptfmt.load(verify=True)                       every chunk hash checked
  ckptfmt.load(mmap=True, verify=True)            mapped, every chunk hash checked
  ckptfmt.load(verify=False)                      (for reference)
  safetensors.numpy.load_file                     no integrity check
  safetensors safe_open(framework="np") + get_tensor for every key
  safetensors.torch.load_file(backend="pread")    when this safetensors has ``backend``
  torch.load(weights_only=True)
  tf.train.Checkpoint.read into the existing variables (values are not touched: reading
  them back with .numpy() would copy; TF's restore materialises them anyway)

  limit: preadv + blake3                         the least a hash-checked load must do:
                                                  read every 4 MiB piece of the data file into
                                                  one fresh buffer and hash it, on two threads

TensorFlow and torch are imported once before anything is timed (imports are excluded).

Targets (ratio = peer median time / ckptfmt median time):
  * ckptfmt save >= 1.0x vs safetensors save_file+fsync, >= 1.5x vs torch.save+fsync
  * ckptfmt load(verify=True) no slower than safetensors load_file with pages touched
    (ratio >= 1.0), and at most 1.5x the "limit" case (hash + copy on this machine)

Usage: python benchmarks/bench_save_load.py [--quick] [--rounds N] [--size-mib M] [--no-tf]
"""

from __future__ import annotations

import gc
import inspect
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from _common import (  # noqa: E402
    Ballast,
    Case,
    GiB,
    MiB,
    du,
    fmt_bytes,
    fsync_path,
    header,
    median,
    mixed_state,
    paired_ratios,
    parser,
    remove,
    run_rounds,
    scratch_dir,
    state_bytes,
    table,
    touch,
)

import ckptfmt  # noqa: E402

CHUNK = 4 << 20


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 7, --quick 3)")
    p.add_argument("--size-mib", type=int, default=1024, help="state size (default 1024)")
    p.add_argument("--no-tf", action="store_true", help="skip TensorFlow")
    args = p.parse_args()
    rounds = args.rounds or (3 if args.quick else 7)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    t = time.perf_counter()
    import safetensors
    import safetensors.numpy as stn
    import safetensors.torch as stt
    import torch
    from safetensors import safe_open

    tf = None
    if not args.no_tf:
        import tensorflow as tf  # noqa: F811

        tf.get_logger().setLevel("ERROR")
    import_s = time.perf_counter() - t

    has_backend = "backend" in inspect.signature(stt.load_file).parameters
    header(
        "bench_save_load",
        safetensors=safetensors.__version__,
        torch=torch.__version__,
        tensorflow=(tf.__version__ if tf else "skipped"),
        rounds=rounds,
        warmup=1,
        mode="quick" if args.quick else "full",
    )
    print(f"   framework imports took {import_s:.1f} s (excluded)")
    if not has_backend:
        print("   safetensors.torch.load_file has no `backend` keyword in this version: pread case skipped")

    size = args.size_mib * MiB
    n_big = max(1, round(8 * size / GiB))
    state = mixed_state(size, n_big=n_big, n_tensors=200)
    nbytes = state_bytes(state)
    print(f"   state: {len(state)} float32 tensors, {fmt_bytes(nbytes)} ({n_big} of 4096x4096)")
    tstate = {k: torch.from_numpy(v) for k, v in state.items()}
    tfvars = {k: tf.Variable(v) for k, v in state.items()} if tf else None
    tfckpt = tf.train.Checkpoint(vars=tfvars) if tf else None

    # 2.5x the state covers the biggest transient need of any case (a whole-file buffer
    # plus the page cache of the file being written, or the loaded copy plus temporaries).
    ballast = Ballast(int(2.5 * nbytes))
    with scratch_dir(8 * nbytes, args.dir) as d:
        print(f"   pre-faulting {fmt_bytes(ballast.nbytes)} of ballast ...", flush=True)
        ballast.hold()
        ck, st, pt, tfp = d / "ckpt", d / "model.safetensors", d / "model.pt", str(d / "tf" / "ckpt")

        def ck_save():
            ckptfmt.save(state, ck, sync=True)

        def st_save():
            stn.save_file(state, st)
            fsync_path(st)

        def pt_save():
            torch.save(tstate, pt)
            fsync_path(pt)

        def tf_save():
            out = tfckpt.write(tfp)
            fsync_path(d / "tf")
            return out

        def ck_load():
            r = ckptfmt.load(ck, verify=True)
            touch(r)
            return r

        def ck_load_mmap():
            r = ckptfmt.load(ck, verify=True, mmap=True)
            touch(r)
            return r

        def ck_load_noverify():
            r = ckptfmt.load(ck, verify=False)
            touch(r)
            return r

        def st_load():
            r = stn.load_file(st)
            touch(r)
            return r

        def st_open():
            with safe_open(st, framework="np") as f:
                r = {k: f.get_tensor(k) for k in f.keys()}
            touch(r)
            return r

        def st_pread():
            r = stt.load_file(st, backend="pread")
            touch(r)
            return r

        def pt_load():
            r = torch.load(pt, weights_only=True)
            touch(r)
            return r

        def tf_load():
            tfckpt.read(tfp).assert_consumed()

        def limit():
            from concurrent.futures import ThreadPoolExecutor

            import blake3

            files = [os.path.join(ck, f.path) for f in ckptfmt.open(ck).manifest.files]
            total = sum(os.path.getsize(f) for f in files)
            out = np.empty(total, np.uint8)
            view = memoryview(out)
            jobs = []
            pos = 0
            for f in files:
                size = os.path.getsize(f)
                jobs += [(f, o, pos + o, min(CHUNK, size - o)) for o in range(0, size, CHUNK)]
                pos += size
            fds = {f: os.open(f, os.O_RDONLY) for f in files}

            def work(job):
                f, off, dst, n = job
                piece = view[dst : dst + n]
                os.preadv(fds[f], [piece], off)
                return blake3.blake3(piece).digest()

            try:
                with ThreadPoolExecutor(2) as ex:
                    list(ex.map(work, jobs))
            finally:
                for fd in fds.values():
                    os.close(fd)
            touch(out)
            return out

        def check(expect_torch: bool = False):
            # correctness of every loader, checked untimed in the warm-up only (cheap spot check)
            def after(r):
                if r is None or check.done.get(id(after)):
                    return
                check.done[id(after)] = True
                k = "layers.0.mlp.weight"
                got = r[k].numpy() if expect_torch else np.asarray(r[k])
                assert np.array_equal(got, state[k]), k
            return after

        check.done = {}

        groups = [
            [
                Case("ckptfmt save (sync, hashed)", ck_save, prepare=lambda: remove(ck), group="ckptfmt"),
                Case("ckptfmt load verify", ck_load, after=check()),
                Case("ckptfmt load mmap+verify", ck_load_mmap, after=check()),
                Case("ckptfmt load no-verify", ck_load_noverify, after=check()),
            ],
            [Case("limit: preadv + blake3", limit)],
            [
                Case("safetensors save_file+fsync", st_save, prepare=lambda: remove(st)),
                Case("safetensors load_file", st_load, after=check()),
                Case("safetensors safe_open np", st_open, after=check()),
            ]
            + ([Case("safetensors torch pread", st_pread, after=check(True))] if has_backend else []),
            [
                Case("torch.save+fsync", pt_save, prepare=lambda: remove(pt)),
                Case("torch.load", pt_load, after=check(True)),
            ],
        ]
        if tf:
            groups.append(
                [
                    Case("tf Checkpoint.write+fsync", tf_save, prepare=lambda: remove(d / "tf")),
                    Case("tf Checkpoint.read", tf_load),
                ]
            )
        times = run_rounds(groups, rounds, warmup=1, ballast=ballast)
        sizes = {"ckptfmt": du(ck), "safetensors": du(st), "torch": du(pt)}
        if tf:
            sizes["tf"] = du(d / "tf")
        # check TF restored values (untimed)
        if tf:
            k = "layers.0.mlp.weight"
            assert np.array_equal(tfvars[k].numpy(), state[k])
        ballast.release()
    print("   on-disk sizes: " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in sizes.items()))

    def rows(names, base):
        out = []
        for n in names:
            if n not in times:
                continue
            ts = times[n]
            med = median(ts)
            pr = paired_ratios(times, n, base)
            out.append(
                [
                    n,
                    f"{med:.3f}",
                    f"{min(ts):.3f}..{max(ts):.3f}",
                    f"{nbytes / med / GiB:.2f}",
                    f"{med / median(times[base]):.2f}x",
                    f"{median(pr):.2f}x ({min(pr):.2f}..{max(pr):.2f})",
                ]
            )
        return out

    hdr = ["case", "median s", "min..max s", "GiB/s", "ratio", "paired ratio (range)"]
    save_names = [n for n in times if "save" in n or "write" in n]
    load_names = [n for n in times if n not in save_names]
    print()
    table(hdr, rows(save_names, "ckptfmt save (sync, hashed)"),
          title=f"SAVE of {fmt_bytes(nbytes)}, {rounds} rounds (ratio = case / ckptfmt save; >1 means ckptfmt is faster)")
    print()
    table(hdr, rows(load_names, "ckptfmt load verify"),
          title=f"LOAD of {fmt_bytes(nbytes)}, page-cached, pages touched, {rounds} rounds (ratio = case / ckptfmt load verify)")

    print()
    print("per-round times, s (round order rotates; judge the noise here):")
    for n, ts in times.items():
        print(f"   {n:<28} " + " ".join(f"{t:.3f}" for t in ts))

    base_s = median(times["ckptfmt save (sync, hashed)"])
    base_l = median(times["ckptfmt load verify"])
    r_st = median(times["safetensors save_file+fsync"]) / base_s
    r_pt = median(times["torch.save+fsync"]) / base_s
    r_ld = median(times["safetensors load_file"]) / base_l
    r_lim = base_l / median(times["limit: preadv + blake3"])
    print()
    table(
        ["target", "measured", "result"],
        [
            ["save vs safetensors save_file+fsync >= 1.0x", f"{r_st:.2f}x", "PASS" if r_st >= 1.0 else "FAIL"],
            ["save vs torch.save+fsync >= 1.5x", f"{r_pt:.2f}x", "PASS" if r_pt >= 1.5 else "FAIL"],
            ["load verify vs safetensors load_file (touched) >= 1.0x", f"{r_ld:.2f}x", "PASS" if r_ld >= 1.0 else "FAIL"],
            ["load verify time / limit (preadv + blake3) <= 1.5x", f"{r_lim:.2f}x", "PASS" if r_lim <= 1.5 else "FAIL"],
        ],
        title="TARGETS",
    )
    gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
