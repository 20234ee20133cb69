"""Painting and acquisition artefacts of synthetic subjects.

Each subject gets one contrast family (:data:`anatomap.data.synth.config.FAMILIES`): a mean
intensity per class, a shift per region and a within-class texture (a Gaussian mixture per
label, SynthSeg, Billot et al. 2023), painted with partial volume from the source's soft
class maps when it has them. Then the acquisition: a smooth multiplicative bias field,
blur and a coarser acquisition grid (anisotropic slice thickness: blur, downsample, noise,
upsample), Rician noise and gamma for MR-like families; Gaussian noise in HU for ``ct``.
Every draw is made up front into :class:`Paint` / :class:`Acquisition` (recorded with the
subject); rendering only replays them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from anatomap.data.synth.config import FAMILIES, SynthConfig
from anatomap.data.synth.source import LabelSource
from anatomap.errors import ConfigError

MR_TABLES = ("t1", "t2", "pd", "flair")


def available_families(source: LabelSource) -> tuple[str, ...]:
    """The families ``source`` can be painted in (named tables need the source's table)."""
    ok = {"gmm", "inverted", "flat", *source.tables}
    if source.image is not None:
        ok.add("real")
    return tuple(f for f in FAMILIES if f in ok)


def choose_family(
    rng: np.random.Generator, source: LabelSource, contrasts: list[str], real_fraction: float
) -> str:
    """``real`` with probability ``real_fraction`` (when allowed and available), else a
    uniform choice among the allowed painted families the source supports."""
    allowed = [f for f in contrasts if f in available_families(source)]
    painted = [f for f in allowed if f != "real"]
    real = "real" in allowed
    if real and (not painted or rng.random() < real_fraction):
        return "real"
    if not painted:
        raise ConfigError(
            f"none of the contrasts {contrasts} applies to source {source.name!r} "
            f"(it supports {list(available_families(source))})"
        )
    return painted[int(rng.integers(len(painted)))]


@dataclass(frozen=True)
class Paint:
    """One subject's intensity model: class means, region shifts, within-class std."""

    family: str
    means: list[float]  # per class (HU for ct)
    region_shift: list[float]  # per region value (0: none)
    texture: list[float]  # per class std
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def draw_paint(
    rng: np.random.Generator, source: LabelSource, family: str, cfg: SynthConfig
) -> Paint:
    """Draw the class means of ``family`` (jittered tables, or random for ``gmm`` / ``flat``),
    region shifts and textures."""
    k = len(source.class_names)
    unit = cfg.ct_unit_hu if family == "ct" else 1.0
    jitter = rng.normal(0.0, cfg.class_jitter, k) * unit
    dark = rng.random() < 0.5  # gmm / flat: MR background stays dark half the time
    if family == "gmm":
        means = rng.uniform(0.0, 1.0, k)
        if dark:
            means[0] = rng.uniform(0.0, 0.1)
    elif family == "flat":
        centre, width = rng.uniform(0.3, 0.7), rng.uniform(0.02, 0.08)
        means = centre + rng.uniform(-width, width, k)
        if dark:
            means[0] = rng.uniform(0.0, 0.1)
    elif family == "inverted":
        ref = source.reference
        means = np.clip(ref[1:].max() + ref[1:].min() - ref + jitter, 0.0, None)
        means[0] = abs(jitter[0]) * 0.5
    elif family in source.tables:
        means = np.asarray(source.tables[family], np.float64) + jitter
        means[0] = source.tables[family][0] + (abs(jitter[0]) if family != "ct" else 0.0)
    else:  # real: the source's intensities, nothing to paint
        means = np.zeros(k)
    n_regions = int(source.regions.max(initial=0)) + 1 if source.regions is not None else 1
    shift = rng.normal(0.0, cfg.region_std, n_regions) * unit
    shift[0] = 0.0
    texture = rng.uniform(0.0, cfg.texture_max, k) * unit
    return Paint(
        family=family,
        means=[float(v) for v in means],
        region_shift=[float(v) for v in shift],
        texture=[float(v) for v in texture],
        seed=int(rng.integers(2**62)),
    )


def paint_source(p: Paint, source: LabelSource) -> np.ndarray:
    """The source painted (float32, on its grid): ``sum_k P_k mu_k + shift[region]`` with
    the soft class maps ``P`` when the source has them (partial volume), else ``mu[class]``.
    Trilinear resampling commutes with this sum, so painting before the warp equals painting
    resampled soft maps."""
    means = np.asarray(p.means, np.float32)
    if source.probs is not None:
        img = np.einsum("k...,k->...", source.probs, means, optimize=True).astype(np.float32)
    else:
        img = means[source.classes]
    if source.regions is not None:
        img += np.asarray(p.region_shift, np.float32)[source.regions]
    return img


def add_texture(image: np.ndarray, p: Paint, classes: np.ndarray) -> np.ndarray:
    """Within-class texture on the subject grid: ``+ texture[class] * N(0, 1)``."""
    noise = np.random.default_rng(p.seed).standard_normal(classes.shape, dtype=np.float32)
    return image + np.asarray(p.texture, np.float32)[classes] * noise


@dataclass(frozen=True)
class Acquisition:
    """One subject's acquisition: bias field, resolution, blur, noise and gamma."""

    bias_coeffs: list[float]  # log bias on a bias_grid^3 grid (empty: none)
    acq_spacing: list[float]  # per array axis (mm); equal to the output spacing: full res
    blur: float  # extra Gaussian sigma (output voxels)
    noise: float  # MR: std as a fraction of the maximum; ct: HU
    gamma: float
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def draw_acquisition(
    rng: np.random.Generator, cfg: SynthConfig, family: str, spacing: float
) -> Acquisition:
    """Draw the artefacts (no bias field or gamma for ``ct``: CT has neither)."""
    ct = family == "ct"
    bias_std = rng.uniform(0.0, cfg.bias_max)
    coeffs = rng.normal(0.0, 1.0, cfg.bias_grid**3) * bias_std
    acq = np.full(3, float(spacing))
    if rng.random() < cfg.lowres_probability:
        thick = int(rng.integers(3))
        lo, hi = cfg.slice_thickness_mm
        acq = np.maximum(acq, rng.uniform(spacing, 1.5 * spacing, 3))
        acq[thick] = max(float(spacing), rng.uniform(lo, hi))
    blur = rng.uniform(0.0, cfg.blur_max)
    noise = rng.uniform(*cfg.ct_noise_hu) if ct else rng.uniform(0.0, cfg.noise_max)
    gamma = float(np.exp(rng.uniform(-cfg.gamma_log_max, cfg.gamma_log_max)))
    return Acquisition(
        bias_coeffs=[] if ct else [float(c) for c in coeffs],
        acq_spacing=[float(a) for a in acq],
        blur=float(blur),
        noise=float(noise),
        gamma=1.0 if ct else gamma,
        seed=int(rng.integers(2**62)),
    )


def _resize(img: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if tuple(img.shape) == tuple(shape):
        return img
    t = torch.from_numpy(np.ascontiguousarray(img))[None, None]
    return F.interpolate(t, size=shape, mode="trilinear", align_corners=True)[0, 0].numpy()


def acquire(image: np.ndarray, a: Acquisition, spacing: float, ct: bool) -> np.ndarray:
    """Apply the acquisition to an image on the output grid (float32 out)."""
    img = np.asarray(image, np.float32)
    shape = img.shape
    if a.bias_coeffs:
        n = round(len(a.bias_coeffs) ** (1 / 3))
        grid = np.asarray(a.bias_coeffs, np.float32).reshape(n, n, n)
        img = img * np.exp(_resize(grid, shape))
    ratio = np.asarray(a.acq_spacing) / spacing
    sigma = np.sqrt(np.maximum(ratio**2 - 1.0, 0.0)) / 2.355 + a.blur  # FWHM = acquisition
    if np.any(sigma > 0.05):
        img = gaussian_filter(img, sigma, mode="nearest")
    low = tuple(max(2, round((n - 1) / r) + 1) for n, r in zip(shape, ratio, strict=True))
    img = _resize(img, low)
    rng = np.random.default_rng(a.seed)
    if ct:
        img = img + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(a.noise)
    else:
        sd = np.float32(a.noise * max(float(img.max()), 1e-6))
        n1 = rng.standard_normal(img.shape, dtype=np.float32) * sd
        n2 = rng.standard_normal(img.shape, dtype=np.float32) * sd
        img = np.hypot(img + n1, n2)  # Rician magnitude
    img = _resize(img.astype(np.float32), shape)
    if ct:
        return np.clip(img, -1024.0, 3071.0).astype(np.float32)
    img = np.clip(img, 0.0, None) / np.float32(max(float(img.max()), 1e-6))
    return (img ** np.float32(a.gamma)).astype(np.float32)
