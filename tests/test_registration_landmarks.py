"""Landmark-matching evaluation (anatomap.eval.landmarks) and registration matchers
(anatomap.eval.registration) on small synthetic volumes with exactly known correspondences."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from anatomap import geometry
from anatomap.data.cache import CachedSubject
from anatomap.data.phantoms import blob_volume
from anatomap.eval.landmark_figures import landmark_sections
from anatomap.eval.landmarks import (
    IdentityMatcher,
    LandmarkReport,
    Matcher,
    MatchResult,
    evaluate_matchers,
    landmark_metrics,
    partial_subjects,
)
from anatomap.eval.registration import (
    AffineRegistration,
    BSplineRegistration,
    transform_points_ras,
)
from anatomap.eval.report import write_report

SPACING = 2.0


def make_subject(
    root: Path, sid: str, array: np.ndarray, affine: np.ndarray, landmarks: dict[str, np.ndarray]
) -> CachedSubject:
    """A real CachedSubject on disk (image.npy [1, X, Y, Z] float16 in [0, 1] + meta)."""
    folder = root / sid
    folder.mkdir(parents=True, exist_ok=True)
    a = np.asarray(array, np.float32)
    a = (a - a.min()) / max(float(np.ptp(a)), 1e-6)
    np.save(folder / "image.npy", a[None].astype(np.float16))
    meta = {
        "subject": sid,
        "affine": np.asarray(affine, np.float64).tolist(),
        "shape": list(a.shape),
        "modalities": ["MR"],
        "present": [True],
        "landmarks": {k: [float(x) for x in v] for k, v in landmarks.items()},
    }
    (folder / "meta.json").write_text(json.dumps(meta))
    return CachedSubject(folder, meta)


def rigid(rot_deg: tuple[float, float, float], shift_mm: tuple[float, float, float]) -> np.ndarray:
    """4x4 world (RAS mm) rigid transform: rotations about x, y, z (degrees), then a shift."""
    out = np.eye(4)
    for axis, deg in enumerate(rot_deg):
        c, s = np.cos(np.deg2rad(deg)), np.sin(np.deg2rad(deg))
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(4)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        out = r @ out
    out[:3, 3] = shift_mm
    return out


@pytest.fixture(scope="module")
def blob() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """A 36^3 blob volume at 2 mm (RAS) and 12 landmarks well inside it (world mm)."""
    vol = blob_volume(shape=(36, 36, 36), spacing=(SPACING,) * 3, seed=3, orientation="RAS")
    rng = np.random.default_rng(0)
    ijk = rng.uniform(9, 26, size=(12, 3))
    pts = geometry.voxel_to_world(vol.affine, ijk)
    return vol.array, vol.affine, {f"lm{i:02d}": p for i, p in enumerate(pts)}


def moved_pair(tmp_path: Path, blob, world: np.ndarray) -> tuple[CachedSubject, CachedSubject]:
    """Template = the blob; target = the same voxels placed by ``world @ affine``: the
    template's world point x is the target's world point ``world @ x`` (exactly)."""
    arr, aff, lms = blob
    tpl = make_subject(tmp_path, "tpl", arr, aff, lms)
    moved = {k: geometry.apply_affine(world, v) for k, v in lms.items()}
    tgt = make_subject(tmp_path, "tgt", arr, world @ aff, moved)
    return tpl, tgt


# --------------------------------------------------------------------------------------------
# metrics and evaluation loop
# --------------------------------------------------------------------------------------------


def test_metrics_on_hand_made_errors() -> None:
    m = landmark_metrics(np.array([1.0, 2.0, 4.0, 6.0, 12.0]))
    assert m["mre_mm"] == pytest.approx(5.0)
    assert m["median_mm"] == pytest.approx(4.0)
    assert (m["cpm@3"], m["cpm@5"], m["cpm@10"]) == pytest.approx((0.4, 0.6, 0.8))
    assert m["n_points"] == 5 and m["failed"] == 0
    m = landmark_metrics(np.array([3.0, 5.0, np.nan, 10.0]))  # boundaries count as hits
    assert m["mre_mm"] == pytest.approx(6.0)
    assert (m["cpm@3"], m["cpm@5"], m["cpm@10"]) == pytest.approx((0.25, 0.5, 0.75))
    assert m["failed"] == 1
    assert np.isnan(landmark_metrics(np.zeros(0))["mre_mm"])


class ShiftMatcher:
    """A fake matcher with a known error: every point is moved by ``shift`` mm."""

    def __init__(self, name: str, shift: tuple[float, float, float]) -> None:
        self.name = name
        self.shift = np.asarray(shift, np.float64)
        self.prepared: list[str] = []

    def prepare(self, subject: CachedSubject) -> str:
        self.prepared.append(subject.id)
        return subject.id

    def match(self, template, template_state, points_mm, target, target_state) -> MatchResult:
        assert template_state == template.id and target_state == target.id
        # a translation-free toy: the subjects below share one world frame
        return MatchResult(points_mm + self.shift, np.ones(len(points_mm)))


class FailingMatcher(IdentityMatcher):
    name = "broken"

    def match(self, template, template_state, points_mm, target, target_state):
        raise RuntimeError("no luck")


@pytest.fixture()
def trio(tmp_path: Path, blob) -> dict[str, CachedSubject]:
    """Three subjects in one world frame; ``c`` lacks landmark lm00 (a partial scan)."""
    arr, aff, lms = blob
    out = {s: make_subject(tmp_path, s, arr, aff, lms) for s in ("a", "b")}
    out["c"] = make_subject(tmp_path, "c", arr, aff, {k: v for k, v in lms.items() if k != "lm00"})
    return out


def test_identity_matcher_zero_error_and_known_shift(trio) -> None:
    shift = ShiftMatcher("shift", (3.0, 4.0, 0.0))  # 5 mm error everywhere
    assert isinstance(shift, Matcher) and isinstance(IdentityMatcher(), Matcher)
    rep = evaluate_matchers([IdentityMatcher(), shift], trio, ["a", "b", "c"])
    assert isinstance(rep, LandmarkReport)
    assert len(rep.pairs) == 6
    assert sorted(shift.prepared) == ["a", "b", "c"]  # prepare once per subject
    met = rep.metrics()["matchers"]
    assert met["identity"]["overall"]["mre_mm"] == pytest.approx(0.0, abs=1e-9)
    assert met["identity"]["overall"]["cpm@3"] == 1.0
    assert met["shift"]["overall"]["mre_mm"] == pytest.approx(5.0)
    assert met["shift"]["overall"]["cpm@3"] == 0.0 and met["shift"]["overall"]["cpm@5"] == 1.0
    assert met["identity"]["overall"]["n_points"] == 2 * 12 + 4 * 11  # c lacks one landmark
    t = met["shift"]["timing"]
    assert t["time_per_target_s"] == pytest.approx(t["prepare_s"] + t["match_s"])
    assert set(rep.prepare_s["shift"]) == {"a", "b", "c"}


def test_partial_pairs_and_subsampling(trio) -> None:
    rep = evaluate_matchers([ShiftMatcher("s", (1, 0, 0))], trio, ["a", "b", "c"], partial={"c"})
    met = rep.metrics()
    assert met["n_partial_pairs"] == 2
    assert {(p.template, p.target) for p in rep.pairs if p.partial_target} == {
        ("a", "c"),
        ("b", "c"),
    }
    assert met["matchers"]["s"]["partial_targets"]["n_points"] == 2 * 11
    for p in rep.pairs:  # only landmarks present in both subjects
        assert ("lm00" in p.names) == ("c" not in (p.template, p.target))
    # deterministic, order-independent subsampling shared by all matchers
    r1 = evaluate_matchers([IdentityMatcher()], trio, ["a", "b", "c"], max_points=4, seed=7)
    r2 = evaluate_matchers([IdentityMatcher()], trio, ["c", "b", "a"], max_points=4, seed=7)
    n1 = {(p.template, p.target): p.names for p in r1.pairs}
    n2 = {(p.template, p.target): p.names for p in r2.pairs}
    assert n1 == n2 and all(len(v) == 4 for v in n1.values())
    r3 = evaluate_matchers([IdentityMatcher()], trio, ["a", "b", "c"], max_points=4, seed=8)
    assert n1 != {(p.template, p.target): p.names for p in r3.pairs}


def test_failing_matcher_counts_as_miss(trio) -> None:
    with pytest.warns(UserWarning, match="no luck"):
        rep = evaluate_matchers([FailingMatcher(), IdentityMatcher()], trio, ["a", "b"])
    met = rep.metrics()["matchers"]
    assert met["broken"]["failed_pairs"] == 2
    assert met["broken"]["overall"]["failed"] == 24 and met["broken"]["overall"]["cpm@10"] == 0
    assert met["identity"]["overall"]["mre_mm"] == pytest.approx(0.0, abs=1e-9)


def test_partial_subjects_csv(tmp_path: Path) -> None:
    path = tmp_path / "subjects.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerows([["subject", "split", "partial"], ["s1", "train", "0"], ["s2", "x", "1"]])
    assert partial_subjects(path) == {"s2"}
    path.write_text("subject,split\ns1,train\n")
    assert partial_subjects(path) == set()


def test_sections_and_figures(trio, tmp_path: Path) -> None:
    rep = evaluate_matchers(
        [IdentityMatcher(), ShiftMatcher("shift", (2.0, -1.0, 3.0))],
        trio,
        ["a", "b", "c"],
        partial={"c"},
    )
    (sec,) = landmark_sections(rep)
    assert len(sec.tables) == 2  # overall + partial targets
    _caption, header, rows, better = sec.tables[0]
    assert [r[0] for r in rows] == ["identity", "shift"]
    for col in ("MRE (mm)", "median (mm)", "CPM@3", "CPM@5", "CPM@10", "time/target (s)"):
        assert col in header and col in better
    assert len(sec.figures) == 2
    html = write_report(tmp_path / "rep", "landmarks", [sec], rep.metrics())
    assert html.is_file() and len(list((tmp_path / "rep").glob("figure_*.png"))) == 2


# --------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------


def test_transform_points_ras_lps_convention() -> None:
    import SimpleITK as sitk

    t = sitk.TranslationTransform(3, (-5.0, 0.0, 0.0))  # LPS: -5 along L = +5 along R
    out = transform_points_ras(t, np.array([[1.0, 2.0, 3.0]]))
    np.testing.assert_allclose(out, [[6.0, 2.0, 3.0]])


def test_affine_registration_recovers_translation_along_r(tmp_path: Path, blob) -> None:
    tpl, tgt = moved_pair(tmp_path, blob, rigid((0, 0, 0), (8.0, 0.0, 0.0)))
    pts = np.stack(list(tpl.landmarks.values()))
    m = AffineRegistration()
    res = m.match(tpl, m.prepare(tpl), pts, tgt, m.prepare(tgt))
    d = res.points_mm - pts
    np.testing.assert_allclose(d.mean(0), [8.0, 0.0, 0.0], atol=0.5)  # +R, not +L
    assert np.abs(d - [8.0, 0.0, 0.0]).max() < SPACING


def test_affine_registration_recovers_rigid_motion(tmp_path: Path, blob) -> None:
    tpl, tgt = moved_pair(tmp_path, blob, rigid((4.0, -3.0, 6.0), (5.0, -4.0, 3.0)))
    rep = evaluate_matchers(
        [IdentityMatcher(), AffineRegistration()], {"tpl": tpl, "tgt": tgt}, ["tpl", "tgt"]
    )
    met = rep.metrics()["matchers"]
    assert met["identity"]["overall"]["mre_mm"] > 5.0  # the motion is not trivial
    for pair in rep.pairs:  # both directions, every landmark within one voxel
        assert pair.errors("affine").max() < SPACING, (pair.template, pair.errors("affine"))


def test_bspline_registration_is_accurate_and_deterministic(tmp_path: Path, blob) -> None:
    tpl, tgt = moved_pair(tmp_path, blob, rigid((0.0, 0.0, 5.0), (-4.0, 6.0, 2.0)))
    pts = np.stack(list(tpl.landmarks.values()))
    true = np.stack(list(tgt.landmarks.values()))
    m = BSplineRegistration(bspline_iterations=5)
    a, b = m.prepare(tpl), m.prepare(tgt)
    r1 = m.match(tpl, a, pts, tgt, b)
    assert "failed" not in m.last_info["bspline"], m.last_info
    r2 = m.match(tpl, a, pts, tgt, b)
    # fixed sampling seed: the same result up to multi-threaded summation order
    np.testing.assert_allclose(r1.points_mm, r2.points_mm, atol=1e-6)
    assert np.linalg.norm(r1.points_mm - true, axis=-1).max() < SPACING
    assert np.isnan(r1.scores).all()
