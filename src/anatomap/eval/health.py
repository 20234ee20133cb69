"""The ``health`` task: is the crop-embedding space collapsed?

- **RankMe** (Garrido et al. 2023, "RankMe: assessing the downstream performance of pretrained
  self-supervised representations by their rank"): ``exp(entropy(p))`` with
  ``p_k = sigma_k / ||sigma||_1 + eps`` over the singular values of the (uncentred) embedding
  matrix; between 1 (collapsed to a line) and ``min(N, D)``.
- MONAI's :class:`~monai.metrics.EmbeddingCollapseMetric` (MONAI >= 1.6): the effective-rank
  collapse score of the centred embeddings (Roy & Vetterli 2007) and, when the crops carry a
  class (the tissue class at the crop centre), centroid similarity and silhouette separation.
  Every score is in [0, 1], higher = more collapsed.
- SimSiam's collapse indicator (Chen & He 2021, section 4.1): the per-dimension standard
  deviation of L2-normalised embeddings, times ``sqrt(D)``: about 1 for embeddings spread
  over the sphere, 0 when every crop maps to the same direction.
"""

from __future__ import annotations

import math
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from monai.metrics import EmbeddingCollapseMetric

from anatomap.eval.position import crop_size, embed, sample_crops
from anatomap.eval.region import has_label, label_at
from anatomap.eval.report import Section
from anatomap.eval.tasks import EvalContext, TaskResult, register_task

RANKME_EPS = 1e-7
"""The epsilon of RankMe's normalised singular values (Garrido et al. 2023, eq. 1)."""


def singular_values(emb: np.ndarray | torch.Tensor) -> np.ndarray:
    """Singular values of an embedding matrix ``[N, D]`` (descending, float64)."""
    z = torch.as_tensor(np.asarray(emb, np.float64))
    return torch.linalg.svdvals(z).numpy()


def rankme(emb: np.ndarray | torch.Tensor, eps: float = RANKME_EPS) -> float:
    """RankMe (Garrido et al. 2023): ``exp(-sum p_k log p_k)``, ``p_k = s_k / ||s||_1 + eps``.

    An all-zero matrix has rank 0 and returns 0.
    """
    s = singular_values(emb)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total + eps
    return float(math.exp(-(p * np.log(p)).sum()))


def normalised_std(emb: np.ndarray | torch.Tensor) -> float:
    """SimSiam's indicator: mean over dimensions of the std of L2-normalised embeddings,
    times ``sqrt(D)`` (about 1 when spread, 0 when collapsed)."""
    z = np.asarray(emb, np.float64)
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    return float(z.std(axis=0).mean() * math.sqrt(z.shape[1]))


def monai_collapse(emb: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float | None]:
    """MONAI's ``EmbeddingCollapseMetric`` scores (in [0, 1], higher = more collapsed)."""
    wanted = ["effective_rank"]
    if labels is not None and len(np.unique(labels)) >= 2:
        wanted += ["centroid_similarity", "separation"]
    else:
        labels = None
    metric = EmbeddingCollapseMetric(reduction="max", include_indicators=wanted)
    scores = metric(
        torch.as_tensor(emb, dtype=torch.float32),
        None if labels is None else torch.as_tensor(labels),
    )
    keys = ["effective_rank_score", "centroid_similarity", "separation", "aggregate"]
    return {k: (None if scores.get(k) is None else float(scores[k])) for k in keys}


def health_metrics(emb: np.ndarray, labels: np.ndarray | None = None) -> dict[str, Any]:
    """Every indicator of one embedding matrix ``[N, D]``."""
    r = rankme(emb)
    return {
        "rankme": r,
        "rankme_fraction": r / min(emb.shape),
        "normalised_std": normalised_std(emb),
        **{f"monai_{k}": v for k, v in monai_collapse(emb, labels).items()},
    }


def _spectrum_figure(embs: dict[str, np.ndarray]) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, e in embs.items():
        s = singular_values(e)
        ax.semilogy(np.arange(1, len(s) + 1), s / max(s[0], 1e-12), label=f"{name}")
    ax.set_xlabel("singular value index")
    ax.set_ylabel("singular value / largest")
    ax.legend()
    fig.tight_layout()
    return fig


@register_task("health")
def health_task(ctx: EvalContext) -> TaskResult:
    """RankMe, MONAI's collapse scores and SimSiam's std, pretrained vs random init."""
    per_subject = int(ctx.options.get("crops_per_subject", 48))
    size = crop_size(ctx.meta, ctx.spec.spatial_dims)
    crops = sample_crops(ctx.cache, ctx.subjects, size, per_subject, ctx.seed)
    label = str(ctx.options.get("health_label", "tissue"))
    labels = None
    if has_label(ctx.cache, ctx.subjects, label):
        labels = np.concatenate(
            [
                label_at(ctx.cache[s], label, crops.centres[crops.groups == g])
                for g, s in enumerate(ctx.subjects)
            ]
        )
    rand, rand_obj = ctx.random_encoder(), ctx.random_objective()
    embs = {
        ctx.name: embed(ctx.embedder(ctx.encoder, ctx.objective), crops.images),
        "random init": embed(ctx.embedder(rand, rand_obj), crops.images),
    }
    results = {name: health_metrics(e, labels) for name, e in embs.items()}
    header = [
        "encoder",
        "RankMe",
        "RankMe / min(N, D)",
        "normalised std",
        "MONAI eff. rank score",
        "MONAI centroid sim.",
        "MONAI separation",
    ]
    keys = [
        "rankme",
        "rankme_fraction",
        "normalised_std",
        "monai_effective_rank_score",
        "monai_centroid_similarity",
        "monai_separation",
    ]
    rows = [[n, *("n/a" if r[k] is None else r[k] for k in keys)] for n, r in results.items()]
    better = {h: "max" for h in header[1:4]} | {h: "min" for h in header[4:]}
    n, d = next(iter(embs.values())).shape
    section = Section(
        "Embedding health",
        text=(
            f"{n} foreground crops ({per_subject} per held-out subject, "
            f"{'x'.join(map(str, size))} voxels), {d}-dimensional embeddings. RankMe "
            "(Garrido et al. 2023): effective rank of the embedding matrix, higher = less "
            "collapsed. Normalised std (SimSiam): ~1 spread, 0 collapsed. MONAI "
            "EmbeddingCollapseMetric scores are in [0, 1], higher = more collapsed"
            + (
                f"; centroid similarity and separation use the '{label}' class at the crop centre."
                if labels is not None
                else f"; no '{label}' label map, so only the label-free score."
            )
        ),
        tables=[("Embedding health (best in bold)", header, rows, better)],
        figures=[("Singular value spectrum of the crop embeddings", _spectrum_figure(embs))],
    )
    metrics = {
        "crops": int(n),
        "embed_dim": int(d),
        "crop_size": list(size),
        "class_label": label if labels is not None else None,
        "encoders": results,
    }
    return TaskResult(metrics, [section])
