"""Geometry checked against brute force (hypothesis property tests)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.ndimage import map_coordinates
from scipy.spatial.transform import Rotation

from anatomap import geometry as g
from anatomap.data.cache import CachedSubject
from anatomap.data.sampler import cut_view

SETTINGS = settings(max_examples=40, deadline=None)


def random_affine(seed: int, shear: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lin = Rotation.random(random_state=seed).as_matrix() @ np.diag(rng.uniform(0.5, 3.0, 3))
    if shear:
        lin = lin @ np.array([[1, rng.uniform(-0.3, 0.3), 0], [0, 1, 0], [0, 0, 1]])
    a = np.eye(4)
    a[:3, :3] = lin
    a[:3, 3] = rng.uniform(-100, 100, 3)
    return a


class _Subject(CachedSubject):
    """A CachedSubject over an in-memory array (no files)."""

    def __init__(self, image: np.ndarray, affine: np.ndarray) -> None:
        super().__init__(
            root=None,
            meta={
                "subject": "x",
                "affine": affine.tolist(),
                "shape": list(image.shape[1:]),
                "present": [True],
            },
        )
        self._image = image


@SETTINGS
@given(seed=st.integers(0, 10_000), shear=st.booleans())
def test_voxel_world_round_trip(seed: int, shear: bool) -> None:
    a = random_affine(seed, shear)
    ijk = np.random.default_rng(seed).uniform(-10, 50, (20, 3))
    assert np.allclose(g.world_to_voxel(a, g.voxel_to_world(a, ijk)), ijk, atol=1e-9)
    t = torch.as_tensor(a)
    assert torch.allclose(
        g.voxel_to_world(t, torch.as_tensor(ijk)), torch.as_tensor(g.voxel_to_world(a, ijk))
    )


@SETTINGS
@given(
    seed=st.integers(0, 10_000),
    shape=st.tuples(*[st.integers(4, 12)] * 3),
    start=st.tuples(*[st.integers(-6, 10)] * 3),
    size=st.tuples(*[st.integers(1, 8)] * 3),
)
def test_crop_keeps_every_voxel_world_position(seed, shape, start, size) -> None:
    """Every crop voxel maps to the same world point, and holds the same value, as its source."""
    a = random_affine(seed, shear=True)
    img = np.random.default_rng(seed).normal(size=(1, *shape)).astype(np.float32)
    size_a = np.asarray(size)
    centre = np.asarray(start) + (size_a - 1) / 2.0
    view, view_aff = cut_view(_Subject(img, a), centre, size_a, size_a, pad=-7.0)
    for c in np.ndindex(*size):
        src = np.asarray(c) + np.asarray(start)
        assert np.allclose(
            g.voxel_to_world(view_aff, np.asarray(c, float)),
            g.voxel_to_world(a, src.astype(float)),
            atol=1e-9,
        )
        inside = np.all(src >= 0) and np.all(src < np.asarray(shape))
        expected = img[(0, *src)] if inside else -7.0
        assert view[(0, *c)] == pytest.approx(expected)


@SETTINGS
@given(seed=st.integers(0, 10_000), scale=st.sampled_from([0.5, 0.75, 1.5, 2.0]))
def test_resized_view_samples_the_world_where_its_affine_says(seed: int, scale: float) -> None:
    """A scale-jittered (resampled) view equals trilinear sampling at its voxels' world points."""
    a = random_affine(seed)
    img = np.random.default_rng(seed).normal(size=(1, 20, 20, 20)).astype(np.float32)
    out_shape = np.array([6, 6, 6])
    src_shape = np.round(out_shape * scale).astype(int)
    centre = np.array([10.0, 9.0, 10.0])
    view, aff = cut_view(_Subject(img, a), centre, src_shape, out_shape, pad=0.0)
    world = g.world_grid(aff, tuple(out_shape)).reshape(-1, 3)
    src_idx = g.world_to_voxel(a, world)
    # Only check points whose trilinear support lies inside the source and the crop box.
    start = np.round(centre - (src_shape - 1) / 2.0)
    ok = np.all((src_idx >= start) & (src_idx <= start + src_shape - 1), axis=1)
    ref = map_coordinates(img[0].astype(np.float64), src_idx.T, order=1)
    assert ok.sum() >= 8
    assert np.allclose(view.reshape(-1)[ok], ref[ok], atol=1e-4)
    centres_view = g.box_center(aff, tuple(out_shape))
    centres_src = g.box_center(g.crop_affine(a, start), tuple(src_shape))
    assert np.allclose(centres_view, centres_src, atol=1e-9)


@SETTINGS
@given(seed=st.integers(0, 10_000), n=st.integers(2, 9))
def test_pairwise_distances_and_gaps_match_brute_force(seed: int, n: int) -> None:
    p = np.random.default_rng(seed).normal(size=(n, 3)) * 50
    d = g.pairwise_distances(p)
    gaps = g.pairwise_gaps(p)
    for i in range(n):
        for j in range(n):
            assert d[i, j] == pytest.approx(np.linalg.norm(p[i] - p[j]))
            assert np.allclose(gaps[i, j], p[j] - p[i])
    dt = g.pairwise_distances(torch.as_tensor(p))
    assert np.allclose(dt.numpy(), d)


@SETTINGS
@given(
    seed=st.integers(0, 10_000),
    sa=st.tuples(*[st.integers(2, 8)] * 3),
    sb=st.tuples(*[st.integers(2, 8)] * 3),
    off=st.tuples(*[st.integers(-8, 8)] * 3),
)
def test_overlap_fraction_matches_voxel_count(seed, sa, sb, off) -> None:
    """For world-axis-aligned boxes, the overlap equals the fraction of shared voxels."""
    rng = np.random.default_rng(seed)
    a = np.diag([*rng.uniform(0.5, 2.5, 3), 1.0])
    a[:3, 3] = rng.uniform(-50, 50, 3)
    box_b = g.crop_affine(a, off)
    frac = g.overlap_fraction(a, sa, box_b, sb)
    inter = np.prod(np.clip(np.minimum(sa, np.asarray(off) + sb) - np.maximum(0, off), 0, None))
    assert frac == pytest.approx(inter / np.prod(sa))


def test_box_center_and_world_grid_agree() -> None:
    a = random_affine(3, shear=True)
    grid = g.world_grid(a, (4, 6, 8))
    assert np.allclose(grid.reshape(-1, 3).mean(0), g.box_center(a, (4, 6, 8)))
    assert np.allclose(grid[1, 2, 3], g.voxel_to_world(a, np.array([1.0, 2.0, 3.0])))


def test_spacing_and_orientation_codes() -> None:
    a = np.diag([-1.5, -2.0, 3.0, 1.0])
    assert np.allclose(g.spacing(a), [1.5, 2.0, 3.0])
    assert g.orientation_codes(a) == "LPS"
    assert np.allclose(g.LPS_TO_RAS @ g.LPS_TO_RAS, np.eye(4))


@SETTINGS
@given(seed=st.integers(0, 10_000), codes=st.sampled_from(["RAS", "LPS", "LAS", "PIR", "SAL"]))
def test_reorient_keeps_world_positions(seed: int, codes: str) -> None:
    a = random_affine(seed)
    x = np.random.default_rng(seed).normal(size=(5, 6, 7))
    y, b = g.reorient(x, a, codes)
    assert g.orientation_codes(b) == codes
    for idx in [(0, 0, 0), (4, 5, 6), (2, 3, 1)]:
        w = g.voxel_to_world(a, np.asarray(idx, float))
        j = np.round(g.world_to_voxel(b, w)).astype(int)
        assert np.allclose(g.voxel_to_world(b, j.astype(float)), w, atol=1e-6)
        assert y[tuple(j)] == x[idx]
