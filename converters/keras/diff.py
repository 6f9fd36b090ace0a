"""Compare a Keras checkpoint's weights, converted as tf2torch would, with torch weights.

The converted side is a :class:`~ckptfmt.converters.sources.base.Source` computing one plan
entry at a time, so nothing is written and one entry is in memory at a time.

Example:
    >>> r = diff_converted("runs/ckpt-3", "resumed.pt", model_factory="models.py:make")  # doctest: +SKIP
"""

from __future__ import annotations

__all__ = ["ConvertedSource", "diff_converted", "diff_keras"]

import dataclasses
import os
from collections.abc import Callable
from collections.abc import Mapping as AbcMapping
from typing import Any

import numpy as np

from ckptfmt.errors import ConversionError, TensorNotFoundError

from ..diff import DiffReport, diff_sources
from ..mapping.rules import Mapping, Plan
from ..sources import open_any
from ..sources.base import Source, TensorInfo
from ..tf.bundle import TFCheckpointReader
from .checkpoint import KerasCheckpoint
from .outputs import target_info
from .planner import as_mapping, check_preset, make_model, plan_conversion
from .tfcheckpoint import read_keras_checkpoint


class ConvertedSource(Source):
    """A TF checkpoint seen through a tf2torch plan: the torch tensors it converts to.

    Tensors are computed one plan entry at a time, when asked for.
    """

    kind = "tf2torch"

    def __init__(self, kc: KerasCheckpoint, plan: Plan, prefix: str = "") -> None:
        super().__init__(kc.path)
        self._kc = kc
        self._where = {prefix + t: (e, i) for e in plan.entries for i, t in enumerate(e.targets)}
        self._last: tuple[Any, tuple[np.ndarray, ...]] = (None, ())

    def _entry(self, name: str) -> tuple[Any, int]:
        if name not in self._where:
            raise TensorNotFoundError(f"{self.path}: the conversion makes no tensor {name!r}")
        return self._where[name]

    def keys(self) -> list[str]:
        return list(self._where)

    def info(self, name: str) -> TensorInfo:
        entry, i = self._entry(name)
        return target_info(name, entry.target_specs[i])

    def get(self, name: str) -> np.ndarray:
        entry, i = self._entry(name)
        if self._last[0] is not entry:
            self._last = (entry, entry.run(tuple(self._kc.get(self._kc.keys[s]) for s in entry.sources)))
        return self._last[1][i]

    @classmethod
    def verify(cls, path: str, *, progress: bool | None = None) -> Any:
        raise ConversionError(f"{path}: verify the TF checkpoint itself (ckptfmt verify), not its conversion")

    def close(self) -> None:
        self._last = (None, ())  # the checkpoint's reader belongs to whoever opened it


def diff_converted(
    src: str | os.PathLike[str],
    other: str | os.PathLike[str],
    *,
    model_factory: str | Callable[[], Any] | None = None,
    mapping: Mapping | str | os.PathLike[str] | None = None,
    preset: str = "keras",
    pairs: AbcMapping[str, str] | None = None,
    atol: float = 0.0,
    rtol: float = 0.0,
) -> DiffReport:
    """Compare a TF checkpoint's weights, converted as :func:`tf_to_torch` would, with torch weights.

    ``other`` is any checkpoint :func:`ckptfmt.converters.sources.open_any` reads (``.pt``,
    ``.safetensors``, a ckptfmt directory). When its weights sit under ``model/`` (a ``.pt``
    or ckptfmt directory written by ``tf2torch``), only those are compared; the optimizer
    state is not. Nothing is written; one plan entry is in memory at a time.

    Use it to check a conversion, or how far a resumed torch run moved from the TF run.

    Args:
        src: the TF checkpoint (the converted side, ``a`` of the report).
        other: the torch-side checkpoint (``b``, the reference for relative differences).
        model_factory / mapping / preset / pairs: as for :func:`ckptfmt.converters.convert.tf_to_torch`.
        atol, rtol: tolerances, as for :func:`ckptfmt.converters.kinds.diff_any`.

    Example:
        >>> r = diff_converted("runs/ckpt-3", "resumed.pt", model_factory="models.py:make")  # doctest: +SKIP
        >>> r.identical, [c.name for c in r.changed]  # doctest: +SKIP
        (False, ['model/fc.weight'])
    """
    src, other = os.fspath(src), os.fspath(other)
    mapping = as_mapping(mapping)
    model, example = make_model(model_factory)
    with TFCheckpointReader(src) as reader:
        kc = read_keras_checkpoint(reader, infer_layers=mapping is None and check_preset(preset, model) == "keras")
        return diff_keras(dataclasses.replace(kc, path=src), other, model=model, example=example, mapping=mapping,
                          preset=preset, pairs=pairs, atol=atol, rtol=rtol)


def diff_keras(kc: KerasCheckpoint, other: str | os.PathLike[str], *, model: Any = None, example: Any = None,
               mapping: Mapping | None = None, preset: str = "keras", pairs: AbcMapping[str, str] | None = None,
               atol: float = 0.0, rtol: float = 0.0) -> DiffReport:
    """:func:`diff_converted` of a :class:`KerasCheckpoint` (kept open by its reader) and torch weights.

    Example:
        >>> with TFCheckpointReader("runs/ckpt-3") as r:  # doctest: +SKIP
        ...     diff_keras(read_keras_checkpoint(r), "resumed.pt").identical
    """
    plan, _ = plan_conversion(kc, model, example, mapping, True, preset=preset, pairs=pairs)
    with open_any(other) as sb:
        names = set(sb.keys())
        targets = list(plan.target_specs)
        prefix = "model/" if not names.intersection(targets) and any(f"model/{t}" in names for t in targets) else ""
        sa = ConvertedSource(kc, plan, prefix)
        report = diff_sources(sa, sb, atol=atol, rtol=rtol)
    if prefix:  # the optimizer state and metadata beside the weights are not compared
        report = dataclasses.replace(report, added=tuple(t for t in report.added if t.name.startswith(prefix)))
    return report
