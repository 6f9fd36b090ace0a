"""Adapters: turn framework objects into neutral trees of numpy arrays and back.

One small module per framework, with the same verbs in each (``to_state`` / ``from_state``):

- :mod:`ckptfmt.adapters.numpy`: validates and normalises a tree of numpy arrays.
- :mod:`ckptfmt.adapters.torch`: ``nn.Module`` / optimizer / LR scheduler state.
- :mod:`ckptfmt.adapters.tensorflow`: ``tf.Module``, Keras models and ``tf.train.Checkpoint``.

Adapters never touch storage; :mod:`ckptfmt.torch` and :mod:`ckptfmt.tensorflow` combine
them with :func:`ckptfmt.save` / :func:`ckptfmt.load`. This package imports no framework:
each framework module imports its own, and raises
:class:`~ckptfmt.errors.FrameworkNotAvailableError` when it is missing.
"""

from __future__ import annotations

__all__: list[str] = []
