"""The in-memory image type: an array with its voxel-to-world affine."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from anatomap import geometry


@dataclass
class Volume:
    """One scan (one modality) with its geometry.

    ``array`` is indexed ``[i, j, k]`` (``[i, j]`` for 2-D) in the same axis order as the
    columns of ``affine``, a 4x4 voxel-to-world matrix in RAS+ millimetres, whatever the file
    format stored (DICOM/ITK's LPS is converted on reading).
    """

    array: np.ndarray
    affine: np.ndarray
    modality: str = "image"
    subject: str = ""
    path: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.array.shape)

    @property
    def ndim(self) -> int:
        return self.array.ndim

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple(float(s) for s in geometry.spacing(self.affine)[: self.ndim])

    @property
    def orientation(self) -> str:
        return geometry.orientation_codes(self.affine)
