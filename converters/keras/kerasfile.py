"""Keras's own files, read and written without Keras: ``.keras``, ``.weights.h5`` and tf.keras ``.h5``.

Three layouts, all HDF5 (read with h5py, the ``keras`` extra):

===================  =========================================================================
file                 layout
===================  =========================================================================
``.keras`` (Keras 3) a zip: ``config.json`` (model and optimizer config), ``metadata.json``,
                     ``model.weights.h5`` (below)
``.weights.h5``      positional datasets ``<object path>/vars/0, 1, ...`` per saveable object;
(Keras 3)            groups are snake_case class names (``layers/dense_1``) or attribute names
                     (subclassed models); the layer's name is the ``vars`` group's ``name``
                     attribute; ``optimizer/vars/N``: 0 iterations, 1 learning rate (absent
                     with a schedule), then the slots; bfloat16 is opaque ``|V2`` with a
                     ``dtype`` attribute
``.h5`` (tf.keras 2) ``model_weights/<layer>/<layer>/kernel:0`` (full model, with
                     ``model_config``/``training_config`` attributes) or the same at the root
                     (``save_weights``); ``optimizer_weights/Adam/m/<layer>/kernel:0``...
===================  =========================================================================

:func:`read_keras_file` resolves such a file into the same :class:`KerasCheckpoint` the TF
checkpoint reader produces (layers, weights, optimizer slots, iterations, learning rate),
plus what only Keras's files carry: each layer's config (epsilon, momentum, class, order)
and the optimizer's hyperparameters. Source keys are Keras variable paths
(``conv/kernel``, ``lstm/lstm_cell/kernel``), as for a TF checkpoint of the same model.

Keras 3 files store variables by position, not by name: roles come from the layer class
(config, or the group's snake_case class name), and the optimizer's slots are tied to the
model's trainable variables by their order, which the config gives; without a config it is
solved from the slot shapes and refused when they do not decide.

HDF5 from untrusted sources is checked before data is read: soft and external links,
external and virtual datasets, unsupported dtypes, and datasets declaring far more bytes
than the file holds are refused with :class:`~ckptfmt.errors.FormatError`.

Example:
    >>> from ckptfmt.converters.keras.kerasfile import KerasFileReader, read_keras_file
    >>> with KerasFileReader("fixtures/keras/k3_cnn_adam.keras") as r:
    ...     kc = read_keras_file(r)
    ...     [(l.name, l.class_name) for l in kc.layers]
    [('conv', 'Conv2D'), ('bn', 'BatchNormalization'), ('flatten', 'Flatten'), ('head', 'Dense')]
"""

from __future__ import annotations

__all__ = [
    "HDF5_MAGIC",
    "KerasFileCheckpoint",
    "KerasFileReader",
    "read_keras_file",
    "is_keras_file",
    "write_keras_file",
    "is_keras_path",
    "open_keras_checkpoint",
    "file_optimizer_config",
    "check_config_mismatches",
    "write_keras_like_template",
]

import contextlib
import io
import json
import math
import os
import re
import zipfile
from collections.abc import Callable, Iterable, Iterator
from collections.abc import Mapping as AbcMapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ckptfmt.errors import CheckpointNotFoundError, ConversionError, FormatError, FrameworkNotAvailableError, TensorNotFoundError

from ..mapping.registry import KerasLayer, KerasWeight
from .checkpoint import KerasCheckpoint
from .infer import infer_kind as _infer_kind
from .infer import insert_flattens as _insert_flattens

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ZIP_MAGIC = b"PK\x03\x04"
# A .keras archive's members (Keras 3 saving_lib).
_CONFIG, _METADATA, _WEIGHTS_H5, _WEIGHTS_NPZ = "config.json", "metadata.json", "model.weights.h5", "model.weights.npz"
_MAX_JSON = 64 << 20  # config.json of the largest models is a few MB
# A dataset may not declare more than this many times the bytes the file stores for it
# (compressed datasets), above a small floor: a decompression bomb is refused before reading.
_MAX_EXPANSION, _BOMB_FLOOR = 1000, 1 << 20
_DTYPES = {np.dtype(t) for t in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                                  "float16", "float32", "float64")}
_SUFFIX_N = re.compile(r"^(?P<base>.+?)(_(?P<n>\d+))?$")


def _h5py() -> Any:
    try:
        import h5py
    except ImportError as e:
        raise FrameworkNotAvailableError("h5py", "keras", feature="reading and writing Keras .keras/.h5 files") from e
    return h5py


def is_keras_file(path: str | os.PathLike[str]) -> str | None:
    """``"keras"`` (a ``.keras`` zip), ``"keras-h5"`` (an HDF5 file) or None, from the first bytes.

    A ``.keras`` zip is told from a torch zip by its ``config.json``/``metadata.json`` members.

    Example:
        >>> is_keras_file("fixtures/keras/k3_cnn_adam.weights.h5")  # doctest: +SKIP
        'keras-h5'
    """
    p = os.fspath(path)
    try:
        with open(p, "rb") as f:
            head = f.read(8)
    except OSError:
        return None
    if head == HDF5_MAGIC:
        return "keras-h5"
    if head[:4] == ZIP_MAGIC:
        try:
            with zipfile.ZipFile(p) as z:
                names = set(z.namelist())
        except (zipfile.BadZipFile, OSError, ValueError):
            return "keras" if p.lower().endswith(".keras") else None
        if _METADATA in names and (_CONFIG in names or _WEIGHTS_H5 in names):
            return "keras"
    return None


# --------------------------------------------------------------------------------------------
# The file


class KerasFileReader:
    """An open ``.keras`` / ``.weights.h5`` / tf.keras ``.h5`` file: its datasets by HDF5 path.

    The same small interface as :class:`~ckptfmt.converters.tf.bundle.TFCheckpointReader`
    (``keys``, ``shape``, ``dtype``, ``get``, ``close``), so conversions read either.
    Nothing is read until asked; every dataset is checked (no links, no external or virtual
    storage, a supported dtype, no decompression bomb) when the file is opened.

    Attributes:
        path: the file.
        kind: ``"keras"`` (a ``.keras`` zip) or ``"keras-h5"``.
        config: the parsed ``config.json`` of a ``.keras`` (or the ``model_config`` of a
            tf.keras full-model ``.h5``), else None.
        metadata: ``metadata.json`` of a ``.keras`` (``keras_version``...), or the HDF5 root
            attributes.
        training_config: a tf.keras ``.h5``'s ``training_config`` (optimizer config), or None.

    Raises:
        CheckpointNotFoundError: no file at ``path``.
        FormatError: not a Keras file, or a damaged or unsafe one (names file and dataset).
        FrameworkNotAvailableError: h5py is not installed (``pip install 'ckptfmt[keras]'``).

    Example:
        >>> with KerasFileReader("m.weights.h5") as r:  # doctest: +SKIP
        ...     r.keys()[:2]
        ['layers/conv2d/vars/0', 'layers/conv2d/vars/1']
    """

    def __init__(self, path: str | os.PathLike[str], *, check_in_subprocess: bool = True) -> None:
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise CheckpointNotFoundError(f"no Keras file at {self.path}")
        h5py = _h5py()
        self.kind = is_keras_file(self.path)
        if self.kind is None:
            raise FormatError(f"{self.path}: not a Keras file (neither an HDF5 file nor a .keras zip with metadata.json)")
        self.config: Any = None
        self.metadata: dict[str, Any] = {}
        self.training_config: Any = None
        self._zip: zipfile.ZipFile | None = None
        self._raw: Any = None  # the HDF5 bytes: the file, or a stored zip member's range
        self._tmp: str | None = None
        self._base, self._length = 0, os.path.getsize(self.path)
        self.member_info: zipfile.ZipInfo | None = None
        try:
            h5_path = self.path
            if self.kind == "keras":
                self._zip = zipfile.ZipFile(self.path)
                names = set(self._zip.namelist())
                self.metadata = self._json(_METADATA)
                self.config = self._json(_CONFIG) if _CONFIG in names else None
                if _WEIGHTS_H5 not in names:
                    if _WEIGHTS_NPZ in names:
                        raise FormatError(f"{self.path}: the weights are stored as {_WEIGHTS_NPZ}, which ckptfmt does not read; "
                                          "re-save the model as .keras with the default (HDF5) weights")
                    raise FormatError(f"{self.path}: a .keras archive without {_WEIGHTS_H5}")
                self.member_info = info = self._zip.getinfo(_WEIGHTS_H5)
                if info.compress_type == zipfile.ZIP_STORED:
                    self._base, self._length = _member_range(self.path, info)
                else:  # Keras stores it uncompressed; a recompressed archive is unpacked beside
                    self._tmp = _extract(self._zip, info, self.path)
                    h5_path, self._base, self._length = self._tmp, 0, os.path.getsize(self._tmp)
            else:
                self._base, self._length = 0, os.path.getsize(self.path)
            # libhdf5 is not hardened against damaged or malicious files (it can crash the
            # process): the structure is walked first in a child process, exactly as below.
            if check_in_subprocess:
                _check_in_child(self.path, h5_path, self._base, self._length)
            self._raw = _Range(h5_path, self._base, self._length)
            self._h5 = h5py.File(self._raw, "r")
        except (FormatError, TensorNotFoundError):
            self.close()
            raise
        except Exception as e:  # zipfile, h5py and OSError variants of "damaged"
            self.close()
            raise FormatError(f"{self.path}: not a readable Keras file: {_one_line(e)}") from None
        self._data_path = h5_path
        try:
            self._datasets: dict[str, Any] = {}
            self._offsets: dict[str, int] = {}
            self._bf16: set[str] = set()
            self._groups: dict[str, dict[str, Any]] = {}
            self._scan()
            if self.kind == "keras-h5":
                self.metadata = {k: _attr(v) for k, v in self._groups.get("", {}).items()
                                 if k in ("backend", "keras_version")}
                for key, attr in (("model_config", "config"), ("training_config", "training_config")):
                    raw = self._groups.get("", {}).get(key)
                    if raw is not None:
                        setattr(self, attr, _loads(_attr(raw), f"{self.path}: attribute {key}"))
        except FormatError:
            self.close()
            raise
        except Exception as e:
            self.close()
            raise FormatError(f"{self.path}: damaged HDF5 structure: {_one_line(e)}") from None

    def _json(self, name: str) -> Any:
        assert self._zip is not None
        info = self._zip.getinfo(name)
        if info.file_size > _MAX_JSON:
            raise FormatError(f"{self.path}: {name} declares {info.file_size} bytes (limit {_MAX_JSON})")
        with self._zip.open(name) as f:
            raw = f.read(_MAX_JSON + 1)
        return _loads(raw, f"{self.path}: {name}")

    def _scan(self) -> None:
        """Every group's attributes and every dataset, checked, without reading data."""
        h5py = _h5py()
        stack: list[tuple[str, Any]] = [("", self._h5)]
        seen = 0
        visited: set[int] = set()
        while stack:
            path, group = stack.pop()
            addr = h5py.h5o.get_info(group.id).addr
            if addr in visited:
                raise FormatError(f"{self.path}: group {path} is linked twice (a cycle); Keras files are trees")
            visited.add(addr)
            self._groups[path] = dict(group.attrs.items())
            for name in group:
                link = group.get(name, getlink=True)
                full = f"{path}/{name}" if path else name
                if not isinstance(link, h5py.HardLink):
                    raise FormatError(f"{self.path}: {full} is a {type(link).__name__}; Keras files hold no links")
                obj = group[name]
                seen += 1
                if seen > 10_000_000:
                    raise FormatError(f"{self.path}: more than 10,000,000 HDF5 objects")
                if isinstance(obj, h5py.Group):
                    stack.append((full, obj))
                    continue
                if not isinstance(obj, h5py.Dataset):
                    raise FormatError(f"{self.path}: {full} is neither a group nor a dataset")
                self._check_dataset(full, obj)
                dict(obj.attrs.items())  # read here as in the child process (the writer copies them)
                self._datasets[full] = obj
                offset = obj.id.get_offset()
                if obj.chunks is None and offset is not None:
                    nbytes = math.prod(obj.shape) * obj.dtype.itemsize
                    if offset < 0 or offset + nbytes > self._length:
                        raise FormatError(f"{self.path}: dataset {full} lies at bytes {offset}..{offset + nbytes}, "
                                          f"beyond the {self._length}-byte HDF5 file (truncated?)")
                    self._offsets[full] = offset

    def _check_dataset(self, name: str, ds: Any) -> None:
        if ds.external:
            raise FormatError(f"{self.path}: dataset {name} stores its data in external files ({ds.external[0][0]!r}); refused")
        if ds.is_virtual:
            raise FormatError(f"{self.path}: dataset {name} is virtual (data in other files); refused")
        dt = ds.dtype
        if dt.kind == "V" and dt.itemsize == 2 and _attr(ds.attrs.get("dtype", "")) == "bfloat16":
            self._bf16.add(name)
        elif dt not in _DTYPES:
            raise FormatError(f"{self.path}: dataset {name} has dtype {dt}, which no Keras variable has")
        shape = ds.shape
        if shape is None or any(d < 0 for d in shape) or len(shape) > 64:
            raise FormatError(f"{self.path}: dataset {name} has an invalid shape {shape}")
        declared = math.prod(shape) * dt.itemsize
        stored = ds.id.get_storage_size()
        if declared > _BOMB_FLOOR and declared > _MAX_EXPANSION * max(stored, 1):
            raise FormatError(f"{self.path}: dataset {name} declares {declared} bytes but stores {stored}; "
                              "refused (a decompression bomb)")
        if ds.compression is None and ds.chunks is None and stored not in (0, declared):
            raise FormatError(f"{self.path}: dataset {name} stores {stored} bytes for {declared} declared")

    # ---- the reader interface

    def keys(self) -> list[str]:
        """Dataset paths, in a stable order (natural order of path components)."""
        return sorted(self._datasets, key=_natural)

    def groups(self) -> dict[str, dict[str, Any]]:
        """``{group path: its attributes}`` (the root is ``""``)."""
        return self._groups

    def _ds(self, key: str) -> Any:
        try:
            return self._datasets[key]
        except KeyError:
            raise TensorNotFoundError(f"{self.path}: no dataset {key!r}") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._ds(key).shape)

    def dtype(self, key: str) -> np.dtype:
        if key in self._bf16:
            import ml_dtypes

            return np.dtype(ml_dtypes.bfloat16)
        return self._ds(key).dtype

    def get(self, key: str) -> np.ndarray:
        """One dataset as a numpy array (bfloat16 viewed as ``ml_dtypes.bfloat16``).

        Raises:
            TensorNotFoundError: no such dataset. FormatError: its data cannot be read.
        """
        ds = self._ds(key)
        try:
            if key in self._offsets:  # contiguous: the bytes themselves, no HDF5 code involved
                n = math.prod(ds.shape)
                dt = ds.dtype
                with open(self._data_path, "rb") as f:
                    f.seek(self._base + self._offsets[key])
                    buf = f.read(n * dt.itemsize)
                if len(buf) != n * dt.itemsize:
                    raise FormatError(f"{self.path}: dataset {key} is truncated ({len(buf)} of {n * dt.itemsize} bytes)")
                value = np.frombuffer(buf, dt).reshape(ds.shape).copy() if n else np.zeros(ds.shape, dt)
            elif ds.id.get_storage_size() == 0:  # never written: HDF5's fill value
                value = np.asarray(ds[()])
            else:
                value = np.asarray(ds[()])
        except FormatError:
            raise
        except Exception as e:
            raise FormatError(f"{self.path}: dataset {key} cannot be read: {_one_line(e)}") from None
        if value.dtype.byteorder not in ("=", "|") and value.dtype.byteorder != np.dtype(value.dtype.newbyteorder("=")).byteorder:
            value = value.astype(value.dtype.newbyteorder("="))
        if value.shape != tuple(ds.shape):
            raise FormatError(f"{self.path}: dataset {key} read as shape {value.shape}, declared {ds.shape}")
        if key in self._bf16:
            value = value.view(self.dtype(key))
        return value

    def nbytes(self, key: str) -> int:
        ds = self._ds(key)
        return int(math.prod(ds.shape) * ds.dtype.itemsize)

    def close(self) -> None:
        for obj in ("_h5", "_raw", "_zip"):
            handle = getattr(self, obj, None)
            if handle is not None:
                try:
                    handle.close()
                except Exception:
                    pass
                setattr(self, obj, None)
        tmp = getattr(self, "_tmp", None)
        if tmp:
            try:
                os.remove(tmp)
            except OSError:
                pass
            self._tmp = None

    def __enter__(self) -> KerasFileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Range(io.RawIOBase):
    """A byte range of a file as a read-only file (a stored zip member, or the whole file)."""

    def __init__(self, path: str, base: int, length: int) -> None:
        self._f = open(path, "rb")
        self._base, self._len, self._pos = base, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = pos if whence == 0 else (self._pos + pos if whence == 1 else self._len + pos)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self._len - self._pos))
        if n == 0:
            return 0
        self._f.seek(self._base + self._pos)
        data = self._f.read(n)
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        self._f.close()
        super().close()


def _member_range(path: str, info: zipfile.ZipInfo) -> tuple[int, int]:
    """Where a stored zip member's bytes are: after its local header (whose extra field may
    differ from the central directory's)."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    if len(header) != 30 or header[:4] != ZIP_MAGIC:
        raise FormatError(f"{path}: the local header of {info.filename} is damaged")
    name_len = int.from_bytes(header[26:28], "little")
    extra_len = int.from_bytes(header[28:30], "little")
    base = info.header_offset + 30 + name_len + extra_len
    if base + info.file_size > os.path.getsize(path):
        raise FormatError(f"{path}: {info.filename} runs past the end of the archive (truncated?)")
    return base, info.file_size


def _extract(z: zipfile.ZipFile, info: zipfile.ZipInfo, path: str) -> str:
    if info.file_size > _MAX_EXPANSION * max(info.compress_size, 1) and info.file_size > _BOMB_FLOOR:
        raise FormatError(f"{path}: {info.filename} expands {info.compress_size} bytes to {info.file_size}; refused")
    import tempfile

    fd, tmp = tempfile.mkstemp(suffix=".weights.h5", prefix="ckptfmt-")
    with os.fdopen(fd, "wb") as out, z.open(info) as src:
        while chunk := src.read(1 << 22):
            out.write(chunk)
    return tmp


# The child process walks the HDF5 structure with the calls KerasFileReader makes, and reads
# chunked datasets (contiguous ones are read without libhdf5).
_CHILD = r"""
import math, sys
import h5py
path, base, length = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
class R:
    def __init__(s): s.f = open(path, "rb"); s.p = 0
    def seek(s, p, w=0): s.p = p if w == 0 else (s.p + p if w == 1 else length + p); return s.p
    def tell(s): return s.p
    def read(s, n=-1):
        n = length - s.p if n is None or n < 0 else max(0, min(n, length - s.p))
        s.f.seek(base + s.p); d = s.f.read(n); s.p += len(d); return d
    def readinto(s, b):
        d = s.read(len(b)); b[:len(d)] = d; return len(d)
raw = R()
f = h5py.File(raw, "r")
stack, seen = [f], set()
while stack:
    g = stack.pop()
    a = h5py.h5o.get_info(g.id).addr
    if a in seen:
        continue
    seen.add(a)
    dict(g.attrs.items())
    for name in g:
        if not isinstance(g.get(name, getlink=True), h5py.HardLink):
            continue
        o = g[name]
        if isinstance(o, h5py.Group):
            stack.append(o)
            continue
        if not isinstance(o, h5py.Dataset):
            continue
        o.external, o.is_virtual, o.dtype, o.shape, o.compression, o.chunks
        dict(o.attrs.items())
        stored = o.id.get_storage_size()
        o.id.get_offset()
        if o.chunks is not None and o.shape is not None:
            declared = math.prod(o.shape) * o.dtype.itemsize
            if declared <= 1 << 20 or declared <= 1000 * max(stored, 1):
                o[()]

f.close()
sys.stdout.flush()
import os
os._exit(0)  # no teardown of h5py's Python file driver
"""


# Files already walked by a child unharmed, by identity and modification time: opening one
# file several times (detect, inspect, convert) costs one child process.
_CHECKED: set[tuple[Any, ...]] = set()


def _check_in_child(shown: str, path: str, base: int, length: int) -> None:
    import subprocess
    import sys

    st = os.stat(path)
    ident = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns, base, length)
    if ident in _CHECKED:
        return

    timeout = 60 + length / (50 << 20)
    try:
        r = subprocess.run([sys.executable, "-I", "-c", _CHILD, path, str(base), str(length)],
                           capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise FormatError(f"{shown}: parsing its HDF5 structure did not finish in {timeout:.0f} s (damaged or malicious)") from None
    if r.returncode < 0:
        raise FormatError(f"{shown}: the HDF5 library crashed (signal {-r.returncode}) parsing the file's structure: "
                          "it is damaged or malicious")
    # a Python error in the child is raised again, as a FormatError, by the same calls here
    if r.returncode == 0:
        _CHECKED.add(ident)


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _attr(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return [_attr(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _loads(raw: Any, where: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, TypeError, RecursionError) as e:
        raise FormatError(f"{where} is not valid JSON: {_one_line(e)}") from None


def _natural(path: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.split("/"))


# --------------------------------------------------------------------------------------------
# What the file holds


@dataclass(frozen=True, slots=True)
class KerasFileCheckpoint(KerasCheckpoint):
    """A :class:`KerasCheckpoint` read from a Keras file, with what only such files carry.

    Attributes (besides :class:`KerasCheckpoint`'s, whose keys here are HDF5 dataset paths):
        file_kind: ``"keras"``, ``"keras3-h5"`` (a Keras 3 ``.weights.h5``) or ``"tfkeras-h5"``.
        optimizer_config: the optimizer's class and hyperparameters from the file's config
            (``{"class_name": "Adam", "beta_1": 0.9, ...}``), empty when the file has none.
        order_known: whether the layer order is the model's (from a config, or solved from
            the optimizer's slot shapes).
        notes: what the reader assumed or could not tell.
    """

    file_kind: str = ""
    optimizer_config: dict[str, Any] = field(default_factory=dict)
    order_known: bool = True
    notes: tuple[str, ...] = ()


# Keras 3 built-in layers: their own variables in saving order (trainable first), which
# ones are trainable, and the config flags that drop optional ones.
@dataclass(frozen=True, slots=True)
class _LayerSpec:
    roles: tuple[str, ...]
    trainable: frozenset[str]
    optional: dict[str, str] = field(default_factory=dict)  # role -> config flag that creates it


_KERNEL_BIAS = _LayerSpec(("kernel", "bias"), frozenset({"kernel", "bias"}), {"bias": "use_bias"})
_SPECS: dict[str, _LayerSpec] = {
    **{c: _KERNEL_BIAS for c in ("Dense", "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose",
                                  "Conv3DTranspose", "DepthwiseConv1D", "DepthwiseConv2D")},
    "SeparableConv1D": _LayerSpec(("depthwise_kernel", "pointwise_kernel", "bias"),
                                  frozenset({"depthwise_kernel", "pointwise_kernel", "bias"}), {"bias": "use_bias"}),
    "SeparableConv2D": _LayerSpec(("depthwise_kernel", "pointwise_kernel", "bias"),
                                  frozenset({"depthwise_kernel", "pointwise_kernel", "bias"}), {"bias": "use_bias"}),
    "BatchNormalization": _LayerSpec(("gamma", "beta", "moving_mean", "moving_variance"), frozenset({"gamma", "beta"}),
                                     {"gamma": "scale", "beta": "center"}),
    "LayerNormalization": _LayerSpec(("gamma", "beta"), frozenset({"gamma", "beta"}), {"gamma": "scale", "beta": "center"}),
    "Embedding": _LayerSpec(("embeddings",), frozenset({"embeddings"})),
    "LSTMCell": _LayerSpec(("kernel", "recurrent_kernel", "bias"), frozenset({"kernel", "recurrent_kernel", "bias"}),
                           {"bias": "use_bias"}),
    "GRUCell": _LayerSpec(("kernel", "recurrent_kernel", "bias"), frozenset({"kernel", "recurrent_kernel", "bias"}),
                          {"bias": "use_bias"}),
    "SimpleRNNCell": _LayerSpec(("kernel", "recurrent_kernel", "bias"), frozenset({"kernel", "recurrent_kernel", "bias"}),
                                {"bias": "use_bias"}),
}
# Composite layers: their sub-objects (HDF5 group paths below the layer), in the order of
# their trainable variables, and the class of each.
_COMPOSITES: dict[str, tuple[tuple[str, str], ...]] = {
    "LSTM": (("cell", "LSTMCell"),),
    "GRU": (("cell", "GRUCell"),),
    "SimpleRNN": (("cell", "SimpleRNNCell"),),
    "MultiHeadAttention": (("query_dense", "EinsumDense"), ("key_dense", "EinsumDense"), ("value_dense", "EinsumDense"),
                           ("output_dense", "EinsumDense")),
}
_SPECS["EinsumDense"] = _KERNEL_BIAS
# Weightless objects Keras saves (groups without datasets, or state that is not a weight).
_STATE_ONLY = {"seed_generator", "SeedGenerator"}


def _snake(name: str) -> str:
    """Keras's ``naming.to_snake_case``: the group names of container items."""
    s = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    s = re.sub(r"([a-z])([A-Z])", r"\1_\2", s).lower()
    return s if s[:1] != "_" else "private" + s


_BY_SNAKE = {_snake(c): c for c in [*_SPECS, *_COMPOSITES, "Bidirectional", "Functional", "Sequential", "InputLayer",
                                       "Flatten", "Dropout"]}


@dataclass
class _Obj:
    """One saveable object of a Keras 3 weights file."""

    path: str  # its HDF5 group (the parent of "vars")
    name: str  # the `name` attribute
    n: int  # its datasets vars/0..n-1
    children: list[str] = field(default_factory=list)


@dataclass
class _Layer:
    """A layer being resolved: name, class, config, and its weights as (role path, h5 key)."""

    name: str
    class_name: str
    config: dict[str, Any]
    weights: list[tuple[str, str]]  # (variable path, h5 key), saving order
    trainable: list[str]  # h5 keys of trainable variables, in optimizer order
    chain: str  # layers sharing a chain keep their relative order
    ordinal: int
    input_shape: tuple[int | None, ...] | None = None
    class_known: bool = True


def read_keras_file(reader: KerasFileReader, *, infer_layers: bool = True) -> KerasFileCheckpoint:
    """Resolve a Keras file's datasets into a :class:`KerasFileCheckpoint`.

    Args:
        reader: the open file.
        infer_layers: resolve each layer's kind (not needed with a mapping file).

    Raises:
        FormatError: a layout that is not Keras's (names the file and group).
        ConversionError: a layer of unknown kind (with ``infer_layers``).

    Example:
        >>> with KerasFileReader("m.keras") as r:  # doctest: +SKIP
        ...     kc = read_keras_file(r)
        >>> kc.slots["conv/kernel"]  # doctest: +SKIP
        {'momentum': 'optimizer/vars/2', 'velocity': 'optimizer/vars/3'}
    """
    groups = reader.groups()
    if "model_weights" in groups or "layer_names" in groups.get("", {}):
        return _read_tfkeras(reader, infer_layers)
    return _read_keras3(reader, infer_layers)


# ---- Keras 3


def _objects(reader: KerasFileReader) -> dict[str, _Obj]:
    groups = reader.groups()
    objs: dict[str, _Obj] = {}
    for path, attrs in groups.items():
        if path != "vars" and not path.endswith("/vars"):
            continue
        owner = path[: -len("/vars")] if path != "vars" else ""
        n = 0
        while f"{path}/{n}" in reader._datasets:
            n += 1
        extra = [k for k in reader._datasets if k.startswith(path + "/") and k.count("/") == path.count("/") + 1]
        if len(extra) != n:
            raise FormatError(f"{reader.path}: {path} holds datasets that are not numbered 0..{n - 1}: "
                              f"{', '.join(sorted(k.rsplit('/', 1)[1] for k in extra)[:5])}")
        objs[owner] = _Obj(owner, str(_attr(attrs.get("name", owner.rsplit("/", 1)[-1] or "model"))), n)
    stray = [k for k in reader._datasets if k.rsplit("/", 2)[-2:-1] != ["vars"] and not k.startswith(("vars/",))
             and "/vars/" not in k]
    if stray:
        raise FormatError(f"{reader.path}: datasets outside any vars group (not a Keras 3 weights file?): {', '.join(stray[:5])}")
    return objs


def _class_of(group: str) -> str | None:
    base = group.rsplit("/", 1)[-1]
    m = _SUFFIX_N.match(base)
    return _BY_SNAKE.get(m["base"] if m else base) or _BY_SNAKE.get(base)


def _read_keras3(reader: KerasFileReader, infer_layers: bool) -> KerasFileCheckpoint:
    objs = _objects(reader)
    if not objs:
        raise FormatError(f"{reader.path}: no Keras variables (no vars groups)")
    config = reader.config if isinstance(reader.config, dict) else None
    notes: list[str] = []
    layers: list[_Layer] = []
    consumed: set[str] = set()
    model_cfg = config.get("config", {}) if config else {}
    model_class = config.get("class_name") if config else None
    order_known = False
    if config and model_class in ("Functional", "Sequential") and isinstance(model_cfg, dict):
        layers = _from_config(reader, objs, "layers", model_cfg, consumed, True)
        order_known = True
    # whatever the config does not explain (a subclassed model, a .weights.h5 alone)
    rest = sorted((p for p in objs if p not in consumed and p != "optimizer" and not p.startswith("optimizer/")
                   and p != ""), key=_natural)
    for path in rest:
        if path in consumed or any(path.startswith(c + "/") for c in consumed):
            continue
        layers += _layer_from_group(reader, objs, path, None, consumed, True)
    if "" in objs and objs[""].n:
        notes.append(f"the model itself holds {objs[''].n} variables (vars/0..): not converted")
    # the optimizer
    opt = objs.get("optimizer")
    opt_cfg: dict[str, Any] = {}
    if config and isinstance(config.get("compile_config"), dict):
        o = config["compile_config"].get("optimizer")
        if isinstance(o, dict) and isinstance(o.get("config"), dict):
            opt_cfg = {"class_name": o.get("class_name"), **o["config"]}
    slots: dict[str, dict[str, str]] = {}
    iterations_key = lr_key = None
    problems: list[str] = []
    other: list[str] = []
    # under mixed precision compile() wraps the configured optimizer: the config names the inner
    # class, the file holds the wrapper's vars beside an inner_optimizer group
    loss_scaled = opt_cfg.get("class_name") == "LossScaleOptimizer" or "optimizer/inner_optimizer" in objs
    if opt is not None and loss_scaled:
        # held, not placed: the optimizer counts as present, so converting it is refused, not skipped
        problems.append(f"{reader.path}: a LossScaleOptimizer's state (mixed precision) in a Keras file is not read yet; "
                        "pass --no-optimizer")
        iterations_key = "optimizer/vars/0" if opt.n else None
        other += [f"optimizer/vars/{i}" for i in range(1, opt.n)]
    elif opt is not None:
        iterations_key, lr_key, slots, order, problems2, note2 = _optimizer(reader, opt, layers, opt_cfg, order_known)
        problems += problems2
        notes += note2
        if order is not None:
            layers, order_known = order, True
        if problems2 and iterations_key is None and opt.n:
            iterations_key = "optimizer/vars/0"  # present but not placed: converting it is refused, not skipped
    # keys
    keys: dict[str, str] = {}
    kl: list[KerasLayer] = []
    taken: set[str] = set()
    for layer in layers:
        ws = []
        for vpath, h5key in layer.weights:
            if vpath in taken:
                raise FormatError(f"{reader.path}: two variables with the Keras path {vpath!r} (layer {layer.name!r})")
            taken.add(vpath)
            keys[vpath] = h5key
            ws.append(KerasWeight(vpath, reader.shape(h5key)))
        if not infer_layers:
            kl.append(KerasLayer(layer.name, "?", {}, tuple(ws)))
            continue
        kl.append(_keras_layer(layer, tuple(ws)))
    # without the order no Flatten can be placed: the planner has the torch model's dataflow decide
    # each Dense, or refuses (unordered_flatten_error)
    if infer_layers and order_known:
        kl = _insert_flattens(kl) if not any(l.class_name == "Flatten" for l in kl) else kl
    seen_keys = set(keys.values()) | {k for d in slots.values() for k in d.values()} | {k for k in (iterations_key, lr_key) if k}
    other += [k for k in reader.keys() if k not in seen_keys and k not in other]
    return KerasFileCheckpoint(
        keys=keys, shapes={k: reader.shape(v) for k, v in keys.items()}, dtypes={k: reader.dtype(v) for k, v in keys.items()},
        layers=tuple(kl), slots=slots, iterations_key=iterations_key, learning_rate_key=lr_key,
        optimizer_name=(objs["optimizer"].name if "optimizer" in objs else None), other=tuple(other),
        problems=tuple(problems), path=reader.path, reader=reader, file_kind="keras" if reader.kind == "keras" else "keras3-h5",
        optimizer_config={k: v for k, v in opt_cfg.items() if v is not None}, order_known=order_known, notes=tuple(notes),
    )


def unordered_flatten_error(kc: KerasCheckpoint) -> ConversionError | None:
    """The refusal for a file with no layer order whose Dense may follow a flattened convolution.

    A ``.weights.h5`` lists layers by name, so no Flatten can be placed from it: only the torch
    model's dataflow (``--model`` with an example input) tells a flattened map from a pooled
    vector. Returns None when the file records the order or holds no convolution and Dense.
    """
    if getattr(kc, "order_known", True):
        return None
    kinds = [layer.class_name for layer in kc.layers]
    if not (any(k.startswith(("Conv", "Depthwise", "Separable")) for k in kinds) and "Dense" in kinds):
        return None
    return ConversionError(
        f"{kc.path}: a .weights.h5 does not record the order of the model's layers, so it cannot tell whether a Dense "
        "follows a flattened convolution (its rows then need permuting) or a pooled vector. Pass the torch model with an "
        "example input (--model FILE.py:factory returning (model, example_input)) so its dataflow decides, or convert "
        "the model's .keras file instead (ModelCheckpoint or model.save)")


def _keras_layer(layer: _Layer, ws: tuple[KerasWeight, ...]) -> KerasLayer:
    """The converter's view of a layer: its class (config or group name) checked against its weights."""
    cls, cfg = layer.class_name, _useful(layer.config)
    if cls == "Flatten" and cfg.get("data_format") == "channels_first":
        raise ConversionError(f"Flatten {layer.name!r} takes channels-first maps, whose row order ckptfmt does not "
                              "convert yet; write the Dense's rules in a mapping file (--map)")
    if cls == "Flatten" or not ws:
        return KerasLayer(layer.name, cls, cfg, ws, input_shape=layer.input_shape)
    kind, extra = _infer_kind(layer.name, ws)
    if layer.class_known and cls in _KNOWN_TO_CONVERTERS:
        if cls != kind and cls not in extra.get("alternatives", ()):
            raise ConversionError(f"layer {layer.name!r} is a Keras {cls} but its weights look like a {kind}")
        extra = {k: v for k, v in extra.items() if k not in ("alternatives", "assumed")}
    elif layer.class_known and cls != "?":
        raise ConversionError(f"layer {layer.name!r} is a Keras {cls}, which the converter does not know (its weights "
                              f"look like a {kind}); write its rules in a mapping file (--map)")
    else:
        cls = kind
    if cls == "Bidirectional" and isinstance(cfg.get("layer"), dict):
        inner = cfg["layer"]
        cfg["layer"] = {"class_name": inner.get("class_name"), "config": _useful(inner.get("config") or {})}
    return KerasLayer(layer.name, cls, {**extra, **cfg}, ws, input_shape=layer.input_shape)


_KNOWN_TO_CONVERTERS = {"Dense", "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose",
                        "DepthwiseConv1D", "DepthwiseConv2D", "SeparableConv1D", "SeparableConv2D", "BatchNormalization",
                        "LayerNormalization", "Embedding", "LSTM", "GRU", "Bidirectional", "MultiHeadAttention"}


def _from_config(reader: KerasFileReader, objs: dict[str, _Obj], base: str, model_cfg: dict[str, Any], consumed: set[str],
                 trainable: bool) -> list[_Layer]:
    """The layers of a Functional/Sequential config, in its order, each found by name under ``base``."""
    by_name: dict[str, str] = {}
    for path, o in objs.items():
        if path.startswith(base + "/") and path.count("/") == base.count("/") + 1:
            by_name.setdefault(o.name, path)
    out: list[_Layer] = []
    trainable = trainable and model_cfg.get("trainable", True) is not False
    for entry in model_cfg.get("layers", []) or []:
        if not isinstance(entry, dict):
            raise FormatError(f"{reader.path}: config.json: a layer entry is not an object")
        cls = entry.get("class_name")
        cfg = entry.get("config") if isinstance(entry.get("config"), dict) else {}
        name = cfg.get("name") or entry.get("name")
        path = by_name.get(name)
        if path is None:
            if cls == "Flatten" and _build_input(entry) is not None:  # no vars group when nothing was saved
                out.append(_Layer(str(name), "Flatten", {}, [], [], f"{base}/flatten", 0, _build_input(entry)))
            continue  # weightless layers need not be saved; a layer with weights missing is caught below
        consumed.add(path)
        if cls in ("Functional", "Sequential") and isinstance(cfg, dict):
            out += _from_config(reader, objs, path + "/layers", cfg, consumed, trainable and cfg.get("trainable", True) is not False)
            continue
        out += _layer_from_group(reader, objs, path, (cls, cfg), consumed, trainable, _build_input(entry))
    missed = [p for p, o in objs.items() if p.startswith(base + "/") and o.n and p not in consumed
              and not any(p.startswith(c + "/") for c in consumed)]
    if missed:
        raise FormatError(f"{reader.path}: variables of {', '.join(missed[:5])} belong to no layer of config.json")
    return out


def _datasets_below(objs: dict[str, _Obj], path: str) -> list[str]:
    return sorted((p for p, o in objs.items() if (p == path or p.startswith(path + "/")) and o.n), key=_natural)


def _layer_from_group(reader: KerasFileReader, objs: dict[str, _Obj], path: str, given: tuple[str, dict] | None,
                      consumed: set[str], trainable: bool, input_shape: tuple[int | None, ...] | None = None) -> list[_Layer]:
    """The layer of a group (and, when given, its config entry); a container's layers, each on its own."""
    o = objs[path]
    cls = given[0] if given else _class_of(path)
    cfg = dict(given[1]) if given else {}
    trainable = trainable and cfg.get("trainable", True) is not False
    below = _datasets_below(objs, path)
    for p in below:
        consumed.add(p)
    consumed.add(path)
    chain, ordinal = _chain(path)
    if not below:
        if cls == "Flatten" and input_shape is not None:
            return [_Layer(o.name, "Flatten", cfg, [], [], chain, ordinal, input_shape)]
        return []
    if cls in _STATE_ONLY or path.rsplit("/", 1)[-1].startswith("seed_generator"):
        return []
    weights: list[tuple[str, str]] = []
    train: list[str] = []
    known = cls in _SPECS or cls in _COMPOSITES or cls == "Bidirectional"
    if cls in _SPECS and below == [path]:
        roles = _roles(reader, o, cls, cfg)
        for i, r in enumerate(roles):
            key = f"{path}/vars/{i}"
            weights.append((f"{o.name}/{r}", key))
            if r in _SPECS[cls].trainable and trainable:
                train.append(key)
    elif cls in _COMPOSITES or cls == "Bidirectional":
        parts = _composite_parts(cls, cfg)
        got = set()
        for sub, sub_cls, prefix, sub_cfg in parts:
            sp = f"{path}/{sub}"
            if sp not in objs and not any(p.startswith(sp + "/") for p in below):
                continue  # an unbuilt direction or sub-layer: nothing saved
            if sp not in objs or not objs[sp].n:
                raise FormatError(f"{reader.path}: {cls} {o.name!r}: {sp} holds no variables")
            so = objs[sp]
            got.add(sp)
            roles = _roles(reader, so, sub_cls, sub_cfg)
            names = [n for n in prefix.split("/") if n] if prefix else []
            for i, r in enumerate(roles):
                key = f"{sp}/vars/{i}"
                vpath = "/".join([o.name, *[objs[f"{path}/{x}"].name for x in names if f"{path}/{x}" in objs], so.name, r])
                weights.append((vpath, key))
                if r in _SPECS[sub_cls].trainable and trainable:
                    train.append(key)
        left = [p for p in below if p not in got]
        if left:
            raise FormatError(f"{reader.path}: {cls} {o.name!r} holds variables Keras's {cls} does not: {', '.join(left)}")
    else:
        # an unknown class, or a group named after an attribute: positional variables only
        if len(below) > 1 or below != [path]:
            # a container of layers (a custom layer or block): each sub-layer on its own
            if objs[path].n:
                raise ConversionError(f"{reader.path}: layer {o.name!r} ({path}) holds its own variables and sub-layers; "
                                      "write its rules in a mapping file (--map)")
            out: list[_Layer] = []
            for p in _children(objs, path):
                out += _layer_from_group(reader, objs, p, None, consumed, trainable)
            return out
        roles = _guess_roles(reader, o)
        for i, r in enumerate(roles):
            key = f"{path}/vars/{i}"
            weights.append((f"{o.name}/{r}", key))
            if trainable and r not in ("moving_mean", "moving_variance"):
                train.append(key)
        known = False
    return [_Layer(o.name, cls or "?", cfg, weights, train, chain, ordinal, input_shape, class_known=known and cls is not None)]


def _children(objs: dict[str, _Obj], path: str) -> list[str]:
    """The outermost objects below ``path`` (each a layer of a container)."""
    below = sorted((p for p in objs if p.startswith(path + "/")), key=_natural)
    return [p for p in below if not any(p.startswith(q + "/") for q in below if q != p)]


def _chain(path: str) -> tuple[str, int]:
    parent, _, base = path.rpartition("/")
    m = _SUFFIX_N.match(base)
    if parent and m and _BY_SNAKE.get(m["base"]):
        return f"{parent}/{m['base']}", int(m["n"] or 0)
    return path, 0


def _build_input(entry: dict[str, Any]) -> tuple[int | None, ...] | None:
    """A config entry's recorded input shape (``build_config``), when it is one plain shape."""
    shape = (entry.get("build_config") or {}).get("input_shape") if isinstance(entry.get("build_config"), dict) else None
    if isinstance(shape, list) and all(d is None or (isinstance(d, int) and d >= 0) for d in shape):
        return tuple(shape)
    return None


def _composite_parts(cls: str, cfg: dict[str, Any]) -> list[tuple[str, str, str, dict]]:
    """(sub-object path, its class, name-path prefix, its config) of a composite layer."""
    if cls == "Bidirectional":
        inner = cfg.get("layer", {}) if isinstance(cfg.get("layer"), dict) else {}
        inner_cls = inner.get("class_name", "LSTM")
        inner_cfg = inner.get("config", {}) if isinstance(inner.get("config"), dict) else {}
        cell = dict(_COMPOSITES.get(inner_cls, (("cell", "LSTMCell"),)))["cell"]
        return [(f"{d}/cell", cell, f"{d}", inner_cfg) for d in ("forward_layer", "backward_layer")]
    return [(sub, sub_cls, "", cfg if sub == "cell" else {"use_bias": cfg.get("use_bias", True)})
            for sub, sub_cls in _COMPOSITES[cls]]


def _roles(reader: KerasFileReader, o: _Obj, cls: str, cfg: dict[str, Any]) -> list[str]:
    spec = _SPECS[cls]
    if cfg:
        roles = [r for r in spec.roles if cfg.get(spec.optional.get(r, ""), True) is not False]
    else:
        roles = list(spec.roles)
        if o.n != len(roles):
            drop = [r for r in spec.roles if r in spec.optional]
            candidates = [[r for r in spec.roles if r not in d] for d in _subsets(drop) if len(spec.roles) - len(d) == o.n]
            if len(candidates) != 1:
                raise ConversionError(
                    f"{reader.path}: {cls} {o.name!r} ({o.path}) has {o.n} variables, which fit "
                    f"{' or '.join('/'.join(c) for c in candidates) or 'no known layout'}; convert the model's .keras "
                    "file instead (its config says which)")
            roles = candidates[0]
    if len(roles) != o.n:
        raise FormatError(f"{reader.path}: {cls} {o.name!r} ({o.path}) has {o.n} variables; its config implies "
                          f"{len(roles)} ({', '.join(roles)})")
    return roles


def _subsets(items: list[str]) -> list[list[str]]:
    out: list[list[str]] = [[]]
    for it in items:
        out += [s + [it] for s in out]
    return out


def _guess_roles(reader: KerasFileReader, o: _Obj) -> list[str]:
    """Roles of a layer whose class the file does not name (a subclassed model's attribute),
    where its shapes allow one layout only; else ``var_N`` (refused when converted)."""
    shapes = [reader.shape(f"{o.path}/vars/{i}") for i in range(o.n)]
    if o.n == 2 and 2 <= len(shapes[0]) <= 5 and len(shapes[1]) == 1 and shapes[1][0] in shapes[0][-2:]:
        return ["kernel", "bias"]
    if o.n == 1 and 3 <= len(shapes[0]) <= 5:  # a convolution without bias (a rank-2 one may be an Embedding)
        return ["kernel"]
    if o.n == 3 and len(shapes[0]) == 2 and len(shapes[1]) == 2 and shapes[0][1] == shapes[1][1] \
            and shapes[1][1] % shapes[1][0] == 0 and len(shapes[2]) in (1, 2):
        return ["kernel", "recurrent_kernel", "bias"]
    if o.n == 4 and all(len(s) == 1 and s == shapes[0] for s in shapes):
        return ["gamma", "beta", "moving_mean", "moving_variance"]
    if o.n == 2 and all(len(s) == 1 and s == shapes[0] for s in shapes):
        return ["gamma", "beta"]
    return [f"var_{i}" for i in range(o.n)]


def _optimizer(reader: KerasFileReader, opt: _Obj, layers: list[_Layer], cfg: dict[str, Any], order_known: bool
               ) -> tuple[str | None, str | None, dict[str, dict[str, str]], list[_Layer] | None, list[str], list[str]]:
    """Tie the optimizer's positional variables to the model's trainable variables.

    Returns iterations key, learning-rate key, slots, the layer order the slots settle (None
    when it was known or is not settled), problems, notes.
    """
    keys = [f"optimizer/vars/{i}" for i in range(opt.n)]
    shapes = [reader.shape(k) for k in keys]
    problems: list[str] = []
    notes: list[str] = []
    if not keys or shapes[0] != ():
        return None, None, {}, None, [f"{reader.path}: optimizer/vars/0 is not the iteration counter"], notes
    it_key = keys[0]
    lr_is_var = not isinstance(cfg.get("learning_rate"), dict) if cfg else (len(shapes) > 1 and shapes[1] == ())
    lr_key = keys[1] if lr_is_var and len(keys) > 1 and shapes[1] == () else None
    rest = keys[2 if lr_key else 1:]
    rest_shapes = shapes[2 if lr_key else 1:]
    cls = _opt_class(cfg, opt.name)
    if cls is None:
        return it_key, lr_key, {}, None, [f"cannot tell the Keras optimizer class of {reader.path} (named {opt.name!r}); "
                                          "convert the model's .keras file, or pass --no-optimizer"], notes
    if cfg.get("use_ema") or cfg.get("gradient_accumulation_steps"):
        return it_key, lr_key, {}, None, ["optimizer use_ema / gradient_accumulation_steps have no torch slot"], notes
    if cfg:
        groups = _SLOT_GROUPS[cls](cfg)
    else:  # a .weights.h5: the slots per variable tell the options, when every layer is trainable
        n_train = sum(len(l.trainable) for l in layers)
        fits = [g for g in _SLOT_VARIANTS[cls] if n_train and sum(map(len, g)) * n_train == len(rest)]
        if len(fits) != 1:
            return it_key, lr_key, {}, None, [
                f"{reader.path}: a Keras {cls} with {len(rest)} slots for {n_train} trainable variables: "
                + ("the file does not say which options made them" if fits else "frozen layers, or options the file does not record")
                + "; convert the model's .keras file instead, or pass --no-optimizer"], notes
        groups = fits[0]
    per_var = sum(len(g) for g in groups)
    if not groups:
        if rest:
            problems.append(f"{reader.path}: a Keras {cls} without slots, but the optimizer holds {len(rest)} more variables")
        return it_key, lr_key, {}, None, problems, notes
    if len(rest) % per_var:
        return it_key, lr_key, {}, None, [f"{reader.path}: {len(rest)} optimizer slots are not {per_var} per variable "
                                           f"(Keras {cls} with {cfg or 'its defaults'})"], notes
    n = len(rest) // per_var
    first = groups[0]
    var_shapes = [rest_shapes[i * len(first)] for i in range(n)]
    # every slot has its variable's shape
    pos = 0
    layout: list[tuple[int, str, str]] = []  # (variable index, slot, key)
    for g in groups:
        for v in range(n):
            for s in g:
                if rest_shapes[pos] != var_shapes[v]:
                    return it_key, lr_key, {}, None, [f"{reader.path}: optimizer slot {rest[pos]} has shape {rest_shapes[pos]}, "
                                                       f"its variable {var_shapes[v]}"], notes
                layout.append((v, s, rest[pos]))
                pos += 1
    order: list[_Layer] | None = None
    if order_known:
        trainable = [k for l in layers for k in l.trainable]
        if [reader.shape(k) for k in trainable] != var_shapes:
            return it_key, lr_key, {}, None, [f"{reader.path}: the optimizer holds slots for {n} variables whose shapes do not "
                                               f"follow the model's {len(trainable)} trainable variables"], notes
    else:
        solved = _solve_order(reader, layers, var_shapes)
        if solved is None:
            return it_key, lr_key, {}, None, [f"{reader.path}: the optimizer slots' shapes do not tell which layer each "
                                               "belongs to (layers of the same shapes, or frozen layers); convert the "
                                               "model's .keras file instead, or pass --no-optimizer"], notes
        order, layers = solved, solved
        notes.append("layer order solved from the optimizer slots' shapes (a .weights.h5 records none)")
        trainable = [k for l in layers for k in l.trainable]
    by_h5 = {h5: v for l in layers for v, h5 in l.weights}
    slots: dict[str, dict[str, str]] = {}
    for v, s, key in layout:
        slots.setdefault(by_h5[trainable[v]], {})[s] = key
    return it_key, lr_key, slots, order, problems, notes


def _opt_class(cfg: dict[str, Any], name: str) -> str | None:
    cls = cfg.get("class_name")
    if cls:
        return str(cls) if cls in _SLOT_GROUPS else None
    base = re.sub(r"_\d+$", "", name.lower())
    return {"adam": "Adam", "adam_w": "AdamW", "adamw": "AdamW", "sgd": "SGD", "rm_sprop": "RMSprop", "rmsprop": "RMSprop"}.get(base)


_SLOT_GROUPS: dict[str, Callable[[dict[str, Any]], list[list[str]]]] = {
    "Adam": lambda c: [["momentum", "velocity"]] + ([["velocity_hat"]] if c.get("amsgrad") else []),
    "AdamW": lambda c: [["momentum", "velocity"]] + ([["velocity_hat"]] if c.get("amsgrad") else []),
    "SGD": lambda c: [["momentum"]] if c.get("momentum", 0) else ([] if c else [["momentum"]]),
    "RMSprop": lambda c: [["velocity"]] + ([["momentum"]] if c.get("momentum", 0) else [])
    + ([["average_gradient"]] if c.get("centered") else []),
}


_SLOT_VARIANTS: dict[str, list[list[list[str]]]] = {
    "Adam": [[["momentum", "velocity"]], [["momentum", "velocity"], ["velocity_hat"]]],
    "AdamW": [[["momentum", "velocity"]], [["momentum", "velocity"], ["velocity_hat"]]],
    "SGD": [[], [["momentum"]]],
    "RMSprop": [[["velocity"]], [["velocity"], ["momentum"]], [["velocity"], ["average_gradient"]],
                [["velocity"], ["momentum"], ["average_gradient"]]],
}


def _solve_order(reader: KerasFileReader, layers: list[_Layer], var_shapes: list[tuple[int, ...]]) -> list[_Layer] | None:
    """The one order of the layers (keeping each chain's order) whose trainable shapes are ``var_shapes``."""
    chains: dict[str, list[_Layer]] = {}
    for l in layers:
        chains.setdefault(l.chain, []).append(l)
    names = list(chains)
    for c in names:
        chains[c].sort(key=lambda l: l.ordinal)
    blocks = {id(l): [reader.shape(k) for k in l.trainable] for l in layers}
    memo: dict[tuple[int, ...], int] = {}

    def offset(state: tuple[int, ...]) -> int:
        return sum(len(blocks[id(chains[c][i])]) for c, k in zip(names, state) for i in range(k))

    def count(state: tuple[int, ...]) -> int:
        if state in memo:
            return memo[state]
        if all(k == len(chains[c]) for c, k in zip(names, state)):
            memo[state] = 1 if offset(state) == len(var_shapes) else 0
            return memo[state]
        total, off = 0, offset(state)
        for j, (c, k) in enumerate(zip(names, state)):
            if k < len(chains[c]):
                b = blocks[id(chains[c][k])]
                if var_shapes[off:off + len(b)] == b:
                    total += count(state[:j] + (k + 1,) + state[j + 1:])
                    if total > 1:
                        break
        memo[state] = min(total, 2)
        return memo[state]

    start = tuple(0 for _ in names)
    if len(names) > 64 or count(start) != 1:
        return None
    # the unique path; weightless-in-optimizer layers (frozen) make it not unique, refused above
    order: list[_Layer] = []
    state = start
    while not all(k == len(chains[c]) for c, k in zip(names, state)):
        off = offset(state)
        for j, (c, k) in enumerate(zip(names, state)):
            if k < len(chains[c]):
                b = blocks[id(chains[c][k])]
                nxt = state[:j] + (k + 1,) + state[j + 1:]
                if var_shapes[off:off + len(b)] == b and count(nxt) == 1:
                    order.append(chains[c][k])
                    state = nxt
                    break
    return order


# ---- tf.keras 2


def _read_tfkeras(reader: KerasFileReader, infer_layers: bool) -> KerasFileCheckpoint:
    groups = reader.groups()
    base = "model_weights" if "model_weights" in groups else ""
    root_attrs = groups.get(base, {})
    if "layer_names" not in root_attrs:
        raise FormatError(f"{reader.path}: {base or 'the root'} has no layer_names attribute (not a tf.keras .h5)")
    layer_names = [str(n) for n in _attr(root_attrs["layer_names"])]
    config = reader.config if isinstance(reader.config, dict) else None
    cfg_by_name: dict[str, tuple[str, dict]] = {}
    if config:
        def walk(c: dict[str, Any]) -> None:
            for e in (c.get("config", {}) or {}).get("layers", []) or []:
                if isinstance(e, dict) and isinstance(e.get("config"), dict):
                    cfg_by_name[e["config"].get("name", e.get("name"))] = (e.get("class_name"), e["config"])
        walk(config)
    keys: dict[str, str] = {}
    by_weight_name: dict[str, str] = {}
    layers: list[KerasLayer] = []
    for lname in layer_names:
        g = f"{base}/{lname}" if base else lname
        wnames = [str(n) for n in _attr(groups.get(g, {}).get("weight_names", []))]
        ws = []
        for wn in wnames:
            h5key = f"{g}/{wn}"
            if h5key not in reader._datasets:
                raise FormatError(f"{reader.path}: layer {lname!r} names weight {wn!r}, which is not in the file")
            vpath = wn.removesuffix(":0")
            if vpath in keys:
                raise FormatError(f"{reader.path}: two weights named {wn!r}")
            keys[vpath] = h5key
            by_weight_name[wn] = vpath
            ws.append(KerasWeight(vpath, reader.shape(h5key)))
        cls, cfg = cfg_by_name.get(lname, (None, {}))
        if not infer_layers:
            layers.append(KerasLayer(lname, "?", {}, tuple(ws)))
        elif cls == "Flatten":
            layers.append(KerasLayer(lname, "Flatten", {}, (), input_shape=None))
        elif ws:
            kind, extra = _infer_kind(lname, tuple(ws))
            if cls and cls in _KNOWN_TO_CONVERTERS and cls != kind and not extra.get("alternatives"):
                raise ConversionError(f"{reader.path}: layer {lname!r} is a {cls} in the config but its weights look like a {kind}")
            if cls in _KNOWN_TO_CONVERTERS:
                kind = cls
                extra = {k: v for k, v in extra.items() if k != "alternatives"}
            layers.append(KerasLayer(lname, kind, {**extra, **_useful(cfg)}, tuple(ws)))
    if infer_layers:
        layers = _insert_flattens([l for l in layers if l.class_name != "Flatten"])
    # optimizer
    slots: dict[str, dict[str, str]] = {}
    iterations_key = None
    hyper: dict[str, str] = {}
    problems: list[str] = []
    opt_name = None
    ow = groups.get("optimizer_weights")
    if ow is not None:
        for wn in [str(n) for n in _attr(ow.get("weight_names", []))]:
            key = f"optimizer_weights/{wn}"
            if key not in reader._datasets:
                raise FormatError(f"{reader.path}: optimizer weight {wn!r} is named but not in the file")
            parts = wn[:-2].split("/") if wn.endswith(":0") else wn.split("/")
            if parts[-1] in ("iteration", "iter"):
                iterations_key = key
                opt_name = opt_name or (parts[0] if len(parts) > 1 else None)
                continue
            if len(parts) == 2 and parts[1] in ("beta_1", "beta_2", "decay", "momentum", "rho", "epsilon", "learning_rate"):
                hyper[parts[1]] = key
                continue
            # new optimizers: Adam/m/conv/kernel ; legacy: Adam/conv/kernel/m
            if len(parts) >= 3 and parts[1] in _TF_SLOTS:
                opt_name, slot, var = parts[0], parts[1], "/".join(parts[2:])
            elif len(parts) >= 3 and parts[-1] in _TF_SLOTS:
                opt_name, slot, var = parts[0], parts[-1], "/".join(parts[1:-1])
            else:
                problems.append(f"optimizer weight {wn} is not a slot ckptfmt knows")
                continue
            if var not in keys:
                problems.append(f"optimizer weight {wn} names variable {var!r}, which the model does not have")
                continue
            slots.setdefault(var, {})[_TF_SLOTS[slot]] = key
    opt_cfg: dict[str, Any] = {}
    tc = reader.training_config
    if isinstance(tc, dict) and isinstance(tc.get("optimizer_config"), dict):
        o = tc["optimizer_config"]
        cls_name = str(o.get("class_name", "")).rpartition(">")[2]
        if isinstance(o.get("config"), dict):
            opt_cfg = {"class_name": cls_name, **{k: v for k, v in o["config"].items() if v is not None}}
    lr_key = hyper.pop("learning_rate", None)
    return KerasFileCheckpoint(
        keys=keys, shapes={k: reader.shape(v) for k, v in keys.items()}, dtypes={k: reader.dtype(v) for k, v in keys.items()},
        layers=tuple(layers), slots=slots, iterations_key=iterations_key, learning_rate_key=lr_key, optimizer_name=opt_name,
        other=tuple(k for k in reader.keys() if k not in set(keys.values()) and not k.startswith("optimizer_weights/")),
        problems=tuple(problems), hyperparameter_keys=hyper, path=reader.path, reader=reader,
        file_kind="tfkeras-h5", optimizer_config=opt_cfg, order_known=True,
    )


_TF_SLOTS = {"m": "momentum", "v": "velocity", "vhat": "velocity_hat", "rms": "velocity", "mg": "average_gradient",
             "momentum": "momentum", "velocity": "velocity", "velocity_hat": "velocity_hat", "average_gradient": "average_gradient"}


def _useful(cfg: dict[str, Any]) -> dict[str, Any]:
    keep = ("epsilon", "momentum", "reset_after", "axis", "center", "scale", "use_bias", "padding", "strides", "data_format",
            "groups", "num_heads", "key_dim", "value_dim", "layer", "merge_mode", "trainable")
    return {k: cfg[k] for k in keep if k in cfg}


# --------------------------------------------------------------------------------------------
# Writing


def write_keras_file(template: KerasFileReader, dst: str | os.PathLike[str], values: AbcMapping[str, np.ndarray] | Callable[[str], np.ndarray | None],
                     *, overwrite: bool = False) -> None:
    """Write a Keras file shaped like ``template`` with new values, atomically.

    Every dataset and attribute of the template is copied; those ``values`` names (HDF5
    paths, as :meth:`KerasFileReader.keys`) get the new value, checked for shape and cast to
    the template's dtype. A ``.keras`` template gives a ``.keras`` (its ``config.json`` and
    ``metadata.json`` copied); an HDF5 template an HDF5 file of the same layout.

    Args:
        template: the open template file.
        dst: where to write (a temporary name beside it, fsync, rename).
        values: ``{h5 path: array}``, or a function returning the array or None (keep).
        overwrite: replace an existing ``dst``.

    Raises:
        CheckpointExistsError: ``dst`` exists and not ``overwrite``.
        ConversionError: a value whose shape is not the template's, or a name not in it.

    Example:
        >>> with KerasFileReader("template.weights.h5") as t:  # doctest: +SKIP
        ...     write_keras_file(t, "new.weights.h5", {"layers/dense/vars/0": kernel})
    """
    from ckptfmt.errors import CheckpointExistsError

    h5py = _h5py()
    dst = os.fspath(dst)
    if os.path.exists(dst) and not overwrite:
        raise CheckpointExistsError(f"{dst} exists (pass overwrite=True / --overwrite to replace it)")
    get = values if callable(values) else (lambda k, _v=values: _v.get(k))
    if not callable(values):
        unknown = [k for k in values if k not in template._datasets]
        if unknown:
            raise ConversionError(f"{template.path} has no datasets {', '.join(sorted(unknown)[:10])}")
    os.makedirs(os.path.dirname(os.path.abspath(dst)) or ".", exist_ok=True)
    tmp = f"{dst}.tmp-{os.getpid()}"
    try:
        if template.kind == "keras":
            buf = io.BytesIO()
            with h5py.File(buf, "w") as out:
                _copy_h5(template, out, get)
            assert template._zip is not None
            with open(tmp, "wb") as f:
                with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as z:
                    for info in template._zip.infolist():
                        if info.filename == _WEIGHTS_H5:
                            z.writestr(info, buf.getvalue())
                        else:
                            z.writestr(info, template._zip.read(info.filename))
                f.flush()
                os.fsync(f.fileno())
        else:
            with h5py.File(tmp, "w") as out:
                _copy_h5(template, out, get)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _copy_h5(template: KerasFileReader, out: Any, get: Callable[[str], Any]) -> None:
    for k, v in template._groups.get("", {}).items():
        out.attrs[k] = v
    for path in sorted(template._groups, key=lambda p: (p.count("/"), p)):
        if path:
            g = out.require_group(path)
            for k, v in template._groups[path].items():
                g.attrs[k] = v
    for key in template.keys():
        value = get(key)
        ds = template._datasets[key]
        data = np.asarray(template.get(key) if value is None else value)
        if tuple(data.shape) != tuple(ds.shape):
            raise ConversionError(f"{key}: the new value has shape {tuple(data.shape)}, the template {tuple(ds.shape)}")
        if key in template._bf16:
            import ml_dtypes

            data = data.astype(ml_dtypes.bfloat16, copy=False).view(ds.dtype)
        else:
            data = data.astype(ds.dtype, copy=False)
        new = out.create_dataset(key, data=data)
        for k, v in ds.attrs.items():
            new.attrs[k] = v


def iter_datasets(reader: KerasFileReader) -> Iterator[tuple[str, tuple[int, ...], np.dtype]]:
    """``(path, shape, dtype)`` of every dataset, without reading data."""
    for k in reader.keys():
        yield k, reader.shape(k), reader.dtype(k)


# --------------------------------------------------------------------------------------------
# The pipelines' entry points: either reader, one writer per template kind


def is_keras_path(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a Keras file (by suffix or content), not a TF checkpoint.

    Example:
        >>> is_keras_path("fixtures/keras/k3_cnn_adam.weights.h5"), is_keras_path("fixtures/tf/keras3_conv_adam")
        (True, False)
    """
    p = os.fspath(path)
    if not os.path.isfile(p):
        return False
    return p.lower().endswith((".keras", ".h5", ".hdf5")) or is_keras_file(p) is not None


@contextlib.contextmanager
def open_keras_checkpoint(path: str | os.PathLike[str], *, infer_layers: bool = True, root: str | None = None,
                          unknown: str = "raise") -> Iterator[KerasCheckpoint]:
    """The :class:`KerasCheckpoint` of a TF checkpoint or of a Keras file, its reader open inside ``with``.

    ``root`` and ``unknown`` are those of
    :func:`~ckptfmt.converters.keras.tfcheckpoint.read_keras_checkpoint` (a Keras file has one
    model and names every layer's class, so they do not apply to it).

    Example:
        >>> with open_keras_checkpoint("fixtures/keras/k3_cnn_adam.keras") as kc:
        ...     kc.slots["head/bias"]
        {'momentum': 'optimizer/vars/12', 'velocity': 'optimizer/vars/13'}
    """
    p = os.fspath(path)
    if is_keras_path(p):
        with KerasFileReader(p) as reader:
            yield read_keras_file(reader, infer_layers=infer_layers)
        return
    import dataclasses

    from ..tf.bundle import TFCheckpointReader
    from .tfcheckpoint import read_keras_checkpoint

    with TFCheckpointReader(p) as reader:
        yield dataclasses.replace(read_keras_checkpoint(reader, root=root, infer_layers=infer_layers, unknown=unknown), path=p)


# Optimizer settings the converters read from a Keras file's config.
_OPTIMIZER_KEYS = ("class_name", "learning_rate", "beta_1", "beta_2", "epsilon", "amsgrad", "momentum", "nesterov", "rho",
                   "centered", "weight_decay", "use_ema", "gradient_accumulation_steps", "clipnorm", "clipvalue",
                   "global_clipnorm")


def file_optimizer_config(kc: KerasCheckpoint, given: AbcMapping[str, Any] | None) -> dict[str, Any] | None:
    """The optimizer settings a Keras file's config states, overridden by ``given`` (``--optimizer-config``).

    The learning rate comes from the config only when the file stores no variable for it
    (tf.keras ``.h5``); a schedule (a dict) is never taken for a value.

    Example:
        >>> with open_keras_checkpoint("fixtures/keras/k3_cnn_adam.keras") as kc:
        ...     sorted(file_optimizer_config(kc, {"epsilon": 1e-8}).items())[:3]
        [('amsgrad', False), ('beta_1', 0.9), ('beta_2', 0.999)]
    """
    if not isinstance(kc, KerasFileCheckpoint) or not kc.optimizer_config:
        return dict(given) if given is not None else None
    out = {k: v for k, v in kc.optimizer_config.items() if k in _OPTIMIZER_KEYS and v is not None}
    if kc.learning_rate_key is not None or not isinstance(out.get("learning_rate"), (int, float)):
        out.pop("learning_rate", None)
    return {**out, **(given or {})}


def check_config_mismatches(kc: KerasCheckpoint, notes: Iterable[str]) -> None:
    """Refuse a torch model whose normalization eps or momentum differs from what the Keras config states.

    A TF checkpoint or a bare ``.weights.h5`` stores no config: their notes stay notes.

    Raises:
        ConversionError: every mismatch, listed.
    """
    if not isinstance(kc, KerasFileCheckpoint) or kc.file_kind == "keras3-h5":
        return
    bad = [n[len("MISMATCH "):] for n in notes if n.startswith("MISMATCH ")]
    if bad:
        raise ConversionError(f"{kc.path}: the torch model does not match the Keras config:\n  " + "\n  ".join(bad)
                              + "\nbuild the torch layers with the Keras layers' eps and momentum (torch momentum = 1 - Keras momentum)")


def write_keras_like_template(dst: str, template: KerasCheckpoint, value: Callable[[str], np.ndarray], keys: Iterable[str],
                              *, overwrite: bool = False) -> None:
    """Write a Keras file shaped like ``template`` (a :class:`KerasFileCheckpoint`), ``keys`` from ``value``.

    Every other dataset is copied from the template. The file appears atomically.

    Example:
        >>> write_keras_like_template("new.keras", kc, values.__getitem__, values)  # doctest: +SKIP
    """
    wanted = set(keys)
    write_keras_file(template.reader, dst, lambda k: value(k) if k in wanted else None, overwrite=overwrite)
