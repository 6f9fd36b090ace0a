"""Keras files as HDF5: open a ``.keras`` zip or an HDF5 file and check it before reading.

:class:`KerasFileReader` finds the HDF5 bytes (the file itself, or a ``.keras`` archive's
``model.weights.h5`` member, read in place when stored uncompressed), walks the HDF5
structure in a child process first (libhdf5 is not hardened against hostile files), then
checks every dataset (no links, no external or virtual storage, a Keras dtype, no
decompression bomb) before any data is read. Contiguous datasets are read as plain bytes.

Part of :mod:`ckptfmt.converters.keras.kerasfile`, which re-exports the public names.

Example:
    >>> with KerasFileReader("fixtures/keras/k3_cnn_adam.weights.h5") as r:
    ...     r.kind, r.keys()[:2]
    ('keras-h5', ['layers/batch_normalization/vars/0', 'layers/batch_normalization/vars/1'])
"""

from __future__ import annotations

__all__ = [
    "HDF5_MAGIC",
    "ZIP_MAGIC",
    "WEIGHTS_MEMBER",
    "KerasFileReader",
    "is_keras_file",
    "require_h5py",
    "attr_value",
    "parse_json",
    "natural_key",
]

import io
import json
import math
import os
import zipfile
from typing import Any

import numpy as np

from ckptfmt.errors import CheckpointNotFoundError, FormatError, FrameworkNotAvailableError, TensorNotFoundError

from .kerasfile_check import check_in_child

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ZIP_MAGIC = b"PK\x03\x04"
# A .keras archive's members (Keras 3 saving_lib).
_CONFIG, _METADATA, WEIGHTS_MEMBER, _WEIGHTS_NPZ = "config.json", "metadata.json", "model.weights.h5", "model.weights.npz"
_MAX_JSON = 64 << 20  # config.json of the largest models is a few MB
# A dataset may not declare more than this many times the bytes the file stores for it
# (compressed datasets), above a small floor: a decompression bomb is refused before reading.
_MAX_EXPANSION, _BOMB_FLOOR = 1000, 1 << 20
_DTYPES = {np.dtype(t) for t in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                                  "float16", "float32", "float64")}


def require_h5py() -> Any:
    """The ``h5py`` module, or :class:`FrameworkNotAvailableError` naming the ``keras`` extra."""
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
        if _METADATA in names and (_CONFIG in names or WEIGHTS_MEMBER in names):
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
        h5py = require_h5py()
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
            h5_path = self._locate_h5()
            # libhdf5 is not hardened against damaged or malicious files (it can crash the
            # process): the structure is walked first in a child process, exactly as below.
            if check_in_subprocess:
                check_in_child(self.path, h5_path, self._base, self._length)
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
                self._read_root_attributes()
        except FormatError:
            self.close()
            raise
        except Exception as e:
            self.close()
            raise FormatError(f"{self.path}: damaged HDF5 structure: {_one_line(e)}") from None

    def _locate_h5(self) -> str:
        """The file holding the HDF5 bytes, with ``_base``/``_length`` set to their range.

        An HDF5 file is its own range; a ``.keras`` archive's ``config.json`` and
        ``metadata.json`` are read, and its weights member is read in place when stored (as
        Keras writes it) or unpacked to a temporary file when compressed.
        """
        if self.kind != "keras":
            self._base, self._length = 0, os.path.getsize(self.path)
            return self.path
        self._zip = zipfile.ZipFile(self.path)
        names = set(self._zip.namelist())
        self.metadata = self._json(_METADATA)
        self.config = self._json(_CONFIG) if _CONFIG in names else None
        if WEIGHTS_MEMBER not in names:
            if _WEIGHTS_NPZ in names:
                raise FormatError(f"{self.path}: the weights are stored as {_WEIGHTS_NPZ}, which ckptfmt does not read; "
                                  "re-save the model as .keras with the default (HDF5) weights")
            raise FormatError(f"{self.path}: a .keras archive without {WEIGHTS_MEMBER}")
        self.member_info = info = self._zip.getinfo(WEIGHTS_MEMBER)
        if info.compress_type == zipfile.ZIP_STORED:
            self._base, self._length = _member_range(self.path, info)
            return self.path
        # Keras stores it uncompressed; a recompressed archive is unpacked beside
        self._tmp = _extract(self._zip, info, self.path)
        self._base, self._length = 0, os.path.getsize(self._tmp)
        return self._tmp

    def _read_root_attributes(self) -> None:
        """A tf.keras ``.h5``'s metadata, ``model_config`` and ``training_config`` (root attributes)."""
        root = self._groups.get("", {})
        self.metadata = {k: attr_value(v) for k, v in root.items() if k in ("backend", "keras_version")}
        for key, attr in (("model_config", "config"), ("training_config", "training_config")):
            raw = root.get(key)
            if raw is not None:
                setattr(self, attr, parse_json(attr_value(raw), f"{self.path}: attribute {key}"))

    def _json(self, name: str) -> Any:
        """A ``.keras`` member parsed as JSON, its declared size checked first."""
        assert self._zip is not None
        info = self._zip.getinfo(name)
        if info.file_size > _MAX_JSON:
            raise FormatError(f"{self.path}: {name} declares {info.file_size} bytes (limit {_MAX_JSON})")
        with self._zip.open(name) as f:
            raw = f.read(_MAX_JSON + 1)
        return parse_json(raw, f"{self.path}: {name}")

    def _scan(self) -> None:
        """Every group's attributes and every dataset, checked, without reading data."""
        h5py = require_h5py()
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
        """Refuse external, virtual, oddly typed or shaped datasets and decompression bombs."""
        if ds.external:
            raise FormatError(f"{self.path}: dataset {name} stores its data in external files ({ds.external[0][0]!r}); refused")
        if ds.is_virtual:
            raise FormatError(f"{self.path}: dataset {name} is virtual (data in other files); refused")
        dt = ds.dtype
        if dt.kind == "V" and dt.itemsize == 2 and attr_value(ds.attrs.get("dtype", "")) == "bfloat16":
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
        return sorted(self._datasets, key=natural_key)

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
                value = np.empty(ds.shape, dt)  # read straight into the array: one copy of the tensor, not two
                with open(self._data_path, "rb") as f:
                    f.seek(self._base + self._offsets[key])
                    got = f.readinto(memoryview(value.reshape(-1).view(np.uint8))) if n else 0
                if got != n * dt.itemsize:
                    raise FormatError(f"{self.path}: dataset {key} is truncated ({got} of {n * dt.itemsize} bytes)")
            elif ds.id.get_storage_size() == 0:  # never written: HDF5's fill value
                value = np.asarray(ds[()])
            else:
                value = np.asarray(ds[()])
        except FormatError:
            raise
        except Exception as e:
            raise FormatError(f"{self.path}: dataset {key} cannot be read: {_one_line(e)}") from None
        if not value.dtype.isnative:  # h5py says "<f4" for native little-endian data: no copy for that
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
    """A compressed member unpacked to a temporary file (a decompression bomb refused first); its path."""
    if info.file_size > _MAX_EXPANSION * max(info.compress_size, 1) and info.file_size > _BOMB_FLOOR:
        raise FormatError(f"{path}: {info.filename} expands {info.compress_size} bytes to {info.file_size}; refused")
    import tempfile

    fd, tmp = tempfile.mkstemp(suffix=".weights.h5", prefix="ckptfmt-")
    with os.fdopen(fd, "wb") as out, z.open(info) as src:
        while chunk := src.read(1 << 22):
            out.write(chunk)
    return tmp


def _one_line(e: BaseException) -> str:
    """An exception's first line, for a message naming the file."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def attr_value(value: Any) -> Any:
    """An HDF5 attribute as plain Python: bytes decoded, arrays as lists, numpy scalars as numbers."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return [attr_value(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def parse_json(raw: Any, where: str) -> Any:
    """``raw`` parsed as JSON, or a :class:`FormatError` naming ``where``."""
    try:
        return json.loads(raw)
    except (ValueError, TypeError, RecursionError) as e:
        raise FormatError(f"{where} is not valid JSON: {_one_line(e)}") from None


def natural_key(path: str) -> tuple:
    """Sort key of an HDF5 path, numeric components by value (``vars/2`` before ``vars/10``)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.split("/"))
