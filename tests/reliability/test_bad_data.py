"""Bad data sets, manifests and configs: one clean error each, the rest keeps working, and
nothing already written (manifest, cache, files outside the given folders) is damaged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from anatomap import geometry
from anatomap.config import load_config
from anatomap.data import cache as cache_mod
from anatomap.data.cache import Cache, build_cache
from anatomap.data.manifest import ManifestError, index_directory, read_manifest, write_manifest
from anatomap.data.sampler import ViewSpec, sample_views
from anatomap.errors import AnatomapError, ConfigError, VolumeError
from anatomap.io import read_volume

N = 16


def smooth(seed: int, shape: tuple[int, ...] = (N, N, N)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape[:3]], indexing="ij"), -1)
    out = np.zeros(shape[:3])
    for _ in range(6):
        c = rng.uniform(0, np.asarray(shape[:3]))
        out += np.exp(-((grid - c) ** 2).sum(-1) / 18.0)
    return (out + 0.05).astype(np.float32)


def save(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(
        nib.Nifti1Image(array, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine), path
    )
    return path


def dataset(root: Path, n: int = 3) -> Path:
    for i in range(n):
        save(root / f"sub-{i}_T1w.nii.gz", smooth(i))
    return root


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------------------------
# manifests and caches
# --------------------------------------------------------------------------------------------


def test_manifest_row_pointing_to_a_deleted_file(tmp_path: Path) -> None:
    root = dataset(tmp_path / "scans")
    manifest = write_manifest(index_directory(root), tmp_path / "m.jsonl")
    before = manifest.read_bytes()
    (root / "sub-1_T1w.nii.gz").unlink()
    with pytest.raises(ManifestError, match=r"sub-1_T1w\.nii\.gz"):
        read_manifest(manifest)
    res = build_cache(manifest, tmp_path / "cache", spacing=2.0, progress=False)
    assert res.cache.subjects == ["sub-0", "sub-2"]  # the others keep working
    assert [p["subject"] for p in res.problems] == ["sub-1"]
    assert "sub-1_T1w.nii.gz: file not found" in res.problems[0]["reason"]
    assert manifest.read_bytes() == before


def test_broken_files_added_later_leave_manifest_and_cache_untouched(tmp_path: Path) -> None:
    root = dataset(tmp_path / "scans")
    manifest = write_manifest(index_directory(root), tmp_path / "m.jsonl")
    build_cache(manifest, tmp_path / "cache", spacing=2.0, progress=False)
    cached = snapshot(tmp_path / "cache" / "subjects")
    (root / "sub-9_T1w.nii.gz").write_bytes(b"\x1f\x8b garbage")
    result = index_directory(root)
    assert [Path(p.path).name for p in result.problems] == ["sub-9_T1w.nii.gz"]
    write_manifest(result, manifest)
    again = build_cache(manifest, tmp_path / "cache", spacing=2.0, progress=False)
    assert (again.built, again.reused) == (0, 3)
    assert snapshot(tmp_path / "cache" / "subjects") == cached


def test_killed_cache_build_resumes_and_rebuilds_the_half_written_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = write_manifest(index_directory(dataset(tmp_path / "scans", 4)), tmp_path / "m.jsonl")
    real = cache_mod._atomic_save_npy
    calls = {"n": 0}

    def killed_mid_entry(path: Path, array: np.ndarray) -> None:
        calls["n"] += 1
        if calls["n"] == 6:  # sub-2: image.npy written, foreground.npy not: the run "dies"
            raise KeyboardInterrupt
        real(path, array)

    monkeypatch.setattr(cache_mod, "_atomic_save_npy", killed_mid_entry)
    with pytest.raises(KeyboardInterrupt):
        build_cache(manifest, tmp_path / "cache", spacing=2.0, progress=False)
    monkeypatch.undo()
    half = tmp_path / "cache" / "subjects" / "sub-2"
    assert (half / "image.npy").exists() and not (half / "meta.json").exists()
    res = build_cache(manifest, tmp_path / "cache", spacing=2.0, progress=False)
    assert (res.built, res.reused, res.problems) == (2, 2, [])
    # an entry whose meta.json promises files that are damaged is rebuilt too
    image = tmp_path / "cache" / "subjects" / "sub-0" / "image.npy"
    image.write_bytes(image.read_bytes()[:200])
    res = build_cache(manifest, tmp_path / "cache", spacing=2.0, progress=False)
    assert (res.built, res.reused) == (1, 3)
    assert res.cache["sub-0"].image.shape == res.cache["sub-1"].image.shape


def test_subject_ids_cannot_escape_the_cache(tmp_path: Path) -> None:
    manifest = write_manifest(index_directory(dataset(tmp_path / "scans", 2)), tmp_path / "m.jsonl")
    lines = manifest.read_text().splitlines()
    evil = json.loads(lines[0])
    evil["subject"] = "../../escaped"
    manifest.write_text(json.dumps(evil) + "\n" + lines[1] + "\n")
    with pytest.raises(ManifestError, match=r"line 1: .*not a plain name"):
        build_cache(manifest, tmp_path / "out" / "cache", spacing=2.0, progress=False)
    # records handed over directly are checked as well
    records = read_manifest(write_manifest(index_directory(tmp_path / "scans"), tmp_path / "ok"))
    records[0].subject = "../escaped"
    res = build_cache(records, tmp_path / "out" / "cache", spacing=2.0, progress=False)
    assert res.cache.subjects == ["sub-1"] and "not a plain name" in res.problems[0]["reason"]
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "out" / "escaped").exists()
    info = json.loads((tmp_path / "out" / "cache" / "cache.json").read_text())
    info["subjects"].append("../../x")
    (tmp_path / "out" / "cache" / "cache.json").write_text(json.dumps(info))
    with pytest.raises(AnatomapError, match="not a plain name"):
        Cache(tmp_path / "out" / "cache")["../../x"]


def test_table_paths_must_stay_inside_the_data_folders(tmp_path: Path) -> None:
    data = dataset(tmp_path / "study" / "scans", 1)
    outside = save(tmp_path / "private" / "other.nii.gz", smooth(5))
    table = tmp_path / "study" / "table.csv"
    table.write_text(
        "subject,modality,path\n"
        "a,T1w,scans/sub-0_T1w.nii.gz\n"
        "b,T1w,../private/other.nii.gz\n"
        f"c,T1w,{outside}\n"
        "../d,T1w,scans/sub-0_T1w.nii.gz\n"
    )
    result = index_directory(data, table=table)
    assert [s.subject for s in result.subjects] == ["a"]
    reasons = sorted(p.reason.split(" (")[0] for p in result.problems)
    assert reasons == ["path outside the data folders"] * 2 + [
        "subject id '../d' is not a plain name"
    ]
    # naming the folder that holds it as the data root is the documented way in
    allowed = index_directory(tmp_path / "private", table=table)
    assert sorted(s.subject for s in allowed.subjects) == ["a", "b", "c"]


# --------------------------------------------------------------------------------------------
# volumes the sampler must cope with
# --------------------------------------------------------------------------------------------


def cache_of(tmp_path: Path, array: np.ndarray, name: str = "s") -> Cache:
    save(tmp_path / "scans" / f"{name}_T1w.nii.gz", array)
    manifest = write_manifest(index_directory(tmp_path / "scans"), tmp_path / "m.jsonl")
    res = build_cache(manifest, tmp_path / "cache", spacing=2.0, progress=False)
    assert not res.problems, res.problems
    return res.cache


def test_volume_smaller_than_the_crop_is_padded_with_exact_geometry(tmp_path: Path) -> None:
    cache = cache_of(tmp_path, smooth(0, (6, 5, 4)))
    subject = cache["s"]
    spec = ViewSpec(num_views=3, size=(12, 12, 12), pad_value=-1.0)
    images, affines = sample_views(subject, spec, np.random.default_rng(0))
    assert images.shape == (3, 1, 12, 12, 12) and np.isfinite(images).all()
    for img, aff in zip(images, affines, strict=True):
        inside = img[0] != -1.0
        assert inside.sum() == 6 * 5 * 4  # the whole volume, once, padding elsewhere
        # every copied voxel sits where the view's affine says
        ijk = np.argwhere(inside)
        src = np.rint(geometry.world_to_voxel(subject.affine, geometry.voxel_to_world(aff, ijk)))
        np.testing.assert_array_equal(
            img[0][inside], np.asarray(subject.image[0], np.float32)[tuple(src.astype(int).T)]
        )


def test_all_zero_volume_has_no_foreground_and_still_samples(tmp_path: Path) -> None:
    cache = cache_of(tmp_path, np.zeros((N, N, N), np.float32), "zero")
    subject = cache["zero"]
    assert len(subject.foreground) == 0
    assert np.isfinite(np.asarray(subject.image, np.float32)).all()
    images, _ = sample_views(
        subject, ViewSpec(num_views=2, size=(8, 8, 8)), np.random.default_rng(1)
    )
    assert images.shape == (2, 1, 8, 8, 8) and np.isfinite(images).all()


def test_4d_volume_picks_a_volume_on_request(tmp_path: Path) -> None:
    arr = np.stack([smooth(i) for i in range(3)], -1)
    path = save(tmp_path / "fmri.nii.gz", arr)
    with pytest.raises(VolumeError, match=r"fmri\.nii\.gz: 4-D image with 3 volumes"):
        read_volume(path)
    np.testing.assert_array_equal(read_volume(path, volume_index=1).array, arr[..., 1])
    np.testing.assert_array_equal(read_volume(path, volume_index=-1).array, arr[..., 2])
    with pytest.raises(VolumeError, match="volume_index 3 out of range for 3 volumes"):
        read_volume(path, volume_index=3)


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("data: {cache: c, bogus: 1}\n", "unknown key 'data.bogus'"),
        ("data: {cache: c}\ntrainer: {max_steps: many}\n", "key 'trainer.max_steps'"),
        ("data: {cache: c}\ntrainer: {batch_size: -4}\n", "key 'trainer.batch_size'"),
        ("data: {cache: c}\nobjective: {name: isimed, crop_size: -8}\n", "objective.crop_size"),
        ("data: {cache: c}\nobjective: {name: isimed, bogus: 1}\n", "objective.bogus"),
        ("data: [1, 2\n", "not valid YAML"),
        ("- just\n- a list\n", "top level must be a mapping"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_config_cannot_execute_code(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    path = tmp_path / "evil.yaml"
    path.write_text(f"data: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError):
        load_config(overrides=[f"data.cache=!!python/object/apply:os.system ['touch {marker}']"])
    assert not marker.exists()


def test_empty_cache_folder_is_a_clean_error(tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir()
    with pytest.raises(AnatomapError, match="not an anatomap cache"):
        Cache(tmp_path / "cache")
    shutil.rmtree(tmp_path / "cache")
