"""Tests of the embedded demo cohort (anatomap.data.demo) and the test phantoms."""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from anatomap import geometry
from anatomap.data import demo, phantoms

SMALL = {"n_subjects": 3, "n_heldout": 1, "spacing": 4.0, "progress": False}


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> demo.DemoInfo:
    return demo.build_demo(tmp_path_factory.mktemp("demo") / "d", seed=0, **SMALL)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> demo.DemoInfo:
    """Same cohort without intensity changes: images are the resampled template."""
    root = tmp_path_factory.mktemp("plain") / "d"
    return demo.build_demo(root, seed=0, augment_intensity=False, **SMALL)


def test_layout(built: demo.DemoInfo) -> None:
    root = built.root
    assert built.subjects == ["sub-000", "sub-001", "sub-002"]
    assert built.train == ["sub-000", "sub-001"] and built.heldout == ["sub-002"]
    for f in ("subjects.csv", "aal_labels.csv", "demo.json", "landmarks_template.csv"):
        assert (root / f).is_file()
    assert built.images["sub-000"] == root / "images" / "sub-000_T1w.nii.gz"
    assert (root / "labels" / "sub-001_tissue_dseg.nii.gz").is_file()
    assert (root / "labels" / "sub-001_aal_dseg.nii.gz").is_file()
    header = (root / "subjects.csv").read_text().splitlines()[0].split(",")
    assert header[:2] == ["subject", "split"]
    aal = (root / "aal_labels.csv").read_text().splitlines()
    assert aal[0] == "label,name" and aal[1] == "1,Precentral_L" and len(aal) == 117


def test_idempotent_and_deterministic(built: demo.DemoInfo, tmp_path: Path) -> None:
    before = _digest(built.root)
    mtimes = {p: p.stat().st_mtime_ns for p in built.root.rglob("*")}
    again = demo.build_demo(built.root, seed=0, **SMALL)
    assert built.rebuilt and not again.rebuilt
    assert again.subjects == built.subjects and again.images == built.images
    assert {p: p.stat().st_mtime_ns for p in built.root.rglob("*")} == mtimes
    # an independent build is bit-identical
    other = demo.build_demo(tmp_path / "copy", seed=0, **SMALL)
    assert _digest(other.root) == before
    # a missing file triggers a rebuild, with the same bytes
    other.images["sub-001"].unlink()
    assert demo.build_demo(tmp_path / "copy", seed=0, **SMALL).rebuilt
    assert _digest(other.root) == before
    # other parameters rebuild and remove the subjects of the larger build
    small = demo.build_demo(tmp_path / "copy", seed=0, **{**SMALL, "n_subjects": 2})
    assert small.rebuilt and not other.images["sub-002"].exists()
    assert sorted(p.name for p in (other.root / "labels").iterdir()) == [
        f"sub-00{i}_{kind}_dseg.nii.gz" for i in (0, 1) for kind in ("aal", "tissue")
    ]
    assert small.images["sub-001"].read_bytes() == other.images["sub-001"].read_bytes()
    # force rebuilds even when everything matches
    assert demo.build_demo(
        tmp_path / "copy", seed=0, force=True, **{**SMALL, "n_subjects": 2}
    ).rebuilt


def test_different_seed_differs(built: demo.DemoInfo, tmp_path: Path) -> None:
    other = demo.build_demo(tmp_path / "s1", seed=1, **SMALL)
    a = nib.load(built.images["sub-000"])
    b = nib.load(other.images["sub-000"])
    assert a.shape != b.shape or not np.allclose(a.get_fdata(), b.get_fdata())
    assert not np.allclose(built.transform("sub-000").affine, other.transform("sub-000").affine)


def test_grids_labels_orientations(built: demo.DemoInfo) -> None:
    t = demo.load_template()
    orientations, partial = [], []
    for s in built.subjects:
        img = nib.load(built.images[s])
        tis = nib.load(built.tissue[s])
        aal = nib.load(built.aal[s])
        assert img.shape == tis.shape == aal.shape
        np.testing.assert_allclose(img.affine, tis.affine)
        np.testing.assert_allclose(img.affine, aal.affine)
        assert tis.get_data_dtype() == np.uint8 and aal.get_data_dtype() == np.int16
        classes = np.unique(np.asarray(tis.dataobj))
        assert set(classes.tolist()) == {0, 1, 2, 3}
        regions = np.unique(np.asarray(aal.dataobj))
        assert regions.min() == 0 and regions.max() <= 116 and len(regions) > 60
        assert np.isfinite(img.get_fdata()).all() and img.get_fdata().max() > 0
        orientations.append(geometry.orientation_codes(img.affine))
        partial.append(bool(built_meta(built)[s]["partial"]))
        # voxel spacing is slightly anisotropic around the requested spacing
        sp = geometry.spacing(img.affine)
        assert np.all((sp > 0.89 * 4.0) & (sp < 1.21 * 4.0))
        # the brain occupies the grid: tissue volume comparable with the template's
        vol = (np.asarray(tis.dataobj) > 0).sum() * np.prod(sp)
        ref = t.mask.sum() * 8.0
        assert 0.3 * ref < vol < 1.5 * ref
    assert any(o != "RAS" for o in orientations)
    assert any(partial) and not all(partial)


def built_meta(info: demo.DemoInfo) -> dict:
    import json

    return json.loads((info.root / "demo.json").read_text())["subjects"]


def test_landmark_round_trip(built: demo.DemoInfo) -> None:
    t = demo.load_template()
    for s in built.subjects:
        tr = demo.load_subject_transform(built.root, s)
        x = demo.template_to_subject(t.landmark_mm, tr)
        back = demo.subject_to_template(x, tr)
        assert np.abs(back - t.landmark_mm).max() < 0.1
        # the transform recomputed from (seed, index) is the stored one
        p = demo.draw_subject(0, built_meta(built)[s]["index"], 4.0)
        np.testing.assert_array_equal(p.transform.coeffs, tr.coeffs)
        np.testing.assert_array_equal(p.transform.affine, tr.affine)


def test_landmarks_correspond_between_subjects(built: demo.DemoInfo) -> None:
    t = demo.load_template()
    ref = dict(zip(t.landmark_names, t.landmark_mm, strict=True))
    tables = {s: demo.read_landmarks(built.landmarks[s]) for s in built.subjects}
    a, b = built.subjects[0], built.subjects[1]
    names_a, xyz_a = tables[a]
    names_b, xyz_b = tables[b]
    assert len(names_a) > 100 and len(names_b) > 50
    common = sorted(set(names_a) & set(names_b))
    ia = [names_a.index(n) for n in common]
    ib = [names_b.index(n) for n in common]
    ta = demo.subject_to_template(xyz_a[ia], built.transform(a))
    tb = demo.subject_to_template(xyz_b[ib], built.transform(b))
    assert np.abs(ta - tb).max() < 0.05  # CSV rounding (1e-4 mm) + inversion tolerance
    np.testing.assert_allclose(ta, np.stack([ref[n] for n in common]), atol=0.05)
    # A -> B directly
    ab = demo.map_between_subjects(xyz_a[ia], built.transform(a), built.transform(b))
    assert np.abs(ab - xyz_b[ib]).max() < 0.05
    # landmarks lie in the field of view and inside the brain of the subject's tissue map
    for s in built.subjects:
        img = nib.load(built.tissue[s])
        ijk = geometry.world_to_voxel(img.affine, tables[s][1])
        assert np.all(ijk >= 0) and np.all(ijk <= np.asarray(img.shape) - 1)


def test_images_are_exact_resamplings(plain: demo.DemoInfo) -> None:
    """Without intensity changes, every voxel is the template interpolated at f(x)."""
    t = demo.load_template()
    rng = np.random.default_rng(0)
    for s in plain.subjects:
        img = nib.load(plain.images[s])
        data = np.asarray(img.get_fdata(), np.float64)
        tis = np.asarray(nib.load(plain.tissue[s]).dataobj)
        ijk = np.stack([rng.integers(0, n, 2000) for n in img.shape], -1).astype(np.float64)
        world = geometry.voxel_to_world(img.affine, ijk)
        tvox = geometry.world_to_voxel(
            t.affine, demo.subject_to_template(world, plain.transform(s))
        )
        expect = ndi.map_coordinates(t.t1, tvox.T, order=1, cval=0.0)
        got = data[tuple(ijk.astype(int).T)]
        np.testing.assert_allclose(got, expect, atol=1e-5)
        nearest = t.tissue[tuple(np.clip(np.rint(tvox).astype(int), 0, np.array(t.shape) - 1).T)]
        inside = np.all((np.rint(tvox) >= 0) & (np.rint(tvox) < np.array(t.shape)), -1)
        agree = (tis[tuple(ijk.astype(int).T)] == np.where(inside, nearest, 0)).mean()
        assert agree > 0.999  # exact but for rounding ties at .5

        # at the landmarks (off-grid): interpolated subject image ~ template intensity
        _, xyz = demo.read_landmarks(plain.landmarks[s])
        sub = ndi.map_coordinates(data, geometry.world_to_voxel(img.affine, xyz).T, order=1)
        ref = ndi.map_coordinates(
            t.t1,
            geometry.world_to_voxel(t.affine, demo.subject_to_template(xyz, plain.transform(s))).T,
            order=1,
        )
        assert np.median(np.abs(sub - ref)) < 0.05 and np.corrcoef(sub, ref)[0, 1] > 0.8


def test_augmentation_changes_only_intensities(built: demo.DemoInfo, plain: demo.DemoInfo) -> None:
    for s in built.subjects:
        a, b = nib.load(built.images[s]), nib.load(plain.images[s])
        assert a.shape == b.shape
        np.testing.assert_array_equal(a.affine, b.affine)
        assert built.landmarks[s].read_bytes() == plain.landmarks[s].read_bytes()
        x, y = a.get_fdata().ravel(), b.get_fdata().ravel()
        assert not np.allclose(x / x.max(), y / y.max())
        assert np.corrcoef(x, y)[0, 1] > 0.8  # same anatomy


def test_displacement_grid_matches_points() -> None:
    p = demo.draw_subject(5, 4, 3.0)
    grid = p.transform.displacement_on_grid(p.affine, p.shape)
    pts = geometry.world_grid(p.affine, p.shape)
    sel = (slice(None, None, 7), slice(None, None, 5), slice(None, None, 3))
    np.testing.assert_allclose(grid[sel], p.transform.displacement(pts[sel]), atol=1e-9)
    mag = np.linalg.norm(grid, axis=-1)
    assert 2.0 < mag.max() <= 5.0 + 1e-6


def test_inverse_raises_when_not_converging() -> None:
    tr = demo.draw_subject(0, 0, 2.0).transform
    bad = demo.SubjectTransform(tr.affine, tr.coeffs * 40.0, tr.box_lo, tr.box_hi)
    with pytest.raises(RuntimeError):
        bad.to_subject(np.array([[0.0, 0.0, 0.0], [30.0, -40.0, 20.0]]), iterations=3)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        demo.build_demo(tmp_path, n_subjects=2, n_heldout=2, progress=False)
    with pytest.raises(ValueError):
        demo.build_demo(tmp_path, landmarks="nope", progress=False)


# ----------------------------------------------------------------------------- phantoms


@pytest.mark.parametrize("orientation", ["LPS", "RAS", "LAS", "PIR"])
def test_ct_phantom(orientation: str) -> None:
    v = phantoms.ct_phantom(shape=(32, 30, 28), spacing=(1.5, 1.5, 2.0), orientation=orientation)
    assert v.shape == (32, 30, 28) and v.modality == "CT" and v.subject
    assert v.orientation == orientation
    np.testing.assert_allclose(v.spacing, (1.5, 1.5, 2.0))
    assert np.isfinite(v.array).all() and v.array.dtype == np.float32
    assert -1024 <= v.array.min() < -900 and 600 < v.array.max() <= 3071
    assert np.abs(v.affine[:3, 3]).max() > 1.0
    labels = v.meta["labels"]
    assert labels.shape == v.shape and set(np.unique(labels)) == set(phantoms.CT_LABELS)
    for lab, lo, hi in ((0, -1060, -940), (1, -160, -40), (2, 0, 80), (7, 700, 1300)):
        med = np.median(v.array[labels == lab])
        assert lo < med < hi, (lab, med)
    organs = [np.median(v.array[labels == k]) for k in (3, 4, 5, 6)]
    assert all(20 < m < 90 for m in organs)


def test_phantom_orientation_is_only_a_reordering() -> None:
    a = phantoms.ct_phantom(orientation="LPS", seed=4)
    b = phantoms.ct_phantom(orientation="RAS", seed=4, spacing=(1.5, 1.5, 2.0))
    arr, aff = geometry.reorient(a.array, a.affine, "RAS")
    np.testing.assert_allclose(aff, b.affine)
    np.testing.assert_array_equal(arr, b.array)
    # the liver (label 3) sits on the patient's right (+x in RAS) whatever the orientation
    for v in (a, b):
        ijk = np.argwhere(v.meta["labels"] == 3).astype(float)
        centre = geometry.box_center(v.affine, v.shape)
        assert geometry.voxel_to_world(v.affine, ijk)[:, 0].mean() > centre[0]


def test_mri_and_blob_phantoms() -> None:
    m = phantoms.mri_phantom(shape=(24, 26, 20), seed=1, orientation="LAS")
    assert m.shape == (24, 26, 20) and m.modality == "MR" and m.orientation == "LAS"
    assert np.isfinite(m.array).all() and m.array.min() >= 0 and m.array.max() > 0
    b = phantoms.blob_volume(shape=(20, 22, 24), spacing=(2.0, 1.0, 1.5), seed=2)
    assert b.shape == (20, 22, 24) and b.modality == "MR" and b.orientation == "RAS"
    np.testing.assert_allclose(b.spacing, (2.0, 1.0, 1.5))
    assert np.isfinite(b.array).all() and b.array.min() > 0
    # every position looks different: 3x3x3 patches are all distinct, none is flat
    arr = b.array.astype(np.float64)
    patches = np.lib.stride_tricks.sliding_window_view(arr, (3, 3, 3))[::2, ::2, ::2]
    flat = patches.reshape(-1, 27)
    dist, _ = cKDTree(flat).query(flat, k=2)
    assert dist[:, 1].min() > 1e-3
    assert np.linalg.norm(np.stack(np.gradient(arr)), axis=0).min() > 1e-4
    assert not np.array_equal(
        phantoms.blob_volume(seed=0).array, phantoms.blob_volume(seed=1).array
    )


def test_oriented_affine_codes() -> None:
    for codes in ("RAS", "LPS", "PIR", "ASL"):
        aff = phantoms.oriented_affine(codes, (1.0, 2.0, 3.0), (10.0, -5.0, 2.0), (5, 6, 7))
        assert geometry.orientation_codes(aff) == codes
        np.testing.assert_allclose(geometry.box_center(aff, (5, 6, 7)), (10.0, -5.0, 2.0))
    with pytest.raises(ValueError):
        phantoms.oriented_affine("RRS", (1, 1, 1), (0, 0, 0), (2, 2, 2))


# ----------------------------------------------------------------------------- multi-modal


def test_multimodal_demo(tmp_path: Path) -> None:
    """Extra contrasts: co-registered with the T1w, their own intensities, some missing; the
    T1w-only request keeps its files, and a T1w-only rebuild removes the contrasts."""
    from anatomap.data.manifest import index_directory

    kw = {**SMALL, "n_subjects": 5}
    mm = demo.build_demo(tmp_path / "mm", seed=0, modalities=("T1w", "T2w", "FLAIR"), **kw)
    assert mm.modalities == ("T1w", "T2w", "FLAIR")
    assert demo.missing_modalities(3, mm.modalities) == ["T2w"]
    assert demo.missing_modalities(4, mm.modalities) == ["FLAIR"]
    assert {s: sorted(v) for s, v in mm.contrasts.items()} == {
        "sub-000": ["FLAIR", "T2w"],
        "sub-001": ["FLAIR", "T2w"],
        "sub-002": ["FLAIR", "T2w"],
        "sub-003": ["FLAIR"],
        "sub-004": ["T2w"],
    }
    for s, paths in mm.contrasts.items():
        t1 = nib.load(mm.images[s])
        tissue = np.asarray(nib.load(mm.tissue[s]).dataobj)
        for m, path in paths.items():
            img = nib.load(path)
            assert img.shape == t1.shape
            np.testing.assert_array_equal(img.affine, t1.affine)  # co-registered by construction
            a = img.get_fdata()
            csf, gm, wm = (np.median(a[tissue == k]) for k in (1, 2, 3))
            if m == "T2w":
                assert csf > gm > wm  # fluid bright
            else:
                assert gm > csf and wm > csf  # fluid suppressed
            assert np.median(a[tissue == 0]) < 0.3 * gm
    # the T1w images are those of the T1w-only cohort (own random streams for the contrasts)
    t1_only = demo.build_demo(tmp_path / "t1", seed=0, **kw)
    for s in t1_only.subjects:
        assert t1_only.images[s].read_bytes() == mm.images[s].read_bytes()
    # the manifest groups the modalities per subject and records the missing ones
    res = index_directory(mm.root)
    assert not res.problems
    missing = {r.subject: r.missing for r in res.subjects}
    assert missing["sub-003"] == ["T2w"] and missing["sub-004"] == ["FLAIR"]
    assert missing["sub-000"] == []
    # rebuilding the folder as T1w-only deletes the contrasts
    again = demo.build_demo(mm.root, seed=0, **kw)
    assert again.rebuilt and sorted(p.name for p in (mm.root / "images").iterdir()) == [
        f"sub-00{i}_T1w.nii.gz" for i in range(5)
    ]
    with pytest.raises(ValueError):
        demo.build_demo(tmp_path / "bad", modalities=("T2w",), progress=False)
