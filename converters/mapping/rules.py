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

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from collections.abc import Mapping as AbcMapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ckptfmt.errors import ConversionError, FormatError, UnmappedKeyError

MAPPING_FILE_FORMAT = "ckptfmt-mapping"
MAPPING_FILE_VERSION = 1

Shape = tuple[int, ...]


# --------------------------------------------------------------------------------------------
# Tensor specs


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Shape and dtype of a tensor, without its data (``dtype`` None when unknown)."""

    shape: Shape
    dtype: str | None = None

    def __str__(self) -> str:
        return _fmt_shape(self.shape)


def spec_of(value: Any) -> TensorSpec:
    """A :class:`TensorSpec` from an array, a spec, or a bare shape tuple.

    Example:
        >>> spec_of(np.zeros((2, 3), np.float32))
        TensorSpec(shape=(2, 3), dtype='float32')
        >>> spec_of((4,)).shape
        (4,)
    """
    if isinstance(value, TensorSpec):
        return value
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        dtype = value.dtype
        return TensorSpec(tuple(int(d) for d in value.shape), str(np.dtype(dtype)) if _is_np_dtype(dtype) else str(dtype))
    if isinstance(value, (tuple, list)):
        return TensorSpec(tuple(int(d) for d in value))
    raise TypeError(f"cannot take the shape of {type(value).__name__}; give an array, a TensorSpec or a shape tuple")


def _is_np_dtype(dtype: Any) -> bool:
    try:
        np.dtype(dtype)
    except TypeError:
        return False
    return True


def _fmt_shape(shape: Shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


# --------------------------------------------------------------------------------------------
# Ops


class Op:
    """A tensor operation on the tuple of tensors in flight through a :class:`Convert` rule.

    Subclasses are frozen, slotted dataclasses; their fields are all that is serialised.
    ``infer`` is the dry run of ``apply``; ``inverse`` (given the specs the op received) is the
    op that undoes it; ``for_slots`` is the op optimizer slots go through instead (layout ops
    are their own; ops that invent or merge parameters are not, see :class:`AppendZeros`).
    """

    __slots__ = ()
    n_in: ClassVar[int | None] = None  # None: any count

    def infer(self, specs: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
        raise NotImplementedError

    def apply(self, arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        raise NotImplementedError

    def inverse(self, specs: tuple[TensorSpec, ...]) -> Op:
        raise NotImplementedError

    def for_slots(self) -> Op:
        return self

    def describe(self) -> str:
        args = ", ".join(_fmt_value(getattr(self, f.name)) for f in dataclasses.fields(self))
        return f"{type(self).__name__}({args})"

    def _check_count(self, specs: tuple[TensorSpec, ...]) -> None:
        if self.n_in is not None and len(specs) != self.n_in:
            raise ConversionError(f"{self.describe()} takes {self.n_in} tensor(s), got {len(specs)}")


def _fmt_value(v: Any) -> str:
    if isinstance(v, tuple):
        return _fmt_shape(v) if all(isinstance(x, int) for x in v) else "(" + ", ".join(map(str, v)) + ")"
    return repr(v)


class _EachOp(Op):
    """An op applied to every tensor in flight independently."""

    __slots__ = ()

    def infer(self, specs):
        return tuple(self._spec(s) for s in specs)

    def apply(self, arrays):
        return tuple(self._one(a) for a in arrays)

    def _spec(self, spec: TensorSpec) -> TensorSpec:
        raise NotImplementedError

    def _one(self, a: np.ndarray) -> np.ndarray:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Transpose(_EachOp):
    """Permute axes: ``out = np.transpose(x, axes)``."""

    axes: tuple[int, ...]

    def _spec(self, spec):
        if sorted(self.axes) != list(range(len(spec.shape))):
            raise ConversionError(f"{self.describe()} does not fit a tensor of shape {_fmt_shape(spec.shape)}")
        return TensorSpec(tuple(spec.shape[a] for a in self.axes), spec.dtype)

    def _one(self, a):
        return np.transpose(a, self.axes)

    def inverse(self, specs):
        return Transpose(tuple(int(i) for i in np.argsort(self.axes)))


@dataclass(frozen=True, slots=True)
class Reshape(_EachOp):
    """Reshape (C order); one dimension may be -1."""

    shape: tuple[int, ...]

    def _spec(self, spec):
        size = math.prod(spec.shape)
        known = math.prod(d for d in self.shape if d != -1)
        out = self.shape
        if self.shape.count(-1) > 1 or (-1 in self.shape and (known == 0 or size % known)):
            raise ConversionError(f"{self.describe()} does not fit a tensor of shape {_fmt_shape(spec.shape)}")
        if -1 in self.shape:
            out = tuple(size // known if d == -1 else d for d in self.shape)
        if math.prod(out) != size:
            raise ConversionError(f"{self.describe()} does not fit a tensor of shape {_fmt_shape(spec.shape)}")
        return TensorSpec(out, spec.dtype)

    def _one(self, a):
        return a.reshape(self.shape)

    def inverse(self, specs):
        shapes = {s.shape for s in specs}
        if len(shapes) != 1:
            raise ConversionError(f"cannot invert {self.describe()} applied to tensors of different shapes")
        return Reshape(shapes.pop())


@dataclass(frozen=True, slots=True)
class Split(Op):
    """One tensor into ``len(sizes)`` tensors along ``dim``."""

    dim: int
    sizes: tuple[int, ...]
    n_in: ClassVar[int | None] = 1

    def infer(self, specs):
        self._check_count(specs)
        (s,) = specs
        dim = self.dim % len(s.shape)
        if sum(self.sizes) != s.shape[dim]:
            raise ConversionError(f"{self.describe()} does not fit a tensor of shape {_fmt_shape(s.shape)}")
        return tuple(TensorSpec(s.shape[:dim] + (n,) + s.shape[dim + 1 :], s.dtype) for n in self.sizes)

    def apply(self, arrays):
        return tuple(np.split(arrays[0], np.cumsum(self.sizes)[:-1].tolist(), axis=self.dim))

    def inverse(self, specs):
        return Concat(self.dim)


@dataclass(frozen=True, slots=True)
class Concat(Op):
    """All tensors in flight into one, along ``dim``."""

    dim: int

    def infer(self, specs):
        if not specs:
            raise ConversionError("Concat needs at least one tensor")
        rank = len(specs[0].shape)
        dim = self.dim % rank
        rest = {s.shape[:dim] + s.shape[dim + 1 :] for s in specs}
        if len(rest) != 1 or any(len(s.shape) != rank for s in specs):
            raise ConversionError(f"{self.describe()}: shapes {[s.shape for s in specs]} differ off dim {self.dim}")
        return (TensorSpec(specs[0].shape[:dim] + (sum(s.shape[dim] for s in specs),) + specs[0].shape[dim + 1 :], specs[0].dtype),)

    def apply(self, arrays):
        return (np.concatenate(arrays, axis=self.dim),)

    def inverse(self, specs):
        return Split(self.dim, tuple(s.shape[self.dim % len(s.shape)] for s in specs))


@dataclass(frozen=True, slots=True)
class GateReorder(_EachOp):
    """Reorder equal-sized gate blocks along ``dim``.

    ``dim`` is cut into ``len(gates_src)`` equal blocks named by ``gates_src``; the output puts
    them in the order ``gates_dst`` (the same names, permuted).
    """

    gates_src: tuple[str, ...]
    gates_dst: tuple[str, ...]
    dim: int

    def _perm(self) -> list[int]:
        if sorted(self.gates_src) != sorted(self.gates_dst) or len(set(self.gates_src)) != len(self.gates_src):
            raise ConversionError(f"{self.describe()}: gates_dst must be a permutation of gates_src")
        return [self.gates_src.index(g) for g in self.gates_dst]

    def _spec(self, spec):
        self._perm()
        if spec.shape[self.dim % len(spec.shape)] % len(self.gates_src):
            raise ConversionError(f"{self.describe()}: dim {self.dim} of {_fmt_shape(spec.shape)} is not {len(self.gates_src)} equal gates")
        return spec

    def _one(self, a):
        blocks = np.split(a, len(self.gates_src), axis=self.dim)
        return np.concatenate([blocks[i] for i in self._perm()], axis=self.dim)

    def inverse(self, specs):
        return GateReorder(self.gates_dst, self.gates_src, self.dim)


@dataclass(frozen=True, slots=True)
class Cast(_EachOp):
    """Change dtype (numpy dtype name, e.g. ``"float32"``)."""

    dtype: str

    def _spec(self, spec):
        return TensorSpec(spec.shape, str(np.dtype(self.dtype)))

    def _one(self, a):
        return a.astype(self.dtype, copy=False)

    def inverse(self, specs):
        dtypes = {s.dtype for s in specs}
        if len(dtypes) != 1 or None in dtypes:
            raise ConversionError(f"cannot invert {self.describe()}: the source dtype is unknown")
        return Cast(dtypes.pop())


@dataclass(frozen=True, slots=True)
class Sum(Op):
    """All tensors in flight (same shape) into their sum; inverse :class:`AppendZeros`."""

    def infer(self, specs):
        if not specs or len({s.shape for s in specs}) != 1:
            raise ConversionError(f"Sum needs tensors of one shape, got {[s.shape for s in specs]}")
        return (specs[0],)

    def apply(self, arrays):
        out = arrays[0].copy()
        for a in arrays[1:]:
            out += a
        return (out,)

    def inverse(self, specs):
        return AppendZeros(len(specs) - 1)

    def for_slots(self):
        # Merged parameters received identical gradients; their slot statistics agree.
        return Mean()


@dataclass(frozen=True, slots=True)
class AppendZeros(Op):
    """One tensor into itself followed by ``count`` zero tensors of its shape.

    Used where one framework has a single parameter and the other a sum of several (LSTM
    biases). Optimizer slots are statistics of gradients, which the summed parameters share,
    so slots are repeated instead (:class:`Repeat`).
    """

    count: int = 1
    n_in: ClassVar[int | None] = 1

    def infer(self, specs):
        self._check_count(specs)
        return specs * (self.count + 1)

    def apply(self, arrays):
        return (arrays[0],) + tuple(np.zeros_like(arrays[0]) for _ in range(self.count))

    def inverse(self, specs):
        return Sum()

    def for_slots(self):
        return Repeat(self.count + 1)


@dataclass(frozen=True, slots=True)
class Repeat(Op):
    """One tensor into ``count`` copies; inverse :class:`Mean`."""

    count: int
    n_in: ClassVar[int | None] = 1

    def infer(self, specs):
        self._check_count(specs)
        return specs * self.count

    def apply(self, arrays):
        return tuple(arrays[0].copy() for _ in range(self.count))

    def inverse(self, specs):
        return Mean()


@dataclass(frozen=True, slots=True)
class Mean(Op):
    """All tensors in flight (same shape) into their mean; inverse :class:`Repeat`."""

    def infer(self, specs):
        return Sum().infer(specs)

    def apply(self, arrays):
        return (np.mean(np.stack(arrays), axis=0).astype(arrays[0].dtype),)

    def inverse(self, specs):
        return Repeat(len(specs))


@dataclass(frozen=True, slots=True)
class Fill(Op):
    """No tensor into a constant one (a target that has no source, e.g. ``num_batches_tracked``)."""

    shape: tuple[int, ...]
    dtype: str
    value: float = 0
    n_in: ClassVar[int | None] = 0

    def infer(self, specs):
        self._check_count(specs)
        return (TensorSpec(self.shape, str(np.dtype(self.dtype))),)

    def apply(self, arrays):
        return (np.full(self.shape, self.value, dtype=self.dtype),)

    def inverse(self, specs):
        return Discard()


@dataclass(frozen=True, slots=True)
class Discard(Op):
    """All tensors in flight into none (the way back of :class:`Fill`)."""

    def infer(self, specs):
        return ()

    def apply(self, arrays):
        return ()

    def inverse(self, specs):
        if len(specs) != 1 or specs[0].dtype is None:
            raise ConversionError("cannot invert Discard without one source of known dtype")
        return Fill(specs[0].shape, specs[0].dtype, 0)


@dataclass(frozen=True, slots=True)
class AppendFill(Op):
    """One tensor into itself followed by a constant one; inverse :class:`DropLast`.

    Lets one pattern rule fill a tensor per match, e.g. every BatchNorm's
    ``num_batches_tracked`` beside its ``running_mean``:
    ``Convert(("re:(.*)/moving_mean",), (r"\1.running_mean", r"\1.num_batches_tracked"),
    (AppendFill((), "int64"),))``.

    Example:
        >>> [a.dtype.name for a in AppendFill((), "int64").apply((np.zeros(3, np.float32),))]
        ['float32', 'int64']
    """

    shape: tuple[int, ...]
    dtype: str
    value: float = 0
    n_in: ClassVar[int | None] = 1

    def infer(self, specs):
        self._check_count(specs)
        return specs + (TensorSpec(tuple(self.shape), str(np.dtype(self.dtype))),)

    def apply(self, arrays):
        return arrays + (np.full(tuple(self.shape), self.value, dtype=self.dtype),)

    def inverse(self, specs):
        return DropLast()


@dataclass(frozen=True, slots=True)
class DropLast(Op):
    """All tensors in flight but the last (the way back of :class:`AppendFill`)."""

    def infer(self, specs):
        if not specs:
            raise ConversionError("DropLast needs at least one tensor")
        return specs[:-1]

    def apply(self, arrays):
        return arrays[:-1]

    def inverse(self, specs):
        if specs[-1].dtype is None:
            raise ConversionError("cannot invert DropLast without the dropped tensor's dtype")
        return AppendFill(specs[-1].shape, specs[-1].dtype, 0)


@dataclass(frozen=True, slots=True)
class Subtract(Op):
    """Two tensors of one shape into their difference ``a - b``; inverse :class:`AppendZeros`.

    Folds a convolution's bias into the BatchNormalization after it, for a torch model whose
    convolution has no bias: ``BN(Wx + b)`` with ``moving_mean`` equals ``BN(Wx)`` with
    ``running_mean = moving_mean - b``. The way back gives the mean and a zero bias, which
    computes the same. The bias's optimizer state has no torch parameter, so a conversion
    with the optimizer refuses it (convert the weights only).

    Example:
        >>> Subtract().apply((np.array([3.0]), np.array([1.0])))
        (array([2.]),)
    """

    n_in: ClassVar[int | None] = 2

    def infer(self, specs):
        self._check_count(specs)
        if specs[0].shape != specs[1].shape:
            raise ConversionError(f"Subtract needs tensors of one shape, got {specs[0].shape} and {specs[1].shape}")
        return (specs[0],)

    def apply(self, arrays):
        return (arrays[0] - arrays[1],)

    def inverse(self, specs):
        return AppendZeros(1)


_OPS: dict[str, type[Op]] = {
    c.__name__: c
    for c in (Transpose, Reshape, Split, Concat, GateReorder, Cast, Sum, AppendZeros, Repeat, Mean, Fill, Discard,
              AppendFill, DropLast, Subtract)
}


# --------------------------------------------------------------------------------------------
# Rules


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
_RULES: dict[str, type] = {"Rename": Rename, "Convert": Convert, "Drop": Drop}


@dataclass(frozen=True, slots=True)
class _Pattern:
    text: str
    regex: re.Pattern[str]
    is_regex: bool

    @staticmethod
    def compile(text: str) -> _Pattern:
        if text.startswith("re:"):
            return _Pattern(text, re.compile(text[3:]), True)
        return _Pattern(text, re.compile("(.*?)".join(re.escape(p) for p in text.split("*"))), False)

    def match(self, key: str) -> re.Match[str] | None:
        return self.regex.fullmatch(key)

    def fill(self, template: str, m: re.Match[str]) -> str:
        if self.is_regex:
            return m.expand(template)
        parts = template.split("*")
        if len(parts) - 1 > len(m.groups()):
            raise ConversionError(f"template {template!r} has more '*' than pattern {self.text!r}")
        return parts[0] + "".join(g + p for g, p in zip(m.groups(), parts[1:]))


# --------------------------------------------------------------------------------------------
# Plans


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
        src = {k: spec_of(v) for k, v in sources.items()}
        patterns = []
        for r in self.rules:
            first = r.pattern if isinstance(r, Drop) else (r.sources[0] if r.sources else None)
            patterns.append((None if first is None else _Pattern.compile(first), r))
        consumed: set[str] = set()
        entries: list[Entry] = []
        dropped: list[str] = []
        absent: list[str] = []
        bad: list[str] = []
        for pattern, rule in patterns:
            if pattern is None:  # a source-less rule (Fill): it fires once
                self._resolve(rule, (), src, entries, bad)
                continue
            for key in src:
                if key in consumed:
                    continue
                m = pattern.match(key)
                if m is None:
                    continue
                if isinstance(rule, Drop):
                    consumed.add(key)
                    dropped.append(key)
                    continue
                keys = (key,) + tuple(pattern.fill(t, m) for t in rule.sources[1:])
                gone = [k for k in keys if k not in src or k in consumed and k != key]
                if gone:
                    absent += [f"{k} (needed with {key})" for k in gone]
                    continue
                consumed.update(keys)
                targets_ = tuple(pattern.fill(t, m) for t in rule.targets)
                self._resolve(rule, keys, src, entries, bad, targets_)
        unmapped = [k for k in src if k not in consumed]
        produced: dict[str, TensorSpec] = {}
        dup: list[str] = []
        for e in entries:
            for k, s in zip(e.targets, e.target_specs):
                if k in produced:
                    dup.append(k)
                produced[k] = s
        missing: list[str] = []
        unexpected: list[str] = []
        if targets is not None:
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
        if bad or dup:
            raise ConversionError("the mapping does not fit the tensors:\n  " + "\n  ".join(bad + [f"{k}: produced by two rules" for k in dup]))
        if strict and (unmapped or absent or missing or unexpected):
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
            raise err
        if not strict and targets is not None and unexpected:
            entries = [e for e in entries if not set(e.targets) & set(unexpected)]
        return Plan(tuple(entries), tuple(dropped), self.notes, self.source_format, self.target_format)

    @staticmethod
    def _resolve(rule: Rule, keys: tuple[str, ...], src: dict[str, TensorSpec], entries: list[Entry], bad: list[str], targets: tuple[str, ...] | None = None) -> None:
        specs = tuple(src[k] for k in keys)
        s0 = specs
        try:
            for op in rule.ops:
                specs = op.infer(specs)
        except ConversionError as e:
            bad.append(f"{', '.join(keys) or '(no source)'}: {e}")
            return
        targets = rule.targets if targets is None else targets
        if len(specs) != len(targets):
            bad.append(f"{', '.join(keys) or '(no source)'}: the ops produce {len(specs)} tensor(s) for {len(targets)} target(s)")
            return
        entries.append(Entry(keys, tuple(targets), tuple(rule.ops), s0, specs))

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
        doc = {
            "format": MAPPING_FILE_FORMAT,
            "version": MAPPING_FILE_VERSION,
            "source_format": self.source_format,
            "target_format": self.target_format,
            "notes": list(self.notes),
            "rules": [_dump(r, "rule") for r in self.rules],
        }
        return json.dumps(doc, indent=1) + "\n"

    @staticmethod
    def from_json(text: str) -> Mapping:
        """Parse mapping file text written by :meth:`to_json`.

        Raises:
            FormatError: the text is not a valid mapping file (says which rule or op).
        """
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise FormatError(f"mapping file is not valid JSON: {e}") from None
        if not isinstance(doc, dict) or doc.get("format") != MAPPING_FILE_FORMAT:
            raise FormatError(f"not a mapping file: expected \"format\": \"{MAPPING_FILE_FORMAT}\"")
        if doc.get("version") != MAPPING_FILE_VERSION:
            raise FormatError(f"mapping file version {doc.get('version')!r} is not supported (this reader knows {MAPPING_FILE_VERSION})")
        rules = []
        for i, r in enumerate(doc.get("rules", [])):
            try:
                rules.append(_load(r, "rule", _RULES))
            except (KeyError, TypeError, ValueError) as e:
                raise FormatError(f"mapping file rule #{i} is invalid: {e}") from None
        return Mapping(tuple(rules), tuple(doc.get("notes", ())), doc.get("source_format", "keras"), doc.get("target_format", "torch"))

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


def _dump(obj: Any, tag: str) -> dict[str, Any]:
    out: dict[str, Any] = {tag: type(obj).__name__}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if f.name == "ops":
            v = [_dump(op, "op") for op in v]
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def _load(d: dict[str, Any], tag: str, registry: dict[str, type]) -> Any:
    d = dict(d)
    name = d.pop(tag)
    if name not in registry:
        raise ValueError(f"unknown {tag} {name!r} (known: {', '.join(sorted(registry))})")
    kwargs = {}
    for k, v in d.items():
        if k == "ops":
            v = tuple(_load(op, "op", _OPS) for op in v)
        elif isinstance(v, list):
            v = tuple(v)
        kwargs[k] = v
    return registry[name](**kwargs)
