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

from dataclasses import dataclass, field
from typing import Any

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
    choice: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``[N, keep]`` of hard negatives: the ``pool`` most similar valid candidates
    per anchor, of which ``keep`` are drawn at random (the ranks ``choice``, when given:
    :func:`hard_ranks` drawn beforehand). Also returns their validity mask (false where an
    anchor had fewer valid candidates than asked)."""
    pool = min(pool, similarity.shape[1])
    masked = similarity.masked_fill(~valid, float("-inf"))
    top_val, top_idx = masked.topk(pool, dim=1)
    # The same random ranks for every anchor: a uniform subset of each anchor's top-k.
    if choice is None:
        choice = hard_ranks(similarity.shape[1], pool, keep, generator)
    choice = choice.to(similarity.device)
    idx = top_idx[:, choice]
    ok = torch.isfinite(top_val[:, choice])
    return idx, ok


def hard_ranks(
    candidates: int, pool: int, keep: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The random ranks :func:`mine_hard_negatives` keeps of each anchor's top ``pool``
    (of ``candidates``): ``keep`` of them, drawn from ``generator``."""
    pool = min(pool, candidates)
    return torch.randperm(pool, generator=generator)[: min(keep, pool)]


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


@dataclass
class _Level:
    """One level (coarse or fine) of a batch's ``2B`` maps: map ``2 i + v`` is view ``v`` of
    volume ``i``, map ``m ^ 1`` the other view of the same volume. World positions of every
    voxel, their voxel indices in the other view and whether they lie inside it (from
    :mod:`anatomap.geometry`)."""

    maps: torch.Tensor  # [2B, D, *s]
    affines: torch.Tensor  # [2B, 4, 4]
    world: torch.Tensor = field(init=False)  # [2B, N, 3]
    in_other: torch.Tensor = field(init=False)  # [2B, N, 3]
    inside: torch.Tensor = field(init=False)  # [2B, N], on the CPU

    def __post_init__(self) -> None:
        shape = tuple(self.maps.shape[2:])
        self.world = torch.stack(
            [geometry.world_grid(a, shape).reshape(-1, 3) for a in self.affines]
        )
        self.in_other = torch.stack(
            [geometry.world_to_voxel(self.affines[m ^ 1], w) for m, w in enumerate(self.world)]
        )
        self.inside = geometry.inside(self.in_other, shape).cpu()

    @property
    def flat(self) -> torch.Tensor:
        """``[2B, N, D]`` voxel vectors."""
        return self.maps.flatten(2).transpose(1, 2)


@dataclass
class _Draws:
    """The random choices of one level, one row per view pair with anchors: anchor map,
    anchor voxels, and (fine) candidate voxels and mined ranks or (coarse) rows of the other
    volumes' maps taken as global negatives."""

    maps: list[int] = field(default_factory=list)
    picks: list[torch.Tensor] = field(default_factory=list)
    extra: list[torch.Tensor | None] = field(default_factory=list)
    ranks: list[torch.Tensor] = field(default_factory=list)

    def add(self, m: int, pick: torch.Tensor, extra: torch.Tensor | None) -> None:
        self.maps.append(m)
        self.picks.append(pick)
        self.extra.append(extra)

    def anchors(self, lvl: _Level) -> _Anchors:
        """The pairs' anchors, rows padded to the longest pair."""
        dev = lvl.maps.device
        maps = torch.tensor(self.maps, device=dev)
        picks = _pad_rows(self.picks, 0).to(dev)
        mask = _pad_rows([torch.ones(len(p), dtype=torch.bool) for p in self.picks], False)
        vectors = F.normalize(lvl.flat[maps[:, None], picks], dim=-1)
        positives = _sample_maps(lvl.maps[maps ^ 1], lvl.in_other[maps[:, None], picks])
        world = lvl.world[maps[:, None], picks]
        return _Anchors(maps, vectors, positives, world, mask.to(dev))


@dataclass
class _Anchors:
    """``P`` view pairs' anchors: map ``maps [P]``, unit vectors ``[P, K, D]`` and positives
    sampled at the same world points in the other view, world positions ``[P, K, 3]`` and
    which rows are real (``mask [P, K]``)."""

    maps: torch.Tensor
    vectors: torch.Tensor
    positives: torch.Tensor
    world: torch.Tensor
    mask: torch.Tensor

    def loss(self, negative_sim: torch.Tensor, usable: torch.Tensor, t: float) -> torch.Tensor:
        """``[P]``: each pair's InfoNCE (:func:`info_nce`), averaged over its anchors, with
        the similarities ``negative_sim [P, K, M]`` of its ``usable`` negatives."""
        pos = (self.vectors * self.positives).sum(-1, keepdim=True)
        neg = negative_sim.masked_fill(~usable, float("-inf"))
        nll = -torch.log_softmax(torch.cat([pos, neg], dim=-1) / t, dim=-1)[..., 0]
        weights = self.mask.to(nll.dtype)
        return (nll * weights).sum(-1) / weights.sum(-1)


class _SampledProduct(torch.autograd.Function):
    """``(a @ b).gather(2, idx)`` for ``a [P, K, D]``, ``b [P, D, N]``, ``idx [P, K, J]``,
    given its ``values`` (computed without gradient for mining). The backward pass uses the
    ``P * K * J`` sampled entries as a sparse matrix (2 sparse products of ~J / N of the
    work of the dense ``[P, K, N]`` product's two)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, a: torch.Tensor, b: torch.Tensor, idx: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(a, b, idx)
        return values

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        a, b, idx = ctx.saved_tensors
        (p, k, d), n, j = a.shape, b.shape[2], idx.shape[2]
        rows = torch.arange(p * k, device=a.device).repeat_interleave(j)
        cols = (idx + n * torch.arange(p, device=a.device)[:, None, None]).reshape(-1)
        sampled = torch.sparse_coo_tensor(
            torch.stack([rows, cols]),
            grad.reshape(-1).to(a.dtype),
            (p * k, p * n),
            check_invariants=False,  # indices in range by construction
        )
        grad_a = torch.sparse.mm(sampled, b.transpose(1, 2).reshape(p * n, d))
        grad_b = torch.sparse.mm(sampled.t(), a.reshape(p * k, d))
        return (
            grad_a.view(p, k, d),
            grad_b.view(p, n, d).transpose(1, 2).to(b.dtype),
            None,
            None,
        )


def _pad_rows(rows: list[torch.Tensor], value: int | bool) -> torch.Tensor:
    """``[P, k, ...]``: each ``[n_p, ...]`` tensor padded with ``value`` to the longest."""
    k = max(len(r) for r in rows)
    out = rows[0].new_full((len(rows), k, *rows[0].shape[1:]), value)
    for p, r in enumerate(rows):
        out[p, : len(r)] = r
    return out


def _sample_maps(maps: torch.Tensor, ijk: torch.Tensor) -> torch.Tensor:
    """:func:`anatomap.geometry.sample_map` of several maps at once: ``maps [P, D, *s]`` at
    voxel indices ``ijk [P, K, 3]`` -> unit vectors ``[P, K, D]``."""
    grid = geometry.grid_sample_coords(ijk.to(maps.dtype), maps.shape[2:])
    out = F.grid_sample(
        maps, grid.view(len(maps), -1, 1, 1, 3), align_corners=True, mode="bilinear"
    )
    return F.normalize(out.flatten(2).transpose(1, 2), dim=-1)


@register_objective("sam")
class SAM(DenseObjective):
    """Coarse-to-fine pixel-wise contrastive learning on two overlapping views.

    Every random choice (anchors, candidates, mined ranks, global negatives) is drawn per
    volume and direction in a fixed order from :func:`batch_generator`; then all view pairs
    are mined and their losses computed at once. Fine negatives are read from the
    ``[anchors, voxels of the other view]`` similarity matrix that mining ranks."""

    Config = SAMConfig
    config: SAMConfig

    def forward(self, encoder: Encoder, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images = batch["image"]
        b = images.shape[0]
        coarse, fine = self.dense(encoder, flatten_views(images))
        affines = batch["affine"].to(torch.float64).reshape(2 * b, 4, 4)
        c_lvl = _Level(coarse.float(), geometry.feature_affine(affines, self.strides[0]))
        f_lvl = _Level(fine.float(), geometry.feature_affine(affines, self.strides[1]))
        fine_draws, coarse_draws = self._draw(f_lvl, c_lvl, b, batch_generator(batch))
        zero = (coarse.sum() + fine.sum()) * 0.0  # in the graph: a step without pairs runs
        fine_l = self._fine_loss(f_lvl, c_lvl, fine_draws) if fine_draws.maps else None
        coarse_l = self._coarse_loss(c_lvl, coarse_draws) if coarse_draws.maps else None
        fine_l = zero if fine_l is None else fine_l
        coarse_l = zero if coarse_l is None else coarse_l
        return {
            "loss": fine_l + coarse_l,
            "fine": fine_l.detach(),
            "coarse": coarse_l.detach(),
            "pairs": torch.tensor(float(len(fine_draws.maps))),
        }

    def _draw(
        self, f_lvl: _Level, c_lvl: _Level, b: int, gen: torch.Generator
    ) -> tuple[_Draws, _Draws]:
        """Per volume, view 0 -> 1 then 1 -> 0: fine anchors, candidates and mined ranks,
        then coarse anchors and global negatives (rows of the flattened ``[2B * N]`` coarse
        voxels: the other volumes' maps in order, this volume's two left out)."""
        c = self.config
        fine, coarse = _Draws(), _Draws()
        n_f, n_c = f_lvl.world.shape[1], c_lvl.world.shape[1]
        for m in range(2 * b):
            pick = _pick(f_lvl.inside[m], c.fine_anchors, gen)
            if pick is not None:
                sub = torch.randperm(n_f, generator=gen)[: c.fine_candidates]
                fine.add(m, pick, sub)
                fine.ranks.append(hard_ranks(len(sub), c.hard_pool, c.hard_keep, gen))
            pick = _pick(c_lvl.inside[m], c.coarse_anchors, gen)
            if pick is not None:
                take = None
                if b > 1 and c.coarse_global_negatives > 0:
                    take = torch.randperm((b - 1) * 2 * n_c, generator=gen)
                    take = take[: c.coarse_global_negatives]
                    take = take + 2 * n_c * (take >= (m - m % 2) * n_c)
                coarse.add(m, pick, take)
        return fine, coarse

    def _fine_loss(self, f_lvl: _Level, c_lvl: _Level, draws: _Draws) -> torch.Tensor:
        """Hard negatives ranked by coarse + fine similarity among ``fine_candidates`` voxels
        of the other view outside ``fine_ignore_mm``; ``hard_keep`` of the top ``hard_pool``
        at random. Mining runs per pair without gradients; the loss reads the negatives'
        similarities from the same ``[P, K, voxels of the other view]`` matrix."""
        c = self.config
        a = draws.anchors(f_lvl)
        others = f_lvl.maps[a.maps ^ 1].flatten(2)  # [P, D, N]
        negatives, usable = [], []
        with torch.no_grad():
            sim = a.vectors @ others  # [P, K, N]
            for p, (m, sub) in enumerate(zip(draws.maps, draws.extra, strict=True)):
                k, o = len(draws.picks[p]), m ^ 1
                sub = sub.to(sim.device)
                anchor_w, cand_w = a.world[p, :k], f_lvl.world[o][sub]
                valid = outside_radius(anchor_w, cand_w, c.fine_ignore_mm)
                anchor_c = geometry.sample_map(
                    c_lvl.maps[m], geometry.world_to_voxel(c_lvl.affines[m], anchor_w)
                )
                cand_c = geometry.sample_map(
                    c_lvl.maps[o], geometry.world_to_voxel(c_lvl.affines[o], cand_w)
                )
                # candidates in the order drawn: ties rank as they always did
                ranked = torch.addmm(sim[p, :k].index_select(1, sub), anchor_c, cand_c.T)
                idx, ok = mine_hard_negatives(
                    ranked, valid, c.hard_pool, c.hard_keep, choice=draws.ranks[p]
                )
                negatives.append(sub[idx])
                usable.append(ok)
        idx = _pad_rows(negatives, 0)
        negative_sim = _SampledProduct.apply(a.vectors, others, idx, sim.gather(2, idx))
        return a.loss(negative_sim, _pad_rows(usable, False), c.temperature).mean()

    def _coarse_loss(self, c_lvl: _Level, draws: _Draws) -> torch.Tensor | None:
        """Negatives: the other view's voxels outside ``coarse_ignore_mm``, plus the global
        ones (always usable). Pairs without any usable negative are left out."""
        c = self.config
        a = draws.anchors(c_lvl)
        others = a.maps ^ 1
        n = c_lvl.world.shape[1]
        rows = others[:, None] * n + torch.arange(n, device=others.device)
        valid = outside_radius(a.world, c_lvl.world[others], c.coarse_ignore_mm)
        if draws.extra[0] is not None:
            rows = torch.cat([rows, torch.stack(draws.extra).to(rows.device)], dim=1)
            valid = torch.cat([valid, valid.new_ones(*valid.shape[:2], rows.shape[1] - n)], -1)
        keep = (valid & a.mask[..., None]).flatten(1).any(1)
        if not keep.any():
            return None
        cand = c_lvl.flat.reshape(-1, c_lvl.flat.shape[-1])[rows]  # [P, M, D]
        return a.loss(a.vectors @ cand.transpose(1, 2), valid, c.temperature)[keep].mean()


def _pick(inside: torch.Tensor, count: int, gen: torch.Generator) -> torch.Tensor | None:
    """Up to ``count`` random voxels of a map that lie inside the other view (``inside``)."""
    overlap = inside.nonzero().flatten()
    if len(overlap) < 1:
        return None
    return overlap[torch.randperm(len(overlap), generator=gen)[:count]]
