"""The ``robustness`` task: how much does an encoder lose when a modality is missing at test
time? (Pan et al. 2026 claim robustness to missing modalities; our protocol, see
docs/methods/topo.md.)

For a multi-modal cache, the held-out crops of the ``position`` task are embedded with every
modality, then once with each single modality dropped (its channel zeroed, as a missing
modality is stored in the cache). For each condition: the position readout (Spearman, ridge
R^2 and error, :mod:`anatomap.eval.position`) and, for dense checkpoints on subjects with
landmarks, the landmark metrics (:mod:`anatomap.eval.landmarks`, dense matching, no
registration baselines). The drop is each condition's metric minus the all-modality one.
Checkpoints given with ``compare`` (e.g. the same encoder trained with ISImed on the stacked
modalities) are scored on the very same crops and pairs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from anatomap.checkpoint import load_model
from anatomap.data.cache import CachedSubject
from anatomap.errors import AnatomapError
from anatomap.eval import landmarks as lm
from anatomap.eval.position import crop_size, embed, position_readout, sample_crops
from anatomap.eval.report import Section
from anatomap.eval.tasks import EvalContext, TaskResult, register_task
from anatomap.models.encoders import Encoder
from anatomap.objectives.base import DenseObjective, Objective

ALL = "all modalities"


def condition_name(modality: str | None) -> str:
    return ALL if modality is None else f"without {modality}"


def drop_channel(images: torch.Tensor, channel: int | None) -> torch.Tensor:
    """``images [M, C, *S]`` with ``channel`` zeroed (a missing modality), or unchanged."""
    if channel is None:
        return images
    out = images.clone()
    out[:, channel] = 0
    return out


class DroppedSubject:
    """A cached subject seen without one modality (its channel zeroed); the rest delegates."""

    def __init__(self, subject: CachedSubject, channel: int) -> None:
        self._subject = subject
        self._channel = channel
        self._image: np.ndarray | None = None

    @property
    def image(self) -> np.ndarray:
        if self._image is None:
            img = np.array(self._subject.image, dtype=np.float32)
            img[self._channel] = 0
            self._image = img
        return self._image

    def __getattr__(self, name: str) -> Any:
        return getattr(self._subject, name)


def _models(ctx: EvalContext) -> dict[str, tuple[Encoder, Objective]]:
    models = {ctx.name: (ctx.encoder, ctx.objective)}
    for label, path in (ctx.options.get("compare") or {}).items():
        if label in models:
            raise AnatomapError(f"--compare name '{label}' is already a row of the table")
        encoder, objective, meta = load_model(path)
        mods = meta.get("data", {}).get("modalities")
        if mods is not None and list(mods) != ctx.cache.modalities:
            raise AnatomapError(
                f"{path}: trained on modalities {mods}, the cache has "
                f"{ctx.cache.modalities}; robustness compares runs on the same modalities"
            )
        models[label] = (encoder, objective)
    return models


def _landmark_conditions(
    ctx: EvalContext, name: str, encoder: Encoder, objective: Objective
) -> dict[str, dict[str, float]]:
    from anatomap.eval.matchers import DenseMatcher
    from anatomap.infer.embed import DenseModel

    out = {}
    max_points = int(ctx.options.get("max_points", 40))
    for c, m in [(None, None), *enumerate(ctx.cache.modalities)]:
        subs = {
            s: (ctx.cache[s] if c is None else DroppedSubject(ctx.cache[s], c))
            for s in ctx.subjects
        }
        model = DenseModel(encoder, objective)
        report = lm.evaluate_matchers(
            [DenseMatcher(name, model, device=ctx.device, precision=ctx.precision)],
            subs,
            ctx.subjects,
            max_points=max_points,
            seed=ctx.seed,
            progress=ctx.progress,
        )
        out[condition_name(m)] = report.metrics()["matchers"][name]["overall"]
    return out


def _applies(ctx: EvalContext) -> bool:
    """For every checkpoint trained on a multi-modal cache (``compare`` runs are scored on the
    same crops)."""
    return len(ctx.cache.modalities) > 1


def _table(
    position: dict[str, dict[str, dict[str, float]]],
    marks: dict[str, dict[str, dict[str, float]]],
) -> tuple[list[str], list[list[Any]]]:
    """The report table: one row per (model, condition)."""
    header = ["encoder", "condition", "Spearman", "R^2", "mean error (mm)", "error drop (mm)"]
    if marks:
        header += ["landmark MRE (mm)", "CPM@5", "MRE drop (mm)"]
    rows: list[list[Any]] = []
    for name, conds in position.items():
        for cond, met in conds.items():
            row: list[Any] = [
                name,
                cond,
                met["spearman"],
                met["r2"],
                met["mean_error_mm"],
                met["mean_error_mm"] - conds[ALL]["mean_error_mm"],
            ]
            if marks:
                if name in marks:
                    lmk = marks[name][cond]
                    row += [lmk["mre_mm"], lmk["cpm@5"], lmk["mre_mm"] - marks[name][ALL]["mre_mm"]]
                else:
                    row += ["-", "-", "-"]
            rows.append(row)
    return header, rows


@register_task("robustness", applies=_applies)
def robustness_task(ctx: EvalContext) -> TaskResult:
    """Position (and dense landmark) metrics with all modalities and each one dropped."""
    modalities = ctx.cache.modalities
    if len(modalities) < 2:
        raise AnatomapError(
            f"{ctx.cache.root}: robustness needs a multi-modal cache (it has {modalities})"
        )
    per_subject = int(ctx.options.get("crops_per_subject", 48))
    size = crop_size(ctx.meta, ctx.spec.spatial_dims)
    crops = sample_crops(ctx.cache, ctx.subjects, size, per_subject, ctx.seed)
    conditions: list[tuple[int | None, str | None]] = [(None, None), *enumerate(modalities)]
    with_landmarks = bool(ctx.options.get("robustness_landmarks", True)) and (
        sum(bool(ctx.cache[s].landmarks) for s in ctx.subjects) >= 2
    )

    position: dict[str, dict[str, dict[str, float]]] = {}
    marks: dict[str, dict[str, dict[str, float]]] = {}
    for name, (enc, obj) in _models(ctx).items():
        position[name] = {}
        fn = ctx.embedder(enc, obj)
        for c, m in conditions:
            e = embed(fn, drop_channel(crops.images, c))
            res = position_readout(e, crops.centres, crops.groups, ctx.seed)
            position[name][condition_name(m)] = res.metrics()
        if with_landmarks and isinstance(obj, DenseObjective):
            marks[name] = _landmark_conditions(ctx, name, enc, obj)

    drop: dict[str, dict[str, dict[str, float]]] = {}
    for name, conds in position.items():
        base = conds[ALL]
        drop[name] = {
            m: {k: conds[condition_name(m)][k] - base[k] for k in base} for m in modalities
        }
        if name in marks:
            lb = marks[name][ALL]
            for m in modalities:
                lc = marks[name][condition_name(m)]
                drop[name][m].update({f"landmark_{k}": lc[k] - lb[k] for k in ("mre_mm", "cpm@5")})

    header, rows = _table(position, marks)
    text = (
        f"{per_subject} foreground crops of {'x'.join(map(str, size))} voxels on each of "
        f"{len(ctx.subjects)} held-out subjects, embedded with all of {', '.join(modalities)} "
        "and with each one dropped (zeroed, as the cache stores a missing modality). Position "
        "metrics as in the position readout; drop = metric without the modality minus with "
        "all (positive error drop = worse)."
    )
    if marks:
        text += (
            " Landmarks: dense coarse-to-fine matching over every ordered pair of held-out "
            f"subjects (at most {int(ctx.options.get('max_points', 40))} points per pair), "
            "for dense checkpoints only."
        )
    better = {"Spearman": "max", "R^2": "max", "mean error (mm)": "min"}
    section = Section(
        "Missing-modality robustness",
        text=text,
        tables=[("Metrics with all modalities and each one dropped", header, rows, better)],
    )
    metrics = {
        "modalities": modalities,
        "crops_per_subject": per_subject,
        "position": position,
        "landmarks": marks,
        "drop": drop,
        "compare": {k: str(Path(v)) for k, v in (ctx.options.get("compare") or {}).items()},
    }
    return TaskResult(metrics, [section])
