"""``anatomap pretrain``: build everything from a config and train with Lightning.

A run folder holds ``config.yaml`` (resolved), ``logs/metrics.csv`` and TensorBoard events
(``tb/``), ``checkpoint/`` (the latest safetensors checkpoint, see
:mod:`anatomap.checkpoint`), ``lightning/last.ckpt`` (full trainer state for
``--resume``) and ``ranks.json`` (each DDP rank's weight fingerprint at the end).
"""

from __future__ import annotations

import csv
import ctypes
import json
import logging
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from anatomap.checkpoint import save_checkpoint
from anatomap.config import RunConfig, dump_config
from anatomap.data.cache import Cache
from anatomap.errors import AnatomapError
from anatomap.io.atomic import atomic_write_json, atomic_write_text
from anatomap.io.lock import holds_lock
from anatomap.train.module import (
    PretrainModule,
    ViewDataModule,
    encoder_spec,
    heldout_file,
    heldout_subjects,
)
from anatomap.train.resume import SafeCheckpointIO, load_resume_file


class _DropAdverts(logging.Filter):
    """Lightning prints a cloud-logging advert at every start; keep the console about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdverts())
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
warnings.filterwarnings("ignore", message=r".*all_gather is deprecated.*")


def resolve_precision(precision: str) -> str:
    """``auto``: bf16 (or fp16) autocast on CUDA, full fp32 on CPU."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


class SafetensorsCheckpoint(Callback):
    """Writes ``RUN/checkpoint`` (safetensors + JSON) every N steps and at the end (rank 0)."""

    def __init__(self, folder: Path, every: int, meta: dict[str, Any]) -> None:
        self.folder = folder
        self.every = every
        self.meta = meta

    def _save(self, trainer: L.Trainer, module: PretrainModule) -> None:
        if trainer.is_global_zero:
            meta = {**self.meta, "step": int(trainer.global_step)}
            save_checkpoint(self.folder, module.encoder, module.objective, meta)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        if trainer.global_step % self.every == 0:
            self._save(trainer, module)

    def on_train_end(self, trainer, module) -> None:  # type: ignore[override]
        self._save(trainer, module)
        # The resume file matches the final weights too (all ranks take part in saving).
        trainer.save_checkpoint(
            str(self.folder.parent / "lightning" / "last.ckpt"), weights_only=False
        )


def reuse_freed_memory() -> None:
    """Keep freed memory in this process (glibc ``mallopt``: no mmap'ed blocks, no trimming).

    glibc hands large freed blocks back to the OS, so every CPU training step faults its
    activations in again: 150-200 MB of page faults a step for the packaged ISImed and SAM
    configs, about 10% of the step's CPU time (``benchmarks/train_speed.py``). The process
    then keeps its peak heap, which the next step reuses. A no-op off glibc."""
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # another C library (musl): nothing to tune
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not mallopt(m_mmap_threshold, 1 << 30):
        mallopt(m_mmap_threshold, 32 << 20)  # glibc's ceiling on older versions
    mallopt(m_trim_threshold, (1 << 31) - 1)


@dataclass
class PretrainResult:
    run_dir: Path
    checkpoint: Path
    steps: int
    rank_fingerprints: list[str]
    is_global_zero: bool = True


def _meta(
    cfg: RunConfig, cache: Cache, train: list[str], heldout: list[str], split: Path | None
) -> dict[str, Any]:
    return {
        "objective": cfg.objective.name,
        "objective_config": cfg.objective_params.model_dump(mode="json"),
        "config": cfg.model_dump(mode="json"),
        "data": {
            "cache": str(cache.root.resolve()),
            "fingerprint": cache.fingerprint(),
            "modalities": cache.modalities,
            "spacing": cache.spacing,
            "preprocessing": cache.info.get("presets"),
            "train_subjects": train,
            "heldout_subjects": heldout,
            "heldout_file": str(split) if split else None,
            "modality_per_view": cfg.data.modality_per_view,
        },
    }


def _same_data(run: Path, cache: Cache) -> None:
    """On ``--resume``: the cache must be the one the run was trained on (``run.json``)."""
    try:
        data = json.loads((run / "run.json").read_text())["data"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no record of the data (a run from an older anatomap): nothing to compare
    if data.get("fingerprint") != cache.fingerprint() or data.get("modalities") != cache.modalities:
        raise AnatomapError(
            f"{run}: trained on cache {data.get('cache')} (fingerprint {data.get('fingerprint')}"
            f", modalities {data.get('modalities')}), but data.cache={cache.root} has "
            f"fingerprint {cache.fingerprint()}, modalities {cache.modalities}; resume with "
            "the same cache, or start a new run"
        )


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, keeping an existing ``metrics.csv`` (Lightning deletes it): a
    resumed run appends its rows, so the log of the steps before the kill is not lost."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = list(next(csv.reader(f), []))


class _AppendingCSVLogger(CSVLogger):
    """``CSVLogger`` whose writer appends to the run's ``logs/metrics.csv``."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class StepProgressBar(RichProgressBar):
    """Lightning's Rich bar, described by steps: a run bounded by ``max_steps`` has
    ``max_epochs=-1``, which Lightning's bar printed as "Epoch 11/-2"."""

    def _get_train_description(self, current_epoch: int) -> str:
        done, total = int(self.trainer.global_step), int(self.trainer.max_steps)
        last = min(total, done + int(self.total_train_batches or 0))
        return f"Epoch {current_epoch} (steps {done + 1}-{last} of {total})"


def _progress_bars(enabled: bool) -> list[Callback]:
    """The step-described bar when progress is on (none without ``rich``: Lightning's own)."""
    if not enabled:
        return []
    try:
        return [StepProgressBar()]
    except ModuleNotFoundError:
        return []


def _trainer(cfg: RunConfig, run: Path, meta: dict[str, Any], resume: bool = False) -> L.Trainer:
    """The Lightning trainer of a run: loggers, checkpoints (resume file + safetensors)."""
    t = cfg.trainer
    return L.Trainer(
        default_root_dir=str(run),
        max_steps=t.max_steps,
        max_epochs=-1,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=resolve_precision(t.precision),
        gradient_clip_val=t.grad_clip,
        log_every_n_steps=min(t.log_every, t.max_steps),
        enable_progress_bar=t.progress,
        enable_model_summary=False,
        logger=[
            (_AppendingCSVLogger if resume else CSVLogger)(str(run), name="logs", version=""),
            TensorBoardLogger(str(run), name="tb", version="", default_hp_metric=False),
        ],
        callbacks=[
            ModelCheckpoint(
                dirpath=str(run / "lightning"),
                save_top_k=0,
                save_last=True,
                every_n_train_steps=t.checkpoint_every,
            ),
            SafetensorsCheckpoint(run / "checkpoint", t.checkpoint_every, meta),
            *_progress_bars(t.progress),
        ],
        num_sanity_val_steps=0,
        deterministic=False,
        # EpochSampler shards the indices itself, so its resume position survives DDP
        use_distributed_sampler=False,
        plugins=[SafeCheckpointIO()],
    )


@holds_lock(lambda cfg, **_: Path(cfg.output), "training run")  # one writer per run folder
def pretrain(
    cfg: RunConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    config_dir: Path | None = None,
) -> PretrainResult:
    """Train ``cfg``; returns the run folder and the path of its checkpoint."""
    run = Path(cfg.output)
    last = run / "lightning" / "last.ckpt"
    if resume and not last.is_file():
        raise AnatomapError(f"{run}: nothing to resume (no lightning/last.ckpt)")
    if resume:
        load_resume_file(last)  # refuses anything but a resume file anatomap wrote, early
    if not resume and (run / "checkpoint").exists() and not overwrite:
        raise AnatomapError(
            f"{run}: run folder already holds a checkpoint; pass --resume to continue it, "
            "--overwrite to start again, or choose another output="
        )
    # every input is validated (cache, held-out file, model) before the run folder changes
    cache = Cache(cfg.data.cache)
    if resume:
        _same_data(run, cache)
    heldout = heldout_subjects(cfg, config_dir)
    train = [s for s in cache.subjects if s not in set(heldout)]
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    per_view, cross = cfg.data.modality_per_view, cfg.data.cross_modality
    channels = 1 if per_view else len(cache.modalities)
    module = PretrainModule(cfg, channels)
    spec = replace(module.objective.view_spec(), modality_per_view=per_view, cross_modality=cross)
    data = ViewDataModule(cfg, cache, train, spec)
    meta = _meta(cfg, cache, train, heldout, heldout_file(cfg, config_dir))
    meta["encoder"] = encoder_spec(cfg, channels).to_dict()
    data.num_workers()  # data.num_workers: auto is timed now, before the run folder changes
    if data.loader_choice is not None:
        meta["loader"] = data.loader_choice
    reuse_freed_memory()
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run / "config.yaml", dump_config(cfg), what="config")
    atomic_write_json(run / "run.json", meta)

    trainer = _trainer(cfg, run, meta, resume)
    trainer.fit(module, datamodule=data, ckpt_path=str(last) if resume else None, weights_only=True)
    if trainer.is_global_zero:
        atomic_write_json(
            run / "ranks.json",
            {"world_size": trainer.world_size, "fingerprints": module.rank_fingerprints},
        )
    return PretrainResult(
        run,
        run / "checkpoint",
        int(trainer.global_step),
        module.rank_fingerprints,
        trainer.is_global_zero,
    )
