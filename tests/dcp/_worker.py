"""One rank of a multi-process DCP test, started by tests/dcp/test_dcp.py as a subprocess.

Usage: python _worker.py RANK WORLD PORT MODE WORKDIR

Modes:
  save4   FSDP2-shard a SqueezeNet 1.1, take one Adam step, save it with
          ckptfmt.dcp.Writer to WORKDIR/ck4 and with DCP's FileSystemWriter to
          WORKDIR/dcp4; rank 0 writes the full (unsharded) state to WORKDIR/ref4.npz and
          the digest to ck4.digest. Then a step is saved over ck4 and rank 0 (the
          coordinator) SIGKILLs itself mid-save.
  load2   load WORKDIR/ck4 into a freshly initialised sharded model on this world size,
          compare the full state with ref4.npz bit for bit; then save WORKDIR/inc-a into the
          run's shared store, change rows only rank 0 holds, save WORKDIR/inc-b incrementally
          (parent inc-a) and write WORKDIR/ref-b.npz. Then a step is saved over inc-a (into
          the store) and rank 1 SIGKILLs itself mid-save.

Killed ranks die right after writing their first tensor's data (a bounded, repeatable
"mid-save"); the surviving ranks fail when their peer's connection closes.
"""

from __future__ import annotations

import datetime
import os
import signal
import sys

import numpy as np
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

import ckptfmt.dcp  # noqa: E402


def flat(tree, prefix=()):
    """{path tuple: value} of the tensors of a nested state."""
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flat(v, prefix + (str(k),)))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out.update(flat(v, prefix + (str(i),)))
    elif isinstance(tree, (torch.Tensor, np.ndarray)):
        out[prefix] = tree
    return out


def as_numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


class Fire(torch.nn.Module):
    """SqueezeNet's Fire module (Iandola et al. 2016), named as torchvision names it."""

    def __init__(self, cin: int, squeeze: int, e1: int, e3: int) -> None:
        super().__init__()
        self.squeeze = torch.nn.Conv2d(cin, squeeze, 1)
        self.expand1x1 = torch.nn.Conv2d(squeeze, e1, 1)
        self.expand3x3 = torch.nn.Conv2d(squeeze, e3, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.expand1x1(x)), torch.relu(self.expand3x3(x))], 1)


class SqueezeNet11(torch.nn.Module):
    """A twin of torchvision's squeezenet1_1 (same layers, parameter names and shapes).

    torchvision itself is not a dependency (its registry wheel needs Pillow and compiled
    ops that do not load next to CPU torch).
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        pool = lambda: torch.nn.MaxPool2d(3, 2, ceil_mode=True)  # noqa: E731
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 64, 3, stride=2), torch.nn.ReLU(inplace=True), pool(),
            Fire(64, 16, 64, 64), Fire(128, 16, 64, 64), pool(),
            Fire(128, 32, 128, 128), Fire(256, 32, 128, 128), pool(),
            Fire(256, 48, 192, 192), Fire(384, 48, 192, 192), Fire(384, 64, 256, 256), Fire(512, 64, 256, 256),
        )
        self.classifier = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Conv2d(512, num_classes, 1),
                                              torch.nn.ReLU(inplace=True), torch.nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return self.classifier(self.features(x)).flatten(1).clone()


def build(seed: int):
    torch.manual_seed(seed)
    model = SqueezeNet11(num_classes=10)
    fully_shard(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return model, opt


def step(model, opt, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, 32, 32, generator=g)
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()


def sharded_state(model, opt) -> dict:
    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd}


def full_state(model, opt) -> dict:
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"model": msd, "optim": osd}


def save_ref(state: dict, path: str) -> None:
    np.savez(path, **{"/".join(k): as_numpy(v) for k, v in flat(state).items()})


def compare(state: dict, ref_path: str) -> None:
    ref = np.load(ref_path)
    got = {"/".join(k): as_numpy(v) for k, v in flat(state).items()}
    assert sorted(got) == sorted(ref.files), (sorted(set(got) ^ set(ref.files)))[:5]
    for k in ref.files:
        a, b = got[k], ref[k]
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), f"{k} differs"


def die_mid_save(rank: int, victim: int) -> None:
    """Make rank ``victim`` SIGKILL itself right after it wrote its first tensor's data."""
    if rank != victim:
        return
    import ckptfmt.dcp as d

    real = d._write_tensor

    def write_then_die(arr, chunk_size, hasher, files, *args):
        real(arr, chunk_size, hasher, files, *args)
        if files.handle.tell():  # some of this rank's new data is on disk
            os.kill(os.getpid(), signal.SIGKILL)

    d._write_tensor = write_then_die


def write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def main() -> None:
    rank, world, port, mode, work = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        if mode == "save4":
            model, opt = build(seed=1)
            step(model, opt, seed=2)
            state = sharded_state(model, opt)
            ck4 = os.path.join(work, "ck4")
            writer = ckptfmt.dcp.Writer(ck4, chunk_size=64 * 1024)
            dcp.save(state, storage_writer=writer)
            dcp.save(state, storage_writer=dcp.FileSystemWriter(os.path.join(work, "dcp4")))
            full = full_state(model, opt)
            if rank == 0:
                save_ref(full, os.path.join(work, "ref4.npz"))
                write(os.path.join(work, "ck4.digest"), writer.digest)
            dist.barrier()
            # Then the coordinator dies while the next step is saved over ck4.
            step(model, opt, seed=3)
            die_mid_save(rank, 0)
            dcp.save(sharded_state(model, opt), storage_writer=ckptfmt.dcp.Writer(ck4, overwrite=True, chunk_size=64 * 1024))
        elif mode == "load2":
            model, opt = build(seed=99)
            step(model, opt, seed=98)  # different values everywhere, and an optimizer state to load into
            state = sharded_state(model, opt)
            dcp.load(state, storage_reader=ckptfmt.dcp.Reader(os.path.join(work, "ck4")))
            set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
            full = full_state(model, opt)
            if rank == 0:
                compare(full, os.path.join(work, "ref4.npz"))
                write(os.path.join(work, "load2.ok"), "bit-exact")
            # Incremental: change rows of one weight that only rank 0 holds.
            inc_a = os.path.join(work, "inc-a")
            wa = ckptfmt.dcp.Writer(inc_a, chunk_size=4096, shared_store=True)
            dcp.save(sharded_state(model, opt), storage_writer=wa)
            w = model.classifier[1].weight  # a DTensor sharded on dim 0
            with torch.no_grad():
                if rank == 0:
                    w.to_local()[0].add_(1.0)
            dcp.save(sharded_state(model, opt), storage_writer=ckptfmt.dcp.Writer(os.path.join(work, "inc-b"), parent=inc_a))
            full = full_state(model, opt)
            if rank == 0:
                save_ref(full, os.path.join(work, "ref-b.npz"))
                write(os.path.join(work, "inc-a.digest"), wa.digest)
            dist.barrier()
            # Then rank 1 dies while a new step is saved over inc-a (the parent of inc-b).
            step(model, opt, seed=97)
            die_mid_save(rank, 1)
            dcp.save(sharded_state(model, opt), storage_writer=ckptfmt.dcp.Writer(inc_a, overwrite=True, chunk_size=4096, shared_store=True))
        else:
            raise SystemExit(f"unknown mode {mode}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
