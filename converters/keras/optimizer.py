"""Optimizer settings of a Keras checkpoint, and the torch optimizer state fitted to its template.

What a checkpoint does not store (Keras keeps the optimizer's config outside it) comes from
the caller's ``optimizer_config``, the hyperparameters tf.keras 2 stores as variables, what
the slots imply (amsgrad, centered), and Keras's defaults, in that order; every assumption
is a note in the report. The slot conversion itself is :mod:`ckptfmt.converters.optim`.

Example:
    >>> torch_optimizer_name({"optimizer_class": "torch.optim.Adam"}, None)
    'Adam'
"""

from __future__ import annotations

__all__ = [
    "KERAS_DEFAULTS",
    "keras_optimizer_class",
    "keras_optimizer_settings",
    "implied_by_slots",
    "optimizer_keys",
    "optimizer_type",
    "torch_optimizer_name",
    "torch_optimizer_for_template",
]

import importlib
import re
from collections.abc import Mapping as AbcMapping
from collections.abc import Sequence
from typing import Any

import numpy as np

from ckptfmt._writer import DeferredTensor
from ckptfmt.errors import ConversionError, UnmappedKeyError

from ..mapping.rules import Plan
from ..optim.convert import KerasOptimizerState, torch_to_keras_optimizer
from ..optim.tables import KERAS_DEFAULTS, KERAS_SLOTS, TORCH_TO_KERAS
from .checkpoint import KerasCheckpoint

# Keras 3 default optimizer names (the prefix of the variable names TF records).
_DEFAULT_NAMES = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD", "rmsprop": "RMSprop"}


def keras_optimizer_settings(kc: KerasCheckpoint, optimizer_config: AbcMapping[str, Any] | None, *,
                             shapes_only: bool = False) -> tuple[KerasOptimizerState, tuple[str, ...]]:
    """The Keras optimizer's state (class, config, step, slots) and the notes on what was assumed.

    Args:
        kc: the checkpoint (its values are read through ``kc.reader``).
        optimizer_config: what the caller knows (``class_name``, ``learning_rate``, ``momentum``...).
        shapes_only: zero slots in the right layout instead of the stored values (a dry run).
            Otherwise each slot is a ``DeferredTensor``, read when its converted value is written.

    Raises:
        ConversionError: the class cannot be told, a learning rate that is not stored
            (a LearningRateSchedule), momentum slots without a momentum coefficient.

    Example:
        >>> state, notes = keras_optimizer_settings(kc, {"learning_rate": 0.01})  # doctest: +SKIP
    """
    cfg = dict(optimizer_config or {})
    cls = keras_optimizer_class(kc, cfg)
    iterations = int(np.asarray(kc.get(kc.iterations_key))) if kc.iterations_key else 0
    # tf.keras 2 legacy optimizers store their hyperparameters: they beat the defaults
    stored = {k: kc.scalar(key) for k, key in kc.hyperparameter_keys.items()}
    decay = stored.pop("decay", 0.0)
    known = {**stored, **{k: v for k, v in cfg.items() if k != "class_name"}}
    known.update(implied_by_slots(cls, kc, known))
    config = {**KERAS_DEFAULTS[cls], **known}
    assumed = sorted(k for k in KERAS_DEFAULTS[cls] if k not in known)
    notes: list[str] = []
    config["learning_rate"] = config.get("learning_rate", _learning_rate(kc, cfg, iterations, decay, notes))
    if shapes_only:  # zero slots in the right layout
        slot_values = {v: {s: np.zeros(kc.shapes[v], np.float32) for s in d} for v, d in kc.slots.items()}
    else:
        slot_values = {v: {s: _deferred_slot(kc, k) for s, k in d.items()} for v, d in kc.slots.items()}
    notes.append(_summary(kc, cls, iterations, config, given="learning_rate" in cfg, stored=stored, assumed=assumed))
    if "dynamic_scale" in kc.loss_scale_keys:
        scale = kc.scalar(kc.loss_scale_keys["dynamic_scale"])
        notes.append(f"mixed precision: the Keras LossScaleOptimizer's loss scale ({scale:g}) is no optimizer state "
                     f"in torch; continue with torch.amp.GradScaler(init_scale={scale:g}) (its growth counter restarts)")
    return KerasOptimizerState(cls, config, iterations, slot_values), tuple(notes)


def _deferred_slot(kc: KerasCheckpoint, key: str) -> DeferredTensor:
    """A slot read only when its converted value is written (one slot in memory at a time)."""
    return DeferredTensor(tuple(kc.reader.shape(key)), np.dtype(kc.reader.dtype(key)), lambda: kc.get(key))


def _learning_rate(kc: KerasCheckpoint, cfg: AbcMapping[str, Any], iterations: int, decay: float, notes: list[str]) -> float:
    """The learning rate at ``iterations``: stored (after a legacy decay), or given."""
    if kc.learning_rate_key is None and "learning_rate" not in cfg:
        raise ConversionError(
            f"{kc.path} stores no learning rate: a Keras LearningRateSchedule computes it from the step and is not "
            f"saved. Pass its value at step {iterations}, e.g. --optimizer-config '{{\"learning_rate\": 0.001}}' "
            "(and continue the schedule with a torch LR scheduler)"
        )
    lr = kc.scalar(kc.learning_rate_key) if kc.learning_rate_key else float(cfg["learning_rate"])
    if decay and "learning_rate" not in cfg:
        lr = lr / (1 + decay * iterations)
        notes.append(f"optimizer: the legacy time-based decay={decay:g} (lr / (1 + decay*t)) has no torch optimizer "
                     f"option: learning_rate is its value at t={iterations}, {lr:g}; continue the decay with a LambdaLR")
    return lr


def _summary(kc: KerasCheckpoint, cls: str, iterations: int, config: AbcMapping[str, Any], *, given: bool,
             stored: AbcMapping[str, float], assumed: Sequence[str]) -> str:
    """The report's line on where each optimizer setting came from."""
    return (f"optimizer: Keras {cls} (named {kc.optimizer_name!r} in the checkpoint), iterations={iterations}, "
            f"learning_rate={config['learning_rate']:g} " + ("as given" if given else "read from the checkpoint")
            + (f"; stored: {', '.join(f'{k}={v:g}' for k, v in stored.items())}" if stored else "")
            + (f"; not stored, assumed Keras defaults: {', '.join(f'{k}={config[k]!r}' for k in assumed)}" if assumed else ""))


def optimizer_keys(kc: KerasCheckpoint) -> set[str]:
    """Every checkpoint key of the optimizer: slots, step, learning rate, stored hyperparameters, loss scale.

    Example:
        >>> sorted(optimizer_keys(kc))[:2]  # doctest: +SKIP
    """
    used = {k for d in kc.slots.values() for k in d.values()}
    used |= {k for k in (kc.iterations_key, kc.learning_rate_key, *kc.hyperparameter_keys.values()) if k}
    used |= {*kc.also_iterations, *kc.also_learning_rate, *kc.loss_scale_keys.values()}
    return used


def torch_optimizer_for_template(src: str, ckpt: AbcMapping[str, Any], kc: KerasCheckpoint, plan: Plan, model: Any,
                                 optimizer_class: str | None, iterations: int | None) -> tuple[KerasOptimizerState, str]:
    """A torch-side optimizer state as the Keras state the template ``kc`` holds, with the slot report.

    Raises:
        ConversionError: an unsupported optimizer, a state that does not fit the model.
        UnmappedKeyError: slots the template has and the torch state lacks, or the reverse.

    Example:
        >>> ks, text = torch_optimizer_for_template("run.pt", ckpt, kc, plan, model, None, None)  # doctest: +SKIP
    """
    opt_name = torch_optimizer_name(ckpt, optimizer_class)
    sd = ckpt["optimizer"]
    sd = {"state": {int(i): s for i, s in sd["state"].items()}, "param_groups": sd["param_groups"]}
    names, frozen = _optimizer_param_names(src, model, sd)
    _check_state_shapes(src, model, sd, names)
    if iterations is None and "iterations" in ckpt:
        iterations = int(ckpt["iterations"])
    ks, report_text = torch_to_keras_optimizer(opt_name, sd, plan, names, iterations=iterations, frozen=frozen)
    if ks.class_name == "SGD" and not ks.config.get("momentum"):
        # tf.keras 2 SGD keeps an "m" slot even without momentum: it stays zero
        for v, d in kc.slots.items():
            if "momentum" in d and v in kc.shapes:
                ks.slots.setdefault(v, {}).setdefault("momentum", np.zeros(kc.shapes[v], kc.dtypes[v]))
    want = {(v, s) for v, d in kc.slots.items() for s in d}
    have = {(v, s) for v, d in ks.slots.items() for s in d}
    problems = [f"template slot {s!r} of {v} has no value in the torch optimizer state" for v, s in sorted(want - have)]
    problems += [f"torch optimizer state {s!r} of {v} has no slot in the template (is its optimizer a Keras {ks.class_name}?)"
                 for v, s in sorted(have - want)]
    if problems:
        raise UnmappedKeyError("the torch optimizer state does not fit the template's optimizer:\n  " + "\n  ".join(problems))
    return ks, report_text


def implied_by_slots(cls: str, kc: KerasCheckpoint, known: AbcMapping[str, Any]) -> dict[str, Any]:
    """Options the slots a checkpoint holds imply, where it does not store them (:func:`keras_optimizer_settings`).

    Keras creates ``velocity_hat`` only with amsgrad, ``average_gradient`` only for a centered
    RMSprop, and ``momentum`` slots only with a momentum; a default of 0 would silently drop
    that state, so an unknown momentum coefficient is an error.

    Raises:
        ConversionError: momentum slots without a known momentum coefficient.
    """
    slots = {s for d in kc.slots.values() for s in d}
    out: dict[str, Any] = {}
    if cls in ("Adam", "AdamW") and "velocity_hat" in slots and "amsgrad" not in known:
        out["amsgrad"] = True
    if cls == "RMSprop" and "average_gradient" in slots and "centered" not in known:
        out["centered"] = True
    if cls in ("SGD", "RMSprop") and "momentum" in slots and "momentum" not in known:
        raise ConversionError(
            f"the checkpoint holds {cls} momentum slots but not the momentum coefficient (Keras keeps it in the optimizer's "
            "config, not in the checkpoint; tf.keras 2 SGD keeps the slots even without momentum); pass it, e.g. "
            "--optimizer-config '{\"momentum\": 0.9}' (and \"nesterov\": true if the run used it)"
        )
    return out


def keras_optimizer_class(kc: KerasCheckpoint, config: AbcMapping[str, Any]) -> str:
    """The Keras optimizer class: given in ``config``, else from its recorded name and its slots.

    Raises:
        ConversionError: an unsupported class, or one the checkpoint does not tell.

    Example:
        >>> keras_optimizer_class(kc, {"class_name": "Adam"})  # doctest: +SKIP
        'Adam'
    """
    if config.get("class_name"):
        cls = str(config["class_name"])
        if cls not in KERAS_SLOTS:
            raise ConversionError(f"optimizer class {cls!r} is not supported (supported: {', '.join(KERAS_SLOTS)})")
        return cls
    slots = frozenset(s for d in kc.slots.values() for s in d)
    # Keras names optimizers after their class, with "_1", "_2"... for later instances.
    by_name = _DEFAULT_NAMES.get(re.sub(r"_\d+$", "", (kc.optimizer_name or "").lower()))
    if by_name is not None and slots <= set(KERAS_SLOTS[by_name]):
        return by_name
    candidates = [c for c in ("Adam", "SGD", "RMSprop") if slots <= set(KERAS_SLOTS[c])]
    if len(candidates) == 1:
        return candidates[0]
    raise ConversionError(
        f"cannot tell the Keras optimizer class: it is named {kc.optimizer_name!r} and has slots "
        f"{', '.join(sorted(slots)) or 'none'}, which fit {', '.join(candidates) or 'no supported class'}; "
        "pass it with --optimizer-config '{\"class_name\": \"Adam\", ...}'"
    )




def optimizer_type(name: str) -> Any:
    """The class a dotted name (``"torch.optim.Adam"``) names.

    Example:
        >>> optimizer_type("collections.OrderedDict").__name__
        'OrderedDict'
    """
    module, _, cls = name.rpartition(".")
    return getattr(importlib.import_module(module), cls)




def _optimizer_param_names(src: str, model: Any, sd: AbcMapping[str, Any]) -> tuple[list[str], list[str]]:
    """The parameter names in the optimizer's order, and the frozen ones.

    An optimizer is built on ``model.parameters()`` or, often when some are frozen, on the
    trainable ones only; the parameter count tells which (same-shape parameters would pair
    silently wrong otherwise).
    """
    named = list(model.named_parameters())
    frozen = [n for n, p in named if not p.requires_grad]
    count = sum(len(g["params"]) for g in sd["param_groups"])
    if count == len(named):
        return [n for n, _ in named], frozen
    if frozen and count == len(named) - len(frozen):
        return [n for n, p in named if p.requires_grad], []
    raise ConversionError(f"{src}: the optimizer holds {count} parameters, the model has {len(named)} "
                          f"({len(named) - len(frozen)} trainable); build the optimizer on model.parameters()")


def _check_state_shapes(src: str, model: Any, sd: AbcMapping[str, Any], names: Sequence[str]) -> None:
    """Each state tensor has its parameter's shape (an optimizer built in another order fails here)."""
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    order = [int(i) for g in sd["param_groups"] for i in g["params"]]
    bad = []
    for i, state in sd["state"].items():
        name = names[order.index(int(i))]
        for slot, value in state.items():
            shape = tuple(np.shape(value))
            if shape and shape != shapes[name]:
                bad.append(f"state {i} ({name}, {shapes[name]}): {slot} has shape {shape}")
    if bad:
        raise ConversionError(f"{src}: the optimizer state does not fit the model's parameters in their order "
                              "(was the optimizer built on model.parameters()?):\n  " + "\n  ".join(bad[:10]))


_TORCH_OPT = set(TORCH_TO_KERAS)


def torch_optimizer_name(ckpt: AbcMapping[str, Any], given: str | None) -> str:
    """The torch optimizer class of a torch-side checkpoint: given, recorded, or told by its state_dict.

    Raises:
        ConversionError: an unsupported class, or a state_dict that does not tell.

    Example:
        >>> torch_optimizer_name({}, "torch.optim.AdamW")
        'AdamW'
    """
    name = given or ckpt.get("optimizer_class")
    if name:
        short = str(name).rpartition(".")[2]
        if short not in _TORCH_OPT:
            raise ConversionError(f"torch optimizer {name!r} is not supported (supported: {', '.join(sorted(_TORCH_OPT))})")
        return short
    group = ckpt["optimizer"]["param_groups"][0]
    states = list(ckpt["optimizer"]["state"].values())
    slot_names = set(states[0]) if states else set()
    if "betas" in group:
        keras = "momentum" in slot_names
        return "KerasAdam" if keras else ("AdamW" if group.get("decoupled_weight_decay") else "Adam")
    if "alpha" in group:
        return "RMSprop"
    if "rho" in group:
        return "KerasRMSprop"
    if "dampening" in group:
        return "SGD"
    if "nesterov" in group:
        return "KerasSGD"
    raise ConversionError("cannot tell the torch optimizer class from its state_dict; pass optimizer_class= (--optimizer-class)")
