"""ISImed: crop embeddings whose distances match the crops' physical distances.

Jabareen, Yuan, Lukassen, "ISImed: A Framework for Self-Supervised Learning using Intrinsic
Spatial Information in Medical Images", arXiv 2410.16947. The loss is the MSE between the
pairwise Euclidean distance matrix of the embeddings and the pairwise distance matrix of the
crop centres (world mm / ``distance_scale``), plus a KL term that keeps the embedding
distribution close to N(0, I) (weight 0.005 in the reference).
"""

from __future__ import annotations

import torch
from pydantic import Field

from anatomap import geometry
from anatomap.data.sampler import ViewSpec
from anatomap.models.encoders import Encoder
from anatomap.objectives.base import Objective, ObjectiveParams, flatten_views
from anatomap.objectives.registry import register_objective


def gaussian_kl(embeddings: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag sigma^2) || N(0, I)) of the batch's per-dimension moments, per dim.

    ``embeddings [M, D]``; the moments are taken over the M embeddings.
    """
    flat = embeddings.reshape(-1, embeddings.shape[-1])
    mu = flat.mean(0)
    var = flat.var(0, unbiased=False).clamp_min(1e-6)
    return 0.5 * (var + mu.pow(2) - 1.0 - var.log()).mean()


def isimed_loss(
    embeddings: torch.Tensor,
    centres_mm: torch.Tensor,
    distance_scale: float = 10.0,
    kl_weight: float = 0.005,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ISImed loss for ``embeddings [B, N, D]`` of crops centred at ``centres_mm [B, N, 3]``.

    Pairs are taken within each of the B groups (crops of one volume, or of volumes sharing
    a frame). Returns the total loss and its parts.
    """
    target = geometry.pairwise_distances(centres_mm.to(embeddings.dtype)) / distance_scale
    diff = embeddings[:, :, None, :] - embeddings[:, None, :, :]
    # sqrt with an epsilon: the diagonal (zero distance) has a finite gradient.
    dist = (diff.pow(2).sum(-1) + 1e-8).sqrt()
    n = embeddings.shape[1]
    off_diag = ~torch.eye(n, dtype=torch.bool, device=embeddings.device)
    mse = (dist - target)[:, off_diag].pow(2).mean()
    kl = gaussian_kl(embeddings)
    return mse + kl_weight * kl, {"distance_mse": mse.detach(), "kl": kl.detach()}


class ISImedConfig(ObjectiveParams):
    num_crops: int = Field(default=16, ge=2, description="crops per volume")
    crop_size: int = Field(default=32, gt=0, description="crop edge in voxels")
    distance_scale: float = Field(default=10.0, gt=0, description="mm per embedding unit")
    kl_weight: float = Field(default=0.005, ge=0)
    foreground: bool = True


@register_objective("isimed")
class ISImed(Objective):
    """Distance-matrix regression on N crops per volume (within-volume pairs)."""

    Config = ISImedConfig
    config: ISImedConfig

    def view_spec(self) -> ViewSpec:
        c = self.config
        return ViewSpec(
            num_views=c.num_crops,
            size=(c.crop_size,) * self.spatial_dims,
            foreground=c.foreground,
        )

    def forward(self, encoder: Encoder, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images = batch["image"]
        b, v = images.shape[:2]
        emb = encoder(flatten_views(images)).pooled.reshape(b, v, -1)
        centres = geometry.box_center(batch["affine"], images.shape[3:])
        loss, parts = isimed_loss(
            emb.float(), centres, self.config.distance_scale, self.config.kl_weight
        )
        return {"loss": loss, **parts}
