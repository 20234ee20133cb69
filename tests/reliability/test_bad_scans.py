"""Bad scans: each is reported as a Problem naming the file; good files are still indexed."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from anatomap import geometry
from anatomap.data.manifest import IndexResult, index_directory
from anatomap.data.volume import Volume
from anatomap.errors import VolumeError
from anatomap.io import read_volume, write_volume
from anatomap.io.writers import write_dicom_series

N = 16


def vol(shape=(N, N, N), affine=None, seed: int = 0) -> Volume:
    arr = np.random.default_rng(seed).normal(size=shape).astype(np.float32) * 50
    return Volume(arr, np.diag([1.0, 1.2, 2.0, 1.0]) if affine is None else affine)


def save_nifti(path: Path, array: np.ndarray, affine=None) -> Path:
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)
    return path


def with_good(root: Path) -> Path:
    """A folder holding one good subject (``good``, modality T1w)."""
    root.mkdir(parents=True, exist_ok=True)
    write_volume(vol(), root / "good_T1w.nii.gz")
    return root


def assert_reported(result: IndexResult, path: Path, *substrings: str) -> None:
    found = result.problems_for(path)
    assert found, f"no problem for {path}; problems: {[str(p) for p in result.problems]}"
    reason = found[0].reason.lower()
    for s in substrings:
        assert s.lower() in reason, f"{s!r} not in {found[0].reason!r}"


def assert_good_indexed(result: IndexResult) -> None:
    subjects = {s.subject: s for s in result.subjects}
    assert "good" in subjects
    assert "T1w" in subjects["good"].images


def index(root: Path) -> IndexResult:
    result = index_directory(root)
    assert_good_indexed(result)
    return result


def patch_pixdim(path: Path, pixdim: list[float]) -> None:
    """Overwrite the (uncompressed) NIfTI-1 pixdim[1:4] bytes: nibabel refuses to write them."""
    raw = bytearray(path.read_bytes())
    raw[80:92] = struct.pack("<3f", *pixdim)
    path.write_bytes(bytes(raw))


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


def test_truncated_nii_gz(tmp_path: Path) -> None:
    root = with_good(tmp_path / "data")
    bad = write_volume(vol(), root / "bad_T1w.nii.gz")
    content = bad.read_bytes()
    bad.write_bytes(content[: len(content) // 2])
    assert_reported(index(root), bad, "gzip")


def test_zero_byte_file(tmp_path: Path) -> None:
    root = with_good(tmp_path / "data")
    bad = root / "bad_T1w.nii.gz"
    bad.touch()
    assert_reported(index(root), bad, "empty file", "0 bytes")


def test_text_file_named_nii(tmp_path: Path) -> None:
    root = with_good(tmp_path / "data")
    bad = root / "bad_T1w.nii"
    bad.write_text("subject,age\nbad,42\n" * 30)
    assert_reported(index(root), bad, "not a nifti")


def test_text_file_named_mha(tmp_path: Path) -> None:
    root = with_good(tmp_path / "data")
    bad = root / "bad_T1w.mha"
    bad.write_text("this is not an image\n")
    assert_reported(index(root), bad, "not a readable image")


def test_nan_voxel(tmp_path: Path) -> None:
    root = with_good(tmp_path / "data")
    arr = vol().array
    arr[3, 4, 5] = np.nan
    arr[1, 1, 1] = np.nan
    bad = save_nifti(root / "bad_T1w.nii.gz", arr)
    assert_reported(index(root), bad, "2 NaN")


def test_inf_voxel(tmp_path: Path) -> None:
    root = with_good(tmp_path / "data")
    arr = vol().array
    arr[0, 0, 0] = np.inf
    bad = write_volume(Volume(arr, np.eye(4)), root / "bad_T1w.nrrd")
    assert_reported(index(root), bad, "1 Inf")


def test_nan_allowed_when_not_checked(tmp_path: Path) -> None:
    arr = vol().array
    arr[0, 0, 0] = np.nan
    save_nifti(tmp_path / "a_T1w.nii", arr)
    result = index_directory(tmp_path, check_finite=False)
    assert [s.subject for s in result.subjects] == ["a"]


def test_4d_image(tmp_path: Path) -> None:
    root = with_good(tmp_path / "data")
    bad = save_nifti(root / "bad_T1w.nii.gz", vol((N, N, N, 3)).array)
    assert_reported(index(root), bad, "4-D image with 3 volumes", "volume_index")


def test_2d_where_3d_expected(tmp_path: Path) -> None:
    root = with_good(tmp_path / "data")
    bad = save_nifti(root / "bad_T1w.nii.gz", vol((N, N)).array)
    assert_reported(index(root), bad, "2-D image", "3-D is expected")


@pytest.mark.parametrize(
    ("pixdim", "reason"),
    [([1.0, 0.0, 1.0], "zero voxel spacing"), ([1.0, -2.0, 1.0], "negative voxel spacing")],
)
def test_bad_nifti_spacing(tmp_path: Path, pixdim: list[float], reason: str) -> None:
    root = with_good(tmp_path / "data")
    bad = save_nifti(root / "bad_T1w.nii", vol().array)
    patch_pixdim(bad, pixdim)
    assert_reported(index(root), bad, reason)


def test_nan_spacing_qform_only(tmp_path: Path) -> None:
    root = with_good(tmp_path / "data")
    img = nib.Nifti1Image(vol().array, None)
    img.header["pixdim"][1:4] = [1.0, np.nan, 1.0]
    img.header.set_sform(None, code=0)
    bad = root / "bad_T1w.nii"
    nib.save(img, bad)
    assert_reported(index(root), bad, "nan")


def test_zero_spacing_mha(tmp_path: Path) -> None:
    root = with_good(tmp_path / "data")
    header = (
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        "CompressedData = False\nTransformMatrix = 1 0 0 0 1 0 0 0 1\nOffset = 0 0 0\n"
        f"ElementSpacing = 1 0 1\nDimSize = {N} {N} {N}\nElementType = MET_FLOAT\n"
        "ElementDataFile = LOCAL\n"
    )
    bad = root / "bad_T1w.mha"
    bad.write_bytes(header.encode() + vol().array.tobytes())
    assert_reported(index(root), bad, "zero")


def test_singular_affine(tmp_path: Path) -> None:
    root = with_good(tmp_path / "data")
    affine = np.array([[1.0, 1.0, 0, 0], [0, 0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1]])
    bad = save_nifti(root / "bad_T1w.nii.gz", vol().array, affine)
    assert_reported(index(root), bad, "singular affine")


def test_shear_and_oblique_affines_are_accepted(tmp_path: Path) -> None:
    root = with_good(tmp_path / "data")
    affine = np.array(
        [[0.9, 0.3, 0.1, 5.0], [-0.2, 1.1, 0.25, -3.0], [0.1, -0.1, 2.0, 8.0], [0, 0, 0, 1]]
    )
    path = write_volume(vol(affine=affine), root / "shear_T1w.nii.gz")
    result = index(root)
    assert not result.problems
    rec = {s.subject: s for s in result.subjects}["shear"].images["T1w"]
    assert rec.path == str(path.resolve())
    np.testing.assert_allclose(rec.affine, affine, atol=1e-5)


def test_unsupported_suffix_is_rejected_by_reader(tmp_path: Path) -> None:
    bad = tmp_path / "x.png"
    bad.write_bytes(b"\x89PNG")
    with pytest.raises(VolumeError, match="unsupported file type"):
        read_volume(bad)
    with pytest.raises(VolumeError, match="file not found"):
        read_volume(tmp_path / "nothing.nii")


# --------------------------------------------------------------------------------------------
# subjects and folders
# --------------------------------------------------------------------------------------------


def test_modality_grid_mismatch(tmp_path: Path) -> None:
    root = with_good(tmp_path / "data")
    write_volume(vol(), root / "sub-01_T1w.nii.gz")
    shifted = vol().affine
    shifted[0, 3] += 0.5
    write_volume(vol(affine=shifted), root / "sub-01_T2w.nii.gz")
    bad = write_volume(vol((N + 2, N, N)), root / "sub-01_flair.nii.gz")
    result = index(root)
    # the reference is the first modality in sorted order: T1w < T2w < flair
    assert_reported(result, bad, "grid differs", "shape")
    assert_reported(result, root / "sub-01_T2w.nii.gz", "grid differs", "affine")
    sub = {s.subject: s for s in result.subjects}["sub-01"]
    assert sorted(sub.images) == ["T1w"]


def test_label_grid_mismatch(tmp_path: Path) -> None:
    root = with_good(tmp_path / "data")
    bad = save_nifti(root / "good_seg.nii.gz", np.zeros((N, N, N + 1), np.uint8))
    result = index(root)
    assert_reported(result, bad, "grid differs")
    assert result.subjects[0].labels == {}


def test_duplicate_modality(tmp_path: Path) -> None:
    root = with_good(tmp_path / "data")
    dup = write_volume(vol(), root / "good_T1w.nii")
    result = index(root)
    assert_reported(result, root / "good_T1w.nii.gz", "duplicate")
    assert result.subjects[0].images["T1w"].path == str(dup.resolve())


def test_empty_folder(tmp_path: Path) -> None:
    root = with_good(tmp_path / "data")
    (root / "sub-02").mkdir()
    assert_reported(index(root), root / "sub-02", "empty folder")
    with pytest.raises(VolumeError, match="empty folder"):
        read_volume(root / "sub-02")


def test_empty_root(tmp_path: Path) -> None:
    result = index_directory(tmp_path)
    assert result.subjects == []
    assert_reported(result, tmp_path, "no image files")


def test_subject_without_valid_image_is_dropped(tmp_path: Path) -> None:
    root = with_good(tmp_path / "data")
    (root / "lost_T1w.nii.gz").write_bytes(b"")
    save_nifti(root / "lost_seg.nii.gz", np.zeros((N, N, N), np.uint8))
    result = index(root)
    assert [s.subject for s in result.subjects] == ["good"]
    assert_reported(result, root / "lost_T1w.nii.gz", "empty file")
    assert_reported(result, root / "lost_seg.nii.gz", "no valid image")


# --------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------


def dicom(folder: Path, seed: int = 0, modality: str = "CT") -> list[Path]:
    lps = np.diag([-0.8, -0.8, 2.0, 1.0])
    lps[:3, 3] = [10.0, 20.0, -15.0]
    return write_dicom_series(vol(affine=lps, seed=seed), folder, modality=modality)


def test_dicom_series_is_indexed(tmp_path: Path) -> None:
    root = with_good(tmp_path / "data")
    dicom(root / "pat01", modality="MR")
    result = index(root)
    assert not result.problems
    sub = {s.subject: s for s in result.subjects}["pat01"]
    assert list(sub.images) == ["MR"]
    assert sub.images["MR"].shape == (N, N, N)
    assert sub.images["MR"].orientation == "LPS"


def test_dicom_missing_slice(tmp_path: Path) -> None:
    root = with_good(tmp_path / "data")
    files = dicom(root / "pat01")
    files[7].unlink()
    assert_reported(index(root), root / "pat01", "missing slice")


def test_dicom_inconsistent_spacing(tmp_path: Path) -> None:
    root = with_good(tmp_path / "data")
    files = dicom(root / "pat01")
    ds = pydicom.dcmread(files[5])
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    ds.ImagePositionPatient = [x, y, z + 0.7]  # slices 2 mm apart: 2.7 then 1.3
    ds.save_as(files[5])
    assert_reported(index(root), root / "pat01", "inconsistent slice spacing")


def test_dicom_mixed_series(tmp_path: Path) -> None:
    root = with_good(tmp_path / "data")
    dicom(root / "pat01", seed=0)
    for f in dicom(tmp_path / "other", seed=1):
        shutil.move(f, root / "pat01" / f"b{f.name}")
    assert_reported(index(root), root / "pat01", "mixed series: 2 series")


def test_dicom_folder_without_series(tmp_path: Path) -> None:
    root = with_good(tmp_path / "data")
    (root / "pat01").mkdir()
    (root / "pat01" / "x.dcm").write_bytes(b"garbage" * 40)
    assert_reported(index(root), root / "pat01", "no dicom series")


def test_dicom_geometry_matches_writer(tmp_path: Path) -> None:
    """The slice spacing and orientation survive the write/check/read path exactly."""
    dicom(tmp_path / "d")
    v = read_volume(tmp_path / "d")
    np.testing.assert_allclose(geometry.spacing(v.affine), [0.8, 0.8, 2.0], atol=1e-6)
    np.testing.assert_allclose(v.affine[:3, 3], [10.0, 20.0, -15.0], atol=1e-6)
