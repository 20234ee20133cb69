"""Multi-modal subjects through the pipeline: grid checks and resampling to the reference
modality, encoders over a variable set of modalities, and the missing-modality robustness
task against an ISImed run on the stacked modalities."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from anatomap.checkpoint import load_checkpoint, save_checkpoint
from anatomap.config import load_config
from anatomap.data.cache import build_cache
from anatomap.data.manifest import index_directory, read_manifest, write_manifest
from anatomap.errors import ConfigError
from anatomap.models.encoders import (
    EncoderSpec,
    ModalityFusion,
    build_encoder,
    list_encoders,
    modality_presence,
)

MIN_SIZE = {"swinunetr": 32, "resnet": 32}
SMALL_OPTIONS = {
    "small_cnn": {"channels": [8, 16, 32]},
    "resnet": {"depth": 10},
    "segresnet": {"init_filters": 8},
    "swinunetr": {"feature_size": 12, "num_heads": [3, 3, 3, 3]},
}


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


# ----------------------------------------------------------------------------- encoders


def test_modality_presence_and_mean_fusion() -> None:
    torch.manual_seed(0)
    x = torch.rand(3, 2, 8, 8, 8) + 0.1
    x[1, 1] = 0  # sample 1 lacks modality 1
    x[2] = 0  # sample 2 lacks everything
    assert modality_presence(x).tolist() == [[True, True], [True, False], [False, False]]
    fuse = ModalityFusion(3, 2, 4)
    out = fuse(x)
    s0, s1 = fuse.stems[0](x[:, :1]), fuse.stems[1](x[:, 1:])
    torch.testing.assert_close(out[0], (s0[0] + s1[0]) / 2)
    torch.testing.assert_close(out[1], s0[1])  # the missing modality does not dilute
    torch.testing.assert_close(out[2], (s0[2] + s1[2]) / 2)


@pytest.mark.parametrize("encoder", list_encoders())
def test_every_encoder_takes_mean_fusion(encoder: str, tmp_path: Path) -> None:
    size = MIN_SIZE.get(encoder, 16)
    opts = {**SMALL_OPTIONS.get(encoder, {}), "modality_fusion": "mean", "stem_channels": 8}
    torch.manual_seed(0)
    enc = build_encoder(EncoderSpec(encoder, 3, 3, 12, opts)).eval()
    x = torch.rand(2, 3, size, size, size)
    x[1, 2] = 0
    out = enc(x)
    assert out.pooled.shape == (2, 12) and torch.isfinite(out.pooled).all()
    levels = enc.pyramid(x)
    assert [t.shape[1] for t in levels] == enc.pyramid_channels
    assert [size // t.shape[2] for t in levels] == enc.pyramid_strides
    save_checkpoint(tmp_path / "c", enc, torch.nn.Linear(1, 1), {"objective": "x"})
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(tmp_path / "c").encoder(x).pooled, out.pooled)


def test_fusion_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="modality_fusion"):
        build_encoder(EncoderSpec("small_cnn", 3, 2, 8, {"modality_fusion": "sum"}))
    with pytest.raises(ConfigError, match="stem_channels"):
        build_encoder(EncoderSpec("small_cnn", 3, 2, 8, {"stem_channels": 4}))
    # stack (the default) is the plain encoder: same parameters as before
    torch.manual_seed(0)
    a = build_encoder(EncoderSpec("small_cnn", 3, 2, 8, {"channels": [8, 16]}))
    torch.manual_seed(0)
    b = build_encoder(
        EncoderSpec("small_cnn", 3, 2, 8, {"channels": [8, 16], "modality_fusion": "stack"})
    )
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


# ----------------------------------------------------------------------------- manifest, cache


def _world_function(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """A smooth function of world position (so any grid samples the same field)."""
    from anatomap import geometry

    w = geometry.world_grid(affine, shape)
    return (2.0 + np.sin(w[..., 0] / 9.0) + np.cos(w[..., 1] / 7.0) + w[..., 2] / 40.0).astype(
        np.float32
    )


def test_resample_to_reference_modality(tmp_path: Path) -> None:
    root = tmp_path / "scans"
    fine = np.diag([2.0, 2.0, 2.0, 1.0])
    fine[:3, 3] = [-23.0, -23.0, -23.0]
    coarse = np.diag([4.0, 4.0, 4.0, 1.0])
    coarse[:3, 3] = [-22.0, -22.0, -22.0]  # same field of view, half the resolution
    write_nifti(root / "s1_T1w.nii.gz", _world_function(fine, (24, 24, 24)), fine)
    write_nifti(root / "s1_T2w.nii.gz", _world_function(coarse, (12, 12, 12)), coarse)
    write_nifti(root / "s1_tissue_dseg.nii.gz", np.ones((12, 12, 12), np.uint8), coarse)
    write_nifti(root / "s2_T1w.nii.gz", _world_function(fine, (24, 24, 24)), fine)

    strict = index_directory(root)
    assert {Path(p.path).name for p in strict.problems} == {
        "s1_T2w.nii.gz",
        "s1_tissue_dseg.nii.gz",
    }
    assert all("grid differs" in p.reason for p in strict.problems)

    res = index_directory(root, resample=True, reference="T1w")
    assert not res.problems
    s1, s2 = res.subjects
    assert s1.reference == "T1w" and set(s1.resampled) == {"T2w", "label:tissue"}
    assert s2.missing == ["T2w"] and not s2.resampled
    write_manifest(res, tmp_path / "m.jsonl")
    back = read_manifest(tmp_path / "m.jsonl")
    assert back[0].resampled == s1.resampled and back[0].reference == "T1w"

    cache = build_cache(
        tmp_path / "m.jsonl", tmp_path / "c", preset="none", spacing=None, progress=False
    ).cache
    assert cache.modalities == ["T1w", "T2w"]
    sub = cache["s1"]
    assert sub.shape == (24, 24, 24) and sub.present.tolist() == [True, True]
    assert set(sub.meta["resampled"]) == {"reference", "T2w", "label:tissue"}
    img = np.asarray(sub.image, np.float32)
    inner = (slice(3, -3),) * 3  # away from the border, where trilinear needs both sides
    err = np.abs(img[0][inner] - img[1][inner])
    assert err.mean() < 0.05 * img[0][inner].mean()  # same field on the reference grid
    assert sub.label("tissue").shape == (24, 24, 24)
    assert cache["s2"].present.tolist() == [True, False]
    assert not np.asarray(cache["s2"].image[1]).any()
    # a single-modality cache of the same manifest: the recipe's channel choice
    single = build_cache(
        tmp_path / "m.jsonl",
        tmp_path / "c1",
        preset="none",
        spacing=None,
        progress=False,
        modalities=["T1w"],
    ).cache
    assert single.modalities == ["T1w"] and single["s1"].image.shape[0] == 1


# ----------------------------------------------------------------------------- robustness


def _pretrain(cache: Path, out: Path, config: str, overrides: list[str]) -> Path:
    from anatomap.api import config_path
    from anatomap.train.pretrain import pretrain

    cfg = load_config(
        config_path(config),
        [
            f"data.cache={cache}",
            "data.heldout=[sub-04,sub-05]",
            "data.num_workers=0",
            "data.samples_per_epoch=4",
            "model.options={channels: [8, 16, 32]}",
            "trainer.max_steps=2",
            "trainer.batch_size=2",
            "trainer.progress=false",
            f"output={out}",
            *overrides,
        ],
    )
    return pretrain(cfg).run_dir


def test_robustness_task_with_compare(tiny_cache: Path, tmp_path: Path) -> None:
    from anatomap.eval.evaluate import evaluate

    topo = _pretrain(
        tiny_cache,
        tmp_path / "topo",
        "topo",
        [
            "objective.crop_size=16",
            "objective.anchors=16",
            "objective.candidates=128",
            "objective.coarse_level=1",
            "objective.inter_start_step=0",
        ],
    )
    isimed = _pretrain(
        tiny_cache, tmp_path / "isimed", "isimed_multimodal", ["objective.crop_size=16"]
    )
    res = evaluate(
        topo,
        tasks=["robustness"],
        crops_per_subject=8,
        compare={"isimed (stacked)": str(isimed)},
        out=tmp_path / "eval",
    )
    rob = res.metrics["robustness"]
    assert rob["modalities"] == ["T1w", "T2w"]
    names = ["topo (pretrained)", "isimed (stacked)"]
    assert list(rob["position"]) == names
    for name in names:
        conds = rob["position"][name]
        assert list(conds) == ["all modalities", "without T1w", "without T2w"]
        for m in ("T1w", "T2w"):
            d = rob["drop"][name][m]["mean_error_mm"]
            expect = (
                conds[f"without {m}"]["mean_error_mm"] - conds["all modalities"]["mean_error_mm"]
            )
            assert d == pytest.approx(expect)
        # dropping a modality changes the embedding, hence the readout
        assert conds["without T2w"] != conds["all modalities"]
    html = (tmp_path / "eval" / "report.html").read_text()
    assert "Missing-modality robustness" in html and "without T2w" in html
    # robustness applies by default to any checkpoint on a multi-modal cache, and only there
    from types import SimpleNamespace

    from anatomap.checkpoint import load_objective
    from anatomap.data.cache import Cache
    from anatomap.eval.robustness import _applies
    from anatomap.eval.tasks import EvalContext

    for run in (topo, isimed):
        ck = load_checkpoint(run)
        assert _applies(EvalContext(ck, load_objective(ck), Cache(tiny_cache), ["sub-04"]))
    single = SimpleNamespace(modalities=["T1w"])
    assert not _applies(EvalContext(ck, load_objective(ck), single, ["sub-04"]))  # type: ignore[arg-type]
