"""Landmark matching: find the same anatomical point in another scan, and score it.

SAM's inference (Yan et al. 2022, the project spec, docs/methods/sam.md) and image registration (the classical
bar, the project spec's peers) answer one question: given a point in a *template* scan, where is
the same anatomy in a *target* scan? This module evaluates any method that answers it, as a
:class:`Matcher`, on subjects whose named landmarks are known in world millimetres (RAS+):

* for every ordered pair (template, target) of distinct subjects, the landmarks present in
  both (same name) are matched from the template into the target, and the error of each is
  the Euclidean distance (mm) between the matched point and the target's true landmark;
* metrics per matcher: mean radial error (MRE), median error, CPM@r (the fraction of points
  matched within r mm, r = 3, 5, 10), overall and over the pairs whose target is a partial
  field of view;
* time per target: a matcher's ``prepare`` (per-volume work, e.g. computing embeddings) runs
  once per subject and is timed; ``match`` runs once per pair and is timed. The time to
  answer queries in a new target is reported as mean prepare time + mean match time.

All points are world mm, RAS+ (see :mod:`anatomap.geometry`).
"""

from __future__ import annotations

import csv
import time
import warnings
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from anatomap import geometry
from anatomap.data.cache import CachedSubject
from anatomap.eval.report import Section

CPM_RADII: tuple[float, ...] = (3.0, 5.0, 10.0)
"""Radii (mm) of the CPM (cumulative points matched) metrics."""

_MARKERS = ("x", "+", "^", "s", "D", "v", "P", "*")
_COLOURS = ("tab:red", "tab:blue", "tab:orange", "tab:purple", "tab:brown", "tab:pink")


# --------------------------------------------------------------------------------------------
# Matcher protocol
# --------------------------------------------------------------------------------------------


@dataclass
class MatchResult:
    """Matched points ``[N, 3]`` (world mm, RAS+) in the target, and a score per point
    (a similarity: higher is better; NaN where the matcher has none)."""

    points_mm: np.ndarray
    scores: np.ndarray

    def __post_init__(self) -> None:
        self.points_mm = np.asarray(self.points_mm, np.float64).reshape(-1, 3)
        self.scores = np.asarray(self.scores, np.float64).reshape(-1)
        if len(self.scores) != len(self.points_mm):
            raise ValueError(
                f"MatchResult: {len(self.points_mm)} points but {len(self.scores)} scores"
            )


@runtime_checkable
class Matcher(Protocol):
    """A method that finds template points in a target scan.

    ``prepare(subject)`` does the per-volume work (embeddings, an image object) and returns a
    state (or ``None``); :func:`evaluate_matchers` calls it once per subject and passes the
    states back to ``match``, which maps ``points_mm [N, 3]`` (template world mm) to the
    target's world mm.
    """

    name: str

    def prepare(self, subject: CachedSubject) -> Any: ...

    def match(
        self,
        template: CachedSubject,
        template_state: Any,
        points_mm: np.ndarray,
        target: CachedSubject,
        target_state: Any,
    ) -> MatchResult: ...


class IdentityMatcher:
    """The trivial matcher: a template point maps to the same world position in the target.

    A floor (or ceiling) to compare against: its error is the subjects' misalignment in world
    coordinates, and it is exactly zero when template and target are the same scan.
    """

    name = "identity"

    def prepare(self, subject: CachedSubject) -> None:
        return None

    def match(
        self,
        template: CachedSubject,
        template_state: Any,
        points_mm: np.ndarray,
        target: CachedSubject,
        target_state: Any,
    ) -> MatchResult:
        pts = np.asarray(points_mm, np.float64)
        return MatchResult(pts.copy(), np.full(len(pts), np.nan))


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def landmark_metrics(errors: np.ndarray, radii: Sequence[float] = CPM_RADII) -> dict[str, float]:
    """MRE, median, CPM@r and counts of an array of errors (mm).

    Non-finite errors (a matcher that failed or returned NaN) count as misses in CPM and as
    ``failed``; MRE and median are over the finite errors. Empty input gives NaN metrics.
    """
    e = np.asarray(errors, np.float64).reshape(-1)
    finite = e[np.isfinite(e)]
    out: dict[str, float] = {
        "mre_mm": float(finite.mean()) if len(finite) else float("nan"),
        "median_mm": float(np.median(finite)) if len(finite) else float("nan"),
        "std_mm": float(finite.std()) if len(finite) else float("nan"),
        "max_mm": float(finite.max()) if len(finite) else float("nan"),
    }
    for r in radii:
        out[f"cpm@{r:g}"] = float(np.mean(np.isfinite(e) & (e <= r))) if len(e) else float("nan")
    out["n_points"] = len(e)
    out["failed"] = int(len(e) - len(finite))
    return out


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@dataclass
class PairResult:
    """One ordered (template, target) pair: the points evaluated and every matcher's answer."""

    template: str
    target: str
    names: list[str]
    template_mm: np.ndarray  # [N, 3]
    true_mm: np.ndarray  # [N, 3], in the target
    partial_target: bool
    matched_mm: dict[str, np.ndarray] = field(default_factory=dict)  # matcher -> [N, 3]
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    match_s: dict[str, float] = field(default_factory=dict)
    errors_msg: dict[str, str] = field(default_factory=dict)  # matcher -> exception text

    def errors(self, matcher: str) -> np.ndarray:
        """Per-point error (mm) of ``matcher`` on this pair."""
        return np.linalg.norm(self.matched_mm[matcher] - self.true_mm, axis=-1)


@dataclass
class LandmarkReport:
    """Everything :func:`evaluate_matchers` measured; :meth:`metrics` summarises it."""

    matchers: list[str]
    pairs: list[PairResult]
    prepare_s: dict[str, dict[str, float]]  # matcher -> subject -> seconds
    partial: set[str]
    subjects: dict[str, CachedSubject] = field(repr=False, default_factory=dict)
    max_points: int | None = None
    seed: int = 0

    def errors(self, matcher: str, partial_only: bool = False) -> np.ndarray:
        """All errors (mm) of ``matcher``, concatenated over pairs (optionally partial ones)."""
        chunks = [p.errors(matcher) for p in self.pairs if p.partial_target or not partial_only]
        return np.concatenate(chunks) if chunks else np.zeros(0)

    def timing(self, matcher: str) -> dict[str, float]:
        """Mean prepare time per subject, mean match time per pair, and their sum (s)."""
        prep = list(self.prepare_s.get(matcher, {}).values())
        match = [p.match_s[matcher] for p in self.pairs if matcher in p.match_s]
        prep_s = float(np.mean(prep)) if prep else 0.0
        match_s = float(np.mean(match)) if match else 0.0
        return {"prepare_s": prep_s, "match_s": match_s, "time_per_target_s": prep_s + match_s}

    def metrics(self) -> dict[str, Any]:
        """JSON-ready metrics: per matcher, ``overall``, ``partial_targets`` and ``timing``."""
        out: dict[str, Any] = {
            "n_pairs": len(self.pairs),
            "n_partial_pairs": sum(p.partial_target for p in self.pairs),
            "partial_subjects": sorted(self.partial),
            "max_points": self.max_points,
            "seed": self.seed,
            "matchers": {},
        }
        for m in self.matchers:
            out["matchers"][m] = {
                "overall": landmark_metrics(self.errors(m)),
                "partial_targets": landmark_metrics(self.errors(m, partial_only=True)),
                "timing": self.timing(m),
                "failed_pairs": sum(m in p.errors_msg for p in self.pairs),
            }
        return out


def _subsample(n: int, max_points: int | None, seed: int, template: str, target: str) -> np.ndarray:
    """Sorted indices of at most ``max_points`` of ``n``: the same for every matcher and every
    run, and independent of the order in which the subjects were listed."""
    if max_points is None or n <= max_points:
        return np.arange(n)
    rng = np.random.default_rng([seed, zlib.crc32(template.encode()), zlib.crc32(target.encode())])
    return np.sort(rng.choice(n, max_points, replace=False))


def evaluate_matchers(
    matchers: Sequence[Matcher],
    cache: Mapping[str, CachedSubject] | Any,
    subjects: Sequence[str],
    partial: Iterable[str] = (),
    max_points: int | None = None,
    seed: int = 0,
    *,
    progress: bool = False,
) -> LandmarkReport:
    """Match landmarks of every ordered pair of distinct ``subjects`` with every matcher.

    ``cache`` is a :class:`~anatomap.data.cache.Cache` (or any ``subject id -> CachedSubject``
    mapping). ``partial`` names the subjects with a partial field of view: pairs whose
    *target* is one of them are also scored separately. ``max_points`` caps the landmarks
    per pair (a seeded, order-independent subsample, shared by all matchers).

    A matcher whose ``match`` raises is recorded as failed on that pair (NaN points, a
    warning); pairs with no landmark in common are skipped.
    """
    names_m = [m.name for m in matchers]
    if len(set(names_m)) != len(names_m):
        raise ValueError(f"matcher names must be unique, got {names_m}")
    subjects = list(dict.fromkeys(subjects))
    partial_set = set(partial)
    subs = {s: cache[s] for s in subjects}
    states: dict[str, dict[str, Any]] = {m.name: {} for m in matchers}
    prepare_s: dict[str, dict[str, float]] = {m.name: {} for m in matchers}

    def state(m: Matcher, sid: str) -> Any:
        if sid not in states[m.name]:
            t0 = time.perf_counter()
            states[m.name][sid] = m.prepare(subs[sid])
            prepare_s[m.name][sid] = time.perf_counter() - t0
        return states[m.name][sid]

    pairs: list[PairResult] = []
    todo = [(a, b) for a in subjects for b in subjects if a != b]
    for k, (a, b) in enumerate(todo):
        la, lb = subs[a].landmarks, subs[b].landmarks
        common = [n for n in la if n in lb]  # template order
        if not common:
            continue
        idx = _subsample(len(common), max_points, seed, a, b)
        names = [common[i] for i in idx]
        pr = PairResult(
            template=a,
            target=b,
            names=names,
            template_mm=np.stack([la[n] for n in names]).astype(np.float64),
            true_mm=np.stack([lb[n] for n in names]).astype(np.float64),
            partial_target=b in partial_set,
        )
        for m in matchers:
            sa, sb = state(m, a), state(m, b)
            t0 = time.perf_counter()
            try:
                res = m.match(subs[a], sa, pr.template_mm.copy(), subs[b], sb)
                if res.points_mm.shape != pr.template_mm.shape:
                    raise ValueError(
                        f"returned {res.points_mm.shape[0]} points for {len(names)} queries"
                    )
                pr.matched_mm[m.name] = res.points_mm
                pr.scores[m.name] = res.scores
            except Exception as exc:  # one failed pair must not end a long evaluation
                warnings.warn(f"matcher {m.name} failed on {a} -> {b}: {exc}", stacklevel=2)
                pr.errors_msg[m.name] = str(exc)
                pr.matched_mm[m.name] = np.full_like(pr.template_mm, np.nan)
                pr.scores[m.name] = np.full(len(names), np.nan)
            pr.match_s[m.name] = time.perf_counter() - t0
        pairs.append(pr)
        if progress:
            summary = ", ".join(
                f"{m}: {np.nanmean(pr.errors(m)):.2f} mm {pr.match_s[m]:.1f} s" for m in names_m
            )
            print(f"[{k + 1}/{len(todo)}] {a} -> {b} ({len(names)} pts) {summary}", flush=True)
    return LandmarkReport(
        matchers=names_m,
        pairs=pairs,
        prepare_s=prepare_s,
        partial=partial_set,
        subjects=subs,
        max_points=max_points,
        seed=seed,
    )


def partial_subjects(csv_path: str | Path) -> set[str]:
    """Subjects whose ``partial`` column is 1 (partial field of view) in a demo
    ``subjects.csv``; an empty set when the file has no such column."""
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or "partial" not in reader.fieldnames:
            return set()
        out = set()
        for row in reader:
            v = (row.get("partial") or "").strip().lower()
            if v in ("1", "1.0", "true", "yes"):
                out.add(row["subject"])
        return out


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
