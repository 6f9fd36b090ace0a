"""``ckptfmt convert dcp-import``: a torch.distributed.checkpoint directory into ckptfmt or safetensors.

Registered in :data:`ckptfmt.cli.main.CONVERT_COMMANDS` and imported only when used.
"""

from __future__ import annotations

__all__ = ["dcp_import"]

import click

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.command("dcp-import", context_settings=_CONTEXT)
@click.argument("dcp_dir", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("--to", "to", type=click.Choice(["ckptfmt", "safetensors"]), default=None,
              help="Kind of DST (default: from its suffix; anything but .safetensors means ckptfmt).")
@click.option("--overwrite", "-f", is_flag=True, help="Replace DST if it exists.")
def dcp_import(dcp_dir: str, dst: str, to: str | None, overwrite: bool) -> None:
    """Read a DCP checkpoint (.metadata + __R_N.distcp) into DST without unpickling code.

    The .metadata pickle is read by an allow-list unpickler that knows only DCP's metadata
    classes and runs nothing; tensor payloads are read with torch.load(weights_only=True).
    Sharded tensors are assembled whole.

    \b
    Example:
      ckptfmt convert dcp-import runs/dcp-step-100 runs/step-100
      ckptfmt convert dcp-import runs/dcp-step-100 model.safetensors
    """
    from ckptfmt.cli.main import _report
    from ckptfmt.converters._dcp_import import dcp_import as run

    _report(run(dcp_dir, dst, to=to, overwrite=overwrite))
