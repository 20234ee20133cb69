"""Shipping a checkpoint as a packaged model (:mod:`anatomap.zoo`), and listing them.

:func:`ship_checkpoint` writes a checkpoint's weights as float16 safetensors (half the size;
:func:`anatomap.checkpoint.load_checkpoint` casts them back into the float32 modules) with
its ``meta.json`` (``weights_sha256`` of the new file, ``shipped`` = name, summary, source
step and dtype). :func:`shipped_models` lists what the package holds.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from anatomap.checkpoint import resolve_checkpoint
from anatomap.zoo import ShippedModel, available


def shipped_models() -> list[ShippedModel]:
    """The models shipped in the package (name, folder, summary, objective, bytes)."""
    return available()


def ship_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    summary: str,
    calibration: dict[str, Any] | None = None,
) -> Path:
    """Write ``checkpoint`` to the folder ``out`` with float16 weights (float tensors only)."""
    src = resolve_checkpoint(checkpoint)
    tensors = load_file(str(src / "model.safetensors"))
    half = {
        k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous()
        for k, v in tensors.items()
    }
    data = save(half)
    meta = json.loads((src / "meta.json").read_text())
    meta["weights_sha256"] = hashlib.sha256(data).hexdigest()
    meta["shipped"] = {
        "name": Path(out).name,
        "summary": summary,
        "dtype": "float16",
        "source_step": meta.get("step"),
    }
    if calibration is not None:
        meta["calibration"] = calibration
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(data)
    (folder / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return folder
