"""SAM (Yan et al. 2022): loss pieces as tensor functions, dense embedding and matching."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from _position_maps import PoolModel as _PoolModel
from _position_maps import position_embedding as _embedding

from anatomap import geometry
from anatomap.geometry import sample_map
from anatomap.infer.embed import embed_array
from anatomap.infer.match import match_points
from anatomap.objectives.sam import info_nce, mine_hard_negatives, outside_radius


def test_info_nce_perfect_embedding_reaches_its_minimum() -> None:
    d, k, t = 8, 5, 0.5
    eye = torch.eye(d)
    anchors = eye[:2]
    negatives = eye[2 : 2 + k]  # orthogonal to every anchor
    perfect = info_nce(anchors, anchors, negatives, t)
    expected = math.log(1 + k * math.exp(-1 / t))  # pos sim 1, neg sims 0
    assert abs(perfect.item() - expected) < 1e-6
    wrong = info_nce(anchors, negatives[:2], anchors.flip(0), t)  # positives orthogonal
    assert wrong > perfect
    # Per-anchor negatives and a mask that removes all of them: only the positive is left.
    per = negatives[None].expand(2, k, d)
    none = info_nce(anchors, anchors, per, t, torch.zeros(2, k, dtype=torch.bool))
    assert none.item() < 1e-6


def test_hard_negative_mining_takes_the_most_similar_valid_candidates() -> None:
    sim = torch.tensor([[0.9, 0.1, 0.8, 0.7, 0.2], [0.1, 0.95, 0.3, 0.4, 0.5]])
    valid = torch.tensor([[False, True, True, True, True], [True, False, True, True, True]])
    idx, ok = mine_hard_negatives(sim, valid, pool=2, keep=2)
    assert sorted(idx[0].tolist()) == [2, 3]  # 0 is the most similar but not a negative
    assert sorted(idx[1].tolist()) == [3, 4]
    assert ok.all()
    idx, ok = mine_hard_negatives(sim, torch.zeros_like(valid), pool=2, keep=1)
    assert not ok.any()  # no valid candidate: nothing usable


def test_ignore_radius_excludes_near_voxels() -> None:
    anchors = torch.tensor([[0.0, 0, 0], [10.0, 0, 0]], dtype=torch.float64)
    cands = torch.tensor([[1.0, 0, 0], [5.0, 0, 0], [12.0, 0, 0]], dtype=torch.float64)
    mask = outside_radius(anchors, cands, 3.0)
    assert mask.tolist() == [[False, True, True], [True, True, False]]


def test_sample_map_interpolates_at_voxel_positions() -> None:
    fmap = F.normalize(torch.randn(4, 3, 4, 5), dim=0)
    at = torch.tensor([[1.0, 2.0, 3.0]])
    assert torch.allclose(sample_map(fmap, at)[0], fmap[:, 1, 2, 3], atol=1e-6)
    mid = sample_map(fmap, torch.tensor([[1.5, 2.0, 3.0]]))[0]
    assert torch.allclose(mid, F.normalize(fmap[:, 1, 2, 3] + fmap[:, 2, 2, 3], dim=0), atol=1e-5)


def test_sliding_window_tiles_like_one_pass() -> None:
    rng = np.random.default_rng(0)
    image = rng.uniform(0.1, 1.0, size=(1, 40, 48, 35)).astype(np.float32)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    tiled = embed_array(_PoolModel(), image, affine, window=16, overlap=0.5)
    whole = embed_array(_PoolModel(), image, affine, window=64, overlap=0.0)
    assert tiled.fine.shape == (2, 20, 24, 18) and tiled.coarse.shape == (2, 5, 6, 5)
    inner = (slice(None), slice(0, 20), slice(0, 24), slice(0, 17))
    # the maps are stored float16 (issue 18): the two blends may round apart by one unit in
    # the last place, 2^-11 below 1
    assert torch.allclose(tiled.fine[inner].float(), whole.fine[inner].float(), atol=2**-11)
    assert np.allclose(tiled.fine_affine, geometry.feature_affine(affine, 2))


def test_matching_finds_the_same_world_point_across_differently_placed_scans() -> None:
    a = np.diag([2.0, 2.0, 2.0, 1.0])
    a[:3, 3] = [-40, -50, -30]
    b = np.diag([-2.0, 2.0, 2.0, 1.0])  # flipped axis, other origin: same world frame
    b[:3, 3] = [38, -44, -36]
    template, target = _embedding(a, (40, 48, 36)), _embedding(b, (40, 44, 34))
    pts = np.array([[0.0, 0.0, 0.0], [10.0, -20.0, 5.0], [-15.0, 12.0, -8.0]])
    res = match_points(template, pts, target)
    err = np.linalg.norm(res.points_mm - pts, axis=1)
    assert err.max() <= 2.0 * math.sqrt(3) + 1e-6  # within one fine voxel (4 mm grid)
    assert (res.scores > 0.9).all()
