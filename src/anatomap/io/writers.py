"""Write :class:`~anatomap.data.volume.Volume` objects (NIfTI, NRRD, MetaImage, DICOM series).

Files are written atomically through :mod:`anatomap.io.atomic` (a temporary sibling moved
into place), so a failed write never leaves a half-written or temporary file behind.
"""

from __future__ import annotations

import locale
import uuid
from pathlib import Path

import numpy as np

from anatomap import geometry
from anatomap.data.volume import Volume
from anatomap.errors import VolumeError
from anatomap.io.atomic import atomic_folder, atomic_path
from anatomap.io.readers import image_suffix

WRITE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
_DS_MAX = 16  # DICOM decimal strings hold at most 16 characters


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


def write_volume(volume: Volume, path: str | Path) -> Path:
    """Write ``volume`` to ``path`` (.nii, .nii.gz, .nrrd or .mha), atomically.

    NIfTI gets the affine as both sform and qform (code 1, scanner); NRRD/MetaImage get it
    converted to ITK's LPS+ world. Returns the path written.
    """
    p = Path(path)
    suffix = image_suffix(p)
    if suffix not in WRITE_SUFFIXES:
        raise VolumeError(
            p, f"cannot write '{p.name}': supported suffixes {', '.join(WRITE_SUFFIXES)}"
        )
    array = np.asarray(volume.array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    elif array.dtype.kind in "iu" and array.dtype.itemsize == 8 and array.size:
        info = np.iinfo(np.int32)  # NIfTI tools handle int64 poorly; keep it only if needed
        if info.min <= array.min() and array.max() <= info.max:
            array = array.astype(np.int32)
    if array.ndim not in (2, 3, 4):
        raise VolumeError(p, f"cannot write a {array.ndim}-D array")
    with atomic_path(p, suffix, what="volume") as tmp:
        try:
            if suffix in (".nii", ".nii.gz"):
                _write_nifti(array, volume.affine, tmp)
            else:
                _write_itk(array, volume.affine, tmp, p)
        except VolumeError:
            raise
        except Exception as exc:
            raise VolumeError(p, f"write failed: {_one_line(exc)}") from exc
    return p


def _write_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(array, np.asarray(affine, np.float64))
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)  # nearest rigid+zoom fit when the affine has shear
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))


def array_affine_to_sitk(array: np.ndarray, affine: np.ndarray, *, vector: bool = False):
    """SimpleITK image of ``array [x, y, (z)]`` with RAS ``affine`` (stored as LPS)."""
    import SimpleITK as sitk

    dim = array.ndim - (1 if vector else 0)
    if dim not in (2, 3):
        raise ValueError(f"SimpleITK images need 2 or 3 spatial axes, got {dim}")
    order = tuple(range(dim))[::-1] + tuple(range(dim, array.ndim))
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, order)), isVector=vector)
    lps = geometry.LPS_TO_RAS @ np.asarray(affine, np.float64)
    lin = lps[:dim, :dim]
    sp = np.linalg.norm(lin, axis=0)
    img.SetSpacing([float(v) for v in sp])
    img.SetDirection([float(v) for v in (lin / sp[None, :]).ravel()])
    img.SetOrigin([float(v) for v in lps[:dim, 3]])
    return img


def _write_itk(array: np.ndarray, affine: np.ndarray, tmp: Path, dest: Path) -> None:
    import SimpleITK as sitk

    if array.ndim == 4:
        img = array_affine_to_sitk(array, affine, vector=True)
    else:
        img = array_affine_to_sitk(array, affine)
    sitk.WriteImage(img, str(tmp), useCompression=True)


# --------------------------------------------------------------------------------------------
# DICOM series
# --------------------------------------------------------------------------------------------


def _ds(value: float) -> str:
    """A DICOM decimal string (<= 16 characters) as precise as fits."""
    value = float(value)
    if value == 0:
        return "0"
    for prec in range(12, 2, -1):
        text = f"{value:.{prec}g}"
        if len(text) <= _DS_MAX:
            return text
    return f"{value:.3g}"


def _new_uid() -> str:
    """A DICOM UID under the 2.25 (UUID-derived) root."""
    return f"2.25.{uuid.uuid4().int}"


def _quantise(array: np.ndarray) -> tuple[np.ndarray, float, float] | None:
    """``None`` if ``array`` fits int16 as is, else ``(float array, slope, intercept)``."""
    a = np.asarray(array)
    lo, hi = float(a.min()), float(a.max())
    integral = a.dtype.kind in "iub" or bool(np.all(np.mod(a, 1) == 0))
    if integral and lo >= -32768 and hi <= 32767:
        return None
    slope = (hi - lo) / 65000.0 if hi > lo else 1.0
    intercept = (hi + lo) / 2.0
    slope, intercept = float(_ds(slope)), float(_ds(intercept))
    return a.astype(np.float32), slope, intercept


def write_dicom_series(
    volume: Volume,
    folder: str | Path,
    modality: str = "CT",
    *,
    series_description: str = "anatomap",
    series_uid: str | None = None,
) -> list[Path]:
    """Write a 3-D ``volume`` as a DICOM series, one slice per file, into a new ``folder``.

    Voxels are stored as int16 (with rescale slope/intercept when the values need it); the
    geometry (position, orientation, pixel spacing, slice thickness) comes from the affine,
    which must be free of shear. The folder must not exist or be empty; the series is written
    to a temporary sibling folder first and moved into place. Returns the files written.
    """
    dest = Path(folder)
    array = np.asarray(volume.array)
    if array.ndim != 3:
        raise VolumeError(dest, f"DICOM series need a 3-D volume, got {array.ndim}-D")
    if not np.all(np.isfinite(array)):
        raise VolumeError(dest, "cannot write NaN/Inf voxels to DICOM")
    lin = np.asarray(volume.affine, np.float64)[:3, :3]
    unit = lin / np.linalg.norm(lin, axis=0)
    if np.abs(unit.T @ unit - np.eye(3)).max() > 1e-6:
        raise VolumeError(dest, "DICOM cannot store a sheared (non-orthogonal) affine")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise VolumeError(dest, "destination exists and is not an empty folder")
    quant = _quantise(array)
    if quant is None:
        data = array.astype(np.int16)
        rescale: list[tuple[str, str]] = []
    else:
        data, slope, intercept = quant
        rescale = [
            ("0028|1053", _ds(slope)),
            ("0028|1052", _ds(intercept)),
            ("0028|0100", "16"),
            ("0028|0101", "16"),
            ("0028|0102", "15"),
            ("0028|0103", "1"),
        ]
    img = array_affine_to_sitk(data, volume.affine)
    direction = np.asarray(img.GetDirection()).reshape(3, 3)
    orientation = "\\".join(_ds(v) for v in [*direction[:, 0], *direction[:, 1]])
    series_uid = series_uid or _new_uid()
    study_uid = _new_uid()
    subject = volume.subject or "anonymous"
    common = [
        ("0008|0060", modality),
        ("0008|0008", "DERIVED\\SECONDARY"),
        ("0008|103e", series_description),
        ("0010|0010", subject),
        ("0010|0020", subject),
        ("0020|000d", study_uid),
        ("0020|000e", series_uid),
        ("0020|0011", "1"),
        ("0020|0037", orientation),
        ("0018|0050", _ds(img.GetSpacing()[2])),
        *rescale,
    ]
    with atomic_folder(dest, what="DICOM series") as tmp_dir:  # swaps out an empty `dest`
        try:
            names = _write_slices(img, common, series_uid, tmp_dir)
        except VolumeError:
            raise
        except Exception as exc:
            raise VolumeError(dest, f"DICOM write failed: {_one_line(exc)}") from exc
    return [dest / n for n in names]


def _write_slices(img, common: list[tuple[str, str]], series_uid: str, folder: Path) -> list[str]:
    """Write each axial slice of the SimpleITK ``img`` as ``folder/NNNN.dcm``; the file names.
    GDCM's writer leaves the process locale at "C" (text files then read as ASCII): it is
    put back."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        return _write_each_slice(img, common, series_uid, folder)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_each_slice(
    img, common: list[tuple[str, str]], series_uid: str, folder: Path
) -> list[str]:
    import SimpleITK as sitk

    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    names = []
    for k in range(img.GetDepth()):
        piece = img[:, :, k]
        for tag, value in common:
            piece.SetMetaData(tag, value)
        position = img.TransformIndexToPhysicalPoint((0, 0, k))
        piece.SetMetaData("0020|0032", "\\".join(_ds(v) for v in position))
        piece.SetMetaData("0020|0013", str(k + 1))
        piece.SetMetaData("0008|0018", f"{series_uid}.{k + 1}")
        name = f"{k:04d}.dcm"
        writer.SetFileName(str(folder / name))
        writer.Execute(piece)
        names.append(name)
    return names
