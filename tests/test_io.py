"""Reading/writing scans: round trips, the RAS/LPS orientation contract, dimensionality."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anatomap import geometry
from anatomap.data.volume import Volume
from anatomap.errors import VolumeError
from anatomap.io import SUPPORTED_SUFFIXES, read_volume, write_volume
from anatomap.io.readers import sitk_to_array_affine
from anatomap.io.writers import write_dicom_series

SHAPE = (16, 18, 20)


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_affine(kind: str) -> np.ndarray:
    """Axis-aligned, oblique (rotated) or sheared voxel-to-world RAS affines."""
    aff = np.eye(4)
    zooms = np.diag([0.8, 1.1, 2.5])
    if kind == "aligned":
        lin = zooms
    elif kind == "oblique":
        lin = rotation(0.3, -0.2, 0.5) @ zooms
    elif kind == "shear":
        shear = np.array([[1.0, 0.25, 0.1], [0.0, 1.0, -0.15], [0.0, 0.0, 1.0]])
        lin = rotation(0.1, 0.2, -0.3) @ shear @ zooms
    else:
        raise ValueError(kind)
    aff[:3, :3] = lin
    aff[:3, 3] = [-12.5, 30.25, 7.0]
    return aff


def make_array(shape=SHAPE, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * 100).astype(np.float32)


PROBES = np.array([[0, 0, 0], [15, 0, 0], [0, 17, 0], [0, 0, 19], [3, 7, 11], [15, 17, 19]])


def value_positions(vol: Volume) -> dict[float, tuple]:
    """World position of the voxels at PROBES keyed by their (unique) value."""
    return {
        float(vol.array[tuple(ijk)]): tuple(geometry.voxel_to_world(vol.affine, ijk.astype(float)))
        for ijk in PROBES
    }


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha"])
@pytest.mark.parametrize("kind", ["aligned", "oblique", "shear"])
def test_round_trip_preserves_world_positions(tmp_path: Path, suffix: str, kind: str) -> None:
    vol = Volume(make_array(), make_affine(kind))
    path = write_volume(vol, tmp_path / f"img{suffix}")
    back = read_volume(path)
    assert back.array.dtype == np.float32
    assert back.shape == SHAPE
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-5)
    expected = value_positions(vol)
    for value, xyz in value_positions(back).items():
        np.testing.assert_allclose(xyz, expected[value], atol=1e-4)
    assert back.path == str(path.resolve())
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]  # no temp file left


@pytest.mark.parametrize("kind", ["aligned", "oblique"])
def test_nifti_read_agrees_with_itk(tmp_path: Path, kind: str) -> None:
    """nibabel (RAS) and SimpleITK (LPS, converted) read the same NIfTI identically."""
    vol = Volume(make_array(), make_affine(kind))
    path = write_volume(vol, tmp_path / "img.nii.gz")
    ours = read_volume(path)
    arr, aff = sitk_to_array_affine(sitk.ReadImage(str(path)))
    np.testing.assert_array_equal(ours.array, arr)
    np.testing.assert_allclose(ours.affine, aff, atol=1e-4)


def test_mha_written_by_itk_is_read_in_ras(tmp_path: Path) -> None:
    arr = make_array()
    img = sitk.GetImageFromArray(np.transpose(arr))  # x = i
    img.SetSpacing((0.5, 0.75, 2.0))
    img.SetOrigin((10.0, 20.0, -30.0))
    sitk.WriteImage(img, str(tmp_path / "x.mha"))
    vol = read_volume(tmp_path / "x.mha")
    np.testing.assert_array_equal(vol.array, arr)
    # LPS origin (10, 20, -30) is RAS (-10, -20, -30); LPS +x is RAS -x
    np.testing.assert_allclose(vol.affine[:3, 3], [-10.0, -20.0, -30.0])
    np.testing.assert_allclose(vol.affine[:3, :3], np.diag([-0.5, -0.75, 2.0]))
    assert vol.orientation == "LPS"


@pytest.mark.parametrize("kind", ["aligned", "oblique"])
def test_dicom_and_nifti_agree_after_reorient(tmp_path: Path, kind: str) -> None:
    """The orientation contract: an LPS DICOM series and a RAS NIfTI of one object agree."""
    ras_array, ras_affine = geometry.reorient(make_array(), make_affine(kind), "RAS")
    write_volume(Volume(ras_array, ras_affine), tmp_path / "ras.nii.gz")
    lps_array, lps_affine = geometry.reorient(ras_array, ras_affine, "LPS")
    files = write_dicom_series(Volume(lps_array, lps_affine, subject="s1"), tmp_path / "dcm")
    assert len(files) == lps_array.shape[2]

    from_nifti = read_volume(tmp_path / "ras.nii.gz")
    from_dicom = read_volume(tmp_path / "dcm")
    assert from_dicom.modality == "CT"
    a1, f1 = geometry.reorient(from_nifti.array, from_nifti.affine, "RAS")
    a2, f2 = geometry.reorient(from_dicom.array, from_dicom.affine, "RAS")
    step = (ras_array.max() - ras_array.min()) / 65000.0  # int16 quantisation
    np.testing.assert_allclose(a2, a1, atol=step)
    np.testing.assert_allclose(f2, f1, atol=1e-4)


def test_dicom_integer_values_are_exact(tmp_path: Path) -> None:
    arr = np.random.default_rng(1).integers(-1000, 2000, size=(16, 16, 16)).astype(np.int16)
    aff = np.diag([-0.7, -0.7, 1.5, 1.0])  # LPS axes
    write_dicom_series(Volume(arr, aff), tmp_path / "d", modality="MR")
    vol = read_volume(tmp_path / "d")
    assert vol.modality == "MR"
    np.testing.assert_array_equal(vol.array, arr.astype(np.float32))
    np.testing.assert_allclose(vol.affine, aff, atol=1e-5)


@pytest.mark.parametrize("codes", ["LAS", "LPS", "PIR"])
def test_nifti_in_other_orientations_agrees(tmp_path: Path, codes: str) -> None:
    ras_array, ras_affine = make_array(), make_affine("aligned")
    arr, aff = geometry.reorient(ras_array, ras_affine, codes)
    write_volume(Volume(arr, aff), tmp_path / "other.nii")
    vol = read_volume(tmp_path / "other.nii")
    assert vol.orientation == codes
    back, back_aff = geometry.reorient(vol.array, vol.affine, "RAS")
    np.testing.assert_array_equal(back, ras_array)
    np.testing.assert_allclose(back_aff, ras_affine, atol=1e-4)


def test_4d_singleton_is_squeezed(tmp_path: Path) -> None:
    arr = make_array((16, 16, 16, 1))
    nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / "a.nii.gz")
    vol = read_volume(tmp_path / "a.nii.gz")
    assert vol.shape == (16, 16, 16)


def test_4d_needs_volume_index(tmp_path: Path) -> None:
    arr = make_array((16, 16, 16, 3))
    nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / "a.nii.gz")
    with pytest.raises(VolumeError, match="4-D image with 3 volumes; pass volume_index"):
        read_volume(tmp_path / "a.nii.gz")
    vol = read_volume(tmp_path / "a.nii.gz", volume_index=2)
    np.testing.assert_array_equal(vol.array, arr[..., 2])
    with pytest.raises(VolumeError, match="out of range"):
        read_volume(tmp_path / "a.nii.gz", volume_index=3)
    assert read_volume(tmp_path / "a.nii.gz", expect_ndim=None).shape == (16, 16, 16, 3)


def test_4d_itk_volume_index(tmp_path: Path) -> None:
    arr = make_array((16, 16, 16, 2))
    write_volume(Volume(arr, make_affine("oblique")), tmp_path / "a.nrrd")
    vol = read_volume(tmp_path / "a.nrrd", volume_index=1)
    np.testing.assert_array_equal(vol.array, arr[..., 1])
    np.testing.assert_allclose(vol.affine, make_affine("oblique"), atol=1e-5)


def test_2d_images(tmp_path: Path) -> None:
    arr = make_array((16, 20))
    nib.save(nib.Nifti1Image(arr, np.diag([0.5, 0.5, 1, 1])), tmp_path / "a.nii")
    with pytest.raises(VolumeError, match="2-D image"):
        read_volume(tmp_path / "a.nii")
    vol = read_volume(tmp_path / "a.nii", expect_ndim=2)
    assert vol.shape == (16, 20)
    assert vol.spacing == (0.5, 0.5)
    # one-slice 3-D images count as 2-D when 2-D is asked for
    nib.save(nib.Nifti1Image(arr[..., None], np.eye(4)), tmp_path / "b.nii")
    assert read_volume(tmp_path / "b.nii", expect_ndim=2).shape == (16, 20)
    write_volume(Volume(arr, np.diag([0.5, 0.7, 1, 1])), tmp_path / "c.mha")
    vol = read_volume(tmp_path / "c.mha", expect_ndim=2)
    np.testing.assert_array_equal(vol.array, arr)
    np.testing.assert_allclose(vol.spacing, (0.5, 0.7))


def test_label_dtype(tmp_path: Path) -> None:
    labels = np.random.default_rng(0).integers(0, 5, size=(16, 16, 16)).astype(np.float32)
    nib.save(nib.Nifti1Image(labels, np.eye(4)), tmp_path / "seg.nii.gz")
    vol = read_volume(tmp_path / "seg.nii.gz", dtype=np.int32)
    assert vol.array.dtype == np.int32
    np.testing.assert_array_equal(vol.array, labels.astype(np.int32))


def test_modality_and_subject_are_recorded(tmp_path: Path) -> None:
    write_volume(Volume(make_array(), np.eye(4)), tmp_path / "x.nii.gz")
    vol = read_volume(tmp_path / "x.nii.gz", modality="T1w", subject="sub-01")
    assert (vol.modality, vol.subject) == ("T1w", "sub-01")


def test_failed_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import anatomap.io.writers as writers

    dest = tmp_path / "out.nii.gz"
    dest.write_bytes(b"previous content")

    def broken(array, affine, path):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(writers, "_write_nifti", broken)
    with pytest.raises(VolumeError, match="disk full"):
        write_volume(Volume(make_array(), np.eye(4)), dest)
    assert dest.read_bytes() == b"previous content"
    assert sorted(os.listdir(tmp_path)) == ["out.nii.gz"]


def test_write_rejects_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match="supported suffixes"):
        write_volume(Volume(make_array(), np.eye(4)), tmp_path / "x.png")


def test_dicom_rejects_shear(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match="shear"):
        write_dicom_series(Volume(make_array(), make_affine("shear")), tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_supported_suffixes() -> None:
    assert {".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd"} <= set(SUPPORTED_SUFFIXES)


# --------------------------------------------------------------------------------------------
# garbage in: only VolumeError comes out
# --------------------------------------------------------------------------------------------

_VALID: dict[str, bytes] = {}


def _valid_bytes(suffix: str, tmp: Path) -> bytes:
    if suffix not in _VALID:
        path = write_volume(
            Volume(make_array((4, 5, 6)), make_affine("oblique")), tmp / f"v{suffix}"
        )
        _VALID[suffix] = path.read_bytes()
    return _VALID[suffix]


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    suffix=st.sampled_from([".nii", ".nii.gz", ".mha"]),
    mode=st.sampled_from(["random", "truncate", "flip"]),
    data=st.data(),
)
def test_garbage_gives_volume_error_only(tmp_path: Path, suffix: str, mode: str, data) -> None:
    valid = _valid_bytes(suffix, tmp_path)
    if mode == "random":
        content = data.draw(st.binary(min_size=0, max_size=2048), label="bytes")
        if suffix == ".nii.gz" and data.draw(st.booleans(), label="gzip"):
            content = gzip.compress(content)
    elif mode == "truncate":
        content = valid[: data.draw(st.integers(0, len(valid) - 1), label="cut")]
    else:
        content = bytearray(valid)
        for _ in range(data.draw(st.integers(1, 8), label="n")):
            pos = data.draw(st.integers(0, min(len(content), 400) - 1), label="pos")
            content[pos] = data.draw(st.integers(0, 255), label="byte")
        content = bytes(content)
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(content)
    try:
        vol = read_volume(path)
    except VolumeError as exc:
        assert exc.path == str(path)
        assert "\n" not in exc.reason and exc.reason
    else:  # a mutation that kept the file valid: it must still be a sane volume
        assert vol.array.dtype == np.float32 and np.all(np.isfinite(vol.array))
