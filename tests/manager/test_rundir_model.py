"""A state machine over everything users and ckptfmt do to a run directory (issue 10).

Saves (full, into the store, incremental), remove, gc, compact, manager retention, ``rm -r``
of a step and symbolic links, in a run directory that also holds foreign files, an empty
folder, a link to an old step and a link to a canary outside the run. After every step:
every checkpoint that should exist loads bit-exactly, nothing foreign changed, and after gc
no unreferenced data remains. Plus a bounded multi-process race: a saver with parents, a
remover and a gc.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import ckptfmt
from ckptfmt.manager import CheckpointManager

CS = 4096
BASE = np.random.default_rng(0).standard_normal(8 * 1024).astype(np.float32)  # 8 chunks


def _state(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    w = BASE.copy()
    for c in rng.choice(8, size=int(rng.integers(0, 3)), replace=False):
        w[c * 1024 : (c + 1) * 1024] += 1.0
    return {"w": w, "seed": seed}


def _files(root: str) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(d, name)
            if os.path.islink(p):
                out[p] = "->" + os.readlink(p)
            elif os.path.isdir(p):
                out[p] = "dir"
            else:
                with open(p, "rb") as f:
                    out[p] = f.read()
    return out


class RunDirectory(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="ckptfmt-model-")
        self.run = os.path.join(self.tmp, "run")
        self.outside = os.path.join(self.tmp, "outside")
        os.makedirs(os.path.join(self.outside, "ds"))
        with open(os.path.join(self.outside, "ds", "data-00000-0123abcd.data"), "wb") as f:
            f.write(b"outside, named like ours")
        ckptfmt.save({"x": np.arange(3.0)}, os.path.join(self.outside, "ck"))
        os.makedirs(os.path.join(self.run, "tensorboard"))
        os.makedirs(os.path.join(self.run, "data"))
        with open(os.path.join(self.run, "data", "train.data"), "wb") as f:
            f.write(b"train")
        os.symlink(os.path.join(self.outside, "ds"), os.path.join(self.run, "datasets"))
        os.symlink(os.path.join(self.outside, "ck"), os.path.join(self.run, "linked-ck"))
        old = time.time() - 7200
        for p in (os.path.join(self.outside, "ds", "data-00000-0123abcd.data"), os.path.join(self.run, "data", "train.data")):
            os.utime(p, (old, old))
        self.foreign = {p: v for p, v in _files(self.tmp).items()}
        self.expected: dict[str, dict] = {}  # name -> state
        self.store_based: set[str] = set()
        self.links: set[str] = set()
        self.n = 0

    def teardown(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _path(self, name: str) -> str:
        return os.path.join(self.run, name)

    @rule(seed=st.integers(0, 1000), how=st.sampled_from(["full", "store", "incremental"]))
    def save(self, seed, how):
        self.n += 1
        name = f"c{self.n}"
        parents = sorted(n for n in self.expected if n in self.store_based)
        parent = self._path(parents[seed % len(parents)]) if how == "incremental" and parents else None
        state = _state(seed)
        ckptfmt.save(state, self._path(name), chunk_size=CS, sync=False, parent=parent, shared_store=how != "full")
        self.expected[name] = state
        if how != "full":
            self.store_based.add(name)

    @precondition(lambda self: self.expected)
    @rule(i=st.integers(0, 100))
    def remove(self, i):
        name = sorted(self.expected)[i % len(self.expected)]
        ckptfmt.remove(self._path(name))
        del self.expected[name]

    @precondition(lambda self: self.expected)
    @rule(i=st.integers(0, 100))
    def rm_r(self, i):
        name = sorted(self.expected)[i % len(self.expected)]
        shutil.rmtree(self._path(name))
        del self.expected[name]

    @precondition(lambda self: self.expected)
    @rule(i=st.integers(0, 100), portable=st.booleans())
    def compact(self, i, portable):
        name = sorted(self.expected)[i % len(self.expected)]
        if portable:
            self.n += 1
            ckptfmt.compact(self._path(name), to=self._path(f"c{self.n}"))
            self.expected[f"c{self.n}"] = self.expected[name]
        else:
            ckptfmt.compact(self._path(name))
            self.store_based.discard(name)

    @precondition(lambda self: self.expected)
    @rule(i=st.integers(0, 100))
    def link(self, i):
        name = sorted(self.expected)[i % len(self.expected)]
        link = f"link-{len(self.links)}"
        os.symlink(name, self._path(link))
        self.links.add(link)

    @rule()
    def gc(self):
        ckptfmt.gc(self.run, grace_seconds=0)
        if os.path.isdir(os.path.join(self.run, "mgr")):
            ckptfmt.gc(os.path.join(self.run, "mgr"), grace_seconds=0)  # gc collects one run, not nested ones
        self.check_nothing_unreferenced()

    @rule(keep=st.integers(1, 3), seed=st.integers(0, 1000))
    def manager(self, keep, seed):
        """A manager run in a sub-directory of its own, with retention, in the same tree."""
        d = os.path.join(self.run, "mgr")
        with CheckpointManager(d, max_to_keep=keep, chunk_size=CS, sync=False) as m:
            step = (m.latest_step() or 0) + 1
            m.save(step, _state(seed))
            self.expected[f"mgr/step-{step}"] = _state(seed)
            for s in list(self.expected):
                if s.startswith("mgr/") and int(s.split("-")[1]) not in m.all_steps():
                    del self.expected[s]

    @invariant()
    def everything_expected_loads_bit_exactly(self):
        for name, state in self.expected.items():
            out = ckptfmt.load(self._path(name))
            assert out["seed"] == state["seed"] and out["w"].tobytes() == state["w"].tobytes(), name

    @invariant()
    def nothing_foreign_changed(self):
        now = _files(self.tmp)
        for p, v in self.foreign.items():
            assert now.get(p) == v, p
        for link in self.links:
            assert os.path.islink(self._path(link))

    def check_nothing_unreferenced(self):
        need = set()
        for d in (self.run, os.path.join(self.run, "mgr")):
            if not os.path.isdir(d):
                continue
            for name in os.listdir(d):
                p = os.path.join(d, name)
                if not os.path.islink(p) and os.path.isfile(os.path.join(p, "MANIFEST")):
                    need |= {os.path.normpath(os.path.join(p, f.path)) for f in ckptfmt.open(p).manifest.files}
        ours = set()
        for d, _dirs, files in os.walk(self.run):
            for f in files:
                if f.endswith(".data") and d not in (os.path.join(self.run, "data"),):
                    ours.add(os.path.join(d, f))
        assert ours == need


TestRunDirectory = RunDirectory.TestCase
TestRunDirectory.settings = settings(max_examples=20, stateful_step_count=12, deadline=None)


_RACER = textwrap.dedent(
    """
    import json, os, sys, time, numpy as np, ckptfmt
    role, run, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    done = os.path.join(os.path.dirname(run), "saver-done")
    log = []
    def ckpts():
        return sorted((n for n in os.listdir(run) if n.startswith("c") and os.path.isfile(os.path.join(run, n, "MANIFEST"))),
                      key=lambda n: int(n[1:]))
    i = -1
    while True:
        i += 1
        if role == "saver" and i == rounds:
            open(done, "w").close()
            break
        if role != "saver" and (os.path.exists(done) or i > 5000):
            break
        try:
            if role == "saver":
                have = ckpts()
                parent = os.path.join(run, have[-1]) if have else None
                w = np.full(8 * 1024, float(i), np.float32); w[:1024] = 7.0  # the first chunk never changes
                ckptfmt.save({"w": w, "i": i}, os.path.join(run, f"c{i}"), chunk_size=4096, sync=False,
                             parent=parent, shared_store=True)
                log.append(["saved", i])
            elif role == "remover":
                have = ckpts()
                if len(have) > 1:
                    ckptfmt.remove(os.path.join(run, have[0]), timeout=5)
                    log.append(["removed", int(have[0][1:])])
            else:
                ckptfmt.gc(run, grace_seconds=0, timeout=5)
        except ckptfmt.CkptFmtError as e:
            log.append(["error", i, type(e).__name__])
        time.sleep(0.002 if role == "saver" else 0.01)
    print(json.dumps(log))
    """
)


def test_saver_remover_gc_race(tmp_path):
    """Never a save that returned success with a broken checkpoint."""
    import json

    run = tmp_path / "run"
    run.mkdir()
    script = tmp_path / "racer.py"
    script.write_text(_RACER)
    procs = {role: subprocess.Popen([sys.executable, str(script), role, str(run), str(n)], stdout=subprocess.PIPE, text=True)
             for role, n in (("saver", 30), ("remover", 30), ("gc", 15))}
    logs = {role: json.loads(p.communicate(timeout=240)[0]) for role, p in procs.items()}
    saved = [i for ev, i, *_ in logs["saver"] if ev == "saved"]
    removed = {i for ev, i, *_ in logs["remover"] if ev == "removed"}
    assert len(saved) >= 10 and removed, logs
    for i in saved:
        if i in removed:
            assert not (run / f"c{i}").exists()
            continue
        out = ckptfmt.load(run / f"c{i}")
        assert out["i"] == i and out["w"][1024] == float(i) and out["w"][0] == 7.0
        assert ckptfmt.verify(run / f"c{i}").ok
