"""Reading small text inputs (points CSVs, configs) with one-line errors naming the file.

Only a regular file is opened (a FIFO would block, ``/dev/zero`` never ends), its size is
checked before it is read, and it must be UTF-8 (a byte-order mark is dropped): a Latin-1 or
UTF-16 file is refused with the offending byte, not a ``UnicodeDecodeError``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from anatomap.errors import AnatomapError
from anatomap.io.headers import special_kind


def read_text(
    path: str | Path, what: str, max_bytes: int, error: type[AnatomapError] = AnatomapError
) -> str:
    """The UTF-8 text of ``path`` (``what`` names it in errors: "points CSV", "config")."""
    p = Path(path)
    try:
        st = os.stat(p)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{p}: a {special_kind(st.st_mode)}, not a {what} file")
        if st.st_size > max_bytes:
            raise error(
                f"{p}: {st.st_size:,} bytes, more than the limit of {max_bytes:,} for a {what}"
            )
        raw = p.read_bytes()
    except OSError as exc:
        raise error(f"{p}: cannot read {what} ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(
            f"{p}: {what} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
            f"{exc.start}, e.g. Latin-1); save it as UTF-8"
        ) from None
    if "\0" in text:
        raise error(f"{p}: {what} is not a text file (it holds NUL bytes)")
    return text
