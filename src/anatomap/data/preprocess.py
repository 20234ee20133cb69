"""Preprocessing: canonical RAS+ orientation, resampling to a target spacing, intensity presets.

Orientation is a pure voxel reordering (:func:`anatomap.geometry.reorient`); resampling is
MONAI's ``Spacing`` on a ``MetaTensor`` (it keeps the world position of every structure,
tested); intensity presets are MONAI's ``ScaleIntensityRange`` (CT, HU window) and
``ScaleIntensityRangePercentiles`` (MRI, robust percentiles).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import ScaleIntensityRange, ScaleIntensityRangePercentiles, Spacing

from anatomap import geometry
from anatomap.data.volume import Volume
from anatomap.errors import ConfigError


@dataclass(frozen=True)
class IntensityPreset:
    """How one modality's intensities are mapped to roughly [0, 1]."""

    kind: str  # "ct" | "mri" | "none"
    hu_min: float = -1000.0
    hu_max: float = 1000.0
    lower_percentile: float = 0.5
    upper_percentile: float = 99.5
    foreground_threshold: float = 0.05  # on the normalised image

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, IntensityPreset] = {
    "ct": IntensityPreset("ct", foreground_threshold=(-500.0 + 1000.0) / 2000.0),
    "mri": IntensityPreset("mri"),
    "none": IntensityPreset("none", foreground_threshold=0.0),
}


def parse_presets(spec: str) -> dict[str, IntensityPreset]:
    """``"ct"`` (all modalities) or ``"T1w=mri,CT=ct"`` (per modality, ``*`` for the rest)."""
    out: dict[str, IntensityPreset] = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        modality, _, name = part.rpartition("=")
        if name not in PRESETS:
            raise ConfigError(f"unknown intensity preset '{name}'; choose from {sorted(PRESETS)}")
        out[modality or "*"] = PRESETS[name]
    if not out:
        raise ConfigError("empty intensity preset")
    return out


def preset_for(presets: dict[str, IntensityPreset], modality: str) -> IntensityPreset:
    if modality in presets:
        return presets[modality]
    if "*" in presets:
        return presets["*"]
    raise ConfigError(f"no intensity preset for modality '{modality}' (have {sorted(presets)})")


def normalise_intensity(array: np.ndarray, preset: IntensityPreset) -> np.ndarray:
    """Apply an intensity preset (float32 output)."""
    t = torch.as_tensor(np.asarray(array, np.float32))
    if preset.kind == "ct":
        t = ScaleIntensityRange(preset.hu_min, preset.hu_max, 0.0, 1.0, clip=True)(t)
    elif preset.kind == "mri":
        t = ScaleIntensityRangePercentiles(
            preset.lower_percentile, preset.upper_percentile, 0.0, 1.0, clip=True
        )(t)
    return np.asarray(t, dtype=np.float32)


def to_canonical(volume: Volume) -> Volume:
    """Reorder voxels so that the array axes point R, A, S (no interpolation)."""
    array, affine = geometry.reorient(volume.array, volume.affine, "RAS")
    return Volume(array, affine, volume.modality, volume.subject, volume.path, dict(volume.meta))


def resample(volume: Volume, spacing: float | tuple[float, ...], label: bool = False) -> Volume:
    """Resample to ``spacing`` mm (MONAI ``Spacing``; nearest for label maps)."""
    nd = volume.ndim
    pixdim = (float(spacing),) * nd if np.isscalar(spacing) else tuple(spacing)
    if np.allclose(volume.spacing, pixdim, atol=1e-4):
        return volume
    mt = MetaTensor(torch.as_tensor(volume.array[None]), affine=torch.as_tensor(volume.affine))
    out = Spacing(pixdim=pixdim, mode="nearest" if label else "bilinear", padding_mode="zeros")(mt)
    array = out.array[0]
    array = array.astype(volume.array.dtype) if label else array.astype(np.float32)
    return Volume(
        array,
        np.asarray(out.affine, np.float64),
        volume.modality,
        volume.subject,
        volume.path,
        dict(volume.meta),
    )


def preprocess(
    volume: Volume,
    spacing: float | tuple[float, ...] | None,
    preset: IntensityPreset | None,
    label: bool = False,
) -> Volume:
    """Canonical orientation, resampling, then the intensity preset (images only)."""
    out = to_canonical(volume)
    if spacing is not None:
        out = resample(out, spacing, label=label)
    if preset is not None and not label:
        out.array = normalise_intensity(out.array, preset)
    return out
