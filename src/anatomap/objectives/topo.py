"""Topo: cross-instance topological consistency for multi-modal volumes.

After Pan et al., "Beyond Instance-Level Self-Supervision in 3D Multi-Modal Medical Imaging"
(ICML 2026). Only the abstract is public; everything below is our design (the project's
METHODS.md section 5, every choice in docs/methods/topo.md):

* **intra-instance, cross-modal triplet**: two overlapping, scale-jittered views of one
  volume, each showing a different random subset of the subject's modalities (modality
  dropout). Anchor = a voxel of view A's dense map; positive = view B's map sampled at the
  same world position (trilinear, from the view affines via :mod:`anatomap.geometry`);
  negatives = view B voxels farther than ``negative_mm`` (the hardest ``hard_negatives``).
  A margin loss on cosine distance (:func:`triplet_margin`);
* **neighbourhood order**: for each anchor, pairs of view-B voxels within ``order_radius_mm``
  whose physical distances differ by more than ``order_gap_mm`` keep that order in
  embedding distance, with a margin proportional to the gap (:func:`neighbour_order_loss`);
* **inter-instance partial alignment**: across the volumes of a batch, mutual nearest
  neighbours of the coarse maps with cosine similarity above ``inter_threshold`` (and, when
  ``inter_gate_mm`` is set, within that distance in the shared RAS+ world frame) are
  pseudo-correspondences; each one's neighbourhood (``inter_radius_mm``) is carried over by
  the same world offsets and aligned with the margin loss, weighted by confidence. Only
  confident matches and only up to the margin: a partial alignment that cannot collapse
  subjects onto each other (:func:`mutual_matches`, :func:`neighbourhood_targets`).

Pure tensor functions first (tested in tests/test_topo.py), then the module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field

from anatomap import geometry
from anatomap.geometry import sample_map
from anatomap.models.encoders import Encoder
from anatomap.objectives.base import DenseObjective, ObjectiveParams, batch_generator, flatten_views
from anatomap.objectives.registry import register_objective

# ----------------------------------------------------------------------------- pure pieces


@dataclass
class TripletTargets:
    """Where each anchor's positive lies in map B and which B voxels are its negatives."""

    positive_ijk: torch.Tensor  # [N, 3] continuous voxel indices in B
    valid: torch.Tensor  # [N] the positive lies inside B
    candidate_mm: torch.Tensor  # [M, 3] world position of the B voxels considered
    negative_mask: torch.Tensor  # [N, M] farther than negative_mm from the anchor


def cross_modal_targets(
    anchor_mm: torch.Tensor,
    affine_b: torch.Tensor,
    shape_b: tuple[int, ...],
    negative_mm: float,
    candidates: torch.Tensor | None = None,
) -> TripletTargets:
    """Triplet targets from geometry only: the positive of an anchor at world ``anchor_mm``
    is map B at the same world position; its negatives are B's voxels (the flat indices
    ``candidates``, default all) farther than ``negative_mm``."""
    ijk = geometry.world_to_voxel(affine_b, anchor_mm)
    valid = geometry.inside(ijk, shape_b)
    cand = geometry.world_grid(affine_b, shape_b).reshape(-1, 3)
    if candidates is not None:
        cand = cand[candidates]
    neg = geometry.cross_distances(anchor_mm.float(), cand.float()) > negative_mm
    return TripletTargets(ijk, valid, cand, neg)


def triplet_margin(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    candidates: torch.Tensor,
    negative_mask: torch.Tensor,
    margin: float = 0.3,
    hardest: int = 16,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triplet margin loss on cosine distance, averaged over each anchor's ``hardest``
    valid negatives: ``relu(d(a, p) - d(a, n) + margin)``.

    ``anchors``/``positives`` ``[N, D]``, ``candidates [M, D]``, ``negative_mask [N, M]``;
    ``weights [N]`` (e.g. match confidences) weight the anchors. Anchors without a valid
    negative are left out; returns 0 (with a graph) when none is left.
    """
    a = F.normalize(anchors, dim=-1)
    c = F.normalize(candidates, dim=-1)
    d_pos = 1.0 - (a * F.normalize(positives, dim=-1)).sum(-1)  # [N]
    d_neg = 1.0 - a @ c.T  # [N, M]
    k = min(hardest, d_neg.shape[1])
    if k == 0:
        return anchors.sum() * 0.0
    hard = d_neg.masked_fill(~negative_mask, float("inf"))
    vals, idx = hard.topk(k, dim=1, largest=False)
    ok = torch.isfinite(vals)
    d_sel = d_neg.gather(1, idx)
    hinge = F.relu(d_pos[:, None] - d_sel + margin) * ok
    per_anchor = hinge.sum(1) / ok.sum(1).clamp_min(1)
    keep = ok.any(1).to(per_anchor.dtype)
    w = keep if weights is None else keep * weights
    if float(w.sum()) == 0.0:
        return anchors.sum() * 0.0
    return (per_anchor * w).sum() / w.sum()


def neighbour_order_loss(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    distances_mm: torch.Tensor,
    radius_mm: float,
    gap_mm: float = 2.0,
    margin: float = 0.1,
    neighbours: int = 12,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Local neighbourhood order: nearer voxels stay nearer in embedding space.

    For each anchor (``anchors [N, D]``), up to ``neighbours`` random candidates
    (``candidates [M, D]``) within ``radius_mm`` (``distances_mm [N, M]``, physical) form
    pairs ``(j, k)`` with ``d_j + gap_mm < d_k``; each pays
    ``relu(e_j - e_k + margin * (d_k - d_j) / radius_mm)`` with ``e`` the cosine distance.
    """
    near = distances_mm <= radius_mm
    score = torch.rand(distances_mm.shape, generator=generator).to(distances_mm.device)
    score = score.masked_fill(~near, -1.0)
    k = min(neighbours, distances_mm.shape[1])
    top, idx = score.topk(k, dim=1)
    ok = top >= 0  # [N, k]
    d = distances_mm.gather(1, idx)  # [N, k] physical
    a = F.normalize(anchors, dim=-1)
    c = F.normalize(candidates, dim=-1)
    e = 1.0 - torch.einsum("nd,nkd->nk", a, c[idx])  # [N, k] embedding
    pair = ok[:, :, None] & ok[:, None, :] & (d[:, :, None] + gap_mm < d[:, None, :])
    want = margin * (d[:, None, :] - d[:, :, None]) / radius_mm
    hinge = F.relu(e[:, :, None] - e[:, None, :] + want)
    n = pair.sum()
    if int(n) == 0:
        return anchors.sum() * 0.0
    return (hinge * pair).sum() / n


def mutual_matches(
    emb_a: torch.Tensor,
    emb_b: torch.Tensor,
    threshold: float,
    allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Confident pseudo-correspondences: pairs ``(i, j)`` that are each other's nearest
    neighbour (cosine) among the ``allowed [N, M]`` pairs, with similarity >= ``threshold``.

    Returns indices into A, into B and the similarities (detached).
    """
    with torch.no_grad():
        sim = F.normalize(emb_a, dim=-1) @ F.normalize(emb_b, dim=-1).T
        if allowed is not None:
            sim = sim.masked_fill(~allowed, -2.0)
        best_b = sim.argmax(1)  # [N]
        best_a = sim.argmax(0)  # [M]
        ia = torch.arange(len(sim), device=sim.device)
        s = sim[ia, best_b]
        keep = (best_a[best_b] == ia) & (s >= threshold)
        return ia[keep], best_b[keep], s[keep]


def neighbourhood_targets(
    world_a: torch.Tensor,
    match_a: torch.Tensor,
    match_b_mm: torch.Tensor,
    radius_mm: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Carry each match's neighbourhood over to B by the same world offsets.

    ``world_a [N, 3]`` are A's voxels, ``match_a [K]`` the matched A voxels and
    ``match_b_mm [K, 3]`` their partners' world positions in B. Returns, for every A voxel
    within ``radius_mm`` of a matched voxel (the matched voxel included), its index in A, the
    world point in B it should correspond to, and the index of the match it came from.
    """
    centre = world_a[match_a]  # [K, 3]
    dist = geometry.cross_distances(centre.float(), world_a.float())  # [K, N]
    km, na = (dist <= radius_mm).nonzero(as_tuple=True)
    target = match_b_mm[km] + (world_a[na] - centre[km])
    return na, target, km


# ----------------------------------------------------------------------------- module


class TopoConfig(ObjectiveParams):
    crop_size: int = Field(default=32, gt=0, description="view edge in voxels")
    scale: tuple[float, float] = Field(default=(0.8, 1.2), description="per-view scale jitter")
    min_overlap: float = Field(default=0.3, ge=0, le=1)
    augment: bool = True
    embed_dim: int = Field(default=64, gt=0, description="per dense head")
    fpn_channels: int = Field(default=32, gt=0)
    fine_level: int = Field(default=0, ge=0, description="pyramid level of the fine head")
    coarse_level: int = Field(default=2, ge=0, description="pyramid level of the coarse head")
    full_view_prob: float = Field(
        default=0.25, ge=0, le=1, description="view B shows every present modality"
    )
    margin: float = Field(default=0.3, gt=0, description="triplet margin (cosine distance)")
    anchors: int = Field(default=128, gt=0, description="fine anchors per view pair")
    candidates: int = Field(default=1024, gt=0, description="random fine voxels of view B")
    hard_negatives: int = Field(default=16, gt=0)
    fine_negative_mm: float = Field(default=8.0, ge=0)
    coarse_anchors: int = Field(default=32, gt=0)
    coarse_negative_mm: float = Field(default=20.0, ge=0)
    order_weight: float = Field(default=0.5, ge=0)
    order_radius_mm: float = Field(default=16.0, gt=0)
    order_gap_mm: float = Field(default=2.0, ge=0)
    order_margin: float = Field(default=0.2, ge=0)
    order_neighbours: int = Field(default=12, ge=2)
    inter_weight: float = Field(default=0.5, ge=0)
    inter_threshold: float = Field(default=0.5, ge=-1, le=1)
    inter_gate_mm: float | None = Field(
        default=40.0, gt=0, description="matches must lie this close in the world frame"
    )
    inter_radius_mm: float = Field(default=20.0, ge=0)
    inter_start_step: int = Field(default=100, ge=0, description="inter term off before it")


def modality_subsets(
    present: torch.Tensor, full_view_prob: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Modality dropout for a pair of views: ``[B, C]`` masks for view A and view B.

    The present modalities are shuffled and split into two disjoint non-empty sets (A gets
    the first part), so the positive is always seen through other modalities; with
    probability ``full_view_prob`` view B shows every present modality instead. A volume with
    one modality shows it in both views.
    """
    b, c = present.shape
    a_mask = torch.zeros(b, c, dtype=torch.bool)
    b_mask = torch.zeros(b, c, dtype=torch.bool)
    for i in range(b):
        idx = present[i].nonzero().flatten().cpu()
        if len(idx) == 0:  # nothing recorded: treat every channel as present
            idx = torch.arange(c)
        if len(idx) == 1:
            a_mask[i, idx] = b_mask[i, idx] = True
            continue
        perm = idx[torch.randperm(len(idx), generator=generator)]
        k = int(torch.randint(1, len(idx), (1,), generator=generator))
        a_mask[i, perm[:k]] = True
        if float(torch.rand(1, generator=generator)) < full_view_prob:
            b_mask[i, idx] = True
        else:
            b_mask[i, perm[k:]] = True
    return a_mask, b_mask


@register_objective("topo")
class Topo(DenseObjective):
    """Cross-modal triplet + neighbourhood order + inter-instance partial alignment."""

    Config = TopoConfig
    config: TopoConfig

    def __init__(self, config: TopoConfig, encoder: Encoder) -> None:
        super().__init__(config, encoder)
        self.step = 0  # set by on_after_step; not part of the checkpoint

    def on_after_step(self, encoder: Encoder, step: int, max_steps: int) -> None:
        self.step = step

    def forward(self, encoder: Encoder, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        c = self.config
        images = batch["image"]
        b, v, ch = images.shape[:3]
        affines = batch["affine"].to(torch.float64)
        gen = batch_generator(batch)
        present = batch.get("modality_mask")
        if present is None:
            present = torch.ones(b, ch, dtype=torch.bool)
        m_a, m_b = modality_subsets(present.bool().cpu(), c.full_view_prob, gen)
        keep = torch.stack([m_a, m_b], 1).to(images.device, images.dtype)  # [B, 2, C]
        shown = images * keep.view(b, v, ch, *([1] * (images.ndim - 3)))
        coarse, fine = self.dense(encoder, flatten_views(shown))
        coarse = coarse.view(b, v, *coarse.shape[1:]).float()
        fine = fine.view(b, v, *fine.shape[1:]).float()
        c_aff = geometry.feature_affine(affines, self.strides[0])
        f_aff = geometry.feature_affine(affines, self.strides[1])

        trip, order, coarse_trip = [], [], []
        for i in range(b):
            for a, o in ((0, 1), (1, 0)):
                t, od = self._intra(fine[i, a], fine[i, o], f_aff[i, a], f_aff[i, o], gen, True)
                if t is not None:
                    trip.append(t)
                    order.append(od)
                t, _ = self._intra(coarse[i, a], coarse[i, o], c_aff[i, a], c_aff[i, o], gen, False)
                if t is not None:
                    coarse_trip.append(t)
        inter, n_matches = [], 0
        if b > 1 and c.inter_weight > 0 and self.step >= c.inter_start_step:
            for i in range(b):
                for j in range(b):
                    if i != j:
                        loss, k = self._inter(coarse[i, 0], coarse[j, 1], c_aff[i, 0], c_aff[j, 1])
                        n_matches += k
                        if loss is not None:
                            inter.append(loss)
        zero = shown.sum() * 0.0

        def mean(xs: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack(xs).mean() if xs else zero

        t_fine, t_coarse, t_order, t_inter = mean(trip), mean(coarse_trip), mean(order), mean(inter)
        loss = t_fine + t_coarse + c.order_weight * t_order + c.inter_weight * t_inter
        return {
            "loss": loss,
            "triplet_fine": t_fine.detach(),
            "triplet_coarse": t_coarse.detach(),
            "order": t_order.detach(),
            "inter": t_inter.detach(),
            "inter_matches": torch.tensor(float(n_matches) / max(1, b * (b - 1))),
        }

    # -- helpers -------------------------------------------------------------------------

    def _intra(self, map_a, map_b, aff_a, aff_b, gen, fine: bool):
        """Cross-modal triplet (and, for the fine head, neighbourhood order) A -> B."""
        c = self.config
        world_a = geometry.world_grid(aff_a, tuple(map_a.shape[1:])).reshape(-1, 3)
        neg_mm = c.fine_negative_mm if fine else c.coarse_negative_mm
        inside_b = geometry.inside(geometry.world_to_voxel(aff_b, world_a), map_b.shape[1:])
        pool = inside_b.nonzero().flatten()
        if len(pool) == 0:
            return None, None
        count = c.anchors if fine else c.coarse_anchors
        pick = pool[torch.randperm(len(pool), generator=gen)[:count]]
        cand = map_b.flatten(1).T
        sub = torch.randperm(len(cand), generator=gen)[: c.candidates]
        tg = cross_modal_targets(world_a[pick], aff_b, tuple(map_b.shape[1:]), neg_mm, sub)
        anchors = map_a.flatten(1).T[pick]
        positives = sample_map(map_b, tg.positive_ijk)
        trip = triplet_margin(
            anchors, positives, cand[sub], tg.negative_mask, c.margin, c.hard_negatives
        )
        if not fine or c.order_weight == 0:
            return trip, None
        dist = geometry.cross_distances(world_a[pick].float(), tg.candidate_mm.float())
        order = neighbour_order_loss(
            anchors,
            cand[sub],
            dist,
            c.order_radius_mm,
            c.order_gap_mm,
            c.order_margin,
            c.order_neighbours,
            gen,
        )
        return trip, order

    def _inter(self, map_a, map_b, aff_a, aff_b):
        """Partial neighbourhood alignment between two volumes' coarse maps."""
        c = self.config
        world_a = geometry.world_grid(aff_a, tuple(map_a.shape[1:])).reshape(-1, 3)
        world_b = geometry.world_grid(aff_b, tuple(map_b.shape[1:])).reshape(-1, 3)
        emb_a, emb_b = map_a.flatten(1).T, map_b.flatten(1).T
        allowed = None
        if c.inter_gate_mm is not None:
            allowed = geometry.cross_distances(world_a.float(), world_b.float()) <= c.inter_gate_mm
        ia, ib, conf = mutual_matches(emb_a, emb_b, c.inter_threshold, allowed)
        if len(ia) == 0:
            return None, 0
        src, target_mm, k = neighbourhood_targets(world_a, ia, world_b[ib], c.inter_radius_mm)
        tg = cross_modal_targets(target_mm, aff_b, tuple(map_b.shape[1:]), c.coarse_negative_mm)
        if not bool(tg.valid.any()):
            return None, len(ia)
        keep = tg.valid
        positives = sample_map(map_b, tg.positive_ijk[keep])
        loss = triplet_margin(
            emb_a[src[keep]],
            positives,
            emb_b,
            tg.negative_mask[keep],
            c.margin,
            c.hard_negatives,
            weights=conf[k[keep]].float(),
        )
        return loss, len(ia)
