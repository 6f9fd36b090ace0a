"""Optional frameworks (torch, onnx), imported only when first needed: the one guard.

Example:
    >>> require("json", "parsing").__name__
    'json'
"""

from __future__ import annotations

__all__ = ["require"]

import importlib
from typing import Any

from ckptfmt.errors import FrameworkNotAvailableError


def require(module: str, feature: str, *, extra: str | None = None) -> Any:
    """Import an optional framework (``torch``, ``onnx``) or say which extra installs it.

    Raises:
        FrameworkNotAvailableError: it is not installed; the message names ``feature`` and
            the extra (``pip install 'ckptfmt[torch]'``).

    Example:
        >>> require("no_such_framework", "testing")
        Traceback (most recent call last):
        ckptfmt.errors.FrameworkNotAvailableError: no_such_framework is required for testing but is not installed; install it with: pip install 'ckptfmt[no_such_framework]'
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise FrameworkNotAvailableError(module, extra or module, feature=feature) from e
