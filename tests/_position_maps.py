"""Test helpers: dense maps whose unit vectors encode world position, and a fake dense model.

A target's map then agrees with the template's exactly where the two are at the same world
point, so a matcher's answer is known in millimetres whatever the two grids and affines.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from anatomap import geometry
from anatomap.infer.embed import DenseEmbedding, DenseModel


def position_field(
    affine: np.ndarray, shape: tuple[int, ...], stride: int, freqs: list[float]
) -> torch.Tensor:
    """``[6 * len(freqs), *shape]`` Fourier features of the world position of each voxel of
    the stride-``stride`` feature grid of ``affine``, unit length along dim 0."""
    w = torch.as_tensor(geometry.world_grid(geometry.feature_affine(affine, stride), shape))
    fr = torch.tensor(freqs, dtype=torch.float64)
    feats = [
        g(w[..., a] * f * 2 * math.pi) for a in range(3) for f in fr for g in (torch.sin, torch.cos)
    ]
    return F.normalize(torch.stack(feats).float(), dim=0)


def position_embedding(
    affine: np.ndarray, shape: tuple[int, ...], source: str = ""
) -> DenseEmbedding:
    """A scan's dense embedding at strides 8 (smooth, coarse) and 2 (sharp, fine)."""
    cs, fs = tuple(math.ceil(n / 8) for n in shape), tuple(math.ceil(n / 2) for n in shape)
    return DenseEmbedding(
        position_field(affine, cs, 8, [1 / 300.0, 1 / 150.0]),
        position_field(affine, fs, 2, [1 / 60.0, 1 / 25.0, 1 / 12.0]),
        geometry.feature_affine(affine, 8),
        geometry.feature_affine(affine, 2),
        source=source,
        image_shape=shape,
        image_affine=affine,
    )


class PoolModel(DenseModel):
    """A fake dense model: average-pooled [image, 1] maps at strides 8 and 2."""

    def __init__(self) -> None:
        self.ckpt = None
        self.encoder = torch.nn.Identity()
        self.objective = torch.nn.Identity()
        self.strides = (8, 2)
        self.max_stride = 8

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = torch.cat([x, torch.ones_like(x)], 1)
        return (
            F.normalize(F.avg_pool3d(feats, 8), dim=1),
            F.normalize(F.avg_pool3d(feats, 2), dim=1),
        )
