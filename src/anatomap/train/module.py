"""The Lightning module that trains any registered objective, and its data module."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from anatomap.config import RunConfig
from anatomap.data.cache import Cache
from anatomap.data.sampler import EpochSampler, LocatedViewDataset
from anatomap.errors import AnatomapError
from anatomap.models.encoders import EncoderSpec, build_encoder
from anatomap.objectives.registry import get_objective, objective_config


class NonFiniteLossError(AnatomapError):
    """The loss became NaN or Inf; names the step and the batch's subjects."""


def encoder_spec(cfg: RunConfig, in_channels: int) -> EncoderSpec:
    m = cfg.model
    return EncoderSpec(m.name, m.spatial_dims, in_channels, m.embed_dim, dict(m.options))


def lr_factor(step: int, warmup_steps: int, steps_per_epoch: int, decay: float) -> float:
    """Linear warm-up, then exponential decay by ``decay`` per epoch (computed per step)."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return warm * decay ** (step / max(1, steps_per_epoch))


def parameter_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes (order of ``state_dict``)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class PretrainModule(L.LightningModule):
    """Encoder + objective; one optimiser over both; schedule computed per step."""

    def __init__(self, cfg: RunConfig, in_channels: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = build_encoder(encoder_spec(cfg, in_channels))
        params = objective_config(cfg.objective)
        self.objective = get_objective(cfg.objective.name)(params, self.encoder)
        self.rank_fingerprints: list[str] = []

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self.objective(self.encoder, batch)
        loss = out["loss"]
        if not torch.isfinite(loss):
            subjects = sorted(set(batch["subject"]))
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) at step {self.global_step} on subjects "
                f"{', '.join(subjects)}; the last good checkpoint is kept"
            )
        bs = batch["image"].shape[0]
        self.log("loss", loss, prog_bar=True, batch_size=bs)
        for key, value in out.items():
            if key != "loss":
                self.log(f"train/{key}", value, batch_size=bs)
        self.log("lr", self.optimizers().param_groups[0]["lr"], batch_size=bs)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.objective.on_after_step(self.encoder, self.global_step, self.cfg.trainer.max_steps)

    def configure_optimizers(self) -> Any:
        t = self.cfg.trainer
        opt = torch.optim.AdamW(self.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        # One epoch = samples_per_epoch volumes over all ranks.
        spe = steps_per_epoch(self.cfg, self.trainer.world_size if self._trainer else 1)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: lr_factor(step, t.warmup_steps, spe, t.lr_decay)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_end(self) -> None:
        # Every rank reports a fingerprint of its weights; they must agree under DDP.
        digest = parameter_fingerprint(self)
        code = torch.tensor(
            np.frombuffer(bytes.fromhex(digest[:16]), dtype=np.int64).copy(), device=self.device
        )
        gathered = self.all_gather(code)
        self.rank_fingerprints = [
            f"{int(v) & (2**64 - 1):016x}" for v in gathered.reshape(-1).tolist()
        ]


class ViewDataModule(L.LightningDataModule):
    """Training views from a cache (held-out subjects excluded)."""

    def __init__(self, cfg: RunConfig, cache: Cache, subjects: list[str], spec: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.dataset = LocatedViewDataset(
            cache, subjects, spec, cfg.data.samples_per_epoch, seed=cfg.trainer.seed
        )

    def train_dataloader(self) -> DataLoader:
        workers = self.cfg.data.num_workers
        return DataLoader(
            self.dataset,
            batch_size=self.cfg.trainer.batch_size,
            sampler=EpochSampler(len(self.dataset)),
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=len(self.dataset) >= self.cfg.trainer.batch_size,
        )


def steps_per_epoch(cfg: RunConfig, world_size: int = 1) -> int:
    return max(1, math.floor(cfg.data.samples_per_epoch / (cfg.trainer.batch_size * world_size)))


def heldout_file(cfg: RunConfig, config_dir: Path | None = None) -> Path | None:
    """``data.heldout_file`` resolved (relative paths: the working folder, else the config's)."""
    if not cfg.data.heldout_file:
        return None
    path = Path(cfg.data.heldout_file)
    if not path.is_absolute() and config_dir is not None and not path.exists():
        path = config_dir / path
    if not path.is_file():
        raise AnatomapError(f"{path}: data.heldout_file not found")
    return path.resolve()


def heldout_subjects(cfg: RunConfig, config_dir: Path | None = None) -> list[str]:
    """Subjects named in ``data.heldout`` plus those marked held out in ``data.heldout_file``."""
    import csv

    out = list(cfg.data.heldout)
    path = heldout_file(cfg, config_dir)
    if path is not None:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            if not {"subject", "split"} <= set(reader.fieldnames or []):
                raise AnatomapError(f"{path}: data.heldout_file needs columns subject,split")
            for row in reader:
                if (row.get("split") or "").strip().lower() in ("heldout", "test", "val"):
                    out.append(row["subject"])
    return sorted(set(out))
