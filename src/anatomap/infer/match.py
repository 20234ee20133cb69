"""Find a template point in other scans by coarse-to-fine embedding matching (SAM, Yan et al.
2022, section III-C): the argmax of coarse similarity over the target, then the argmax of
coarse + fine similarity among the fine voxels near it."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from anatomap import geometry
from anatomap.errors import AnatomapError
from anatomap.infer.embed import DenseEmbedding
from anatomap.objectives.sam import sample_map

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


def match_points(
    template: DenseEmbedding,
    points_mm: np.ndarray,
    target: DenseEmbedding,
    refine_radius_mm: float | None = None,
) -> MatchResult:
    """Coarse argmax, then coarse + fine argmax within ``refine_radius_mm`` of it (default:
    one and a half coarse voxels)."""
    q_c, q_f = template_vectors(template, points_mm)
    t_c = target.coarse.flatten(1)  # [D, Mc]
    sim_c = q_c @ t_c  # [N, Mc]
    best = sim_c.argmax(1)
    shape_c = target.coarse.shape[1:]
    ijk_best = torch.stack(torch.unravel_index(best, shape_c), -1).to(torch.float64)
    coarse_aff = torch.as_tensor(target.coarse_affine)
    fine_aff = torch.as_tensor(target.fine_affine)
    centre_mm = geometry.voxel_to_world(coarse_aff, ijk_best)
    if refine_radius_mm is None:
        refine_radius_mm = 1.5 * float(geometry.spacing(target.coarse_affine).max())
    fine_spacing = geometry.spacing(target.fine_affine)
    half = np.ceil(refine_radius_mm / fine_spacing).astype(int)
    shape_f = np.asarray(target.fine.shape[1:])
    out_pts = np.zeros((len(q_c), 3))
    scores = np.zeros(len(q_c))
    coarse_scores = sim_c.max(1).values.numpy().astype(np.float64)
    for n in range(len(q_c)):
        c_ijk = np.round(geometry.world_to_voxel(target.fine_affine, centre_mm[n].numpy()))
        lo = np.clip(c_ijk - half, 0, shape_f - 1).astype(int)
        hi = np.clip(c_ijk + half, 0, shape_f - 1).astype(int) + 1
        box = target.fine[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        grid = (
            torch.stack(
                torch.meshgrid(
                    *[torch.arange(a, b) for a, b in zip(lo, hi, strict=True)], indexing="ij"
                ),
                -1,
            )
            .reshape(-1, 3)
            .to(torch.float64)
        )
        world = geometry.voxel_to_world(fine_aff, grid)
        fine_sim = q_f[n] @ box.reshape(box.shape[0], -1)
        coarse_at = sample_map(target.coarse, geometry.world_to_voxel(coarse_aff, world))
        combined = fine_sim + coarse_at @ q_c[n]
        within = geometry.cross_distances(world, centre_mm[n][None])[:, 0] <= refine_radius_mm
        combined = combined.masked_fill(~within, float("-inf"))
        k = int(combined.argmax())
        out_pts[n] = world[k].numpy()
        scores[n] = float(combined[k]) / 2.0
    return MatchResult(out_pts, scores, coarse_scores)


def read_points(path: str | Path) -> tuple[list[str], np.ndarray]:
    """A CSV of points: columns ``x,y,z`` (optional ``name``); or ``i,j,k`` voxel indices.

    Returns names and the coordinates as written (world mm or voxel indices).
    """
    p = Path(path)
    try:
        with open(p, newline="") as fh:
            reader = csv.DictReader(fh)
            cols = [c.strip().lower() for c in (reader.fieldnames or [])]
            rows = list(reader)
    except OSError as exc:
        raise AnatomapError(f"{p}: cannot read points ({exc})") from None
    keys = ("x", "y", "z") if {"x", "y", "z"} <= set(cols) else ("i", "j", "k")
    if not set(keys) <= set(cols):
        raise AnatomapError(f"{p}: points CSV needs columns x,y,z (world mm) or i,j,k (voxels)")
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
