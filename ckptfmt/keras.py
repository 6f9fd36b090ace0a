"""A Keras 3 callback that checkpoints a training run through :class:`~ckptfmt.manager.CheckpointManager`.

Keras's own ``ModelCheckpoint`` rewrites one file in place: a run killed while it writes
leaves a truncated ``.keras``/``.weights.h5`` and no previous one. :class:`CheckpointCallback`
writes each checkpoint to a new ``step-N`` directory and commits it atomically (its MANIFEST
appears last), incrementally (only changed chunks) and, by default, in a background thread;
it keeps the newest few, and on the next ``fit`` it restores the newest *complete* one. When
asked, it also exports the run as a ``.keras`` or ``.weights.h5`` file (written by Keras to a
temporary name, then renamed) for the rest of the Keras world.

The step is the optimizer's iteration count, which the checkpoint holds, so a resumed run
counts on. A checkpoint taken mid-epoch restores weights and optimizer exactly, but ``fit``
restarts that epoch's data from its beginning (Keras does not save a dataset's position);
:meth:`CheckpointCallback.initial_epoch` tells ``fit`` which epoch to start from.

Importing this module without Keras 3 (or TensorFlow, whose adapter reads the variables)
raises :class:`~ckptfmt.errors.FrameworkNotAvailableError` naming the extra to install.

Example:
    >>> from ckptfmt.keras import CheckpointCallback  # doctest: +SKIP
    >>> cb = CheckpointCallback("runs/a", save_every_steps=100, max_to_keep=3, export="runs/a/model.keras")  # doctest: +SKIP
    >>> model.fit(data, epochs=10, initial_epoch=cb.initial_epoch(model), callbacks=[cb])  # doctest: +SKIP
"""

from __future__ import annotations

__all__ = ["CheckpointCallback", "export"]

import os
from typing import Any

from ckptfmt.errors import FrameworkNotAvailableError

try:
    import keras as _keras
except ImportError as e:  # pragma: no cover - exercised only without keras
    raise FrameworkNotAvailableError("keras", "tensorflow", feature="ckptfmt.keras.CheckpointCallback") from e

# Imported second: raises FrameworkNotAvailableError("tensorflow", ...) when missing.
from ckptfmt.adapters import tensorflow as _adapter
from ckptfmt.manager import CheckpointManager


def _step(model: Any) -> int:
    opt = getattr(model, "optimizer", None)
    if opt is None or not getattr(opt, "built", False):
        return 0
    return int(_keras.ops.convert_to_numpy(opt.iterations))


def export(model: Any, path: str | os.PathLike[str]) -> str:
    """Write ``model`` as a ``.keras`` (model, config, optimizer) or ``.weights.h5`` file, atomically.

    Keras writes it to a temporary name beside ``path`` (fsync'd), which then replaces ``path``:
    a run killed meanwhile leaves the previous file whole.

    Raises:
        ValueError: ``path`` ends in neither ``.keras`` nor ``.weights.h5``.

    Example:
        >>> export(model, "runs/a/model.keras")  # doctest: +SKIP
        'runs/a/model.keras'
    """
    path = os.fspath(path)
    for suffix in (".keras", ".weights.h5"):
        if path.endswith(suffix):
            break
    else:
        raise ValueError(f"{path}: an export is a .keras or .weights.h5 file")
    tmp = f"{path[: -len(suffix)]}.tmp-{os.getpid()}{suffix}"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        if suffix == ".keras":
            model.save(tmp)
        else:
            model.save_weights(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


class CheckpointCallback(_keras.callbacks.Callback):
    """Checkpoint a Keras 3 ``fit`` into a :class:`~ckptfmt.manager.CheckpointManager` directory.

    Args:
        directory: the run's checkpoint directory (``step-N`` checkpoints; see
            :class:`~ckptfmt.manager.CheckpointManager`).
        save_every_steps: save when the optimizer's iteration count is a multiple of this.
        save_every_seconds: save when this long has passed since the last save.
        save_on_epoch_end: also save at the end of every epoch (the default when neither
            trigger above is given). The state at the end of ``fit`` is always saved.
        max_to_keep / keep_every_n_steps / incremental / async_save: as for
            :class:`~ckptfmt.manager.CheckpointManager` (async by default: ``fit`` waits only
            for a copy of the state to host memory).
        restore: restore the newest complete checkpoint when training begins (unless
            :meth:`restore` was already called).
        export: a ``.keras`` or ``.weights.h5`` path written (atomically) when training ends.

    Example:
        >>> cb = CheckpointCallback("runs/a", save_every_steps=50)  # doctest: +SKIP
        >>> model.fit(x, y, epochs=3, initial_epoch=cb.initial_epoch(model), callbacks=[cb])  # doctest: +SKIP
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        save_every_steps: int | None = None,
        save_every_seconds: float | None = None,
        save_on_epoch_end: bool | None = None,
        max_to_keep: int | None = 3,
        keep_every_n_steps: int | None = None,
        incremental: bool = True,
        async_save: bool = True,
        restore: bool = True,
        export: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        if save_every_steps is not None and save_every_steps < 1:
            raise ValueError("save_every_steps must be at least 1")
        self.directory = os.fspath(directory)
        self.save_every_steps = save_every_steps
        self.save_every_seconds = save_every_seconds
        self.save_on_epoch_end = (save_every_steps is None and save_every_seconds is None) if save_on_epoch_end is None else save_on_epoch_end
        self._manager_args = dict(max_to_keep=max_to_keep, keep_every_n_steps=keep_every_n_steps, incremental=incremental,
                                  async_save=async_save, save_interval_steps=save_every_steps,
                                  save_interval_seconds=save_every_seconds)
        self.manager: CheckpointManager | None = None
        self.restore_on_start = restore
        self.export_path = os.fspath(export) if export is not None else None
        self.restored_step: int | None = None
        self._epoch = 0
        self._epoch_finished = False
        self._restored = False

    # -- the manager ----------------------------------------------------------------
    def _mgr(self) -> CheckpointManager:
        if self.manager is None:
            self.manager = CheckpointManager(self.directory, **self._manager_args)
        return self.manager

    def restore(self, model: Any) -> int | None:
        """Load the newest complete checkpoint into ``model`` (weights and optimizer); its step, or None.

        Example:
            >>> cb.restore(model)  # doctest: +SKIP
            1200
        """
        self._restored = True
        mgr = self._mgr()
        step = mgr.latest_step()
        if step is None:
            return None
        _adapter.from_state(mgr.restore(step), model)
        meta = mgr.metadata(step) or {}
        if isinstance(meta, dict):  # an epoch that was finished is not run again
            self._epoch = int(meta.get("epoch", 0)) + (1 if meta.get("epoch_done") else 0)
        self.restored_step = step
        return step

    def initial_epoch(self, model: Any) -> int:
        """Restore (once) and return the epoch ``fit`` should start at: the one the checkpoint was taken in,
        or the next one for a checkpoint taken at an epoch's end."""
        if not self._restored:
            self.restore(model)
        return self._epoch

    def _save(self, *, force: bool = False, epoch_done: bool = False) -> bool:
        step = _step(self.model)
        mgr = self._mgr()
        if not force and not mgr.should_save(step):
            return False
        latest = mgr.latest_step()
        if latest is not None and step <= latest:
            return False
        meta = {"epoch": self._epoch, "epoch_done": epoch_done, "step": step}
        return mgr.save(step, _adapter.to_state(self.model), metadata=meta, force=True)

    # -- Keras hooks ----------------------------------------------------------------
    def on_train_begin(self, logs: Any = None) -> None:
        if self.restore_on_start and not self._restored:
            self.restore(self.model)

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._epoch = epoch
        self._epoch_finished = False

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if self.save_every_steps is None and self.save_every_seconds is None:
            return
        steps = (self.params or {}).get("steps")
        last = steps is not None and batch + 1 == steps
        if last and self.save_on_epoch_end:
            return  # saved at the epoch's end, recorded as finished
        self._save(epoch_done=last)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self._epoch = epoch
        self._epoch_finished = True
        if self.save_on_epoch_end:
            self._save(force=True, epoch_done=True)

    def on_train_end(self, logs: Any = None) -> None:
        # the run's last state is always kept, whatever the triggers
        if self.model is not None and getattr(self.model, "optimizer", None) is not None:
            self._save(force=True, epoch_done=self._epoch_finished)
        if self.manager is not None:
            self.manager.wait()
        if self.export_path:
            export(self.model, self.export_path)

    def close(self) -> None:
        """Finish pending saves and release the directory's lock."""
        if self.manager is not None:
            self.manager.close()
            self.manager = None
