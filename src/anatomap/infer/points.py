"""Points files in and out: CSV (RAS or LPS mm, or template voxel indices), 3D Slicer markups
(``.mrk.json`` read and written, legacy ``.fcsv`` read); :class:`Matches`, the typed result of
``anatomap.match``, and its files (CSV + JSON, markups, sphere label images).

Inside anatomap every point is world RAS+ mm (the NIfTI convention). A CSV says nothing about
its frame, so the caller states it (``coords="RAS"`` or ``"LPS"``); Slicer files carry their
own (``coordinateSystem`` in ``.mrk.json``, ``# CoordinateSystem`` in ``.fcsv``) and that
wins. LPS and RAS differ by the sign of the first two axes. Markups are written in LPS, as
Slicer 5 itself writes them, with ``"coordinateSystem": "LPS"`` stating it.

Every problem is one :class:`AnatomapError` line that starts with the file's path.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from anatomap.errors import AnatomapError

SLICER_SCHEMA = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
    "Resources/Schema/markups-schema-v1.0.3.json#"
)
COORDS = ("RAS", "LPS")
_FLIP = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS (its own inverse)
# Legacy .fcsv columns when the file has no "# columns =" line (Slicer 4.6 to 5).
_FCSV_COLUMNS = [
    "id",
    "x",
    "y",
    "z",
    "ow",
    "ox",
    "oy",
    "oz",
    "vis",
    "sel",
    "lock",
    "label",
    "desc",
    "associatedNodeID",
]


def check_coords(coords: str) -> str:
    """``coords`` upper-cased, or an error unless it is RAS or LPS."""
    c = str(coords).strip().upper()
    if c not in COORDS:
        raise AnatomapError(f"coordinate system {coords!r}: must be RAS or LPS")
    return c


def to_ras(xyz: np.ndarray, coords: str) -> np.ndarray:
    """World points ``[N, 3]`` given in ``coords`` (RAS or LPS) as RAS."""
    xyz = np.asarray(xyz, np.float64).reshape(-1, 3)
    return xyz * _FLIP if check_coords(coords) == "LPS" else xyz.copy()


def from_ras(xyz_ras: np.ndarray, coords: str) -> np.ndarray:
    """RAS world points ``[N, 3]`` expressed in ``coords`` (RAS or LPS)."""
    return to_ras(xyz_ras, coords)  # the flip is its own inverse


def _text(path: Path, what: str) -> str:
    from anatomap import limits
    from anatomap.io.text import read_text

    return read_text(path, what, limits.MAX_POINTS_FILE_BYTES)


def _finite(p: Path, where: str, values: Any) -> list[float]:
    """Three finite floats from ``values``, or an error naming ``where``."""
    try:
        xyz = [float(v) for v in values]
    except (TypeError, ValueError, AttributeError):
        raise AnatomapError(f"{p}: {where}: coordinates must be numbers") from None
    if len(xyz) != 3:
        raise AnatomapError(f"{p}: {where}: a position needs 3 numbers, not {len(xyz)}")
    if not all(math.isfinite(v) for v in xyz):
        raise AnatomapError(f"{p}: {where}: coordinates must be finite numbers")
    return xyz


def read_points_csv(
    path: str | Path, coords: str = "RAS", voxel: bool = False
) -> tuple[list[str], np.ndarray]:
    """A CSV of points: columns ``x,y,z`` in world mm (``coords``: RAS or LPS, returned as
    RAS), or ``i,j,k`` voxel indices with ``voxel=True`` (returned as written); an optional
    ``name`` column. UTF-8 only (a byte-order mark is ignored; Latin-1 is refused)."""
    p = Path(path)
    coords = check_coords(coords)
    text = _text(p, "points CSV")
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        cols = [c.strip().lower() for c in (reader.fieldnames or [])]
        rows = list(reader)
    except csv.Error as exc:
        raise AnatomapError(f"{p}: not a valid CSV ({exc})") from None
    keys = ("i", "j", "k") if voxel else ("x", "y", "z")
    if not set(keys) <= set(cols):
        want = "i,j,k (voxel indices, with --voxel)" if voxel else "x,y,z (world mm)"
        other = (
            " (it has i,j,k: pass --voxel)" if not voxel and {"i", "j", "k"} <= set(cols) else ""
        )
        raise AnatomapError(f"{p}: points CSV needs columns {want}{other}")
    names, xyz = [], []
    for line, row in enumerate(rows, start=2):
        row = {k.strip().lower(): v for k, v in row.items() if k}
        xyz.append(_finite(p, f"line {line}", [row.get(k) for k in keys]))
        names.append((row.get("name") or f"p{len(names)}").strip())
    if not xyz:
        raise AnatomapError(f"{p}: no points")
    out = np.asarray(xyz, np.float64)
    return names, out if voxel else to_ras(out, coords)


def _json(p: Path) -> dict[str, Any]:
    try:
        doc = json.loads(_text(p, "Slicer markups"))
    except json.JSONDecodeError as exc:
        raise AnatomapError(
            f"{p}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    except (ValueError, RecursionError) as exc:  # nesting or a number past Python's limits
        raise AnatomapError(f"{p}: not valid JSON ({str(exc).splitlines()[0][:80]})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("markups"), list):
        raise AnatomapError(f'{p}: not a Slicer markups file (no "markups" list)')
    return doc


def read_points_slicer(path: str | Path) -> tuple[list[str], np.ndarray]:
    """The control points of every point list (``"type": "Fiducial"``) in a Slicer
    ``.mrk.json``, as RAS mm whatever the file's ``coordinateSystem`` (LPS when absent, the
    schema's default). Points whose ``positionStatus`` is ``"undefined"`` (placeholders not
    yet placed) are skipped; an unnamed point is ``p<index>``."""
    p = Path(path)
    names: list[str] = []
    xyz: list[np.ndarray] = []
    for m, markup in enumerate(_json(p)["markups"]):
        if not isinstance(markup, dict) or str(markup.get("type", "")).lower() != "fiducial":
            continue
        system = str(markup.get("coordinateSystem", "LPS")).upper()
        if system not in COORDS:
            raise AnatomapError(
                f"{p}: markups[{m}]: coordinateSystem {system!r} (RAS or LPS expected)"
            )
        points = markup.get("controlPoints") or []
        if not isinstance(points, list):
            raise AnatomapError(f"{p}: markups[{m}]: controlPoints is not a list")
        for c, cp in enumerate(points):
            if not isinstance(cp, dict):
                raise AnatomapError(f"{p}: markups[{m}].controlPoints[{c}] is not an object")
            if cp.get("positionStatus") == "undefined":
                continue
            if "position" not in cp:
                raise AnatomapError(f"{p}: markups[{m}].controlPoints[{c}]: no position")
            pos = cp["position"] if isinstance(cp["position"], list) else [cp["position"]]
            xyz.append(to_ras(_finite(p, f"markups[{m}].controlPoints[{c}]", pos), system)[0])
            names.append(str(cp.get("label") or f"p{len(names)}").strip())
    if not xyz:
        raise AnatomapError(f"{p}: no control points (a point list of type Fiducial)")
    return names, np.stack(xyz)


def _fcsv_header(p: Path, lines: list[str]) -> tuple[str, list[str]]:
    """The coordinate system and the column names of an ``.fcsv`` from its ``#`` lines."""
    system, columns = "RAS", list(_FCSV_COLUMNS)  # files before Slicer 4.11 were RAS
    for line in lines:
        key, _, value = line.lstrip("#").partition("=")
        key, value = key.strip().lower(), value.strip()
        if key == "coordinatesystem":
            system = {"0": "RAS", "1": "LPS", "2": "IJK"}.get(value, value.upper())
            if system not in COORDS:
                raise AnatomapError(
                    f"{p}: CoordinateSystem {value!r} not supported (RAS or LPS expected)"
                )
        elif key == "columns":
            columns = [c.strip().lower() for c in value.split(",")]
    if not {"x", "y", "z"} <= set(columns):
        raise AnatomapError(f"{p}: the '# columns =' line lacks x,y,z")
    return system, columns


def read_points_fcsv(path: str | Path) -> tuple[list[str], np.ndarray]:
    """A legacy Slicer fiducial list (``.fcsv``): ``#`` header lines (``CoordinateSystem``
    RAS/LPS or 0/1, ``columns``), then one CSV row per point; returned as RAS mm."""
    p = Path(path)
    text = _text(p, "Slicer .fcsv")
    lines = text.splitlines()
    system, columns = _fcsv_header(p, [ln for ln in lines if ln.startswith("#")])
    names: list[str] = []
    xyz: list[list[float]] = []
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise AnatomapError(f"{p}: not a valid .fcsv ({exc})") from None
    at = {c: columns.index(c) for c in ("x", "y", "z", "label") if c in columns}
    for line, row in enumerate(rows, start=1):
        if not row or row[0].startswith("#") or not "".join(row).strip():
            continue
        if len(row) <= max(at[c] for c in "xyz"):
            raise AnatomapError(f"{p}: line {line}: {len(row)} fields, too few for x,y,z")
        xyz.append(_finite(p, f"line {line}", [row[at[c]] for c in "xyz"]))
        label = row[at["label"]] if "label" in at and at["label"] < len(row) else ""
        names.append(label.strip() or f"p{len(names)}")
    if not xyz:
        raise AnatomapError(f"{p}: no points")
    return names, to_ras(np.asarray(xyz), system)


def read_points(
    path: str | Path, coords: str = "RAS", voxel: bool = False
) -> tuple[list[str], np.ndarray]:
    """Names and points ``[N, 3]`` from a points file, chosen by its suffix: ``.mrk.json``
    (Slicer markups), ``.fcsv`` (legacy Slicer) or anything else as CSV. World points come
    back as RAS mm: a CSV's are read in ``coords`` (RAS or LPS), a Slicer file's in its own
    coordinate system. ``voxel=True`` reads template voxel indices ``i,j,k`` from a CSV."""
    p = Path(path)
    name = p.name.lower()
    check_coords(coords)
    if name.endswith((".mrk.json", ".fcsv")):
        if voxel:
            raise AnatomapError(
                f"{p}: a Slicer file holds world points, not voxel indices: drop --voxel"
            )
        return read_points_fcsv(p) if name.endswith(".fcsv") else read_points_slicer(p)
    return read_points_csv(p, coords=coords, voxel=voxel)


def slicer_markup(
    names: Sequence[str],
    xyz_ras: np.ndarray,
    scores: Sequence[float] | np.ndarray | None = None,
    *,
    coords: str = "LPS",
    description: str = "",
) -> dict[str, Any]:
    """One Slicer point list (``"type": "Fiducial"``) of RAS points, positions written in
    ``coords`` (LPS by default, as Slicer writes). A point's score, when given, goes into its
    ``description`` (``score 0.8731``), after ``description``."""
    coords = check_coords(coords)
    pts = from_ras(np.asarray(xyz_ras, np.float64).reshape(-1, 3), coords)
    if len(names) != len(pts) or (scores is not None and len(scores) != len(pts)):
        raise ValueError("names, points and scores must have the same length")
    control = []
    for n, (name, pos) in enumerate(zip(names, pts, strict=True)):
        desc = description
        if scores is not None:
            desc = f"{desc} score {float(scores[n]):.4f}".strip()
        control.append(
            {
                "id": str(n + 1),
                "label": str(name),
                "description": desc,
                "associatedNodeID": "",
                "position": [round(float(v), 4) for v in pos],
                "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0],
                "selected": True,
                "locked": False,
                "visibility": True,
                "positionStatus": "defined",
            }
        )
    return {
        "type": "Fiducial",
        "coordinateSystem": coords,
        "coordinateUnits": "mm",
        "locked": False,
        "fixedNumberOfControlPoints": False,
        "labelFormat": "%N-%d",
        "lastUsedControlPointNumber": len(control),
        "controlPoints": control,
        "measurements": [],
    }


def write_slicer_markups(path: str | Path, markups: Sequence[dict[str, Any]]) -> Path:
    """Write point lists made by :func:`slicer_markup` as one ``.mrk.json`` (atomically)."""
    from anatomap.io.atomic import atomic_write_json

    doc = {"@schema": SLICER_SCHEMA, "markups": list(markups)}
    return atomic_write_json(path, doc, what="Slicer markups")


def write_points_slicer(
    path: str | Path,
    names: Sequence[str],
    xyz_ras: np.ndarray,
    scores: Sequence[float] | np.ndarray | None = None,
    *,
    coords: str = "LPS",
) -> Path:
    """Write RAS points as a Slicer markups file (``.mrk.json``) holding one point list;
    positions in ``coords`` (LPS by default, stated in the file's ``coordinateSystem``)."""
    return write_slicer_markups(path, [slicer_markup(names, xyz_ras, scores, coords=coords)])


def grid_affine(path: str | Path, emb: Any) -> np.ndarray | None:
    """The voxel grid that indices into ``path`` refer to: a scan's own affine, or for a saved
    embedding the preprocessed grid it was made on (``image_affine``; None when unknown)."""
    from anatomap.infer.embed import EMBEDDING_SUFFIX
    from anatomap.io import read_volume

    p = Path(path)
    if not p.name.endswith(EMBEDDING_SUFFIX) and p.exists():
        return np.asarray(read_volume(p).affine, np.float64)
    return None if emb.image_affine is None else np.asarray(emb.image_affine, np.float64)


def voxel_indices(affine: np.ndarray | None, xyz_ras: np.ndarray) -> np.ndarray:
    """Continuous voxel indices ``[N, 3]`` of RAS points in a grid (NaN without a grid)."""
    from anatomap import geometry

    pts = np.asarray(xyz_ras, np.float64).reshape(-1, 3)
    if affine is None:
        return np.full_like(pts, np.nan)
    return np.asarray(geometry.world_to_voxel(affine, pts), np.float64)


def write_match_markups(out: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write ``anatomap match`` rows as Slicer markups: one point list per target, in target
    order, positions in LPS; each point's description names its target and score
    (``in b.nii.gz score 0.9123``)."""
    markups = []
    for target in dict.fromkeys(r["target"] for r in rows):
        mine = [r for r in rows if r["target"] == target]
        xyz = np.array([[r["x"], r["y"], r["z"]] for r in mine], np.float64)
        names, scores = [r["name"] for r in mine], [r["score"] for r in mine]
        markups.append(slicer_markup(names, xyz, scores, description=f"in {target}"))
    return write_slicer_markups(out, markups)
