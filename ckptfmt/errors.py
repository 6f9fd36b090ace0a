"""The ckptfmt exception hierarchy.

Every error ckptfmt raises derives from :class:`CkptFmtError` and also from the builtin
exception a caller would naturally catch, so ``except ValueError`` or
``except FileNotFoundError`` keep working for code that does not know about ckptfmt.

Messages say what is wrong, where (file, tensor, chunk, byte offset) and what to do.

Example:
    >>> import ckptfmt
    >>> try:
    ...     ckptfmt.load("/no/such/checkpoint")
    ... except ckptfmt.CheckpointNotFoundError as e:
    ...     print(type(e).__name__)
    CheckpointNotFoundError
"""

from __future__ import annotations

__all__ = [
    "CkptFmtError",
    "FormatError",
    "IntegrityError",
    "UnsupportedVersionError",
    "LimitExceededError",
    "UnsupportedDtypeError",
    "CheckpointNotFoundError",
    "CheckpointExistsError",
    "CheckpointLockedError",
    "TensorNotFoundError",
    "UnsafePathError",
    "StorageError",
    "UnsupportedURLError",
    "FrameworkNotAvailableError",
    "ConversionError",
    "UnmappedKeyError",
    "CheckFailedError",
]


class CkptFmtError(Exception):
    """Base class of every error raised by ckptfmt."""


class FormatError(CkptFmtError, ValueError):
    """A file is not valid: bad magic, a malformed manifest, an impossible offset."""


class IntegrityError(FormatError):
    """Data does not match its recorded hash, size or checksum."""


class UnsupportedVersionError(FormatError):
    """The file was written by a format version this reader does not understand."""


class LimitExceededError(FormatError):
    """A value exceeds one of the limits of the specification (rank, count, size)."""


class UnsupportedDtypeError(CkptFmtError, TypeError):
    """A value's dtype (or type) cannot be stored."""


class CheckpointNotFoundError(CkptFmtError, FileNotFoundError):
    """No complete checkpoint exists at the given path."""


class CheckpointExistsError(CkptFmtError, FileExistsError):
    """A checkpoint already exists where a new one was to be written."""


class CheckpointLockedError(CkptFmtError, BlockingIOError):
    """Another process (or manager) is writing to the same checkpoint directory."""


class UnsafePathError(CkptFmtError, ValueError):
    """ckptfmt refuses to delete or write through this path (a symbolic link, a foreign directory)."""


class TensorNotFoundError(CkptFmtError, KeyError):
    """A tensor name is not in the checkpoint."""

    def __str__(self) -> str:
        # KeyError's str() wraps the message in quotes; keep ours readable.
        return str(self.args[0]) if self.args else ""


class StorageError(CkptFmtError, OSError):
    """Reading or writing bytes failed (disk full, permission denied, I/O error)."""


class UnsupportedURLError(CkptFmtError, ValueError):
    """A URL whose scheme no storage backend handles (or a verb that does not take URLs)."""


class FrameworkNotAvailableError(CkptFmtError, ImportError):
    """An optional framework (torch, tensorflow, onnx) is needed but not installed."""

    def __init__(self, framework: str, extra: str | None = None, *, feature: str = "") -> None:
        extra = extra or framework
        what = f" for {feature}" if feature else ""
        super().__init__(
            f"{framework} is required{what} but is not installed; "
            f"install it with: pip install 'ckptfmt[{extra}]'"
        )
        self.framework = framework
        self.extra = extra


class ConversionError(CkptFmtError, ValueError):
    """A conversion between frameworks or formats cannot be carried out."""


class UnmappedKeyError(ConversionError):
    """Source or target keys have no mapping rule."""


class CheckFailedError(ConversionError):
    """A converted model computes something else than the original (``--check``)."""
