"""The text-format ``checkpoint`` file (``CheckpointState``) TensorFlow keeps next to its checkpoints."""

from __future__ import annotations

from dataclasses import dataclass

from ._wire import _fail

__all__: list[str] = []  # private module; names are imported explicitly by siblings

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "a": "\a",
            "b": "\b", "f": "\f", "v": "\v", "?": "?"}


def _unquote(s: str, where: str) -> str:
    if len(s) < 2 or s[0] != s[-1] or s[0] not in "\"'":
        raise _fail(where, f"expected a quoted string, got {s[:80]!r}")
    body = s[1:-1]
    out = bytearray()
    i = 0
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            out += ch.encode("utf-8")
            i += 1
            continue
        if i + 1 >= len(body):
            raise _fail(where, "dangling backslash in quoted string")
        nxt = body[i + 1]
        if nxt in _ESCAPES:
            out += _ESCAPES[nxt].encode()
            i += 2
        elif nxt in "01234567":
            j = i + 1
            while j < len(body) and j < i + 4 and body[j] in "01234567":
                j += 1
            out.append(int(body[i + 1 : j], 8) & 0xFF)
            i = j
        elif nxt == "x":
            j = i + 2
            while j < len(body) and j < i + 4 and body[j] in "0123456789abcdefABCDEF":
                j += 1
            if j == i + 2:
                raise _fail(where, "\\x escape without hex digits")
            out.append(int(body[i + 2 : j], 16))
            i = j
        else:
            raise _fail(where, f"unknown escape \\{nxt} in quoted string")
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise _fail(where, "path is not valid UTF-8") from None


def _quote(s: str) -> str:
    out = []
    for b in s.encode("utf-8"):
        c = chr(b)
        if c == '"':
            out.append('\\"')
        elif c == "\\":
            out.append("\\\\")
        elif c == "\n":
            out.append("\\n")
        elif 0x20 <= b < 0x7F:
            out.append(c)
        else:
            out.append(f"\\{b:03o}")
    return '"' + "".join(out) + '"'


@dataclass(frozen=True, slots=True)
class CheckpointState:
    """The text-format ``checkpoint`` file TensorFlow keeps next to its checkpoints."""

    model_checkpoint_path: str = ""
    all_model_checkpoint_paths: tuple[str, ...] = ()
    all_model_checkpoint_timestamps: tuple[float, ...] = ()
    last_preserved_timestamp: float = 0.0

    @classmethod
    def parse(cls, text: str, where: str) -> CheckpointState:
        latest = ""
        paths: list[str] = []
        stamps: list[float] = []
        last = 0.0
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, value = line.partition(":")
            if not sep:
                raise _fail(f"{where} line {lineno}", f"expected 'field: value', got {line[:80]!r}")
            name, value = name.strip(), value.strip()
            here = f"{where} line {lineno}"
            if name == "model_checkpoint_path":
                latest = _unquote(value, here)
            elif name == "all_model_checkpoint_paths":
                paths.append(_unquote(value, here))
            elif name in ("all_model_checkpoint_timestamps", "last_preserved_timestamp"):
                try:
                    num = float(value)
                except ValueError:
                    raise _fail(here, f"{name} is not a number: {value[:80]!r}") from None
                if name == "last_preserved_timestamp":
                    last = num
                else:
                    stamps.append(num)
            # Unknown fields are ignored, as a newer TensorFlow may add some.
        return cls(latest, tuple(paths), tuple(stamps), last)

    def format(self) -> str:
        lines = [f"model_checkpoint_path: {_quote(self.model_checkpoint_path)}"]
        lines += [f"all_model_checkpoint_paths: {_quote(p)}" for p in self.all_model_checkpoint_paths]
        lines += [f"all_model_checkpoint_timestamps: {t!r}" for t in self.all_model_checkpoint_timestamps]
        if self.last_preserved_timestamp:
            lines.append(f"last_preserved_timestamp: {self.last_preserved_timestamp!r}")
        return "\n".join(lines) + "\n"
