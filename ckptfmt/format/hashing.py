"""Content hashes of chunks and manifests.

The algorithm is named in every manifest, so new ones can be added without a new major
version. ``blake3`` is the default: cryptographic and several GB/s per core.

Example:
    >>> from ckptfmt.format.hashing import get_hash
    >>> get_hash("blake3").digest(b"abc").hex()[:16]
    '6437b3ac38465133'
"""

from __future__ import annotations

__all__ = ["HashAlgorithm", "get_hash", "HASH_ALGORITHMS", "DEFAULT_HASH"]

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import blake3 as _blake3

from ckptfmt.errors import FormatError

DEFAULT_HASH = "blake3"


@dataclass(frozen=True, slots=True)
class HashAlgorithm:
    """A named hash function over a bytes-like object."""

    name: str
    digest_size: int
    _fn: Callable[[object], bytes]

    def digest(self, data: object) -> bytes:
        """Return the digest of a bytes-like object (no copy is made)."""
        return self._fn(data)

    @property
    def function(self) -> Callable[[object], bytes]:
        """``digest`` itself, one call shorter: for loops over many tiny chunks."""
        return self._fn


def _blake3_digest(data: object) -> bytes:
    return _blake3.blake3(data).digest()


def _sha256_digest(data: object) -> bytes:
    return hashlib.sha256(data).digest()


HASH_ALGORITHMS: dict[str, HashAlgorithm] = {
    "blake3": HashAlgorithm("blake3", 32, _blake3_digest),
    "sha256": HashAlgorithm("sha256", 32, _sha256_digest),
}


def get_hash(name: str) -> HashAlgorithm:
    """Look a hash algorithm up by its manifest name.

    Raises:
        FormatError: the algorithm is unknown to this version of ckptfmt.
    """
    try:
        return HASH_ALGORITHMS[name]
    except (KeyError, TypeError):
        raise FormatError(
            f"unknown hash algorithm {name!r}; this ckptfmt knows {', '.join(HASH_ALGORITHMS)}"
        ) from None
