"""Outlier rejection from the geometry of many matches.

Two checks of a set of matches ``P [N, 3] -> Q [N, 3]`` (template -> target, world mm):

- :func:`affine_consistency`: a robust affine ``Q ~ A P + t`` (RANSAC, Fischler & Bolles
  1981, with minimal samples, the truncated-quadratic MSAC cost of Torr & Zisserman 2000 and
  a least-squares refit on the inliers, as in LO-RANSAC, Chum et al. 2003). Anatomy departs
  from an affine by several millimetres, so the threshold is wide: it flags gross failures
  (a match in the wrong structure), not small errors. Points on a plane (landmarks clicked on
  one slice) get an affine of the plane. Below ``min_points`` points, on collinear points, or
  when no plausible affine explains more than ``min_share`` of the matches, there is no
  verdict; the check never flags a consistent majority.
- :func:`fixed_point_check`: the forward-backward (fixed-point) test of SAMv2 (Bai et al.
  2023, arXiv:2311.15111): match each found point back into the template; a match whose
  back-match lands far from the point it came from is suspect. It costs one more match.

:func:`crop_embedding` cuts a target embedding around a point, so that ``match_points`` on
the crop searches only there (a local re-search around an affine prediction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from anatomap import geometry

if TYPE_CHECKING:
    from anatomap.infer.embed import DenseEmbedding

DEFAULT_THRESHOLD_MM = 10.0
"""Distance (mm) from the robust affine's prediction beyond which a match is inconsistent
(``benchmarks/match_outliers.py``: the transfer benchmark's true correspondences lie within
4 mm of their own affine fit, gross failures tens of mm away; real anatomy departs from an
affine more than those warps, hence the margin)."""
DEFAULT_MIN_POINTS = 8
"""Fewest matches for a verdict (an affine has 12 parameters; 4 points fit any of them)."""
DEFAULT_MIN_SHARE = 0.4
"""No verdict unless the affine explains more than this share of the (finite) matches (on
the transfer benchmark, matches at chance level agree with some plausible affine by chance
for up to 30% of them within 10 mm; a working matcher's matches for 44-88%)."""
DEFAULT_BACK_MM = 10.0
"""Fixed-point check: a back-match farther than this (mm) from its template point is suspect."""
SCALE_RANGE = (0.25, 4.0)
"""Plausible singular values of the affine's linear part: a hypothesis outside is dropped
(so that a collapsing map cannot explain many scattered matches at once), as is a mirror
image (both point sets are RAS+ world mm; left-right confusions must not form a consensus)."""
_BLOCK = 2_000_000  # hypotheses x points evaluated at once


@dataclass(frozen=True)
class Consistency:
    """The verdict of :func:`affine_consistency`.

    Attributes:
        verdict: ``"ok"``, or why there is none: ``"too few points"``, ``"degenerate"``
            (collinear points), ``"no consensus"`` (no plausible affine explains more than
            ``min_share`` of the matches).
        residuals_mm: ``[N]`` distance of each match from the fitted affine's prediction
            (NaN for non-finite points); None without a fit.
        inliers: ``[N]`` matches within ``threshold_mm`` of it; None without a verdict.
        predicted_mm: ``[N, 3]`` the fitted affine applied to the template points; None
            without a fit.
        threshold_mm: the threshold used.
    """

    verdict: str
    residuals_mm: np.ndarray | None
    inliers: np.ndarray | None
    predicted_mm: np.ndarray | None
    threshold_mm: float

    @property
    def suspect(self) -> np.ndarray | None:
        """``[N]`` matches the check flags (not inliers); None without a verdict."""
        return None if self.inliers is None else ~self.inliers


def _frame(p: np.ndarray, tol_mm: float) -> tuple[np.ndarray, int]:
    """The points' coordinates along their principal axes with a spread over ``tol_mm``
    (and 2% of the largest): ``[N, r]``, and ``r`` (3 in general, 2 for coplanar points)."""
    centred = p - p.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    sd = s / np.sqrt(len(p))
    r = int(np.sum(sd > max(tol_mm, 0.02 * sd[0])))
    if r == 3 and np.linalg.det(vt) < 0:  # a rotation, so that orientation is kept
        vt[2] *= -1
    return centred @ vt[:r].T, r


def _samples(
    n: int, size: int, count: int, rng: np.random.Generator, pool: np.ndarray | None
) -> np.ndarray:
    """``count`` minimal samples ``[count, size]`` of distinct indices; every other one drawn
    from ``pool`` (the better-scored points) when given."""
    out = np.empty((count, size), np.int64)
    for i in range(count):
        src = pool if pool is not None and i % 2 == 0 and len(pool) >= size else None
        out[i] = rng.choice(n, size, replace=False) if src is None else rng.choice(src, size, False)
    return out


def _hypotheses(x: np.ndarray, q: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Exact affines ``[H, r + 1, 3]`` (rows: linear part, then translation) through each
    minimal sample, keeping the well-posed and plausible ones."""
    xs, qs = x[idx], q[idx]  # [T, r + 1, r + 1], [T, r + 1, 3]
    r = xs.shape[-1] - 1
    spread = np.abs(xs[:, 1:, :r] - xs[:, :1, :r]).max((1, 2))
    det = np.linalg.det(xs[:, 1:, :r] - xs[:, :1, :r])
    ok = np.abs(det) > 1e-3 * np.maximum(spread, 1e-9) ** r
    if not ok.any():
        return np.zeros((0, r + 1, 3))
    m = np.linalg.solve(xs[ok], qs[ok])
    return m[_plausible(m)]


def _plausible(m: np.ndarray) -> np.ndarray:
    """Which affines ``[H, r + 1, 3]`` have singular values in :data:`SCALE_RANGE` and, in
    3-D, keep orientation (both sides are RAS+ world mm: no mirror image)."""
    r = m.shape[1] - 1
    sv = np.linalg.svd(m[:, :r, :], compute_uv=False)
    ok = (sv.min(1) >= SCALE_RANGE[0]) & (sv.max(1) <= SCALE_RANGE[1])
    return ok & (np.linalg.det(m[:, :3, :]) > 0) if r == 3 else ok


def _best(x: np.ndarray, q: np.ndarray, models: np.ndarray, thr: float) -> tuple[float, int]:
    """The lowest MSAC cost (sum of squared residuals truncated at ``thr``) of ``models``
    and its position."""
    costs = []
    step = max(1, _BLOCK // len(x))
    for s in range(0, len(models), step):
        res = np.sum((np.einsum("nk,hkc->hnc", x, models[s : s + step]) - q) ** 2, -1)
        costs.append(np.minimum(res, thr * thr).sum(1))
    cost = np.concatenate(costs)
    k = int(np.argmin(cost))
    return float(cost[k]), k


def _ransac(
    x: np.ndarray, q: np.ndarray, thr: float, trials: int, rng: np.random.Generator, pool: Any
) -> np.ndarray | None:
    """The best minimal-sample affine, drawing until a clean sample is all but sure
    (probability 0.999 at the best inlier share so far) or ``trials`` are drawn."""
    n, size = x.shape
    best_cost, best = np.inf, None
    drawn, needed, batch = 0, trials, 100
    while drawn < min(trials, needed):
        models = _hypotheses(x, q, _samples(n, size, batch, rng, pool))
        drawn += batch
        if not len(models):
            continue
        cost, k = _best(x, q, models, thr)
        if cost < best_cost:
            best_cost, best = cost, models[k]
            res = np.linalg.norm(x @ best - q, axis=1)
            share = max(np.mean(res <= thr), 1e-6)
            clean = share**size
            needed = trials if clean >= 1 else int(np.ceil(np.log(1e-3) / np.log1p(-clean)))
    return best


def _refit(x: np.ndarray, q: np.ndarray, model: np.ndarray, thr: float) -> np.ndarray:
    """Least squares on the inliers, repeated until the inlier set settles (at most 5 times;
    a fit that is not plausible is not taken)."""
    inl = np.linalg.norm(x @ model - q, axis=1) <= thr
    for _ in range(5):
        if inl.sum() < x.shape[1] + 1:
            break
        fit = np.linalg.lstsq(x[inl], q[inl], rcond=None)[0]
        if not _plausible(fit[None])[0]:
            break
        model = fit
        new = np.linalg.norm(x @ model - q, axis=1) <= thr
        if np.array_equal(new, inl):
            break
        inl = new
    return model


def affine_consistency(
    template_mm: np.ndarray,
    matched_mm: np.ndarray,
    scores: np.ndarray | None = None,
    *,
    threshold_mm: float = DEFAULT_THRESHOLD_MM,
    min_points: int = DEFAULT_MIN_POINTS,
    min_share: float = DEFAULT_MIN_SHARE,
    trials: int = 2000,
    seed: int = 0,
) -> Consistency:
    """Robust affine consistency of matches ``template_mm -> matched_mm`` (``[N, 3]`` world
    mm): RANSAC over minimal samples (4 points; 3 for coplanar template points), scored by
    MSAC, then least squares on the inliers. With ``scores``, every other sample comes from
    the better-scored half of the matches. Deterministic for a ``seed``.

    A match is an inlier when it lies within ``threshold_mm`` of the affine's prediction.
    Non-finite points are left out of the fit and are never inliers. No verdict (``inliers``
    None) below ``min_points`` finite points, on collinear points, or when the best plausible
    affine explains no more than ``min_share`` of the finite matches: then the check cannot
    tell which matches are the consistent ones. A majority consistent with one affine is
    never flagged (RANSAC draws until a clean sample is all but sure)."""
    p = np.asarray(template_mm, np.float64).reshape(-1, 3)
    q = np.asarray(matched_mm, np.float64).reshape(-1, 3)
    if len(p) != len(q):
        raise ValueError(f"{len(p)} template points but {len(q)} matches")
    if min_points < 4:
        raise ValueError(f"min_points {min_points}: must be at least 4")
    if not threshold_mm > 0 or not 0 <= min_share < 1:
        raise ValueError(f"threshold_mm {threshold_mm}, min_share {min_share}: need > 0, [0, 1)")
    ok = np.isfinite(p).all(1) & np.isfinite(q).all(1)
    n = int(ok.sum())
    if n < min_points:
        return Consistency("too few points", None, None, None, threshold_mm)
    coords, r = _frame(p[ok], tol_mm=1.0)
    if r < 2:
        return Consistency("degenerate", None, None, None, threshold_mm)
    x = np.concatenate([coords, np.ones((n, 1))], 1)
    pool = None
    if scores is not None:
        s = np.asarray(scores, np.float64).reshape(-1)[ok]
        if np.isfinite(s).any():
            pool = np.flatnonzero(np.nan_to_num(s, nan=-np.inf) >= np.nanmedian(s))
    rng = np.random.default_rng(seed)
    model = _ransac(x, q[ok], threshold_mm, trials, rng, pool)
    if model is None:
        return Consistency("no consensus", None, None, None, threshold_mm)
    model = _refit(x, q[ok], model, threshold_mm)
    pred = np.full_like(q, np.nan)
    pred[ok] = x @ model
    res = np.linalg.norm(pred - q, axis=1)
    inliers = ok & (res <= threshold_mm)
    if inliers.sum() <= min_share * n:
        return Consistency("no consensus", res, None, pred, threshold_mm)
    return Consistency("ok", res, inliers, pred, threshold_mm)


def _inside_image(emb: DenseEmbedding, pts: np.ndarray) -> np.ndarray:
    """``pts`` moved (by at most a fine voxel) to lie inside ``emb``'s image, so that
    ``match_points`` accepts them as template points."""
    if emb.image_affine is None or not emb.image_shape:
        return pts
    ijk = geometry.world_to_voxel(emb.image_affine, pts)
    ijk = np.clip(ijk, 0.0, np.asarray(emb.image_shape, np.float64) - 1)
    return geometry.voxel_to_world(emb.image_affine, ijk)


def back_match(
    template: DenseEmbedding, target: DenseEmbedding, matched_mm: np.ndarray, **options: Any
) -> np.ndarray:
    """Where the matches ``[N, 3]`` in ``target`` match back to in ``template`` (``[N, 3]``
    world mm): ``match_points`` the other way round (``options`` passed on)."""
    from anatomap.infer.match import match_points

    q = _inside_image(target, np.asarray(matched_mm, np.float64).reshape(-1, 3))
    return match_points(target, q, template, **options).points_mm


def fixed_point_check(
    template: DenseEmbedding,
    template_mm: np.ndarray,
    target: DenseEmbedding,
    matched_mm: np.ndarray,
    *,
    threshold_mm: float = DEFAULT_BACK_MM,
    **options: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """SAMv2's fixed-point test: the distance (mm) of each back-match from its template
    point, and the suspect matches (farther than ``threshold_mm``; non-finite matches are
    suspect). Needs the template's embedding and costs one ``match_points`` call."""
    p = np.asarray(template_mm, np.float64).reshape(-1, 3)
    q = np.asarray(matched_mm, np.float64).reshape(-1, 3)
    ok = np.isfinite(q).all(1)
    dist = np.full(len(p), np.nan)
    if ok.any():
        back = back_match(template, target, q[ok], **options)
        dist[ok] = np.linalg.norm(back - p[ok], axis=1)
    return dist, ~(dist <= threshold_mm)


def crop_embedding(emb: DenseEmbedding, centre_mm: np.ndarray, radius_mm: float) -> Any:
    """The part of ``emb`` within ``radius_mm`` of ``centre_mm`` (a box on both maps, their
    affines shifted; the image geometry dropped), for a local ``match_points`` search."""
    from dataclasses import replace

    out: dict[str, Any] = {}
    for key in ("coarse", "fine"):
        fmap, aff = getattr(emb, key), getattr(emb, f"{key}_affine")
        shape = np.asarray(fmap.shape[1:])
        half = radius_mm / geometry.spacing(aff)
        mid = geometry.world_to_voxel(aff, np.asarray(centre_mm, np.float64).reshape(1, 3))[0]
        lo = np.clip(np.floor(mid - half), 0, shape - 1).astype(int)
        hi = np.clip(np.ceil(mid + half) + 1, lo + 1, shape).astype(int)
        out[key] = fmap[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        out[f"{key}_affine"] = geometry.crop_affine(aff, lo)
    return replace(emb, **out, image_shape=(), image_affine=None)
