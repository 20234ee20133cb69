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

Figures and report sections: :mod:`anatomap.eval.landmark_figures`; the ``landmarks``
evaluation task: :mod:`anatomap.eval.landmarks_task`.
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

import numpy as np

from anatomap.data.cache import CachedSubject
from anatomap.eval.tasks import progress_bar

CPM_RADII: tuple[float, ...] = (3.0, 5.0, 10.0)
"""Radii (mm) of the CPM (cumulative points matched) metrics."""


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


def _new_pair(
    subs: Mapping[str, CachedSubject],
    template: str,
    target: str,
    max_points: int | None,
    seed: int,
    partial: set[str],
) -> PairResult | None:
    """The pair's landmarks present in both subjects (subsampled), or ``None`` if none are."""
    la, lb = subs[template].landmarks, subs[target].landmarks
    common = [n for n in la if n in lb]  # template order
    if not common:
        return None
    idx = _subsample(len(common), max_points, seed, template, target)
    names = [common[i] for i in idx]
    return PairResult(
        template=template,
        target=target,
        names=names,
        template_mm=np.stack([la[n] for n in names]).astype(np.float64),
        true_mm=np.stack([lb[n] for n in names]).astype(np.float64),
        partial_target=target in partial,
    )


def _match_pair(
    m: Matcher,
    pr: PairResult,
    template: CachedSubject,
    template_state: Any,
    target: CachedSubject,
    target_state: Any,
) -> None:
    """Record ``m``'s answer on ``pr`` (NaN points and a warning if it raises) and its time."""
    t0 = time.perf_counter()
    try:
        res = m.match(template, template_state, pr.template_mm.copy(), target, target_state)
        if res.points_mm.shape != pr.template_mm.shape:
            raise ValueError(
                f"returned {res.points_mm.shape[0]} points for {len(pr.names)} queries"
            )
        pr.matched_mm[m.name] = res.points_mm
        pr.scores[m.name] = res.scores
    except Exception as exc:  # one failed pair must not end a long evaluation
        # stacklevel 3: the warning points at the caller of evaluate_matchers
        warnings.warn(
            f"matcher {m.name} failed on {pr.template} -> {pr.target}: {exc}", stacklevel=3
        )
        pr.errors_msg[m.name] = str(exc)
        pr.matched_mm[m.name] = np.full_like(pr.template_mm, np.nan)
        pr.scores[m.name] = np.full(len(pr.names), np.nan)
    pr.match_s[m.name] = time.perf_counter() - t0


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
    warning); pairs with no landmark in common are skipped. ``progress``: a tqdm bar over the
    pairs on stderr.
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
    with progress_bar(todo, desc="landmark pairs", enabled=progress, leave=False) as bar:
        for a, b in bar:
            pr = _new_pair(subs, a, b, max_points, seed, partial_set)
            if pr is None:
                continue
            for m in matchers:
                sa, sb = state(m, a), state(m, b)
                _match_pair(m, pr, subs[a], sa, subs[b], sb)
            pairs.append(pr)
            if progress:
                bar.set_postfix_str(
                    ", ".join(f"{m} {np.nanmean(pr.errors(m)):.1f} mm" for m in names_m)
                )
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
