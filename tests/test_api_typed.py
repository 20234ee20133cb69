"""Issue 16's typed Python API: ``anatomap.embed`` on paths, nibabel images and
``(array, affine)`` pairs; ``anatomap.match`` returning :class:`Matches` (arrays, rows, CSV,
Slicer, DataFrame) and sphere label images on each target's own grid."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from _position_maps import PoolModel
from _position_maps import position_embedding as _embedding

import anatomap
from anatomap import geometry
from anatomap.errors import AnatomapError
from anatomap.infer.embed import DenseEmbedding
from anatomap.infer.matches import Matches
from anatomap.infer.points import read_points
from anatomap.infer.spheres import check_spheres, sphere_labels, sphere_paths

A = np.diag([2.0, 2.0, 2.0, 1.0])
A[:3, 3] = [-40, -50, -30]
B = np.diag([-2.0, 2.0, 2.0, 1.0])  # LAS: voxel indices must follow the affine
B[:3, 3] = [38, -44, -36]
PTS = np.array([[0.0, 0.0, 0.0], [10.0, -20.0, 5.0], [-12.0, 8.0, -6.0]])


@pytest.fixture(scope="module")
def matches() -> Matches:
    t_emb, b_emb = _embedding(A, (40, 48, 36)), _embedding(B, (40, 44, 34), "b.nii.gz")
    return anatomap.match(
        PoolModel(), t_emb, PTS, [b_emb, b_emb], names=["x", "y", "z"], device="cpu"
    )


# -- embed ---------------------------------------------------------------------------------


def test_embed_takes_paths_nibabel_images_and_arrays_alike(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).random((16, 16, 24), np.float32)
    path = tmp_path / "a.nii.gz"
    nib.save(nib.Nifti1Image(arr, B), str(path))
    model = PoolModel()
    by_path = anatomap.embed(model, path, window=16, device="cpu")
    assert isinstance(by_path, DenseEmbedding)
    both = anatomap.embed(model, [nib.load(str(path)), (arr, B)], tmp_path / "e", window=16)
    assert isinstance(both, list) and len(both) == 2
    for emb in both:
        assert torch.equal(emb.fine, by_path.fine) and torch.equal(emb.coarse, by_path.coarse)
        assert np.allclose(emb.fine_affine, by_path.fine_affine)
    # saved under the image's own file name, and image1 for the array
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == [
        "a.emb.safetensors",
        "image1.emb.safetensors",
    ]


@pytest.mark.parametrize(
    "scan, words",
    [
        ((np.zeros((8, 8, 8, 2), np.float32), np.eye(4)), "image0: 4-D image with 2 volumes"),
        ((np.zeros((8, 8, 8), np.float32), np.eye(3)), "image0: the affine must be 4x4"),
        ((np.full((8, 8, 8), np.nan, np.float32), np.eye(4)), "image0: 512 NaN voxel(s)"),
        ((np.zeros((8, 8, 8), np.float32), np.zeros((4, 4))), "image0: zero voxel spacing"),
    ],
    ids=["4d", "affine-shape", "nan", "singular"],
)
def test_in_memory_scans_are_checked_as_files_are(scan: tuple, words: str) -> None:
    with pytest.raises(AnatomapError, match=words.replace("(", r"\(").replace(")", r"\)")):
        anatomap.embed(PoolModel(), scan, device="cpu")


@pytest.mark.parametrize(
    "option, words",
    [
        ({"device": "tpu"}, "device 'tpu'"),
        ({"precision": "fp8"}, "precision 'fp8'"),
        ({"batch_size": 0}, "batch_size 0"),
        ({"overlap": 1.0}, "overlap 1.0"),
    ],
)
def test_bad_options_are_one_line_before_any_scan_is_read(option: dict, words: str) -> None:
    with pytest.raises(AnatomapError, match=words) as info:
        anatomap.embed(PoolModel(), "/no/such/scan.nii.gz", **option)
    assert "\n" not in str(info.value)
    with pytest.raises(AnatomapError, match=words):
        anatomap.match(PoolModel(), "/no/such.nii.gz", PTS, ["/no/b.nii.gz"], **option)


# -- match -----------------------------------------------------------------------------------


def test_match_returns_typed_arrays(matches: Matches) -> None:
    m = matches
    assert list(m.names) == ["x", "y", "z"] and m.targets == ["b.nii.gz", "b.nii.gz"]
    assert m.template_mm.shape == (3, 3) and np.allclose(m.template_mm, PTS)
    assert m.points_mm.shape == (2, 3, 3) and m.voxels.shape == (2, 3, 3)
    assert m.scores.shape == (2, 3) and m.low_confidence.shape == (2, 3)
    assert m.low_confidence.dtype == bool and m.p_within_5mm is None
    # the matches land within a fine voxel (2 mm) of the true position
    assert np.linalg.norm(m.points_mm - PTS, axis=-1).max() <= 2 * math.sqrt(3) + 1e-6
    # voxel indices of the target's own (LAS) grid
    assert np.allclose(geometry.voxel_to_world(B, m.voxels[0]), m.points_mm[0], atol=1e-6)
    assert np.array_equal(m.low_confidence, m.scores < 0.5)


def test_one_target_or_a_list_or_a_tuple_of_them() -> None:
    t_emb, b_emb = _embedding(A, (40, 48, 36)), _embedding(B, (40, 44, 34), "b.nii.gz")
    one = anatomap.match(PoolModel(), t_emb, PTS, b_emb, device="cpu")
    two = anatomap.match(PoolModel(), t_emb, PTS, (b_emb, b_emb), device="cpu")
    assert one.points_mm.shape == (1, 3, 3) and two.points_mm.shape == (2, 3, 3)
    assert np.array_equal(two.points_mm[1], one.points_mm[0])
    with pytest.raises(AnatomapError, match="no targets given"):
        anatomap.match(PoolModel(), t_emb, PTS, [], device="cpu")


def test_rows_csv_json_slicer_and_dataframe_hold_one_table(
    matches: Matches, tmp_path: Path
) -> None:
    rows = matches.rows()
    assert len(rows) == 6 and [r["name"] for r in rows[:3]] == ["x", "y", "z"]
    assert list(rows[0]) == [
        "target",
        "name",
        "template_x",
        "template_y",
        "template_z",
        "x",
        "y",
        "z",
        "i",
        "j",
        "k",
        "score",
        "low_confidence",
        "consistent",
    ]
    assert rows[0]["consistent"] is None  # 3 points: too few for a verdict
    assert rows[4]["x"] == round(float(matches.points_mm[1, 1, 0]), 3)
    assert rows[4]["i"] == round(float(matches.voxels[1, 1, 0]), 2)
    written = matches.save(tmp_path / "m.csv")
    assert written == [tmp_path / "m.csv", tmp_path / "m.csv.json"]
    assert (tmp_path / "m.csv").read_text().splitlines()[0] == ",".join(rows[0])
    names, xyz = read_points(matches.to_slicer(tmp_path / "m.mrk.json"))
    assert names == ["x", "y", "z"] * 2 and np.allclose(
        xyz, matches.points_mm.reshape(-1, 3), 0, 1e-3
    )
    df = matches.to_dataframe()
    assert list(df.columns) == list(rows[0]) and len(df) == 6


def test_gross_failures_among_many_points_are_flagged_inconsistent() -> None:
    """12 points matched by a pure shift, two of them sent far away: the robust affine check
    marks those two inconsistent (and low confidence), the others consistent."""
    from anatomap.infer.match import MatchResult

    rng = np.random.default_rng(0)
    world = rng.uniform(-40, 40, (12, 3))
    found = world + np.array([5.0, -3.0, 2.0])
    found[[2, 7]] += [[60.0, 0.0, 0.0], [0.0, -55.0, 10.0]]
    res = MatchResult(found, np.full(12, 0.9), np.full(12, 0.9))
    from anatomap.infer.consistency import affine_consistency

    c = affine_consistency(world, found, res.scores)
    m = Matches.build(
        [f"p{i}" for i in range(12)], world, ["t"], [res], [None], None, 0.5, c.inliers[None] * 1.0
    )
    assert m.consistent[0].tolist() == [1.0 if i not in (2, 7) else 0.0 for i in range(12)]
    assert np.flatnonzero(m.low_confidence[0]).tolist() == [2, 7]
    assert [r["consistent"] for r in m.rows()][2] is False


def test_to_dataframe_without_pandas_is_one_clear_error(
    matches: Matches, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas -> ImportError
    with pytest.raises(AnatomapError, match=r"needs pandas \(pip install pandas\)"):
        matches.to_dataframe()


def test_match_on_an_in_memory_target_uses_its_own_grid(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    arr = rng.random((24, 16, 16), np.float32)
    aff = np.diag([-1.5, 2.0, 2.0, 1.0])
    aff[:3, 3] = [20, -10, -12]
    img = nib.Nifti1Image(arr, aff)
    m = anatomap.match(
        PoolModel(), img, np.array([[5.0, 10.0, 8.0]]), (arr, aff), voxel=True, window=16
    )
    assert m.targets == ["image0"] and m.points_mm.shape == (1, 1, 3)
    assert np.allclose(m.template_mm, geometry.voxel_to_world(aff, np.array([[5.0, 10, 8]])))
    assert np.allclose(geometry.voxel_to_world(aff, m.voxels[0]), m.points_mm[0], atol=1e-6)
    (path,) = m.to_spheres(tmp_path / "s.nii.gz")
    back = nib.load(str(path))
    assert back.shape == arr.shape and np.allclose(back.affine, aff)


# -- spheres ---------------------------------------------------------------------------------


def test_spheres_round_trip_through_nibabel(matches: Matches, tmp_path: Path) -> None:
    paths = matches.to_spheres(tmp_path / "spheres.nii.gz", radius_mm=3.0)
    assert [p.name for p in paths] == ["spheres_b_1.nii.gz", "spheres_b_2.nii.gz"]
    img = nib.load(str(paths[0]))
    labels = np.asarray(img.dataobj)
    assert img.shape == (40, 44, 34) and np.allclose(img.affine, B)
    assert sorted(np.unique(labels)) == [0, 1, 2, 3]
    for n in range(3):
        ijk = np.argwhere(labels == n + 1)
        dist = np.linalg.norm(
            geometry.voxel_to_world(B, ijk.astype(float)) - matches.points_mm[0, n], axis=1
        )
        assert dist.max() <= 3.0 + 1e-9  # every labelled voxel is inside the sphere ...
        assert len(ijk) >= 7  # ... and a 3 mm sphere on a 2 mm grid holds several
        near = tuple(np.rint(matches.voxels[0, n]).astype(int))
        assert labels[near] == n + 1  # the voxel at the match's i, j, k carries its label


def test_sphere_labels_overlap_small_radius_and_outside() -> None:
    aff = np.eye(4)
    pts = np.array([[5.0, 5, 5], [7.0, 5, 5], [50.0, 5, 5], [np.nan, 0, 0], [2.2, 2.2, 2.2]])
    labels = sphere_labels((12, 12, 12), aff, pts, radius_mm=2.0)
    assert labels[5, 5, 5] == 1 and labels[7, 5, 5] == 2  # each centre is its own
    assert labels[6, 5, 5] in (1, 2) and labels[4, 5, 5] == 1 and labels[8, 5, 5] == 2
    assert labels[2, 2, 2] == 5 and not (labels == 3).any() and not (labels == 4).any()
    tiny = sphere_labels((12, 12, 12), aff, pts[:1] + 0.3, radius_mm=0.1)
    assert np.argwhere(tiny).tolist() == [[5, 5, 5]]  # smaller than a voxel: the nearest one


def test_sphere_names_and_checks(tmp_path: Path) -> None:
    assert sphere_paths("s.nii.gz", ["a/b.nii.gz"]) == [Path("s.nii.gz")]
    assert sphere_paths("o/s.nrrd", ["a/b.nii.gz", "c.emb.safetensors"]) == [
        Path("o/s_b.nrrd"),
        Path("o/s_c.nrrd"),
    ]
    with pytest.raises(AnatomapError, match=r"s\.png: a sphere image must end with"):
        check_spheres(tmp_path / "s.png", 2.0)
    with pytest.raises(AnatomapError, match="sphere radius -1"):
        check_spheres(tmp_path / "s.nii.gz", -1)


def test_spheres_need_a_known_grid(tmp_path: Path) -> None:
    emb = _embedding(A, (40, 48, 36))
    old = DenseEmbedding(emb.coarse, emb.fine, emb.coarse_affine, emb.fine_affine, "old")
    m = anatomap.match(PoolModel(), emb, PTS[:1], old, device="cpu")
    assert np.isnan(m.voxels).all() and m.rows()[0]["i"] is None
    with pytest.raises(AnatomapError, match="old: its image grid is unknown"):
        m.to_spheres(tmp_path / "s.nii.gz")
    assert not list(tmp_path.iterdir())


def test_help_reads_like_a_monai_docstring() -> None:
    for fn in (anatomap.match, anatomap.embed):
        doc = fn.__doc__ or ""
        assert all(f"\n    {s}" in doc for s in ("Args:", "Returns:", "Raises:", "Example::"))
        for name in ("window", "overlap", "batch_size", "device", "precision", "progress"):
            assert name in doc


class OneChannelModel(PoolModel):
    """Trained one modality per view on a two-modality cache: meta lists two modalities,
    the encoder takes one channel (and refuses two, as a real conv would)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Identity()
        self.encoder.in_channels = 1  # type: ignore[assignment]

    @property
    def meta(self) -> dict:
        return {"data": {"modalities": ["synth", "synth2"]}}

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert x.shape[1] == 1, f"fed {x.shape[1]} channels"
        return super().__call__(x)


def test_a_one_channel_model_of_a_two_modality_cache_embeds_in_memory_scans(
    tmp_path: Path,
) -> None:
    arr = np.random.default_rng(1).random((16, 16, 24), np.float32)
    path = tmp_path / "a.nii.gz"
    nib.save(nib.Nifti1Image(arr, B), str(path))
    model = OneChannelModel()
    by_path = anatomap.embed(model, path, window=16, device="cpu")
    by_array = anatomap.embed(model, (arr, B), window=16, device="cpu")
    assert torch.equal(by_array.fine, by_path.fine)
