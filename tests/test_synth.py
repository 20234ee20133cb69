"""Synthetic subjects from label maps: fields, exact maps, contrasts, views, cohorts."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from anatomap import geometry
from anatomap.data.sampler import LocatedViewDataset, ViewSpec, sample_views
from anatomap.data.synth import (
    LabelSource,
    SynthConfig,
    SynthViewDataset,
    load_synth_map,
    synth_subject,
    write_synth_cohort,
)
from anatomap.geometry.fields import (
    Diffeomorphism,
    WorldMap,
    grid_covering,
    random_velocity,
    resample,
    subdividing_grid,
)

QUIET = {  # no intensity randomness beyond the class means
    "texture_max": 0.0,
    "region_std": 0.0,
    "class_jitter": 0.0,
    "bias_max": 0.0,
    "lowres_probability": 0.0,
    "blur_max": 0.0,
    "noise_max": 0.0,
    "ct_noise_hu": (0.0, 0.0),
    "gamma_log_max": 0.0,
}


def toy_labels(n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Nested ellipsoids at 2 mm: body 1, liver 2, kidney 3 (one half of 2), vertebra 4."""
    ijk = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1).astype(float)
    c = (n - 1) / 2
    r = np.linalg.norm((ijk - c) * [1.0, 1.2, 0.9], axis=-1)
    lab = np.zeros((n, n, n), np.int16)
    lab[r < 16] = 1
    lab[r < 11] = 2
    lab[(r < 11) & (ijk[..., 0] > c + 2)] = 3
    lab[r < 5] = 4
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = [-c * 2, -c * 2 + 5, -c * 2 - 3]
    return lab, aff


NAMES = {1: "body", 2: "liver", 3: "kidney_left", 4: "vertebrae_L1"}


@pytest.fixture(scope="module")
def toy() -> LabelSource:
    lab, aff = toy_labels()
    return LabelSource.from_arrays(lab, aff, NAMES)


@pytest.fixture(scope="module")
def cfg() -> SynthConfig:
    return SynthConfig(svf_scales_mm=[32.0, 16.0], svf_max_mm=[6.0, 3.0], margin_mm=(0.0, 6.0))


# -- fields ------------------------------------------------------------------------------------


@pytest.mark.parametrize("scales", [(64.0, 32.0), (40.0, 20.0)])
def test_svf_round_trip_two_scales(scales: tuple[float, float]) -> None:
    affine, shape = grid_covering([-70, -80, -60], [70, 80, 60], 5.0)
    rng = np.random.default_rng(int(scales[1]))
    v = random_velocity(rng, shape, 5.0, scales, (10.0, 6.0))
    phi = Diffeomorphism(v, affine, steps=7)
    x = rng.uniform([-60, -70, -50], [60, 70, 50], (500, 3))
    y = phi(x)
    assert np.linalg.norm(y - x, axis=1).max() > 4.0  # a real deformation
    assert np.linalg.norm(phi.backward(y) - x, axis=1).max() < 0.5  # exp(-v) alone
    assert np.linalg.norm(phi.inverse(y) - x, axis=1).max() < 0.01  # refined: exact
    wm = WorldMap(pre=np.diag([1.1, 0.9, 1.0, 1.0]), phi=phi, post=geometry.translation([3, 1, 2]))
    assert np.abs(wm.inverse(wm(x)) - x).max() < 0.01


def test_dense_map_matches_points() -> None:
    from anatomap.data.phantoms import oriented_affine

    out_affine = oriented_affine("PIL", [2.0, 2.0, 2.0], [3.0, -10.0, 5.0], (30, 34, 28))
    fa, fs = subdividing_grid(out_affine, (30, 34, 28), 3, 2)
    phi = Diffeomorphism(random_velocity(np.random.default_rng(1), fs, 6.0, (32,), (6,)), fa)
    idx = np.random.default_rng(2).integers(0, 27, (200, 3)).astype(float)
    pts = geometry.voxel_to_world(out_affine, idx)
    for wm in (WorldMap(phi=phi), WorldMap(pre=np.diag([1.0, 1.1, 0.9, 1.0]), phi=phi)):
        dense = wm.map_grid(out_affine, (30, 34, 28))  # subdividing fast path, then grid_sample
        got = dense[tuple(idx.astype(int).T)]
        assert np.abs(got - wm(pts)).max() < 1e-3
    ramp = np.stack(np.meshgrid(*[np.arange(60.0)] * 3, indexing="ij"))[:1]  # value = index i
    ramp_affine = geometry.translation([-60, -60, -60]) @ np.diag([2.0, 2.0, 2.0, 1.0])
    warped = resample(ramp, ramp_affine, WorldMap(phi=phi), out_affine, (30, 34, 28))
    expect = geometry.world_to_voxel(ramp_affine, phi(pts))[:, 0]
    assert np.abs(warped[0][tuple(idx.astype(int).T)] - expect).max() < 1e-3


# -- subjects ----------------------------------------------------------------------------------


def test_deterministic_from_seed(toy: LabelSource, cfg: SynthConfig) -> None:
    a, b, c = (synth_subject(toy, cfg, s) for s in ([7, 1], [7, 1], [7, 2]))
    assert np.array_equal(a.image, b.image) and a.params == b.params
    assert all(np.array_equal(a.labels[k], b.labels[k]) for k in a.labels)
    assert a.params != c.params


def test_maps_round_trip_and_match_the_image(toy: LabelSource, cfg: SynthConfig) -> None:
    orientations = set()
    for seed in range(6):
        s = synth_subject(toy, cfg, seed)
        orientations.add(s.params.orientation)
        shape = np.asarray(s.image.shape)
        idx = np.random.default_rng(seed).uniform(0, shape - 1, (300, 3))
        x = geometry.voxel_to_world(s.affine, idx)
        assert np.linalg.norm(s.to_subject(s.to_template(x)) - x, axis=1).max() < 0.1
        # geometry is exact whatever the voxel order: each voxel's label is the source's label
        # at that voxel's template position
        vox = np.rint(idx).astype(int)
        src_ijk = geometry.world_to_voxel(
            toy.affine, s.to_template(geometry.voxel_to_world(s.affine, vox.astype(float)))
        )
        ok = geometry.inside(src_ijk, toy.shape)
        src_lab = toy.labels["labels"][tuple(np.rint(src_ijk[ok]).astype(int).T)]
        assert np.mean(s.labels["labels"][tuple(vox[ok].T)] == src_lab) > 0.99
    assert len(orientations) >= 4


def test_landmarks_land_on_their_label(toy: LabelSource, cfg: SynthConfig) -> None:
    lab = toy.labels["labels"]
    expect = dict(
        zip(
            toy.landmark_names,
            lab[tuple(np.rint(geometry.world_to_voxel(toy.affine, toy.landmark_mm)).astype(int).T)],
            strict=True,
        )
    )
    hits = []
    for seed in range(6):
        s = synth_subject(toy, cfg, [3, seed])
        names, xyz = s.landmarks
        vox = np.rint(geometry.world_to_voxel(s.affine, xyz)).astype(int)
        hits += [s.labels["labels"][tuple(v)] == expect[n] for n, v in zip(names, vox, strict=True)]
    assert len(hits) >= 16 and np.mean(hits) >= 0.95


def _class_means(s, n_classes: int) -> np.ndarray:
    lab = s.labels["labels"]
    return np.array([np.median(s.image[lab == k]) for k in range(1, n_classes)])


def test_contrast_families_order_differently(toy: LabelSource) -> None:
    t1 = np.array([0.0, 0.7, 0.3, 0.5, 0.9])
    src = dataclasses.replace(toy, tables={**toy.tables, "t1": t1}, recipe=None)
    orders = {}
    for family in ("t1", "inverted", "ct", "flat", "gmm"):
        c = SynthConfig(contrasts=[family], real_fraction=0.0, **QUIET)
        means = _class_means(synth_subject(src, c, 5), 5)
        orders[family] = tuple(np.argsort(means))
        if family == "flat":
            assert np.ptp(means) < 0.35 * means.max()
        if family == "ct":
            assert np.allclose(means, toy.tables["ct"][1:], atol=1)  # the HU table
    assert orders["t1"] == tuple(np.argsort(t1[1:]))
    assert orders["inverted"] == orders["t1"][::-1]
    assert orders["ct"] == tuple(np.argsort(toy.tables["ct"][1:]))
    assert len({orders[f] for f in ("t1", "inverted", "ct")}) == 3


def test_field_of_view_cuts_the_anatomy(toy: LabelSource, cfg: SynthConfig) -> None:
    full = cfg.model_copy(update={"fov_cut_probability": 0.0})
    cut = cfg.model_copy(update={"fov_cut_probability": 1.0, "fov_keep": (0.4, 0.6)})
    for seed in range(3):
        a, b = synth_subject(toy, full, seed), synth_subject(toy, cut, seed)
        assert b.params.fov_cut_axes
        assert b.anatomy.sum() < 0.8 * a.anatomy.sum()
        edges = [np.take(b.anatomy, [0, -1], axis=k).any() for k in range(3)]
        assert any(edges)  # the anatomy runs out of the image
        assert not any(np.take(a.anatomy, [0, -1], axis=k).any() for k in range(3))


def test_contrast_allow_list_and_config_errors(toy: LabelSource) -> None:
    c = SynthConfig(contrasts=["ct", "flat"], real_fraction=1.0)
    assert {synth_subject(toy, c, s).contrast for s in range(6)} <= {"ct", "flat"}
    with pytest.raises(ValueError):
        SynthConfig(contrasts=["t3"])
    with pytest.raises(ValueError):
        SynthConfig(unknown_knob=1)
    with pytest.raises(Exception, match="none of the contrasts"):
        synth_subject(toy, SynthConfig(contrasts=["t2"]), 0)  # the toy has no T2 table


# -- on the fly --------------------------------------------------------------------------------


def test_dataset_items_match_located_views(
    toy: LabelSource, cfg: SynthConfig, tiny_cache: Path
) -> None:
    from anatomap.data.cache import Cache
    from anatomap.data.preprocess import PRESETS, normalise_intensity

    spec = ViewSpec(num_views=2, size=(16, 16, 16), scale=(0.8, 1.2))
    cache = Cache(tiny_cache)
    ref = LocatedViewDataset(cache, cache.subjects, spec, 4)[0]
    ds = SynthViewDataset(toy, cfg, spec, samples_per_epoch=6, seed=1, reuse=2)
    item = ds[3]
    assert set(item) == set(ref)
    for k in ("image", "affine", "modality_mask"):
        assert item[k].dtype == ref[k].dtype and item[k].ndim == ref[k].ndim
    assert item["image"].shape == (2, 1, 16, 16, 16) and isinstance(item["subject"], str)
    again = pickle.loads(pickle.dumps(ds))[3]  # a fresh worker, same index: same sample
    assert all(torch.equal(item[k], again[k]) for k in ("image", "affine", "modality_mask"))
    assert ds[2]["subject"] == item["subject"] != ds[4]["subject"]  # reuse=2
    assert not torch.equal(ds[2]["image"], item["image"])
    # views are located: their centre lies in the subject, RAS as a cache holds it
    sub = ds.cached_subject(3)
    assert geometry.orientation_codes(sub.affine) == "RAS"
    raw, _ = geometry.reorient(ds.subject(3).image, ds.subject(3).affine, "RAS")
    cached = normalise_intensity(raw, PRESETS["mri"])  # what `anatomap data cache` would store
    assert np.allclose(sub.image[0], cached, atol=1e-5)


# -- files -------------------------------------------------------------------------------------


def test_cohort_indexes_caches_and_resumes(
    toy: LabelSource, cfg: SynthConfig, tmp_path: Path
) -> None:
    from anatomap.data.cache import build_cache
    from anatomap.data.manifest import index_directory

    out = tmp_path / "cohort"
    res = write_synth_cohort(out, 3, toy, cfg, seed=4, n_heldout=1, held_out_contrasts=["ct"])
    assert res.written == 3 and res.heldout == ["sub-002"] and res.contrasts["sub-002"] == "ct"
    assert "ct" not in (res.contrasts["sub-000"], res.contrasts["sub-001"])
    index = index_directory(out)
    assert not index.problems, index.problems
    assert [s.subject for s in index.subjects] == res.subjects
    rec = index.subjects[0]
    assert set(rec.images) == {"synth"} and set(rec.labels) == {"labels"} and rec.landmarks
    cache = build_cache(index.subjects, tmp_path / "cache", spacing=2.0, progress=False).cache
    assert len(cache[rec.subject].landmarks) >= 2
    # the written map is the subject's map; a rerun writes nothing
    sub = synth_subject(
        toy, cfg.model_copy(update={"contrasts": [c for c in cfg.contrasts if c != "ct"]}), [4, 0]
    )
    x = geometry.voxel_to_world(sub.affine, np.array([[3.0, 4.0, 5.0], [10.0, 2.0, 7.0]]))
    assert np.allclose(load_synth_map(out, "sub-000")(x), sub.to_template(x))
    assert np.allclose(
        nib.load(out / "images" / "sub-000_synth.nii.gz").get_fdata(), sub.image, atol=1e-6
    )
    assert (
        write_synth_cohort(out, 3, toy, cfg, seed=4, n_heldout=1, held_out_contrasts=["ct"]).reused
        == 3
    )
    assert "heldout" in (out / "splits.csv").read_text()


def test_label_source_from_mask_folder(tmp_path: Path) -> None:
    lab, aff = toy_labels(24)
    folder = tmp_path / "segmentations"
    folder.mkdir()
    for value, name in NAMES.items():
        nib.save(
            nib.Nifti1Image(
                (lab == value).astype(np.uint8) if value != 1 else (lab > 0).astype(np.uint8), aff
            ),
            str(folder / f"{name}.nii.gz"),
        )
    src = LabelSource.from_files(folder)
    assert src.class_names[1] == "body"  # painted first: organs win inside it
    assert (
        src.tables["ct"][0] == -1000.0
        and src.tables["ct"][src.class_names.index("vertebrae_L1")] > 300
    )
    assert len(src.landmark_names) == 4
    s = synth_subject(src, SynthConfig(contrasts=["ct"], svf_scales_mm=[32.0], svf_max_mm=[4.0]), 0)
    assert s.contrast == "ct" and s.image.min() < -500
    assert np.array_equal(pickle.loads(pickle.dumps(src)).classes, src.classes)


def test_brain_template_subject() -> None:
    """The MNI152 source (a few seconds: nilearn's template is loaded once)."""
    brain = LabelSource.brain()
    s = synth_subject(brain, SynthConfig(contrasts=["t2"], real_fraction=0.0), 0)
    names, xyz = s.landmarks
    tissue = brain.labels["tissue"]
    t_vox = np.rint(geometry.world_to_voxel(brain.affine, brain.landmark_mm)).astype(int)
    expect = dict(zip(brain.landmark_names, tissue[tuple(t_vox.T)], strict=True))
    # landmarks off tissue boundaries (their 3x3x3 template neighbourhood is one class): a
    # 2 mm grid cannot place the others on a 1-2 voxel thick cortex every time
    interior = {
        n: bool(np.all(tissue[i - 1 : i + 2, j - 1 : j + 2, k - 1 : k + 2] == expect[n]))
        for n, (i, j, k) in zip(brain.landmark_names, t_vox, strict=True)
    }
    vox = np.rint(geometry.world_to_voxel(s.affine, xyz)).astype(int)
    hits = [s.labels["tissue"][tuple(v)] == expect[n] for n, v in zip(names, vox, strict=True)]
    inner = [h for h, n in zip(hits, names, strict=True) if interior[n]]
    assert len(names) > 100 and np.mean(hits) > 0.75
    assert len(inner) >= 30 and np.mean(inner) >= 0.95
    means = {k: s.image[s.labels["tissue"] == k].mean() for k in (1, 2, 3)}
    assert means[1] > means[2] > means[3]  # T2-like: CSF > GM > WM


# -- several contrast renders of one anatomy -------------------------------------------------


def test_renders_share_one_deformation(toy: LabelSource, cfg: SynthConfig) -> None:
    from anatomap.data.synth.subject import SynthParams, in_memory_subject

    one = synth_subject(toy, cfg, [2, 5])
    three = synth_subject(toy, cfg.model_copy(update={"renders": 3}), [2, 5])
    # the first render is the subject renders=1 draws; the others are new contrasts on it
    assert np.array_equal(one.image, three.image) and one.params.contrast == three.contrast
    assert len(three.images) == 3 and all(im.shape == one.image.shape for im in three.images)
    assert not np.allclose(three.images[1], three.images[2])
    x = geometry.voxel_to_world(one.affine, np.array([[3.0, 4.0, 5.0]]))
    assert np.allclose(one.to_template(x), three.to_template(x))
    back = SynthParams.from_dict(three.params.to_dict())
    assert back == three.params and [r.contrast for r in back.renders] == [
        r.contrast for r in three.params.renders
    ]
    cached = in_memory_subject(three, "s", "mri")
    assert cached.image.shape == (3, *cached.shape) and cached.present.tolist() == [True] * 3


def _cut_channel(sub, c: int, affine: np.ndarray, size: int) -> np.ndarray:
    """Channel ``c`` of ``sub`` sampled on a view's voxel grid (scale 1: plain copy)."""
    ijk = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1).reshape(-1, 3)
    at = geometry.world_to_voxel(sub.affine, geometry.voxel_to_world(affine, ijk.astype(float)))
    at = np.rint(at).astype(int)
    inside = np.all((at >= 0) & (at < np.asarray(sub.shape)), axis=1)
    out = np.zeros(len(at), np.float32)
    out[inside] = np.asarray(sub.image[c])[tuple(at[inside].T)]
    return out.reshape((size,) * 3)


def test_cohort_renders_give_cross_contrast_views(
    toy: LabelSource, cfg: SynthConfig, tmp_path: Path
) -> None:
    from anatomap.data.cache import Cache, build_cache
    from anatomap.data.manifest import index_directory

    out = tmp_path / "cohort"
    two = cfg.model_copy(update={"renders": 2})
    res = write_synth_cohort(out, 3, toy, two, seed=4, n_heldout=1, held_out_contrasts=["ct"])
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == [
        "sub-000_synth.nii.gz",
        "sub-000_synth2.nii.gz",
        "sub-001_synth.nii.gz",
        "sub-001_synth2.nii.gz",
        "sub-002_synth.nii.gz",  # held out: one contrast to evaluate on
    ]
    assert "+" in res.contrasts["sub-000"] and res.contrasts["sub-002"] == "ct"
    index = index_directory(out)
    assert not index.problems, index.problems
    built = build_cache(index.subjects, tmp_path / "cache", spacing=2.0, progress=False).cache
    assert built.modalities == ["synth", "synth2"]
    assert built["sub-002"].present.tolist() == [True, False]
    spec = ViewSpec(size=(12, 12, 12), min_overlap=0.3, modality_per_view=True)
    ds = LocatedViewDataset(built, ["sub-000", "sub-001"], spec, 4, seed=3)
    for k in range(4):
        item = ds[k]
        assert item["image"].shape == (2, 1, 12, 12, 12) and item["modality_mask"].tolist() == [
            True
        ]
        sub = built[item["subject"]]
        # each view is a copy of one channel, and the two views show different channels
        shown = []
        for v in range(2):
            view = item["image"][v, 0].numpy()
            err = [
                np.abs(view - _cut_channel(sub, c, item["affine"][v].numpy(), 12)).max()
                for c in (0, 1)
            ]
            assert min(err) < 1e-5
            shown.append(int(np.argmin(err)))
        assert sorted(shown) == [0, 1]
    # a held-out subject with one render: both views show it
    held = LocatedViewDataset(built, ["sub-002"], spec, 2, seed=3)[0]
    assert held["image"].shape == (2, 1, 12, 12, 12)
    assert Cache(tmp_path / "cache", channels=1)["sub-000"].image.shape[0] == 1
    # fewer renders on a rerun: the extra files go
    write_synth_cohort(out, 3, toy, cfg, seed=4, n_heldout=1, held_out_contrasts=["ct"])
    assert not list((out / "images").glob("*_synth2.nii.gz"))


def test_renders_need_one_modality_per_view() -> None:
    from anatomap.config import RunConfig
    from anatomap.errors import ConfigError
    from anatomap.validation import validate_model

    tree = {"data": {"cache": "c", "synth": {"generator": {"renders": 2}}}}
    with pytest.raises(ConfigError, match="modality_per_view"):
        validate_model(RunConfig, tree, "cfg")
    tree["data"]["modality_per_view"] = True
    assert validate_model(RunConfig, tree, "cfg").data.modality_per_view


def test_cross_modality_share_mixes_same_and_cross_contrast_pairs(
    toy: LabelSource, cfg: SynthConfig
) -> None:
    from anatomap.data.synth.subject import in_memory_subject

    sub = in_memory_subject(
        synth_subject(toy, cfg.model_copy(update={"renders": 2}), [1, 1]), "s", "mri"
    )

    def shown(share: float, k: int) -> list[int]:
        spec = ViewSpec(size=(10, 10, 10), modality_per_view=True, cross_modality=share)
        images, affines = sample_views(sub, spec, np.random.default_rng(k))
        out = []
        for v in range(2):
            err = [
                np.abs(images[v, 0] - _cut_channel(sub, c, affines[v], 10)).max() for c in (0, 1)
            ]
            out.append(int(np.argmin(err)))
        return out

    assert all(len(set(shown(1.0, k))) == 2 for k in range(6))
    assert all(len(set(shown(0.0, k))) == 1 for k in range(6))
    mixed = [len(set(shown(0.5, k))) for k in range(20)]
    assert 1 in mixed and 2 in mixed
