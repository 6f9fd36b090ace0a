"""A Keras 3 fit killed with SIGKILL while it saves: what is left to resume from.

Two runs of the same model and data, each killed N times at a random moment after saving
started, then restarted:

* ``ModelCheckpoint("m.keras", save_freq=1)`` (Keras's own, rewriting one file every step);
* ``ckptfmt.keras.CheckpointCallback(save_every_steps=1)`` (step-N directories, atomic commit).

After each kill it reports whether a checkpoint is left that loads (``keras.saving.load_model``
for the ``.keras``; ``ckptfmt.verify`` + the newest complete step for ckptfmt) and how large the
file was. This is a report, not an assertion (the test suite asserts ckptfmt's side:
``tests/manager/test_keras_callback.py``); Keras's outcome depends on where the kill lands,
so it varies from run to run.

Run::

    python benchmarks/bench_keras_kill.py --kills 10 --width 1024
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

CHILD = textwrap.dedent('''
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np, keras
    run, tool, width = sys.argv[1], sys.argv[2], int(sys.argv[3])
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(width, activation="relu"),
                              keras.layers.Dense(width, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    x = np.random.default_rng(0).standard_normal((4096, 64)).astype("float32")
    y = x[:, :1]
    if tool == "keras":
        cb = keras.callbacks.ModelCheckpoint(os.path.join(run, "m.keras"), save_freq=1)
        start = 0
    else:
        from ckptfmt.keras import CheckpointCallback
        cb = CheckpointCallback(run, save_every_steps=1, max_to_keep=2)
        start = cb.initial_epoch(model)
    print("started", flush=True)
    model.fit(x, y, batch_size=8, epochs=1000, initial_epoch=start, callbacks=[cb], verbose=0)
''')

CHECK_KERAS = textwrap.dedent('''
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import keras
    try:
        m = keras.saving.load_model(sys.argv[1])
        print("ok", int(m.optimizer.iterations.numpy()))
    except Exception as e:
        print("lost", type(e).__name__)
''')


def kill_once(script: Path, run: Path, tool: str, width: int, rng: random.Random) -> None:
    p = subprocess.Popen([sys.executable, str(script), str(run), tool, str(width)], stdout=subprocess.PIPE,
                         stderr=open(run / "stderr.log", "a"), text=True)
    p.stdout.readline()
    # wait until this process has completed a save, then kill somewhere in the saves that follow:
    # ckptfmt, a new committed step (its MANIFEST); Keras, its file rewritten twice (so the
    # first rewrite finished)
    done_before = {q.name for q in run.glob("step-*") if (q / "MANIFEST").is_file()}
    mtimes: set[int] = set()

    def marker() -> bool:
        if tool == "keras":
            f = run / "m.keras"
            if f.exists():
                mtimes.add(f.stat().st_mtime_ns)
            return len(mtimes) >= 2
        return bool({q.name for q in run.glob("step-*") if (q / "MANIFEST").is_file()} - done_before)

    deadline = time.monotonic() + 300
    while not marker() and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 2.0))
    p.send_signal(signal.SIGKILL)
    p.wait()
    p.stdout.close()


def state_keras(run: Path) -> dict:
    f = run / "m.keras"
    if not f.exists():
        return {"loadable": False, "bytes": 0, "detail": "no file"}
    out = subprocess.run([sys.executable, "-c", CHECK_KERAS, str(f)], capture_output=True, text=True).stdout.split()
    return {"loadable": bool(out) and out[0] == "ok", "bytes": f.stat().st_size, "detail": " ".join(out)}


def state_ckptfmt(run: Path) -> dict:
    import ckptfmt

    steps = sorted(int(p.name.split("-")[1]) for p in run.glob("step-*") if (p / "MANIFEST").is_file())
    if not steps:
        return {"loadable": False, "bytes": 0, "detail": "no complete step"}
    ok = ckptfmt.verify(run / f"step-{steps[-1]}").ok
    size = sum(f.stat().st_size for f in (run / f"step-{steps[-1]}").iterdir())
    return {"loadable": ok, "bytes": size, "detail": f"newest complete step {steps[-1]}"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--width", type=int, default=1024, help="hidden width (1024: ~13 MB .keras with Adam)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    results: dict[str, list[dict]] = {"keras": [], "ckptfmt": []}
    with tempfile.TemporaryDirectory(dir=os.environ.get("CKPTFMT_BENCH_DIR")) as tmp:
        script = Path(tmp) / "train.py"
        script.write_text(CHILD)
        for i in range(args.kills):
            for tool in ("keras", "ckptfmt") if i % 2 == 0 else ("ckptfmt", "keras"):  # alternate the order
                run = Path(tmp) / f"run-{tool}"  # not "ckptfmt": the script's directory is on sys.path
                run.mkdir(exist_ok=True)
                kill_once(script, run, tool, args.width, rng)
                state = (state_keras if tool == "keras" else state_ckptfmt)(run)
                results[tool].append(state)
                print(f"kill {i + 1}: {tool:8s} loadable={state['loadable']!s:5s} {state['bytes']:>11,d} bytes  {state['detail']}",
                      flush=True)
    for tool, rows in results.items():
        lost = sum(not r["loadable"] for r in rows)
        print(f"{tool:8s}: {len(rows) - lost}/{len(rows)} kills left a loadable checkpoint")
    print(json.dumps({t: [r["loadable"] for r in rows] for t, rows in results.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
