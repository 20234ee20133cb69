"""Issue 14's transfer evaluation and shipped models: rigid+affine and ANTs SyN matchers,
held-out synthetic targets with exact landmarks, float16 shipped checkpoints by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from anatomap import geometry, zoo
from anatomap.checkpoint import load_model, resolve_checkpoint, save_checkpoint
from anatomap.data.phantoms import blob_volume
from anatomap.errors import CheckpointError
from anatomap.eval.registration import RigidAffineRegistration
from anatomap.eval.registration_ants import SynRegistration, ants_available
from anatomap.infer.zoo import ship_checkpoint, shipped_models
from anatomap.models.encoders import EncoderSpec, build_encoder
from anatomap.objectives.registry import objective_config
from tests.test_registration_landmarks import SPACING, make_subject, rigid


@pytest.fixture(scope="module")
def blob_pair(tmp_path_factory: pytest.TempPathFactory):
    """Template blob and the same voxels under a known rigid motion, with 8 landmarks."""
    root = tmp_path_factory.mktemp("pair")
    vol = blob_volume(shape=(32, 32, 32), spacing=(SPACING,) * 3, seed=3, orientation="RAS")
    ijk = np.random.default_rng(0).uniform(9, 22, size=(8, 3))
    lms = {f"lm{i}": p for i, p in enumerate(geometry.voxel_to_world(vol.affine, ijk))}
    world = rigid((3.0, -4.0, 5.0), (6.0, -3.0, 2.0))
    tpl = make_subject(root, "tpl", vol.array, vol.affine, lms)
    moved = {k: geometry.apply_affine(world, v) for k, v in lms.items()}
    tgt = make_subject(root, "tgt", vol.array, world @ vol.affine, moved)
    return tpl, tgt


def _errors(matcher, tpl, tgt) -> np.ndarray:
    pts = np.stack(list(tpl.landmarks.values()))
    res = matcher.match(tpl, matcher.prepare(tpl), pts, tgt, matcher.prepare(tgt))
    return np.linalg.norm(res.points_mm - np.stack(list(tgt.landmarks.values())), axis=1)


def test_rigid_affine_registration_recovers_rigid_motion(blob_pair) -> None:
    m = RigidAffineRegistration()
    assert _errors(m, *blob_pair).max() < SPACING
    assert "rigid" in m.last_info and "affine" in m.last_info


@pytest.mark.skipif(not ants_available(), reason="antspyx is optional")
def test_ants_syn_maps_template_points_into_the_target(blob_pair) -> None:
    assert _errors(SynRegistration(type_of_transform="Rigid"), *blob_pair).max() < SPACING


def test_transfer_targets_carry_exact_landmarks() -> None:
    from anatomap.data.synth import LabelSource
    from anatomap.eval.transfer import (
        CONDITIONS,
        HELD_OUT_CONTRASTS,
        condition_targets,
        template_subject,
    )

    source = LabelSource.brain()
    tpl = template_subject(source)
    assert len(tpl.landmarks) == len(source.landmark_names)
    cond = next(c for c in CONDITIONS if "held-out" in c and "partial" in c)
    (tgt,), contrasts = condition_targets(source, cond, 1)
    assert contrasts[tgt.id] in HELD_OUT_CONTRASTS
    assert 0 < len(tgt.landmarks) < len(tpl.landmarks)  # the field of view cuts the anatomy
    ijk = geometry.world_to_voxel(tgt.affine, np.stack(list(tgt.landmarks.values())))
    assert geometry.inside(ijk, tgt.image.shape[1:]).all()


@pytest.fixture()
def shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny SAM checkpoint shipped as ``tiny-sam`` in a temporary zoo."""
    from anatomap.objectives.sam import SAM

    torch.manual_seed(0)
    enc = build_encoder(EncoderSpec("small_cnn", 3, 1, 16, {"channels": [8, 16, 32]}))
    params = objective_config({"name": "sam", "embed_dim": 16, "fpn_channels": 8})
    meta = {"objective": "sam", "objective_config": params.model_dump(mode="json"), "step": 3}
    meta["data"] = {"spacing": 2.0, "modalities": ["T1w"]}
    ckpt = save_checkpoint(tmp_path / "run" / "checkpoint", enc, SAM(params, enc), meta)
    monkeypatch.setattr(zoo, "ROOT", tmp_path / "zoo")
    calibration = {"method": "isotonic", "radius_mm": 5.0, "x": [-1.0, 1.0], "y": [0.0, 1.0]}
    ship_checkpoint(ckpt, tmp_path / "zoo" / "tiny-sam", "a test model", calibration)
    return ckpt


def test_shipped_float16_model_loads_by_name_into_float32(shipped: Path) -> None:
    folder = resolve_checkpoint("tiny-sam")
    assert folder == zoo.ROOT / "tiny-sam"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["shipped"]["dtype"] == "float16" and meta["shipped"]["source_step"] == 3
    enc, _, _ = load_model("tiny-sam")
    ref_enc, _, _ = load_model(shipped)
    for a, b in zip(enc.state_dict().values(), ref_enc.state_dict().values(), strict=True):
        assert a.dtype == b.dtype
        if a.is_floating_point():
            assert a.dtype == torch.float32
            torch.testing.assert_close(a, b, atol=2e-3, rtol=1e-3)
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(enc(x).pooled, ref_enc(x).pooled, atol=2e-2, rtol=2e-2)
    assert [m.name for m in shipped_models()] == ["tiny-sam"]
    assert (folder / "model.safetensors").stat().st_size < (
        shipped / "model.safetensors"
    ).stat().st_size


def test_unknown_bare_name_is_still_a_checkpoint_error(shipped: Path) -> None:
    with pytest.raises(CheckpointError):
        resolve_checkpoint("no-such-model")
    assert zoo.model_path("../tiny-sam") is None


def test_the_package_ships_brain_mri() -> None:
    names = [m.name for m in zoo.available()]
    if "brain-mri" not in names:
        pytest.skip("brain-mri is not in this tree")
    m = next(m for m in zoo.available() if m.name == "brain-mri")
    assert m.size_bytes < 10 * 2**20 and (m.path / "MODEL_CARD.md").is_file()


def test_match_by_shipped_name_reports_the_calibrated_probability(
    shipped: Path, tiny_dataset: Path
) -> None:
    from anatomap.api import match

    scans = [tiny_dataset / "sub-04_T1w.nii.gz", tiny_dataset / "sub-05_T1w.nii.gz"]
    pts = np.array([[-10.0, -15.0, -8.0], [-5.0, -10.0, -5.0]])
    rows = match("tiny-sam", scans[0], pts, [scans[1]], window=16).rows()
    assert len(rows) == 2
    for r in rows:  # the test calibration is p = (score + 1) / 2
        assert r["p_within_5mm"] == pytest.approx((r["score"] + 1) / 2, abs=2e-3)
        assert r["low_confidence"] == (r["p_within_5mm"] < 0.5)


def test_calibration_is_monotone_and_checked_by_reliability(tmp_path: Path) -> None:
    from anatomap.infer.calibration import (
        fit_calibration,
        probability,
        reliability,
        reliability_plot,
    )

    rng = np.random.default_rng(0)
    scores = rng.uniform(0, 1, 2000)
    errors = np.where(rng.uniform(0, 1, 2000) < scores, 2.0, 20.0)  # P(hit) = score
    cal = fit_calibration(scores, errors, 5.0)
    p = probability(cal, np.linspace(0, 1, 11))
    assert np.all(np.diff(p) >= 0) and p[0] < 0.2 and p[-1] > 0.8
    rows = reliability(probability(cal, scores), errors <= 5.0)
    assert sum(r["n"] for r in rows) == 2000
    assert all(abs(r["predicted"] - r["observed"]) < 0.1 for r in rows)
    assert reliability_plot(probability(cal, scores), errors <= 5, tmp_path / "r.png").is_file()


def test_models_command_lists_shipped_models(
    shipped: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    from anatomap.cli.models import _add_models

    parser = argparse.ArgumentParser()
    _add_models(parser.add_subparsers())
    args = parser.parse_args(["models", "-v"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "tiny-sam" in out and "a test model" in out and "MODEL_CARD.md" in out


def test_run_transfer_gives_every_matcher_the_same_pairs_and_a_table() -> None:
    """The demo's step 6 path: one held-out target per condition, two matchers; an exact
    oracle (the subject's own landmarks) scores 0 mm and the table lists both."""
    from anatomap.eval.landmarks import MatchResult
    from anatomap.eval.transfer import CONDITIONS, run_transfer, summary_table

    class Oracle:
        name = "oracle"

        def prepare(self, subject):
            return None

        def match(self, tpl, tpl_state, points, tgt, tgt_state):
            at = {n: np.asarray(p) for n, p in tpl.landmarks.items()}
            names = [next(n for n, p in at.items() if np.allclose(p, q)) for q in points]
            pts = np.stack([tgt.landmarks[n] for n in names])
            return MatchResult(pts, np.ones(len(pts)))

    class Shift(Oracle):
        name = "shifted"

        def match(self, *args):
            res = Oracle.match(self, *args)
            return MatchResult(res.points_mm + np.array([3.0, 4.0, 0.0]), res.scores)

    conds = [c for c in CONDITIONS if "held-out" in c]
    results = run_transfer([Oracle(), Shift()], conditions=conds, n_targets=1, max_points=8)
    assert [r.name for r in results] == conds
    for r in results:
        assert r.metrics("oracle")["mre_mm"] < 1e-6
        assert abs(r.metrics("shifted")["mre_mm"] - 5.0) < 1e-6
        assert r.pairs[0].names  # same landmarks for both matchers
    lines = summary_table(results, ["oracle", "shifted"])
    assert len(lines) == 1 + 2 * len(conds) and "5.00" in lines[2]
