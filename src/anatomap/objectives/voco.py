"""VoCo-style volume contrast: predict how much a crop overlaps a set of base crops.

Wu et al., "VoCo: A Simple-yet-Effective Volume Contrastive Learning Framework for 3D Medical
Image Analysis", CVPR 2024. The reference cuts a grid of non-overlapping base crops and one
random crop, and trains the cosine similarity of the random crop's projection with each
base's projection to equal the fraction of the random crop lying in that base
(``L_pred = -mean log(1 - |sim - overlap|)``), while a regulariser pushes the similarity of
different bases to zero (they do not overlap).

Our design, in world millimetres like every anatomap target: the views are ``num_bases``
base crops and ``num_random`` random crops of one volume, cut anywhere in the foreground
(the sampler draws them; no grid). The targets are the overlap fractions of the crops'
world boxes (:func:`anatomap.geometry.overlap_matrix`). Because our bases may overlap, the
regulariser's target is their overlap fraction rather than zero, which reduces to the
reference when bases are disjoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from anatomap import geometry
from anatomap.data.sampler import ViewSpec
from anatomap.models.encoders import Encoder
from anatomap.models.heads import projector
from anatomap.objectives.base import Objective, ObjectiveParams, flatten_views
from anatomap.objectives.registry import register_objective


def overlap_prediction_loss(similarity: torch.Tensor, overlap: torch.Tensor) -> torch.Tensor:
    """VoCo's prediction loss ``-mean log(1 - |sim - overlap|)``; ``similarity`` is clamped to
    ``[0, 1]`` (VoCo takes the positive part of the cosine)."""
    err = (similarity.clamp(0.0, 1.0) - overlap).abs()
    return -torch.log((1.0 - err).clamp_min(1e-4)).mean()


def base_regulariser(similarity: torch.Tensor, overlap: torch.Tensor) -> torch.Tensor:
    """Mean ``|sim - overlap|`` over pairs of different bases (``[..., K, K]`` inputs)."""
    k = similarity.shape[-1]
    off = ~torch.eye(k, dtype=torch.bool, device=similarity.device)
    return (similarity - overlap).abs()[..., off].mean()


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[..., N, D] x [..., M, D] -> [..., N, M]`` cosine similarities."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(-1, -2)


class VoCoConfig(ObjectiveParams):
    crop_size: int = Field(default=32, gt=0, description="crop edge in voxels")
    num_bases: int = Field(default=4, ge=2)
    num_random: int = Field(default=2, ge=1)
    hidden_dim: int = Field(default=128, gt=0)
    proj_dim: int = Field(default=64, gt=0)
    reg_weight: float = Field(default=1.0, ge=0)


@register_objective("voco")
class VoCo(Objective):
    """Overlap prediction between random crops and base crops (baseline)."""

    Config = VoCoConfig
    config: VoCoConfig

    def __init__(self, config: VoCoConfig, encoder: Encoder) -> None:
        super().__init__(config, encoder)
        self.projector = projector(encoder.embed_dim, config.hidden_dim, config.proj_dim)

    def view_spec(self) -> ViewSpec:
        c = self.config
        return ViewSpec(
            num_views=c.num_bases + c.num_random, size=(c.crop_size,) * self.spatial_dims
        )

    def forward(self, encoder: Encoder, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, affines = batch["image"], batch["affine"]
        b, v = images.shape[:2]
        k = self.config.num_bases
        z = self.projector(encoder(flatten_views(images)).pooled.float()).reshape(b, v, -1)
        shape = images.shape[3:]
        aff = affines.detach().cpu().numpy()
        overlap = torch.as_tensor(
            geometry.overlap_matrix(aff, shape, aff, shape), dtype=z.dtype, device=z.device
        )
        sim = cosine_matrix(z, z)
        pred = overlap_prediction_loss(sim[:, k:, :k], overlap[:, k:, :k])
        reg = base_regulariser(sim[:, :k, :k], overlap[:, :k, :k])
        loss = pred + self.config.reg_weight * reg
        return {"loss": loss, "overlap_pred": pred.detach(), "base_reg": reg.detach()}
