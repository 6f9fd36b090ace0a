"""ckptfmt: save, verify, diff and move training checkpoints between TensorFlow and PyTorch.

The core (this package) needs only numpy; torch, tensorflow and onnx are optional and are
imported only by the modules that need them (``ckptfmt.torch``, ``ckptfmt.tensorflow``,
``ckptfmt.converters``).

Example:
    >>> import numpy as np, ckptfmt, tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> _ = ckptfmt.save({"w": np.ones((2, 3), np.float32), "step": 7}, os.path.join(d, "ck"))
    >>> ckptfmt.load(os.path.join(d, "ck"))["step"]
    7
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ckptfmt.errors import (
    CheckpointExistsError,
    CheckpointLockedError,
    CheckpointNotFoundError,
    CkptFmtError,
    ConversionError,
    FormatError,
    FrameworkNotAvailableError,
    IntegrityError,
    LimitExceededError,
    StorageError,
    TensorNotFoundError,
    UnmappedKeyError,
    UnsafePathError,
    UnsupportedDtypeError,
    UnsupportedURLError,
    UnsupportedVersionError,
)
from ckptfmt.format.spec import FORMAT_VERSION

if TYPE_CHECKING:
    from ckptfmt._gc import GcReport, RunInfo, compact, gc, remove, run_info
    from ckptfmt.api import CheckpointReader, Problem, VerifyReport, load, open, save, verify
    from ckptfmt.manager import CheckpointManager

# The functions are imported on first use (PEP 562): `import ckptfmt` and a command's
# --help then cost no numpy import, only the commands that read or write do.
_LAZY = {
    **dict.fromkeys(("save", "load", "open", "verify", "CheckpointReader", "Problem", "VerifyReport"), "ckptfmt.api"),
    **dict.fromkeys(("gc", "remove", "compact", "run_info", "GcReport", "RunInfo"), "ckptfmt._gc"),
    "CheckpointManager": "ckptfmt.manager",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ckptfmt' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

__version__ = "0.1.0"

__all__ = [
    "save",
    "load",
    "open",
    "verify",
    "gc",
    "remove",
    "compact",
    "run_info",
    "GcReport",
    "RunInfo",
    "CheckpointManager",
    "CheckpointLockedError",
    "CheckpointReader",
    "VerifyReport",
    "Problem",
    "FORMAT_VERSION",
    "CkptFmtError",
    "FormatError",
    "IntegrityError",
    "UnsupportedVersionError",
    "LimitExceededError",
    "UnsupportedDtypeError",
    "CheckpointNotFoundError",
    "CheckpointExistsError",
    "TensorNotFoundError",
    "UnsafePathError",
    "StorageError",
    "UnsupportedURLError",
    "FrameworkNotAvailableError",
    "ConversionError",
    "UnmappedKeyError",
]
