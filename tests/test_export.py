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
    transfer_into,
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


def test_an_encoder_weight_with_no_place_is_reported_or_stops_a_strict_export() -> None:
    enc = build_encoder(EncoderSpec("small_cnn", 3, 1, 8, {"channels": [8, 16]}))
    enc.modality_scale = torch.nn.Parameter(torch.ones(1))  # a weight UNet has no place for
    report = transfer(enc, "monai-unet").report
    assert report.not_transferred == {
        "modality_scale": "no counterpart: not part of the encoder's stages"
    }
    assert len(report.key_map) == len(enc.state_dict()) - 3  # all but it and proj.*
    with pytest.raises(ExportError, match="modality_scale"):
        transfer(enc, "monai-unet", strict=True)


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


# --------------------------------------------------------------------------------------------
# The UNet the user asks for: what matches is transferred, and every tensor is accounted for
# --------------------------------------------------------------------------------------------

NORM_KEYS = [f"backbone.stages.{i}.conv.unit{u}.adn.N.{w}" for i in range(3) for u in (0, 1)
             for w in ("weight", "bias")]  # fmt: skip


def _assert_accounted(info: dict, exported: dict, encoder: Encoder) -> None:
    """Each network tensor pretrained xor initialised; each encoder tensor in one list;
    the pretrained ones bit-identical to the encoder's; the counts agree."""
    pre, init = set(info["pretrained_keys"]), set(info["initialised_keys"])
    assert pre | init == set(exported) and not pre & init
    assert len(info["pretrained_keys"]) + len(info["initialised_keys"]) == len(exported)
    enc_state = encoder.state_dict()
    lists = [set(info["key_map"]), set(info["not_transferred"]), set(info["not_exported"])]
    assert set.union(*lists) == set(enc_state) and sum(map(len, lists)) == len(enc_state)
    assert set(info["key_map"].values()) == pre
    for src, dst in info["key_map"].items():
        assert torch.equal(exported[dst], enc_state[src]), (src, dst)
    assert info["counts"] == {
        "network_tensors": len(exported),
        "pretrained": len(pre),
        "initialised": len(init),
        "encoder_tensors": len(enc_state),
        "transferred": len(info["key_map"]),
        "not_transferred": len(info["not_transferred"]),
        "not_exported": 2,
    }


def test_tutorial_unet_instance_norm_three_outputs(cnn_ckpt: Path, tmp_path: Path) -> None:
    from monai.networks.nets import UNet

    out = tmp_path / "inst.safetensors"
    res = export_checkpoint(cnn_ckpt, "monai-unet", out, norm="instance", out_channels=3)
    info, exported = read_export_info(out), load_file(str(out))
    encoder = load_checkpoint(cnn_ckpt).encoder
    _assert_accounted(info, exported, encoder)
    assert info["kwargs"]["norm"] == "instance" and info["kwargs"]["out_channels"] == 3
    # Convolutions (and PReLU slopes) land bit-identical; GroupNorm's affine has no place.
    assert res.matched == 24 and len(info["pretrained_keys"]) == 24
    assert "model.0.conv.unit0.conv.weight" in info["pretrained_keys"]
    assert sorted(info["not_transferred"]) == sorted(NORM_KEYS)
    assert set(info["not_transferred"].values()) == {
        "no counterpart: the UNet's InstanceNorm3d has no affine weights; an affine instance "
        "norm has them"
    }
    assert res.report is not None and res.report.not_transferred == info["not_transferred"]
    # The other tensors are the seeded fresh initialisation (seed 0).
    torch.manual_seed(0)
    fresh = UNet(**info["kwargs"]).state_dict()
    for key in info["initialised_keys"]:
        assert torch.equal(exported[key], fresh[key]), key
    assert not torch.equal(
        exported["model.0.conv.unit0.conv.weight"], fresh["model.0.conv.unit0.conv.weight"]
    )
    with torch.no_grad():
        assert load_export(out).eval()(_x(2, 16)).shape == (1, 3, 16, 16, 16)


def test_batch_norm_unet_takes_the_norm_weights(cnn_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "bn.safetensors"
    export_checkpoint(cnn_ckpt, "monai-unet", out, norm="batch", out_channels=2)
    info, exported = read_export_info(out), load_file(str(out))
    _assert_accounted(info, exported, load_checkpoint(cnn_ckpt).encoder)
    assert info["not_transferred"] == {} and len(info["key_map"]) == 36
    assert "model.0.conv.unit0.adn.N.weight" in info["pretrained_keys"]
    assert "model.0.conv.unit0.adn.N.running_var" in info["initialised_keys"]
    assert info["notes"] == [
        "norm weights copied from the encoder's GroupNorm(4) into the UNet's BatchNorm3d: the "
        "same per-channel scale and shift, another normalisation"
    ]


def test_other_channels_transfer_in_part_and_strict_refuses(cnn_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "wide.safetensors"
    opts = {"norm": "batch", "channels": [8, 16, 32, 64]}  # stage 2 is 16->16, the UNet 16->32
    res = export_checkpoint(cnn_ckpt, "monai-unet", out, **opts)
    info, exported = read_export_info(out), load_file(str(out))
    _assert_accounted(info, exported, load_checkpoint(cnn_ckpt).encoder)
    assert {k.split(".")[2] for k in info["key_map"]} == {"0", "1"}
    missed = info["not_transferred"]
    assert len(missed) == 12 and all(k.startswith("backbone.stages.2.") for k in missed)
    key = "backbone.stages.2.conv.unit1.conv.weight"
    assert missed[key] == "shape differs: encoder [16, 16, 3, 3, 3], UNet [32, 32, 3, 3, 3]"
    prelu = "backbone.stages.2.conv.unit0.adn.A.weight"  # same shape, but its conv did not fit
    assert missed[prelu].startswith("goes with backbone.stages.2.conv.unit0.conv.weight")
    assert res.report is not None
    assert res.report.summary_lines()[1] == (
        "12 encoder tensors not transferred: down layer 2: all the encoder's weights (shape "
        "differs: the UNet's down layers are 2->8->16->32, the encoder's stages 2->8->16->16)"
    )
    with pytest.raises(ExportError) as err:
        export_checkpoint(cnn_ckpt, "monai-unet", tmp_path / "s.safetensors", strict=True, **opts)
    assert "\n" not in str(err.value)
    assert str(err.value).startswith("strict: 12 of 36 encoder tensors do not fit this UNet")
    assert not (tmp_path / "s.safetensors").exists()


def test_nothing_transferred_is_an_error(cnn_ckpt: Path, tmp_path: Path) -> None:
    enc = load_checkpoint(cnn_ckpt).encoder
    with pytest.raises(ExportError, match=r"^no encoder tensor fits this UNet: down layers 0-2"):
        transfer(enc, "monai-unet", norm="batch", channels=[16, 32, 64, 128])
    with pytest.raises(ExportError, match="num_res_units=0 makes the UNet's down layers single"):
        transfer(enc, "monai-unet", num_res_units=0)
    with pytest.raises(ExportError, match="norm 'layer': choose group, group:G, instance"):
        transfer(enc, "monai-unet", norm="layer")
    with pytest.raises(
        ExportError, match=r"channels=\[8, 16, 16, 32\] \(the encoder's .*\): GroupNorm\(3\) needs"
    ):
        transfer(enc, "monai-unet", norm="group:3", out_channels=3)
    with pytest.raises(ExportError, match="norm: options of --to monai-unet only"):
        export_checkpoint(cnn_ckpt, "torchscript", tmp_path / "x.pt", norm="batch")


def test_transfer_into_the_spleen_tutorial_unet(cnn_ckpt: Path) -> None:
    from monai.networks.layers import Norm
    from monai.networks.nets import UNet

    torch.manual_seed(5)
    encoder = build_encoder(EncoderSpec("small_cnn", 3, 1, 16, {}))  # 16, 32, 64, 128
    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256),
               strides=(2, 2, 2, 2), num_res_units=2, norm=Norm.BATCH)  # fmt: skip
    before = {k: v.clone() for k, v in net.state_dict().items()}
    report = transfer_into(net, encoder)
    after, enc_state = net.state_dict(), encoder.state_dict()
    assert report.matched == 48 and report.not_transferred == {} and report.seed is None
    assert set(report.pretrained_keys) | set(report.initialised_keys) == set(after)
    assert len(report.pretrained_keys) + len(report.initialised_keys) == len(after) == 148
    for src, dst in report.key_map.items():
        assert torch.equal(after[dst], enc_state[src]), (src, dst)
    for key in report.initialised_keys:  # left as the user built them
        assert torch.equal(after[key], before[key]), key
    assert str(report).startswith(
        "UNet: 48 of 148 network tensors pretrained (down layers 0-3: all the encoder's "
        "weights), 100 initialised (as built)"
    )
    # From a checkpoint path: a two-channel encoder into a one-channel UNet fits in part.
    other = UNet(3, 1, 4, (8, 16, 16, 32), (2, 2, 2), num_res_units=2)
    part = transfer_into(other, cnn_ckpt)
    assert "backbone.stages.0.conv.unit0.conv.weight" in part.not_transferred
    assert "backbone.stages.0.conv.unit1.conv.weight" in part.key_map  # 8 -> 8 fits
    with pytest.raises(ExportError, match=r"go into monai\.networks\.nets\.UNet"):
        transfer_into(torch.nn.Linear(2, 2), encoder)


def test_cli_prints_the_transfer_summary(cnn_ckpt: Path, tmp_path: Path, capsys) -> None:
    from monai.networks.nets import UNet

    out = tmp_path / "tut.safetensors"
    argv = ["export", str(cnn_ckpt), "--to", "monai-unet", "--out", str(out),
            "--norm", "instance", "--out-channels", "3", "--channels", "8,16,16,32"]  # fmt: skip
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    n = len(UNet(**read_export_info(out)["kwargs"]).state_dict())
    assert lines[1:3] == [
        f"24 of {n} network tensors pretrained (down layers 0-2: convolutions, residual "
        f"convolutions and PReLU weights), {n - 24} initialised (fresh, seed 0)",
        "12 encoder tensors not transferred: down layers 0-2: norm weights (no counterpart: the "
        "UNet's InstanceNorm3d has no affine weights; an affine instance norm has them)",
    ]
    assert lines[3].startswith("not exported: proj.weight, proj.bias: ")
    assert main([*argv, "--strict"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("anatomap: error: strict: 12 of 36") and "\n" not in err


def test_load_export_round_trip_of_a_custom_unet(cnn_ckpt: Path, tmp_path: Path) -> None:
    from monai.networks.nets import UNet

    out = tmp_path / "custom.safetensors"
    export_checkpoint(cnn_ckpt, "monai-unet", out, norm="instance:affine", out_channels=3,
                      channels=[8, 16, 16, 32], strides=[2, 2, 1], dropout=0.1)  # fmt: skip
    info = read_export_info(out)
    assert info["kwargs"]["norm"] == ["instance", {"affine": True}]
    assert info["input"]["size_multiple"] == 4  # 2 * 2 * 1
    # Stride 1 gives the last down layer a 1x1 residual convolution: not transferred.
    assert sorted(info["not_transferred"]) == [
        "backbone.stages.2.residual.bias", "backbone.stages.2.residual.weight"]  # fmt: skip
    assert "backbone.stages.0.conv.unit0.adn.N.weight" in info["key_map"]  # affine: it fits
    net = load_export(out)
    assert isinstance(net, UNet) and list(net.strides) == [2, 2, 1]
    exported = load_file(str(out))
    for key, value in net.state_dict().items():
        assert torch.equal(value, exported[key]), key
    with torch.no_grad():
        assert net.eval()(_x(2, 12)).shape == (1, 3, 12, 12, 12)
