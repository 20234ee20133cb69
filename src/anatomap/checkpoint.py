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
import math
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from anatomap import limits
from anatomap.errors import AnatomapError, CheckpointError
from anatomap.io.atomic import fsync_dir, reason, write_synced
from anatomap.models.encoders import Encoder, EncoderSpec, build_encoder

if TYPE_CHECKING:
    from anatomap.objectives.base import Objective

FORMAT = "anatomap-checkpoint"
FORMAT_VERSION = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_LIST = 64  # entries of one list in the encoder spec or objective config
_SIZING_KEY = re.compile(r"dim|channel|feature|hidden|width|size", re.I)
_MAX_FRESH = 1 << 24  # parameters an objective may create that the file does not hold


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
        err = CheckpointError(
            f"{folder}: could not write checkpoint ({reason(exc)}); "
            "the previous checkpoint is intact"
        )
        err.exit_code = 3  # an I/O failure (anatomap.cli)
        raise err from None
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
    if not p.exists() and len(p.parts) == 1:  # a bare name: a shipped model (anatomap.zoo)
        from anatomap.zoo import model_path

        shipped = model_path(str(path))
        if shipped is not None:
            return shipped
    raise CheckpointError(
        f"{path}: not an anatomap checkpoint (expected meta.json and model.safetensors, "
        "or a run folder containing checkpoint/)"
    )


def read_meta(folder: Path) -> dict[str, Any]:
    """A checkpoint's ``meta.json``, validated: size, JSON, format, version, a SHA-256 of the
    weights (always required: unverifiable weights are not loaded) and plain numbers."""
    path = folder / "meta.json"
    try:
        size = path.stat().st_size
        if size > limits.MAX_META_BYTES:
            raise CheckpointError(
                f"{path}: {size:,} bytes, more than the {limits.MAX_META_BYTES:,} checkpoint "
                "metadata may take"
            )
        meta = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:160]
        raise CheckpointError(f"{path}: not valid JSON ({why})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{folder}: meta.json is not an anatomap checkpoint")
    try:
        version = int(meta.get("format_version", 0))
    except (TypeError, ValueError, OverflowError):
        raise CheckpointError(f"{folder}: meta.json has a malformed format_version") from None
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{folder}: checkpoint format {meta.get('format_version')} is newer than this "
            f"anatomap reads ({FORMAT_VERSION}); upgrade anatomap"
        )
    sha = meta.get("weights_sha256")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise CheckpointError(
            f"{path}: no valid weights_sha256 (the SHA-256 of model.safetensors): the weights "
            "cannot be verified, so they are not loaded"
        )
    if not isinstance(meta.get("encoder"), dict):
        raise CheckpointError(f"{path}: no encoder spec (key 'encoder')")
    for key in ("encoder", "objective_config"):
        _check_plain(path, key, meta.get(key, {}))
    return meta


def _check_plain(path: Path, key: str, value: Any) -> None:
    """Numbers finite, lists short: what sizes layers must be a plain, sane value."""
    if isinstance(value, float) and not math.isfinite(value):
        raise CheckpointError(f"{path}: key '{key}' is not a finite number ({value})")
    if isinstance(value, list):
        if len(value) > _MAX_LIST:
            raise CheckpointError(f"{path}: key '{key}' lists {len(value)} values (> {_MAX_LIST})")
        for i, v in enumerate(value):
            _check_plain(path, f"{key}[{i}]", v)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_plain(path, f"{key}.{k}", v)


def _sizing_ints(value: Any, key: str = "") -> list[tuple[str, int]]:
    """``(key, n)`` for every integer under a key that names a layer size."""
    if isinstance(value, dict):
        return [x for k, v in value.items() for x in _sizing_ints(v, f"{key}.{k}".lstrip("."))]
    if isinstance(value, list):
        return [x for v in value for x in _sizing_ints(v, key)]
    if isinstance(value, int) and not isinstance(value, bool) and _SIZING_KEY.search(key):
        return [(key, value)]
    return []


def _mismatch(folder: Path, what: str, probe: torch.nn.Module, tensors: dict, prefix: str) -> None:
    """Refuse when ``probe`` (built on the meta device) wants other shapes than the file."""
    for name, t in probe.state_dict().items():
        held = tensors.get(prefix + name)
        if held is not None and tuple(held.shape) != tuple(t.shape):
            raise CheckpointError(
                f"{folder}: {what} weights do not match meta.json ({name}: the spec needs "
                f"shape {tuple(t.shape)}, the file holds {tuple(held.shape)})"
            )


def _fallback_sizes(folder: Path, what: str, value: Any, tensors: dict) -> None:
    """Without a dry build: no layer size in the metadata beyond the largest tensor axis."""
    largest = max((max(t.shape, default=1) for t in tensors.values()), default=1)
    for key, n in _sizing_ints(value):
        if n > max(largest, 1024):
            raise CheckpointError(
                f"{folder / 'meta.json'}: {what} key '{key}' = {n} is larger than any tensor "
                f"in model.safetensors ({largest}); refusing to allocate it"
            )


def _dry_build_encoder(folder: Path, spec: EncoderSpec, tensors: dict) -> None:
    """Build the encoder on the meta device (no memory) and compare its shapes to the file."""
    try:
        with torch.device("meta"):
            probe = build_encoder(spec)
    except AnatomapError:
        raise
    except Exception:  # some encoders cannot be built on the meta device (swinunetr)
        _fallback_sizes(folder, "encoder", spec.to_dict(), tensors)
        return
    _mismatch(folder, "encoder", probe, tensors, "encoder.")


def _dry_build_objective(ckpt: LoadedCheckpoint, cls: type, params: Any) -> None:
    """The objective's heads on the meta device: shapes must match the file, and what the file
    does not hold (fresh heads) stays under 2^24 parameters."""
    tensors = {f"objective.{k}": v for k, v in ckpt.objective_state.items()}
    try:
        with torch.device("meta"):
            probe = cls(params, ckpt.encoder)
    except AnatomapError:
        raise
    except Exception:
        _fallback_sizes(ckpt.path, "objective", params.model_dump(), tensors)
        return
    _mismatch(ckpt.path, "objective", probe, tensors, "objective.")
    fresh = sum(t.numel() for k, t in probe.state_dict().items() if f"objective.{k}" not in tensors)
    if fresh > _MAX_FRESH:
        raise CheckpointError(
            f"{ckpt.path / 'meta.json'}: objective_config asks for {fresh:,} parameters that "
            f"model.safetensors does not hold (more than {_MAX_FRESH:,})"
        )


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> LoadedCheckpoint:
    """Rebuild the encoder from the metadata and load its weights (strict: every key)."""
    folder = resolve_checkpoint(path)
    meta = read_meta(folder)
    weights = folder / "model.safetensors"
    try:
        data = weights.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{weights}: unreadable ({reason(exc)})") from None
    if hashlib.sha256(data).hexdigest() != meta["weights_sha256"]:
        raise CheckpointError(
            f"{weights}: does not match the SHA-256 in meta.json (damaged or replaced file)"
        )
    try:
        tensors = load_safetensors(data)
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{weights}: unreadable ({str(exc)[:160]})") from None
    del data
    tensors = {k: v.to(map_location) for k, v in tensors.items()}
    try:
        spec = EncoderSpec.from_dict(meta["encoder"])
        _dry_build_encoder(folder, spec, tensors)  # sizes checked before any allocation
        encoder = build_encoder(spec)
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
    where = ckpt.path / "meta.json"
    try:
        cls = get_objective(meta["objective"])
        params = objective_config(
            {"name": meta["objective"], **meta.get("objective_config", {})}, source=str(where)
        )
    except (AnatomapError, KeyError, TypeError) as exc:
        why = "; ".join(ln.removeprefix(f"{where}: ") for ln in str(exc).splitlines())
        raise CheckpointError(f"{where}: cannot rebuild the objective ({why})") from None
    _dry_build_objective(ckpt, cls, params)
    try:
        objective = cls(params, ckpt.encoder)
        objective.load_state_dict(ckpt.objective_state, strict=False)
    except Exception as exc:  # parameters the method rejects, weights of other shapes
        why = " ".join(str(exc).split())[:160]
        raise CheckpointError(
            f"{where}: cannot rebuild the objective ({type(exc).__name__}: {why})"
        ) from None
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
