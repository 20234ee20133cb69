"""``anatomap evaluate``: run the evaluation tasks on a run or checkpoint and write a report.

Every task compares the checkpoint with a randomly initialised encoder of the same
architecture on the same held-out crops, so the report shows what pretraining bought.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from anatomap.data.cache import Cache
from anatomap.errors import AnatomapError
from anatomap.eval.position import PositionResult, embed, position_readout, sample_crops
from anatomap.eval.report import Section, write_report
from anatomap.models.encoders import Encoder, EncoderSpec, build_encoder
from anatomap.train.checkpoint import load_checkpoint


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    report: Path
    out_dir: Path


def random_encoder(spec: EncoderSpec, seed: int = 0) -> Encoder:
    """The same architecture, freshly initialised with ``seed`` (the no-pretraining baseline)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    enc = build_encoder(spec)
    torch.random.set_rng_state(state)
    return enc.eval()


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


def _loss_figure(run_dir: Path) -> plt.Figure | None:
    from anatomap.train.pretrain import read_metrics

    rows = [r for r in read_metrics(run_dir) if r.get("loss")]
    if not rows:
        return None
    steps = [int(r["step"]) for r in rows]
    loss = [float(r["loss"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(steps, loss)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    fig.tight_layout()
    return fig


def _crop_size(meta: dict[str, Any], spatial_dims: int) -> tuple[int, ...]:
    size = int(meta.get("objective_config", {}).get("crop_size", 32))
    return (size,) * spatial_dims


def evaluate(
    checkpoint: str | Path,
    *,
    out: str | Path | None = None,
    cache: str | Path | None = None,
    subjects: list[str] | None = None,
    crops_per_subject: int = 48,
    seed: int = 0,
) -> EvalResult:
    """Evaluate a run folder or checkpoint; writes ``report.html`` and ``metrics.json``."""
    ckpt = load_checkpoint(checkpoint)
    meta = ckpt.meta
    run_dir = ckpt.path.parent
    cache_obj = Cache(cache or meta["data"]["cache"])
    if subjects is None:
        subjects = [s for s in meta["data"].get("heldout_subjects", []) if s in cache_obj]
    if not subjects:
        raise AnatomapError(
            f"{ckpt.path}: no held-out subjects to evaluate on; pass subjects (--subjects) "
            "or train with data.heldout / data.heldout_file"
        )
    out_dir = Path(out) if out else run_dir / "eval"
    spec = EncoderSpec.from_dict(meta["encoder"])
    size = _crop_size(meta, spec.spatial_dims)
    crops = sample_crops(cache_obj, subjects, size, crops_per_subject, seed)

    from anatomap.objectives.registry import get_objective, objective_config

    obj_cls = get_objective(meta["objective"])
    objective = obj_cls(
        objective_config({"name": meta["objective"], **meta["objective_config"]}), ckpt.encoder
    )
    objective.load_state_dict(ckpt.objective_state, strict=False)
    objective.eval()
    rand = random_encoder(spec, seed)
    embedders = {
        f"{meta['objective']} (pretrained)": lambda x: objective.embed(ckpt.encoder, x),
        "random init": lambda x: rand(x).pooled,
    }
    results: dict[str, PositionResult] = {
        name: position_readout(embed(fn, crops.images), crops.centres, crops.groups, seed)
        for name, fn in embedders.items()
    }

    metrics = {
        "checkpoint": str(ckpt.path),
        "objective": meta["objective"],
        "step": meta.get("step"),
        "subjects": subjects,
        "crops_per_subject": crops_per_subject,
        "crop_size": list(size),
        "position": {name: r.metrics() for name, r in results.items()},
    }
    header = ["encoder", "Spearman", "R^2", "mean error (mm)", "median error (mm)"]
    rows = [
        [name, r.spearman, r.r2, r.mean_error_mm, r.median_error_mm] for name, r in results.items()
    ]
    better = {"Spearman": "max", "R^2": "max", "mean error (mm)": "min", "median error (mm)": "min"}
    pos = Section(
        "Position readout",
        text=(
            f"{crops_per_subject} foreground crops of {'x'.join(map(str, size))} voxels on each "
            f"of {len(subjects)} held-out subjects. Spearman: embedding vs physical distance "
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
    sections = [pos]
    loss_fig = _loss_figure(run_dir)
    if loss_fig is not None:
        sections.append(Section("Training", figures=[("Training loss", loss_fig)]))
    report = write_report(
        out_dir,
        f"anatomap evaluation: {meta['objective']}",
        sections,
        metrics,
        subtitle=f"checkpoint {ckpt.path} (step {meta.get('step')}), "
        f"code {meta.get('code_version')}, held-out subjects: {', '.join(subjects)}",
    )
    return EvalResult(metrics, report, out_dir)
