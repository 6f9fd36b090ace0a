"""``python -m ckptfmt.cli``: the same as the ``ckptfmt`` command."""

from ckptfmt.cli.main import main

main(prog_name="ckptfmt")
