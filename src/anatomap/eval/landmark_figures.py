"""Figures and report sections of the landmark-matching evaluation
(:func:`anatomap.eval.landmarks.evaluate_matchers`): error histograms, orthogonal slices of
one pair with every matcher's answer, and the tables of :func:`landmark_sections`."""

from __future__ import annotations

import warnings
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from anatomap import geometry
from anatomap.data.cache import CachedSubject
from anatomap.eval.landmarks import CPM_RADII, LandmarkReport
from anatomap.eval.report import Section

_MARKERS = ("x", "+", "^", "s", "D", "v", "P", "*")
_COLOURS = ("tab:red", "tab:blue", "tab:orange", "tab:purple", "tab:brown", "tab:pink")

# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def error_histograms(report: LandmarkReport, bins: int = 40) -> Figure:
    """Error histograms, one panel per matcher, shared bins (linear axes); errors beyond the
    last bin are counted in it. Dashed lines: the CPM radii; solid: the median."""
    errs = {m: report.errors(m) for m in report.matchers}
    finite = [e[np.isfinite(e)] for e in errs.values()]
    allf = np.concatenate(finite) if finite else np.zeros(0)
    hi = float(np.percentile(allf, 99)) if len(allf) else 10.0
    hi = max(hi, max(CPM_RADII) * 1.2)
    edges = np.linspace(0.0, hi, bins + 1)
    n = max(len(report.matchers), 1)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 2.8), sharex=True, sharey=True, squeeze=False)
    for ax, (k, (m, e)) in zip(axes[0], enumerate(errs.items()), strict=False):
        e = e[np.isfinite(e)]
        ax.hist(np.clip(e, 0, hi), bins=edges, color=_COLOURS[k % len(_COLOURS)], alpha=0.8)
        for r in CPM_RADII:
            ax.axvline(r, color="0.4", ls="--", lw=0.8)
        if len(e):
            ax.axvline(np.median(e), color="k", lw=1.2)
            ax.set_title(f"{m}\nMRE {e.mean():.2f} mm, median {np.median(e):.2f} mm", fontsize=9)
        else:
            ax.set_title(m, fontsize=9)
        ax.set_xlabel("error (mm)")
    axes[0, 0].set_ylabel("points")
    fig.tight_layout()
    return fig


def _ras_channel0(sub: CachedSubject) -> tuple[np.ndarray, np.ndarray]:
    """Channel 0 of a cached image and its affine, reordered to RAS if it is not already."""
    arr = np.asarray(sub.image[0], np.float32)
    aff = sub.affine
    if geometry.orientation_codes(aff) != "RAS":
        arr, aff = geometry.reorient(arr, aff, "RAS")
    return arr, aff


_PLANES = (  # name, fixed array axis, (horizontal axis, vertical axis)
    ("axial", 2, (0, 1)),
    ("coronal", 1, (0, 2)),
    ("sagittal", 0, (1, 2)),
)
_AXIS_LABEL = ("x (mm, +R)", "y (mm, +A)", "z (mm, +S)")


def _draw_slice(
    ax: Any, arr: np.ndarray, aff: np.ndarray, point_mm: np.ndarray, plane: int
) -> tuple[int, int]:
    """Draw the slice through ``point_mm`` of plane ``plane`` in world mm; returns the
    in-plane world axes (horizontal, vertical). ``aff`` is RAS-ordered (see
    :func:`_ras_channel0`); the mm extent uses its diagonal, exact for the cache's
    axis-aligned grids."""
    name, fixed, (h, v) = _PLANES[plane]
    ijk = geometry.world_to_voxel(aff, np.asarray(point_mm, np.float64))
    s = int(np.clip(np.rint(ijk[fixed]), 0, arr.shape[fixed] - 1))
    sl = np.take(arr, s, axis=fixed)  # [h-axis, v-axis] (the remaining axes keep their order)
    sp = geometry.spacing(aff)
    lo = aff[:3, 3] - 0.5 * sp
    hi = aff[:3, 3] + (np.asarray(arr.shape) - 0.5) * sp
    ax.imshow(
        sl.T,
        origin="lower",
        cmap="gray",
        extent=(lo[h], hi[h], lo[v], hi[v]),
        interpolation="nearest",
        vmin=0.0,
        vmax=max(float(np.percentile(arr, 99.5)), 1e-6),
    )
    outside = not 0 <= np.rint(ijk[fixed]) < arr.shape[fixed]
    ax.set_title(f"{name}{' (outside FOV)' if outside else ''}", fontsize=8)
    ax.tick_params(labelsize=6)
    ax.set_xlabel(_AXIS_LABEL[h], fontsize=7)
    ax.set_ylabel(_AXIS_LABEL[v], fontsize=7)
    return h, v


def pair_figure(
    report: LandmarkReport, pair_index: int | None = None, n_points: int = 3
) -> Figure | None:
    """Orthogonal slices of one pair: per row, a template point on the template's axial,
    coronal and sagittal slices through it, then the target's slices through the true point
    with the true point (circle) and each matcher's match (one marker each, projected onto
    the slice plane). The rows show the points of lowest, median and highest mean error.

    ``pair_index`` picks the pair (default: the first pair with a partial target, else the
    first pair). Returns ``None`` when there is no pair or the subjects are not loaded.
    """
    if not report.pairs:
        return None
    if pair_index is None:
        pair_index = next((i for i, p in enumerate(report.pairs) if p.partial_target), 0)
    pr = report.pairs[pair_index]
    if pr.template not in report.subjects or pr.target not in report.subjects:
        return None
    tarr, taff = _ras_channel0(report.subjects[pr.template])
    garr, gaff = _ras_channel0(report.subjects[pr.target])
    err = np.stack([pr.errors(m) for m in report.matchers]) if report.matchers else None
    if err is not None and np.isfinite(err).any():
        mean_err = np.where(np.isfinite(err), err, np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            order = np.argsort(np.nan_to_num(np.nanmean(mean_err, axis=0), nan=np.inf))
    else:
        order = np.arange(len(pr.names))
    q = np.unique(np.rint(np.linspace(0, len(order) - 1, min(n_points, len(order)))).astype(int))
    rows = [int(order[i]) for i in q]
    fig, axes = plt.subplots(len(rows), 6, figsize=(16, 2.9 * len(rows)), squeeze=False)
    for r, i in enumerate(rows):
        for plane in range(3):
            ax = axes[r, plane]
            h, v = _draw_slice(ax, tarr, taff, pr.template_mm[i], plane)
            ax.plot(*pr.template_mm[i, [h, v]], "o", mfc="none", mec="lime", ms=9, mew=1.5)
            if plane == 0:
                ax.set_title(f"template {pr.template}: {pr.names[i][:28]}\naxial", fontsize=8)
            ax = axes[r, 3 + plane]
            h, v = _draw_slice(ax, garr, gaff, pr.true_mm[i], plane)
            ax.plot(*pr.true_mm[i, [h, v]], "o", mfc="none", mec="lime", ms=9, mew=1.5)
            for k, m in enumerate(report.matchers):
                p = pr.matched_mm[m][i]
                if np.all(np.isfinite(p)):
                    ax.plot(
                        p[h],
                        p[v],
                        _MARKERS[k % len(_MARKERS)],
                        color=_COLOURS[k % len(_COLOURS)],
                        mfc="none",  # hollow: overlapping matches stay visible
                        ms=7,
                        mew=1.5,
                        label=f"{m} ({pr.errors(m)[i]:.1f} mm)",
                    )
            if plane == 0:
                ax.set_title(f"target {pr.target}: true (circle)\naxial", fontsize=8)
                if report.matchers:
                    ax.legend(fontsize=6, loc="lower left", framealpha=0.7)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# Report sections
# --------------------------------------------------------------------------------------------

_HEADER = ["Matcher", "MRE (mm)", "median (mm)", "CPM@3", "CPM@5", "CPM@10", "points"]
_BETTER = {
    "MRE (mm)": "min",
    "median (mm)": "min",
    "CPM@3": "max",
    "CPM@5": "max",
    "CPM@10": "max",
    "time/target (s)": "min",
}


def _row(name: str, met: dict[str, float], timing: dict[str, float] | None) -> list[Any]:
    def val(x: float) -> Any:
        return "-" if not np.isfinite(x) else float(x)

    row = [
        name,
        val(met["mre_mm"]),
        val(met["median_mm"]),
        val(met["cpm@3"]),
        val(met["cpm@5"]),
        val(met["cpm@10"]),
        int(met["n_points"]),
    ]
    if timing is not None:
        row += [timing["time_per_target_s"], timing["prepare_s"], timing["match_s"]]
    return row


def landmark_sections(report: LandmarkReport, pair_index: int | None = None) -> list[Section]:
    """Report sections: a table per matcher (overall, and partial targets when there are
    any), the error histograms and one pair's orthogonal slices."""
    met = report.metrics()
    n_pairs, n_part = met["n_pairs"], met["n_partial_pairs"]
    header = [*_HEADER, "time/target (s)", "prepare (s)", "match (s)"]
    rows = [
        _row(m, met["matchers"][m]["overall"], met["matchers"][m]["timing"])
        for m in report.matchers
    ]
    tables = [(f"All {n_pairs} ordered pairs (best in bold)", header, rows, _BETTER)]
    if n_part:
        prow = [_row(m, met["matchers"][m]["partial_targets"], None) for m in report.matchers]
        tables.append(
            (f"The {n_part} pairs whose target has a partial field of view", _HEADER, prow, _BETTER)
        )
    failed = {m: v["failed_pairs"] for m, v in met["matchers"].items() if v["failed_pairs"]}
    text = (
        f"Landmarks present in both subjects of each ordered (template, target) pair of "
        f"{len(report.subjects)} subjects are matched from the template into the target; "
        "error = distance (mm) between the matched and the true target landmark. MRE: mean "
        "radial error; CPM@r: fraction of points within r mm. Time per target = mean "
        "per-volume preparation + mean matching time per pair (s)."
    )
    if report.max_points is not None:
        text += f" At most {report.max_points} landmarks per pair (seed {report.seed})."
    if failed:
        text += f" Failed pairs (counted as misses): {failed}."
    figures: list[tuple[str, Figure]] = [
        (
            "Landmark errors per matcher (shared bins; dashed: 3/5/10 mm, solid: median; "
            "the last bin holds every larger error)",
            error_histograms(report),
        )
    ]
    fig = pair_figure(report, pair_index)
    if fig is not None:
        pi = pair_index
        if pi is None:
            pi = next((i for i, p in enumerate(report.pairs) if p.partial_target), 0)
        pr = report.pairs[pi]
        figures.append(
            (
                f"{pr.template} -> {pr.target}: template point (left, circle) and target "
                "slices through the true point (right, circle) with each matcher's match "
                "projected onto the slice; rows: lowest, median and highest mean error",
                fig,
            )
        )
    return [Section("Landmark matching", text=text, tables=tables, figures=figures)]
