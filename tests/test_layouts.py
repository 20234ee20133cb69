"""Public data set layouts, as published: tiny fake copies of each index to the expected
subjects, modalities and labels through ``anatomap data index`` (exit code 0), and the layout
is detected and said."""

from __future__ import annotations

import json
import locale
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from anatomap.cli import main
from anatomap.data.cache import build_cache
from anatomap.data.manifest import IndexResult, index_directory, read_manifest
from anatomap.data.volume import Volume
from anatomap.io import write_dicom_series

SHAPE = (8, 8, 6)
AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])


def nii(path: Path, seed: int = 0, shape: tuple[int, ...] = SHAPE, label: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 3, shape).astype(np.uint8) if label else rng.random(shape, np.float32)
    nib.save(nib.Nifti1Image(arr + (0 if label else 0.1), AFFINE), str(path))
    return path


def index_cli(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, *extra: str):
    """``anatomap data index ROOT`` in-process: (exit code, stdout, manifest records)."""
    out = tmp_path / "manifest.jsonl"
    code = main(["data", "index", str(root), "--out", str(out), "--quiet", *extra])
    printed = capsys.readouterr().out
    return code, printed, {s.subject: s for s in read_manifest(out)}


def shape_of(subjects: dict) -> dict[str, tuple[list[str], list[str]]]:
    return {k: (sorted(s.images), sorted(s.labels)) for k, s in subjects.items()}


def test_totalsegmentator(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "Totalsegmentator_dataset"
    for i, sid in enumerate(["s0001", "s0002"]):
        nii(root / sid / "ct.nii.gz", i)
        for organ in ["liver", "spleen", "kidney_left"]:
            nii(root / sid / "segmentations" / f"{organ}.nii.gz", i, label=True)
    (root / "meta.csv").write_text("image_id;age\ns0001;60\n")
    code, out, subs = index_cli(root, tmp_path, capsys)
    assert code == 0
    assert "layout: TotalSegmentator-style folder per subject, because s0001/" in out
    labels = ["kidney_left", "liver", "spleen"]
    assert shape_of(subs) == {"s0001": (["ct"], labels), "s0002": (["ct"], labels)}


def test_kits(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "kits23" / "dataset"
    for i in range(3):
        nii(root / f"case_{i:05d}" / "imaging.nii.gz", i)
        nii(root / f"case_{i:05d}" / "segmentation.nii.gz", i, label=True)
    code, out, subs = index_cli(root, tmp_path, capsys)
    assert code == 0 and "KiTS-style folder per subject" in out
    assert shape_of(subs) == {f"case_{i:05d}": (["imaging"], ["segmentation"]) for i in range(3)}


@pytest.mark.parametrize(
    ("case", "sep", "modalities"),
    [
        ("BraTS2021_00000", "_", ["flair", "t1", "t1ce", "t2"]),
        ("BraTS-GLI-00000-000", "-", ["t1c", "t1n", "t2f", "t2w"]),
    ],
    ids=["brats2021", "brats2023"],
)
def test_brats(
    tmp_path: Path, capsys: pytest.CaptureFixture, case: str, sep: str, modalities: list[str]
) -> None:
    root = tmp_path / "brats"
    second = case[:-1] + "1"
    for sid in (case, second):
        for i, m in enumerate(modalities):
            nii(root / sid / f"{sid}{sep}{m}.nii.gz", i)
        nii(root / sid / f"{sid}{sep}seg.nii.gz", label=True)
    code, out, subs = index_cli(root, tmp_path, capsys)
    assert code == 0 and "BraTS-style folder per subject" in out
    assert shape_of(subs) == {case: (modalities, ["seg"]), second: (modalities, ["seg"])}


def test_msd_4d_channels_become_modalities(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "Task05_Prostate"
    for case in ["prostate_00", "prostate_01"]:
        nii(root / "imagesTr" / f"{case}.nii.gz", shape=(*SHAPE, 2))
        nii(root / "labelsTr" / f"{case}.nii.gz", label=True)
    nii(root / "imagesTs" / "prostate_03.nii.gz", shape=(*SHAPE, 2))
    nii(root / "imagesTr" / "._prostate_00.nii.gz")  # macOS twin in the real tarball
    info = {"name": "Prostate", "modality": {"0": "T2", "1": "ADC"}, "labels": {"0": "bg"}}
    (root / "dataset.json").write_text(json.dumps(info))
    code, out, subs = index_cli(root, tmp_path, capsys)
    assert code == 0 and "layout: Medical Segmentation Decathlon layout, because" in out
    assert shape_of(subs) == {
        "prostate_00": (["ADC", "T2"], ["label"]),
        "prostate_01": (["ADC", "T2"], ["label"]),
        "prostate_03": (["ADC", "T2"], []),
    }
    assert subs["prostate_00"].images["ADC"].volume_index == 1
    assert subs["prostate_03"].meta == {"split": "Ts"}


def test_msd_3d_and_amos(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "Task04_Hippocampus"
    for case in ["hippocampus_001", "hippocampus_003"]:
        nii(root / "imagesTr" / f"{case}.nii.gz")
        nii(root / "labelsTr" / f"{case}.nii.gz", label=True)
    (root / "dataset.json").write_text(json.dumps({"modality": {"0": "MRI"}}))
    code, _, subs = index_cli(root, tmp_path, capsys)
    assert code == 0 and shape_of(subs) == {
        "hippocampus_001": (["MRI"], ["label"]),
        "hippocampus_003": (["MRI"], ["label"]),
    }
    amos = tmp_path / "amos22"  # _0001 numbers the cases, not channels
    for case in ["amos_0001", "amos_0004"]:
        nii(amos / "imagesTr" / f"{case}.nii.gz")
        nii(amos / "labelsTr" / f"{case}.nii.gz", label=True)
    nii(amos / "imagesVa" / "amos_0008.nii.gz")
    code, out, subs = index_cli(amos, tmp_path, capsys)
    assert code == 0 and "no channel suffix" in out
    assert shape_of(subs) == {
        "amos_0001": (["image"], ["label"]),
        "amos_0004": (["image"], ["label"]),
        "amos_0008": (["image"], []),
    }


def test_nnunet_v2_channel_names(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "Dataset005_Prostate"
    for case in ["prostate_00", "prostate_01"]:
        nii(root / "imagesTr" / f"{case}_0000.nii.gz")
        nii(root / "imagesTr" / f"{case}_0001.nii.gz", 1)
        nii(root / "labelsTr" / f"{case}.nii.gz", label=True)
    info = {"channel_names": {"0": "T2", "1": "ADC"}, "labels": {"background": 0}}
    (root / "dataset.json").write_text(json.dumps(info))
    code, out, subs = index_cli(root, tmp_path, capsys)
    assert code == 0 and "layout: nnU-Net raw data set, because" in out
    assert shape_of(subs) == {c: (["ADC", "T2"], ["label"]) for c in ["prostate_00", "prostate_01"]}


def test_ixi(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "IXI"
    for sid in ["IXI002-Guys-0828", "IXI012-HH-1211"]:
        nii(root / f"{sid}-T1.nii.gz")
        nii(root / f"{sid}-T2.nii.gz", 1)
    nii(root / "IXI002-Guys-0828-DTI-00.nii.gz")
    code, out, subs = index_cli(root, tmp_path, capsys)
    assert code == 0 and "layout: IXI-style flat folder" in out
    assert shape_of(subs) == {s: (["T1", "T2"], []) for s in ["IXI002-Guys-0828", "IXI012-HH-1211"]}
    assert "1 x IXI diffusion (DTI) volume" in out


def make_bids(root: Path) -> None:
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.8.0"}')
    (root / "participants.tsv").write_text("participant_id\nsub-01\nsub-02\n")
    for ses in ["1", "2"]:
        nii(root / "sub-01" / f"ses-{ses}" / "anat" / f"sub-01_ses-{ses}_run-1_T1w.nii.gz")
    nii(root / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_run-2_T1w.nii.gz", 5)
    nii(root / "sub-01" / "ses-1" / "func" / "sub-01_ses-1_task-rest_bold.nii.gz", 1, (*SHAPE, 3))
    anat = root / "sub-02" / "anat"
    nii(anat / "sub-02_T1w.nii.gz")
    nii(anat / "sub-02_acq-fast_T2w.nii.gz", 1)
    nii(anat / "sub-02_desc-brain_mask.nii.gz", label=True)
    nii(anat / "sub-02_inv-1_MP2RAGE.nii.gz", 2, (*SHAPE, 2))  # 4-D anat: skipped
    nii(root / "sub-02" / "dwi" / "sub-02_dwi.nii.gz", 3)
    deriv = root / "derivatives" / "fastsurfer" / "sub-02" / "anat"
    nii(deriv / "sub-02_desc-tissue_dseg.nii.gz", label=True)
    nii(root / "sourcedata" / "sub-02" / "raw.nii.gz")


def test_bids_sessions_entities_and_skips(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "ds000001"
    make_bids(root)
    code, out, subs = index_cli(root, tmp_path, capsys)
    assert code == 0 and "layout: BIDS data set, because dataset_description.json" in out
    assert shape_of(subs) == {
        "sub-01_ses-1": (["T1w"], []),
        "sub-01_ses-2": (["T1w"], []),
        "sub-02": (["T1w", "acq-fast_T2w"], ["brain"]),
    }
    s1 = subs["sub-01_ses-1"]
    assert s1.meta == {"participant": "sub-01", "session": "ses-1"}
    assert s1.images["T1w"].path.endswith("run-1_T1w.nii.gz")
    assert s1.images["T1w"].meta["entities"] == {"sub": "01", "ses": "1", "run": "1"}
    assert "subjects: 3 (1 participant(s) with sessions)" in out
    for why in ["BIDS func/ data", "BIDS dwi/ data", "4-D image (2 volumes)", "another run"]:
        assert why in out
    assert "BIDS derivatives: skipped" in out and "BIDS sourcedata" in out
    with_derivatives = index_directory(root, derivatives=True)
    assert sorted(with_derivatives.subjects[2].labels) == ["brain", "tissue"]


def test_bids_without_description_file(tmp_path: Path) -> None:
    nii(tmp_path / "sub-a" / "anat" / "sub-a_T1w.nii.gz")
    nii(tmp_path / "sub-b" / "anat" / "sub-b_T1w.nii.gz")
    result = index_directory(tmp_path)
    assert result.layout == "bids" and [s.subject for s in result.subjects] == ["sub-a", "sub-b"]


def dicom(folder: Path, patient: str, modality: str, description: str, seed: int) -> list[Path]:
    lps = np.diag([-0.8, -0.8, 2.0, 1.0])
    arr = np.random.default_rng(seed).integers(0, 500, SHAPE).astype(np.int16)
    vol = Volume(arr, lps, subject=patient)
    return write_dicom_series(vol, folder, modality=modality, series_description=description)


def same_study(files: list[Path], like: Path) -> None:
    uid = pydicom.dcmread(like, stop_before_pixels=True).StudyInstanceUID
    for f in files:
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID = uid
        ds.save_as(f)


def test_dicom_tree(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "export"
    first = dicom(root / "p-one" / "STUDY1" / "SERIES1", "PAT1", "CT", "abdomen", 0)
    second = dicom(root / "p-one" / "STUDY1" / "SERIES2", "PAT1", "CT", "thorax", 1)
    same_study(second, first[0])
    # two series of another patient in one folder: split by SeriesInstanceUID
    mixed = root / "p-two" / "DICOM"
    ct = dicom(mixed, "PAT2", "CT", "plain", 2)
    mr = dicom(tmp_path / "other", "PAT2", "MR", "t2", 3)
    same_study(mr, ct[0])
    for f in mr:
        shutil.move(f, mixed / f"b{f.name}")
    code, out, subs = index_cli(root, tmp_path, capsys)
    assert code == 0 and "layout: DICOM tree, because it holds DICOM files" in out
    assert shape_of(subs) == {"PAT1": (["CT_abdomen", "CT_thorax"], []), "PAT2": (["CT", "MR"], [])}
    mr = subs["PAT2"].images["MR"]
    assert mr.series and mr.path == str(mixed.resolve()) and mr.meta["series_description"] == "t2"


def test_writing_dicom_leaves_the_locale_alone(tmp_path: Path) -> None:
    """GDCM's writer set the process locale to "C": later text reads then failed as ASCII."""
    before = locale.setlocale(locale.LC_ALL)
    dicom(tmp_path / "d", "P", "CT", "x", 0)
    assert locale.setlocale(locale.LC_ALL) == before


def test_dicom_patient_with_two_studies(tmp_path: Path) -> None:
    dicom(tmp_path / "a" / "1", "PAT1", "CT", "x", 0)
    dicom(tmp_path / "a" / "2", "PAT1", "CT", "x", 1)  # a new StudyInstanceUID
    result = index_directory(tmp_path)
    assert sorted(s.subject for s in result.subjects) == ["PAT1_study1", "PAT1_study2"]


def test_forced_layout_and_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "one"
    nii(root / "s0001" / "ct.nii.gz")  # one folder, nothing to detect: the flat rules apply
    assert [s.subject for s in index_directory(root).subjects] == ["ct"]
    forced = index_directory(root, layout="folder-per-subject")
    assert [s.subject for s in forced.subjects] == ["s0001"]
    assert "--layout folder-per-subject was given" in forced.layout_reason
    code = main(["data", "index", str(root), "--layout", "folder-per-subject", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0 and "subjects: 1" in out and "images: ct 1" in out and "dry run" in out
    assert list(tmp_path.glob("*.jsonl")) == []


def test_summary_round_trips_in_the_result(tmp_path: Path) -> None:
    make_bids(tmp_path / "ds")
    result = index_directory(tmp_path / "ds")
    back = IndexResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert back == result and back.layout == "bids" and len(back.skipped) >= 5


def test_msd_channels_and_dicom_series_reach_the_cache(tmp_path: Path) -> None:
    """The cache reads the volume (MSD) or the series (DICOM) each record names."""
    msd = tmp_path / "msd"
    arr = np.random.default_rng(0).random((*SHAPE, 2), np.float32) + 1.0
    (msd / "imagesTr").mkdir(parents=True)
    nib.save(nib.Nifti1Image(arr, AFFINE), str(msd / "imagesTr" / "p_00.nii.gz"))
    (msd / "dataset.json").write_text(json.dumps({"modality": {"0": "T2", "1": "ADC"}}))
    res = build_cache(index_directory(msd).subjects, tmp_path / "c1", preset="none", spacing=None)
    image = np.asarray(res.cache["p_00"].image, np.float32)
    assert res.problems == [] and res.cache.modalities == ["ADC", "T2"]
    np.testing.assert_allclose(image[1], arr[..., 0], rtol=1e-3)  # T2 is volume 0
    np.testing.assert_allclose(image[0], arr[..., 1], rtol=1e-3)
    mixed = tmp_path / "dcm" / "p"
    ct = dicom(mixed, "PAT2", "CT", "plain", 2)
    mr = dicom(tmp_path / "other", "PAT2", "MR", "t2", 3)
    same_study(mr, ct[0])
    for f in mr:
        shutil.move(f, mixed / f"b{f.name}")
    res = build_cache(index_directory(tmp_path / "dcm").subjects, tmp_path / "c2", spacing=None)
    assert res.problems == [] and res.cache.modalities == ["CT", "MR"]
    image = np.asarray(res.cache["PAT2"].image, np.float32)
    assert not np.allclose(image[0], image[1])
