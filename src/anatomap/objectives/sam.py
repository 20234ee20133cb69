"""SAM: Self-supervised Anatomical eMbedding (Yan et al., IEEE TMI 2022, arXiv 2012.02383).

Every voxel gets two L2-normalised embeddings from a feature pyramid (MONAI's
``FeaturePyramidNetwork`` over the encoder's pyramid): a *coarse* (global) map at low
resolution and a *fine* (local) map at stride 2. Two overlapping, scale-jittered,
intensity-augmented views of a volume are cut; voxels at the same world position (from the
view affines, via :mod:`anatomap.geometry`) are positives; InfoNCE with temperature 0.5 per
head. Fine negatives are mined by combined coarse + fine similarity (hard negatives, then a
random subset); coarse negatives are voxels of the other view outside an ignore radius plus
random voxels of the other volumes in the batch.

Our choices (the project spec, docs/methods/sam.md): positives are sampled *exactly* at the anchor's world
position by trilinear interpolation of the other view's map (instead of the nearest voxel);
both directions (view 0 -> 1 and 1 -> 0) are used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from anatomap import geometry
from anatomap.models.encoders import Encoder
from anatomap.objectives.base import (
    DenseObjective,
    ObjectiveParams,
    batch_generator,
    flatten_views,
)
from anatomap.objectives.registry import register_objective

# ----------------------------------------------------------------------------- pure losses


def info_nce(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    temperature: float = 0.5,
    negative_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE over L2-normalised embeddings.

    ``anchors``/``positives`` ``[N, D]``; ``negatives`` ``[N, K, D]`` (per-anchor) or
    ``[K, D]`` (shared); ``negative_mask`` ``[N, K]`` marks usable negatives.
    """
    pos = (anchors * positives).sum(-1, keepdim=True)
    if negatives.ndim == 2:
        neg = anchors @ negatives.T
    else:
        neg = torch.einsum("nd,nkd->nk", anchors, negatives)
    if negative_mask is not None:
        neg = neg.masked_fill(~negative_mask, float("-inf"))
    logits = torch.cat([pos, neg], dim=1) / temperature
    target = torch.zeros(len(anchors), dtype=torch.long, device=anchors.device)
    return F.cross_entropy(logits, target)


def mine_hard_negatives(
    similarity: torch.Tensor,
    valid: torch.Tensor,
    pool: int,
    keep: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``[N, keep]`` of hard negatives: the ``pool`` most similar valid candidates
    per anchor, of which ``keep`` are drawn at random. Also returns their validity mask
    (false where an anchor had fewer valid candidates than asked)."""
    pool = min(pool, similarity.shape[1])
    keep = min(keep, pool)
    masked = similarity.masked_fill(~valid, float("-inf"))
    top_val, top_idx = masked.topk(pool, dim=1)
    # The same random ranks for every anchor: a uniform subset of each anchor's top-k.
    choice = torch.randperm(pool, generator=generator)[:keep].to(similarity.device)
    idx = top_idx[:, choice]
    ok = torch.isfinite(top_val[:, choice])
    return idx, ok


def outside_radius(
    anchor_mm: torch.Tensor, candidate_mm: torch.Tensor, radius: float
) -> torch.Tensor:
    """``[N, M]`` mask of candidates farther than ``radius`` mm from each anchor."""
    return geometry.cross_distances(anchor_mm.float(), candidate_mm.float()) > radius


# ----------------------------------------------------------------------------- module


class SAMConfig(ObjectiveParams):
    crop_size: int = Field(default=32, gt=0, description="view edge in voxels")
    scale: tuple[float, float] = Field(default=(0.8, 1.2), description="per-view scale jitter")
    min_overlap: float = Field(default=0.25, ge=0, le=1)
    augment: bool = True
    embed_dim: int = Field(default=128, gt=0, description="per head")
    fpn_channels: int = Field(default=32, gt=0)
    fine_level: int = Field(default=0, ge=0, description="pyramid level of the fine head")
    coarse_level: int = Field(default=2, ge=0, description="pyramid level of the coarse head")
    temperature: float = Field(default=0.5, gt=0)
    fine_anchors: int = Field(default=256, gt=0)
    hard_pool: int = Field(default=256, gt=0, description="top-k by coarse+fine similarity")
    hard_keep: int = Field(default=64, gt=0, description="random subset of the top-k")
    fine_ignore_mm: float = Field(default=6.0, ge=0, description="not negatives within this")
    fine_candidates: int = Field(
        default=4096, gt=0, description="random voxels of the other view ranked for mining"
    )
    coarse_anchors: int = Field(default=64, gt=0)
    coarse_ignore_mm: float = Field(default=20.0, ge=0)
    coarse_global_negatives: int = Field(default=256, ge=0, description="from other volumes")


@register_objective("sam")
class SAM(DenseObjective):
    """Coarse-to-fine pixel-wise contrastive learning on two overlapping views."""

    Config = SAMConfig
    config: SAMConfig

    def forward(self, encoder: Encoder, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images = batch["image"]
        b = images.shape[0]
        coarse, fine = self.dense(encoder, flatten_views(images))
        coarse = coarse.view(b, 2, *coarse.shape[1:]).float()
        fine = fine.view(b, 2, *fine.shape[1:]).float()
        affines = batch["affine"].to(torch.float64)
        c_aff = geometry.feature_affine(affines, self.strides[0])
        f_aff = geometry.feature_affine(affines, self.strides[1])
        gen = batch_generator(batch)
        fine_losses, coarse_losses = [], []
        for i in range(b):
            for a, o in ((0, 1), (1, 0)):
                fl = self._fine_loss(
                    fine[i, a],
                    fine[i, o],
                    coarse[i, a],
                    coarse[i, o],
                    f_aff[i, a],
                    f_aff[i, o],
                    c_aff[i, a],
                    c_aff[i, o],
                    gen,
                )
                if fl is not None:
                    fine_losses.append(fl)
                others = [coarse[j, v] for j in range(b) if j != i for v in (0, 1)]
                cl = self._coarse_loss(
                    coarse[i, a], coarse[i, o], c_aff[i, a], c_aff[i, o], others, gen
                )
                if cl is not None:
                    coarse_losses.append(cl)
        zero = images.sum() * 0.0
        fine_l = torch.stack(fine_losses).mean() if fine_losses else zero
        coarse_l = torch.stack(coarse_losses).mean() if coarse_losses else zero
        return {
            "loss": fine_l + coarse_l,
            "fine": fine_l.detach(),
            "coarse": coarse_l.detach(),
            "pairs": torch.tensor(float(len(fine_losses))),
        }

    # -- helpers -------------------------------------------------------------------------

    @staticmethod
    def _anchors(map_a, map_o, aff_a, aff_o, count, gen):
        """Up to ``count`` random voxels of map A that lie inside map B: their indices, world
        positions (mm), unit embeddings in A, and positives sampled in B at the same points."""
        world_a = geometry.world_grid(aff_a, tuple(map_a.shape[1:])).reshape(-1, 3)
        in_o = geometry.world_to_voxel(aff_o, world_a)
        overlap = geometry.inside(in_o, tuple(map_o.shape[1:])).nonzero().flatten()
        if len(overlap) < 1:
            return None
        pick = overlap[torch.randperm(len(overlap), generator=gen)[:count]]
        anchors = F.normalize(map_a.flatten(1).T[pick], dim=-1)
        return pick, world_a[pick], anchors, geometry.sample_map(map_o, in_o[pick])

    def _fine_loss(self, fa, fo, ca, co, faff_a, faff_o, caff_a, caff_o, gen):
        c = self.config
        found = self._anchors(fa, fo, faff_a, faff_o, c.fine_anchors, gen)
        if found is None:
            return None
        _, anchor_w, anchors, positives = found
        cand_w = geometry.world_grid(faff_o, tuple(fo.shape[1:])).reshape(-1, 3)
        sub = torch.randperm(len(cand_w), generator=gen)[: c.fine_candidates]
        cand, cand_w = fo.flatten(1).T[sub], cand_w[sub]  # [M, D], [M, 3]
        valid = outside_radius(anchor_w, cand_w, c.fine_ignore_mm)
        with torch.no_grad():
            # Combined coarse + fine similarity ranks the candidates (hard negative mining).
            anchor_c = geometry.sample_map(ca, geometry.world_to_voxel(caff_a, anchor_w))
            cand_c = geometry.sample_map(co, geometry.world_to_voxel(caff_o, cand_w))
            sim = anchors @ cand.T + anchor_c @ cand_c.T
            idx, ok = mine_hard_negatives(sim, valid, c.hard_pool, c.hard_keep, gen)
        return info_nce(anchors, positives, cand[idx], c.temperature, ok)

    def _coarse_loss(self, ca, co, caff_a, caff_o, others, gen):
        c = self.config
        found = self._anchors(ca, co, caff_a, caff_o, c.coarse_anchors, gen)
        if found is None:
            return None
        pick, anchor_w, anchors, positives = found
        cand = co.flatten(1).T
        cand_w = geometry.world_grid(caff_o, tuple(co.shape[1:])).reshape(-1, 3)
        valid = outside_radius(anchor_w, cand_w, c.coarse_ignore_mm)
        if others and c.coarse_global_negatives > 0:
            pool = torch.cat([o.flatten(1).T for o in others])
            take = torch.randperm(len(pool), generator=gen)[: c.coarse_global_negatives]
            cand = torch.cat([cand, pool[take]])
            valid = torch.cat([valid, valid.new_ones(len(pick), len(take))], dim=1)
        if not valid.any():
            return None
        return info_nce(anchors, positives, cand, c.temperature, valid)
