"""ISImed's pure loss (Jabareen et al. 2024) as a tensor function."""

from __future__ import annotations

import torch

from anatomap.objectives.isimed import gaussian_kl, isimed_loss


def _centres(b: int = 2, n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, n, 3, generator=torch.Generator().manual_seed(seed)) * 30.0


def test_zero_when_embeddings_are_scaled_positions() -> None:
    c = _centres()
    emb = torch.cat([c / 10.0, torch.zeros(2, 6, 5)], -1)  # padded with zero dims
    loss, parts = isimed_loss(emb, c, distance_scale=10.0, kl_weight=0.0)
    assert parts["distance_mse"] < 1e-6
    assert loss < 1e-6


def test_any_rigid_motion_of_the_embedding_is_equally_good() -> None:
    c = _centres()
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(1)))
    emb = c / 10.0 @ q.T + 5.0
    assert isimed_loss(emb, c, 10.0, 0.0)[0] < 1e-6


def test_wrong_embedding_costs_more_and_has_gradient() -> None:
    c = _centres()
    emb = torch.randn(2, 6, 8, requires_grad=True)
    loss, _ = isimed_loss(emb, c, 10.0, 0.005)
    assert loss > 0.1
    loss.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0


def test_symmetric_in_crop_order() -> None:
    c = _centres(seed=3)
    emb = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(4))
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    a = isimed_loss(emb, c)[0]
    b = isimed_loss(emb[:, perm], c[:, perm])[0]
    assert torch.allclose(a, b, atol=1e-6)


def test_identical_crops_give_finite_gradient() -> None:
    """Two crops at the same place: the sqrt at distance zero must not produce NaN."""
    c = torch.zeros(1, 3, 3)
    emb = torch.zeros(1, 3, 4, requires_grad=True)
    isimed_loss(emb, c)[0].backward()
    assert torch.isfinite(emb.grad).all()


def test_kl_is_zero_for_standard_normal_moments_and_positive_otherwise() -> None:
    x = torch.randn(20000, 4, generator=torch.Generator().manual_seed(0))
    assert gaussian_kl(x) < 1e-3
    assert gaussian_kl(x * 3 + 2) > 1.0
