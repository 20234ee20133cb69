"""The benchmark's baselines: SimCLR-style NT-Xent and VoCo-style overlap prediction."""

from __future__ import annotations

import numpy as np
import torch

from anatomap import geometry
from anatomap.objectives.simclr import nt_xent
from anatomap.objectives.voco import base_regulariser, cosine_matrix, overlap_prediction_loss


def test_nt_xent_prefers_matching_pairs() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, 16, generator=g)
    aligned = nt_xent(z, z + 0.01 * torch.randn(8, 16, generator=g))
    shuffled = nt_xent(z, z[torch.randperm(8, generator=g)])
    assert aligned < shuffled


def test_overlap_matrix_matches_pairwise_fraction() -> None:
    rng = np.random.default_rng(1)
    affines = np.stack([np.eye(4) for _ in range(5)])
    affines[:, :3, 3] = rng.uniform(-10, 10, (5, 3))
    affines[:, 0, 0] = 2.0
    m = geometry.overlap_matrix(affines, (8, 8, 8), affines, (8, 8, 8))
    for i in range(5):
        for j in range(5):
            ref = geometry.overlap_fraction(affines[i], (8, 8, 8), affines[j], (8, 8, 8))
            assert np.isclose(m[i, j], ref)
    assert np.allclose(np.diag(m), 1.0)


def test_voco_loss_is_zero_only_when_similarity_equals_overlap() -> None:
    overlap = torch.tensor([[0.0, 0.25, 0.75]])
    assert overlap_prediction_loss(overlap.clone(), overlap) < 1e-6
    assert overlap_prediction_loss(torch.tensor([[0.5, 0.5, 0.5]]), overlap) > 0.1
    # Negative cosines count as zero similarity (VoCo clamps the logits).
    assert overlap_prediction_loss(torch.tensor([[-0.9, 0.25, 0.75]]), overlap) < 1e-6


def test_base_regulariser_ignores_the_diagonal_and_targets_overlap() -> None:
    z = torch.eye(3)  # orthogonal bases: cosine 0 off the diagonal
    sim = cosine_matrix(z, z)
    assert base_regulariser(sim, torch.eye(3)) < 1e-6
    collapsed = cosine_matrix(torch.ones(3, 3), torch.ones(3, 3))
    assert base_regulariser(collapsed, torch.eye(3)) > 0.9
