"""Keras's own files as a source: ``.keras`` archives, Keras 3 ``.weights.h5`` and tf.keras ``.h5``.

Read with h5py (the ``keras`` extra) through :class:`ckptfmt.converters.keras.kerasfile.KerasFileReader`,
which walks the HDF5 structure in a child process first (libhdf5 can crash on damaged files)
and reads contiguous data without libhdf5. Tensor names are Keras variable paths
(``conv/kernel``) and ``optimizer/<variable>/<slot>``, ``optimizer/iterations``,
``optimizer/learning_rate`` where the layout is understood; other datasets keep their HDF5
paths, so nothing is hidden.

A ``.keras`` is a zip, like a torch file: it is told apart by its ``metadata.json`` and
``config.json`` members (the zip's directory is read for a file without a known suffix).

Example:
    >>> from ckptfmt.converters.sources import detect_kind
    >>> detect_kind("fixtures/keras/k3_cnn_adam.keras")
    'keras'
"""

from __future__ import annotations

__all__ = ["KerasSource"]

import os
import time
import zipfile
from typing import Any

import numpy as np

from ckptfmt.api import Problem, VerifyReport
from ckptfmt.errors import CheckpointNotFoundError, ConversionError, FormatError, TensorNotFoundError

from ..sources.base import Source, TensorInfo, dtype_str, first_line, make_report

#: File suffixes of Keras's files.
KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def _kerasfile() -> Any:
    from . import kerasfile

    return kerasfile


def _names(reader: Any) -> dict[str, str]:
    """``{tensor name: HDF5 key}``: variable paths and ``optimizer/...`` where understood, raw paths otherwise."""
    kf = _kerasfile()
    try:
        kc = kf.read_keras_file(reader, infer_layers=False)
    except (FormatError, ConversionError):
        return {k: k for k in reader.keys()}
    out = dict(kc.keys)
    for var, d in kc.slots.items():
        for slot, key in d.items():
            out[f"optimizer/{var}/{slot}"] = key
    if kc.iterations_key:
        out["optimizer/iterations"] = kc.iterations_key
    if kc.learning_rate_key:
        out["optimizer/learning_rate"] = kc.learning_rate_key
    named = set(out.values())
    out.update({k: k for k in reader.keys() if k not in named and k not in out})
    return out


class KerasSource(Source):
    """A ``.keras``, Keras 3 ``.weights.h5`` or tf.keras ``.h5`` file (needs h5py: the ``keras`` extra)."""

    kind = "keras"

    @classmethod
    def claims(cls, path: str) -> bool:
        """A file named ``.keras``/``.h5``/``.hdf5``, or a zip holding a Keras archive's members."""
        if not os.path.isfile(path):
            return False
        if path.lower().endswith(KERAS_SUFFIXES):
            return True
        return _kerasfile().is_keras_file(path) == "keras"

    @classmethod
    def sniff(cls, head: bytes) -> bool:
        """HDF5's signature."""
        return head[:8] == _HDF5_MAGIC

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._reader = _kerasfile().KerasFileReader(path)
        try:
            self._names = _names(self._reader)
        except BaseException:
            self._reader.close()
            raise

    def keys(self) -> list[str]:
        return list(self._names)

    def _key(self, name: str) -> str:
        if name not in self._names:
            raise TensorNotFoundError(f"{self.path}: no tensor {name!r}")
        return self._names[name]

    def info(self, name: str) -> TensorInfo:
        k = self._key(name)
        return TensorInfo(name, dtype_str(self._reader.dtype(k)), self._reader.shape(k), self._reader.nbytes(k))

    def get(self, name: str) -> np.ndarray:
        return self._reader.get(self._key(name))

    @property
    def metadata(self) -> Any:
        return self._reader.metadata or None

    @property
    def version(self) -> str:
        what = ".keras" if self._reader.kind == "keras" else "HDF5"
        v = self._reader.metadata.get("keras_version")
        return f"{what} (keras {v})" if v else what

    def close(self) -> None:
        self._reader.close()

    @classmethod
    def verify(cls, path: str, *, progress: bool | None = None) -> VerifyReport:
        """The zip's CRC-32s (``.keras``), the HDF5 structure, every tensor read; contents carry no checksums."""
        t0 = time.perf_counter()
        problems: list[Problem] = []
        kind = _kerasfile().is_keras_file(path)
        if kind == "keras":
            try:
                with zipfile.ZipFile(path) as z:
                    bad = z.testzip()  # reads every member, checking its CRC-32
                if bad is not None:
                    problems.append(Problem("hash_mismatch", f"zip member {bad} fails its CRC-32", file=path))
            except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
                problems.append(Problem("header", f"not a readable zip archive: {first_line(e)}", file=path))
                return make_report(path, problems, t0)
        try:
            src = cls(path)
        except CheckpointNotFoundError:
            raise
        except (FormatError, ConversionError, OSError) as e:
            problems.append(Problem("header", first_line(e), file=path))
            return make_report(path, problems, t0)
        checked = nbytes = 0
        try:
            for name in src.keys():
                try:
                    src.get(name)
                except (FormatError, OSError) as e:
                    problems.append(Problem("unreadable", first_line(e), file=path, tensor=name))
                checked += 1
                nbytes += src._reader.nbytes(src._names[name])
            version = src.version
        finally:
            src.close()
        problems.append(Problem(
            "no_checksums",
            ("the zip's CRC-32 covers the archive's members, but the HDF5 weights carry no checksums of their own "
             "(ckptfmt's checksum sidecar covers them)" if kind == "keras" else
             "HDF5 weights files carry no checksums: the structure was checked and every tensor read, but a flipped "
             "bit inside tensor data cannot be detected"),
            severity="warning", file=path))
        return make_report(path, problems, t0, tensors=checked, checked=checked, nbytes=nbytes, version=version)
