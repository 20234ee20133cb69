"""Embedding matchers for the landmark task (:mod:`anatomap.eval.landmarks_task`).

- :class:`DenseMatcher`: SAM-style coarse-to-fine matching on dense embeddings
  (:mod:`anatomap.infer.match`), for checkpoints with dense heads.
- :class:`CropMatcher`: matching with a crop embedding (ISImed, or any pooled encoder): the
  crop centred on the template point is compared with crops centred on a grid over the
  target; the nearest embedding wins.
:func:`build_matchers` gives the task's rows: the checkpoint, its random-init twin, other
checkpoints (``compare``) and the registration baselines (:mod:`anatomap.eval.registration`).
The embedding matchers run their networks (and the dense matching) on ``device`` (auto: a GPU
when there is one), under ``precision``'s autocast (auto: bf16 on CUDA only).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from anatomap import geometry
from anatomap.checkpoint import load_model
from anatomap.data.cache import CachedSubject
from anatomap.data.sampler import cut_view
from anatomap.errors import AnatomapError
from anatomap.eval import landmarks as lm
from anatomap.eval.tasks import EvalContext, embedder
from anatomap.infer.device import resolve_device
from anatomap.infer.embed import DenseModel, embed_array
from anatomap.infer.match import match_points, prepare_target
from anatomap.models.encoders import Encoder
from anatomap.objectives.base import DenseObjective, Objective


class DenseMatcher:
    """Coarse-to-fine matching on the dense embeddings of a checkpoint (SAM)."""

    def __init__(
        self,
        name: str,
        model: DenseModel,
        window: int = 64,
        *,
        device: str | torch.device = "auto",
        precision: str = "auto",
    ) -> None:
        self.name = name
        self.model = model
        self.window = window
        self.device = resolve_device(device)
        self.precision = precision
        # matching is float64 geometry, which MPS lacks: on a Mac it matches on the CPU
        self.match_device = self.device if self.device.type != "mps" else torch.device("cpu")

    def prepare(self, subject: CachedSubject) -> Any:
        image = np.asarray(subject.image, np.float32)
        run = {"device": self.device, "precision": self.precision}
        emb = embed_array(self.model, image, subject.affine, window=self.window, **run)
        # per-volume work (fine rows, coarse norms), not part of each match
        prepare_target(emb, self.match_device)
        return emb

    def match(self, template, template_state, points_mm, target, target_state) -> lm.MatchResult:
        res = match_points(template_state, points_mm, target_state, device=self.match_device)
        return lm.MatchResult(res.points_mm, res.scores)


class CropMatcher:
    """Nearest crop embedding over a grid of target crops (for pooled-embedding methods)."""

    def __init__(
        self,
        name: str,
        embed_fn: Callable[[torch.Tensor], torch.Tensor],
        crop: int,
        grid_mm: float = 8.0,
        batch_size: int = 64,
    ) -> None:
        self.name = name
        self.embed_fn = embed_fn
        self.crop = np.array([crop, crop, crop])
        self.grid_mm = grid_mm
        self.batch_size = batch_size

    @torch.no_grad()
    def _embed_at(self, subject: CachedSubject, centres_ijk: np.ndarray) -> torch.Tensor:
        out = []
        for i in range(0, len(centres_ijk), self.batch_size):
            crops = [
                cut_view(subject, c, self.crop, self.crop, 0.0)[0]
                for c in centres_ijk[i : i + self.batch_size]
            ]
            out.append(self.embed_fn(torch.from_numpy(np.stack(crops))).float())
        return torch.cat(out)

    def prepare(self, subject: CachedSubject) -> Any:
        step = np.maximum(1, np.round(self.grid_mm / geometry.spacing(subject.affine))).astype(int)
        fg = subject.foreground
        lo, hi = fg.min(0), fg.max(0)
        axes = [np.arange(lo[k], hi[k] + 1, step[k]) for k in range(3)]
        grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3).astype(np.float64)
        return grid, self._embed_at(subject, grid)

    def match(self, template, template_state, points_mm, target, target_state) -> lm.MatchResult:
        grid, emb = target_state
        ijk = geometry.world_to_voxel(template.affine, np.asarray(points_mm, np.float64))
        q = self._embed_at(template, ijk)
        dist = torch.cdist(q, emb)
        best = dist.argmin(1).numpy()
        pts = geometry.voxel_to_world(target.affine, grid[best])
        return lm.MatchResult(pts, -dist.min(1).values.numpy())


def matcher_for(
    name: str,
    encoder: Encoder,
    objective: Objective,
    meta: dict,
    *,
    device: str | torch.device = "auto",
    precision: str = "auto",
) -> Any:
    """The right matcher for a model: dense when its objective has dense heads (run on
    ``device`` under ``precision``'s autocast)."""
    if isinstance(objective, DenseObjective):
        model = DenseModel(encoder, objective)
        return DenseMatcher(name, model, device=device, precision=precision)
    crop = int(meta.get("objective_config", {}).get("crop_size", 32))
    return CropMatcher(name, embedder(encoder, objective, device, precision), crop)


def build_matchers(ctx: EvalContext) -> list[Any]:
    from anatomap.eval.registration import AffineRegistration, BSplineRegistration

    make = functools.partial(matcher_for, device=ctx.device, precision=ctx.precision)
    matchers = [make(ctx.name, ctx.encoder, ctx.objective, ctx.meta)]
    enc, obj = ctx.random_encoder(), ctx.random_objective()
    matchers.append(make("random init", enc, obj, ctx.meta))
    for label, path in (ctx.options.get("compare") or {}).items():
        if label in {m.name for m in matchers} | {"affine", "affine+bspline"}:
            raise AnatomapError(f"--compare name '{label}' is already a row of the table")
        encoder, objective, meta = load_model(path)
        matchers.append(make(label, encoder, objective, meta))
    if ctx.options.get("registration", True):
        matchers += [AffineRegistration(), BSplineRegistration()]
    return matchers
