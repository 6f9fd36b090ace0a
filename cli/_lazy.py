"""A click group whose extra subcommands live in other modules, imported when first used.

Subcommands come from three places: ``@group.command()`` in the module that defines the
group; a ``lazy_subcommands`` mapping ``{"name": "module:attribute"}``; and, for other
packages, the entry-point group given as ``entry_point_group`` (``[project.entry-points]``
in their pyproject). A subcommand whose module fails to import still shows up in
``--help``, marked unavailable, and fails with the import error when run.

Example:
    >>> import click
    >>> @click.group(cls=LazyGroup, lazy_subcommands={"hello": "mypkg.cli:hello"})
    ... def tools() -> None:
    ...     pass
"""

from __future__ import annotations

__all__ = ["LazyGroup"]

import importlib
from typing import Any

import click

from ckptfmt.errors import CkptFmtError


class LazyGroup(click.Group):
    """A :class:`click.Group` that imports some subcommands only when they are used."""

    def __init__(self, *args: Any, lazy_subcommands: dict[str, str] | None = None, entry_point_group: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Kept by reference: a registry dict filled in later is still seen.
        self.lazy_subcommands: dict[str, str] = lazy_subcommands if lazy_subcommands is not None else {}
        self.entry_point_group = entry_point_group

    def _lazy(self) -> dict[str, str]:
        found: dict[str, str] = {}
        if self.entry_point_group:
            from importlib.metadata import entry_points  # scans installed packages: only when listed

            found.update({ep.name: ep.value for ep in entry_points(group=self.entry_point_group)})
        found.update(self.lazy_subcommands)
        return found

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._lazy()))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is not None:
            return cmd
        target = self._lazy().get(cmd_name)
        return None if target is None else _load(cmd_name, target)


def _load(name: str, target: str) -> click.Command:
    module, _, attr = target.partition(":")
    try:
        cmd = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        reason = f"{type(e).__name__}: {e}"

        @click.command(name, help=f"(unavailable: {reason})", context_settings={"ignore_unknown_options": True})
        @click.argument("args", nargs=-1, type=click.UNPROCESSED)
        def unavailable(args: tuple[str, ...]) -> None:
            raise CkptFmtError(f"the {name!r} command cannot be loaded from {target} ({reason})")

        return unavailable
    if not isinstance(cmd, click.Command):
        raise TypeError(f"{target} is a {type(cmd).__name__}, not a click command")
    return cmd
