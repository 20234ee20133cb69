"""Outlier rejection from the geometry of many matches (anatomap.infer.consistency)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _position_maps import position_embedding as _embedding

from anatomap.infer.consistency import (
    affine_consistency,
    crop_embedding,
    fixed_point_check,
)
from anatomap.infer.match import match_points


def _affine_set(
    n: int = 60, outliers: float = 0.2, noise: float = 2.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Template points in a brain-sized box, their images under a rotated, scaled, shifted
    affine plus ``noise`` mm, and a share of gross outliers (moved 30-80 mm)."""
    rng = np.random.default_rng(seed)
    p = rng.uniform([-70, -100, -50], [70, 70, 80], (n, 3))
    c, s = math.cos(0.3), math.sin(0.3)
    lin = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([1.1, 0.9, 1.05])
    q = p @ lin.T + [12.0, -8.0, 20.0] + rng.normal(0, noise, (n, 3))
    bad = rng.choice(n, round(outliers * n), replace=False)
    kick = rng.normal(size=(len(bad), 3))
    kick *= rng.uniform(30, 80, (len(bad), 1)) / np.linalg.norm(kick, axis=1, keepdims=True)
    q[bad] += kick
    mask = np.zeros(n, bool)
    mask[bad] = True
    return p, q, mask


def test_gross_outliers_are_flagged_and_inliers_kept() -> None:
    p, q, bad = _affine_set()
    c = affine_consistency(p, q)
    assert c.verdict == "ok" and c.suspect is not None
    assert np.array_equal(c.suspect, bad)
    assert c.residuals_mm is not None and c.predicted_mm is not None
    assert np.all(c.residuals_mm[~bad] < 8) and np.all(c.residuals_mm[bad] > 15)


def test_scores_guide_the_samples_without_changing_the_answer() -> None:
    p, q, bad = _affine_set(outliers=0.4, seed=3)
    scores = np.where(bad, 0.2, 0.6) + np.random.default_rng(1).normal(0, 0.05, len(p))
    with_scores, plain = affine_consistency(p, q, scores), affine_consistency(p, q)
    assert with_scores.suspect is not None and plain.suspect is not None
    assert np.array_equal(with_scores.suspect, bad) and np.array_equal(plain.suspect, bad)


def test_a_consistent_majority_is_never_flagged_wholesale() -> None:
    rng = np.random.default_rng(5)
    for seed in range(5):
        p, q, _ = _affine_set(n=40, outliers=0.0, seed=seed)
        q[:18] = rng.uniform(-90, 90, (18, 3))  # 45% random matches
        c = affine_consistency(p, q, seed=seed)
        assert c.verdict == "ok" and c.inliers is not None
        assert c.inliers[18:].all()


def test_too_few_points_give_no_verdict() -> None:
    p, q, _ = _affine_set(n=7, outliers=0.0)
    c = affine_consistency(p, q)
    assert c.verdict == "too few points" and c.inliers is None and c.suspect is None
    assert affine_consistency(p, q, min_points=5).verdict == "ok"
    q[:3] = np.nan  # non-finite matches do not count
    assert affine_consistency(p, q, min_points=5).verdict == "too few points"


def test_non_finite_matches_are_left_out_and_suspect() -> None:
    p, q, _ = _affine_set(n=30, outliers=0.0, seed=2)
    q[4] = np.nan
    c = affine_consistency(p, q)
    assert c.verdict == "ok" and c.suspect is not None and c.residuals_mm is not None
    assert c.suspect[4] and np.isnan(c.residuals_mm[4]) and c.suspect.sum() == 1


def test_a_pure_translation_is_consistent() -> None:
    p, _, _ = _affine_set(n=25, outliers=0.0)
    q = p + np.array([3.0, -40.0, 7.5])
    c = affine_consistency(p, q)
    assert c.verdict == "ok" and c.inliers is not None and c.inliers.all()
    assert c.residuals_mm is not None and c.residuals_mm.max() < 1e-6
    q[[2, 9]] += np.array([0.0, 50.0, 0.0])
    assert np.flatnonzero(affine_consistency(p, q).suspect).tolist() == [2, 9]


def test_left_right_confusions_are_flagged_and_a_mirror_image_is_no_consensus() -> None:
    rng = np.random.default_rng(6)
    p = rng.uniform([-70, -100, -50], [70, 70, 80], (40, 3))
    lin, shift = np.diag([1.05, 0.95, 1.1]), np.array([4.0, -6.0, 9.0])
    q = p @ lin.T + shift + rng.normal(0, 1.0, p.shape)
    swapped = (np.arange(len(p)) % 4 == 0) & (np.abs(p[:, 0]) > 15)
    mirrored = p * np.array([-1.0, 1.0, 1.0])
    q_lr = q.copy()
    q_lr[swapped] = mirrored[swapped] @ lin.T + shift  # the other hemisphere's landmark
    c = affine_consistency(p, q_lr)
    assert c.verdict == "ok" and c.suspect is not None
    assert np.array_equal(c.suspect, swapped)
    mirror = affine_consistency(mirrored, q)  # consistent only with a mirror image
    assert mirror.verdict == "no consensus" and mirror.suspect is None


def test_coplanar_points_get_an_affine_of_their_plane() -> None:
    p, q, bad = _affine_set(n=40, seed=4)
    p[:, 2] = 12.0  # clicked on one axial slice: the matches' z says nothing about p's
    q = p @ np.diag([1.1, 0.95, 1.0]) + [5.0, 3.0, -4.0]
    q[bad] += [0.0, 0.0, 45.0]
    c = affine_consistency(p, q)
    assert c.verdict == "ok" and c.suspect is not None
    assert np.array_equal(c.suspect, bad)
    assert np.array_equal(affine_consistency(p, q).suspect, c.suspect)  # stable


def test_collinear_points_and_random_matches_give_no_verdict() -> None:
    t = np.linspace(-50, 50, 20)[:, None]
    line = t * np.array([[1.0, 0.5, 0.2]])
    c = affine_consistency(line, line + 1.0)
    assert c.verdict == "degenerate" and c.suspect is None
    rng = np.random.default_rng(0)
    p = rng.uniform(-80, 80, (40, 3))
    c = affine_consistency(p, rng.uniform(-80, 80, (40, 3)))
    assert c.verdict == "no consensus" and c.suspect is None


def test_the_check_is_deterministic() -> None:
    p, q, _ = _affine_set(n=50, outliers=0.3, noise=4.0, seed=9)
    a, b = affine_consistency(p, q, seed=7), affine_consistency(p, q, seed=7)
    assert a.residuals_mm is not None and b.residuals_mm is not None
    assert np.array_equal(a.residuals_mm, b.residuals_mm)
    assert np.array_equal(a.suspect, b.suspect)  # type: ignore[arg-type]


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="3 template points but 2 matches"):
        affine_consistency(np.zeros((3, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="min_points 3"):
        affine_consistency(np.zeros((3, 3)), np.zeros((3, 3)), min_points=3)
    with pytest.raises(ValueError, match="threshold_mm -1"):
        affine_consistency(np.zeros((3, 3)), np.zeros((3, 3)), threshold_mm=-1)
    p, q, _ = _affine_set(n=20, outliers=0.0)
    nan_scores = affine_consistency(p, q, np.full(20, np.nan))  # no pool, no warning
    assert nan_scores.verdict == "ok"


# -- the fixed-point test and the local search, on maps that encode world position ---------


A = np.diag([2.0, 2.0, 2.0, 1.0])
A[:3, 3] = [-40, -50, -30]
B = np.diag([-2.0, 2.0, 2.0, 1.0])
B[:3, 3] = [38, -44, -36]
PTS = np.array([[0.0, 0.0, 0.0], [10.0, -20.0, 5.0], [-12.0, 8.0, -6.0]])


def test_a_match_that_does_not_match_back_is_suspect() -> None:
    tpl, tgt = _embedding(A, (40, 48, 36)), _embedding(B, (40, 44, 34))
    found = match_points(tpl, PTS, tgt).points_mm
    assert np.abs(found - PTS).max() <= 2.0
    wrong = found.copy()
    wrong[1] += [0.0, 30.0, 0.0]  # another place: it matches back to itself, not to PTS[1]
    wrong[2] = np.nan
    dist, suspect = fixed_point_check(tpl, PTS, tgt, wrong)
    assert suspect.tolist() == [False, True, True]
    assert dist[0] <= 4.0 and dist[1] > 25 and np.isnan(dist[2])  # two 2 mm grids


def test_a_cropped_embedding_searches_only_near_its_centre() -> None:
    tpl, tgt = _embedding(A, (40, 48, 36)), _embedding(B, (40, 44, 34))
    crop = crop_embedding(tgt, PTS[1], 10.0)
    assert crop.fine.shape[1] < tgt.fine.shape[1] and crop.image_affine is None
    near = match_points(tpl, PTS[1:2], crop).points_mm[0]
    assert np.abs(near - PTS[1]).max() <= 2.0  # the crop keeps the world frame
    away = crop_embedding(tgt, PTS[1] + [0.0, 30.0, 0.0], 8.0)
    far = match_points(tpl, PTS[1:2], away).points_mm[0]
    assert np.linalg.norm(far - (PTS[1] + [0.0, 30.0, 0.0])) <= 8.0 * math.sqrt(3) + 2
