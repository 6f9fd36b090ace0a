"""Async incremental saves: chunks found unchanged by comparing with the previous snapshot
are not hashed again, and that shortcut is taken only when it is exact."""

from __future__ import annotations

import numpy as np
import pytest

import ckptfmt
import ckptfmt._writer as writer_module
import ckptfmt.manager as manager_module
from ckptfmt.manager import CheckpointManager

CS = 4096


def _w(step: int) -> np.ndarray:
    w = np.arange(64 * 1024, dtype=np.float32)  # 64 chunks of 4 KiB
    w[(step % 64) * 1024 : (step % 64 + 1) * 1024] += step  # one chunk changes per step
    return w


@pytest.fixture
def hashed(monkeypatch):
    """Counts chunks the incremental path hashes, and those it takes as known-equal."""
    counts = {"hashed": 0, "known": 0}
    real_delta = writer_module._write_delta

    def spy(arr, chunk_size, hasher, *args):
        same = args[-1]
        n = -(-arr.nbytes // chunk_size)
        known = int(np.count_nonzero(same[:n])) if same is not None else 0
        counts["known"] += known
        counts["hashed"] += n - known
        return real_delta(arr, chunk_size, hasher, *args)

    monkeypatch.setattr(writer_module, "_write_delta", spy)
    return counts


def test_unchanged_chunks_are_not_hashed_and_every_step_restores_exactly(tmp_path, hashed):
    states = {}
    with CheckpointManager(tmp_path, max_to_keep=None, async_save=True, chunk_size=CS) as m:
        for step in range(1, 7):
            w = _w(step)
            states[step] = w.copy()
            m.save(step, {"w": w, "b": np.ones(100, np.float32), "step": step})
        m.wait()
        for step, w in states.items():
            out = m.restore(step)
            assert out["w"].tobytes() == w.tobytes() and out["step"] == step
            assert ckptfmt.verify(m.step_path(step)).ok
    # steps 2..6: 2 chunks differ from the previous step each time (the old and the new one)
    assert hashed["known"] >= 5 * 60
    assert hashed["hashed"] <= 5 * 4 + 5  # the changed chunks and the small tensor "b" at most


def test_a_failed_save_invalidates_the_comparison(tmp_path, monkeypatch):
    """Step 2 fails after its snapshot was taken; step 3 equals step 2's state. The buffers
    then match step 3, but the parent (step 1) does not: nothing may be taken from it."""
    real = manager_module.write_checkpoint

    def flaky(state, path, *a, **k):
        if path.endswith("step-2"):
            raise OSError("disk went away")
        return real(state, path, *a, **k)

    monkeypatch.setattr(manager_module, "write_checkpoint", flaky)
    a = np.zeros(16 * 1024, np.float32)
    b = a.copy()
    b[:1024] = 7  # chunk 0 differs
    with CheckpointManager(tmp_path, max_to_keep=None, async_save=True, chunk_size=CS) as m:
        m.save(1, {"w": a})
        m.save(2, {"w": b})
        with pytest.raises(OSError, match="disk went away"):
            m.save(3, {"w": b})
        m.save(3, {"w": b})
        m.wait()
        assert m.restore(3)["w"].tobytes() == b.tobytes()


def test_moved_tensors_are_not_compared_by_position(tmp_path):
    x = np.arange(8 * 1024, dtype=np.float32)
    y = x[::-1].copy()
    with CheckpointManager(tmp_path, max_to_keep=None, async_save=True, chunk_size=CS) as m:
        m.save(1, {"a": x, "b": y})
        m.save(2, {"b": x, "a": y})  # same buffers by position, different names
        m.save(3, {"b": x, "a": y})
        m.save(4, {"a": y, "b": x})  # same names by position, contents swapped
        m.wait()
        assert m.restore(2)["b"].tobytes() == x.tobytes() and m.restore(2)["a"].tobytes() == y.tobytes()
        assert m.restore(3)["b"].tobytes() == x.tobytes() and m.restore(3)["a"].tobytes() == y.tobytes()
        assert m.restore(4)["a"].tobytes() == y.tobytes() and m.restore(4)["b"].tobytes() == x.tobytes()
        for s in (2, 3, 4):
            assert ckptfmt.verify(m.step_path(s)).ok


def test_compare_copy():
    from ckptfmt.manager import _compare_copy

    buf = np.arange(3000, dtype=np.float32)  # 12000 bytes: 2 full chunks and a tail of 3808
    src = buf.copy()
    src[2999] = -1  # in the tail, past the last 8-byte word boundary check
    src[10] = -1
    same = _compare_copy(buf, src, CS)
    assert same.tolist() == [False, True, False] and buf.tobytes() == src.tobytes()
    odd = np.arange(13, dtype=np.uint8)
    src = odd.copy()
    src[12] = 0
    assert _compare_copy(odd, src, CS).tolist() == [False] and odd[12] == 0
