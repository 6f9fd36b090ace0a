"""Declarative conversion rules: renames and tensor operations as data.

A :class:`Mapping` is a list of rules read from code or from a JSON mapping file. Given the
names and shapes of the source tensors (no data), :meth:`Mapping.plan` resolves the rules into
a :class:`Plan`: one :class:`Entry` per conversion, with concrete keys and the shapes every
target will have. A plan prints as a table, runs on numpy arrays and inverts (for the way
back), so a conversion can be read, tested and dry-run without building a model.

Rules:
    * :class:`Rename` ``(src, dst)``: one tensor, new name.
    * :class:`Convert` ``(sources, targets, ops)``: N tensors through a chain of ops to M tensors.
    * :class:`Drop` ``(pattern)``: source tensors deliberately left behind.

Ops (each knows its shape effect, its inverse and how optimizer slots go through it):
:class:`Transpose`, :class:`Reshape`, :class:`Split`, :class:`Concat`, :class:`GateReorder`,
:class:`Cast`, :class:`Sum`, :class:`AppendZeros`, :class:`Repeat`, :class:`Mean`,
:class:`Fill`, :class:`Discard`. Ops that work on one tensor apply to every tensor in flight.

Patterns: a plain string is a glob whose ``*`` captures (``"*/kernel"``) and whose captures
fill the ``*`` of the target templates in order; a string starting with ``re:`` is a regex
(full match) whose groups fill ``\\1`` / ``\\g<name>`` in the templates. A pattern without
``*`` is a literal key. Only a rule's first source is a pattern; its other sources are
templates filled like the targets.

Where the parts live (every name is importable from here): the ops and specs in :mod:`.ops`,
the rule types and :class:`Entry` in :mod:`._rule_types`, resolving rules against keys in
:mod:`._resolve`, the JSON mapping file in :mod:`._mapfile`; :class:`Plan` and
:class:`Mapping` here.

Example:
    >>> import numpy as np
    >>> m = Mapping((Convert(("*/kernel",), ("*.weight",), (Transpose((1, 0)),)),
    ...              Rename("*/bias", "*.bias")))
    >>> src = {"fc/kernel": np.zeros((3, 2), np.float32), "fc/bias": np.zeros(2, np.float32)}
    >>> plan = m.plan(src)
    >>> plan.target_specs["fc.weight"].shape
    (2, 3)
    >>> sorted(plan.apply(src))
    ['fc.bias', 'fc.weight']
"""

from __future__ import annotations

__all__ = [
    "TensorSpec",
    "spec_of",
    "Op",
    "Transpose",
    "Reshape",
    "Split",
    "Concat",
    "GateReorder",
    "Cast",
    "Sum",
    "AppendZeros",
    "Repeat",
    "Mean",
    "Fill",
    "Discard",
    "AppendFill",
    "DropLast",
    "Subtract",
    "Rename",
    "Convert",
    "Drop",
    "Rule",
    "Entry",
    "Plan",
    "Mapping",
    "MAPPING_FILE_FORMAT",
    "MAPPING_FILE_VERSION",
]


import os
from collections.abc import Iterable, Sequence
from collections.abc import Mapping as AbcMapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckptfmt.errors import UnmappedKeyError

from ._mapfile import MAPPING_FILE_FORMAT, MAPPING_FILE_VERSION, dump_mapping, parse_mapping
from ._resolve import resolve
from ._rule_types import Convert, Drop, Entry, Rename, Rule
from .ops import AppendFill as AppendFill
from .ops import AppendZeros as AppendZeros
from .ops import Cast as Cast
from .ops import Concat as Concat
from .ops import Discard as Discard
from .ops import DropLast as DropLast
from .ops import Fill as Fill
from .ops import GateReorder as GateReorder
from .ops import Mean as Mean
from .ops import Op as Op
from .ops import Repeat as Repeat
from .ops import Reshape as Reshape
from .ops import Split as Split
from .ops import Subtract as Subtract
from .ops import Sum as Sum
from .ops import TensorSpec
from .ops import Transpose as Transpose
from .ops import spec_of as spec_of


@dataclass(frozen=True, slots=True)
class Plan:
    """Resolved entries with the shapes of every source and target; see :meth:`Mapping.plan`."""

    entries: tuple[Entry, ...]
    dropped: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    source_format: str = "keras"
    target_format: str = "torch"

    @property
    def target_specs(self) -> dict[str, TensorSpec]:
        """The dry run: every target key with its shape and dtype."""
        return {k: s for e in self.entries for k, s in zip(e.targets, e.target_specs)}

    def entry_for(self, source_key: str) -> Entry:
        """The entry that consumes ``source_key``.

        Raises:
            UnmappedKeyError: no entry reads that key.
        """
        for e in self.entries:
            if source_key in e.sources:
                return e
        raise UnmappedKeyError(f"no entry of the plan reads {source_key!r}")

    def apply(self, arrays: AbcMapping[str, np.ndarray], *, slots: bool = False) -> dict[str, np.ndarray]:
        """Run every entry on ``arrays`` (keyed by source key); returns ``{target key: array}``.

        Example:
            >>> m = Mapping((Convert(("k",), ("w",), (Transpose((1, 0)),)),))
            >>> a = {"k": np.arange(6.0).reshape(2, 3)}
            >>> m.plan(a).apply(a)["w"].shape
            (3, 2)
        """
        missing = sorted({k for e in self.entries for k in e.sources if k not in arrays})
        if missing:
            raise UnmappedKeyError(f"{len(missing)} source tensor(s) the plan needs are not given: " + ", ".join(missing))
        out: dict[str, np.ndarray] = {}
        for e in self.entries:
            out.update(zip(e.targets, e.run(tuple(np.asarray(arrays[k]) for k in e.sources), slots=slots)))
        return out

    def inverse(self) -> Plan:
        """The plan for the way back (target keys to source keys), bit-exact for layout ops."""
        return Plan(tuple(e.inverse() for e in self.entries), (), self.notes, self.target_format, self.source_format)

    def to_mapping(self) -> Mapping:
        """A :class:`Mapping` of literal keys that reproduces this plan (for a mapping file)."""
        rules: list[Rule] = []
        for e in self.entries:
            if len(e.sources) == len(e.targets) == 1 and not e.ops:
                rules.append(Rename(e.sources[0], e.targets[0]))
            else:
                rules.append(Convert(e.sources, e.targets, e.ops))
        rules += [Drop(k) for k in self.dropped]
        return Mapping(tuple(rules), self.notes, self.source_format, self.target_format)

    def table(self) -> str:
        """The plan as a text table: source key, target key, transforms, shapes."""
        rows = [("source", "target", "transforms", "shapes")]
        for e in self.entries:
            n = max(len(e.sources), len(e.targets), 1)
            ops = " -> ".join(op.describe() for op in e.ops) or "-"
            for i in range(n):
                src = e.sources[i] if i < len(e.sources) else ""
                dst = e.targets[i] if i < len(e.targets) else ""
                shapes = (str(e.source_specs[i]) if i < len(e.sources) else "") + " -> " + (str(e.target_specs[i]) if i < len(e.targets) else "")
                rows.append((src, dst, ops if i == 0 else '"', shapes))
        rows += [(k, "(dropped)", "-", "") for k in self.dropped]
        widths = [max(len(r[c]) for r in rows) for c in range(4)]
        lines = ["  ".join(r[c].ljust(widths[c]) for c in range(4)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

# --------------------------------------------------------------------------------------------
# Mappings


@dataclass(frozen=True, slots=True)
class Mapping:
    """An ordered list of rules; the first rule whose pattern matches a source key takes it.

    ``notes`` carry conventions a reader must know (epsilon defaults, momentum conventions,
    layout assumptions); they are printed under the plan table and stored in the mapping file.
    """

    rules: tuple[Rule, ...]
    notes: tuple[str, ...] = ()
    source_format: str = "keras"
    target_format: str = "torch"

    def __add__(self, other: Mapping) -> Mapping:
        return Mapping(self.rules + other.rules, _unique(self.notes + other.notes), self.source_format, self.target_format)

    def plan(
        self,
        sources: AbcMapping[str, Any],
        targets: AbcMapping[str, Any] | Iterable[str] | None = None,
        *,
        strict: bool = True,
    ) -> Plan:
        """Resolve the rules against ``sources`` (key -> array, spec or shape); no data is read.

        Args:
            sources: every source tensor, by key.
            targets: the expected target keys (with specs to check shapes, e.g. a torch
                ``state_dict()``); when given, missing and unexpected targets are errors.
            strict: when False, unmapped sources and missing targets are left out silently
                (shape mismatches are still errors).

        Raises:
            UnmappedKeyError: listing every unmapped source key, every source a rule needs that
                is absent, every missing and every unexpected target key.
            ConversionError: an op does not fit the shapes it receives, or a target's shape
                differs from the expected one (all of them listed).

        Example:
            >>> m = Mapping((Rename("a", "b"),))
            >>> try:
            ...     m.plan({"a": (1,), "x": (2,), "y": (3,)})
            ... except UnmappedKeyError as e:
            ...     print(e.unmapped_sources)
            ['x', 'y']
        """
        entries, dropped = resolve(self.rules, sources, targets, strict=strict)
        return Plan(entries, dropped, self.notes, self.source_format, self.target_format)

    def apply(self, arrays: AbcMapping[str, np.ndarray], targets: AbcMapping[str, Any] | Iterable[str] | None = None, *, strict: bool = True) -> dict[str, np.ndarray]:
        """Plan against ``arrays`` and run the plan: ``self.plan(arrays, targets).apply(arrays)``.

        Example:
            >>> Mapping((Rename("a", "b"),)).apply({"a": np.ones(2)})
            {'b': array([1., 1.])}
        """
        return self.plan(arrays, targets, strict=strict).apply(arrays)

    def inverse(self, sources: AbcMapping[str, Any]) -> Mapping:
        """The mapping for the way back, as literal rules (needs the forward source shapes).

        Example:
            >>> m = Mapping((Convert(("k",), ("w",), (Reshape((6,)),)),))
            >>> m.inverse({"k": (2, 3)}).rules[0].ops
            (Reshape(shape=(2, 3)),)
        """
        return self.plan(sources, strict=False).inverse().to_mapping()

    # -- mapping files ------------------------------------------------------------------------

    def to_json(self) -> str:
        """The mapping file text (JSON).

        Example:
            >>> m = Mapping((Rename("*/bias", "*.bias"),), notes=("hi",))
            >>> Mapping.from_json(m.to_json()) == m
            True
        """
        return dump_mapping(self.rules, self.notes, self.source_format, self.target_format)

    @staticmethod
    def from_json(text: str) -> Mapping:
        """Parse mapping file text written by :meth:`to_json`.

        Raises:
            FormatError: the text is not a valid mapping file (says which rule or op).
        """
        rules, notes, source_format, target_format = parse_mapping(text)
        return Mapping(rules, notes, source_format, target_format)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the mapping file to ``path``."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json())

    @staticmethod
    def load(path: str | os.PathLike[str]) -> Mapping:
        """Read a mapping file written by :meth:`save`."""
        with open(path, encoding="utf-8") as f:
            return Mapping.from_json(f.read())


def _unique(items: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))

