"""The pure format layer: dtypes, manifest, chunking, hashing, tree encoding, limits.

Knows nothing of files, storage or frameworks.
"""

from __future__ import annotations

from ckptfmt.format.dtypes import DTYPE_NAMES, dtype_name, numpy_dtype
from ckptfmt.format.hashing import DEFAULT_HASH, get_hash
from ckptfmt.format.manifest import FileEntry, Manifest, ManifestBuilder, TensorEntry, decode_manifest
from ckptfmt.format.spec import ALIGNMENT, DEFAULT_CHUNK_SIZE, FORMAT_VERSION, LIMITS, MANIFEST_NAME, Limits

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
