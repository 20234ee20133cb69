"""Rendering of one demo subject: the template resampled through its transform, intensity
changes (gamma, bias field, blur, Rician noise, scale), synthetic extra contrasts, labels and
landmarks on the subject's grid."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from anatomap import geometry
from anatomap.data.demo.template import Template, load_template, take_nearest
from anatomap.data.demo.transforms import N_CTRL, SubjectParams, bspline_weights

CONTRASTS: dict[str, dict[str, float]] = {
    # mean intensity of CSF, grey and white matter (skull-stripped, background 0)
    "T2w": {"csf": 1.0, "gm": 0.55, "wm": 0.35},
    "FLAIR": {"csf": 0.12, "gm": 0.65, "wm": 0.45},
}
"""Synthetic contrasts the demo can add to the T1w image (always present)."""


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


def smooth_field(coeffs: np.ndarray, amplitude: float, shape: Sequence[int]) -> np.ndarray:
    """Multiplicative field ``1 + b`` (cubic B-spline ``b``, ``max |b| = amplitude``)."""
    ws = [bspline_weights(np.linspace(0.0, N_CTRL - 1.0, n)) for n in shape]
    b = np.einsum("abc,ia,jb,kc->ijk", coeffs, *ws, optimize=True)
    peak = float(np.abs(b).max())
    return (1.0 + b * (amplitude / peak)).astype(np.float32)


def bias_field(p: SubjectParams) -> np.ndarray:
    """Smooth multiplicative field ``1 + b`` with ``max |b| = bias_amplitude`` (voxel space)."""
    return smooth_field(p.bias_coeffs, p.bias_amplitude, p.shape)


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
        image *= smooth_field(coeffs, float(rng.uniform(0.1, 0.25)), p.shape)
        sigma = np.float32(rng.uniform(0.02, 0.05) * float(image.max()))
        n1 = rng.standard_normal(p.shape, dtype=np.float32) * sigma
        n2 = rng.standard_normal(p.shape, dtype=np.float32) * sigma
        image = np.hypot(image + n1, n2) * np.float32(rng.uniform(300.0, 2000.0))
    return image.astype(np.float32)


def _augment(image: np.ndarray, p: SubjectParams) -> np.ndarray:
    """The T1w intensity changes: gamma, bias field, blur, Rician noise, scanner scale."""
    rng = np.random.default_rng(p.noise_seed)
    image = image ** np.float32(p.gamma)
    image *= bias_field(p)
    if p.blur_sigma > 0:
        image = ndi.gaussian_filter(image, p.blur_sigma, mode="nearest")
    sigma = np.float32(p.noise_fraction * float(image.max()))
    n1 = rng.standard_normal(p.shape, dtype=np.float32) * sigma
    n2 = rng.standard_normal(p.shape, dtype=np.float32) * sigma
    return np.hypot(image + n1, n2) * np.float32(p.intensity_scale)


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
    tissue = take_nearest(t.tissue, vox).reshape(p.shape)
    aal = take_nearest(t.aal, vox).reshape(p.shape)
    extra = {m: _render_contrast(p, m, t, vox, augment_intensity) for m in contrasts}
    del vox
    if augment_intensity:
        image = _augment(image, p)

    # landmarks: template -> subject, keep those inside the field of view and the brain mask
    names = np.asarray(t.landmark_names)
    xyz = tr.to_subject(t.landmark_mm)
    ijk = geometry.world_to_voxel(p.affine, xyz)
    in_fov = np.all((ijk >= 0) & (ijk <= np.asarray(p.shape) - 1), axis=-1)
    in_mask = take_nearest(t.mask, geometry.world_to_voxel(t.affine, t.landmark_mm)).astype(bool)
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
