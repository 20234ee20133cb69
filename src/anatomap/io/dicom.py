"""DICOM series (SimpleITK / GDCM), with the slice geometry checked from pydicom headers first.

Before GDCM opens anything, the folder must hold only regular files and sub-folders (GDCM
reads every file, and a FIFO would block it). Every slice's header is read with pydicom: the
values it declares must stay under :data:`~anatomap.limits.MAX_VOXELS`, a present
PixelSpacing must be two finite positive numbers, and either every slice or none carries
its position and orientation. The positions must then be evenly spaced along the slice
normal: duplicates, missing slices and uneven steps are rejected, naming the folder.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from anatomap.errors import VolumeError
from anatomap.io.headers import check_size, special_kind
from anatomap.io.readers import _fmt, _short, sitk_to_array_affine

_SLICE_TOLERANCE = 0.01  # relative tolerance on DICOM slice spacing


def _modes(p: Path) -> dict[str, int]:
    """``{name: st_mode}`` of every entry of ``p`` (hidden ones too; broken links left out)."""
    try:
        names = os.listdir(p)
    except OSError as exc:
        raise VolumeError(p, f"cannot list folder: {_short(exc)}") from exc
    modes = {}
    for name in names:
        try:
            modes[name] = os.stat(p / name).st_mode
        except OSError:
            continue
    return modes


def read_dicom_dir(p: Path, series_uid: str | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Array, RAS affine and meta of the DICOM series in folder ``p``: the only one, or
    ``series_uid`` (SeriesInstanceUID) of several."""
    import SimpleITK as sitk

    modes = _modes(p)
    special = [e for e, m in modes.items() if not (stat.S_ISREG(m) or stat.S_ISDIR(m))]
    if special:  # GDCM opens every file of the folder: a FIFO would block it for ever
        raise VolumeError(
            p, f"folder holds a {special_kind(modes[special[0]])} ({special[0]}); not scanned"
        )
    if not any(stat.S_ISREG(m) for e, m in modes.items() if not e.startswith(".")):
        raise VolumeError(p, "empty folder (no files)")
    try:
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(p))
    except Exception as exc:
        raise VolumeError(p, f"cannot scan folder for DICOM: {_short(exc)}") from exc
    if not series:
        raise VolumeError(p, "no DICOM series found in folder")
    if series_uid is not None:
        if series_uid not in series:
            raise VolumeError(p, f"no DICOM series {series_uid} in folder")
        series = [series_uid]
    if len(series) > 1:
        raise VolumeError(p, f"mixed series: {len(series)} series in one folder")
    try:
        files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(p), series[0]))
    except Exception as exc:
        raise VolumeError(p, f"cannot list DICOM series: {_short(exc)}") from exc
    if not files:
        raise VolumeError(p, "no DICOM files in series")
    meta = _check_dicom_slices(p, files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        img = reader.Execute()
    except Exception as exc:
        raise VolumeError(p, f"cannot read DICOM series: {_short(exc)}") from exc
    array, affine = sitk_to_array_affine(img)
    if "slice_spacing" in meta and array.ndim == 3:
        # trust the checked median slice distance rather than ITK's first-pair estimate
        col = affine[:3, 2]
        affine[:3, 2] = col / np.linalg.norm(col) * meta["slice_spacing"]
    meta.update(format="dicom", n_files=len(files), series_uid=series[0])
    return array, affine, meta


def _check_dicom_slices(p: Path, files: Sequence[str]) -> dict:
    """Check slice positions along the slice normal: duplicates, gaps, uneven spacing."""
    import pydicom

    positions, orientations, meta = [], [], {}
    lacking: list[str] = []
    values = 0
    for i, f in enumerate(files):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            if i == 0:
                meta["modality"] = str(ds.get("Modality", "") or "")
            values += _dicom_values(ds)
            check_size(p, (len(files),), values, values)
            _check_pixel_spacing(p, Path(f).name, ds)
            ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
            if ipp is None or iop is None:
                lacking.append(Path(f).name)
                continue
            positions.append([float(v) for v in ipp])
            orientations.append([float(v) for v in iop])
        except VolumeError:
            raise
        except Exception as exc:
            raise VolumeError(p, f"unreadable DICOM file {Path(f).name}: {_short(exc)}") from exc
    if lacking and positions:  # the gap check needs every slice's position
        raise VolumeError(
            p,
            f"{len(lacking)} of {len(files)} slice(s) lack ImagePositionPatient/"
            f"ImageOrientationPatient (e.g. {lacking[0]}); missing slices cannot be ruled out",
        )
    if not positions:
        return meta  # no geometry tags at all: nothing to check (ITK falls back to defaults)
    orient = np.asarray(orientations)
    if orient.shape[1:] != (6,) or np.asarray(positions).shape[1:] != (3,):
        raise VolumeError(p, "malformed ImagePositionPatient/ImageOrientationPatient")
    if np.abs(orient - orient[0]).max() > 1e-4:
        raise VolumeError(p, "inconsistent slice orientation within the series")
    normal = np.cross(orient[0, :3], orient[0, 3:])
    dist = np.sort(np.asarray(positions) @ normal)
    if len(dist) < 2:
        return meta
    steps = np.diff(dist)
    median = float(np.median(steps))
    if np.any(steps < 1e-4) or median <= 1e-4:
        n_dup = int(np.sum(steps < 1e-4))
        raise VolumeError(p, f"{n_dup} duplicate slice position(s) in the series")
    if len(steps) >= 2 and median > 0:
        bad = np.abs(steps - median) > _SLICE_TOLERANCE * median
        if np.any(bad):
            k = int(np.argmax(np.abs(steps - median)))
            ratio = steps[k] / median
            if abs(ratio - round(ratio)) <= _SLICE_TOLERANCE * round(ratio) and round(ratio) >= 2:
                missing = int(sum(round(s / median) - 1 for s in steps[bad]))
                raise VolumeError(
                    p,
                    f"missing slices: {missing} slice(s) absent (gap of {steps[k]:.4g} mm after "
                    f"slice {k + 1} of {len(dist)}; slices are {median:.4g} mm apart)",
                )
            raise VolumeError(
                p,
                f"inconsistent slice spacing: {int(bad.sum())} step(s) differ from the "
                f"median {median:.4g} mm by > {_SLICE_TOLERANCE:.0%} (e.g. {steps[k]:.4g} mm)",
            )
    meta["slice_spacing"] = median
    return meta


def _dicom_values(ds) -> int:
    """Values one DICOM file holds (rows x columns x frames x samples), from its header."""
    n = 1
    for tag, default in (
        ("Rows", 0),
        ("Columns", 0),
        ("NumberOfFrames", 1),
        ("SamplesPerPixel", 1),
    ):
        try:
            n *= max(int(ds.get(tag, default) or default), 0)
        except (TypeError, ValueError):
            n *= default
    return n


def _check_pixel_spacing(p: Path, name: str, ds) -> None:
    """Refuse a PixelSpacing that is present but not two finite positive numbers (ITK would
    read a zero as 1 mm)."""
    if "PixelSpacing" not in ds:
        return
    raw = ds.PixelSpacing
    try:
        many = isinstance(raw, Sequence) and not isinstance(raw, str | bytes)
        sp = [float(v) for v in (raw if many else [raw])]
    except (TypeError, ValueError):
        raise VolumeError(p, f"{name}: PixelSpacing {raw!r} is not a number pair") from None
    if len(sp) != 2 or not all(np.isfinite(sp)) or min(sp) <= 0:
        raise VolumeError(p, f"{name}: invalid PixelSpacing {_fmt(sp)} (must be > 0)")
