"""The rule types of a :class:`~.rules.Mapping`, the key patterns they match, and the resolved
:class:`Entry` a plan is made of (re-exported by :mod:`.rules`)."""

from __future__ import annotations

__all__ = ["Rename", "Convert", "Drop", "Rule", "RULE_TYPES", "KeyPattern", "Entry"]

import re
from dataclasses import dataclass

import numpy as np

from ckptfmt.errors import ConversionError

from .ops import Op, TensorSpec


@dataclass(frozen=True, slots=True)
class Rename:
    """One source tensor (``src_pattern``) becomes one target (``dst_pattern``) unchanged."""

    src_pattern: str
    dst_pattern: str

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.src_pattern,)

    @property
    def targets(self) -> tuple[str, ...]:
        return (self.dst_pattern,)

    @property
    def ops(self) -> tuple[Op, ...]:
        return ()


@dataclass(frozen=True, slots=True)
class Convert:
    """Sources (first one a pattern, the rest templates) through ``ops`` into targets."""

    sources: tuple[str, ...]
    targets: tuple[str, ...]
    ops: tuple[Op, ...] = ()


@dataclass(frozen=True, slots=True)
class Drop:
    """Source tensors matching ``pattern`` are deliberately not converted."""

    pattern: str


Rule = Rename | Convert | Drop
RULE_TYPES: dict[str, type] = {"Rename": Rename, "Convert": Convert, "Drop": Drop}


@dataclass(frozen=True, slots=True)
class KeyPattern:
    """A rule's source pattern: a glob whose ``*`` captures, or a ``re:`` regex (full match).

    Example:
        >>> p = KeyPattern.compile("*/kernel")
        >>> p.fill("*.weight", p.match("fc/kernel"))
        'fc.weight'
    """

    text: str
    regex: re.Pattern[str]
    is_regex: bool

    @staticmethod
    def compile(text: str) -> KeyPattern:
        if text.startswith("re:"):
            return KeyPattern(text, re.compile(text[3:]), True)
        return KeyPattern(text, re.compile("(.*?)".join(re.escape(p) for p in text.split("*"))), False)

    def match(self, key: str) -> re.Match[str] | None:
        return self.regex.fullmatch(key)

    def fill(self, template: str, m: re.Match[str]) -> str:
        if self.is_regex:
            return m.expand(template)
        parts = template.split("*")
        if len(parts) - 1 > len(m.groups()):
            raise ConversionError(f"template {template!r} has more '*' than pattern {self.text!r}")
        return parts[0] + "".join(g + p for g, p in zip(m.groups(), parts[1:]))



@dataclass(frozen=True, slots=True)
class Entry:
    """One resolved conversion: concrete source keys through ``ops`` into target keys."""

    sources: tuple[str, ...]
    targets: tuple[str, ...]
    ops: tuple[Op, ...]
    source_specs: tuple[TensorSpec, ...]
    target_specs: tuple[TensorSpec, ...]

    def run(self, arrays: tuple[np.ndarray, ...], *, slots: bool = False) -> tuple[np.ndarray, ...]:
        """The targets computed from ``arrays`` (the sources, in order).

        With ``slots=True`` the optimizer-slot variant of every op is used.
        """
        for op in self.ops:
            arrays = (op.for_slots() if slots else op).apply(arrays)
        # (np.ascontiguousarray would give a 0-d result, e.g. num_batches_tracked, shape (1,))
        return tuple(np.ascontiguousarray(a) if np.ndim(a) else np.asarray(a) for a in arrays)

    def inverse(self) -> Entry:
        """The entry that maps this entry's targets back to its sources."""
        specs = self.source_specs
        inverted = []
        for op in self.ops:
            inverted.append(op.inverse(specs))
            specs = op.infer(specs)
        return Entry(self.targets, self.sources, tuple(reversed(inverted)), self.target_specs, self.source_specs)

