"""Shared helpers for the ckptfmt benchmarks (scripts, not tests).

What is here and why:

* ``scratch_dir``: a temporary directory on a real disk (never tmpfs, where fsync is free),
  by default next to the repository (``$CKPTFMT_BENCH_DIR`` overrides), removed at exit.
* ``Ballast``: pre-faulting. On the VMs we benchmark on, memory the guest has never touched
  (or freed more than ~2 s ago, when the host reclaims it) costs ~2.5 s/GiB to fault in,
  which dwarfs the work being measured. A ``Ballast`` holds a few GiB of touched memory
  while nothing is timed and releases it just before a timed case, so the case's new
  allocations *and* new page-cache pages come from hot pages; it is re-touched afterwards.
  Every tool gets exactly the same treatment.
* ``run_rounds``: runs cases in rounds, rotating their order every round (so no tool is
  always first or always after a given other tool), with an optional discarded warm-up
  round; results are medians of the timed rounds plus per-round (paired) ratios.
* ``touch``: reads one byte per 4 KiB page of every array (the same for every loader), so
  lazily mapped results are really read.
* ``run_child``: runs a Python snippet in a fresh interpreter and returns its JSON output;
  peak RSS is the child's own ``VmHWM`` (``rss_now``), not ``ru_maxrss`` (see there why).
* Page cache: we cannot drop it (no root), so every read in these benchmarks is served
  from the page cache; the files were just written. Writes are fsync'ed where stated.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

PAGE = 4096
MiB = 1 << 20
GiB = 1 << 30
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------
# command line and printing
# --------------------------------------------------------------------------------------
def parser(doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer rounds / smaller sizes (a smoke run)")
    p.add_argument("--dir", default=None, help="scratch directory parent (default: $CKPTFMT_BENCH_DIR or next to the repo)")
    return p


def code_version() -> str:
    """The commit and a hash of the ckptfmt sources actually measured (others edit concurrently)."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted((REPO / "ckptfmt").rglob("*.py")):
        h.update(f.read_bytes())
    try:
        rev = subprocess.run(["git", "--no-optional-locks", "rev-parse", "--short", "HEAD"], cwd=REPO,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "--no-optional-locks", "diff", "--quiet", "HEAD", "--", "ckptfmt"],
                               cwd=REPO, capture_output=True, timeout=10).returncode
    except (OSError, subprocess.SubprocessError):
        rev, dirty = "?", 0
    return f"{rev or '?'}{'+dirty' if dirty else ''} (src sha256 {h.hexdigest()[:12]})"


def header(title: str, **extra: Any) -> None:
    import ckptfmt

    print(f"== {title}")
    info = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "ckptfmt": f"{ckptfmt.__version__} @ {code_version()}",
        "cpus": os.cpu_count(),
        "host": platform.node(),
    }
    info.update(extra)
    print("   " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print("   reads are served from the page cache (it cannot be dropped without root)")
    sys.stdout.flush()


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None) -> str:
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = []
    if title:
        out.append(title)
    out.append(line(headers))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(r) for r in rows)
    text = "\n".join(out)
    print(text)
    sys.stdout.flush()
    return text


def fmt_s(t: float | None) -> str:
    if t is None:
        return "-"
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.3f} s"


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def spread(xs: Sequence[float]) -> str:
    """min..max of a sample, for judging noise next to a median."""
    return f"{min(xs):.3g}..{max(xs):.3g}"


# --------------------------------------------------------------------------------------
# scratch space
# --------------------------------------------------------------------------------------
def _fs_type(path: str) -> str:
    best, fstype = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, fstype = mnt, parts[2]
    except OSError:
        pass
    return fstype


@contextmanager
def scratch_dir(need_bytes: int, parent: str | None = None) -> Iterator[Path]:
    """A fresh temporary directory on a disk-backed filesystem with ``need_bytes`` free."""
    candidates = [parent, os.environ.get("CKPTFMT_BENCH_DIR"), str(REPO.parent), tempfile.gettempdir()]
    chosen = None
    for c in candidates:
        if not c or not os.path.isdir(c) or not os.access(c, os.W_OK):
            continue
        if _fs_type(os.path.realpath(c)) in ("tmpfs", "ramfs"):
            continue
        if shutil.disk_usage(c).free < need_bytes * 1.2:
            continue
        chosen = c
        break
    if chosen is None:
        raise SystemExit(f"no disk-backed directory with {fmt_bytes(need_bytes)} free; pass --dir")
    d = Path(tempfile.mkdtemp(prefix="ckptfmt-bench-", dir=chosen))
    print(f"   scratch: {d} ({_fs_type(str(d))}, {fmt_bytes(shutil.disk_usage(d).free)} free)")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def remove(path: str | os.PathLike) -> None:
    p = Path(path)
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file (or every file under a directory, and the directory)."""
    p = Path(path)
    files = [p] if p.is_file() else [q for q in p.rglob("*") if q.is_file()]
    for q in files:
        fd = os.open(q, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def du(path: str | os.PathLike) -> int:
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(q.stat().st_size for q in p.rglob("*") if q.is_file())


# --------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------
def prefault(arr: np.ndarray) -> np.ndarray:
    """Write one byte per page of a fresh array (keeping its values) so it is resident."""
    flat = arr.reshape(-1).view(np.uint8)
    flat[::PAGE] = flat[::PAGE]
    return arr


class Ballast:
    """Touched memory held between timed cases and released just before one (see module doc)."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = int(nbytes)
        self._buf: np.ndarray | None = None

    def hold(self) -> float:
        t = time.perf_counter()
        if self._buf is None and self.nbytes:
            buf = np.empty(self.nbytes, np.uint8)
            buf[::PAGE] = 1
            self._buf = buf
        return time.perf_counter() - t

    def release(self) -> None:
        self._buf = None

    @contextmanager
    def released(self) -> Iterator[None]:
        self.release()
        try:
            yield
        finally:
            gc.collect()
            self.hold()


def touch(obj: Any) -> int:
    """Read one byte per 4 KiB page of every array in a tree (numpy, torch or mapped)."""
    total = 0
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        else:
            if type(x).__module__.startswith("torch"):
                x = x.numpy()
            if isinstance(x, np.ndarray) and x.size:
                if x.flags.c_contiguous:
                    total += int(x.reshape(-1).view(np.uint8)[::PAGE].sum())
                else:
                    total += int(np.asarray(x).view(np.uint8).sum())
    return total


def rss_now() -> dict[str, int]:
    """Current RSS, anonymous and file-backed RSS and the high-water mark, in bytes."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        import resource

        out["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


# --------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------
class Case:
    """A timed operation. ``prepare`` runs untimed before, ``after`` untimed after (gets the result)."""

    def __init__(
        self,
        name: str,
        fn: Callable[[], Any],
        *,
        prepare: Callable[[], Any] | None = None,
        after: Callable[[Any], Any] | None = None,
        group: str | None = None,
    ) -> None:
        self.name, self.fn, self.prepare, self.after = name, fn, prepare, after
        self.group = group or name


def time_once(case: Case, ballast: Ballast | None = None) -> float:
    if case.prepare:
        case.prepare()
    gc.collect()
    if ballast is not None:
        ballast.release()
    gc.disable()
    try:
        t = time.perf_counter()
        result = case.fn()
        dt = time.perf_counter() - t
    finally:
        gc.enable()
    if case.after:
        case.after(result)
    del result
    gc.collect()
    if ballast is not None:
        ballast.hold()
    return dt


def run_rounds(
    groups: Sequence[Sequence[Case]],
    rounds: int,
    *,
    warmup: int = 1,
    ballast: Ballast | None = None,
    verbose: bool = True,
) -> dict[str, list[float]]:
    """Run every group of cases once per round, rotating the order of groups each round.

    A group is a sequence of cases run back to back in its own order (e.g. a save then the
    loads that read what it wrote). Warm-up rounds are run but not recorded.
    """
    times: dict[str, list[float]] = {c.name: [] for g in groups for c in g}
    n = len(groups)
    for r in range(warmup + rounds):
        order = [groups[(i + r) % n] for i in range(n)]
        if r % 2:
            order = order[::-1]  # rotate and reverse: every tool both precedes and follows every other
        label = "warm-up" if r < warmup else f"round {r - warmup + 1}/{rounds}"
        t0 = time.perf_counter()
        for g in order:
            for c in g:
                dt = time_once(c, ballast)
                if r >= warmup:
                    times[c.name].append(dt)
        if verbose:
            print(f"   {label} done in {time.perf_counter() - t0:.1f} s", flush=True)
    return times


def paired_ratios(times: dict[str, list[float]], peer: str, base: str) -> list[float]:
    return [p / b for p, b in zip(times[peer], times[base])]


# --------------------------------------------------------------------------------------
# subprocesses
# --------------------------------------------------------------------------------------
def run_child(code: str, *, env: dict | None = None) -> dict:
    """Run ``code`` in a fresh interpreter; its last stdout line starting with ``{`` is JSON.

    Peak RSS must be measured by the child itself (``VmHWM`` from /proc/self/status, see
    ``rss_now``): ``ru_maxrss`` of a child, from ``os.wait4`` or ``RUSAGE_CHILDREN``, also
    counts the parent's high-water mark, because Linux keeps the pre-exec maximum across
    exec and subprocess forks with vfork from our (large) benchmark process.
    """
    full_env = dict(os.environ)
    full_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if env:
        full_env.update(env)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, cwd=str(REPO))
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])


# --------------------------------------------------------------------------------------
# states
# --------------------------------------------------------------------------------------
def mixed_state(total_bytes: int, *, n_big: int, n_tensors: int = 200, seed: int = 0) -> dict[str, np.ndarray]:
    """A flat dict of float32 tensors: ``n_big`` 4096x4096 and many small of mixed sizes.

    The small ones share the remaining bytes in a fixed mix of shapes (some with sizes that
    are not multiples of 64 bytes, as real models have). Values are random (incompressible).
    """
    rng = np.random.default_rng(seed)
    big = 4096 * 4096 * 4
    n_big = min(n_big, max(0, total_bytes // big - 1))  # small states: fewer (or no) big tensors
    rest = total_bytes - n_big * big
    n_small = n_tensors - n_big
    assert rest > 0 and n_small > 0
    # the small-tensor shapes, cycled
    kinds = ["mat", "mat", "wide", "vec", "odd"]
    shapes: list[tuple[int, ...]] = []
    for i in range(n_small):
        kind = kinds[i % len(kinds)]
        if kind == "vec":
            shapes.append((4096,))
        elif kind == "odd":
            shapes.append((3, 1000 + i))
        else:
            shapes.append(())  # filled below
    fixed = sum(int(np.prod(s)) * 4 for s in shapes if s)
    n_mat = sum(1 for s in shapes if not s)
    per = max(4096, (rest - fixed) // n_mat // 4)  # floats per matrix-like tensor
    state: dict[str, np.ndarray] = {}
    for i in range(n_big):
        state[f"layers.{i}.mlp.weight"] = rng.random((4096, 4096), dtype=np.float32)
    for i, s in enumerate(shapes):
        if not s:
            kind = kinds[i % len(kinds)]
            cols = 1024 if kind == "mat" else 4096
            s = (max(1, per // cols), cols)
        state[f"layers.{i % 48}.block{i}.weight"] = rng.random(s, dtype=np.float32)
    return state


def state_bytes(state: dict[str, np.ndarray]) -> int:
    return sum(int(a.nbytes) for a in state.values())
