"""SimCLR-style instance contrast: the instance-level baseline of the benchmark.

Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", ICML
2020. Two overlapping, intensity-augmented views of each volume are positives; the views of
the other volumes in the batch are negatives. NT-Xent through MONAI's ``ContrastiveLoss`` on
the output of an MLP projector. The views' affines are used only to cut overlapping views: the
loss knows nothing of position, which is what makes it the baseline.
"""

from __future__ import annotations

import torch
from monai.losses import ContrastiveLoss
from pydantic import Field

from anatomap.data.sampler import IntensityAugment, ViewSpec
from anatomap.models.encoders import Encoder
from anatomap.models.heads import projector
from anatomap.objectives.base import Objective, ObjectiveParams, flatten_views
from anatomap.objectives.registry import register_objective


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent of paired projections ``z1, z2 [B, D]`` (row i of each is a positive pair)."""
    return ContrastiveLoss(temperature=temperature)(z1, z2)


class SimCLRConfig(ObjectiveParams):
    crop_size: int = Field(default=32, gt=0, description="view edge in voxels")
    scale: tuple[float, float] = (0.8, 1.2)
    min_overlap: float = Field(default=0.3, ge=0, le=1, description="views overlap at least")
    augment: bool = True
    hidden_dim: int = Field(default=128, gt=0)
    proj_dim: int = Field(default=64, gt=0)
    temperature: float = Field(default=0.5, gt=0)


@register_objective("simclr")
class SimCLR(Objective):
    """Two views per volume, NT-Xent over the batch (baseline)."""

    Config = SimCLRConfig
    config: SimCLRConfig

    def __init__(self, config: SimCLRConfig, encoder: Encoder) -> None:
        super().__init__(config, encoder)
        self.projector = projector(encoder.embed_dim, config.hidden_dim, config.proj_dim)

    def view_spec(self) -> ViewSpec:
        c = self.config
        return ViewSpec(
            num_views=2,
            size=(c.crop_size,) * self.spatial_dims,
            scale=c.scale,
            min_overlap=c.min_overlap,
            intensity=IntensityAugment() if c.augment else None,
        )

    def forward(self, encoder: Encoder, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images = batch["image"]
        b = images.shape[0]
        z = self.projector(encoder(flatten_views(images)).pooled.float()).reshape(b, 2, -1)
        loss = nt_xent(z[:, 0], z[:, 1], self.config.temperature)
        with torch.no_grad():
            pos = torch.nn.functional.cosine_similarity(z[:, 0], z[:, 1], dim=-1).mean()
        return {"loss": loss, "positive_cosine": pos}
