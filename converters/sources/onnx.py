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
import tempfile
import time
from typing import Any

import numpy as np

from ckptfmt.api import Problem, VerifyReport
from ckptfmt.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConversionError,
    FormatError,
    TensorNotFoundError,
    UnmappedKeyError,
)

from ..files import check_destination, commit_file, remove_quietly
from ..optional import require
from . import open_any
from .base import ConvertResult, Source, TensorInfo, dtype_str, first_line, make_report

#: protobuf cannot serialize a message of 2 GiB; above this, tensors go to external data.
_PROTO_LIMIT = 1_800_000_000


def _onnx() -> Any:
    return require("onnx", "ONNX models")


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
            found = _check_initializer(self._onnx, self.path, self._base, t)
        except Exception as e:  # noqa: BLE001 - onnx helpers on damaged protos raise anything
            raise FormatError(f"{self.path}: initializer {name!r} is malformed ({type(e).__name__}: {first_line(e)})") from e
        if found is not None:  # outside the model's directory, missing, short: never read it
            raise FormatError(found.message)
        try:
            return numpy_helper.to_array(t, base_dir=self._base)
        except Exception as e:  # noqa: BLE001 - onnx on damaged protos raises TypeError, KeyError, ValueError...
            raise FormatError(f"{self.path}: initializer {name!r} cannot be read ({type(e).__name__}: {first_line(e)}); the model is damaged") from e

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
        problems: list[Problem] = []
        try:
            model = _load_model(path, external=False)
        except FormatError as e:
            with open(path, "rb") as f:
                head = f.read(1)
            if head != b"\x08":  # every ONNX writer puts ModelProto.ir_version (field 1, varint) first
                problems.append(Problem("unreadable", f"{path}: not an ONNX model: it does not start with a ModelProto's ir_version field ({first_line(e)})", file=path, offset=0))
                return make_report(path, problems, t0, readable=False)
            problems.append(Problem("header", str(e), file=path))
            return make_report(path, problems, t0)
        base = os.path.dirname(os.path.abspath(path))
        checked = nbytes = 0
        inits = list(model.graph.initializer)
        for t in inits:
            try:
                found = _check_initializer(onnx, path, base, t)
            except Exception as e:  # noqa: BLE001 - onnx helpers on damaged protos raise anything
                found = Problem("header", f"{path}: initializer {t.name!r} is malformed ({type(e).__name__}: {first_line(e)})", file=path, tensor=t.name)
            if found is not None:
                problems.append(found)
                continue
            checked += 1
            nbytes += _nbytes(onnx, t) or 0
        try:
            onnx.checker.check_model(path)  # the path form follows external data and allows > 2 GiB
        except Exception as e:
            problems.append(Problem("checker", f"{path}: onnx.checker: {first_line(e)}", file=path))
        return make_report(path, problems, t0, tensors=len(inits), checked=checked, nbytes=nbytes,
                            version=f"ir {model.ir_version}", coverage="structure")


def _check_initializer(onnx: Any, path: str, base: str, t: Any) -> Problem | None:
    """The first problem of one initializer's data (embedded or external), or None."""
    from onnx.external_data_helper import uses_external_data

    if any(d < 0 for d in t.dims):
        return Problem("header", f"{path}: initializer {t.name!r} has a negative dimension {list(t.dims)}", file=path, tensor=t.name)
    need = _nbytes(onnx, t)
    if uses_external_data(t):
        return _check_external(path, base, t, need)
    if t.HasField("raw_data") and need is not None and len(t.raw_data) != need:
        return Problem("size_mismatch", f"{path}: initializer {t.name!r} holds {len(t.raw_data)} bytes but its dtype and shape need {need}", file=path, tensor=t.name)
    return None


def _check_external(path: str, base: str, t: Any, need: int | None) -> Problem | None:
    """The first problem of an initializer's external data: its file inside ``base``, no link, its span inside the file."""
    from onnx.external_data_helper import ExternalDataInfo

    ext = ExternalDataInfo(t)
    loc = ext.location or ""
    fp = os.path.normpath(os.path.join(base, loc))
    if not loc or os.path.isabs(loc) or not fp.startswith(base + os.sep) or os.path.islink(fp):
        return Problem("header", f"{path}: initializer {t.name!r} points to external data {loc!r} outside the model's directory (or through a link); it is not read", file=path, tensor=t.name)
    if not os.path.isfile(fp):
        return Problem("missing_file", f"{path}: external data file {loc} of initializer {t.name!r} is missing", file=loc, tensor=t.name, offset=ext.offset)
    length = ext.length if ext.length is not None and ext.length > 0 else need
    if need is not None and length != need:
        return Problem("size_mismatch", f"{path}: initializer {t.name!r} records {length} bytes of external data but its dtype and shape need {need}", file=loc, tensor=t.name, offset=ext.offset)
    size = os.path.getsize(fp)
    if ext.offset < 0 or (length is not None and ext.offset + length > size):
        return Problem("truncated_file", f"{loc}: initializer {t.name!r} needs bytes {ext.offset}..{ext.offset + (length or 0)} but the file holds {size}; it is truncated", file=loc, tensor=t.name, offset=ext.offset)
    return None


def export_onnx(src: str, model_path: str, out: str, *, allow_missing: bool, allow_unknown: bool, overwrite: bool) -> ConvertResult:
    """See :func:`ckptfmt.converters.kinds.onnx_export`."""
    onnx = _onnx()
    from onnx import numpy_helper

    check_destination(out, "file", overwrite)
    if os.path.abspath(out) == os.path.abspath(model_path):
        raise ConversionError(f"{out}: the output must be a new file, not the model being filled in")
    model = _load_model(model_path, external=True)
    used_external = any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in _load_model(model_path, external=False).graph.initializer
    )
    index = {t.name: i for i, t in enumerate(model.graph.initializer)}
    with open_any(src) as s:
        _check_fit(onnx, s, src, model_path, model, index, allow_missing=allow_missing, allow_unknown=allow_unknown)
        written = nbytes = 0
        for n in s.keys():
            if n in index:
                arr = np.asarray(s.get(n))
                model.graph.initializer[index[n]].CopyFrom(numpy_helper.from_array(arr, n))
                written += 1
                nbytes += arr.nbytes
    external = used_external or sum(len(t.raw_data) for t in model.graph.initializer) > _PROTO_LIMIT
    if external:
        _check_data_dst(os.path.join(os.path.dirname(os.path.abspath(out)), os.path.basename(out) + ".data"),
                        model_path, overwrite)
    _save_atomically(onnx, model, out, external)
    return ConvertResult(out, "onnx", written, nbytes)


def _listed(what: str, names: list[str], hint: str) -> str:
    return f"{len(names)} {what}: {', '.join(names[:20])}" + (" ..." if len(names) > 20 else "") + f" ({hint})"


def _check_fit(onnx: Any, s: Source, src: str, model_path: str, model: Any, index: dict[str, int], *,
               allow_missing: bool, allow_unknown: bool) -> None:
    """Every tensor of ``s`` fits its initializer (dtype, shape), and every name pairs up unless allowed.

    Raises:
        ConversionError: mismatched tensors (all listed, with the unpaired names).
        UnmappedKeyError: unpaired names only.
    """
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
        gaps.append(_listed(f"tensor(s) of {src} have no initializer in {model_path}", unknown, "--allow-unknown ignores them"))
    if missing and not allow_missing:
        gaps.append(_listed(f"initializer(s) of {model_path} are not in {src}", missing, "--allow-missing keeps the model's values"))
    if mismatched:
        what = f"{len(mismatched)} tensor(s) do not match the model's initializers: " + "; ".join(mismatched)
        raise ConversionError("; ".join([what, *gaps]))
    if gaps:
        raise UnmappedKeyError("; ".join(gaps))


def _save_atomically(onnx: Any, model: Any, out: str, external: bool) -> None:
    """Save and check the model in a new directory beside ``out``, then commit its files.

    The external data file (``<out>.data``, named inside the model) is committed first and
    the model last: the model's rename is the commit, so a save killed halfway leaves no
    new model (and onnx never appends to an existing data file).
    """
    parent = os.path.dirname(os.path.abspath(out))
    name = os.path.basename(out)
    location = name + ".data"
    work = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    staged = [os.path.join(work, name), os.path.join(work, location)]
    try:
        try:
            onnx.save_model(model, staged[0], save_as_external_data=external, all_tensors_to_one_file=True, location=location)
            onnx.checker.check_model(staged[0])
        except OSError:
            raise  # a full disk is a storage error, not a bad model
        except Exception as e:
            raise ConversionError(f"{out}: the filled-in model fails onnx.checker or cannot be saved: {first_line(e)}") from e
        if os.path.exists(staged[1]):  # small tensors stay inside the model even with external data
            commit_file(staged[1], os.path.join(parent, location))
        commit_file(staged[0], out)
    finally:
        for p in staged:
            remove_quietly(p)
        os.rmdir(work)


def _check_data_dst(data_path: str, model_path: str, overwrite: bool) -> None:
    """``OUT.data`` may be replaced only with ``overwrite``, and never when the input model uses it."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    if not os.path.lexists(data_path):
        return
    base = os.path.dirname(os.path.abspath(model_path))
    model = _load_model(model_path, external=False)
    for t in model.graph.initializer:
        if uses_external_data(t):
            loc = ExternalDataInfo(t).location or ""
            if os.path.realpath(os.path.join(base, loc)) == os.path.realpath(data_path):
                raise ConversionError(
                    f"{data_path} holds the external data of the input model {model_path}; writing the "
                    "output's data there would destroy the input. Choose another output name"
                )
    if not overwrite:
        raise CheckpointExistsError(
            f"{data_path} (the output's external data file) already exists; pass --overwrite to replace it"
        )
