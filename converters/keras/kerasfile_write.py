"""Writing Keras files: a template's layout with new values, atomically.

:func:`write_keras_file` copies every group, dataset and attribute of an open template and
replaces the values asked for (checked for shape, cast to the template's dtype): a
``.keras`` template gives a ``.keras`` archive (its other members copied), an HDF5 one an
HDF5 file of the same layout, so Keras loads the result as it loaded the template.

Part of :mod:`ckptfmt.converters.keras.kerasfile`, which re-exports the public names.
"""

from __future__ import annotations

__all__ = ["write_keras_file", "iter_datasets"]

import io
import os
import zipfile
from collections.abc import Callable, Iterator
from collections.abc import Mapping as AbcMapping
from typing import Any

import numpy as np

from ckptfmt.errors import ConversionError

from ..files import atomic_file
from .kerasfile_h5 import WEIGHTS_MEMBER, KerasFileReader, require_h5py


def write_keras_file(template: KerasFileReader, dst: str | os.PathLike[str], values: AbcMapping[str, np.ndarray] | Callable[[str], np.ndarray | None],
                     *, overwrite: bool = False) -> None:
    """Write a Keras file shaped like ``template`` with new values, atomically.

    Every dataset and attribute of the template is copied; those ``values`` names (HDF5
    paths, as :meth:`KerasFileReader.keys`) get the new value, checked for shape and cast to
    the template's dtype. A ``.keras`` template gives a ``.keras`` (its ``config.json`` and
    ``metadata.json`` copied); an HDF5 template an HDF5 file of the same layout.

    Args:
        template: the open template file.
        dst: where to write (a temporary name beside it, fsync, rename).
        values: ``{h5 path: array}``, or a function returning the array or None (keep).
        overwrite: replace an existing ``dst``.

    Raises:
        CheckpointExistsError: ``dst`` exists and not ``overwrite``.
        ConversionError: a value whose shape is not the template's, or a name not in it.

    Example:
        >>> with KerasFileReader("template.weights.h5") as t:  # doctest: +SKIP
        ...     write_keras_file(t, "new.weights.h5", {"layers/dense/vars/0": kernel})
    """
    from ckptfmt.errors import CheckpointExistsError

    h5py = require_h5py()
    dst = os.fspath(dst)
    if os.path.exists(dst) and not overwrite:
        raise CheckpointExistsError(f"{dst} exists (pass overwrite=True / --overwrite to replace it)")
    get = values if callable(values) else (lambda k, _v=values: _v.get(k))
    if not callable(values):
        unknown = [k for k in values if k not in template._datasets]
        if unknown:
            raise ConversionError(f"{template.path} has no datasets {', '.join(sorted(unknown)[:10])}")
    os.makedirs(os.path.dirname(os.path.abspath(dst)) or ".", exist_ok=True)

    def write(tmp: str) -> None:
        if template.kind == "keras":
            _write_keras_archive(template, tmp, get)
        else:
            with h5py.File(tmp, "w") as out:
                _copy_h5(template, out, get)

    atomic_file(dst, write)  # fsync, rename, directory fsync; no temporary left on failure


def _write_keras_archive(template: KerasFileReader, tmp: str, get: Callable[[str], Any]) -> None:
    """A ``.keras`` archive at ``tmp``: the template's members, its weights member rewritten (stored, as Keras does)."""
    buf = io.BytesIO()
    with require_h5py().File(buf, "w") as out:
        _copy_h5(template, out, get)
    assert template._zip is not None
    with open(tmp, "wb") as f:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as z:
            for info in template._zip.infolist():
                if info.filename == WEIGHTS_MEMBER:
                    z.writestr(info, buf.getvalue())
                else:
                    z.writestr(info, template._zip.read(info.filename))


def _copy_h5(template: KerasFileReader, out: Any, get: Callable[[str], Any]) -> None:
    """Every group, attribute and dataset of ``template`` into the open HDF5 file ``out``, values from ``get`` where it gives one."""
    for k, v in template._groups.get("", {}).items():
        out.attrs[k] = v
    for path in sorted(template._groups, key=lambda p: (p.count("/"), p)):
        if path:
            g = out.require_group(path)
            for k, v in template._groups[path].items():
                g.attrs[k] = v
    for key in template.keys():
        value = get(key)
        ds = template._datasets[key]
        data = np.asarray(template.get(key) if value is None else value)
        if tuple(data.shape) != tuple(ds.shape):
            raise ConversionError(f"{key}: the new value has shape {tuple(data.shape)}, the template {tuple(ds.shape)}")
        if key in template._bf16:
            import ml_dtypes

            data = data.astype(ml_dtypes.bfloat16, copy=False).view(ds.dtype)
        else:
            data = data.astype(ds.dtype, copy=False)
        new = out.create_dataset(key, data=data)
        for k, v in ds.attrs.items():
            new.attrs[k] = v


def iter_datasets(reader: KerasFileReader) -> Iterator[tuple[str, tuple[int, ...], np.dtype]]:
    """``(path, shape, dtype)`` of every dataset, without reading data."""
    for k in reader.keys():
        yield k, reader.shape(k), reader.dtype(k)
