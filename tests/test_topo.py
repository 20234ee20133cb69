"""The topo objective's pure loss pieces on hand-made examples (anatomap.objectives.topo)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from anatomap import geometry
from anatomap.geometry import sample_map
from anatomap.objectives.topo import (
    cross_modal_targets,
    modality_subsets,
    mutual_matches,
    neighbour_order_loss,
    neighbourhood_targets,
    triplet_margin,
)


def _position_code(world: torch.Tensor, scale: float = 8.0) -> torch.Tensor:
    """A 'good' embedding: unit vectors that vary smoothly and injectively with position."""
    w = world.float() / scale
    return F.normalize(
        torch.cat([torch.sin(w), torch.cos(w), torch.ones_like(w[:, :1])], -1), dim=-1
    )


def _map_from_code(affine: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    world = geometry.world_grid(affine, shape).reshape(-1, 3)
    return _position_code(world).T.reshape(-1, *shape)


def _affine(shift: tuple[float, float, float], spacing: float = 4.0) -> torch.Tensor:
    a = torch.eye(4, dtype=torch.float64)
    a[:3, :3] *= spacing
    a[:3, 3] = torch.tensor(shift, dtype=torch.float64)
    return a


def test_triplet_selects_the_same_world_position() -> None:
    """View B is shifted by 2 voxels: every anchor's positive is B's voxel at the same mm."""
    shape = (6, 6, 6)
    aff_a, aff_b = _affine((0.0, 0.0, 0.0)), _affine((8.0, 0.0, -4.0))
    world_a = geometry.world_grid(aff_a, shape).reshape(-1, 3)
    tg = cross_modal_targets(world_a, aff_b, shape, negative_mm=6.0)
    # inside B exactly where A's voxel index minus the shift is within the grid
    ijk_a = torch.stack(
        torch.meshgrid(*[torch.arange(n) for n in shape], indexing="ij"), -1
    ).reshape(-1, 3)
    expect_ijk = (ijk_a - torch.tensor([2, 0, -1])).double()
    torch.testing.assert_close(tg.positive_ijk, expect_ijk)
    expect_valid = ((expect_ijk >= 0) & (expect_ijk <= 5)).all(-1)
    assert torch.equal(tg.valid, expect_valid) and 0 < int(tg.valid.sum()) < len(tg.valid)
    # the sampled positive is B's embedding of the very same world point
    map_b = _map_from_code(aff_b, shape)
    pos = sample_map(map_b, tg.positive_ijk[tg.valid])
    torch.testing.assert_close(pos, _position_code(world_a[tg.valid]), atol=1e-5, rtol=0)
    # negatives: exactly the B voxels farther than 6 mm from the anchor
    d = np.linalg.norm(world_a.numpy()[:, None] - tg.candidate_mm.numpy()[None], axis=-1)
    assert np.array_equal(tg.negative_mask.numpy(), d > 6.0)
    assert (
        not tg.negative_mask[tg.valid]
        .gather(
            1,
            torch.tensor([int(i[0] * 36 + i[1] * 6 + i[2]) for i in expect_ijk[tg.valid].long()])[
                :, None
            ],
        )
        .any()
    )  # the positive voxel is never a negative


def test_triplet_margin_good_beats_collapsed_and_wrong_positives() -> None:
    shape = (6, 6, 6)
    aff_a, aff_b = _affine((0.0, 0.0, 0.0)), _affine((4.0, 4.0, 0.0))
    world_a = geometry.world_grid(aff_a, shape).reshape(-1, 3)
    tg = cross_modal_targets(world_a, aff_b, shape, negative_mm=8.0)
    keep = tg.valid
    map_b = _map_from_code(aff_b, shape)
    cand = map_b.flatten(1).T
    anchors = _position_code(world_a[keep])
    positives = sample_map(map_b, tg.positive_ijk[keep])
    good = triplet_margin(anchors, positives, cand, tg.negative_mask[keep], margin=0.05)
    ones = torch.ones_like(anchors)
    collapsed = triplet_margin(ones, ones, torch.ones_like(cand), tg.negative_mask[keep], 0.05)
    wrong = triplet_margin(
        anchors, positives.roll(7, 0), cand, tg.negative_mask[keep], margin=0.05
    )  # positives of other anchors
    assert float(good) < 1e-3
    assert float(collapsed) > float(good) + 0.04  # the full margin
    assert float(wrong) > float(good) + 0.01
    # the reference: relu(d(a,p) - d(a,n) + m) averaged over each anchor's hardest negatives
    a, p, n = anchors[:3], positives[:3], cand
    mask = tg.negative_mask[keep][:3]
    ref = []
    for i in range(3):
        dn = 1 - n[mask[i]] @ a[i]
        dn = torch.sort(dn).values[:4]
        ref.append(torch.relu(1 - a[i] @ p[i] - dn + 0.5).mean())
    got = triplet_margin(a, p, n, mask, margin=0.5, hardest=4)
    torch.testing.assert_close(got, torch.stack(ref).mean(), atol=1e-5, rtol=1e-5)


def test_neighbour_order_prefers_order_preserving_embeddings() -> None:
    rng = np.random.default_rng(0)
    anchor_mm = torch.tensor(rng.uniform(-10, 10, (20, 3)))
    cand_mm = torch.tensor(rng.uniform(-16, 16, (200, 3)))
    dist = geometry.cross_distances(anchor_mm, cand_mm).float()
    good_a, good_c = _position_code(anchor_mm, 20.0), _position_code(cand_mm, 20.0)
    gen = torch.Generator().manual_seed(0)
    kw = {"radius_mm": 12.0, "gap_mm": 2.0, "margin": 0.01, "neighbours": 12}
    good = neighbour_order_loss(good_a, good_c, dist, generator=gen, **kw)
    gen = torch.Generator().manual_seed(0)
    collapsed = neighbour_order_loss(
        torch.ones_like(good_a), torch.ones_like(good_c), dist, generator=gen, **kw
    )
    gen = torch.Generator().manual_seed(0)
    shuffled = neighbour_order_loss(good_a, good_c[torch.randperm(200)], dist, generator=gen, **kw)
    assert float(good) < float(collapsed) and float(good) < float(shuffled)
    assert float(collapsed) > 0  # equal distances violate every required gap
    # no pair within the radius: zero, with a graph
    far = neighbour_order_loss(good_a.requires_grad_(), good_c, dist + 100.0, radius_mm=12.0)
    assert float(far.detach()) == 0.0 and far.requires_grad


def test_mutual_matches_threshold_and_gate() -> None:
    a = torch.eye(4)[:3]  # three distinct directions
    b = torch.stack([torch.eye(4)[1], torch.eye(4)[0], torch.eye(4)[3], torch.eye(4)[0] * 0.5])
    ia, ib, s = mutual_matches(a, b, threshold=0.9)
    # a0 <-> b1 (b3 is as similar but b1 comes first), a1 <-> b0; a2 has no partner above 0.9
    assert ia.tolist() == [0, 1] and ib.tolist() == [1, 0]
    assert torch.allclose(s, torch.ones(2))
    allowed = torch.ones(3, 4, dtype=torch.bool)
    allowed[1, 0] = False  # the shared-frame gate forbids a1 <-> b0
    ia, ib, _ = mutual_matches(a, b, threshold=0.9, allowed=allowed)
    assert ia.tolist() == [0] and ib.tolist() == [1]
    # a collapsed embedding has no *mutual* structure beyond one pair
    ia, _, _ = mutual_matches(torch.ones(5, 4), torch.ones(6, 4), threshold=0.5)
    assert len(ia) <= 1


def test_neighbourhood_targets_carry_offsets() -> None:
    world_a = torch.tensor([[0.0, 0, 0], [4, 0, 0], [0, 4, 0], [30, 0, 0]], dtype=torch.float64)
    match_a = torch.tensor([0])
    match_b = torch.tensor([[100.0, 50.0, 0.0]], dtype=torch.float64)
    src, target, k = neighbourhood_targets(world_a, match_a, match_b, radius_mm=5.0)
    assert src.tolist() == [0, 1, 2] and k.tolist() == [0, 0, 0]
    expect = torch.tensor([[100.0, 50, 0], [104, 50, 0], [100, 54, 0]], dtype=torch.float64)
    torch.testing.assert_close(target, expect)


def test_modality_subsets_are_disjoint_and_within_present() -> None:
    present = torch.tensor([[True, True, True], [True, False, True], [False, True, False]])
    gen = torch.Generator().manual_seed(3)
    seen_full = False
    for _ in range(50):
        a, b = modality_subsets(present, full_view_prob=0.3, generator=gen)
        assert torch.all(a <= present) and torch.all(b <= present)
        assert torch.all(a.any(1)) and torch.all(b.any(1))
        assert torch.equal(a[2], present[2]) and torch.equal(b[2], present[2])  # one modality
        for i in (0, 1):
            full = torch.equal(b[i], present[i])
            seen_full |= full
            if not full:
                assert not (a[i] & b[i]).any()  # cross-modal: disjoint sets
    assert seen_full
