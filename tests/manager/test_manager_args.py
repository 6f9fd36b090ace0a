"""CheckpointManager's arguments are checked when it is built, not in its first save."""

from __future__ import annotations

import pytest

import ckptfmt


@pytest.mark.parametrize("chunk_size", [1024, 0, (1 << 20) + 1])
def test_an_invalid_chunk_size_is_refused_at_construction(tmp_path, chunk_size):
    with pytest.raises(ValueError, match="chunk_size"):
        ckptfmt.CheckpointManager(tmp_path / "run", chunk_size=chunk_size, async_save=True)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
