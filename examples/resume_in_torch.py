"""Resume a Keras training run in PyTorch, with the same numbers, and hand it back to Keras.

The bundled example `fixtures/examples/cnn_adam` is a Keras 3 CNN trained 3 steps with Adam
(its `expected.npz` holds the batches Keras trained on next, and Keras's losses on them).
This script converts the checkpoint (weights and Adam state) to a torch checkpoint, builds
the torch twin of the model (`fixtures/examples/models.py:cnn`), continues training with
`KerasAdam` (Keras's update rule in torch) and prints its losses beside Keras's. Then it
writes the resumed run back as a TF checkpoint that Keras restores. TensorFlow is not needed.

Run: python examples/resume_in_torch.py [OUTPUT_DIR]
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np
import torch

from ckptfmt.converters.convert import load_factory, tf_to_torch, torch_to_tf
from ckptfmt.converters.optim import KerasAdam

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(HERE, "..", "fixtures", "examples", "cnn_adam")
FACTORY = os.path.join(HERE, "..", "fixtures", "examples", "models.py") + ":cnn"


def main(out_dir: str) -> float:
    # 1. Keras -> torch: the report says how each tensor and optimizer slot was carried over.
    resumed = os.path.join(out_dir, "cnn_adam.pt")
    report = tf_to_torch(EXAMPLE, resumed, model_factory=FACTORY, exact_optimizer=True, overwrite=True)
    print(f"converted {len(report.plan.entries)} plan entries; optimizer: {report.optimizer}")

    # 2. Build the torch model and optimizer and load the converted state.
    ckpt = torch.load(resumed, weights_only=True)
    model = load_factory(FACTORY)()[0]
    model.load_state_dict(ckpt["model"])
    opt = KerasAdam(model.parameters(), **ckpt["optimizer_hyperparameters"])
    opt.load_state_dict(ckpt["optimizer"])

    # 3. Train on the batches Keras trained on after its checkpoint: the losses agree.
    want = np.load(os.path.join(EXAMPLE, "expected.npz"))
    model.train()
    losses = []
    for x, y in zip(want["next_x"], want["next_y"]):
        opt.zero_grad()
        logits = model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))  # NHWC -> NCHW
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y).long())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    drift = float(np.max(np.abs(np.array(losses) - want["next_losses"])))
    for i, (mine, theirs) in enumerate(zip(losses, want["next_losses"])):
        print(f"step {4 + i}: torch loss {mine:.7f}   keras loss {float(theirs):.7f}")
    print(f"largest difference: {drift:.2e}")

    # 4. torch -> Keras: the original checkpoint is the template (object graph, keys, dtypes).
    back = os.path.join(out_dir, "tf", "ckpt-1")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "optimizer_class": "KerasAdam"}, resumed)
    torch_to_tf(resumed, back, template=EXAMPLE, model_factory=FACTORY, overwrite=True)
    print(f"wrote {back}: restore it with tf.train.Checkpoint(model=..., optimizer=...).restore(...)")
    return drift


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="ckptfmt-resume-")
    os.makedirs(out, exist_ok=True)
    sys.exit(0 if main(out) < 1e-5 else 1)
