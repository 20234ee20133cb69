"""``examples/finetune_lightning.py``: a Lightning fine-tuning run on top of a tutorial-style
``anatomap export`` (instance norm, 3 outputs), end to end on tiny synthetic volumes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from safetensors.torch import load_file

from anatomap.checkpoint import save_checkpoint
from anatomap.infer.export import export_checkpoint, read_export_info
from anatomap.models.encoders import EncoderSpec, build_encoder

ROOT = Path(__file__).resolve().parents[1]
FIRST_CONV = "model.0.conv.unit0.conv.weight"


def _volumes(folder: Path, n: int) -> list[tuple[Path, Path]]:
    """``n`` 20^3 scans (2 mm, RAS) with three-class label maps."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(20)] * 3, indexing="ij"), -1).astype(np.float32)
    out = []
    for i in range(n):
        centre = rng.uniform(7, 13, 3)
        r = np.sqrt(((grid - centre) ** 2).sum(-1))
        label = (r < 4).astype(np.uint8) + (r < 7).astype(np.uint8)  # 2 core, 1 shell, 0
        image = (label * 0.4 + rng.normal(0, 0.05, label.shape)).astype(np.float32)
        aff = np.diag([2.0, 2.0, 2.0, 1.0])
        pair = (folder / f"s{i}_T1w.nii.gz", folder / f"s{i}_label.nii.gz")
        nib.save(nib.Nifti1Image(image, aff), str(pair[0]))
        nib.save(nib.Nifti1Image(label, aff), str(pair[1]))
        out.append(pair)
    return out


def _csv(path: Path, pairs: list[tuple[Path, Path]]) -> Path:
    path.write_text("image,label\n" + "".join(f"{a},{b}\n" for a, b in pairs))
    return path


def test_lightning_example_fine_tunes_the_export(tmp_path: Path) -> None:
    from monai.networks.nets import UNet

    torch.manual_seed(3)
    encoder = build_encoder(
        EncoderSpec("small_cnn", 3, 1, 8, {"channels": [8, 16], "num_groups": 4})
    )
    ckpt = save_checkpoint(
        tmp_path / "ckpt", encoder, None, {"data": {"modalities": ["T1w"], "spacing": 2.0}}
    )
    export = tmp_path / "unet.safetensors"
    export_checkpoint(
        ckpt, "monai-unet", export, norm="instance", out_channels=3, channels=[8, 16, 32]
    )
    info, exported = read_export_info(export), load_file(str(export))
    pairs = _volumes(tmp_path, 3)
    out = tmp_path / "run"
    argv = [str(ROOT / "examples" / "finetune_lightning.py"), str(export),
            str(_csv(tmp_path / "train.csv", pairs[:2])), "--val",
            str(_csv(tmp_path / "val.csv", pairs[2:])), "--classes", "3", "--patch", "16",
            "--max-epochs", "2", "--freeze-epochs", "1", "--save-top-k", "-1",
            "--accelerator", "cpu", "--devices", "1", "--workers", "0",
            "--out", str(out)]  # fmt: skip
    run = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "saved" in run.stdout

    def weights(epoch: int) -> dict[str, torch.Tensor]:
        (path,) = (out / "checkpoints").glob(f"epoch={epoch}-val_dice=*.ckpt")
        dice = float(re.search(r"val_dice=([0-9.]+)\.ckpt", path.name).group(1))
        assert 0.0 <= dice <= 1.0
        state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        return {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}

    first, second = weights(0), weights(1)
    assert (out / "checkpoints" / "last.ckpt").is_file()
    # The network was loaded from the export: its first convolution is the encoder's, not a
    # fresh initialisation, and it was held during the first (frozen) epoch.
    enc_conv = encoder.state_dict()["backbone.stages.0.conv.unit0.conv.weight"]
    torch.manual_seed(0)
    fresh = UNet(**info["kwargs"]).state_dict()
    assert torch.equal(exported[FIRST_CONV], enc_conv)
    assert not torch.equal(fresh[FIRST_CONV], enc_conv)
    for key in info["pretrained_keys"]:
        assert torch.equal(first[key], exported[key]), key
    # The fresh layers trained from the first epoch, the pretrained ones after the freeze.
    fresh_convs = [k for k in info["initialised_keys"] if k.endswith("conv.weight")]
    assert fresh_convs and all(not torch.equal(first[k], exported[k]) for k in fresh_convs)
    assert not torch.equal(second[FIRST_CONV], exported[FIRST_CONV])
    tuned = load_file(str(out / "finetuned.safetensors"))
    assert torch.equal(tuned[f"net.{FIRST_CONV}"], second[FIRST_CONV])
