"""torch optimizers that reproduce Keras 3's update rules exactly (TF backend, float32).

Use these to resume a Keras run in torch with the same trajectory; the stock torch optimizers
differ in where epsilon goes (Adam, RMSprop) and in what the momentum buffer holds (SGD,
RMSprop), see ``docs/conversions.md``. Their state uses Keras's slot names (``momentum``,
``velocity``, ``velocity_hat``, ``average_gradient``) plus ``step`` (the Keras ``iterations``
before this parameter's next update), and ``weight_decay`` is Keras's decoupled decay
``w -= w * wd * lr`` applied before the update, as in every Keras 3 optimizer.

Example:
    >>> import torch
    >>> p = torch.nn.Parameter(torch.ones(2))
    >>> opt = KerasAdam([p], lr=0.1)
    >>> p.grad = torch.ones(2); opt.step()
    >>> round(p[0].item(), 4)
    0.9
"""

from __future__ import annotations

__all__ = ["KerasAdam", "KerasSGD", "KerasRMSprop"]

from collections.abc import Iterable
from typing import Any

from ..optional import require

torch = require("torch", "Keras-exact torch optimizers")


def _scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    # Keras casts hyperparameters to the variable's dtype before using them.
    return torch.tensor(value, dtype=like.dtype, device=like.device)


def _sparse_parts(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense gradient and Keras's "square" of a sparse (embedding) gradient.

    Keras 3 on TensorFlow gets an ``IndexedSlices`` gradient for an embedding, one row per
    occurrence of an index in the batch, and squares it *before* the rows are summed:
    ``v`` receives ``sum(g_i**2)`` where a dense optimizer sees ``(sum g_i)**2``. torch's
    ``nn.Embedding(sparse=True)`` gradient is uncoalesced in the same way, so squaring its
    values first reproduces Keras; a dense torch gradient has lost the per-occurrence rows.
    """
    indices, values = grad._indices(), grad._values()
    squared = torch.sparse_coo_tensor(indices, values.square(), grad.shape, check_invariants=False)
    return grad.coalesce().to_dense(), squared.coalesce().to_dense()


class _KerasOptimizer(torch.optim.Optimizer):
    _slots: tuple[str, ...] = ()

    def _state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0, dtype=torch.int64)
            for name in self._slots_for(group):
                state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _slots_for(self, group: dict[str, Any]) -> tuple[str, ...]:
        return self._slots

    @staticmethod
    def _decay(p: torch.Tensor, group: dict[str, Any]) -> None:
        if group["weight_decay"]:
            p.sub_(p * _scalar(group["weight_decay"], p) * _scalar(group["lr"], p))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One update of every parameter that has a gradient (Keras ``optimizer.apply``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, sq = _sparse_parts(p.grad) if p.grad.is_sparse else (p.grad, None)
                state = self._state(p, group)
                self._decay(p, group)
                self._update(p, g.to(p.dtype), state, group, None if sq is None else sq.to(p.dtype))
                state["step"] += 1
        return loss

    def _update(self, p: torch.Tensor, g: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
                sq: torch.Tensor | None) -> None:
        """Apply one update; ``sq`` is the squared gradient when it is not ``g*g`` (sparse)."""
        raise NotImplementedError


class KerasAdam(_KerasOptimizer):
    """Keras 3 ``Adam`` / ``AdamW`` (``weight_decay`` > 0) in torch.

    ``alpha = lr * sqrt(1 - beta_2**t) / (1 - beta_1**t)``;
    ``m += (g - m) * (1 - beta_1)``; ``v += (g*g - v) * (1 - beta_2)``;
    ``w -= alpha * m / (sqrt(v) + eps)`` (``v`` replaced by ``max(v_hat, v)`` with amsgrad).

    Example:
        >>> import torch
        >>> opt = KerasAdam([torch.nn.Parameter(torch.zeros(3))], lr=1e-3, betas=(0.9, 0.999), eps=1e-7)
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-7, weight_decay: float = 0.0, amsgrad: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad))

    def _slots_for(self, group):
        return ("momentum", "velocity", "velocity_hat") if group["amsgrad"] else ("momentum", "velocity")

    def _update(self, p, g, state, group, sq):
        beta_1, beta_2 = group["betas"]
        lr = _scalar(group["lr"], p)
        local_step = (state["step"] + 1).to(p.dtype)
        beta_1_power = torch.pow(_scalar(beta_1, p), local_step)
        beta_2_power = torch.pow(_scalar(beta_2, p), local_step)
        alpha = lr * torch.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        m, v = state["momentum"], state["velocity"]
        m.add_((g - m) * (1 - beta_1))
        v.add_(((g.square() if sq is None else sq) - v) * (1 - beta_2))
        if group["amsgrad"]:
            v_hat = state["velocity_hat"]
            torch.maximum(v_hat, v, out=v_hat)
            v = v_hat
        p.sub_((m * alpha) / (torch.sqrt(v) + group["eps"]))


class KerasSGD(_KerasOptimizer):
    """Keras 3 ``SGD`` in torch: ``m = momentum*m - lr*g; w += m``
    (Nesterov: ``w += momentum*m - lr*g``); the buffer holds ``-lr`` times torch's.

    Example:
        >>> import torch
        >>> opt = KerasSGD([torch.nn.Parameter(torch.zeros(3))], lr=0.01, momentum=0.9, nesterov=True)
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.01, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay))

    def _slots_for(self, group):
        return ("momentum",) if group["momentum"] != 0 else ()

    def _update(self, p, g, state, group, sq):
        lr = _scalar(group["lr"], p)
        if group["momentum"] == 0:
            p.sub_(g * lr)
            return
        momentum = _scalar(group["momentum"], p)
        m = state["momentum"]
        m.copy_(m * momentum - g * lr)
        if group["nesterov"]:
            p.add_(m * momentum - g * lr)
        else:
            p.add_(m)


class KerasRMSprop(_KerasOptimizer):
    """Keras 3 ``RMSprop`` in torch: ``v = rho*v + (1-rho)*g*g``;
    ``inc = lr*g / sqrt(v + eps)`` (centered: ``sqrt(v - a*a + eps)``, ``a`` the average
    gradient); with momentum ``mom = momentum*mom + inc; w -= mom``, else ``w -= inc``.

    Example:
        >>> import torch
        >>> opt = KerasRMSprop([torch.nn.Parameter(torch.zeros(3))], lr=1e-3, rho=0.9, momentum=0.5)
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, rho: float = 0.9, momentum: float = 0.0,
                 eps: float = 1e-7, centered: bool = False, weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, rho=rho, momentum=momentum, eps=eps, centered=centered, weight_decay=weight_decay))

    def _slots_for(self, group):
        return ("velocity",) + (("momentum",) if group["momentum"] > 0 else ()) + (("average_gradient",) if group["centered"] else ())

    def _update(self, p, g, state, group, sq):
        lr, rho = _scalar(group["lr"], p), group["rho"]
        v = state["velocity"]
        v.copy_(rho * v + (1 - rho) * (g.square() if sq is None else sq))
        if group["centered"]:
            a = state["average_gradient"]
            a.copy_(rho * a + (1 - rho) * g)
            denominator = v - a.square() + group["eps"]
        else:
            denominator = v + group["eps"]
        increment = (lr * g) / torch.sqrt(denominator)
        if group["momentum"] > 0:
            mom = state["momentum"]
            mom.copy_(group["momentum"] * mom + increment)
            p.sub_(mom)
        else:
            p.sub_(increment)
