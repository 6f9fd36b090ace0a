"""Where tf2torch writes and torch2tf reads: streamed outputs and every torch-side input kind.

:func:`ckptfmt.converters.convert.tf_to_torch` plans the conversion; this module moves the
data. The kind of a destination follows from its name (:func:`output_kind`):

=====================  ======================================================  ==========
destination            what is written                                         memory
=====================  ======================================================  ==========
``*.safetensors``      the weights; the header is computed from the plan,       one entry
                       then each plan entry is read, run and written at its
                       offset (:func:`write_safetensors_stream`)
``*.pt`` / ``.pth`` /  ``torch.save`` of ``{"model", "optimizer", ...}``         the weights
``.bin``               (torch needs every tensor at once)
anything else          a ckptfmt checkpoint directory in the layout of          one entry
                       :mod:`ckptfmt.torch` (weights streamed through the       (+ optimizer
                       writer; :func:`write_ckptfmt_stream`)                    state)
=====================  ======================================================  ==========

The way back reads a ``.pt``/``.bin`` torch file, a ``.safetensors`` file (weights only) or a
ckptfmt checkpoint directory (:func:`read_torch_side`), detected as
:func:`ckptfmt.converters.kinds.detect_kind` does.

Example:
    >>> output_kind("out/weights.safetensors"), output_kind("out/run.pt"), output_kind("out/step-3")
    ('safetensors', 'torch', 'ckptfmt')
"""

from __future__ import annotations

__all__ = [
    "SAFETENSORS_METADATA",
    "TORCH_LAYOUT",
    "check_output",
    "output_kind",
    "read_torch_side",
    "run_plan",
    "write_ckptfmt_stream",
    "write_safetensors_stream",
]

import os
import sys
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from ckptfmt._progress import progress_bar
from ckptfmt.errors import CheckpointExistsError, ConversionError
from ckptfmt.format.dtypes import DTYPE_NAMES, dtype_name, numpy_dtype
from ckptfmt.format.spec import MANIFEST_NAME

from .kinds import TensorInfo, _target_kind, detect_kind
from .mapping.rules import Entry, Plan, TensorSpec

#: ``framework.layout`` of :mod:`ckptfmt.adapters.torch` (``LAYOUT_VERSION``), repeated here
#: because that module imports torch, which writing weights does not need.
TORCH_LAYOUT = 1

#: safetensors metadata of a converted file; ``format: pt`` is what transformers requires.
SAFETENSORS_METADATA = {"format": "pt", "converted_by": "ckptfmt tf2torch"}

Reader = Callable[[str], np.ndarray]

#: Bytes converted ahead of the writer thread (beyond the array being written).
_WRITE_AHEAD = 64 << 20


# ----------------------------------------------------------------------- destinations


def output_kind(dst: str | os.PathLike[str]) -> str:
    """The kind tf2torch writes to ``dst``: ``"safetensors"``, ``"torch"`` or ``"ckptfmt"``.

    ``.safetensors`` is a safetensors file, ``.pt``/``.pth``/``.bin`` a ``torch.save`` file,
    and any other name a ckptfmt checkpoint directory (as in ``ckptfmt convert``).

    Raises:
        ConversionError: an ``.onnx`` name (tf2torch does not write ONNX).
    """
    return _target_kind(os.fspath(dst))


def check_output(dst: str, kind: str, overwrite: bool, *, optimizer: bool = False) -> None:
    """Refuse a destination before any tensor is read.

    A file destination must not exist (unless ``overwrite``); a ckptfmt destination may be
    missing, an empty directory, or (with ``overwrite``) a ckptfmt checkpoint, never a file
    or a directory holding anything else.

    Raises:
        CheckpointExistsError: as above, naming ``dst``.
        ConversionError: the optimizer state is asked for but ``kind`` holds weights only.
    """
    if kind == "safetensors" and optimizer:
        raise ConversionError(f"{dst}: a .safetensors file holds weights only: pass --no-optimizer, "
                              "or write a .pt file or a ckptfmt checkpoint directory")
    if kind != "ckptfmt":
        if os.path.isdir(dst):
            raise CheckpointExistsError(f"{dst} is a directory; a {kind} destination is a file")
        if os.path.lexists(dst) and not overwrite:
            raise CheckpointExistsError(f"{dst} exists; pass overwrite=True (--overwrite) to replace it")
        return
    if not os.path.lexists(dst):
        return
    if not os.path.isdir(dst):
        raise CheckpointExistsError(f"{dst} exists and is not a directory; a name without .pt/.pth/.bin/.safetensors "
                                    "is written as a ckptfmt checkpoint directory")
    names = os.listdir(dst)
    if not names:
        return
    if MANIFEST_NAME not in names:
        raise CheckpointExistsError(f"{dst} is a non-empty directory but not a ckptfmt checkpoint; refusing to write "
                                    "into it (choose a new or empty directory)")
    if not overwrite:
        raise CheckpointExistsError(f"a ckptfmt checkpoint exists at {dst}; pass overwrite=True (--overwrite) to replace it")


# ----------------------------------------------------------------------- running a plan


def _run_entry(entry: Entry, read: Reader) -> tuple[np.ndarray, ...]:
    sources = tuple(read(k) for k in entry.sources)
    return entry.run(sources)


def _spec_dtype(key: str, spec: TensorSpec) -> np.dtype:
    if spec.dtype is None:
        raise ConversionError(f"{key}: the plan does not know this target's dtype, so its bytes cannot be laid out ahead")
    return np.dtype(numpy_dtype(spec.dtype) if spec.dtype in DTYPE_NAMES else spec.dtype)


def _info(key: str, spec: TensorSpec) -> TensorInfo:
    dt = _spec_dtype(key, spec)
    return TensorInfo(key, dtype_name(dt), tuple(spec.shape), dt.itemsize * int(np.prod(spec.shape, dtype=np.int64)))


def _checked(key: str, arr: np.ndarray, info: TensorInfo) -> np.ndarray:
    if tuple(arr.shape) != info.shape or dtype_name(arr.dtype) != info.dtype:
        raise ConversionError(f"{key}: the plan said {info.dtype}{list(info.shape)} but the conversion produced "
                              f"{arr.dtype}{list(arr.shape)}")
    return np.ascontiguousarray(arr, dtype=numpy_dtype(info.dtype))  # little-endian, C order


def _total(plan: Plan) -> int:
    return sum(_info(k, s).nbytes for k, s in plan.target_specs.items())


def run_plan(plan: Plan, read: Reader, *, progress: bool | None = None) -> dict[str, np.ndarray]:
    """``{target: array}``, reading each entry's sources only when it runs.

    Unlike ``plan.apply(read_everything())`` a source is dropped as soon as its entry has run,
    so peak memory is the targets plus one entry, not sources and targets together.
    """
    bar = progress_bar(_total(plan), "converting", progress)
    out: dict[str, np.ndarray] = {}
    try:
        for e in plan.entries:
            for key, arr in zip(e.targets, _run_entry(e, read)):
                out[key] = arr
                bar.update(arr.nbytes)
    finally:
        bar.close()
    return out


# ----------------------------------------------------------------------- safetensors


def write_safetensors_stream(dst: str, plan: Plan, read: Reader, *, metadata: dict[str, str] | None = None,
                             progress: bool | None = None) -> int:
    """Write the plan's targets as a safetensors file, one plan entry in memory at a time.

    The header (every target's dtype, shape and offsets) follows from ``plan.target_specs``;
    then each entry's sources are read with ``read(source_key)``, the entry is run, and its
    targets are written in order and dropped. The file appears atomically: it is written
    under a temporary name beside ``dst``, fsync'ed and renamed.

    Returns:
        The file's size in bytes.

    Raises:
        ConversionError: a target dtype safetensors cannot hold, or an entry producing
            something other than the plan said.
        StorageError: an I/O error (the temporary file is removed).

    Example:
        >>> from ckptfmt.converters.mapping import Mapping, Convert, Transpose
        >>> a = {"k": np.arange(6, dtype=np.float32).reshape(2, 3)}
        >>> plan = Mapping((Convert(("k",), ("w",), (Transpose((1, 0)),)),)).plan(a)
        >>> import tempfile; p = os.path.join(tempfile.mkdtemp(), "w.safetensors")
        >>> write_safetensors_stream(p, plan, a.__getitem__)
        96
    """
    from ckptfmt.storage.local import LocalStorage

    from ._safetensors import encode_header

    specs = plan.target_specs
    infos = {k: _info(k, s) for k, s in specs.items()}
    head, size = encode_header(infos.values(), metadata)
    storage = LocalStorage()
    directory = os.path.dirname(os.path.abspath(dst))
    tmp = os.path.join(directory, f".{os.path.basename(dst)}.tmp-{os.getpid()}")
    bar = progress_bar(size, f"writing {os.path.basename(dst)}", progress)
    handle = storage.open_write(tmp, durable=True)
    try:
        handle.write(head)
        # One thread writes while this one reads and transposes the next entry (numpy's
        # copies, preadv, CRC32C and write all release the GIL); at most _WRITE_AHEAD bytes
        # (or one array) wait for the writer, so memory stays about one entry.
        pending: deque[tuple[Future, int]] = deque()
        waiting = 0
        with ThreadPoolExecutor(1, thread_name_prefix="ckptfmt-convert-write") as writer:
            for e in plan.entries:
                for key, arr in zip(e.targets, _run_entry(e, read)):
                    arr = _checked(key, arr, infos[key])
                    pending.append((writer.submit(handle.write, memoryview(arr.reshape(-1).view(np.uint8))), arr.nbytes))
                    waiting += arr.nbytes
                    while len(pending) > 1 and waiting > _WRITE_AHEAD:
                        fut, n = pending.popleft()
                        fut.result()
                        waiting -= n
                        bar.update(n)
                arr = None  # the entry's arrays are held only by the writes still waiting
            while pending:
                fut, n = pending.popleft()
                fut.result()
                bar.update(n)
        if handle.tell() != len(head) + size:  # pragma: no cover - guarded by _checked
            raise ConversionError(f"{dst}: wrote {handle.tell()} bytes, the header promised {len(head) + size}")
        handle.close(sync=True)
        os.replace(tmp, dst)
    except BaseException:
        handle.close(sync=False)
        storage.delete(tmp)
        raise
    finally:
        bar.close()
    storage.sync_dir(directory)
    return len(head) + size


# ----------------------------------------------------------------------- ckptfmt


class _Deferred:
    """Runs plan entries when the writer first asks for one of their targets.

    Every target of an entry is produced at once; the ones not yet asked for wait here until
    the writer reaches them (in entry order that is at once), then are handed over and dropped.
    """

    def __init__(self, plan: Plan, read: Reader) -> None:
        self._read = read
        self._entry_of = {t: e for e in plan.entries for t in e.targets}
        self._ready: dict[str, np.ndarray] = {}

    def __call__(self, key: str) -> np.ndarray:
        if key not in self._ready:
            e = self._entry_of[key]
            self._ready.update(zip(e.targets, _run_entry(e, read=self._read)))
        return self._ready.pop(key)


def write_ckptfmt_stream(dst: str, plan: Plan, read: Reader, *, optimizer: Any = None, extra: dict[str, Any] | None = None,
                         overwrite: bool = False, progress: bool | None = None, metadata: Any = None) -> str:
    """Write a ckptfmt checkpoint directory in the :mod:`ckptfmt.torch` layout, weights streamed.

    The tree is ``{"framework": {"name": "torch", ...}, "aliases": {}, "model": {target:
    array}, "optimizer": state_dict, "extra": {...}}`` (sections only when given), so
    ``ckptfmt.load(dst)["model"]`` is the state_dict as numpy and
    ``ckptfmt.torch.restore(dst, model=m, optimizer=o)`` loads it into live objects. Weights
    are deferred leaves: the writer runs each plan entry when it reaches its first target.

    Args:
        dst: the checkpoint directory.
        plan / read: the weight plan and ``read(source_key)``.
        optimizer: the optimizer's ``state_dict()`` with numpy leaves, or None.
        extra: plain values stored under ``"extra"`` (returned by ``ckptfmt.torch.restore``).
        overwrite / progress / metadata: as for :func:`ckptfmt.save`.

    Returns:
        The checkpoint's digest.
    """
    from ckptfmt._writer import DeferredTensor
    from ckptfmt.api import save

    load = _Deferred(plan, read)
    model = {}
    for key, spec in plan.target_specs.items():
        model[key] = DeferredTensor(tuple(spec.shape), _spec_dtype(key, spec), lambda key=key: load(key))
    torch = sys.modules.get("torch")
    state: dict[str, Any] = {
        "framework": {"name": "torch", "version": getattr(torch, "__version__", None), "layout": TORCH_LAYOUT},
        "aliases": {},
        "model": model,
    }
    if optimizer is not None:
        state["optimizer"] = optimizer
    if extra:
        state["extra"] = dict(extra)
    return save(state, dst, overwrite=overwrite, progress=progress, metadata=metadata)


# ----------------------------------------------------------------------- torch side, read


def read_torch_side(src: str) -> dict[str, Any]:
    """A torch-side checkpoint as ``{"model": {name: array}, "optimizer": ..., ...}``, numpy only.

    ``src`` is a ``.pt``/``.pth``/``.bin`` file (``{"model", "optimizer", ...}`` as tf2torch
    writes it, or a bare state_dict; loaded weights-only), a ``.safetensors`` file (weights
    only), or a ckptfmt checkpoint directory (the :mod:`ckptfmt.torch` layout tf2torch writes,
    a tree with a ``"model"`` dict, or a bare state_dict). ``"optimizer"`` is a torch
    ``state_dict()`` with numpy leaves when the checkpoint has one; ``"optimizer_class"`` and
    ``"iterations"`` are there when it records them.

    Raises:
        CheckpointNotFoundError: nothing at ``src``.
        FormatError: a damaged file, or one that is not a checkpoint (names the file).
        ConversionError: a kind torch2tf does not read (a TF checkpoint, ONNX), or a file
            that holds no state_dict.
        FrameworkNotAvailableError: a torch file without torch installed.
    """
    kind = detect_kind(src)
    if kind == "torch":
        return _read_torch_file(src)
    if kind == "safetensors":
        from ._safetensors import SafetensorsSource

        with SafetensorsSource(src) as s:
            return {"model": {k: s.get(k) for k in s.keys()}}  # noqa: SIM118 - a Source, not a dict
    if kind == "ckptfmt":
        return _read_ckptfmt(src)
    raise ConversionError(f"{src} is a {kind} checkpoint; torch2tf reads a .pt/.pth/.bin torch file, a .safetensors "
                          "file or a ckptfmt checkpoint directory (convert it to one of those first)")


def _read_torch_file(src: str) -> dict[str, Any]:
    from ckptfmt.converters.convert import _torch

    _torch()  # FrameworkNotAvailableError naming the extra
    from ckptfmt.adapters.torch import state_to_numpy, tensor_to_numpy
    from ckptfmt.torch import load_torch_file

    ckpt = load_torch_file(src)  # weights_only; our errors name the file
    if not isinstance(ckpt, dict):
        raise ConversionError(f"{src}: expected a dict (a state_dict or {{'model': ..., 'optimizer': ...}}), got {type(ckpt).__name__}")
    if "model" not in ckpt:
        # the layouts of training loops ({"state_dict", "optimizer", "epoch"}; the PyTorch
        # tutorial's {"model_state_dict", "optimizer_state_dict"}), or a bare state_dict
        for model_key, opt_key in (("state_dict", "optimizer"), ("model_state_dict", "optimizer_state_dict")):
            if isinstance(ckpt.get(model_key), dict):
                rest = {k: v for k, v in ckpt.items() if k not in (model_key, opt_key)}
                ckpt = {**rest, "model": ckpt[model_key], "optimizer": ckpt.get(opt_key)}
                break
        else:
            ckpt = {"model": ckpt}
    import torch

    model = ckpt["model"]
    if not isinstance(model, dict):
        raise ConversionError(f"{src}: 'model' is a {type(model).__name__}, not a state_dict")
    # a module's get_extra_state() is no tensor, and no TF variable either
    model = {k: v for k, v in model.items() if not str(k).endswith("_extra_state")}
    bad = [f"{k!r} ({type(v).__name__})" for k, v in model.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"{src}: the state_dict holds non-tensors: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; "
                              "expected a state_dict or {'model': state_dict, 'optimizer': ...}")
    out = dict(ckpt)
    out["model"] = {k: tensor_to_numpy(v, k) for k, v in model.items()}
    if ckpt.get("optimizer") is not None:
        _check_optimizer(src, ckpt["optimizer"])
        out["optimizer"] = state_to_numpy(ckpt["optimizer"])[0]
    return out


def _check_optimizer(src: str, sd: Any) -> None:
    """A torch optimizer ``state_dict()``'s structure, checked before anything reads it."""
    groups = sd.get("param_groups") if isinstance(sd, dict) else None
    if not isinstance(sd, dict) or not isinstance(sd.get("state"), dict) or not isinstance(groups, list) or not groups:
        raise ConversionError(f"{src}: 'optimizer' is not a torch optimizer state_dict "
                              "(a dict with 'state' and a non-empty 'param_groups' list)")
    params: set[int] = set()
    for i, g in enumerate(groups):
        if not isinstance(g, dict) or not isinstance(g.get("params"), list) or "lr" not in g:
            raise ConversionError(f"{src}: optimizer param_groups[{i}] has no 'params' list or no 'lr'")
        if not all(_index(p) is not None for p in g["params"]):
            raise ConversionError(f"{src}: optimizer param_groups[{i}]['params'] holds something other than parameter indices")
        params.update(_index(p) for p in g["params"])
    stray = sorted(str(k) for k in sd["state"] if _index(k) not in params)
    if stray:
        raise ConversionError(f"{src}: optimizer state for parameter(s) {', '.join(stray)} that no param group lists")
    odd = sorted(str(k) for k, v in sd["state"].items() if not isinstance(v, dict))
    if odd:
        raise ConversionError(f"{src}: optimizer state of parameter(s) {', '.join(odd)} is not a dict of tensors")


def _index(value: Any) -> int | None:
    """A parameter index (an int, or its decimal string in a ckptfmt tree), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _read_ckptfmt(src: str) -> dict[str, Any]:
    import ckptfmt.api

    tree = ckptfmt.api.load(src, mmap=True)  # read-only views, hash-checked; nothing copied
    if not isinstance(tree, dict):
        raise ConversionError(f"{src}: the checkpoint holds a {type(tree).__name__}, not a state_dict or {{'model': ...}}")
    if not isinstance(tree.get("model"), dict):
        return {"model": _flat(src, tree)}
    aliases = tree.get("aliases") or {}
    model = dict(tree["model"])
    for name, target in aliases.items():  # tied weights are stored once (ckptfmt.torch)
        sec, _, key = name.partition("/")
        tsec, _, tkey = target.partition("/")
        if sec == tsec == "model":
            model[_unescape(key)] = model[_unescape(tkey)]
    out: dict[str, Any] = {"model": _flat(src, model)}
    if isinstance(tree.get("optimizer"), dict):
        _check_optimizer(src, tree["optimizer"])
        out["optimizer"] = tree["optimizer"]
    extra = tree.get("extra") if isinstance(tree.get("extra"), dict) else {}
    for k in ("optimizer_class", "iterations"):
        if k in tree or k in extra:
            out[k] = tree.get(k, extra.get(k))
    return out


def _unescape(key: str) -> str:
    return key.replace("~1", "/").replace("~0", "~")


def _flat(src: str, tree: dict[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(src, v, name + "/"))
        elif isinstance(v, np.ndarray):
            out[name] = v
    if not out and not prefix:
        raise ConversionError(f"{src}: the checkpoint holds no tensors")
    return out

