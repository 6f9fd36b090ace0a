"""What a conversion did, or in a dry run would do: the plan's table, unused keys, notes, optimizer.

Example:
    >>> from ckptfmt.converters.mapping import Mapping, Rename
    >>> plan = Mapping((Rename("fc/kernel", "fc.weight"),)).plan({"fc/kernel": (2, 3)})
    >>> print(ConversionReport("tf2torch", "a", "b.pt", plan).table().splitlines()[0])
    tf2torch: a -> b.pt (dry run: nothing written)
"""

from __future__ import annotations

__all__ = ["ConversionReport"]

from dataclasses import dataclass, field
from typing import Any

from ..mapping.rules import Plan


@dataclass(frozen=True, slots=True)
class ConversionReport:
    """What a conversion did (or, in a dry run, would do).

    Attributes:
        direction: ``"tf2torch"`` or ``"torch2tf"``.
        source / destination: the paths.
        plan: the Keras -> torch weight plan (source key, target key, ops, shapes).
        key_map: ``{plan source key: checkpoint key}`` on the TF side.
        unused: source keys left behind (``save_counter``, optimizer state with --no-optimizer).
        optimizer: the optimizer class written (``"torch.optim.Adam"``), or None.
        optimizer_hyperparameters: its constructor's arguments.
        optimizer_report: the slot conversion and expected drift, one ``- `` line each.
        notes: conventions the weights cannot carry (BatchNorm eps, padding, assumed defaults).
        written: False for a dry run.
    """

    direction: str
    source: str
    destination: str
    plan: Plan
    key_map: dict[str, str] = field(default_factory=dict)
    unused: tuple[str, ...] = ()
    optimizer: str | None = None
    optimizer_hyperparameters: dict[str, Any] = field(default_factory=dict)
    optimizer_report: str = ""
    notes: tuple[str, ...] = ()
    written: bool = False

    def table(self) -> str:
        """The mapping table, the unused keys, the notes and the optimizer report, as text."""
        lines = [f"{self.direction}: {self.source} -> {self.destination}" + ("" if self.written else " (dry run: nothing written)"), ""]
        lines.append(self.plan.table())
        if self.unused:
            lines += ["", f"unused source keys ({len(self.unused)}):"] + [f"  {k}" for k in self.unused]
        extra = [n for n in self.notes if n not in self.plan.notes]
        if extra:
            lines += [""] + [f"note: {n}" for n in extra]
        if self.optimizer:
            lines += ["", f"optimizer: {self.optimizer}({', '.join(f'{k}={v!r}' for k, v in self.optimizer_hyperparameters.items())})"]
            lines += [self.optimizer_report] if self.optimizer_report else []
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
