"""Exact subject <-> template maps of the demo cohort, and the per-subject random draws.

A subject's world (RAS mm) maps to template (MNI) mm through a global affine composed with a
smooth cubic B-spline displacement (:class:`SubjectTransform`); :func:`draw_subject` draws
that transform plus the subject's grid, orientation, field of view and intensity parameters
from ``np.random.default_rng([seed, index])``, always in the same order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from anatomap import geometry
from anatomap.data.demo.template import foreground_points, load_template, template_box
from anatomap.data.phantoms import oriented_affine

N_CTRL = 4
"""Control points per axis of the cubic B-spline displacement and bias fields."""

NON_RAS_ORIENTATIONS: tuple[str, ...] = ("LAS", "LPS", "RPI", "PIR")


def bspline_weights(c: np.ndarray, n_ctrl: int = N_CTRL) -> np.ndarray:
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
            weights.append(bspline_weights(c * (self.coeffs.shape[0] - 1), self.coeffs.shape[0]))
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


@dataclass(frozen=True)
class _Draws:
    """The raw random numbers of one subject, drawn in this order (the order is the output)."""

    rot: np.ndarray
    scale: np.ndarray
    trans: np.ndarray
    disp_mm: float
    raw: np.ndarray
    spacing_factor: np.ndarray
    margins: np.ndarray
    orient_choice: int
    crop_axis: int
    crop_fraction: float
    crop_position: float
    gamma: float
    bias_amp: float
    bias_coeffs: np.ndarray
    noise_frac: float
    blur: float
    intensity_scale: float
    dtype: str
    noise_seed: int


def _draw(rng: np.random.Generator) -> _Draws:
    """Every random number of one subject; changing the order changes every demo file."""
    return _Draws(
        # geometry of the subject -> template map
        rot=rng.uniform(-8.0, 8.0, 3),
        scale=rng.uniform(0.92, 1.08) * rng.uniform(0.98, 1.02, 3),
        trans=rng.uniform(-10.0, 10.0, 3),
        disp_mm=float(rng.uniform(3.0, 5.0)),
        raw=rng.uniform(-1.0, 1.0, (N_CTRL, N_CTRL, N_CTRL, 3)),
        # grid, orientation, field of view
        spacing_factor=rng.uniform(0.9, 1.2, 3),
        margins=rng.uniform(4.0, 16.0, (2, 3)),
        orient_choice=int(rng.integers(len(NON_RAS_ORIENTATIONS))),
        crop_axis=int(rng.integers(3)),
        crop_fraction=float(rng.uniform(0.6, 0.85)),
        crop_position=float(rng.uniform(0.0, 1.0)),
        # intensities
        gamma=float(np.exp(rng.uniform(np.log(0.8), np.log(1.25)))),
        bias_amp=float(rng.uniform(0.1, 0.2)),
        bias_coeffs=rng.uniform(-1.0, 1.0, (N_CTRL, N_CTRL, N_CTRL)),
        noise_frac=float(rng.uniform(0.02, 0.04)),
        blur=float(rng.uniform(0.3, 0.7)) if rng.random() < 0.4 else 0.0,
        intensity_scale=float(rng.uniform(500.0, 3000.0)),
        dtype="int16" if rng.random() < 0.5 else "float32",
        noise_seed=int(rng.integers(2**62)),
    )


def _rotation(deg: np.ndarray) -> np.ndarray:
    ax, ay, az = np.deg2rad(deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _transform(d: _Draws, landmarks: str) -> SubjectTransform:
    """The drawn affine with the B-spline displacement scaled to a peak of ``d.disp_mm``."""
    lo, hi = template_box(load_template(landmarks))
    affine = np.eye(4)
    affine[:3, :3] = _rotation(d.rot) @ np.diag(d.scale)
    affine[:3, 3] = d.trans
    unit = SubjectTransform(affine, d.raw, lo, hi)
    s = np.linspace(lo, hi, 13)
    probe = np.stack(np.meshgrid(s[:, 0], s[:, 1], s[:, 2], indexing="ij"), -1).reshape(-1, 3)
    peak = float(np.linalg.norm(unit.displacement(probe), axis=-1).max())
    return SubjectTransform(affine, d.raw * (d.disp_mm / peak), lo, hi)


def _field_of_view(
    d: _Draws, transform: SubjectTransform, landmarks: str, partial: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The brain's extent in subject space plus margins, cropped along one axis if partial."""
    content = transform.to_subject(foreground_points(landmarks))
    fov_lo = content.min(0) - d.margins[0]
    fov_hi = content.max(0) + d.margins[1]
    if partial:
        ax = d.crop_axis
        ext = fov_hi[ax] - fov_lo[ax]
        start = fov_lo[ax] + d.crop_position * (1.0 - d.crop_fraction) * ext
        fov_lo[ax], fov_hi[ax] = start, start + d.crop_fraction * ext
    return fov_lo, fov_hi


def draw_subject(
    seed: int, index: int, spacing: float = 2.0, landmarks: str = "dosenbach"
) -> SubjectParams:
    """Draw one subject's transform, grid and intensity parameters (deterministic).

    Orientation: every third subject (``index % 3 == 0``) is RAS, the others draw one of
    :data:`NON_RAS_ORIENTATIONS`; ``index % 3 == 1`` subjects are partial scans.
    """
    d = _draw(np.random.default_rng([seed, index]))
    transform = _transform(d, landmarks)
    partial = index % 3 == 1
    fov_lo, fov_hi = _field_of_view(d, transform, landmarks, partial)
    orientation = "RAS" if index % 3 == 0 else NON_RAS_ORIENTATIONS[d.orient_choice]
    vox = spacing * d.spacing_factor
    world_axis = [{"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}[c] for c in orientation]
    shape = tuple(
        int(np.floor((fov_hi[w] - fov_lo[w]) / vox[k])) + 1 for k, w in enumerate(world_axis)
    )
    return SubjectParams(
        subject=f"sub-{index:03d}",
        index=index,
        transform=transform,
        rotation_deg=tuple(float(v) for v in d.rot),  # type: ignore[arg-type]
        scale=tuple(float(v) for v in d.scale),  # type: ignore[arg-type]
        translation_mm=tuple(float(v) for v in d.trans),  # type: ignore[arg-type]
        displacement_mm=d.disp_mm,
        orientation=orientation,
        voxel_spacing=tuple(float(v) for v in vox),  # type: ignore[arg-type]
        shape=shape,  # type: ignore[arg-type]
        affine=oriented_affine(orientation, vox, (fov_lo + fov_hi) / 2.0, shape),
        partial=partial,
        crop_axis=d.crop_axis,
        crop_fraction=d.crop_fraction,
        gamma=d.gamma,
        bias_amplitude=d.bias_amp,
        bias_coeffs=d.bias_coeffs,
        noise_fraction=d.noise_frac,
        blur_sigma=d.blur,
        intensity_scale=d.intensity_scale,
        dtype=d.dtype,
        noise_seed=d.noise_seed,
    )
