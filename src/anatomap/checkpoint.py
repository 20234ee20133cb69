"""Checkpoints: safetensors weights + JSON metadata, written atomically.

A checkpoint is a folder::

    model.safetensors   tensors named encoder.* (the encoder) and objective.* (heads)
    meta.json           format, code version, objective name + config, encoder spec,
                        resolved run config, data provenance (cache, fingerprint,
                        preprocessing), step, creation time, SHA-256 of model.safetensors

Nothing here unpickles anything: weights come from safetensors, metadata from JSON. The
folder is written under a temporary name (files fsynced) and renamed into place, so a reader
never sees a half-written checkpoint and the previous one survives a failed write (disk
full, kill -9). A kill between the two renames of the swap leaves the previous checkpoint as
``.<name>.old``; readers fall back to it and the next save puts it back.

This module sits below training, inference and evaluation: everything that loads a model
goes through :func:`load_model` (encoder + objective + metadata). Lightning's resume file is
handled in :mod:`anatomap.train.resume`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from anatomap.errors import CheckpointError
from anatomap.io.atomic import fsync_dir, reason, write_synced
from anatomap.models.encoders import Encoder, EncoderSpec, build_encoder

if TYPE_CHECKING:
    from anatomap.objectives.base import Objective

FORMAT = "anatomap-checkpoint"
FORMAT_VERSION = 1


def code_version() -> str:
    """Package version plus the git commit of the source tree when there is one."""
    from anatomap import __version__

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+g{commit}" if commit else __version__


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _old(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.old")


def _complete(folder: Path) -> bool:
    return (folder / "meta.json").is_file() and (folder / "model.safetensors").is_file()


def _recover(folder: Path) -> None:
    """Undo what an interrupted save left: put a previous checkpoint back, drop temp folders."""
    old = _old(folder)
    if not folder.exists() and _complete(old):
        os.replace(old, folder)
    for stale in folder.parent.glob(f".{folder.name}.tmp*"):
        if stale.name != f".{folder.name}.tmp{os.getpid()}":
            shutil.rmtree(stale, ignore_errors=True)


def save_checkpoint(
    folder: str | Path,
    encoder: Encoder,
    objective: torch.nn.Module | None,
    meta: dict[str, Any],
) -> Path:
    """Write ``folder`` atomically (synced temp folder + rename; the old one is removed last).

    Raises :class:`CheckpointError` if it cannot be written (the previous one is kept).
    """
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    tensors = {f"encoder.{k}": v for k, v in _contiguous(encoder.state_dict()).items()}
    if objective is not None:
        tensors.update(
            {f"objective.{k}": v for k, v in _contiguous(objective.state_dict()).items()}
        )
    full_meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "code_version": code_version(),
        "torch_version": torch.__version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "encoder": encoder.spec.to_dict(),
        **meta,
    }
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        _recover(folder)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        data = save_safetensors(tensors, metadata={"format": FORMAT})
        full_meta["weights_sha256"] = hashlib.sha256(data).hexdigest()
        write_synced(tmp / "model.safetensors", data)
        write_synced(tmp / "meta.json", json.dumps(full_meta, indent=2).encode())
        fsync_dir(tmp)
        old = _old(folder)
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        fsync_dir(folder.parent)
        shutil.rmtree(old, ignore_errors=True)
    except (OSError, SafetensorError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not folder.exists() and _complete(_old(folder)):
            os.replace(_old(folder), folder)
        raise CheckpointError(
            f"{folder}: could not write checkpoint ({reason(exc)}); "
            "the previous checkpoint is intact"
        ) from None
    return folder


@dataclass
class LoadedCheckpoint:
    encoder: Encoder
    meta: dict[str, Any]
    objective_state: dict[str, torch.Tensor]
    path: Path


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder, its ``meta.json``, or a run folder (``RUN/checkpoint``).

    If a save was killed between its two renames, the previous checkpoint (``.<name>.old``
    beside the folder) is used.
    """
    p = Path(path)
    if p.is_file() and p.name in ("meta.json", "model.safetensors"):
        p = p.parent
    for candidate in (p / "checkpoint", p):
        for c in (candidate, _old(candidate)):
            if _complete(c):
                return c
    raise CheckpointError(
        f"{path}: not an anatomap checkpoint (expected meta.json and model.safetensors, "
        "or a run folder containing checkpoint/)"
    )


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> LoadedCheckpoint:
    """Rebuild the encoder from the metadata and load its weights (strict: every key)."""
    folder = resolve_checkpoint(path)
    try:
        meta = json.loads((folder / "meta.json").read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise CheckpointError(f"{folder / 'meta.json'}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{folder}: meta.json is not an anatomap checkpoint")
    try:
        version = int(meta.get("format_version", 0))
    except (TypeError, ValueError):
        raise CheckpointError(f"{folder}: meta.json has a malformed format_version") from None
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{folder}: checkpoint format {meta.get('format_version')} is newer than this "
            f"anatomap reads ({FORMAT_VERSION}); upgrade anatomap"
        )
    weights = folder / "model.safetensors"
    try:
        data = weights.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{weights}: unreadable ({reason(exc)})") from None
    expected = meta.get("weights_sha256")
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise CheckpointError(
            f"{weights}: does not match the SHA-256 in meta.json (damaged or replaced file)"
        )
    try:
        tensors = load_safetensors(data)
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{weights}: unreadable ({str(exc)[:160]})") from None
    tensors = {k: v.to(map_location) for k, v in tensors.items()}
    try:
        encoder = build_encoder(EncoderSpec.from_dict(meta["encoder"]))
    except CheckpointError:
        raise
    except Exception as exc:  # a malformed spec: missing keys, wrong types, unknown encoder
        raise CheckpointError(
            f"{folder / 'meta.json'}: cannot rebuild the encoder ({type(exc).__name__}: "
            f"{str(exc)[:160]})"
        ) from None
    enc_state = {k[len("encoder.") :]: v for k, v in tensors.items() if k.startswith("encoder.")}
    try:
        result = encoder.load_state_dict(enc_state, strict=False)
    except RuntimeError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), "")
        raise CheckpointError(
            f"{folder}: encoder weights do not match the encoder spec ({first})"
        ) from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{folder}: encoder weights do not match the encoder spec "
            f"(missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})"
        )
    obj_state = {
        k[len("objective.") :]: v for k, v in tensors.items() if k.startswith("objective.")
    }
    encoder.eval()
    return LoadedCheckpoint(encoder, meta, obj_state, folder)


def load_objective(ckpt: LoadedCheckpoint) -> Objective:
    """Rebuild a checkpoint's objective (heads included, weights loaded) in eval mode."""
    from anatomap.objectives.registry import get_objective, objective_config

    meta = ckpt.meta
    cls = get_objective(meta["objective"])
    params = objective_config({"name": meta["objective"], **meta.get("objective_config", {})})
    objective = cls(params, ckpt.encoder)
    objective.load_state_dict(ckpt.objective_state, strict=False)
    return objective.eval()


def load_model(
    path: str | Path, map_location: str = "cpu"
) -> tuple[Encoder, Objective, dict[str, Any]]:
    """``checkpoint -> (encoder, objective, meta)``, both modules in eval mode: the one way
    inference, evaluation, export and mining load a model."""
    ckpt = load_checkpoint(path, map_location)
    return ckpt.encoder, load_objective(ckpt), ckpt.meta


def read_metrics(run: str | Path) -> list[dict[str, str]]:
    """Rows of a run folder's ``RUN/logs/metrics.csv`` (what the CSV logger wrote)."""
    import csv

    path = Path(run) / "logs" / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))
