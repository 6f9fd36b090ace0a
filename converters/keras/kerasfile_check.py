"""The child-process check of a Keras file's HDF5 structure, before this process touches it.

libhdf5 is not hardened against damaged or malicious files: parsing one can crash or hang
the process. :func:`check_in_child` makes the same structure calls as
:class:`~ckptfmt.converters.keras.kerasfile.KerasFileReader` (and reads the chunked
datasets, which the reader reads through libhdf5) in a child Python first, with a timeout.
"""

from __future__ import annotations

__all__ = ["check_in_child"]

import os
from typing import Any

from ckptfmt.errors import FormatError

# The child process walks the HDF5 structure with the calls KerasFileReader makes, and reads
# chunked datasets (contiguous ones are read without libhdf5).
_CHILD = r"""
import math, sys
import h5py
path, base, length = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
class R:
    def __init__(s): s.f = open(path, "rb"); s.p = 0
    def seek(s, p, w=0): s.p = p if w == 0 else (s.p + p if w == 1 else length + p); return s.p
    def tell(s): return s.p
    def read(s, n=-1):
        n = length - s.p if n is None or n < 0 else max(0, min(n, length - s.p))
        s.f.seek(base + s.p); d = s.f.read(n); s.p += len(d); return d
    def readinto(s, b):
        d = s.read(len(b)); b[:len(d)] = d; return len(d)
raw = R()
f = h5py.File(raw, "r")
stack, seen = [f], set()
while stack:
    g = stack.pop()
    a = h5py.h5o.get_info(g.id).addr
    if a in seen:
        continue
    seen.add(a)
    dict(g.attrs.items())
    for name in g:
        if not isinstance(g.get(name, getlink=True), h5py.HardLink):
            continue
        o = g[name]
        if isinstance(o, h5py.Group):
            stack.append(o)
            continue
        if not isinstance(o, h5py.Dataset):
            continue
        o.external, o.is_virtual, o.dtype, o.shape, o.compression, o.chunks
        dict(o.attrs.items())
        stored = o.id.get_storage_size()
        o.id.get_offset()
        if o.chunks is not None and o.shape is not None:
            declared = math.prod(o.shape) * o.dtype.itemsize
            if declared <= 1 << 20 or declared <= 1000 * max(stored, 1):
                o[()]

f.close()
sys.stdout.flush()
import os
os._exit(0)  # no teardown of h5py's Python file driver
"""


# Files already walked by a child unharmed, by identity and modification time: opening one
# file several times (detect, inspect, convert) costs one child process.
_CHECKED: set[tuple[Any, ...]] = set()


def check_in_child(shown: str, path: str, base: int, length: int) -> None:
    """Walk the HDF5 bytes ``path[base:base + length]`` in a child process, as the reader will.

    A crash (a signal) or a hang of libhdf5 there is a :class:`FormatError` here naming
    ``shown``; a Python error in the child is left for the same calls in this process to
    raise again as a :class:`FormatError`. A file that passed is not walked again.

    Example:
        >>> check_in_child("m.weights.h5", "m.weights.h5", 0, os.path.getsize("m.weights.h5"))  # doctest: +SKIP
    """
    import subprocess
    import sys

    st = os.stat(path)
    ident = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns, base, length)
    if ident in _CHECKED:
        return

    timeout = 60 + length / (50 << 20)
    try:
        r = subprocess.run([sys.executable, "-I", "-c", _CHILD, path, str(base), str(length)],
                           capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise FormatError(f"{shown}: parsing its HDF5 structure did not finish in {timeout:.0f} s (damaged or malicious)") from None
    if r.returncode < 0:
        raise FormatError(f"{shown}: the HDF5 library crashed (signal {-r.returncode}) parsing the file's structure: "
                          "it is damaged or malicious")
    # a Python error in the child is raised again, as a FormatError, by the same calls here
    if r.returncode == 0:
        _CHECKED.add(ident)
