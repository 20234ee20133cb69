"""Read scans (NIfTI, NRRD, MetaImage, DICOM series) into :class:`~anatomap.data.volume.Volume`.

Every file is validated on reading and every failure, whatever library raised it, becomes a
:class:`~anatomap.errors.VolumeError` that names the file and says what is wrong in one line.
Arrays come back indexed ``[i, j, k]`` along the columns of a RAS+ voxel-to-world affine (mm);
ITK/DICOM's LPS+ world is converted with :data:`anatomap.geometry.LPS_TO_RAS`.
"""

from __future__ import annotations

import gzip
import re
import stat
import warnings
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from anatomap import geometry, limits
from anatomap.data.volume import Volume
from anatomap.errors import VolumeError
from anatomap.io.headers import check_size, check_text_header, special_kind
from anatomap.io.notes import reading

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
SUPPORTED_SUFFIXES: tuple[str, ...] = NIFTI_SUFFIXES + ITK_SUFFIXES
"""File suffixes :func:`read_volume` understands (a directory is read as a DICOM series)."""


def image_suffix(path: str | Path) -> str | None:
    """The supported suffix that ``path`` ends with (lower-cased), or ``None``."""
    name = Path(path).name.lower()
    for suffix in SUPPORTED_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return None


def strip_suffix(path: str | Path) -> str:
    """File name of ``path`` without its image suffix (``a_T1w.nii.gz`` -> ``a_T1w``)."""
    name = Path(path).name
    suffix = image_suffix(name)
    return name[: -len(suffix)] if suffix else Path(name).stem


def _short(exc: BaseException, limit: int = 160) -> str:
    """One short line out of a (possibly multi-line ITK) exception message."""
    text = str(exc) or type(exc).__name__
    match = re.search(r"\bs?itk(?:::|\s+)ERROR:\s*(.*)", text, flags=re.S | re.I)
    if match:
        text = match.group(1)
    text = re.sub(r"^\w+\(0x[0-9a-fA-F]+\):\s*", "", text)
    # the error already names the file: shorten absolute paths inside the message to names
    text = re.sub(r"(?:[A-Za-z]:)?[\\/][^\s\"']*[\\/]([^\\/\s\"']+)", r"\1", text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fmt(values: Sequence[float] | np.ndarray) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


# --------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------


def read_volume(
    path: str | Path,
    *,
    modality: str | None = None,
    subject: str | None = None,
    expect_ndim: int | None = 3,
    volume_index: int | None = None,
    check_finite: bool = True,
    dtype: np.dtype | type | str | None = None,
    roots: Sequence[str | Path] | None = None,
    series: str | None = None,
) -> Volume:
    """Read and validate one scan.

    ``path`` is a NIfTI/NRRD/MetaImage file or a folder holding one DICOM series.
    ``expect_ndim`` (3 by default; ``None`` accepts anything) is the spatial dimensionality
    wanted: a 4-D image with a singleton 4th axis is squeezed, one with several volumes needs
    ``volume_index`` (ignored for images without a 4th axis); a 3-D image with one slice is
    squeezed when ``expect_ndim=2``. ``dtype`` is the output dtype (float32 by default; give an
    integer dtype for label maps: values are rounded). ``roots``: folders every file the
    scan's header names must lie in (``data index --table`` confinement). ``series``: the
    SeriesInstanceUID to read from a DICOM folder holding several. Nothing but
    regular files is opened, and sizes are checked against :mod:`anatomap.limits` before any
    voxel is read. Raises :class:`VolumeError`.
    """
    p = Path(path)
    out_dtype = np.dtype(np.float32 if dtype is None else dtype)
    with reading(p):
        array, affine, meta = _read_any(p, roots, series)
    array = _select_dims(p, array, expect_ndim, volume_index)
    _check_geometry(p, affine, array.ndim)
    array = _convert(p, array, out_dtype, check_finite)
    if modality is None:
        modality = meta.get("modality") or "image"
    return Volume(
        array=array,
        affine=affine,
        modality=modality,
        subject=subject if subject is not None else "",
        path=str(p.resolve()),
        meta=meta,
    )


def _read_any(
    p: Path, roots: Sequence[str | Path] | None, series: str | None = None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Array, affine and meta of a file or DICOM folder (regular files only)."""
    try:
        st = p.stat()
    except FileNotFoundError:
        raise VolumeError(p, "file not found") from None
    except OSError as exc:
        raise VolumeError(p, f"cannot access file: {_short(exc)}") from None
    if stat.S_ISDIR(st.st_mode):
        from anatomap.io.dicom import read_dicom_dir

        return read_dicom_dir(p, series)
    if not stat.S_ISREG(st.st_mode):
        raise VolumeError(p, f"a {special_kind(st.st_mode)}, not a regular file; not opened")
    suffix = image_suffix(p)
    if suffix is None:
        raise VolumeError(
            p,
            f"unsupported file type '{''.join(p.suffixes) or p.name}'; "
            f"supported: {', '.join(SUPPORTED_SUFFIXES)} or a DICOM folder",
        )
    if st.st_size == 0:
        raise VolumeError(p, "empty file (0 bytes)")
    if suffix in NIFTI_SUFFIXES:
        return _read_nifti(p, suffix)
    return _read_itk(p, suffix, roots)


# --------------------------------------------------------------------------------------------
# shared checks
# --------------------------------------------------------------------------------------------


def _select_dims(
    p: Path, array: np.ndarray, expect_ndim: int | None, volume_index: int | None
) -> np.ndarray:
    """Squeeze/select axes so the array has ``expect_ndim`` dimensions, or raise."""
    if array.size == 0:
        raise VolumeError(p, f"image has no voxels (shape {array.shape})")
    # trailing singleton axes beyond the 4th are never meaningful
    while array.ndim > 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if expect_ndim is None:
        return array
    if array.ndim > 4:
        raise VolumeError(
            p, f"{array.ndim}-D image of shape {array.shape}; expected {expect_ndim}-D"
        )
    if array.ndim == 4 and expect_ndim <= 3:
        n = array.shape[3]
        if n == 1:
            array = array[..., 0]
        elif volume_index is None:
            raise VolumeError(p, f"4-D image with {n} volumes; pass volume_index to pick one")
        elif not -n <= volume_index < n:
            raise VolumeError(p, f"volume_index {volume_index} out of range for {n} volumes")
        else:
            array = array[..., volume_index]
    if array.ndim == 3 and expect_ndim == 2 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim != expect_ndim:
        raise VolumeError(
            p, f"{array.ndim}-D image (shape {array.shape}) where {expect_ndim}-D is expected"
        )
    return array


def _check_geometry(p: Path, affine: np.ndarray, ndim: int) -> None:
    """Reject non-finite, zero-size or singular voxel-to-world affines."""
    if not np.all(np.isfinite(affine)):
        raise VolumeError(p, "affine has NaN/Inf entries (invalid voxel spacing or origin)")
    n = min(max(ndim, 2), 3)
    sp = geometry.spacing(affine)[:n]
    if np.any(sp <= 1e-8):
        raise VolumeError(p, f"zero voxel spacing {_fmt(sp)}")
    lin = affine[:3, :3]
    det = abs(float(np.linalg.det(lin)))
    if det <= 1e-6 * float(np.prod(geometry.spacing(affine))):
        raise VolumeError(p, "singular affine: voxel axes are not independent")


def _convert(p: Path, array: np.ndarray, dtype: np.dtype, check_finite: bool) -> np.ndarray:
    """Cast to ``dtype`` (rounding floats for integer outputs) after the finiteness check."""
    if array.dtype.kind not in "biuf":
        raise VolumeError(p, f"unsupported voxel type {array.dtype}")
    if array.dtype.kind == "f" and (check_finite or dtype.kind in "iub"):
        finite = np.isfinite(array)
        if not finite.all():
            n_nan = int(np.isnan(array).sum())
            n_inf = int(array.size - finite.sum()) - n_nan
            parts = [f"{n_nan} NaN" if n_nan else "", f"{n_inf} Inf" if n_inf else ""]
            raise VolumeError(p, f"{' and '.join(x for x in parts if x)} voxel(s) of {array.size}")
    if dtype.kind in "iu" and array.dtype.kind == "f":
        array = np.rint(array)
        info = np.iinfo(dtype)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise VolumeError(p, f"values out of range for {dtype}")
    narrowing = dtype.kind == "f" and array.dtype.itemsize > dtype.itemsize
    if check_finite and narrowing and array.size:  # finite values the cast would make Inf
        top = float(np.finfo(dtype).max)
        lo, hi = float(array.min()), float(array.max())
        if hi > top or lo < -top:
            n_over = int(np.count_nonzero(array > top) + np.count_nonzero(array < -top))
            raise VolumeError(
                p,
                f"{n_over} voxel value(s) of {array.size} overflow {dtype} (|value| > "
                f"{top:.4g}; range {lo:.4g} to {hi:.4g})",
            )
    with np.errstate(over="ignore", invalid="ignore"):
        return np.ascontiguousarray(array.astype(dtype, copy=False))


# --------------------------------------------------------------------------------------------
# NIfTI (nibabel)
# --------------------------------------------------------------------------------------------


def _nifti_reason(exc: BaseException) -> str:
    if isinstance(exc, (EOFError, zlib.error, gzip.BadGzipFile)) or "gzip" in str(exc).lower():
        return f"corrupt or truncated gzip data ({_short(exc)})"
    if isinstance(exc, MemoryError):
        return "header asks for more memory than available (corrupt header?)"
    text = _short(exc)
    if "Cannot work out file type" in text or "not a" in text.lower():
        return f"not a NIfTI image ({text})"
    if "Expected" in text and "bytes" in text:
        return f"truncated voxel data ({text})"
    return f"cannot read NIfTI: {text}"


@contextmanager
def _quiet_nibabel() -> Iterator[None]:
    """Silence nibabel's header-fixing log lines (we report those problems ourselves)."""
    import nibabel as nib

    logger = nib.imageglobals.logger
    previous = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = previous


def _read_nifti(p: Path, suffix: str) -> tuple[np.ndarray, np.ndarray, dict]:
    import nibabel as nib

    try:
        with warnings.catch_warnings(), _quiet_nibabel():
            warnings.simplefilter("ignore")
            img = nib.load(str(p), mmap=False)
            if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
                raise VolumeError(p, f"not a NIfTI image (nibabel sees {type(img).__name__})")
            raw = _raw_nifti_header(img, p)
            shape = tuple(int(n) for n in img.shape)
            itemsize = img.get_data_dtype().itemsize
            values = int(np.prod(shape, dtype=object))
            nbytes = values * itemsize
            check_size(p, shape, values, nbytes)
            size = p.stat().st_size
            offset = int(raw.get_data_offset())
            if suffix == ".nii" and offset + nbytes > size:
                raise VolumeError(
                    p, f"truncated file: {size} bytes but header needs {offset + nbytes}"
                )
            ratio = limits.MAX_COMPRESSION_RATIO
            if suffix == ".nii.gz" and nbytes > ratio * size + (1 << 20):
                raise VolumeError(
                    p,
                    f"corrupt header or truncated file: header needs {nbytes} bytes of "
                    f"voxels, more than {size} compressed bytes can hold",
                )
            array = np.asanyarray(img.dataobj)
            affine = np.asarray(img.affine, np.float64)
    except VolumeError:
        raise
    except Exception as exc:  # nibabel, zlib, gzip, numpy: all become one-line reasons
        raise VolumeError(p, _nifti_reason(exc)) from exc
    n_spatial = min(len(shape), 3)
    pixdim = np.asarray(raw["pixdim"][1 : 1 + n_spatial], np.float64)
    if not np.all(np.isfinite(pixdim)):
        raise VolumeError(p, f"NaN/Inf voxel spacing (pixdim {_fmt(pixdim)})")
    if np.any(pixdim == 0):
        raise VolumeError(p, f"zero voxel spacing (pixdim {_fmt(pixdim)})")
    if np.any(pixdim < 0):
        raise VolumeError(p, f"negative voxel spacing (pixdim {_fmt(pixdim)})")
    meta = {
        "format": "nifti",
        "sform_code": int(raw["sform_code"]),
        "qform_code": int(raw["qform_code"]),
        "source_dtype": str(img.get_data_dtype()),
    }
    return array, affine, meta


def _raw_nifti_header(img, p: Path):
    """The header as stored (nibabel's load silently fixes zero/negative pixdim)."""
    import nibabel as nib

    header_class = type(img.header)
    with nib.openers.ImageOpener(str(p)) as fobj:
        return header_class.from_fileobj(fobj, check=False)


# --------------------------------------------------------------------------------------------
# NRRD / MetaImage (SimpleITK)
# --------------------------------------------------------------------------------------------


def _itk_reason(exc: BaseException, stage: str) -> str:
    text = _short(exc)
    low = text.lower()
    if "zero-valued spacing" in low:
        return f"zero or NaN voxel spacing ({text})"
    if "negative spacing" in low:
        return f"negative voxel spacing ({text})"
    if "unable to determine imageio" in low or "could not create io object" in low:
        return f"not a readable image ({text})"
    if stage == "data":
        # MetaImage reports a short read with a stale errno ("No such file or directory")
        detail = "" if "no such file" in low else f" ({text})"
        return f"corrupt or truncated voxel data{detail}"
    return f"cannot read header: {text}"


def _read_itk(
    p: Path, suffix: str, roots: Sequence[str | Path] | None = None
) -> tuple[np.ndarray, np.ndarray, dict]:
    import SimpleITK as sitk

    header = check_text_header(p, roots)  # before ITK opens any file the header names
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except Exception as exc:
        raise VolumeError(p, _itk_reason(exc, "header")) from exc
    size = reader.GetSize()
    n_comp = reader.GetNumberOfComponents()
    n_values = int(np.prod(size, dtype=object)) * n_comp  # each value takes >= 1 byte
    if n_values == 0:
        raise VolumeError(p, f"image has no voxels (shape {tuple(size)})")
    check_size(p, size, n_values, n_values)
    inline = header is None or not header.files
    ratio = limits.MAX_COMPRESSION_RATIO
    if inline and n_values > ratio * p.stat().st_size + (8 << 20):
        raise VolumeError(
            p, f"corrupt header or truncated file: header declares size {tuple(size)}"
        )
    spacing = np.asarray(reader.GetSpacing(), np.float64)
    if not np.all(np.isfinite(spacing)) or np.any(spacing == 0):
        raise VolumeError(p, f"zero or NaN voxel spacing {_fmt(spacing)}")
    if np.any(spacing < 0):
        raise VolumeError(p, f"negative voxel spacing {_fmt(spacing)}")
    try:
        img = reader.Execute()
    except Exception as exc:
        raise VolumeError(p, _itk_reason(exc, "data")) from exc
    array, affine = sitk_to_array_affine(img)
    meta = {"format": suffix.lstrip("."), "source_dtype": img.GetPixelIDTypeAsString()}
    return array, affine, meta


def sitk_to_array_affine(img) -> tuple[np.ndarray, np.ndarray]:
    """``(array [x, y, z, ...], RAS affine)`` of a SimpleITK image (components last)."""
    import SimpleITK as sitk

    dim = img.GetDimension()
    arr = sitk.GetArrayFromImage(img)  # [z, y, x] (+ components)
    spatial = tuple(range(dim))[::-1]
    arr = np.transpose(arr, spatial + tuple(range(dim, arr.ndim)))
    direction = np.asarray(img.GetDirection(), np.float64).reshape(dim, dim)
    spacing = np.asarray(img.GetSpacing(), np.float64)
    origin = np.asarray(img.GetOrigin(), np.float64)
    n = min(dim, 3)
    affine_lps = np.eye(4)
    affine_lps[:n, :n] = direction[:n, :n] * spacing[None, :n]
    affine_lps[:n, 3] = origin[:n]
    return arr, geometry.LPS_TO_RAS @ affine_lps
