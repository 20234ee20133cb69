"""The located-view sampler: shapes, geometry, constraints, determinism across workers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from anatomap import geometry
from anatomap.data.cache import Cache
from anatomap.data.sampler import EpochSampler, LocatedViewDataset, ViewSpec, sample_views
from anatomap.errors import ConfigError


def test_batch_contract(tiny_cache: Path) -> None:
    cache = Cache(tiny_cache)
    ds = LocatedViewDataset(cache, cache.subjects, ViewSpec(3, (8, 10, 12)), 4)
    batch = next(iter(DataLoader(ds, batch_size=2, sampler=EpochSampler(len(ds)))))
    assert batch["image"].shape == (2, 3, 2, 8, 10, 12)  # [B, V, C, *S]
    assert batch["affine"].shape == (2, 3, 4, 4) and batch["affine"].dtype == torch.float64
    assert batch["modality_mask"].shape == (2, 2) and batch["modality_mask"].all()
    assert len(batch["subject"]) == 2


def test_views_are_where_their_affines_say(tiny_cache: Path) -> None:
    """A view's voxel holds the cached value at the same world point."""
    cache = Cache(tiny_cache)
    subject = cache[cache.subjects[0]]
    images, affines = sample_views(subject, ViewSpec(4, (6, 6, 6)), np.random.default_rng(0))
    for img, aff in zip(images, affines, strict=True):
        for idx in [(0, 0, 0), (5, 5, 5), (2, 3, 4)]:
            world = geometry.voxel_to_world(aff, np.asarray(idx, float))
            src = np.round(geometry.world_to_voxel(subject.affine, world)).astype(int)
            if np.all(src >= 0) and np.all(src < subject.shape):
                assert img[(0, *idx)] == pytest.approx(float(subject.image[(0, *src)]))


def test_foreground_centres(tiny_cache: Path) -> None:
    cache = Cache(tiny_cache)
    subject = cache[cache.subjects[1]]
    fg = {tuple(p) for p in subject.foreground}
    spec = ViewSpec(20, (5, 5, 5), foreground=True)
    _, affines = sample_views(subject, spec, np.random.default_rng(1))
    centres = geometry.world_to_voxel(subject.affine, geometry.box_center(affines, (5, 5, 5)))
    assert all(tuple(np.round(c).astype(int)) in fg for c in centres)


@pytest.mark.parametrize(("lo", "hi"), [(0.3, 0.6), (0.7, 1.0)])
def test_overlap_constraints_hold(tiny_cache: Path, lo: float, hi: float) -> None:
    cache = Cache(tiny_cache)
    subject = cache[cache.subjects[2]]
    spec = ViewSpec(2, (8, 8, 8), min_overlap=lo, max_overlap=hi, max_tries=200)
    for seed in range(10):
        _, aff = sample_views(subject, spec, np.random.default_rng(seed))
        ov = geometry.overlap_fraction(aff[0], (8, 8, 8), aff[1], (8, 8, 8))
        assert lo - 1e-9 <= ov <= hi + 1e-9


def test_scale_jitter_changes_physical_size(tiny_cache: Path) -> None:
    cache = Cache(tiny_cache)
    subject = cache[cache.subjects[0]]
    _, aff = sample_views(
        subject, ViewSpec(8, (8, 8, 8), scale=(0.5, 2.0)), np.random.default_rng(2)
    )
    spacings = geometry.spacing(aff)
    base = geometry.spacing(subject.affine)
    ratios = spacings / base
    assert ratios.min() < 0.9 and ratios.max() > 1.1
    assert np.all((ratios > 0.45) & (ratios < 2.2))


def test_2d_views_are_slices(tiny_cache: Path) -> None:
    cache = Cache(tiny_cache)
    images, affines = sample_views(
        cache[cache.subjects[0]], ViewSpec(2, (10, 12)), np.random.default_rng(0)
    )
    assert images.shape == (2, 2, 10, 12) and affines.shape == (2, 4, 4)


def test_same_seed_same_sample_and_workers_do_not_repeat(tiny_cache: Path) -> None:
    cache = Cache(tiny_cache)
    spec = ViewSpec(2, (6, 6, 6))
    ds = LocatedViewDataset(cache, cache.subjects, spec, 8, seed=5)
    a, b = ds[3], ds[3]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["affine"], b["affine"])

    def collect(workers: int, epoch: int) -> list[torch.Tensor]:
        sampler = EpochSampler(len(ds))
        sampler.set_epoch(epoch)
        loader = DataLoader(ds, batch_size=1, sampler=sampler, num_workers=workers)
        return [x["affine"][0] for x in loader]

    serial, parallel = collect(0, 0), collect(2, 0)
    assert all(torch.equal(x, y) for x, y in zip(serial, parallel, strict=True))
    flat = {tuple(x.flatten().tolist()) for x in parallel}
    assert len(flat) == len(parallel), "two samples drew the same random views"
    next_epoch = collect(2, 1)
    assert not all(torch.equal(x, y) for x, y in zip(parallel, next_epoch, strict=True))


def test_bad_specs_and_subjects(tiny_cache: Path) -> None:
    with pytest.raises(ConfigError, match="num_views"):
        ViewSpec(0)
    with pytest.raises(ConfigError, match="size"):
        ViewSpec(2, (8, -1, 8))
    with pytest.raises(ConfigError, match="scale"):
        ViewSpec(2, scale=(2.0, 1.0))
    cache = Cache(tiny_cache)
    with pytest.raises(ConfigError, match="not in cache"):
        LocatedViewDataset(cache, ["nobody"], ViewSpec(), 4)
    with pytest.raises(ConfigError, match="no subjects"):
        LocatedViewDataset(cache, [], ViewSpec(), 4)
