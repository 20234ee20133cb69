"""Spatial-Aware's loss pieces (Zhang et al. 2025) as tensor functions, and its EMA encoder."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anatomap import geometry
from anatomap.errors import ConfigError
from anatomap.models.ema import ema_momentum, ema_update
from anatomap.models.encoders import EncoderSpec, build_encoder
from anatomap.objectives.registry import get_objective, objective_config
from anatomap.objectives.spatial_aware import (
    GapHead,
    adjacency_loss,
    enumerate_routes,
    gap_matrix_loss,
    location_loss,
    region_features,
    region_grid,
    route_loss,
    route_set,
    route_sums,
    sample_routes,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _centres(b: int = 2, n: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, n, 3, generator=_gen(seed)) * 3.0


def _is_permutation(route: torch.Tensor) -> bool:
    return sorted(route.tolist()) == list(range(len(route)))


# ------------------------------------------------------------------------------ gap matrix


def test_gap_loss_is_zero_for_the_true_gaps_and_positive_otherwise() -> None:
    target = geometry.pairwise_gaps(_centres())
    loss, parts = gap_matrix_loss(target.clone(), target)
    assert loss < 1e-6 and parts["gap_mse"] < 1e-12
    pred = (target + 0.3 * torch.randn(target.shape, generator=_gen(1))).requires_grad_()
    loss, parts = gap_matrix_loss(pred, target, norm_weight=1.0)
    assert loss > 0.05 and parts["gap_norm_mse"] > 0
    loss.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_gap_loss_ignores_the_diagonal_and_weights_the_norm_term() -> None:
    target = geometry.pairwise_gaps(_centres())
    pred = target.clone()
    pred[:, range(5), range(5)] = 7.0  # the diagonal is not a pair
    assert gap_matrix_loss(pred, target)[0] < 1e-6
    pred = -target  # right norms, wrong directions: only the per-axis term is non-zero
    loss0, parts = gap_matrix_loss(pred, target, norm_weight=0.0)
    loss1, _ = gap_matrix_loss(pred, target, norm_weight=5.0)
    assert parts["gap_norm_mse"] < 1e-6 and torch.allclose(loss0, loss1)


# ------------------------------------------------------------------------- adjacent / distant


def test_adjacency_loss_pairs_facing_sub_regions() -> None:
    b, n, f = 2, 4, 6
    adj = torch.randn(b, n, n, f, generator=_gen(0))
    dist = torch.randn(b, n, n, f, generator=_gen(1))
    # Perfect: the sub-regions facing each other agree, the distant ones are opposite.
    loss, parts = adjacency_loss(adj, dist, adj.transpose(1, 2), -dist.transpose(1, 2))
    assert torch.allclose(loss, torch.tensor(-2.0), atol=1e-5)
    assert torch.allclose(parts["cos_adjacent"], torch.tensor(1.0), atol=1e-5)
    # Features that cannot tell adjacent from distant score zero.
    same = adjacency_loss(adj, adj, adj.transpose(1, 2), adj.transpose(1, 2))[0]
    assert abs(float(same)) < 1e-6
    # Pairing without the transpose is a different (worse) match.
    assert adjacency_loss(adj, dist, adj, -dist)[0] > loss


def test_region_grid_shifts_towards_and_away_from_the_partner() -> None:
    """Two 8^3 views at 1 mm, the second 20 mm along +x: view 0's adjacent sub-region sits a
    quarter of the view (2 mm = 2 voxels) towards +x, its distant one 2 voxels towards -x."""
    a0 = np.eye(4)
    a1 = geometry.crop_affine(a0, [20, 0, 0])
    affines = torch.as_tensor(np.stack([a0, a1]))[None]
    grid = region_grid(affines, (8, 8, 8), shift=0.25, size=0.5)  # [1, 2, 2, 2, 8, 3]
    assert grid.shape == (1, 2, 2, 2, 8, 3)
    centre_adj = grid[0, 0, 0, 1].mean(0)  # view 0, adjacent, partner 1 (order k, j, i)
    centre_dist = grid[0, 0, 1, 1].mean(0)
    # Voxel 3.5 + 2 = 5.5 -> (2 * 5.5 + 1) / 8 - 1 = 0.5.
    assert torch.allclose(centre_adj, torch.tensor([0.0, 0.0, 0.5], dtype=grid.dtype))
    assert torch.allclose(centre_dist, torch.tensor([0.0, 0.0, -0.5], dtype=grid.dtype))
    # View 1 faces back: its adjacent sub-region towards view 0 is on its -x side.
    assert torch.allclose(grid[0, 1, 0, 0].mean(0)[2], torch.tensor(-0.5, dtype=grid.dtype))
    # The sub-box spans half the view: octant centres 2 voxels apart (0.5 in grid units).
    assert torch.allclose(grid[0, 0, 0, 1, :, 2].unique(), torch.tensor([0.25, 0.75]).double())


def test_region_features_reads_the_map_where_the_grid_points() -> None:
    """A feature map equal to its own x grid coordinate returns the sub-region centre."""
    a0 = np.eye(4)
    affines = torch.as_tensor(np.stack([a0, geometry.crop_affine(a0, [20, 0, 0])]))[None]
    grid = region_grid(affines, (8, 8, 8)).float()
    ramp = ((2 * torch.arange(8.0) + 1) / 8 - 1).view(1, 1, 8, 1, 1).expand(2, 1, 8, 8, 8)
    adj, dist = region_features(ramp.contiguous(), grid)  # [1, 2, 2, 1]
    assert torch.allclose(adj[0, 0, 1, 0], torch.tensor(0.5), atol=1e-6)
    assert torch.allclose(dist[0, 0, 1, 0], torch.tensor(-0.5), atol=1e-6)


# ---------------------------------------------------------------------- location and routes


def test_location_loss_is_zero_for_true_locations_up_to_a_shift() -> None:
    c = _centres()
    target = geometry.pairwise_gaps(c)
    assert location_loss(c + torch.tensor([4.0, -2.0, 9.0]), target) < 1e-7
    assert location_loss(torch.zeros_like(c), target) > 0.1


def test_routes_enumerated_for_small_n_and_sampled_for_large_n() -> None:
    r4 = enumerate_routes(4)
    assert r4.shape == (6, 4) and (r4[:, 0] == 0).all()
    assert len({tuple(r) for r in r4.tolist()}) == 6 and all(_is_permutation(r) for r in r4)
    assert route_set(5).shape == (24, 5)  # (5-1)! routes, every one
    r = sample_routes(16, 24, generator=_gen(0))
    assert r.shape == (24, 16) and (r[:, 0] == 0).all() and all(_is_permutation(x) for x in r)
    assert route_set(16, enumerate_max=5, num_routes=24).shape == (24, 16)
    assert route_set(6, enumerate_max=6).shape == (math.factorial(5), 6)


def test_route_sums_on_a_hand_made_four_view_example() -> None:
    c = torch.tensor([[[0.0, 0, 0], [10, 0, 0], [10, 5, 0], [0, 5, 2]]])
    gaps = geometry.pairwise_gaps(c)
    routes = torch.tensor([[0, 2, 1, 3], [0, 1, 2, 3]])
    sums = route_sums(gaps, routes)
    assert sums.shape == (1, 2, 3, 3)
    # Route 0 -> 2 -> 1 -> 3: gaps (10,5,0), (0,-5,0), (-10,5,2), cumulated.
    expected0 = torch.tensor([[10.0, 5, 0], [10, 0, 0], [0, 5, 2]])
    expected1 = torch.tensor([[10.0, 0, 0], [10, 5, 0], [0, 5, 2]])
    assert torch.equal(sums[0, 0], expected0) and torch.equal(sums[0, 1], expected1)
    # True route sums are the positions relative to the start.
    assert torch.equal(sums[0, :, -1], (c[0, 3] - c[0, 0]).expand(2, 3))


def test_route_loss_zero_for_true_gaps_and_catches_inconsistent_ones() -> None:
    c = _centres(n=6)
    target = geometry.pairwise_gaps(c)
    routes = route_set(6, enumerate_max=6)
    assert route_loss(target.clone(), target, routes) < 1e-7
    # A constant error on every gap compounds along a route: the route loss sees it.
    off = target + 0.5
    assert route_loss(off, target, routes) > F.smooth_l1_loss(off, target)


# ------------------------------------------------------------------------------ heads, EMA


def test_gap_head_equals_the_direct_conv_of_the_difference() -> None:
    torch.manual_seed(0)
    head = GapHead(channels=6, hidden=5, spatial_dims=3)
    a = torch.randn(2 * 3, 6, 2, 2, 2)
    b = torch.randn(2 * 3, 6, 2, 2, 2)
    out = head(a, b, num_views=3)
    a5, b5 = a.reshape(2, 3, 6, 2, 2, 2), b.reshape(2, 3, 6, 2, 2, 2)
    ref = torch.empty(2, 3, 3, 3)
    for i in range(3):
        for j in range(3):
            h = head.conv(b5[:, j] - a5[:, i]) + head.bias.view(1, -1, 1, 1, 1)
            ref[:, i, j] = head.out(F.gelu(h).flatten(2).mean(-1))
    assert torch.allclose(out, ref, atol=1e-5)


def _small(**params):
    torch.manual_seed(0)
    enc = build_encoder(EncoderSpec("small_cnn", 3, 1, 8, {"channels": [4, 8]}))
    cfg = {"name": "spatial_aware", "num_views": 4, "crop_size": 8, "head_hidden": 8, **params}
    obj = get_objective("spatial_aware")(objective_config(cfg), enc)
    origins = torch.randint(0, 30, (2, 4, 3), generator=_gen(3)).double()
    affine = torch.eye(4, dtype=torch.float64).repeat(2, 4, 1, 1)
    affine[..., :3, 3] = origins
    batch = {"image": torch.randn(2, 4, 1, 8, 8, 8, generator=_gen(2)), "affine": affine}
    return enc, obj, batch


def test_objective_trains_online_only_and_ema_follows() -> None:
    enc, obj, batch = _small()
    out = obj(enc, batch)
    assert torch.isfinite(out["loss"])
    for key in ("gap_error_mm", "route", "adjacency", "location", "location_error_mm"):
        assert key in out and out[key].ndim == 0
    out["loss"].backward()
    assert all(p.grad is None for p in obj.ema.parameters())
    assert all(not p.requires_grad for p in obj.ema.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(1.0)
    before = [p.clone() for p in obj.ema.parameters()]
    obj.on_after_step(enc, 0, 100)  # momentum 0.99 at step 0
    for b, e, o in zip(before, obj.ema.parameters(), enc.parameters(), strict=True):
        assert torch.allclose(e, 0.99 * b + 0.01 * o, atol=1e-6)


def test_ema_schedule_and_update() -> None:
    assert ema_momentum(0, 100, 0.99, 1.0) == pytest.approx(0.99)
    assert ema_momentum(50, 100, 0.99, 1.0) == pytest.approx(0.995)
    assert ema_momentum(100, 100, 0.99, 1.0) == pytest.approx(1.0)
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    ema_update(a, b, 0.0)
    assert torch.equal(a.weight, b.weight)


def test_sub_tasks_switch_off() -> None:
    enc, obj, batch = _small(adjacency_weight=0, route_weight=0)
    out = obj(enc, batch)
    assert "adjacency" not in out and "route" not in out and "gap_mse" in out
    enc, obj, batch = _small(gap_weight=0, route_weight=0, adjacency_weight=0)
    out = obj(enc, batch)
    assert set(out) == {"loss", "location", "location_error_mm"}
    with pytest.raises(ConfigError, match="every sub-task weight is 0"):
        objective_config(
            {
                "name": "spatial_aware",
                "gap_weight": 0,
                "adjacency_weight": 0,
                "location_weight": 0,
                "route_weight": 0,
            }
        )
    with pytest.raises(ConfigError, match="region_level"):
        _small(region_level=5)


def test_predictions_are_in_mm() -> None:
    enc, obj, batch = _small(gap_scale=10.0)
    pred = obj.predict(enc, batch["image"])
    assert pred["gaps_mm"].shape == (2, 4, 4, 3) and pred["locations_mm"].shape == (2, 4, 3)
    obj.config.gap_scale = 20.0
    assert torch.allclose(obj.predict(enc, batch["image"])["gaps_mm"], 2 * pred["gaps_mm"])
