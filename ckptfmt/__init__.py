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

from ckptfmt.api import CheckpointReader, Problem, VerifyReport, load, open, save, verify
from ckptfmt._gc import GcReport, RunInfo, compact, gc, remove, run_info
from ckptfmt.manager import CheckpointManager
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
    UnsupportedURLError,
    TensorNotFoundError,
    UnmappedKeyError,
    UnsafePathError,
    UnsupportedDtypeError,
    UnsupportedVersionError,
)
from ckptfmt.format.spec import FORMAT_VERSION

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
