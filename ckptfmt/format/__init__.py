"""The pure format layer: dtypes, manifest, chunking, hashing, tree encoding, limits.

Knows nothing of files, storage or frameworks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ckptfmt.format.spec import ALIGNMENT, DEFAULT_CHUNK_SIZE, FORMAT_VERSION, LIMITS, MANIFEST_NAME, Limits

if TYPE_CHECKING:
    from ckptfmt.format.dtypes import DTYPE_NAMES, dtype_name, numpy_dtype
    from ckptfmt.format.hashing import DEFAULT_HASH, get_hash
    from ckptfmt.format.manifest import FileEntry, Manifest, ManifestBuilder, TensorEntry, decode_manifest

# The numpy-backed modules are imported on first use (PEP 562), so reading the spec's
# constants (the CLI's --version) does not import numpy.
_LAZY = {
    **dict.fromkeys(("DTYPE_NAMES", "dtype_name", "numpy_dtype"), "ckptfmt.format.dtypes"),
    **dict.fromkeys(("DEFAULT_HASH", "get_hash"), "ckptfmt.format.hashing"),
    **dict.fromkeys(("FileEntry", "Manifest", "ManifestBuilder", "TensorEntry", "decode_manifest"), "ckptfmt.format.manifest"),
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ckptfmt.format' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "DTYPE_NAMES",
    "dtype_name",
    "numpy_dtype",
    "DEFAULT_HASH",
    "get_hash",
    "FileEntry",
    "Manifest",
    "ManifestBuilder",
    "TensorEntry",
    "decode_manifest",
    "ALIGNMENT",
    "DEFAULT_CHUNK_SIZE",
    "FORMAT_VERSION",
    "LIMITS",
    "MANIFEST_NAME",
    "Limits",
]
