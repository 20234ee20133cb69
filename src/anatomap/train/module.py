"""The Lightning module that trains any registered objective, and its data module."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from anatomap.config import RunConfig
from anatomap.data.cache import Cache
from anatomap.data.sampler import (
    EpochSampler,
    LocatedViewDataset,
    SharedRingCollate,
    augment_batch,
)
from anatomap.errors import AnatomapError
from anatomap.infer.mining import pairs_for
from anatomap.models.encoders import EncoderSpec, build_encoder
from anatomap.objectives.registry import get_objective
from anatomap.train.resume import RESUME_FORMAT

log = logging.getLogger(__name__)


class NonFiniteLossError(AnatomapError):
    """The loss became NaN or Inf; names the step and the batch's subjects."""


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) global generator states, as tensors, ints and
    lists only, so a resume file loads with ``torch.load(weights_only=True)``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [str(kind), torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumableLoader(DataLoader):
    """A DataLoader over an :class:`EpochSampler` whose place in the epoch is saved in
    Lightning's resume file (Lightning's ``state_dict`` / ``load_state_dict`` protocol for
    data loaders). ``steps_done()`` is the trainer's optimiser step count: one batch each.
    ``follow_steps``: every iteration starts where that count says
    (:meth:`EpochSampler.follow_steps`), not at the epoch Lightning's loop sets."""

    def __init__(
        self, *args: Any, steps_done: Callable[[], int], follow_steps: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._steps_done = steps_done
        if follow_steps and isinstance(self.sampler, EpochSampler):
            self.sampler.follow_steps(steps_done, int(self.batch_size or 1), len(self))

    def state_dict(self) -> dict[str, int]:
        epoch, batches = divmod(int(self._steps_done()), len(self))
        return {
            "epoch": epoch,
            "batches": batches,
            "batches_per_epoch": len(self),
            "batch_size": int(self.batch_size or 1),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler = self.sampler
        if not isinstance(sampler, EpochSampler):
            return
        if state.get("batches_per_epoch") != len(self) or state.get("batch_size") != (
            self.batch_size or 1
        ):
            warnings.warn(
                "batch size or samples per epoch changed since the checkpoint: the resumed run "
                "starts its epoch from the first sample",
                stacklevel=2,
            )
            sampler.follow_steps(None)
            sampler.set_epoch(int(state.get("epoch", 0)))
            return
        sampler.resume(int(state["epoch"]), int(state["batches"]) * int(state["batch_size"]))


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
        params = cfg.objective_params  # validated once, by load_config
        self.objective = get_objective(cfg.objective.name)(params, self.encoder)
        self.rank_fingerprints: list[str] = []
        if cfg.trainer.channels_last and cfg.model.spatial_dims == 3:
            self.to(memory_format=torch.channels_last_3d)  # weights (the EMA copies too)
            self.encoder.fusion.register_forward_pre_hook(_channels_last_input)
        if "bf16" in cfg.trainer.precision:  # "auto" is fp32 on a CPU, where the bug is
            guard_small_bf16_convs(self)
        if cfg.trainer.compile:
            # forward and pyramid() both run the backbone's pyramid: compile that; the module
            # tree and its state_dict keys stay as they are (checkpoints load either way)
            backbone = self.encoder.backbone
            backbone.pyramid = torch.compile(backbone.pyramid)  # type: ignore[method-assign]

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

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here, not in on_train_batch_end: checkpoint callbacks run before that hook, and the
        # saved state must include this step's EMA update. ``global_step`` counts this step
        # only once the hook returns.
        self.objective.on_after_step(self.encoder, self.global_step + 1, self.cfg.trainer.max_steps)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["anatomap"] = {"format": RESUME_FORMAT, "rng": rng_state()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._restored_rng = checkpoint.get("anatomap", {}).get("rng")

    def on_train_start(self) -> None:
        # Restored as late as possible: nothing between here and the first resumed step
        # draws from the global generators, as nothing does after a save in the original run.
        state = getattr(self, "_restored_rng", None)
        if state is not None:
            set_rng_state(state)
            self._restored_rng = None

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


def _channels_last_input(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook of the encoder's input stage: 5-D input in channels-last-3d."""
    x, *rest = args
    if isinstance(x, torch.Tensor) and x.ndim == 5:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return (x, *rest)


def _small_conv_in_fp32(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Forward pre-hook: a convolution of a CPU map with a side of at most 2 voxels runs in
    float32 under bf16 autocast (see :func:`guard_small_bf16_convs`)."""
    x = args[0]
    if (
        isinstance(x, torch.Tensor)
        and x.device.type == "cpu"
        and torch.is_autocast_enabled("cpu")
        and min(x.shape[2:]) <= 2
    ):
        module._anatomap_autocast_off = True  # type: ignore[assignment]
        torch.set_autocast_enabled("cpu", False)
        return (x.float(), *args[1:])
    return None


def _small_conv_restore(module: torch.nn.Module, args: tuple[Any, ...], out: Any) -> None:
    if getattr(module, "_anatomap_autocast_off", False):
        module._anatomap_autocast_off = False  # type: ignore[assignment]
        torch.set_autocast_enabled("cpu", True)


def guard_small_bf16_convs(module: torch.nn.Module) -> int:
    """Run every convolution of ``module`` whose input has a side <= 2 voxels in float32 when
    bf16 autocast is on for the CPU; returns how many convolutions were guarded.

    torch 2.13's oneDNN bf16 convolution on the CPU returns a weight gradient with NaNs, at
    random, for such maps (e.g. a 3x3x3 convolution of a ``[4, 32, 2, 4, 4]`` map: NaN in about
    one backward pass in three; forward, float32 and maps of side >= 3 measured clean). Deep
    stages of small crops reach 2 voxels (a 32^3 ISImed crop after four stride-2 stages), so
    bf16-mixed training on the CPU stopped with a non-finite loss. Such maps cost nothing in
    float32; on other devices the hooks do nothing.
    """
    n = 0
    for m in module.modules():
        if isinstance(m, torch.nn.modules.conv._ConvNd):
            m.register_forward_pre_hook(_small_conv_in_fp32)
            m.register_forward_hook(_small_conv_restore)
            n += 1
    return n


class ViewDataModule(L.LightningDataModule):
    """Training views from a cache (held-out subjects excluded).

    The views' intensity augmentation (``spec.intensity``) is not applied by the dataset,
    view by view, but after the batch reaches its device, to the whole batch at once
    (:func:`~anatomap.data.sampler.augment_batch`, seeded by the samples' seeds).
    ``data.num_workers: auto`` times the loader in the training process and with workers
    (:func:`choose_workers`) when training starts."""

    def __init__(self, cfg: RunConfig, cache: Cache, subjects: list[str], spec: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.intensity = spec.intensity
        spec = replace(spec, intensity=None)
        self.loader_choice: dict[str, Any] | None = None
        # An objective may ask for pairs mined before training (Alice: cross-volume views
        # found with a SAM checkpoint) and supply its own dataset around them.
        method = get_objective(cfg.objective.name)
        params = cfg.objective_params
        pairs = pairs_for(
            method.mining_request(params), cache, subjects, cfg.trainer.seed, cfg.trainer.progress
        )
        own = method.train_dataset(
            params,
            cache,
            subjects,
            spec,
            cfg.data.samples_per_epoch,
            cfg.trainer.seed,
            pairs=pairs,
        )
        if own is None and cfg.data.synth is not None:
            own = synth_dataset(cfg, spec)
        self.dataset = (
            own
            if own is not None
            else LocatedViewDataset(
                cache, subjects, spec, cfg.data.samples_per_epoch, seed=cfg.trainer.seed
            )
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Per-sample seeds stay on the host: objectives seed CPU generators from them.
        if isinstance(batch, dict) and isinstance(batch.get("seed"), torch.Tensor):
            batch["seed"] = batch["seed"].tolist()
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and "image" in batch:
            batch = augment_batch(batch, self.intensity)
        return batch

    def num_workers(self) -> int:
        """``data.num_workers``; ``auto``: measured once (:func:`choose_workers`), the
        choice kept in ``loader_choice``."""
        workers = self.cfg.data.num_workers
        if workers != "auto":
            return int(workers)
        if self.loader_choice is None:
            accelerator = str(self.cfg.trainer.accelerator)
            on_cpu = accelerator == "cpu" or (
                accelerator == "auto" and not torch.cuda.is_available()
            )
            busy = torch.get_num_threads() if on_cpu else 1
            self.loader_choice = choose_workers(self.dataset, self.cfg.trainer.batch_size, busy)
        return int(self.loader_choice["num_workers"])

    def train_dataloader(self) -> DataLoader:
        workers = self.num_workers()
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        return ResumableLoader(
            self.dataset,
            steps_done=lambda: trainer.global_step if trainer else 0,
            follow_steps=trainer is not None,  # each epoch starts where the step count says
            # its own generator: creating the iterator draws no number from torch's global one
            generator=torch.Generator().manual_seed(self.cfg.trainer.seed),
            batch_size=self.cfg.trainer.batch_size,
            sampler=EpochSampler(len(self.dataset), rank, world),
            num_workers=workers,
            collate_fn=SharedRingCollate(),  # reused shared memory per worker (issue 8)
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=len(self.dataset) >= self.cfg.trainer.batch_size,
        )


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def loader_rate(dataset: Any, batch_size: int, workers: int, batches: int) -> float:
    """Batches per second that a DataLoader with ``workers`` processes delivers from
    ``dataset`` (its first indices: every sample is a pure function of its index), timed
    after the first batch (worker start-up, first reads)."""
    n = min(len(dataset), (batches + 1) * batch_size)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=range(n),
        num_workers=workers,
        collate_fn=SharedRingCollate(),
        drop_last=n >= batch_size,
    )
    it = iter(loader)
    next(it)
    t0, got = time.perf_counter(), 0
    for _ in it:
        got += 1
    rate = got / max(time.perf_counter() - t0, 1e-9)
    del it, loader
    return rate


def choose_workers(
    dataset: Any, batch_size: int, busy: int = 1, batches: int = 6
) -> dict[str, Any]:
    """``data.num_workers: auto``: time ``batches`` batches in this process and with
    ``min(2, spare cores)`` worker processes and keep the faster (workers only when at least
    10% faster). ``busy``: the cores the training step keeps busy (its torch threads when it
    runs on the CPU, 1 beside a GPU); without a spare core the loader stays in the process,
    as workers would take their CPU from the step (on 2 shared cores a worker cost SAM's
    step 60%, ``benchmarks/train_speed.py``). Logged at INFO and returned (``run.json``:
    ``loader``)."""
    tried = max(0, min(2, usable_cpus() - busy))
    own = loader_rate(dataset, batch_size, 0, batches)
    choice: dict[str, Any] = {
        "num_workers": 0,
        "in_process_batches_per_s": round(own, 2),
        "workers_tried": tried,
        "workers_batches_per_s": None,
        "cores": usable_cpus(),
        "busy_cores": busy,
    }
    if tried > 0:
        try:
            rate = loader_rate(dataset, batch_size, tried, batches)
        except (RuntimeError, OSError) as exc:  # no worker processes here: stay in process
            choice["workers_error"] = " ".join(str(exc).split())[:200]
        else:
            choice["workers_batches_per_s"] = round(rate, 2)
            if rate > 1.1 * own:
                choice["num_workers"] = tried
    log.info(
        "data.num_workers=auto: %s (%.1f batches/s in the training process, %s with %d "
        "worker processes; %d cores, %d busy with the training step)",
        f"{choice['num_workers']} workers" if choice["num_workers"] else "in process",
        own,
        "n/a" if choice["workers_batches_per_s"] is None else f"{choice['workers_batches_per_s']}",
        tried,
        usable_cpus(),
        busy,
    )
    return choice


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


def synth_dataset(cfg: RunConfig, spec: Any) -> Any:
    """``data.synth``: views of synthetic subjects rendered on the fly (docs/synthetic.md)."""
    from anatomap.data.synth import LabelSource, SynthConfig, SynthViewDataset

    s = cfg.data.synth
    assert s is not None
    if s.labels:
        source = LabelSource.from_files(s.labels, spacing=s.label_spacing)
    else:
        source = LabelSource.brain(s.landmarks)
    return SynthViewDataset(
        source,
        SynthConfig.model_validate(s.generator),
        spec,
        cfg.data.samples_per_epoch,
        seed=cfg.trainer.seed,
        reuse=s.reuse,
    )
