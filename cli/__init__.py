"""The ckptfmt command line (installed as ckptfmt.cli)."""
