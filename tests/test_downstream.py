"""Downstream evaluation tasks: region probes, label-efficient segmentation, embedding health."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from anatomap import geometry
from anatomap.checkpoint import load_checkpoint, load_objective, save_checkpoint
from anatomap.data.cache import Cache
from anatomap.errors import AnatomapError
from anatomap.eval.evaluate import evaluate
from anatomap.eval.health import health_metrics, normalised_std, rankme
from anatomap.eval.region import probe_scores, region_task
from anatomap.eval.segmentation import (
    PyramidUNet,
    SegBudget,
    SegVolume,
    dice_per_class,
    finetune,
    predict,
    upsample_logits,
)
from anatomap.eval.tasks import EvalContext
from anatomap.models.encoders import EncoderSpec, build_encoder
from anatomap.objectives.registry import get_objective, objective_config

HELDOUT = ["sub-04", "sub-05"]
TRAIN = ["sub-00", "sub-01", "sub-02", "sub-03"]
SMALL = {
    "crops_per_subject": 12,
    "regions": 4,
    "crops_per_region": 4,
    "seg_steps": 3,
    "seg_crop": 16,
    "seg_batch": 2,
    "seg_regions": 2,
    "seg_labels": ["tissue", "atlas"],
}


@pytest.fixture(scope="module")
def atlas_cache(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny cache with an atlas-like ``aal`` map: four quadrants in world mm."""
    root = tmp_path_factory.mktemp("atlas") / "cache"
    shutil.copytree(tiny_cache, root)
    cache = Cache(root)
    for sid in cache.subjects:
        subj = cache[sid]
        xyz = geometry.world_grid(subj.affine, subj.shape)
        centre = geometry.box_center(subj.affine, subj.shape)
        atlas = 1 + (xyz[..., 0] > centre[0]) + 2 * (xyz[..., 1] > centre[1])
        np.save(subj.root / "label_aal.npy", atlas.astype(np.int32))
        meta = json.loads((subj.root / "meta.json").read_text())
        meta["labels"] = sorted({*meta["labels"], "aal"})
        (subj.root / "meta.json").write_text(json.dumps(meta))
    return root


def _checkpoint(folder: Path, cache: Path) -> Path:
    torch.manual_seed(0)
    spec = EncoderSpec("small_cnn", 3, 2, 16, {"channels": [8, 16]})
    enc = build_encoder(spec)
    params = objective_config({"name": "isimed", "crop_size": 16, "num_crops": 4})
    obj = get_objective("isimed")(params, enc)
    meta = {
        "objective": "isimed",
        "objective_config": params.model_dump(exclude={"name"}),
        "data": {"cache": str(cache), "heldout_subjects": HELDOUT, "train_subjects": TRAIN},
        "step": 0,
    }
    return save_checkpoint(folder, enc, obj, meta)


@pytest.fixture(scope="module")
def ckpt(atlas_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("run") / "checkpoint", atlas_cache)


# ------------------------------------------------------------------ pure parts


def test_rankme_and_collapse_indicators_separate_collapsed_from_spread() -> None:
    rng = np.random.default_rng(0)
    spread = rng.normal(size=(256, 16))
    collapsed = np.tile(rng.normal(size=(1, 16)), (256, 1))
    assert rankme(collapsed) == pytest.approx(1.0, abs=1e-3)
    assert rankme(spread) > 12.0
    assert rankme(np.zeros((8, 4))) == 0.0
    assert normalised_std(collapsed) == pytest.approx(0.0, abs=1e-9)
    assert 0.8 < normalised_std(spread) < 1.2
    h_c, h_s = health_metrics(collapsed), health_metrics(spread)
    assert h_c["monai_effective_rank_score"] > 0.9  # float noise after centring: not exactly 1
    assert h_s["monai_effective_rank_score"] < 0.2
    labels = np.arange(256) % 2
    assert health_metrics(spread, labels)["monai_centroid_similarity"] is not None


def test_probes_separate_separable_classes_and_not_noise() -> None:
    rng = np.random.default_rng(1)
    labels = np.tile(np.repeat(np.arange(4), 10), 3)
    groups = np.repeat(np.arange(3), 40)
    centres = rng.normal(scale=10.0, size=(4, 8))
    feats = centres[labels] + rng.normal(scale=0.1, size=(len(labels), 8))
    for probe in probe_scores(feats, labels, groups).values():
        assert probe.accuracy == 1.0 and probe.macro_f1 == 1.0
    noise = rng.normal(size=feats.shape)
    for probe in probe_scores(noise, labels, groups).values():
        assert probe.accuracy < 0.6


def test_dice_is_one_for_perfect_prediction_and_lower_otherwise() -> None:
    truth = np.zeros((8, 8, 8), np.int64)
    truth[:4] = 1
    truth[4:, :4] = 2
    assert np.allclose(dice_per_class([truth], [truth], 4)[:2], 1.0)
    assert np.isnan(dice_per_class([truth], [truth], 4)[2])  # class 3 absent: skipped
    wrong = truth.copy()
    wrong[:2] = 0
    d = dice_per_class([wrong], [truth], 3)
    assert d[0] == pytest.approx(2 * 128 / (128 + 256)) and d[1] == 1.0


@pytest.mark.parametrize(
    "spec",
    [
        EncoderSpec("small_cnn", 3, 1, 8, {"channels": [8, 16]}),
        EncoderSpec("segresnet", 3, 1, 8, {"init_filters": 4, "blocks_down": [1, 1]}),
    ],
)
def test_pyramid_unet_shapes_and_shared_encoder(spec: EncoderSpec) -> None:
    enc = build_encoder(spec)
    for full in (False, True):
        net = PyramidUNet(enc, 3, full_resolution=full)
        assert net.encoder is enc
        out = net(torch.randn(2, 1, 16, 16, 16))
        assert out.shape == (2, 3, 16, 16, 16)


def test_upsampled_logits_follow_the_feature_affine() -> None:
    feat = torch.randn(1, 2, 5, 6, 7, dtype=torch.float64)
    up = upsample_logits(feat, (10, 12, 14), 2)
    assert torch.allclose(up[..., ::2, ::2, ::2], feat)  # output voxel 2o reads feature voxel o
    mid = (feat[..., 1:2, 0:1, 0:1] + feat[..., 2:3, 0:1, 0:1]) / 2
    assert torch.allclose(up[..., 3:4, 0:1, 0:1], mid)  # output voxel 3: halfway


def test_finetune_learns_a_simple_segmentation() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    image = gaussian_filter(rng.normal(size=(1, 24, 24, 24)), (0, 2, 2, 2))
    image = (image / image.std()).astype(np.float32)
    label = (image > 0.5).astype(np.int64)  # smooth blobs: learnable from the image alone
    vol = SegVolume("s", image, label)
    net = PyramidUNet(build_encoder(EncoderSpec("small_cnn", 3, 1, 8, {"channels": [8, 16]})), 2)
    losses = finetune(net, [vol], 2, SegBudget(steps=25, crop=16, batch=2, lr=1e-2))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    pred = predict(net, image, 16)
    assert pred.shape == label.shape[1:]
    assert dice_per_class([pred], [label[0]], 2)[0] > 0.5


# ------------------------------------------------------------------ through evaluate


def test_downstream_tasks_through_evaluate(ckpt: Path, tmp_path: Path) -> None:
    res = evaluate(ckpt, out=tmp_path / "eval", tasks=["region", "segmentation", "health"], **SMALL)
    names = ["isimed (pretrained)", "random init"]
    region = res.metrics["region"]
    assert region["split"] == "leave-one-subject-out" and len(region["regions"]) == 4
    for n in names:
        for v in region["encoders"][n].values():
            assert 0.0 <= v <= 1.0
    health = res.metrics["health"]
    assert health["class_label"] == "tissue"
    for n in names:
        h = health["encoders"][n]
        assert 1.0 <= h["rankme"] <= min(health["crops"], health["embed_dim"])
        assert 0.0 <= h["monai_effective_rank_score"] <= 1.0
    seg = res.metrics["segmentation"]
    assert seg["crop"] == 16 and seg["steps"] == 3
    assert set(seg["label_sets"]) == {"tissue", "atlas"}
    for ls in seg["label_sets"].values():
        assert ls["finetune_subjects"]["3"][:1] == ls["finetune_subjects"]["1"]
        assert not set(ls["finetune_subjects"]["3"]) & set(HELDOUT)
        for init in ("isimed (pretrained)", "scratch"):
            for v in ls["mean_dice"][init].values():
                assert 0.0 <= v <= 1.0
    html = res.report.read_text()
    for title in ("Region classification", "Label-efficient segmentation", "Embedding health"):
        assert title in html


def test_without_an_atlas_region_is_skipped_or_explains(tiny_cache: Path, tmp_path: Path) -> None:
    plain = _checkpoint(tmp_path / "checkpoint", tiny_cache)
    opts = {k: v for k, v in SMALL.items() if k != "seg_labels"}  # default: tissue only
    res = evaluate(plain, out=tmp_path / "eval", all_tasks=True, **opts)  # all that apply
    assert "region" not in res.metrics and "health" in res.metrics
    assert set(res.metrics["segmentation"]["label_sets"]) == {"tissue"}
    ckpt = load_checkpoint(plain)
    ctx = EvalContext(ckpt, load_objective(ckpt), Cache(tiny_cache), HELDOUT, 0, SMALL)
    with pytest.raises(AnatomapError, match="label map 'aal'"):
        region_task(ctx)
