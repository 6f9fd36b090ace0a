"""Read and write TensorFlow TensorBundle checkpoints without TensorFlow.

Example:
    >>> from ckptfmt.converters.tf import TFCheckpointReader
    >>> reader = TFCheckpointReader("path/to/ckpt-1")  # doctest: +SKIP
    >>> {k: reader.shape(k) for k in reader.keys()}  # doctest: +SKIP
"""

from __future__ import annotations

from .bundle import (
    OBJECT_GRAPH_KEY,
    TensorEntry,
    TFCheckpointReader,
    TFCheckpointWriter,
    latest_checkpoint,
    write_checkpoint,
)
from .object_graph import (
    CheckpointObjectGraph,
    KeyInfo,
    SlotInfo,
    build_object_graph,
    read_object_graph,
)

__all__ = [
    "OBJECT_GRAPH_KEY",
    "TensorEntry",
    "TFCheckpointReader",
    "TFCheckpointWriter",
    "latest_checkpoint",
    "write_checkpoint",
    "CheckpointObjectGraph",
    "KeyInfo",
    "SlotInfo",
    "build_object_graph",
    "read_object_graph",
]
