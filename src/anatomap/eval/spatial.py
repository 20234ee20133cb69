"""The Spatial-Aware observables (Zhang et al., arXiv 2509.05967): what the method has learnt,
shown the way it was asked.

For a spatial_aware checkpoint, on views of the held-out subjects:

- true and predicted **gap matrices** side by side, one heatmap per world axis (R, A, S), for a
  few volumes (entry ``(i, j)``: centre of view j minus centre of view i, mm; views sorted by
  their S coordinate so the structure is visible);
- predicted vs true **absolute locations** (and gaps) as scatter plots; only differences of
  locations are supervised, so both are centred per volume before they are compared;
- the **gap error in mm over training**, read from ``RUN/logs/metrics.csv``
  (``train/gap_error_mm`` and ``train/location_error_mm``, logged by the objective), with the
  held-out values and the "predict zero gap" baseline for reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from anatomap import geometry
from anatomap.data.sampler import ViewSpec, sample_views
from anatomap.eval.report import Section
from anatomap.eval.tasks import EvalContext, TaskResult, register_task

AXES = "RAS"


@dataclass
class VolumeObservables:
    """One held-out volume's views: true and predicted gaps ``[N, N, 3]`` and locations
    ``[N, 3]`` (mm), views sorted by their S coordinate."""

    subject: str
    true_gaps: np.ndarray
    pred_gaps: np.ndarray
    true_locations: np.ndarray
    pred_locations: np.ndarray

    @property
    def pairs(self) -> np.ndarray:
        n = len(self.true_locations)
        return ~np.eye(n, dtype=bool)

    def gap_errors(self) -> np.ndarray:
        """Euclidean error (mm) of each off-diagonal predicted gap."""
        return np.linalg.norm(self.pred_gaps - self.true_gaps, axis=-1)[self.pairs]


def centred(points: np.ndarray) -> np.ndarray:
    """Points minus their mean (the translation that only-relative supervision leaves free)."""
    return points - points.mean(axis=0, keepdims=True)


@torch.no_grad()
def observe(ctx: EvalContext, num_views: int) -> list[VolumeObservables]:
    """Sample ``num_views`` views of each held-out subject (reproducible with ``ctx.seed``)
    and run the objective's heads on them (on ``ctx.device``; results back on the CPU)."""
    objective = ctx.objective.eval()
    encoder = ctx.encoder.eval()
    ctx.to_device(encoder, objective)
    cfg = objective.config
    spec = ViewSpec(
        num_views=num_views,
        size=(cfg.crop_size,) * ctx.spec.spatial_dims,
        foreground=cfg.foreground,
    )
    out = []
    for g, sid in enumerate(ctx.subjects):
        rng = np.random.default_rng([ctx.seed, g, 23])
        images, affines = sample_views(ctx.cache[sid], spec, rng)
        centres = geometry.box_center(affines, images.shape[2:])
        with ctx.autocast():
            pred = objective.predict(encoder, torch.from_numpy(images)[None].to(ctx.device))
        order = np.argsort(centres[:, 2], kind="stable")
        gaps = geometry.pairwise_gaps(centres)
        out.append(
            VolumeObservables(
                sid,
                gaps[order][:, order],
                pred["gaps_mm"][0].cpu().numpy().astype(np.float64)[order][:, order],
                centres[order],
                pred["locations_mm"][0].cpu().numpy().astype(np.float64)[order],
            )
        )
    return out


def summarise(volumes: list[VolumeObservables]) -> dict[str, float | list[float]]:
    """Held-out errors (mm) of both heads and of the trivial predictors."""
    t = np.concatenate([v.true_gaps[v.pairs] for v in volumes])
    p = np.concatenate([v.pred_gaps[v.pairs] for v in volumes])
    loc_gaps = np.concatenate([geometry.pairwise_gaps(v.pred_locations)[v.pairs] for v in volumes])
    tl = np.concatenate([centred(v.true_locations) for v in volumes])
    pl = np.concatenate([centred(v.pred_locations) for v in volumes])
    r2 = 1.0 - ((p - t) ** 2).sum(0) / ((t - t.mean(0)) ** 2).sum(0)
    return {
        "gap_error_mm": float(np.linalg.norm(p - t, axis=-1).mean()),
        "gap_abs_error_mm_per_axis": np.abs(p - t).mean(0).tolist(),
        "gap_r2_per_axis": r2.tolist(),
        "location_difference_error_mm": float(np.linalg.norm(loc_gaps - t, axis=-1).mean()),
        "zero_gap_baseline_mm": float(np.linalg.norm(t, axis=-1).mean()),
        "location_error_mm": float(np.linalg.norm(pl - tl, axis=-1).mean()),
        "volume_centre_baseline_mm": float(np.linalg.norm(tl, axis=-1).mean()),
    }


def gap_matrix_figure(v: VolumeObservables) -> plt.Figure:
    """True (top) and predicted (bottom) gap matrices per axis, shared colour scale per axis."""
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.6), layout="constrained")
    n = len(v.true_locations)
    ticks = list(range(0, n, max(1, n // 8)))
    for k in range(3):
        lim = float(np.abs(v.true_gaps[..., k]).max()) or 1.0
        for row, (label, m) in enumerate((("true", v.true_gaps), ("predicted", v.pred_gaps))):
            ax = axes[row, k]
            im = ax.imshow(m[..., k], cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
            err = np.abs(v.pred_gaps[..., k] - v.true_gaps[..., k])[v.pairs].mean()
            title = f"{label} gap {AXES[k]}"
            ax.set_title(title if row == 0 else f"{title} (|error| {err:.1f} mm)", fontsize=10)
            ax.set_xlabel("view j", fontsize=9)
            ax.set_ylabel("view i", fontsize=9)
            ax.set_xticks(ticks)
            ax.set_yticks(ticks)
        fig.colorbar(
            im, ax=axes[:, k].tolist(), shrink=0.7, label=f"{AXES[k]}_j - {AXES[k]}_i (mm)"
        )
    fig.suptitle(
        f"{v.subject}: entry (i, j) = centre_j - centre_i; {n} views sorted by S; "
        f"mean gap error {v.gap_errors().mean():.1f} mm",
        fontsize=11,
    )
    return fig


def location_figure(volumes: list[VolumeObservables]) -> plt.Figure:
    """Row 1: predicted vs true absolute location (centred per volume) per axis.
    Row 2: predicted vs true gap per axis (every ordered pair of every volume)."""
    fig, axes = plt.subplots(2, 3, figsize=(12.5, 8.0))
    colours = plt.cm.tab10(np.linspace(0, 1, 10))
    for k in range(3):
        for row in range(2):
            ax = axes[row, k]
            lo, hi = np.inf, -np.inf
            for g, v in enumerate(volumes):
                if row == 0:
                    t, p = centred(v.true_locations)[:, k], centred(v.pred_locations)[:, k]
                else:
                    t, p = v.true_gaps[v.pairs][:, k], v.pred_gaps[v.pairs][:, k]
                ax.scatter(
                    t, p, s=10 if row == 0 else 4, alpha=0.6, color=colours[g % 10], label=v.subject
                )
                lo, hi = min(lo, t.min(), p.min()), max(hi, t.max(), p.max())
            ax.plot([lo, hi], [lo, hi], "k--", lw=1)
            what = "location (centred per volume)" if row == 0 else "gap"
            ax.set_xlabel(f"true {what} {AXES[k]} (mm)", fontsize=9)
            ax.set_ylabel(f"predicted {AXES[k]} (mm)", fontsize=9)
    axes[0, 0].legend(fontsize=7, loc="upper left")
    axes[0, 1].set_title("absolute-location head")
    axes[1, 1].set_title("gap head")
    fig.tight_layout()
    return fig


def training_curves(run_dir) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``train/gap_error_mm`` and ``train/location_error_mm`` against step from the CSV log."""
    from anatomap.checkpoint import read_metrics

    rows = read_metrics(run_dir)
    curves = {}
    for key in ("train/gap_error_mm", "train/location_error_mm"):
        pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
        if pts:
            steps, values = map(np.asarray, zip(*pts, strict=True))
            curves[key] = (steps, values)
    return curves


def training_figure(
    curves: dict[str, tuple[np.ndarray, np.ndarray]], summary: dict
) -> plt.Figure | None:
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    names = {"train/gap_error_mm": "gap head", "train/location_error_mm": "location differences"}
    held = {
        "train/gap_error_mm": summary["gap_error_mm"],
        "train/location_error_mm": summary["location_difference_error_mm"],
    }
    for (key, (steps, values)), colour in zip(curves.items(), ("C0", "C1"), strict=False):
        ax.plot(steps, values, color=colour, label=f"{names[key]} (training batches)")
        ax.axhline(held[key], color=colour, ls=":", label=f"{names[key]}, held-out at the end")
    ax.axhline(
        summary["zero_gap_baseline_mm"], color="grey", ls="--", label="predict zero gap (held-out)"
    )
    ax.set_xlabel("step")
    ax.set_ylabel("mean gap error (mm)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


@register_task(
    "spatial_aware", applies=lambda ctx: ctx.meta.get("objective") == "spatial_aware", strict=True
)
def spatial_aware_task(ctx: EvalContext) -> TaskResult:
    """Gap matrices, absolute locations and the gap error over training (held-out views)."""
    num_views = int(ctx.options.get("spatial_views", 12))
    num_shown = int(ctx.options.get("spatial_volumes", 3))
    volumes = observe(ctx, num_views)
    summary = summarise(volumes)
    curves = training_curves(ctx.run_dir)
    header = ["predictor", "mean error (mm)", "|R| (mm)", "|A| (mm)", "|S| (mm)"]
    t = np.concatenate([v.true_gaps[v.pairs] for v in volumes])
    p = np.concatenate([v.pred_gaps[v.pairs] for v in volumes])
    loc = np.concatenate([geometry.pairwise_gaps(v.pred_locations)[v.pairs] for v in volumes])
    rows = [
        ["gap head", *error_row(p, t)],
        ["location head differences", *error_row(loc, t)],
        ["predict zero gap (baseline)", *error_row(np.zeros_like(t), t)],
    ]
    better = {h: "min" for h in header[1:]}
    loc_rows = [
        ["location head (centred per volume)", summary["location_error_mm"]],
        ["volume centre (baseline)", summary["volume_centre_baseline_mm"]],
    ]
    figures = [
        (
            f"True (top) and predicted (bottom) gap matrices per axis: {v.subject}",
            gap_matrix_figure(v),
        )
        for v in volumes[:num_shown]
    ]
    figures.append(
        (
            "Predicted against true absolute locations and gaps (held-out views)",
            location_figure(volumes),
        )
    )
    train_fig = training_figure(curves, summary)
    if train_fig is not None:
        figures.append(("Gap error (mm) over training, from logs/metrics.csv", train_fig))
    section = Section(
        "Spatial-Aware observables",
        text=(
            f"{num_views} views of {ctx.objective.config.crop_size} voxels on each of "
            f"{len(volumes)} held-out subjects. Gap head: the gap matrix predicted from view "
            "pairs (online view i, EMA view j). Location head: one absolute location per view; "
            "only its differences are supervised, so locations are compared after centring "
            "each volume. Errors are Euclidean distances in mm averaged over ordered pairs "
            "(per-axis columns: mean absolute error)."
        ),
        tables=[
            ("Held-out gap error (best in bold)", header, rows, better),
            (
                "Held-out absolute location error",
                ["predictor", "mean error (mm)"],
                loc_rows,
                {"mean error (mm)": "min"},
            ),
        ],
        figures=figures,
    )
    metrics = {
        "views_per_subject": num_views,
        **summary,
        "training": {
            k.removeprefix("train/"): {
                "first": float(v[0]),
                "last": float(v[-1]),
                "steps": int(s[-1]),
            }
            for k, (s, v) in curves.items()
        },
    }
    return TaskResult(metrics, [section])


def error_row(pred: np.ndarray, true: np.ndarray) -> list[float]:
    """Mean Euclidean error and per-axis mean absolute error (mm) of gap predictions."""
    err = pred - true
    return [float(np.linalg.norm(err, axis=-1).mean()), *np.abs(err).mean(0).tolist()]
