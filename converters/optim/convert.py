"""Optimizer state between Keras 3 and torch, slot by slot through the weight mapping's plan.

Each slot (Adam's ``m``/``v``, SGD's momentum, RMSprop's velocity...) belongs to one Keras
variable and goes through the same layout ops as that variable (the plan entry's
``for_slots`` variant: a Keras LSTM bias split into ``bias_ih``/``bias_hh`` gives both the
same slot, since both receive the same gradient). Values change where the two frameworks
define a slot differently:

=========  ================================  =========================================
Keras 3    stock torch                       relation
=========  ================================  =========================================
Adam m/v   ``exp_avg``/``exp_avg_sq``        equal; epsilon placement differs (report)
SGD m      ``momentum_buffer``               ``m = -lr * buf`` (exact for a constant lr)
RMSprop v  ``square_avg``                    equal; epsilon inside vs outside the sqrt
RMSprop    ``momentum_buffer``               ``mom = lr * buf``
iterations ``step``                          equal (per parameter in torch)
=========  ================================  =========================================

The Keras-exact torch optimizers (:mod:`.keras_exact`) keep Keras's slots unchanged.

Example:
    >>> import numpy as np
    >>> from ckptfmt.converters.mapping import Mapping, Convert, Transpose
    >>> plan = Mapping((Convert(("d/kernel",), ("fc.weight",), (Transpose((1, 0)),)),)).plan({"d/kernel": (3, 2)})
    >>> ks = KerasOptimizerState("SGD", {"learning_rate": 0.1, "momentum": 0.9}, 4,
    ...                          {"d/kernel": {"momentum": np.ones((3, 2), np.float32)}})
    >>> conv = keras_to_torch_optimizer(ks, plan, ["fc.weight"])
    >>> conv.optimizer, float(conv.state[0]["momentum_buffer"][0, 0])
    ('torch.optim.SGD', -10.0)
"""

from __future__ import annotations

__all__ = [
    "KERAS_SLOTS",
    "KerasOptimizerState",
    "OptimizerConversion",
    "keras_optimizer_state",
    "describe_keras_optimizer",
    "StreamedTensor",
    "entry_views",
    "keras_to_torch_optimizer",
    "torch_to_keras_optimizer",
]

import math
from collections.abc import Collection, Sequence
from collections.abc import Mapping as AbcMapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ckptfmt._writer import DeferredTensor
from ckptfmt.converters.mapping.rules import Entry, Mean, Plan, TensorSpec
from ckptfmt.errors import ConversionError, UnmappedKeyError

from ._views import DeferredEntry, StreamedTensor, _layout_view, entry_views  # noqa: F401 (re-exported)
from .tables import ADAM_EPS, KERAS_SLOTS, TABLES, TORCH_TO_KERAS, OptimizerTable

# Keras-exact torch optimizers live here; their state uses Keras's slot names.
_EXACT_MODULE = "ckptfmt.converters.optim"


@dataclass(frozen=True, slots=True)
class KerasOptimizerState:
    """A Keras 3 optimizer's state, framework-free.

    Attributes:
        class_name: ``"Adam"``, ``"AdamW"``, ``"SGD"`` or ``"RMSprop"``.
        config: ``optimizer.get_config()`` (``learning_rate`` a float: the current value).
        iterations: Keras ``optimizer.iterations``, the count of updates made.
        slots: ``{variable key: {slot name: array}}`` in Keras layout; a value may be a
            ``ckptfmt._writer.DeferredTensor`` (read when written), and then the converted
            torch state holds deferred values too (:func:`keras_to_torch_optimizer`).
    """

    class_name: str
    config: dict[str, Any] = field(hash=False)
    iterations: int = 0
    slots: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, hash=False)

    def variables(self, prefix: str, variable_paths: AbcMapping[str, str] | None = None) -> dict[str, np.ndarray]:
        """The Keras 3 optimizer variables by path: ``{prefix}/iteration``,
        ``{prefix}/learning_rate`` and ``{prefix}/{variable path with / as _}_{slot}``.

        Args:
            prefix: the optimizer's name (``"adam"``).
            variable_paths: ``{variable key: Keras variable path}`` when the keys are not paths.

        Example:
            >>> s = KerasOptimizerState("SGD", {"learning_rate": 0.1}, 2, {"d/kernel": {"momentum": np.zeros(2)}})
            >>> sorted(s.variables("sgd"))
            ['sgd/d_kernel_momentum', 'sgd/iteration', 'sgd/learning_rate']
        """
        out = {
            f"{prefix}/iteration": np.array(self.iterations, np.int64),
            f"{prefix}/learning_rate": np.array(_lr(self.config), np.float32),
        }
        for key, slots in self.slots.items():
            path = (variable_paths or {}).get(key, key)
            for name, value in slots.items():
                out[f"{prefix}/{path.replace('/', '_')}_{name}"] = value
        return out


@dataclass(frozen=True, slots=True)
class OptimizerConversion:
    """A torch optimizer's state converted from Keras.

    Attributes:
        optimizer: the class to build (``"torch.optim.AdamW"``, ``"ckptfmt.converters.optim.KerasAdam"``).
        hyperparameters: its constructor's keyword arguments.
        state: ``{param index: {name: array}}`` in the order of ``param_names`` (a value is a
            ``DeferredTensor`` where the Keras slot was one: read and converted when loaded).
        report: what was converted and how far a stock torch optimizer may drift from Keras.
    """

    optimizer: str
    hyperparameters: dict[str, Any] = field(hash=False)
    state: dict[int, dict[str, np.ndarray]] = field(hash=False)
    report: str

    def state_dict(self, base: AbcMapping[str, Any] | None = None) -> dict[str, Any]:
        """A torch ``optimizer.state_dict()`` with numpy leaves (one param group).

        Args:
            base: the target optimizer's own ``state_dict()``: its group supplies the keys
                this conversion does not set (``foreach``, ``maximize``...) and the params.

        Example:
            >>> opt.load_state_dict(numpy_to_state(conv.state_dict(opt.state_dict())))  # doctest: +SKIP
        """
        group: dict[str, Any] = {}
        params = list(range(max(self.state, default=-1) + 1))
        if base is not None:
            if len(base["param_groups"]) != 1:
                raise ConversionError("the target optimizer must have exactly one param group")
            group.update(base["param_groups"][0])
            params = list(group["params"])
        group.update(self.hyperparameters)
        group["params"] = params
        return {"state": dict(self.state), "param_groups": [group]}


def _lr(config: AbcMapping[str, Any]) -> float:
    lr = config.get("learning_rate", 0.001)
    if not isinstance(lr, (int, float, np.floating, np.ndarray)) or np.ndim(lr):
        raise ConversionError(
            f"the optimizer's learning_rate is a schedule ({lr!r}); pass its current value in config['learning_rate'] "
            "and rebuild the schedule in the other framework"
        )
    return float(lr)


def keras_optimizer_state(
    class_name: str,
    config: AbcMapping[str, Any],
    optimizer_variables: AbcMapping[str, np.ndarray],
    variable_keys: AbcMapping[str, str] | Sequence[str],
) -> KerasOptimizerState:
    """Parse Keras 3 optimizer variables (``adam/iteration``, ``adam/dense_kernel_momentum``...).

    Args:
        class_name: the Keras optimizer class.
        config: its ``get_config()``.
        optimizer_variables: ``{path: array}`` of the optimizer's variables.
        variable_keys: the trainable variables: their Keras paths (``"dense/kernel"``), or
            ``{key in the weight mapping: Keras path}``.

    Raises:
        UnmappedKeyError: an optimizer variable belongs to no listed variable (all listed).

    Example:
        >>> ov = {"sgd/iteration": np.array(3), "sgd/learning_rate": np.array(0.1),
        ...       "sgd/d_kernel_momentum": np.zeros(2)}
        >>> keras_optimizer_state("SGD", {"momentum": 0.9}, ov, ["d/kernel"]).iterations
        3
    """
    if class_name not in KERAS_SLOTS:
        raise ConversionError(f"Keras optimizer {class_name!r} is not supported (supported: {', '.join(KERAS_SLOTS)})")
    keys = dict(variable_keys) if isinstance(variable_keys, AbcMapping) else {k: k for k in variable_keys}
    config = dict(config)
    iterations = 0
    by_name: dict[str, tuple[str, str]] = {}
    for key, path in keys.items():
        for slot in KERAS_SLOTS[class_name]:
            by_name[f"{path.replace('/', '_')}_{slot}"] = (key, slot)
    slots: dict[str, dict[str, np.ndarray]] = {}
    unknown = []
    for path, value in optimizer_variables.items():
        name = path.split("/", 1)[1] if "/" in path else path
        if name == "iteration" or name == "iterations":
            iterations = int(np.asarray(value))
        elif name == "learning_rate":
            config["learning_rate"] = float(np.asarray(value))
        elif name in by_name:
            key, slot = by_name[name]
            slots.setdefault(key, {})[slot] = np.asarray(value)
        else:
            unknown.append(path)
    if unknown:
        raise UnmappedKeyError(f"{len(unknown)} optimizer variable(s) belong to no listed variable: " + ", ".join(unknown))
    return KerasOptimizerState(class_name, config, iterations, slots)


def describe_keras_optimizer(optimizer: Any, variables: Sequence[Any]) -> KerasOptimizerState:
    """The state of a live Keras 3 optimizer built on ``variables`` (duck-typed, keys = paths).

    Example:
        >>> state = describe_keras_optimizer(opt, model.trainable_variables)  # doctest: +SKIP
    """
    return keras_optimizer_state(
        type(optimizer).__name__,
        optimizer.get_config(),
        {v.path: np.array(v.numpy()) for v in optimizer.variables},
        [v.path for v in variables],
    )


def _check_supported(config: AbcMapping[str, Any]) -> list[str]:
    if config.get("use_ema"):
        raise ConversionError("the Keras optimizer uses EMA (use_ema=True); its moving-average variables have no torch slot")
    if config.get("gradient_accumulation_steps"):
        raise ConversionError("the Keras optimizer accumulates gradients (gradient_accumulation_steps); its accumulators have no torch slot")
    notes = []
    for k in ("clipnorm", "clipvalue", "global_clipnorm"):
        if config.get(k) is not None:
            notes.append(f"Keras {k}={config[k]} is not optimizer state in torch: clip gradients before step() (torch.nn.utils.clip_grad_norm_/clip_grad_value_)")
    return notes


def _slot_values(entry: Entry, sources: tuple[Any, ...], slot: str, problems: list[str]) -> tuple[Any, ...]:
    """One slot of one plan entry in torch layout: deferred (:class:`StreamedTensor`) where the
    Keras slots are, converted now where they are arrays; () with a problem noted for a slot
    whose shape is not its variable's."""
    if not any(isinstance(v, DeferredTensor) for v in sources):
        return entry.run(tuple(np.asarray(v) for v in sources), slots=True)
    bad = [f"{k}: slot {slot!r} has shape {tuple(v.shape)}, its variable {tuple(spec.shape)}"
           for k, v, spec in zip(entry.sources, sources, entry.source_specs) if tuple(v.shape) != tuple(spec.shape)]
    if bad:
        problems += bad
        return ()
    run = DeferredEntry(entry, sources)
    # what the slot ops make of the slots' own dtypes (a Cast in a mapping file changes it)
    specs = tuple(TensorSpec(tuple(v.shape), np.dtype(v.dtype).name) for v in sources)
    for op in entry.ops:
        specs = op.for_slots().infer(specs)
    return tuple(StreamedTensor(tuple(spec.shape), np.dtype(out.dtype or sources[0].dtype), lambda i=i, run=run: run.load(i))
                 for i, (spec, out) in enumerate(zip(entry.target_specs, specs)))


def _torch_slots(state: KerasOptimizerState, plan: Plan, param_names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{torch param name: {keras slot name: array in torch layout}}``; deferred where the Keras slots are."""
    index = {n: i for i, n in enumerate(param_names)}
    out: dict[str, dict[str, Any]] = {}
    unknown = [k for k in state.slots if not any(k in e.sources for e in plan.entries)]
    problems = [f"{k}: has optimizer slots but no entry of the weight plan reads it" for k in unknown]
    for entry in plan.entries:
        have = [k for k in entry.sources if k in state.slots]
        if not have:
            continue
        if len(have) != len(entry.sources) or len({frozenset(state.slots[k]) for k in have}) != 1:
            problems.append(f"{', '.join(entry.sources)}: converted together but their optimizer slots differ")
            continue
        for slot in state.slots[have[0]]:
            values = _slot_values(entry, tuple(state.slots[k][slot] for k in entry.sources), slot, problems)
            for target, value in zip(entry.targets, values):
                out.setdefault(target, {})[slot] = value
    problems += [f"{t}: has optimizer slots but is not in param_names" for t in out if t not in index]
    if problems:
        raise UnmappedKeyError("cannot place the optimizer state:\n  " + "\n  ".join(problems))
    return out


def keras_to_torch_optimizer(state: KerasOptimizerState, plan: Plan, param_names: Sequence[str], *, exact: bool = False,
                             frozen: Collection[str] = ()) -> OptimizerConversion:
    """Convert a Keras optimizer's state to a torch optimizer's.

    Args:
        state: the Keras state (:func:`keras_optimizer_state`, :func:`describe_keras_optimizer`).
        plan: the Keras -> torch weight plan (``mapping.plan(keras_weights)``).
        param_names: the torch parameter names in the optimizer's order (indices of its
            ``state_dict()``), e.g. ``[n for n, _ in model.named_parameters()]``.
        exact: target the Keras-exact optimizers (``KerasAdam``...) instead of stock torch ones.
        frozen: parameters that do not train (``requires_grad=False``, e.g. an LSTM's
            ``bias_hh`` kept at zero): they get no state, as a torch optimizer never gives them any.

    Raises:
        ConversionError: an unsupported optimizer or option (EMA, gradient accumulation, a
            learning-rate schedule without its current value).
        UnmappedKeyError: slots that the plan or ``param_names`` cannot place.

    Example:
        >>> conv = keras_to_torch_optimizer(state, plan, names)  # doctest: +SKIP
        >>> opt = torch.optim.AdamW(model.parameters(), **conv.hyperparameters)  # doctest: +SKIP
        >>> print(conv.report)  # doctest: +SKIP
    """
    cfg, t = state.config, state.iterations
    table = _table(state.class_name)
    notes = _check_supported(cfg)
    lr = _lr(cfg)
    wd = float(cfg.get("weight_decay") or 0.0)
    slots = _torch_slots(state, plan, param_names)
    frozen = set(frozen)
    if frozen & set(param_names):
        notes.append(f"no state for the frozen parameters {', '.join(n for n in param_names if n in frozen)} (requires_grad=False)")
    slots = {t: v for t, v in slots.items() if t not in frozen}
    index = {n: i for i, n in enumerate(param_names) if n not in frozen}
    out: dict[int, dict[str, np.ndarray]] = {}

    if exact:
        return _exact_conversion(table, cfg, lr, wd, t, slots, index, notes)
    name = "torch.optim." + (("AdamW" if wd else "Adam") if table.decoupled else table.stock)
    hyper = _torch_hyper(table, cfg, lr, wd if table.decoupled else 0.0, exact=False)
    for target, s in slots.items():
        o = _stock_state(table, cfg, lr, t, s)
        if o:
            out[index[target]] = o
    first, drift = _stock_notes(table, name, hyper, lr, wd, t)
    notes.insert(0, first)
    notes += drift
    return OptimizerConversion(name, hyper, out if t else {}, _report(notes))


def _exact_conversion(table: OptimizerTable, cfg: AbcMapping[str, Any], lr: float, wd: float, t: int,
                      slots: AbcMapping[str, dict[str, np.ndarray]], index: AbcMapping[str, int], notes: list[str]) -> OptimizerConversion:
    """To the Keras-exact torch optimizer: Keras's slots unchanged (layout only), iterations -> step."""
    name = f"{_EXACT_MODULE}.{table.exact}"
    hyper = _torch_hyper(table, cfg, lr, wd, exact=True)
    # step even for slot-less parameters (plain SGD), as torch keeps it
    out = {i: {"step": np.array(t, np.int64), **slots.get(target, {})} for target, i in index.items()}
    notes.insert(0, f"{name} reproduces Keras 3 {table.keras}'s updates exactly; slots copied unchanged (layout only), iterations {t} -> step")
    return OptimizerConversion(name, hyper, out if t else {}, _report(notes))


def _stock_state(table: OptimizerTable, cfg: AbcMapping[str, Any], lr: float, t: int,
                 keras_slots: AbcMapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One parameter's stock torch state from its Keras slots, through the table."""
    o = {"step": np.array(float(t), np.float32)} if table.step else {}
    for link in table.slots:
        if link.when is None or cfg.get(link.when):
            v = keras_slots[link.keras]
            o[link.torch] = _scaled(v, np.float32(link.lr_sign * lr)) if link.lr_sign else v
    return o


def _scaled(v: Any, divisor: np.float32) -> Any:
    """``v / divisor`` in ``v``'s dtype; deferred when ``v`` is."""
    if isinstance(v, DeferredTensor):  # elementwise: a StreamedTensor's value in any shape
        return StreamedTensor(v.shape, v.dtype, lambda: _scaled(np.asarray(v.load()), divisor))
    return (v / divisor).astype(v.dtype)


def _table(cls: str) -> OptimizerTable:
    if cls not in TABLES:
        raise ConversionError(f"Keras optimizer {cls!r} is not supported (supported: {', '.join(TABLES)})")
    return TABLES[cls]


def _torch_hyper(table: OptimizerTable, cfg: AbcMapping[str, Any], lr: float, wd: float, *, exact: bool) -> dict[str, Any]:
    """The torch constructor's arguments from a Keras config, through the table."""
    hyper: dict[str, Any] = {"lr": lr}
    items: dict[str, dict[int, Any]] = {}
    for h in table.hyper:
        value = cfg.get(h.keras, h.default)
        value = bool(value) if h.flag else value
        name, _, item = h.torch_name(exact).partition(".")
        if item:  # an item of a tuple argument (Adam's betas)
            hyper.setdefault(name, None)
            items.setdefault(name, {})[int(item)] = value
        else:
            hyper[name] = value
    for name, parts in items.items():
        hyper[name] = tuple(parts[i] for i in sorted(parts))
    if not exact:
        hyper.update(table.fixed)
    hyper["weight_decay"] = wd
    return hyper


def _stock_notes(table: OptimizerTable, name: str, hyper: AbcMapping[str, Any], lr: float, wd: float, t: int) -> tuple[str, list[str]]:
    """What a stock torch optimizer holds, and how far its updates drift from Keras's."""
    drift: list[str] = []
    if table.decoupled:
        factor = 1 / math.sqrt(1 - hyper["betas"][1] ** (t + 1))
        first = (f"stock {name}: exp_avg = m, exp_avg_sq = v, step = iterations = {t}"
                 + (f"; Keras's decoupled weight_decay={wd} is AdamW's" if wd else ""))
        drift.append(f"drift: {ADAM_EPS}; at the next step (t={t + 1}) by {factor:.3g}x. Each update differs by a relative "
                     f"eps*(factor-1)/(sqrt(v_hat)+eps): negligible while |gradients| >> eps={hyper['eps']:g}. Use KerasAdam (exact=True) for identical updates")
        return first, drift
    if table.keras == "SGD":
        first = (f"stock {name}: momentum_buffer = -m / lr (lr={lr:g}); Keras's buffer holds -lr times torch's, "
                 "so the trajectories agree exactly only while lr stays constant (a schedule scales old momentum differently)")
        if wd:
            drift.append(f"drift: Keras's decoupled weight_decay={wd} (w -= w*wd*lr) is not torch SGD's (L2 added to the gradient); "
                         "dropped here. Use KerasSGD (exact=True) to keep it")
        return first, drift
    first = f"stock {name}: square_avg = velocity, momentum_buffer = momentum / lr, grad_avg = average_gradient, alpha = rho"
    drift.append("drift: Keras divides by sqrt(v + eps), torch by sqrt(v) + eps; updates differ where v is near eps^2..eps "
                 "(small gradients). Use KerasRMSprop (exact=True) for identical updates")
    if wd:
        drift.append(f"drift: Keras's decoupled weight_decay={wd} has no torch RMSprop equivalent; dropped. Use KerasRMSprop")
    return first, drift


def _keras_config(table: OptimizerTable, optimizer: str, g: AbcMapping[str, Any], exact: bool,
                  notes: list[str]) -> tuple[str, dict[str, Any]]:
    """The Keras class and config of a torch param group, through the table."""
    lr = float(g["lr"])
    wd = float(g.get("weight_decay") or 0.0)
    # torch's weight_decay is L2 on the gradient except in AdamW (and Adam(decoupled_weight_decay=True))
    l2 = (optimizer == "Adam" and not g.get("decoupled_weight_decay")) if table.decoupled else not exact
    if wd and l2:
        notes.append(f"drift: torch {optimizer}'s weight_decay={wd} is L2 on the gradient, which Keras has no option for; dropped")
        wd = 0.0
    if not exact and g.get("dampening"):
        raise ConversionError(f"torch SGD dampening={g['dampening']} has no Keras equivalent")
    if not exact:
        notes.append(table.from_stock.format(optimizer=optimizer, lr=lr))
    config = {"learning_rate": lr, **{h.keras: _group_value(g, h.torch_name(exact), h.default, h.flag) for h in table.hyper},
              "weight_decay": wd or None}
    return (("AdamW" if wd else "Adam") if table.decoupled else table.keras), config


def _keras_iterations(state: AbcMapping[str, Any], iterations: int | None, notes: list[str]) -> int:
    """Keras's one step count from torch's per-parameter ones (or the one given)."""
    steps = {int(np.asarray(s["step"])) for s in state.values() if "step" in s}
    if len(steps) > 1:
        notes.append(f"parameters took different step counts {sorted(steps)}; Keras keeps one: the largest is used")
    if iterations is None:
        iterations = max(steps, default=0)
        if not steps and state:
            notes.append("torch kept no step count: Keras iterations set to 0; pass iterations= to set it")
    return int(iterations)


def _keras_slots(plan: Plan, state: AbcMapping[str, Any], names: AbcMapping[str, str], scale: AbcMapping[str, float],
                 notes: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """``{Keras variable: {slot: array}}`` of torch's state, through the inverse weight plan."""
    inverse = plan.inverse()
    slots: dict[str, dict[str, np.ndarray]] = {}
    problems = []
    for entry in inverse.entries:
        have = [k for k in entry.sources if k in state]
        if not have:
            continue
        if len(have) != len(entry.sources):
            # Parameters torch sums into one Keras variable (an LSTM's bias_ih + bias_hh) share
            # its gradient, so one that trained carries the slots; a frozen one has none.
            if not all(isinstance(op.for_slots(), Mean) for op in entry.ops):
                problems.append(f"{', '.join(entry.sources)}: converted together but only {', '.join(have)} have optimizer state")
                continue
            notes.append(f"{', '.join(k for k in entry.sources if k not in have)} had no optimizer state (frozen): "
                         f"{', '.join(entry.targets)} takes its slots from {', '.join(have)}")
        _entry_slots(entry, [state[k] for k in have], names, scale, slots)
    unplaced = [n for n in state if not any(n in e.sources for e in inverse.entries)]
    problems += [f"{n}: has optimizer state but no entry of the weight plan writes it" for n in unplaced]
    if problems:
        raise UnmappedKeyError("cannot place the optimizer state:\n  " + "\n  ".join(problems))
    return slots


def _entry_slots(entry: Any, states: Sequence[AbcMapping[str, Any]], names: AbcMapping[str, str],
                 scale: AbcMapping[str, float], slots: dict[str, dict[str, np.ndarray]]) -> None:
    """One inverse plan entry's slots, from the torch state of the parameters it reads."""
    for tname, kname in names.items():
        if tname not in states[0] or states[0][tname] is None:
            continue
        values = entry.run(tuple(np.asarray(st[tname]) for st in states), slots=True)
        for target, value in zip(entry.targets, values):
            if kname in scale:
                value = (value * np.float32(scale[kname])).astype(value.dtype)
            slots.setdefault(target, {})[kname] = value


def _group_value(group: AbcMapping[str, Any], name: str, default: Any, flag: bool) -> Any:
    key, _, item = name.partition(".")
    value = group.get(key, default) if not item else group[key][int(item)]
    return bool(value) if flag else value


def _report(notes: list[str]) -> str:
    return "\n".join(f"- {n}" for n in notes)


def torch_to_keras_optimizer(
    optimizer: str,
    state_dict: AbcMapping[str, Any],
    plan: Plan,
    param_names: Sequence[str],
    *,
    iterations: int | None = None,
    frozen: Collection[str] = (),
) -> tuple[KerasOptimizerState, str]:
    """Convert a torch optimizer's ``state_dict()`` (numpy leaves) to Keras 3 state.

    Args:
        optimizer: the torch class name: ``Adam``, ``AdamW``, ``SGD``, ``RMSprop`` or a
            Keras-exact ``KerasAdam``, ``KerasSGD``, ``KerasRMSprop``.
        state_dict: its state dict with numpy arrays (``ckptfmt.adapters.torch.state_to_numpy``).
        plan: the Keras -> torch weight plan; its inverse carries slots back.
        param_names: the torch parameter names in the optimizer's order.
        iterations: the Keras iteration count when torch keeps none (stock SGD).
        frozen: parameters that do not train; state torch holds for them (stale) is ignored.

    Returns:
        ``(KerasOptimizerState, report)``.

    Example:
        >>> ks, report = torch_to_keras_optimizer("AdamW", sd, plan, names)  # doctest: +SKIP
        >>> ks.variables("adamw")  # doctest: +SKIP
    """
    if optimizer not in TORCH_TO_KERAS:
        raise ConversionError(f"torch optimizer {optimizer!r} is not supported (supported: {', '.join(TORCH_TO_KERAS)})")
    groups = state_dict["param_groups"]
    if len(groups) != 1:
        raise ConversionError(f"the torch optimizer has {len(groups)} param groups; Keras optimizers have one set of hyperparameters")
    g = groups[0]
    order = list(g["params"])
    state = {param_names[order.index(i)]: s for i, s in state_dict["state"].items()}
    stale = sorted(n for n in state if n in set(frozen))
    state = {n: v for n, v in state.items() if n not in stale}
    table = TABLES[TORCH_TO_KERAS[optimizer]]
    exact = optimizer.startswith("Keras")
    notes: list[str] = []
    cls, config = _keras_config(table, optimizer, g, exact, notes)
    if stale:
        notes.append(f"optimizer state of the frozen parameters {', '.join(stale)} ignored (requires_grad=False)")
    iterations = _keras_iterations(state, iterations, notes)
    # the slots' names and scales in the other direction, through the same table
    names = {s.keras: s.keras for s in table.slots} if exact else {s.torch: s.keras for s in table.slots}
    scale = {} if exact else {s.keras: float(s.lr_sign * config["learning_rate"]) for s in table.slots if s.lr_sign}
    slots = _keras_slots(plan, state, names, scale, notes)
    return KerasOptimizerState(cls, config, iterations, slots), _report(notes)
