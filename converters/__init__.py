"""Converters between foreign checkpoint formats and ckptfmt (installed as ckptfmt.converters)."""
