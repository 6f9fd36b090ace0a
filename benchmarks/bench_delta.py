"""Incremental saves and the CheckpointManager: bytes, time, async blocking, chain restore.

Measures, in one run (medians of alternating rounds, page-cached reads, fsync on saves):

1. A ~1 GiB state with 10% of its chunks changed: bytes written and time of an incremental
   save vs a full save.  Targets: <= 12% of the bytes, <= 25% of the time. The parent
   records chunk fingerprints (spec 10.1), so only chunks whose fingerprint differs are
   hashed; the same save on a parent without them (as written before fingerprints: every
   chunk hashed with BLAKE3) runs in the same rounds as the named peer.
1b. The same through an async CheckpointManager (incremental): the state alternates between
   two versions 10% of chunks apart; the manager compares each new snapshot with its
   previous one (reused buffers) and hashes only the chunks that differ. Reported: the
   background save's time (until wait() returns) and the time save() blocks, vs a full
   ckptfmt.save of the same state in the same rounds. Target: background <= 25%.
2. A frozen-backbone fine-tune (90% of parameters frozen, Adam on the rest) over 20 saves:
   bytes on disk with CheckpointManager(incremental) vs 20 full ckptfmt saves vs 20
   ``torch.save`` files (if torch is installed).
3. Async save of 1 GiB: how long ``manager.save`` blocks the training loop vs a synchronous
   save.  Target: <= 20% (steady state: the snapshot buffers are reused from save to save).
4. Restore from the end of a 10-deep incremental chain vs from a full checkpoint of the same
   state.  Target: <= 1.3x.
5. A 40-step run with max_to_keep=3 (10% of chunks changed per step): bytes on disk right
   after retention, after `rm -r` of a step, and after gc, next to the same run with full saves.
6. Compression of changed chunks (XOR with the parent chunk, optional byte shuffle, zstd) on
   realistic updates (weights ~ N(0, 0.02) after an Adam-sized step; Adam moments): ratio and
   speed, to decide whether it belongs in the format.

Run: python benchmarks/bench_delta.py [--quick]
"""

from __future__ import annotations

import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    Ballast,
    Case,
    GiB,
    MiB,
    du,
    fmt_bytes,
    fmt_s,
    header,
    median,
    mixed_state,
    parser,
    run_rounds,
    scratch_dir,
    spread,
    table,
)

import ckptfmt  # noqa: E402
from ckptfmt.format.spec import DEFAULT_CHUNK_SIZE  # noqa: E402
from ckptfmt.manager import CheckpointManager, history  # noqa: E402

CS = DEFAULT_CHUNK_SIZE


def own_bytes(path: str) -> int:
    """Bytes the save of ``path`` wrote itself (the rest of its data is shared)."""
    m = ckptfmt.open(path).manifest
    return sum(m.files[i].size for i in m.own_files())


def perturb_chunks(state: dict, fraction: float, rng: np.random.Generator) -> dict:
    """A copy of ``state`` in which ``fraction`` of all chunks differ in one element."""
    slots = [(k, c) for k, a in state.items() for c in range(-(-a.nbytes // CS))]
    pick = rng.choice(len(slots), size=max(1, int(len(slots) * fraction)), replace=False)
    out = {k: a for k, a in state.items()}
    copied: set[str] = set()
    for i in pick:
        k, c = slots[i]
        if k not in copied:
            out[k] = out[k].copy()
            copied.add(k)
        flat = out[k].reshape(-1)
        flat[min(c * CS // 4, flat.size - 1)] += 1.0
    return out


def bench_delta_vs_full(root, size: int, rounds: int) -> list[str]:
    base = mixed_state(size, n_big=max(1, size // (256 * MiB)))
    changed = perturb_chunks(base, 0.10, np.random.default_rng(1))
    parent = str(root / "parent")
    ckptfmt.save(base, parent, shared_store=True)
    old_parent = str(root / "parent-nofp")
    ckptfmt.save(base, old_parent, shared_store=True)
    strip_fingerprints(old_parent)
    ballast = Ballast(min(2 * GiB, 2 * size))
    ballast.hold()
    counter = [0]

    def fresh() -> str:
        counter[0] += 1
        return str(root / f"c{counter[0]}")

    paths: dict[str, str] = {}

    def full():
        paths["full"] = fresh()
        return ckptfmt.save(changed, paths["full"])

    def delta():
        paths["delta"] = fresh()
        return ckptfmt.save(changed, paths["delta"], parent=parent)

    def delta_nofp():
        paths["nofp"] = fresh()
        return ckptfmt.save(changed, paths["nofp"], parent=old_parent)

    sizes: dict[str, int] = {}

    def after(name):
        def f(_):
            sizes[name] = own_bytes(paths[name])
            ckptfmt.remove(paths[name])
        return f

    nofp = "incremental save, parent without fingerprints"
    times = run_rounds([[Case("full save", full, after=after("full"))], [Case("incremental save", delta, after=after("delta"))],
                        [Case(nofp, delta_nofp, after=after("nofp"))]], rounds, ballast=ballast)
    ballast.release()
    tf, td, tn = median(times["full save"]), median(times["incremental save"]), median(times[nofp])
    table(["case", "median", "spread (s)", "bytes written", "time / full"],
          [["full save", fmt_s(tf), spread(times["full save"]), fmt_bytes(sizes["full"]), "1.000"],
           ["incremental save (10% chunks changed)", fmt_s(td), spread(times["incremental save"]), fmt_bytes(sizes["delta"]), f"{td / tf:.3f}"],
           [f"{nofp} (every chunk hashed)", fmt_s(tn), spread(times[nofp]), fmt_bytes(sizes["nofp"]), f"{tn / tf:.3f}"]],
          title=f"\n1. incremental vs full save of {fmt_bytes(size)}")
    b, t = sizes["delta"] / sizes["full"], td / tf
    return [f"incremental bytes / full bytes = {b:.3f} (target <= 0.12) {'PASS' if b <= 0.12 else 'FAIL'}",
            f"incremental time / full time   = {t:.3f} (target <= 0.25) {'PASS' if t <= 0.25 else 'FAIL'}; "
            f"without fingerprints {tn / tf:.3f}; fingerprinted / hashed-everything = {td / tn:.3f}"]


def strip_fingerprints(path: str) -> None:
    """Rewrite a manifest without its fingerprint columns: a parent as saved before spec 10.1."""
    import msgpack

    from ckptfmt.format.hashing import get_hash

    mpath = os.path.join(path, "MANIFEST")
    with open(mpath, "rb") as f:
        env = msgpack.unpackb(f.read(), raw=False)
    body = msgpack.unpackb(env["body"], raw=False, strict_map_key=False)
    body["chunks"].pop("fp", None)
    body["chunks"].pop("fp_alg", None)
    env["body"] = msgpack.packb(body, use_bin_type=True)
    env["hash"] = get_hash(env["hash_alg"]).digest(env["body"])
    with open(mpath, "wb") as f:
        f.write(msgpack.packb(env, use_bin_type=True))
    assert ckptfmt.open(path).manifest.fp_alg is None


def bench_manager_incremental(root, size: int, rounds: int) -> list[str]:
    base = mixed_state(size, n_big=max(1, size // (256 * MiB)))
    changed = perturb_chunks(base, 0.10, np.random.default_rng(1))
    ballast = Ballast(min(2 * GiB, 2 * size))
    ballast.hold()
    step = [0]
    blocked: list[float] = []
    counter = [0]
    with CheckpointManager(root / "mgr", max_to_keep=2, incremental=True, async_save=True) as m:
        m.save(0, base)  # primes the snapshot buffers (first touch) and the parent
        m.wait()

        def manager_save():
            step[0] += 1
            t = time.perf_counter()
            m.save(step[0], changed if step[0] % 2 else base)
            blocked.append(time.perf_counter() - t)
            m.wait()

        def full():
            counter[0] += 1
            p = str(root / f"full{counter[0]}")
            ckptfmt.save(changed, p)
            shutil.rmtree(p)

        times = run_rounds([[Case("manager async incremental (save + wait)", manager_save)], [Case("full save", full)]],
                           rounds, ballast=ballast)
        last = m.step_path(m.latest_step())
        written = own_bytes(last)
    ballast.release()
    tm, tf = median(times["manager async incremental (save + wait)"]), median(times["full save"])
    tb = median(blocked[-rounds:])
    table(["case", "median", "spread (s)"],
          [["full save", fmt_s(tf), spread(times["full save"])],
           ["manager async incremental: save + background write", fmt_s(tm), spread(times["manager async incremental (save + wait)"])],
           ["  of which save() blocked (compare + copy of changed chunks)", fmt_s(tb), spread(blocked[-rounds:])]],
          title=f"\n1b. incremental save through an async CheckpointManager, {fmt_bytes(size)}, 10% of chunks changed "
                f"({fmt_bytes(written)} written per save)")
    bg = (tm - tb) / tf
    return [f"manager incremental background time / full save = {bg:.3f} (target <= 0.25) {'PASS' if bg <= 0.25 else 'FAIL'}; "
            f"save + wait / full save = {tm / tf:.3f}"]


def bench_finetune(root, n_params: int, saves: int) -> list[str]:
    rng = np.random.default_rng(2)
    frozen = rng.standard_normal(int(n_params * 0.9), dtype=np.float32) * 0.02
    train = rng.standard_normal(n_params - frozen.size, dtype=np.float32) * 0.02
    m = np.zeros_like(train)
    v = np.zeros_like(train)
    inc, full_dir, torch_dir = root / "inc", root / "full", root / "torch"
    full_dir.mkdir()
    torch_dir.mkdir()
    try:
        import torch
    except ImportError:
        torch = None
    t_inc = t_full = t_torch = 0.0
    with CheckpointManager(inc, max_to_keep=None, incremental=True) as mgr:
        for step in range(1, saves + 1):
            g = rng.standard_normal(train.size, dtype=np.float32) * 0.01
            m = 0.9 * m + 0.1 * g
            v = 0.999 * v + 0.001 * g * g
            train = train - 1e-4 * m / (np.sqrt(v) + 1e-8)
            state = {"backbone": frozen, "head": train, "adam": {"m": m, "v": v, "step": step}}
            t = time.perf_counter()
            mgr.save(step, state)
            t_inc += time.perf_counter() - t
            t = time.perf_counter()
            ckptfmt.save(state, str(full_dir / f"step-{step}"))
            t_full += time.perf_counter() - t
            if torch is not None:
                t = time.perf_counter()
                p = torch_dir / f"step-{step}.pt"
                torch.save({"backbone": torch.from_numpy(frozen), "head": torch.from_numpy(train),
                            "adam": {"m": torch.from_numpy(m), "v": torch.from_numpy(v), "step": step}}, p)
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
                t_torch += time.perf_counter() - t
    depths = [e.depth for e in history(inc)]
    d_inc, d_full = du(inc), du(full_dir)
    rows = [["CheckpointManager(incremental)", fmt_bytes(d_inc), "1.00", fmt_s(t_inc / saves)],
            [f"{saves} full ckptfmt saves", fmt_bytes(d_full), f"{d_full / d_inc:.2f}", fmt_s(t_full / saves)]]
    if torch is not None:
        d_t = du(torch_dir)
        rows.append([f"{saves} torch.save files", fmt_bytes(d_t), f"{d_t / d_inc:.2f}", fmt_s(t_torch / saves)])
    table(["", "bytes on disk", "x incremental", "mean save"], rows,
          title=f"\n2. frozen-backbone fine-tune, {n_params * 4 / MiB:.0f} MiB of parameters (90% frozen) + Adam m, v; {saves} saves; chain depths {depths}")
    return [f"fine-tune: 20 full saves use {d_full / d_inc:.2f}x the disk of incremental saves"]


def bench_retention(root, n_params: int, steps: int = 40, keep: int = 3) -> list[str]:
    """A 40-step run keeping 3: bytes on disk before and after gc, incremental vs full saves.

    Each step changes 10% of the chunks (a fine-tune's head and its Adam moments). The
    incremental run's data sits in the shared store; `rm -r` of one step (a user's habit)
    leaves data that gc frees, so both the size right after retention and after an extra
    `rm -r` + gc are reported.
    """
    rng = np.random.default_rng(4)
    state = {f"p{i}": rng.standard_normal(n_params // 10, dtype=np.float32) for i in range(10)}
    sizes = {}
    for name, incremental in (("incremental", True), ("full", False)):
        d = root / f"ret-{name}"
        st = dict(state)
        t = time.perf_counter()
        with CheckpointManager(d, max_to_keep=keep, incremental=incremental, max_chain=8) as mgr:
            for step in range(1, steps + 1):
                st = perturb_chunks(st, 0.10, np.random.default_rng(step))
                mgr.save(step, st)
            before = du(d)
            shutil.rmtree(mgr.step_path(mgr.all_steps()[0]))  # the habit: rm -r of the oldest kept step
            after_rm = du(d)
        gc_rep = ckptfmt.gc(d, grace_seconds=0)
        sizes[name] = (before, after_rm, du(d), time.perf_counter() - t, gc_rep.freed_bytes)
        assert all(ckptfmt.verify(p).ok for p in (d / f"step-{s}" for s in range(steps - keep + 2, steps + 1)))
    # The same with the verbs alone: save(parent=...) and remove() of the oldest (issue 10, case 7).
    d = root / "ret-verbs"
    d.mkdir()
    st, kept = dict(state), []
    t = time.perf_counter()
    for step in range(1, steps + 1):
        st = perturb_chunks(st, 0.10, np.random.default_rng(step))
        path = str(d / f"step-{step}")
        depth = len(kept) and ckptfmt.open(kept[-1]).sharing()["depth"]
        ckptfmt.save(st, path, shared_store=True, parent=kept[-1] if kept and depth + 1 < 8 else None)
        kept.append(path)
        while len(kept) > keep:
            ckptfmt.remove(kept.pop(0))
    before = du(d)
    shutil.rmtree(kept[0])
    after_rm = du(d)
    ckptfmt.gc(d, grace_seconds=0)
    sizes["save(parent=) + remove()"] = (before, after_rm, du(d), time.perf_counter() - t, 0)
    state_bytes = sum(a.nbytes for a in state.values())
    rows = [[name if "(" in name else f"CheckpointManager({name})", fmt_bytes(b), fmt_bytes(r), fmt_bytes(a), f"{a / sizes['full'][2]:.2f}", fmt_s(t)]
            for name, (b, r, a, t, _) in sizes.items()]
    table(["run", "on disk", "after rm -r oldest", "after gc", "x full", "total time"], rows,
          title=f"\n5. {steps}-step run, max_to_keep={keep}, {fmt_bytes(state_bytes)} state, 10% of chunks change per step")
    inc, full = sizes["incremental"], sizes["full"]
    return [f"{steps}-step run keeping {keep}: incremental on disk {fmt_bytes(inc[0])} "
            f"({inc[0] / full[0]:.2f}x the full-save run's {fmt_bytes(full[0])}); "
            f"after rm -r of a step + gc {fmt_bytes(inc[2])} ({inc[2] / full[2]:.2f}x); "
            f"save(parent=)+remove() {fmt_bytes(sizes['save(parent=) + remove()'][0])} (no gc needed)"]


def bench_async(root, size: int, rounds: int) -> list[str]:
    state = mixed_state(size, n_big=max(1, size // (256 * MiB)))
    blocked, sync_t = [], []
    with CheckpointManager(root / "async", max_to_keep=1, incremental=False, async_save=True) as am, \
            CheckpointManager(root / "sync", max_to_keep=1, incremental=False) as sm:
        for step in range(1, rounds + 2):
            t = time.perf_counter()
            am.save(step, state)
            b = time.perf_counter() - t
            am.wait()
            t = time.perf_counter()
            sm.save(step, state)
            s = time.perf_counter() - t
            if step > 1:  # the first async save faults its snapshot buffers in
                blocked.append(b)
                sync_t.append(s)
            else:
                first = b
    r = median(blocked) / median(sync_t)
    table(["", "median", "spread (s)"],
          [["async save: time blocked (steady state)", fmt_s(median(blocked)), spread(blocked)],
           ["async save: time blocked (first save)", fmt_s(first), "-"],
           ["synchronous save", fmt_s(median(sync_t)), spread(sync_t)]],
          title=f"\n3. async save of {fmt_bytes(size)}")
    return [f"async blocked / sync save = {r:.3f} (target <= 0.20) {'PASS' if r <= 0.20 else 'FAIL'}"]


def bench_chain_restore(root, size: int, rounds: int) -> list[str]:
    rng = np.random.default_rng(3)
    state = mixed_state(size, n_big=max(1, size // (256 * MiB)))
    prev = str(root / "chain-0")
    ckptfmt.save(state, prev, shared_store=True)
    for i in range(1, 11):
        state = perturb_chunks(state, 0.10, rng)
        cur = str(root / f"chain-{i}")
        ckptfmt.save(state, cur, parent=prev)
        prev = cur
    full = str(root / "full-copy")
    ckptfmt.save(state, full)
    nfiles = len(ckptfmt.open(prev).manifest.files)
    ballast = Ballast(min(2 * GiB, 2 * size))
    ballast.hold()
    times = run_rounds([[Case("restore full", lambda: ckptfmt.load(full))], [Case("restore end of 10-deep chain", lambda: ckptfmt.load(prev))]], rounds, ballast=ballast)
    ballast.release()
    r = median(times["restore end of 10-deep chain"]) / median(times["restore full"])
    table(["", "median", "spread (s)"], [[k, fmt_s(median(v)), spread(v)] for k, v in times.items()],
          title=f"\n4. restore of {fmt_bytes(size)} (chain end reads from {nfiles} data files)")
    return [f"chain restore / full restore = {r:.3f} (target <= 1.3) {'PASS' if r <= 1.3 else 'FAIL'}"]


def bench_compression(n: int) -> list[str]:
    import zstandard

    rng = np.random.default_rng(4)
    w0 = (rng.standard_normal(n, dtype=np.float32) * 0.02).astype(np.float32)
    g = rng.standard_normal(n, dtype=np.float32) * 0.01
    m = 0.1 * g
    v = 0.001 * g * g
    w1 = w0 - np.float32(1e-4) * m / (np.sqrt(v) + np.float32(1e-8))
    m1 = 0.9 * m + 0.1 * rng.standard_normal(n, dtype=np.float32) * 0.01
    cases = {"weights after an Adam step (lr 1e-4)": (w0, w1), "Adam m after a step": (m, m1)}
    cctx = zstandard.ZstdCompressor(level=3)
    rows, best = [], 0.0
    for label, (old, new) in cases.items():
        x = (old.view(np.uint32) ^ new.view(np.uint32))
        for shuffle in (False, True):
            data = x.view(np.uint8).reshape(-1, 4).T.copy() if shuffle else x.view(np.uint8)
            t = time.perf_counter()
            comp = cctx.compress(data.tobytes())
            dt = time.perf_counter() - t
            ratio = new.nbytes / len(comp)
            best = max(best, ratio)
            rows.append([label, "xor+shuffle+zstd" if shuffle else "xor+zstd", f"{ratio:.2f}x", f"{new.nbytes / dt / MiB:.0f} MiB/s"])
        t = time.perf_counter()
        comp = cctx.compress(new.tobytes())
        rows.append([label, "zstd alone", f"{new.nbytes / len(comp):.2f}x", f"{new.nbytes / (time.perf_counter() - t) / MiB:.0f} MiB/s"])
    table(["data", "codec", "size ratio", "compress speed"], rows, title=f"\n6. compressing changed chunks ({fmt_bytes(n * 4)} per case)")
    return [f"compression of changed chunks: best ratio {best:.2f}x"]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--only-incremental", action="store_true", help="run cases 1 and 1b only")
    args = p.parse_args()
    size = 256 * MiB if args.quick else GiB
    rounds = 3 if args.quick else 5
    header("incremental saves and CheckpointManager", state=fmt_bytes(size), chunk=fmt_bytes(CS))
    verdicts: list[str] = []
    with scratch_dir(size * 16, args.dir) as root:
        verdicts += bench_delta_vs_full(root, size, rounds)
        verdicts += bench_manager_incremental(root, size, rounds)
        if args.only_incremental:
            return finish(verdicts)
        verdicts += bench_finetune(root, (8 if args.quick else 32) * (1 << 20), 20)
        verdicts += bench_async(root, size, rounds)
        verdicts += bench_chain_restore(root, size, rounds)
        verdicts += bench_retention(root, (4 if args.quick else 16) * (1 << 20))
    verdicts += bench_compression(16 * (1 << 20) if not args.quick else 4 * (1 << 20))
    finish(verdicts)


def finish(verdicts: list[str]) -> None:
    print("\nsummary")
    for v in verdicts:
        print("  " + v)


if __name__ == "__main__":
    main()
