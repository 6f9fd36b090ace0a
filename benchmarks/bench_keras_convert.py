"""Benchmark `tf2torch` on a Keras 3 ``.weights.h5`` with its Adam state against the routes a user would take.

    python benchmarks/bench_keras_convert.py [--gib 1.0] [--runs 3] [--quick] [--dir DIR]

The source is written by Keras 3 itself (``model.save_weights`` after ``optimizer.build``): an
MLP of ``Dense(2048)`` layers sized so weights + Adam's two slots are about ``--gib`` GiB. Each
tool turns it into a ``.pt`` holding the torch ``state_dict`` (kernels transposed) and the
optimizer state, in a fresh process, the tools' order rotated every round:

* ours: ``tf_to_torch(src, out.pt, model_factory=..., exact_optimizer=True)`` (what
  ``ckptfmt convert tf2torch`` runs; the HDF5 structure is checked in a child process first);
* h5py: h5py reads every dataset, numpy transposes, slots paired by position by hand,
  ``torch.save`` (the script a user writes once they know the layout);
* keras-torch: Keras 3 with ``KERAS_BACKEND=torch`` builds the model, ``load_weights``, then
  the variables' tensors (transposed) and the optimizer's go to ``torch.save``.

Wall time includes interpreter start and imports. Peak RSS is the child's own ``VmHWM``.
The source is in the page cache for every run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

WIDTH = 2048

MAKE = r"""
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import keras
n, width, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
layers = [keras.Input((width,))] + [keras.layers.Dense(width) for _ in range(n)]
m = keras.Sequential(layers)
m.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
m.optimizer.build(m.trainable_variables)
m.save_weights(out)
print("{}")
"""

FACTORY = r"""
import torch
from torch import nn

N, WIDTH = {n}, {width}


def make():
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(N)]), torch.zeros(1, WIDTH)
"""

PEAK = r"""
def _peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
"""

OURS = PEAK + r"""
import json, sys, time
t0 = time.perf_counter()
from ckptfmt.converters.convert import tf_to_torch
tf_to_torch(sys.argv[1], sys.argv[2], model_factory=sys.argv[3], exact_optimizer=True, overwrite=True)
print(json.dumps({"peak": _peak()}))
"""

H5PY = PEAK + r"""
import json, sys
import h5py, numpy as np, torch
src, dst = sys.argv[1], sys.argv[2]
f = h5py.File(src, "r")
names = sorted(f["layers"], key=lambda s: int(s.rpartition("_")[2]) if s[-1].isdigit() and "_" in s else 0)
sd, order = {}, []
for i, name in enumerate(names):
    k, b = f[f"layers/{name}/vars/0"][()], f[f"layers/{name}/vars/1"][()]
    sd[f"{i}.weight"] = torch.from_numpy(np.ascontiguousarray(k.T))
    sd[f"{i}.bias"] = torch.from_numpy(b)
    order += [(f"{i}.weight", True), (f"{i}.bias", False)]
opt = f["optimizer/vars"]
step = int(opt["0"][()])
state = {}
for j, (key, transpose) in enumerate(order):
    m, v = opt[str(2 + 2 * j)][()], opt[str(3 + 2 * j)][()]
    if transpose:
        m, v = np.ascontiguousarray(m.T), np.ascontiguousarray(v.T)
    state[j] = {"step": torch.tensor(float(step)), "exp_avg": torch.from_numpy(m), "exp_avg_sq": torch.from_numpy(v)}
torch.save({"model": sd, "optimizer": {"state": state, "param_groups": [{"params": list(range(len(order))), "lr": float(opt["1"][()])}]}}, dst)
print(json.dumps({"peak": _peak()}))
"""

KERAS_TORCH = PEAK + r"""
import json, os, sys
os.environ["KERAS_BACKEND"] = "torch"
import keras, torch
src, dst, n, width = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
m = keras.Sequential([keras.Input((width,))] + [keras.layers.Dense(width) for _ in range(n)])
m.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
m.optimizer.build(m.trainable_variables)
m.load_weights(src)
sd = {}
for i, layer in enumerate(m.layers):
    sd[f"{i}.weight"] = layer.kernel.value.detach().T.contiguous()
    sd[f"{i}.bias"] = layer.bias.value.detach()
opt = {v.path: v.value.detach() for v in m.optimizer.variables}
torch.save({"model": sd, "optimizer": opt}, dst)
print(json.dumps({"peak": _peak()}))
"""


def main() -> int:
    p = C.parser(__doc__)
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    gib = 0.1 if args.quick else args.gib
    runs = 1 if args.quick else args.runs
    per_layer = 3 * (WIDTH * WIDTH + WIDTH) * 4
    n = max(1, round(gib * C.GiB / per_layer))
    C.header("tf2torch of a Keras 3 .weights.h5 with Adam state", layers=n, width=WIDTH, runs=runs)
    with C.scratch_dir(int(3.5 * n * per_layer), args.dir) as d:
        src = d / "model.weights.h5"
        C.run_child(MAKE.replace("sys.argv[1]", str(n)).replace("sys.argv[2]", str(WIDTH)).replace("sys.argv[3]", repr(str(src))))
        factory = d / "factory.py"
        factory.write_text(FACTORY.format(n=n, width=WIDTH))
        print(f"   source: {C.fmt_bytes(src.stat().st_size)} ({n} Dense({WIDTH}) layers, Adam slots)")
        tools = {
            "ours": lambda: OURS.replace("sys.argv[1]", repr(str(src))).replace("sys.argv[2]", repr(str(d / "ours.pt")))
            .replace("sys.argv[3]", repr(f"{factory}:make")),
            "h5py": lambda: H5PY.replace("sys.argv[1], sys.argv[2]", f"{str(src)!r}, {str(d / 'h5py.pt')!r}"),
            "keras-torch": lambda: KERAS_TORCH.replace("sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])",
                                                       f"{str(src)!r}, {str(d / 'kt.pt')!r}, {n}, {WIDTH}"),
        }
        import time

        times: dict[str, list[float]] = {t: [] for t in tools}
        peaks: dict[str, list[int]] = {t: [] for t in tools}
        names = list(tools)
        for r in range(runs):
            for t in names[r % len(names):] + names[: r % len(names)]:  # rotate the order every round
                t0 = time.perf_counter()
                out = C.run_child(tools[t]())
                times[t].append(time.perf_counter() - t0)
                peaks[t].append(out["peak"])
                for f in d.glob("*.pt"):
                    f.unlink()
        base = C.median(times["ours"])
        rows = [(t, C.fmt_s(C.median(times[t])), f"{C.median(times[t]) / base:.2f}x", C.fmt_bytes(max(peaks[t])),
                 f"{max(peaks[t]) / max(peaks['ours']):.2f}x") for t in names]
        C.table(["tool", "wall (median)", "vs ours", "peak RSS", "vs ours"], rows)
        print(json.dumps({"times": times, "peaks": peaks}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
