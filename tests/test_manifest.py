"""Manifest discovery (BIDS, BraTS, nnU-Net, DICOM), tables, JSONL round trips, provenance."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from anatomap.data.manifest import (
    ImageRecord,
    IndexResult,
    ManifestError,
    Problem,
    SubjectRecord,
    index_directory,
    load_landmarks,
    manifest_fingerprint,
    problems_path,
    read_manifest,
    read_problems,
    write_manifest,
)
from anatomap.data.volume import Volume
from anatomap.errors import AnatomapError
from anatomap.io import write_volume
from anatomap.io.writers import write_dicom_series

N = 16
AFFINE = np.array([[1.0, 0, 0, -8], [0, 1.2, 0, -9], [0, 0, 2.0, -10], [0, 0, 0, 1]])


def img(path: Path, seed: int = 0, shape=(N, N, N)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    return write_volume(Volume(arr, AFFINE), path)


def seg(path: Path, n_labels: int = 3) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (np.arange(N**3).reshape(N, N, N) % n_labels).astype(np.uint8)
    nib.save(nib.Nifti1Image(arr, AFFINE), path)
    return path


def landmarks(path: Path, rows: str = "apex,1.0,2.0,3.0\nbase,-4,5.5,6\n") -> Path:
    path.write_text("name,x,y,z\n" + rows)
    return path


def by_id(result: IndexResult) -> dict[str, SubjectRecord]:
    return {s.subject: s for s in result.subjects}


def test_bids_layout(tmp_path: Path) -> None:
    anat1 = tmp_path / "sub-001" / "anat"
    img(anat1 / "sub-001_T1w.nii.gz")
    img(anat1 / "sub-001_T2w.nii.gz", seed=1)
    seg(anat1 / "sub-001_tissue_dseg.nii.gz")
    landmarks(anat1 / "sub-001_landmarks.csv")
    img(tmp_path / "sub-002" / "anat" / "sub-002_T1w.nii.gz", seed=2)
    (tmp_path / "dataset_description.json").write_text("{}")
    result = index_directory(tmp_path)
    assert result.problems == []
    subs = by_id(result)
    assert list(subs) == ["sub-001", "sub-002"]
    s1 = subs["sub-001"]
    assert sorted(s1.images) == ["T1w", "T2w"]
    assert list(s1.labels) == ["tissue"]
    assert s1.labels["tissue"].values == [0, 1, 2]
    assert s1.images["T1w"].intensity is not None
    assert s1.landmarks == str((anat1 / "sub-001_landmarks.csv").resolve())
    assert s1.missing == []
    assert subs["sub-002"].missing == ["T2w"]
    rec = s1.images["T1w"]
    assert rec.shape == (N, N, N)
    assert rec.spacing == (1.0, 1.2, 2.0)
    assert rec.orientation == "RAS"
    np.testing.assert_allclose(rec.affine, AFFINE)
    assert Path(rec.path).is_absolute()
    assert result.modalities == ["T1w", "T2w"]


def test_brats_layout(tmp_path: Path) -> None:
    case = tmp_path / "BraTS20_Training_001"
    for i, m in enumerate(["t1", "t1ce", "t2", "flair"]):
        img(case / f"BraTS20_Training_001_{m}.nii.gz", seed=i)
    seg(case / "BraTS20_Training_001_seg.nii.gz", n_labels=4)
    img(tmp_path / "BraTS20_Training_002" / "BraTS20_Training_002_t1.nii.gz")
    result = index_directory(tmp_path)
    assert result.problems == []
    s1 = by_id(result)["BraTS20_Training_001"]
    assert sorted(s1.images) == ["flair", "t1", "t1ce", "t2"]
    assert list(s1.labels) == ["seg"]
    assert by_id(result)["BraTS20_Training_002"].missing == ["flair", "t1ce", "t2"]


def test_nnunet_layout(tmp_path: Path) -> None:
    for case in ["case_1", "case_10"]:
        img(tmp_path / "imagesTr" / f"{case}_0000.nii.gz")
        img(tmp_path / "imagesTr" / f"{case}_0001.nii.gz", seed=1)
        seg(tmp_path / "labelsTr" / f"{case}.nii.gz")
    result = index_directory(tmp_path)
    assert result.problems == []
    subs = by_id(result)
    assert sorted(subs) == ["case_1", "case_10"]
    for s in subs.values():
        assert sorted(s.images) == ["0000", "0001"]
        assert list(s.labels) == ["label"]
    assert subs["case_10"].labels["label"].path.endswith("labelsTr/case_10.nii.gz")


def test_name_without_underscore_and_orphan_label(tmp_path: Path) -> None:
    img(tmp_path / "scan.nii.gz")
    seg(tmp_path / "ghost_seg.nii.gz")
    landmarks(tmp_path / "nobody_landmarks.csv")
    result = index_directory(tmp_path)
    assert list(by_id(result)["scan"].images) == ["image"]
    reasons = {Path(p.path).name: p.reason for p in result.problems}
    assert "matches no image subject" in reasons["ghost_seg.nii.gz"]
    assert "matches no image subject" in reasons["nobody_landmarks.csv"]


def test_custom_label_suffixes(tmp_path: Path) -> None:
    img(tmp_path / "p1_ct.nii.gz")
    seg(tmp_path / "p1_liver_mask.nii.gz")
    result = index_directory(tmp_path, label_suffixes=("mask",))
    assert list(by_id(result)["p1"].labels) == ["liver"]


def test_dicom_folder_subject_and_modality(tmp_path: Path) -> None:
    lps = np.diag([-1.0, -1.0, 2.0, 1.0])
    arr = np.random.default_rng(0).integers(0, 100, size=(N, N, N)).astype(np.int16)
    write_dicom_series(Volume(arr, lps), tmp_path / "patient7", modality="MR")
    img(tmp_path / "other_CT.nii.gz")
    result = index_directory(tmp_path)
    assert result.problems == []
    s = by_id(result)["patient7"]
    assert list(s.images) == ["MR"]
    assert s.images["MR"].path == str((tmp_path / "patient7").resolve())
    assert s.missing == ["CT"]


def test_bad_landmarks_are_a_problem(tmp_path: Path) -> None:
    img(tmp_path / "a_T1w.nii.gz")
    landmarks(tmp_path / "a_landmarks.csv", rows="apex,1,2,oops\n")
    result = index_directory(tmp_path)
    assert by_id(result)["a"].landmarks is None
    assert "line 2" in result.problems[0].reason


def test_load_landmarks(tmp_path: Path) -> None:
    lm = load_landmarks(landmarks(tmp_path / "x_landmarks.csv"))
    assert list(lm) == ["apex", "base"]
    np.testing.assert_allclose(lm["base"], [-4.0, 5.5, 6.0])
    (tmp_path / "bad.csv").write_text("name,x,y\napex,1,2\n")
    with pytest.raises(ManifestError, match="missing column"):
        load_landmarks(tmp_path / "bad.csv")
    landmarks(tmp_path / "dup.csv", rows="a,1,2,3\na,1,2,3\n")
    with pytest.raises(ManifestError, match="line 3: duplicate"):
        load_landmarks(tmp_path / "dup.csv")


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------


def test_table_overrides_discovery(tmp_path: Path) -> None:
    data = tmp_path / "scans"
    img(data / "x1.nii.gz")
    img(data / "x2.nii.gz", seed=1)
    seg(data / "m.nii.gz")
    img(data / "ignored_T1w.nii.gz")  # not in the table: not indexed
    lm = landmarks(data / "pts.csv")
    table = tmp_path / "table.csv"
    table.write_text(
        "subject,modality,path,kind\n"
        "p1,T1,scans/x1.nii.gz,image\n"
        f"p1,T2,{(data / 'x2.nii.gz').resolve()},\n"
        "p1,liver,scans/m.nii.gz,label\n"
        "p1,,scans/pts.csv,landmarks\n"
        "p2,T1,scans/gone.nii.gz,image\n"
    )
    result = index_directory(tmp_path / "elsewhere", table=table)
    subs = by_id(result)
    assert list(subs) == ["p1"]
    assert sorted(subs["p1"].images) == ["T1", "T2"]
    assert list(subs["p1"].labels) == ["liver"]
    assert subs["p1"].landmarks == str(lm.resolve())
    assert [(Path(p.path).name, p.reason) for p in result.problems] == [
        ("gone.nii.gz", "file not found")
    ]


def test_table_errors(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text("subject,path\na,x.nii\n")
    with pytest.raises(ManifestError, match="missing column"):
        index_directory(tmp_path, table=table)
    table.write_text("subject,modality,path,kind\na,T1,x.nii,mask\n")
    with pytest.raises(ManifestError, match="line 2"):
        index_directory(tmp_path, table=table)
    with pytest.raises(ManifestError, match="not found"):
        index_directory(tmp_path, table=tmp_path / "none.csv")


# --------------------------------------------------------------------------------------------
# manifest files
# --------------------------------------------------------------------------------------------


def make_dataset(root: Path) -> IndexResult:
    img(root / "sub-01_T1w.nii.gz")
    img(root / "sub-01_T2w.nii.gz", seed=1)
    seg(root / "sub-01_dseg.nii.gz")
    landmarks(root / "sub-01_landmarks.csv")
    img(root / "sub-02_T1w.nii.gz", seed=2)
    (root / "sub-03_T1w.nii").write_bytes(b"")
    return index_directory(root)


def test_jsonl_round_trip(tmp_path: Path) -> None:
    result = make_dataset(tmp_path / "data")
    out = write_manifest(result, tmp_path / "out" / "manifest.jsonl")
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["subject"] for line in lines)
    back = read_manifest(out)
    assert [s.to_dict() for s in back] == [s.to_dict() for s in result.subjects]
    assert back[0].labels["dseg"].values == [0, 1, 2]
    side = problems_path(out)
    assert side.name == "manifest.problems.jsonl"
    assert [p.to_dict() for p in read_problems(out)] == [p.to_dict() for p in result.problems]
    # no problems -> no (stale) problems file
    write_manifest(result.subjects, out)
    assert not side.exists()
    assert not [f for f in os.listdir(out.parent) if ".tmp" in f]


def test_records_from_dict_round_trip() -> None:
    rec = ImageRecord("/x.nii", (2, 3, 4), (1.0, 1.0, 1.0), "RAS", np.eye(4).tolist(), "int16")
    sub = SubjectRecord("s", images={"T1": rec}, missing=["T2"])
    assert SubjectRecord.from_dict(json.loads(json.dumps(sub.to_dict()))) == sub
    prob = Problem("/y.nii", "bad")
    assert Problem.from_dict(prob.to_dict()) == prob
    result = IndexResult([sub], [prob])
    assert IndexResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_malformed_manifest_lines(tmp_path: Path) -> None:
    result = make_dataset(tmp_path / "data")
    out = write_manifest(result, tmp_path / "m.jsonl")
    good = out.read_text().splitlines()
    out.write_text(good[0] + "\n{not json\n")
    with pytest.raises(ManifestError, match=r"m\.jsonl: line 2: not valid JSON"):
        read_manifest(out)
    out.write_text(good[0] + '\n{"images": {}}\n')
    with pytest.raises(ManifestError, match="line 2: missing field 'subject'"):
        read_manifest(out)
    out.write_text(good[0] + "\n" + good[0] + "\n")
    with pytest.raises(ManifestError, match="line 2: subject sub-01 already on line 1"):
        read_manifest(out)
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(tmp_path / "none.jsonl")


def test_deleted_file_detected(tmp_path: Path) -> None:
    result = make_dataset(tmp_path / "data")
    out = write_manifest(result, tmp_path / "m.jsonl")
    gone = tmp_path / "data" / "sub-01_T2w.nii.gz"
    gone.unlink()
    with pytest.raises(AnatomapError, match=r"sub-01_T2w\.nii\.gz") as info:
        read_manifest(out)
    assert info.value.missing == [str(gone.resolve())]
    assert len(read_manifest(out, check_files=False)) == 2


def test_relative_paths_resolve_against_manifest(tmp_path: Path) -> None:
    result = make_dataset(tmp_path / "data")
    for s in result.subjects:
        for r in s.images.values():
            r.path = os.path.relpath(r.path, tmp_path)
    out = write_manifest(result.subjects, tmp_path / "m.jsonl")
    back = read_manifest(out)
    assert back[0].images["T1w"].path == str((tmp_path / "data" / "sub-01_T1w.nii.gz").resolve())


def test_fingerprint_tracks_files(tmp_path: Path) -> None:
    result = make_dataset(tmp_path / "data")
    fp = manifest_fingerprint(result.subjects)
    assert (
        fp == manifest_fingerprint(result) == manifest_fingerprint(list(reversed(result.subjects)))
    )
    assert len(fp) == 64
    target = tmp_path / "data" / "sub-02_T1w.nii.gz"
    img(target, seed=99)
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert manifest_fingerprint(result.subjects) != fp
