"""Fine-tune an ``anatomap export`` (monai-unet or swinunetr) for segmentation with Lightning.

Nothing here imports anatomap: the network is rebuilt from the export's JSON sidecar and its
weights loaded with safetensors; the images are read and normalised with MONAI transforms the
way the checkpoint's cache was (RAS, its spacing, its intensity preset); MONAI's DiceCELoss
trains it and DiceMetric validates it (sliding window over whole volumes). The pretrained
tensors (the sidecar's ``pretrained_keys``) can be held for the first epochs while the fresh
decoder settles. Lightning runs it on any accelerator, DDP on several GPUs included.

    anatomap export brain-mri --to monai-unet --norm instance --out-channels 3 \\
        --channels 16,32,64,128,256 --out unet.safetensors
    python examples/finetune_lightning.py unet.safetensors train.csv --val val.csv \\
        --classes 3 --max-epochs 200 --freeze-epochs 10 --accelerator gpu --devices 2

The CSVs have a ``label`` column and one column per input modality, named as in the sidecar's
``input.modalities`` (``image`` stands for the first one); a modality without a column is fed
as zeros. ``--out`` receives Lightning checkpoints (best validation Dice and last) and
``finetuned.safetensors`` (the network's ``state_dict``, plus ``head.*`` when a 1x1
convolution maps its outputs to ``--classes``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

import lightning as L
import monai.networks.nets
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from monai.data import DataLoader, Dataset
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
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
from safetensors.torch import load_file, save_file
from torch import nn


def load_network(export: Path) -> tuple[nn.Module, dict]:
    """The exported MONAI network, rebuilt from its sidecar, weights loaded strictly."""
    info = json.loads(export.with_suffix(".json").read_text())
    cls = getattr(monai.networks.nets, info["network"].rpartition(".")[2])
    net = cls(**info["kwargs"])
    net.load_state_dict(load_file(str(export)), strict=True)
    return net, info


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


def transforms(info: dict, columns: dict[str, str], patch: int | None) -> Compose:
    """Load, orient, resample and normalise as the checkpoint's cache; crop when ``patch``."""
    dims = int(info["kwargs"].get("spatial_dims", 3))
    keys = [*columns.values(), "label"]
    inp = info["input"]
    presets = inp.get("preprocessing") or {}
    out = [
        LoadImaged(keys),
        EnsureChannelFirstd(keys),
        Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
    ]
    if inp.get("spacing"):
        pix = (float(inp["spacing"]),) * dims
        out.append(Spacingd(keys, pix, mode=["bilinear"] * len(columns) + ["nearest"]))
    out += [intensity(c, presets.get(m) or presets.get("*")) for m, c in columns.items()]
    if patch:
        out += [
            SpatialPadd(keys, (patch,) * dims),
            RandSpatialCropd(keys, (patch,) * dims, random_size=False),
        ]
    return Compose(out)


def read_pairs(path: Path, modalities: list[str]) -> tuple[list[dict], dict[str, str]]:
    """Rows of a CSV, and modality -> column for the modalities it has."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    columns = {}
    for i, m in enumerate(modalities):
        column = m if m in rows[0] else "image" if i == 0 else None
        if column and column in rows[0]:
            columns[m] = column
    keys = [*columns.values(), "label"]
    return [{k: r[k] for k in keys} for r in rows], columns


class Segmenter(L.LightningModule):
    """The exported network (plus a 1x1 convolution when its outputs are not the classes)."""

    def __init__(self, net: nn.Module, info: dict, columns: dict[str, str], args) -> None:
        super().__init__()
        self.net = net
        kw = info["kwargs"]
        net_out, dims = int(kw["out_channels"]), int(kw.get("spatial_dims", 3))
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        self.head = nn.Identity() if net_out == args.classes else conv(net_out, args.classes, 1)
        self.modalities = list(info["input"].get("modalities") or ["image"])
        self.columns, self.in_channels = columns, int(kw["in_channels"])
        self.pretrained = {f"net.{k}" for k in info["pretrained_keys"]}
        self.classes, self.roi = args.classes, (args.patch,) * dims
        self.lr, self.encoder_lr_scale = args.lr, args.encoder_lr_scale
        self.freeze_epochs = args.freeze_epochs
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True)
        self.dice = DiceMetric(include_background=False, reduction="mean")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x))

    def _xy(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Modalities in the sidecar's channel order (missing ones as zeros), and the label."""
        y = batch["label"].long()
        x = y.new_zeros((y.shape[0], self.in_channels, *y.shape[2:]), dtype=torch.float32)
        for m, c in self.columns.items():
            x[:, self.modalities.index(m)] = batch[c][:, 0]
        return x, y

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x, y = self._xy(batch)
        loss = self.loss(self(x), y)
        self.log("train_loss", loss, prog_bar=True, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x, y = self._xy(batch)
        logits = sliding_window_inference(x, self.roi, 4, self, overlap=0.25)
        pred = one_hot(logits.argmax(1, keepdim=True), self.classes)
        self.dice(y_pred=pred, y=one_hot(y, self.classes))

    def on_validation_epoch_end(self) -> None:
        self.log("val_dice", self.dice.aggregate().item(), prog_bar=True, sync_dist=True)
        self.dice.reset()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Holding the pretrained tensors: drop their gradients (the optimizer then skips them,
        # weight decay included). requires_grad stays on, so DDP's gradient hooks stay valid.
        if self.current_epoch < self.freeze_epochs:
            for name, p in self.named_parameters():
                if name in self.pretrained:
                    p.grad = None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        named = list(self.named_parameters())
        groups = [
            {"params": [p for n, p in named if n in self.pretrained],
             "lr": self.lr * self.encoder_lr_scale},
            {"params": [p for n, p in named if n not in self.pretrained]},
        ]  # fmt: skip
        return torch.optim.AdamW(groups, lr=self.lr)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("export", type=Path, help="FILE.safetensors written by anatomap export")
    p.add_argument("train", type=Path, help="CSV: label + one column per modality (or image)")
    p.add_argument("--val", type=Path, help="CSV of validation volumes (same columns)")
    p.add_argument("--classes", type=int, required=True, help="label classes, background included")
    p.add_argument("--patch", type=int, default=96, help="training patch / window edge (voxels)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--encoder-lr-scale", type=float, default=0.1, help="LR factor, pretrained")
    p.add_argument("--freeze-epochs", type=int, default=0, help="hold the pretrained tensors")
    p.add_argument("--max-epochs", type=int, default=100)
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps")
    p.add_argument("--save-top-k", type=int, default=1, help="checkpoints kept (-1: every epoch)")
    p.add_argument("--accelerator", default="auto", help="cpu, gpu, ... (Lightning)")
    p.add_argument("--devices", default="auto", help="number of devices or a list (Lightning)")
    p.add_argument("--precision", default="32-true", help="e.g. bf16-mixed (Lightning)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="data loader workers (default: min(4, CPU cores))")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("finetune"))
    args = p.parse_args(argv)
    L.seed_everything(args.seed, workers=True)

    net, info = load_network(args.export)
    modalities = list(info["input"].get("modalities") or ["image"])
    train_rows, columns = read_pairs(args.train, modalities)
    train = DataLoader(Dataset(train_rows, transforms(info, columns, args.patch)),
                       batch_size=args.batch, shuffle=True, num_workers=args.workers)  # fmt: skip
    val = None
    if args.val:
        val_rows, _ = read_pairs(args.val, modalities)
        val = DataLoader(Dataset(val_rows, transforms(info, columns, None)), batch_size=1,
                         num_workers=args.workers)  # fmt: skip
    model = Segmenter(net, info, columns, args)

    best = ModelCheckpoint(
        dirpath=args.out / "checkpoints",
        filename="{epoch}-{val_dice:.4f}" if val else "{epoch}",
        monitor="val_dice" if val else None,
        mode="max",
        save_top_k=args.save_top_k,
        save_last=True,
    )
    devices = int(args.devices) if str(args.devices).isdigit() else args.devices
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=devices,
        precision=args.precision,
        max_epochs=args.max_epochs,
        max_steps=args.max_steps,
        callbacks=[best],
        default_root_dir=args.out,
        log_every_n_steps=1,
        limit_val_batches=1.0 if val else 0,
    )
    trainer.fit(model, train, val)
    out = args.out / "finetuned.safetensors"
    if trainer.is_global_zero:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(out), metadata={"network": info["network"]})
        print(f"saved {out} (best checkpoint: {best.best_model_path or best.last_model_path})")
    return out


if __name__ == "__main__":
    main()
