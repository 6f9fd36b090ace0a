"""Content hashes of chunks and manifests.

The algorithm is named in every manifest, so new ones can be added without a new major
version. ``blake3`` is the default: cryptographic and several GB/s per core.

Example:
    >>> from ckptfmt.format.hashing import get_hash
    >>> get_hash("blake3").digest(b"abc").hex()[:16]
    '6437b3ac38465133'
"""

from __future__ import annotations

__all__ = [
    "HashAlgorithm",
    "get_hash",
    "HASH_ALGORITHMS",
    "DEFAULT_HASH",
    "Fingerprint",
    "get_fingerprint",
    "FINGERPRINTS",
    "DEFAULT_FINGERPRINT",
]

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import blake3 as _blake3

from ckptfmt.errors import FormatError

DEFAULT_HASH = "blake3"


@dataclass(frozen=True, slots=True)
class HashAlgorithm:
    """A named hash function over a bytes-like object."""

    name: str
    digest_size: int
    _fn: Callable[[object], bytes]
    #: A new incremental hasher (``update``/``digest``): the same digest, fed in pieces.
    new: Callable[[], Any] | None = None

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
    "blake3": HashAlgorithm("blake3", 32, _blake3_digest, _blake3.blake3),
    "sha256": HashAlgorithm("sha256", 32, _sha256_digest, hashlib.sha256),
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


#: The chunk fingerprint written into a run's store (spec section 10.1).
DEFAULT_FINGERPRINT = "xxh3-128"
#: Fingerprint names and digest sizes; the functions are imported on first use.
FINGERPRINTS: dict[str, int] = {"xxh3-128": 16}


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """A fast, non-cryptographic change detector over a chunk's bytes (spec section 10.1).

    It tells an incremental save which chunks differ from the parent's without hashing
    them with the (slower) chunk hash. It is not an integrity check: chunk hashes are.
    """

    name: str
    digest_size: int
    _fn: Callable[[object], bytes]
    #: A new incremental fingerprinter (``update``/``digest``).
    new: Callable[[], Any]

    def digest(self, data: object) -> bytes:
        """Return the fingerprint of a bytes-like object (no copy is made)."""
        return self._fn(data)


_fingerprints: dict[str, Fingerprint] = {}


def get_fingerprint(name: object) -> Fingerprint | None:
    """The fingerprint function a manifest names, or None when this ckptfmt does not know it.

    An unknown fingerprint is not an error: a reader ignores the column (it only makes
    incremental saves faster), so a future writer may use another function.

    Example:
        >>> get_fingerprint("xxh3-128").digest(b"abc").hex()
        '06b05ab6733a618578af5f94892f3950'
        >>> get_fingerprint("crc7") is None
        True
    """
    if not isinstance(name, str) or name not in FINGERPRINTS:
        return None
    fp = _fingerprints.get(name)
    if fp is None:
        import xxhash  # small C extension; imported here so `import ckptfmt` stays lean

        fp = _fingerprints[name] = Fingerprint(name, FINGERPRINTS[name], xxhash.xxh3_128_digest, xxhash.xxh3_128)
    return fp
