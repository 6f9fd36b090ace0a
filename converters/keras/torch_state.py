"""The torch side of torch2tf: a ``.pt``/``.bin`` file, a ``.safetensors`` file or a ckptfmt
checkpoint directory, read as ``{"model": {name: array}, "optimizer": ..., ...}``, numpy only.

The kind is detected as :func:`ckptfmt.converters.sources.detect_kind` does. A torch file is
loaded weights-only; an optimizer ``state_dict``'s structure is checked before anything
reads it.

Example:
    >>> read_torch_side("run.pt")["model"]["fc.weight"].shape  # doctest: +SKIP
    (10, 64)
"""

from __future__ import annotations

__all__ = ["read_torch_side"]

from typing import Any

import numpy as np

from ckptfmt.errors import ConversionError

from ..sources import detect_kind
from ..sources.base import require


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
        from ..sources.safetensors import SafetensorsSource

        with SafetensorsSource(src) as s:
            return {"model": {k: s.get(k) for k in s.keys()}}  # noqa: SIM118 - a Source, not a dict
    if kind == "ckptfmt":
        return _read_ckptfmt(src)
    raise ConversionError(f"{src} is a {kind} checkpoint; torch2tf reads a .pt/.pth/.bin torch file, a .safetensors "
                          "file or a ckptfmt checkpoint directory (convert it to one of those first)")


def _read_torch_file(src: str) -> dict[str, Any]:
    require("torch", "tf2torch/torch2tf conversion")  # FrameworkNotAvailableError naming the extra
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
