"""The knobs of the synthetic-subject generator (:mod:`anatomap.data.synth`), with defaults.

Ranges follow SynthSeg (Billot et al., Medical Image Analysis 2023) and SynthMorph
(Hoffmann et al., IEEE TMI 2022) where they apply; the global affine follows issue 14
(rotation up to ±20°, per-axis scale 0.85-1.15).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

FAMILIES: tuple[str, ...] = ("gmm", "inverted", "flat", "t1", "t2", "pd", "flair", "ct", "real")
"""Contrast families: random Gaussian mixture per class (``gmm``), the reference contrast
reversed (``inverted``), low contrast (``flat``), named MR-like tables (``t1``, ``t2``, ``pd``,
``flair``; the brain source has them), a Hounsfield table (``ct``) and the source's own
intensities under the same deformation (``real``)."""

Range = tuple[float, float]


class SynthConfig(BaseModel):
    """How synthetic subjects are drawn. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # -- global affine (subject world -> source world, about the anatomy's centre) -----------
    rotation_deg: float = Field(20.0, ge=0, le=180, description="max |rotation| per axis (deg)")
    scale: Range = Field((0.85, 1.15), description="per-axis scale range")
    shear: float = Field(0.05, ge=0, le=0.5, description="max |shear| per off-diagonal term")
    translation_mm: float = Field(20.0, ge=0, description="max |translation| per axis (mm)")
    # -- deformation: stationary velocity field, scaling and squaring -------------------------
    svf_scales_mm: list[float] = Field(
        default_factory=lambda: [64.0, 32.0],
        description="wavelength of each velocity component (mm); two or more scales",
    )
    svf_max_mm: list[float] = Field(
        default_factory=lambda: [10.0, 5.0],
        description="per scale: the velocity's peak norm is drawn in [0, max] (mm)",
    )
    field_spacing_mm: float = Field(6.0, gt=0, description="grid spacing of the velocity (mm)")
    field_margin_mm: float = Field(
        12.0, ge=0, description="velocity grid beyond the field of view (mm)"
    )
    integration_steps: int = Field(7, ge=0, le=12, description="scaling-and-squaring steps")
    # -- output grid and field of view --------------------------------------------------------
    spacing: float = Field(2.0, gt=0, description="output voxel spacing (mm, isotropic)")
    margin_mm: Range = Field((0.0, 20.0), description="space around the anatomy per side (mm)")
    fov_cut_probability: float = Field(
        0.3, ge=0, le=1, description="probability that the field of view cuts the anatomy"
    )
    fov_keep: Range = Field(
        (0.4, 0.9), description="fraction of the anatomy's extent kept along a cut axis"
    )
    fov_max_cut_axes: int = Field(2, ge=1, le=3, description="axes cut at most (at least 1)")
    random_orientation: bool = Field(
        True, description="random voxel axis order and flips in the output affine (else RAS)"
    )
    # -- contrast -----------------------------------------------------------------------------
    contrasts: list[str] = Field(
        default_factory=lambda: list(FAMILIES),
        description=f"contrast families allowed (of {', '.join(FAMILIES)})",
    )
    renders: int = Field(
        1,
        ge=1,
        le=8,
        description="contrast renders per subject under one deformation and field of view "
        "(each its own family, paint and artefacts): cross-contrast positives for training",
    )
    real_fraction: float = Field(
        0.2, ge=0, le=1, description="probability of the source's real intensities ('real')"
    )
    class_jitter: float = Field(
        0.05, ge=0, description="std of each class mean around its table value ([0, 1] units)"
    )
    region_std: float = Field(0.03, ge=0, description="std of a region's own mean shift")
    texture_max: float = Field(0.05, ge=0, description="max within-class std ([0, 1] units)")
    ct_unit_hu: float = Field(
        100.0, gt=0, description="HU per [0, 1] unit for jitter and texture of the ct family"
    )
    # -- acquisition artefacts ----------------------------------------------------------------
    bias_max: float = Field(0.3, ge=0, description="max std of the log bias field (MR-like)")
    bias_grid: int = Field(4, ge=2, description="control points per axis of the bias field")
    lowres_probability: float = Field(
        0.5, ge=0, le=1, description="probability of a coarser acquisition (blur, down, up)"
    )
    slice_thickness_mm: Range = Field(
        (1.0, 6.0), description="acquisition spacing of the thick axis (mm)"
    )
    blur_max: float = Field(0.5, ge=0, description="max extra Gaussian blur (output voxels)")
    noise_max: float = Field(0.05, ge=0, description="max noise std (fraction of the maximum)")
    ct_noise_hu: Range = Field((0.0, 25.0), description="noise std range of the ct family (HU)")
    gamma_log_max: float = Field(0.4, ge=0, description="gamma = exp(U(-max, max)) (MR-like)")
    # -- on-the-fly views ---------------------------------------------------------------------
    preset: str = Field(
        "mri",
        description="intensity preset of SynthViewDataset (as `anatomap data cache --preset`); "
        "'mri' (robust percentiles) suits every family; cache a written cohort the same way",
    )

    @model_validator(mode="after")
    def _check(self) -> SynthConfig:
        unknown = [c for c in self.contrasts if c not in FAMILIES]
        if unknown or not self.contrasts:
            raise ValueError(f"contrasts must be some of {FAMILIES}, got {self.contrasts}")
        if len(self.svf_scales_mm) != len(self.svf_max_mm):
            raise ValueError("svf_scales_mm and svf_max_mm need one entry per scale")
        for name in ("scale", "margin_mm", "fov_keep", "slice_thickness_mm", "ct_noise_hu"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must satisfy 0 <= low <= high, got {(lo, hi)}")
        if self.fov_keep[1] > 1:
            raise ValueError("fov_keep is a fraction: at most 1")
        return self
