"""Find a template point in other scans by coarse-to-fine embedding matching (SAM, Yan et al.
2022, section III-C): the best coarse-similarity voxels of the target (top 3), each refined by
the argmax of coarse + fine similarity among the fine voxels near it; the best one wins."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from anatomap import geometry
from anatomap.errors import AnatomapError
from anatomap.geometry import sample_map
from anatomap.infer.embed import DenseEmbedding

DEFAULT_LOW_SCORE = 0.5


@dataclass
class MatchResult:
    """Matched world points ``[N, 3]`` (mm) and their similarity scores (mean of coarse and
    fine cosine similarity at the match, in [-1, 1])."""

    points_mm: np.ndarray
    scores: np.ndarray
    coarse_scores: np.ndarray


def template_vectors(
    template: DenseEmbedding, points_mm: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coarse and fine embeddings ``[N, D]`` at world points of the template.

    Points outside the template's image raise an error naming them.
    """
    pts = np.asarray(points_mm, np.float64).reshape(-1, 3)
    if template.image_affine is not None and template.image_shape:
        ijk = geometry.world_to_voxel(template.image_affine, pts)
        outside = ~geometry.inside(ijk, template.image_shape, margin=-0.5)
        if outside.any():
            bad = ", ".join(str(np.round(p, 1).tolist()) for p in pts[outside][:3])
            raise AnatomapError(
                f"{template.source or 'template'}: {int(outside.sum())} point(s) outside the "
                f"template image (world mm, RAS): {bad}"
            )
    pts_t = torch.as_tensor(pts)
    ijk_c = geometry.world_to_voxel(torch.as_tensor(template.coarse_affine), pts_t)
    ijk_f = geometry.world_to_voxel(torch.as_tensor(template.fine_affine), pts_t)
    shape_c, shape_f = template.coarse.shape[1:], template.fine.shape[1:]
    ijk_c = torch.stack([ijk_c[:, k].clamp(0, shape_c[k] - 1) for k in range(3)], -1)
    ijk_f = torch.stack([ijk_f[:, k].clamp(0, shape_f[k] - 1) for k in range(3)], -1)
    return sample_map(template.coarse, ijk_c), sample_map(template.fine, ijk_f)


def coarse_on_fine_grid(emb: DenseEmbedding) -> torch.Tensor:
    """The coarse map interpolated at every fine voxel's world position (re-normalised),
    ``[D, *fine shape]``; computed once per embedding and kept on it."""
    cached = getattr(emb, "_coarse_on_fine", None)
    if cached is None:
        shape_f = tuple(emb.fine.shape[1:])
        world = geometry.world_grid(torch.as_tensor(emb.fine_affine), shape_f).reshape(-1, 3)
        ijk = geometry.world_to_voxel(torch.as_tensor(emb.coarse_affine), world)
        cached = sample_map(emb.coarse, ijk).T.reshape(-1, *shape_f).contiguous()
        emb._coarse_on_fine = cached  # type: ignore[attr-defined]
    return cached


def match_points(
    template: DenseEmbedding,
    points_mm: np.ndarray,
    target: DenseEmbedding,
    refine_radius_mm: float | None = None,
    candidates: int = 3,
) -> MatchResult:
    """Coarse argmax, then coarse + fine argmax within ``refine_radius_mm`` of it (default:
    one and a half coarse voxels). The ``candidates`` best coarse voxels are each refined and
    the best combined score wins, which guards against a single wrong coarse peak."""
    q_c, q_f = template_vectors(template, points_mm)
    n_pts = len(q_c)
    t_c = target.coarse.flatten(1)  # [D, Mc]
    sim_c = q_c @ t_c  # [N, Mc]
    k_c = min(candidates, sim_c.shape[1])
    best = sim_c.topk(k_c, dim=1).indices.reshape(-1)  # [N * k_c]
    q_c, q_f = q_c.repeat_interleave(k_c, 0), q_f.repeat_interleave(k_c, 0)
    shape_c = target.coarse.shape[1:]
    ijk_best = torch.stack(torch.unravel_index(best, shape_c), -1).to(torch.float64)
    coarse_aff = torch.as_tensor(target.coarse_affine)
    fine_aff = torch.as_tensor(target.fine_affine)
    centre_mm = geometry.voxel_to_world(coarse_aff, ijk_best)
    if refine_radius_mm is None:
        refine_radius_mm = 1.5 * float(geometry.spacing(target.coarse_affine).max())
    # Every point's neighbourhood at once: a box of fine voxels around its coarse match.
    fine_spacing = geometry.spacing(target.fine_affine)
    half = np.ceil(refine_radius_mm / fine_spacing).astype(int)
    offsets = torch.stack(
        torch.meshgrid(*[torch.arange(-h, h + 1) for h in half], indexing="ij"), -1
    ).reshape(-1, 3)
    shape_f = torch.as_tensor(target.fine.shape[1:])
    centre_ijk = geometry.world_to_voxel(fine_aff, centre_mm).round().long()  # [N, 3]
    ijk = centre_ijk[:, None, :] + offsets[None]  # [N, K, 3]
    valid = ((ijk >= 0) & (ijk < shape_f)).all(-1)
    ijk = torch.minimum(ijk.clamp_min(0), shape_f - 1)
    world = geometry.voxel_to_world(fine_aff, ijk.to(torch.float64))  # [N, K, 3]
    within = (world - centre_mm[:, None, :]).norm(dim=-1) <= refine_radius_mm
    flat = (ijk[..., 0] * shape_f[1] + ijk[..., 1]) * shape_f[2] + ijk[..., 2]
    fine_vecs = target.fine.flatten(1).T[flat]  # [N, K, D]
    fine_sim = torch.einsum("nkd,nd->nk", fine_vecs, q_f)
    coarse_vecs = coarse_on_fine_grid(target).flatten(1).T[flat]  # [N, K, D]
    coarse_sim = torch.einsum("nkd,nd->nk", coarse_vecs, q_c)
    combined = fine_sim + coarse_sim
    combined = combined.masked_fill(~(valid & within), float("-inf"))
    best_val, k = combined.max(1)  # per (point, coarse candidate)
    pick = best_val.view(n_pts, k_c).argmax(1) + torch.arange(n_pts) * k_c
    out_pts = world[pick, k[pick]].numpy()
    scores = (best_val[pick] / 2.0).double().numpy()
    return MatchResult(out_pts, scores, sim_c.max(1).values.double().numpy())


def read_points(path: str | Path, voxel: bool = False) -> tuple[list[str], np.ndarray]:
    """A CSV of points: columns ``x,y,z`` in world mm, or ``i,j,k`` voxel indices with
    ``voxel=True`` (optional ``name``). Returns names and the coordinates as written."""
    p = Path(path)
    try:
        with open(p, newline="") as fh:
            reader = csv.DictReader(fh)
            cols = [c.strip().lower() for c in (reader.fieldnames or [])]
            rows = list(reader)
    except OSError as exc:
        raise AnatomapError(f"{p}: cannot read points ({exc})") from None
    keys = ("i", "j", "k") if voxel else ("x", "y", "z")
    if not set(keys) <= set(cols):
        want = "i,j,k (voxel indices, with --voxel)" if voxel else "x,y,z (world mm)"
        other = (
            " (it has i,j,k: pass --voxel)" if not voxel and {"i", "j", "k"} <= set(cols) else ""
        )
        raise AnatomapError(f"{p}: points CSV needs columns {want}{other}")
    names, coords = [], []
    for line, row in enumerate(rows, start=2):
        row = {k.strip().lower(): v for k, v in row.items() if k}
        try:
            coords.append([float(row[k]) for k in keys])
        except (TypeError, ValueError):
            raise AnatomapError(f"{p}: line {line}: coordinates must be numbers") from None
        names.append((row.get("name") or f"p{len(names)}").strip())
    if not coords:
        raise AnatomapError(f"{p}: no points")
    return names, np.asarray(coords, np.float64)
