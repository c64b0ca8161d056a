"""One text form for file names: lossless, printable, storable in HDF5 and JSON.

Linux file names are bytes. Most are UTF-8, but names from old archives need not be (a Latin-1
``caf\\xe9.jpg``), and any name may hold a newline or a tab. Python hands such names to us as
``str`` with surrogate escapes (``os.fsdecode``), which h5py, JSON and a terminal all reject or
garble. Every place that stores or prints a path uses :func:`path_text`:

* ``\\`` becomes ``\\\\``;
* a byte that is not part of valid UTF-8, and every control character (C0, DEL), becomes
  ``\\xNN`` (two lowercase hex digits);
* everything else (any valid non-control UTF-8 character) is kept as it is.

So a plain name is unchanged (``cats/cat.1.jpg``), the form is one printable line (no tab or
newline left, safe in tab-separated output), and it is reversible: :func:`path_bytes` gives the
original bytes back, and two different names never share a text form.
"""
from __future__ import annotations

import os
import re

_CONTROL = {c for c in range(0x20)} | {0x7F}
_ESCAPE = re.compile(rb"\\\\|\\x([0-9a-f]{2})")


#: What path_text changes in a ``str``: backslashes, control characters, escaped bytes.
_SPECIAL = re.compile("[\\\\\x00-\x1f\x7f\udc80-\udcff]")


def path_text(path: str | bytes | os.PathLike) -> str:
    """The printable, lossless text form of a path (see the module docstring)."""
    if isinstance(path, str) and not _SPECIAL.search(path):
        return path  # the common case, once per packed file: nothing to escape
    raw = os.fsencode(path)
    out: list[str] = []
    text = raw.decode("utf-8", "surrogateescape")
    for ch in text:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, as surrogateescape encodes it
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code in _CONTROL:
            out.append(f"\\x{code:02x}")
        else:
            out.append(ch)
    return "".join(out)


def path_bytes(text: str) -> bytes:
    """Invert :func:`path_text`: the original bytes of the name."""
    raw = text.encode("utf-8")

    def unescape(m: re.Match[bytes]) -> bytes:
        return b"\\" if m.group(1) is None else bytes([int(m.group(1), 16)])

    return _ESCAPE.sub(unescape, raw)
