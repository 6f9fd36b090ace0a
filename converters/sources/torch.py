"""Files written by ``torch.save``, read safely: ``weights_only=True``, always.

``torch.load`` is never called without ``weights_only=True``: only tensors and plain
containers are rebuilt, so a file from an untrusted source cannot run code. Nested
containers (``{"model": state_dict, "optimizer": {...}}``) are flattened into
``/``-joined names as ckptfmt names them; non-tensor leaves (``"epoch": 3``) become the
source's metadata.

torch.load does not check the CRC-32 that the zip archive records for every member, so a
flipped bit inside tensor data loads silently. :class:`TorchSource` checks every member's
CRC-32 before it returns the first tensor (so a convert never re-hashes corrupted bytes as
good ones), and :meth:`TorchSource.verify` traces a corrupted member back to its tensors.

Example:
    >>> from ckptfmt.converters.sources.torch import TorchSource
    >>> with TorchSource("pytorch_model.bin") as src:  # doctest: +SKIP
    ...     src.info("embed.weight")
"""

from __future__ import annotations

__all__ = ["TORCH_SUFFIXES", "TorchSource", "write_torch", "save_to"]

import io
import os
import pickle
import re
import time
import zipfile
from typing import Any

import numpy as np

from ckptfmt.api import Problem, VerifyReport
from ckptfmt.errors import CheckpointNotFoundError, FormatError, IntegrityError, TensorNotFoundError
from ckptfmt.format.tree import PLAIN_TYPES

from ..optional import require
from .base import Source, TensorInfo, first_line, make_report

#: File suffixes of torch.save files.
TORCH_SUFFIXES = (".pt", ".pth", ".bin")

_ZIP_MAGIC = b"PK\x03\x04"
_READ_BLOCK = 4 << 20


def _torch() -> Any:
    return require("torch", "reading and writing .pt/.pth/.bin files")


def _load(path: str, *, mmap: bool) -> Any:
    """The one safe loader (``weights_only=True``, never without it): :func:`ckptfmt.torch.load_torch_file`."""
    _torch()  # FrameworkNotAvailableError naming the extra
    from ckptfmt.torch import load_torch_file

    try:
        return load_torch_file(path, mmap=mmap)
    except FormatError as e:  # say the real cause (a disallowed global, a damaged pickle), never "weights_only=False"
        raise (_load_error(path, e.__cause__) if e.__cause__ is not None else e) from e.__cause__


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


_SAFETENSORS_HINT = "it is a safetensors file: rename it to .safetensors"


def file_layout(path: str) -> str | None:
    """What a would-be torch file is, from its first bytes: ``"zip"``, ``"pickle"`` or None.

    None means it is neither of the two layouts ``torch.save`` writes; :func:`not_torch_reason`
    says what it looks like instead.
    """
    with open(path, "rb") as f:
        head = f.read(4)
    if head == _ZIP_MAGIC:
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # PROTO opcode, protocol 2..5
        return "pickle"
    return None


def not_torch_reason(path: str) -> str:
    """Why ``path`` is not a torch file, naming what it seems to be when that is clear."""
    with open(path, "rb") as f:
        head = f.read(16)
    size = os.path.getsize(path)
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
        what = _SAFETENSORS_HINT
    elif not head:
        what = "it is empty"
    else:
        what = f"it starts with {head[:8]!r}"
    return (
        f"{path}: not a torch file: torch.save writes a zip archive (PK\\x03\\x04) or a pickle "
        f"(\\x80 protocol 2-5), and {what}"
    )


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_OPERAND = re.compile(r"Unsupported operand (\d+)")


def _load_error(path: str, e: BaseException) -> FormatError:
    """Our error for a failed weights-only load: the real cause, and never "weights_only=False"."""
    text = str(e)
    m = _GLOBAL.search(text)
    if m:
        return FormatError(
            f"{path}: the file's pickle calls {m.group(1)}, which is not a tensor or a plain container; "
            "ckptfmt never runs code from a checkpoint. If the file is yours, re-save only the tensors "
            "(torch.save(model.state_dict(), ...)) or export a .safetensors file"
        )
    m = _OPERAND.search(text)
    if m or isinstance(e, (KeyError, EOFError, UnicodeDecodeError)):
        what = f"an invalid pickle opcode ({int(m.group(1))})" if m else f"a malformed pickle ({type(e).__name__})"
        return FormatError(f"{path}: damaged torch file: its data.pkl holds {what}; restore the file from a good copy")
    if isinstance(e, pickle.UnpicklingError):
        first = next((line.strip() for line in text.splitlines()[1:] if line.strip() and "weights_only" not in line
                      and "Re-running" not in line and "file an issue" not in line and "documentation" not in line), "")
        cause = f" ({first})" if first else ""
        return FormatError(
            f"{path}: refused by weights-only loading: the file holds objects other than tensors and plain "
            f"containers{cause}; ckptfmt never unpickles arbitrary objects. Re-save only the tensors "
            "(torch.save(model.state_dict(), ...)) or export a .safetensors file"
        )
    return FormatError(f"{path}: not a readable torch file: {first_line(e)}")


def view_problems(path: str, tensors: dict[str, Any]) -> list[tuple[str, str]]:
    """``(name, message)`` of tensors that declare more bytes than the storage behind them holds.

    A stride-0 (``expand``ed) or otherwise overlapping view of a 4-element storage can declare
    4 TiB; reading it would allocate that much. Such tensors are refused, checked from their
    sizes and strides before anything is allocated.
    """
    out = []
    for name, t in tensors.items():
        declared = t.numel() * t.element_size()
        backing = t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()
        if declared > max(backing, 0):
            out.append((name, (
                f"{path}: tensor {name!r} is an expanded or overlapping view (shape {list(t.shape)}, strides "
                f"{list(t.stride())}): it declares {declared} bytes but only {backing} bytes of storage back it; "
                "ckptfmt does not materialise it. Save a real tensor instead (x.contiguous() or x.clone())"
            )))
    return out


class TorchSource(Source):
    """A ``torch.save`` file, memory-mapped when it is a zip archive (torch >= 1.6 format)."""

    kind = "torch"

    def __init__(self, path: str) -> None:
        super().__init__(path)
        torch = _torch()
        if not os.path.isfile(path):
            raise CheckpointNotFoundError(f"no torch file at {path}")
        if file_layout(path) is None:
            raise FormatError(not_torch_reason(path))
        obj = _load(path, mmap=True)  # FormatError naming the file and the real cause
        self._tensors, self._plain = _flatten(obj, torch)
        bad = view_problems(path, self._tensors)
        if bad:
            raise FormatError(bad[0][1] + (f" ({len(bad) - 1} more such tensors)" if len(bad) > 1 else ""))
        self._version = _archive_version(path)
        self._crc_checked = file_layout(path) != "zip"  # a legacy pickle has no checksums

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

        t = self._tensor(name)
        if not self._crc_checked:  # once, on the first data read: keys() and info() stay cheap
            check_zip_crcs(self.path)
            self._crc_checked = True
        return tensor_to_numpy(t, name)

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
        t0 = time.perf_counter()
        torch = _torch()
        if not os.path.isfile(path):
            raise CheckpointNotFoundError(f"no torch file at {path}")
        problems: list[Problem] = []
        layout = file_layout(path)
        if layout is None:
            problems.append(Problem("unreadable", not_torch_reason(path), file=path, offset=0))
            return make_report(path, problems, t0, readable=False)
        is_zip = layout == "zip"
        checked = nbytes = 0
        bad_members: list[tuple[zipfile.ZipInfo, int]] = []
        if is_zip:
            scanned = _check_members(path, problems, progress)
            if scanned is None:
                return make_report(path, problems, t0)
            checked, nbytes, bad_members = scanned
            if any(p.kind != "hash_mismatch" for p in problems):
                return make_report(path, problems, t0, checked=checked, nbytes=nbytes)
        try:
            obj = _load(path, mmap=False)
            tensors, _ = _flatten(obj, torch)
        except Exception as e:  # noqa: BLE001 - torch.load on untrusted bytes raises anything
            problems.append(Problem("unreadable", str(e if isinstance(e, FormatError) else _load_error(path, e)), file=path))
            return make_report(path, problems, t0, checked=checked, nbytes=nbytes)
        if bad_members:
            problems = _name_tensors(path, problems, bad_members, tensors, torch)
        for name, message in view_problems(path, tensors):
            problems.append(Problem("expanded_view", message, file=path, tensor=name))
        if not is_zip:
            checked, nbytes = len(tensors), sum(min(t.numel() * t.element_size(), t.untyped_storage().nbytes()) for t in tensors.values())
        return make_report(path, problems, t0, tensors=len(tensors), checked=checked, nbytes=nbytes,
                            version=_archive_version(path), coverage="full" if is_zip else "structure")


def _check_members(path: str, problems: list[Problem], progress: bool | None) -> tuple[int, int, list[tuple[zipfile.ZipInfo, int]]] | None:
    """Read every member of a zip-format torch file, checking its CRC-32; problems are collected.

    Returns:
        ``(members checked, bytes, [(member, data offset)] failing their CRC-32)``, or None
        when the archive cannot be opened at all (its problem is collected).
    """
    from ckptfmt._progress import progress_bar

    # zipfile parses untrusted bytes: besides BadZipFile it raises NotImplementedError,
    # UnicodeDecodeError, OSError (negative seeks), ValueError... all mean "damaged".
    try:
        zf = zipfile.ZipFile(path)
    except Exception as e:  # noqa: BLE001 - see above
        problems.append(Problem("truncated_file", f"{path}: the zip archive cannot be opened ({type(e).__name__}: {first_line(e)}); the file is truncated or damaged", file=path))
        return None
    checked = nbytes = 0
    bad_members: list[tuple[zipfile.ZipInfo, int]] = []
    size = os.path.getsize(path)
    with zf, open(path, "rb") as raw:
        infos = zf.infolist()
        bar = progress_bar(sum(max(0, i.file_size) for i in infos), f"verifying {path}", progress)
        for info in infos:
            off = _data_offset(raw, info, size)
            if off is None:
                problems.append(Problem("unreadable", f"{path}: archive member {info.filename!r} has its header at byte {info.header_offset}, outside the {size}-byte file; the archive directory is damaged", file=path))
                continue
            try:
                with zf.open(info) as member:
                    while member.read(_READ_BLOCK):
                        pass
            except zipfile.BadZipFile as e:
                kind = "hash_mismatch" if "CRC" in str(e) else "unreadable"
                bad_members.append((info, off))
                problems.append(Problem(kind, f"{path}: archive member {info.filename} (bytes {off}..{off + info.compress_size}) fails its CRC-32 check; the file is corrupted", file=path, offset=off))
            except (OSError, EOFError) as e:
                problems.append(Problem("truncated_file", f"{path}: archive member {info.filename} at byte {off} cannot be read ({first_line(e)})", file=path, offset=off))
            except Exception as e:  # noqa: BLE001 - zipfile on damaged bytes, as above
                problems.append(Problem("unreadable", f"{path}: archive member {info.filename!r} at byte {off} cannot be read ({type(e).__name__}: {first_line(e)}); the file is damaged", file=path, offset=off))
            checked += 1
            nbytes += max(0, info.file_size)
            bar.update(max(0, info.file_size))
        bar.close()
    return checked, nbytes, bad_members


def check_zip_crcs(path: str) -> None:
    """Check the CRC-32 of every member of a zip-format torch file, reading it once.

    Raises:
        IntegrityError: a member's data does not match its recorded CRC-32 (names the member).
        FormatError: the archive cannot be read.

    Example:
        >>> check_zip_crcs("pytorch_model.bin")  # doctest: +SKIP
    """
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                try:
                    with zf.open(info) as member:
                        while member.read(_READ_BLOCK):
                            pass
                except zipfile.BadZipFile as e:
                    if "CRC" in str(e):
                        raise IntegrityError(
                            f"{path}: archive member {info.filename} fails its CRC-32 check: the file is corrupted; "
                            "`ckptfmt verify` names the tensors stored in it. Restore the file from a good copy"
                        ) from None
                    raise
    except IntegrityError:
        raise
    except Exception as e:  # noqa: BLE001 - zipfile on damaged bytes raises many kinds
        raise FormatError(f"{path}: the zip archive cannot be read ({type(e).__name__}: {first_line(e)}); the file is damaged") from None


def _data_offset(raw: Any, info: zipfile.ZipInfo, size: int) -> int | None:
    """Where a member's data starts: after its local header (30 bytes + name + extra).

    None when the central directory puts the local header outside the file.
    """
    if not 0 <= info.header_offset <= size - 30:
        return None
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
    except Exception:  # noqa: BLE001 - a damaged archive has no version to report
        return "legacy"
    return None


def write_torch(path: str, tensors: dict[str, np.ndarray]) -> None:
    """``torch.save`` a flat ``{name: tensor}`` dict of the given arrays.

    Example:
        >>> import numpy as np
        >>> write_torch("/tmp/doc.pt", {"w": np.ones(2, np.float32)})  # doctest: +SKIP
    """
    _torch()  # FrameworkNotAvailableError naming the extra
    from ckptfmt.adapters.torch import numpy_to_tensor

    obj = {name: numpy_to_tensor(np.asarray(a)) for name, a in tensors.items()}
    with open(path, "wb") as f:
        save_to(obj, f)


def save_to(obj: Any, f: Any) -> None:
    """``torch.save(obj, f)`` to an open binary file, raising the OSError a write met.

    torch reports a failed write as ``[enforce fail at inline_container.cc...]``; the
    OSError (ENOSPC, EIO...) the file raised is the real cause, and is raised instead.
    """
    torch = _torch()
    sink = _Sink(f)
    try:
        torch.save(obj, sink)
    except RuntimeError:
        if sink.error is not None:
            raise sink.error from None
        raise


class _Sink(io.RawIOBase):
    """A file for torch.save that remembers the OSError a write raised."""

    def __init__(self, f: Any) -> None:
        super().__init__()
        self._f = f
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        try:
            return self._f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self._f.flush()
