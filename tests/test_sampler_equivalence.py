"""The optimised sampler cuts exactly what the straightforward one does (issue 8).

``_reference_sample_views`` is the sampler as it was before any optimisation (one
``np.full`` + slice copy per view, ``np.stack`` at the end, the same random draws in the
same order). Every spec below must give bit-identical crops and affines for the same seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anatomap import geometry
from anatomap.data.cache import Cache
from anatomap.data.sampler import IntensityAugment, LocatedViewDataset, ViewSpec, cut_view


def _reference_read_box(image, start, shape, pad):
    vol_shape = np.asarray(image.shape[1:])
    lo = np.maximum(start, 0)
    hi = np.minimum(start + shape, vol_shape)
    out = np.full((image.shape[0], *shape), pad, dtype=np.float32)
    if np.all(hi > lo):
        src = image[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        d0 = lo - start
        d1 = d0 + (hi - lo)
        out[:, d0[0] : d1[0], d0[1] : d1[1], d0[2] : d1[2]] = src
    return out


def _reference_cut_view(subject, centre, src_shape, out_shape, pad):
    start = np.round(centre - (src_shape - 1) / 2.0).astype(int)
    box = _reference_read_box(subject.image, start, src_shape, pad)
    affine = geometry.crop_affine(subject.affine, start)
    if np.any(src_shape != out_shape):
        t = torch.from_numpy(box)[None]
        box = F.interpolate(t, size=tuple(int(s) for s in out_shape), mode="trilinear")[0].numpy()
        affine = geometry.resized_affine(affine, src_shape, out_shape)
    return box, affine


def _reference_sample_views(subject, spec, rng):
    out_shape = np.asarray(spec.size if len(spec.size) == 3 else (*spec.size, 1), int)
    images, affines = [], []
    first = None
    constrained = spec.min_overlap is not None or spec.max_overlap is not None
    lo_ov = spec.min_overlap if spec.min_overlap is not None else 0.0
    hi_ov = spec.max_overlap if spec.max_overlap is not None else 1.0
    for v in range(spec.num_views):
        best = None
        tries = spec.max_tries if (constrained and v > 0) else 1
        for _ in range(tries):
            s = rng.uniform(*spec.scale, size=3)
            src_shape = np.maximum(np.round(out_shape * s).astype(int), 1)
            if len(spec.size) == 2:
                src_shape[2] = 1
            if constrained and first is not None:
                c0, shape0 = first
                reach = rng.uniform() * (shape0 + src_shape) / 2.0
                centre = c0 + rng.uniform(-1, 1, size=3) * reach
                centre = np.clip(centre, 0, np.asarray(subject.shape) - 1)
            else:
                fg = subject.foreground if spec.foreground else None
                if fg is not None and len(fg):
                    centre = fg[rng.integers(len(fg))].astype(np.float64)
                else:
                    centre = rng.uniform(0, np.asarray(subject.shape, np.float64) - 1)
            if not constrained or first is None:
                best = (centre, src_shape)
                break
            start0 = np.round(first[0] - (first[1] - 1) / 2.0)
            start = np.round(centre - (src_shape - 1) / 2.0)
            ov = geometry.overlap_fraction(
                geometry.crop_affine(subject.affine, start0),
                first[1],
                geometry.crop_affine(subject.affine, start),
                src_shape,
            )
            miss = max(lo_ov - ov, ov - hi_ov, 0.0)
            if best is None or miss < best[2]:
                best = (centre, src_shape, miss)
            if miss == 0.0:
                break
        centre, src_shape = best[0], best[1]
        if first is None:
            first = (centre, src_shape)
        img, aff = _reference_cut_view(subject, centre, src_shape, out_shape, spec.pad_value)
        if spec.intensity is not None:
            img = spec.intensity.apply(img, rng)
        if len(spec.size) == 2:
            img = img[..., 0]
        images.append(img)
        affines.append(aff)
    return np.stack(images), np.stack(affines)


SPECS = {
    # ISImed-like: many crops, foreground centres, no resampling.
    "isimed": ViewSpec(16, (8, 8, 8)),
    # Crops larger than the 12^3-ish volume: every view is padded on some side.
    "padded": ViewSpec(3, (16, 10, 20), foreground=False, pad_value=-2.5),
    # SAM-like: scale jitter (resampled views), overlap constraint, intensity augmentation.
    "sam": ViewSpec(
        2,
        (8, 8, 8),
        scale=(0.8, 1.2),
        min_overlap=0.25,
        max_tries=100,
        intensity=IntensityAugment(),
    ),
    # Spatial-Aware-like: both overlap bounds, several views.
    "bounded": ViewSpec(4, (6, 6, 6), min_overlap=0.1, max_overlap=0.6, foreground=False),
    # 2-D axial slices.
    "axial": ViewSpec(3, (10, 9), scale=(0.9, 1.3)),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_dataset_matches_reference(tiny_cache: Path, name: str) -> None:
    spec = SPECS[name]
    cache = Cache(tiny_cache)
    ds = LocatedViewDataset(cache, cache.subjects, spec, samples_per_epoch=9, seed=3)
    for index in (0, 4, 8, 9, 17, 31):  # two epochs and a bit
        sid, rng = ds.locate(index)
        ref_img, ref_aff = _reference_sample_views(cache[sid], spec, rng)
        got = ds[index]
        assert got["subject"] == sid
        assert got["image"].dtype == torch.float32 and got["affine"].dtype == torch.float64
        assert got["image"].shape == ref_img.shape
        np.testing.assert_array_equal(got["image"].numpy(), ref_img)
        np.testing.assert_array_equal(got["affine"].numpy(), ref_aff)


def test_cut_view_matches_reference_at_edges(tiny_cache: Path) -> None:
    subject = Cache(tiny_cache)[Cache(tiny_cache).subjects[0]]
    shape = np.asarray(subject.shape, float)
    rng = np.random.default_rng(0)
    for _ in range(20):
        centre = rng.uniform(-4, shape + 4)  # some boxes partly or fully outside
        src = rng.integers(1, 14, size=3)
        out = src if rng.uniform() < 0.5 else rng.integers(2, 10, size=3)
        ref = _reference_cut_view(subject, centre, src, out, -1.0)
        got = cut_view(subject, centre, src, out, -1.0)
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])
