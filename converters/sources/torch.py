"""Files written by ``torch.save``, read safely: ``weights_only=True``, always.

``torch.load`` is never called without ``weights_only=True``: only tensors and plain
containers are rebuilt, so a file from an untrusted source cannot run code. Nested
containers (``{"model": state_dict, "optimizer": {...}}``) are flattened into
``/``-joined names as ckptfmt names them; non-tensor leaves (``"epoch": 3``) become the
source's metadata.

torch.load does not check the CRC-32 that the zip archive records for every member, so a
flipped bit inside tensor data loads silently; :meth:`TorchSource.verify` checks those
CRCs itself and traces a corrupted member back to the tensors stored in it.

Example:
    >>> from ckptfmt.converters.sources.torch import TorchSource
    >>> with TorchSource("pytorch_model.bin") as src:  # doctest: +SKIP
    ...     src.info("embed.weight")
"""

from __future__ import annotations

__all__ = ["TORCH_SUFFIXES", "TorchSource", "write_torch"]

import os
import pickle
import time
import zipfile
from typing import Any

import numpy as np

from ckptfmt.api import Problem, VerifyReport
from ckptfmt.errors import CheckpointNotFoundError, FormatError, FrameworkNotAvailableError, TensorNotFoundError
from ckptfmt.format.tree import PLAIN_TYPES

from .base import Source, TensorInfo, first_line, make_report

#: File suffixes of torch.save files.
TORCH_SUFFIXES = (".pt", ".pth", ".bin")

_ZIP_MAGIC = b"PK\x03\x04"
_READ_BLOCK = 4 << 20


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise FrameworkNotAvailableError("torch", "torch", feature="reading and writing .pt/.pth/.bin files") from None
    return torch


def _load(path: str, *, mmap: bool) -> Any:
    """``torch.load`` with ``weights_only=True`` (never without it)."""
    torch = _torch()
    return torch.load(path, weights_only=True, map_location="cpu", mmap=mmap)


def _flatten(obj: Any, torch: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors by name, plain leaves by name) of a loaded object.

    Keys are joined with ``/`` as they are, not escaped: a flat state dict's keys (which may
    hold ``/`` already, as safetensors keys do) are the tensor names.
    """
    tensors: dict[str, Any] = {}
    plain: dict[str, Any] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, torch.Tensor):
            tensors[path or "tensor"] = node
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}/{k}" if path else str(k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{path}/{i}" if path else str(i))
        else:
            plain[path or "value"] = node if isinstance(node, PLAIN_TYPES) else repr(node)

    walk(obj, "")
    return tensors, plain


def _load_error(path: str, e: BaseException) -> FormatError:
    if isinstance(e, pickle.UnpicklingError):
        return FormatError(
            f"{path}: refused by weights-only loading: the file holds objects other than tensors and "
            f"plain containers, and ckptfmt never unpickles arbitrary objects ({first_line(e)})"
        )
    return FormatError(f"{path}: not a readable torch file: {first_line(e)}")


class TorchSource(Source):
    """A ``torch.save`` file, memory-mapped when it is a zip archive (torch >= 1.6 format)."""

    kind = "torch"

    def __init__(self, path: str) -> None:
        super().__init__(path)
        torch = _torch()
        if not os.path.isfile(path):
            raise CheckpointNotFoundError(f"no torch file at {path}")
        try:
            try:
                obj = _load(path, mmap=True)
            except pickle.UnpicklingError:
                raise
            except Exception:  # legacy (non-zip) files cannot be memory-mapped
                obj = _load(path, mmap=False)
        except Exception as e:
            raise _load_error(path, e) from e
        self._tensors, self._plain = _flatten(obj, torch)
        self._version = _archive_version(path)

    @classmethod
    def claims(cls, path: str) -> bool:
        """A file named ``.pt``, ``.pth`` or ``.bin``."""
        return os.path.isfile(path) and path.lower().endswith(TORCH_SUFFIXES)

    @classmethod
    def sniff(cls, head: bytes) -> bool:
        """A zip archive (torch >= 1.6) or a legacy pickle."""
        return head[:4] == _ZIP_MAGIC or head[:1] == b"\x80"

    def keys(self) -> list[str]:
        return list(self._tensors)

    def _tensor(self, name: str) -> Any:
        try:
            return self._tensors[name]
        except KeyError:
            raise TensorNotFoundError(f"no tensor {name!r} in {self.path}") from None

    def info(self, name: str) -> TensorInfo:
        t = self._tensor(name)
        return TensorInfo(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), t.numel() * t.element_size())

    def get(self, name: str) -> np.ndarray:
        from ckptfmt.adapters.torch import tensor_to_numpy

        return tensor_to_numpy(self._tensor(name), name)

    @property
    def metadata(self) -> dict[str, Any] | None:
        return dict(self._plain) or None

    @property
    def version(self) -> str | None:
        return self._version

    def close(self) -> None:
        self._tensors.clear()

    @classmethod
    def verify(cls, path: str, *, progress: bool | None = None) -> VerifyReport:
        from ckptfmt._progress import progress_bar

        t0 = time.perf_counter()
        torch = _torch()
        if not os.path.isfile(path):
            raise CheckpointNotFoundError(f"no torch file at {path}")
        problems: list[Problem] = []
        with open(path, "rb") as f:
            is_zip = f.read(4) == _ZIP_MAGIC
        checked = nbytes = 0
        bad_members: list[tuple[zipfile.ZipInfo, int]] = []
        if is_zip:
            try:
                zf = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                problems.append(Problem("truncated_file", f"{path}: the zip archive cannot be opened ({first_line(e)}); the file is truncated or damaged", file=path))
                return make_report(path, problems, t0)
            with zf, open(path, "rb") as raw:
                infos = zf.infolist()
                bar = progress_bar(sum(i.file_size for i in infos), f"verifying {path}", progress)
                for info in infos:
                    off = _data_offset(raw, info)
                    try:
                        with zf.open(info) as member:
                            while member.read(_READ_BLOCK):
                                pass
                    except zipfile.BadZipFile as e:
                        kind = "hash_mismatch" if "CRC" in str(e) else "unreadable"
                        bad_members.append((info, off))
                        problems.append(Problem(kind, f"{path}: archive member {info.filename} (bytes {off}..{off + info.compress_size}) fails its CRC-32 check; the file is corrupted", file=path, offset=off))
                    except (OSError, EOFError, ValueError) as e:
                        problems.append(Problem("truncated_file", f"{path}: archive member {info.filename} at byte {off} cannot be read ({first_line(e)})", file=path, offset=off))
                    checked += 1
                    nbytes += info.file_size
                    bar.update(info.file_size)
                bar.close()
            if any(p.kind != "hash_mismatch" for p in problems):
                return make_report(path, problems, t0, checked=checked, nbytes=nbytes)
        try:
            obj = _load(path, mmap=False)
        except Exception as e:
            problems.append(Problem("unreadable", str(_load_error(path, e)), file=path))
            return make_report(path, problems, t0, checked=checked, nbytes=nbytes)
        tensors, _ = _flatten(obj, torch)
        if bad_members:
            problems = _name_tensors(path, problems, bad_members, tensors, torch)
        if not is_zip:
            checked, nbytes = len(tensors), sum(t.numel() * t.element_size() for t in tensors.values())
        return make_report(path, problems, t0, tensors=len(tensors), checked=checked, nbytes=nbytes, version=_archive_version(path))


def _data_offset(raw: Any, info: zipfile.ZipInfo) -> int:
    """Where a member's data starts: after its local header (30 bytes + name + extra)."""
    raw.seek(info.header_offset + 26)
    head = raw.read(4)
    if len(head) < 4:
        return info.header_offset
    return info.header_offset + 30 + int.from_bytes(head[:2], "little") + int.from_bytes(head[2:], "little")


def _name_tensors(path: str, problems: list[Problem], bad: list[tuple[zipfile.ZipInfo, int]], tensors: dict[str, Any], torch: Any) -> list[Problem]:
    """Attach tensor names to CRC problems: the loaded storage holds the member's (bad) bytes."""
    by_storage: dict[int, tuple[Any, list[str]]] = {}
    for name, t in tensors.items():
        s = t.untyped_storage()
        by_storage.setdefault(s.data_ptr(), (s, []))[1].append(name)
    out = list(problems)
    with open(path, "rb") as raw:
        for info, off in bad:
            raw.seek(off)
            data = np.frombuffer(raw.read(info.file_size), np.uint8)
            names = []
            for s, ns in by_storage.values():
                if s.nbytes() == data.size and np.array_equal(torch.empty(0, dtype=torch.uint8).set_(s).numpy(), data):
                    names.extend(ns)
            if names:
                i = next(i for i, p in enumerate(out) if p.offset == off and p.tensor is None)
                p = out[i]
                label = ", ".join(repr(n) for n in names)
                out[i] = Problem(p.kind, f"tensor {label}: {p.message}", p.severity, p.file, ", ".join(names), p.chunk, p.offset)
    return out


def _archive_version(path: str) -> str | None:
    """The serialization version a zip-format torch file records (``archive/version``)."""
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                if name.endswith("/version") and name.count("/") == 1:
                    return "zip v" + zf.read(name).decode("ascii", "replace").strip()
    except (zipfile.BadZipFile, OSError, EOFError):
        return "legacy"
    return None


def write_torch(path: str, tensors: dict[str, np.ndarray]) -> None:
    """``torch.save`` a flat ``{name: tensor}`` dict of the given arrays.

    Example:
        >>> import numpy as np
        >>> write_torch("/tmp/doc.pt", {"w": np.ones(2, np.float32)})  # doctest: +SKIP
    """
    torch = _torch()
    from ckptfmt.adapters.torch import numpy_to_tensor

    torch.save({name: numpy_to_tensor(np.asarray(a)) for name, a in tensors.items()}, path)
