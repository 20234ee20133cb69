"""Small synthetic volumes for tests: a CT-like phantom, an MR-like phantom, smooth blobs.

No files and no downloads: each generator returns a :class:`~anatomap.data.volume.Volume`
whose array and RAS+ affine follow the requested voxel orientation. The CT phantom covers
the CT path (HU values of air, fat, soft tissue, organs and bone), since no real 3-D CT
installs with pip (see the project's data notes (shared/docs/DATA.md)).

The anatomy is defined in world millimetres, and the array is generated on the canonical
RAS grid, then only permuted/flipped into the requested orientation: two phantoms with the
same seed and different ``orientation`` hold identical voxels once reoriented.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

from anatomap import geometry
from anatomap.data.volume import Volume

_AXIS_OF = {
    "R": (0, 1.0),
    "L": (0, -1.0),
    "A": (1, 1.0),
    "P": (1, -1.0),
    "S": (2, 1.0),
    "I": (2, -1.0),
}

CT_LABELS = {
    0: "air",
    1: "fat",
    2: "soft tissue",
    3: "liver",
    4: "spleen",
    5: "kidney_R",
    6: "kidney_L",
    7: "spine",
    8: "femur_R",
    9: "femur_L",
    10: "sternum",
}
"""Label values of ``Volume.meta["labels"]`` for the CT and MR phantoms."""


def oriented_affine(
    codes: str,
    spacing: Sequence[float],
    center: Sequence[float],
    shape: Sequence[int],
) -> np.ndarray:
    """4x4 RAS+ affine of a box whose array axes point along ``codes`` (e.g. ``"LPS"``).

    ``spacing`` is per array axis (mm); the box's centre lands on world point ``center``.
    """
    codes = codes.upper()
    if len(codes) != 3 or sorted(_AXIS_OF[c][0] for c in codes) != [0, 1, 2]:
        raise ValueError(f"invalid orientation codes {codes!r}")
    aff = np.eye(4)
    for k, c in enumerate(codes):
        w, sign = _AXIS_OF[c]
        aff[:3, k] = 0.0
        aff[w, k] = sign * float(spacing[k])
    half = (np.asarray(shape, np.float64) - 1.0) / 2.0
    aff[:3, 3] = np.asarray(center, np.float64) - aff[:3, :3] @ half
    return aff


def _canonical_grid(
    shape: Sequence[int], spacing: Sequence[float], orientation: str, center: Sequence[float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Output affine, canonical (RAS) affine and canonical world grid ``[*shape_ras, 3]``."""
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or len(spacing) != 3:
        raise ValueError("phantoms are 3-D: shape and spacing need three entries")
    affine = oriented_affine(orientation, spacing, center, shape)
    dummy, ras_affine = geometry.reorient(np.zeros(shape, np.uint8), affine, "RAS")
    return affine, ras_affine, geometry.world_grid(ras_affine, dummy.shape)


def _to_orientation(
    arrays: list[np.ndarray], ras_affine: np.ndarray, orientation: str, affine: np.ndarray
) -> list[np.ndarray]:
    out = []
    for a in arrays:
        arr, aff = geometry.reorient(a, ras_affine, orientation.upper())
        if not np.allclose(aff, affine, atol=1e-6):  # pragma: no cover - internal consistency
            raise RuntimeError("phantom reorientation lost the requested affine")
        out.append(arr)
    return out


def _ellipsoid(rel: np.ndarray, center: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    """Boolean mask of an axis-aligned ellipsoid in relative body coordinates."""
    d = (rel - np.asarray(center)) / np.asarray(radii)
    return np.einsum("...i,...i->...", d, d) <= 1.0


def _cylinder_z(
    rel: np.ndarray, center_xy: Sequence[float], radii_xy: Sequence[float], z_range: Sequence[float]
) -> np.ndarray:
    d = (rel[..., :2] - np.asarray(center_xy)) / np.asarray(radii_xy)
    z = rel[..., 2]
    return (np.einsum("...i,...i->...", d, d) <= 1.0) & (z >= z_range[0]) & (z <= z_range[1])


def _body_labels(grid: np.ndarray, center: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Label map (values of :data:`CT_LABELS`) of a trunk-like body on a world grid."""
    lo = grid.reshape(-1, 3).min(0)
    hi = grid.reshape(-1, 3).max(0)
    half = np.maximum((hi - lo) / 2.0, 1e-6)
    rel = (grid - np.asarray(center, np.float64)) / half  # ~[-1, 1] across the box
    j = rng.uniform(-0.04, 0.04, size=(12, 3))  # small per-seed jitter of positions

    labels = np.zeros(grid.shape[:3], np.uint8)
    body_r = np.array([0.85, 0.65, 1.4]) * rng.uniform(0.95, 1.05, 3)
    body = _ellipsoid(rel, (0, 0, 0), body_r)
    inner = _ellipsoid(rel, (0, 0, 0), body_r - np.array([0.2, 0.2, 0.0]))
    labels[body] = 1  # fat rim
    labels[inner] = 2  # soft tissue
    organs = [  # (label, centre, radii) in RAS+: +x is the patient's right, +y anterior
        (3, (0.35, 0.05, 0.35), (0.3, 0.3, 0.25)),  # liver
        (4, (-0.4, -0.1, 0.4), (0.15, 0.15, 0.15)),  # spleen
        (5, (0.3, -0.2, 0.0), (0.1, 0.1, 0.18)),  # right kidney
        (6, (-0.3, -0.2, 0.0), (0.1, 0.1, 0.18)),  # left kidney
    ]
    for n, (lab, c, r) in enumerate(organs):
        labels[_ellipsoid(rel, np.asarray(c) + j[n], r) & inner] = lab
    labels[_cylinder_z(rel, np.array([0.0, -0.3]) + j[4, :2], (0.1, 0.1), (-1.0, 1.0)) & inner] = 7
    labels[
        _cylinder_z(rel, np.array([0.35, -0.05]) + j[5, :2], (0.09, 0.09), (-1.0, -0.45)) & inner
    ] = 8
    labels[
        _cylinder_z(rel, np.array([-0.35, -0.05]) + j[6, :2], (0.09, 0.09), (-1.0, -0.45)) & inner
    ] = 9
    labels[_ellipsoid(rel, np.array([0.0, 0.33, 0.45]) + j[7], (0.06, 0.05, 0.3)) & inner] = 10
    return labels


def ct_phantom(
    shape: Sequence[int] = (32, 32, 32),
    spacing: Sequence[float] = (1.5, 1.5, 2.0),
    seed: int = 0,
    orientation: str = "LPS",
    center: Sequence[float] = (12.0, -25.0, 40.0),
    noise_hu: float = 15.0,
) -> Volume:
    """CT-like trunk phantom in Hounsfield units.

    Air (-1000 HU) around an ellipsoidal body with a fat rim (-100 HU), soft tissue (40 HU),
    four organs (30-80 HU), a spine, two femur heads and a sternum (700-1200 HU), slight
    partial-volume blur and Gaussian noise. ``meta["labels"]`` holds the label map
    (:data:`CT_LABELS`). The affine has the requested ``orientation`` and a non-zero origin.
    """
    rng = np.random.default_rng([seed, 1])
    affine, ras_affine, grid = _canonical_grid(shape, spacing, orientation, center)
    labels = _body_labels(grid, center, rng)
    hu = np.array([-1000, -100, 40, 60, 50, 30, 32, 1000, 1200, 1100, 700], np.float64)
    hu[3:7] += rng.uniform(-5, 5, 4)
    hu[7:] += rng.uniform(-50, 50, 4)
    img = hu[labels]
    img = ndi.gaussian_filter(img, 0.5, mode="nearest")
    img += rng.normal(0.0, noise_hu, img.shape)
    img = np.clip(img, -1024.0, 3071.0).astype(np.float32)
    img, labels = _to_orientation([img, labels], ras_affine, orientation, affine)
    return Volume(
        array=img,
        affine=affine,
        modality="CT",
        subject=f"phantom-ct-{seed:03d}",
        meta={"labels": labels, "label_names": dict(CT_LABELS), "units": "HU"},
    )


def _smooth_field(shape: Sequence[int], rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """Smooth random field of ``shape`` with values in ``[-amplitude, amplitude]``."""
    coarse = rng.uniform(-1.0, 1.0, (4, 4, 4))
    field = ndi.zoom(coarse, np.asarray(shape) / 4.0, order=3, mode="nearest", grid_mode=True)
    field = field[: shape[0], : shape[1], : shape[2]]
    m = np.abs(field).max()
    return field * (amplitude / m) if m > 0 else field


def mri_phantom(
    shape: Sequence[int] = (32, 32, 32),
    spacing: Sequence[float] = (1.0, 1.0, 1.2),
    seed: int = 0,
    orientation: str = "RAS",
    center: Sequence[float] = (-8.0, 15.0, 30.0),
    bias: float = 0.2,
    noise: float = 0.02,
) -> Volume:
    """MR-like (T1-ish) version of the CT phantom's anatomy: positive intensities.

    Fat bright, soft tissue and organs mid-grey, bone dark, background near zero; a smooth
    multiplicative bias field (``±bias``) and Rician noise (``noise`` of the maximum).
    """
    rng = np.random.default_rng([seed, 2])
    affine, ras_affine, grid = _canonical_grid(shape, spacing, orientation, center)
    labels = _body_labels(grid, center, rng)
    val = np.array([0.0, 0.9, 0.5, 0.6, 0.4, 0.35, 0.36, 0.15, 0.2, 0.2, 0.25], np.float64)
    val[1:] *= rng.uniform(0.9, 1.1, len(val) - 1)
    img = ndi.gaussian_filter(val[labels], 0.6, mode="nearest")
    img *= 1.0 + _smooth_field(img.shape, rng, bias)
    sigma = noise * float(img.max())
    img = np.hypot(img + rng.normal(0.0, sigma, img.shape), rng.normal(0.0, sigma, img.shape))
    img = (img * 1000.0).astype(np.float32)
    img, labels = _to_orientation([img, labels], ras_affine, orientation, affine)
    return Volume(
        array=img,
        affine=affine,
        modality="MR",
        subject=f"phantom-mr-{seed:03d}",
        meta={"labels": labels, "label_names": dict(CT_LABELS)},
    )


def blob_volume(
    shape: Sequence[int] = (32, 32, 32),
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    seed: int = 0,
    orientation: str = "RAS",
    center: Sequence[float] = (5.0, -10.0, 20.0),
    n_blobs: int = 24,
) -> Volume:
    """Smooth positive volume where every position looks different.

    A sum of random anisotropic Gaussians at three scales on top of a slanted ramp (which
    breaks every mirror symmetry), defined in world millimetres: good for tests where a
    model must tell positions apart.
    """
    rng = np.random.default_rng([seed, 3])
    affine, ras_affine, grid = _canonical_grid(shape, spacing, orientation, center)
    pts = grid.reshape(-1, 3)
    lo, hi = pts.min(0), pts.max(0)
    ext = np.maximum(hi - lo, 1e-6)
    rel = (pts - lo) / ext
    img = 0.5 + rel @ np.array([0.3, 0.2, 0.1])
    for n in range(n_blobs):
        scale = (0.25, 0.12, 0.06)[n % 3]
        c = rng.uniform(0.0, 1.0, 3)
        s = scale * rng.uniform(0.7, 1.3, 3)
        a = rng.uniform(0.3, 1.0)
        img += a * np.exp(-0.5 * (((rel - c) / s) ** 2).sum(-1))
    img = img.reshape(grid.shape[:3]).astype(np.float32)
    (img,) = _to_orientation([img], ras_affine, orientation, affine)
    return Volume(array=img, affine=affine, modality="MR", subject=f"phantom-blob-{seed:03d}")
