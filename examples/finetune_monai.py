"""Fine-tune an ``anatomap export`` (monai-unet or swinunetr) for segmentation with plain MONAI.

Nothing here imports anatomap: the network is rebuilt from the export's JSON sidecar, the
images are read and normalised with MONAI transforms the way the checkpoint's cache was
(RAS, its spacing, its intensity preset), and a few steps of Dice + cross-entropy train it.

    anatomap export runs/sam --to monai-unet --out unet.safetensors
    python examples/finetune_monai.py unet.safetensors pairs.csv --classes 3 --steps 2000

``pairs.csv`` has a ``label`` column and one column per input modality, named as in the
sidecar's ``input.modalities`` (``image`` stands for the first one); a modality without a
column is fed as zeros, as anatomap does for a missing modality.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import monai.networks.nets
import torch
from monai.data import DataLoader, Dataset
from monai.losses import DiceCELoss
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    Orientationd,
    RandSpatialCropd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SpatialPadd,
)
from monai.utils import set_determinism
from safetensors.torch import load_file, save_file
from torch import nn


class Segmenter(nn.Module):
    """The exported network, plus a 1x1 convolution when its outputs are not the classes."""

    def __init__(self, net: nn.Module, net_out: int, classes: int, dims: int) -> None:
        super().__init__()
        self.net = net
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        self.head = nn.Identity() if net_out == classes else conv(net_out, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x))


def intensity(key: str, preset: dict | None):
    """The checkpoint's intensity preset for one modality as a MONAI transform."""
    preset = preset or {"kind": "mri"}
    if preset["kind"] == "ct":
        return ScaleIntensityRanged(key, preset.get("hu_min", -1000), preset.get("hu_max", 1000),
                                    0.0, 1.0, clip=True)  # fmt: skip
    if preset["kind"] == "mri":
        return ScaleIntensityRangePercentilesd(
            key, preset.get("lower_percentile", 0.5), preset.get("upper_percentile", 99.5),
            0.0, 1.0, clip=True,
        )  # fmt: skip
    return Compose([])


def main(argv: list[str] | None = None) -> list[float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("export", type=Path, help="FILE.safetensors written by anatomap export")
    p.add_argument("pairs", type=Path, help="CSV: label + one column per modality (or image)")
    p.add_argument("--classes", type=int, required=True, help="label classes, background included")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--patch", type=int, default=64, help="training patch edge (voxels)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--encoder-lr-scale", type=float, default=0.1, help="LR factor, pretrained")
    p.add_argument("--out", type=Path, default=Path("finetuned.safetensors"))
    args = p.parse_args(argv)
    set_determinism(seed=0)

    # 1. The network: MONAI class + constructor arguments from the sidecar, weights strictly.
    info = json.loads(args.export.with_suffix(".json").read_text())
    cls = getattr(monai.networks.nets, info["network"].rpartition(".")[2])
    net = cls(**info["kwargs"])
    net.load_state_dict(load_file(str(args.export)), strict=True)
    dims = int(info["kwargs"].get("spatial_dims", 3))
    model = Segmenter(net, info["kwargs"]["out_channels"], args.classes, dims)

    # 2. Data: the checkpoint's orientation, spacing and intensity preset.
    inp = info["input"]
    modalities = inp.get("modalities") or ["image"]
    with open(args.pairs, newline="") as fh:
        rows = list(csv.DictReader(fh))
    columns = {m: (m if m in rows[0] else "image" if i == 0 else None) for i, m in
               enumerate(modalities)}  # fmt: skip
    used = {m: c for m, c in columns.items() if c and c in rows[0]}
    keys = [*used.values(), "label"]
    spacing = inp.get("spacing")
    presets = inp.get("preprocessing") or {}
    transforms = [
        LoadImaged(keys),
        EnsureChannelFirstd(keys),
        Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
    ]
    if spacing:
        pix = (float(spacing),) * dims
        transforms.append(Spacingd(keys, pix, mode=["bilinear"] * len(used) + ["nearest"]))
    for m, c in used.items():
        transforms.append(intensity(c, presets.get(m) or presets.get("*")))
    transforms += [
        SpatialPadd(keys, (args.patch,) * dims),
        RandSpatialCropd(keys, (args.patch,) * dims, random_size=False),
    ]
    data = Dataset([{k: r[k] for k in keys} for r in rows], Compose(transforms))
    loader = DataLoader(data, batch_size=args.batch, shuffle=True, num_workers=0)

    # 3. Training: pretrained layers at a lower learning rate.
    pretrained = {f"net.{k}" for k in info["pretrained_keys"]}
    groups = [
        {"params": [p for n, p in model.named_parameters() if n in pretrained],
         "lr": args.lr * args.encoder_lr_scale},
        {"params": [p for n, p in model.named_parameters() if n not in pretrained]},
    ]  # fmt: skip
    opt = torch.optim.AdamW(groups, lr=args.lr)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    in_channels = int(info["kwargs"]["in_channels"])
    losses: list[float] = []
    model.train()
    while len(losses) < args.steps:
        for batch in loader:
            label = batch["label"].long()
            x = torch.zeros((label.shape[0], in_channels, *label.shape[2:]))
            for m, c in used.items():
                x[:, modalities.index(m)] = batch[c][:, 0]
            loss = loss_fn(model(x), label)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            print(f"step {len(losses)}: loss {losses[-1]:.4f}")
            if len(losses) >= args.steps:
                break
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.out))
    print(f"saved {args.out}")
    return losses


if __name__ == "__main__":
    main()
