"""Compare the tensors of two checkpoints of any kinds, one tensor pair in memory at a time.

Example:
    >>> import numpy as np, os, tempfile, ckptfmt
    >>> d = tempfile.mkdtemp()
    >>> a, b = os.path.join(d, "a"), os.path.join(d, "b")
    >>> _ = ckptfmt.save({"w": np.ones(3, np.float32)}, a)
    >>> _ = ckptfmt.save({"w": np.array([1, 1, 2], np.float32)}, b)
    >>> r = diff_any(a, b)
    >>> r.identical, [(c.name, c.max_abs) for c in r.changed]
    (False, [('w', 1.0)])
"""

from __future__ import annotations

__all__ = ["TensorDiff", "DiffReport", "diff_any", "diff_sources"]

import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .sources import open_any
from .sources.base import Source, TensorInfo, jsonable

# Elements compared per step in diff_any: bounds the float64 temporaries to ~100 MB.
_DIFF_BLOCK = 1 << 22


@dataclass(frozen=True, slots=True)
class TensorDiff:
    """A tensor present in both checkpoints whose dtype, shape or values differ.

    ``max_abs`` is ``max |a - b|`` and ``max_rel`` is ``max |a - b| / |b|`` (infinite where
    ``b`` is 0 and ``a`` is not); both are None when the shapes differ or the values are
    not numbers.
    """

    name: str
    dtype_a: str
    dtype_b: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    max_abs: float | None
    max_rel: float | None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape_a"], d["shape_b"] = list(self.shape_a), list(self.shape_b)
        d["max_abs"], d["max_rel"] = jsonable(self.max_abs), jsonable(self.max_rel)
        return d


@dataclass(frozen=True, slots=True)
class DiffReport:
    """What :func:`diff_any` found. ``identical`` is true when nothing was added, removed or changed."""

    a: str
    b: str
    kind_a: str
    kind_b: str
    atol: float
    rtol: float
    added: tuple[TensorInfo, ...] = ()
    removed: tuple[TensorInfo, ...] = ()
    changed: tuple[TensorDiff, ...] = ()
    unchanged: int = 0

    @property
    def identical(self) -> bool:
        return not (self.added or self.removed or self.changed)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "a": self.a,
            "b": self.b,
            "kind_a": self.kind_a,
            "kind_b": self.kind_b,
            "atol": self.atol,
            "rtol": self.rtol,
            "identical": self.identical,
            "added": [t.to_dict() for t in self.added],
            "removed": [t.to_dict() for t in self.removed],
            "changed": [c.to_dict() for c in self.changed],
            "unchanged": self.unchanged,
        }


def _compare(x: np.ndarray, y: np.ndarray, atol: float, rtol: float) -> tuple[bool, float | None, float | None]:
    """(close enough, max abs diff, max rel diff) of two arrays of the same shape."""
    if x.dtype == np.dtype(object) or y.dtype == np.dtype(object):
        return bool(np.array_equal(x, y)), None, None
    if x.size == 0:
        return True, 0.0, 0.0
    if x.dtype == y.dtype and x.dtype.kind in "biu" and np.array_equal(x, y):
        return True, 0.0, 0.0  # exact, and int64 beyond 2**53 is not rounded through float64
    xf, yf = x.reshape(-1), y.reshape(-1)
    cplx = x.dtype.kind == "c" or y.dtype.kind == "c"
    work = np.complex128 if cplx else np.float64
    ints = x.dtype.kind in "biu" and y.dtype.kind in "biu"
    close, max_abs, max_rel = True, 0.0, 0.0
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for i in range(0, xf.size, _DIFF_BLOCK):
            xo, yo = xf[i : i + _DIFF_BLOCK], yf[i : i + _DIFF_BLOCK]
            a, b = xo.astype(work), yo.astype(work)
            d = np.abs(a - b)
            same = (a == b) | (np.isnan(a) & np.isnan(b))
            d[same] = 0.0
            d[np.isnan(d)] = np.inf  # one side NaN, or inf - inf of opposite signs
            if ints:
                # Integers above 2**53 can round to the same float64; distinct ones differ by >= 1.
                exact = xo == yo
                d[~exact & (d == 0)] = 1.0
            ref = np.abs(b)
            rel = np.where(d == 0, 0.0, d / np.where(ref == 0, 0.0, ref))
            rel[np.isnan(rel)] = np.inf
            max_abs = max(max_abs, float(d.max()))
            max_rel = max(max_rel, float(rel.max()))
            # d == 0 first: inf == inf must pass even though 0 * inf is NaN.
            close = close and bool(np.all((d == 0) | (d <= atol + rtol * ref)))
    return close, max_abs, max_rel


def diff_any(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    atol: float = 0.0,
    rtol: float = 0.0,
    kind_a: str | None = None,
    kind_b: str | None = None,
) -> DiffReport:
    """Compare the tensors of two checkpoints, of the same kind or not.

    A tensor is *changed* when its dtype or shape differs, or when some element fails
    ``|a - b| <= atol + rtol * |b|`` (NaN equals NaN). With the default tolerances of 0
    any difference counts. One tensor pair is in memory at a time.

    Args:
        a, b: the checkpoints (``b`` is the reference for relative differences).
        atol, rtol: tolerances.
        kind_a, kind_b: skip detection.

    Example:
        >>> r = diff_any("ckpt-100", "model.safetensors", atol=1e-6)  # doctest: +SKIP
        >>> r.identical, [c.name for c in r.changed]  # doctest: +SKIP
        (False, ['head.weight'])
    """
    _check_tolerances(atol, rtol)
    with open_any(a, kind=kind_a) as sa, open_any(b, kind=kind_b) as sb:
        return diff_sources(sa, sb, atol=atol, rtol=rtol)


def _check_tolerances(atol: float, rtol: float) -> None:
    if atol < 0 or rtol < 0:
        raise ValueError(f"tolerances must be non-negative, got atol={atol}, rtol={rtol}")


def diff_sources(sa: Source, sb: Source, *, atol: float = 0.0, rtol: float = 0.0) -> DiffReport:
    """:func:`diff_any` of two open sources (``sb`` is the reference).

    Example:
        >>> with open_any("a.safetensors") as sa, open_any("b.pt") as sb:  # doctest: +SKIP
        ...     diff_sources(sa, sb, atol=1e-6).identical
        True
    """
    _check_tolerances(atol, rtol)
    ka, kb = sa.keys(), sb.keys()
    set_a, set_b = set(ka), set(kb)
    removed = tuple(sa.info(n) for n in ka if n not in set_b)
    added = tuple(sb.info(n) for n in kb if n not in set_a)
    changed: list[TensorDiff] = []
    unchanged = 0
    for name in ka:
        if name not in set_b:
            continue
        ia, ib = sa.info(name), sb.info(name)
        if ia.shape != ib.shape:
            changed.append(TensorDiff(name, ia.dtype, ib.dtype, ia.shape, ib.shape, None, None))
            continue
        close, max_abs, max_rel = _compare(sa.get(name), sb.get(name), atol, rtol)
        if close and ia.dtype == ib.dtype:
            unchanged += 1
        else:
            changed.append(TensorDiff(name, ia.dtype, ib.dtype, ia.shape, ib.shape, max_abs, max_rel))
    return DiffReport(sa.path, sb.path, sa.kind, sb.kind, atol, rtol, added, removed, tuple(changed), unchanged)
