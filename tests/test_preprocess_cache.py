"""Preprocessing (orientation, spacing, presets) and the memory-mapped cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from anatomap import geometry
from anatomap.data.cache import Cache, build_cache
from anatomap.data.manifest import index_directory, write_manifest
from anatomap.data.phantoms import blob_volume, ct_phantom
from anatomap.data.preprocess import PRESETS, normalise_intensity, parse_presets, preprocess
from anatomap.data.volume import Volume
from anatomap.errors import ConfigError
from anatomap.io import write_volume


def _peak_world(v: Volume) -> np.ndarray:
    idx = np.array(np.unravel_index(np.argmax(v.array), v.shape), float)
    return geometry.voxel_to_world(v.affine, idx)


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "PIR"])
@pytest.mark.parametrize("spacing", [1.0, 2.0])
def test_preprocess_is_ras_at_target_spacing_and_keeps_world_positions(
    orientation: str, spacing: float
) -> None:
    arr = np.zeros((30, 26, 22), np.float32)
    arr[12, 9, 14] = 1.0
    from scipy.ndimage import gaussian_filter

    src = blob_volume((30, 26, 22), (1.3, 1.7, 1.1), seed=0, orientation=orientation)
    src.array = gaussian_filter(arr, 2.5)
    out = preprocess(src, spacing, None)
    assert out.orientation == "RAS"
    assert np.allclose(out.spacing, spacing, atol=1e-6)
    # The blob's peak stays at the same world point (to within one target voxel).
    assert np.linalg.norm(_peak_world(out) - _peak_world(src)) <= spacing * 0.87 + 1e-6


def test_lps_and_ras_files_of_one_object_cache_identically(tmp_path: Path) -> None:
    ras = ct_phantom((20, 22, 18), (1.5, 1.5, 2.0), seed=1, orientation="RAS")
    arr_lps, aff_lps = geometry.reorient(ras.array, ras.affine, "LPS")
    scans = tmp_path / "scans"
    write_volume(ras, scans / "a_CT.nii.gz")
    write_volume(Volume(arr_lps, aff_lps, "CT"), scans / "b_CT.nrrd")
    write_manifest(index_directory(scans), tmp_path / "m.jsonl")
    cache = build_cache(
        tmp_path / "m.jsonl",
        tmp_path / "c",
        preset="ct",
        spacing=None,
        dtype="float32",
        progress=False,
    ).cache
    a, b = cache["a"], cache["b"]
    assert np.allclose(a.affine, b.affine, atol=1e-4)
    assert np.allclose(np.asarray(a.image), np.asarray(b.image), atol=1e-6)


def test_intensity_presets() -> None:
    hu = np.array([-2000.0, -1000.0, 0.0, 1000.0, 3000.0], np.float32)
    assert np.allclose(normalise_intensity(hu, PRESETS["ct"]), [0, 0, 0.5, 1, 1])
    mri = np.random.default_rng(0).gamma(2.0, 100.0, size=10_000).astype(np.float32)
    out = normalise_intensity(mri, PRESETS["mri"])
    assert out.min() == 0.0 and out.max() == 1.0
    assert 0.1 < np.median(out) < 0.5
    per = parse_presets("T1w=mri,CT=ct")
    assert per["CT"].kind == "ct" and per["T1w"].kind == "mri"
    with pytest.raises(ConfigError, match="unknown intensity preset"):
        parse_presets("pet")


def test_cache_layout_memmap_and_missing_modality(tmp_path: Path, tiny_dataset: Path) -> None:
    scans = tmp_path / "scans"
    scans.mkdir()
    for f in tiny_dataset.glob("sub-0[01]_*"):
        (scans / f.name).write_bytes(f.read_bytes())
    (scans / "sub-01_T2w.nii.gz").unlink()  # sub-01 lacks T2w
    write_manifest(index_directory(scans), tmp_path / "m.jsonl")
    res = build_cache(tmp_path / "m.jsonl", tmp_path / "c", spacing=2.0, progress=False)
    cache = Cache(tmp_path / "c")
    assert cache.modalities == ["T1w", "T2w"] and res.built == 2
    s1 = cache["sub-01"]
    assert isinstance(s1.image, np.memmap)
    assert list(s1.present) == [True, False]
    assert not np.any(np.asarray(s1.image[1]))
    assert s1.label("tissue").shape == s1.shape
    assert geometry.orientation_codes(s1.affine) == "RAS"
    assert len(s1.foreground) > 0


def test_cache_resumes_and_rebuilds_half_written_entries(
    tmp_path: Path, tiny_dataset: Path
) -> None:
    write_manifest(index_directory(tiny_dataset), tmp_path / "m.jsonl")
    first = build_cache(tmp_path / "m.jsonl", tmp_path / "c", spacing=2.0, progress=False)
    assert first.built == 6
    entry = tmp_path / "c" / "subjects" / "sub-03"
    before = {
        p.name: p.stat().st_mtime_ns for p in (tmp_path / "c" / "subjects" / "sub-00").iterdir()
    }
    (entry / "meta.json").unlink()  # as if killed before the entry was complete
    (entry / "image.npy").write_bytes(b"half")
    again = build_cache(tmp_path / "m.jsonl", tmp_path / "c", spacing=2.0, progress=False)
    assert (again.built, again.reused) == (1, 5)
    assert np.load(entry / "image.npy").shape[0] == 2
    after = {
        p.name: p.stat().st_mtime_ns for p in (tmp_path / "c" / "subjects" / "sub-00").iterdir()
    }
    assert before == after  # untouched entries are not rewritten
    # Other settings (here the stored dtype) invalidate every entry.
    f32 = build_cache(
        tmp_path / "m.jsonl", tmp_path / "c", spacing=2.0, dtype="float32", progress=False
    )
    assert f32.built == 6 and np.load(entry / "image.npy").dtype == np.float32


def test_cache_reports_a_broken_subject_and_keeps_the_others(
    tmp_path: Path, tiny_dataset: Path
) -> None:
    scans = tmp_path / "scans"
    scans.mkdir()
    for f in tiny_dataset.glob("sub-0[012]_T1w*"):
        (scans / f.name).write_bytes(f.read_bytes())
    write_manifest(index_directory(scans), tmp_path / "m.jsonl")
    (scans / "sub-01_T1w.nii.gz").write_bytes(b"\x1f\x8b\x08 truncated")  # broken after indexing
    res = build_cache(tmp_path / "m.jsonl", tmp_path / "c", spacing=2.0, progress=False)
    assert [p["subject"] for p in res.problems] == ["sub-01"]
    assert "sub-01_T1w.nii.gz" in res.problems[0]["reason"]
    assert Cache(tmp_path / "c").subjects == ["sub-00", "sub-02"]
    info = json.loads((tmp_path / "c" / "cache.json").read_text())
    assert info["subjects"] == ["sub-00", "sub-02"]


def test_2d_images_cache_as_one_slice_volumes_and_train(tmp_path: Path) -> None:
    """2-D scans go through index (ndim 2) -> cache -> 2-D views -> a 2-D encoder step."""
    import torch

    from anatomap.data.sampler import LocatedViewDataset
    from anatomap.models.encoders import EncoderSpec, build_encoder
    from anatomap.objectives.registry import get_objective, objective_config

    scans = tmp_path / "xr"
    for i in range(3):
        v = blob_volume((40, 36, 1), (0.5, 0.5, 1.0), seed=i)
        write_volume(Volume(v.array[..., 0], v.affine, "XR"), scans / f"p{i}_XR.nii.gz")
    result = index_directory(scans, expect_ndim=2)
    assert not result.problems and len(result.subjects) == 3
    write_manifest(result, tmp_path / "m.jsonl")
    cache = build_cache(tmp_path / "m.jsonl", tmp_path / "c", spacing=1.0, progress=False).cache
    subject = cache["p0"]
    assert subject.shape[2] == 1 and subject.shape[:2] == (20, 18)
    enc = build_encoder(EncoderSpec("small_cnn", spatial_dims=2, options={"channels": [8, 16]}))
    obj = get_objective("isimed")(objective_config({"name": "isimed", "crop_size": 8}), enc)
    ds = LocatedViewDataset(cache, cache.subjects, obj.view_spec(), 2)
    assert obj.view_spec().size == (8, 8)
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 16, 1, 8, 8)
    loss = obj(enc, batch)["loss"]
    assert torch.isfinite(loss)
