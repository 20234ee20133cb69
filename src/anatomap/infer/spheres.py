"""Label images of small spheres at matched points (``anatomap match --spheres``), to overlay
on a target scan in any viewer (3D Slicer, ITK-SNAP, FSLeyes, MRIcroGL).

Label ``n + 1`` marks the ``n``-th point (the order of the points file; 0 is background). A
voxel belongs to a sphere when its centre lies within the radius (world mm) of the point;
where spheres overlap, the nearest point wins; a sphere smaller than a voxel still marks the
voxel nearest its point. The image lies on the target's own grid (shape and affine), so it
overlays the scan exactly; it is written atomically by :func:`anatomap.io.write_volume`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from anatomap import geometry
from anatomap.data.volume import Volume
from anatomap.errors import AnatomapError

DEFAULT_RADIUS_MM = 2.0


def check_spheres(path: str | Path, radius_mm: float) -> Path:
    """``path`` if it names a writable image type and ``radius_mm`` is a positive finite number;
    else one error line naming the problem (checked before anything is computed)."""
    from anatomap.io.readers import image_suffix
    from anatomap.io.writers import WRITE_SUFFIXES

    p = Path(path)
    if image_suffix(p) not in WRITE_SUFFIXES:
        raise AnatomapError(
            f"{p}: a sphere image must end with {', '.join(WRITE_SUFFIXES)} (e.g. spheres.nii.gz)"
        )
    try:
        r = float(radius_mm)
    except (TypeError, ValueError):
        r = math.nan
    if not (math.isfinite(r) and r > 0):
        raise AnatomapError(f"sphere radius {radius_mm!r}: must be a positive number of mm")
    return p


def _label_dtype(n_points: int) -> type:
    return np.uint16 if n_points < np.iinfo(np.uint16).max else np.int32


def sphere_labels(
    shape: Sequence[int],
    affine: np.ndarray,
    points_mm: np.ndarray,
    radius_mm: float = DEFAULT_RADIUS_MM,
) -> np.ndarray:
    """A label array of ``shape`` (3-D) with a sphere of ``radius_mm`` around each world point
    ``[N, 3]`` (RAS mm): label ``n + 1`` for point ``n``. Points that are NaN, or farther than
    the radius from every voxel of the grid, leave no mark. Memory: the labels plus one box
    around a sphere at a time."""
    shape3 = tuple(int(n) for n in shape[:3])
    aff = np.asarray(affine, np.float64)
    pts = np.asarray(points_mm, np.float64).reshape(-1, 3)
    labels = np.zeros(shape3, _label_dtype(len(pts)))
    inv = np.linalg.inv(aff)
    reach = radius_mm * np.linalg.norm(inv[:3, :3], axis=1)  # a sphere's extent per voxel axis
    for n, p in enumerate(pts):
        if not np.isfinite(p).all():
            continue
        c = inv[:3, :3] @ p + inv[:3, 3]
        lo = np.maximum(np.floor(c - reach).astype(int), 0)
        hi = np.minimum(np.ceil(c + reach).astype(int) + 1, shape3)
        if (hi <= lo).any():
            continue
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        ijk = np.stack(
            np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)], indexing="ij"), -1
        ).reshape(-1, 3)
        dist = np.linalg.norm(geometry.voxel_to_world(aff, ijk.astype(np.float64)) - p, axis=1)
        inside = dist <= radius_mm
        if not inside.any():  # a sphere smaller than a voxel: its nearest voxel
            near = np.rint(c).astype(int)
            if (near < 0).any() or (near >= shape3).any():
                continue
            inside = (ijk == near).all(1)
        prev = labels[box].reshape(-1)
        taken = prev > 0
        closer = np.ones_like(inside)
        if taken.any():  # overlap: the nearest point keeps the voxel
            other = geometry.voxel_to_world(aff, ijk[taken].astype(np.float64))
            closer[taken] = dist[taken] < np.linalg.norm(other - pts[prev[taken] - 1], axis=1)
        prev[inside & closer] = n + 1
        labels[box] = prev.reshape(labels[box].shape)
    return labels


def write_spheres(
    path: str | Path,
    shape: Sequence[int],
    affine: np.ndarray,
    points_mm: np.ndarray,
    radius_mm: float = DEFAULT_RADIUS_MM,
) -> Path:
    """Write :func:`sphere_labels` on the grid ``(shape, affine)`` as an image file (NIfTI,
    NRRD or MetaImage, by suffix), atomically. Returns the path written."""
    from anatomap.io import write_volume

    p = check_spheres(path, radius_mm)
    labels = sphere_labels(shape, affine, points_mm, float(radius_mm))
    return write_volume(Volume(labels, np.asarray(affine, np.float64), modality="label"), p)


def sphere_paths(path: str | Path, targets: Sequence[str]) -> list[Path]:
    """One sphere image per target: ``path`` itself for a single target; for several,
    ``path`` with each target's name before the suffix (``spheres.nii.gz`` ->
    ``spheres_sub-05_T1w.nii.gz``), plus the target's position (from 1) where names repeat."""
    from anatomap.io.readers import image_suffix, strip_suffix

    p = Path(path)
    if len(targets) == 1:
        return [p]
    suffix = image_suffix(p) or p.suffix
    stem = p.name[: -len(suffix)] if suffix else p.name
    names = [strip_suffix(Path(str(t)).name).removesuffix(".emb") for t in targets]
    names = [f"{n}_{t + 1}" if names.count(n) > 1 else n for t, n in enumerate(names)]
    return [p.with_name(f"{stem}_{n}{suffix}") for n in names]
