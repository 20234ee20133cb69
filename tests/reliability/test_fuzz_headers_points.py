"""Property-based (hypothesis): MetaImage / NRRD headers with detached data, and points CSVs.

Whatever the header declares and whatever the files it names hold, ``read_volume`` answers
quickly with a sane volume or one VolumeError naming the header; a data file outside the
allowed folders is never read. Whatever bytes a points CSV holds, ``read_points`` returns
finite coordinates or one AnatomapError naming the file."""

from __future__ import annotations

import codecs
import tempfile
import time
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anatomap import limits
from anatomap.errors import AnatomapError, VolumeError
from anatomap.infer.match import read_points
from anatomap.io import read_volume

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
META_TYPES = ["MET_UCHAR", "MET_SHORT", "MET_FLOAT", "MET_DOUBLE", "MET_BOGUS"]
NRRD_TYPES = ["uint8", "int16", "float", "double", "bogus"]
dims = st.lists(
    st.sampled_from([0, 1, 2, 3, 4, 5, 7, 64, 700, 5000, 10**6]), min_size=1, max_size=4
)
targets = st.sampled_from(["inside", "dotdot", "absolute", "missing", "list", "pattern", "local"])


def _data_line(kind: str, target: str, root: Path, sizes: list[int]) -> tuple[str, list[str]]:
    """``(data file field value, extra lines after the header)`` for a named target."""
    if target == "inside":
        return "d.raw", []
    if target == "dotdot":
        return "../outside.raw", []
    if target == "absolute":
        return str(root.parent / "outside.raw"), []
    if target == "missing":
        return "nothing.raw", []
    if target == "list":
        return "LIST", ["d.raw", "../outside.raw"][: max(1, len(sizes) % 3)]
    if target == "pattern":
        return "s%02d.raw 0 2 1", []
    return ("LOCAL" if kind == "meta" else ""), []


@FUZZ
@given(
    kind=st.sampled_from(["meta", "nrrd"]),
    sizes=dims,
    etype=st.integers(0, 4),
    channels=st.sampled_from([1, 3, 10**6]),
    compressed=st.booleans(),
    target=targets,
    payload=st.binary(max_size=600),
)
def test_detached_headers_read_or_fail_cleanly(
    kind: str,
    sizes: list[int],
    etype: int,
    channels: int,
    compressed: bool,
    target: str,
    payload: bytes,
) -> None:
    with tempfile.TemporaryDirectory() as d:
        base = Path(d)
        root = base / "data"
        root.mkdir()
        secret = base / "outside.raw"
        secret.write_bytes(b"\x7f" * 4096)
        for name in ("d.raw", "s00.raw", "s01.raw", "s02.raw"):
            (root / name).write_bytes(payload)
        value, extra = _data_line(kind, target, root, sizes)
        if kind == "meta":
            lines = [
                "ObjectType = Image",
                f"NDims = {len(sizes)}",
                f"DimSize = {' '.join(map(str, sizes))}",
                f"ElementNumberOfChannels = {channels}",
                f"ElementType = {META_TYPES[etype]}",
                f"CompressedData = {compressed}",
                f"ElementDataFile = {value}",
            ]
            path = root / "h.mhd"
        else:
            lines = [
                "NRRD0004",
                f"type: {NRRD_TYPES[etype]}",
                f"dimension: {len(sizes)}",
                f"sizes: {' '.join(map(str, sizes))}",
                f"encoding: {'gzip' if compressed else 'raw'}",
                *([f"data file: {value}"] if value else []),
            ]
            path = root / ("h.nhdr" if value else "h.nrrd")
        text = "\n".join(lines + extra) + "\n"
        path.write_bytes(text.encode() + (b"\n" + payload if target == "local" else b""))
        start = time.perf_counter()
        try:
            vol = read_volume(path, expect_ndim=None, roots=[root])
        except VolumeError as exc:
            msg = str(exc)
            assert msg.startswith(str(path)) and "\n" not in msg
        else:
            assert vol.array.size <= limits.MAX_VOXELS
            assert np.isfinite(vol.array).all()
            assert target not in ("dotdot", "absolute", "missing")
            if target == "list":
                assert "outside" not in "".join(extra)
        assert time.perf_counter() - start < 10


HEADERS = ["name,x,y,z", "x,y,z", "Name , X , Y , Z", "name,i,j,k", "a;b;c", ""]
cells = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(10**20), 10**20).map(str),
    st.text(max_size=6),
    st.sampled_from(["", " 1 ", "1e999", "-inf", "nan", "é", '"', "\x00", "1,5"]),
)


@FUZZ
@given(
    header=st.sampled_from(HEADERS),
    rows=st.lists(st.lists(cells, min_size=0, max_size=5), max_size=6),
    encoding=st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16", "cp1252"]),
    voxel=st.booleans(),
    junk=st.binary(max_size=20),
)
def test_points_files_read_or_fail_cleanly(
    header: str, rows: list, encoding: str, voxel: bool, junk: bytes
) -> None:
    text = "\n".join([header, *(",".join(r) for r in rows)]) + "\n"
    try:
        data = codecs.encode(text, encoding)
    except UnicodeEncodeError:
        data = text.encode("utf-8", "surrogatepass")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "points.csv"
        path.write_bytes(data + (junk if len(rows) % 2 else b""))
        try:
            names, coords = read_points(path, voxel=voxel)
        except AnatomapError as exc:
            assert str(exc).startswith(str(path)) and "\n" not in str(exc)
        else:
            assert coords.shape == (len(names), 3) and np.isfinite(coords).all()


def test_a_points_file_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_bytes(b"\xef\xbb\xbfname,x,y,z\nA,1,2,3\n")
    names, coords = read_points(path)
    assert names == ["A"] and coords.tolist() == [[1.0, 2.0, 3.0]]
