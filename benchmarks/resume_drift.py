"""How close a resumed torch run stays to the Keras run it was converted from, on real architectures.

For each model of ``fixtures/realarch/models.py`` (keras.applications DenseNet, ResNet and
MobileNetV2, reduced; a ConvNeXt-like net; a VGG-style net): Keras trains 2 Adam steps and
is checkpointed, ``tf2torch`` converts it, then Keras and torch (``KerasAdam`` from
``--exact-optimizer``, and stock ``torch.optim.Adam``) both go on for ``--steps`` steps on the
same batches. Printed per step: the relative difference of the losses,
``|torch - keras| / |keras|``. Each framework computes its own gradients, so after the first
resumed step the runs differ by float32 gradient noise, amplified by training.

The row ``keras+1ulp`` is the yardstick: Keras resumed from the same checkpoint with every
variable multiplied by ``1 + 1.2e-7 * N(0, 1)`` (float32 rounding noise), against Keras
itself. Where it drifts as far as torch does, the drift is the model's sensitivity to float32
noise, not an error of the conversion.

    python benchmarks/resume_drift.py [--steps 5] [--models densenet,resnet]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parents[1]
MODELS = str(ROOT / "fixtures" / "realarch" / "models.py")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--models", default="densenet,resnet,mobilenet,convnext,vgg")
    args = ap.parse_args()

    import json

    import keras
    import numpy as np
    import tensorflow as tf
    import torch

    from ckptfmt.converters.convert import load_factory, tf_to_torch
    from ckptfmt.converters.optim import KerasAdam

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    rules = load_factory(f"{MODELS}:keras_vgg").__globals__["CONVNEXT_RULES"]
    print(f"relative loss difference |torch - keras| / |keras| per resumed step ({args.steps} steps, batch 4, Adam lr 1e-3)")
    for name in args.models.split(","):
        keras.utils.set_random_seed(0)
        km = load_factory(f"{MODELS}:keras_{name}")()
        opt = keras.optimizers.Adam(1e-3)
        rng = np.random.default_rng(0)
        data = [(rng.standard_normal((4, 32, 32, 3)).astype(np.float32), rng.integers(0, 10, 4)) for _ in range(2 + args.steps)]

        def keras_step(x, y, km=km, opt=opt):
            with tf.GradientTape() as tape:
                loss = loss_fn(y, km(x, training=True))
            opt.apply_gradients(zip(tape.gradient(loss, km.trainable_variables), km.trainable_variables))
            return float(loss)

        for x, y in data[:2]:
            keras_step(x, y)
        with tempfile.TemporaryDirectory() as d:
            prefix = tf.train.Checkpoint(model=km, optimizer=opt).write(os.path.join(d, "ckpt"))
            km2, opt2 = _keras_perturbed(name, prefix)
            runs = {"keras+1ulp": [keras_step(x, y, km2, opt2) for x, y in data[2:]]}
            mapping = None
            if name == "convnext":
                mapping = os.path.join(d, "rules.json")
                Path(mapping).write_text(json.dumps(rules))
            for label, exact in (("KerasAdam", True), ("torch Adam", False)):
                out = os.path.join(d, f"{label.replace(' ', '_')}.pt")
                tf_to_torch(prefix, out, model_factory=f"{MODELS}:{name}", keras_model=f"{MODELS}:keras_{name}",
                            mapping=mapping, exact_optimizer=exact, overwrite=True)
                ck = torch.load(out, weights_only=True)
                model = load_factory(f"{MODELS}:{name}")()[0]
                model.load_state_dict(ck["model"])
                topt = (KerasAdam if exact else torch.optim.Adam)(model.parameters(), **ck["optimizer_hyperparameters"])
                topt.load_state_dict(ck["optimizer"])
                model.train()
                losses = []
                for x, y in data[2:]:
                    topt.zero_grad()
                    loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())),
                                                             torch.from_numpy(y))
                    loss.backward()
                    topt.step()
                    losses.append(loss.item())
                runs[label] = losses
        keras_losses = [keras_step(x, y) for x, y in data[2:]]
        for label, losses in runs.items():
            rel = [abs(a - b) / abs(b) for a, b in zip(losses, keras_losses)]
            print(f"{name:10s} {label:10s} " + " ".join(f"{r:.1e}" for r in rel))
        sys.stdout.flush()


def _keras_perturbed(name: str, prefix: str) -> tuple:
    """The Keras model and Adam restored from ``prefix``, every variable perturbed at float32 rounding level."""
    import keras
    import numpy as np
    import tensorflow as tf

    from ckptfmt.converters.convert import load_factory

    keras.utils.set_random_seed(0)
    km = load_factory(f"{MODELS}:keras_{name}")()
    opt = keras.optimizers.Adam(1e-3)
    opt.build(km.trainable_variables)
    tf.train.Checkpoint(model=km, optimizer=opt).read(prefix).assert_consumed()
    rng = np.random.default_rng(1)
    for v in km.variables:
        a = np.asarray(v.numpy())
        if a.dtype.kind == "f":
            v.assign((a * (1 + 1.2e-7 * rng.standard_normal(a.shape))).astype(a.dtype))
    return km, opt


if __name__ == "__main__":
    main()
