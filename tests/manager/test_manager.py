"""CheckpointManager: triggers, retention, async saves, locking and crash recovery."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import ckptfmt
from ckptfmt.manager import CheckpointManager, history

CS = 4096


def _state(step: int) -> dict:
    w = np.arange(64 * 1024, dtype=np.float32)  # 64 chunks of 4 KiB
    w[(step % 64) * 1024 : (step % 64 + 1) * 1024] += step  # one chunk changes per step
    return {"w": w, "step": step, "frozen": np.ones(8 * 1024, np.float32)}


def test_step_trigger_and_retention(tmp_path):
    with CheckpointManager(tmp_path, max_to_keep=2, keep_every_n_steps=25, save_interval_steps=10, chunk_size=CS) as m:
        saved = [s for s in range(1, 61) if m.save(s, _state(s))]
        assert saved == [10, 20, 30, 40, 50, 60]
        assert m.all_steps() == [50, 60]  # 50 is a multiple of 25: kept beyond max_to_keep
        assert m.latest_step() == 60
        assert not m.should_save(60) and not m.should_save(59)
        assert m.save(61, _state(61), force=True)
        assert m.all_steps() == [50, 60, 61]
    with CheckpointManager(tmp_path, max_to_keep=2, keep_every_n_steps=25) as m:
        assert m.all_steps() == [50, 60, 61]
        for s in m.all_steps():
            out = m.restore(s)
            assert out["step"] == s and out["w"].tobytes() == _state(s)["w"].tobytes()


def test_time_trigger(tmp_path, monkeypatch):
    import ckptfmt.manager as manager_module

    now = [1000.0]
    monkeypatch.setattr(manager_module, "_clock", lambda: now[0])
    with CheckpointManager(tmp_path, save_interval_seconds=60, chunk_size=CS) as m:
        assert not m.save(1, _state(1))
        now[0] += 61
        assert m.save(2, _state(2))
        now[0] += 30
        assert not m.save(3, _state(3))
        now[0] += 31
        assert m.should_save(4)


def test_incremental_chain_is_bounded(tmp_path):
    with CheckpointManager(tmp_path, max_to_keep=None, max_chain=3, chunk_size=CS) as m:
        for s in range(1, 8):
            m.save(s, _state(s))
    h = history(tmp_path)
    assert [e.depth for e in h] == [0, 1, 2, 0, 1, 2, 0]
    full, delta = h[0].written_bytes, h[1].written_bytes
    assert delta < full / 10  # one chunk of 72 written
    for e in h:
        assert ckptfmt.verify(e.path).ok


def test_retention_never_breaks_dependants(tmp_path):
    with CheckpointManager(tmp_path, max_to_keep=1, max_chain=100, chunk_size=CS) as m:
        for s in range(1, 10):
            m.save(s, _state(s))
            assert m.all_steps() == [s]
            assert m.restore()["w"].tobytes() == _state(s)["w"].tobytes()
    # Only data the last checkpoint needs is left on disk.
    m = ckptfmt.open(tmp_path / "step-9").manifest
    on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp_path) for f in fs if f.endswith(".data"))
    assert on_disk == sum(f.size for f in m.files)


def test_async_save_copies_state_and_surfaces_errors(tmp_path):
    with CheckpointManager(tmp_path, async_save=True, chunk_size=CS) as m:
        st = _state(1)
        m.save(1, st)
        st["w"][:] = -1  # the caller mutates right away: the checkpoint must not see it
        m.wait()
        assert m.restore(1)["w"].tobytes() == _state(1)["w"].tobytes()
        m.save(2, {"bad": np.array(["x"], dtype=object)})  # fails in the background...
        with pytest.raises(ckptfmt.UnsupportedDtypeError):
            m.save(3, _state(3))  # ...and surfaces on the next call
        assert m.save(3, _state(3))
    assert CheckpointManager(tmp_path).all_steps() == [1, 3]


def _in_other_process(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return r.stderr


def test_two_writers_get_a_clear_error(tmp_path):
    m = CheckpointManager(tmp_path)
    err = _in_other_process(f"from ckptfmt.manager import CheckpointManager; CheckpointManager({str(tmp_path)!r})")
    assert "CheckpointLockedError" in err and f"pid {os.getpid()}" in err
    assert "CheckpointLockedError" in _in_other_process(f"import ckptfmt; ckptfmt.gc({str(tmp_path)!r}, timeout=0)")
    m.close()
    assert "Error" not in _in_other_process(f"from ckptfmt.manager import CheckpointManager; CheckpointManager({str(tmp_path)!r}).close()")


def test_restore_skips_a_damaged_newest_checkpoint(tmp_path):
    with CheckpointManager(tmp_path, incremental=False, chunk_size=CS) as m:
        m.save(1, _state(1))
        m.save(2, _state(2))
        data = [f for f in os.listdir(m.step_path(2)) if f.endswith(".data")][0]
        with open(os.path.join(m.step_path(2), data), "r+b") as f:
            f.write(b"\xff\xff")
        with pytest.warns(UserWarning, match="step 2 is damaged"):
            assert m.restore()["step"] == 1
        with pytest.raises(ckptfmt.IntegrityError):
            m.restore(2)


def test_recovery_cleans_leftovers(tmp_path):
    with CheckpointManager(tmp_path, chunk_size=CS) as m:
        m.save(1, _state(1))
    dead = tmp_path / "step-2"
    dead.mkdir()
    (dead / "data-00000-deadbeef.data").write_bytes(b"x" * 1000)
    (tmp_path / "step-1" / ".MANIFEST.tmp-1").write_bytes(b"junk")
    old = time.time() - 3600  # outside the store only old leftovers go: a save may be writing young ones
    for p in (dead / "data-00000-deadbeef.data", tmp_path / "step-1" / ".MANIFEST.tmp-1"):
        os.utime(p, (old, old))
    live = tmp_path / "step-3"
    live.mkdir()
    (live / "data-00000-0123abcd.data").write_bytes(b"y" * 10)
    pack = tmp_path / "ckptfmt-store" / "pack-0123456789abcdef-00000.data"
    pack.write_bytes(b"z" * 100)  # a killed save's, or a moved-out checkpoint's: kept, with a warning
    with pytest.warns(UserWarning, match=r"1 file\(s\), 100 bytes, that no checkpoint of the run uses.*ckptfmt gc"):
        m = CheckpointManager(tmp_path)
    with m:
        assert m.all_steps() == [1] and not dead.exists() and pack.exists()
        assert (live / "data-00000-0123abcd.data").exists()
        assert ckptfmt.verify(m.step_path(1)).problems == ()
    assert str(pack) in ckptfmt.gc(tmp_path).deleted


def test_no_checkpoint(tmp_path):
    with CheckpointManager(tmp_path) as m:
        assert m.latest_step() is None
        with pytest.raises(ckptfmt.CheckpointNotFoundError):
            m.restore()


_CHILD = textwrap.dedent(
    """
    import sys, numpy as np
    sys.path.insert(0, {tests!r})
    from ckptfmt.manager import CheckpointManager
    from test_manager import _state
    m = CheckpointManager(sys.argv[1], max_to_keep=3, max_chain=4, chunk_size=4096, async_save=sys.argv[2] == "1")
    step = (m.latest_step() or 0)
    while True:
        step += 1
        m.save(step, _state(step))
        if step % 2 == 0:
            m.wait()
        print(step, flush=True)
    """
)


@pytest.mark.slow
def test_sigkill_at_random_moments(tmp_path):
    """>= 50 kills of a child saving in a loop; after each, the newest complete checkpoint is intact."""
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(tests=os.path.dirname(os.path.abspath(__file__))))
    ckdir = tmp_path / "run"
    rng = random.Random(7)
    restored = set()
    for trial in range(50):
        proc = subprocess.Popen([sys.executable, str(script), str(ckdir), str(trial % 2)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip(), "the child saved nothing"
        time.sleep(rng.uniform(0, 0.15))  # then die anywhere: mid-write, mid-commit, mid-gc
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        with CheckpointManager(ckdir, chunk_size=4096) as m:  # recovers, cleans leftovers
            step = m.latest_step()
            out = m.restore()
            assert out["step"] == step
            assert out["w"].tobytes() == _state(step)["w"].tobytes()
            assert ckptfmt.verify(m.step_path(step)).ok
            restored.add(step)
    assert len(restored) > 10
