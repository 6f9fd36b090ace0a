"""ONNX models as checkpoints: their graph initializers are the tensors.

A model is opened without its external data; an initializer's data (embedded or in an
external file beside the model) is read only when asked for. Initializers of subgraphs
(``If``/``Loop`` bodies) and ``Constant`` nodes are not listed.

Example:
    >>> from ckptfmt.converters.sources.onnx import OnnxSource
    >>> with OnnxSource("model.onnx") as src:  # doctest: +SKIP
    ...     [t.name for t in src.tensors()]
"""

from __future__ import annotations

__all__ = ["OnnxSource", "export_onnx"]

import math
import os
import time
from typing import Any

import numpy as np

from ckptfmt.api import Problem, VerifyReport
from ckptfmt.errors import CheckpointNotFoundError, ConversionError, FormatError, FrameworkNotAvailableError, TensorNotFoundError, UnmappedKeyError

from . import open_any
from .base import ConvertResult, Source, TensorInfo, check_destination, dtype_str, first_line, make_report

#: protobuf cannot serialize a message of 2 GiB; above this, tensors go to external data.
_PROTO_LIMIT = 1_800_000_000


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise FrameworkNotAvailableError("onnx", "onnx", feature="ONNX models") from None
    return onnx


def _np_dtype(onnx: Any, data_type: int) -> np.dtype | None:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type))
    except (KeyError, ValueError, TypeError):
        return None


def _nbytes(onnx: Any, t: Any) -> int | None:
    """Bytes an initializer's data takes as raw data (None for strings and unknown types)."""
    P = onnx.TensorProto
    numel = math.prod(t.dims)
    if t.data_type == P.STRING:
        return None
    four_bit = {getattr(P, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(P, n)}
    if t.data_type in four_bit:
        return (numel + 1) // 2
    dt = _np_dtype(onnx, t.data_type)
    return None if dt is None else numel * dt.itemsize


def _load_model(path: str, *, external: bool) -> Any:
    onnx = _onnx()
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"no ONNX model at {path}")
    try:
        return onnx.load(path, load_external_data=external)
    except Exception as e:  # protobuf raises DecodeError, RuntimeWarning, ValueError...
        raise FormatError(f"{path}: not a readable ONNX model ({first_line(e)}); the file is truncated or not ONNX") from e


class OnnxSource(Source):
    """The initializers of an ONNX model."""

    kind = "onnx"

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._onnx = _onnx()
        self._model = _load_model(path, external=False)
        self._base = os.path.dirname(os.path.abspath(path))
        self._inits = {t.name: t for t in self._model.graph.initializer}

    @classmethod
    def claims(cls, path: str) -> bool:
        """A file named ``.onnx``."""
        return os.path.isfile(path) and path.lower().endswith(".onnx")

    def keys(self) -> list[str]:
        return list(self._inits)

    def _init(self, name: str) -> Any:
        try:
            return self._inits[name]
        except KeyError:
            raise TensorNotFoundError(f"no initializer {name!r} in {self.path}") from None

    def info(self, name: str) -> TensorInfo:
        t = self._init(name)
        dt = _np_dtype(self._onnx, t.data_type)
        dtype = "string" if t.data_type == self._onnx.TensorProto.STRING else (dtype_str(dt) if dt is not None else f"onnx:{t.data_type}")
        n = _nbytes(self._onnx, t)
        return TensorInfo(name, dtype, tuple(int(d) for d in t.dims), n if n is not None else 0)

    def get(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        t = self._onnx.TensorProto()
        t.CopyFrom(self._init(name))  # reading external data fills the proto; keep ours light
        try:
            return numpy_helper.to_array(t, base_dir=self._base)
        except (OSError, ValueError) as e:
            raise FormatError(f"{self.path}: initializer {name!r} cannot be read: {first_line(e)}") from e

    @property
    def metadata(self) -> dict[str, Any]:
        m = self._model
        meta: dict[str, Any] = {
            "producer_name": m.producer_name,
            "producer_version": m.producer_version,
            "ir_version": m.ir_version,
            "opset": {op.domain or "ai.onnx": op.version for op in m.opset_import},
        }
        if m.metadata_props:
            meta["metadata_props"] = {p.key: p.value for p in m.metadata_props}
        return meta

    @property
    def version(self) -> str:
        return f"ir {self._model.ir_version}"

    @classmethod
    def verify(cls, path: str, *, progress: bool | None = None) -> VerifyReport:
        t0 = time.perf_counter()
        onnx = _onnx()
        from onnx.external_data_helper import ExternalDataInfo, uses_external_data

        problems: list[Problem] = []
        try:
            model = _load_model(path, external=False)
        except FormatError as e:
            problems.append(Problem("header", str(e), file=path))
            return make_report(path, problems, t0)
        base = os.path.dirname(os.path.abspath(path))
        checked = nbytes = 0
        inits = list(model.graph.initializer)
        for t in inits:
            need = _nbytes(onnx, t)
            if uses_external_data(t):
                ext = ExternalDataInfo(t)
                loc = ext.location or ""
                fp = os.path.normpath(os.path.join(base, loc))
                if not loc or os.path.isabs(loc) or not fp.startswith(base + os.sep):
                    problems.append(Problem("header", f"{path}: initializer {t.name!r} points to external data {loc!r} outside the model's directory", file=path, tensor=t.name))
                    continue
                if not os.path.isfile(fp):
                    problems.append(Problem("missing_file", f"{path}: external data file {loc} of initializer {t.name!r} is missing", file=loc, tensor=t.name, offset=ext.offset))
                    continue
                length = ext.length if ext.length is not None and ext.length > 0 else need
                if need is not None and length != need:
                    problems.append(Problem("size_mismatch", f"{path}: initializer {t.name!r} records {length} bytes of external data but its dtype and shape need {need}", file=loc, tensor=t.name, offset=ext.offset))
                    continue
                size = os.path.getsize(fp)
                if length is not None and ext.offset + length > size:
                    problems.append(Problem("truncated_file", f"{loc}: initializer {t.name!r} needs bytes {ext.offset}..{ext.offset + length} but the file holds {size}; it is truncated", file=loc, tensor=t.name, offset=ext.offset))
                    continue
            elif t.HasField("raw_data") and need is not None and len(t.raw_data) != need:
                problems.append(Problem("size_mismatch", f"{path}: initializer {t.name!r} holds {len(t.raw_data)} bytes but its dtype and shape need {need}", file=path, tensor=t.name))
                continue
            checked += 1
            nbytes += need or 0
        try:
            onnx.checker.check_model(path)  # the path form follows external data and allows > 2 GiB
        except Exception as e:
            problems.append(Problem("checker", f"{path}: onnx.checker: {first_line(e)}", file=path))
        return make_report(path, problems, t0, tensors=len(inits), checked=checked, nbytes=nbytes, version=f"ir {model.ir_version}")


def export_onnx(src: str, model_path: str, out: str, *, allow_missing: bool, allow_unknown: bool, overwrite: bool) -> ConvertResult:
    """See :func:`ckptfmt.converters.kinds.onnx_export`."""
    onnx = _onnx()
    from onnx import numpy_helper

    check_destination(out, overwrite)
    if os.path.abspath(out) == os.path.abspath(model_path):
        raise ConversionError(f"{out}: the output must be a new file, not the model being filled in")
    model = _load_model(model_path, external=True)
    used_external = any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in _load_model(model_path, external=False).graph.initializer
    )
    index = {t.name: i for i, t in enumerate(model.graph.initializer)}
    with open_any(src) as s:
        names = s.keys()
        have = set(names)
        unknown = [n for n in names if n not in index]
        missing = [n for n in index if n not in have]
        mismatched = []
        for n in names:
            if n not in index:
                continue
            t = model.graph.initializer[index[n]]
            dt = _np_dtype(onnx, t.data_type)
            want = (dtype_str(dt) if dt is not None else f"onnx:{t.data_type}", tuple(int(d) for d in t.dims))
            info = s.info(n)
            if (info.dtype, info.shape) != want:
                mismatched.append(f"{n}: {info.dtype}{list(info.shape)} in {src}, {want[0]}{list(want[1])} in the model")
        gaps = []
        if unknown and not allow_unknown:
            gaps.append(f"{len(unknown)} tensor(s) of {src} have no initializer in {model_path}: {', '.join(unknown[:20])}" + (" ..." if len(unknown) > 20 else "") + " (--allow-unknown ignores them)")
        if missing and not allow_missing:
            gaps.append(f"{len(missing)} initializer(s) of {model_path} are not in {src}: {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else "") + " (--allow-missing keeps the model's values)")
        if mismatched:
            what = f"{len(mismatched)} tensor(s) do not match the model's initializers: " + "; ".join(mismatched)
            raise ConversionError("; ".join([what, *gaps]))
        if gaps:
            raise UnmappedKeyError("; ".join(gaps))
        written = nbytes = 0
        for n in names:
            if n in index:
                arr = np.asarray(s.get(n))
                model.graph.initializer[index[n]].CopyFrom(numpy_helper.from_array(arr, n))
                written += 1
                nbytes += arr.nbytes
    external = used_external or sum(len(t.raw_data) for t in model.graph.initializer) > _PROTO_LIMIT
    location = os.path.basename(out) + ".data"
    data_path = os.path.join(os.path.dirname(os.path.abspath(out)), location)
    if external and os.path.exists(data_path):
        os.remove(data_path)  # onnx appends to an existing external data file
    try:
        onnx.save_model(model, out, save_as_external_data=external, all_tensors_to_one_file=True, location=location)
        onnx.checker.check_model(out)
    except Exception as e:
        for p in (out, data_path if external else None):
            if p and os.path.exists(p):
                os.remove(p)
        raise ConversionError(f"{out}: the filled-in model fails onnx.checker or cannot be saved: {first_line(e)}") from e
    return ConvertResult(out, "onnx", written, nbytes)
