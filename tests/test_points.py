"""Points files: CSV in RAS or LPS, template voxel indices, 3D Slicer ``.mrk.json`` (read and
written) and legacy ``.fcsv`` (read); and ``api.match`` reading them and writing markups."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from _position_maps import position_embedding as _embedding

from anatomap import api, geometry
from anatomap.errors import AnatomapError
from anatomap.infer import match as match_module
from anatomap.infer.points import (
    SLICER_SCHEMA,
    read_points,
    to_ras,
    write_points_slicer,
)

RAS = np.array([[10.5, -20.25, 30.0], [-1.0, 2.0, -3.5]])
NAMES = ["nasion", "left ear"]

# A point list as 3D Slicer 5.6 saves it (Save data -> .mrk.json), display block shortened.
SLICER5 = """{
"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/markups-schema-v1.0.3.json#",
"markups": [
    {
        "type": "Fiducial",
        "coordinateSystem": "LPS",
        "coordinateUnits": "mm",
        "locked": false,
        "fixedNumberOfControlPoints": false,
        "labelFormat": "%N-%d",
        "lastUsedControlPointNumber": 3,
        "controlPoints": [
            {
                "id": "1",
                "label": "F-1",
                "description": "",
                "associatedNodeID": "vtkMRMLScalarVolumeNode1",
                "position": [-10.5, 20.25, 30.0],
                "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0],
                "selected": true,
                "locked": false,
                "visibility": true,
                "positionStatus": "defined"
            },
            {
                "id": "2",
                "label": "F-2",
                "description": "",
                "associatedNodeID": "vtkMRMLScalarVolumeNode1",
                "position": [1.0, -2.0, -3.5],
                "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0],
                "selected": true,
                "locked": false,
                "visibility": true,
                "positionStatus": "defined"
            },
            {
                "id": "3",
                "label": "F-3",
                "description": "",
                "associatedNodeID": "",
                "position": [0.0, 0.0, 0.0],
                "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0],
                "selected": true,
                "locked": false,
                "visibility": true,
                "positionStatus": "undefined"
            }
        ],
        "measurements": [],
        "display": {
            "visibility": true,
            "opacity": 1.0,
            "color": [0.4, 1.0, 1.0],
            "glyphType": "Sphere3D",
            "glyphScale": 3.0
        }
    }
]
}
"""

FCSV_LPS = """# Markups fiducial file version = 5.6
# CoordinateSystem = LPS
# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID
1,-10.5,20.25,30,0,0,0,1,1,1,0,nasion,,vtkMRMLScalarVolumeNode1
2,1,-2,-3.5,0,0,0,1,1,1,0,left ear,"a, quoted desc",vtkMRMLScalarVolumeNode1
"""

FCSV_OLD_RAS = """# Markups fiducial file version = 4.6
# CoordinateSystem = 0
# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID
vtkMRMLMarkupsFiducialNode_0,10.5,-20.25,30,0,0,0,1,1,1,0,nasion,,
vtkMRMLMarkupsFiducialNode_1,-1,2,-3.5,0,0,0,1,1,1,0,left ear,,
"""


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("coords", ["RAS", "LPS", "lps"])
def test_csv_round_trip_in_ras_and_lps(tmp_path: Path, coords: str) -> None:
    xyz = RAS * ([-1, -1, 1] if coords.upper() == "LPS" else 1)
    lines = ["name,x,y,z", *(f"{n},{a},{b},{c}" for n, (a, b, c) in zip(NAMES, xyz, strict=True))]
    names, got = read_points(_write(tmp_path / "p.csv", "\n".join(lines) + "\n"), coords=coords)
    assert names == NAMES and np.allclose(got, RAS)


def test_csv_voxel_indices_are_returned_as_written(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.csv", "name,i,j,k\nA,1,2,3\n")
    names, got = read_points(path, coords="LPS", voxel=True)  # coords: no effect on indices
    assert names == ["A"] and got.tolist() == [[1.0, 2.0, 3.0]]


def test_match_read_points_still_reads_bom_csv_and_refuses_latin1(tmp_path: Path) -> None:
    bom = tmp_path / "bom.csv"
    bom.write_bytes("\ufeffName,X,Y,Z\nA,1,2,3\n".encode())
    assert match_module.read_points(bom)[0] == ["A"]
    latin = tmp_path / "latin.csv"
    latin.write_bytes("name,x,y,z\ncaf\xe9,1,2,3\n".encode("latin-1"))
    with pytest.raises(AnatomapError, match=r"latin\.csv: points CSV is not UTF-8"):
        match_module.read_points(latin)


@pytest.mark.parametrize("coords", ["LPS", "RAS"])
def test_markups_round_trip(tmp_path: Path, coords: str) -> None:
    path = write_points_slicer(tmp_path / "p.mrk.json", NAMES, RAS, [0.9, 0.12345], coords=coords)
    doc = json.loads(path.read_text())
    assert doc["@schema"] == SLICER_SCHEMA
    (markup,) = doc["markups"]
    assert markup["type"] == "Fiducial" and markup["coordinateSystem"] == coords
    cp = markup["controlPoints"]
    assert [c["label"] for c in cp] == NAMES and cp[1]["description"] == "score 0.1235"
    stored = np.array([c["position"] for c in cp])
    assert np.allclose(stored, RAS * ([-1, -1, 1] if coords == "LPS" else 1))
    names, got = read_points(path, coords="RAS")
    assert names == NAMES and np.allclose(got, RAS)
    # the file's own system wins over the coords argument (which is for CSVs)
    assert np.allclose(read_points(path, coords="LPS")[1], RAS)


def test_lps_written_then_read_back_equals_the_ras_input(tmp_path: Path) -> None:
    lps_csv = "name,x,y,z\n" + "".join(
        f"{n},{a},{b},{c}\n" for n, (a, b, c) in zip(NAMES, to_ras(RAS, "LPS"), strict=True)
    )
    assert np.allclose(read_points(_write(tmp_path / "l.csv", lps_csv), coords="LPS")[1], RAS)
    path = write_points_slicer(tmp_path / "l.mrk.json", NAMES, RAS)  # LPS by default
    assert json.loads(path.read_text())["markups"][0]["coordinateSystem"] == "LPS"
    assert np.allclose(read_points(path)[1], RAS)


def test_reads_a_markups_file_as_slicer5_writes_it(tmp_path: Path) -> None:
    names, got = read_points(_write(tmp_path / "F.mrk.json", SLICER5))
    assert names == ["F-1", "F-2"]  # the undefined placeholder F-3 is skipped
    assert np.allclose(got, RAS)


@pytest.mark.parametrize("text", [FCSV_LPS, FCSV_OLD_RAS], ids=["lps-5.6", "ras-4.6"])
def test_reads_legacy_fcsv(tmp_path: Path, text: str) -> None:
    names, got = read_points(_write(tmp_path / "F.fcsv", text), coords="LPS")
    assert names == NAMES and np.allclose(got, RAS)


@pytest.mark.parametrize(
    ("name", "text", "problem"),
    [
        ("a.mrk.json", '{"markups": [', "not valid JSON (line 1"),
        ("b.mrk.json", '{"points": []}', 'no "markups" list'),
        ("deep.mrk.json", "[" * 100_000, "not valid JSON (maximum recursion"),
        ("c.mrk.json", '{"markups": [{"type": "Fiducial", "controlPoints": []}]}', "no control"),
        ("d.mrk.json", '{"markups": [{"type": "Line", "controlPoints": []}]}', "no control"),
        (
            "e.mrk.json",
            '{"markups": [{"type": "Fiducial", "controlPoints": [{"position": [1, "x", 2]}]}]}',
            "markups[0].controlPoints[0]: coordinates must be numbers",
        ),
        (
            "f.mrk.json",
            '{"markups": [{"type": "Fiducial", "controlPoints": [{"position": [1, 2]}]}]}',
            "needs 3 numbers, not 2",
        ),
        (
            "g.mrk.json",
            '{"markups": [{"type": "Fiducial", "coordinateSystem": "IJK", '
            '"controlPoints": [{"position": [1, 2, 3]}]}]}',
            "coordinateSystem 'IJK'",
        ),
        ("h.fcsv", "# CoordinateSystem = 2\n1,1,2,3\n", "CoordinateSystem '2' not supported"),
        ("i.fcsv", "# CoordinateSystem = LPS\n1,1,nan,3,0,0,0,1,1,1,0,A,,\n", "finite"),
        ("j.fcsv", "# CoordinateSystem = LPS\n1,1\n", "line 2: 2 fields, too few"),
        ("k.fcsv", "# columns = id,label\n", "lacks x,y,z"),
        ("l.fcsv", "# CoordinateSystem = LPS\n", "no points"),
        ("m.csv", "name,a,b,c\nA,1,2,3\n", "needs columns x,y,z"),
        ("n.csv", "name,x,y,z\nA,1,inf,3\n", "line 2: coordinates must be finite"),
        ("o.csv", "name,x,y,z\n", "no points"),
    ],
)
def test_broken_files_give_one_line_naming_the_file(
    tmp_path: Path, name: str, text: str, problem: str
) -> None:
    path = _write(tmp_path / name, text)
    with pytest.raises(AnatomapError) as info:
        read_points(path)
    msg = str(info.value)
    assert msg.startswith(str(path)) and "\n" not in msg and problem in msg, msg


def test_bad_arguments(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.csv", "x,y,z\n1,2,3\n")
    with pytest.raises(AnatomapError, match="must be RAS or LPS"):
        read_points(path, coords="LIP")
    mrk = write_points_slicer(tmp_path / "p.mrk.json", ["A"], RAS[:1])
    with pytest.raises(AnatomapError, match="not voxel indices"):
        read_points(mrk, voxel=True)


# -- api.match: points in LPS, markups out, target voxel indices --------------------------


def test_api_match_reads_lps_and_writes_markups_with_voxel_indices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = np.diag([2.0, 2.0, 2.0, 1.0])
    a[:3, 3] = [-40, -50, -30]
    b = np.diag([-2.0, 2.0, 2.0, 1.0])
    b[:3, 3] = [38, -44, -36]
    scan = tmp_path / "b.nii.gz"  # a target scan: indices in its own grid
    nib.save(nib.Nifti1Image(np.zeros((40, 44, 34), np.float32), b), str(scan))
    embs = {
        "t.emb.safetensors": _embedding(a, (40, 48, 36)),
        str(scan): _embedding(b, (40, 44, 34)),
    }
    embs["c.emb.safetensors"] = embs[str(scan)]  # a saved embedding: its image_affine
    monkeypatch.setattr(api, "_model", lambda c: SimpleNamespace(ckpt=None))
    monkeypatch.setattr(api, "load_or_embed", lambda m, p, **k: embs[str(p)])
    pts = np.array([[0.0, 0.0, 0.0], [10.0, -20.0, 5.0]])
    lps = "name,x,y,z\n" + "".join(f"q{n},{-x},{-y},{z}\n" for n, (x, y, z) in enumerate(pts))
    targets = [scan, "c.emb.safetensors"]
    out = tmp_path / "m.mrk.json"
    rows = api.match(
        "ck", "t.emb.safetensors", _write(tmp_path / "p.csv", lps), targets, coords="LPS", out=out
    ).rows()
    got = np.array([[r["x"], r["y"], r["z"]] for r in rows])
    assert np.linalg.norm(got - np.vstack([pts, pts]), axis=1).max() <= 2 * math.sqrt(3) + 1e-6
    ijk = np.array([[r["i"], r["j"], r["k"]] for r in rows])
    assert np.allclose(geometry.voxel_to_world(b, ijk), got, atol=0.05)
    doc = json.loads(out.read_text())
    assert len(doc["markups"]) == 2 and not out.with_name("m.mrk.json.json").exists()
    assert doc["markups"][1]["controlPoints"][0]["description"].startswith("in c.emb.safetensors")
    names, back = read_points(out)
    assert names == ["q0", "q1", "q0", "q1"] and np.allclose(back, got, atol=1e-3)
    csv_rows = api.match("ck", "t.emb.safetensors", pts, [scan], out=tmp_path / "m.csv").rows()
    header = (tmp_path / "m.csv").read_text().splitlines()[0]
    assert header.startswith("target,name,template_x") and ",z,i,j,k,score," in header
    assert csv_rows[0]["i"] == rows[0]["i"]
