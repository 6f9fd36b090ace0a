"""Every example in the converters' docstrings runs and prints what it says (from the repository root, for fixtures/)."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

MODULES = [
    "ckptfmt.converters.sources",
    "ckptfmt.converters.sources.base",
    "ckptfmt.converters.sources.ckptfmt",
    "ckptfmt.converters.sources.tf",
    "ckptfmt.converters.sources.torch",
    "ckptfmt.converters.sources.safetensors",
    "ckptfmt.converters.sources.onnx",
    "ckptfmt.converters.keras.source",
    "ckptfmt.converters.diff",
    "ckptfmt.converters.kinds",
    "ckptfmt.converters.convert",
    "ckptfmt.converters.keras",
    "ckptfmt.converters.keras.checkpoint",
    "ckptfmt.converters.keras.tfcheckpoint",
    "ckptfmt.converters.keras.infer",
    "ckptfmt.converters.keras.planner",
    "ckptfmt.converters.keras.optimizer",
    "ckptfmt.converters.keras.report",
    "ckptfmt.converters.keras.outputs",
    "ckptfmt.converters.keras.torchfile",
    "ckptfmt.converters.optim.convert",
    "ckptfmt.converters.optim._views",
    "ckptfmt.converters.keras.torch_state",
    "ckptfmt.converters.keras.diff",
    "ckptfmt.converters.keras.keras2keras",
    "ckptfmt.converters.keras.torch2keras",
    "ckptfmt.converters.mapping.registry",
    "ckptfmt.converters.mapping.layers",
    "ckptfmt.converters.mapping.describe",
    "ckptfmt.converters.optim.tables",
    "ckptfmt.converters.files",
    "ckptfmt.converters.optional",
    "ckptfmt.converters.check",
    "ckptfmt.converters.keras.kerasfile",
    "ckptfmt.converters.keras.kerasfile_h5",
    "ckptfmt.converters.keras.kerasfile_keras3",
    "ckptfmt.converters.keras.kerasfile_tfkeras",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
