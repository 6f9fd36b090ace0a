"""ckptfmt checkpoint directories as a source, through :func:`ckptfmt.open` (hash-checked reads).

Example:
    >>> import numpy as np, os, tempfile, ckptfmt
    >>> d = os.path.join(tempfile.mkdtemp(), "ck")
    >>> _ = ckptfmt.save({"w": np.ones(2, np.float32)}, d)
    >>> CkptfmtSource.claims(d)
    True
    >>> with CkptfmtSource(d) as src:
    ...     src.info("w")
    TensorInfo(name='w', dtype='float32', shape=(2,), nbytes=8)
"""

from __future__ import annotations

__all__ = ["CkptfmtSource"]

import os
from typing import Any

import numpy as np

import ckptfmt.api
from ckptfmt.api import VerifyReport
from ckptfmt.format.spec import DATA_SUFFIX, MANIFEST_NAME, MANIFEST_TMP_PREFIX

from .base import Source, TensorInfo


class CkptfmtSource(Source):
    """A ckptfmt checkpoint directory, through :func:`ckptfmt.open` (hash-checked reads)."""

    kind = "ckptfmt"

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._reader = ckptfmt.api.open(path)

    @classmethod
    def claims(cls, path: str) -> bool:
        """A directory holding a MANIFEST, or the data files of an incomplete checkpoint (opening it says so)."""
        if not os.path.isdir(path):
            return False
        names = os.listdir(path)
        if MANIFEST_NAME in names:
            return True
        if "checkpoint" in names and os.path.isfile(os.path.join(path, "checkpoint")):
            return False  # a TensorFlow checkpoint directory
        return any(n.endswith(DATA_SUFFIX) or n.startswith(MANIFEST_TMP_PREFIX) for n in names)

    def keys(self) -> list[str]:
        return self._reader.keys()

    def info(self, name: str) -> TensorInfo:
        e = self._reader.info(name)
        return TensorInfo(name, e.dtype, tuple(e.shape), int(e.nbytes))

    def get(self, name: str) -> np.ndarray:
        return self._reader.get(name)

    @property
    def metadata(self) -> Any:
        return self._reader.metadata

    @property
    def version(self) -> str:
        major, minor = self._reader.version
        return f"{major}.{minor}"

    @property
    def digest(self) -> str:
        return self._reader.digest

    def close(self) -> None:
        self._reader.close()

    @classmethod
    def verify(cls, path: str, *, progress: bool | None = None) -> VerifyReport:
        return ckptfmt.api.verify(path, progress=progress)
