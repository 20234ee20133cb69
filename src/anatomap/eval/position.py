"""Position readout (ISImed's evaluation, Jabareen et al. 2024, section 4): does a crop's
embedding say where the crop is?

- Spearman correlation between embedding distance and physical distance (mm) over all
  pairs of crops of the same held-out volume.
- Linear (ridge) regression from the embedding to the crop centre (world mm), fitted and
  scored across subjects (grouped K-fold, so a subject's crops never serve to fit its own
  prediction): R^2 and Euclidean error in mm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.linear_model import RidgeCV
from sklearn.metrics import r2_score
from sklearn.model_selection import GroupKFold, KFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from anatomap import geometry
from anatomap.data.cache import Cache
from anatomap.data.sampler import ViewSpec, sample_views
from anatomap.eval.figures import context_embedding_section
from anatomap.eval.report import Section
from anatomap.eval.tasks import EvalContext, TaskResult, register_task


@dataclass
class CropSet:
    """Crops of held-out subjects: images ``[M, C, *S]``, centres ``[M, 3]`` mm, group ids."""

    images: torch.Tensor
    centres: np.ndarray
    groups: np.ndarray
    subjects: list[str]


def sample_crops(
    cache: Cache, subjects: list[str], size: tuple[int, ...], per_subject: int, seed: int = 0
) -> CropSet:
    """Foreground crops of each subject, reproducible with ``seed``."""
    spec = ViewSpec(num_views=per_subject, size=size, foreground=True)
    images, centres, groups = [], [], []
    for g, sid in enumerate(subjects):
        rng = np.random.default_rng([seed, g, 11])
        imgs, affs = sample_views(cache[sid], spec, rng)
        images.append(torch.from_numpy(imgs))
        centres.append(geometry.box_center(affs, imgs.shape[2:]))
        groups.append(np.full(per_subject, g))
    return CropSet(torch.cat(images), np.concatenate(centres), np.concatenate(groups), subjects)


@torch.no_grad()
def embed(
    fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int = 32
) -> np.ndarray:
    """Apply an embedding function in batches; returns ``[M, D]`` float64."""
    out = [fn(images[i : i + batch_size]).float().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy().astype(np.float64)


@dataclass
class PositionResult:
    spearman: float
    r2: float
    mean_error_mm: float
    median_error_mm: float
    emb_dist: np.ndarray
    phys_dist: np.ndarray
    predicted: np.ndarray
    true: np.ndarray

    def metrics(self) -> dict[str, float]:
        return {
            "spearman": self.spearman,
            "r2": self.r2,
            "mean_error_mm": self.mean_error_mm,
            "median_error_mm": self.median_error_mm,
        }


def within_subject_pairs(
    emb: np.ndarray, centres: np.ndarray, groups: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Embedding and physical distances of every unordered pair within each group."""
    e_all, p_all = [], []
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        iu = np.triu_indices(len(idx), k=1)
        e_all.append(geometry.pairwise_distances(emb[idx])[iu])
        p_all.append(geometry.pairwise_distances(centres[idx])[iu])
    return np.concatenate(e_all), np.concatenate(p_all)


def position_readout(
    emb: np.ndarray, centres: np.ndarray, groups: np.ndarray, seed: int = 0
) -> PositionResult:
    """Spearman of distances and cross-subject ridge regression of crop centres."""
    e, p = within_subject_pairs(emb, centres, groups)
    rho = float(spearmanr(e, p).statistic) if np.ptp(e) > 0 else 0.0
    n_groups = len(np.unique(groups))
    if n_groups >= 2:
        cv = GroupKFold(n_splits=min(5, n_groups))
        split = {"groups": groups}
    else:
        cv = KFold(n_splits=5, shuffle=True, random_state=seed)
        split = {}
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
    pred = cross_val_predict(model, emb, centres, cv=cv, **split)
    err = np.linalg.norm(pred - centres, axis=1)
    return PositionResult(
        spearman=rho,
        r2=float(r2_score(centres, pred)),
        mean_error_mm=float(err.mean()),
        median_error_mm=float(np.median(err)),
        emb_dist=e,
        phys_dist=p,
        predicted=pred,
        true=centres,
    )


def _distance_figure(results: dict[str, PositionResult]) -> plt.Figure:
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items(), strict=True):
        ax.hexbin(r.phys_dist, r.emb_dist, gridsize=40, cmap="viridis", mincnt=1)
        ax.set_xlabel("physical distance between crop centres (mm)")
        ax.set_ylabel("embedding distance")
        ax.set_title(f"{name}: Spearman {r.spearman:.3f}")
    fig.tight_layout()
    return fig


def _regression_figure(results: dict[str, PositionResult]) -> plt.Figure:
    fig, axes = plt.subplots(len(results), 3, figsize=(12, 3.6 * len(results)), squeeze=False)
    for row, (name, r) in zip(axes, results.items(), strict=True):
        for k, ax in enumerate(row):
            t, p = r.true[:, k], r.predicted[:, k]
            ax.scatter(t, p, s=6, alpha=0.5)
            lo, hi = float(min(t.min(), p.min())), float(max(t.max(), p.max()))
            ax.plot([lo, hi], [lo, hi], "k--", lw=1)
            ax.set_xlabel(f"true {'RAS'[k]} (mm)")
            ax.set_ylabel(f"predicted {'RAS'[k]} (mm)")
            ax.set_title(f"{name}: R^2 {r.r2:.2f}, error {r.mean_error_mm:.1f} mm", fontsize=9)
    fig.tight_layout()
    return fig


def crop_size(meta: dict, spatial_dims: int) -> tuple[int, ...]:
    """The crop size the method trained on (``objective_config.crop_size``, else 32)."""
    size = int(meta.get("objective_config", {}).get("crop_size", 32))
    return (size,) * spatial_dims


@register_task("position")
def position_task(ctx: EvalContext) -> TaskResult:
    """Spearman and ridge readout, pretrained vs random init, on held-out crops."""
    per_subject = int(ctx.options.get("crops_per_subject", 48))
    size = crop_size(ctx.meta, ctx.spec.spatial_dims)
    crops = sample_crops(ctx.cache, ctx.subjects, size, per_subject, ctx.seed)
    rand, rand_obj = ctx.random_encoder(), ctx.random_objective()
    embedders = {
        ctx.name: ctx.embedder(ctx.encoder, ctx.objective),
        "random init": ctx.embedder(rand, rand_obj),
    }
    results = {
        name: position_readout(embed(fn, crops.images), crops.centres, crops.groups, ctx.seed)
        for name, fn in embedders.items()
    }
    header = ["encoder", "Spearman", "R^2", "mean error (mm)", "median error (mm)"]
    rows = [
        [name, r.spearman, r.r2, r.mean_error_mm, r.median_error_mm] for name, r in results.items()
    ]
    better = {"Spearman": "max", "R^2": "max", "mean error (mm)": "min", "median error (mm)": "min"}
    section = Section(
        "Position readout",
        text=(
            f"{per_subject} foreground crops of {'x'.join(map(str, size))} voxels on each "
            f"of {len(ctx.subjects)} held-out subjects. Spearman: embedding vs physical distance "
            "over all within-subject pairs. R^2 / error: ridge regression of the crop centre "
            "(world mm) from the embedding, grouped K-fold across subjects."
        ),
        tables=[("Position metrics (best in bold)", header, rows, better)],
        figures=[
            ("Embedding distance against physical distance", _distance_figure(results)),
            (
                "Crop centre predicted from the embedding (held-out folds)",
                _regression_figure(results),
            ),
        ],
    )
    metrics = {
        "crops_per_subject": per_subject,
        "crop_size": list(size),
        "encoders": {name: r.metrics() for name, r in results.items()},
    }
    maps = context_embedding_section(ctx)  # PCA-RGB and clicked-point similarity
    return TaskResult(metrics, [section] if maps is None else [section, maps])
