"""Peak memory of `tf2torch` with the optimizer state: keras.applications.VGG16 with Adam.

    python benchmarks/bench_tf2torch_memory.py [--runs 2] [--quick] [--dir DIR] [--before REV] [--source DIR]

Keras 3 builds ``keras.applications.VGG16(weights=None)`` (224x224, 138M parameters), trains
one Adam step on random data and saves it twice: a TF checkpoint
(``tf.train.Checkpoint(model=..., optimizer=...).write``) and a ``.weights.h5``
(``model.save_weights``). Each tool then runs in a fresh process (order rotated every round):

* ``ours .pt``: ``tf_to_torch(ckpt, out.pt, model_factory=vgg16)`` (what ``ckptfmt convert
  tf2torch --model`` runs), weights + Adam state into a ``torch.save``-format file;
* ``ours dir``: the same into a ckptfmt checkpoint directory;
* ``ours .pt from .h5``: the ``.weights.h5`` source into a ``.pt``;
* ``h5py peer``: the hand-written script: h5py reads every dataset, numpy transposes (and
  permutes fc1's rows from Keras's HWC flatten to torch's CHW), slots paired by position,
  ``torch.save`` (no torch model is built);
* ``model only``: imports and builds the torch model (a faithful twin of torchvision's
  ``vgg16``) plus its example forward, converting nothing: what every ``--model`` run holds.

With ``--before REV`` the same two conversions also run on the code of commit REV (its
``ckptfmt`` tree exported and put first on ``PYTHONPATH``): ``before .pt`` and ``before dir``.

Peak RSS is each child's own ``VmHWM``. The target (issue 11) is peak <= 1.3 x (largest
tensor + torch model); the largest tensor is fc1's kernel, 25088 x 4096 float32 = 411 MB.
Before this change, tf2torch to ``.pt`` peaked at 2.5x the checkpoint (4.2 GB for 1.66 GB)
and to a ckptfmt directory at 4.3 GB (issue 11's figures).
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from bench_keras_convert import PEAK  # noqa: E402

LARGEST = 25088 * 4096 * 4
BEFORE = {"ours .pt": 4.2e9, "ours dir": 4.3e9}  # issue 11, measured on the previous code

MAKE = r"""
import os, sys, json
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np, keras, tensorflow as tf
out = sys.argv[1]
keras.utils.set_random_seed(0)
m = keras.applications.VGG16(weights=None)
m.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy")
rng = np.random.default_rng(0)
m.train_on_batch(rng.standard_normal((2, 224, 224, 3)).astype("float32"), rng.integers(0, 1000, 2))
tf.train.Checkpoint(model=m, optimizer=m.optimizer).write(os.path.join(out, "ckpt"))
m.save_weights(os.path.join(out, "vgg16.weights.h5"))
print("{}")
"""

# torchvision.models.vgg16's module tree and forward, written out (its wheel does not import
# next to CPU torch here); the state_dict keys and shapes are torchvision's.
FACTORY = r"""
import torch
from torch import nn

CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG(nn.Module):
    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for v in CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(c, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(0.5),
                                        nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(0.5), nn.Linear(4096, 1000))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def vgg16():
    return VGG(), torch.zeros(1, 3, 224, 224)
"""

OURS = PEAK + r"""
import json, sys
from ckptfmt.converters.convert import tf_to_torch
import ckptfmt.converters.convert as _c
assert _c.__file__.startswith(CODE), _c.__file__  # the code this row names
tf_to_torch(SRC, DST, model_factory=FACTORY, overwrite=True, progress=False)
print(json.dumps({"peak": _peak()}))
"""

MODEL_ONLY = PEAK + r"""
import json, torch
from ckptfmt.converters.convert import load_factory, tf_to_torch
model, x = load_factory(FACTORY)()
with torch.no_grad():
    model.eval()(x)
print(json.dumps({"peak": _peak(), "model": sum(t.numel() * t.element_size() for t in model.state_dict().values())}))
"""

H5PY = PEAK + r"""
import io
import json
import h5py, numpy as np, torch
f = h5py.File(SRC, "r")
# Keras 3 names the groups after the layer classes (conv2d, conv2d_1, ..., dense, dense_2)
def _order(name):
    base, _, n = name.rpartition("_")
    return (base, int(n)) if n.isdigit() else (name, 0)
names = sorted((n for n in f["layers"] if n.startswith(("conv2d", "dense"))), key=lambda n: (n.startswith("dense"), _order(n)))
torch_names = [f"features.{i}" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)] + [f"classifier.{i}" for i in (0, 3, 6)]

def layout(k):
    if k.ndim == 4:  # HWIO -> OIHW
        return np.ascontiguousarray(k.transpose(3, 2, 0, 1))
    if k.shape[0] == 25088:  # Keras flattens HWC, torch CHW
        return np.ascontiguousarray(k.reshape(7, 7, 512, -1).transpose(3, 2, 0, 1).reshape(k.shape[1], -1))
    return np.ascontiguousarray(k.T)

sd, order = {}, []
for name, tname in zip(names, torch_names):
    k, b = f[f"layers/{name}/vars/0"][()], f[f"layers/{name}/vars/1"][()]
    sd[f"{tname}.weight"] = torch.from_numpy(layout(k))
    sd[f"{tname}.bias"] = torch.from_numpy(b)
    order += [k.shape, b.shape]
opt = f["optimizer/vars"]
step = int(opt["0"][()])
state = {}
for j, shape in enumerate(order):
    m, v = opt[str(2 + 2 * j)][()], opt[str(3 + 2 * j)][()]
    assert m.shape == v.shape == shape, (j, m.shape, shape)  # slots paired by position
    if len(shape) > 1:
        m, v = layout(m), layout(v)
    state[j] = {"step": torch.tensor(float(step)), "exp_avg": torch.from_numpy(m), "exp_avg_sq": torch.from_numpy(v)}
torch.save({"model": sd, "optimizer": {"state": state, "param_groups": [{"params": list(range(len(order))), "lr": float(opt["1"][()]),
            "betas": (0.9, 0.999), "eps": 1e-7, "weight_decay": 0.0, "amsgrad": False}]}}, DST)
print(json.dumps({"peak": _peak()}))
"""


def _child(code: str, **values: str) -> str:
    for k, v in values.items():
        code = code.replace(k, repr(v))
    return code


def _export(rev: str, where: Path) -> str:
    """The package tree of commit ``rev`` (ckptfmt/, converters/ and cli/ as installed) under ``where``."""
    import subprocess
    import tarfile

    src = where / "src"
    src.mkdir(parents=True)
    tar = subprocess.run(["git", "archive", rev, "ckptfmt", "converters", "cli"], cwd=C.REPO, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(src, filter="data")
    pkg = where / "pkg"
    pkg.mkdir()
    (src / "ckptfmt").rename(pkg / "ckptfmt")
    (src / "converters").rename(pkg / "ckptfmt" / "converters")
    (src / "cli").rename(pkg / "ckptfmt" / "cli")
    return str(pkg)


def main() -> int:
    p = C.parser(__doc__)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--before", metavar="REV", help="also run the previous code of this commit")
    p.add_argument("--source", metavar="DIR", help="reuse ckpt* and vgg16.weights.h5 written by an earlier run's MAKE step")
    args = p.parse_args()
    runs = 1 if args.quick else args.runs
    C.header("tf2torch peak memory: keras.applications.VGG16 + Adam", runs=runs)
    with C.scratch_dir(12 * C.GiB, args.dir) as d:
        src = Path(args.source) if args.source else d
        if not args.source:
            C.run_child(MAKE.replace("sys.argv[1]", repr(str(d))))
        (d / "factory.py").write_text(FACTORY)
        factory = f"{d / 'factory.py'}:vgg16"
        ckpt, h5 = str(src / "ckpt"), str(src / "vgg16.weights.h5")
        size = sum(f.stat().st_size for f in src.glob("ckpt*"))
        print(f"   sources: TF checkpoint {C.fmt_bytes(size)}, .weights.h5 {C.fmt_bytes(Path(h5).stat().st_size)}; "
              f"largest tensor {C.fmt_bytes(LARGEST)} (fc1 kernel)")
        tools = {
            "model only": _child(MODEL_ONLY, FACTORY=factory),
            "ours .pt": _child(OURS, SRC=ckpt, DST=str(d / "ours.pt"), FACTORY=factory, CODE=str(C.REPO)),
            "ours dir": _child(OURS, SRC=ckpt, DST=str(d / "ours-dir"), FACTORY=factory, CODE=str(C.REPO)),
            "ours .pt from .h5": _child(OURS, SRC=h5, DST=str(d / "ours-h5.pt"), FACTORY=factory, CODE=str(C.REPO)),
            "h5py peer": _child(H5PY, SRC=h5, DST=str(d / "peer.pt")),
        }
        if args.before:
            # first on sys.path: the child's cwd (the repository) would otherwise come first
            first = f"import sys; sys.path.insert(0, {_export(args.before, d / 'before')!r})\n"
            tools["before .pt"] = first + _child(OURS, SRC=ckpt, DST=str(d / "before.pt"), FACTORY=factory, CODE=str(d / "before"))
            tools["before dir"] = first + _child(OURS, SRC=ckpt, DST=str(d / "before-dir"), FACTORY=factory, CODE=str(d / "before"))
        names = list(tools)
        peaks: dict[str, list[int]] = {t: [] for t in names}
        times: dict[str, list[float]] = {t: [] for t in names}
        model_bytes = 0
        for r in range(runs):
            for t in names[r % len(names):] + names[: r % len(names)]:  # rotate the order every round
                t0 = time.perf_counter()
                out = C.run_child(tools[t])
                times[t].append(time.perf_counter() - t0)
                peaks[t].append(out["peak"])
                model_bytes = out.get("model", model_bytes)
                for f in d.glob("*.pt"):
                    f.unlink()
                C.remove(d / "ours-dir")
                C.remove(d / "before-dir")
        budget = LARGEST + model_bytes
        base = C.median(peaks["model only"])
        rows = []
        for t in names:
            peak = C.median(peaks[t])
            prev = t.replace("ours", "before")
            before = C.median(peaks[prev]) if t.startswith("ours") and prev in peaks else BEFORE.get(t)
            rows.append((t, C.fmt_s(C.median(times[t])), C.fmt_bytes(peak), f"{peak / budget:.2f}x",
                         f"{(peak - base) / LARGEST:.2f}x" if t != "model only" else "-",
                         f"{peak / C.median(peaks['h5py peer']):.2f}x",
                         f"{C.fmt_bytes(before)} = {before / budget:.2f}x" if before else "-"))
        C.table(["tool", "wall (median)", "peak RSS (median)", "/ (largest + model)", "(peak - model only) / largest",
                 "vs h5py peer", "before (--before, else issue 11)"], rows)
        print(f"   torch model {C.fmt_bytes(model_bytes)}, largest + model = {C.fmt_bytes(budget)}; target <= 1.30x; "
              f"checkpoint {C.fmt_bytes(size)}")
        print(json.dumps({"peaks": peaks, "times": times, "model": model_bytes, "checkpoint": size}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
