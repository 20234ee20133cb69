"""Lightning's resume file (``RUN/lightning/last.ckpt``): written atomically, read safely.

The file is written through a synced temporary file and a rename (previous file intact on
any failure), and read only with ``torch.load(weights_only=True)`` and only if it carries
anatomap's resume marker, so no foreign pickle is ever executed.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from anatomap.errors import CheckpointError
from anatomap.io.atomic import atomic_write_bytes, reason

RESUME_FORMAT = "anatomap-resume-1"
"""Marker stored in every Lightning resume file anatomap writes (``checkpoint["anatomap"]``)."""


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O for the resume file: atomic writes (synced temp file +
    rename, :class:`CheckpointError` on failure, previous file intact) and reads with
    ``torch.load(weights_only=True)`` of files that carry :data:`RESUME_FORMAT` only."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        atomic_write_bytes(path, buf.getbuffer(), what="resume file", error=CheckpointError)

    def load_checkpoint(
        self,
        path: Any,
        map_location: Callable | str | None = "cpu",
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        return load_resume_file(path, map_location)


def load_resume_file(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """A resume file anatomap wrote, unpickled with ``weights_only=True`` (tensors, numbers,
    strings and containers only: no object is constructed, no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: resume file not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"{path}: refused to load: not a plain tensor file (weights_only load failed: "
            f"{first[:160]})"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable resume file ({reason(exc)})") from None
    marker = ckpt.get("anatomap") if isinstance(ckpt, dict) else None
    if not isinstance(marker, dict) or marker.get("format") != RESUME_FORMAT:
        raise CheckpointError(f"{path}: not a resume file written by anatomap")
    return ckpt
