"""Resolving a mapping's rules against the source tensors: the steps of :meth:`~.rules.Mapping.plan`.

1. every rule, in order, takes the source keys its pattern matches and no earlier rule took
   (:class:`_Resolution`); its ops are dry-run on the sources' specs into an :class:`Entry`;
2. the targets produced are checked: none twice, and, when the expected targets are given,
   their shapes (:func:`_check_targets`);
3. what does not fit is one :class:`ConversionError` listing every case; what is not covered
   is one :class:`UnmappedKeyError` listing every key (unless ``strict=False``).

Example:
    >>> from ._rule_types import Rename
    >>> entries, dropped = resolve((Rename("a", "b"),), {"a": (2,)})
    >>> entries[0].targets, dropped
    (('b',), ())
"""

from __future__ import annotations

__all__ = ["resolve"]

from collections.abc import Iterable, Sequence
from collections.abc import Mapping as AbcMapping
from dataclasses import dataclass, field
from typing import Any

from ckptfmt.errors import ConversionError, UnmappedKeyError

from ._rule_types import Drop, Entry, KeyPattern, Rule
from .ops import TensorSpec, _fmt_shape, spec_of


@dataclass(slots=True)
class _Resolution:
    """What the rules have taken so far, and what went wrong."""

    src: dict[str, TensorSpec]
    consumed: set[str] = field(default_factory=set)
    entries: list[Entry] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)

    def take(self, rule: Rule, pattern: KeyPattern | None) -> None:
        """Apply one rule to every source key its pattern matches that is still free."""
        if pattern is None:  # a source-less rule (Fill): it fires once
            self.add(rule, ())
            return
        for key in self.src:
            if key in self.consumed:
                continue
            m = pattern.match(key)
            if m is None:
                continue
            if isinstance(rule, Drop):
                self.consumed.add(key)
                self.dropped.append(key)
                continue
            keys = (key,) + tuple(pattern.fill(t, m) for t in rule.sources[1:])
            gone = [k for k in keys if k not in self.src or k in self.consumed and k != key]
            if gone:
                self.absent += [f"{k} (needed with {key})" for k in gone]
                continue
            self.consumed.update(keys)
            self.add(rule, keys, tuple(pattern.fill(t, m) for t in rule.targets))

    def add(self, rule: Rule, keys: tuple[str, ...], targets: tuple[str, ...] | None = None) -> None:
        """Dry-run ``rule``'s ops on ``keys``' specs into an entry (or a line in ``bad``)."""
        specs = s0 = tuple(self.src[k] for k in keys)
        try:
            for op in rule.ops:
                specs = op.infer(specs)
        except ConversionError as e:
            self.bad.append(f"{', '.join(keys) or '(no source)'}: {e}")
            return
        targets = rule.targets if targets is None else targets
        if len(specs) != len(targets):
            self.bad.append(f"{', '.join(keys) or '(no source)'}: the ops produce {len(specs)} tensor(s) for {len(targets)} target(s)")
            return
        self.entries.append(Entry(keys, tuple(targets), tuple(rule.ops), s0, specs))


def _pattern(rule: Rule) -> KeyPattern | None:
    first = rule.pattern if isinstance(rule, Drop) else (rule.sources[0] if rule.sources else None)
    return None if first is None else KeyPattern.compile(first)


def _produced(entries: Sequence[Entry]) -> tuple[dict[str, TensorSpec], list[str]]:
    """Every target key with its spec, and the keys two entries produce."""
    produced: dict[str, TensorSpec] = {}
    dup: list[str] = []
    for e in entries:
        for k, s in zip(e.targets, e.target_specs):
            if k in produced:
                dup.append(k)
            produced[k] = s
    return produced, dup


def _check_targets(produced: AbcMapping[str, TensorSpec], targets: AbcMapping[str, Any] | Iterable[str],
                   bad: list[str]) -> tuple[list[str], list[str]]:
    """``(missing, unexpected)`` target keys; a shape that differs from the expected one goes to ``bad``."""
    if isinstance(targets, AbcMapping):
        expected: dict[str, TensorSpec | None] = {k: spec_of(v) for k, v in targets.items()}
    else:
        expected = dict.fromkeys(targets)
    missing = [k for k in expected if k not in produced]
    unexpected = [k for k in produced if k not in expected]
    for k, s in produced.items():
        want = expected.get(k)
        if want is not None and want.shape != s.shape:
            bad.append(f"{k}: converted shape {_fmt_shape(s.shape)} but the target expects {_fmt_shape(want.shape)}")
    return missing, unexpected


def _uncovered_error(unmapped: list[str], absent: list[str], missing: list[str], unexpected: list[str]) -> UnmappedKeyError:
    parts = []
    for title, keys in (
        ("source key(s) no rule maps", unmapped),
        ("source key(s) a rule needs but not given", absent),
        ("target key(s) nothing produces", missing),
        ("produced key(s) the target does not have", unexpected),
    ):
        if keys:
            parts.append(f"{len(keys)} {title}:\n    " + "\n    ".join(keys))
    err = UnmappedKeyError(
        "the mapping does not cover every key (add Rename/Convert rules, Drop the keys on purpose, "
        "or plan with strict=False):\n  " + "\n  ".join(parts)
    )
    err.unmapped_sources, err.absent_sources, err.missing_targets, err.unexpected_targets = unmapped, absent, missing, unexpected
    return err


def resolve(
    rules: Sequence[Rule],
    sources: AbcMapping[str, Any],
    targets: AbcMapping[str, Any] | Iterable[str] | None = None,
    *,
    strict: bool = True,
) -> tuple[tuple[Entry, ...], tuple[str, ...]]:
    """``(entries, dropped source keys)``; see :meth:`~.rules.Mapping.plan` for the arguments and errors."""
    state = _Resolution({k: spec_of(v) for k, v in sources.items()})
    for pattern, rule in [(_pattern(r), r) for r in rules]:  # every pattern compiles before any rule runs
        state.take(rule, pattern)
    unmapped = [k for k in state.src if k not in state.consumed]
    produced, dup = _produced(state.entries)
    missing: list[str] = []
    unexpected: list[str] = []
    if targets is not None:
        missing, unexpected = _check_targets(produced, targets, state.bad)
    if state.bad or dup:
        raise ConversionError("the mapping does not fit the tensors:\n  " + "\n  ".join(state.bad + [f"{k}: produced by two rules" for k in dup]))
    if strict and (unmapped or state.absent or missing or unexpected):
        raise _uncovered_error(unmapped, state.absent, missing, unexpected)
    entries = state.entries
    if not strict and unexpected:
        entries = [e for e in entries if not set(e.targets) & set(unexpected)]
    return tuple(entries), tuple(state.dropped)
