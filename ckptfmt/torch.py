"""Save and restore live PyTorch training state with ckptfmt.

Example:
    >>> import torch, tempfile, os, ckptfmt.torch
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = torch.optim.Adam(model.parameters())
    >>> path = os.path.join(tempfile.mkdtemp(), "step-0")
    >>> ckptfmt.torch.save(path, model=model, optimizer=opt, epoch=0)
    >>> ckptfmt.torch.restore(path, model=model, optimizer=opt)
    {'epoch': 0}

Importing this module without torch installed raises
:class:`~ckptfmt.errors.FrameworkNotAvailableError`, which names the extra to install.
"""

from __future__ import annotations

__all__ = ["save", "restore", "load_torch_file"]

import os
import pickle
from typing import Any

# Imported first: raises FrameworkNotAvailableError("torch", "torch") when torch is missing.
from ckptfmt.adapters import torch as _adapter

# isort: split
import torch

import ckptfmt
from ckptfmt.errors import CheckpointNotFoundError, FormatError


def save(
    path: str | os.PathLike[str],
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    metadata: Any = None,
    overwrite: bool = False,
    **extra: Any,
) -> None:
    """Save a model, optimizer, LR scheduler and any extra values as one checkpoint.

    Parameters and buffers are saved from ``state_dict()``; tied weights are stored once
    and come back tied. Tensors on any device are saved from their CPU copy (CPU tensors
    are not copied). ``extra`` values may be tensors, plain values, or dicts/lists/tuples
    of them, e.g. ``epoch=3, rng=torch.get_rng_state()``.

    Args:
        path: where to write the checkpoint.
        model, optimizer, scheduler: the objects whose ``state_dict()`` to save.
        metadata: any msgpack-able value, stored as the checkpoint's metadata.
        overwrite: replace an existing checkpoint at ``path``.
        **extra: more values to save; :func:`restore` returns them.

    Raises:
        UnsupportedDtypeError: a value or tensor dtype cannot be stored (its path is named).
        CheckpointExistsError: ``path`` exists and ``overwrite`` is false.

    Example:
        >>> ckptfmt.torch.save("ckpt/step-100", model=model, optimizer=opt, step=100)  # doctest: +SKIP
    """
    state = _adapter.to_state(model=model, optimizer=optimizer, scheduler=scheduler, extra=extra)
    ckptfmt.save(state, path, metadata=metadata, overwrite=overwrite)


def restore(
    path: str | os.PathLike[str],
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    strict: bool = True,
    map_location: Any = None,
) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save` into live objects.

    Values are copied into the model's parameters and buffers on their current devices;
    optimizer state follows its parameters. Training continues exactly as if it had not
    been interrupted.

    Args:
        path: the checkpoint to read.
        model, optimizer, scheduler: objects to load state into (each is optional).
        strict: require the model's keys to match exactly and every object passed to have
            state in the checkpoint.
        map_location: device for the returned extra tensors (default: CPU).

    Returns:
        The ``extra`` values given to :func:`save`, tensors as torch tensors.

    Raises:
        CheckpointNotFoundError: nothing at ``path``.
        ConversionError: missing/unexpected keys or shape mismatches (all listed), or an
            object with no state in the checkpoint.
        FormatError: ``path`` is not a torch checkpoint written by ckptfmt.

    Example:
        >>> extra = ckptfmt.torch.restore("ckpt/step-100", model=model, optimizer=opt)  # doctest: +SKIP
        >>> extra["step"]  # doctest: +SKIP
        100
    """
    return _adapter.from_state(
        ckptfmt.load(path),
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        strict=strict,
        map_location=map_location,
    )


def load_torch_file(path: str | os.PathLike[str], *, mmap: bool = False) -> Any:
    """Read a ``.pt`` / ``.bin`` file written by ``torch.save``, safely: the one loader.

    Always ``torch.load(path, weights_only=True, map_location="cpu")``: only tensors and
    plain containers are rebuilt, never arbitrary pickled objects, so files from untrusted
    sources cannot run code. With ``mmap``, a zip archive (torch >= 1.6) is memory-mapped
    instead of read; a legacy file, which cannot be, is read.

    Raises:
        CheckpointNotFoundError: no file at ``path``.
        FormatError: the file is not a torch file, is damaged, or holds objects that
            weights-only loading refuses (the message names the file).

    Example:
        >>> state = ckptfmt.torch.load_torch_file("pytorch_model.bin")  # doctest: +SKIP
    """
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise CheckpointNotFoundError(f"no torch file at {name!r}")
    try:
        if mmap:
            try:
                return torch.load(name, weights_only=True, map_location="cpu", mmap=True)
            except pickle.UnpicklingError:
                raise
            except Exception:  # legacy (non-zip) files cannot be memory-mapped
                pass
        return torch.load(name, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise FormatError(
            f"{name}: refused by weights-only loading: the file holds objects other than tensors and plain "
            f"containers, and ckptfmt never unpickles arbitrary objects ({_first_line(e)})"
        ) from e
    except Exception as e:  # whatever a damaged archive or pickle makes torch raise
        raise FormatError(f"{name}: not a readable torch file: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
