"""The lock of a run directory (``RUN/.ckptfmt.lock``), taken through the Storage interface.

Who holds it how (spec section 11):

* a save that writes into the run's shared store: **shared**, for the whole save;
* gc, remove, retention and a :class:`~ckptfmt.manager.CheckpointManager`: **exclusive**
  (the manager for its whole life, so a second manager, in this process or another, is
  refused);
* readers (load, verify, ``gc --dry-run``, ``compact --to``): never;
* ``remove`` of a lone self-contained checkpoint (no store or lock file beside it): never.

A forked child does not hold its parent's lock (``storage.local`` drops it at fork).

So nothing is deleted from the store while a save may still refer to it, and gc never
needs a grace period for the store.
"""

from __future__ import annotations

__all__ = ["LOCK_NAME", "DEFAULT_LOCK_TIMEOUT", "run_lock"]

from ckptfmt.format.spec import LOCK_NAME
from ckptfmt.storage.base import Storage, StorageLock

#: How long gc, remove and a save wait for a run's lock before raising CheckpointLockedError.
DEFAULT_LOCK_TIMEOUT = 10.0


def run_lock(storage: Storage, directory: str, *, shared: bool = False, timeout: float = 0.0) -> StorageLock:
    """Take the lock of the run directory ``directory`` (see the module docstring)."""
    return storage.lock(storage.join(directory, LOCK_NAME), shared=shared, timeout=timeout)
