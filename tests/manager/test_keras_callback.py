"""ckptfmt.keras.CheckpointCallback: a Keras 3 fit killed with SIGKILL during saves always
resumes from the newest complete checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.tensorflow]

# One training process: restore, report what was restored and whether the model now holds
# exactly the newest checkpoint on disk, then train until killed (or for `epochs`).
CHILD = textwrap.dedent('''
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np, keras
    import ckptfmt
    from ckptfmt.adapters import tensorflow as adapter
    from ckptfmt.keras import CheckpointCallback
    run, epochs = sys.argv[1], int(sys.argv[2])
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(512, activation="relu"),
                              keras.layers.Dense(512, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    x = np.random.default_rng(0).standard_normal((256, 64)).astype("float32")
    y = x[:, :1] * 2
    cb = CheckpointCallback(run, save_every_steps=1, max_to_keep=3, export=os.path.join(run, "..", "final.keras"))
    start = cb.initial_epoch(model)
    step = cb.restored_step
    same = None
    if step is not None:
        want = ckptfmt.load(cb.manager.step_path(step))["variables"]
        got = adapter.to_state(model)["variables"]
        flat = lambda t, p="": [(p + k, v) for k, v in t.items() if not isinstance(v, dict)] + [
            x for k, v in t.items() if isinstance(v, dict) for x in flat(v, p + k + "/")]
        w, g = dict(flat(want)), dict(flat(got))
        same = w.keys() == g.keys() and all(np.array_equal(w[k], g[k]) for k in w)
    print(f"restored {step} iterations {int(model.optimizer.iterations.numpy()) if model.optimizer.built else 0} "
          f"same {same} epoch {start}", flush=True)
    model.fit(x, y, batch_size=8, epochs=epochs, initial_epoch=start, callbacks=[cb], verbose=0)
    cb.close()
    print("finished", flush=True)
''')


def _run(script: Path, run: Path, epochs: int, kill_after: float | None) -> tuple[str, int]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, str(script), str(run), str(epochs)], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True, env=env)
    first = p.stdout.readline()  # the restore report, before any training
    if kill_after is not None:
        # wait for at least one new save, then kill at some point during the following saves
        before = set(run.glob("step-*")) if run.exists() else set()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and p.poll() is None:
            if set(run.glob("step-*")) - before:
                break
            time.sleep(0.05)
        time.sleep(kill_after)
        p.send_signal(signal.SIGKILL)
    p.wait(timeout=600)
    p.stdout.close()
    return first, p.returncode


@pytest.mark.slow
def test_sigkill_during_saves_always_resumes_from_the_newest_complete_checkpoint(tmp_path):
    pytest.importorskip("keras")
    import ckptfmt

    script = tmp_path / "train.py"
    script.write_text(CHILD)
    run = tmp_path / "run"
    rng = np.random.default_rng(1)
    seen: list[int] = []
    for attempt in range(3):
        first, code = _run(script, run, 10_000, kill_after=float(rng.uniform(0.0, 1.5)))
        assert code == -signal.SIGKILL, first
        if attempt:
            # the run restored what the previous kill left as newest, exactly
            assert first.startswith(f"restored {seen[-1]} iterations {seen[-1]} same True"), first
        steps = sorted(int(p.name.split("-")[1]) for p in run.glob("step-*") if (p / "MANIFEST").is_file())
        assert steps, "no complete checkpoint after a kill"
        for s in steps:  # every complete checkpoint is intact
            assert ckptfmt.verify(run / f"step-{s}").ok, s
        seen.append(steps[-1])
    # resumed runs counted on from their checkpoint: the newest step only grows
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    first, code = _run(script, run, 0, kill_after=None)  # restore, nothing to train
    assert code == 0 and first.startswith(f"restored {seen[-1]} iterations {seen[-1]} same True"), first


def test_callback_saves_by_steps_keeps_the_newest_and_exports_a_loadable_keras_file(tmp_path):
    keras = pytest.importorskip("keras")
    from ckptfmt.keras import CheckpointCallback

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    x = np.random.default_rng(0).standard_normal((32, 4)).astype("float32")
    y = x.sum(1, keepdims=True)
    out = tmp_path / "final.weights.h5"
    cb = CheckpointCallback(tmp_path / "run", save_every_steps=3, max_to_keep=2, export=out)
    model.fit(x, y, batch_size=8, epochs=2, callbacks=[cb], verbose=0)  # 8 steps
    assert cb.manager.all_steps() == [6, 8]  # 3, 6 by steps; 8 when fit ends; 2 kept
    assert cb.manager.metadata(8) == {"epoch": 1, "epoch_done": True, "step": 8}
    cb.close()
    twin = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(1)])
    twin.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    twin.optimizer.build(twin.trainable_variables)
    twin.load_weights(out)
    assert int(twin.optimizer.iterations.numpy()) == 8
    np.testing.assert_array_equal(twin.predict(x, verbose=0), model.predict(x, verbose=0))
    # a second fit with the same callback directory starts where the first ended
    again = CheckpointCallback(tmp_path / "run")
    fresh = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(1)])
    fresh.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    assert again.initial_epoch(fresh) == 2 and again.restored_step == 8
    np.testing.assert_array_equal(fresh.predict(x, verbose=0), model.predict(x, verbose=0))
    again.close()


def test_callback_time_trigger_saves_when_the_interval_has_passed(tmp_path, monkeypatch):
    keras = pytest.importorskip("keras")
    import ckptfmt.manager as manager
    from ckptfmt.keras import CheckpointCallback

    now = [0.0]
    monkeypatch.setattr(manager, "_clock", lambda: now[0])

    class Tick(keras.callbacks.Callback):  # 10 s pass per step
        def on_train_batch_end(self, batch, logs=None):
            now[0] += 10.0

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x = np.ones((40, 2), np.float32)
    cb = CheckpointCallback(tmp_path / "run", save_every_seconds=25, max_to_keep=None, async_save=False)
    model.fit(x, x[:, :1], batch_size=4, epochs=1, callbacks=[Tick(), cb], verbose=0)  # 10 steps, 100 s
    assert cb.manager.all_steps() == [3, 6, 9, 10]  # every 30 s (the first step past 25 s), and the end of fit
    cb.close()
