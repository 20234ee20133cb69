"""Checkpoints: safetensors weights + JSON metadata, written atomically.

A checkpoint is a folder::

    model.safetensors   tensors named encoder.* (the encoder) and objective.* (heads)
    meta.json           format, code version, objective name + config, encoder spec,
                        resolved run config, data provenance (cache, fingerprint,
                        preprocessing), step, creation time

Nothing here unpickles anything: weights come from safetensors, metadata from JSON. The
folder is written under a temporary name and renamed into place, so a reader never sees a
half-written checkpoint and the previous one survives a failed write.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from anatomap.errors import CheckpointError
from anatomap.models.encoders import Encoder, EncoderSpec, build_encoder

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


def save_checkpoint(
    folder: str | Path,
    encoder: Encoder,
    objective: torch.nn.Module | None,
    meta: dict[str, Any],
) -> Path:
    """Write ``folder`` atomically (temp folder + rename; the old one is removed last)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
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
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        (tmp / "meta.json").write_text(json.dumps(full_meta, indent=2))
        old = folder.with_name(f".{folder.name}.old{os.getpid()}")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{folder}: could not write checkpoint ({exc})") from None
    return folder


@dataclass
class LoadedCheckpoint:
    encoder: Encoder
    meta: dict[str, Any]
    objective_state: dict[str, torch.Tensor]
    path: Path


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder, its ``meta.json``, or a run folder (``RUN/checkpoint``)."""
    p = Path(path)
    if p.is_file() and p.name in ("meta.json", "model.safetensors"):
        p = p.parent
    if (p / "checkpoint" / "meta.json").is_file():
        p = p / "checkpoint"
    if not (p / "meta.json").is_file() or not (p / "model.safetensors").is_file():
        raise CheckpointError(
            f"{path}: not an anatomap checkpoint (expected meta.json and model.safetensors, "
            "or a run folder containing checkpoint/)"
        )
    return p


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> LoadedCheckpoint:
    """Rebuild the encoder from the metadata and load its weights (strict: every key)."""
    folder = resolve_checkpoint(path)
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{folder / 'meta.json'}: not valid JSON ({exc})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{folder}: meta.json is not an anatomap checkpoint")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{folder}: checkpoint format {meta.get('format_version')} is newer than this "
            f"anatomap reads ({FORMAT_VERSION}); upgrade anatomap"
        )
    try:
        tensors = load_file(str(folder / "model.safetensors"), device=map_location)
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{folder / 'model.safetensors'}: unreadable ({exc})") from None
    encoder = build_encoder(EncoderSpec.from_dict(meta["encoder"]))
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
