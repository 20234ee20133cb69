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
