"""Every example in the core's docstrings runs and prints what it says."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "ckptfmt", "ckptfmt.api", "ckptfmt.errors", "ckptfmt._reader", "ckptfmt._gc", "ckptfmt.manager",
    "ckptfmt.format.dtypes", "ckptfmt.format.hashing", "ckptfmt.format.tree", "ckptfmt.format.manifest",
    "ckptfmt.storage.local", "ckptfmt.storage.urls", "ckptfmt.storage.fsspec",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
