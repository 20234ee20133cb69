"""Heads that several methods share, each a small module (as in lightly's ``heads``).

- :class:`DenseHeads`: SAM's coarse + fine per-voxel embeddings (Yan et al., TMI 2022), an FPN
  over the encoder pyramid; also used by topo.
- :func:`projector`: the SimCLR projection MLP (Chen et al., ICML 2020); also used by VoCo.
- :class:`ProjectionHead`: the DINO head (Caron et al., ICCV 2021) of Alice.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork
from torch import nn

from anatomap.models.encoders import Encoder


class DenseHeads(nn.Module):
    """FPN over the encoder pyramid, then a 1x1x1 projection per head (L2-normalised)."""

    def __init__(
        self,
        encoder: Encoder,
        embed_dim: int,
        fpn_channels: int,
        fine_level: int = 0,
        coarse_level: int = 2,
    ) -> None:
        super().__init__()
        n = len(encoder.pyramid_channels)
        if not fine_level < n or not coarse_level < n:
            raise ValueError(f"encoder has {n} pyramid levels; fine/coarse levels out of range")
        self.levels = sorted({fine_level, coarse_level})
        self.use = list(range(min(self.levels), n))
        d = encoder.spatial_dims
        self.fpn = FeaturePyramidNetwork(
            d, [encoder.pyramid_channels[i] for i in self.use], fpn_channels
        )
        conv = nn.Conv3d if d == 3 else nn.Conv2d
        # The FPN's own 3x3 output convolutions already mix neighbourhoods: 1x1 heads.
        self.fine = conv(fpn_channels, embed_dim, 1)
        self.coarse = conv(fpn_channels, embed_dim, 1)
        self.fine_level = fine_level
        self.coarse_level = coarse_level

    def forward(self, pyramid: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        feats = OrderedDict((str(i), pyramid[i]) for i in self.use)
        out = self.fpn(feats)
        coarse = F.normalize(self.coarse(out[str(self.coarse_level)]), dim=1)
        fine = F.normalize(self.fine(out[str(self.fine_level)]), dim=1)
        return coarse, fine


def projector(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """The SimCLR projection MLP (Linear-ReLU-Linear)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)
    )


class ProjectionHead(nn.Module):
    """DINO head: MLP -> L2-normalised bottleneck -> cosine prototype layer (the weight-
    normalised last layer of DINO with its gain fixed to 1). Logits lie in [-1, 1]."""

    def __init__(self, in_dim: int, hidden: int, bottleneck: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, bottleneck),
        )
        self.prototypes = nn.Parameter(torch.randn(out_dim, bottleneck) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1)
        return z @ F.normalize(self.prototypes, dim=-1).T
