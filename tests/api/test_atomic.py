"""Nothing is lost: an interrupted save leaves the previous checkpoint loadable."""

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
from ckptfmt.storage.local import LocalStorage


def test_failure_midway_keeps_old_checkpoint_and_cleans_up(ckdir):
    ckptfmt.save({"v": np.full(1000, 1.0)}, ckdir)
    before = sorted(os.listdir(ckdir))

    class Failing(LocalStorage):
        def open_write(self, path, *, durable=True):
            h = super().open_write(path, durable=durable)
            real = h.write
            count = [0]

            def write(data):
                count[0] += 1
                if count[0] > 3:
                    raise OSError(28, "No space left on device")
                real(data)

            h.write = write
            return h

    big = {"v": np.full(1000, 2.0), "w": np.ones((64, 1 << 14), np.float32)}
    with pytest.raises(ckptfmt.StorageError, match="disk is full") as ei:
        ckptfmt.save(big, ckdir, overwrite=True, storage=Failing(), chunk_size=1 << 16)
    assert isinstance(ei.value, OSError)
    assert sorted(os.listdir(ckdir)) == before  # our partial data file was removed
    np.testing.assert_array_equal(ckptfmt.load(ckdir)["v"], np.full(1000, 1.0))


def test_overwrite_replaces_atomically_and_removes_old_data(ckdir):
    ckptfmt.save({"v": np.zeros(10)}, ckdir)
    with pytest.raises(ckptfmt.CheckpointExistsError):
        ckptfmt.save({"v": np.ones(10)}, ckdir)
    old = set(os.listdir(ckdir))
    ckptfmt.save({"v": np.ones(10)}, ckdir, overwrite=True)
    new = set(os.listdir(ckdir))
    assert len(new) == 2 and new & old == {"MANIFEST"}
    np.testing.assert_array_equal(ckptfmt.load(ckdir)["v"], np.ones(10))
    assert ckptfmt.verify(ckdir).problems == ()


_SAVER = textwrap.dedent(
    """
    import sys, numpy as np, ckptfmt
    path = sys.argv[1]
    step = 0
    base = np.random.default_rng(0).standard_normal((8, 1 << 18)).astype(np.float32)  # 8 MiB
    while True:
        step += 1
        ckptfmt.save({"step": step, "w": base + step}, path, overwrite=True, chunk_size=1 << 16)
        print(step, flush=True)
    """
)


@pytest.mark.slow
def test_sigkill_during_saves_leaves_a_complete_checkpoint(ckdir, tmp_path):
    """A child saves in a loop; we SIGKILL it at random moments, 12 times."""
    script = tmp_path / "saver.py"
    script.write_text(_SAVER)
    rng = random.Random(1234)
    base = np.random.default_rng(0).standard_normal((8, 1 << 18)).astype(np.float32)
    seen_steps = set()
    for _trial in range(12):
        proc = subprocess.Popen([sys.executable, str(script), ckdir], stdout=subprocess.PIPE, text=True)
        first = proc.stdout.readline()  # at least one complete save of this child
        assert first.strip(), "saver produced no checkpoint"
        time.sleep(rng.uniform(0.0, 0.25))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        state = ckptfmt.load(ckdir)  # must load, bit-exact
        step = state["step"]
        np.testing.assert_array_equal(state["w"], base + step)
        rep = ckptfmt.verify(ckdir)
        assert rep.ok, rep.errors
        seen_steps.add(step)
    assert len(seen_steps) > 1
