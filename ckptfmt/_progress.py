"""Progress bars for long work: shown on a terminal for large jobs, never in pipes or CI."""

from __future__ import annotations

import os
import sys
from typing import Any

#: Jobs smaller than this finish too quickly for a bar to help.
PROGRESS_MIN_BYTES = 256 * 1024 * 1024


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool | None) -> Any:
    """A bytes progress bar, or a no-op one.

    ``enabled=None`` means: show it when stderr is a terminal, ``CI`` is unset and the job
    is at least PROGRESS_MIN_BYTES.
    """
    if enabled is None:
        enabled = total >= PROGRESS_MIN_BYTES and sys.stderr.isatty() and not os.environ.get("CI")
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False, file=sys.stderr)
