"""``anatomap export``: the encoder's weights in MONAI's UNet / SwinUNETR, and TorchScript."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from anatomap.checkpoint import load_checkpoint, save_checkpoint
from anatomap.cli import main
from anatomap.infer.export import (
    ExportError,
    export_checkpoint,
    load_export,
    read_export_info,
    transfer,
)
from anatomap.models.encoders import Encoder, EncoderSpec, build_encoder
from anatomap.objectives.registry import get_objective, objective_config

ROOT = Path(__file__).resolve().parents[1]
SAM_SMALL = {"name": "sam", "crop_size": 16, "fine_anchors": 8, "hard_pool": 8, "hard_keep": 4,
             "embed_dim": 8, "fpn_channels": 8}  # fmt: skip


def _checkpoint(folder: Path, spec: EncoderSpec, seed: int = 123) -> Path:
    """A tiny checkpoint (encoder + SAM heads) built under ``seed``, as training writes it."""
    torch.manual_seed(seed)
    enc = build_encoder(spec)
    params = objective_config(dict(SAM_SMALL))
    obj = get_objective("sam")(params, enc)
    meta = {
        "objective": "sam",
        "objective_config": params.model_dump(),
        "step": 3,
        "data": {"modalities": ["T1w", "T2w"][: spec.in_channels], "spacing": 2.0},
    }
    return save_checkpoint(folder, enc, obj, meta)


@pytest.fixture(scope="module")
def cnn_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = EncoderSpec("small_cnn", 3, 2, 16, {"channels": [8, 16, 16], "num_groups": 4})
    return _checkpoint(tmp_path_factory.mktemp("cnn") / "ckpt", spec)


@pytest.fixture(scope="module")
def swin_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    opts = {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [3, 3, 3, 3], "window_size": 4}
    spec = EncoderSpec("swinunetr", 3, 1, 16, opts)
    return _checkpoint(tmp_path_factory.mktemp("swin") / "ckpt", spec)


def _x(channels: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(
        (1, channels, size, size, size), generator=torch.Generator().manual_seed(seed)
    )


def _assert_every_weight_placed(encoder: Encoder, info: dict, exported: dict) -> None:
    enc_state = encoder.state_dict()
    assert set(info["key_map"]) | set(info["not_exported"]) == set(enc_state)
    assert set(info["not_exported"]) == {"proj.weight", "proj.bias"}
    assert len(set(info["key_map"].values())) == len(info["key_map"])
    for src, dst in info["key_map"].items():
        assert torch.equal(exported[dst], enc_state[src]), (src, dst)


def test_unet_export_holds_every_encoder_weight(cnn_ckpt: Path, tmp_path: Path) -> None:
    from monai.networks.nets import UNet

    out = tmp_path / "unet.safetensors"
    res = export_checkpoint(cnn_ckpt, "monai-unet", out)
    info = read_export_info(out)
    encoder = load_checkpoint(cnn_ckpt).encoder
    exported = load_file(str(out))
    _assert_every_weight_placed(encoder, info, exported)
    assert res.matched == len(info["key_map"]) == len(encoder.state_dict()) - 2
    assert info["network"] == "monai.networks.nets.UNet"

    # Plain MONAI rebuilds it from the sidecar, strictly.
    net = UNet(**info["kwargs"]).eval()
    net.load_state_dict(exported, strict=True)
    torch.manual_seed(0)
    fresh = UNet(**info["kwargs"]).eval()
    x = _x(2, 16)
    with torch.no_grad():
        y, y0 = net(x), fresh(x)
        assert y.shape == (1, info["kwargs"]["out_channels"], 16, 16, 16)
        assert (y - y0).abs().max() > 1e-3  # the pretrained weights change the output
        # The UNet's down path computes exactly the encoder's pyramid.
        levels, h, block = encoder.pyramid(x), x, net.model
        for level in levels:
            h = block[0](h)
            torch.testing.assert_close(h, level)
            block = block[1].submodule
    assert isinstance(load_export(out), UNet)


def test_swinunetr_export_holds_every_encoder_weight(swin_ckpt: Path, tmp_path: Path) -> None:
    from monai.networks.nets import SwinUNETR

    out = tmp_path / "swin.safetensors"
    export_checkpoint(swin_ckpt, "swinunetr", out, out_channels=3)
    info = read_export_info(out)
    encoder = load_checkpoint(swin_ckpt).encoder
    exported = load_file(str(out))
    _assert_every_weight_placed(encoder, info, exported)
    net = SwinUNETR(**info["kwargs"]).eval()
    net.load_state_dict(exported, strict=True)
    torch.manual_seed(0)
    fresh = SwinUNETR(**info["kwargs"]).eval()
    x = _x(1, 64)  # SwinUNETR's instance norms need more than one voxel at stride 32
    with torch.no_grad():
        y, y0 = net(x), fresh(x)
        assert y.shape == (1, 3, 64, 64, 64)
        assert (y - y0).abs().max() > 1e-3
        for mine, theirs in zip(encoder.pyramid(x), net.swinViT(x, net.normalize), strict=True):
            torch.testing.assert_close(mine, theirs)


def test_torchscript_output_equals_the_encoder(cnn_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "enc.pt"
    export_checkpoint(cnn_ckpt, "torchscript", out, size=16)
    extra = {"anatomap.json": ""}
    module = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["anatomap.json"])["outputs"] == ["features", "pooled"]
    encoder = load_checkpoint(cnn_ckpt).encoder
    with torch.no_grad():
        for size in (16, 24):  # the traced size and another multiple of the stride
            x = _x(2, size, seed=size)
            feats, pooled = module(x)
            ref = encoder(x)
            torch.testing.assert_close(feats, ref.features)
            torch.testing.assert_close(pooled, ref.pooled)


def test_export_refuses_encoders_without_a_counterpart(
    cnn_ckpt: Path, swin_ckpt: Path, tmp_path: Path
) -> None:
    with pytest.raises(ExportError, match="no MONAI UNet counterpart"):
        transfer(build_encoder(EncoderSpec("resnet", 3, 1, 8, {"depth": 10})), "monai-unet")
    with pytest.raises(ExportError, match="no SwinUNETR counterpart"):
        export_checkpoint(cnn_ckpt, "swinunetr", tmp_path / "x.safetensors")
    with pytest.raises(ExportError, match="no MONAI UNet counterpart"):
        export_checkpoint(swin_ckpt, "monai-unet", tmp_path / "x.safetensors")
    with pytest.raises(ExportError, match="multiple of 4"):
        export_checkpoint(cnn_ckpt, "monai-unet", tmp_path / "x.safetensors", out_channels=3)
    uneven = build_encoder(EncoderSpec("small_cnn", 3, 1, 8, {"channels": [4, 8]}))
    with pytest.raises(ExportError, match="multiple of 8"):  # GroupNorm(4) in the first stage
        transfer(uneven, "monai-unet")
    assert not (tmp_path / "x.safetensors").exists()


def test_an_encoder_weight_with_no_place_stops_the_export() -> None:
    enc = build_encoder(EncoderSpec("small_cnn", 3, 1, 8, {"channels": [8, 16]}))
    enc.modality_scale = torch.nn.Parameter(torch.ones(1))  # a weight UNet has no place for
    with pytest.raises(ExportError, match="modality_scale"):
        transfer(enc, "monai-unet")


def test_modality_fusion_stems_go_to_torchscript_only(tmp_path: Path) -> None:
    from anatomap.models import encoders

    if not hasattr(encoders, "ModalityFusion"):
        pytest.skip("this encoders.py has no modality_fusion option")
    opts = {"channels": [8, 8], "modality_fusion": "mean", "stem_channels": 8}
    folder = tmp_path / "fused"
    torch.manual_seed(0)
    save_checkpoint(folder, build_encoder(EncoderSpec("small_cnn", 3, 2, 8, opts)), None, {})
    with pytest.raises(ExportError, match="modality_fusion=mean"):
        export_checkpoint(folder, "monai-unet", tmp_path / "x.safetensors")
    export_checkpoint(folder, "torchscript", tmp_path / "f.pt", size=16)
    module, encoder = torch.jit.load(str(tmp_path / "f.pt")), load_checkpoint(folder).encoder
    x = _x(2, 16)
    x[:, 1] = 0  # the second modality missing: the trace must follow the data, not a constant
    with torch.no_grad():
        torch.testing.assert_close(module(x)[0], encoder(x).features)
    stacked = {"channels": [8, 8], "modality_fusion": "stack"}
    enc = build_encoder(EncoderSpec("small_cnn", 3, 2, 8, stacked))
    tr = transfer(enc, "monai-unet")  # "stack" (the default) has no stems: it exports
    assert set(tr.key_map) == {k for k in enc.state_dict() if not k.startswith("proj.")}


def test_cli_export(cnn_ckpt: Path, swin_ckpt: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli.safetensors"
    assert main(["export", str(cnn_ckpt), "--to", "monai-unet", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "not exported: proj.weight" in text and out.is_file()
    assert out.with_suffix(".json").is_file()
    rc = main(["export", str(swin_ckpt), "--to", "monai-unet", "--out", str(tmp_path / "b")])
    assert rc == 2
    assert "no MONAI UNet counterpart" in capsys.readouterr().err


def test_finetune_example_runs_with_plain_monai(
    cnn_ckpt: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    export = tmp_path / "unet.safetensors"
    export_checkpoint(cnn_ckpt, "monai-unet", export)
    images = sorted(tiny_dataset.glob("*_T1w.nii.gz"))
    pairs = tmp_path / "pairs.csv"
    lines = ["image,label"]
    for img in images[:2]:
        lines.append(f"{img},{str(img).replace('_T1w', '_tissue_dseg')}")
    pairs.write_text("\n".join(lines) + "\n")
    script = runpy.run_path(str(ROOT / "examples" / "finetune_monai.py"))
    before = load_file(str(export))
    losses = script["main"](
        [
            str(export),
            str(pairs),
            "--classes", "2", "--steps", "2", "--patch", "16",
            "--out", str(tmp_path / "tuned.safetensors"),
        ]
    )  # fmt: skip
    assert len(losses) == 2 and np.all(np.isfinite(losses))
    tuned = load_file(str(tmp_path / "tuned.safetensors"))
    key = read_export_info(export)["key_map"]["backbone.stages.0.conv.unit0.conv.weight"]
    assert not torch.equal(tuned[f"net.{key}"], before[key])  # the pretrained layers trained
