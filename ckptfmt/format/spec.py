"""Constants of the on-disk format: version, file names and limits (see spec/FORMAT.md).

Everything here is normative: changing a value changes the format.
"""

from __future__ import annotations

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "MANIFEST_TMP_PREFIX",
    "DATA_SUFFIX",
    "DATA_FILE_RE",
    "STORE_NAME",
    "STORE_MARKER",
    "STORE_FILE_RE",
    "LOCK_NAME",
    "ALIGNMENT",
    "DEFAULT_CHUNK_SIZE",
    "MIN_CHUNK_SIZE",
    "MAX_CHUNK_SIZE",
    "Limits",
    "LIMITS",
]

import re
from dataclasses import dataclass

FORMAT_NAME = "ckptfmt"
#: (major, minor). Readers refuse an unknown major and ignore unknown fields of a known one.
FORMAT_VERSION = (1, 2)

#: The manifest's file name inside a checkpoint directory. Its presence marks a complete
#: checkpoint: it is written last and made visible by an atomic rename.
MANIFEST_NAME = "MANIFEST"
#: Temporary manifests are written under this prefix, then renamed to MANIFEST_NAME.
MANIFEST_TMP_PREFIX = ".MANIFEST.tmp-"
DATA_SUFFIX = ".data"
#: The names a writer gives data files inside a checkpoint directory. Deletion (gc, remove,
#: retention) only ever deletes files whose names match this or STORE_FILE_RE: a name is
#: the format's positive identification of its own files.
DATA_FILE_RE = re.compile(r"^data-[0-9]{5}-[0-9a-f]{8}\.data$")

#: 1.2: the run-level shared store, a sibling of the checkpoint directories of a run
#: (``RUN/ckptfmt-store/``). Manifests refer to its files as ``../ckptfmt-store/NAME``.
STORE_NAME = "ckptfmt-store"
#: The file that makes a directory demonstrably a ckptfmt store (section 11 of the spec).
STORE_MARKER = "STORE"
#: Names of data files in the store: a 64-bit random token per save and a sequence number.
STORE_FILE_RE = re.compile(r"^pack-[0-9a-f]{16}-[0-9]{5}\.data$")
#: The advisory lock of a run directory (``RUN/.ckptfmt.lock``).
LOCK_NAME = ".ckptfmt.lock"

#: Every tensor starts at a multiple of this many bytes in its data file. 64 covers the
#: alignment of every dtype (at most 16) and of a cache line / AVX-512 load, so a mapped
#: tensor is usable without a copy. Page alignment (4 KiB) would waste up to 4 KiB per
#: tensor (400 MB for a 100,000-tensor checkpoint) and buys nothing: files are mapped whole.
ALIGNMENT = 64

#: Chosen by benchmarks/bench_chunk_size.py: large enough that per-chunk overhead
#: (hashing call, syscall, manifest entry) is negligible, small enough that a slice read
#: fetches little extra and an incremental save rewrites little.
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
MIN_CHUNK_SIZE = 4096
MAX_CHUNK_SIZE = 1 << 30


@dataclass(frozen=True, slots=True)
class Limits:
    """Hard limits a reader enforces before allocating anything.

    A writer refuses to produce a checkpoint that breaks them.
    """

    max_manifest_bytes: int = 1 << 30
    max_rank: int = 64
    max_tensors: int = 1 << 24
    max_chunks: int = 1 << 28
    max_files: int = 1 << 16
    max_name_bytes: int = 4096
    max_tree_depth: int = 128
    max_tree_nodes: int = 1 << 26
    #: Largest tensor, in bytes (2**62: every offset and size fits in a signed 64-bit int).
    max_tensor_bytes: int = 1 << 62
    max_path_bytes: int = 1024


LIMITS = Limits()
