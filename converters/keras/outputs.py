"""Where tf2torch writes: streamed outputs of every destination kind.

:func:`ckptfmt.converters.convert.keras_to_torch` plans the conversion; this module moves
the data. The kind of a destination follows from its name (:func:`output_kind`):

=====================  ======================================================  ==========
destination            what is written                                         memory
=====================  ======================================================  ==========
``*.safetensors``      the weights; the header is computed from the plan,       one entry
                       then each plan entry is read, run and written at its
                       offset (:func:`write_safetensors_stream`)
``*.pt`` / ``.pth`` /  ``{"model", "optimizer", ...}`` as ``torch.save``        one tensor
``.bin``               writes it, one tensor at a time                         (+ its
                       (:func:`write_torch_checkpoint`, :mod:`.torchfile`)     source)
anything else          a ckptfmt checkpoint directory in the layout of          one tensor
                       :mod:`ckptfmt.torch` (weights and optimizer slots        (+ its
                       streamed through the writer; :func:`write_ckptfmt`)      source)
=====================  ======================================================  ==========

Optimizer slots are read like the weights: each is a deferred value
(``ckptfmt._writer.DeferredTensor``) that reads its Keras slot and runs its plan entry when the
writer reaches it. A transposed kernel stays a strided view of its source, copied in blocks
as it is written, so a conversion holds about one source tensor (plus a few MB) at a time.

Example:
    >>> output_kind("out/weights.safetensors"), output_kind("out/run.pt"), output_kind("out/step-3")
    ('safetensors', 'torch', 'ckptfmt')
"""

from __future__ import annotations

__all__ = [
    "SAFETENSORS_METADATA",
    "TORCH_LAYOUT",
    "check_output",
    "target_info",
    "torch_optimizer_state",
    "output_kind",
    "run_plan",
    "write_ckptfmt",
    "write_ckptfmt_stream",
    "write_safetensors_stream",
    "write_torch_checkpoint",
]

import os
import sys
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from ckptfmt._progress import progress_bar
from ckptfmt.adapters.layout import TORCH_LAYOUT, torch_tree
from ckptfmt.errors import CheckpointExistsError, ConversionError, UnsupportedURLError
from ckptfmt.format.dtypes import DTYPE_NAMES, dtype_name, numpy_dtype
from ckptfmt.format.spec import MANIFEST_NAME
from ckptfmt.storage.urls import is_url, resolve

from ..files import atomic_file, check_destination
from ..kinds import target_kind
from ..mapping.rules import Entry, Plan, TensorSpec
from ..optim._views import StreamedTensor, entry_views
from ..optional import require
from ..sources.base import TensorInfo

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
    return target_kind(os.fspath(dst))


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
    if is_url(dst):
        if kind != "ckptfmt":
            raise UnsupportedURLError(f"{dst}: object stores take ckptfmt checkpoints; write the {kind} file locally")
        storage, url = resolve(dst)
        names = storage.listdir(url)
        if names and MANIFEST_NAME not in names:
            raise CheckpointExistsError(f"{dst} holds objects but no ckptfmt checkpoint; refusing to write into it")
        if names and not overwrite:
            raise CheckpointExistsError(f"a ckptfmt checkpoint exists at {dst}; pass overwrite=True (--overwrite) to replace it")
        return
    check_destination(dst, "ckptfmt" if kind == "ckptfmt" else "file", overwrite)


# ----------------------------------------------------------------------- running a plan


def _run_entry(entry: Entry, read: Reader) -> tuple[np.ndarray, ...]:
    sources = tuple(read(k) for k in entry.sources)
    return entry.run(sources)


def _spec_dtype(key: str, spec: TensorSpec) -> np.dtype:
    if spec.dtype is None:
        raise ConversionError(f"{key}: the plan does not know this target's dtype, so its bytes cannot be laid out ahead")
    return np.dtype(numpy_dtype(spec.dtype) if spec.dtype in DTYPE_NAMES else spec.dtype)


def target_info(key: str, spec: TensorSpec) -> TensorInfo:
    """A plan target's dtype, shape and size as a :class:`TensorInfo` (its dtype must be known)."""
    dt = _spec_dtype(key, spec)
    return TensorInfo(key, dtype_name(dt), tuple(spec.shape), dt.itemsize * int(np.prod(spec.shape, dtype=np.int64)))


def _checked(key: str, arr: np.ndarray, info: TensorInfo) -> np.ndarray:
    if tuple(arr.shape) != info.shape or dtype_name(arr.dtype) != info.dtype:
        raise ConversionError(f"{key}: the plan said {info.dtype}{list(info.shape)} but the conversion produced "
                              f"{arr.dtype}{list(arr.shape)}")
    return np.ascontiguousarray(arr, dtype=numpy_dtype(info.dtype))  # little-endian, C order


def _total(plan: Plan) -> int:
    return sum(target_info(k, s).nbytes for k, s in plan.target_specs.items())


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

    from ..sources.safetensors import encode_header

    infos = {k: target_info(k, s) for k, s in plan.target_specs.items()}
    head, size = encode_header(infos.values(), metadata)
    bar = progress_bar(size, f"writing {os.path.basename(dst)}", progress)

    def write(tmp: str) -> None:
        handle = LocalStorage().open_write(tmp, durable=True)
        try:
            handle.write(head)
            _write_entries(handle, plan, read, infos, bar)
            if handle.tell() != len(head) + size:  # pragma: no cover - guarded by _checked
                raise ConversionError(f"{dst}: wrote {handle.tell()} bytes, the header promised {len(head) + size}")
        finally:
            handle.close(sync=False)  # atomic_file syncs before the rename

    try:
        atomic_file(dst, write)
    finally:
        bar.close()
    return len(head) + size


def _write_entries(handle: Any, plan: Plan, read: Reader, infos: dict[str, TensorInfo], bar: Any) -> None:
    """Each entry's targets in order. One thread writes while this one reads and transposes the
    next entry (numpy's copies, preadv, CRC32C and write all release the GIL); at most
    _WRITE_AHEAD bytes (or one array) wait for the writer, so memory stays about one entry."""
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


# ----------------------------------------------------------------------- ckptfmt


class _Deferred:
    """Runs plan entries when the writer first asks for one of their targets.

    Every target of an entry is produced at once (a transposed one as a view of its source);
    the ones not yet asked for wait here until the writer reaches them (in entry order that
    is at once), then are handed over and dropped.
    """

    def __init__(self, plan: Plan, read: Reader) -> None:
        self._read = read
        self._entry_of = {t: e for e in plan.entries for t in e.targets}
        self._ready: dict[str, np.ndarray] = {}

    def __call__(self, key: str) -> np.ndarray:
        if key not in self._ready:
            e = self._entry_of[key]
            self._ready.update(zip(e.targets, entry_views(e, tuple(self._read(k) for k in e.sources))))
        return self._ready.pop(key)


def _deferred_weights(plan: Plan, read: Reader) -> dict[str, Any]:
    """``{target: DeferredTensor}``: each plan entry runs when the writer reaches its first target."""
    load = _Deferred(plan, read)
    return {key: StreamedTensor(tuple(spec.shape), _spec_dtype(key, spec), lambda key=key: load(key))
            for key, spec in plan.target_specs.items()}


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
        optimizer: the optimizer's ``state_dict()`` with numpy (or ``DeferredTensor``) leaves, or None.
        extra: plain values stored under ``"extra"`` (returned by ``ckptfmt.torch.restore``).
        overwrite / progress / metadata: as for :func:`ckptfmt.save`.

    Returns:
        The checkpoint's digest.
    """
    from ckptfmt.api import save

    sections: dict[str, Any] = {"model": _deferred_weights(plan, read)}
    if optimizer is not None:
        sections["optimizer"] = optimizer
    if extra:
        sections["extra"] = dict(extra)
    # torch's version when it is loaded; writing weights does not import it
    state = torch_tree(sections, {}, getattr(sys.modules.get("torch"), "__version__", None))
    return save(state, dst, overwrite=overwrite, progress=progress, metadata=metadata)


# ----------------------------------------------------------------------- torch, with optimizer


def torch_optimizer_state(conv: Any, model: Any) -> dict[str, Any]:
    """``optimizer.state_dict()`` of the torch optimizer the conversion fills, its slots still deferred.

    What torch's own ``load_state_dict`` makes of the state (the keys the conversion does not
    set, ``step`` as torch keeps it, slots cast to their parameter's dtype) is taken from a
    live optimizer loaded with empty stand-ins for the slots; the slots themselves stay
    ``DeferredTensor`` values (cast on load where torch would cast), read when written.

    Example:
        >>> sd = torch_optimizer_state(conv, model)  # doctest: +SKIP
        >>> sd["state"][0]["exp_avg"]  # doctest: +SKIP
        DeferredTensor(shape=(64, 3, 3, 3), dtype=dtype('float32'), load=...)
    """
    import torch

    from ckptfmt._writer import DeferredTensor
    from ckptfmt.adapters.torch import numpy_to_tensor, tensor_to_numpy

    from .optimizer import optimizer_type

    opt = optimizer_type(conv.optimizer)(model.parameters(), **conv.hyperparameters)
    sd = conv.state_dict(opt.state_dict())
    deferred: dict[tuple[int, str], DeferredTensor] = {}
    probe: dict[int, dict[str, Any]] = {}
    for i, st in sd["state"].items():
        probe[i] = {}
        for name, v in st.items():
            if isinstance(v, DeferredTensor):
                deferred[(i, name)] = v
                v = np.empty(0, v.dtype)
            probe[i][name] = numpy_to_tensor(np.asarray(v)) if isinstance(v, (np.ndarray, np.generic)) else v
    opt.load_state_dict({"state": probe, "param_groups": sd["param_groups"]})
    out = opt.state_dict()
    for (i, name), v in deferred.items():
        held = out["state"][i][name]
        if not isinstance(held, torch.Tensor):  # pragma: no cover - torch keeps tensors as tensors
            raise ConversionError(f"optimizer state {i}/{name}: torch turned the slot into a {type(held).__name__}")
        want = tensor_to_numpy(held).dtype
        out["state"][i][name] = v if want == v.dtype else _cast(v, want)
    return out


def _cast(v: Any, dtype: np.dtype) -> Any:
    return StreamedTensor(v.shape, dtype, lambda: np.asarray(v.load()).astype(dtype))  # elementwise


def _numpy_state(sd: dict[str, Any]) -> dict[str, Any]:
    """:func:`torch_optimizer_state` with numpy leaves; the deferred ones stay deferred."""
    from ckptfmt._writer import DeferredTensor
    from ckptfmt.adapters.torch import state_to_numpy

    deferred = {(i, n): v for i, st in sd["state"].items() for n, v in st.items() if isinstance(v, DeferredTensor)}
    bare = {**sd, "state": {i: {n: v for n, v in st.items() if (i, n) not in deferred} for i, st in sd["state"].items()}}
    out = state_to_numpy(bare)[0]
    for (i, n), v in deferred.items():
        out["state"][i][n] = v
    # keep torch's key order within each parameter's state
    out["state"] = {i: {n: out["state"][i][n] for n in st} for i, st in sd["state"].items()}
    return out


def write_ckptfmt(dst: str, plan: Plan, read: Reader, model: Any, conv: Any, report_text: str, source: str,
                  overwrite: bool, progress: bool | None) -> None:
    """The ckptfmt destination of tf2torch: weights and optimizer slots streamed.

    Example:
        >>> write_ckptfmt("out/step-3", plan, read, None, None, "", "ckpt-3", False, None)  # doctest: +SKIP
    """
    optimizer = None
    extra: dict[str, Any] = {"conversion_report": report_text}
    if conv is not None:
        optimizer = _numpy_state(torch_optimizer_state(conv, model))
        extra.update(optimizer_class=conv.optimizer, optimizer_hyperparameters=dict(conv.hyperparameters))
    write_ckptfmt_stream(dst, plan, read, optimizer=optimizer, extra=extra, overwrite=overwrite,
                         progress=progress, metadata={"converted_by": "ckptfmt tf2torch", "source": source})


def write_torch_checkpoint(dst: str, plan: Plan, read: Reader, model: Any, conv: Any, report_text: str,
                           progress: bool | None = None) -> None:
    """``{"model", "optimizer", "optimizer_class", ...}`` as ``torch.save`` writes it, one tensor at a time, atomically.

    The file loads with ``torch.load(weights_only=True)`` into what ``torch.save`` of the
    materialized dict gives (:func:`ckptfmt.converters.keras.torchfile.save_torch_stream`).

    Example:
        >>> write_torch_checkpoint("run.pt", plan, read, model, conv, "")  # doctest: +SKIP
    """
    require("torch", "tf2torch/torch2tf conversion")  # FrameworkNotAvailableError naming the extra
    from ckptfmt._writer import DeferredTensor

    from .torchfile import save_torch_stream

    out: dict[str, Any] = {"model": _deferred_weights(plan, read)}
    total = _total(plan)
    if conv is not None:
        sd = torch_optimizer_state(conv, model)
        total += sum(int(np.prod(v.shape, dtype=np.int64)) * np.dtype(v.dtype).itemsize
                     for st in sd["state"].values() for v in st.values() if isinstance(v, DeferredTensor))
        out.update(optimizer=sd, optimizer_class=conv.optimizer, optimizer_hyperparameters=dict(conv.hyperparameters))
    out["conversion_report"] = report_text
    bar = progress_bar(total, f"writing {os.path.basename(dst)}", progress)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            save_torch_stream(out, f, on_bytes=bar.update)

    try:
        atomic_file(dst, write)
    finally:
        bar.close()
