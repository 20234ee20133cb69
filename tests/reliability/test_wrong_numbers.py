"""Silent wrong numbers: values the cache's dtype cannot hold, resampling that would explode,
spacings that are not finite positive numbers, and sliding-window options that give NaN
maps are refused, naming the file or the option, before anything is written."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from anatomap.data.cache import build_cache
from anatomap.data.manifest import index_directory
from anatomap.errors import AnatomapError


def _scan(path: Path, array: np.ndarray, spacing: float = 1.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([spacing] * 3 + [1.0])), path)
    return path


@pytest.fixture
def cohort(tmp_path: Path) -> Path:
    """sub-01: ordinary values; sub-02: uint16 up to 65535 (above float16's 65504)."""
    rng = np.random.default_rng(0)
    _scan(tmp_path / "d" / "sub-01_CT.nii.gz", (rng.random((10, 10, 10)) * 100).astype(np.int16))
    big = (rng.random((10, 10, 10)) * 1000).astype(np.uint16)
    big[2, 3, 4] = 65535
    _scan(tmp_path / "d" / "sub-02_CT.nii.gz", big)
    return tmp_path / "d"


def test_values_above_float16_with_preset_none_are_rejected_naming_the_file(
    cohort: Path, tmp_path: Path
) -> None:
    records = index_directory(cohort).subjects
    res = build_cache(records, tmp_path / "c", preset="none", spacing=None, progress=False)
    assert res.cache.subjects == ["sub-01"]
    (problem,) = res.problems
    assert problem["subject"] == "sub-02"
    assert "sub-02_CT.nii.gz" in problem["reason"] and "float16 range" in problem["reason"]
    image = np.load(tmp_path / "c" / "subjects" / "sub-01" / "image.npy")
    assert np.isfinite(image).all()


def test_the_same_values_are_stored_exactly_in_a_float32_cache(
    cohort: Path, tmp_path: Path
) -> None:
    records = index_directory(cohort).subjects
    res = build_cache(
        records, tmp_path / "c", preset="none", spacing=None, dtype="float32", progress=False
    )
    assert not res.problems
    image = np.load(tmp_path / "c" / "subjects" / "sub-02" / "image.npy")
    assert image.max() == 65535


@pytest.mark.parametrize("spacing", [0, -1.0, float("nan"), float("inf"), "abc"])
def test_bad_spacing_is_refused_before_any_subject(
    cohort: Path, tmp_path: Path, spacing: object
) -> None:
    records = index_directory(cohort).subjects
    with pytest.raises(AnatomapError, match=r"spacing .*: must be"):
        build_cache(records, tmp_path / "c", spacing=spacing, progress=False)  # type: ignore[arg-type]
    assert not (tmp_path / "c" / "subjects").exists()


def test_resampling_that_would_explode_is_refused_per_subject(cohort: Path, tmp_path: Path) -> None:
    records = index_directory(cohort).subjects
    res = build_cache(records, tmp_path / "c", spacing=0.001, progress=False)
    assert len(res.problems) == 2 and res.cache.subjects == []
    assert all("more than the limit" in p["reason"] for p in res.problems)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"overlap": -1}, "overlap -1"),
        ({"overlap": 1.0}, "overlap 1.0"),
        ({"overlap": float("nan")}, "overlap nan"),
        ({"window": 0}, "window 0"),
        ({"window": 10**6}, "window 1000000"),
        ({"batch_size": 0}, "batch_size 0"),
    ],
)
def test_sliding_window_options_are_validated(kwargs: dict, words: str) -> None:
    from anatomap.infer.embed import check_options

    with pytest.raises(AnatomapError, match=words):
        check_options(**kwargs)
    o = check_options()
    assert (o.window, o.overlap, o.batch_size) == (64, 0.25, 2)
