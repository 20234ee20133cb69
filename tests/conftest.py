"""Shared fixtures: tiny synthetic volumes, written as NIfTI files, indexed and cached."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

os.environ.setdefault("PYTHONHASHSEED", "0")


def smooth_volume(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """A positive volume where every position looks different (sum of random Gaussians)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
    out = np.zeros(shape)
    for _ in range(12):
        c = rng.uniform(0, np.asarray(shape))
        s = rng.uniform(2, 6)
        out += rng.uniform(0.3, 1.0) * np.exp(-((grid - c) ** 2).sum(-1) / (2 * s * s))
    return (out + 0.05).astype(np.float32)


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six subjects of 24^3 voxels (1.5-2 mm, mixed orientations), two modalities each."""
    root = tmp_path_factory.mktemp("scans")
    for i in range(6):
        spacing = [1.5 + 0.1 * i, 2.0, 1.8]
        aff = np.diag([*spacing, 1.0])
        if i % 2:
            aff[0, 0] *= -1  # LAS-oriented file: the reader must honour it
        aff[:3, 3] = [-20.0 + i, -25.0, -18.0]
        arr = smooth_volume((24, 24, 24), seed=i)
        write_nifti(root / f"sub-{i:02d}_T1w.nii.gz", arr, aff)
        write_nifti(root / f"sub-{i:02d}_T2w.nii.gz", (arr.max() - arr).astype(np.float32), aff)
        labels = (arr > np.median(arr)).astype(np.uint8)
        write_nifti(root / f"sub-{i:02d}_tissue_dseg.nii.gz", labels, aff)
    return root


@pytest.fixture(scope="session")
def tiny_cache(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from anatomap.data.cache import build_cache
    from anatomap.data.manifest import index_directory, write_manifest

    out = tmp_path_factory.mktemp("cache")
    result = index_directory(tiny_dataset)
    assert not result.problems, result.problems
    write_manifest(result, out / "manifest.jsonl")
    build_cache(out / "manifest.jsonl", out / "cache", preset="mri", spacing=2.0, progress=False)
    return out / "cache"
