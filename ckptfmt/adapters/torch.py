"""The PyTorch adapter: modules, optimizers and LR schedulers to numpy trees and back.

Layout of the tree :func:`to_state` builds (only the sections given are present)::

    {
        "framework": {"name": "torch", "version": "2.13.0", "layout": 1},
        "aliases":   {"model/head.weight": "model/embed.weight", ...},
        "model":     module.state_dict()      # parameters and buffers, keys as in torch
        "optimizer": optimizer.state_dict()   # {"state": {int: {...}}, "param_groups": [...]}
        "scheduler": scheduler.state_dict(),
        "extra":     {name: value, ...},      # anything else the caller saved
    }

Tensors become numpy arrays (bfloat16 and float8 as ``ml_dtypes`` arrays), everything else
keeps its Python value; int keys (optimizer state) stay ints and tuples (Adam's ``betas``)
stay tuples. A tensor that shares its memory with an earlier one (tied weights) is stored
once: its place in the tree holds ``None`` and ``aliases`` maps its tensor name to the name
of the stored tensor. :func:`numpy_to_state` puts one tensor object back in both places.

Example:
    >>> import torch
    >>> from ckptfmt.adapters import torch as ta
    >>> tree, aliases = ta.state_to_numpy({"w": torch.ones(2, dtype=torch.bfloat16)})
    >>> str(tree["w"].dtype), aliases
    ('bfloat16', {})
"""

from __future__ import annotations

__all__ = [
    "LAYOUT_VERSION",
    "tensor_to_numpy",
    "numpy_to_tensor",
    "state_to_numpy",
    "numpy_to_state",
    "to_state",
    "from_state",
]

from typing import Any

import ml_dtypes
import numpy as np

from ckptfmt.errors import ConversionError, FormatError, FrameworkNotAvailableError, UnsupportedDtypeError
from ckptfmt.format.dtypes import dtype_name

try:
    import torch
except ImportError:
    raise FrameworkNotAvailableError("torch", "torch") from None

from ckptfmt.adapters.layout import TORCH_LAYOUT, torch_tree
from ckptfmt.adapters.numpy import check_leaf, map_leaves

#: Version of the tree layout above (:data:`ckptfmt.adapters.layout.TORCH_LAYOUT`).
LAYOUT_VERSION = TORCH_LAYOUT

_SECTIONS = ("model", "optimizer", "scheduler", "extra")

# dtypes numpy has no native type for: reinterpret the bits through an integer of the same
# width, which costs no copy in either direction.
_BIT_VIEWS: dict[Any, tuple[Any, np.dtype]] = {torch.bfloat16: (torch.int16, np.dtype(ml_dtypes.bfloat16))}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        _BIT_VIEWS[getattr(torch, _name)] = (torch.uint8, np.dtype(getattr(ml_dtypes, _name)))
_TORCH_BY_NUMPY = {
    np_dt: (torch_dt, np.dtype(np.int16 if np_dt.itemsize == 2 else np.uint8))
    for torch_dt, (_, np_dt) in _BIT_VIEWS.items()
}


def tensor_to_numpy(t: torch.Tensor, name: str = "") -> np.ndarray:
    """Return a numpy array with the values of ``t``, sharing memory when ``t`` is on the CPU.

    The tensor is detached and moved to the CPU; a CPU tensor is not copied (the array is a
    view, strided like the tensor). bfloat16 and float8 come back as ``ml_dtypes`` arrays.

    Raises:
        UnsupportedDtypeError: sparse, quantized or meta tensors, or a dtype the format lacks
            (complex32, the float8 ``fnuz`` variants, ...).

    Example:
        >>> import torch
        >>> tensor_to_numpy(torch.tensor([1.5], dtype=torch.float16))
        array([1.5], dtype=float16)
    """
    where = f" at {name!r}" if name else ""
    if t.layout != torch.strided or t.is_quantized or t.is_meta:
        raise UnsupportedDtypeError(
            f"cannot save a {'meta' if t.is_meta else t.layout} tensor{where}; "
            "convert it to a dense, materialised tensor first"
        )
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    # numpy cannot see torch's lazy conjugate/negative bits: materialise them.
    t = t.resolve_conj().resolve_neg()
    view = _BIT_VIEWS.get(t.dtype)
    try:
        a = t.view(view[0]).numpy().view(view[1]) if view else t.numpy()
        dtype_name(a.dtype)
    except (TypeError, RuntimeError, UnsupportedDtypeError):
        raise UnsupportedDtypeError(
            f"tensor{where} has dtype {t.dtype}, which ckptfmt cannot store; cast it first "
            "(e.g. complex32 -> complex64, float8_*fnuz -> float32)"
        ) from None
    return a


def numpy_to_tensor(a: np.ndarray, device: Any = None) -> torch.Tensor:
    """Return a tensor with the values of ``a``, sharing memory when possible.

    The array is shared when it is writable, native-endian and on the CPU; otherwise it is
    copied once (a read-only array, such as a memory map, is never handed to torch, which
    would write into it).

    Example:
        >>> import numpy as np
        >>> numpy_to_tensor(np.arange(3, dtype=np.int32))
        tensor([0, 1, 2], dtype=torch.int32)
    """
    if not a.dtype.isnative or not a.flags.writeable or any(s < 0 for s in a.strides):
        a = np.array(a, dtype=a.dtype.newbyteorder("="))
    view = _TORCH_BY_NUMPY.get(a.dtype)
    t = torch.from_numpy(a.view(view[1])).view(view[0]) if view else torch.from_numpy(a)
    return t if device is None else t.to(device)


def _alias_key(t: torch.Tensor) -> tuple | None:
    # Two tensors alias when they are the same view of the same memory.
    if t.numel() == 0 or t.layout != torch.strided or t.is_meta:
        return None
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def state_to_numpy(state: Any, prefix: str = "") -> tuple[Any, dict[str, str]]:
    """Convert a tree holding torch tensors into a numpy tree plus its aliases.

    Tensors that are the same view of the same memory are stored once: later occurrences
    become ``None`` and ``aliases`` maps their tensor name to the first one's. Names are the
    format's tensor names (``/``-joined, see :func:`ckptfmt.format.tree.join_path`),
    prefixed with ``prefix``.

    Raises:
        UnsupportedDtypeError: a leaf cannot be stored; the message names its path.

    Example:
        >>> import torch
        >>> w = torch.zeros(2)
        >>> state_to_numpy({"a": w, "b": w}, prefix="model")[1]
        {'model/b': 'model/a'}
    """
    first: dict[tuple, str] = {}
    aliases: dict[str, str] = {}

    def leaf(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            key = _alias_key(value)
            if key is not None:
                if key in first:
                    aliases[path] = first[key]
                    return None
                first[key] = path
            return tensor_to_numpy(value, path)
        # Numpy values in a torch state (rare) are accepted and restored as tensors.
        return check_leaf(value, path)

    return map_leaves(leaf, state, prefix), aliases


_ALIAS = object()


def numpy_to_state(tree: Any, aliases: dict[str, str] | None = None, *, prefix: str = "", device: Any = None) -> Any:
    """Convert a numpy tree back into a tree of torch tensors, re-tying aliased tensors.

    ``aliases`` and ``prefix`` are as returned / given to :func:`state_to_numpy`; an aliased
    place gets the very tensor object of the place it aliases. Tensors are created on
    ``device`` (the CPU by default).

    Raises:
        FormatError: an alias points to a name that holds no tensor.

    Example:
        >>> import numpy as np
        >>> s = numpy_to_state({"a": np.zeros(2), "b": None}, {"b": "a"})
        >>> s["a"] is s["b"]
        True
    """
    aliases = aliases or {}
    tensors: dict[str, torch.Tensor] = {}

    def leaf(value: Any, path: str) -> Any:
        if path in aliases:
            return _ALIAS
        if isinstance(value, np.ndarray):
            tensors[path] = t = numpy_to_tensor(value, device)
            return t
        return value

    def tie(value: Any, path: str) -> Any:
        if value is not _ALIAS:
            return value
        target = aliases[path]
        if target not in tensors:
            raise FormatError(f"tensor {path!r} is recorded as an alias of {target!r}, which holds no tensor")
        return tensors[target]

    out = map_leaves(leaf, tree, prefix)
    return map_leaves(tie, out, prefix) if aliases else out


def to_state(
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the tree of a training state (see the module docstring for its layout).

    Nothing is copied for CPU tensors; tensors on other devices are copied to the CPU.

    Example:
        >>> import torch
        >>> tree = to_state(model=torch.nn.Linear(2, 1), extra={"epoch": 3})
        >>> sorted(tree["model"]), tree["extra"]
        (['bias', 'weight'], {'epoch': 3})
    """
    sections: dict[str, Any] = {}
    if model is not None:
        sections["model"] = model.state_dict()
    if optimizer is not None:
        sections["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        sections["scheduler"] = scheduler.state_dict()
    if extra:
        sections["extra"] = dict(extra)
    # One pass over all sections so that aliasing across them is found too.
    converted, aliases = state_to_numpy(sections)
    return torch_tree(converted, aliases, torch.__version__)


def from_state(
    tree: dict[str, Any],
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    strict: bool = True,
    map_location: Any = None,
) -> dict[str, Any]:
    """Load a tree built by :func:`to_state` into live objects; return its ``extra`` entries.

    The model's parameters and buffers keep their device and dtype (values are copied in,
    as ``load_state_dict`` does); optimizer state follows its parameters. ``map_location``
    places the returned extra tensors (CPU by default).

    With ``strict``, every key of the model must match (checked before anything is
    written, so a failed restore leaves the model untouched) and every object passed must
    have a section in the checkpoint; without it, missing sections and keys are skipped.

    Raises:
        ConversionError: missing or unexpected keys, shape mismatches, or a missing section.
        FormatError: the tree is not a torch checkpoint.

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(2, 1)
        >>> from_state(to_state(model=m, extra={"epoch": 3}), model=torch.nn.Linear(2, 1))
        {'epoch': 3}
    """
    if not isinstance(tree, dict) or not isinstance(tree.get("framework"), dict) or tree["framework"].get("name") != "torch":
        found = tree.get("framework") if isinstance(tree, dict) else type(tree).__name__
        raise FormatError(f"not a checkpoint written by ckptfmt.torch (framework entry: {found!r})")
    aliases = tree.get("aliases") or {}
    sections = {k: tree[k] for k in _SECTIONS if k in tree}
    wanted = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    missing = [k for k, obj in wanted.items() if obj is not None and k not in sections]
    if missing and strict:
        raise ConversionError(
            f"checkpoint has no {', '.join(missing)} state (it holds: {', '.join(sections) or 'nothing'}); "
            "pass strict=False to skip"
        )
    extra = sections.pop("extra", {})
    state = numpy_to_state(sections, aliases)
    if model is not None and "model" in state:
        _load_model(model, state["model"], strict)
    if optimizer is not None and "optimizer" in state:
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise ConversionError(f"optimizer state does not fit {type(optimizer).__name__}: {e}") from e
    if scheduler is not None and "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    device = torch.device(map_location) if map_location is not None else None
    return numpy_to_state(extra, aliases, prefix="extra", device=device)


def _load_model(model: torch.nn.Module, state: dict[str, Any], strict: bool) -> None:
    expected = model.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and isinstance(v, torch.Tensor) and isinstance(expected[k], torch.Tensor) and v.shape != expected[k].shape
    ]
    problems = []
    if strict:
        if missing := [k for k in expected if k not in state]:
            problems.append(f"missing from checkpoint: {', '.join(missing)}")
        if unexpected := [k for k in state if k not in expected]:
            problems.append(f"not in model: {', '.join(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {'; '.join(mismatched)}")
    if problems:
        raise ConversionError(f"model state does not fit {type(model).__name__}: " + " | ".join(problems))
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        raise ConversionError(f"model state does not fit {type(model).__name__}: {e}") from e
