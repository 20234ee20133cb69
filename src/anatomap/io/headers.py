"""What a MetaImage (``.mha``/``.mhd``) or NRRD (``.nrrd``/``.nhdr``) header asks for, checked
before any library opens the voxel data.

A text header may keep its voxels in other files (``ElementDataFile`` / ``data file``: one
name, ``LIST``, or a numbered pattern). Each of those files must be a regular file (a FIFO,
a device such as ``/dev/zero`` or a socket is never opened), lie inside the allowed folders
when there are any, and hold enough bytes for the voxels declared (when compressed: no more
than :data:`~anatomap.limits.MAX_COMPRESSION_RATIO` times fewer). The declared size itself
must stay under :data:`~anatomap.limits.MAX_VOXELS` and :data:`~anatomap.limits.MAX_BYTES`.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from anatomap import limits
from anatomap.errors import VolumeError

_META_TYPES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4,
    "MET_UINT": 4, "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8,
    "MET_FLOAT": 4, "MET_DOUBLE": 8,
}  # fmt: skip
_NRRD_TYPES = {
    1: ("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t", "char"),
    2: ("short", "short int", "signed short", "signed short int", "int16", "int16_t",
        "ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"),
    4: ("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32",
        "uint32_t", "float"),
    8: ("longlong", "long long", "long long int", "signed long long", "signed long long int",
        "int64", "int64_t", "ulonglong", "unsigned long long", "unsigned long long int",
        "uint64", "uint64_t", "double"),
}  # fmt: skip
_NRRD_COMPRESSED = ("gzip", "gz", "bzip2", "bz2", "zrl")


@dataclass
class TextHeader:
    """The parts of a MetaImage / NRRD header that size and locate the voxel data."""

    sizes: tuple[int, ...]
    components: int = 1
    itemsize: int = 1
    compressed: bool = False
    text: bool = False  # NRRD ascii/hex encodings: not one item per itemsize bytes
    files: list[Path] = field(default_factory=list)  # empty: voxels follow the header

    @property
    def values(self) -> int:
        n = self.components
        for s in self.sizes:
            n *= s
        return n


def _ints(p: Path, key: str, value: str) -> list[int]:
    try:
        out = [int(float(v)) for v in value.split()]
    except ValueError:
        raise VolumeError(p, f"cannot read header: {key} is not a list of numbers") from None
    if not out or any(v < 0 for v in out):
        raise VolumeError(p, f"cannot read header: {key} must be non-negative numbers")
    return out


def _pattern(p: Path, value: str) -> list[str] | None:
    """The names of a numbered pattern ``fmt min max step [subdim]``, or ``None``."""
    parts = value.split()
    if "%" not in value or len(parts) < 4:
        return None
    try:
        fmt, lo, hi, step = parts[0], int(parts[1]), int(parts[2]), int(parts[3])
    except ValueError:
        return None
    if step == 0 or (hi - lo) // step + 1 > limits.MAX_DATA_FILES:
        raise VolumeError(p, f"header names too many data files (pattern {value!r})")
    try:
        return [fmt % i for i in range(lo, hi + (1 if step > 0 else -1), step)]
    except (TypeError, ValueError):
        raise VolumeError(p, f"cannot read header: bad file pattern {value!r}") from None


def _names(p: Path, value: str, rest: list[str]) -> list[str]:
    """The data files named by ``value`` (``LIST`` takes the header's remaining lines)."""
    if value in ("LOCAL", ""):
        return []
    if value.split()[0].upper() == "LIST":
        return [ln.strip() for ln in rest if ln.strip()][: limits.MAX_DATA_FILES + 1]
    return _pattern(p, value) or [value]


def _meta_header(p: Path, lines: list[str]) -> TextHeader | None:
    keys: dict[str, str] = {}
    for n, line in enumerate(lines):
        key, sep, value = line.partition("=")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        keys[key] = value
        if key == "elementdatafile":
            if "dimsize" not in keys:
                return None
            sizes = _ints(p, "DimSize", keys["dimsize"])
            comps = _ints(p, "ElementNumberOfChannels", keys.get("elementnumberofchannels", "1"))
            etype = keys.get("elementtype", "").upper().removesuffix("_ARRAY")
            return TextHeader(
                sizes=tuple(sizes),
                components=max(comps[0], 1),
                itemsize=_META_TYPES.get(etype, 1),
                compressed=keys.get("compresseddata", "").lower() == "true",
                files=[Path(s) for s in _names(p, value, lines[n + 1 :])],
            )
    return None


def _nrrd_header(p: Path, lines: list[str]) -> TextHeader | None:
    fields: dict[str, str] = {}
    files: list[str] = []
    for n, line in enumerate(lines[1:], start=1):
        if not line.strip():
            break
        if line.startswith("#") or ":=" in line:
            continue
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        fields[key] = value
        if key in ("data file", "datafile"):
            files = _names(p, value, lines[n + 1 :])
            break
    if "sizes" not in fields:
        return None
    kind = fields.get("type", "").lower()
    encoding = fields.get("encoding", "raw").lower()
    itemsize = next((size for size, names in _NRRD_TYPES.items() if kind in names), 1)
    return TextHeader(
        sizes=tuple(_ints(p, "sizes", fields["sizes"])),
        itemsize=itemsize,
        compressed=encoding in _NRRD_COMPRESSED,
        text=encoding in ("ascii", "txt", "text", "hex"),
        files=[Path(s) for s in files],
    )


def read_text_header(p: Path) -> TextHeader | None:
    """The header of a MetaImage / NRRD file, or ``None`` when it is not one we can parse
    (SimpleITK then decides). Raises :class:`VolumeError` for a malformed size field."""
    try:
        with open(p, "rb") as fh:
            head = fh.read(limits.MAX_HEADER_BYTES)
    except OSError as exc:
        raise VolumeError(p, f"cannot read header: {exc.strerror or exc}") from None
    lines = head.decode("latin-1").splitlines()
    if not lines:
        return None
    if lines[0].startswith("NRRD"):
        return _nrrd_header(p, lines)
    return _meta_header(p, lines)


def outside(path: Path, roots: Sequence[str | Path]) -> bool:
    """Whether ``path`` (made absolute, ``..`` collapsed, symlinks not followed) lies outside
    every folder in ``roots``."""
    a = Path(os.path.abspath(path))
    return not any(a == r or r in a.parents for r in (Path(os.path.abspath(q)) for q in roots))


def special_kind(mode: int) -> str:
    """What a non-regular file is, in words (``FIFO``, ``character device``...)."""
    for test, name in (
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISDIR, "folder"),
    ):
        if test(mode):
            return name
    return "special file"


def check_size(p: Path, shape: Sequence[int], values: int, nbytes: int) -> None:
    """Refuse a header that declares more values or bytes than the limits allow."""
    if values > limits.MAX_VOXELS:
        raise VolumeError(
            p,
            f"header declares {values:,} values (shape {tuple(shape)}), more than the limit "
            f"of {limits.MAX_VOXELS:,} (ANATOMAP_MAX_VOXELS)",
        )
    if nbytes > limits.MAX_BYTES:
        raise VolumeError(
            p,
            f"header declares {nbytes:,} bytes of voxel data, more than the limit of "
            f"{limits.MAX_BYTES:,} (ANATOMAP_MAX_BYTES)",
        )


def check_text_header(p: Path, roots: Sequence[str | Path] | None = None) -> TextHeader | None:
    """Check a MetaImage / NRRD header and every data file it names (see the module doc)."""
    header = read_text_header(p)
    if header is None:
        return None
    if header.values == 0:  # ITK divides by a zero size when it splits a file list
        raise VolumeError(p, f"image has no voxels (header size {header.sizes})")
    nbytes = header.values * header.itemsize
    check_size(p, header.sizes, header.values, nbytes)
    if len(header.files) > limits.MAX_DATA_FILES:
        raise VolumeError(p, f"header names more than {limits.MAX_DATA_FILES} data files")
    total = 0
    for name in header.files:
        f = name if name.is_absolute() else p.parent / name
        if roots is not None and outside(f, roots):
            raise VolumeError(p, f"data file {name} lies outside the data folders; it is not read")
        try:
            st = os.stat(f)
        except OSError as exc:
            raise VolumeError(p, f"data file {name}: {exc.strerror or 'not found'}") from None
        if not stat.S_ISREG(st.st_mode):
            raise VolumeError(
                p, f"data file {name} is a {special_kind(st.st_mode)}, not a regular file"
            )
        total += st.st_size
    if not header.files:
        total = p.stat().st_size
    if header.compressed:
        if nbytes > limits.MAX_COMPRESSION_RATIO * total + (1 << 20):
            raise VolumeError(
                p,
                f"corrupt header or truncated file: header needs {nbytes:,} bytes of voxels, "
                f"more than {total:,} compressed bytes can hold",
            )
    elif total < (header.values if header.text else nbytes):
        raise VolumeError(
            p,
            f"truncated voxel data: {'the data file(s) hold' if header.files else 'file has'} "
            f"{total:,} bytes, the header declares {nbytes:,}",
        )
    return header
