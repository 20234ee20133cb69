"""Shipped models: checkpoints that come inside the package, usable by name.

Each shipped model is a checkpoint folder ``anatomap/zoo/<name>/`` (``model.safetensors``
in float16, ``meta.json``, ``MODEL_CARD.md``). Every command that takes a checkpoint also
takes a shipped model's name (:func:`anatomap.checkpoint.resolve_checkpoint` falls back to
:func:`model_path` for a bare name that is not a path), e.g.
``anatomap match brain-mri --template T1_a.nii.gz --points points.csv T1_b.nii.gz``.
Float16 weights are cast to the float32 modules on load (``load_state_dict`` copies).

This module sits at the bottom of the layers: it reads files only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ShippedModel:
    """One shipped model: its name, folder, one-line summary and size on disk (bytes)."""

    name: str
    path: Path
    summary: str
    objective: str
    size_bytes: int


def _is_model(folder: Path) -> bool:
    return (folder / "meta.json").is_file() and (folder / "model.safetensors").is_file()


def available() -> list[ShippedModel]:
    """The shipped models, by name."""
    out = []
    for folder in sorted(p for p in ROOT.iterdir() if p.is_dir() and _is_model(p)):
        meta = json.loads((folder / "meta.json").read_text())
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        out.append(
            ShippedModel(
                name=folder.name,
                path=folder,
                summary=str(meta.get("shipped", {}).get("summary", "")),
                objective=str(meta.get("objective", "")),
                size_bytes=size,
            )
        )
    return out


def model_path(name: str) -> Path | None:
    """The folder of the shipped model ``name``, or ``None`` when there is none."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    folder = ROOT / name
    return folder if _is_model(folder) else None
