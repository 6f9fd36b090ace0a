"""One table per optimizer, read by both directions: Keras's slots and hyperparameters and
where stock torch (and the Keras-exact torch optimizers) keep them.

Example:
    >>> [(s.keras, s.torch) for s in TABLES["SGD"].slots]
    [('momentum', 'momentum_buffer')]
    >>> KERAS_SLOTS["RMSprop"]
    ('velocity', 'momentum', 'average_gradient')
"""

from __future__ import annotations

__all__ = ["ADAM_EPS", "SlotLink", "HyperLink", "OptimizerTable", "TABLES", "KERAS_SLOTS", "KERAS_DEFAULTS", "TORCH_TO_KERAS"]

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class SlotLink:
    """One Keras slot and the stock torch state entry holding it.

    Attributes:
        keras: the Keras slot name (the Keras-exact torch optimizers use it too).
        torch: the stock torch state name.
        lr_sign: 0 when the values are equal; else ``keras = torch * lr_sign * lr`` (SGD's
            momentum: -1, RMSprop's: +1).
        when: the Keras config option without which the slot does not exist.
    """

    keras: str
    torch: str
    lr_sign: int = 0
    when: str | None = None


@dataclass(frozen=True, slots=True)
class HyperLink:
    """One Keras hyperparameter and its torch constructor argument.

    Attributes:
        keras: the Keras config key.
        torch: the stock torch argument (``"betas.0"``: an item of a tuple argument).
        default: Keras's default.
        exact: the Keras-exact optimizer's argument when it differs from ``torch``.
        flag: a boolean option.
    """

    keras: str
    torch: str
    default: Any
    exact: str | None = None
    flag: bool = False

    def torch_name(self, exact: bool) -> str:
        return (self.exact or self.torch) if exact else self.torch


@dataclass(frozen=True, slots=True)
class OptimizerTable:
    """A Keras optimizer class and its torch counterparts.

    Attributes:
        keras: the Keras class.
        stock / exact: the torch classes (``torch.optim.<stock>``, the Keras-exact one).
        hyper: its hyperparameters (the learning rate and weight decay are common to all).
        slots: its slots, in Keras's order.
        step: stock torch keeps a per-parameter ``step``.
        weight_decay: Keras's default decoupled weight decay, when it has one.
        decoupled: stock torch carries Keras's decoupled weight decay (as ``AdamW``); else it
            has only L2 on the gradient, and the decay is dropped (with a drift note).
        fixed: stock torch arguments Keras has no option for, at the value that matches it.
        from_stock: the note on continuing a stock torch run in Keras (``{optimizer}``,
            ``{lr}`` are filled in).
    """

    keras: str
    stock: str
    exact: str
    hyper: tuple[HyperLink, ...]
    slots: tuple[SlotLink, ...]
    step: bool = True
    weight_decay: float | None = None
    decoupled: bool = False
    fixed: tuple[tuple[str, Any], ...] = ()
    from_stock: str = ""


_ADAM_HYPER = (
    HyperLink("beta_1", "betas.0", 0.9),
    HyperLink("beta_2", "betas.1", 0.999),
    HyperLink("epsilon", "eps", 1e-7),
    HyperLink("amsgrad", "amsgrad", False, flag=True),
)
_ADAM_SLOTS = (SlotLink("momentum", "exp_avg"), SlotLink("velocity", "exp_avg_sq"),
               SlotLink("velocity_hat", "max_exp_avg_sq", when="amsgrad"))
#: Where Adam's epsilon goes in each framework: the drift a stock torch Adam has.
ADAM_EPS = (
    "Keras adds epsilon to sqrt(v) before bias correction (update lr*sqrt(1-b2^t)/(1-b1^t) * m/(sqrt(v)+eps)); "
    "torch adds it to sqrt(v_hat) after (lr/(1-b1^t) * m/(sqrt(v)/sqrt(1-b2^t)+eps)), i.e. torch's effective "
    "epsilon is larger by 1/sqrt(1-b2^t)"
)
_ADAM_FROM_STOCK = "from stock torch.optim.{optimizer}: " + ADAM_EPS + "; Keras will continue with its own placement"

#: ``{Keras class: table}``.
TABLES: dict[str, OptimizerTable] = {
    "Adam": OptimizerTable("Adam", "Adam", "KerasAdam", _ADAM_HYPER, _ADAM_SLOTS, decoupled=True, from_stock=_ADAM_FROM_STOCK),
    "AdamW": OptimizerTable("AdamW", "AdamW", "KerasAdam", _ADAM_HYPER, _ADAM_SLOTS, weight_decay=0.004, decoupled=True,
                            from_stock=_ADAM_FROM_STOCK),
    "SGD": OptimizerTable(
        "SGD", "SGD", "KerasSGD",
        (HyperLink("momentum", "momentum", 0.0), HyperLink("nesterov", "nesterov", False, flag=True)),
        (SlotLink("momentum", "momentum_buffer", lr_sign=-1, when="momentum"),),
        step=False,
        fixed=(("dampening", 0.0),),
        from_stock="from stock torch.optim.SGD: Keras momentum = -lr * momentum_buffer (lr={lr:g})",
    ),
    "RMSprop": OptimizerTable(
        "RMSprop", "RMSprop", "KerasRMSprop",
        (HyperLink("rho", "alpha", 0.9, exact="rho"), HyperLink("momentum", "momentum", 0.0),
         HyperLink("epsilon", "eps", 1e-7), HyperLink("centered", "centered", False, flag=True)),
        (SlotLink("velocity", "square_avg"), SlotLink("momentum", "momentum_buffer", lr_sign=1, when="momentum"),
         SlotLink("average_gradient", "grad_avg", when="centered")),
        from_stock="from stock torch.optim.RMSprop: Keras momentum = lr * momentum_buffer; epsilon moves inside the sqrt",
    ),
}

#: Keras 3 slot names per optimizer class, as in ``add_optimizer_variables(vars, name)``.
KERAS_SLOTS: dict[str, tuple[str, ...]] = {k: tuple(s.keras for s in t.slots) for k, t in TABLES.items()}

#: Keras 3 defaults of the hyperparameters a TF checkpoint does not store.
KERAS_DEFAULTS: dict[str, dict[str, Any]] = {
    k: {**{h.keras: h.default for h in t.hyper}, **({"weight_decay": t.weight_decay} if t.weight_decay is not None else {})}
    for k, t in TABLES.items()
}

#: torch class (stock or Keras-exact) -> the Keras class it continues (Adam or AdamW by its weight decay).
TORCH_TO_KERAS: dict[str, str] = {}
for _t in TABLES.values():
    TORCH_TO_KERAS.setdefault(_t.stock, _t.keras)
    TORCH_TO_KERAS.setdefault(_t.exact, _t.keras)
