"""Shared fixtures. Tests needing torch/tensorflow/onnx are marked and skip only if absent."""

from __future__ import annotations

import os

import pytest

# Hypothesis: deterministic and bounded in CI.
try:
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "ckptfmt",
        deadline=None,
        max_examples=int(os.environ.get("CKPTFMT_HYPOTHESIS_EXAMPLES", "60")),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        derandomize=bool(os.environ.get("CI")),
    )
    settings.load_profile("ckptfmt")
except ImportError:  # pragma: no cover
    pass


@pytest.fixture
def ckdir(tmp_path):
    """A path for a checkpoint directory that does not exist yet."""
    return str(tmp_path / "ck")
