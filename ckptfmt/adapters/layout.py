"""The tree layout a framework adapter writes, defined once and importable without the framework.

:mod:`ckptfmt.adapters.torch` builds its trees with :func:`torch_tree`; so does a converter
writing a torch checkpoint without torch (``ckptfmt convert tf2torch ... out/``), so both
produce the same layout and ``ckptfmt.torch.restore`` reads either.

Example:
    >>> torch_tree({"model": {}}, {}, "2.4.0")["framework"]
    {'name': 'torch', 'version': '2.4.0', 'layout': 1}
"""

from __future__ import annotations

__all__ = ["TORCH_LAYOUT", "torch_tree"]

from typing import Any

#: Version of the torch tree layout (sections ``model``, ``optimizer``, ``scheduler``,
#: ``extra`` beside ``framework`` and ``aliases``); bumped if sections move.
TORCH_LAYOUT = 1


def torch_tree(sections: dict[str, Any], aliases: dict[str, str], torch_version: str | None) -> dict[str, Any]:
    """The torch layout's tree: ``framework`` and ``aliases``, then the sections given.

    Example:
        >>> sorted(torch_tree({"model": {}, "extra": {"epoch": 1}}, {}, None))
        ['aliases', 'extra', 'framework', 'model']
    """
    return {
        "framework": {"name": "torch", "version": torch_version, "layout": TORCH_LAYOUT},
        "aliases": aliases,
        **sections,
    }
