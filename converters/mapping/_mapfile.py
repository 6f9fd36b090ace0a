"""The mapping file: a :class:`~.rules.Mapping`'s rules and notes as JSON, written and parsed.

Every rule and op is stored as its dataclass fields plus its type name (``"rule"``/``"op"``);
reading checks the format tag and version and names the rule that does not parse.

Example:
    >>> from .ops import Transpose
    >>> from ._rule_types import Convert
    >>> text = dump_mapping((Convert(("k",), ("w",), (Transpose((1, 0)),)),), ("a note",), "keras", "torch")
    >>> parse_mapping(text)[0]
    (Convert(sources=('k',), targets=('w',), ops=(Transpose(axes=(1, 0)),)),)
"""

from __future__ import annotations

__all__ = ["MAPPING_FILE_FORMAT", "MAPPING_FILE_VERSION", "dump_mapping", "parse_mapping"]

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from ckptfmt.errors import FormatError

from ._rule_types import RULE_TYPES, Rule
from .ops import OP_TYPES

MAPPING_FILE_FORMAT = "ckptfmt-mapping"
MAPPING_FILE_VERSION = 1


def dump_mapping(rules: Sequence[Rule], notes: Sequence[str], source_format: str, target_format: str) -> str:
    """The mapping file text (JSON) for ``rules`` and ``notes``."""
    doc = {
        "format": MAPPING_FILE_FORMAT,
        "version": MAPPING_FILE_VERSION,
        "source_format": source_format,
        "target_format": target_format,
        "notes": list(notes),
        "rules": [_dump(r, "rule") for r in rules],
    }
    return json.dumps(doc, indent=1) + "\n"


def parse_mapping(text: str) -> tuple[tuple[Rule, ...], tuple[str, ...], str, str]:
    """``(rules, notes, source_format, target_format)`` of mapping file text.

    Raises:
        FormatError: the text is not a valid mapping file (says which rule or op).
    """
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise FormatError(f"mapping file is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != MAPPING_FILE_FORMAT:
        raise FormatError(f"not a mapping file: expected \"format\": \"{MAPPING_FILE_FORMAT}\"")
    if doc.get("version") != MAPPING_FILE_VERSION:
        raise FormatError(f"mapping file version {doc.get('version')!r} is not supported (this reader knows {MAPPING_FILE_VERSION})")
    rules = []
    for i, r in enumerate(doc.get("rules", [])):
        try:
            rules.append(_load(r, "rule", RULE_TYPES))
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"mapping file rule #{i} is invalid: {e}") from None
    return tuple(rules), tuple(doc.get("notes", ())), doc.get("source_format", "keras"), doc.get("target_format", "torch")


def _dump(obj: Any, tag: str) -> dict[str, Any]:
    out: dict[str, Any] = {tag: type(obj).__name__}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if f.name == "ops":
            v = [_dump(op, "op") for op in v]
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def _load(d: dict[str, Any], tag: str, registry: dict[str, type]) -> Any:
    d = dict(d)
    name = d.pop(tag)
    if name not in registry:
        raise ValueError(f"unknown {tag} {name!r} (known: {', '.join(sorted(registry))})")
    kwargs = {}
    for k, v in d.items():
        if k == "ops":
            v = tuple(_load(op, "op", OP_TYPES) for op in v)
        elif isinstance(v, list):
            v = tuple(v)
        kwargs[k] = v
    return registry[name](**kwargs)
